"""Stable Diffusion XL: ``StableDiffusionXLCoreDenoiseStep`` resolved to text-to-image (UNet, Euler, CFG)."""

from __future__ import annotations

import torch

from ..diffusers_families import FamilyRecipe
from ..diffusers_loops import sdxl_scheduler, sdxl_unet


def recipe(seed: int, gen: torch.Generator) -> FamilyRecipe:
    from diffusers import ClassifierFreeGuidance
    from diffusers.modular_pipelines.stable_diffusion_xl.modular_blocks_stable_diffusion_xl import (
        StableDiffusionXLCoreDenoiseStep,
    )

    unet, scheduler = sdxl_unet(seed), sdxl_scheduler()  # the tiny UNet and SDXL's scheduler, as diffusers_loops
    # the core step's denoise block is an AutoPipelineBlocks (controlnet / inpaint / plain): resolve it, with
    # no trigger inputs, to the text-to-image blocks (input, set_timesteps, prepare_latents, prepare_add_cond,
    # the StableDiffusionXLDenoiseStep loop), as a pipeline call with prompt embeddings only would run them
    core = StableDiffusionXLCoreDenoiseStep().get_execution_blocks()
    return FamilyRecipe(
        core=core,
        core_name="StableDiffusionXLCoreDenoiseStep",
        components={"unet": unet, "scheduler": scheduler, "guider": ClassifierFreeGuidance(guidance_scale=5.0)},
        inputs={
            "prompt_embeds": torch.randn(1, 7, 64, generator=gen),
            "negative_prompt_embeds": torch.randn(1, 7, 64, generator=gen),
            "pooled_prompt_embeds": torch.randn(1, 32, generator=gen),
            "negative_pooled_prompt_embeds": torch.randn(1, 32, generator=gen),
            "height": 64, "width": 64,   # vae scale factor 8 with no vae: 8x8 latents
        },
    )
