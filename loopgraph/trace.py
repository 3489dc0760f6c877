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
import threading
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch
import torch.fx as fx
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .blocks import run_block
from .components import TRACE_LOCK, Recording, component_objects, component_tensors, record
from .snapshots import walk_tensors
from .rng import COUNTER_OPS, CounterDraws, counter_draw, draw_spec

__all__ = ["StepTrace", "LoopTrace", "ComponentSlot", "SeedDraw", "TensorUse", "Unsupported", "func_name",
           "trace_loop"]

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
    # the Python state there (``Recording.state_now``: what was written so far and the non-module reads), and
    # copies of the loop tensors there (slot -> tensor; taken in steps where eager segments may need them, so
    # compiled segments are checked against them without calling any block again)
    python_before: dict[str, dict] = field(default_factory=dict)
    values_before: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
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
    seeds: dict[str, SeedDraw] = field(default_factory=dict)  # rng="counter": seed name -> where it came from
    progress: bool = False  # the wrapper's __call__ opened its progress bar (compiled calls draw it then)
    python: Recording | None = None  # the Python state the call read and wrote (components.record)
    usage: TensorUse | None = None   # how the call used the tensors it met (the guards' tensor rules)
    components: Any = None           # the components object the call was made with

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
        self.eager_used: set[int] = set()  # ... in an op evaluated eagerly (no loop data in it)
        self.const_ids: set[int] = set()   # ... as a step graph's constant
        self.in_step = False  # inside loop_step: ops on loop data outside it are the wrapper's own work
        self.pre_loop: dict[int, torch.Tensor] = {}  # the data inputs, until the first step starts
        self.draws: CounterDraws | None = None  # rng="counter": random ops become counter-based draws
        self._storages: dict[tuple, list[fx.Node]] = {}  # storage of each step input -> its placeholders

    # -- bookkeeping ----------------------------------------------------------------------------------------
    def start_step(self, step: StepTrace, slots: dict[str, torch.Tensor],
                   held: dict[str, torch.Tensor]) -> None:
        """Make the BlockState's tensors, and the components' tensors derived from loop data in an earlier
        step, this step's placeholders."""
        self.stale.update({k: t for k, (t, _) in self.taint.items()})
        carried = {name: t for name, t in held.items() if self.stale.get(id(t)) is t}
        self.taint, self._const_ids, self.step, self._storages = {}, {}, step, {}
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
        self._storages.setdefault(_storage(tensor), []).append(node)
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
            self.const_ids.add(id(tensor))
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
        if name == "__set__" and getattr(getattr(func, "__self__", None), "__name__", None) == "data":
            return self._set_data(func, args)  # `x.data = y`
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
        if not tainted and self.pre_loop and self.step is None and name not in _METADATA and any(
                isinstance(v, torch.Tensor) and self.pre_loop.get(id(v)) is v for v in flat):
            self.block = None
            self.problem(f"tensor computation on loop data before the loop (`{name}` in the wrapper's own __call__)")
        if not tainted:
            if self.step is not None:
                for v in flat:  # a stale tensor used outside any graph op still leaks cross-step state
                    self._check_stale(v)
            self.eager_used.update(id(v) for v in flat if isinstance(v, torch.Tensor))
            return func(*args, **kwargs)
        if name in _DATA_DEPENDENT:
            self.problem(f"data-dependent Python: `{name}` on a value derived from loop state")
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if name in _METADATA and not isinstance(out, torch.Tensor):
            return out
        if not self.in_step:
            self.block = None
            self.problem(f"tensor computation on loop data outside loop_step (`{name}` in the wrapper's own "
                         f"__call__, between or after its steps)")
            return out
        if not _is_inplace(name, kwargs) and self.node_of(out) is not None:
            return out  # `.to()`/`.contiguous()` that returned its input: nothing happened
        if name == "data" and getattr(func, "__name__", "") == "__get__":  # `x.data`: x's value, its storage
            self.taint[id(out)] = (out, self.node_of(args[0]))
            return out
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

    def _set_data(self, func, args) -> None:
        """``x.data = y``: from now on ``x`` holds ``y``'s value (a rebinding of the value, not of the object)."""
        target, value = args
        func(*args)
        if self.node_of(value) is None and self.node_of(target) is None:
            return None
        if not self.in_step:
            self.problem("`.data` assignment of loop data outside loop_step (in the wrapper's own __call__)")
            return None
        self.step.block_ops[self.block] = self.step.block_ops.get(self.block, 0) + 1
        node = self.node_of(value)
        if node is None:
            self._check_stale(value)
            node = self._constant(value)
        self.taint[id(target)] = (target, node)
        return None

    def _detach_input(self, target: torch.Tensor) -> None:
        """Before an in-place op on a step input (or a view of one): the step reads that input through a copy
        made first, so the step stays a function of its inputs and the input counts as written."""
        for placeholder in self._storages.pop(_storage(target), []):
            graph = self.step.graph
            with graph.inserting_after(placeholder):
                copy_node = graph.call_function(torch.clone, (placeholder,))
            earlier = [u.meta["block"] for u in placeholder.users if "block" in u.meta]
            if earlier:  # the copy belongs to the first block that read the input (segments cut by block)
                copy_node.meta["block"] = earlier[0]
            placeholder.replace_all_uses_with(copy_node, delete_user_cb=lambda user: user is not copy_node)
            for key, (tensor, node) in list(self.taint.items()):
                if node is placeholder:
                    self.taint[key] = (tensor, copy_node)

    def _record(self, func, name, args, kwargs, out) -> None:
        graph = self.step.graph
        self.step.block_ops[self.block] = self.step.block_ops.get(self.block, 0) + 1
        inplace = _is_inplace(name, kwargs)
        target = kwargs.get("out", args[0] if args else None) if inplace else None
        if inplace and isinstance(target, torch.Tensor):
            self._detach_input(target)
            if self.node_of(target) is None:
                # Mutating a constant in place: work on a copy inside the graph (the constant stays as it is for
                # the next step); the tensor now maps to that copy.
                self.taint[id(target)] = (target, graph.call_function(torch.clone, (self._constant(target),)))
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
            node.meta["dtype"] = out.dtype
        elif isinstance(out, (tuple, list)):
            for k, item in enumerate(out):
                if isinstance(item, torch.Tensor):
                    self.taint[id(item)] = (item, graph.call_function(operator.getitem, (node, k)))


def _storage(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr()) if t.device.type != "meta" else (t.device, id(t))


def _tensor_slots(block_state, exclude: set[str]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in vars(block_state).items() if isinstance(v, torch.Tensor) and k not in exclude}


def _rng_states(slots: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The global RNG states and that of every generator in the BlockState (to replay random draws)."""
    states = {"": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    states.update({k: v.get_state() for k, v in slots.items() if isinstance(v, torch.Generator)})
    return states


def _roots(wrapper, components) -> dict[str, Any]:
    """The objects whose Python state a traced call starts from: the components, the wrapper and its blocks."""
    roots = {} if components is None else {"components": components}
    roots["wrapper"] = wrapper
    roots.update({f"wrapper.sub_blocks[{name!r}]": block for name, block in wrapper.sub_blocks.items()})
    return roots


class _Intercept:
    """The tracer's stand-ins for a few of the wrapper's methods, as instance attributes for the duration of a
    trace (under ``TRACE_LOCK``). Called from another thread they are the originals: an eager call of the same
    wrapper elsewhere is not recorded."""

    def __init__(self, wrapper, methods: dict[str, Callable]) -> None:
        self.wrapper = wrapper
        self.originals = {name: getattr(wrapper, name) for name in methods if callable(getattr(wrapper, name, None))}
        self.thread = threading.get_ident()
        for name, method in methods.items():
            if name in self.originals:
                setattr(wrapper, name, self._either(name, method))

    def _either(self, name: str, method: Callable) -> Callable:
        original = self.originals[name]

        def call(*args, **kwargs):
            if threading.get_ident() != self.thread:
                return original(*args, **kwargs)
            return method(*args, **kwargs)

        return call

    def remove(self) -> None:
        for name in self.originals:
            vars(self.wrapper).pop(name, None)


def _loop_tensors_in_containers(block_state, recorder: _Recorder) -> list[str]:
    """BlockState slots whose list, tuple or dict holds tensors computed by the loop (a list of previews)."""
    def computed(t: torch.Tensor) -> bool:  # a step's input (a tensor the caller passed in a dict) is not
        node = recorder.node_of(t)
        return (node is not None and node.op != "placeholder") or recorder.stale.get(id(t)) is t

    return [name for name, value in vars(block_state).items()
            if isinstance(value, (list, tuple, dict)) and any(computed(t) for t in walk_tensors(value))]


def trace_loop(wrapper, components, state, *, strict: bool = False, rng: str = "eager") -> tuple[LoopTrace, Any]:
    """Run ``wrapper(components, state)`` for real while recording each ``loop_step`` as an FX graph.

    The Python state the call reads and writes is recorded too (``components.record``: the plan's guards and
    what a compiled call replays), and before each block the components' Python state and, where eager segments
    may need them, copies of the loop tensors. ``rng="counter"`` draws the steps' random numbers by the seed
    policy of rng.py (recorded as graph ops) instead of from torch's generators. Returns the trace and the
    wrapper's own return value ``(components, state)``.

    Holds ``components.TRACE_LOCK``: one trace at a time per process.
    """
    recorder = _Recorder()
    recorder.strict = strict
    recorder.draws = CounterDraws() if rng == "counter" else None
    schedule_inputs = [p.name for p in getattr(wrapper, "loop_inputs", []) if p.name]
    exclude = set(schedule_inputs)
    steps: list[StepTrace] = []
    seen: dict[str, Any] = {}
    component_slots: dict[str, ComponentSlot] = {}
    python: Recording | None = None

    def wrapper_problem(reason: str) -> None:
        recorder.block = None
        if all(p.reason != reason for p in recorder.problems):
            recorder.problems.append(Unsupported(reason, None, None))
        if strict:
            raise Unsupported(reason)

    def get_block_state(st):
        bs = intercept.originals["get_block_state"](st)
        seen["initial"] = dict(vars(bs))
        seen["copy"] = {k: v.clone() if isinstance(v, torch.Tensor) and k not in exclude else v
                        for k, v in vars(bs).items()}
        seen["versions"] = {k: v._version for k, v in vars(bs).items()
                            if isinstance(v, torch.Tensor) and k not in exclude and not v.is_inference()}
        recorder.pre_loop = {id(v): v for k, v in vars(bs).items() if isinstance(v, torch.Tensor) and k not in exclude}
        with torch._C.DisableTorchFunction():
            seen["rng"] = _rng_states(vars(bs))
        return bs

    def set_block_state(st, bs):
        with python.paused():
            check_after(bs)
        return intercept.originals["set_block_state"](st, bs)

    def check_after(bs):
        final = seen.get("final", seen.get("initial", {}))
        changed = [k for k, v in vars(bs).items()
                   if (isinstance(v, torch.Tensor) or isinstance(final.get(k), torch.Tensor)) and final.get(k) is not v]
        if changed:
            wrapper_problem(f"the wrapper's own __call__ changes the BlockState's tensors after its loop "
                            f"(slots {changed})")
        elif steps:
            seen["final"] = dict(vars(bs))  # Python values it set after the loop are part of the result

    def check_between(block_state) -> None:
        """The BlockState a step starts from is the one the previous step (or get_block_state) left."""
        before = seen.get("final") if steps else seen.get("initial")
        if before is None:
            return
        now = vars(block_state)
        changed = [k for k in set(now) | set(before) if (isinstance(now.get(k), torch.Tensor) or isinstance(
            before.get(k), torch.Tensor)) and now.get(k) is not before.get(k)]
        if not steps:
            changed += [k for k, v in seen.get("versions", {}).items() if seen["initial"][k]._version != v]
        if changed:
            where = "between its steps" if steps else "before its loop"
            wrapper_problem(f"the wrapper's own __call__ changes the BlockState's tensors {where} "
                            f"(slots {sorted(set(changed))})")

    def cut(step: StepTrace, key: str, comps, block_state) -> None:
        with python.paused():
            _cut(step, key, comps, block_state)

    def _cut(step: StepTrace, key: str, comps, block_state) -> None:
        step.slots_before[key] = dict(vars(block_state))
        step.nodes_before[key] = {k: n for k, v in vars(block_state).items()
                                  if (n := recorder.node_of(v)) is not None}
        step.held_before[key] = {k: (path, v, n) for k, (path, v) in
                                 component_tensors(component_objects(wrapper, comps)).items()
                                 if (n := recorder.node_of(v)) is not None}
        step.draws_before[key] = dict(recorder.draws.counts) if recorder.draws is not None else {}
        with torch._C.DisableTorchFunction():  # copying is not part of the step
            step.python_before[key] = python.state_now()
            if step.index == 0 or recorder.problems:  # eager segments check their compiled parts against these
                step.values_before[key] = {
                    **{k: block_state[k].clone() for k in step.nodes_before[key]},
                    **{k: v.clone() for k, (_, v, _) in step.held_before[key].items()}}

    def loop_step(comps, block_state, **kwargs):
        with python.paused():
            check_between(block_state)
            step = StepTrace(index=len(steps), graph=fx.Graph(), inputs=[], outputs={}, constants={}, stable={},
                             kwargs=dict(kwargs))
            if not steps:
                seen.setdefault("initial", dict(vars(block_state)))
            objects = component_objects(wrapper, comps)
            held = component_tensors(objects)
            recorder.start_step(step, _tensor_slots(block_state, exclude), {k: t for k, (_, t) in held.items()})
        recorder.in_step, python.step = True, step.index
        try:
            for name, block in wrapper.sub_blocks.items():
                cut(step, name, comps, block_state)
                before = step.slots_before[name]
                recorder.block = python.block = name
                nodes_before = set(step.graph.nodes)
                comps, block_state = run_block(name, block, comps, block_state, **kwargs)
                after = vars(block_state)
                step.writes[name] = {k for k, v in after.items() if k not in before or before[k] is not v}
                # this block's ops (a seed's placeholder, drawn here, joins the step's inputs instead)
                new_nodes = [n for n in step.graph.nodes if n not in nodes_before and n.op != "placeholder"]
                for n in new_nodes:
                    n.meta["block"] = name
                step.reads[name] = {a.target for n in new_nodes for a in n.all_input_nodes if a.op == "placeholder"}
            recorder.block = python.block = None
            cut(step, "__end__", comps, block_state)
        finally:
            recorder.in_step, python.step = False, None
        with python.paused():
            return finish_step(step, comps, block_state, objects)

    def finish_step(step: StepTrace, comps, block_state, objects):
        for name in _loop_tensors_in_containers(block_state, recorder):
            wrapper_problem(f"slot {name!r} holds loop tensors inside a {type(block_state[name]).__name__} "
                            f"(the compiled loop carries tensors, not containers of them)")
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

    def progress_bar(*args, **kwargs):
        seen["progress"] = True
        return intercept.originals["progress_bar"](*args, **kwargs)

    methods = {"get_block_state": get_block_state, "set_block_state": set_block_state, "loop_step": loop_step,
               "progress_bar": progress_bar}
    with TRACE_LOCK:
        intercept = _Intercept(wrapper, methods)
        try:
            with record(_roots(wrapper, components)) as python, recorder:
                python.hide(wrapper, *methods)
                result = wrapper(components, state)
                with torch._C.DisableTorchFunction(), python.paused():
                    python.finish()
        finally:
            intercept.remove()
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
    held_at_end = {id(t) for t in seen.get("final_components", {}).values()}
    for obj, name, value in python.end:
        if any((recorder.node_of(t) is not None or recorder.stale.get(id(t)) is t) and id(t) not in held_at_end
               for t in walk_tensors(value)):
            recorder.problems.append(Unsupported(
                f"a loop tensor is kept in {python.paths.get(id(obj), type(obj).__name__)}.{name}, outside the "
                f"BlockState and the components' attributes the loop carries", None, None))
    trace = LoopTrace(steps=steps, initial_slots=initial, initial_inputs_copy=seen.get("copy", initial),
                      final_slots=final, tainted_final=tainted_final,
                      inplace_slots=inplace, schedule_inputs=schedule_inputs, problems=recorder.problems,
                      block_names=list(wrapper.sub_blocks), component_slots=component_slots,
                      final_components=seen.get("final_components", {}), rng_before=seen.get("rng", {}),
                      seeds=seeds, progress=seen.get("progress", False), python=python,
                      usage=TensorUse(recorder.used, recorder.eager_used, recorder.const_ids), components=components)
    return trace, result
