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

import contextlib
import threading
from typing import Any, Callable

import torch
import torch.fx as fx

from ..modular_pipelines.blocks import run_block
from ..passes.batching import CallWatcher
from ..pystate.attribute_log import TRACE_LOCK, Recording, record
from ..pystate.components import component_objects, component_tensors, set_attribute, value_of
from ..pystate.snapshots import walk_tensors
from ..rng import CounterDraws
from .floats import Lifts, TracedFloat, floats_in, plain
from .ir import (
    ComponentSlot,
    LoopTrace,
    SeedDraw,
    StepTrace,
    TensorUse,
    Unsupported,
    func_name,
)
from .taint import Recorder

__all__ = ["StepTrace", "LoopTrace", "ComponentSlot", "SeedDraw", "TensorUse", "Unsupported", "func_name",
           "trace_loop"]


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


def _loop_tensors_in_containers(block_state, recorder: Recorder) -> list[str]:
    """BlockState slots whose list, tuple or dict holds tensors computed by the loop (a list of previews)."""
    def computed(t: torch.Tensor) -> bool:  # a step's input (a tensor the caller passed in a dict) is not
        node = recorder.node_of(t)
        return (node is not None and node.op != "placeholder") or recorder.stale.get(id(t)) is t

    return [name for name, value in vars(block_state).items()
            if isinstance(value, (list, tuple, dict)) and any(computed(t) for t in walk_tensors(value))]


def trace_loop(wrapper, components, state, *, strict: bool = False, rng: str = "eager",
               batch: bool = False, after_step: Callable[[int, Any, dict], None] | None = None,
               lift_floats: bool = True) -> tuple[LoopTrace, Any]:
    """Run ``wrapper(components, state)`` for real while recording each ``loop_step`` as an FX graph.

    The Python state the call reads and writes is recorded too (``recording.record``: the plan's guards and
    what a compiled call replays), and before each block the components' Python state and, where eager segments
    may need them, copies of the loop tensors. ``rng="counter"`` draws the steps' random numbers by the seed
    policy of rng.py (recorded as graph ops) instead of from torch's generators. Returns the trace and the
    wrapper's own return value ``(components, state)``. ``batch=True`` also records the steps' module calls and
    traces repeated ones batched (passes/batching.py). ``after_step(i, block_state, kwargs)`` runs after each step,
    outside the recording (step callbacks: runtime/watch.py). ``lift_floats``: the floats the call reads from its inputs
    and the objects it reaches are traced floats (trace/floats.py), so the plan may lift those only arithmetic uses.

    Holds ``recording.TRACE_LOCK``: one trace at a time per process.
    """
    recorder = Recorder()
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
        for k, v in list(vars(bs).items()):
            if type(v) is float:
                setattr(bs, k, lifts.input(k, v))
        return bs

    def set_block_state(st, bs):
        with python.paused():
            check_after(bs)
            for k, v in list(vars(bs).items()):  # the caller gets the floats it gave, not traced ones
                if type(v) is TracedFloat:
                    setattr(bs, k, v.source.original)
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
        step.slots_before[key] = {k: plain(v) for k, v in vars(block_state).items()}
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

    def side_effects(step: int | None, block: str | None) -> None:
        """The module globals ``block`` (None: the wrapper's own code) changed: a compiled step makes no Python
        side effects, so that block runs eagerly each step (the wrapper's: the whole loop), or strict raises."""
        with python.paused(), torch._C.DisableTorchFunction():
            changed = python.note_globals(step, block)
        for path in changed:
            reason = (f"side effect: changes the module global {path} (a compiled step makes no Python side "
                      f"effects)")
            if block is None:
                wrapper_problem(reason)
            elif all(p.reason != reason or p.block != block for p in recorder.problems):
                problem = Unsupported(reason, block, path)
                if strict:
                    raise problem
                recorder.problems.append(problem)

    def loop_step(comps, block_state, **kwargs):
        side_effects(len(steps), None)
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
                side_effects(step.index, name)
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
            comps, block_state = finish_step(step, comps, block_state, objects)
        if after_step is not None:
            with python.paused(), torch._C.DisableTorchFunction():
                after_step(step.index, block_state, kwargs)
        return comps, block_state

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
                lifts = python.lifts = Lifts(lift_floats, lambda: python.busy)
                python.hide(wrapper, *methods)
                with CallWatcher(recorder, python) if batch else contextlib.nullcontext(), lifts.active():
                    result = wrapper(components, state)
                side_effects(None, None)
                with torch._C.DisableTorchFunction(), python.paused():
                    python.finish(dict(wrapper.sub_blocks))
        finally:
            intercept.remove()
    initial = seen.get("initial", {})
    final = _settle_floats(python, seen.get("final", {}))
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
    for name, value in initial.items():
        if (isinstance(value, torch.Tensor) and recorder.data_set.get(id(value)) is value and name not in inplace
                and name not in exclude):
            recorder.problems.append(Unsupported(
                f"input {name!r} is given a new value by `.data =` and then replaced by a new tensor: the caller's "
                f"tensor keeps that value (not compiled yet)", None, None))
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
                      usage=TensorUse(recorder.used, recorder.eager_used, recorder.const_ids), components=components,
                      floats=lifts.sources)
    return trace, result


def _settle_floats(python: Recording, final: dict[str, Any]) -> dict[str, Any]:
    """After the traced call: a traced float it left somewhere (an attribute, another BlockState slot) would be
    replayed by compiled calls as this call's value, so its value stays guarded; the floats the call read take
    the traced ones' places. Returns the final BlockState with them."""
    for k, v in final.items():
        for f in floats_in(v):
            if not (v is f and f.source.kind == "input" and f.source.name == k):
                f.source.note(f"kept in the BlockState slot {k!r}")
    for value in python.kept:
        for f in floats_in(value):
            f.source.note("kept in an attribute the call wrote")
    for write in python.writes.values():
        if type(value_of(write.obj, write.name)) is TracedFloat:
            set_attribute(write.obj, write.name, value_of(write.obj, write.name).source.original)
    python.end = [(obj, name, plain(value)) for obj, name, value in python.end]
    return {k: plain(v) for k, v in final.items()}
