"""QwenImage: ``QwenImageCoreDenoiseStep`` (QwenImage transformer, flow-matching Euler with dynamic shift, CFG)."""

from __future__ import annotations

import torch

from ..diffusers_families import FamilyRecipe
from ..diffusers_loops import seeded


def recipe(seed: int, gen: torch.Generator) -> FamilyRecipe:
    from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from diffusers.modular_pipelines.qwenimage.modular_blocks_qwenimage import QwenImageCoreDenoiseStep

    transformer = seeded(seed, lambda: QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=3, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    ))
    scheduler = FlowMatchEulerDiscreteScheduler(   # Qwen/Qwen-Image's scheduler config
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True,
    )
    return FamilyRecipe(
        core=QwenImageCoreDenoiseStep(),
        components={"transformer": transformer, "scheduler": scheduler,
                    "guider": ClassifierFreeGuidance(guidance_scale=4.0)},
        inputs={
            "prompt_embeds": torch.randn(1, 7, 16, generator=gen),
            "prompt_embeds_mask": torch.ones(1, 7, dtype=torch.long),
            "negative_prompt_embeds": torch.randn(1, 7, 16, generator=gen),
            "negative_prompt_embeds_mask": torch.ones(1, 7, dtype=torch.long),
            "height": 64, "width": 64,   # vae scale factor 8 with no vae: 8x8 latents, 4x4 packed tokens
        },
    )
