"""MiniMax Music 3: ``MiniMaxMusic3CoreDenoiseStep`` (condition encoder, 1D transformer, flow-matching Euler, CFG).

Two 200-frame windows (201 frames, 100-frame hop), each denoised in N steps and blended over their overlap.
"""

from __future__ import annotations

import torch

from ..diffusers_families import FamilyRecipe
from ..diffusers_loops import seeded


def recipe(seed: int, gen: torch.Generator) -> FamilyRecipe:
    from diffusers import (
        ClassifierFreeGuidance,
        FlowMatchEulerDiscreteScheduler,
        MiniMaxMusic3ConditionEncoder,
        MiniMaxMusic3Transformer1DModel,
    )
    from diffusers.modular_pipelines.minimax_music3.modular_blocks_minimax_music3 import (
        MiniMaxMusic3CoreDenoiseStep,
    )

    # diffusers' fast-test configs: 25 Hz frames of 8 layers x 16 hidden -> ~86 Hz latents of 8 channels
    condition_encoder = seeded(seed, lambda: MiniMaxMusic3ConditionEncoder(
        condition_hidden_dim=16, num_condition_layers=8, out_dim=16, input_sampling_rate=24000,
        input_hop_length=960, output_sampling_rate=44100, output_hop_length=512,
    ))
    transformer = seeded(seed + 1, lambda: MiniMaxMusic3Transformer1DModel(
        in_channels=8, condition_dim=16, num_layers=2, num_attention_heads=2, attention_head_dim=8,
        ff_inner_dim=32, rotary_dim=4, fourier_embedding_dim=8,
    ))
    return FamilyRecipe(
        core=MiniMaxMusic3CoreDenoiseStep(),
        components={"condition_encoder": condition_encoder, "transformer": transformer,
                    "scheduler": FlowMatchEulerDiscreteScheduler(),
                    "guider": ClassifierFreeGuidance(guidance_scale=1.7)},
        # the autoregressive stage's per-frame hidden states (8 layers x 16); 201 frames make 2 windows
        inputs={"frame_hiddens": torch.randn(1, 201, 8 * 16, generator=gen)},
    )
