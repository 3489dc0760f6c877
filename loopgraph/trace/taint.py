"""The recorder: a ``TorchFunctionMode`` that records each op on loop data (the *taint*) into the current step's
FX graph and evaluates every other op, turning its result into a constant. An op whose result depends on loop
data's values (``.item()``, ``bool()``), a random op (``rng="eager"``) or an in-place update it cannot follow is
reported as an ``Unsupported`` problem of the block it ran in, with the user's file and line."""

from __future__ import annotations

import contextlib
import copy
import operator
import sys
import traceback
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ..pystate.user_globals import is_engine_file
from ..rng import COUNTER_OPS, CounterDraws, counter_draw, draw_spec
from . import hoist
from .floats import ARITHMETIC, TracedFloat
from .ir import ProblemKind, StepTrace, Unsupported, func_name

__all__ = ["Recorder"]

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


def _is_inplace(name: str, kwargs: dict) -> bool:
    return (name.endswith("_") and not name.startswith("__")) or name in _INPLACE_DUNDERS or "out" in kwargs


def _user_location() -> str:
    """file:line of the innermost frame outside torch and loopgraph (the user's code that did it)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        # the engine's own modules are skipped, not the zoo's (its blocks and schedulers are user code)
        if "/torch/" in frame.filename or is_engine_file(frame.filename):
            continue
        return f"{frame.filename}:{frame.lineno}"
    return "<unknown>"


class Recorder(TorchFunctionMode):
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
        self.data_set: dict[int, torch.Tensor] = {}  # tensors given a new value by `x.data = y`
        self.draws: CounterDraws | None = None  # rng="counter": random ops become counter-based draws
        self._storages: dict[tuple, list[fx.Node]] = {}  # storage of each step input -> its placeholders
        self.recorded = 0  # ops recorded so far (an op given a traced float and not recorded bakes it)
        self.slots: dict[str, str] = {}  # this step's placeholders of BlockState slots -> the slot
        self.hoisted: list[Hoisted] = []  # data-dependent ops on BlockState inputs (trace/hoist.py)

    # -- bookkeeping ----------------------------------------------------------------------------------------
    def start_step(self, step: StepTrace, slots: dict[str, torch.Tensor],
                   held: dict[str, torch.Tensor]) -> None:
        """Make the BlockState's tensors, and the components' tensors derived from loop data in an earlier
        step, this step's placeholders."""
        self.stale.update({k: t for k, (t, _) in self.taint.items()})
        slot_ids = {id(t) for t in slots.values()}  # a component's tensor that is a slot's: the slot's placeholder
        carried = {name: t for name, t in held.items() if self.stale.get(id(t)) is t and id(t) not in slot_ids}
        self.taint, self._const_ids, self.step, self._storages = {}, {}, step, {}
        self.slots = {name: name for name in slots}  # BlockState placeholders -> their slot (trace/hoist.py)
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

    @contextlib.contextmanager
    def scratch(self) -> Iterator[StepTrace]:
        """Record into a scratch step instead of the current one (batching.py traces a batched call there): its own
        graph, constants and taint, problems collected apart and never raised, no counter-based draws."""
        saved = (self.step, self.taint, self._const_ids, self._storages, self.problems, self.strict, self.draws)
        scratch = StepTrace(index=-1, graph=fx.Graph(), inputs=[], outputs={}, constants={}, stable={})
        self.step, self.taint, self._const_ids, self._storages, self.problems = scratch, {}, {}, {}, []
        self.strict, self.draws = False, None
        try:
            yield scratch
        finally:
            self.step, self.taint, self._const_ids, self._storages, self.problems, self.strict, self.draws = saved

    def node_of(self, value: Any) -> fx.Node | None:
        hit = self.taint.get(id(value)) if isinstance(value, torch.Tensor) else None
        return hit[1] if hit is not None and hit[0] is value else None

    def problem(self, reason: str, kind: ProblemKind = ProblemKind.OTHER) -> None:
        self.add_problem(Unsupported(reason, self.block, _user_location(), kind))

    def add_problem(self, issue: Unsupported) -> None:
        """Note ``issue`` once per reason and block (strict: raise it)."""
        if (issue.reason, issue.block) not in {(p.reason, p.block) for p in self.problems}:
            self.problems.append(issue)
        if self.strict:
            raise issue

    def _constant(self, tensor: torch.Tensor) -> fx.Node:
        step = self.step
        name = self._const_ids.get(id(tensor))
        if name is None:
            name = self._const_ids[id(tensor)] = step.add_constant(tensor)
            self.const_ids.add(id(tensor))
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
        if type(value) is TracedFloat:  # the graph holds the float the call read (its position: _record)
            return value.source.original
        numpy = sys.modules.get("numpy")
        if numpy is not None and isinstance(value, numpy.generic):
            return value.item()  # a numpy scalar: torch takes it as the Python number (Dynamo refuses it in a graph)
        return value  # Python scalars stay literals; analysis lifts those that differ between steps

    # -- the mode -------------------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat = _leaves((args, kwargs), [])
        floats = [v for v in flat if type(v) is TracedFloat]
        if not floats:
            return self._dispatch(func, args, kwargs, flat)
        recorded = self.recorded
        try:
            return self._dispatch(func, args, kwargs, flat)
        finally:
            if self.recorded == recorded:  # evaluated now (a factory, an op on no loop data): its result bakes it
                for v in floats:
                    v.source.note(f"an argument of `{func_name(func)}` evaluated when tracing")

    def _dispatch(self, func, args: tuple, kwargs: dict, flat: list):
        self.used.update(id(v) for v in flat if isinstance(v, torch.Tensor))
        tainted = any(self.node_of(v) is not None for v in flat)
        name = func_name(func)
        if name == "__set__" and getattr(getattr(func, "__self__", None), "__name__", None) == "data":
            return self._set_data(func, args)  # `x.data = y`
        if name in _RANDOM and self.step is not None:  # `randn_like(latents)` as much as `randn(shape)`
            if self.draws is None:
                self.problem(f"random op `{name}` inside the loop (its draws must be eager's; rng='counter' "
                             f"draws them inside the compiled loop instead)", ProblemKind.RANDOM_OP)
            elif name in COUNTER_OPS:
                try:
                    return self._counter_draw(name, args, kwargs)
                except ValueError as e:
                    self.problem(f"random op {e}: rng='counter' cannot draw it (eager's generator draws it)",
                                 ProblemKind.RANDOM_OP)
            else:
                self.problem(f"random op `{name}` inside the loop: rng='counter' draws randn, randn_like, rand "
                             f"and rand_like only (eager's generator draws it)", ProblemKind.RANDOM_OP)
        if tainted and name in ("__getitem__", "__setitem__") and len(args) > 1:
            index = self._bool_index(args[1])
            if index is not None:  # `x[mask]` as `x[mask.nonzero(as_tuple=True)]`: shapes a graph can have
                args = (args[0], index, *args[2:])
                return self._dispatch(func, args, kwargs, _leaves((args, kwargs), []))
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
        if isinstance(func, torch._ops.HigherOrderOperator) and self.step is not None:
            # flex_attention's operator with its score_mod and block mask as arguments: Dynamo compiles the public
            # function (torch.nn.attention.flex_attention), not the operator called on what it was given
            self.problem(f"higher-order op `torch.ops.higher_order.{name}` on loop data: the compiled loop cannot "
                         f"call it as recorded (its functions and block mask as arguments)")
            return func(*args, **kwargs)
        if name in _DATA_DEPENDENT:
            out = func(*args, **kwargs)
            if not self._hoist(func, name, args, kwargs, flat, out):
                self.problem(f"data-dependent Python: `{name}` on a value derived from loop state",
                             ProblemKind.DATA_DEPENDENT)
            return out
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
            self.problem(f"data-dependent Python: `{name}` returned {type(out).__name__} from loop data",
                         ProblemKind.DATA_DEPENDENT)
            return out
        self._record(func, name, args, kwargs, out)
        return out

    def _bool_index(self, index: Any) -> tuple | None:
        """An index holding boolean masks, with each mask's ``nonzero(as_tuple=True)`` in its place: a mask of
        BlockState inputs no step writes (or a constant) selects the same positions every step, so the selection
        has a static size (the mask's positions checked per call, trace/hoist.py). None: no mask, or one computed
        from loop state."""
        items = index if type(index) is tuple else (index,)
        masks = [m for m in items if isinstance(m, torch.Tensor) and m.dtype == torch.bool]
        if len(masks) != 1 or masks[0].dim() == 0 or not all(  # `x[mask]`, `x[:, mask]`, `x[..., mask]` only
                m is masks[0] or m is Ellipsis or m == slice(None) for m in items):
            return None
        converted = []
        for m in items:
            if not (isinstance(m, torch.Tensor) and m.dtype == torch.bool):
                converted.append(m)
                continue
            with torch._C.DisableTorchFunction():
                positions = m.nonzero(as_tuple=True)
            if self.node_of(m) is not None and not self._hoist(torch.Tensor.nonzero, "nonzero", (m,),
                                                                {"as_tuple": True}, [m], positions):
                return None
            converted.extend(positions)
        return tuple(converted)

    def _hoist(self, func, name: str, args: tuple, kwargs: dict, flat: list, out: Any) -> bool:
        """A data-dependent op whose tensors derive from BlockState inputs only: its outcome becomes a constant
        of the step, checked per call (trace/hoist.py). False when it cannot be (the caller records a problem)."""
        if name not in hoist.HOISTABLE or self.step is None or not self.in_step or self.step.index < 0 or any(
                type(v) is TracedFloat or (isinstance(v, torch.Tensor) and self.stale.get(id(v)) is v) for v in flat):
            return False
        nodes: list[fx.Node] = []
        template = hoist.template_of((args, kwargs), self.node_of, nodes)
        if len(nodes) != sum(self.node_of(v) is not None for v in flat):  # a tensor inside another container
            return False
        with torch._C.DisableTorchFunction():
            try:
                module, inputs = hoist.extract(self.step.graph, self.step.constants, nodes, self.slots)
            except hoist.NotHoistable:
                return False
            outcome = out.clone() if isinstance(out, torch.Tensor) else copy.deepcopy(out)  # the caller may change it
        self.hoisted.append(hoist.Hoisted(name, _user_location(), self.block, func, template, module, inputs,
                                          outcome))
        return True

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
        self.data_set[id(target)] = target  # when it is an input, eager changed the caller's tensor
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
        self.recorded += 1
        self.step.block_ops[self.block] = self.step.block_ops.get(self.block, 0) + 1
        inplace = _is_inplace(name, kwargs)
        target = kwargs.get("out", args[0] if args else None) if inplace else None
        if inplace and isinstance(target, torch.Tensor):
            self._detach_input(target)
            if self.node_of(target) is None:
                # Mutating a constant in place: work on a copy inside the graph (the constant stays as it is for
                # the next step); the tensor now maps to that copy.
                copy = graph.call_function(torch.clone, (self._constant(target),))
                copy.meta["constant_copy"] = True  # eager changed the constant itself
                self.taint[id(target)] = (target, copy)
        g_args, g_kwargs = _map(self._arg, args), _map(self._arg, kwargs)
        if getattr(func, "__name__", "") == "__get__":  # property read that returned a tensor (.T, .mT, ...)
            node = graph.call_function(getattr, (g_args[0], func_name(func)))
        else:
            node = graph.call_function(_GRAPH_EQUIVALENT.get(func, func), tuple(g_args), g_kwargs)
        if inplace:
            node.meta["mutates"] = True  # kept even when nothing uses its result (`out[..., 0::2] = x`)
        _link_floats(node, name, args, kwargs)
        if inplace and isinstance(target, torch.Tensor):
            self.taint[id(target)] = (target, node if out is target else self.node_of(target))
        if isinstance(out, torch.Tensor):
            self.taint[id(out)] = (out, node)
            node.meta["dtype"] = out.dtype
            node.meta["0-d"] = out.dim() == 0  # a Python number operand then sets no dtype a 0-d table row would
        elif isinstance(out, (tuple, list)):
            for k, item in enumerate(out):
                if isinstance(item, torch.Tensor):
                    self.taint[id(item)] = (item, graph.call_function(operator.getitem, (node, k)))


def _link_floats(node: fx.Node, name: str, args: tuple, kwargs: dict) -> None:
    """Note where the traced floats an op was given sit (trace/floats.py): a direct operand of arithmetic is a
    position the plan may lift (``node.meta["sources"]``); anywhere else its value is baked."""
    top = [*enumerate(args), *kwargs.items()]
    for pos, v in top:
        if type(v) is TracedFloat:
            if name in ARITHMETIC:
                node.meta.setdefault("sources", {})[pos] = v.source
                v.source.linked = True
            else:
                v.source.note(f"an argument of `{name}` (which takes a Python number)")
    direct = {id(v) for _, v in top}
    for v in _leaves((args, kwargs), []):
        if type(v) is TracedFloat and id(v) not in direct:
            v.source.note(f"inside an argument of `{name}`")


def _leaves(value: Any, into: list) -> list:
    """The leaves of an op's arguments: ``pytree.tree_leaves`` for the containers ops take (tuples, lists, dicts),
    without its generic dispatch (it ran for every op traced, most of the tracer's time)."""
    if type(value) in (tuple, list):
        for v in value:
            _leaves(v, into)
    elif type(value) is dict:
        for v in value.values():
            _leaves(v, into)
    elif isinstance(value, (tuple, list, dict)):  # a named tuple, a subclass: pytree knows how to open it
        into.extend(pytree.tree_leaves(value))
    else:
        into.append(value)
    return into


def _map(fn, value: Any) -> Any:
    """``pytree.tree_map(fn, value)`` for an op's arguments (see ``_leaves``)."""
    if type(value) in (tuple, list):
        return type(value)(_map(fn, v) for v in value)
    if type(value) is dict:
        return {k: _map(fn, v) for k, v in value.items()}
    if isinstance(value, (tuple, list, dict)):
        return pytree.tree_map(fn, value)
    return fn(value)


def _storage(t: torch.Tensor) -> tuple:
    return (t.device, t.untyped_storage().data_ptr()) if t.device.type != "meta" else (t.device, id(t))
