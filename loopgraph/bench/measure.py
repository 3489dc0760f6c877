"""What ``loopgraph bench`` measures of each method, and how:

    latency            one call from a fresh state, warm; methods interleaved (the order rotates every
                       round) so drift hits all alike; CUDA calls are bracketed by synchronize
    first call         wall time of each method's first call: its time to a first result (compile_loop: trace,
                       plan, and compile or load from the persistent cache; compile_denoiser: Dynamo + Inductor)
    code               what a method compiled or loaded: a compiled loop's own counts (``stats.compiles``,
                       ``stats.loaded``: the AOTInductor route counts its own); else Dynamo's ``unique_graphs``
                       counter, read around the method's own calls
    compile_s          a compiled loop's ``stats.compile_seconds``; else the wall time of the calls that compiled
                       something, less their steady-state time
    python calls       ``sys.setprofile`` "call" events during one warm call; per step is the slope between
                       the smallest and the largest N of the scaling run (0 means no Python per step)
    peak memory        CUDA: ``max_memory_allocated`` during one call less what was allocated before it;
                       CPU (Linux): growth of the process's peak resident set during one call, measured
                       after ``malloc_trim`` and a reset of the high-water mark
    floor              the bare denoiser (compiled, when ``compile_denoiser`` runs) timed alone on the
                       inputs the loop gives it, times the calls per loop: per-step overhead is what a
                       method spends above it (negative: faster than the model alone, by fusion across the
                       model boundary); the denoiser is the component ``denoiser``, ``unet`` or
                       ``transformer``, or the one ``--denoiser`` names
    cold start         ``--cold-start``: each method's first result in fresh processes (``cold_start.py``)

The interleaving and the scaling run are ``run.py``'s; the rows computed from these measurements, ``report.py``'s.
"""

from __future__ import annotations

import ctypes
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..compile import CompiledLoop
from .methods import NoDenoiser, _denoiser_name

__all__ = ["count_python_calls", "peak_memory"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@dataclass
class _Method:
    """One method in a run: its loop, what its calls measured, and why it is not reported (``failure``)."""

    name: str
    setup: Any
    run: Callable
    times: list[float] = field(default_factory=list)
    first_call_s: float | None = None  # the first call: trace and compile (or load), then run
    compilations: int = 0
    compile_wall: list[float] = field(default_factory=list)  # times of the calls that compiled
    output: torch.Tensor | None = None
    python_calls: dict[int, int] = field(default_factory=dict)
    scaling: dict[int, list[float]] = field(default_factory=dict)
    peak_mem_bytes: int | None = None
    failure: str | None = None
    skipped: bool = False  # not run at all (``failure`` says why): compile_denoiser without a denoiser
    batched_calls: str | None = None
    plan_facts: dict[str, Any] = field(default_factory=lambda: _plan_facts(None))

    def call(self) -> tuple[torch.Tensor, float]:
        """One timed call from a fresh state; counts what it compiled."""
        state = self.setup.new_state()
        device = self.setup.device
        before = _unique_graphs()
        _sync(device)
        start = time.perf_counter()
        out = self.run(state)
        _sync(device)
        seconds = time.perf_counter() - start
        if self.first_call_s is None:
            self.first_call_s = seconds
        compiled = _unique_graphs() - before
        if compiled:
            self.compilations += compiled
            self.compile_wall.append(seconds)
        return out, seconds


def count_python_calls(fn: Callable[[], Any], skip: str | None = None) -> int:
    """Python function calls (``sys.setprofile`` "call" events) while ``fn()`` runs; C calls do not count, nor
    calls of code in files under ``skip`` (a folder). A compiled loop runs in one chunk meanwhile: its chunks follow
    the clock (``CHUNK_SECONDS``), not the steps, so a busy machine would add Python calls per chunk to the count."""
    from ..runtime import executables

    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        calls += event == "call" and not (skip and frame.f_code.co_filename.startswith(skip))

    chunk, executables.CHUNK_SECONDS = executables.CHUNK_SECONDS, 1e9
    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
        executables.CHUNK_SECONDS = chunk
    return calls


_LIBC = None


def _resident(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak bytes a call adds over what was in use before it (see the module docstring); None if unknown."""
    global _LIBC
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    if not sys.platform.startswith("linux"):
        return None
    try:
        _LIBC = _LIBC or ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        base = _resident("VmRSS")
        fn()
        return max(_resident("VmHWM") - base, 0)
    except (OSError, AttributeError):
        return None


def _denoiser_floor(eager: _Method, methods: dict[str, _Method], denoiser: str | None = None) -> dict[str, Any]:
    """Time the bare denoiser on the calls one loop makes; the compiled one when compile_denoiser ran."""
    calls: list[tuple[tuple, dict]] = []
    try:
        model = getattr(eager.setup.components, _denoiser_name(eager.setup, denoiser))
    except NoDenoiser:  # a user loop without a denoiser component: no floor to time
        return {"denoiser": None, "calls_per_loop": 0, "ms_per_loop": None}
    handle = model.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    try:
        eager.run(eager.setup.new_state())
    finally:
        handle.remove()
    compiled = methods.get("compile_denoiser")
    bare = compiled.run.compiled if compiled and not compiled.failure else model
    groups: dict[tuple, list] = {}
    for args, kwargs in calls:
        key = tuple((tuple(v.shape), v.dtype) if torch.is_tensor(v) else type(v).__name__
                    for v in (*args, *kwargs.values()))
        groups.setdefault(key, [args, kwargs, 0])[2] += 1
    device = eager.setup.device
    per_loop = 0.0
    with torch.no_grad():
        for args, kwargs, count in groups.values():
            for _ in range(3):
                bare(*args, **kwargs)
            times = []
            for _ in range(20):
                _sync(device)
                start = time.perf_counter()
                bare(*args, **kwargs)
                _sync(device)
                times.append(time.perf_counter() - start)
            per_loop += count * statistics.median(times)
    return {"denoiser": "compiled" if bare is not model else "eager", "calls_per_loop": len(calls),
            "ms_per_loop": per_loop * 1e3}


def _batched_calls(fast) -> str | None:
    """What a compiled loop batched (``CallSite``s), in a few words: "components.denoiser x2 in 20/20 steps"."""
    plan = fast.last_plan if isinstance(fast, CompiledLoop) else None
    if plan is None or fast.config.batch_guidance is False:
        return None
    steps = plan.program.num_steps if plan.program else 0
    parts = [f"{s.module} x{s.calls} in {len(s.batched_steps)}/{steps} steps" for s in plan.batching if s.batched_steps]
    parts += [f"{s.module} apart: {s.reason}" for s in plan.batching if not s.batched_steps]
    return "; ".join(parts) or "none"


def _plan_facts(fast) -> dict[str, Any]:
    """What explains a compiled loop's result, from what ``explain()`` says: how it runs (``runs_as``), its step
    graphs, the blocks that run eagerly and why (None for a method that is not a compiled loop)."""
    plan = fast.last_plan if isinstance(fast, CompiledLoop) else None
    if plan is None:
        return {"runs_as": None, "step_graphs": None, "eager_blocks": None, "eager_reasons": None}
    return {"runs_as": plan.kind, "step_graphs": fast.stats.step_graphs, "eager_blocks": fast.stats.eager_blocks,
            "eager_reasons": list(plan.problems)}
