"""diffusers' step caches (``transformer.enable_cache(...)``) under compile_loop, on LTX's loop (it opens
``cache_context`` per guidance batch), built offline from tiny configs. Equality with diffusers' eager run with the
same cache first, over several calls: the caches keep state across steps and calls (counters that go on from one
generation to the next in a modular loop), which the compiled loop must follow exactly; ``disable_cache()``
afterwards plans again. How far each is compiled (issue 28): docs/diffusers.md, "Step caches"."""

import importlib.util

import pytest
import torch

from loopgraph import compile_loop
from loopgraph.zoo.diffusers_families import build_family

from .helpers import assert_same, quiet

needs_diffusers = pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None,
    reason="diffusers is not installed (pip install loopgraph[diffusers]; `make test` installs it)",
)


def cache_config(name: str):
    from diffusers import MagCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig

    if name == "pyramid_attention_broadcast":
        return PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                               spatial_attention_timestep_skip_range=(-1, 2000),
                                               current_timestep_callback=lambda: 500)
    if name == "mag_cache":
        return MagCacheConfig(threshold=0.5, num_inference_steps=6, mag_ratios=[1.0] + [0.99] * 5)
    return TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, taylor_factors_dtype=torch.float32,
                                 cache_identifiers=[r"^transformer_blocks\.\d+$"])


def ltx_with(cache: str | None):
    setup = build_family("ltx")
    setup.steps = 6
    if cache is not None:
        setup.components.transformer.enable_cache(cache_config(cache))
    return setup


@needs_diffusers
@pytest.mark.parametrize("cache", ["pyramid_attention_broadcast", "mag_cache", "taylorseer_cache"])
def test_a_diffusers_cache_under_compile_loop_gives_diffusers_eager_results_call_after_call(cache):
    eager = ltx_with(cache)
    expected = [dict(eager.run().values) for _ in range(3)]
    without = dict(ltx_with(None).run().values)
    with pytest.raises(AssertionError):  # the cache skips work: its results are not the uncached ones
        assert_same(expected[0], without)
    setup = ltx_with(cache)
    fast = compile_loop(setup.wrapper, backend="eager")
    for call in range(3):
        assert_same(dict(quiet(setup.run, fast).values), expected[call], f"{cache}: call {call}")
    # the transformer is never batched with its hooks (a batched retrace ran them once more: MagCache's traced call
    # was 0.52 off eager)
    assert fast.last_plan.batching and all(not site.batched_steps for site in fast.last_plan.batching)
    # disable_cache(): the guards see the hooks gone, the loop plans again, then runs compiled as without a cache
    eager.components.transformer.disable_cache()
    setup.components.transformer.disable_cache()
    compiled_calls = fast.stats.compiled_calls
    for call in range(2):
        assert_same(dict(quiet(setup.run, fast).values), dict(eager.run().values), f"{cache} off: call {call}")
    assert fast.last_plan.kind == "whole loop on state buffers" and fast.stats.compiled_calls == compiled_calls + 1
