"""Is a compiled result eager's? The one comparison every check uses (plans, segments, the bench, the tests)."""

from __future__ import annotations

import torch

__all__ = ["tolerance", "max_error", "matches_eager", "check_slots"]


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """The tolerance by dtype (fp32: rtol 1e-4, atol 1e-5)."""
    return {torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}.get(
        dtype, dict(rtol=1e-4, atol=1e-5))


def max_error(value: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest absolute difference, in float32."""
    return (value.float() - expected.float()).abs().max().item() if expected.numel() else 0.0


def matches_eager(value: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether a compiled result is eager's up to float rounding: its largest difference from ``expected`` is
    within ``atol + rtol * max|expected|`` (``tolerance`` of expected's dtype).

    Scaled by the tensor's largest magnitude, not element by element: Inductor's reassociated float math
    alone (``torch.compile`` of SDXL's UNet, nothing of loopgraph) leaves 4.4e-5 on 8-step latents of
    magnitude 11, which fails an elementwise 1e-4/1e-5 on small elements. A wrong table row or a baked
    value moves the result by orders of magnitude more.
    """
    if value.shape != expected.shape or value.dtype != expected.dtype:
        return False
    tol = tolerance(expected.dtype)
    scale = expected.float().abs().max().item() if expected.numel() else 0.0
    return max_error(value, expected) <= tol["atol"] + tol["rtol"] * scale


def check_slots(what: str, got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor | None]) -> None:
    """Raise naming ``what`` and the first slot whose compiled value is not eager's (None expected: not compared)."""
    for name, value in got.items():
        want = expected.get(name)
        if want is not None and not matches_eager(value, want):
            raise RuntimeError(f"{what} differs from eager on slot {name!r} (max abs error "
                               f"{max_error(value, want):.3g})")
