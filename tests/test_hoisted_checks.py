"""Data-dependent Python on BlockState inputs no step writes (``if torch.all(image_embeds == 0)`` in HunyuanVideo
1.5, ``noisy_mask.sum() > 0`` in Cosmos, ``mask.tolist()``): the outcome is the same at every step of a call, so the
loop stays compiled with the traced outcome, checked on each call's own inputs (trace/hoist.py). Equality with eager
first; another outcome re-plans; an input a step writes keeps its block eager as before."""

import re

import pytest
import torch

from loopgraph import InputParam, PipelineState, compile_loop
from loopgraph.compile import matches_eager

from .helpers import Components, Loop, XBlock, quiet


class MaskedStep(XBlock):
    """Branches on its mask input, counts its rows in Python and picks rows by it, then steps ``x``."""

    kind = "bool"

    @property
    def inputs(self):
        return [InputParam("x"), InputParam("mask")]

    def __call__(self, components, block_state, i: int):
        x, mask = block_state.x, block_state.mask
        h = components.model(x)
        if self.kind == "bool":
            if torch.all(mask == 0):  # text-to-video: no image condition
                h = h * 0.5
            else:
                h = h + mask.float().mean()
        elif self.kind == "tolist":
            h = h * (1.0 + sum(mask.int().tolist()) / 10)
        elif self.kind == "nonzero":
            rows = mask.nonzero()[:, 0]
            h = h.index_add(0, rows, h[rows] * 0.25)
        elif self.kind == "mask_index":  # HunyuanVideo 1.5 reorders tokens by its masks: `image[image_mask]`
            keep = mask.bool()
            h = h + h[keep].sum(0) * 0.1
            h[~keep] = 0.0
        elif self.kind == "built_in_place":  # a mask made by writing into zeros, counted in Python
            made = torch.zeros_like(mask)
            made[1:] = mask[1:]
            h = h * (1.0 + int(made.sum()))
        elif self.kind == "also_held":  # the mask is a component's tensor too (MiniMax H3: its scheduler's
            h = h + components.keeper.mask.float().mean()  # timesteps and the BlockState's are one tensor)
            if mask.sum() > 1:
                h = h * 0.5
        elif self.kind == "written":  # the mask is loop state: its outcome changes between steps
            if mask.sum() > 1:
                h = h * 0.5
            block_state.mask = mask * 0
        block_state.x = x - 0.1 * torch.tanh(h)
        return components, block_state


def call(loop, components, x, mask, n=3):
    components.keeper.mask = mask
    state = PipelineState()
    state.set("x", x)
    state.set("mask", mask)
    state.set("num_steps", n)
    _, state = loop(components, state)
    return state.get("x")


def setup(kind):
    block = MaskedStep()
    block.kind = kind
    torch.manual_seed(0)
    return Loop.from_blocks_dict({"denoise": block}), Components(model=torch.nn.Linear(4, 4), keeper=Components())


@pytest.mark.parametrize("kind", ["bool", "tolist", "nonzero", "mask_index", "built_in_place", "also_held"])
def test_a_data_dependent_op_on_an_input_no_step_writes_keeps_the_loop_compiled(kind):
    loop, comps = setup(kind)
    x = torch.randn(3, 4)
    fast = compile_loop(loop, backend="eager")
    masks = [torch.tensor([0, 0, 0]), torch.tensor([0, 0, 0]), torch.tensor([1, 0, 1]), torch.tensor([1, 0, 1]),
             torch.tensor([0, 0, 0])]
    for k, mask in enumerate(masks):
        want = call(loop, comps, x, mask.clone())
        assert matches_eager(quiet(call, fast, comps, x, mask.clone()), want), k
    assert fast.stats.eager_blocks == 0 and "runs as: whole loop on state buffers" in fast.explain()
    assert fast.stats.plans == 2  # one per outcome: the third mask found the first plan again
    assert fast.stats.compiled_calls == 3
    assert re.search(r"\d+ data-dependent ops? on inputs by outcome", fast.explain())


def test_another_outcome_says_which_op_and_input_re_planned():
    loop, comps = setup("bool")
    fast = compile_loop(loop, backend="eager")
    quiet(call, fast, comps, torch.randn(3, 4), torch.tensor([0, 0, 0]))
    state = PipelineState()
    state.set("x", torch.randn(3, 4))
    state.set("mask", torch.tensor([1, 0, 0]))
    state.set("num_steps", 3)
    why = fast.guard_check(comps, state)
    assert "the data-dependent `__bool__` at" in why and "on input 'mask'" in why
    assert "gives False now, True when traced" in why


def test_an_input_a_step_writes_keeps_its_block_eager_and_equal():
    loop, comps = setup("written")
    x, mask = torch.randn(3, 4), torch.tensor([1, 1, 1])
    fast = compile_loop(loop, backend="eager")
    want = call(loop, comps, x, mask.clone())
    for _ in range(2):
        assert matches_eager(quiet(call, fast, comps, x, mask.clone()), want)
    assert "data-dependent Python: `__bool__` on a value derived from loop state" in fast.explain()
