"""flex_attention inside a loop block (Wan-Animate-2's transformer): recorded from its eager run as the
``flex_attention`` higher-order operator called on its score_mod and block mask, which compiled code cannot call
again. The block runs eagerly each step, the rest compiled, and explain() names the operator (the plan used to
fail with a SyntaxError in fx's generated code, "please report this"). Equality with eager first."""

import warnings

import torch
from torch.nn.attention.flex_attention import flex_attention

from loopgraph import PipelineState, compile_loop

from .helpers import Loop, Scale, XBlock, quiet


class Attend(XBlock):
    def __call__(self, components, block_state, i: int):
        x = block_state.x
        block_state.x = x + 0.1 * flex_attention(x, x, x, score_mod=lambda s, b, h, q, kv: s * 0.5)
        return components, block_state


def run(loop, x):
    state = PipelineState()
    state.set("x", x)
    state.set("num_steps", 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex_attention without torch.compile warns
        return loop(None, state)[1].get("x")


def test_flex_attention_in_a_block_runs_that_block_eagerly_and_says_why():
    eager = Loop.from_blocks_dict({"attend": Attend, "scale": Scale})
    fast = compile_loop(Loop.from_blocks_dict({"attend": Attend, "scale": Scale}), backend="eager")
    for call in range(2):
        x = torch.randn(1, 1, 8, 4, generator=torch.Generator().manual_seed(call))
        torch.testing.assert_close(quiet(run, fast, x.clone()), run(eager, x.clone()), rtol=0, atol=0)
    text = fast.explain()
    assert "attend (Attend" in text and "higher-order op `torch.ops.higher_order.flex_attention`" in text, text
    assert "please report" not in text and fast.stats.eager_blocks == 1 and fast.stats.plans == 1
