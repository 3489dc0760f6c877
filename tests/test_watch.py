"""Watching a compiled loop (issue 29): step callbacks with eager's tensors at the right steps, the wrapper's progress
bar per step or chunk, interruption from another thread, a stream of step events; on every route (the traced call,
the compiled whole loop, eager segments, code loaded from the persistent cache), each equal to the eager loop."""

import copy
import threading

import pytest
import torch

from loopgraph import (Interrupted, SequentialPipelineBlocks, StepEvent, compile_loop, compile_pipeline,
                       compiled_loops, stream)
from loopgraph.bench.measure import count_python_calls
from loopgraph.runtime import executables
from loopgraph.verify import matches_eager
from loopgraph.zoo.loops import build_loop

from .helpers import Clamp, Loop, Shift, run_loop

STEPS = 6


def eager_events(wrapper, run, every: int, names=("latents",)) -> list[tuple[int, dict]]:
    """The eager loop calling the same callback: its loop_step followed by the callback's copies."""
    events, loop_step = [], wrapper.loop_step

    def step(comps, block_state, **kwargs):
        comps, block_state = loop_step(comps, block_state, **kwargs)
        i = kwargs["i"]
        if (i + 1) % every == 0:
            events.append((i, {n: getattr(block_state, n).clone() for n in names}))
        return comps, block_state

    wrapper.loop_step = step
    try:
        run()
    finally:
        del wrapper.loop_step
    return events


def assert_same_events(got: list[StepEvent], expected: list[tuple[int, dict]]) -> None:
    assert [e.step for e in got] == [i for i, _ in expected]
    for event, (_, tensors) in zip(got, expected):
        assert event.tensors.keys() == tensors.keys()
        for name, value in tensors.items():
            assert matches_eager(event.tensors[name], value), (event.step, name)


@pytest.fixture(scope="module")
def dit():
    setup = build_loop("dit", steps=STEPS, sample_size=8)
    return setup, compile_loop(setup.wrapper)


@pytest.mark.parametrize("every", [1, 4])
def test_callbacks_get_eagers_tensors_after_the_right_steps_traced_and_compiled(dit, every):
    setup, fast = dit
    expected = eager_events(setup.wrapper, setup.run, every)
    got: list[StepEvent] = []
    remove = fast.on_step_end(got.append, every=every)
    try:
        for call in range(3):  # the first may trace (one eager run), the others run compiled
            got.clear()
            _, state = fast(setup.components, setup.new_state())
            assert_same_events(got, expected)
            assert {e.total for e in got} == {STEPS} and {e.path for e in got} == {"DenoiseLoop"}
            assert [float(e.t) for e in got] == [float(setup.components.scheduler.timesteps[e.step]) for e in got]
            assert matches_eager(state.get("latents"), setup.run())
    finally:
        remove()
    assert fast.last_plan.kind == "whole loop on state buffers" and fast.stats.eager_blocks == 0  # nothing eager
    got.clear()
    fast(setup.components, setup.new_state())
    assert got == []  # removed


def test_kept_callback_tensors_are_not_overwritten_by_later_steps(dit):
    setup, fast = dit
    kept = []
    remove = fast.on_step_end(lambda e: kept.append(e.tensors["latents"]), every=1)
    try:
        fast(setup.components, setup.new_state())
        fast(setup.components, setup.new_state())
    finally:
        remove()
    assert all(not torch.equal(a, b) for a, b in zip(kept[-STEPS:], kept[-STEPS + 1:]))


class BarLoop(Loop):
    """The seed loop with a progress bar, as diffusers' wrappers have."""

    def __call__(self, components, state):
        bs = self.get_block_state(state)
        with self.progress_bar(total=bs.num_steps) as bar:
            for i in range(bs.num_steps):
                components, bs = self.loop_step(components, bs, i=i)
                bar.update()
        self.set_block_state(state, bs)
        return components, state


def test_callbacks_on_eager_segments_and_per_step_progress(monkeypatch):
    loop = BarLoop.from_blocks_dict({"shift": Shift, "clamp": Clamp})  # clamp: data-dependent Python, eager
    loop.set_progress_bar_config(disable=True)
    x = torch.linspace(-1, 1, 8)
    expected = eager_events(loop, lambda: run_loop(loop, x.clone(), STEPS), every=2, names=("x",))
    fast = compile_loop(loop, backend="eager")
    got, updates = [], []
    fast.on_step_end(got.append, every=2, tensors=["x"])
    for call in range(3):
        got.clear()
        if call == 2:
            monkeypatch.setattr(loop, "progress_bar", lambda total=None, **_: Bar(updates), raising=False)
        out = run_loop(fast, x.clone(), STEPS)
        assert_same_events(got, expected)
        assert matches_eager(out, run_loop(loop, x.clone(), STEPS))
    assert fast.last_plan.kind == "eager segments" and fast.stats.eager_blocks == 1
    assert updates[:STEPS] == [1] * STEPS  # the compiled call's bar, step by step


class Bar:
    """Stands for the wrapper's tqdm bar: records each update."""

    def __init__(self, updates: list, on_update=None):
        self.updates, self.on_update, self.n, self.total = updates, on_update, 0, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n=1):
        self.n += n
        self.updates.append(n)
        if self.on_update is not None:
            self.on_update(self)


def test_the_progress_bar_advances_per_chunk_on_a_compiled_call_and_per_step_with_small_chunks(dit, monkeypatch):
    setup, fast = dit
    fast(setup.components, setup.new_state())
    updates = []
    monkeypatch.setattr(setup.wrapper, "progress_bar", lambda total=None, **_: Bar(updates), raising=False)
    monkeypatch.setattr(executables, "CHUNK_SECONDS", 0.0)  # one step per chunk
    fast(setup.components, setup.new_state())
    assert updates == [1] * STEPS
    updates.clear()
    monkeypatch.setattr(executables, "CHUNK_SECONDS", 1e9)  # one chunk for the whole loop
    fast(setup.components, setup.new_state())
    assert updates == [STEPS]


def test_callbacks_and_progress_on_code_loaded_from_the_persistent_cache(tmp_path, monkeypatch):
    setup = build_loop("dit", steps=STEPS, sample_size=8)
    expected = eager_events(setup.wrapper, setup.run, 3)
    compile_loop(setup.wrapper, cache=tmp_path)(setup.components, setup.new_state())  # compiles, stores
    fast = compile_loop(setup.wrapper, cache=tmp_path)
    fast(setup.components, setup.new_state())  # traces, loads
    assert fast.stats.loaded == 1 and fast.stats.compiles == 0
    got, updates = [], []
    fast.on_step_end(got.append, every=3)
    monkeypatch.setattr(setup.wrapper, "progress_bar", lambda total=None, **_: Bar(updates), raising=False)
    _, state = fast(setup.components, setup.new_state())
    assert_same_events(got, expected)
    assert sum(updates) == STEPS and len(updates) >= 2  # a chunk ends where a callback is due
    assert matches_eager(state.get("latents"), setup.run())


def test_a_callback_that_changes_its_tensors_is_refused_with_the_step(dit):
    setup, fast = dit
    fast(setup.components, setup.new_state())

    def in_place(event):
        event.tensors["latents"].mul_(0)

    def returns_new(event):
        return {"latents": event.tensors["latents"] * 0}

    def returns_same(event):  # diffusers' callbacks return what they got: not a change
        return event.tensors

    for callback in (in_place, returns_new):
        remove = fast.on_step_end(callback, every=2)
        try:
            with pytest.raises(ValueError, match=rf"{callback.__name__}.*changed \['latents'\] at step 1"):
                fast(setup.components, setup.new_state())
        finally:
            remove()
    remove = fast.on_step_end(returns_same)
    try:
        _, state = fast(setup.components, setup.new_state())
    finally:
        remove()
    assert matches_eager(state.get("latents"), setup.run())


def test_a_callback_asking_for_a_tensor_the_loop_has_not_says_what_it_has(dit):
    setup, fast = dit
    remove = fast.on_step_end(lambda e: None, tensors=["noise"])
    try:
        with pytest.raises(KeyError, match=r"'noise'.*it has: .*latents"):
            fast(setup.components, setup.new_state())
    finally:
        remove()
    with pytest.raises(ValueError, match="every must be a whole number"):
        fast.on_step_end(print, every=0)


def interrupt_from_another_thread(fast):
    thread = threading.Thread(target=fast.interrupt)
    thread.start()
    thread.join()


@pytest.mark.parametrize("calls", [1, 2], ids=["traced", "compiled"])
def test_interrupt_from_another_thread_stops_after_that_step_with_eagers_tensors(calls):
    setup = build_loop("dit", steps=STEPS, sample_size=8)
    expected = dict(eager_events(setup.wrapper, setup.run, 1))
    fast = compile_loop(setup.wrapper, backend="eager")  # the same chunks as Inductor's (the `dit` fixture's)
    for _ in range(calls - 1):
        fast(setup.components, setup.new_state())
    k = 2
    remove = fast.on_step_end(lambda e: e.step == k and interrupt_from_another_thread(fast))
    state = setup.new_state()
    latents = state.get("latents").clone()
    with pytest.raises(Interrupted) as stopped:
        fast(setup.components, state)
    remove()
    assert stopped.value.step == k + 1 and matches_eager(stopped.value.tensors["latents"], expected[k]["latents"])
    assert torch.equal(state.get("latents"), latents)  # the caller's state is untouched
    if calls == 2:
        assert fast.stats.compiled_calls == 1
        assert setup.components.scheduler._step_index is None  # nothing written back: as before the call
    _, state = fast(setup.components, setup.new_state())  # the next call is whole
    assert matches_eager(state.get("latents"), setup.run())


def test_interrupt_without_callbacks_stops_at_a_chunk_boundary(dit, monkeypatch):
    setup, fast = dit
    fast(setup.components, setup.new_state())
    monkeypatch.setattr(executables, "CHUNK_SECONDS", 0.0)  # one step per chunk
    updates = []
    bar = lambda total=None, **_: Bar(updates, lambda b: b.n == 3 and interrupt_from_another_thread(fast))
    monkeypatch.setattr(setup.wrapper, "progress_bar", bar, raising=False)
    with pytest.raises(Interrupted, match="interrupted after 3 step"):
        fast(setup.components, setup.new_state())
    assert updates == [1, 1, 1]
    fast.interrupt()  # no call in flight: nothing to stop, the next call runs whole
    monkeypatch.undo()
    _, state = fast(setup.components, setup.new_state())
    assert matches_eager(state.get("latents"), setup.run())


def test_no_watch_no_python_per_step(dit, monkeypatch):
    setup, fast = dit
    monkeypatch.setattr(executables, "CHUNK_SECONDS", 1e9)  # one chunk per call
    calls = {}
    for steps in (4, 12):
        setup.steps = steps
        fast(setup.components, setup.new_state())
        state = setup.new_state()
        calls[steps] = count_python_calls(lambda: fast(setup.components, state))
    setup.steps = STEPS
    assert calls[4] == calls[12], calls


def test_stream_yields_eagers_events_and_returns_the_calls_result(dit):
    setup, fast = dit
    expected = eager_events(setup.wrapper, setup.run, 2)
    fast(setup.components, setup.new_state())
    events = stream(fast, setup.components, setup.new_state(), every=2)
    got = []
    while True:
        try:
            got.append(next(events))
        except StopIteration as done:
            _, state = done.value
            break
    assert_same_events(got, expected)
    assert matches_eager(state.get("latents"), setup.run())
    assert fast._watch.callbacks == []  # the stream's callback is gone


def test_leaving_a_stream_early_interrupts_the_loop(dit):
    setup, fast = dit
    fast(setup.components, setup.new_state())
    state = setup.new_state()
    latents = state.get("latents").clone()
    for event in stream(fast, setup.components, state):
        if event.step == 1:
            break
    assert torch.equal(state.get("latents"), latents) and not fast._watch.running
    _, state = fast(setup.components, setup.new_state())
    assert matches_eager(state.get("latents"), setup.run())


def test_stream_inside_compile_pipeline_by_loop_path():
    setup = build_loop("dit", steps=STEPS, sample_size=8)
    blocks = SequentialPipelineBlocks.from_blocks_dict({"denoise": copy.deepcopy(setup.wrapper)})
    pipe = blocks.init_pipeline()
    pipe.update_components(**setup.components.components)
    expected = eager_events(pipe._blocks.sub_blocks["denoise"], lambda: run_pipe(setup, pipe), 3)
    compile_pipeline(pipe, backend="eager")
    (site,) = compiled_loops(pipe)
    for _ in range(2):  # traced, then compiled
        got = []
        events = stream(pipe, **inputs(setup), every=3)
        while True:
            try:
                got.append(next(events))
            except StopIteration as done:
                latents = done.value
                break
        assert_same_events(got, expected)
        assert {e.path for e in got} == {"denoise"}
        assert matches_eager(latents, run_pipe(setup, pipe))
    assert site.compiled.stats.compiled_calls >= 1
    with pytest.raises(ValueError, match="no compiled loop"):
        next(stream(SequentialPipelineBlocks.from_blocks_dict({"denoise": setup.wrapper}).init_pipeline()))


def inputs(setup) -> dict:
    setup.components.scheduler.set_timesteps(STEPS)
    return dict(latents=setup.inputs["latents"], prompt_embeds=setup.inputs["prompt_embeds"],
                negative_prompt_embeds=setup.inputs["negative_prompt_embeds"],
                timesteps=setup.components.scheduler.timesteps, num_inference_steps=STEPS, output="latents")


def run_pipe(setup, pipe):
    return pipe(**inputs(setup))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@needs_cuda
def test_on_cuda_without_the_graph_callbacks_progress_and_interrupt_work_per_chunk(monkeypatch):
    setup = build_loop("dit", steps=STEPS, sample_size=8, device="cuda")
    expected = eager_events(setup.wrapper, setup.run, 2)
    fast = compile_loop(setup.wrapper, cuda_graphs=False)
    got = []
    remove = fast.on_step_end(got.append, every=2)
    for _ in range(2):  # traced, then compiled (the while-loop, in chunks)
        got.clear()
        _, state = fast(setup.components, setup.new_state())
        assert_same_events(got, expected)
    remove()
    assert fast.last_plan.kind == "whole loop on state buffers"
    monkeypatch.setattr(executables, "CHUNK_SECONDS", 0.0)
    remove = fast.on_step_end(lambda e: e.step == 2 and interrupt_from_another_thread(fast))
    with pytest.raises(Interrupted, match="after 3 step"):
        fast(setup.components, setup.new_state())
    remove()


def test_a_cuda_graph_plan_with_callbacks_runs_its_compiled_steps_one_by_one(monkeypatch):
    """The whole-loop CUDA graph is one launch: a call with step callbacks runs the graph's compiled steps one
    by one instead, calling back between them. On CPU here, with the uncompiled steps (as test_cudagraph does);
    a call without callbacks would capture, which needs CUDA: it is made to fail loudly."""
    from loopgraph.backend.cudagraph import WholeLoopGraph

    from .helpers import uncompiled_step

    setup = build_loop("dit", steps=STEPS, sample_size=8)
    expected = eager_events(setup.wrapper, setup.run, 2)
    fast = compile_loop(setup.wrapper, backend="eager")
    fast(setup.components, setup.new_state())
    plan = fast._plans.newest
    graph = WholeLoopGraph(plan.loop, compile_step=uncompiled_step, pool=None)
    plan.executable = executables.WholeLoopCudaGraph(fast._ctx, plan.trace, plan.loop, graph, plan.sources)
    monkeypatch.setattr(graph, "_capture", lambda *a: pytest.fail("a call with callbacks must not capture"))
    got, updates = [], []
    fast.on_step_end(got.append, every=2)
    monkeypatch.setattr(setup.wrapper, "progress_bar", lambda total=None, **_: Bar(updates), raising=False)
    _, state = fast(setup.components, setup.new_state())
    assert_same_events(got, expected)
    assert updates == [1] * STEPS and matches_eager(state.get("latents"), setup.run())
    fast.on_step_end(lambda e: e.step == 2 and interrupt_from_another_thread(fast))
    with pytest.raises(Interrupted, match="after 3 step"):
        fast(setup.components, setup.new_state())


@needs_cuda
def test_callbacks_on_the_whole_loop_cuda_graph_run_its_steps_one_by_one():
    setup = build_loop("dit", steps=STEPS, sample_size=8, device="cuda")
    expected = eager_events(setup.wrapper, setup.run, 3)
    fast = compile_loop(setup.wrapper)
    fast(setup.components, setup.new_state())
    assert fast.last_plan.kind == "whole-loop CUDA graph"
    got = []
    remove = fast.on_step_end(got.append, every=3)
    _, state = fast(setup.components, setup.new_state())
    remove()
    assert_same_events(got, expected)
    _, state = fast(setup.components, setup.new_state())  # no callbacks: one launch again
    assert matches_eager(state.get("latents"), setup.run())
