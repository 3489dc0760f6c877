"""Lower a plan to one whole-loop function and compile it once.

The lowered function runs every step of the plan: each *run* of consecutive steps that share a variant is a
``torch.while_loop`` whose body reads its per-step table rows at a device-side counter ``i`` and calls the
variant's fused step. The run bounds and the tables are inputs, so a new N with the same run pattern reuses
the compiled code. On CPU, Inductor with ``cpp_wrapper`` turns each while_loop into a C++ loop: no Python
per step. (CUDA: the whole-loop CUDA graph, cudagraph.py.)

The loop state lives in preallocated buffers (``StateBuffers``): the caller's values are copied in, the
compiled loop starts from them and writes its final state back into them in place, and the results are
cloned out, so users never hold a buffer that the next call overwrites.
"""

from __future__ import annotations

import time
import types
from typing import Callable

import torch
from torch._higher_order_ops.while_loop import while_loop

from .analysis import LoopPlan

__all__ = ["lower", "compile_fn", "CompileCounter", "StateBuffers", "SEPARATE_HOST_BUILD_OPS", "WHOLE_TABLES",
           "module_ops", "op_count"]

# GraphModule.meta flag set by kernel_pass: the step takes whole tables and the counter, not table rows.
WHOLE_TABLES = "loopgraph.whole_tables"


def _row(table: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    # table: [N, *shape], i: [] int64 -> [*shape]; index_select keeps the index a tensor (no .item()).
    return torch.index_select(table, 0, i.reshape(1)).reshape(table.shape[1:])


def _repeated_outputs(module: torch.fx.GraphModule) -> list[int]:
    """Positions of a step's outputs that repeat an earlier output (the same graph value)."""
    (output,) = [n for n in module.graph.nodes if n.op == "output"]
    values = list(output.args[0])
    return [k for k, value in enumerate(values) if value in values[:k]]


def _distinct_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` that Inductor does not merge with ``t``: Inductor's C++ wrapper (torch 2.13) crashes on a
    while_loop body that returns one value as two carried outputs, even as two ``clone()``s or two fresh buffers
    it copies into (it merges them)."""
    return t | False if t.dtype == torch.bool else t * 1


def _carried_like(carried: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A step's output as the next step's carried value, in a fresh buffer with the carried value's strides: a
    while_loop body must return what it was given, and a step may change the memory format (a convolution of
    transposed latents). Another dtype is left to fail the while_loop's check (then the plan runs eagerly):
    casting it back would hide a dtype eager's loop changes."""
    if out.dtype != carried.dtype or out.shape != carried.shape:
        return out.clone()
    return torch.empty_strided(carried.shape, carried.stride(), dtype=carried.dtype, device=carried.device).copy_(out)


def lower(plan: LoopPlan) -> Callable:
    """The whole loop as a function ``(buffers, invariants, tables, ends, start) -> None``.

    ``buffers``/``invariants`` follow ``plan.state_slots``/``plan.invariant_slots``: the loop starts from the
    buffers' values and writes its final state back into them in place. ``tables[v]`` are variant v's lifted
    tables; ``ends[r]`` is run r's end step (an int64 tensor).
    """
    modules = [v.module for v in plan.variants]
    whole_tables = [m.meta.get(WHOLE_TABLES, False) for m in modules]
    pattern = [v for v, _, _ in plan.runs]
    repeated = [_repeated_outputs(m) for m in modules]

    def whole_loop(buffers: list[torch.Tensor], invariants: list[torch.Tensor],
                   tables: list[list[torch.Tensor]], ends: torch.Tensor, start: torch.Tensor):
        i, state = start, list(buffers)
        for r, v in enumerate(pattern):
            end, step, vt = ends[r], modules[v], tables[v]

            def cond(i, *carried, end=end):
                return i < end

            def body(i, *carried, step=step, vt=vt, whole=whole_tables[v], repeated=repeated[v]):
                rows = [*vt, i] if whole else [_row(t, i) for t in vt]
                out = list(step(*carried, *invariants, *rows))
                for k in repeated:  # one value for two slots (inputs that are one tensor, `y = x`)
                    out[k] = _distinct_copy(out[k])
                return (i + 1, *[_carried_like(c, o) for c, o in zip(carried, out)])

            i, *state = while_loop(cond, body, (i, *state))
        for buffer, final in zip(buffers, state):
            buffer.copy_(final)

    # Dynamo caches compiled code per code object: a fresh code object per lowering keeps every compiled
    # loop's cache entries (and recompile limit) its own instead of piling up on one shared function.
    global _lowered
    _lowered += 1
    code = whole_loop.__code__.replace(co_name=f"whole_loop_{_lowered}")
    return types.FunctionType(code, whole_loop.__globals__, code.co_name, None, whole_loop.__closure__)


_lowered = 0


def op_count(plan: LoopPlan) -> int:
    """The ops of the lowered loop: each run's while_loop body holds its variant's step graph."""
    return sum(module_ops(plan.variants[v].module) for v, _, _ in plan.runs)


def module_ops(module: torch.fx.GraphModule) -> int:
    return sum(1 for n in module.graph.nodes if n.op == "call_function")


class StateBuffers:
    """A compiled lowered loop run on preallocated state buffers, called as ``(state, ...) -> state``.

    One set of buffers per state signature (shapes, strides, dtypes, devices), allocated on first use and
    reused by every later call: the caller's values are copied in, the compiled loop updates the buffers in
    place, and the final values are cloned out.
    """

    def __init__(self, compiled: Callable) -> None:
        self.compiled = compiled
        self.buffers: dict[tuple, list[torch.Tensor]] = {}

    def __call__(self, state: list[torch.Tensor], invariants, tables, ends: torch.Tensor, start: torch.Tensor):
        key = tuple((t.shape, t.stride(), t.dtype, t.device) for t in state)
        buffers = self.buffers.get(key)
        if buffers is None:
            buffers = self.buffers[key] = [torch.empty_like(t) for t in state]
        for buffer, value in zip(buffers, state):
            buffer.copy_(value)
        self.compiled(buffers, invariants, tables, ends, start)
        return [b.clone() for b in buffers]


class CompileCounter:
    """Counts backend compilations (each Dynamo frame handed to the backend)."""

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0


# Above this many ops in one compiled function, its C++ host code is built at -O1, apart from the kernels
# (which keep -O3). g++ -O3 on SDXL's loop (1,462 ops: one ~7,700-line host function) ran for more than
# 40 minutes; built apart it takes about a minute. Small loops keep one -O3 build: their host code runs
# every step, and the default loop called 3-6% faster with it (timed by hand, not a recorded run).
SEPARATE_HOST_BUILD_OPS = 1000


def compile_fn(fn: Callable, *, backend: str, mode: str | None, counter: CompileCounter,
               device: torch.device, ops: int = 0) -> Callable:
    """The one place loopgraph calls ``torch.compile``: scoped Inductor options, compile counting.

    ``ops`` is the number of ops ``fn`` runs (over all its step bodies): it decides how the host code is built.
    """
    if backend == "inductor":
        from torch._inductor import config as inductor_config
        from torch._inductor import list_mode_options
        from torch._inductor.compile_fx import compile_fx

        # cpp_wrapper: the host code that drives the kernels (and the while loops) is C++, not Python
        cpu = device.type == "cpu"
        options = {**(list_mode_options(mode) if mode else {}), "cpp_wrapper": cpu,
                   "cpp_wrapper_build_separate": cpu and ops > SEPARATE_HOST_BUILD_OPS}

        def backend_fn(gm, example_inputs):
            counter.count += 1
            with inductor_config.patch(options):
                return compile_fx(gm, example_inputs)
    else:
        from torch._dynamo.backends.registry import lookup_backend

        named = lookup_backend(backend)

        def backend_fn(gm, example_inputs):
            counter.count += 1
            return named(gm, example_inputs)

    compiled = torch.compile(fn, backend=backend_fn, fullgraph=True, dynamic=False)
    return _timed(compiled, counter)


def _timed(compiled: Callable, counter: CompileCounter) -> Callable:
    def call(*args):
        before = counter.count
        start = time.perf_counter()
        out = compiled(*args)
        if counter.count != before:
            counter.seconds += time.perf_counter() - start
        return out

    return call
