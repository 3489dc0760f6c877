"""Classifier-free guidance as a stateful guider object, in the idiom of diffusers' guiders.

Per step the denoiser block calls ``set_state(step=i, ...)``; ``prepare_inputs`` then returns one batch
(guidance off: scale 1, outside the guidance window, or disabled) or two (conditional and unconditional),
the model runs once per batch, and ``__call__`` combines the predictions. Whether a step is guided depends
only on the step index and configuration: a schedule-dependent, data-independent branch.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..modular_pipelines.state import BlockState

__all__ = ["ClassifierFreeGuidance"]


class ClassifierFreeGuidance:
    """``pred = uncond + scale * (cond - uncond)`` on steps inside ``[start, stop)`` (fractions of N).

    Args:
        guidance_scale: 1.0 turns guidance off (one model call per step).
        start, stop: the guidance window as fractions of the number of steps.
        guidance_rescale: diffusers' std rescale (0 = off), mixing toward the conditional prediction's std.
    """

    def __init__(self, guidance_scale: float = 5.0, start: float = 0.0, stop: float = 1.0,
                 guidance_rescale: float = 0.0) -> None:
        if not 0.0 <= start <= stop <= 1.0:
            raise ValueError(f"guidance window must satisfy 0 <= start <= stop <= 1, got start={start}, stop={stop}")
        if not 0.0 <= guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {guidance_rescale}")
        self.guidance_scale = float(guidance_scale)
        self.start, self.stop = float(start), float(stop)
        self.guidance_rescale = float(guidance_rescale)
        self._enabled = True
        self._step: int | None = None
        self._num_inference_steps: int | None = None
        self._timestep: torch.Tensor | None = None
        self._count_prepared = 0

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> ClassifierFreeGuidance:
        return cls(**config)

    def enable(self) -> None:
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def set_state(self, step: int, num_inference_steps: int, timestep: torch.Tensor) -> None:
        self._step, self._num_inference_steps, self._timestep = step, num_inference_steps, timestep
        self._count_prepared = 0

    def _is_cfg_enabled(self) -> bool:
        if not self._enabled or math.isclose(self.guidance_scale, 1.0):
            return False
        if self._step is None or self._num_inference_steps is None:
            return True
        first = int(self.start * self._num_inference_steps)
        last = int(self.stop * self._num_inference_steps)
        return first <= self._step < last

    @property
    def num_conditions(self) -> int:
        return 2 if self._is_cfg_enabled() else 1

    def prepare_inputs(self, fields: dict[str, tuple[Any, Any]]) -> list[BlockState]:
        """One ``BlockState`` per model call: ``{name: (cond, uncond)}`` picks the cond or uncond value."""
        names = ["pred_cond", "pred_uncond"][: self.num_conditions]
        batches = []
        for which, identifier in enumerate(names):
            values = {name: pair[which] for name, pair in fields.items()}
            if which == 1 and any(v is None for v in values.values()):
                missing = [name for name, v in values.items() if v is None]
                raise ValueError(
                    f"classifier-free guidance (scale {self.guidance_scale}) needs unconditional inputs for "
                    f"{missing}: pass the negative embeddings or set guidance_scale=1.0"
                )
            batches.append(BlockState(**values, __guidance_identifier__=identifier))
        self._count_prepared += len(batches)
        return batches

    def __call__(self, batches: list[BlockState]) -> torch.Tensor:
        if len(batches) != self.num_conditions:
            raise ValueError(f"expected {self.num_conditions} prediction batches, got {len(batches)}")
        preds = {b["__guidance_identifier__"]: b.noise_pred for b in batches}
        cond = preds["pred_cond"]
        if len(batches) == 1:
            return cond
        # x: [B, C, H, W]
        pred = preds["pred_uncond"] + self.guidance_scale * (cond - preds["pred_uncond"])
        if self.guidance_rescale > 0.0:
            dims = list(range(1, cond.ndim))
            rescaled = pred * (cond.std(dim=dims, keepdim=True) / pred.std(dim=dims, keepdim=True))
            pred = self.guidance_rescale * rescaled + (1.0 - self.guidance_rescale) * pred
        return pred

    def __repr__(self) -> str:
        return (f"ClassifierFreeGuidance(guidance_scale={self.guidance_scale}, start={self.start}, "
                f"stop={self.stop}, guidance_rescale={self.guidance_rescale})")
