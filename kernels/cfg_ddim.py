"""Classifier-free guidance fused with the deterministic DDIM update (eta = 0, epsilon prediction), in one pass.

    pred = uncond + scale[i] * (cond - uncond)                       # ClassifierFreeGuidance.__call__
    x0   = (latents - sqrt_beta[i] * pred) / sqrt_alpha[i]           # DDIMScheduler.step
    out  = sqrt_alpha_prev[i] * x0 + dir_coef[i] * pred

with ``a = alphas_cumprod[t]``, ``a_prev = alphas_cumprod[t_prev]``: ``sqrt_beta = sqrt(1 - a)``,
``sqrt_alpha = sqrt(a)``, ``sqrt_alpha_prev = sqrt(a_prev)``, ``dir_coef = sqrt(1 - a_prev - std**2)``
(``std = 0`` when eta = 0).

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

__all__ = ["cfg_ddim_kernel", "cfg_ddim", "cfg_ddim_reference"]


@triton.jit
def cfg_ddim_kernel(
    latents_ptr, uncond_ptr, cond_ptr, out_ptr,
    scale_ptr, sqrt_beta_ptr, sqrt_alpha_ptr, sqrt_alpha_prev_ptr, dir_coef_ptr, step_ptr,
    stride_scale, stride_sqrt_beta, stride_sqrt_alpha, stride_sqrt_alpha_prev, stride_dir_coef,
    n_elements,
    BLOCK_SIZE: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    i = tl.load(step_ptr)  # the device step counter: no host scalar in the launch
    scale = tl.load(scale_ptr + i * stride_scale).to(tl.float32)
    sqrt_beta = tl.load(sqrt_beta_ptr + i * stride_sqrt_beta).to(tl.float32)
    sqrt_alpha = tl.load(sqrt_alpha_ptr + i * stride_sqrt_alpha).to(tl.float32)
    sqrt_alpha_prev = tl.load(sqrt_alpha_prev_ptr + i * stride_sqrt_alpha_prev).to(tl.float32)
    dir_coef = tl.load(dir_coef_ptr + i * stride_dir_coef).to(tl.float32)
    x = tl.load(latents_ptr + offs, mask=mask).to(tl.float32)
    uncond = tl.load(uncond_ptr + offs, mask=mask).to(tl.float32)
    cond = tl.load(cond_ptr + offs, mask=mask).to(tl.float32)
    pred = cfg_combine(uncond, cond, scale, out_ptr.dtype.element_ty)
    x0 = (x - sqrt_beta * pred) / sqrt_alpha
    tl.store(out_ptr + offs, (sqrt_alpha_prev * x0 + dir_coef * pred).to(out_ptr.dtype.element_ty), mask=mask)


def cfg_ddim(
    latents: torch.Tensor,
    pred_uncond: torch.Tensor,
    pred_cond: torch.Tensor,
    scale: torch.Tensor,
    sqrt_beta: torch.Tensor,
    sqrt_alpha: torch.Tensor,
    sqrt_alpha_prev: torch.Tensor,
    dir_coef: torch.Tensor,
    step: torch.Tensor,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One guided DDIM step (eta = 0); see the module docstring for the formula and the tables.

    Args:
        latents, pred_uncond, pred_cond: same shape, dtype (float32/float16/bfloat16) and device.
        scale, sqrt_beta, sqrt_alpha, sqrt_alpha_prev, dir_coef: 1-D tables, ``[N]`` (read at row ``i``) or
            ``[1]`` (the same value every step).
        step: one-element int64 tensor holding ``i``, on the latents' device.
        out: where to write (``out=latents`` updates in place); a new tensor when None.

    Returns:
        ``out``.
    """
    tables = {"scale": scale, "sqrt_beta": sqrt_beta, "sqrt_alpha": sqrt_alpha, "sqrt_alpha_prev": sqrt_alpha_prev,
              "dir_coef": dir_coef}
    latents, pred_uncond, pred_cond, out = check_inputs("cfg_ddim", latents, pred_uncond, pred_cond, tables, step, out)
    n = latents.numel()
    if n:
        wrap_triton(cfg_ddim_kernel)[grid(n)](
            latents, pred_uncond, pred_cond, out, *tables.values(), step,
            *[table_stride(t) for t in tables.values()], n, BLOCK_SIZE=BLOCK_SIZE)
    return out


def cfg_ddim_reference(latents, pred_uncond, pred_cond, scale, sqrt_beta, sqrt_alpha, sqrt_alpha_prev, dir_coef,
                       step) -> torch.Tensor:
    """``cfg_ddim`` in plain torch (float32 math, result in the latents' dtype)."""
    x = latents.to(torch.float32)
    pred = cfg_combine_reference(pred_uncond, pred_cond, row(scale, step))
    x0 = (x - row(sqrt_beta, step) * pred) / row(sqrt_alpha, step)
    return (row(sqrt_alpha_prev, step) * x0 + row(dir_coef, step) * pred).to(latents.dtype)


@triton_op("loopgraph::cfg_ddim", mutates_args=())
def _cfg_ddim_op(latents: torch.Tensor, pred_uncond: torch.Tensor, pred_cond: torch.Tensor, scale: torch.Tensor,
                 sqrt_beta: torch.Tensor, sqrt_alpha: torch.Tensor, sqrt_alpha_prev: torch.Tensor,
                 dir_coef: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return cfg_ddim(latents, pred_uncond, pred_cond, scale, sqrt_beta, sqrt_alpha, sqrt_alpha_prev, dir_coef, step)


_cfg_ddim_op.register_fake(fake_update)
