"""``compile_pipeline``: every loop wrapper nested in a pipeline's blocks compiled in place, in one line.

Equality with the eager pipeline first, then what is found (every branch, diffusers' preset block trees), that it
is idempotent, the no-loop warning, the log lines and ``loopgraph.explain``.
"""

import copy
import importlib.util
import logging

import pytest
import torch
import torch._dynamo.utils as dynamo_utils

import loopgraph
from loopgraph import AutoPipelineBlocks, CompiledLoop, SequentialPipelineBlocks, compile_pipeline, compiled_loops
from loopgraph.verify import matches_eager
from loopgraph.zoo.loops import DenoiseLoop, LoopBeforeDenoiser, build_loop

needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None,
                                     reason="diffusers is not installed (pip install loopgraph[diffusers])")


class Branches(AutoPipelineBlocks):
    """Two loops, one per branch: a call takes one of them, compile_pipeline compiles both."""

    block_classes = [DenoiseLoop, DenoiseLoop]
    block_names = ["masked", "plain"]
    block_trigger_inputs = ["mask", None]


def zoo_pipeline(steps=3):
    setup = build_loop("unet", steps=steps, sample_size=8)
    blocks = SequentialPipelineBlocks.from_blocks_dict({"denoise": copy.deepcopy(setup.wrapper)})
    pipe = blocks.init_pipeline()
    pipe.update_components(**setup.components.components)
    return setup, pipe


def run(setup, pipe, steps=3):
    setup.components.scheduler.set_timesteps(steps)
    pipe.update_components(scheduler=setup.components.scheduler)
    return pipe(latents=setup.inputs["latents"], prompt_embeds=setup.inputs["prompt_embeds"],
                negative_prompt_embeds=setup.inputs["negative_prompt_embeds"],
                timesteps=setup.components.scheduler.timesteps, num_inference_steps=steps, output="latents")


def test_a_compiled_pipeline_equals_the_eager_pipeline_and_runs_its_loop_compiled():
    setup, pipe = zoo_pipeline()
    expected = run(setup, pipe)
    assert compile_pipeline(pipe, backend="eager") is pipe
    torch._dynamo.reset()  # an identical loop compiled by an earlier test would be found in Dynamo's cache
    dynamo_utils.counters.clear()
    for _ in range(3):
        assert matches_eager(run(setup, pipe), expected)
    (site,) = compiled_loops(pipe)
    assert site.path == "denoise" and site.kind == "loop" and isinstance(site.compiled, CompiledLoop)
    assert pipe._blocks.sub_blocks["denoise"] is site.compiled  # in the live tree, not a copy
    assert site.compiled.stats.compiled_calls == 2  # the first call traced, the others ran compiled
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1  # Dynamo's own count: compiled once


def test_every_branch_is_compiled_and_compiling_again_changes_nothing():
    blocks = SequentialPipelineBlocks.from_blocks_dict(
        {"prepare": LoopBeforeDenoiser(), "branch": Branches(), "denoise": DenoiseLoop()})
    compile_pipeline(blocks, backend="eager")
    sites = compiled_loops(blocks)
    assert [s.path for s in sites] == ["branch.masked", "branch.plain", "denoise"]
    loops = [s.compiled for s in sites]
    compile_pipeline(blocks, backend="eager")
    assert [s.compiled for s in compiled_loops(blocks)] == loops  # the same objects: nothing compiled twice
    assert isinstance(blocks.sub_blocks["prepare"], LoopBeforeDenoiser)  # leaf blocks are left alone


def test_no_loop_warns_naming_what_it_searched():
    blocks = SequentialPipelineBlocks.from_blocks_dict({"prepare": LoopBeforeDenoiser()})
    with pytest.warns(UserWarning, match=r"no loop wrapper found in SequentialPipelineBlocks; searched <root> "
                                         r"\(SequentialPipelineBlocks\)"):
        compile_pipeline(blocks)
    assert compiled_loops(blocks) == []
    with pytest.warns(UserWarning, match="encoders=/decoder= compile a pipeline's components"):
        compile_pipeline(SequentialPipelineBlocks.from_blocks_dict({"denoise": DenoiseLoop()}), encoders=True)
    with pytest.raises(TypeError, match="expects a ModularPipeline or pipeline blocks"):
        compile_pipeline(torch.nn.Linear(2, 2))


def test_a_pipeline_whose_blocks_are_a_loop_wrapper_has_that_loop_compiled():
    setup = build_loop("unet", steps=3, sample_size=8)
    pipe = copy.deepcopy(setup.wrapper).init_pipeline()
    pipe.update_components(**setup.components.components)
    expected = run(setup, pipe)
    assert compile_pipeline(pipe, backend="eager") is pipe
    (site,) = compiled_loops(pipe)
    assert site.path == "<root>" and pipe._blocks is site.compiled  # the pipeline's blocks are now the compiled loop
    for _ in range(2):
        assert matches_eager(run(setup, pipe), expected)
    assert site.compiled.stats.compiled_calls == 1  # the first call traced, the second ran compiled
    assert compile_pipeline(pipe) is pipe and compiled_loops(pipe)[0].compiled is site.compiled  # nothing twice


def test_a_bare_loop_wrapper_is_returned_compiled():
    wrapper = DenoiseLoop()
    fast = compile_pipeline(wrapper, backend="eager")
    assert isinstance(fast, CompiledLoop) and fast.wrapper is wrapper and fast.config.backend == "eager"
    assert compile_pipeline(fast) is fast
    assert [(s.path, s.compiled) for s in compiled_loops(fast)] == [("<root>", fast)]
    with pytest.warns(UserWarning, match="encoders=/decoder= compile a pipeline's components"):
        compile_pipeline(DenoiseLoop(), decoder=True)


def test_explain_finds_a_compiled_loop_that_is_the_pipelines_blocks():
    pipe = loopgraph.compile_loop(DenoiseLoop(), backend="eager").init_pipeline()
    (site,) = compiled_loops(pipe)
    assert site.path == "<root>" and site.kind == "loop" and site.compiled is pipe._blocks
    assert loopgraph.explain(pipe) == ("ModularPipeline: 1 compiled\n"
                                       "  <root>: DenoiseLoop -> not called yet (its first call traces and compiles)")


def test_first_call_logs_when_tracing_starts_and_ends_and_explain_lists_the_loops(caplog):
    setup, pipe = zoo_pipeline()
    compile_pipeline(pipe, backend="eager")
    assert "denoise: DenoiseLoop -> not called yet" in loopgraph.explain(pipe)
    with caplog.at_level(logging.INFO, logger="loopgraph"):
        run(setup, pipe)
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("loopgraph")]
    start = "compile_loop: denoise: tracing (one eager call) and planning, compiling"
    assert any(m.startswith(start) for m in messages)
    assert any(m.startswith("compile_loop: denoise: planned in ") and "whole loop on state buffers" in m
               for m in messages)
    run(setup, pipe)
    assert "denoise: DenoiseLoop -> whole loop on state buffers; calls=2 compiled_calls=1" in loopgraph.explain(pipe)


@needs_diffusers
@pytest.mark.parametrize("preset, loops", [
    ("StableDiffusionXLAutoBlocks", ["denoise.denoise.controlnet_denoise.inpaint_controlnet_denoise",
                                     "denoise.denoise.controlnet_denoise.controlnet_denoise",
                                     "denoise.denoise.inpaint_denoise", "denoise.denoise.denoise"]),
    ("FluxAutoBlocks", ["denoise.denoise"]),
    ("WanBlocks", ["denoise.denoise"]),
    ("QwenImageAutoBlocks", ["denoise.text2image.denoise", "denoise.inpaint.denoise", "denoise.img2img.denoise",
                             "denoise.controlnet_text2image.controlnet_denoise",
                             "denoise.controlnet_inpaint.controlnet_denoise",
                             "denoise.controlnet_img2img.controlnet_denoise"]),
])
def test_every_loop_of_diffusers_preset_blocks_is_found(preset, loops):
    import diffusers.modular_pipelines as modular

    blocks = getattr(modular, preset)()
    compile_pipeline(blocks, backend="eager")
    sites = compiled_loops(blocks)
    assert [s.path for s in sites] == loops
    assert all(isinstance(s.compiled.wrapper, modular.LoopSequentialPipelineBlocks) for s in sites)
    compile_pipeline(blocks, backend="eager")
    assert [s.compiled for s in compiled_loops(blocks)] == [s.compiled for s in sites]


# -- whole diffusers pipelines: prompt -> text encoders -> timesteps -> latents -> denoise -> VAE decode ----------
@needs_diffusers
@pytest.mark.parametrize("name, loop", [("sdxl", "denoise.denoise.denoise"), ("flux", "denoise.denoise")])
def test_a_whole_diffusers_pipeline_decodes_eagers_images(name, loop, tmp_path):
    from loopgraph.zoo.diffusers_pipelines import build_diffusers_pipeline

    setup = build_diffusers_pipeline(name, folder=tmp_path)
    expected = setup.run()
    assert expected.shape == (1, 3, 32, 32)
    compile_pipeline(setup.pipe, backend="eager")
    torch._dynamo.reset()  # an identical loop compiled by an earlier test would be found in Dynamo's cache
    dynamo_utils.counters.clear()
    for _ in range(3):
        assert matches_eager(setup.run(), expected)
    ran = {s.path: s.compiled for s in compiled_loops(setup.pipe) if s.compiled.stats.calls}
    assert list(ran) == [loop] and ran[loop].stats.compiled_calls == 2  # the second and third calls ran compiled
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1  # Dynamo's own count: the loop compiled once
    assert f"{loop}: " in loopgraph.explain(setup.pipe)


@needs_diffusers
def test_encoders_and_decoder_are_compiled_in_place_when_asked(tmp_path):
    from loopgraph.zoo.diffusers_pipelines import build_diffusers_pipeline

    setup = build_diffusers_pipeline("sdxl", folder=tmp_path)
    expected = setup.run()
    encoder, vae = setup.pipe.text_encoder, setup.pipe.vae
    compile_pipeline(setup.pipe, backend="eager", encoders=True, decoder=True)
    assert matches_eager(setup.run(), expected) and matches_eager(setup.run(), expected)
    assert setup.pipe.text_encoder is encoder and setup.pipe.vae is vae  # compiled in place
    assert encoder._compiled_call_impl is not None and vae.decoder._compiled_call_impl is not None
    kinds = {s.path: s.kind for s in compiled_loops(setup.pipe)}
    assert kinds["components.text_encoder"] == kinds["components.text_encoder_2"] == "encoder"
    assert kinds["components.vae.decoder"] == "decoder"
    assert "components.vae.decoder: Decoder (decoder, torch.compile in place)" in loopgraph.explain(setup.pipe)
