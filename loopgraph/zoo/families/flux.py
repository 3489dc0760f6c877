"""Flux: ``FluxCoreDenoiseStep`` (Flux transformer with guidance embedding, flow-matching Euler, no CFG guider)."""

from __future__ import annotations

import torch

from ..diffusers_families import FamilyRecipe
from ..diffusers_loops import seeded


def recipe(seed: int, gen: torch.Generator) -> FamilyRecipe:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from diffusers.modular_pipelines.flux.modular_blocks_flux import FluxCoreDenoiseStep

    transformer = seeded(seed, lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=True,   # FLUX.1-dev: the guidance scale is embedded, one transformer call per step
    ))
    return FamilyRecipe(
        core=FluxCoreDenoiseStep(),
        components={"transformer": transformer, "scheduler": FlowMatchEulerDiscreteScheduler()},
        inputs={
            "prompt_embeds": torch.randn(1, 6, 32, generator=gen),
            "pooled_prompt_embeds": torch.randn(1, 32, generator=gen),
            "guidance_scale": 3.5,
            "height": 128, "width": 128,   # vae scale factor 8 with no vae, 2x2 packing: 8x8 tokens
        },
    )
