"""compile_loop on diffusers' own denoise steps: SDXL (Euler, CFG), Flux (flow-matching Euler), Wan (UniPC,
CFG) and QwenImage (flow-matching Euler, CFG), built offline from tiny configs with seeded random weights.

Equality with diffusers' eager run first (latents, the returned state, the scheduler's and guider's Python
state), then the same inside a diffusers ModularPipeline, then compile counts and Python calls per step with
Inductor. The equivalence tests use backend="eager" (the same trace -> analyse -> lower pipeline, run by
Dynamo's eager backend) to keep the suite short. Skipped when diffusers is not installed.
"""

import copy
import importlib.util
import subprocess
import sys
import warnings

import pytest
import torch
import torch._dynamo.utils as dynamo_utils

from loopgraph import compile_loop
from loopgraph.bench.measure import count_python_calls
from loopgraph.compile import matches_eager
from loopgraph.runtime import executables

from .helpers import assert_same, python_state

needs_diffusers = pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None,
    reason="diffusers is not installed (pip install loopgraph[diffusers]; `make test` installs it)",
)
LOOPS = ["sdxl", "flux", "wan", "qwenimage"]


def eager_reference(setup):
    """diffusers' own run: the returned state and the components' Python state after it."""
    _, state = setup.wrapper(setup.components, setup.new_state())
    return state, python_state(setup)


def no_fallback_warnings(caught) -> None:
    assert not [w for w in caught if "compile_loop" in str(w.message)], [str(w.message) for w in caught]


# -- equality with diffusers' eager run ----------------------------------------------------------------------------
@needs_diffusers
@pytest.mark.parametrize("name", LOOPS)
def test_compiled_matches_diffusers_eager(name):
    from loopgraph.zoo.diffusers_loops import build_diffusers_loop

    setup = build_diffusers_loop(name, steps=5)
    expected_state, expected_python = eager_reference(setup)
    fast = compile_loop(setup.wrapper, backend="eager")
    dynamo_utils.counters.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):  # the call that plans (a traced eager run), then compiled calls
            _, state = fast(setup.components, setup.new_state())
            assert_same(state.values, expected_state.values, "values")
            assert state.kwargs_mapping == expected_state.kwargs_mapping
            assert_same(python_state(setup), expected_python)  # step index, UniPC history, guider step
    no_fallback_warnings(caught)
    assert fast.stats.compiled_calls == 2 and fast.stats.plans == 1
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1  # Dynamo's own count: the repeat compiled nothing
    sites = fast.last_plan.batching  # the guider's two denoiser calls per step run as one batched call
    if name == "flux":  # one call per step: nothing to batch
        assert sites == ()
    else:
        (site,) = sites
        assert site.calls == 2 and site.batched_steps == (0, 1, 2, 3, 4) and site.block == "denoiser"


@needs_diffusers
def test_unipc_history_is_loop_state_and_step_graphs_do_not_grow_with_n():
    from loopgraph.zoo.diffusers_loops import build_diffusers_loop

    variants = {}
    for steps in (6, 12):
        setup = build_diffusers_loop("wan", steps=steps)
        expected_state, expected_python = eager_reference(setup)
        fast = compile_loop(setup.wrapper, backend="eager")
        for _ in range(2):
            _, state = fast(setup.components, setup.new_state())
        assert matches_eager(state.get("latents"), expected_state.get("latents"))
        assert_same(python_state(setup), expected_python)
        slots = fast.last_plan.slots
        assert slots["scheduler.model_outputs[1]"].role == "carried"
        assert slots["scheduler.last_sample"].role == "carried"
        variants[steps] = len(fast.last_plan.variants)
    assert variants[6] == variants[12] <= 4, variants  # first, second (order warm-up), middle, last


@needs_diffusers
def test_a_new_generator_per_call_reuses_the_plan():
    """SDXL's loop reads `generator` (for scheduler.step): a fresh generator each call is not a new plan."""
    from loopgraph.zoo.diffusers_loops import build_diffusers_loop

    setup = build_diffusers_loop("sdxl", steps=2)
    fast = compile_loop(setup.wrapper, backend="eager")
    for seed in (0, 1, 2):
        state = setup.new_state()
        state.set("generator", torch.Generator().manual_seed(seed))
        _, state = fast(setup.components, state)
        expected = setup.wrapper(setup.components, setup.new_state())[1].get("latents")
        assert matches_eager(state.get("latents"), expected)
    assert fast.stats.plans == 1 and fast.stats.compiled_calls == 2


@needs_diffusers
@pytest.mark.parametrize("name", ["sdxl", "qwenimage"])
def test_new_prompt_embeddings_reuse_the_plan(name):
    """These loops also get their embeddings in a dict input (`denoiser_input_fields`); new prompts are new
    values of the same tensors, not a new plan (they used to be: one traced eager call per prompt)."""
    from loopgraph.zoo.diffusers_loops import build_diffusers_loop

    setup = build_diffusers_loop(name, steps=2)
    fast = compile_loop(setup.wrapper, backend="eager")
    fast(setup.components, setup.new_state())
    gen = torch.Generator().manual_seed(7)
    for _ in range(2):
        for k, v in list(setup.inputs.items()):
            if "embeds" in k and v.is_floating_point():  # not the masks
                setup.inputs[k] = torch.randn(v.shape, generator=gen, dtype=v.dtype)
        expected = setup.wrapper(setup.components, setup.new_state())[1].get("latents")
        _, state = fast(setup.components, setup.new_state())
        assert matches_eager(state.get("latents"), expected)
    assert fast.stats.plans == 1 and fast.stats.compiled_calls == 2


@needs_diffusers
def test_random_op_in_scheduler_runs_that_block_eagerly_and_matches():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from loopgraph.zoo.diffusers_loops import build_diffusers_loop

    setup = build_diffusers_loop("flux", steps=3)
    setup.components.update_components(scheduler=FlowMatchEulerDiscreteScheduler(stochastic_sampling=True))
    torch.manual_seed(0)
    expected = setup.run()
    fast = compile_loop(setup.wrapper, backend="eager")
    for k in range(2):
        torch.manual_seed(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, state = fast(setup.components, setup.new_state())
        if k == 0:
            assert any("random op `randn`" in str(w.message) and "'after_denoiser' run eagerly each step"
                       in str(w.message) for w in caught), [str(w.message) for w in caught]
        assert torch.equal(state.get("latents"), expected)  # the eager block draws eager's noise
    assert fast.stats.compiled_calls == 1 and fast.stats.eager_blocks == 1
    assert "eager after_denoiser" in fast.explain()


@needs_diffusers
def test_counter_rng_compiles_diffusers_stochastic_sampling_whole():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from loopgraph.rng import eager_loop
    from loopgraph.zoo.diffusers_loops import build_diffusers_loop

    setup = build_diffusers_loop("flux", steps=3)
    setup.components.update_components(scheduler=FlowMatchEulerDiscreteScheduler(stochastic_sampling=True))
    fast = compile_loop(setup.wrapper, backend="eager", rng="counter")
    for seed in (0, 1, 0):
        torch.manual_seed(seed)
        expected = eager_loop(setup.wrapper, setup.components, setup.new_state())[1].get("latents")
        torch.manual_seed(seed)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing falls back, nothing runs eagerly
            _, state = fast(setup.components, setup.new_state())
        assert matches_eager(state.get("latents"), expected), seed
    assert fast.stats.compiled_calls == 2 and fast.stats.eager_blocks == 0 and fast.stats.segment_calls == 0
    assert "randn" not in str(fast.graph.code) and "counter_draw" in str(fast.graph.code)


@needs_diffusers
def test_counter_rng_compiles_sdxl_with_euler_ancestral_and_a_generator_per_call():
    """EulerAncestral draws from the `generator` SDXL's block passes to scheduler.step: each call's own."""
    from diffusers import EulerAncestralDiscreteScheduler

    from loopgraph.rng import eager_loop
    from loopgraph.zoo.diffusers_loops import build_diffusers_loop

    setup = build_diffusers_loop("sdxl", steps=3)
    config = setup.components.scheduler.config
    setup.components.update_components(scheduler=EulerAncestralDiscreteScheduler.from_config(config))
    fast = compile_loop(setup.wrapper, backend="eager", rng="counter")

    def state(seed):
        s = setup.new_state()
        s.set("generator", torch.Generator().manual_seed(seed))
        return s

    results = []
    for seed in (0, 1, 0):
        expected = eager_loop(setup.wrapper, setup.components, state(seed))[1].get("latents")
        results.append(fast(setup.components, state(seed))[1].get("latents"))
        assert matches_eager(results[-1], expected), seed
    # the same generator state: the same noise (the traced call and a compiled one: equal up to the batched
    # model call's rounding); another seed: other noise
    assert matches_eager(results[2], results[0]) and not torch.allclose(results[0], results[1])
    assert fast.stats.plans == 1 and fast.stats.compiled_calls == 2 and fast.stats.segment_calls == 0
    assert "drawn per call from the generator in input 'generator'" in fast.explain()


# -- inside a diffusers ModularPipeline, in place of the original sub-block -------------------------------------------
def _set_timesteps_step(name):
    from diffusers.modular_pipelines.flux.before_denoise import FluxSetTimestepsStep
    from diffusers.modular_pipelines.qwenimage.before_denoise import QwenImageSetTimestepsStep
    from diffusers.modular_pipelines.stable_diffusion_xl.before_denoise import StableDiffusionXLSetTimestepsStep
    from diffusers.modular_pipelines.wan.before_denoise import WanSetTimestepsStep

    steps = {"sdxl": (StableDiffusionXLSetTimestepsStep, {}),
             "flux": (FluxSetTimestepsStep, {"batch_size": 1, "height": 64, "width": 64}),
             "wan": (WanSetTimestepsStep, {}), "qwenimage": (QwenImageSetTimestepsStep, {})}
    block, extra = steps[name]
    return block(), extra


@needs_diffusers
@pytest.mark.parametrize("name", LOOPS)
def test_drop_in_inside_a_diffusers_modular_pipeline(name):
    from diffusers.modular_pipelines import SequentialPipelineBlocks

    from loopgraph.zoo.diffusers_loops import build_diffusers_loop

    setup = build_diffusers_loop(name, steps=3)
    kwargs = setup.pipeline_kwargs()
    del kwargs["timesteps"]  # the set-timesteps step makes them (and resets the scheduler) on every call

    def pipeline(denoise_compiled: bool):
        set_timesteps, extra = _set_timesteps_step(name)
        blocks = SequentialPipelineBlocks.from_blocks_dict({"set_timesteps": set_timesteps, "denoise": setup.wrapper})
        if denoise_compiled:
            blocks.sub_blocks["denoise"] = compile_loop(blocks.sub_blocks["denoise"], backend="eager")
        pipe = blocks.init_pipeline()
        pipe.update_components(**setup.components.components)
        return pipe, {**kwargs, **extra}

    eager, call_kwargs = pipeline(denoise_compiled=False)
    expected = eager(**call_kwargs, output="latents")
    pipe, _ = pipeline(denoise_compiled=True)
    for _ in range(3):
        assert matches_eager(pipe(**call_kwargs, output="latents"), expected)
    fast = pipe._blocks.sub_blocks["denoise"]  # the pipeline's own (deep) copy of the compiled loop
    assert fast.stats.compiled_calls == 2 and fast.stats.plans == 1


# -- Inductor: compiled once, no Python per step -------------------------------------------------------------------------
@needs_diffusers
@pytest.mark.parametrize("name", LOOPS)
def test_inductor_compiles_once_and_runs_no_python_per_step(name, monkeypatch):
    from loopgraph.zoo.diffusers_loops import build_diffusers_loop
    monkeypatch.setattr(executables, "CHUNK_SECONDS", 1e9)  # one chunk per call: Python per step, not per chunk

    setup = build_diffusers_loop(name, steps=8)
    fast = compile_loop(setup.wrapper)
    dynamo_utils.counters.clear()
    per_n = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for steps in (8, 32):
            setup.steps = steps
            expected_state, expected_python = eager_reference(setup)
            for _ in range(2):  # plan (and compile, for the first N), then a compiled call
                _, state = fast(setup.components, setup.new_state())
            # Inductor's float reassociation: the tolerance is scaled by the latents' magnitude (see below)
            assert matches_eager(state.get("latents"), expected_state.get("latents"))
            assert_same(python_state(setup), expected_python)
    no_fallback_warnings(caught)
    assert fast.stats.compiled_calls == 2  # the second call at each N ran the compiled loop
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1  # Dynamo's own count: N=32 compiled nothing
    for steps in (8, 32):  # both plans exist now: each warm call finds its plan the same way
        setup.steps = steps
        state = setup.new_state()
        per_n[steps] = count_python_calls(lambda: fast(setup.components, state))
        assert matches_eager(state.get("latents"), setup.run())
    assert per_n[8] == per_n[32], per_n
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1 and fast.stats.compiles == 1


@pytest.mark.slow  # a fact about torch.compile (no loopgraph code runs): `make test-all`
@needs_diffusers
def test_inductors_own_sdxl_unet_is_outside_the_elementwise_tolerance_but_matches_eager():
    """Why compiled results are compared with ``matches_eager``: ``torch.compile`` of SDXL's UNet alone, in
    diffusers' eager loop (no loopgraph involved), already differs from eager by more than an elementwise
    rtol=1e-4/atol=1e-5 on the small elements of magnitude-11 latents."""
    from loopgraph.zoo.diffusers_loops import build_diffusers_loop

    setup = build_diffusers_loop("sdxl", steps=8)
    expected = setup.run()
    unet = setup.components.unet
    torch._dynamo.reset()
    unet.forward = torch.compile(unet.forward)
    try:
        got = setup.run()
    finally:
        del unet.forward  # the class's forward again
    assert not torch.equal(got, expected)
    assert matches_eager(got, expected), (got - expected).abs().max()


# -- diffusers stays optional ------------------------------------------------------------------------------------------
def test_import_loopgraph_does_not_import_diffusers():
    code = ("import sys, loopgraph, loopgraph.zoo.loops, loopgraph.zoo.diffusers_loops; "
            "assert 'diffusers' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_builders_say_how_to_install_diffusers_when_absent():
    code = ("import sys; sys.modules['diffusers'] = None\n"  # makes `import diffusers` raise ImportError
            "from loopgraph.zoo.diffusers_loops import build_diffusers_loop\n"
            "try:\n    build_diffusers_loop('flux')\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert "pip install loopgraph[diffusers]" in out
