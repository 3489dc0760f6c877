"""FLUX.3: ``Flux3CoreDenoiseStep`` (Flux3 transformer, flow-matching Euler with shift 6.93, CFG)."""

from __future__ import annotations

import torch

from ..diffusers_families import FamilyRecipe
from ..diffusers_loops import seeded


def recipe(seed: int, gen: torch.Generator) -> FamilyRecipe:
    from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, Flux3Transformer2DModel
    from diffusers.modular_pipelines.flux3.modular_blocks_flux3 import Flux3CoreDenoiseStep

    # no diffusers fast test for FLUX.3: the smallest valid config (head dim 16 = the rope axes 4+4+4+4)
    transformer = seeded(seed, lambda: Flux3Transformer2DModel(
        in_channels=4, cond_in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=16, timestep_channels=32, axes_dims_rope=(4, 4, 4, 4),
    ))
    return FamilyRecipe(
        core=Flux3CoreDenoiseStep(),
        components={"transformer": transformer, "scheduler": FlowMatchEulerDiscreteScheduler(shift=6.93),
                    "guider": ClassifierFreeGuidance(guidance_scale=3.5)},
        inputs={
            "prompt_embeds": torch.randn(1, 6, 16, generator=gen),
            "negative_prompt_embeds": torch.randn(1, 6, 16, generator=gen),
            "height": 128, "width": 128,   # vae scale factor 8 with no vae, 2x2 packing: 8x8 tokens
        },
    )
