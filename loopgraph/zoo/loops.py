"""Reference denoising loops, written in the diffusers idiom on purpose.

Python int ``i``, ``t`` taken from a timesteps tensor, stateful schedulers with Python step counters and
CPU sigma tables, a guider that runs the model once per guidance batch, a first-step branch on ``i``:
this is what users' loops look like, and what ``compile_loop`` has to handle.

    before_denoiser: on step 0 scale the initial noise; scaled_latents = scheduler.scale_model_input(...)
    denoiser:        guider.set_state(i); one model call per guidance batch; noise_pred = guider(batches)
    after_denoiser:  latents = scheduler.step(noise_pred, t, latents)

``build_loop(preset)`` returns the wrapper, its components (a ``ModularPipeline``) and a ready state.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..modular_pipelines.blocks import ModularPipelineBlocks
from ..modular_pipelines.loop_blocks import LoopSequentialPipelineBlocks
from ..modular_pipelines.pipeline import ModularPipeline
from ..modular_pipelines.state import ComponentSpec, InputParam, OutputParam, PipelineState
from .guidance import ClassifierFreeGuidance
from .models import build_denoiser
from .schedulers import build_scheduler

__all__ = [
    "LoopBeforeDenoiser",
    "LoopDenoiser",
    "LoopAfterDenoiser",
    "DenoiseLoopWrapper",
    "DenoiseLoop",
    "LoopPreset",
    "PRESETS",
    "LoopSetup",
    "build_loop",
]


class LoopBeforeDenoiser(ModularPipelineBlocks):
    model_name = "loopgraph-zoo"

    @property
    def description(self) -> str:
        return "Scales the initial noise on the first step, then the model input for this step's timestep."

    @property
    def expected_components(self) -> list[ComponentSpec]:
        return [ComponentSpec("scheduler")]

    @property
    def inputs(self) -> list[InputParam]:
        return [
            InputParam("latents", required=True, type_hint=torch.Tensor),
            InputParam("scale_initial_noise", default=True, type_hint=bool,
                       description="multiply the latents by scheduler.init_noise_sigma on step 0"),
        ]

    def __call__(self, components, block_state, i: int, t: torch.Tensor):
        if i == 0 and block_state.scale_initial_noise:
            block_state.latents = block_state.latents * components.scheduler.init_noise_sigma
        block_state.scaled_latents = components.scheduler.scale_model_input(block_state.latents, t)
        return components, block_state


class LoopDenoiser(ModularPipelineBlocks):
    model_name = "loopgraph-zoo"

    @property
    def description(self) -> str:
        return "Runs the denoiser once per guidance batch and combines the predictions with the guider."

    @property
    def expected_components(self) -> list[ComponentSpec]:
        return [
            ComponentSpec("denoiser", torch.nn.Module),
            ComponentSpec("guider", ClassifierFreeGuidance, config={"guidance_scale": 4.0},
                          default_creation_method="from_config"),
        ]

    @property
    def inputs(self) -> list[InputParam]:
        return [
            InputParam("prompt_embeds", required=True, type_hint=torch.Tensor, description="[B, L, text_dim]"),
            InputParam("negative_prompt_embeds", type_hint=torch.Tensor, description="[B, L, text_dim]"),
            InputParam("num_inference_steps", required=True, type_hint=int),
        ]

    def __call__(self, components, block_state, i: int, t: torch.Tensor):
        guider = components.guider
        guider.set_state(step=i, num_inference_steps=block_state.num_inference_steps, timestep=t)
        batches = guider.prepare_inputs(
            {"context": (block_state.prompt_embeds, block_state.negative_prompt_embeds)}
        )
        for batch in batches:
            # scaled_latents: [B, C, H, W], context: [B, L, text_dim]
            batch.noise_pred = components.denoiser(block_state.scaled_latents, t, batch.context)
        block_state.noise_pred = guider(batches)
        return components, block_state


class LoopAfterDenoiser(ModularPipelineBlocks):
    model_name = "loopgraph-zoo"

    @property
    def description(self) -> str:
        return "Advances the latents with the scheduler."

    @property
    def expected_components(self) -> list[ComponentSpec]:
        return [ComponentSpec("scheduler")]

    @property
    def inputs(self) -> list[InputParam]:
        return [
            InputParam("latents", required=True, type_hint=torch.Tensor),
            InputParam("generator", type_hint=torch.Generator,
                       description="draws a stochastic scheduler's noise (DDIM with eta > 0); None: the global RNG"),
        ]

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return [OutputParam("latents", type_hint=torch.Tensor, description="the denoised latents")]

    def __call__(self, components, block_state, i: int, t: torch.Tensor):
        block_state.latents = components.scheduler.step(
            block_state.noise_pred, t, block_state.latents, return_dict=False, generator=block_state.generator
        )[0]
        return components, block_state


class DenoiseLoopWrapper(LoopSequentialPipelineBlocks):
    """The diffusers loop-wrapper pattern: one ``loop_step`` per timestep, with a progress bar."""

    model_name = "loopgraph-zoo"

    @property
    def description(self) -> str:
        return "Denoising loop: runs the loop blocks once per timestep."

    @property
    def loop_expected_components(self) -> list[ComponentSpec]:
        return [ComponentSpec("scheduler")]

    @property
    def loop_inputs(self) -> list[InputParam]:
        return [
            InputParam("timesteps", required=True, type_hint=torch.Tensor),
            InputParam("num_inference_steps", required=True, type_hint=int),
        ]

    @torch.no_grad()
    def __call__(self, components, state: PipelineState):
        block_state = self.get_block_state(state)
        order = getattr(components.scheduler, "order", 1)
        num_warmup_steps = max(len(block_state.timesteps) - block_state.num_inference_steps * order, 0)
        with self.progress_bar(total=block_state.num_inference_steps) as progress_bar:
            for i, t in enumerate(block_state.timesteps):
                components, block_state = self.loop_step(components, block_state, i=i, t=t)
                if i == len(block_state.timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % order == 0):
                    progress_bar.update()
        self.set_block_state(state, block_state)
        return components, state


class DenoiseLoop(DenoiseLoopWrapper):
    block_classes = [LoopBeforeDenoiser, LoopDenoiser, LoopAfterDenoiser]
    block_names = ["before_denoiser", "denoiser", "after_denoiser"]


@dataclass(frozen=True)
class LoopPreset:
    """A named zoo loop: which denoiser, scheduler and guidance scale."""

    denoiser: str
    scheduler: str
    guidance_scale: float
    description: str


PRESETS: dict[str, LoopPreset] = {
    "dit": LoopPreset("dit", "flow_euler", 4.0, "tiny DiT, flow-matching Euler, CFG 4 (the default)"),
    "dit-ddim": LoopPreset("dit", "ddim", 4.0, "tiny DiT, DDIM (epsilon prediction), CFG 4"),
    "unet": LoopPreset("unet", "euler", 5.0, "small conv UNet, Euler in sigma space, CFG 5"),
    "unet-ddim": LoopPreset("unet", "ddim", 5.0, "small conv UNet, DDIM, CFG 5"),
}


@dataclass
class LoopSetup:
    """What ``build_loop`` returns: run it as ``components, state = wrapper(components, state)``.

    Schedulers are stateful (as in diffusers): call ``new_state()`` before every further run; it resets the
    scheduler's timesteps and returns a fresh state holding the same inputs.
    """

    wrapper: DenoiseLoop
    components: ModularPipeline
    state: PipelineState
    steps: int
    device: torch.device
    inputs: dict[str, Any] = field(default_factory=dict)

    def new_state(self, reset: bool = True) -> PipelineState:
        """A fresh state with the same inputs; ``reset=False`` leaves the scheduler as it is (as a caller
        who forgot ``set_timesteps`` would)."""
        scheduler = self.components.scheduler
        if reset:
            scheduler.set_timesteps(self.steps, device=self.device)
        state = PipelineState()
        for name, value in self.inputs.items():
            state.set(name, value)
        state.set("timesteps", scheduler.timesteps)
        state.set("num_inference_steps", self.steps)
        return state

    def run(self) -> torch.Tensor:
        """One eager run from a fresh state; returns the final latents."""
        _, state = self.wrapper(self.components, self.new_state())
        return state.get("latents")


def build_loop(
    preset: str = "dit",
    *,
    steps: int = 20,
    batch: int = 1,
    sample_size: int | None = None,
    scheduler: str | None = None,
    guidance_scale: float | None = None,
    guidance_window: tuple[float, float] = (0.0, 1.0),
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
    **model_overrides: Any,
) -> LoopSetup:
    """Build a zoo loop: wrapper, components and a ready state, all from seeded random weights.

    Args:
        preset: one of ``PRESETS`` ("dit" is the default: tiny DiT, flow-matching Euler, CFG 4).
        steps: number of denoising steps N.
        batch: batch size B (the guider runs the model once per guidance batch of size B).
        sample_size: latent height and width (the model config's default when None).
        scheduler / guidance_scale: override the preset's ("flow_euler", "euler", "ddim"; 1.0 = no CFG).
        guidance_window: CFG is applied on steps in ``[start*N, stop*N)``.
        seed: seeds the model weights and the inputs (noise, embeddings).
        progress: show the loop's progress bar.
        **model_overrides: other denoiser config fields (e.g. ``hidden_dim=128, depth=4``).

    Example:
        >>> setup = build_loop("dit", steps=8)
        >>> _, state = setup.wrapper(setup.components, setup.state)
        >>> state.latents.shape
        torch.Size([1, 4, 16, 16])
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known presets: {sorted(PRESETS)}")
    if steps < 1 or batch < 1:
        raise ValueError(f"steps and batch must be >= 1, got steps={steps}, batch={batch}")
    spec = PRESETS[preset]
    device = torch.device(device)
    if sample_size is not None:
        model_overrides["sample_size"] = sample_size
    denoiser = build_denoiser(spec.denoiser, seed=seed, dtype=dtype, device=device, **model_overrides)
    cfg = denoiser.config
    wrapper = DenoiseLoop()
    wrapper.set_progress_bar_config(disable=not progress)
    components = wrapper.init_pipeline()
    start, stop = guidance_window
    components.update_components(
        denoiser=denoiser,
        scheduler=build_scheduler(scheduler or spec.scheduler),
        guider=ClassifierFreeGuidance(spec.guidance_scale if guidance_scale is None else guidance_scale,
                                      start=start, stop=stop),
    )
    gen = torch.Generator().manual_seed(seed + 1)  # inputs drawn on CPU so every device sees the same values
    shape = (batch, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    inputs = {
        "latents": torch.randn(shape, generator=gen).to(device=device, dtype=dtype),
        "prompt_embeds": torch.randn(batch, cfg.text_len, cfg.text_dim, generator=gen).to(device=device, dtype=dtype),
        "negative_prompt_embeds": torch.zeros(batch, cfg.text_len, cfg.text_dim, device=device, dtype=dtype),
    }
    setup = LoopSetup(wrapper=wrapper, components=components, state=PipelineState(), steps=steps, device=device,
                      inputs=inputs)
    setup.state = setup.new_state()
    return setup
