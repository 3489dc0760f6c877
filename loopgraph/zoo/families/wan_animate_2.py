"""Wan-Animate-2: ``WanAnimate2CoreDenoiseStep`` (KV-cached Wan transformer, DPM++ flow, CFG, Wan VAE), 2 segments."""

from __future__ import annotations

import torch

from ..diffusers_families import FamilyRecipe
from ..diffusers_loops import seeded


def recipe(seed: int, gen: torch.Generator) -> FamilyRecipe:
    from diffusers import (
        AutoencoderKLWan,
        ClassifierFreeGuidance,
        DPMSolverMultistepScheduler,
        WanAnimate2Transformer3DModel,
    )
    from diffusers.modular_pipelines.wan_animate_2.modular_blocks_wan_animate_2 import WanAnimate2CoreDenoiseStep

    # diffusers' Wan-Animate-2 transformer test config, without the CLIP image embedding: the reference image's
    # CLIP features reach the denoiser only as a `denoiser_input_fields` kwarg, which FamilySetup cannot tag
    transformer = seeded(seed, lambda: WanAnimate2Transformer3DModel(
        patch_size=(1, 2, 2), text_len=16, in_dim=16 + 20, dim=128, ffn_dim=256, freq_dim=64, text_dim=32,
        out_dim=16, num_heads=4, num_layers=2, cross_attn_norm=True, use_img_emb=False,
    ))
    # the segment loop encodes each driving slice and decodes each segment: diffusers' tiny Wan test VAE
    vae = seeded(seed + 1, lambda: AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
    ))
    # the spec says only SchedulerMixin; its step gets `generator=`, which UniPC's does not take: Wan's DPM++ (flow)
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    return FamilyRecipe(
        core=WanAnimate2CoreDenoiseStep(),
        components={"transformer": transformer, "vae": vae, "scheduler": scheduler,
                    "guider": ClassifierFreeGuidance(guidance_scale=3.0)},
        inputs={
            "prompt_embeds": torch.randn(1, 8, 32, generator=gen),
            "negative_prompt_embeds": torch.randn(1, 8, 32, generator=gen),
            "prompt_ref_embeds": torch.randn(1, 8, 32, generator=gen),
            "condition_clip_context": torch.randn(1, 4, 1280, generator=gen),
            # what the encoder steps make: i2v mask (4) + reference latents (16) on a 4x4 latent grid, and the
            # driving video, 9 frames of 32x32 = 2 segments of 5 frames advancing by 4
            "reference_image_latents": torch.randn(20, 1, 4, 4, generator=gen),
            "driving_video_pixels": torch.rand(1, 3, 9, 32, 32, generator=gen) * 2 - 1,
            "height": 32, "width": 32, "segment_frame_length": 5, "prev_segment_conditioning_frames": 1,
            "num_segments": 2, "effective_segment": 4,
        },
    )
