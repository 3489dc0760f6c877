"""The ways a plan runs, behind one small protocol, and the write-back they share.

    WholeLoop           the lowered loop (while_loops; a C++ loop on CPU) on preallocated state buffers
    WholeLoopCudaGraph  the N steps captured into one CUDA graph (backend/cudagraph.py), replayed per call
    EagerSegments       compiled segments between blocks that run eagerly each step (runtime/eager_segments.py)
    Eager               the wrapper itself (a loop that cannot be compiled)

Each has ``kind`` (an ``ExecutableKind``: its value is what ``explain()`` and ``last_plan`` say), ``verify()``
(run on the traced call's inputs and compare with the eager result it produced; raises on a difference),
``run(components, state, block_state)`` (one call, written back as eager would), ``describe()`` (lines for
``explain()``) and ``code()`` (its compiled functions, each with an ``origin``: loaded from the persistent cache or
compiled).
"""

from __future__ import annotations

import bisect
import contextlib
import copy
import enum
import functools
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import torch

from ..config import CompileConfig, LoopStats
from ..modular_pipelines.state import BlockState
from ..passes.loop_plan import LoopPlan
from ..passes.step_tables import gather
from ..pystate.components import put, set_attribute
from ..rng import CounterDraws, CounterMode, draw_seeds, eager_loop
from ..trace.ir import LoopTrace
from ..verify import check_slots
from .watch import Reader, StepWatch, eager_hook, eager_steps, timestep

__all__ = ["Context", "Executable", "ExecutableKind", "CallFailed", "WholeLoop", "WholeLoopCudaGraph", "Eager",
           "write_back", "drawing", "eager_call", "loop_device", "origin", "progress"]


@dataclass
class Context:
    """What every executable of one compiled loop shares: the wrapper, the options, the stats."""

    wrapper: Any
    config: CompileConfig
    stats: LoopStats
    watch: StepWatch  # step callbacks and the interrupt flag (runtime/watch.py)


class ExecutableKind(enum.Enum):
    """The way a plan runs; its value is the text ``explain()`` and ``last_plan.kind`` show."""

    EAGER = "eager"
    WHOLE_LOOP = "whole loop on state buffers"
    WHOLE_LOOP_CUDA_GRAPH = "whole-loop CUDA graph"
    EAGER_SEGMENTS = "eager segments"


class Executable(Protocol):
    kind: ExecutableKind

    def verify(self) -> None: ...

    def run(self, components, state, block_state: BlockState) -> tuple[Any, Any]: ...

    def describe(self) -> list[str]: ...

    def code(self) -> list[Callable]: ...


class CallFailed(Exception):
    """The compiled code failed on a call where eager runs; nothing was written yet (the cause is chained)."""


class _Watched(Exception):
    """Carries what a step callback raised, or an interruption, out of a compiled call (it is not the compiled
    code failing: no fallback to eager)."""


class Eager:
    """The wrapper called eagerly, drawing as ``config.rng`` says."""

    kind = ExecutableKind.EAGER

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def verify(self) -> None:
        pass

    def run(self, components, state, block_state: BlockState):
        return eager_call(self.ctx, components, state)

    def describe(self) -> list[str]:
        return []

    def code(self) -> list[Callable]:
        return []


CHUNK_SECONDS = 0.1  # how long the compiled loop runs between two moments Python acts (Ctrl-C, the progress bar)


class WholeLoop:
    """The lowered loop, compiled once, run on state buffers: one set per state signature (shapes, strides,
    dtypes, devices), allocated on first use and reused by every later call. The caller's values are copied in,
    the compiled loop updates the buffers in place, and the final values are cloned out, so users never hold a
    buffer that the next call overwrites.

    The steps run in chunks of about ``CHUNK_SECONDS`` (the compiled loop takes its first step and clamped run
    ends): between two chunks Python raises a pending ``KeyboardInterrupt`` (the call stops, nothing written back)
    and advances the wrapper's progress bar. A loop of small steps runs in one chunk, a chunk of large ones is one
    step; the compiled code releases the GIL while it runs."""

    kind = ExecutableKind.WHOLE_LOOP

    def __init__(self, ctx: Context, trace: LoopTrace, loop: LoopPlan, compiled: Callable,
                 sources: dict[str, tuple]) -> None:
        self.ctx, self.trace, self.loop, self.compiled, self.sources = ctx, trace, loop, compiled, sources
        self.tables = [v.tables for v in loop.variants]  # on the loop's device (passes.place_tables)
        self.ends = torch.tensor([end for _, _, end in loop.runs], dtype=torch.int64, device=loop_device(trace))
        self.steps = loop.runs[-1][2] if loop.runs else 0
        self.step_seconds: float | None = None  # the fastest step measured so far (chunks of one step or more)
        self.buffers: dict[tuple, list[torch.Tensor]] = {}
        self.floats = [(tables[j], rows if rows is None else rows.to(tables[j].device), source)
                       for tables, v in zip(self.tables, loop.variants) for j, rows, source in v.sources]
        self.gathers = [(tables[j], None if steps is None else steps.to(tables[j].device), name, dim, at)
                        for tables, v in zip(self.tables, loop.variants) for j, steps, name, dim, at in v.gathers]

    def execute(self, slots: dict[str, Any], bar=None, watch: StepWatch | None = None, traced: bool = False
                ) -> list[torch.Tensor]:
        """The compiled loop on ``slots`` (BlockState values and seeds by name): the final ``loop.state_slots``.
        With ``watch`` active, chunks also end after the steps its callbacks are due at, and it acts there. The
        lifted floats are read from ``slots`` and the attributes as they are now (``traced``: as the traced call
        read them)."""
        for table, rows, source in self.floats:
            value = source.original if traced else source.current(slots)
            if rows is None:
                table.fill_(value)
            else:
                table.index_fill_(0, rows, value)
        for table, steps, name, dim, at in self.gathers:
            gather(table, steps, slots[name], dim, at)
        state = []
        for name in self.loop.state_slots:
            value = slots.get(name)
            if not isinstance(value, torch.Tensor):  # first written inside the loop (a temporary, a history)
                slot = self.trace.component_slots.get(name)
                value = torch.zeros_like(slot.value if slot else self.trace.final_slots[name])
            state.append(value)
        invariants = unshared([slots[name] for name in self.loop.invariant_slots])
        after = None
        if watch is not None:
            def after(done: int, buffers: list[torch.Tensor]) -> None:
                if not (watch.callbacks or watch.stop):
                    return
                values = dict(zip(self.loop.invariant_slots, invariants))
                values.update(zip(self.loop.state_slots, buffers))
                try:
                    watch.after(done - 1, self.steps, Reader(values, self.loop.state_slots), timestep(slots, done - 1))
                except BaseException as e:
                    raise _Watched() from e
        return self._call(state, invariants, bar, after, watch.stops(self.steps) if watch is not None else ())

    def _call(self, state: list[torch.Tensor], invariants: list[torch.Tensor], bar=None, after=None, stops=()):
        """Run the compiled loop on copies of ``state`` in chunks; ``after(steps done, buffers)`` after each one,
        and a chunk ends after each step in ``stops``."""
        key = tuple((t.shape, t.stride(), t.dtype, t.device) for t in state)
        buffers = self.buffers.get(key)
        if buffers is None:
            buffers = self.buffers[key] = [torch.empty_like(t) for t in state]
        for buffer, value in zip(buffers, state):
            buffer.copy_(value)
        start = torch.zeros((), dtype=torch.int64, device=self.ends.device)
        bind = getattr(self.compiled, "bind", None)  # the persistent cache's code: a chunk costs one call
        run = bind(buffers, invariants, self.tables, self.ends, start) if bind else functools.partial(
            self.compiled, buffers, invariants, self.tables)
        done = 0
        while done < self.steps:
            size = 1 if self.step_seconds is None else max(1, int(CHUNK_SECONDS / max(self.step_seconds, 1e-9)))
            end = min(done + size, self.steps)
            due = bisect.bisect_left(stops, done)  # the next step a callback is due after ends the chunk there
            if due < len(stops):
                end = min(end, stops[due] + 1)
            began = time.perf_counter()
            run(self.ends.clamp(max=end), start.fill_(done))
            seconds = (time.perf_counter() - began) / (end - done)  # the fastest seen: a busy machine's slow
            self.step_seconds = min(seconds, self.step_seconds or seconds)  # chunk does not shrink the next ones
            if bar is not None:
                bar.update(end - done)
            done = end
            if after is not None:
                after(done, buffers)
        return [b.clone() for b in buffers]

    def verify(self) -> None:
        traced_seeds = {name: seed.value for name, seed in self.trace.seeds.items()}
        outputs = self.execute({**self.trace.initial_inputs_copy, **traced_seeds}, traced=True)
        check_slots("compiled loop", dict(zip(self.loop.state_slots, outputs)),
                    {name: self.trace.final_value(name) for name in self.loop.state_slots})

    def run(self, components, state, block_state: BlockState):
        self.ctx.stats.compiled_calls += 1
        with progress(self.ctx.wrapper, self.trace, block_state) as bar:
            seeds, _ = draw_seeds(self.sources, vars(block_state))
            try:
                outputs = self.execute({**vars(block_state), **seeds}, bar, self.ctx.watch)
            except _Watched as e:  # a step callback's error, or an interruption: nothing was written back
                raise e.__cause__ from None
            except Exception as e:
                raise CallFailed(f"{type(e).__name__}: {e}") from e
            if bar is not None and getattr(bar, "total", None) and getattr(bar, "n", bar.total) < bar.total:
                bar.update(bar.total - bar.n)  # a total the wrapper set that is not the number of steps
        return write_back(self.ctx, self.trace, components, state, block_state,
                          dict(zip(self.loop.state_slots, outputs)))

    def describe(self) -> list[str]:
        return [f"state buffers (preallocated, updated in place): {', '.join(self.loop.state_slots)}",
                f"compiled code: {origin(self.compiled)}"]

    def code(self) -> list[Callable]:
        return [self.compiled]


class WholeLoopCudaGraph(WholeLoop):
    """CUDA: the compiled steps captured into one graph per (plan structure, N) by ``cudagraph.WholeLoopGraph``
    (which keeps its own static buffers), replayed per call."""

    kind = ExecutableKind.WHOLE_LOOP_CUDA_GRAPH

    def _call(self, state, invariants, bar=None, after=None, stops=()):
        if stops:  # step callbacks: the graph is one launch, so this call runs the compiled steps one by one
            return self._step_by_step(state, invariants, bar, after, set(stops))
        start = torch.zeros((), dtype=torch.int64, device=self.ends.device)
        outputs = self.compiled(state, invariants, self.tables, self.ends, start)
        if bar is not None:
            bar.update(self.steps)  # one graph launch for the whole loop
        return outputs

    def _step_by_step(self, state, invariants, bar, after, stops: set[int]) -> list[torch.Tensor]:
        def each(done: int, current: list[torch.Tensor]) -> None:
            if bar is not None:
                bar.update(1)
            if done - 1 in stops or self.ctx.watch.stop:
                after(done, current)

        return [t.clone() for t in self.compiled.step_by_step(state, invariants, self.tables, self.ends, each)]

    def describe(self) -> list[str]:
        steps = [f"compiled step {v}: {origin(step)}" for v, step in enumerate(self.compiled.steps)]
        if self.compiled.failed:
            return [f"CUDA graph: not captured ({self.compiled.failed}); compiled steps run one by one", *steps]
        return [f"CUDA graph: one per N, {len(self.compiled.graphs)} captured", *steps]

    def code(self) -> list[Callable]:
        return list(self.compiled.steps)


def unshared(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` with each one that shares storage with an earlier one copied: the loop's inputs may be views of
    one tensor (Helios' history latents), which a ``while_loop`` refuses ("input-to-input aliasing"); the loop
    only reads them."""
    seen: set[tuple] = set()
    out = []
    for t in tensors:
        key = (t.device, t.untyped_storage().data_ptr())
        out.append(t.clone() if key in seen and key[1] else t)
        seen.add(key)
    return out


def origin(fn) -> str:
    """Where compiled code came from: loaded from the persistent cache, compiled and stored, or compiled in this
    process (backend/compiler.py, backend/artifacts.py)."""
    return getattr(fn, "origin", None) or "not compiled yet (on its first call)"


def progress(wrapper, trace: LoopTrace, block_state: BlockState):
    """The wrapper's own progress bar (its config, its total) when its traced call opened it, else nothing."""
    if not trace.progress or not callable(getattr(wrapper, "progress_bar", None)):
        return contextlib.nullcontext()
    return wrapper.progress_bar(total=getattr(block_state, "num_inference_steps", None) or len(trace.steps))


def write_back(ctx: Context, trace: LoopTrace, components, state, block_state: BlockState,
               computed: dict[str, Any], segmented: bool = False):
    """Write the loop's results back as eager would: BlockState slots, then the Python state.

    ``computed`` holds the loop's tensors: fresh ones from the whole compiled loop (copied into the caller's
    tensor where eager updated it in place), or the very objects eager segments left (``segmented``)."""
    final = BlockState()
    given = vars(block_state)
    items = {slot for name, c in trace.containers.items() for _, slot in c.items(name)}
    for name, traced in trace.final_slots.items():
        if name in items:  # a container's item: the container is put back together instead
            continue
        if name in trace.containers and name not in computed:
            if all(slot in computed for _, slot in trace.containers[name].items(name)):
                final[name] = trace.containers[name].rebuild(name, computed)
            # else: the step's scratch, which the loop does not write back (its tensors are not computed)
        elif name in computed:
            value = computed[name]
            original = given.get(name)
            if not segmented and name in trace.inplace_slots and isinstance(original, torch.Tensor):
                original.copy_(value)  # eager mutated the caller's tensor in place: so do we
                value = original
            final[name] = value
        elif name in trace.tainted_final:
            if name in given:  # invariant inputs: the caller's own objects
                final[name] = given[name]
        elif name in given and trace.initial_slots.get(name) is traced:
            # an input the loop never rebound: the caller's own object, so set_block_state skips it as
            # eagerly (re-setting a kwargs-type input would tag it twice in the PipelineState)
            final[name] = given[name]
        else:
            final[name] = traced.clone() if isinstance(traced, torch.Tensor) else copy.deepcopy(traced)
    # a BlockState object taken by value (guards/plan_guard.py: rebound_objects): what the call wrote goes to this
    # call's object
    rebound = {id(obj): given[k] for k, (obj, _) in trace.input_objects.items() if given.get(k, obj) is not obj}
    for obj, name, value in trace.python.end:  # every attribute the traced call wrote, as it left it
        set_attribute(rebound.get(id(obj), obj), name, trace.python.replay(obj, name, value))
    for name in trace.final_components:  # the loop's own tensors, not the traced run's
        put(components, trace.component_slots[name].path, computed[name])
    ctx.wrapper.set_block_state(state, final)
    return components, state


def drawing(config: CompileConfig, draws: CounterDraws, step: int, counts: dict[str, int]):
    """rng="counter": eager code draws by the seed policy, as step ``step`` after ``counts`` draws per seed."""
    if config.rng != "counter":
        return contextlib.nullcontext()
    draws.start_step(step, counts)
    return CounterMode(draws)


def eager_call(ctx: Context, components, state):
    """The wrapper called eagerly (a loop that could not be compiled), drawing as ``config.rng`` says; step
    callbacks and an interruption act after each of its steps."""
    with eager_steps(ctx.wrapper, eager_hook(ctx.watch)):
        if ctx.config.rng != "counter":
            return ctx.wrapper(components, state)
        return eager_loop(ctx.wrapper, components, state)


def loop_device(trace: LoopTrace) -> torch.device:
    """Where the loop's data lives: the device of its first tensor slot (CPU when it has none)."""
    return next((v.device for v in trace.initial_slots.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))

