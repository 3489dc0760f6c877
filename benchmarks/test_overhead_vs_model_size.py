"""Where does compile_loop stop paying off? From an overhead-bound tiny DiT to a compute-bound one."""

import pytest

from common import METHODS, prepared, time_loop

SIZES = {  # DiT config overrides, from overhead-bound to compute-bound on a small CPU
    "tiny": dict(hidden_dim=32, depth=1),
    "default": dict(),
    "small": dict(hidden_dim=128, depth=4, sample_size=32),
    "medium": dict(hidden_dim=384, depth=6, sample_size=32, num_heads=6),
}


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("method", METHODS)
def test_overhead_vs_model_size(benchmark, device, method, size):
    setup, run = prepared(method, 10, device, **SIZES[size])
    benchmark.group = f"size={size}"
    benchmark.extra_info.update(method=method, size=size, steps=10, device=device, **SIZES[size])
    time_loop(benchmark, setup, run, rounds=5)
