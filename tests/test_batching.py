"""Batched guidance passes (loopgraph.passes.batching): repeated model calls in a step run as one batched call.

Equality with eager first (the zoo presets with guidance on, off and windowed; a user block calling the model
twice; the diffusers loops), then the structure (one model region per step where there were two), every case
that must stay apart with its reason, the options, and composition with eager segments and rng="counter" (the
kernel pass: tests/test_kernel_pass.py, on the batched default loop).
"""

import types
import warnings

import pytest
import torch

from loopgraph import CompileConfig, InputParam, ModularPipelineBlocks, PipelineState, compile_loop
from loopgraph.verify import matches_eager
from loopgraph.zoo.loops import build_loop

from .helpers import Loop, Net, components, quiet, two_call_loop


def run(loop, net, n=4, uncond_len=5, seed=0):
    g = torch.Generator().manual_seed(1)
    state = PipelineState()
    state.set("x", torch.randn(2, 4, 6, 6, generator=g))
    state.set("cond", torch.randn(2, 5, 8, generator=g))
    state.set("uncond", torch.randn(2, uncond_len, 8, generator=g))
    state.set("num_steps", n)
    torch.manual_seed(seed)
    _, state = loop(components(net), state)
    return state.get("x")


def param_uses(graph: torch.fx.GraphModule, param: torch.nn.Parameter) -> int:
    """How many times a step graph reads ``param``: once per model region."""
    return sum(1 for n in graph.graph.nodes if n.op == "get_attr" and getattr(graph, n.target) is param)


# -- equality with eager ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset", ["dit", "unet"])
@pytest.mark.parametrize("guidance, window", [(4.0, (0.0, 1.0)), (1.0, (0.0, 1.0)), (5.0, (0.3, 0.7))])
@pytest.mark.parametrize("steps", [1, 4])
def test_zoo_presets_match_eager_batched(preset, guidance, window, steps):
    setup = build_loop(preset, steps=steps, guidance_scale=guidance, guidance_window=window, sample_size=8)
    expected = setup.run()
    fast = compile_loop(setup.wrapper, backend="eager")
    _, traced = fast(setup.components, setup.new_state())
    assert torch.equal(traced.get("latents"), expected)  # the traced call is eager's, batched retrace or not
    for _ in range(2):
        _, state = fast(setup.components, setup.new_state())
        assert matches_eager(state.get("latents"), expected)
    assert fast.stats.compiled_calls == 2
    guided = [i for i in range(steps) if guidance != 1.0 and int(window[0] * steps) <= i < int(window[1] * steps)]
    sites = fast.last_plan.batching
    if guided:
        (site,) = sites
        assert site.module == "components.denoiser" and site.block == "denoiser" and site.calls == 2
        assert list(site.batched_steps) == guided and site.other_steps == ()
    else:
        assert sites == ()


def test_inductor_batched_loop_matches_eager_and_compiles_once():
    import torch._dynamo.utils as dynamo_utils

    setup = build_loop("unet", steps=5, sample_size=8, guidance_window=(0.0, 0.6))
    expected = setup.run()
    fast = compile_loop(setup.wrapper)
    torch._dynamo.reset()  # an identical loop compiled by an earlier test would be found in Dynamo's cache
    dynamo_utils.counters.clear()
    for _ in range(3):
        _, state = fast(setup.components, setup.new_state())
        assert matches_eager(state.get("latents"), expected)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1  # Dynamo's own count: one compiled loop
    assert fast.stats.compiled_calls == 2 and fast.last_plan.batching[0].batched_steps == (0, 1, 2)


def test_a_block_calling_the_model_twice_is_batched_and_matches_eager():
    loop, net = two_call_loop(), Net()
    expected = run(loop, net)
    fast = compile_loop(loop, backend="eager")
    assert torch.equal(run(fast, net), expected)
    assert matches_eager(run(fast, net), expected) and fast.stats.compiled_calls == 1
    (site,) = fast.last_plan.batching
    assert (site.module, site.block, site.calls) == ("components['net']", "denoise", 2)
    assert site.batched_steps == (0, 1, 2, 3)
    assert "components['net'] in block 'denoise': 2 calls per step as one batched call in steps 0-3" in fast.explain()


def test_the_batched_step_graph_has_one_model_region_where_it_had_two():
    loop, net = two_call_loop(), Net()
    batched = compile_loop(loop, backend="eager")
    apart = compile_loop(loop, backend="eager", batch_guidance=False)
    for fast in (batched, apart):
        run(fast, net)
    (one,), (two,) = batched.last_plan.variants, apart.last_plan.variants
    assert param_uses(one.graph, net.conv.weight) == 1 and param_uses(two.graph, net.conv.weight) == 2
    assert param_uses(one.graph, net.ctx.weight) == 1 and param_uses(two.graph, net.ctx.weight) == 2
    assert sum(n.target is torch.cat for n in one.graph.graph.nodes) == 2  # latents and contexts concatenated
    assert apart.last_plan.batching == () and all(p.name != "batch calls" for p in apart.last_plan.passes)
    assert "batch calls" in [p.name for p in batched.last_plan.passes]


class TwoModels(ModularPipelineBlocks):
    """Per condition, a model and then a second model on its result: both pairs are batched."""

    @property
    def inputs(self):
        return [InputParam("x"), InputParam("cond"), InputParam("uncond")]

    def __call__(self, components, block_state, i: int):
        t = torch.tensor(0.5)
        preds = []
        for context in (block_state.cond, block_state.uncond):
            first = components.net(block_state.x, t, context)
            preds.append(components.refiner(first, t, context))
        block_state.x = block_state.x - 0.1 * (preds[1] + 2.0 * (preds[0] - preds[1]))
        return components, block_state


def test_two_models_called_per_condition_are_both_batched():
    loop = Loop.from_blocks_dict({"denoise": TwoModels()})
    comps = types.SimpleNamespace(net=Net(), refiner=Net())
    comps.refiner.conv.weight.data.mul_(-0.5)

    def go(fn):
        g = torch.Generator().manual_seed(1)
        state = PipelineState()
        for name, shape in (("x", (2, 4, 6, 6)), ("cond", (2, 5, 8)), ("uncond", (2, 5, 8))):
            state.set(name, torch.randn(*shape, generator=g))
        state.set("num_steps", 3)
        return fn(comps, state)[1].get("x")

    expected = go(loop)
    fast = compile_loop(loop, backend="eager")
    assert torch.equal(go(fast), expected) and matches_eager(go(fast), expected)
    assert fast.stats.compiled_calls == 1
    assert {(s.module, s.batched_steps) for s in fast.last_plan.batching} == {
        ("components['net']", (0, 1, 2)), ("components['refiner']", (0, 1, 2))}
    (variant,) = fast.last_plan.variants
    assert param_uses(variant.graph, comps.net.conv.weight) == 1
    assert param_uses(variant.graph, comps.refiner.conv.weight) == 1


# -- what stays apart, and why ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, kwargs, reason", [
    ("ok", dict(uncond_len=7), "argument ['context'] has shapes (2, 5, 8), (2, 7, 8): not the same apart"),
    ("literal", {}, "argument ['scale'] differs between the calls (not a tensor)"),
    ("chain", {}, "the call's input is computed from an earlier call's result"),
    ("changed", {}, "the calls ran different code"),
])
def test_calls_that_cannot_be_batched_stay_apart_with_their_reason(mode, kwargs, reason):
    loop, net = two_call_loop(mode), Net()
    expected = run(loop, net, **kwargs)
    fast = compile_loop(loop, backend="eager")
    assert torch.equal(run(fast, net, **kwargs), expected)
    assert matches_eager(run(fast, net, **kwargs), expected) and fast.stats.compiled_calls == 1
    (site,) = fast.last_plan.batching
    assert site.batched_steps == () and site.other_steps == (0, 1, 2, 3) and reason in site.reason
    assert reason in fast.explain()
    (variant,) = fast.last_plan.variants
    assert param_uses(variant.graph, net.conv.weight) == 2


@pytest.mark.parametrize("model, reason", [
    (dict(sum_batch=True), "output 0 is not batch-separable (shape (1, 4, 6, 6) for 4 rows)"),
    (dict(mix_batch=True), "the batched call's output 0 differs from the separate calls'"),
])
def test_a_model_whose_batched_outputs_are_not_the_separate_calls_stays_apart(model, reason):
    loop, net = two_call_loop(), Net(**model)
    expected = run(loop, net)
    fast = compile_loop(loop, backend="eager")
    assert torch.equal(run(fast, net), expected) and matches_eager(run(fast, net), expected)
    (site,) = fast.last_plan.batching
    assert site.batched_steps == () and reason in site.reason


def test_batch_guidance_true_warns_about_call_sites_left_apart():
    loop, net = two_call_loop("literal"), Net()
    fast = compile_loop(loop, backend="eager", batch_guidance=True)
    with pytest.warns(UserWarning, match=r"components\['net'\] \(2 calls per step in block 'denoise'\) is not batched"):
        run(fast, net)
    with pytest.raises(ValueError, match="batch_guidance must be True, False or 'auto'"):
        CompileConfig(batch_guidance="yes")


# -- composition -----------------------------------------------------------------------------------------------------
def test_batched_calls_compose_with_eager_segments():
    loop, net = two_call_loop(noise=True), Net()
    expected = run(loop, net, seed=3)
    fast = compile_loop(loop, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.equal(run(fast, net, seed=3), expected)
        got = run(fast, net, seed=3)
    assert matches_eager(got, expected)
    assert fast.last_plan.kind == "eager segments" and fast.stats.segment_calls > 0
    assert fast.last_plan.batching[0].batched_steps == (0, 1, 2, 3)


def test_batched_calls_compose_with_counter_rng():
    loop, net = two_call_loop(noise=True), Net()
    fast = compile_loop(loop, backend="eager", rng="counter")
    first = run(fast, net, seed=3)
    again = run(fast, net, seed=3)
    assert matches_eager(again, first) and fast.stats.compiled_calls == 1
    assert fast.last_plan.kind != "eager segments" and fast.last_plan.batching[0].batched_steps == (0, 1, 2, 3)


def test_a_model_that_runs_hooks_is_not_batched_its_hooks_run_once_per_call_as_eagerly():
    # diffusers' cache hooks (MagCache, FirstBlockCache) keep state per cache context in objects they make on
    # first use: a batched retrace of the model ran them once more and changed that state, so the traced call
    # (which must be eager's) differed from eager
    def make():
        net = Net()
        net.seen = {}

        def count(module, args, output):  # a stateful forward hook: its count of calls scales the output, the
            module.seen["calls"] = module.seen.get("calls", 0) + 1  # same for a step's two calls (1 and 2, 3 and 4)
            return output * (1 + 0.01 * ((module.seen["calls"] + 1) // 2))

        net.register_forward_hook(count)
        return net

    loop, eager_net, net = two_call_loop(), make(), make()
    fast = compile_loop(two_call_loop(), backend="eager")
    for call in range(2):
        expected = run(loop, eager_net)
        assert torch.equal(quiet(run, fast, net), expected), f"call {call}"
    (site,) = fast.last_plan.batching
    assert site.batched_steps == () and "runs hooks" in site.reason, site.reason
