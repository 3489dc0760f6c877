"""CUDA: the whole N-step loop as one CUDA graph.

Each step graph (variant) is compiled once by Inductor and reads its per-step table rows at a device step
counter. The N steps are then captured once, in order, into one CUDA graph per (plan structure, N):

    capture   counter.zero_(); for every step: state = step(state, invariants, tables, counter); counter += 1
    replay    copy the caller's tensors into the static inputs, one graph launch, clone the outputs out

so a warm call is a few copies and one launch, and users never hold an alias of a static buffer. Graphs of
one ``CompiledLoop`` share a memory pool. Anything that cannot be captured (a host sync, a CPU tensor in
the step) makes that loop run its compiled steps one by one, with a warning saying why.

Not validated on a GPU in this repository's CI (no GPU there): see docs/how-compile-loop-works.md.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from ..passes.loop_plan import LoopPlan

__all__ = ["WholeLoopGraph"]


class WholeLoopGraph:
    """Callable like the lowered loop: ``(state, invariants, tables, ends, start) -> state``."""

    def __init__(self, plan: LoopPlan, compile_step: Callable[[torch.fx.GraphModule, bool], Callable], pool):
        """``compile_step(module, whole_tables)``: a variant's step as ``(carried, invariants, tables, i) -> outputs``
        (backend.Backend.step)."""
        self.pattern = [v for v, _, _ in plan.runs]
        self.steps = [compile_step(v.module, v.whole_tables) for v in plan.variants]
        self.pool = pool
        self.graphs: dict[tuple, tuple] = {}
        self.failed: str | None = None

    def _run_steps(self, state, invariants, tables, ends: list[int], counter: torch.Tensor, after=None):
        """The compiled steps one by one (warm-up, capture, and calls that cannot be one launch); ``after(steps
        done, state)`` after each step when given (step callbacks: executables.WholeLoopCudaGraph)."""
        counter.zero_()
        begin = 0
        for v, end in zip(self.pattern, ends):
            for step in range(begin, end):
                state = self.steps[v](state, invariants, tables[v], counter)
                counter.add_(1)
                if after is not None:
                    after(step + 1, state)
            begin = end
        return state

    def step_by_step(self, state, invariants, tables, ends: torch.Tensor, after) -> list[torch.Tensor]:
        """The loop's compiled steps uncaptured, ``after(steps done, state)`` after each: a call that must stop
        between steps (step callbacks), at the cost of Python and launches per step."""
        counter = torch.zeros((), dtype=torch.int64, device=ends.device)
        return self._run_steps(state, invariants, tables, [int(e) for e in ends.tolist()], counter, after)

    def __call__(self, state, invariants, tables, ends: torch.Tensor, start: torch.Tensor):
        ends_host = [int(e) for e in ends.tolist()]  # one host read per call, none per step
        counter = torch.zeros((), dtype=torch.int64, device=start.device)
        if self.failed:
            return self._run_steps(state, invariants, tables, ends_host, counter)
        key = (tuple(ends_host), tuple(id(t) for ts in tables for t in ts))
        if key not in self.graphs:
            try:
                self.graphs[key] = self._capture(state, invariants, tables, ends_host)
            except Exception as error:  # noqa: BLE001 — any capture failure: run the steps uncaptured
                self.failed = f"{type(error).__name__}: {error}"
                warnings.warn(f"compile_loop: the loop could not be captured into one CUDA graph ({self.failed}); "
                              "running its compiled steps one by one (Python per step)", stacklevel=3)
                return self._run_steps(state, invariants, tables, ends_host, counter)
        graph, static_state, static_invariants, outputs, _ = self.graphs[key]
        for dst, src in zip([*static_state, *static_invariants], [*state, *invariants]):
            dst.copy_(src)
        graph.replay()
        return [o.clone() for o in outputs]

    def _capture(self, state, invariants, tables, ends: list[int]):
        """Capture the N steps. The entry keeps alive every tensor the graph reads or writes outside its
        pool: the static inputs, the step counter and the tables (also so that their ids, part of the key,
        cannot be reused by another plan's tables while the graph exists)."""
        static_state = [t.clone() for t in state]
        static_invariants = [t.clone() for t in invariants]
        counter = torch.zeros((), dtype=torch.int64, device=static_state[0].device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm up (compile, allocator, library handles) outside the capture
            self._run_steps(static_state, static_invariants, tables, ends, counter)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = self._run_steps(static_state, static_invariants, tables, ends, counter)
        return graph, static_state, static_invariants, outputs, (counter, tables)
