"""Eager segments: a block with data-dependent Python or random ops runs eagerly each step, the others compiled.

Equality with the eager wrapper first (inputs on both sides of the branch, a threshold crossed mid-loop, a
stochastic sampler), then what is compiled, the warning, strict mode and the components' Python state.
"""

import copy
import dataclasses
import types
import warnings

import pytest
import torch

from loopgraph import ComponentSpec, InputParam, ModularPipelineBlocks, compile_loop
from loopgraph.modular_pipelines.state import values_equal
from loopgraph.verify import matches_eager
from loopgraph.zoo.loops import build_loop

from .helpers import Clamp, Loop, RescaleLatents, Scale, Shift, run_loop


class Normalize(ModularPipelineBlocks):
    @property
    def inputs(self):
        return [InputParam("x")]

    def __call__(self, components, block_state, i: int):
        scale = block_state.x.abs().mean().item()  # a Python scalar computed from loop state
        block_state.x = block_state.x / (1.0 + scale)
        return components, block_state


class Flag(ModularPipelineBlocks):
    """Leaves a data-dependent Python value in the BlockState for a compiled block to read."""

    @property
    def inputs(self):
        return [InputParam("x")]

    def __call__(self, components, block_state, i: int):
        block_state.big = float(block_state.x.abs().max().item() > 4.0)
        return components, block_state


class UseFlag(ModularPipelineBlocks):
    @property
    def inputs(self):
        return [InputParam("x")]

    def __call__(self, components, block_state, i: int):
        block_state.x = block_state.x * (1.0 - 0.3 * block_state.big)
        return components, block_state


def clamp_loop():
    return Loop.from_blocks_dict({"shift": Shift, "clamp": Clamp, "scale": Scale})


def quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args)


@pytest.mark.parametrize("start", [0.5, 10.0, -3.0])  # never above 4 at step 0, always, crossed mid-loop
def test_branch_on_item_matches_eager_on_both_sides(start):
    loop = clamp_loop()
    fast = compile_loop(loop, backend="eager")
    quiet(run_loop, fast, torch.ones(3), 6)  # planned on other inputs than the ones compared below
    for _ in range(2):
        x = torch.full((3,), start)
        Clamp.sides = []
        expected = run_loop(loop, x.clone(), 6)
        eager_sides, Clamp.sides = Clamp.sides, []
        got = run_loop(fast, x.clone(), 6)
        assert matches_eager(got, expected)
        assert Clamp.sides == eager_sides  # the eager block took the same side as eager, step by step
    assert fast.stats.plans == 1 and fast.stats.compiled_calls == 2


def test_sides_taken_cover_both_branches_and_a_mid_loop_crossing():
    sides = {}
    for start in (0.5, 10.0, -3.0):
        Clamp.sides = []
        run_loop(clamp_loop(), torch.full((3,), start), 6)
        sides[start] = Clamp.sides
    assert not sides[0.5][0] and sides[10.0][0]  # step 0: each side
    assert any(sides[0.5]) and not all(sides[0.5])  # crossed mid-loop


def test_item_scalar_block_matches_eager():
    loop = Loop.from_blocks_dict({"shift": Shift, "normalize": Normalize, "scale": Scale})
    fast = compile_loop(loop, backend="eager")
    for x in (torch.ones(4), torch.linspace(-5, 7, 4), torch.ones(4)):
        expected = run_loop(loop, x.clone(), 5)
        assert matches_eager(quiet(run_loop, fast, x.clone(), 5), expected)
    assert fast.stats.compiled_calls == 2 and fast.stats.eager_blocks == 1


def test_warning_names_block_file_line_and_the_compiled_blocks():
    fast = compile_loop(clamp_loop(), backend="eager")
    with pytest.warns(UserWarning) as caught:
        run_loop(fast, torch.ones(3), 4)
    text = " ".join(str(w.message) for w in caught)
    line = Clamp.__call__.__code__.co_firstlineno + 1
    assert "data-dependent Python: `item` on a value derived from loop state in block 'clamp' at " in text
    assert f"helpers.py:{line}" in text
    assert "'clamp' run eagerly each step between compiled segments; compiled: 'shift', 'scale'" in text


def test_other_blocks_are_compiled_segments():
    fast = compile_loop(clamp_loop(), backend="eager")
    quiet(run_loop, fast, torch.ones(3), 4)
    assert fast.stats.segment_calls == 0  # the planning call was the eager run itself
    run_loop(fast, torch.ones(3), 4)
    assert fast.stats.segment_calls == 2 * 4  # two compiled segments per step
    assert fast.stats.compiles == 2 and fast.stats.eager_blocks == 1  # one compiled graph per segment
    text = fast.explain()
    assert "shift (Shift, " in text and "): compiled (2 ops/step)" in text
    assert "clamp (Clamp, " in text and "): eager (data-dependent Python: `item`" in text
    assert "segments per step: compiled shift (1 step graphs) | eager clamp | compiled scale (1 step graphs)" in text
    plan = fast.last_plan
    assert plan.kind == "eager segments" and plan.program is None
    assert [(s.blocks, s.eager, s.variants) for s in plan.segments] == [
        (("shift",), False, 1), (("clamp",), True, 0), (("scale",), False, 1)]
    assert "block 'clamp'" in plan.problems[0]


def test_strict_raises():
    fast = compile_loop(clamp_loop(), backend="eager", strict=True)
    with pytest.raises(Exception, match=r"data-dependent Python: `item`.*'clamp'"):
        run_loop(fast, torch.ones(3), 3)


def test_data_dependent_python_value_read_by_a_compiled_block_finishes_eagerly():
    loop = Loop.from_blocks_dict({"shift": Shift, "flag": Flag, "use": UseFlag})
    fast = compile_loop(loop, backend="eager")
    quiet(run_loop, fast, torch.full((3,), 0.1), 3)  # traced with big == 0 at step 0
    expected = run_loop(loop, torch.full((3,), 10.0), 3)
    with pytest.warns(UserWarning, match="block 'flag' did not do at step 0 what it did when traced"):
        got = run_loop(fast, torch.full((3,), 10.0), 3)
    assert matches_eager(got, expected)


def ddim_with_noise(steps):
    setup = build_loop("dit-ddim", steps=steps, sample_size=8)
    scheduler = setup.components.scheduler
    scheduler.config = dataclasses.replace(scheduler.config, eta=0.7)  # DDIM eq. 16 noise: `torch.randn`
    return setup


def python_state(setup):
    return {name: dict(vars(getattr(setup.components, name))) for name in ("scheduler", "guider")}


def test_stochastic_step_matches_eager_exactly_and_leaves_eagers_python_state():
    setup = ddim_with_noise(steps=4)
    fast = compile_loop(setup.wrapper, backend="eager", batch_guidance=False)  # exact: batched calls round apart
    for k in range(3):
        torch.manual_seed(k)
        expected = setup.run()
        eager_python = python_state(setup)
        torch.manual_seed(k)
        if k == 0:
            with pytest.warns(UserWarning, match=r"random op `randn`.*'after_denoiser' at .*schedulers.py:\d+"):
                _, state = fast(setup.components, setup.new_state())
        else:
            _, state = fast(setup.components, setup.new_state())
        assert torch.equal(state.get("latents"), expected)
        got = python_state(setup)
        assert got.keys() == eager_python.keys()
        for name in got:
            assert got[name].keys() == eager_python[name].keys()
            assert all(values_equal(got[name][a], eager_python[name][a]) for a in got[name]), name
    assert setup.components.scheduler.step_index == 4
    assert fast.stats.compiled_calls == 2 and fast.stats.segment_calls == 2 * 4
    assert "eager after_denoiser" in fast.explain()


def test_inductor_eager_segments_match_eager():
    loop = clamp_loop()
    fast = compile_loop(loop)
    quiet(run_loop, fast, torch.ones(3), 6)
    # two segments; Dynamo may hand the one with a float64 table row to the backend twice (it restarts
    # its analysis to turn the Python scalar into a tensor)
    compiles = fast.stats.compiles
    assert compiles in (2, 3)
    for start in (0.5, 10.0, -3.0):
        expected = run_loop(loop, torch.full((3,), start), 6)
        assert matches_eager(run_loop(fast, torch.full((3,), start), 6), expected)
    assert fast.stats.compiles == compiles and fast.stats.compiled_calls == 3  # nothing recompiled


def test_several_eager_blocks_first_consecutive_and_between():
    loop = Loop.from_blocks_dict({"clamp": Clamp, "normalize": Normalize, "shift": Shift, "clamp2": Clamp,
                                  "scale": Scale})
    fast = compile_loop(loop, backend="eager")
    for x in (torch.ones(3), torch.full((3,), 10.0), torch.full((3,), 3.0)):
        expected = run_loop(loop, x.clone(), 5)
        assert matches_eager(quiet(run_loop, fast, x.clone(), 5), expected)
    assert fast.stats.eager_blocks == 3 and fast.stats.compiled_calls == 2  # each `.item()` block is eager
    assert "eager clamp | eager normalize | compiled shift (1 step graphs) | eager clamp2 | compiled scale" in (
        fast.explain())


# -- the zoo's denoise loop with a data-dependent block on the latents ------------------------------------------------
def rescale_loop(preset):
    from loopgraph.zoo.loops import DenoiseLoop

    class RescaleLoop(DenoiseLoop):
        block_classes = [*DenoiseLoop.block_classes, RescaleLatents]
        block_names = [*DenoiseLoop.block_names, "rescale"]

    setup = build_loop(preset, steps=6, sample_size=8, guidance_window=(0.0, 0.5))
    setup.wrapper = RescaleLoop()
    setup.wrapper.set_progress_bar_config(disable=True)
    return setup


@pytest.mark.parametrize("preset", ["dit", "unet"])
def test_denoise_loop_with_a_branch_on_the_latents_matches_eager(preset):
    setup = rescale_loop(preset)
    RescaleLatents.threshold, RescaleLatents.peaks = float("inf"), []
    setup.run()
    mid = sorted(RescaleLatents.peaks)[len(RescaleLatents.peaks) // 2]
    fast = compile_loop(setup.wrapper, backend="eager", batch_guidance=False)  # exact peaks: no batched rounding
    quiet(fast, setup.components, setup.new_state())
    sides = []
    for threshold in (0.0, float("inf"), mid):  # always, never, crossed mid-loop
        RescaleLatents.threshold, RescaleLatents.peaks = threshold, []
        expected = setup.run()
        eager_peaks, RescaleLatents.peaks = RescaleLatents.peaks, []
        _, state = fast(setup.components, setup.new_state())
        assert RescaleLatents.peaks == eager_peaks  # the eager block saw eager's latents at every step
        assert matches_eager(state.get("latents"), expected)
        assert setup.components.scheduler.step_index == 6
        sides.append([p > threshold for p in eager_peaks])
    assert all(sides[0]) and not any(sides[1]) and any(sides[2]) and not all(sides[2])
    assert fast.stats.plans == 1 and fast.stats.compiled_calls == 3
    assert "eager rescale" in fast.explain()


def test_component_attributes_the_loop_never_touches_stay_as_the_caller_set_them():
    setup = ddim_with_noise(steps=3)
    guider = setup.components.guider
    guider.note = "traced"
    fast = compile_loop(setup.wrapper, backend="eager")
    quiet(fast, setup.components, setup.new_state())
    guider.note = "mine"  # never read or written by the loop: the plan holds, and so does the value
    torch.manual_seed(0)
    expected = setup.run()
    torch.manual_seed(0)
    _, state = fast(setup.components, setup.new_state())
    assert matches_eager(state.get("latents"), expected)
    assert guider.note == "mine" and fast.stats.plans == 1 and fast.stats.compiled_calls == 1


# -- loop tensors a component holds across steps (a multistep scheduler's history) next to an eager block ---------
class History:
    """Like UniPC: keeps two derived tensors in a list shifted each step, and one more tensor.

    ``alias=True`` keeps the latents themselves: the component and the BlockState then share one tensor."""

    alias = False

    def __init__(self):
        self.reset()
        # like UniPC's timestep_list: not reset, shifted each step, the last call's leftovers never read
        self.stamps = [torch.tensor(-1.0), torch.tensor(-1.0)]

    def reset(self):
        self.previous, self.last, self.count = [None, None], None, 0


class UseHistory(ModularPipelineBlocks):
    @property
    def expected_components(self):
        return [ComponentSpec("history", History)]

    @property
    def inputs(self):
        return [InputParam("x")]

    def __call__(self, components, block_state, i: int):
        h = components.history
        x = block_state.x
        if h.last is not None:
            x = x + 0.25 * h.last
        if h.previous[0] is not None:
            x = x - 0.1 * h.previous[0]
        h.previous = [h.previous[1], x if h.alias else x * 0.9]
        h.stamps[0] = h.stamps[1]
        h.stamps[1] = torch.tensor(float(i))
        h.last = x * 0.5
        h.count += 1
        block_state.x = x
        return components, block_state


class DampHistory(ModularPipelineBlocks):
    """Eager: reads and rebinds the component's loop tensor on a data-dependent branch."""

    @property
    def expected_components(self):
        return [ComponentSpec("history", History)]

    def __call__(self, components, block_state, i: int):
        h = components.history
        if h.last.abs().max().item() > 2.0:
            h.last = h.last * 0.5
        return components, block_state


def history_run(loop, x, steps, components):
    components.history.reset()
    return run_loop(loop, x, steps, components)


@pytest.mark.parametrize("blocks", [
    {"shift": Shift, "history": UseHistory, "clamp": Clamp, "scale": Scale},  # eager block between steps' uses
    {"clamp": Clamp, "history": UseHistory, "damp": DampHistory, "scale": Scale},  # eager blocks read the history
])
def test_component_history_crosses_eager_blocks_and_matches_eager(blocks):
    loop = Loop.from_blocks_dict(blocks)
    components = types.SimpleNamespace(history=History())
    fast = compile_loop(loop, backend="eager")
    quiet(history_run, fast, torch.ones(3), 6, components)  # planned on other inputs than those compared
    for start in (0.5, 3.0, -2.0):
        x = torch.linspace(-1, 1, 3) * start
        expected = history_run(loop, x.clone(), 6, components)
        eager_history = copy.deepcopy(vars(components.history))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = history_run(fast, x.clone(), 6, components)
        assert not [w for w in caught if "runs eagerly" in str(w.message)], [str(w.message) for w in caught]
        assert matches_eager(got, expected)
        # the component's history is this call's, as eager leaves it
        assert values_equal(vars(components.history)["count"], eager_history["count"])
        for a, b in zip([*components.history.previous, components.history.last],
                        [*eager_history["previous"], eager_history["last"]]):
            assert matches_eager(a, b)
    assert fast.stats.compiled_calls == 3 and fast.stats.plans == 1
    assert fast.stats.eager_blocks == len({"clamp", "damp"} & set(blocks))
    assert fast.stats.segment_calls > 0


def test_component_sharing_a_tensor_with_the_block_state_until_an_eager_block_rebinds_it_matches_eager():
    # traced on inputs where `clamp` leaves x alone at step 0 (x and history.previous[1] one tensor), run on
    # inputs where it rebinds x: the compiled graph cannot tell the two apart, so that call finishes eagerly
    loop = Loop.from_blocks_dict({"shift": Shift, "history": UseHistory, "clamp": Clamp, "scale": Scale})
    components = types.SimpleNamespace(history=History())
    components.history.alias = True
    fast = compile_loop(loop, backend="eager")
    quiet(history_run, fast, torch.ones(3), 6, components)
    for start, breaks in ((0.5, False), (3.0, True)):
        x = torch.linspace(-1, 1, 3) * start
        expected = history_run(loop, x.clone(), 6, components)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = history_run(fast, x.clone(), 6, components)
        assert matches_eager(got, expected)
        assert any("the rest of the loop runs eagerly" in str(w.message) for w in caught) == breaks


def test_leftover_component_tensors_the_loop_never_reads_do_not_re_plan():
    # History.stamps keeps the last call's values, which the next call shifts out unread (UniPC's
    # timestep_list): alternating N must find each N's plan, not trace again
    loop = Loop.from_blocks_dict({"shift": Shift, "history": UseHistory, "scale": Scale})
    components = types.SimpleNamespace(history=History())
    fast = compile_loop(loop, backend="eager")
    for steps in (4, 6, 4, 6, 4):
        x = torch.linspace(-1, 1, 3)
        expected = history_run(loop, x.clone(), steps, components)
        expected_stamps = list(components.history.stamps)
        history_run(loop, x.clone(), steps + 1, components)  # other leftovers than the planning call saw
        got = history_run(fast, x.clone(), steps, components)
        assert matches_eager(got, expected)
        assert components.history.stamps == expected_stamps  # as eager leaves them
    assert fast.stats.plans == 2 and fast.stats.compiled_calls == 3
