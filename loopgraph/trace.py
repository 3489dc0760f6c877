"""Trace: run the wrapper's own ``__call__`` for real, intercept ``loop_step``, record each step into an FX graph.

Only tensors derived from loop data are proxied (the *taint*): the BlockState's tensor slots (minus the
wrapper's own ``loop_inputs``, which are the schedule: ``timesteps`` and friends). Every other tensor —
parameters, sigma tables, ``t`` — is evaluated eagerly and enters the graph as a constant, keyed by
identity. So a scheduler's first-step ``nonzero().item()`` on the timesteps is simply evaluated, while an
``.item()`` or ``bool()`` on a tainted value is *data-dependent* and is reported, never baked.

Tensors derived from loop data that a component keeps in its Python state across steps (UniPC's
``model_outputs`` history and ``last_sample``) are loop state too: at the start of a step each one becomes a
placeholder named by its path (``scheduler.model_outputs[1]``), and whatever such tensors the components
hold at the end of the step are that step's outputs.

Because the trace is a real eager run, the call that plans returns eager's own result.
"""

from __future__ import annotations

import operator
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
import torch.fx as fx
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .blocks import run_block
from .rng import COUNTER_OPS, CounterDraws, counter_draw, draw_spec

__all__ = ["StepTrace", "LoopTrace", "ComponentSlot", "SeedDraw", "Unsupported", "component_objects",
           "component_tensors", "func_name", "trace_loop"]

# Tensor queries that return static metadata (shapes are part of the plan's key, not data).
_METADATA = {
    "shape", "size", "dim", "ndim", "ndimension", "dtype", "device", "numel", "nelement", "stride",
    "is_contiguous", "element_size", "is_floating_point", "is_complex", "requires_grad", "layout", "__len__",
    "storage_offset", "data_ptr", "is_cuda", "is_cpu", "get_device", "names", "is_sparse", "is_quantized",
    "is_meta", "_version", "grad_fn", "is_leaf", "__hash__", "is_inference", "itemsize", "nbytes", "grad",
    "is_mkldnn", "is_nested", "untyped_storage", "_is_view", "dim_order", "has_names",
}
# Results whose *values* (or whose shape) depend on tensor data: cannot be constants of a traced step.
_DATA_DEPENDENT = {
    "item", "__bool__", "__int__", "__float__", "__index__", "__complex__", "tolist", "numpy", "__array__",
    "__format__", "__repr__", "__str__", "nonzero", "masked_select", "unique", "unique_consecutive",
    "argwhere", "equal", "allclose", "is_nonzero", "bincount", "_local_scalar_dense", "nonzero_static",
}
_RANDOM = {
    "randn", "rand", "randint", "randn_like", "rand_like", "randint_like", "normal", "normal_", "uniform_",
    "bernoulli", "bernoulli_", "multinomial", "exponential_", "randperm", "poisson", "random_",
    "cauchy_", "geometric_", "log_normal_",
}
_INPLACE_DUNDERS = {"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                    "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__"}
# Python-level Tensor methods Dynamo cannot inline (they end in `super().<name>(...)`): the graph calls the
# torch.* function with the same signature instead.
_GRAPH_EQUIVALENT = {torch.Tensor.unflatten: torch.unflatten}
_LOOPGRAPH_DIR = __file__.rsplit("/", 1)[0]


class Unsupported(Exception):
    """Something in a step cannot be compiled; carries the block, the user-code location and why."""

    def __init__(self, reason: str, block: str | None = None, where: str | None = None) -> None:
        self.reason, self.block, self.where = reason, block, where
        super().__init__(f"{reason} (block {block!r}, {where})" if block else reason)


def func_name(func: Callable) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property getter: its descriptor's name (`shape`, `T`, `data`, ...)
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def _is_inplace(name: str, kwargs: dict) -> bool:
    return (name.endswith("_") and not name.startswith("__")) or name in _INPLACE_DUNDERS or "out" in kwargs


def _user_location() -> str:
    """file:line of the innermost frame outside torch and loopgraph (the user's code that did it)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        # the engine's own modules are skipped, not its subpackages (the zoo's blocks and schedulers are user code)
        if "/torch/" in frame.filename or frame.filename.rsplit("/", 1)[0] == _LOOPGRAPH_DIR:
            continue
        return f"{frame.filename}:{frame.lineno}"
    return "<unknown>"


class ComponentSlot(NamedTuple):
    """A tensor derived from loop data that a component holds across steps (a scheduler's history)."""

    path: tuple              # (component, attribute, index or key, ...)
    value: torch.Tensor      # its value when last seen (the eager run's)


def component_objects(wrapper, components) -> dict[str, Any]:
    """The wrapper's components that keep Python state (schedulers, guiders): every non-module one."""
    found = {}
    for spec in wrapper.expected_components:
        obj = getattr(components, spec.name, None)
        if obj is not None and not isinstance(obj, torch.nn.Module) and hasattr(obj, "__dict__"):
            found[spec.name] = obj
    return found


def component_tensors(objects: dict[str, Any]) -> dict[str, tuple[tuple, torch.Tensor]]:
    """Every tensor in the components' attributes, through lists, tuples and dicts: name -> (path, tensor).

    Only plain containers are walked (a named tuple or another object is not): a loop-derived tensor held
    anywhere else is reported by the tracer as state carried across steps outside the loop's reach."""
    found: dict[str, tuple[tuple, torch.Tensor]] = {}

    def walk(value: Any, path: tuple, name: str) -> None:
        if isinstance(value, torch.Tensor):
            found[name] = (path, value)
        elif type(value) in (list, tuple):
            for k, item in enumerate(value):
                walk(item, (*path, k), f"{name}[{k}]")
        elif type(value) is dict:
            for k, item in value.items():
                walk(item, (*path, k), f"{name}[{k!r}]")

    for comp, obj in objects.items():
        for attr, value in vars(obj).items():
            walk(value, (comp, attr), f"{comp}.{attr}")
    return found


class SeedDraw(NamedTuple):
    """A seed the traced call drew for the loop's random ops (``rng="counter"``): from which generator."""

    key: tuple                          # rng.source_key: a generator object's id, or a device's default
    generator: torch.Generator | None   # that generator (None: the device's default generator)
    device: torch.device                # where its draws were made
    value: torch.Tensor                 # the seed (0-d int64)


@dataclass
class StepTrace:
    """One iteration: its graph, which slots fed it, what it left in the BlockState, and per-block effects."""

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
    # Before each block, and at "__end__": the BlockState (shallow), which of its slots hold tainted tensors
    # (slot -> node), the tainted tensors the components hold (component slot -> where, value, node) and,
    # when asked for, the components' Python state. Eager segments cut the step here.
    slots_before: dict[str, dict[str, Any]] = field(default_factory=dict)
    nodes_before: dict[str, dict[str, fx.Node]] = field(default_factory=dict)
    held_before: dict[str, dict[str, tuple[tuple, torch.Tensor, fx.Node]]] = field(default_factory=dict)
    python_before: dict[str, Any] = field(default_factory=dict)
    # rng="counter": the seeds' placeholders in this step (seed name -> node, value), and before each block
    # the draws the step had made per seed (the counts an eager block starts from)
    seeds: dict[str, tuple[fx.Node, torch.Tensor]] = field(default_factory=dict)
    draws_before: dict[str, dict[str, int]] = field(default_factory=dict)

    def value_before(self, key: str, slot: str) -> Any:
        """A slot's value before block ``key``: the BlockState's, a component's (its history) or a seed."""
        if slot in self.seeds:
            return self.seeds[slot][1]
        held = self.held_before[key].get(slot)
        return held[1] if held is not None else self.slots_before[key][slot]


@dataclass
class LoopTrace:
    """Everything one real run of the wrapper showed."""

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
    # Where the components held tensors at the start that no torch op used and that were gone at the end
    # (UniPC's leftover `timestep_list`, shifted out unread): their values cannot change the loop.
    unused_held: list[tuple] = field(default_factory=list)
    seeds: dict[str, SeedDraw] = field(default_factory=dict)  # rng="counter": seed name -> where it came from
    progress: bool = False  # the wrapper's __call__ opened its progress bar (compiled calls draw it then)

    def final_value(self, slot: str) -> Any:
        """A slot's value after the eager loop (BlockState or component state; None if gone)."""
        if slot in self.final_slots:
            return self.final_slots[slot]
        return self.final_components.get(slot)


class _Recorder(TorchFunctionMode):
    """Records ops on tainted tensors into the current step's graph; evaluates everything else."""

    def __init__(self) -> None:
        super().__init__()
        self.taint: dict[int, tuple[torch.Tensor, fx.Node]] = {}
        self.stale: dict[int, torch.Tensor] = {}  # tainted in an earlier step: must not leak into this one
        self.step: StepTrace | None = None
        self.block: str | None = None
        self.problems: list[Unsupported] = []
        self.strict = False
        self._const_ids: dict[int, str] = {}
        self.used: set[int] = set()  # ids of every tensor a torch op was called with
        self.draws: CounterDraws | None = None  # rng="counter": random ops become counter-based draws

    # -- bookkeeping ----------------------------------------------------------------------------------------
    def start_step(self, step: StepTrace, slots: dict[str, torch.Tensor],
                   held: dict[str, torch.Tensor]) -> None:
        """Make the BlockState's tensors, and the components' tensors derived from loop data in an earlier
        step, this step's placeholders."""
        self.stale.update({k: t for k, (t, _) in self.taint.items()})
        carried = {name: t for name, t in held.items() if self.stale.get(id(t)) is t}
        self.taint, self._const_ids, self.step = {}, {}, step
        for name, tensor in {**slots, **carried}.items():
            self._placeholder(name, tensor)
        if self.draws is not None:
            self.draws.start_step(step.index)
            for name, seed in self.draws.seeds.values():
                step.seeds[name] = (self._placeholder(name, seed), seed)

    def _placeholder(self, name: str, tensor: torch.Tensor) -> fx.Node:
        """A step input, placed after the step's other inputs (a seed drawn mid-step joins them there)."""
        graph = self.step.graph
        inputs = [n for n in graph.nodes if n.op == "placeholder"]
        with graph.inserting_after(inputs[-1]) if inputs else graph.inserting_before(None):
            node = graph.placeholder(name)
        self.taint[id(tensor)] = (tensor, node)
        self.stale.pop(id(tensor), None)
        self.step.inputs.append(name)
        return node

    def node_of(self, value: Any) -> fx.Node | None:
        hit = self.taint.get(id(value)) if isinstance(value, torch.Tensor) else None
        return hit[1] if hit is not None and hit[0] is value else None

    def problem(self, reason: str) -> None:
        issue = Unsupported(reason, self.block, _user_location())
        if (issue.reason, issue.block) not in {(p.reason, p.block) for p in self.problems}:
            self.problems.append(issue)
        if self.strict:
            raise issue

    def _constant(self, tensor: torch.Tensor) -> fx.Node:
        step = self.step
        name = self._const_ids.get(id(tensor))
        if name is None:
            name = f"_c{len(step.constants)}"
            self._const_ids[id(tensor)] = name
            step.constants[name] = tensor
            step.stable[name] = id(tensor)
            try:
                step.versions[name] = tensor._version
            except RuntimeError:  # inference tensors have no version counter (and cannot be mutated)
                step.versions[name] = 0
        return step.graph.get_attr(name)

    def _check_stale(self, value: Any) -> None:
        if isinstance(value, torch.Tensor) and self.stale.get(id(value)) is value:
            self.problem("a tensor computed in an earlier step reached this step outside the BlockState and "
                         "the components' attributes (state carried across steps in another object)")

    def _arg(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            node = self.node_of(value)
            if node is not None:
                return node
            self._check_stale(value)
            return self._constant(value)
        return value  # Python scalars stay literals; analysis lifts those that differ between steps

    # -- the mode -------------------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, _ = pytree.tree_flatten((args, kwargs))
        self.used.update(id(v) for v in flat if isinstance(v, torch.Tensor))
        tainted = any(self.node_of(v) is not None for v in flat)
        name = func_name(func)
        if name in _RANDOM and self.step is not None:  # `randn_like(latents)` as much as `randn(shape)`
            if self.draws is None:
                self.problem(f"random op `{name}` inside the loop (its draws must be eager's; rng='counter' "
                             f"draws them inside the compiled loop instead)")
            elif name in COUNTER_OPS:
                try:
                    return self._counter_draw(name, args, kwargs)
                except ValueError as e:
                    self.problem(f"random op {e}: rng='counter' cannot draw it (eager's generator draws it)")
            else:
                self.problem(f"random op `{name}` inside the loop: rng='counter' draws randn, randn_like, rand "
                             f"and rand_like only (eager's generator draws it)")
        if not tainted:
            if self.step is not None:
                for v in flat:  # a stale tensor used outside any graph op still leaks cross-step state
                    self._check_stale(v)
            return func(*args, **kwargs)
        if name in _DATA_DEPENDENT:
            self.problem(f"data-dependent Python: `{name}` on a value derived from loop state")
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if name in _METADATA and not isinstance(out, torch.Tensor):
            return out
        if self.step is None:
            self.problem("tensor computation on loop data outside loop_step (in the wrapper's __call__)")
            return out
        if not _is_inplace(name, kwargs) and self.node_of(out) is not None:
            return out  # `.to()`/`.contiguous()` that returned its input: nothing happened
        if not any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(out)) and out is not None:
            self.problem(f"data-dependent Python: `{name}` returned {type(out).__name__} from loop data")
            return out
        self._record(func, name, args, kwargs, out)
        return out

    def _counter_draw(self, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
        """Draw by the seed policy (rng.py) and record the draw: its seed is a step input, its stream a
        per-step constant (lifted into a table), so the compiled step draws what this eager run drew."""
        spec = draw_spec(name, args, kwargs)
        seed_name, seed, new = self.draws.seed(spec)
        if new:
            self.step.seeds[seed_name] = (self._placeholder(seed_name, seed), seed)
        stream = self.draws.stream(spec, seed_name)
        out = counter_draw(seed, stream, spec.shape, spec.dtype, spec.device, spec.kind)
        node = self.step.graph.call_function(counter_draw, (self.node_of(seed), self._constant(stream), spec.shape,
                                                            spec.dtype, spec.device, spec.kind))
        self.step.block_ops[self.block] = self.step.block_ops.get(self.block, 0) + 1
        self.taint[id(out)] = (out, node)
        return out

    def _record(self, func, name, args, kwargs, out) -> None:
        graph = self.step.graph
        self.step.block_ops[self.block] = self.step.block_ops.get(self.block, 0) + 1
        inplace = _is_inplace(name, kwargs)
        target = kwargs.get("out", args[0] if args else None) if inplace else None
        if inplace and isinstance(target, torch.Tensor):
            tnode = self.node_of(target)
            if tnode is None or tnode.op == "placeholder":
                # Mutating a constant or a step input in place: work on a copy inside the graph, so the
                # compiled step stays functional over its inputs; the tensor now maps to that copy.
                base = tnode if tnode is not None else self._constant(target)
                tnode = graph.call_function(torch.clone, (base,))
                self.taint[id(target)] = (target, tnode)
        g_args, g_kwargs = pytree.tree_map(self._arg, (args, kwargs))
        if getattr(func, "__name__", "") == "__get__":  # property read that returned a tensor (.T, .mT, ...)
            node = graph.call_function(getattr, (g_args[0], func_name(func)))
        else:
            node = graph.call_function(_GRAPH_EQUIVALENT.get(func, func), tuple(g_args), g_kwargs)
        if inplace:
            node.meta["mutates"] = True  # kept even when nothing uses its result (`out[..., 0::2] = x`)
        if inplace and isinstance(target, torch.Tensor):
            self.taint[id(target)] = (target, node if out is target else self.node_of(target))
        if isinstance(out, torch.Tensor):
            self.taint[id(out)] = (out, node)
        elif isinstance(out, (tuple, list)):
            for k, item in enumerate(out):
                if isinstance(item, torch.Tensor):
                    self.taint[id(item)] = (item, graph.call_function(operator.getitem, (node, k)))


def _tensor_slots(block_state, exclude: set[str]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in vars(block_state).items() if isinstance(v, torch.Tensor) and k not in exclude}


def _rng_states(slots: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The global RNG states and that of every generator in the BlockState (to replay random draws)."""
    states = {"": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    states.update({k: v.get_state() for k, v in slots.items() if isinstance(v, torch.Generator)})
    return states


def trace_loop(wrapper, components, state, *, strict: bool = False,
               snapshot: Callable[[Any], Any] | None = None, rng: str = "eager") -> tuple[LoopTrace, Any, Any]:
    """Run ``wrapper(components, state)`` for real while recording each ``loop_step`` as an FX graph.

    ``snapshot(components)``, when given, records the components' Python state before each block (outside
    the recording mode). ``rng="counter"`` draws the steps' random numbers by the seed policy of rng.py
    (recorded as graph ops) instead of from torch's generators. Returns the trace and the wrapper's own
    return value ``(components, state)``.
    """
    recorder = _Recorder()
    recorder.strict = strict
    recorder.draws = CounterDraws() if rng == "counter" else None
    schedule_inputs = [p.name for p in getattr(wrapper, "loop_inputs", []) if p.name]
    exclude = set(schedule_inputs)
    steps: list[StepTrace] = []
    seen: dict[str, Any] = {}
    component_slots: dict[str, ComponentSlot] = {}
    original_get = wrapper.get_block_state

    def get_block_state(st):
        bs = original_get(st)
        seen["initial"] = dict(vars(bs))
        seen["copy"] = {k: v.clone() if isinstance(v, torch.Tensor) and k not in exclude else v
                        for k, v in vars(bs).items()}
        seen["versions"] = {k: v._version for k, v in vars(bs).items()
                            if isinstance(v, torch.Tensor) and k not in exclude and not v.is_inference()}
        with torch._C.DisableTorchFunction():
            seen["rng"] = _rng_states(vars(bs))
        return bs

    def cut(step: StepTrace, key: str, comps, block_state) -> None:
        step.slots_before[key] = dict(vars(block_state))
        step.nodes_before[key] = {k: n for k, v in vars(block_state).items()
                                  if (n := recorder.node_of(v)) is not None}
        step.held_before[key] = {k: (path, v, n) for k, (path, v) in
                                 component_tensors(component_objects(wrapper, comps)).items()
                                 if (n := recorder.node_of(v)) is not None}
        step.draws_before[key] = dict(recorder.draws.counts) if recorder.draws is not None else {}
        if snapshot is not None:
            with torch._C.DisableTorchFunction():  # copying tensors is not part of the step
                step.python_before[key] = snapshot(comps)

    def loop_step(comps, block_state, **kwargs):
        step = StepTrace(index=len(steps), graph=fx.Graph(), inputs=[], outputs={}, constants={}, stable={},
                         kwargs=dict(kwargs))
        if not steps:
            seen.setdefault("initial", dict(vars(block_state)))
        objects = component_objects(wrapper, comps)
        held = component_tensors(objects)
        recorder.start_step(step, _tensor_slots(block_state, exclude), {k: t for k, (_, t) in held.items()})
        for name, block in wrapper.sub_blocks.items():
            cut(step, name, comps, block_state)
            before = step.slots_before[name]
            recorder.block = name
            nodes_before = set(step.graph.nodes)
            comps, block_state = run_block(name, block, comps, block_state, **kwargs)
            after = vars(block_state)
            step.writes[name] = {k for k, v in after.items() if k not in before or before[k] is not v}
            # this block's ops (a seed's placeholder, drawn here, joins the step's inputs instead)
            new_nodes = [n for n in step.graph.nodes if n not in nodes_before and n.op != "placeholder"]
            for n in new_nodes:
                n.meta["block"] = name
            step.reads[name] = {a.target for n in new_nodes for a in n.all_input_nodes if a.op == "placeholder"}
        recorder.block = None
        cut(step, "__end__", comps, block_state)
        for name, value in vars(block_state).items():
            node = recorder.node_of(value)
            if node is not None:
                step.outputs[name] = node
        seen["final_components"] = {}
        for name, (path, value) in component_tensors(objects).items():
            node = recorder.node_of(value)
            if node is not None:
                step.outputs[name] = node
                component_slots[name] = ComponentSlot(path, value)
                seen["final_components"][name] = value
        steps.append(step)
        seen["final"] = dict(vars(block_state))
        return comps, block_state

    wrapper.get_block_state = get_block_state
    wrapper.loop_step = loop_step
    original_bar = getattr(wrapper, "progress_bar", None)
    if callable(original_bar):
        def progress_bar(*args, **kwargs):
            seen["progress"] = True
            return original_bar(*args, **kwargs)

        wrapper.progress_bar = progress_bar
    held_at_start = component_tensors(component_objects(wrapper, components))  # kept alive: ids stay unique
    try:
        with recorder:
            result = wrapper(components, state)
    finally:
        del wrapper.loop_step
        del wrapper.get_block_state
        if callable(original_bar):
            del wrapper.progress_bar
    held_at_end = {id(t) for _, t in component_tensors(component_objects(wrapper, components)).values()}
    unused_held = [path for path, t in held_at_start.values()
                   if id(t) not in recorder.used and id(t) not in held_at_end]
    initial, final = seen.get("initial", {}), seen.get("final", {})
    draws = recorder.draws
    seeds = {} if draws is None else {name: SeedDraw(key, draws.generators[key], value.device, value)
                                      for key, (name, value) in draws.seeds.items()}
    tainted_final = {k for k, v in final.items() if recorder.node_of(v) is not None}
    inplace = {k for k in tainted_final if k in initial and initial[k] is final[k]}
    for name, version in seen.get("versions", {}).items():
        if initial[name]._version != version and name not in inplace:
            recorder.problems.append(Unsupported(
                f"input {name!r} is updated in place and then replaced by a new tensor: the caller's tensor "
                f"keeps an intermediate value (not compiled yet)", None, None))
    trace = LoopTrace(steps=steps, initial_slots=initial, initial_inputs_copy=seen.get("copy", initial),
                      final_slots=final, tainted_final=tainted_final,
                      inplace_slots=inplace, schedule_inputs=schedule_inputs, problems=recorder.problems,
                      block_names=list(wrapper.sub_blocks), component_slots=component_slots,
                      final_components=seen.get("final_components", {}), rng_before=seen.get("rng", {}),
                      unused_held=unused_held, seeds=seeds, progress=seen.get("progress", False))
    return trace, result
