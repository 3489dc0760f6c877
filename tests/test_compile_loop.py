"""compile_loop: equality with the eager wrapper first, then compile counts, Python calls, fallbacks, errors.

The equivalence matrix uses backend="eager" (the same trace -> analyse -> hoist -> lower pipeline, with
the lowered loop run by Dynamo's eager backend) so it stays fast; the Inductor tests at the end compile
for real and count compilations with Dynamo's own counters.
"""

import dataclasses
import warnings

import pytest
import torch

from loopgraph import InputParam, ModularPipelineBlocks, OutputParam, PipelineState
from loopgraph import SequentialPipelineBlocks, compile_loop
from loopgraph.bench.measure import count_python_calls
from loopgraph.compile import CompiledLoop, matches_eager
from loopgraph.runtime import executables
from loopgraph.zoo.loops import build_loop

from .helpers import Loop, Scale, run_loop


def eager_and_compiled(setup, fast, calls=3):
    """Latents from the eager wrapper and from each of `calls` calls of the compiled loop (fresh states)."""
    expected = setup.run()
    got = []
    for _ in range(calls):
        _, state = fast(setup.components, setup.new_state())
        got.append(state)
    return expected, got


@pytest.mark.parametrize("preset", ["dit", "unet", "dit-ddim"])
@pytest.mark.parametrize("scheduler", [None, "euler"])
@pytest.mark.parametrize("guidance", [4.0, 1.0])
@pytest.mark.parametrize("steps", [1, 3, 7])
def test_equivalence_matrix(preset, scheduler, guidance, steps):
    setup = build_loop(preset, steps=steps, scheduler=scheduler, guidance_scale=guidance, sample_size=8)
    fast = compile_loop(setup.wrapper, backend="eager")
    expected, states = eager_and_compiled(setup, fast)
    for state in states:
        assert matches_eager(state.get("latents"), expected)
        assert set(state.values) == {"latents", "prompt_embeds", "negative_prompt_embeds", "timesteps",
                                     "num_inference_steps", "scale_initial_noise"}
    assert fast.stats.compiled_calls >= 1  # not an eager fallback in disguise
    assert setup.components.scheduler.step_index == steps  # Python state as eager leaves it


def test_guidance_window_gets_its_own_step_graphs_not_more_with_n():
    counts = []
    for steps in (6, 12, 24):
        setup = build_loop("dit", steps=steps, guidance_window=(0.0, 0.5), sample_size=8)
        fast = compile_loop(setup.wrapper, backend="eager")
        expected, states = eager_and_compiled(setup, fast, calls=2)
        assert matches_eager(states[-1].get("latents"), expected)
        counts.append(len(fast.last_plan.variants))
    assert counts == [3, 3, 3]  # first step (noise scaling), guided steps, unguided steps


def test_second_call_reuses_the_plan_although_the_guider_step_is_left_over():
    setup = build_loop("dit", steps=4, sample_size=8)
    fast = compile_loop(setup.wrapper, backend="eager")
    fast(setup.components, setup.new_state())
    assert setup.components.guider._step == 3  # left over; overwritten before it is read next call
    for _ in range(3):
        fast(setup.components, setup.new_state())
    assert fast.stats.plans == 1 and fast.stats.compiled_calls == 3


def test_python_state_the_loop_reads_decides_the_plan_and_the_rest_is_left_alone():
    setup = build_loop("dit", steps=4, sample_size=8)
    fast = compile_loop(setup.wrapper, backend="eager")
    fast(setup.components, setup.new_state())
    guider = setup.components.guider
    guider.note = "mine"  # never read or written by the loop: not part of the plan, kept as set
    fast(setup.components, setup.new_state())
    assert fast.stats.plans == 1 and guider.note == "mine"
    guider.guidance_scale = 1.0  # read by the loop, and it turns guidance off: a new plan, and eager's result
    _, state = fast(setup.components, setup.new_state())
    assert fast.stats.plans == 2
    assert matches_eager(state.get("latents"), setup.run())


def test_scheduler_not_reset_raises_eagers_error():
    setup = build_loop("dit", steps=3, sample_size=8)
    fast = compile_loop(setup.wrapper, backend="eager")
    fast(setup.components, setup.new_state())
    fast(setup.components, setup.new_state())
    fast(setup.components, setup.new_state())
    with pytest.raises(ValueError, match="set_timesteps"):
        fast(setup.components, setup.new_state(reset=False))  # not reset: eager's error, no result


def test_new_latents_and_prompts_reuse_the_plan():
    setup = build_loop("dit", steps=3, sample_size=8)
    fast = compile_loop(setup.wrapper, backend="eager")
    for _ in range(3):
        fast(setup.components, setup.new_state())
    plans = fast.stats.plans
    setup.inputs["latents"] = torch.randn_like(setup.inputs["latents"])
    setup.inputs["prompt_embeds"] = torch.randn_like(setup.inputs["prompt_embeds"])
    expected, states = eager_and_compiled(setup, fast, calls=1)
    assert matches_eager(states[0].get("latents"), expected)
    assert fast.stats.plans == plans


class AddFromFields(ModularPipelineBlocks):
    """Reads a tensor through a dict input (diffusers' `denoiser_input_fields`), which also holds it as `cond`."""

    @property
    def inputs(self):
        return [InputParam("x"), InputParam("cond"), InputParam("fields")]

    def __call__(self, components, block_state, i: int):
        block_state.x = block_state.x * 0.5 + block_state.fields["cond"]
        return components, block_state


def test_a_dict_input_sharing_a_data_input_reuses_the_plan_for_new_values():
    loop = Loop.from_blocks_dict({"add": AddFromFields})
    fast = compile_loop(loop, backend="eager")

    def call(wrapper, cond, fields_cond=None):
        state = PipelineState()
        state.set("x", torch.ones(3))
        state.set("num_steps", 4)
        state.set("cond", cond)
        state.set("fields", {"cond": cond if fields_cond is None else fields_cond, "scale": 2})
        return wrapper(None, state)[1].get("x")

    for k in range(3):  # new prompts: the dict holds this call's `cond`, the same tensor as the input
        cond = torch.full((3,), float(k))
        assert matches_eager(call(fast, cond), call(loop, cond))
    assert fast.stats.plans == 1 and fast.stats.compiled_calls == 2
    cond = torch.full((3,), 5.0)  # the dict now holds another tensor than `cond`: eager reads the dict's
    assert matches_eager(call(fast, cond, cond * 3), call(loop, cond, cond * 3))
    assert fast.stats.plans == 2


def test_with_floats_guarded_by_value_a_new_guidance_scale_compiles_once_more_and_then_never_again():
    setup = build_loop("dit", steps=4, sample_size=8)
    fast = compile_loop(setup.wrapper, backend="eager", lift_floats=False)  # (lifted, a new scale is no new plan)
    compiles, tables = [], []
    for scale in (4.0, 4.0, 5.0, 6.0, 7.5, 4.0):
        setup.components.guider.guidance_scale = scale
        expected = setup.run()
        _, state = fast(setup.components, setup.new_state())
        assert matches_eager(state.get("latents"), expected), scale
        compiles.append(fast.stats.compiles)
        tables.append(len(fast.last_plan.variants[0].tables))
    # 5.0 differs from the first plan's literal 4.0: lifted into a table and compiled once; 6.0 and 7.5 reuse
    # that code (each plans once: a traced eager call); 4.0 finds its own plan again
    assert compiles == [1, 1, 2, 2, 2, 2] and fast.stats.plans == 4
    lifted = tables[0] + 1  # the plans made after 4.0's read the scale from a table
    assert tables == [tables[0], tables[0], lifted, lifted, lifted, tables[0]]


def test_plans_beyond_the_bound_are_evicted_least_recently_used_first():
    setup = build_loop("dit", steps=3, sample_size=8)
    fast = compile_loop(setup.wrapper, backend="eager", max_plans=2, lift_floats=False)  # a plan per scale
    for scale in (4.0, 5.0, 4.0, 6.0, 4.0, 5.0):  # 5.0 is evicted by 6.0; 4.0 stays (used most recently)
        setup.components.guider.guidance_scale = scale
        expected = setup.run()
        _, state = fast(setup.components, setup.new_state())
        assert matches_eager(state.get("latents"), expected)
    assert fast.stats.plans == 4 and fast.stats.compiles == 2
    setup.components.guider.guidance_scale = 9.0
    assert fast.guard_check(setup.components, setup.new_state()).count("plan ") == 2  # two plans kept
    setup.components.guider.guidance_scale = 6.0  # evicted
    assert "guidance_scale is 6.0, was 5.0" in fast.guard_check(setup.components, setup.new_state())


def test_outputs_do_not_alias_between_calls():
    setup = build_loop("dit", steps=2, sample_size=8)
    fast = compile_loop(setup.wrapper, backend="eager")
    outs = [fast(setup.components, setup.new_state())[1].get("latents") for _ in range(4)]
    keep = outs[-2].clone()
    fast(setup.components, setup.new_state())
    assert torch.equal(outs[-2], keep) and outs[-1] is not outs[-2]


def test_loop_state_lives_in_preallocated_buffers_updated_in_place():
    setup = build_loop("dit", steps=3, sample_size=8)
    fast = compile_loop(setup.wrapper, backend="eager")
    fast(setup.components, setup.new_state())  # plans
    (buffers,) = fast.last_plan.executable.buffers.values()  # one state signature: one set of buffers
    addresses = [b.data_ptr() for b in buffers]
    outs = []
    for _ in range(3):
        setup.inputs["latents"] = torch.randn_like(setup.inputs["latents"])
        expected = setup.run()
        out = fast(setup.components, setup.new_state())[1].get("latents")
        # the same buffers every call, holding the loop's final state; what the user gets is a copy
        assert [b.data_ptr() for b in buffers] == addresses
        (latents,) = [b for b, name in zip(buffers, fast.last_plan.state_slots) if name == "latents"]
        assert torch.equal(latents, out) and out.untyped_storage().data_ptr() != latents.data_ptr()
        assert matches_eager(out, expected)
        outs.append(out)
    assert len({o.data_ptr() for o in outs}) == 3


# -- the seed document's loop (Python ints, in-place tensor updates) ---------------------------------------------
class Add(ModularPipelineBlocks):
    @property
    def inputs(self):
        return [InputParam("x")]

    @property
    def intermediate_outputs(self):
        return [OutputParam("x")]

    def __call__(self, components, block_state, i: int):
        block_state.x += 1
        return components, block_state


def test_seed_loop_in_place_updates_match_eager():
    loop = Loop.from_blocks_dict({"block1": Add(), "block2": Add})  # the seed document's second example
    fast = compile_loop(loop, backend="eager")
    for _ in range(3):
        x_eager, x_fast = torch.ones(3), torch.ones(3)
        expected = run_loop(loop, x_eager, 5)
        got = run_loop(fast, x_fast, 5)
        assert torch.equal(got, expected) and got is x_fast  # updated in place, as eagerly
        assert torch.equal(x_fast, x_eager)
    assert fast.stats.compiled_calls == 2


def test_in_place_then_rebound_input_falls_back_and_matches():
    loop = Loop.from_blocks_dict({"add": Add, "scale": Scale, "add2": Add()})
    fast = compile_loop(loop, backend="eager")
    for k in range(3):
        x_eager, x_fast = torch.ones(3), torch.ones(3)
        expected = run_loop(loop, x_eager, 5)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = run_loop(fast, x_fast, 5)
        if k == 0:
            assert "updated in place and then replaced" in str(caught[0].message)
        assert matches_eager(got, expected)
        assert torch.equal(x_fast, x_eager)  # the first in-place add mutated the caller's tensor in both
    assert fast.stats.compiled_calls == 0


# -- data-dependent Python -----------------------------------------------------------------------------------------
class Branchy(ModularPipelineBlocks):
    @property
    def inputs(self):
        return [InputParam("x")]

    def __call__(self, components, block_state, i: int):
        if block_state.x.sum() > 0:  # data-dependent: must never be baked
            block_state.x = block_state.x - 1
        else:
            block_state.x = block_state.x + 10
        return components, block_state


def test_data_dependent_branch_falls_back_with_warning_and_matches():
    loop = Loop.from_blocks_dict({"branchy": Branchy})
    fast = compile_loop(loop, backend="eager")
    with pytest.warns(UserWarning, match=r"data-dependent Python: `__bool__`.*block 'branchy'.*test_compile_loop.py"):
        got = run_loop(fast, torch.ones(2), 3)
    assert torch.equal(got, run_loop(loop, torch.ones(2), 3))
    for x in (torch.ones(2), -torch.ones(2)):  # both sides of the branch
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert torch.equal(run_loop(fast, x.clone(), 4), run_loop(loop, x.clone(), 4))


def test_data_dependent_branch_strict_raises():
    fast = compile_loop(Loop.from_blocks_dict({"branchy": Branchy}), backend="eager", strict=True)
    with pytest.raises(Exception, match=r"data-dependent Python: `__bool__`.*'branchy'"):
        run_loop(fast, torch.ones(2), 3)


# -- interface and bad input -----------------------------------------------------------------------------------------
def test_compiled_loop_is_a_block_with_the_wrappers_interface():
    setup = build_loop("dit", steps=2, sample_size=8)
    fast = compile_loop(setup.wrapper, backend="eager")
    assert isinstance(fast, CompiledLoop)
    assert [p.name for p in fast.inputs] == [p.name for p in setup.wrapper.inputs]
    assert fast.intermediate_outputs == setup.wrapper.intermediate_outputs
    assert fast.expected_components == setup.wrapper.expected_components
    assert "Denoising loop" in fast.description


def test_drop_in_inside_a_modular_pipeline():
    setup = build_loop("unet", steps=3, sample_size=8)
    fast = compile_loop(setup.wrapper, backend="eager")
    pipe = SequentialPipelineBlocks.from_blocks_dict({"denoise": fast}).init_pipeline()
    pipe.update_components(**setup.components.components)
    expected = setup.run()
    for _ in range(3):
        setup.components.scheduler.set_timesteps(3)
        pipe.update_components(scheduler=setup.components.scheduler)
        out = pipe(latents=setup.inputs["latents"], prompt_embeds=setup.inputs["prompt_embeds"],
                   negative_prompt_embeds=setup.inputs["negative_prompt_embeds"],
                   timesteps=setup.components.scheduler.timesteps, num_inference_steps=3, output="latents")
        assert matches_eager(out, expected)


def test_missing_input_gets_eagers_error():
    setup = build_loop("dit", steps=2, sample_size=8)
    fast = compile_loop(setup.wrapper, backend="eager")
    state = setup.new_state()
    state.values.pop("prompt_embeds")
    with pytest.raises(ValueError, match="Required input 'prompt_embeds' is missing"):
        fast(setup.components, state)


def test_not_a_loop_wrapper():
    with pytest.raises(TypeError, match="expects a loop wrapper.*Add lacks \\['loop_step'\\]"):
        compile_loop(Add())
    with pytest.raises(ValueError, match="backend must be one of"):
        compile_loop(Loop(), backend="nope")


def test_static_shapes_raises_on_shape_change():
    setup = build_loop("dit", steps=2, sample_size=8)
    fast = compile_loop(setup.wrapper, backend="eager", static_shapes=True)
    fast(setup.components, setup.new_state())
    setup.inputs["latents"] = torch.randn(2, 4, 8, 8)
    setup.inputs["prompt_embeds"] = torch.randn(2, 8, 32)
    setup.inputs["negative_prompt_embeds"] = torch.zeros(2, 8, 32)
    with pytest.raises(ValueError, match="static_shapes=True"):
        fast(setup.components, setup.new_state())


def test_explain_and_graph():
    setup = build_loop("dit", steps=4, guidance_window=(0.0, 0.5), sample_size=8)
    fast = compile_loop(setup.wrapper, backend="eager")
    assert "not planned yet" in fast.explain()
    fast(setup.components, setup.new_state())
    summary = fast.explain()
    assert "denoiser (LoopDenoiser, " in summary and "loops.py:" in summary and "compiled (" in summary
    assert "step graphs: 3 for 4 steps (" in summary and "stats: compiles=" in summary
    assert "slots:" not in summary and "explain(verbose=True) adds the slot table" in summary
    # a summary first (diffusers' Wan loop printed ~150 lines); the floats take at most 2 lines of it
    assert len(summary.splitlines()) <= 16, summary
    text = fast.explain(verbose=True)
    assert text.startswith(summary.splitlines()[0]) and "explain(verbose=True)" not in text
    assert "latents                      carried" in text
    assert "prompt_embeds                invariant" in text
    assert "noise_pred                   dead" in text
    assert "step graphs: 3 for 4 steps" in text
    assert "state buffers (preallocated, updated in place): latents" in text
    assert "hoisted per-step tables:" in text
    assert isinstance(fast.graph, torch.fx.GraphModule) and "while_loop" not in fast.graph.code


def test_help_of_compiled_loop_documents_its_stats():
    import pydoc

    fast = compile_loop(Loop.from_blocks_dict({"block1": Add()}), backend="eager")
    text = pydoc.render_doc(fast, renderer=pydoc.plaintext)
    assert "stats: a ``LoopStats``" in text and "compiled_calls" in text and "explain(verbose=False)" in text


def test_last_plan_reports_how_the_plan_runs():
    setup = build_loop("dit", steps=4, guidance_window=(0.0, 0.5), sample_size=8)
    fast = compile_loop(setup.wrapper, backend="eager")
    assert fast.last_plan is None
    fast(setup.components, setup.new_state())
    plan = fast.last_plan
    assert plan.kind == "whole loop on state buffers"
    assert [p.name for p in plan.passes] == ["batch calls", "plan", "lift literals", "place tables"]
    assert plan.passes[0].summary == "batched: components.denoiser x2 in 2 step(s)"
    assert plan.passes[1].summary.startswith("3 step graph(s) for 4 steps")
    assert plan.slots["latents"].role == "carried" and plan.state_slots == ("latents",)
    assert plan.invariant_slots == ("prompt_embeds", "negative_prompt_embeds")
    assert [v.steps for v in plan.variants] == [(0,), (1,), (2, 3)]  # first step, guided, unguided
    assert plan.runs == ((0, 0, 1), (1, 1, 2), (2, 2, 4)) and plan.segments is None and plan.problems == ()
    assert plan.guards.startswith("7 inputs") and plan.variants[1].graph is fast.last_plan.variants[1].graph
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.kind = "eager"
    assert "runs as: whole loop on state buffers" in fast.explain() and "passes: batch calls (" in fast.explain(True)


# -- half precision ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_guidance", ["auto", False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("preset", ["dit", "unet-ddim"])
def test_half_precision_loops_match_eager(preset, dtype, batch_guidance):
    setup = build_loop(preset, steps=4, sample_size=8, dtype=dtype)
    fast = compile_loop(setup.wrapper, backend="eager", batch_guidance=batch_guidance)
    expected, states = eager_and_compiled(setup, fast, calls=2)
    for state in states:
        latents = state.get("latents")
        assert latents.dtype == dtype
        if batch_guidance is False:  # the same ops in the same order: bit for bit
            assert torch.equal(latents, expected)
        else:  # a batched matmul may round otherwise (a few ulps on some CPUs): the dtype's tolerance
            assert matches_eager(latents, expected), (latents.float() - expected.float()).abs().max()
    assert fast.stats.compiled_calls == 1


def test_inductor_bfloat16_loop_matches_eager_within_its_tolerance():
    setup = build_loop("dit", steps=4, sample_size=8, dtype=torch.bfloat16)
    fast = compile_loop(setup.wrapper)
    expected, states = eager_and_compiled(setup, fast, calls=2)
    for state in states:  # fused bf16 math rounds differently: the bf16 tolerance (5e-2, scaled by the latents)
        assert state.get("latents").dtype == torch.bfloat16 and matches_eager(state.get("latents"), expected)
    assert fast.stats.compiles == 1 and fast.stats.compiled_calls == 1


# -- Inductor: compile counts and no Python per step ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def inductor_loop():
    import torch._dynamo.utils as dynamo_utils

    setup = build_loop("dit", steps=8)
    fast = compile_loop(setup.wrapper)
    dynamo_utils.counters.clear()
    fast(setup.components, setup.new_state())
    return setup, fast, dynamo_utils.counters


def test_inductor_equals_eager_and_compiles_once(inductor_loop):
    setup, fast, counters = inductor_loop
    assert counters["stats"]["unique_graphs"] == 1  # Dynamo's own count, independent of fast.stats
    assert fast.stats.compiles == 1
    expected, states = eager_and_compiled(setup, fast, calls=3)
    for state in states:
        assert matches_eager(state.get("latents"), expected)
    assert counters["stats"]["unique_graphs"] == 1  # repeat calls compile nothing
    setup.inputs["latents"] = torch.randn_like(setup.inputs["latents"])
    expected, states = eager_and_compiled(setup, fast, calls=2)
    assert matches_eager(states[-1].get("latents"), expected)
    assert counters["stats"]["unique_graphs"] == 1  # new latents: nothing new


def test_inductor_new_n_compiles_no_new_step_graph_and_no_python_per_step(inductor_loop, monkeypatch):
    setup, fast, counters = inductor_loop
    monkeypatch.setattr(executables, "CHUNK_SECONDS", 1e9)  # one chunk per call: Python per step, not per chunk
    per_n = {}
    for steps in (8, 32):
        setup.steps = steps
        for _ in range(3):  # plan, then warm calls
            fast(setup.components, setup.new_state())
        state = setup.new_state()
        per_n[steps] = count_python_calls(lambda: fast(setup.components, state))
        assert matches_eager(state.get("latents"), setup.run())
    assert counters["stats"]["unique_graphs"] == 1
    assert per_n[8] == per_n[32], per_n


def test_compiled_call_draws_no_progress_bar_where_the_wrapper_draws_none(capsys):
    loop = Loop.from_blocks_dict({"scale": Scale})  # its __call__ never opens the bar it has
    fast = compile_loop(loop, backend="eager")
    for _ in range(2):
        run_loop(fast, torch.ones(2), 3)
    assert fast.stats.compiled_calls == 1
    assert "3/3" not in capsys.readouterr().err


def test_compiled_call_draws_the_wrappers_progress_bar(capsys):
    setup = build_loop("dit", steps=3, sample_size=8, progress=True)
    fast = compile_loop(setup.wrapper, backend="eager")
    fast(setup.components, setup.new_state())  # traced: the wrapper's own loop draws its bar
    capsys.readouterr()
    fast(setup.components, setup.new_state())
    assert fast.stats.compiled_calls == 1
    assert "3/3" in capsys.readouterr().err  # the compiled call completes the same bar
    setup.wrapper.set_progress_bar_config(disable=True)
    fast(setup.components, setup.new_state())
    assert "3/3" not in capsys.readouterr().err
