"""Wan 2.1: ``WanCoreDenoiseStep`` (Wan transformer, UniPC multistep flow-prediction, CFG)."""

from __future__ import annotations

import torch

from ..diffusers_families import FamilyRecipe, seeded


def recipe(seed: int, gen: torch.Generator) -> FamilyRecipe:
    from diffusers import ClassifierFreeGuidance, UniPCMultistepScheduler, WanTransformer3DModel
    from diffusers.modular_pipelines.wan.modular_blocks_wan import WanCoreDenoiseStep

    transformer = seeded(seed, lambda: WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ))
    # the Wan 2.1 checkpoints' scheduler config
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
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
