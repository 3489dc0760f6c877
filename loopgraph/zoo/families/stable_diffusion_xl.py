"""Stable Diffusion XL: ``StableDiffusionXLCoreDenoiseStep`` resolved to text-to-image (UNet, Euler, CFG)."""

from __future__ import annotations

import torch

from ..diffusers_families import FamilyRecipe, seeded


def recipe(seed: int, gen: torch.Generator) -> FamilyRecipe:
    from diffusers import ClassifierFreeGuidance, EulerDiscreteScheduler, UNet2DConditionModel
    from diffusers.modular_pipelines.stable_diffusion_xl.modular_blocks_stable_diffusion_xl import (
        StableDiffusionXLCoreDenoiseStep,
    )

    unet = seeded(seed, lambda: UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        norm_num_groups=1, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + 32 pooled
        cross_attention_dim=64,
    ))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")  # SDXL base's scheduler config
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
