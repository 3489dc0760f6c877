"""LTX-Video: ``LTXCoreDenoiseStep`` (LTX video transformer, flow-matching Euler, CFG)."""

from __future__ import annotations

import torch

from ..diffusers_families import FamilyRecipe
from ..diffusers_loops import seeded


def recipe(seed: int, gen: torch.Generator) -> FamilyRecipe:
    from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel
    from diffusers.modular_pipelines.ltx.modular_blocks_ltx import LTXCoreDenoiseStep

    transformer = seeded(seed, lambda: LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=4, attention_head_dim=8,
        cross_attention_dim=32, num_layers=1, caption_channels=32,
    ))
    return FamilyRecipe(
        core=LTXCoreDenoiseStep(),
        components={"transformer": transformer, "scheduler": FlowMatchEulerDiscreteScheduler(),
                    "guider": ClassifierFreeGuidance(guidance_scale=3.0)},
        inputs={
            "prompt_embeds": torch.randn(1, 7, 32, generator=gen),
            "prompt_attention_mask": torch.ones(1, 7, dtype=torch.long),
            "negative_prompt_embeds": torch.randn(1, 7, 32, generator=gen),
            "negative_prompt_attention_mask": torch.ones(1, 7, dtype=torch.long),
            # no vae: spatial/temporal compression 32/8, so 8x8 latents and 2 latent frames
            "height": 256, "width": 256, "num_frames": 9,
        },
    )
