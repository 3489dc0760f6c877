"""Loop inputs that share storage (views of one tensor: Helios' position indices, split from one tensor). A
``while_loop`` may refuse inputs that alias each other ("input-to-input aliasing": Helios' step loop, in
tests/test_diffusers_families.py), so the compiled loop is given its own copy of all but the first
(runtime/executables.py ``unshared``). Equality with eager first, then that the calls ran compiled."""

import torch

from loopgraph import InputParam, PipelineState, compile_loop

from .helpers import Loop, XBlock, quiet


class ReadsTwoViews(XBlock):
    @property
    def inputs(self):
        return [InputParam("x"), InputParam("short"), InputParam("long")]

    def __call__(self, components, block_state, i: int):
        x = block_state.x
        block_state.x = x * 0.9 + x * block_state.short * block_state.long / 100
        return components, block_state


def run(loop, history):
    state = PipelineState()
    short, long = history.view(1, 6).split([3, 3], dim=1)  # two views of one tensor, as Helios' position indices
    state.set("x", torch.ones(1, 3))
    state.set("short", short)
    state.set("long", long)
    state.set("num_steps", 4)
    _, state = loop(None, state)
    return state.get("x")


def test_inputs_that_are_views_of_one_tensor_run_compiled_and_equal_eager():
    loop = Loop.from_blocks_dict({"mix": ReadsTwoViews})
    fast = compile_loop(Loop.from_blocks_dict({"mix": ReadsTwoViews}), backend="eager")
    for call in range(3):
        history = torch.arange(6) * (call + 1)
        torch.testing.assert_close(quiet(run, fast, history), run(loop, history), rtol=0, atol=0)
    assert fast.stats.compiled_calls == 2 and fast.last_plan.kind == "whole loop on state buffers"
    assert fast.stats.plans == 1
