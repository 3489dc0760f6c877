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
from .calls import CallWatcher
from ..pystate.attribute_log import INPUT_ROOT, TRACE_LOCK, Recording, record
from ..pystate.components import component_objects, component_tensors, set_attribute, slot_aliases, value_of
from ..pystate.snapshots import is_plain_object, value_state, walk_tensors
from ..rng import CounterDraws
from .floats import Lifts, SourceKind, TracedFloat, floats_in, plain
from .ir import (
    ComponentSlot,
    Container,
    Cut,
    LoopTrace,
    ProblemKind,
    SeedDraw,
    StepTrace,
    TensorUse,
    Unsupported,
)
from .taint import Recorder

__all__ = ["Tracer", "trace_loop"]


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

    The Python state the call reads and writes is recorded too (``attribute_log.record``: the plan's guards and
    what a compiled call replays), and before each block the components' Python state and, where eager segments
    may need them, copies of the loop tensors. ``rng="counter"`` draws the steps' random numbers by the seed
    policy of rng.py (recorded as graph ops) instead of from torch's generators. Returns the trace and the
    wrapper's own return value ``(components, state)``. ``batch=True`` also records the steps' module calls and
    traces repeated ones batched (passes/batching.py). ``after_step(i, block_state, kwargs)`` runs after each
    step, outside the recording (step callbacks: runtime/watch.py). ``lift_floats``: the floats the call reads
    from its inputs and the objects it reaches are traced floats (trace/floats.py), so the plan may lift those
    only arithmetic uses.

    Holds ``attribute_log.TRACE_LOCK``: one trace at a time per process.
    """
    tracer = Tracer(wrapper, strict=strict, rng=rng, batch=batch, after_step=after_step, lift_floats=lift_floats)
    return tracer.trace(components, state)


class Tracer:
    """Records one real call of a loop wrapper. Its methods stand in for the wrapper's ``get_block_state``,
    ``set_block_state``, ``loop_step`` and ``progress_bar`` during the call (fx's ``Tracer`` is the model: one
    object whose methods are the hooks); ``trace`` makes the call and returns the ``LoopTrace``."""

    def __init__(self, wrapper, *, strict: bool = False, rng: str = "eager", batch: bool = False,
                 after_step: Callable[[int, Any, dict], None] | None = None, lift_floats: bool = True) -> None:
        self.wrapper, self.strict, self.batch = wrapper, strict, batch
        self.after_step, self.lift_floats = after_step, lift_floats
        self.recorder = Recorder()
        self.recorder.strict = strict
        self.recorder.draws = CounterDraws() if rng == "counter" else None
        self.schedule_inputs = [p.name for p in getattr(wrapper, "loop_inputs", []) if p.name]
        self.exclude = set(self.schedule_inputs)
        self.steps: list[StepTrace] = []
        self.component_slots: dict[str, ComponentSlot] = {}
        self.python: Recording | None = None
        self.lifts: Lifts | None = None
        # what the call showed on the way
        self.initial: dict[str, Any] | None = None      # the BlockState right after get_block_state
        self.inputs_copy: dict[str, Any] | None = None  # the same, data tensors cloned before the loop ran
        self.versions: dict[str, int] = {}              # the data tensors' version counters then
        self.rng_states: dict[str, torch.Tensor] = {}   # the RNG states when the loop started
        self.final: dict[str, Any] | None = None        # the BlockState after the last step (or set after the loop)
        self.final_components: dict[str, torch.Tensor] = {}  # loop tensors the components hold after a step
        self.progress = False                           # the wrapper opened its progress bar
        self.containers: dict[str, Container] = {}      # slots holding a list (tuple, dict) of loop tensors
        self.input_objects: dict[str, tuple[Any, Any]] = {}  # slot -> (plain object, its value_state then)
        self.aliases: tuple = ((), frozenset())         # (components looked at, {(tensor's path, slot)}): one
                                                        # tensor in both places
        self._components: Any = None
        self._intercept: _Intercept | None = None

    def trace(self, components, state) -> tuple[LoopTrace, Any]:
        wrapper = self.wrapper
        self._components = components
        methods = {"get_block_state": self.get_block_state, "set_block_state": self.set_block_state,
                   "loop_step": self.loop_step, "progress_bar": self.progress_bar}
        with TRACE_LOCK:
            self._intercept = _Intercept(wrapper, methods)
            try:
                with record(_roots(wrapper, components)) as python, self.recorder:
                    self.python = python
                    self.lifts = python.lifts = Lifts(self.lift_floats, lambda: python.busy)
                    python.hide(wrapper, *methods)
                    watcher = CallWatcher(self.recorder, python) if self.batch else contextlib.nullcontext()
                    # torch.compile'd code the loop calls (flex_attention compiles itself) runs eagerly while it is
                    # traced: its ops are recorded like any others (Dynamo cannot trace the recorder's mode)
                    with watcher, self.lifts.active(), torch.compiler.set_stance("force_eager"):
                        result = wrapper(components, state)
                    self._side_effects(None, None)
                    with torch._C.DisableTorchFunction(), python.paused():
                        python.finish(dict(wrapper.sub_blocks))
            finally:
                self._intercept.remove()
        return self._loop_trace(components), result

    # -- the wrapper's methods, while it runs ------------------------------------------------------------------------
    def get_block_state(self, st):
        bs = self._intercept.originals["get_block_state"](st)
        exclude = self.exclude
        self.initial = dict(vars(bs))
        self.inputs_copy = {k: v.clone() if isinstance(v, torch.Tensor) and k not in exclude else v
                            for k, v in vars(bs).items()}
        self.versions = {k: v._version for k, v in vars(bs).items()
                         if isinstance(v, torch.Tensor) and k not in exclude and not v.is_inference()}
        self.recorder.pre_loop = {id(v): v for k, v in vars(bs).items()
                                  if isinstance(v, torch.Tensor) and k not in exclude}
        with torch._C.DisableTorchFunction():
            self.rng_states = _rng_states(vars(bs))
        for k, v in list(vars(bs).items()):
            if type(v) is float:
                setattr(bs, k, self.lifts.input(k, v))
            elif is_plain_object(v) and k not in exclude:  # a scheduler in the BlockState: watched, and pictured
                with self.python.paused(), torch._C.DisableTorchFunction():
                    self.input_objects[k] = (v, value_state(v, keep=True))
                    self.python.watch(v, f"{INPUT_ROOT}{k!r}]")
        with self.python.paused():
            objects = component_objects(self.wrapper, self._components)
            self.aliases = (tuple(objects), slot_aliases(objects, self.initial))
        return bs

    def set_block_state(self, st, bs):
        with self.python.paused():
            self._check_after(bs)
            for k, v in list(vars(bs).items()):  # the caller gets the floats it gave, not traced ones
                if type(v) is TracedFloat:
                    setattr(bs, k, v.source.original)
        return self._intercept.originals["set_block_state"](st, bs)

    def progress_bar(self, *args, **kwargs):
        self.progress = True
        return self._intercept.originals["progress_bar"](*args, **kwargs)

    def loop_step(self, comps, block_state, **kwargs):
        recorder, python, steps = self.recorder, self.python, self.steps
        self._side_effects(len(steps), None)
        with python.paused():
            self._check_between(block_state)
            step = StepTrace(index=len(steps), graph=fx.Graph(), inputs=[], outputs={}, constants={}, stable={},
                             kwargs=dict(kwargs))
            if self.initial is None:
                self.initial = dict(vars(block_state))
            objects = component_objects(self.wrapper, comps)
            held = component_tensors(objects)
            recorder.start_step(step, _tensor_slots(block_state, self.exclude), {k: t for k, (_, t) in held.items()})
        recorder.in_step, python.step = True, step.index
        try:
            for name, block in self.wrapper.sub_blocks.items():
                self._cut(step, name, comps, block_state)
                before = step.cuts[name].slots
                recorder.block = python.block = name
                nodes_before = set(step.graph.nodes)
                comps, block_state = run_block(name, block, comps, block_state, **kwargs)
                self._side_effects(step.index, name)
                after = vars(block_state)
                step.writes[name] = {k for k, v in after.items() if k not in before or before[k] is not v}
                # this block's ops (a seed's placeholder, drawn here, joins the step's inputs instead)
                new_nodes = [n for n in step.graph.nodes if n not in nodes_before and n.op != "placeholder"]
                for n in new_nodes:
                    n.meta["block"] = name
                step.reads[name] = {a.target for n in new_nodes for a in n.all_input_nodes if a.op == "placeholder"}
            recorder.block = python.block = None
            self._cut(step, "__end__", comps, block_state)
        finally:
            recorder.in_step, python.step = False, None
        with python.paused():
            self._finish_step(step, block_state, objects)
        if self.after_step is not None:
            with python.paused(), torch._C.DisableTorchFunction():
                self.after_step(step.index, block_state, kwargs)
        return comps, block_state

    # -- checks and records on the way ---------------------------------------------------------------------------
    def _wrapper_problem(self, reason: str, kind: ProblemKind = ProblemKind.OTHER) -> None:
        recorder = self.recorder
        recorder.block = None
        if all(p.reason != reason for p in recorder.problems):
            recorder.problems.append(Unsupported(reason, None, None, kind))
        if self.strict:
            raise Unsupported(reason, kind=kind)

    def _check_after(self, bs) -> None:
        final = self.final if self.final is not None else (self.initial or {})
        changed = [k for k, v in vars(bs).items()
                   if (isinstance(v, torch.Tensor) or isinstance(final.get(k), torch.Tensor)) and final.get(k) is not v]
        if changed:
            self._wrapper_problem(f"the wrapper's own __call__ changes the BlockState's tensors after its loop "
                                  f"(slots {changed})")
        elif self.steps:
            self.final = dict(vars(bs))  # Python values it set after the loop are part of the result

    def _check_between(self, block_state) -> None:
        """The BlockState a step starts from is the one the previous step (or get_block_state) left."""
        before = self.final if self.steps else self.initial
        if before is None:
            return
        now = vars(block_state)
        changed = [k for k in set(now) | set(before) if (isinstance(now.get(k), torch.Tensor) or isinstance(
            before.get(k), torch.Tensor)) and now.get(k) is not before.get(k)]
        if not self.steps:
            changed += [k for k, v in self.versions.items() if self.initial[k]._version != v]
        if changed:
            where = "between its steps" if self.steps else "before its loop"
            self._wrapper_problem(f"the wrapper's own __call__ changes the BlockState's tensors {where} "
                                  f"(slots {sorted(set(changed))})")

    def _cut(self, step: StepTrace, key: str, comps, block_state) -> None:
        """The loop's state before block ``key`` (or at "__end__"): a ``Cut`` of the step."""
        recorder, python = self.recorder, self.python
        with python.paused():
            nodes = {k: n for k, v in vars(block_state).items() if (n := recorder.node_of(v)) is not None}
            components = component_tensors(component_objects(self.wrapper, comps))
            held = {k: (path, v, n) for k, (path, v) in components.items() if (n := recorder.node_of(v)) is not None}
            with torch._C.DisableTorchFunction():  # copying is not part of the step
                values = None
                if step.index == 0 or recorder.problems:  # eager segments check their compiled parts against these
                    values = {**{k: block_state[k].clone() for k in nodes},
                              **{k: v.clone() for k, (_, v, _) in held.items()}}
                step.cuts[key] = Cut(slots={k: plain(v) for k, v in vars(block_state).items()}, nodes=nodes,
                                     held=held, python=python.state_now(), values=values,
                                     draws=dict(recorder.draws.counts) if recorder.draws is not None else {})

    def _side_effects(self, step: int | None, block: str | None) -> None:
        """The module globals ``block`` (None: the wrapper's own code) changed: a compiled step makes no Python
        side effects, so that block runs eagerly each step (the wrapper's: the whole loop), or strict raises."""
        with self.python.paused(), torch._C.DisableTorchFunction():
            changed = self.python.note_globals(step, block)
        for path in changed:
            reason = (f"side effect: changes the module global {path} (a compiled step makes no Python side "
                      f"effects)")
            if block is None:
                self._wrapper_problem(reason, ProblemKind.SIDE_EFFECT)
            elif all(p.reason != reason or p.block != block for p in self.recorder.problems):
                problem = Unsupported(reason, block, path, ProblemKind.SIDE_EFFECT)
                if self.strict:
                    raise problem
                self.recorder.problems.append(problem)

    def _finish_step(self, step: StepTrace, block_state, objects) -> None:
        recorder = self.recorder
        for name, value in vars(block_state).items():
            node = recorder.node_of(value)
            if node is not None:
                step.outputs[name] = node
        for name in _loop_tensors_in_containers(block_state, recorder):
            self._flatten(step, name, block_state[name])
        self.final_components = {}
        for name, (path, value) in component_tensors(objects).items():
            node = recorder.node_of(value)
            if node is not None:
                step.outputs[name] = node
                self.component_slots[name] = ComponentSlot(path, value)
                self.final_components[name] = value
        self.steps.append(step)
        self.final = dict(vars(block_state))

    # -- after the call --------------------------------------------------------------------------------------------
    def _settle_hoisted(self) -> tuple:
        """The data-dependent ops evaluated on BlockState inputs (trace/hoist.py): a check each, kept when no step
        writes those inputs; otherwise the op is a problem as any data-dependent Python is (its block runs
        eagerly)."""
        written = {slot for step in self.steps for slot, node in step.outputs.items() if node.op != "placeholder"}
        passed = [(slot, node.target) for step in self.steps for slot, node in step.outputs.items()
                  if node.op == "placeholder" and node.target != slot]  # `bs.a = bs.b`, or one tensor in two places
        while any(source in written and slot not in written for slot, source in passed):
            written |= {slot for slot, source in passed if source in written}
        checks: dict[tuple, Any] = {}
        for h in self.recorder.hoisted:
            if written.isdisjoint(h.inputs):
                checks.setdefault(h.key(), h)
                continue
            self.recorder.add_problem(Unsupported(f"data-dependent Python: `{h.name}` on a value derived from loop "
                                                  f"state", h.block, h.where, ProblemKind.DATA_DEPENDENT))
        return tuple(checks.values())

    def _flatten(self, step: StepTrace, name: str, value: Any) -> None:
        """A slot holding a list, tuple or dict of loop tensors: each tensor is a step output of its own (slot
        ``name[k]``); the same structure every step, tensors only, or the loop falls back."""
        if type(value) not in (list, tuple, dict):  # a named tuple, a model output: rebuilt how? not carried
            self._wrapper_problem(f"slot {name!r} holds loop tensors inside a {type(value).__name__} (the compiled "
                                  f"loop carries tensors, and plain lists, tuples and dicts of tensors)")
            return
        container = Container.of(value)
        items = [value[k] for k in container.keys]
        nodes = [self.recorder.node_of(t) if isinstance(t, torch.Tensor) else None for t in items]
        known = self.containers.setdefault(name, container)
        if known != container or any(n is None for n in nodes):
            why = "whose structure changes between steps" if known != container else "beside other values"
            self._wrapper_problem(f"slot {name!r} holds loop tensors inside a {type(value).__name__} {why} (the "
                                  f"compiled loop carries tensors, and flat containers of tensors)")
            return
        for (_, slot), node in zip(container.items(name), nodes):
            step.outputs[slot] = node

    def _loop_trace(self, components) -> LoopTrace:
        recorder, python = self.recorder, self.python
        initial = self.initial or {}
        final = _settle_floats(python, self.final or {})
        for name, container in self.containers.items():
            value = final.get(name)
            if isinstance(value, (list, tuple, dict)) and Container.of(value) == container:
                final.update({slot: value[k] for k, slot in container.items(name)})
        draws = recorder.draws
        seeds = {} if draws is None else {name: SeedDraw(key, draws.generators[key], value.device, value)
                                          for key, (name, value) in draws.seeds.items()}
        tainted_final = {k for k, v in final.items() if recorder.node_of(v) is not None}
        inplace = {k for k in tainted_final if k in initial and initial[k] is final[k]}
        kept = {id(initial[k]) for k in inplace}  # the caller's tensors whose final value another slot carries
        for name, version in self.versions.items():
            if initial[name]._version != version and name not in inplace and id(initial[name]) not in kept:
                recorder.problems.append(Unsupported(
                    f"input {name!r} is updated in place and then replaced by a new tensor: the caller's tensor "
                    f"keeps an intermediate value (not compiled yet)", None, None))
        for name, value in initial.items():
            if (isinstance(value, torch.Tensor) and recorder.data_set.get(id(value)) is value and name not in inplace
                    and name not in self.exclude):
                recorder.problems.append(Unsupported(
                    f"input {name!r} is given a new value by `.data =` and then replaced by a new tensor: the "
                    f"caller's tensor keeps that value (not compiled yet)", None, None))
        held_at_end = {id(t) for t in self.final_components.values()}
        for obj, name, value in python.end:
            if any((recorder.node_of(t) is not None or recorder.stale.get(id(t)) is t) and id(t) not in held_at_end
                   for t in walk_tensors(value)):
                recorder.problems.append(Unsupported(
                    f"a loop tensor is kept in {python.paths.get(id(obj), type(obj).__name__)}.{name}, outside the "
                    f"BlockState and the components' attributes the loop carries", None, None))
        checks = self._settle_hoisted()
        return LoopTrace(steps=self.steps, initial_slots=initial,
                         initial_inputs_copy=self.inputs_copy if self.inputs_copy is not None else initial,
                         final_slots=final, tainted_final=tainted_final, inplace_slots=inplace,
                         schedule_inputs=self.schedule_inputs, problems=recorder.problems,
                         block_names=list(self.wrapper.sub_blocks), component_slots=self.component_slots,
                         final_components=self.final_components, rng_before=self.rng_states, seeds=seeds,
                         progress=self.progress, python=python.log(),
                         usage=TensorUse(recorder.used, recorder.eager_used, recorder.const_ids),
                         components=components, floats=self.lifts.sources, containers=self.containers,
                         checks=checks, input_objects=self.input_objects, aliases=self.aliases)


def _settle_floats(python: Recording, final: dict[str, Any]) -> dict[str, Any]:
    """After the traced call: a traced float it left somewhere (an attribute, another BlockState slot) would be
    replayed by compiled calls as this call's value, so its value stays guarded; the floats the call read take
    the traced ones' places. Returns the final BlockState with them."""
    for k, v in final.items():
        for f in floats_in(v):
            if not (v is f and f.source.kind == SourceKind.INPUT and f.source.name == k):
                f.source.note(f"kept in the BlockState slot {k!r}")
    for value in python.kept:
        for f in floats_in(value):
            f.source.note("kept in an attribute the call wrote")
    for write in python.writes.values():
        if type(value_of(write.obj, write.name)) is TracedFloat:
            set_attribute(write.obj, write.name, value_of(write.obj, write.name).source.original)
    python.end = [(obj, name, plain(value)) for obj, name, value in python.end]
    return {k: plain(v) for k, v in final.items()}
