"""Stable Diffusion 3: ``StableDiffusion3T2ICoreDenoiseStep`` (SD3 transformer, flow-matching Euler, CFG)."""

from __future__ import annotations

import torch

from ..diffusers_families import FamilyRecipe
from ..diffusers_loops import seeded


def recipe(seed: int, gen: torch.Generator) -> FamilyRecipe:
    from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers.modular_pipelines.stable_diffusion_3.modular_blocks_stable_diffusion_3 import (
        StableDiffusion3T2ICoreDenoiseStep,
    )

    transformer = seeded(seed, lambda: SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    ))
    return FamilyRecipe(
        core=StableDiffusion3T2ICoreDenoiseStep(),
        components={"transformer": transformer, "scheduler": FlowMatchEulerDiscreteScheduler(),
                    "guider": ClassifierFreeGuidance(guidance_scale=5.0)},
        inputs={
            "prompt_embeds": torch.randn(1, 7, 32, generator=gen),
            "pooled_prompt_embeds": torch.randn(1, 64, generator=gen),
            "negative_prompt_embeds": torch.randn(1, 7, 32, generator=gen),
            "negative_pooled_prompt_embeds": torch.randn(1, 64, generator=gen),
            "height": 64, "width": 64,   # vae scale factor 8 with no vae: 8x8 latents
        },
    )
