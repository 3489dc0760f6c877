"""The zoo loops: deterministic, sane denoising, guidance on/off/window, eager semantics of the wrapper."""

import pytest
import torch

from loopgraph import ModularPipeline, SequentialPipelineBlocks
from loopgraph.zoo.guidance import ClassifierFreeGuidance
from loopgraph.zoo.loops import PRESETS, DenoiseLoop, build_loop


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_runs_and_is_deterministic(preset):
    a = build_loop(preset, steps=3, seed=1)
    _, state = a.wrapper(a.components, a.state)
    out = state.get("latents")
    assert out.shape == a.inputs["latents"].shape and torch.isfinite(out).all()
    b = build_loop(preset, steps=3, seed=1)
    assert torch.equal(b.run(), out)
    assert not torch.equal(build_loop(preset, steps=3, seed=2).run(), out)
    assert a.components.scheduler.step_index == 3  # Python state advanced as eagerly as diffusers does


def test_wrapper_interface():
    w = DenoiseLoop()
    assert [p.name for p in w.inputs] == [
        "timesteps", "num_inference_steps", "latents", "scale_initial_noise", "prompt_embeds",
        "negative_prompt_embeds", "generator"]
    assert w.required_inputs == ["latents", "num_inference_steps", "prompt_embeds", "timesteps"]
    assert [o.name for o in w.intermediate_outputs] == ["latents"]
    assert [c.name for c in w.expected_components] == ["scheduler", "denoiser", "guider"]


def test_scratch_values_do_not_reach_the_state():
    setup = build_loop("dit", steps=2)
    _, state = setup.wrapper(setup.components, setup.state)
    # inputs whose value changed are written back: a default that was applied counts as a change
    assert set(state.values) == {"latents", "prompt_embeds", "negative_prompt_embeds", "timesteps",
                                 "num_inference_steps", "scale_initial_noise"}
    assert state.get("scale_initial_noise") is True
    assert state.get("latents") is not setup.inputs["latents"]


def test_rerun_needs_new_state_like_diffusers():
    setup = build_loop("dit", steps=2)
    setup.wrapper(setup.components, setup.state)
    with pytest.raises(ValueError, match="set_timesteps"):
        setup.wrapper(setup.components, setup.state)
    first = setup.run()
    assert torch.equal(setup.run(), first)


def count_calls(setup):
    calls = []
    model = setup.components.denoiser
    handle = model.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    setup.run()
    handle.remove()
    return len(calls)


def test_guidance_runs_model_once_per_batch_and_window():
    assert count_calls(build_loop("dit", steps=4)) == 8
    assert count_calls(build_loop("dit", steps=4, guidance_scale=1.0)) == 4
    assert count_calls(build_loop("dit", steps=4, guidance_window=(0.0, 0.5))) == 6  # steps 0, 1 guided


def test_guidance_off_equals_conditional_prediction_only():
    plain = build_loop("dit", steps=3, guidance_scale=1.0)
    setup = build_loop("dit", steps=3)
    setup.components.guider.disable()
    assert torch.equal(plain.run(), setup.run())


def test_guider_combine_and_errors():
    g = ClassifierFreeGuidance(3.0)
    g.set_state(step=0, num_inference_steps=2, timestep=torch.tensor(1.0))
    batches = g.prepare_inputs({"context": (torch.ones(1), torch.zeros(1))})
    assert [b["__guidance_identifier__"] for b in batches] == ["pred_cond", "pred_uncond"]
    batches[0].noise_pred, batches[1].noise_pred = torch.tensor([2.0]), torch.tensor([1.0])
    assert torch.equal(g(batches), torch.tensor([4.0]))  # 1 + 3 * (2 - 1)
    with pytest.raises(ValueError, match="needs unconditional inputs for \\['context'\\]"):
        g.prepare_inputs({"context": (torch.ones(1), None)})
    with pytest.raises(ValueError, match="guidance window"):
        ClassifierFreeGuidance(2.0, start=0.6, stop=0.5)


def test_loop_in_a_modular_pipeline_matches_direct_call():
    setup = build_loop("unet", steps=3)
    direct = setup.run()
    pipe = ModularPipeline(SequentialPipelineBlocks.from_blocks_dict({"denoise": setup.wrapper}))
    pipe.update_components(**setup.components.components)
    setup.components.scheduler.set_timesteps(3)
    out = pipe(latents=setup.inputs["latents"], prompt_embeds=setup.inputs["prompt_embeds"],
               negative_prompt_embeds=setup.inputs["negative_prompt_embeds"],
               timesteps=setup.components.scheduler.timesteps, num_inference_steps=3, output="latents")
    assert torch.equal(out, direct)


def test_error_in_loop_block_names_it():
    setup = build_loop("dit", steps=2)
    state = setup.new_state()
    state.set("prompt_embeds", torch.zeros(1, 3, 5))  # wrong text width
    with pytest.raises(ValueError, match=r"Error in block 'denoiser' \(LoopDenoiser\)"):
        setup.wrapper(setup.components, state)


def test_bad_preset_and_sizes():
    with pytest.raises(ValueError, match="unknown preset 'nope'; known presets"):
        build_loop("nope")
    with pytest.raises(ValueError, match="steps and batch must be >= 1"):
        build_loop(steps=0)


def test_loop_denoises_towards_a_known_target():
    """Drive the real wrapper with an analytic denoiser for a one-point data distribution: must hit it."""
    target = torch.linspace(-1, 1, 4 * 8 * 8).reshape(1, 4, 8, 8)

    class Oracle(torch.nn.Module):
        def __init__(self, scheduler):
            super().__init__()
            self.scheduler = scheduler

        def forward(self, x, t, context):  # flow matching: v = (x_t - x0) / sigma
            sigma = self.scheduler.sigmas[self.scheduler.step_index]
            return (x - target) / sigma

    setup = build_loop("dit", steps=6, sample_size=8, guidance_scale=1.0)
    setup.components.update_components(denoiser=Oracle(setup.components.scheduler))
    assert torch.allclose(setup.run(), target, atol=1e-5)
