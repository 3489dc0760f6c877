"""Helios: ``HeliosCoreDenoiseStep`` (Helios transformer, Helios flow scheduler, CFG), 2 chunks of N steps each."""

from __future__ import annotations

import torch

from ..diffusers_families import FamilyRecipe
from ..diffusers_loops import seeded


def recipe(seed: int, gen: torch.Generator) -> FamilyRecipe:
    from diffusers import ClassifierFreeGuidance, HeliosScheduler, HeliosTransformer3DModel
    from diffusers.modular_pipelines.helios.modular_blocks_helios import HeliosCoreDenoiseStep

    transformer = seeded(seed, lambda: HeliosTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_dim=(4, 4, 4), has_multi_term_memory_patch=True, guidance_cross_attn=True, zero_history_timestep=True,
        is_amplify_history=False,
    ))
    return FamilyRecipe(
        core=HeliosCoreDenoiseStep(),
        components={"transformer": transformer,
                    "scheduler": HeliosScheduler(stage_range=[0, 1], stages=1, use_dynamic_shifting=True),
                    "guider": ClassifierFreeGuidance(guidance_scale=5.0)},
        inputs={
            "prompt_embeds": torch.randn(1, 9, 32, generator=gen),
            "negative_prompt_embeds": torch.randn(1, 9, 32, generator=gen),
            # vae scale factors 8 (spatial) and 4 (temporal) with no vae: 4x4 latents; chunks of 2 latent frames
            # (5 pixel frames each), so 10 frames make 2 chunks
            "height": 32, "width": 32, "num_frames": 10, "num_latent_frames_per_chunk": 2,
        },
    )
