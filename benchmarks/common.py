"""Loops prepared for each method, and how one full loop is timed (shared by the benchmark files)."""

import torch

from loopgraph.bench.loop import BenchConfig, build_setup
from loopgraph.bench.methods import make_method

METHODS = ("eager", "compile_denoiser", "compile_loop")


def prepared(method: str, steps: int, device: str, **model):
    """A loop built for ``method`` and warmed up (compiled and planned) at ``steps``."""
    setup = build_setup(BenchConfig(steps=steps, device=device, model=model))
    run = make_method(method, setup)
    for _ in range(2):  # the first call compiles (compile_denoiser) or plans and compiles (compile_loop)
        run(setup.new_state())
    return setup, run


def time_loop(benchmark, setup, run, rounds: int = 10):
    """Benchmark one full loop per round; the fresh state is made outside the timed region."""
    sync = torch.cuda.synchronize if setup.device.type == "cuda" else (lambda: None)

    def call(state):
        run(state)
        sync()

    return benchmark.pedantic(call, setup=lambda: ((setup.new_state(),), {}), rounds=rounds, iterations=1,
                              warmup_rounds=1)
