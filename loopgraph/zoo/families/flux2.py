"""Flux2: ``Flux2CoreDenoiseStep`` (Flux2 transformer with guidance embedding, flow-matching Euler, no CFG guider)."""

from __future__ import annotations

import torch

from ..diffusers_families import FamilyRecipe
from ..diffusers_loops import seeded


def recipe(seed: int, gen: torch.Generator) -> FamilyRecipe:
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
    from diffusers.modular_pipelines.flux2.modular_blocks_flux2 import Flux2CoreDenoiseStep

    transformer = seeded(seed, lambda: Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
    ))
    return FamilyRecipe(
        core=Flux2CoreDenoiseStep(),
        components={"transformer": transformer, "scheduler": FlowMatchEulerDiscreteScheduler()},
        inputs={
            "prompt_embeds": torch.randn(1, 6, 16, generator=gen),
            "guidance_scale": 4.0,
            "height": 128, "width": 128,   # vae scale factor 8 with no vae, 2x2 packing: 8x8 tokens
        },
    )
