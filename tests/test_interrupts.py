"""Other threads and Ctrl-C during a compiled call (issue 31): the compiled loop releases the GIL while it runs,
through both routes (compiled in this process, and loaded from an AOTInductor package of the persistent cache),
and a SIGINT stops a call between two chunks of steps, the caller's state untouched."""

import os
import signal
import threading
import time

import pytest
import torch

from loopgraph import compile_loop
from loopgraph.bench.measure import count_python_calls
from loopgraph.runtime import executables
from loopgraph.verify import matches_eager

from .helpers import Loop, XBlock, quiet, run_loop

STEPS = 200


class Mix(XBlock):
    """A step heavy enough to time: a 192x192 matmul and a tanh."""

    def __init__(self):
        super().__init__()
        self.weight = torch.randn(192, 192, generator=torch.Generator().manual_seed(0)) / 14

    def __call__(self, components, block_state, i: int):
        block_state.x = torch.tanh(block_state.x @ self.weight) + 0.01
        return components, block_state


def start() -> torch.Tensor:
    return torch.randn(192, 192, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=["in process", "package"])
def compiled(request, tmp_path_factory):
    """The loop compiled by Inductor, in this process or stored and loaded again as an AOTInductor package."""
    loop = Loop.from_blocks_dict({"mix": Mix})
    cache = False if request.param == "in process" else tmp_path_factory.mktemp("cache")
    fast = compile_loop(loop, cache=cache)
    quiet(run_loop, fast, start(), STEPS)  # traces, compiles (and stores)
    if cache:
        fast = compile_loop(loop, cache=cache)  # a new compiled loop loads the package
        quiet(run_loop, fast, start(), STEPS)
        assert fast.stats.loaded == 1 and fast.stats.compiles == 0, fast.explain()
    return loop, fast


def ticks_during(fn) -> tuple[int, float]:
    """How often a thread that sleeps 1 ms got to run while ``fn`` ran, and how long ``fn`` took."""
    stop, ticks = threading.Event(), [0]

    def beat():
        while not stop.is_set():
            ticks[0] += 1
            time.sleep(0.001)

    thread = threading.Thread(target=beat)
    thread.start()
    time.sleep(0.02)
    before, began = ticks[0], time.perf_counter()
    fn()
    seconds, count = time.perf_counter() - began, ticks[0] - before
    stop.set()
    thread.join()
    return count, seconds


def test_another_thread_runs_while_the_compiled_loop_runs(compiled):
    loop, fast = compiled
    assert matches_eager(run_loop(fast, start(), STEPS), run_loop(loop, start(), STEPS))
    during, seconds = ticks_during(lambda: run_loop(fast, start(), STEPS))
    asleep, _ = ticks_during(lambda: time.sleep(seconds))
    # holding the GIL, the thread ran once per chunk (0.01 of its rate); released, about as often as asleep
    assert during >= 0.2 * asleep, (during, asleep, seconds, fast.explain())


def test_ctrl_c_stops_a_compiled_call_between_chunks(compiled, monkeypatch):
    loop, fast = compiled
    monkeypatch.setattr(executables, "CHUNK_SECONDS", 0.0)  # one step per chunk
    executable = fast._plans.newest.executable
    chunks, started, sent = [], threading.Event(), threading.Event()
    inner = executable.compiled

    def counted(*args):
        chunks.append(1)
        if len(chunks) != 3:
            return inner(*args)
        started.set()  # the signal comes from another thread while the third chunk runs
        outputs = inner(*args)
        sent.wait(10)  # and has come before the loop goes on (on a busy machine the loop could end first)
        return outputs

    def send():
        if started.wait(10):
            os.kill(os.getpid(), signal.SIGINT)
            sent.set()

    monkeypatch.setattr(executable, "compiled", counted)
    sender = threading.Thread(target=send)
    sender.start()
    x = start()
    state_before = x.clone()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_loop(fast, x, STEPS)
    finally:
        sender.join()
    assert 3 <= len(chunks) < STEPS  # stopped between chunks, long before the end
    assert torch.equal(x, state_before)  # the caller's tensor was not written
    monkeypatch.undo()
    assert matches_eager(run_loop(fast, start(), STEPS), run_loop(loop, start(), STEPS))  # the next call is whole


def test_a_chunk_costs_a_handful_of_python_calls(compiled, monkeypatch):
    """Chunks are what a compiled call does in Python besides its fixed cost: each one calls the compiled code,
    flattening and checking the inputs once per call, not once per chunk."""
    loop, fast = compiled
    calls = {}
    for seconds in (1e9, 0.0):  # the whole loop in one chunk, then one step per chunk
        monkeypatch.setattr(executables, "CHUNK_SECONDS", seconds)
        assert matches_eager(run_loop(fast, start(), STEPS), run_loop(loop, start(), STEPS))
        x = start()
        calls[seconds] = count_python_calls(lambda: run_loop(fast, x, STEPS))
    per_chunk = (calls[0.0] - calls[1e9]) / (STEPS - 1)
    # a package's code is called through ctypes (a few calls); in this process, through torch.compile's own
    # Python (Dynamo's frame, AOTAutograd's runtime wrappers: about 70 calls on torch 2.13)
    assert per_chunk <= (12 if fast.stats.loaded else 100), (calls, fast.explain())
