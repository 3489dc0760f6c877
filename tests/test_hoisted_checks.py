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
        elif self.kind == "flag":  # a 0-d mask selects everything or nothing: not a mask's positions
            h[mask.bool().any()] = 0.0
        elif self.kind == "numpy":  # an array that shares the tensor's memory: not a check, the block runs eagerly
            h = h * float(mask.numpy().sum() + 1)
        elif self.kind == "list_changed":  # the caller changes the list it got: the check keeps its own copy
            ids = mask.tolist()
            ids.append(7)
            h = h * (1.0 + sum(ids) / 10)
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


@pytest.mark.parametrize("kind", ["bool", "tolist", "nonzero", "mask_index", "built_in_place", "also_held",
                                  "list_changed"])
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


@pytest.mark.parametrize("kind", ["numpy", "flag"])
def test_numpy_of_an_input_or_a_0d_mask_runs_as_eager_runs_it(kind):
    loop, comps = setup(kind)
    x = torch.randn(3, 4)
    fast = compile_loop(loop, backend="eager")
    for mask in [torch.tensor([1, 0, 1]), torch.tensor([1, 0, 1]), torch.tensor([1, 1, 1])]:
        want = call(loop, comps, x, mask.clone())
        assert matches_eager(quiet(call, fast, comps, x, mask.clone()), want)
    if kind == "numpy":
        assert "data-dependent Python: `numpy`" in fast.explain()


class ScheduleTwice(XBlock):
    """Reads one schedule through a component and through the BlockState (a scheduler's own timesteps that the
    pipeline also hands to the loop): one tensor when traced."""

    @property
    def inputs(self):
        return [InputParam("x"), InputParam("ts")]

    def __call__(self, components, block_state, i: int):
        block_state.x = block_state.x * components.keeper.ts[i] + block_state.ts.sum()
        return components, block_state


def test_a_component_tensor_that_was_an_inputs_tensor_and_no_longer_is_re_plans():
    loop = Loop.from_blocks_dict({"d": ScheduleTwice()})
    fast = compile_loop(loop, backend="eager")
    for k in range(4):
        ts = torch.arange(1.0, 5.0) * (k + 1 if k < 2 else 1)
        comps = Components(keeper=Components(ts=ts))
        given = ts if k < 2 else ts.clone()  # from call 3 on the component keeps a tensor of its own
        eager_comps = Components(keeper=Components(ts=ts))
        want = toy(loop, eager_comps, given)
        assert matches_eager(quiet(toy, fast, comps, given), want), k


def toy(loop, components, ts, n=3):
    state = PipelineState()
    state.set("x", torch.ones(2))
    state.set("ts", ts)
    state.set("num_steps", n)
    _, state = loop(components, state)
    return state.get("x")
