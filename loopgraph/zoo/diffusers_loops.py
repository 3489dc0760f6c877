"""Real diffusers denoising loops, built offline from tiny configs with seeded random weights.

Each builder makes the denoiser, scheduler and guider the loop expects (configs from diffusers' own fast
tests), the diffusers loop wrapper itself, and the inputs its upstream steps would have produced. Nothing
is patched: the wrapper, its blocks, the scheduler and the guider are diffusers' own classes.

    sdxl       StableDiffusionXLDenoiseStep  UNet, Euler (CPU sigmas, first-step index lookup), CFG,
                                             `denoiser_input_fields` kwargs-type inputs
    flux       FluxDenoiseStep               Flux transformer, flow-matching Euler, no guider
    wan        WanDenoiseStep                Wan transformer, UniPC multistep (history buffers), CFG
    qwenimage  QwenImageDenoiseStep          QwenImage transformer, flow-matching Euler, CFG + norm rescale

diffusers is optional: it is imported inside the builders only (``pip install loopgraph[diffusers]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .loops import LoopSetup

__all__ = ["DIFFUSERS_LOOPS", "DiffusersLoopSetup", "build_diffusers_loop", "require_diffusers", "sdxl_scheduler",
           "sdxl_unet", "seeded", "wan_scheduler", "wan_transformer"]

DENOISER_FIELDS = "denoiser_input_fields"


def require_diffusers():
    """Import diffusers, or say how to get it."""
    try:
        import diffusers
    except ImportError as e:
        raise ImportError(
            "loopgraph's diffusers loops need diffusers (and transformers): pip install loopgraph[diffusers]"
        ) from e
    return diffusers


@dataclass
class DiffusersLoopSetup(LoopSetup):
    """A ``LoopSetup`` whose state is diffusers' own ``PipelineState``.

    ``kwargs_types`` tags inputs as an upstream step would (``denoiser_input_fields``); ``begin_index`` is
    set after ``set_timesteps`` when the model's real set-timesteps step does so (Flux, QwenImage).
    """

    kwargs_types: dict[str, str] = field(default_factory=dict)
    begin_index: int | None = None

    def new_state(self, reset: bool = True):
        from diffusers.modular_pipelines import PipelineState

        scheduler = self.components.scheduler
        if reset:
            scheduler.set_timesteps(self.steps, device=self.device)
            if self.begin_index is not None:
                scheduler.set_begin_index(self.begin_index)
        state = PipelineState()
        for name, value in self.inputs.items():
            state.set(name, value, self.kwargs_types.get(name))
        state.set("timesteps", scheduler.timesteps)
        state.set("num_inference_steps", self.steps)
        return state

    def pipeline_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``ModularPipeline.__call__`` (kwargs-type inputs grouped in one dict each);
        call ``new_state()`` or ``set_timesteps`` first, as for a direct call."""
        kwargs: dict[str, Any] = {}
        for name, value in self.inputs.items():
            kind = self.kwargs_types.get(name)
            if kind is None:
                kwargs[name] = value
            else:
                kwargs.setdefault(kind, {})[name] = value
        kwargs["timesteps"] = self.components.scheduler.timesteps
        kwargs["num_inference_steps"] = self.steps
        return kwargs


def seeded(seed: int, make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is left alone
        torch.manual_seed(seed)
        return make().eval()


@dataclass(frozen=True)
class _Recipe:
    block: Any                         # the diffusers loop wrapper instance
    components: dict[str, Any]
    inputs: dict[str, Any]
    kwargs_types: dict[str, str]
    begin_index: int | None


def sdxl_unet(seed: int) -> torch.nn.Module:
    """SDXL's UNet at a tiny config (diffusers' fast tests): text-time conditioning, cross-attention dim 64."""
    from diffusers import UNet2DConditionModel

    return seeded(seed, lambda: UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, transformer_layers_per_block=(1, 2),
        norm_num_groups=1, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + 32 pooled
        cross_attention_dim=64,
    ))


def sdxl_scheduler():
    """SDXL base's Euler scheduler config."""
    from diffusers import EulerDiscreteScheduler

    return EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  steps_offset=1, timestep_spacing="leading")


def _sdxl(seed: int, gen: torch.Generator) -> _Recipe:
    from diffusers import ClassifierFreeGuidance
    from diffusers.modular_pipelines.stable_diffusion_xl.denoise import StableDiffusionXLDenoiseStep

    unet, scheduler = sdxl_unet(seed), sdxl_scheduler()
    fields = {
        "prompt_embeds": torch.randn(1, 7, 64, generator=gen),
        "negative_prompt_embeds": torch.randn(1, 7, 64, generator=gen),
        "pooled_prompt_embeds": torch.randn(1, 32, generator=gen),
        "negative_pooled_prompt_embeds": torch.randn(1, 32, generator=gen),
        "add_time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]),
        "negative_add_time_ids": torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]]),
    }
    return _Recipe(
        block=StableDiffusionXLDenoiseStep(),
        components={"unet": unet, "scheduler": scheduler, "guider": ClassifierFreeGuidance(guidance_scale=5.0)},
        inputs={"latents": torch.randn(1, 4, 16, 16, generator=gen), **fields},
        kwargs_types={name: DENOISER_FIELDS for name in fields},
        begin_index=None,  # the modular SDXL set-timesteps step leaves it unset: step 0 looks the index up
    )


def _flux(seed: int, gen: torch.Generator) -> _Recipe:
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from diffusers.modular_pipelines.flux.denoise import FluxDenoiseStep

    transformer = seeded(seed, lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    ))
    return _Recipe(
        block=FluxDenoiseStep(),
        components={"transformer": transformer, "scheduler": FlowMatchEulerDiscreteScheduler()},
        inputs={
            "latents": torch.randn(1, 64, 4, generator=gen),  # 8x8 packed tokens
            "prompt_embeds": torch.randn(1, 6, 32, generator=gen),
            "pooled_prompt_embeds": torch.randn(1, 32, generator=gen),
            "txt_ids": torch.zeros(6, 3),
            "img_ids": torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(8.0), torch.arange(8.0),
                                                  indexing="ij"), dim=-1).reshape(64, 3),
        },
        kwargs_types={},
        begin_index=0,  # as FluxSetTimestepsStep does (diffusers PR #11696)
    )


def wan_transformer(seed: int) -> torch.nn.Module:
    """Wan 2.1's transformer at a tiny config (diffusers' fast tests): 2 layers, 2 heads x 12, text dim 32."""
    from diffusers import WanTransformer3DModel

    return seeded(seed, lambda: WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=16, out_channels=16,
        text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    ))


def wan_scheduler():
    """The Wan 2.1 checkpoints' scheduler config: UniPC multistep, flow prediction, shift 3."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def _wan(seed: int, gen: torch.Generator) -> _Recipe:
    from diffusers import ClassifierFreeGuidance
    from diffusers.modular_pipelines.wan.denoise import WanDenoiseStep

    transformer, scheduler = wan_transformer(seed), wan_scheduler()
    return _Recipe(
        block=WanDenoiseStep(),
        components={"transformer": transformer, "scheduler": scheduler,
                    "guider": ClassifierFreeGuidance(guidance_scale=5.0)},
        inputs={
            "latents": torch.randn(1, 16, 2, 8, 8, generator=gen),  # [B, C, F, H, W]
            "dtype": torch.float32,
            "prompt_embeds": torch.randn(1, 9, 32, generator=gen),
            "negative_prompt_embeds": torch.randn(1, 9, 32, generator=gen),
        },
        kwargs_types={},
        begin_index=None,  # the modular Wan set-timesteps step leaves it unset
    )


def _qwenimage(seed: int, gen: torch.Generator) -> _Recipe:
    from diffusers import ClassifierFreeGuidance, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from diffusers.modular_pipelines.qwenimage.denoise import QwenImageDenoiseStep

    transformer = seeded(seed, lambda: QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
        num_attention_heads=3, joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    ))
    fields = {
        "prompt_embeds": torch.randn(1, 7, 16, generator=gen),
        "prompt_embeds_mask": torch.ones(1, 7, dtype=torch.long),
        "negative_prompt_embeds": torch.randn(1, 7, 16, generator=gen),
        "negative_prompt_embeds_mask": torch.ones(1, 7, dtype=torch.long),
        "img_shapes": [[(1, 4, 4)]],  # per batch item: (frames, H/2, W/2) of the packed latents
    }
    return _Recipe(
        block=QwenImageDenoiseStep(),
        components={"transformer": transformer, "scheduler": FlowMatchEulerDiscreteScheduler(),
                    "guider": ClassifierFreeGuidance(guidance_scale=4.0)},
        inputs={"latents": torch.randn(1, 16, 16, generator=gen), **fields},  # [B, 4x4 tokens, 4 ch x 2x2]
        kwargs_types={name: DENOISER_FIELDS for name in fields},
        begin_index=0,  # as QwenImageSetTimestepsStep does
    )


DIFFUSERS_LOOPS: dict[str, Callable[[int, torch.Generator], _Recipe]] = {
    "sdxl": _sdxl,
    "flux": _flux,
    "wan": _wan,
    "qwenimage": _qwenimage,
}


def build_diffusers_loop(name: str, *, steps: int = 8, seed: int = 0, progress: bool = False) -> DiffusersLoopSetup:
    """Build a real diffusers denoise loop offline: its wrapper, a ``ModularPipeline`` with tiny seeded
    components, and a ready diffusers ``PipelineState``.

    Args:
        name: one of ``DIFFUSERS_LOOPS`` ("sdxl", "flux", "wan", "qwenimage").
        steps: number of denoising steps N.
        seed: seeds the model weights and the inputs (noise, embeddings).
        progress: show the wrapper's progress bar.

    Returns:
        A ``DiffusersLoopSetup``; run it as ``components, state = setup.wrapper(setup.components,
        setup.new_state())`` (schedulers are stateful: ``new_state()`` resets the timesteps).

    Example:
        >>> setup = build_diffusers_loop("flux", steps=4)
        >>> setup.run().shape
        torch.Size([1, 64, 4])
    """
    require_diffusers()
    if name not in DIFFUSERS_LOOPS:
        raise ValueError(f"unknown diffusers loop {name!r}; known: {sorted(DIFFUSERS_LOOPS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    recipe = DIFFUSERS_LOOPS[name](seed, torch.Generator().manual_seed(seed + 1))
    wrapper = recipe.block
    wrapper.set_progress_bar_config(disable=not progress)
    components = wrapper.init_pipeline()  # the model's ModularPipeline; no network with no repo id
    components.update_components(**recipe.components)
    setup = DiffusersLoopSetup(wrapper=wrapper, components=components, state=None, steps=steps,
                               device=torch.device("cpu"), inputs=recipe.inputs,
                               kwargs_types=recipe.kwargs_types, begin_index=recipe.begin_index)
    setup.state = setup.new_state()
    return setup
