"""Qwen-Image 2.1: ``QwenImage21CoreDenoiseStep`` (single-stream transformer with its prefix KV cache, flow-matching
Euler with dynamic shift, CFG)."""

from __future__ import annotations

import torch

from ..diffusers_families import FamilyRecipe
from ..diffusers_loops import seeded


def recipe(seed: int, gen: torch.Generator) -> FamilyRecipe:
    from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, QwenImage21Transformer2DModel
    from diffusers.modular_pipelines.qwenimage21.modular_blocks_qwenimage21 import QwenImage21CoreDenoiseStep

    transformer = seeded(seed, lambda: QwenImage21Transformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        context_in_dim=16, mlp_ratio=3, axes_dims_rope=(4, 6, 6), causal_condition=True,
    ))
    scheduler = FlowMatchEulerDiscreteScheduler(   # Qwen-Image's scheduler config (2.1's is not known offline)
        base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, shift=1.0,
        shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True,
    )
    no_vision = torch.zeros(1, 7, dtype=torch.bool)   # text-to-image: no image slots in the prompt
    return FamilyRecipe(
        core=QwenImage21CoreDenoiseStep(),
        components={"transformer": transformer, "scheduler": scheduler,
                    "guider": ClassifierFreeGuidance(guidance_scale=4.0)},   # its spec default 1.0 is CFG off
        inputs={
            "prompt_embeds": torch.randn(1, 7, 16, generator=gen),
            "prompt_embeds_mask": torch.ones(1, 7, dtype=torch.long),
            "negative_prompt_embeds": torch.randn(1, 7, 16, generator=gen),
            "negative_prompt_embeds_mask": torch.ones(1, 7, dtype=torch.long),
            "image_pad_mask": no_vision, "negative_image_pad_mask": no_vision.clone(),
            "height": 64, "width": 64,   # vae scale factor 16 with no vae: 4x4 latent tokens
        },
    )
