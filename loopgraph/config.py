"""Options of ``compile_loop`` and the engine's limits, in one place.

Every option is a field of ``CompileConfig``, written once: ``compile_loop(wrapper, backend="eager")`` and
``compile_loop(wrapper, CompileConfig(backend="eager"))`` are the same. ``"auto"`` options are resolved once per
device by ``CompileConfig.resolve``. The engine's fixed limits are the constants below.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = ["CompileConfig", "Resolved", "LoopStats", "LIFT_MAX_NUMEL", "SEPARATE_HOST_BUILD_OPS",
           "CODE_CACHE_FACTOR"]

BACKENDS = ("inductor", "eager", "aot_eager")
RNG_MODES = ("eager", "counter")

# Per-step constant tensors up to this many elements are lifted into N-row tables; larger ones stay baked.
LIFT_MAX_NUMEL = 1 << 16

# Above this many ops in one compiled function, its C++ host code is built at -O1, apart from the kernels
# (which keep -O3). g++ -O3 on SDXL's loop (1,462 ops: one ~7,700-line host function) ran for more than
# 40 minutes, and on its batched loop (742 ops, ~11,500 lines) for more than 8; built apart either takes about
# a minute. Small loops keep one -O3 build: their host code runs every step, and the default loop (297 ops
# batched, 567 not) called 3-6% faster with it (timed by hand, not a recorded run).
SEPARATE_HOST_BUILD_OPS = 600

# Compiled code kept per compiled loop: this many times ``max_plans`` (plans share code; an evicted plan's code
# stays until it is the least recently used of this many).
CODE_CACHE_FACTOR = 2


@dataclass(frozen=True)
class CompileConfig:
    """Options of ``compile_loop``: see its docstring for each."""

    backend: str = "inductor"
    mode: str | None = None
    strict: bool = False
    cuda_graphs: bool | str = "auto"
    static_shapes: bool = False
    check: bool = True
    fused_kernels: bool | str = "auto"
    rng: str = "eager"
    # Plans kept per compiled loop (most recently used first to stay): a sweep over guidance scales or prompts
    # of new shapes re-plans an evicted one with one traced eager call; its compiled code is kept apart.
    max_plans: int = 16
    # One model call per step for all guidance batches (passes/batching.py): "auto" batches the repeated calls whose
    # batched call was verified while tracing; True also warns about those left apart; False never batches.
    batch_guidance: bool | str = "auto"
    # The persistent cache of compiled loops (backend/disk_cache.py, backend/artifacts.py): True:
    # $LOOPGRAPH_CACHE_DIR (an empty string: off), else the user cache directory; a folder; False: compile in this
    # process only (torch.compile).
    cache: bool | str | os.PathLike = True
    # Python floats the traced call read that only feed tensor arithmetic (a guidance scale) become inputs of the
    # compiled loop, guarded by type (trace/floats.py); False: every float the call read is guarded by value.
    lift_floats: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"compile_loop: backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.mode is not None and self.backend != "inductor":
            raise ValueError(f"compile_loop: mode={self.mode!r} needs backend='inductor'")
        for name in ("cuda_graphs", "fused_kernels", "batch_guidance"):
            if getattr(self, name) not in (True, False, "auto"):
                raise ValueError(f"compile_loop: {name} must be True, False or 'auto', got {getattr(self, name)!r}")
        if self.rng not in RNG_MODES:
            raise ValueError(f"compile_loop: rng must be one of {RNG_MODES}, got {self.rng!r}")
        if not isinstance(self.cache, (bool, str, os.PathLike)) or isinstance(self.cache, str) and not self.cache:
            raise ValueError(f"compile_loop: cache must be True, False or a folder, got {self.cache!r}")
        if not isinstance(self.max_plans, int) or self.max_plans < 1:
            raise ValueError(f"compile_loop: max_plans must be a positive int, got {self.max_plans!r}")

    @classmethod
    def of(cls, config: CompileConfig | None, options: dict) -> CompileConfig:
        """``config`` (or the defaults) with ``options`` replacing its fields; an unknown option is a TypeError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"compile_loop: unknown option(s) {unknown}; the options are {sorted(known)}")
        return dataclasses.replace(config or cls(), **options)

    def resolve(self, device: torch.device) -> Resolved:
        """The ``"auto"`` options as they apply to a loop on ``device``."""
        cuda = device.type == "cuda"
        return Resolved(
            cuda_graphs=cuda and self.cuda_graphs is not False and self.backend == "inductor",
            fused_kernels=self.fused_kernels is True or (self.fused_kernels == "auto" and cuda))


class Resolved(NamedTuple):
    cuda_graphs: bool      # the whole loop as one CUDA graph
    fused_kernels: bool    # guidance + scheduler updates as fused Triton kernels (passes/fused_kernels.py)


@dataclass
class LoopStats:
    compiles: int = 0          # backend compilations (Dynamo frames handed to the backend)
    step_graphs: int = 0       # distinct fused step graphs (variants) over all plans
    eager_blocks: int = 0      # blocks that run eagerly (data-dependent Python, unsupported ops)
    segment_calls: int = 0     # compiled segment calls (loops with eager blocks: per step, per segment)
    calls: int = 0
    compiled_calls: int = 0
    plans: int = 0
    plan_seconds: float = 0.0
    compile_seconds: float = 0.0
    loaded: int = 0            # compiled code loaded from the persistent cache instead of compiled (disk_cache.py)
    guard_seconds: float = 0.0  # checking the plans' guards, over all calls (the cost of never a wrong plan)
