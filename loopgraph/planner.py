"""From one traced call to a plan: trace -> guard -> passes -> compile -> verify -> an executable.

Anything that goes wrong after the traced run leaves the traced call's (eager) result standing: an
``Unsupported`` (the loop cannot be compiled this way) or any other error (a bug: "please report this")
makes the plan run eagerly, with a warning that says why; ``strict=True`` raises instead.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

from .backend.compiler import Backend, compile_key
from .backend.lower import op_count
from .guards.plan_guard import PlanGuard, plan_guard, stable_guard
from .passes.batching import CallSite, batch_calls
from .passes.loop_plan import LoopPlan
from .passes.partition import Segment, eager_blocks, plan_segments, restores
from .passes.run import PassInput, PassRecord, passes_for, run_passes
from .pystate.attribute_log import TRACE_LOCK
from .pystate.snapshots import tensor_snaps
from .rng import seed_sources
from .runtime.eager_segments import EagerSegments
from .runtime.executables import (
    Context,
    Eager,
    Executable,
    WholeLoop,
    WholeLoopCudaGraph,
    loop_device,
)
from .runtime.watch import eager_hook
from .trace.ir import LoopTrace, Unsupported
from .trace.tracer import trace_loop

__all__ = ["Plan", "Planner", "StrictError"]


class StrictError(RuntimeError):
    """``compile_loop(strict=True)`` refuses to run a loop eagerly: the reasons it would have fallen back."""


@dataclass(eq=False)  # compared by identity: the plan cache removes a plan by identity, never field by field
class Plan:
    trace: LoopTrace
    guard: PlanGuard                        # what a call must match to reuse the plan (guards/plan_guard.py)
    executable: Executable
    problems: list[Unsupported] = field(default_factory=list)
    passes: list[PassRecord] = field(default_factory=list)
    loop: LoopPlan | None = None            # the whole loop's program (when it was planned whole)
    segments: list[Segment] | None = None   # eager segments: compiled segments and eager blocks
    sources: dict[str, tuple] = field(default_factory=dict)  # rng="counter": seed name -> its generator
    batching: list[CallSite] = field(default_factory=list)   # models called more than once per step (batching.py)


class Planner:
    """Makes the plans of one compiled loop; keeps what outlives a plan (the literals seen, the backend)."""

    def __init__(self, ctx: Context, backend: Backend) -> None:
        self.ctx, self.backend = ctx, backend
        self.literals: dict[tuple, dict[int, float]] = {}
        self.lifts: dict[tuple, set[int]] = {}
        self.warned_growth = False

    @property
    def name(self) -> str:
        return type(self.ctx.wrapper).__name__

    def plan(self, components, state) -> tuple[Plan | None, Any]:
        """Trace one eager call with ``components``/``state`` and plan from it: (the plan or None when it cannot
        be guarded, the call's result). Holds ``TRACE_LOCK`` throughout: a trace patches ``torch.nn.Module`` and
        other classes, and Dynamo compiling in another thread meanwhile traced into those hooks and failed (the
        loop then ran eagerly)."""
        with TRACE_LOCK:
            return self._plan(components, state)

    def _plan(self, components, state) -> tuple[Plan | None, Any]:
        config, stats = self.ctx.config, self.ctx.stats
        start = time.perf_counter()
        trace, result = trace_loop(self.ctx.wrapper, components, state, strict=config.strict, rng=config.rng,
                                   batch=config.batch_guidance is not False, after_step=eager_hook(self.ctx.watch),
                                   lift_floats=config.lift_floats)
        batching, records, failure = [], [], None
        try:  # a new trace: the guard is built from it, so it checks the constants the batched calls add
            trace, batching, records = self._batch(trace)
        except Exception as e:  # a bug: this plan runs eagerly (below, "please report this")
            if config.strict:
                raise
            failure = e
        try:
            plan = Plan(trace=trace, guard=plan_guard(trace), executable=Eager(self.ctx),
                        problems=list(trace.problems), sources=seed_sources(trace), batching=batching,
                        passes=records)
        except Exception as e:  # nothing to reuse: every call traces (and returns eager's result)
            if config.strict:
                raise
            warnings.warn(f"compile_loop: {self.name}: could not guard a plan ({type(e).__name__}: {e}); this call "
                          f"ran eagerly. Please report this.", stacklevel=3)
            return None, result
        stats.plans += 1
        try:
            if failure is not None:
                raise failure
            if not plan.problems and trace.steps:
                self._whole_loop(plan)
            elif plan.problems and eager_blocks(trace, plan.problems):
                self._segments(plan)
            elif plan.problems:
                self._fall_back(plan, None)
        except Exception as e:  # planning broke: the traced call's result stands, and this plan runs eagerly
            if config.strict or isinstance(e, StrictError):
                raise
            plan.executable = Eager(self.ctx)
            notes = " ".join(getattr(e, "__notes__", ()))
            plan.problems = [Unsupported(f"planning failed ({type(e).__name__}: {e})" + (f" {notes}" if notes else "")
                                         + ("" if isinstance(e, Unsupported) else "; please report this"))]
            self._fall_back(plan, e)
        if plan.trace.lifted and not isinstance(plan.executable, WholeLoop):  # only the whole loop reads them per call
            plan.guard = plan_guard(plan.trace, lifted=False)
        stats.plan_seconds += time.perf_counter() - start
        counter = self.backend.counter
        stats.compiles, stats.compile_seconds, stats.loaded = counter.count, counter.seconds, counter.loaded
        return plan, result

    def _batch(self, trace: LoopTrace) -> tuple[LoopTrace, list[CallSite], list[PassRecord]]:
        """The "batch calls" pass (passes/batching.py): a new trace, its step graphs rewritten, that everything
        after it plans from."""
        if self.ctx.config.batch_guidance is False:
            return trace, [], []
        start = time.perf_counter()
        try:
            trace, sites, summary = batch_calls(trace)
        except Exception as e:
            e.add_note("raised in loopgraph pass 'batch calls'")
            raise
        if self.ctx.config.batch_guidance is True:
            for s in sites:
                if s.other_steps:
                    warnings.warn(f"compile_loop: {self.name}: {s.module} ({s.calls} calls per step in block "
                                  f"{s.block!r}) is not batched in {len(s.other_steps)} step(s): {s.reason}",
                                  stacklevel=4)
        return trace, sites, [PassRecord("batch calls", time.perf_counter() - start, summary)]

    def _whole_loop(self, plan: Plan) -> None:
        trace, config = plan.trace, self.ctx.config
        device = loop_device(trace)
        resolved = config.resolve(device)
        needed = set(trace.initial_slots) | {o.name for o in self.ctx.wrapper.intermediate_outputs} | set(
            trace.final_components)
        needed |= {slot for name in needed & set(trace.containers) for _, slot in trace.containers[name].items(name)}
        given = PassInput(trace, needed, device, self.literals, self.lifts)
        try:
            plan.loop, records = run_passes(given, passes_for(resolved.fused_kernels))
            plan.passes = [*plan.passes, *records]
        except Unsupported as e:
            return self._fall_back(plan, e)
        loop = plan.loop
        taken = {id(source) for v in loop.variants for _, _, source in v.sources}
        missed = {id(s) for s in trace.lifted if s.linked and id(s) not in taken}
        if missed:  # it reached a step graph the plan could not make read it per call: guarded by value
            use = "an operand in a step graph that does not read it per call"
            trace = plan.trace = dataclasses.replace(trace, floats=[
                dataclasses.replace(s, use=use) if id(s) in missed else s for s in trace.floats])
            plan.guard = plan_guard(trace)
        if loop.growth and not self.warned_growth:  # once per compiled loop: explain() keeps saying it
            self.warned_growth = True
            warnings.warn(f"compile_loop: {self.name}: {len(loop.variants)} step graphs for {loop.num_steps} steps "
                          f"(each compiled; a new N makes new ones): {loop.growth}", stacklevel=4)
        key = compile_key(loop, [plan.guard.inputs.data.get(k) for k in [*loop.state_slots, *loop.invariant_slots]],
                          {id(s.tensor) for read in trace.python.reads.values() for s in tensor_snaps(read.value)})
        fn = self.backend.cached(key)
        if fn is None:
            fn = self._compile_whole_loop(loop, device, resolved.cuda_graphs)
            self.ctx.stats.step_graphs += len(loop.variants)
        if config.cuda_graphs is True and device.type != "cuda":
            warnings.warn(f"compile_loop: cuda_graphs=True has no effect on a {device.type} loop", stacklevel=4)
        kind = WholeLoopCudaGraph if resolved.cuda_graphs else WholeLoop
        executable = kind(self.ctx, trace, loop, fn, plan.sources)
        if config.check:
            try:
                executable.verify()
            except Exception as e:  # a failed compilation or a mismatch: never a silently different result
                return self._fall_back(plan, e)
        self.backend.keep(key, fn)
        plan.executable = executable

    def _compile_whole_loop(self, loop: LoopPlan, device, cuda_graphs: bool):
        """CUDA: the steps captured into one CUDA graph; otherwise (and with cuda_graphs=False) the while_loops."""
        if cuda_graphs:
            from .backend.cudagraph import WholeLoopGraph

            ops = op_count(loop)
            return WholeLoopGraph(loop, lambda module, whole: self.backend.step(module, whole, device, ops),
                                  self.backend.graph_pool())
        return self.backend.whole_loop(loop, device)

    def _segments(self, plan: Plan) -> None:
        trace, config, stats = plan.trace, self.ctx.config, self.ctx.stats
        eager = eager_blocks(trace, plan.problems)
        try:
            plan.segments = plan_segments(trace, eager)
        except Unsupported as e:
            plan.problems.append(e)
            return self._fall_back(plan, e)
        device = loop_device(trace)
        fns = []
        for seg in plan.segments:
            variants = seg.plan.variants if seg.plan is not None else []
            fns.append([self.backend.segment_step(v.module, device) for v in variants])
            stats.step_graphs += len(variants)
        executable = EagerSegments(self.ctx, trace, plan.segments, fns, plan.sources, set(plan.guard.inputs.data),
                                   stable_guard(trace, plan.guard), restores(trace, eager))
        if config.check:
            try:
                executable.verify()
            except Exception as e:  # a failed compilation or a mismatch: never a silently different result
                plan.segments = None
                return self._fall_back(plan, e)
        plan.executable = executable
        stats.eager_blocks = len(eager)
        compiled = [b for b in trace.block_names if b not in eager]
        text = "; ".join(f"{p.reason} in block {p.block!r} at {p.where}" for p in plan.problems)
        warnings.warn(f"compile_loop: {self.name}: {text}. Block(s) {', '.join(map(repr, sorted(eager)))} run "
                      f"eagerly each step between compiled segments; compiled: {', '.join(map(repr, compiled))} "
                      f"(strict=True raises instead)", stacklevel=4)

    def _fall_back(self, plan: Plan, error: Exception | None) -> None:
        plan.executable = Eager(self.ctx)
        problems = plan.problems or [Unsupported(f"compilation failed: {error}")]
        plan.problems = problems
        self.ctx.stats.eager_blocks = len({p.block for p in problems if p.block})
        text = "; ".join(f"{p.reason} in block {p.block!r} at {p.where}" if p.block else p.reason
                         for p in problems)
        if self.ctx.config.strict:
            raise StrictError(f"compile_loop(strict=True): {self.name}: {text}") from error
        warnings.warn(f"compile_loop: {self.name} runs eagerly: {text}", stacklevel=5)
