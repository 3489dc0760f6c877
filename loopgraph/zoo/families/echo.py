"""Echo: ``EchoDenoiseStep`` (LTX-2 audio-video transformer, stochastic DMD re-noising along a sigma list, no CFG)."""

from __future__ import annotations

import torch

from ..diffusers_families import FamilyRecipe
from ..diffusers_loops import seeded


def recipe(seed: int, gen: torch.Generator) -> FamilyRecipe:
    from diffusers import LTX2VideoTransformer3DModel
    from diffusers.modular_pipelines.echo.modular_blocks_echo import EchoDenoiseStep

    # diffusers' LTX-2 transformer test config; audio channels 16 = 1 channel x the 16 mel bins Echo assumes
    # without an audio vae
    transformer = seeded(seed, lambda: LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=16, audio_out_channels=16, audio_num_attention_heads=2,
        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2, qk_norm="rms_norm_across_heads",
        caption_channels=16, rope_double_precision=False,
    ))
    return FamilyRecipe(
        # no scheduler, no guider: the loop re-noises with the generator along `sigmas`; Echo takes no step count,
        # N steps are N + 1 sigmas from 1 down to 0
        core=EchoDenoiseStep(),
        steps_input=None,
        per_steps=lambda steps: {"sigmas": [1.0 - k / steps for k in range(steps)] + [0.0]},
        components={"transformer": transformer},
        inputs={
            "connector_prompt_embeds": torch.randn(1, 7, 16, generator=gen),
            "connector_audio_prompt_embeds": torch.randn(1, 7, 16, generator=gen),
            "connector_attention_mask": torch.ones(1, 7, dtype=torch.long),
            # vae compression 32 (spatial) and 8 (temporal) with no vae: 2 latent frames of 4x4; 9 audio frames
            "height": 128, "width": 128, "num_frames": 9,
        },
    )
