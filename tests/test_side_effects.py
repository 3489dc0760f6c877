"""A block's side effects on module state (a list of previews, a step log): made on every call, as eager makes
them, never dropped (issue 31). A compiled loop cannot append to a Python list from inside its graph, so the block
that makes such a change runs eagerly each step (with a warning naming the block and the global), or
``strict=True`` raises.
"""

import warnings

import pytest
import torch

from loopgraph import compile_loop
from loopgraph.compile import matches_eager

from .helpers import Loop, XBlock, quiet, run_loop

PREVIEWS = []              # what a block appends to, every step
LOG = {"steps": 0}         # a step counter a block keeps in a module-level dict
COUNT = 0                  # a counter a block rebinds (`global COUNT`)


class Stats:
    def __init__(self) -> None:
        self.steps = 0


STATS = Stats()            # a user object whose attribute a block changes


class Preview(XBlock):
    def __call__(self, components, block_state, i: int):
        block_state.x = block_state.x * 0.9 + 1.0
        PREVIEWS.append(block_state.x.clone())
        return components, block_state


class CountSteps(XBlock):
    def __call__(self, components, block_state, i: int):
        LOG["steps"] += 1
        block_state.x = block_state.x * 0.5
        return components, block_state


class Denoise(XBlock):
    def __call__(self, components, block_state, i: int):
        block_state.x = torch.tanh(block_state.x) + 0.1 * i
        return components, block_state


class Rebind(XBlock):
    def __call__(self, components, block_state, i: int):
        global COUNT
        COUNT += 1
        block_state.x = block_state.x - 0.25
        return components, block_state


class Attribute(XBlock):
    def __call__(self, components, block_state, i: int):
        STATS.steps += 1
        block_state.x = block_state.x + 2.0
        return components, block_state


class ReadsPreviews(XBlock):
    """A compiled block whose arithmetic depends on what another block appends: not baked."""

    def __call__(self, components, block_state, i: int):
        block_state.x = torch.tanh(block_state.x) * (1.0 + 0.5 * len(PREVIEWS))
        return components, block_state


def module_state() -> tuple:
    return [p.clone() for p in PREVIEWS], LOG["steps"], COUNT, STATS.steps


def calls(runner, n_calls: int, clear: bool) -> list:
    """Three calls from fresh inputs; after each, what the module state holds."""
    global COUNT
    PREVIEWS.clear()
    LOG["steps"] = COUNT = STATS.steps = 0
    seen = []
    for k in range(n_calls):
        if clear:
            PREVIEWS.clear()
        x = run_loop(runner, torch.full((3,), float(k + 1)), 4)
        seen.append((x, *module_state()))
    return seen


def assert_same_calls(got: list, want: list) -> None:
    for k, ((x, previews, *counts), (x_want, previews_want, *counts_want)) in enumerate(zip(got, want)):
        assert matches_eager(x, x_want), k
        assert len(previews) == len(previews_want) and all(map(matches_eager, previews, previews_want)), k
        assert counts == counts_want, k


@pytest.mark.parametrize("clear", [False, True], ids=["kept", "cleared each call"])
@pytest.mark.parametrize("block", [Preview, CountSteps, Rebind, Attribute])
def test_a_blocks_change_to_a_module_global_is_made_on_every_call(block, clear):
    loop = Loop.from_blocks_dict({"denoise": Denoise, "side": block})
    want = calls(loop, 3, clear)
    fast = compile_loop(loop, backend="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = calls(fast, 3, clear)
    assert_same_calls(got, want)
    said = " ".join(str(w.message) for w in caught)
    name = {Preview: "PREVIEWS", CountSteps: "LOG", Rebind: "COUNT", Attribute: "STATS"}[block]
    assert f"test_side_effects.{name}" in said and "'side'" in said, said
    assert fast.stats.plans == 1, fast.explain()  # the global the block changes is not a guard
    assert fast.stats.eager_blocks == 1 and fast.stats.compiled_calls == 2, fast.explain()  # 'denoise' compiled


def test_strict_raises_on_a_change_to_a_module_global():
    loop = Loop.from_blocks_dict({"denoise": Denoise, "side": Preview})
    fast = compile_loop(loop, backend="eager", strict=True)
    with pytest.raises(Exception, match="PREVIEWS"):
        calls(fast, 1, True)


@pytest.mark.parametrize("clear", [False, True], ids=["kept", "cleared each call"])
def test_a_compiled_block_that_reads_what_an_eager_block_appends_matches_eager(clear):
    loop = Loop.from_blocks_dict({"denoise": ReadsPreviews, "side": Preview})
    want = calls(loop, 3, clear)
    fast = compile_loop(loop, backend="eager")
    got = quiet(calls, fast, 3, clear)
    assert_same_calls(got, want)
    assert fast.stats.eager_blocks == 1, fast.explain()
    if clear:  # guarded by the value the call starts from: the same each call
        assert fast.stats.plans == 1 and fast.stats.compiled_calls == 2, fast.explain()


class CountsItsCalls(Loop):
    def __call__(self, components, state):
        LOG["steps"] += 100
        return super().__call__(components, state)


def test_the_wrappers_own_change_to_a_module_global_runs_the_loop_eagerly():
    loop = CountsItsCalls.from_blocks_dict({"denoise": Denoise})
    want = calls(loop, 3, False)
    fast = compile_loop(loop, backend="eager")
    with pytest.warns(UserWarning, match="runs eagerly: side effect: changes the module global .*LOG"):
        got = calls(fast, 3, False)
    assert_same_calls(got, want)
    assert fast.stats.compiled_calls == 0
