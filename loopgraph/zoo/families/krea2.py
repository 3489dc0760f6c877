"""Krea 2: ``Krea2CoreDenoiseStep`` (Krea2 transformer, dynamic-shift flow-matching Euler, cond-anchored CFG)."""

from __future__ import annotations

import torch

from ..diffusers_families import FamilyRecipe
from ..diffusers_loops import seeded


def recipe(seed: int, gen: torch.Generator) -> FamilyRecipe:
    from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, Krea2Transformer2DModel
    from diffusers.modular_pipelines.krea2.modular_blocks_krea2 import Krea2CoreDenoiseStep

    transformer = seeded(seed, lambda: Krea2Transformer2DModel(
        in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=32, timestep_embed_dim=8, text_hidden_dim=16, num_text_layers=3, text_num_attention_heads=2,
        text_num_key_value_heads=1, text_intermediate_size=16, num_layerwise_text_blocks=1, num_refiner_text_blocks=1,
        axes_dims_rope=(4, 2, 2), rope_theta=1000.0,
    ))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=6400)
    mask = torch.arange(8) < 5            # a padded prompt: 5 of 8 text tokens valid
    return FamilyRecipe(
        core=Krea2CoreDenoiseStep(),
        components={"transformer": transformer, "scheduler": scheduler,
                    "guider": ClassifierFreeGuidance(guidance_scale=4.5, use_original_formulation=True)},
        inputs={
            "prompt_embeds": torch.randn(1, 8, 3, 16, generator=gen),   # (B, text_seq_len, text layers, dim)
            "prompt_embeds_mask": mask[None].clone(),
            "negative_prompt_embeds": torch.randn(1, 8, 3, 16, generator=gen),
            "negative_prompt_embeds_mask": (torch.arange(8) < 3)[None],
            "height": 128, "width": 128,   # vae scale factor 8 with no vae, patch 2: 8x8 tokens
        },
    )
