"""From a trace to the program that is compiled: named passes with one contract.

A pass takes the plan so far (``LoopPlan``; the first takes none) and the pass input, and returns a new plan
and a one-line summary of what it changed; plans are never changed in place. ``run_passes`` times each and
keeps a ``PassRecord``; a failure names its pass. Today's order:

    plan            group the steps into variants, lift per-step values into tables (analysis.plan_loop)
    lift literals   lift the arithmetic floats that differ from the first plan of the same structure
    fuse kernels    guidance + scheduler updates as fused Triton kernels (passes/fused_kernels.py; CUDA by default)
    place tables    the per-step tables on the loop's device, their row count N an unbacked size

Before them, on the trace itself (so eager segments see it too), the planner runs "batch calls"
(``batching.batch_calls``): repeated model calls of a step become one batched call. It returns a new trace that
the guard and everything after it are made from; its record comes first.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..trace.ir import LoopTrace, Unsupported
from .loop_plan import LoopPlan, loop_steps, plan_loop

__all__ = ["PassInput", "PassRecord", "run_passes", "passes_for"]


@dataclass
class PassInput:
    """What the passes read besides the plan. ``literals``/``lifts`` belong to the compiled loop and outlive one
    plan: per variant signature, the first plan's float literals and the positions lifted since."""

    trace: LoopTrace
    needed: set[str]                 # slots needed after the loop
    device: torch.device
    literals: dict[tuple, dict[int, float]] = field(default_factory=dict)
    lifts: dict[tuple, set[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class PassRecord:
    name: str
    seconds: float
    summary: str


Pass = Callable[[LoopPlan | None, PassInput], tuple[LoopPlan, str]]


def plan(loop: LoopPlan | None, given: PassInput) -> tuple[LoopPlan, str]:
    new = plan_loop(loop_steps(given.trace), given.needed, given.lifts, gather=True)
    return new, (f"{len(new.variants)} step graph(s) for {new.num_steps} steps, "
                 f"{sum(len(v.tables) for v in new.variants)} per-step table(s)")


def lift_literals(loop: LoopPlan, given: PassInput) -> tuple[LoopPlan, str]:
    """A float that differs from the first plan of the same structure (a new guidance scale) is lifted: this plan
    compiles once more, and every later value reuses its code."""
    new_positions = 0
    for v in loop.variants:
        first = given.literals.setdefault(v.signature, v.literals)
        lifted = given.lifts.setdefault(v.signature, set())
        new = {k for k, value in v.literals.items() if k in first and first[k] != value} - lifted
        lifted |= new
        new_positions += len(new)
    if not new_positions:
        return loop, "no new literal"
    new = plan_loop(loop_steps(given.trace), given.needed, given.lifts, gather=True)
    return new, f"{new_positions} float(s) lifted"


def fuse_kernels(loop: LoopPlan, given: PassInput) -> tuple[LoopPlan, str]:
    from .fused_kernels import (
        fuse_loop_kernels,  # imports Triton: only where the kernels can run
    )

    new, calls = fuse_loop_kernels(loop, given.device)
    return new, f"{calls} guided update(s) as fused kernels"


def place_tables(loop: LoopPlan, given: PassInput) -> tuple[LoopPlan, str]:
    """Tables live on the loop's device (no host scalars per step); a table's length N is an unbacked size, so one
    compiled loop serves every N."""
    variants = [dataclasses.replace(v, tables=[_unbacked_rows(t.to(given.device)) for t in v.tables])
                for v in loop.variants]
    count = sum(len(v.tables) for v in variants)
    return dataclasses.replace(loop, variants=variants), f"{count} table(s) on {given.device.type}"


def _unbacked_rows(table: torch.Tensor) -> torch.Tensor:
    torch._dynamo.decorators.mark_unbacked(table, 0)
    return table


def passes_for(fused_kernels: bool) -> list[tuple[str, Pass]]:
    """The passes of a plan, in order."""
    return [("plan", plan), ("lift literals", lift_literals), *([("fuse kernels", fuse_kernels)] if fused_kernels
                                                                else []), ("place tables", place_tables)]


def run_passes(given: PassInput, passes: list[tuple[str, Pass]]) -> tuple[LoopPlan, list[PassRecord]]:
    """The passes in order: the final plan and a record of each. ``Unsupported`` (the loop cannot be compiled
    this way) is raised again with the pass named; any other error (a bug) goes on with a note naming it."""
    loop, records = None, []
    for name, run in passes:
        start = time.perf_counter()
        try:
            loop, summary = run(loop, given)
        except Unsupported as e:
            raise Unsupported(f"{e.reason} (pass {name!r})", e.block, e.where, e.kind) from e
        except Exception as e:
            e.add_note(f"raised in loopgraph pass {name!r}")
            raise
        records.append(PassRecord(name, time.perf_counter() - start, summary))
    return loop, records
