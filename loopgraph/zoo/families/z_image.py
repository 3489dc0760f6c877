"""Z-Image: ``ZImageCoreDenoiseStep`` (Z-Image transformer, flow-matching Euler, CFG)."""

from __future__ import annotations

import torch

from ..diffusers_families import FamilyRecipe
from ..diffusers_loops import seeded


def recipe(seed: int, gen: torch.Generator) -> FamilyRecipe:
    from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
    from diffusers.modular_pipelines.z_image.modular_blocks_z_image import ZImageCoreDenoiseStep

    def make():
        model = ZImageTransformer2DModel(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
            n_heads=2, n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
            axes_dims=[8, 4, 4], axes_lens=[256, 32, 32],
        )
        with torch.no_grad():   # the pad tokens are torch.empty: fixed as diffusers' fast test does
            model.x_pad_token.copy_(torch.ones_like(model.x_pad_token))
            model.cap_pad_token.copy_(torch.ones_like(model.cap_pad_token))
        return model

    # the guider spec's default is disabled (Z-Image-Turbo); the base model's CFG is on here
    return FamilyRecipe(
        core=ZImageCoreDenoiseStep(),
        components={"transformer": seeded(seed, make), "scheduler": FlowMatchEulerDiscreteScheduler(),
                    "guider": ClassifierFreeGuidance(guidance_scale=5.0)},
        inputs={
            "prompt_embeds": [torch.randn(7, 16, generator=gen)],            # one prompt, its valid tokens only
            "negative_prompt_embeds": [torch.randn(4, 16, generator=gen)],
            "height": 128, "width": 128,   # vae scale factor 8 with no vae, patch 2: 8x8 tokens
        },
    )
