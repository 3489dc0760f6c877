"""What a traced call recorded: its steps (``StepTrace``), the whole loop (``LoopTrace``), and why a step cannot be
compiled (``Unsupported``). Made by trace/tracer.py and trace/taint.py; read by every later stage."""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
import torch.fx as fx

from ..pystate.attribute_log import AttributeLog
from .floats import Source

__all__ = ["Cut", "StepTrace", "LoopTrace", "ComponentSlot", "SeedDraw", "TensorUse", "ProblemKind", "Unsupported",
           "func_name"]


class ProblemKind(enum.Enum):
    """What kind of problem an ``Unsupported`` is: the first three, inside a block, leave that block to run eagerly
    between compiled segments (passes/partition.py ``eager_blocks``); any other makes the whole loop eager."""

    DATA_DEPENDENT = "data-dependent Python"   # `.item()`, `bool()` on loop data
    RANDOM_OP = "random op"                    # a draw compiled code cannot make as eager does
    SIDE_EFFECT = "side effect"                # a module global changed
    OTHER = "other"


class Unsupported(Exception):
    """Something in a step cannot be compiled; carries the block, the user-code location, why, and its kind."""

    def __init__(self, reason: str, block: str | None = None, where: str | None = None,
                 kind: ProblemKind = ProblemKind.OTHER) -> None:
        self.reason, self.block, self.where, self.kind = reason, block, where, kind
        super().__init__(f"{reason} (block {block!r}, {where})" if block else reason)


def func_name(func: Callable) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property getter: its descriptor's name (`shape`, `T`, `data`, ...)
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


class ComponentSlot(NamedTuple):
    """A tensor derived from loop data that a component holds across steps (a scheduler's history)."""

    path: tuple              # (component, attribute, index or key, ...)
    value: torch.Tensor      # its value when last seen (the eager run's)


class TensorUse(NamedTuple):
    """Ids of the tensors the traced call used: in any torch op, in ops it evaluated eagerly (their values were
    baked into the plan), and as constants of a step graph (the compiled code reads those very tensors)."""

    used: set[int]
    eager: set[int]
    const: set[int]


class SeedDraw(NamedTuple):
    """A seed the traced call drew for the loop's random ops (``rng="counter"``): from which generator."""

    key: tuple                          # rng.source_key: a generator object's id, or a device's default
    generator: torch.Generator | None   # that generator (None: the device's default generator)
    device: torch.device                # where its draws were made
    value: torch.Tensor                 # the seed (0-d int64)


@dataclass(frozen=True)
class Cut:
    """The loop's state at one point of a step, before a block or at "__end__" (eager segments cut steps there).

    ``slots``: the BlockState (shallow); ``nodes``: its slots that hold tainted tensors, with their nodes;
    ``held``: the tainted tensors the components hold (slot -> where, value, node); ``python``: the Python state
    (``Recording.state_now``: what was written so far and the non-module reads); ``draws``: rng="counter", the
    draws made so far per seed (where an eager block starts); ``values``: copies of the loop tensors, taken in the
    steps where eager segments check their compiled parts against them (else None)."""

    slots: dict[str, Any]
    nodes: dict[str, fx.Node]
    held: dict[str, tuple[tuple, torch.Tensor, fx.Node]]
    python: dict
    draws: dict[str, int]
    values: dict[str, torch.Tensor] | None = None

    def tainted(self) -> dict[str, fx.Node]:
        """Slot -> node of every tainted tensor here: the BlockState's and the components'."""
        return {**self.nodes, **{slot: node for slot, (_, _, node) in self.held.items()}}

    def renamed(self, nodes: dict[fx.Node, fx.Node]) -> Cut:
        """This cut with its nodes mapped through ``nodes`` (a node not in it stays)."""
        return dataclasses.replace(self, nodes={k: nodes.get(n, n) for k, n in self.nodes.items()},
                                   held={k: (path, v, nodes.get(n, n)) for k, (path, v, n) in self.held.items()})


@dataclass(frozen=True)
class StepTrace:
    """One iteration: its graph, which slots fed it, what it left in the BlockState, and per-block effects.

    Frozen: the tracer fills its graph and containers while the step runs; after the trace nothing changes it. A
    pass that rewrites a step works on ``copied()`` and returns a new trace."""

    index: int
    graph: fx.Graph
    inputs: list[str]                      # slot names, in placeholder order
    outputs: dict[str, fx.Node]            # slot name -> node holding its value at step end
    constants: dict[str, torch.Tensor]     # get_attr target -> tensor
    stable: dict[str, int]                 # get_attr target -> id of the constant tensor
    versions: dict[str, int] = field(default_factory=dict)     # get_attr target -> its _version when used
    reads: dict[str, set[str]] = field(default_factory=dict)   # block -> slots it read
    writes: dict[str, set[str]] = field(default_factory=dict)  # block -> slots it wrote
    block_ops: dict[str, int] = field(default_factory=dict)    # block -> recorded ops
    kwargs: dict[str, Any] = field(default_factory=dict)       # the loop_step keyword arguments
    # before each block, and at "__end__": the loop's state there (eager segments cut the step at these)
    cuts: dict[str, Cut] = field(default_factory=dict)
    # rng="counter": the seeds' placeholders in this step (seed name -> node, value)
    seeds: dict[str, tuple[fx.Node, torch.Tensor]] = field(default_factory=dict)
    # passes/batching.py: the step's top-level calls of modules with parameters, the batched retraces of repeated
    # ones (module id -> its ``BatchedCall``) and the repeated calls that cannot join a batch (with why)
    calls: list = field(default_factory=list)
    batched: dict[int, Any] = field(default_factory=dict)
    unbatched: list[tuple[Any, str]] = field(default_factory=list)

    def copied(self, sources: dict[int, Source]) -> StepTrace:
        """A copy with a graph of its own, and everything that names a node (outputs, cuts, seeds, module calls) on
        the new graph's nodes; ``sources``: the new trace's floats, by the id of the one each copies."""
        graph, nodes = fx.Graph(), {}
        graph.graph_copy(self.graph, nodes)
        for new in nodes.values():
            if new.meta.get("sources"):
                new.meta["sources"] = {pos: sources.get(id(s), s) for pos, s in new.meta["sources"].items()}
        calls: dict[int, Any] = {}

        def node(n: fx.Node | None) -> fx.Node | None:
            return nodes.get(n, n) if n is not None else None

        def call(c: Any) -> Any:  # a ModuleCall (trace/calls.py), once per call however often it is named
            if id(c) not in calls:
                calls[id(c)] = dataclasses.replace(c, nodes=[node(n) for n in c.nodes],
                                                   inputs=[node(n) for n in c.inputs],
                                                   out_nodes=[node(n) for n in c.out_nodes])
            return calls[id(c)]

        return dataclasses.replace(
            self, graph=graph, inputs=list(self.inputs), outputs={k: node(n) for k, n in self.outputs.items()},
            constants=dict(self.constants), stable=dict(self.stable), versions=dict(self.versions),
            block_ops=dict(self.block_ops), cuts={k: cut.renamed(nodes) for k, cut in self.cuts.items()},
            seeds={k: (node(n), v) for k, (n, v) in self.seeds.items()}, calls=[call(c) for c in self.calls],
            batched={k: dataclasses.replace(b, calls=[call(c) for c in b.calls]) for k, b in self.batched.items()},
            unbatched=[(call(c), reason) for c, reason in self.unbatched])

    def add_constant(self, tensor: torch.Tensor) -> str:
        """Make ``tensor`` a constant of this step's graph: its get_attr target, with its id and its version now
        (the recorder's constants, and those the "batch calls" stage adds)."""
        name = f"_c{len(self.constants)}"
        while name in self.constants:
            name += "_"
        self.constants[name], self.stable[name] = tensor, id(tensor)
        try:
            self.versions[name] = tensor._version
        except RuntimeError:  # inference tensors have no version counter (and cannot be mutated)
            self.versions[name] = 0
        return name

    def value_before(self, key: str, slot: str) -> Any:
        """A slot's value before block ``key``: the BlockState's, a component's (its history) or a seed."""
        if slot in self.seeds:
            return self.seeds[slot][1]
        cut = self.cuts[key]
        held = cut.held.get(slot)
        return held[1] if held is not None else cut.slots[slot]


@dataclass(frozen=True)
class Container:
    """A BlockState slot holding a flat list, tuple or dict of loop tensors (z_image's ``latent_model_input``, one
    tensor per image): the loop carries each item as a slot of its own (``item_slot``), and a compiled call puts
    the container back together from them (``rebuild``)."""

    type: type
    keys: tuple

    @classmethod
    def of(cls, value: Any) -> "Container":
        """The structure of a list, tuple or dict: its type and its keys (indices for a list or tuple)."""
        return cls(type(value), tuple(value) if isinstance(value, dict) else tuple(range(len(value))))

    @staticmethod
    def item_slot(name: str, key: Any) -> str:
        return f"{name}[{key!r}]"

    def items(self, name: str) -> list[tuple[Any, str]]:
        return [(k, self.item_slot(name, k)) for k in self.keys]

    def rebuild(self, name: str, values: dict[str, Any]) -> Any:
        if issubclass(self.type, dict):
            return self.type((k, values[slot]) for k, slot in self.items(name))
        return self.type(values[slot] for _, slot in self.items(name))


@dataclass(frozen=True)
class LoopTrace:
    """Everything one real run of the wrapper showed. Frozen: a pass returns a new one (``dataclasses.replace``)."""

    steps: list[StepTrace]
    initial_slots: dict[str, Any]          # BlockState right after get_block_state
    initial_inputs_copy: dict[str, Any]    # the same, with data tensors cloned before the loop ran
    final_slots: dict[str, Any]            # BlockState after the last step (the real, eager values)
    tainted_final: set[str]                # slots whose final value came from the graph
    inplace_slots: set[str]                # slots mutated in place (same object, new value)
    schedule_inputs: list[str]             # loop_inputs: treated as schedule, never proxied
    problems: list[Unsupported]
    block_names: list[str]
    component_slots: dict[str, ComponentSlot] = field(default_factory=dict)  # loop state held by components
    final_components: dict[str, torch.Tensor] = field(default_factory=dict)  # of those, held after the loop
    rng_before: dict[str, torch.Tensor] = field(default_factory=dict)  # RNG states when the loop started
    seeds: dict[str, SeedDraw] = field(default_factory=dict)  # rng="counter": seed name -> where it came from
    progress: bool = False  # the wrapper's __call__ opened its progress bar (compiled calls draw it then)
    python: AttributeLog | None = None  # the Python state the call read and wrote (attribute_log.py)
    usage: TensorUse | None = None   # how the call used the tensors it met (the guards' tensor rules)
    components: Any = None           # the components object the call was made with
    floats: list[Source] = field(default_factory=list)  # the floats it read, traced (trace/floats.py)
    containers: dict[str, Container] = field(default_factory=dict)  # slots holding a list/tuple/dict of loop
                                                                     # tensors: each item is a slot "name[k]"
    checks: tuple = ()  # data-dependent ops on BlockState inputs no step writes, checked per call (trace/hoist.py)
    input_objects: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # BlockState slot -> (a plain object
                                                                              # it held, its value_state then)
    aliases: tuple = ((), frozenset())  # (the components looked at, {(a component tensor's path, a BlockState slot)}):
                                        # one tensor in both places when traced

    @property
    def lifted(self) -> list[Source]:
        """The floats the plan may take as inputs: used only as operands of step graph arithmetic."""
        return [s for s in self.floats if s.lifted]

    def final_value(self, slot: str) -> Any:
        """A slot's value after the eager loop (BlockState or component state; None if gone)."""
        if slot in self.final_slots:
            return self.final_slots[slot]
        return self.final_components.get(slot)
