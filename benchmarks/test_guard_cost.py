"""What do complete guards cost per call? A warm compiled call checks its plan's guard: the BlockState inputs
and every attribute the traced call read (the default loop's tiny DiT: ~650 reads; diffusers' SDXL UNet preset:
~4,800 reads of its 457 modules). Reported per loop: the median warm call, the guard check per call
(``stats.guard_seconds``, measured inside the calls), and its share of the call. Targets: <= 5% of a warm call on
the default loop, <= 1 ms per call on SDXL."""

import statistics
import time

import pytest
import torch

from loopgraph import compile_loop
from loopgraph.compile import matches_eager
from loopgraph.zoo.loops import build_loop

CALLS = 30


def _setup(name: str, device: str):
    if name == "dit":
        return build_loop("dit", steps=20, device=device)
    pytest.importorskip("diffusers", reason="the SDXL preset needs diffusers")
    from loopgraph.zoo.diffusers_loops import build_diffusers_loop

    return build_diffusers_loop("sdxl", steps=8)


@pytest.mark.parametrize("name", ["dit", "sdxl"])
def test_guard_cost(benchmark, device, name):
    setup = _setup(name, device)
    fast = compile_loop(setup.wrapper)
    expected = setup.run()
    for _ in range(2):  # plans and compiles, then a warm call
        got = fast(setup.components, setup.new_state())[1].get("latents")
    assert matches_eager(got, expected) and fast.stats.compiled_calls == 1
    sync = torch.cuda.synchronize if setup.device.type == "cuda" else (lambda: None)
    calls, guard = [], []
    for _ in range(CALLS):
        state = setup.new_state()
        before = fast.stats.guard_seconds
        start = time.perf_counter()
        fast(setup.components, state)
        sync()
        calls.append(time.perf_counter() - start)
        guard.append(fast.stats.guard_seconds - before)
    assert fast.stats.plans == 1  # every timed call reused the plan
    call_ms, guard_us = statistics.median(calls) * 1e3, statistics.median(guard) * 1e6
    reads = fast.explain().split("guards: ", 1)[1].splitlines()[0]
    benchmark.group = "guard cost"
    benchmark.extra_info.update(loop=name, device=device, calls=CALLS, call_ms=call_ms, guard_us=guard_us,
                                guard_share=guard_us / 1e3 / call_ms, guards=reads)
    print(f"\n{name}: warm call {call_ms:.2f} ms, guard check {guard_us:.1f} us per call "
          f"({100 * guard_us / 1e3 / call_ms:.2f}% of the call); {reads}")
    benchmark.pedantic(lambda: fast.guard_check(setup.components, state), rounds=50, iterations=1)
