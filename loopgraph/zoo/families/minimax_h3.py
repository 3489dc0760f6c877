"""MiniMax-H3: ``MiniMaxH3CoreDenoiseStep`` (t2va video+audio transformer, two MiniMax-H3 Eulers, no guider)."""

from __future__ import annotations

import torch

from ..diffusers_families import FamilyRecipe
from ..diffusers_loops import seeded


def recipe(seed: int, gen: torch.Generator) -> FamilyRecipe:
    from diffusers import MiniMaxH3Scheduler, MiniMaxH3Transformer3DModel
    from diffusers.modular_pipelines.minimax_h3.modular_blocks_minimax_h3 import MiniMaxH3CoreDenoiseStep
    from diffusers.modular_pipelines.minimax_h3.modular_pipeline import MINIMAX_H3_TEXT_TAG

    # no vae / audio vae: 24 video and 32 audio latent channels
    transformer = seeded(seed, lambda: MiniMaxH3Transformer3DModel(
        num_attention_heads=2, attention_head_dim=16, hidden_size=24, num_layers=2, num_refiner_layers=2, ffn_dim=32,
        in_channels=24, audio_in_channels=32, patch_size=(1, 2, 2), text_dim=8, freq_dim=8, time_embed_hidden_dim=24,
        time_embed_dim=16, rope_freq_dim=2,
    ))
    return FamilyRecipe(
        core=MiniMaxH3CoreDenoiseStep(),
        components={"transformer": transformer, "scheduler": MiniMaxH3Scheduler(shift=12.0),
                    "audio_scheduler": MiniMaxH3Scheduler(shift=3.0)},
        inputs={
            "prompt_embeds": torch.randn(1, 7, 8, generator=gen),
            "text_token_tags": torch.full((7,), MINIMAX_H3_TEXT_TAG, dtype=torch.long),
            # the shortest video it makes (124 frames, 5.2 s: 37 latent frames, 207 audio latents per channel) on
            # its smallest canvas (32x32: 2x2 latents, one 2x2 patch a frame)
            "height": 32, "width": 32, "num_frames": 124,
        },
    )
