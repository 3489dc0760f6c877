"""HunyuanVideo 1.5: ``HunyuanVideo15CoreDenoiseStep`` (HunyuanVideo 1.5 transformer, flow-matching Euler, CFG)."""

from __future__ import annotations

import torch

from ..diffusers_families import FamilyRecipe
from ..diffusers_loops import seeded


def _mask(valid: int, length: int) -> torch.Tensor:
    """A tokenizer's padded attention mask: ``valid`` ones, then zeros."""
    return (torch.arange(length) < valid).long().unsqueeze(0)


def recipe(seed: int, gen: torch.Generator) -> FamilyRecipe:
    from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, HunyuanVideo15Transformer3DModel
    from diffusers.modular_pipelines.hunyuan_video1_5.modular_blocks_hunyuan_video1_5 import (
        HunyuanVideo15CoreDenoiseStep,
    )

    # no vae: 32 latent channels, so in_channels = latents + condition latents + mask = 32 + 32 + 1
    transformer = seeded(seed, lambda: HunyuanVideo15Transformer3DModel(
        in_channels=65, out_channels=32, num_attention_heads=2, attention_head_dim=8, num_layers=1,
        num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=32,
        image_embed_dim=12, rope_axes_dim=(2, 2, 4), target_size=16, task_type="t2v",
    ))
    return FamilyRecipe(
        core=HunyuanVideo15CoreDenoiseStep(),
        components={"transformer": transformer, "scheduler": FlowMatchEulerDiscreteScheduler(shift=7.0),
                    "guider": ClassifierFreeGuidance(guidance_scale=7.5)},
        inputs={
            "prompt_embeds": torch.randn(1, 7, 16, generator=gen), "prompt_embeds_mask": _mask(5, 7),
            "negative_prompt_embeds": torch.randn(1, 7, 16, generator=gen), "negative_prompt_embeds_mask": _mask(2, 7),
            "prompt_embeds_2": torch.randn(1, 5, 32, generator=gen), "prompt_embeds_mask_2": _mask(3, 5),
            "negative_prompt_embeds_2": torch.randn(1, 5, 32, generator=gen),
            "negative_prompt_embeds_mask_2": _mask(1, 5),
            # no vae: spatial/temporal compression 16/4, so 8x8 latents and 2 latent frames
            "height": 128, "width": 128, "num_frames": 5,
        },
    )
