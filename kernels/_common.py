"""What the fused-update kernels share: the precondition checks, table strides and the torch reference's row read.

Every kernel reads the step counter ``i`` from a device tensor and its per-step coefficients from 1-D tables
at row ``i``, so no host scalar enters a launch and one captured launch serves every step. A table is
``[N]`` (a value per step, read at ``i``) or ``[1]`` (one value for every step, read with stride 0).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_SIZE = 1024
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MAX_ELEMENTS = 2**31 - 1  # the kernels index with int32 offsets
# Triton reads TRITON_INTERPRET when @triton.jit decorates a kernel, i.e. when these modules are imported.
INTERPRETED = bool(triton.knobs.runtime.interpret)


def table_stride(table: torch.Tensor) -> int:
    """Row stride of a coefficient table: 0 for a ``[1]`` table shared by all steps."""
    return 0 if table.shape[0] == 1 else table.stride(0)


def check_inputs(
    op: str,
    latents: torch.Tensor,
    pred_uncond: torch.Tensor,
    pred_cond: torch.Tensor,
    tables: dict[str, torch.Tensor],
    step: torch.Tensor,
    out: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check a fused update's arguments; return ``(latents, pred_uncond, pred_cond, out)`` ready to launch.

    Inputs that are not contiguous are made contiguous; ``out`` (allocated when None) must be contiguous. It may
    be ``latents`` itself (an in-place update): each element is read before it is written, by the same program.
    """
    tensors = {"latents": latents, "pred_uncond": pred_uncond, "pred_cond": pred_cond, **tables, "step": step}
    for name, value in tensors.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    if latents.dtype not in _DTYPES:
        raise TypeError(f"{op}: latents must be float32, float16 or bfloat16, got {latents.dtype}")
    for name, pred in (("pred_uncond", pred_uncond), ("pred_cond", pred_cond)):
        if pred.shape != latents.shape or pred.dtype != latents.dtype:
            raise ValueError(f"{op}: {name} must have the latents' shape and dtype {tuple(latents.shape)} "
                             f"{latents.dtype}, got {tuple(pred.shape)} {pred.dtype}")
    for name, table in tables.items():
        if table.ndim != 1 or table.shape[0] < 1 or not table.is_floating_point():
            raise ValueError(f"{op}: table {name!r} must be a 1-D floating tensor ([N] per step or [1] for all "
                             f"steps), got shape {tuple(table.shape)} {table.dtype}")
    if step.numel() != 1 or step.dtype != torch.int64:
        raise ValueError(f"{op}: step must be a one-element int64 tensor (the device step counter), got shape "
                         f"{tuple(step.shape)} {step.dtype}")
    elsewhere = ", ".join(f"{name} on {value.device}" for name, value in tensors.items()
                          if value.device != latents.device)
    if elsewhere:
        raise ValueError(f"{op}: every tensor must be on the latents' device {latents.device}, got {elsewhere} "
                         f"(keep the tables and the step counter on the device)")
    if latents.device.type != "cuda" and not INTERPRETED:
        raise RuntimeError(f"{op}: Triton kernels need a CUDA device, got {latents.device}. To run them on CPU, "
                           f"set TRITON_INTERPRET=1 before loopgraph.kernels is imported")
    if latents.numel() > _MAX_ELEMENTS:
        raise ValueError(f"{op}: {latents.numel()} elements is more than the kernel's int32 offsets address")
    if out is None:
        out = torch.empty_like(latents, memory_format=torch.contiguous_format)
    elif out.shape != latents.shape or out.dtype != latents.dtype or out.device != latents.device:
        raise ValueError(f"{op}: out must match latents {tuple(latents.shape)} {latents.dtype} {latents.device}, "
                         f"got {tuple(out.shape)} {out.dtype} {out.device}")
    elif not out.is_contiguous():
        raise ValueError(f"{op}: out must be contiguous (the kernel writes it as a flat buffer)")
    return latents.contiguous(), pred_uncond.contiguous(), pred_cond.contiguous(), out


@triton.jit
def cfg_combine(uncond, cond, scale, DTYPE: tl.constexpr):
    """``uncond + scale * (cond - uncond)`` in float32, rounded to ``DTYPE`` after each op.

    The eager guider runs in the model's dtype and the scheduler upcasts its result: rounding the same way keeps
    a fused half-precision step within compile_loop's check of the unfused one (the prediction is multiplied by
    dt, up to ~15 on the first Euler step, so one extra rounding of it would show).
    """
    diff = (cond - uncond).to(DTYPE).to(tl.float32)
    scaled = (scale * diff).to(DTYPE).to(tl.float32)
    return (uncond + scaled).to(DTYPE).to(tl.float32)


def cfg_combine_reference(uncond: torch.Tensor, cond: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``cfg_combine`` in plain torch: float32 in, float32 out, rounded to the inputs' dtype after each op."""
    dtype = uncond.dtype
    diff = (cond.to(torch.float32) - uncond.to(torch.float32)).to(dtype).to(torch.float32)
    scaled = (scale * diff).to(dtype).to(torch.float32)
    return (uncond.to(torch.float32) + scaled).to(dtype).to(torch.float32)


def grid(n_elements: int):
    """One program per ``BLOCK_SIZE`` elements (the launch grid of every fused update)."""
    return lambda meta: (triton.cdiv(n_elements, meta["BLOCK_SIZE"]),)


def row(table: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """The torch references' read of a coefficient: ``table[i]`` in float32 (``table[0]`` for a ``[1]`` table)."""
    index = step.reshape(()) if table.shape[0] > 1 else torch.zeros((), dtype=torch.int64, device=table.device)
    return table[index].to(torch.float32)


def fake_update(latents: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
    """Shape-only implementation of the ops for tracing: the result is a new tensor like ``latents``.

    Registered in place of triton_op's default (the wrapper itself, run on fake tensors), which the Triton
    interpreter cannot run; on CUDA Inductor still sees the kernel through triton_op's functional decomposition.
    """
    return torch.empty_like(latents, memory_format=torch.contiguous_format)
