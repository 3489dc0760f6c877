"""Anima: ``AnimaCoreDenoiseStep`` (text conditioner once, Cosmos transformer, flow-matching Euler, CFG)."""

from __future__ import annotations

import torch

from ..diffusers_families import FamilyRecipe
from ..diffusers_loops import seeded


def recipe(seed: int, gen: torch.Generator) -> FamilyRecipe:
    from diffusers import (
        AnimaTextConditioner, ClassifierFreeGuidance, CosmosTransformer3DModel, FlowMatchEulerDiscreteScheduler,
    )
    from diffusers.modular_pipelines.anima.modular_blocks_anima import AnimaCoreDenoiseStep

    # concat_padding_mask=False: with True the transformer resizes the padding mask with torchvision (not a dependency)
    transformer = seeded(seed, lambda: CosmosTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=16, num_layers=2, mlp_ratio=2,
        text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 32, 32), patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0),
        concat_padding_mask=False, extra_pos_embed_type="learnable",
    ))
    # the core step's first block maps Qwen states + T5 ids to the transformer's text embeddings (before the loop)
    text_conditioner = seeded(seed, lambda: AnimaTextConditioner(
        source_dim=16, target_dim=16, model_dim=16, num_layers=2, num_attention_heads=4, target_vocab_size=128,
        min_sequence_length=8,
    ))

    def text(qwen_len: int, t5_len: int) -> tuple:
        return (torch.randn(1, qwen_len, 16, generator=gen), torch.ones(1, qwen_len, dtype=torch.long),
                torch.randint(0, 128, (1, t5_len), generator=gen), torch.ones(1, t5_len, dtype=torch.long))

    qwen, qwen_mask, t5_ids, t5_mask = text(6, 5)
    neg_qwen, neg_qwen_mask, neg_t5_ids, neg_t5_mask = text(3, 2)
    return FamilyRecipe(
        core=AnimaCoreDenoiseStep(),
        components={"transformer": transformer, "text_conditioner": text_conditioner,
                    "scheduler": FlowMatchEulerDiscreteScheduler(),
                    "guider": ClassifierFreeGuidance(guidance_scale=4.0)},
        inputs={
            "qwen_prompt_embeds": qwen, "qwen_attention_mask": qwen_mask,
            "t5_input_ids": t5_ids, "t5_attention_mask": t5_mask,
            "negative_qwen_prompt_embeds": neg_qwen, "negative_qwen_attention_mask": neg_qwen_mask,
            "negative_t5_input_ids": neg_t5_ids, "negative_t5_attention_mask": neg_t5_mask,
            "height": 128, "width": 128,   # vae scale factor 8 with no vae, patch 2: 8x8 tokens
        },
    )
