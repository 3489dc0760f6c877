"""Cosmos 3: ``Cosmos3VisionCoreDenoiseStep`` (Cosmos3 omni transformer, text+vision, UniPC multistep, CFG 6.0)."""

from __future__ import annotations

import torch

from ..diffusers_families import FamilyRecipe
from ..diffusers_loops import seeded


def recipe(seed: int, gen: torch.Generator) -> FamilyRecipe:
    from diffusers import Cosmos3OmniTransformer, UniPCMultistepScheduler
    from diffusers.modular_pipelines.cosmos.modular_blocks_cosmos3 import Cosmos3VisionCoreDenoiseStep

    transformer = seeded(seed, lambda: Cosmos3OmniTransformer(
        head_dim=6, hidden_act="relu2", hidden_size=6, intermediate_size=12, latent_channel=16, latent_patch_size=1,
        num_attention_heads=1, num_hidden_layers=1, num_key_value_heads=1, patch_latent_dim=16, qk_norm_for_text=False,
        rms_norm_eps=1e-5, rope_axes_dim=[1, 1, 1], vocab_size=151657,
    ))
    return FamilyRecipe(
        core=Cosmos3VisionCoreDenoiseStep(),
        components={"transformer": transformer, "scheduler": UniPCMultistepScheduler()},
        inputs={
            # the tokenizer's output: token ids of the prompt and of the negative prompt (the transformer embeds them)
            "cond_input_ids": torch.randint(0, 151657, (9,), generator=gen).tolist(),
            "uncond_input_ids": torch.randint(0, 151657, (6,), generator=gen).tolist(),
            "guidance_scale": 6.0,   # the step's default: CFG on, a cond and an uncond transformer call per step
            # no vae: spatial/temporal compression 16/4, so 8x8 latents and 2 latent frames
            "height": 128, "width": 128, "num_frames": 5,
        },
    )
