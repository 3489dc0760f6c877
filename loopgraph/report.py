"""What a plan is, for people and tests: ``CompiledLoop.last_plan`` (a ``PlanReport``) and ``explain()``."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from .backend.lower import module_ops
from .config import LoopStats
from .passes.batching import CallSite, step_ranges, describe_sites
from .passes.loop_plan import LoopPlan, SlotInfo
from .passes.run import PassRecord
from .planner import Plan
from .rng import describe_source
from .runtime.executables import ExecutableKind, WholeLoop, origin

__all__ = ["PlanReport", "VariantReport", "SegmentReport", "report", "explain_lines"]


@dataclass(frozen=True)
class VariantReport:
    """One compiled step graph: the steps that use it and its per-step tables."""

    steps: tuple[int, ...]
    ops: int
    graph: torch.fx.GraphModule
    tables: tuple[tuple[str, tuple[int, ...], torch.dtype], ...]   # (placeholder, shape [N, ...], dtype)
    whole_tables: bool     # takes the whole tables and the step counter (kernel pass), not table rows


@dataclass(frozen=True)
class SegmentReport:
    blocks: tuple[str, ...]
    eager: bool
    variants: int          # compiled step graphs of the segment (0 for an eager block)


@dataclass(frozen=True)
class PlanReport:
    """The most recent plan of a compiled loop, read-only: how it runs and why."""

    kind: str                              # the executable: "whole loop on state buffers", "eager segments", ...
    executable: object                     # the executable itself (``runtime/executables.py``)
    program: LoopPlan | None               # the whole loop's final program (after the passes), if planned whole
    slots: dict[str, SlotInfo]
    state_slots: tuple[str, ...]
    invariant_slots: tuple[str, ...]
    variants: tuple[VariantReport, ...]
    runs: tuple[tuple[int, int, int], ...]  # (variant, first step, end step)
    segments: tuple[SegmentReport, ...] | None
    problems: tuple[str, ...]
    passes: tuple[PassRecord, ...]
    guards: str
    seeds: dict[str, str]                  # rng="counter": seed name -> where its generator comes from
    traced_seeds: dict[str, torch.Tensor]  # the seeds the traced call drew (its inputs when it is checked)
    batching: tuple[CallSite, ...] = ()    # models called more than once per step: batched, or why not
    code: tuple[str, ...] = ()             # where each compiled function came from: "loaded from <file> ...",
                                           # "compiled in 41.2 s (AOTInductor), stored as <file>", ...


def report(plan: Plan) -> PlanReport:
    loop = plan.loop
    variants = tuple(VariantReport(tuple(v.steps), module_ops(v.module), v.module,
                                   tuple((n, tuple(t.shape), t.dtype) for n, t in zip(v.lifted, v.tables)),
                                   v.whole_tables) for v in (loop.variants if loop else ()))
    segments = None if plan.segments is None or plan.executable.kind is not ExecutableKind.EAGER_SEGMENTS else tuple(
        SegmentReport(tuple(s.blocks), s.eager, len(s.plan.variants) if s.plan else 0) for s in plan.segments)
    problems = tuple(f"{p.reason} in block {p.block!r} at {p.where}" if p.block else p.reason for p in plan.problems)
    return PlanReport(
        kind=plan.executable.kind.value, executable=plan.executable, program=loop,
        slots=dict(loop.slots) if loop else {}, state_slots=tuple(loop.state_slots) if loop else (),
        invariant_slots=tuple(loop.invariant_slots) if loop else (), variants=variants,
        runs=tuple(loop.runs) if loop else (), segments=segments, problems=problems, passes=tuple(plan.passes),
        guards=plan.guard.describe(), seeds={k: describe_source(s) for k, s in plan.sources.items()},
        traced_seeds={name: seed.value for name, seed in plan.trace.seeds.items()}, batching=tuple(plan.batching),
        code=tuple(origin(fn) for fn in plan.executable.code()))


def explain_lines(plan: Plan, wrapper, stats: LoopStats, verbose: bool = False) -> list[str]:
    """``explain()`` below its header: how it runs, the guards, the blocks, segments and batched calls, the step
    graphs and the stats; ``verbose`` adds the slot table, each step graph's steps, the tables and the passes."""
    r = report(plan)
    lines = [f"runs as: {r.kind}", f"guards: {r.guards}"]
    eager = {p.block: p for p in plan.problems if p.block}
    lines.append("blocks:")
    for name, block in wrapper.sub_blocks.items():
        try:
            where = f"{inspect.getsourcefile(type(block))}:{inspect.getsourcelines(type(block))[1]}"
        except (TypeError, OSError):
            where = "<unknown source>"
        if name in eager:
            status = f"eager ({eager[name].reason}, {eager[name].where})"
        elif plan.executable.kind is ExecutableKind.EAGER:
            status = "eager: the whole loop fell back (" + "; ".join(p.reason for p in plan.problems) + ")"
        else:
            status = f"compiled ({plan.trace.steps[-1].block_ops.get(name, 0)} ops/step)"
        lines.append(f"  {name} ({type(block).__name__}, {where}): {status}")
    lines += plan.executable.describe()
    lines += _float_lines(plan.trace, lifted=isinstance(plan.executable, WholeLoop))
    if r.batching:
        lines += ["batched calls:", *describe_sites(list(r.batching))]
    if r.program is None:
        return lines + [_stats_line(stats)]
    for name, source in r.seeds.items():
        lines.append(f"random draws (rng='counter'): seed {name} drawn per call from {source}")
    ops = ", ".join(str(v.ops) for v in r.variants)
    lines.append(f"step graphs: {len(r.variants)} for {r.program.num_steps} steps ({ops} ops)")
    if r.program.growth:
        lines.append(f"  more step graphs for more steps: {r.program.growth}")
    if not verbose:
        return lines + [_stats_line(stats), f"explain(verbose=True) adds the slot table ({len(r.slots)} slots), "
                                            f"each step graph's steps, the hoisted tables and the passes"]
    for k, v in enumerate(r.variants):
        lines.append(f"  variant {k}: {v.ops} ops, steps {step_ranges(list(v.steps))}")
    lines.append("runs: " + ", ".join(f"variant {v} for steps [{a}, {b})" for v, a, b in r.runs))
    lines.append("slots:")
    for info in r.slots.values():
        end = ", written back" if info.needed_at_end else ""
        lines.append(f"  {info.name:<28} {info.role:<10} {info.kind}{end}")
    lines.append("hoisted per-step tables:")
    for k, v in enumerate(r.variants):
        for name, shape, dtype in v.tables:
            lines.append(f"  variant {k} {name}: {shape} {str(dtype).replace('torch.', '')}")
    lines.append("passes: " + "; ".join(f"{p.name} ({p.seconds * 1e3:.0f} ms): {p.summary}" for p in r.passes))
    return lines + [_stats_line(stats)]


def _stats_line(stats: LoopStats) -> str:
    return (f"stats: compiles={stats.compiles} loaded={stats.loaded} step_graphs={stats.step_graphs} "
            f"plans={stats.plans} calls={stats.calls} compiled_calls={stats.compiled_calls} "
            f"eager_blocks={stats.eager_blocks} plan_s={stats.plan_seconds:.2f} "
            f"compile_s={stats.compile_seconds:.2f}")


def _float_lines(trace, lifted: bool) -> list[str]:
    """``explain()``'s lines on the floats a plan reads: inputs of the compiled loop, or guarded by value and why."""
    lines = []
    inputs = [s for s in trace.lifted if s.linked]
    if lifted and inputs:
        lines.append("floats as inputs (a new value runs this plan): " + ", ".join(
            s.path + (f" (while {', '.join(f'{c.text(s.original)} is {c.outcome}' for c in s.checks)})"
                      if s.checks else "") for s in inputs))
    # the floats of inputs, blocks, guiders and schedulers whose value is guarded (a model's own, such as a norm's
    # eps, are not listed)
    kept = [s for s in trace.floats if (s.use is not None or not lifted and s.linked)
            and not isinstance(getattr(s.read, "obj", None), torch.nn.Module)]
    if kept:
        shown = "; ".join(f"{s.path}, {s.use or 'the plan does not run the whole loop compiled'}" for s in kept[:4])
        more = f"; and {len(kept) - 4} more" if len(kept) > 4 else ""
        lines.append(f"floats guarded by value: {shown}{more}")
    return lines
