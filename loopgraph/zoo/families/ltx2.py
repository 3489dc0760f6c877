"""LTX-2: ``LTX2CoreDenoiseStep`` (video+audio transformer, flow-matching Euler per modality, LTX2Guidance)."""

from __future__ import annotations

import torch

from ..diffusers_families import FamilyRecipe
from ..diffusers_loops import seeded


def recipe(seed: int, gen: torch.Generator) -> FamilyRecipe:
    from diffusers import (
        AutoencoderKLLTX2Audio, FlowMatchEulerDiscreteScheduler, LTX2Guidance, LTX2VideoTransformer3DModel,
    )
    from diffusers.modular_pipelines.ltx2.modular_blocks_ltx2 import LTX2CoreDenoiseStep

    transformer = seeded(seed, lambda: LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2, qk_norm="rms_norm_across_heads",
        caption_channels=16, rope_double_precision=False, rope_type="split",
    ))
    # the audio-latents block reads its channels / mel bins / compression off the audio VAE (no forward is run)
    audio_vae = seeded(seed, lambda: AutoencoderKLLTX2Audio(
        base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None, in_channels=2,
        resolution=32, latent_channels=2, norm_type="pixel", causality_axis="height", dropout=0.0,
        mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=8,
    ))
    # the denoiser's ComponentSpec defaults, STG on the tiny model's block 0 instead of 28
    guider = LTX2Guidance(guidance_scale=3.0, stg_scale=1.0, modality_scale=3.0, guidance_rescale=0.7,
                          spatio_temporal_guidance_blocks=[0])
    audio_guider = LTX2Guidance(guidance_scale=7.0, stg_scale=1.0, modality_scale=3.0, guidance_rescale=0.7)
    return FamilyRecipe(
        core=LTX2CoreDenoiseStep(),
        components={"transformer": transformer, "audio_vae": audio_vae, "scheduler": FlowMatchEulerDiscreteScheduler(),
                    "guider": guider, "audio_guider": audio_guider},
        inputs={
            "connector_prompt_embeds": torch.randn(1, 7, 16, generator=gen),
            "connector_audio_prompt_embeds": torch.randn(1, 7, 16, generator=gen),
            "connector_attention_mask": torch.ones(1, 7, dtype=torch.long),
            "negative_connector_prompt_embeds": torch.randn(1, 7, 16, generator=gen),
            "negative_connector_audio_prompt_embeds": torch.randn(1, 7, 16, generator=gen),
            "negative_connector_attention_mask": torch.ones(1, 7, dtype=torch.long),
            "batch_size": 1, "dtype": torch.float32,
            # no vae: spatial/temporal compression 32/8, so 8x8 latents and 2 latent frames (9 audio latent frames)
            "height": 256, "width": 256, "num_frames": 9,
        },
    )
