"""Whole diffusers ``ModularPipeline``s from diffusers' own preset blocks, built offline: prompt → text encoders →
set timesteps → prepare latents → denoise → VAE decode, with tiny components from configs and seeded random weights.

Tokenizers are made from small vocab files written into a folder (CLIP's byte-pair vocab of single letters; a
word-level tokenizer for T5): no downloads. ``build_diffusers_pipeline("sdxl")`` (``StableDiffusionXLAutoBlocks``)
and ``build_diffusers_pipeline("flux")`` (``FluxAutoBlocks``).

Example:
    >>> setup = build_diffusers_pipeline("sdxl")
    >>> images = setup.run()                       # [1, 3, 32, 32], eagerly
    >>> loopgraph.compile_pipeline(setup.pipe)      # then the same call runs the compiled loop
"""

from __future__ import annotations

import json
import string
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .diffusers_loops import require_diffusers, seeded

__all__ = ["PipelineSetup", "build_diffusers_pipeline", "DIFFUSERS_PIPELINES"]

_CLIP = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
             max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
_WORDS = ["<pad>", "</s>", "<unk>", "a", "an", "of", "the", "photo", "cat", "dog", "red", "blue", "on", "in"]


@dataclass
class PipelineSetup:
    """A built pipeline and how it is called: ``run()`` calls it with ``inputs`` and a fresh seeded generator."""

    name: str
    pipe: Any
    inputs: dict[str, Any]
    seed: int = 0
    folder: Path | None = None   # where its tokenizer files were written

    def run(self, **overrides: Any) -> torch.Tensor:
        kwargs = {**self.inputs, **overrides}
        return self.pipe(generator=torch.Generator().manual_seed(self.seed), output="images", output_type="pt",
                         **kwargs)


def _clip_tokenizer(folder: Path):
    """A CLIP tokenizer whose vocab is the single letters (with and without the end-of-word mark), no merges."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    letters = string.ascii_lowercase
    tokens = ["<|startoftext|>", "<|endoftext|>", *letters, *(c + "</w>" for c in letters)]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def _word_tokenizer(folder: Path):
    """A T5-style tokenizer over a few words (word level, written as a tokenizer.json and loaded back)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(_WORDS)}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.save(str(folder / "tokenizer.json"))
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), pad_token="<pad>",
                                   eos_token="</s>", unk_token="<unk>")


def _vae(seed: int, **config: Any):
    from diffusers import AutoencoderKL

    return seeded(seed, lambda: AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=2,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, sample_size=32,
        **config))


def _sdxl(folder: Path, seed: int) -> tuple[Any, dict[str, Any]]:
    from diffusers import ClassifierFreeGuidance, EulerDiscreteScheduler, UNet2DConditionModel
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.modular_pipelines import StableDiffusionXLAutoBlocks
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _clip_tokenizer(folder / "clip")
    config = dict(vocab_size=len(tokenizer), **_CLIP)
    unet = seeded(seed + 3, lambda: UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        norm_num_groups=1, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + 32 pooled (text_encoder_2's projection)
        cross_attention_dim=64))                   # the two text encoders' hidden states side by side: 32 + 32
    pipe = StableDiffusionXLAutoBlocks().init_pipeline()
    pipe.update_components(
        text_encoder=seeded(seed + 1, lambda: CLIPTextModel(CLIPTextConfig(**config))),
        text_encoder_2=seeded(seed + 2, lambda: CLIPTextModelWithProjection(CLIPTextConfig(**config,
                                                                                            projection_dim=32))),
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, vae=_vae(seed + 4),
        scheduler=EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                         steps_offset=1, timestep_spacing="leading"),
        guider=ClassifierFreeGuidance(guidance_scale=5.0), image_processor=VaeImageProcessor(vae_scale_factor=2))
    return pipe, {"prompt": "a photo of a cat", "negative_prompt": "a dog", "num_inference_steps": 4}


def _flux(folder: Path, seed: int) -> tuple[Any, dict[str, Any]]:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.modular_pipelines import FluxAutoBlocks
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer, words = _clip_tokenizer(folder / "clip"), _word_tokenizer(folder / "t5")
    pipe = FluxAutoBlocks().init_pipeline()
    pipe.update_components(
        text_encoder=seeded(seed + 1, lambda: CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), **_CLIP))),
        tokenizer=tokenizer,
        text_encoder_2=seeded(seed + 2, lambda: T5EncoderModel(T5Config(
            vocab_size=len(_WORDS), d_model=32, d_ff=37, d_kv=16, num_layers=2, num_heads=2, pad_token_id=0,
            eos_token_id=1))),
        tokenizer_2=words,
        transformer=seeded(seed + 3, lambda: FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8])),
        vae=_vae(seed + 4, shift_factor=0.0, scaling_factor=1.0),  # 4 latent channels, packed 2x2 into 16
        scheduler=FlowMatchEulerDiscreteScheduler(), image_processor=VaeImageProcessor(vae_scale_factor=4))
    inputs = {"prompt": "a photo of a cat", "num_inference_steps": 4, "height": 32, "width": 32,
              "max_sequence_length": 8}
    return pipe, inputs


DIFFUSERS_PIPELINES: dict[str, Callable[[Path, int], tuple[Any, dict[str, Any]]]] = {
    "sdxl": _sdxl,
    "flux": _flux,
}


def build_diffusers_pipeline(name: str, *, seed: int = 0, folder: str | Path | None = None) -> PipelineSetup:
    """A diffusers ``ModularPipeline`` from its preset blocks with tiny components; tokenizer files go into
    ``folder`` (a new temporary folder when None). ``name``: one of ``DIFFUSERS_PIPELINES``."""
    require_diffusers()
    if name not in DIFFUSERS_PIPELINES:
        raise ValueError(f"unknown diffusers pipeline {name!r}; known: {sorted(DIFFUSERS_PIPELINES)}")
    where = Path(folder) if folder is not None else Path(tempfile.mkdtemp(prefix=f"loopgraph-{name}-"))
    pipe, inputs = DIFFUSERS_PIPELINES[name](where, seed)
    return PipelineSetup(name=name, pipe=pipe, inputs=inputs, seed=seed, folder=where)
