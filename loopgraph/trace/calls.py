"""Module calls while tracing: which calls of a model in a step can run as one batched call, traced batched.

Modular loops call the denoiser once per guidance batch (a guider's ``prepare_inputs``, the zoo's CFG, a block
that calls ``components.net(...)`` twice). Two calls of the same module, running the same code on inputs of the
same shapes (the batch dimension aside), neither reading the other's output, can run as one call on the inputs
concatenated along dimension 0, its outputs split again: one larger forward instead of two small ones.

While tracing, ``CallWatcher`` (a wrapper around ``nn.Module.__call__``, on the tracing thread) marks every
top-level call of a module with parameters inside a step: the graph nodes it recorded (its *region*), its
arguments and its outputs (``ModuleCall``). When a module is called again in the same step, the watcher checks
that the calls can share a batch and, if so, runs the module once more, for real, on the concatenated arguments,
recording that batched call into a scratch graph (``Recorder.scratch``): the batched region is traced at the
batched shape, so no size baked into the graph needs rewriting. Its outputs, split, must equal the separate
calls' (``verify``'s tolerance), or the calls stay apart. The step graphs are rewritten after the trace, by the
"batch calls" pass (passes/batching.py).

Batched matrix products are not bitwise equal to unbatched ones: results stay within ``matches_eager``.
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from ..modular_pipelines.state import values_equal
from ..pystate.snapshots import walk_tensors
from ..verify import matches_eager, max_error
from .ir import StepTrace, func_name

__all__ = ["ModuleCall", "BatchedCall", "CallWatcher"]


@dataclass(eq=False)
class ModuleCall:
    """One top-level call of a module with parameters in a traced step."""

    module: torch.nn.Module
    name: str                       # where the call found it ("components.denoiser"), for messages
    block: str | None
    nodes: list[fx.Node]            # the region: the step-graph nodes the call recorded, in order
    paths: list[str]                # each argument leaf's place: "['encoder_hidden_states']", "['added_cond'][0]"
    leaves: list[Any]               # the arguments, by forward's parameter names (defaults applied), flattened
    spec: Any                       # their tree structure
    inputs: list[fx.Node | None]    # per leaf: its node when it is loop data
    outputs: list[Any]              # the output's leaves (tensors copied when the call returned)
    out_spec: Any
    out_nodes: list[fx.Node | None]
    issue: str | None = None        # why the call cannot share a batch, whatever the other calls

    @property
    def size(self) -> int:
        """Its batch size: the first dimension of its first tensor argument with one."""
        return next((v.shape[0] for v in self.leaves if isinstance(v, torch.Tensor) and v.dim()), 0)


@dataclass(eq=False)
class BatchedCall:
    """Calls of one module that run as one: the batched call, traced into a scratch graph."""

    calls: list[ModuleCall]
    sizes: list[int]                 # each call's batch size (its rows of the batched call, in order)
    concat: set[int]                 # argument leaves concatenated along dim 0 (the others are passed once)
    graph: fx.Graph                  # the batched call's region; placeholder "arg{j}" for leaf j
    constants: dict[str, torch.Tensor]
    out_nodes: list[fx.Node]         # the batched output leaves' nodes in ``graph``


def _region_code(step: StepTrace, call: ModuleCall) -> list[tuple]:
    """The call's ops, comparable between calls: positions instead of nodes, the module's parameters and buffers
    by identity, other constants by shape and dtype (a timestep embedding made afresh per call)."""
    index = {n: k for k, n in enumerate(call.nodes)}
    leaf = {}
    for j, n in enumerate(call.inputs):
        if n is not None:
            leaf.setdefault(n, j)

    def enc(a: Any) -> Any:
        if isinstance(a, fx.Node):
            return ("op", index[a]) if a in index else ("arg", leaf.get(a, -1))
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(enc(x) for x in a))
        if isinstance(a, dict):
            return ("dict", tuple((k, enc(v)) for k, v in a.items()))
        return repr(a)

    code = []
    owned = {id(b) for b in call.module.buffers()}
    for n in call.nodes:
        if n.op == "get_attr":
            t = step.constants[n.target]
            by_identity = isinstance(t, torch.nn.Parameter) or id(t) in owned  # weights, buffers: which tensor
            code.append(("tensor", id(t)) if by_identity else ("const", tuple(t.shape), t.dtype))
        else:
            code.append((n.op, func_name(n.target) if callable(n.target) else str(n.target),
                         enc(n.args), enc(n.kwargs)))
    return code


def _issue(call: ModuleCall, wrote: list[str], problems: list) -> str | None:
    """Why this call cannot share a batch with another, whatever it is (None: it may)."""
    if problems:
        return f"the call has a problem of its own ({problems[0].reason})"
    if wrote:
        return f"the call writes Python state ({wrote[0]}): a batched call would write it differently"
    members = set(call.nodes)
    known = {n for n in call.inputs if n is not None}
    for n in call.nodes:
        if n.meta.get("constant_copy"):
            return "the call updates a tensor it does not own in place (a buffer)"
        if n.op == "call_function" and func_name(n.target) == "counter_draw":
            return "the call draws random numbers"
        if n.meta.get("mutates") and n.args and isinstance(n.args[0], fx.Node) and n.args[0] not in members:
            return "the call updates one of its arguments in place"
        if any(a not in members and a not in known for a in n.all_input_nodes):
            return "the call reads loop data that is not one of its arguments"
    for k, n in enumerate(call.out_nodes):
        if isinstance(call.outputs[k], torch.Tensor) and n not in members:
            return f"output {k} of the call is not computed by it from loop data"
    return None


def _hooks(module: torch.nn.Module) -> str | None:
    """The hooks ``module`` or a module inside it runs, in words (None: none)."""
    for name, m in module.named_modules():
        attrs = vars(m)
        registry = attrs.get("_diffusers_hook")
        kinds = [kind for kind in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks") if attrs.get(kind)]
        hooks = list(getattr(registry, "hooks", None) or ())
        if hooks or kinds:
            what = f"diffusers hooks {hooks}" if hooks else f"torch {', '.join(k.strip('_') for k in kinds)}"
            return (f"the model runs hooks ({what} on {name or 'the model itself'}): a batched call would run them "
                    f"once more")
    return None


def _leaf_rules(group: list[ModuleCall]) -> set[int] | str:
    """Which argument leaves are concatenated along dim 0 (the others are the same in every call), or why the
    calls' arguments cannot be batched."""
    first, sizes = group[0], [c.size for c in group]
    if any(c.spec != first.spec for c in group):
        return "the calls' arguments differ in structure"
    if not all(sizes):
        return "the calls have no batched tensor argument"
    concat = set()
    for j, value in enumerate(first.leaves):
        values = [c.leaves[j] for c in group]
        where = f"argument {first.paths[j]}"
        if not isinstance(value, torch.Tensor):
            try:
                same = all(v is value or type(v) is type(value) and bool(v == value) for v in values)
            except Exception:
                same = False
            if not same:
                return f"{where} differs between the calls (not a tensor)"
            continue
        if any(not isinstance(v, torch.Tensor) for v in values):
            return f"{where} is a tensor in one call only"
        shared = all(v is value for v in values)
        if shared and (value.dim() == 0 or value.shape[0] != sizes[0]):
            continue  # the same tensor, not per batch row (a timestep, a table): passed once
        if any(v.dim() == 0 or v.shape[0] != b or v.shape[1:] != value.shape[1:] or v.dtype != value.dtype
               or v.device != value.device for v, b in zip(values, sizes)):
            shapes = ", ".join(str(tuple(v.shape)) for v in values)
            return f"{where} has shapes {shapes}: not the same apart from the batch dimension"
        concat.add(j)
    return concat


def _code_differs(step: StepTrace, first: ModuleCall, call: ModuleCall) -> str | None:
    code, other = _region_code(step, first), _region_code(step, call)
    if code == other:
        return None
    k = next((k for k, (a, b) in enumerate(zip(code, other)) if a != b), min(len(code), len(other)))
    return (f"the calls ran different code (from op {k} of {len(code)}/{len(other)}: the model or how it was "
            f"called changed between them)")


def _depends(call: ModuleCall, group: list[ModuleCall]) -> bool:
    """Whether any of the call's inputs is computed from an output (or any node) of the earlier calls."""
    earlier = {n for c in group for n in c.nodes}
    stack, seen = [n for n in call.inputs if n is not None], set()
    while stack:
        n = stack.pop()
        if n in earlier:
            return True
        if n not in seen:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return False


class CallWatcher:
    """While tracing: each step's top-level module calls (``StepTrace.calls``) and the batched retraces of the
    repeated ones (``StepTrace.batched`` / ``unbatched``).

    It wraps ``torch.nn.Module.__call__`` for the duration (under the trace lock; other threads call through).
    Not torch's global module hooks: with one registered, every module call takes torch's slow path, reading
    hook dicts a plan's guard would then check, and calling a ``torch.compile``'d module warns."""

    def __init__(self, recorder, python) -> None:
        self.recorder, self.python = recorder, python
        self.thread = threading.get_ident()
        self.depth = 0
        self.start: tuple | None = None
        self.busy = False  # running a batched call: its module calls are not the loop's
        self.hooked: dict[int, tuple[str]] = {}  # per module: why its hooks keep it apart ("" when none)
        self.original: Any = None

    def __enter__(self) -> CallWatcher:
        original = self.original = torch.nn.Module.__call__
        watcher = self

        def __call__(module, *args, **kwargs):
            if watcher.busy or threading.get_ident() != watcher.thread or not watcher._pre():
                return original(module, *args, **kwargs)
            try:
                out = original(module, *args, **kwargs)
            except BaseException:
                watcher.depth -= 1
                if not watcher.depth:
                    watcher.start = None
                raise
            watcher._post(module, args, kwargs, out)
            return out

        torch.nn.Module.__call__ = __call__
        return self

    def __exit__(self, *exc) -> None:
        torch.nn.Module.__call__ = self.original

    def _writes(self) -> dict[tuple, int]:
        return {key: len(w.events) for key, w in self.python.writes.items()}

    def _pre(self) -> bool:
        """A module call starts; False when it is not watched (outside a step)."""
        rec = self.recorder
        if not rec.in_step or rec.step is None:
            return False
        self.depth += 1
        if self.depth == 1:
            graph = rec.step.graph
            last = next(iter(reversed(graph.nodes)), None)
            self.start = (rec.step, last, len(rec.problems), self._writes())
        return True

    def _post(self, module, args, kwargs, output) -> None:
        self.depth -= 1
        if self.depth or self.start is None:
            return
        (step, last, problems, writes), self.start = self.start, None
        if step is not self.recorder.step:  # a step ended inside the call
            return
        with self.python.paused():
            with torch._C.DisableTorchFunction():
                if next(iter(module.parameters()), None) is None:
                    return
                nodes = _nodes_after(step.graph, last)
                if not nodes:
                    return  # not on loop data: evaluated eagerly, nothing to batch
                call = self._call(module, nodes, args, kwargs, output)
                wrote = [w.path for key, w in self.python.writes.items() if len(w.events) > writes.get(key, 0)]
                call.issue = _issue(call, wrote, self.recorder.problems[problems:]) or self._hooks(module)
                step.calls.append(call)
            if any(c.module is module for c in step.calls[:-1]):
                self._join(step, call)

    def _hooks(self, module: torch.nn.Module) -> str | None:
        """Why a batched call of ``module`` would change what its hooks keep (None: it runs none). A batched call
        runs the module once more, for real: hooks run again, and diffusers' cache hooks (MagCache, First-Block
        Cache) keep state per cache context in objects they make on first use, out of the attribute log's sight."""
        known = self.hooked.get(id(module))
        if known is None:
            known = self.hooked[id(module)] = (_hooks(module) or "",)
        return known[0] or None

    def _call(self, module, nodes, args, kwargs, output) -> ModuleCall:
        rec = self.recorder
        arguments = _arguments(module, args, kwargs)
        flat, spec = pytree.tree_flatten_with_path(arguments)
        paths = [pytree.keystr(path) for path, _ in flat]
        leaves = [v for _, v in flat]
        outputs, out_spec = pytree.tree_flatten(output)
        return ModuleCall(
            module=module, name=self.python.paths.get(id(module), type(module).__name__), block=rec.block,
            nodes=nodes, paths=paths, leaves=leaves, spec=spec,
            inputs=[rec.node_of(v) for v in leaves],
            outputs=[v.detach().clone() if isinstance(v, torch.Tensor) else v for v in outputs], out_spec=out_spec,
            out_nodes=[rec.node_of(v) for v in outputs])

    def _join(self, step: StepTrace, call: ModuleCall) -> None:
        """Batch ``call`` with the earlier calls of its module in this step, if it can be."""
        batch = step.batched.get(id(call.module))
        group = batch.calls if batch is not None else [next(c for c in step.calls if c.module is call.module)]
        rules = _leaf_rules([*group, call])
        reason = (group[0].issue or call.issue
                  or (f"the calls are in different blocks ({group[0].block!r}, {call.block!r})"
                      if call.block != group[0].block else None)
                  or (rules if isinstance(rules, str) else None)
                  or ("the call's input is computed from an earlier call's result" if _depends(call, group) else None)
                  or _code_differs(step, group[0], call))
        if reason is not None:
            step.unbatched.append((call, reason))
            return
        done = self._retrace([*group, call], rules)
        if isinstance(done, str):
            step.unbatched.append((call, done))
        else:
            step.batched[id(call.module)] = done

    def _retrace(self, group: list[ModuleCall], concat: set[int]) -> BatchedCall | str:
        """Run the module on the concatenated arguments, recorded into a scratch graph, and compare."""
        rec, first = self.recorder, group[0]
        sizes = [c.size for c in group]
        leaves = list(first.leaves)
        with torch._C.DisableTorchFunction():  # not the loop's ops
            for j in concat:
                leaves[j] = torch.cat([c.leaves[j] for c in group])
        devices = range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []
        self.busy = True
        try:  # the extra call draws nothing from eager's generators: fork_rng puts their states back
            with torch.random.fork_rng(devices=devices), rec.scratch() as scratch:
                for j, value in enumerate(leaves):
                    if j in concat or (isinstance(value, torch.Tensor) and first.inputs[j] is not None):
                        node = scratch.graph.placeholder(f"arg{j}")
                        rec.taint[id(value)] = (value, node)
                out = _call_with(first.module, pytree.tree_unflatten(leaves, first.spec))
                problems = list(rec.problems)
                outputs, out_spec = pytree.tree_flatten(out)
                out_nodes = [rec.node_of(v) for v in outputs]
        except Exception as e:  # the module does not take the batched arguments
            return f"the batched call raised {type(e).__name__}: {e}"
        finally:
            self.busy = False
        if problems:
            return f"the batched call has a problem ({problems[0].reason})"
        if out_spec != first.out_spec:
            return "the batched call's output has another structure"
        total = sum(sizes)
        for k, value in enumerate(outputs):
            expected = [c.outputs[k] for c in group]
            if not isinstance(value, torch.Tensor):
                if any(True for _ in walk_tensors(value)) or hasattr(value, "__dict__"):
                    return (f"output {k} is a {type(value).__name__}, which torch's pytree does not open (register "
                            f"it with torch.utils._pytree to batch it): its rows cannot be split")
                if not all(values_equal(value, e) for e in expected):
                    return f"output {k} of the batched call differs (not a tensor)"
                continue
            if out_nodes[k] is None or value.dim() == 0 or value.shape[0] != total:
                return f"output {k} is not batch-separable (shape {tuple(value.shape)} for {total} rows)"
            for part, want in zip(torch.split(value, sizes), expected):
                if not matches_eager(part, want):
                    return (f"the batched call's output {k} differs from the separate calls' (max abs error "
                            f"{max_error(part, want):.3g})")
        with torch._C.DisableTorchFunction():
            identical = all(torch.equal(c.leaves[j], first.leaves[j]) for c in group[1:] for j in concat)
        if identical:  # identical rows hide a model that mixes them
            reason = self._separable(group, concat)
            if reason is not None:
                return reason
        return BatchedCall(calls=list(group), sizes=sizes, concat=concat, graph=scratch.graph,
                           constants=scratch.constants, out_nodes=out_nodes)

    def _separable(self, group: list[ModuleCall], concat: set[int]) -> str | None:
        """When the calls' batched inputs are identical (a warm-up on empty prompts), the batched call's rows equal
        the separate calls' even for a model that mixes the rows of its batch (batch statistics). Run the calls
        once more, untraced, on inputs made to differ (seeded noise added to each later call's floating inputs),
        separately and batched: None if the batched call's rows are still the separate calls', else why not."""
        first = group[0]
        noise = torch.Generator().manual_seed(0)
        parts = []
        devices = range(torch.cuda.device_count()) if torch.cuda.is_initialized() else []
        with torch._C.DisableTorchFunction(), self.python.paused(), torch.random.fork_rng(devices=devices):
            for n, call in enumerate(group):
                leaves = list(call.leaves)
                for j in concat:
                    v = leaves[j]
                    if n and v.is_floating_point():
                        leaves[j] = v + n * torch.randn(v.shape, generator=noise).to(v.device, v.dtype)
                parts.append(leaves)
            if all(torch.equal(part[j], parts[0][j]) for part in parts[1:] for j in concat):
                return "the calls' inputs are identical and not floating point: batching cannot be shown separable"
            self.busy = True
            try:
                separate = [pytree.tree_flatten(_call_with(first.module, pytree.tree_unflatten(p, first.spec)))[0]
                            for p in parts]
                leaves = [torch.cat([p[j] for p in parts]) if j in concat else v for j, v in enumerate(parts[0])]
                batched = pytree.tree_flatten(_call_with(first.module, pytree.tree_unflatten(leaves, first.spec)))[0]
            except Exception as e:
                return f"the separability check (inputs made to differ) raised {type(e).__name__}: {e}"
            finally:
                self.busy = False
        sizes = [call.size for call in group]
        for k, value in enumerate(batched):
            if isinstance(value, torch.Tensor):
                for part, want in zip(torch.split(value, sizes), (s[k] for s in separate)):
                    if not matches_eager(part, want):
                        return (f"not batch-separable: with inputs that differ, the batched call's output {k} is not "
                                f"the separate calls' (max abs error {max_error(part, want):.3g}): the model mixes "
                                f"the rows of its batch")
        return None


def _arguments(module: torch.nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by ``forward``'s parameter names, defaults applied (``net(x, c)`` and
    ``net(x, c, scale=1.0)`` are the same call when 1.0 is the default); ``{"*": args, "**": kwargs}`` when
    ``forward`` has no signature to bind to."""
    try:
        bound = inspect.signature(module.forward).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return {"*": tuple(args), "**": dict(kwargs)}
    bound.apply_defaults()
    return dict(bound.arguments)


def _call_with(module: torch.nn.Module, arguments: dict[str, Any]) -> Any:
    if set(arguments) == {"*", "**"}:
        return module(*arguments["*"], **arguments["**"])
    bound = inspect.BoundArguments(inspect.signature(module.forward), arguments)
    return module(*bound.args, **bound.kwargs)


def _nodes_after(graph: fx.Graph, last: fx.Node | None) -> list[fx.Node]:
    """The nodes appended to ``graph`` after ``last`` (None: all of them)."""
    nodes, node = [], (last.next if last is not None else next(iter(graph.nodes), None))
    while node is not None and node.op != "root":
        nodes.append(node)
        node = node.next
    return nodes
