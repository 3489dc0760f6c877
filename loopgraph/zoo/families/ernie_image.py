"""ERNIE-Image: ``ErnieImageCoreDenoiseStep`` (ERNIE-Image transformer, flow-matching Euler, CFG)."""

from __future__ import annotations

import torch

from ..diffusers_families import FamilyRecipe
from ..diffusers_loops import seeded


def recipe(seed: int, gen: torch.Generator) -> FamilyRecipe:
    from diffusers import ClassifierFreeGuidance, ErnieImageTransformer2DModel, FlowMatchEulerDiscreteScheduler
    from diffusers.modular_pipelines.ernie_image.modular_blocks_ernie_image import ErnieImageCoreDenoiseStep

    def make():
        model = ErnieImageTransformer2DModel(
            hidden_size=32, num_attention_heads=2, num_layers=2, ffn_hidden_size=64, in_channels=16,
            out_channels=16, patch_size=1, text_in_dim=24, rope_axes_dim=(4, 6, 6),
        )
        # __init__ zeroes adaLN_modulation and final_linear (a trained model's are not): random weights instead,
        # else every noise prediction is 0 and the loop never changes the latents
        for layer in (model.adaLN_modulation[-1], model.final_linear):
            torch.nn.init.normal_(layer.weight, std=0.05)
            torch.nn.init.normal_(layer.bias, std=0.05)
        return model

    transformer = seeded(seed, make)
    return FamilyRecipe(
        core=ErnieImageCoreDenoiseStep(),
        components={"transformer": transformer, "scheduler": FlowMatchEulerDiscreteScheduler(),
                    "guider": ClassifierFreeGuidance(guidance_scale=4.0)},
        inputs={
            # one prompt: a list of per-prompt [tokens, text_in_dim] hidden states, as its text encoder step gives
            # (unpadded: the negative prompt is shorter, as an empty negative prompt is)
            "prompt_embeds": [torch.randn(7, 24, generator=gen)],
            "negative_prompt_embeds": [torch.randn(4, 24, generator=gen)],
            "height": 128, "width": 128,   # vae scale factor 16 with no vae: 8x8 latents
        },
    )
