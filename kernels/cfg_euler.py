"""Classifier-free guidance fused with the Euler update in sigma space (epsilon prediction), in one pass.

    pred = uncond + scale[i] * (cond - uncond)       # ClassifierFreeGuidance.__call__
    x0   = latents - sigma[i] * pred                  # EulerScheduler.step, in its order of operations
    out  = latents + (latents - x0) / sigma[i] * dt[i]        dt[i] = sigma[i+1] - sigma[i]

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

__all__ = ["cfg_euler_kernel", "cfg_euler", "cfg_euler_reference"]


@triton.jit
def cfg_euler_kernel(
    latents_ptr, uncond_ptr, cond_ptr, out_ptr,
    scale_ptr, sigma_ptr, dt_ptr, step_ptr,
    stride_scale, stride_sigma, stride_dt,
    n_elements,
    BLOCK_SIZE: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    i = tl.load(step_ptr)  # the device step counter: no host scalar in the launch
    scale = tl.load(scale_ptr + i * stride_scale).to(tl.float32)
    sigma = tl.load(sigma_ptr + i * stride_sigma).to(tl.float32)
    dt = tl.load(dt_ptr + i * stride_dt).to(tl.float32)
    x = tl.load(latents_ptr + offs, mask=mask).to(tl.float32)
    uncond = tl.load(uncond_ptr + offs, mask=mask).to(tl.float32)
    cond = tl.load(cond_ptr + offs, mask=mask).to(tl.float32)
    pred = cfg_combine(uncond, cond, scale, out_ptr.dtype.element_ty)
    x0 = x - sigma * pred
    # (x - x0) / sigma is pred up to rounding; kept as the scheduler writes it so results match it
    derivative = (x - x0) / sigma
    tl.store(out_ptr + offs, (x + derivative * dt).to(out_ptr.dtype.element_ty), mask=mask)


def cfg_euler(
    latents: torch.Tensor,
    pred_uncond: torch.Tensor,
    pred_cond: torch.Tensor,
    scale: torch.Tensor,
    sigma: torch.Tensor,
    dt: torch.Tensor,
    step: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One guided Euler (sigma space) step; see the module docstring for the formula.

    Args:
        latents, pred_uncond, pred_cond: same shape, dtype (float32/float16/bfloat16) and device.
        scale, sigma, dt: 1-D tables, ``[N]`` (read at row ``i``) or ``[1]`` (the same value every step).
        step: one-element int64 tensor holding ``i``, on the latents' device.
        out: where to write (``out=latents`` updates in place); a new tensor when None.

    Returns:
        ``out``.
    """
    latents, pred_uncond, pred_cond, out = check_inputs(
        "cfg_euler", latents, pred_uncond, pred_cond, {"scale": scale, "sigma": sigma, "dt": dt}, step, out)
    n = latents.numel()
    if n:
        wrap_triton(cfg_euler_kernel)[grid(n)](
            latents, pred_uncond, pred_cond, out, scale, sigma, dt, step,
            table_stride(scale), table_stride(sigma), table_stride(dt), n, BLOCK_SIZE=BLOCK_SIZE)
    return out


def cfg_euler_reference(latents, pred_uncond, pred_cond, scale, sigma, dt, step) -> torch.Tensor:
    """``cfg_euler`` in plain torch (float32 math, result in the latents' dtype)."""
    x = latents.to(torch.float32)
    pred = cfg_combine_reference(pred_uncond, pred_cond, row(scale, step))
    x0 = x - row(sigma, step) * pred
    return (x + (x - x0) / row(sigma, step) * row(dt, step)).to(latents.dtype)


@triton_op("loopgraph::cfg_euler", mutates_args=())
def _cfg_euler_op(latents: torch.Tensor, pred_uncond: torch.Tensor, pred_cond: torch.Tensor,
                  scale: torch.Tensor, sigma: torch.Tensor, dt: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return cfg_euler(latents, pred_uncond, pred_cond, scale, sigma, dt, step)


_cfg_euler_op.register_fake(fake_update)
