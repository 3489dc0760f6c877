"""What does a stochastic sampler cost per policy? DDIM with eta=1 (noise every step), default DiT, 20 steps:
eager, compile_loop(rng="eager") (the drawing block runs eagerly each step between compiled segments) and
compile_loop(rng="counter") (the noise compiled into the loop). Each compiled policy is checked first, up to
Inductor's float rounding: rng="eager" against eager, rng="counter" against the eager loop under the seed
policy (rng.eager_loop)."""

import dataclasses
import statistics
import time

import torch

from common import time_loop
from loopgraph import compile_loop
from loopgraph.compile import matches_eager
from loopgraph.rng import eager_loop
from loopgraph.zoo.loops import build_loop

STEPS = 20
POLICIES = ("eager", "compile_loop rng=eager", "compile_loop rng=counter")
ROUNDS = 15


def _prepared(policy: str, device: str):
    setup = build_loop("dit-ddim", steps=STEPS, device=device)
    scheduler = setup.components.scheduler
    scheduler.config = dataclasses.replace(scheduler.config, eta=1.0)
    if policy == "eager":
        return setup, lambda state: setup.wrapper(setup.components, state)
    rng = policy.rsplit("=", 1)[1]
    fast = compile_loop(setup.wrapper, rng=rng)
    reference = setup.wrapper if rng == "eager" else (lambda c, s: eager_loop(setup.wrapper, c, s))
    for seed in (0, 1):  # plans and compiles, then a compiled call; both checked
        torch.manual_seed(seed)
        expected = reference(setup.components, setup.new_state())[1].get("latents")
        torch.manual_seed(seed)
        got = fast(setup.components, setup.new_state())[1].get("latents")
        assert matches_eager(got, expected), policy  # Inductor's float rounding, scaled by the latents
    return setup, lambda state: fast(setup.components, state)


def test_stochastic_sampler(benchmark, device):
    """The three policies timed interleaved, round by round (a noisy machine slows them alike); the medians
    and ratios go to extra_info, and the benchmark table times rng="counter"."""
    loops = {policy: _prepared(policy, device) for policy in POLICIES}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = {policy: [] for policy in POLICIES}
    for _ in range(ROUNDS):
        for policy, (setup, run) in loops.items():
            state = setup.new_state()
            start = time.perf_counter()
            run(state)
            sync()
            times[policy].append(time.perf_counter() - start)
    medians = {policy: statistics.median(t) * 1e3 for policy, t in times.items()}
    benchmark.group = f"ddim eta=1, {STEPS} steps"
    benchmark.extra_info.update(device=device, steps=STEPS, rounds=ROUNDS, median_ms=medians,
                                counter_vs_eager=medians["eager"] / medians["compile_loop rng=counter"],
                                counter_vs_segments=medians["compile_loop rng=eager"]
                                / medians["compile_loop rng=counter"])
    for policy, ms in medians.items():
        print(f"{policy:<26} {ms:8.2f} ms (median of {ROUNDS}, interleaved)")
    setup, run = loops["compile_loop rng=counter"]
    time_loop(benchmark, setup, run, rounds=10)
