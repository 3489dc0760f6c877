"""The quick start's loop (docs/getting-started.md): classifier-free guidance and a flow-matching Euler step.

Benchmark it from this folder with ``loopgraph bench --loop my_loop:setup --quick``.
"""

import types

import torch

from loopgraph.modular_pipelines import (
    ComponentSpec, InputParam, LoopSequentialPipelineBlocks, ModularPipelineBlocks, OutputParam, PipelineState,
)


class TinyDenoiser(torch.nn.Module):  # stands in for a UNet or a DiT
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 64), torch.nn.SiLU(), torch.nn.Linear(64, dim))

    def forward(self, latents, t, prompt_embeds):  # latents, prompt_embeds: [B, dim]; t: a 0-d tensor
        return self.mlp(latents + t * prompt_embeds)


class Denoise(ModularPipelineBlocks):  # CFG: the model once with the prompt, once without
    expected_components = [ComponentSpec("denoiser", torch.nn.Module)]
    inputs = [InputParam("latents", required=True), InputParam("prompt_embeds", required=True),
              InputParam("negative_prompt_embeds", required=True), InputParam("guidance_scale", default=4.0)]
    intermediate_outputs = [OutputParam("noise_pred")]

    def __call__(self, components, block_state, i: int, t: torch.Tensor):
        cond = components.denoiser(block_state.latents, t, block_state.prompt_embeds)
        uncond = components.denoiser(block_state.latents, t, block_state.negative_prompt_embeds)
        block_state.noise_pred = uncond + block_state.guidance_scale * (cond - uncond)
        return components, block_state


class Step(ModularPipelineBlocks):  # flow-matching Euler: from noise level t to the next one
    inputs = [InputParam("latents", required=True), InputParam("noise_pred", required=True)]
    intermediate_outputs = [OutputParam("latents")]

    def __call__(self, components, block_state, i: int, t: torch.Tensor):
        block_state.latents = block_state.latents + (block_state.sigmas[i + 1] - t) * block_state.noise_pred
        return components, block_state


class DenoiseLoop(LoopSequentialPipelineBlocks):
    block_classes = [Denoise, Step]
    block_names = ["denoise", "step"]
    loop_inputs = [InputParam("sigmas", required=True)]  # noise levels from 1 to 0: N steps take N + 1

    @torch.no_grad()
    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        for i, t in enumerate(block_state.sigmas[:-1]):
            components, block_state = self.loop_step(components, block_state, i=i, t=t)
        self.set_block_state(state, block_state)
        return components, state


def make_state(steps: int = 20) -> PipelineState:
    """A fresh state: a value for each of the wrapper's inputs (``DenoiseLoop().inputs``)."""
    g = torch.Generator().manual_seed(0)
    state = PipelineState()
    state.set("latents", torch.randn(2, 16, generator=g))        # [batch, dim]
    state.set("prompt_embeds", torch.randn(2, 16, generator=g))
    state.set("negative_prompt_embeds", torch.zeros(2, 16))
    state.set("sigmas", torch.linspace(1.0, 0.0, steps + 1))
    return state


def setup():
    """What ``loopgraph bench --loop my_loop:setup`` calls: (wrapper, components, make_state). The components are
    what the blocks read as ``components.denoiser``; the bench compares methods by the state's "latents"."""
    torch.manual_seed(0)
    return DenoiseLoop(), types.SimpleNamespace(denoiser=TinyDenoiser()), make_state
