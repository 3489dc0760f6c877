"""A schedule indexed by the step in a block (issue 30): ``sigmas[i]``, ``sigmas[i + 1]``, ``x[:, i]``, ``x[i:i + 2]``
and ``x + i`` give one step graph for any N. An input indexed by the step is gathered into a table per call (the
compiled code does not depend on its length), a tensor the step computes is indexed at a device-side step index;
where step graphs still grow with N a warning and ``explain()`` say which op and what to change. Every call equals
eager's."""

import warnings

import pytest
import torch

from loopgraph import (InputParam, LoopSequentialPipelineBlocks, ModularPipelineBlocks, OutputParam, PipelineState,
                       compile_loop)
from loopgraph.bench.measure import count_python_calls
from loopgraph.compile import matches_eager
from loopgraph.runtime import executables


class Step(ModularPipelineBlocks):
    inputs = [InputParam("latents"), InputParam("sigmas"), InputParam("table")]
    intermediate_outputs = [OutputParam("latents")]
    read = "sigmas"  # how the block reads its schedule (the tests set it)

    def __call__(self, components, block_state, i: int, t: torch.Tensor):
        x, sigmas = block_state.latents, block_state.sigmas
        eps = torch.tanh(x + t * 1e-3)
        if self.read == "sigmas":      # a block input indexed by the step: gathered per call
            dt = sigmas[i + 1] - sigmas[i]
        elif self.read == "first":     # the same, and step 0 its own step graph: each gathers its own rows
            dt = sigmas[i + 1] - sigmas[i] if i else (sigmas[1] - sigmas[0]) * 0.5
        elif self.read == "slice":     # a slice of an input by the step: x[i:i + 2], gathered per call
            pair = sigmas[i:i + 2]
            dt = pair[1] - pair[0]
        elif self.read == "window":    # a slice of the carried latents by the step: a device-side index
            dt = x[:, i % 4:i % 4 + 3].mean() * 0.01 - 0.03
        elif self.read == "column":    # a 2-D input's column: x[:, i]
            dt = block_state.table[:, i].sum() * -0.01
        elif self.read == "computed":  # a tensor the step computes, indexed from the end: a device-side index
            dt = (sigmas * 0.5)[-(i + 2)] - 0.5
        elif self.read == "int":       # the step counter as an operand: a table row
            dt = (x * 0 + i) * -0.01 - 0.02
        elif self.read == "view":      # a view of the schedule changed in place: stays a view, a graph per step
            row = sigmas.clone()[i]
            row.mul_(0.5)
            dt = row - 0.6
        else:                          # an op that needs the Python int: one graph per step, and a warning
            dt = torch.roll(sigmas, shifts=i)[0] - 1.1
        block_state.latents = x + dt * eps
        return components, block_state


class Loop(LoopSequentialPipelineBlocks):
    block_classes = [Step]
    block_names = ["step"]
    loop_inputs = [InputParam("timesteps")]

    def __call__(self, components, state):
        bs = self.get_block_state(state)
        for i, t in enumerate(bs.timesteps):
            components, bs = self.loop_step(components, bs, i=i, t=t)
        self.set_block_state(state, bs)
        return components, state


def loop_reading(read: str) -> Loop:
    loop = Loop()
    loop.sub_blocks["step"].read = read
    return loop


def new_state(n: int, read: str = "sigmas") -> PipelineState:
    g = torch.Generator().manual_seed(n)
    state = PipelineState()
    state.set("latents", torch.randn(2, 8, generator=g))
    state.set("sigmas", torch.linspace(1.0, 0.0, n + 1) ** 2)
    state.set("table", torch.randn(3, n, generator=g) if read == "column" else None)
    state.set("timesteps", torch.linspace(1000.0, 0.0, n + 1)[:-1])
    return state


def eager(read: str, n: int) -> torch.Tensor:
    _, state = loop_reading(read)(None, new_state(n, read))
    return state.get("latents")


@pytest.mark.parametrize("read", ["sigmas", "slice", "window", "column", "computed", "int"])
def test_a_step_indexed_schedule_is_one_step_graph_for_any_n_equal_to_eager(read):
    import torch._dynamo.utils as dynamo_utils

    fast = compile_loop(loop_reading(read), backend="eager", strict=True)
    dynamo_utils.counters.clear()
    for n in (4, 9, 4, 6):
        _, state = fast(None, new_state(n, read))
        assert matches_eager(state.get("latents"), eager(read, n)), (read, n)
        assert f"step graphs: 1 for {n} steps" in fast.explain()
    assert fast.stats.compiled_calls == 1  # n=4 again: its plan, compiled
    if read != "computed":  # no input's length is in the compiled code (gathered, or not read): one compilation
        assert dynamo_utils.counters["stats"]["unique_graphs"] == 1 and fast.stats.step_graphs == 1
        assert "sigmas" not in fast.last_plan.invariant_slots and "table" not in fast.last_plan.invariant_slots


def test_step_graphs_of_some_steps_gather_their_own_rows():
    fast = compile_loop(loop_reading("first"), backend="eager", strict=True)
    for n in (4, 6, 4):
        _, state = fast(None, new_state(n))
        assert matches_eager(state.get("latents"), eager("first", n)), n
        assert f"step graphs: 2 for {n} steps" in fast.explain()
    assert fast.stats.compiled_calls == 1 and fast.stats.step_graphs == 2


def test_new_schedule_values_of_the_same_length_are_gathered_on_each_call():
    fast = compile_loop(loop_reading("sigmas"), backend="eager")
    fast(None, new_state(5))
    for power in (1.0, 3.0):
        state = new_state(5)
        state.set("sigmas", torch.linspace(1.0, 0.0, 6) ** power)
        expected = new_state(5)
        expected.set("sigmas", state.get("sigmas").clone())
        _, state = fast(None, state)
        _, expected = Loop()(None, expected)
        assert matches_eager(state.get("latents"), expected.get("latents")), power
    assert fast.stats.plans == 1 and fast.stats.compiled_calls == 2


def test_a_view_changed_in_place_keeps_its_view_and_eagers_result():
    fast = compile_loop(loop_reading("view"), backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(2):
            _, state = fast(None, new_state(4))
            assert matches_eager(state.get("latents"), eager("view", 4))
    assert fast.stats.compiled_calls == 1


def test_step_graphs_that_grow_with_n_warn_once_and_explain_says_which_op():
    fast = compile_loop(loop_reading("roll"), backend="eager")
    with pytest.warns(UserWarning, match=r"Loop: 6 step graphs for 6 steps .*`roll` in block 'step' takes 0 in "
                                         r"step 0, 1 in step 1"):
        _, state = fast(None, new_state(6))
    assert matches_eager(state.get("latents"), eager("roll", 6))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per compiled loop
        _, state = fast(None, new_state(7))
    assert matches_eager(state.get("latents"), eager("roll", 7))
    assert "  more step graphs for more steps: `roll` in block 'step' takes" in fast.explain()


def test_inductor_runs_a_step_indexed_schedule_with_no_python_per_step(monkeypatch):
    import torch._dynamo.utils as dynamo_utils

    monkeypatch.setattr(executables, "CHUNK_SECONDS", 1e9)  # one chunk per call: Python per step, not per chunk
    fast = compile_loop(loop_reading("sigmas"), cache=False)
    dynamo_utils.counters.clear()
    calls = {}
    for n in (4, 16):
        fast(None, new_state(n))  # plans (a traced eager call)
        state = new_state(n)
        calls[n] = count_python_calls(lambda: fast(None, state))
        assert matches_eager(state.get("latents"), eager("sigmas", n))
    assert calls[4] == calls[16], calls
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1


def test_eager_segments_index_the_schedule_at_a_device_side_index():
    class Clip(ModularPipelineBlocks):  # data-dependent Python: runs eagerly between compiled segments
        inputs = [InputParam("latents")]

        def __call__(self, components, block_state, i, t):
            if block_state.latents.abs().max() > 1e6:
                block_state.latents = block_state.latents.clamp(-1e6, 1e6)
            return components, block_state

    class Segmented(Loop):
        block_classes = [Step, Clip]
        block_names = ["step", "clip"]

    fast = compile_loop(Segmented(), backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in (5, 5):
            _, state = fast(None, new_state(n))
            _, expected = Segmented()(None, new_state(n))
            assert matches_eager(state.get("latents"), expected.get("latents"))
    assert fast.stats.eager_blocks == 1 and fast.stats.segment_calls > 0
    assert fast.stats.step_graphs == 1  # the compiled segment: one step graph for the 5 steps


class FromScheduler(ModularPipelineBlocks):  # the schedule as a component's attribute, as diffusers' schedulers keep it
    inputs = [InputParam("latents")]
    intermediate_outputs = [OutputParam("latents")]

    def __call__(self, components, block_state, i: int, t: torch.Tensor):
        sigmas = components.scheduler.sigmas
        block_state.latents = block_state.latents + (sigmas[i + 1] - sigmas[i]) * torch.tanh(block_state.latents)
        return components, block_state


class SchedulerLoop(Loop):
    block_classes = [FromScheduler]
    block_names = ["step"]


def test_a_components_schedule_indexed_by_step_is_one_step_graph_compiled_once():
    """A scheduler's ``sigmas`` (a component's attribute) indexed by the step: one step graph for any N, compiled
    once. A new schedule tensor is a new plan (the attribute is guarded by identity; its rows become a table), not
    a new compilation."""
    import types

    import torch._dynamo.utils as dynamo_utils

    fast = compile_loop(SchedulerLoop(), backend="eager", strict=True)
    components = types.SimpleNamespace(scheduler=types.SimpleNamespace())
    dynamo_utils.counters.clear()
    for n, power in [(4, 1.0), (4, 2.0), (7, 1.0), (4, 3.0), (4, 3.0)]:
        components.scheduler.sigmas = torch.linspace(1.0, 0.0, n + 1) ** power  # as set_timesteps does
        _, state = fast(components, new_state(n))
        _, expected = SchedulerLoop()(components, new_state(n))
        assert matches_eager(state.get("latents"), expected.get("latents")), (n, power)
        assert f"step graphs: 1 for {n} steps" in fast.explain()
    assert fast.stats.compiled_calls == 1  # the last call: the same schedule tensor again
    assert dynamo_utils.counters["stats"]["unique_graphs"] == 1
