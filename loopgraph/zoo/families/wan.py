"""Wan 2.1: ``WanCoreDenoiseStep`` (Wan transformer, UniPC multistep flow-prediction, CFG)."""

from __future__ import annotations

import torch

from ..diffusers_families import FamilyRecipe
from ..diffusers_loops import wan_scheduler, wan_transformer


def recipe(seed: int, gen: torch.Generator) -> FamilyRecipe:
    from diffusers import ClassifierFreeGuidance
    from diffusers.modular_pipelines.wan.modular_blocks_wan import WanCoreDenoiseStep

    transformer, scheduler = wan_transformer(seed), wan_scheduler()  # as diffusers_loops' Wan loop
    return FamilyRecipe(
        core=WanCoreDenoiseStep(),
        components={"transformer": transformer, "scheduler": scheduler,
                    "guider": ClassifierFreeGuidance(guidance_scale=5.0)},
        inputs={
            "prompt_embeds": torch.randn(1, 9, 32, generator=gen),
            "negative_prompt_embeds": torch.randn(1, 9, 32, generator=gen),
            # vae scale factors 8 (spatial) and 4 (temporal) with no vae: 2 latent frames of 8x8
            "height": 64, "width": 64, "num_frames": 5,
        },
    )
