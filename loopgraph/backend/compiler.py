"""The one place loopgraph compiles: ``torch.compile`` with scoped Inductor options, or the persistent cache's
AOTInductor packages (backend/artifacts.py); the compile counter, the key of compiled code and the (bounded) in-process
cache of it."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Callable

import torch

from ..config import CODE_CACHE_FACTOR, SEPARATE_HOST_BUILD_OPS, CompileConfig
from ..passes.loop_plan import LoopPlan
from .artifacts import Artifact
from .disk_cache import open_store
from .lower import lower, module_ops, named_function, run_step, op_count
from .programs import SegmentProgram, StepProgram, WholeLoopProgram

__all__ = ["Backend", "CompileCounter", "compile_key"]


class CompileCounter:
    """Counts backend compilations (each Dynamo frame handed to the backend) and the seconds they took."""

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0
        self.loaded = 0   # compiled code loaded from the persistent cache instead


class Backend:
    """A compiled loop's backend: compiles functions with the configured backend, counts compilations, keeps
    the compiled code of its plans (bounded, least recently used out) and, on CUDA, the graphs' memory pool."""

    def __init__(self, config: CompileConfig) -> None:
        self.config = config
        self.counter = CompileCounter()
        self.code: OrderedDict[Any, Callable] = OrderedDict()
        self.bound = CODE_CACHE_FACTOR * config.max_plans
        self._pool = None
        # the persistent cache (backend/disk_cache.py): Inductor's code only (the other backends are for debugging)
        self.store = open_store(config.cache) if config.backend == "inductor" else None
        self.label = ""   # the loop's name in log lines and cache entries (set by CompiledLoop)

    # -- what a plan runs ------------------------------------------------------------------------------------
    def whole_loop(self, loop: LoopPlan, device: torch.device) -> Callable:
        """The lowered loop, ``(buffers, invariants, tables, ends, start) -> None`` (lower.lower)."""
        ops = op_count(loop)
        return self._stored(WholeLoopProgram(loop), device, lambda: self.compile(lower(loop), device, ops))

    def step(self, module: torch.fx.GraphModule, whole_tables: bool, device: torch.device, ops: int) -> Callable:
        """One step at a device counter, ``(carried, invariants, tables, i) -> outputs`` (backend/cudagraph.py)."""
        def in_process():
            def loop_step(carried, invariants, tables, i):
                return run_step(module, whole_tables, carried, invariants, tables, i)

            return self.compile(named_function(loop_step, "loop_step"), device, ops)

        return self._stored(StepProgram(module, whole_tables), device, in_process)

    def segment_step(self, module: torch.fx.GraphModule, device: torch.device) -> Callable:
        """A compiled segment's step graph, ``(*inputs, *rows) -> outputs`` (runtime/eager_segments.py)."""
        return self._stored(SegmentProgram(module), device, lambda: self.compile(module, device, module_ops(module)))

    def _stored(self, program, device: torch.device, in_process: Callable[[], Callable]) -> Callable:
        if self.store is None:
            return in_process()
        from torch._inductor import list_mode_options

        options = list_mode_options(self.config.mode) if self.config.mode else {}
        return Artifact(program, self.store, options, device, self.counter, in_process, self.label)

    def compile(self, fn: Callable, device: torch.device, ops: int = 0) -> Callable:
        """``fn`` compiled (lazily, on its first call). ``ops`` is the number of ops ``fn`` runs over all its
        step bodies: it decides how the C++ host code is built."""
        counter = self.counter
        if self.config.backend == "inductor":
            from torch._inductor import config as inductor_config
            from torch._inductor import list_mode_options
            from torch._inductor.compile_fx import compile_fx

            # cpp_wrapper: the host code that drives the kernels (and the while loops) is C++, not Python
            cpu = device.type == "cpu"
            options = {**(list_mode_options(self.config.mode) if self.config.mode else {}), "cpp_wrapper": cpu,
                       "cpp_wrapper_build_separate": cpu and ops > SEPARATE_HOST_BUILD_OPS}

            def backend_fn(gm, example_inputs):
                counter.count += 1
                with inductor_config.patch(options):
                    return compile_fx(gm, example_inputs)
        else:
            from torch._dynamo.backends.registry import lookup_backend

            named = lookup_backend(self.config.backend)

            def backend_fn(gm, example_inputs):
                counter.count += 1
                return named(gm, example_inputs)

        compiled = torch.compile(fn, backend=backend_fn, fullgraph=True, dynamic=False)

        def call(*args):
            before = counter.count
            start = time.perf_counter()
            out = compiled(*args)
            if counter.count != before:
                counter.seconds += time.perf_counter() - start
            return out

        call.origin = "compiled in this process (torch.compile; the persistent cache is off)"
        return call

    def cached(self, key: tuple) -> Callable | None:
        fn = self.code.get(key)
        if fn is not None:
            self.code.move_to_end(key)
        return fn

    def keep(self, key: tuple, fn: Callable) -> None:
        self.code[key] = fn
        self.code.move_to_end(key)
        while len(self.code) > self.bound:
            self.code.popitem(last=False)

    def graph_pool(self):
        """The memory pool every CUDA graph of this loop shares."""
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        return self._pool


def compile_key(loop: LoopPlan, input_specs: list, held: set[int]) -> tuple:
    """What compiled code a plan can share with another: the step graphs (structure and baked literals), the
    runs, the input and table specs (any N: one key), and the constants the code reads. Constants the traced
    call read from the components (``held``: parameters, buffers, a scheduler's tables) are the objects the code
    reads: by identity. Others (made during the call) by content, so a re-plan finds the same code."""
    consts = tuple(
        (name, "id", id(t)) if isinstance(t, torch.nn.Parameter) or id(t) in held or t.numel() > 1 << 16
        else (name, t.dtype, tuple(t.shape), hash(tuple(t.flatten().tolist())))
        for v in loop.variants for name, t in [*v.module.named_parameters(), *v.module.named_buffers()])
    return (tuple(v.module.code for v in loop.variants), tuple(v.whole_tables for v in loop.variants),
            tuple(v for v, _, _ in loop.runs), tuple(map(str, input_specs)), consts,
            tuple(tuple((t.shape[1:], t.dtype) for t in v.tables) for v in loop.variants))
