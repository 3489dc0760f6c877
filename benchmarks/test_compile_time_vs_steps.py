"""Does compile time depend on N? compile_loop must stay flat; torch.compile of the wrapper unrolls the loop.

Each round is a cold compile: Dynamo is reset and Inductor's on-disk caches are off for the measurement.
"""

import time

import pytest
import torch
from torch._inductor import config as inductor_config

from loopgraph.bench.loop import BenchConfig, build_setup
from loopgraph.bench.methods import make_method


@pytest.mark.parametrize("steps", (5, 20, 50))
@pytest.mark.parametrize("method", ("compile_loop", "compile_wrapper"))
def test_compile_time_vs_steps(benchmark, device, method, steps):
    if method == "compile_wrapper" and steps > 20 and device == "cpu":
        pytest.skip("torch.compile of the wrapper at N=50 takes many minutes on a small CPU; N=5 and 20 show "
                    "the trend")

    def cold_first_call():
        torch._dynamo.reset()
        setup = build_setup(BenchConfig(steps=steps, device=device))
        run = make_method(method, setup)
        start = time.perf_counter()
        with inductor_config.patch(fx_graph_cache=False, autotune_local_cache=False):
            run(setup.new_state())
        return time.perf_counter() - start

    seconds = benchmark.pedantic(cold_first_call, rounds=1, iterations=1)
    benchmark.group = f"compile {method}"
    benchmark.extra_info.update(method=method, steps=steps, device=device, first_call_s=seconds)
