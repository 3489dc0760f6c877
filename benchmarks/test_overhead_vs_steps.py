"""How does the time per call grow with N (5 ... 100 steps)? Per-step overhead is the slope."""

import pytest

from common import METHODS, prepared, time_loop

STEPS = (5, 10, 20, 50, 100)
_loops = {}


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("method", METHODS)
def test_overhead_vs_steps(benchmark, device, method, steps):
    if method not in _loops:
        _loops[method] = prepared(method, STEPS[0], device)  # one compile per method, then new N only
    setup, run = _loops[method]
    setup.steps = steps
    run(setup.new_state())  # compile_loop plans the new N here (no new compile)
    benchmark.group = f"steps={steps}"
    benchmark.extra_info.update(method=method, steps=steps, device=device)
    time_loop(benchmark, setup, run, rounds=10 if steps <= 20 else 5)
