"""Classifier-free guidance fused with the flow-matching Euler update (SD3 / Flux style), in one pass.

    pred = uncond + scale[i] * (cond - uncond)       # ClassifierFreeGuidance.__call__
    out  = latents + dt[i] * pred                     # FlowMatchEulerScheduler.step, dt[i] = sigma[i+1] - sigma[i]

``i`` is read from the device step counter, the coefficients from their tables. The math is float32; the
guidance combine is rounded to the latents' dtype after each op, as the eager guider computes it in the model's
dtype, and the result is stored in the latents' dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from ._common import (
    BLOCK_SIZE, cfg_combine, cfg_combine_reference, check_inputs, fake_update, grid, row, table_stride,
)

__all__ = ["cfg_flow_euler_kernel", "cfg_flow_euler", "cfg_flow_euler_reference"]


@triton.jit
def cfg_flow_euler_kernel(
    latents_ptr, uncond_ptr, cond_ptr, out_ptr,
    scale_ptr, dt_ptr, step_ptr,
    stride_scale, stride_dt,
    n_elements,
    BLOCK_SIZE: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    i = tl.load(step_ptr)  # the device step counter: no host scalar in the launch
    scale = tl.load(scale_ptr + i * stride_scale).to(tl.float32)
    dt = tl.load(dt_ptr + i * stride_dt).to(tl.float32)
    x = tl.load(latents_ptr + offs, mask=mask).to(tl.float32)
    uncond = tl.load(uncond_ptr + offs, mask=mask).to(tl.float32)
    cond = tl.load(cond_ptr + offs, mask=mask).to(tl.float32)
    pred = cfg_combine(uncond, cond, scale, out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, (x + dt * pred).to(out_ptr.dtype.element_ty), mask=mask)


def cfg_flow_euler(
    latents: torch.Tensor,
    pred_uncond: torch.Tensor,
    pred_cond: torch.Tensor,
    scale: torch.Tensor,
    dt: torch.Tensor,
    step: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One guided flow-matching Euler step: ``latents + dt[i] * (uncond + scale[i] * (cond - uncond))``.

    Args:
        latents, pred_uncond, pred_cond: same shape, dtype (float32/float16/bfloat16) and device.
        scale, dt: 1-D tables, ``[N]`` (read at row ``i``) or ``[1]`` (the same value every step).
        step: one-element int64 tensor holding ``i``, on the latents' device.
        out: where to write (``out=latents`` updates in place); a new tensor when None.

    Returns:
        ``out``.

    Example:
        >>> x, u, c = torch.randn(3, 4, 8, 8, device="cuda").unbind(0)
        >>> dt = torch.tensor([-0.5, -0.5], device="cuda")
        >>> scale = torch.tensor([4.0], device="cuda")
        >>> y = cfg_flow_euler(x, u, c, scale, dt, torch.tensor(1, device="cuda"))
    """
    latents, pred_uncond, pred_cond, out = check_inputs(
        "cfg_flow_euler", latents, pred_uncond, pred_cond, {"scale": scale, "dt": dt}, step, out)
    n = latents.numel()
    if n:
        wrap_triton(cfg_flow_euler_kernel)[grid(n)](
            latents, pred_uncond, pred_cond, out, scale, dt, step,
            table_stride(scale), table_stride(dt), n, BLOCK_SIZE=BLOCK_SIZE)
    return out


def cfg_flow_euler_reference(latents, pred_uncond, pred_cond, scale, dt, step) -> torch.Tensor:
    """``cfg_flow_euler`` in plain torch (float32 math, result in the latents' dtype)."""
    x = latents.to(torch.float32)
    pred = cfg_combine_reference(pred_uncond, pred_cond, row(scale, step))
    return (x + row(dt, step) * pred).to(latents.dtype)


@triton_op("loopgraph::cfg_flow_euler", mutates_args=())
def _cfg_flow_euler_op(latents: torch.Tensor, pred_uncond: torch.Tensor, pred_cond: torch.Tensor,
                       scale: torch.Tensor, dt: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return cfg_flow_euler(latents, pred_uncond, pred_cond, scale, dt, step)


_cfg_flow_euler_op.register_fake(fake_update)
