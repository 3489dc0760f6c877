"""Ideogram 4: ``Ideogram4CoreDenoiseStep`` (conditional + unconditional Ideogram4 transformers, logit-normal
flow-matching Euler, asymmetric CFG with a per-step guidance schedule, no guider)."""

from __future__ import annotations

import torch

from ..diffusers_families import FamilyRecipe
from ..diffusers_loops import seeded


def guidance_schedule(steps: int) -> list[float]:
    """diffusers' default schedule ``(7.0,) * 45 + (3.0,) * 3`` for 48 steps, at ``steps`` steps.

    The core step's ``guidance_schedule`` input must have length ``num_inference_steps`` (Ideogram4SetTimestepsStep
    raises otherwise): the recipe's ``per_steps``.
    """
    return [7.0] * max(steps - 3, 0) + [3.0] * min(steps, 3)


def recipe(seed: int, gen: torch.Generator) -> FamilyRecipe:
    from diffusers import FlowMatchEulerDiscreteScheduler, Ideogram4Transformer2DModel
    from diffusers.modular_pipelines.ideogram4.modular_blocks_ideogram4 import Ideogram4CoreDenoiseStep

    def make():
        return Ideogram4Transformer2DModel(
            in_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2, intermediate_size=32,
            adaln_dim=16, llm_features_dim=24, mrope_section=(4, 2, 2),
        )

    return FamilyRecipe(
        core=Ideogram4CoreDenoiseStep(),
        components={"transformer": seeded(seed, make), "unconditional_transformer": seeded(seed + 1, make),
                    "scheduler": FlowMatchEulerDiscreteScheduler()},
        inputs={
            "text_features": torch.randn(1, 7, 24, generator=gen),   # one prompt, 7 text tokens
            "text_lengths": [7],
            "height": 64, "width": 64,   # vae scale factor 8, patch 2, no vae: 4x4 packed tokens of 4 ch x 2x2
        },
        per_steps=lambda steps: {"guidance_schedule": guidance_schedule(steps)},
    )
