"""What does batching the guidance passes gain? compile_loop with the cond and uncond denoiser calls of each step
batched into one call (the default, ``batch_guidance="auto"``) against the same loop with one call per guidance
batch (``batch_guidance=False``), and eager, side by side per loop: the default DiT, the conv UNet preset and
diffusers' SDXL, Wan and QwenImage loops (CFG in every step). Peak memory per call is recorded too (batching
raises the activation peak of the model call: one batch of 2B instead of two of B).

    .venv/bin/python -m pytest benchmarks/test_batched_guidance.py --benchmark-columns=median,min,max
"""

import pytest
import torch

from loopgraph.bench.loop import BenchConfig, build_setup
from loopgraph.bench.measure import peak_memory
from loopgraph.bench.methods import make_method
from loopgraph.verify import matches_eager

from common import time_loop

LOOPS = {"dit": 20, "unet": 20, "sdxl": 8, "wan": 8, "qwenimage": 8}  # loop -> steps
METHODS = ("eager", "compile_loop_unbatched", "compile_loop")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("loop", list(LOOPS))
def test_batched_guidance(benchmark, device, loop, method):
    if loop in ("sdxl", "wan", "qwenimage"):
        pytest.importorskip("diffusers", reason="the diffusers loops need diffusers")
        if device != "cpu":
            pytest.skip("the diffusers loops are built on CPU")
    setup = build_setup(BenchConfig(preset=loop, steps=LOOPS[loop], device=device))
    expected = setup.run()
    run = make_method(method, setup)
    for _ in range(2):  # plans and compiles, then a warm call
        got = run(setup.new_state())
    assert matches_eager(got, expected)
    batched = getattr(run, "compiled", None)  # compile_loop's CompiledLoop
    batched = batched.last_plan if method != "eager" else None
    peak = peak_memory(lambda: run(setup.new_state()), torch.device(device))
    benchmark.group = f"batched guidance: {loop}, {LOOPS[loop]} steps"
    benchmark.extra_info.update(loop=loop, method=method, steps=LOOPS[loop], device=device, peak_mem_bytes=peak,
                                batched=[str(s) for s in batched.batching] if batched else None)
    time_loop(benchmark, setup, run, rounds=10)
