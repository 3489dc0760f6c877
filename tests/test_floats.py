"""A new guidance scale without a new plan (issue 30): a Python float a block reads (a BlockState input, a
component's attribute) and uses only as an operand of tensor arithmetic is an input of the compiled loop, guarded by
type and by the outcomes of the predicates Python evaluated on it (``math.isclose(scale, 1.0)``); any other use
keeps it guarded by value. Every call equals eager's."""

import math
from math import sqrt as bound_sqrt  # bound at import: the trace's math patch misses it
import types
import warnings

import numpy
import pytest
import torch

from loopgraph import (
    InputParam,
    LoopSequentialPipelineBlocks,
    ModularPipelineBlocks,
    OutputParam,
    PipelineState,
    compile_loop,
)
from loopgraph.compile import matches_eager
from loopgraph.trace.floats import Lifts, Source, TracedFloat
from loopgraph.zoo.loops import build_loop


# -- a CFG + Euler loop, the docs' quick start, with the scale as a block input or a guider attribute -----------
class Guider:
    def __init__(self, scale: float) -> None:
        self.scale = scale


class Denoise(ModularPipelineBlocks):
    inputs = [InputParam("latents"), InputParam("cond"), InputParam("guidance_scale", default=4.0)]
    intermediate_outputs = [OutputParam("noise_pred")]
    use = "input"  # where the scale comes from, and how it is used (the tests set it)

    def __call__(self, components, block_state, i: int, t: torch.Tensor):
        cond = torch.tanh(block_state.latents + t * block_state.cond)
        uncond = torch.tanh(block_state.latents)
        scale = block_state.guidance_scale if self.use == "input" else components.guider.scale
        if self.use == "branch" and scale > 5.0:  # the scale steers Python: lifted while the outcome holds
            cond = cond * 0.5
        if self.use == "python":  # Python arithmetic on it: its value is guarded
            scale = scale * 2
        if self.use == "factory":  # a tensor made from it when tracing: baked, so guarded
            uncond = uncond + torch.full_like(uncond, scale) * 0.01
        if self.use == "kept":  # left where the call ends: a compiled call would replay it, so guarded
            components.guider.last = scale
        if self.use == "bound":  # a math function bound before the trace reads it in C, unseen: no use seen
            scale = bound_sqrt(scale) ** 2
        if self.use == "numpy":  # numpy converts it with __float__: a tensor made from it, so guarded
            scale = torch.from_numpy(numpy.array([scale], dtype=numpy.float32))
        block_state.noise_pred = uncond + scale * (cond - uncond)
        return components, block_state


class Step(ModularPipelineBlocks):
    inputs = [InputParam("latents"), InputParam("noise_pred")]
    intermediate_outputs = [OutputParam("latents")]

    def __call__(self, components, block_state, i: int, t: torch.Tensor):
        block_state.latents = block_state.latents + (block_state.sigmas[i + 1] - t) * block_state.noise_pred
        return components, block_state


class DenoiseLoop(LoopSequentialPipelineBlocks):
    block_classes = [Denoise, Step]
    block_names = ["denoise", "step"]
    loop_inputs = [InputParam("sigmas")]

    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        for i, t in enumerate(block_state.sigmas[:-1]):
            components, block_state = self.loop_step(components, block_state, i=i, t=t)
        self.set_block_state(state, block_state)
        return components, state


def make_state(scale=4.0, steps=6):
    g = torch.Generator().manual_seed(0)
    state = PipelineState()
    state.set("latents", torch.randn(2, 8, generator=g))
    state.set("cond", torch.randn(2, 8, generator=g))
    state.set("sigmas", torch.linspace(1.0, 0.0, steps + 1))
    state.set("guidance_scale", scale)
    return state


def loop_using(use: str) -> DenoiseLoop:
    loop = DenoiseLoop()
    loop.sub_blocks["denoise"].use = use
    return loop


def run(loop, components, scale):
    """The loop on the scale: as a block input, and as the guider's attribute (whichever the block reads)."""
    components.guider.scale = scale
    _, state = loop(components, make_state(scale))
    return state


def components_with(scale=4.0):
    return types.SimpleNamespace(guider=Guider(scale))


# -- the target: ten scales in a row, one plan, one compilation ---------------------------------------------
def test_ten_guidance_scales_run_one_plan_compiled_once_each_equal_to_eager():
    import torch._dynamo.utils as dynamo_utils

    fast = compile_loop(loop_using("input"))
    components = components_with()
    dynamo_utils.counters.clear()
    for scale in [4.0, 5.0, 7.5, 1.0, 2.25, 0.0, 12.0, 3.5, 4.0, 6.1]:
        state = run(fast, components, scale)
        assert matches_eager(state.get("latents"), run(loop_using("input"), components, scale).get("latents")), scale
        assert type(state.get("guidance_scale")) is float and state.get("guidance_scale") == scale
    assert fast.stats.plans == 1 and fast.stats.compiled_calls == 9
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1  # Dynamo's own count, independent of fast.stats
    assert "floats as inputs (a new value runs this plan): input 'guidance_scale'" in fast.explain()


@pytest.mark.parametrize("use", ["input", "attribute"])
def test_a_lifted_float_gives_the_caller_back_its_own_float(use):
    fast = compile_loop(loop_using(use), backend="eager")
    components = components_with()
    for scale in (4.0, 6.5):
        state = make_state(scale)
        given = state.get("guidance_scale")
        components.guider.scale = scale
        _, state = fast(components, state)
        assert state.get("guidance_scale") is given  # not a traced float, not a copy
        assert type(components.guider.scale) is float
    assert fast.stats.plans == 1


def test_a_components_attribute_is_lifted_and_its_predicates_guarded():
    fast = compile_loop(loop_using("branch"), backend="eager")
    components = components_with()
    for scale, plans in [(4.0, 1), (2.0, 1), (4.5, 1), (6.0, 2), (9.0, 2), (3.0, 2)]:
        components.guider.scale = scale
        expected = run(loop_using("branch"), components_with(scale), scale).get("latents")
        _, state = fast(components, make_state(scale))
        assert matches_eager(state.get("latents"), expected), scale
        assert fast.stats.plans == plans, scale  # 6.0 > 5.0 changed the branch: the plan for it, then reused
    components.guider.scale = 7.0
    assert fast.guard_check(components, make_state(7.0)) is None  # the newest plan (scale > 5.0) fits
    assert "components['guider'].scale (while float.__gt__(4.0, 5.0) is False)" in fast.explain()  # 3.0's plan


def test_the_zoo_guider_lifts_its_scale_and_a_scale_of_one_turns_guidance_off_in_a_new_plan():
    setup = build_loop("dit", steps=3, sample_size=8)
    fast = compile_loop(setup.wrapper, backend="eager")
    # 1.0: math.isclose(scale, 1.0) is True, CFG off: another structure, planned once; 2.0 fits the first plan
    for scale, plans in [(4.0, 1), (7.5, 1), (1.0, 2), (2.0, 2), (1.0, 2)]:
        setup.components.guider.guidance_scale = scale
        expected = setup.run()
        _, state = fast(setup.components, setup.new_state())
        assert matches_eager(state.get("latents"), expected), scale
        assert fast.stats.plans == plans, scale
    assert fast.stats.compiled_calls == 3


@pytest.mark.parametrize("use", ["bound", "numpy"])
def test_a_float_read_where_the_traced_float_cannot_see_is_guarded_by_value(use):
    """bound: a float read and then used where the traced float cannot see (``from math import sqrt``, bound before
    the trace, reads it in C) reaches the step graph as another float: it was taken as an input with no use, so a
    new value was silently ignored. A float that reaches no step graph and no predicate is guarded by value.
    numpy: numpy converts the float through ``__float__`` (a Python use), so a tensor it makes from it is not baked
    silently: the float is guarded by value."""
    fast = compile_loop(loop_using(use), backend="eager")
    components = components_with()
    for scale, plans in [(4.0, 1), (4.0, 1), (5.0, 2)]:
        components.guider.scale = scale
        _, state = fast(components, make_state(scale))
        expected = run(loop_using(use), components_with(scale), scale)
        assert matches_eager(state.get("latents"), expected.get("latents")), scale
        assert fast.stats.plans == plans
    if use == "numpy":
        assert "components['guider'].scale, used by Python (__float__)" in fast.explain()


def test_a_lifted_number_with_a_0d_tensor_keeps_eagers_dtype_and_value():
    """A 0-d half tensor times a lifted scale and a 0-d int32 tensor plus the step's int: between 0-d tensors a
    table row's dtype would promote (float32, int64) where the Python number did not; the loop compiles and every
    value and dtype equals eager's."""
    import torch._dynamo.utils as dynamo_utils

    class Zero(ModularPipelineBlocks):
        inputs = [InputParam("latents"), InputParam("sigma"), InputParam("guidance_scale"), InputParam("count")]
        intermediate_outputs = [OutputParam("latents"), OutputParam("scaled"), OutputParam("counted")]

        def __call__(self, components, block_state, i, t):
            block_state.scaled = block_state.sigma * block_state.guidance_scale
            block_state.counted = block_state.count + i
            block_state.latents = block_state.latents + block_state.scaled * 0.1 + block_state.counted * 0.01
            return components, block_state

    class Loop(DenoiseLoop):
        block_classes = [Zero]
        block_names = ["zero"]

    def zero_state(scale):
        state = make_state(scale)
        state.set("latents", state.get("latents").half())
        state.set("sigma", torch.tensor(0.3, dtype=torch.half))
        state.set("count", torch.tensor(5, dtype=torch.int32))
        return state

    fast = compile_loop(Loop(), backend="eager", strict=True)
    dynamo_utils.counters.clear()
    for scale in (0.7, 0.9, 0.9, 1.3):
        _, state = fast(None, zero_state(scale))
        _, expected = Loop()(None, zero_state(scale))
        for name in ("latents", "scaled", "counted"):
            got, want = state.get(name), expected.get(name)
            assert got.dtype == want.dtype and torch.equal(got, want), (name, scale)
    assert fast.stats.plans == 1 and fast.stats.compiled_calls == 3
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1


def test_a_numpy_scalar_operand_compiles_and_equals_eager():
    class Damp(ModularPipelineBlocks):  # a numpy scalar as an op's operand (a scheduler's numpy arithmetic)
        inputs = [InputParam("latents")]

        def __call__(self, components, block_state, i, t):
            block_state.latents = block_state.latents * numpy.float32(0.99) + numpy.float64(0.01) * t
            return components, block_state

    class Loop(DenoiseLoop):
        block_classes = [Damp]
        block_names = ["damp"]

    fast = compile_loop(Loop(), backend="eager", strict=True)
    for _ in range(2):
        _, state = fast(None, make_state())
        _, expected = Loop()(None, make_state())
        assert matches_eager(state.get("latents"), expected.get("latents"))
    assert fast.stats.compiled_calls == 1


@pytest.mark.parametrize("use, why", [
    ("python", "used by Python (__mul__)"),
    ("factory", "an argument of `full_like` (which takes a Python number)"),
    ("kept", "kept in an attribute the call wrote"),
])
def test_a_float_used_another_way_is_guarded_by_value_and_explain_says_where(use, why):
    fast = compile_loop(loop_using(use), backend="eager")
    components = components_with()
    for scale, plans in [(4.0, 1), (4.0, 1), (5.0, 2)]:
        components.guider.scale = scale
        expected_components = components_with(scale)
        expected = run(loop_using(use), expected_components, scale)
        _, state = fast(components, make_state(scale))
        assert matches_eager(state.get("latents"), expected.get("latents")), (use, scale)
        assert fast.stats.plans == plans
        if use == "kept":
            assert components.guider.last == scale and type(components.guider.last) is float
    explained = fast.explain()
    assert f"floats guarded by value: components['guider'].scale, {why} (" in explained
    assert "test_floats.py:" in explained.split(why)[1].splitlines()[0]  # where: the user's line


def test_a_lifted_input_given_as_an_int_re_plans_and_says_why():
    fast = compile_loop(loop_using("input"), backend="eager")
    components = components_with()
    fast(components, make_state(4.0))
    reason = fast.guard_check(components, make_state(4))
    assert reason == "plan 0: input 'guidance_scale' is an int, was a float (an input of the compiled loop)"
    _, state = fast(components, make_state(4))
    assert matches_eager(state.get("latents"), run(loop_using("input"), components, 4).get("latents"))


def test_lift_floats_false_guards_every_float_by_value():
    fast = compile_loop(loop_using("input"), backend="eager", lift_floats=False)
    components = components_with()
    for scale in (4.0, 5.0):
        _, state = fast(components, make_state(scale))
        assert matches_eager(state.get("latents"), run(loop_using("input"), components, scale).get("latents"))
    assert fast.stats.plans == 2
    assert "floats as inputs" not in fast.explain()


def test_a_plan_that_does_not_run_the_whole_loop_compiled_guards_its_floats_by_value():
    class Log(ModularPipelineBlocks):  # data-dependent Python: this block runs eagerly each step
        inputs = [InputParam("latents")]

        def __call__(self, components, block_state, i, t):
            if block_state.latents.sum() > 1e9:
                block_state.latents = block_state.latents * 0
            return components, block_state

    class Loop(DenoiseLoop):
        block_classes = [Denoise, Log, Step]
        block_names = ["denoise", "log", "step"]

    fast = compile_loop(Loop(), backend="eager")
    components = components_with()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for scale in (4.0, 5.0):
            _, state = fast(components, make_state(scale))
            _, expected = Loop()(components, make_state(scale))
            assert matches_eager(state.get("latents"), expected.get("latents"))
    assert fast.stats.plans == 2
    assert "floats guarded by value: input 'guidance_scale'" in fast.explain()


class ScaledNet(torch.nn.Module):
    """A model that multiplies by its own float; ``extra_when_batched``: its batched call runs one more op."""

    def __init__(self, extra_when_batched: bool = False):
        super().__init__()
        self.lin, self.scale, self.extra_when_batched = torch.nn.Linear(8, 8), 1.0, extra_when_batched

    def forward(self, x, cond):
        h = torch.tanh(self.lin(x + cond))
        if self.extra_when_batched and x.shape[0] > 2:
            h = h + 0.0
        return h * self.scale


class Guided(ModularPipelineBlocks):  # the model twice per step: one batched call
    inputs = [InputParam("latents"), InputParam("cond")]
    intermediate_outputs = [OutputParam("noise_pred")]

    def __call__(self, components, block_state, i, t):
        cond = components.net(block_state.latents, block_state.cond)
        uncond = components.net(block_state.latents, torch.zeros_like(block_state.cond))
        block_state.noise_pred = uncond + 3.0 * (cond - uncond)
        return components, block_state


class Refine(ModularPipelineBlocks):  # the model once more, in another block: not batched
    inputs = [InputParam("latents"), InputParam("noise_pred"), InputParam("cond")]
    intermediate_outputs = [OutputParam("noise_pred")]

    def __call__(self, components, block_state, i, t):
        refined = components.net(block_state.latents, block_state.cond)
        block_state.noise_pred = block_state.noise_pred + 0.1 * refined
        return components, block_state


class GuidedLoop(DenoiseLoop):
    block_classes = [Guided, Refine, Step]
    block_names = ["guided", "refine", "step"]


def run_model_scales(extra_when_batched: bool, scales):
    torch.manual_seed(0)
    components = types.SimpleNamespace(net=ScaledNet(extra_when_batched))
    fast = compile_loop(GuidedLoop(), backend="eager")
    for scale in scales:
        components.net.scale = scale
        _, state = fast(components, make_state())
        _, expected = GuidedLoop()(components, make_state())
        assert matches_eager(state.get("latents"), expected.get("latents")), scale
    return fast


def test_a_models_float_inside_batched_guidance_calls_is_read_per_call():
    """The model's ``self.scale`` inside the two guidance calls batched as one, and in a third call: an input of the
    compiled loop at each of its places (the batched call's op reads it where both calls did)."""
    fast = run_model_scales(False, (1.0, 1.0, 0.4, 0.4, 0.7))
    assert fast.stats.plans == 1 and fast.stats.compiled_calls == 4
    assert "floats as inputs (a new value runs this plan): components['net'].scale" in fast.explain()


def test_a_float_a_batched_call_bakes_is_guarded_by_value():
    """Found by the fuzzer: the batched call's ops are not the calls' ops (here it runs one more), so it bakes the
    scale; it was guarded by type while the third call's place was read per call, and a new scale was ignored
    inside the batched call."""
    fast = run_model_scales(True, (1.0, 1.0, 0.4, 0.4))
    assert fast.stats.plans == 2 and fast.stats.compiled_calls == 2
    assert "batched calls:" in fast.explain() and "one batched call" in fast.explain()


# -- the traced float itself ------------------------------------------------------------------------------------
@pytest.fixture
def traced():
    lifts = Lifts(True, lambda: False)
    with lifts.active():
        yield lifts


@pytest.mark.parametrize("use, check, note", [
    (lambda f: f * torch.ones(2), None, None),                   # a tensor's operand: no Python use
    (lambda f: torch.ones(2) - f, None, None),
    (lambda f: f > 1.0, "float.__gt__(4.0, 1.0)", None),          # predicates: checks with outcomes
    (lambda f: 1 < f, "float.__gt__(4.0, 1)", None),
    (lambda f: f == 4, "float.__eq__(4.0, 4)", None),
    (lambda f: bool(f), "float.__bool__(4.0)", None),
    (lambda f: math.isclose(f, 1.0), "math.isclose(4.0, 1.0)", None),
    (lambda f: f + 1.0, None, "used by Python (__add__)"),       # anything else: its value is guarded
    (lambda f: {f: 1}, None, "hashed"),
    (lambda f: f"{f:.2f}", None, "used by Python (__format__)"),
    (lambda f: math.sqrt(f), None, "passed to math.sqrt"),
    (lambda f: f > torch.zeros(()), None, None),                  # a tensor comparison: recorded as an op
])
def test_a_traced_float_notes_each_python_use(traced, use, check, note):
    f = traced.input("scale", 4.0)
    source = traced.sources[0]
    assert type(f) is TracedFloat and source.checks == [] and source.use is None
    use(f)
    assert [c.text(4.0) for c in source.checks] == ([check] if check else [])
    assert (source.use or "").startswith(note or "") and (source.use is None) == (note is None)


def test_a_check_holds_while_its_outcome_does_and_says_why_not():
    source = Source("input", "scale", 4.0, linked=True)
    lifts = Lifts(True, lambda: False)
    with lifts.active():
        f = TracedFloat(4.0, source)
        assert not math.isclose(f, 1.0) and f > 2
    assert source.fits(7.5) and not source.fits(1.0) and not source.fits(1.5) and not source.fits(4)
    assert source.misfit(1.0) == "input 'scale' is 1.0: math.isclose(1.0, 1.0), was False when traced"
    assert source.misfit(1.5) == "input 'scale' is 1.5: float.__gt__(1.5, 2), was True when traced"
    assert source.misfit(4) == "input 'scale' is an int, was a float (an input of the compiled loop)"
