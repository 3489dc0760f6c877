"""The CUDA whole-loop graph: its unrolled step sequence is checked on CPU against the lowered while_loop;
capture, replay and dtypes need a GPU and skip without one."""

import pytest
import torch
from torch.utils._pytree import tree_leaves as pytree_leaves

from loopgraph import compile_loop
from loopgraph.backend.cudagraph import WholeLoopGraph
from loopgraph.verify import matches_eager
from loopgraph.zoo.loops import build_loop

from .helpers import uncompiled_step

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA GPU")


def traced(setup, **options):
    """One traced call under the eager backend: the plan, the call's inputs (seeds too), its state, and a
    ``WholeLoopGraph`` of the plan whose steps are the uncompiled step modules (run on CPU, never captured)."""
    fast = compile_loop(setup.wrapper, backend="eager", **options)
    state = setup.new_state()
    inputs = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in state.values.items()}
    fast(setup.components, state)
    plan = fast.last_plan
    inputs.update(plan.traced_seeds)
    graph = WholeLoopGraph(plan.program, compile_step=uncompiled_step, pool=None)
    return fast, plan, inputs, state, graph


def unrolled_args(plan, inputs):
    """``(state, invariants, tables, ends)`` as the compiled loop passes them."""
    loop = plan.program
    return ([inputs[n] for n in loop.state_slots], [inputs[n] for n in loop.invariant_slots],
            [v.tables for v in loop.variants], [end for _, _, end in loop.runs])


@pytest.mark.parametrize("preset, window", [("dit", (0.0, 1.0)), ("unet-ddim", (0.0, 0.5))])
def test_unrolled_steps_equal_the_lowered_loop(preset, window):
    fast, plan, inputs, state, unrolled = traced(build_loop(preset, steps=6, sample_size=8, guidance_window=window))
    loop = plan.program
    assert len(loop.runs) >= 2  # first step + the rest (+ unguided steps): the pattern is exercised
    got = unrolled._run_steps(*unrolled_args(plan, inputs), torch.zeros((), dtype=torch.int64))
    expected = plan.executable.execute(inputs)
    for g, e in zip(got, expected):
        assert matches_eager(g, e)
    assert matches_eager(got[loop.state_slots.index("latents")], state.get("latents"))


def test_a_captured_graph_keeps_alive_what_it_reads_outside_its_pool(monkeypatch):
    """A CUDA graph replays raw addresses: the step counter and the tables it reads must live as long as the
    graph (a freed counter's memory would be reused and overwritten). Capture is faked here so that it runs
    the steps on CPU; what the entry holds is the point."""
    import contextlib
    import types

    fake_stream = types.SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: fake_stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: fake_stream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: types.SimpleNamespace(replay=lambda: None))
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool=None: contextlib.nullcontext())
    _, plan, inputs, state, graph = traced(build_loop("dit", steps=3, sample_size=8))
    loop = plan.program
    used = []
    run_steps = graph._run_steps
    monkeypatch.setattr(graph, "_run_steps", lambda *args: used.append(args[-1]) or run_steps(*args))
    entry = graph._capture(*unrolled_args(plan, inputs))
    kept = [t for part in entry[1:] for t in pytree_leaves(part)]
    assert used and all(any(counter is t for t in kept) for counter in used)
    assert all(any(table is t for t in kept) for v in loop.variants for table in v.tables)
    assert matches_eager(entry[3][loop.state_slots.index("latents")], state.get("latents"))


@needs_cuda
@pytest.mark.parametrize("dtype, tol", [(torch.float32, dict(rtol=1e-3, atol=1e-4)),
                                        (torch.bfloat16, dict(rtol=5e-2, atol=5e-2)),
                                        (torch.float16, dict(rtol=1e-2, atol=1e-2))])
def test_whole_loop_cuda_graph_equals_eager(dtype, tol):
    setup = build_loop("dit", steps=8, device="cuda", dtype=dtype)
    fast = compile_loop(setup.wrapper)
    expected = setup.run()
    for _ in range(3):
        _, state = fast(setup.components, setup.new_state())
        assert torch.allclose(state.get("latents").float(), expected.float(), **tol)
    assert fast.last_plan.kind == "whole-loop CUDA graph"
    fn = fast.last_plan.executable.compiled
    assert isinstance(fn, WholeLoopGraph) and fn.failed is None and len(fn.graphs) == 1


@needs_cuda
def test_cuda_graph_outputs_are_not_static_buffers():
    setup = build_loop("dit", steps=4, device="cuda")
    fast = compile_loop(setup.wrapper)
    first = fast(setup.components, setup.new_state())[1].get("latents")
    keep = first.clone()
    setup.inputs["latents"] = torch.randn_like(setup.inputs["latents"])
    fast(setup.components, setup.new_state())
    assert torch.equal(first, keep)


@needs_cuda
def test_cuda_graphs_false_uses_the_while_loop():
    setup = build_loop("dit", steps=4, device="cuda")
    fast = compile_loop(setup.wrapper, cuda_graphs=False)
    expected = setup.run()
    _, state = fast(setup.components, setup.new_state())
    assert torch.allclose(state.get("latents"), expected, rtol=1e-3, atol=1e-4)
    assert fast.last_plan.kind == "whole loop on state buffers"


def _stochastic_ddim(device="cpu", steps=6):
    import dataclasses

    setup = build_loop("dit-ddim", steps=steps, sample_size=8, device=device)
    scheduler = setup.components.scheduler
    scheduler.config = dataclasses.replace(scheduler.config, eta=1.0)
    return setup


def test_unrolled_steps_with_counter_noise_equal_the_lowered_loop():
    """The seeds are invariant inputs and the draws' streams table rows: what the CUDA graph copies in and
    reads at the device counter, so the unrolled steps draw the lowered loop's noise."""
    _, plan, inputs, state, unrolled = traced(_stochastic_ddim(), rng="counter")
    loop = plan.program
    assert list(plan.traced_seeds) == ["rng_seed0"] and "rng_seed0" in loop.invariant_slots
    got = unrolled._run_steps(*unrolled_args(plan, inputs), torch.zeros((), dtype=torch.int64))
    assert matches_eager(got[loop.state_slots.index("latents")], state.get("latents"))


@needs_cuda
def test_counter_noise_is_drawn_inside_the_cuda_graph():
    from loopgraph.rng import eager_loop

    setup = _stochastic_ddim(device="cuda", steps=8)
    fast = compile_loop(setup.wrapper, rng="counter")
    for seed in (0, 1, 0):
        torch.manual_seed(seed)
        expected = eager_loop(setup.wrapper, setup.components, setup.new_state())[1].get("latents")
        torch.manual_seed(seed)
        _, state = fast(setup.components, setup.new_state())
        assert torch.allclose(state.get("latents"), expected, rtol=1e-3, atol=1e-4), seed
    fn = fast.last_plan.executable.compiled
    assert isinstance(fn, WholeLoopGraph) and fn.failed is None and len(fn.graphs) == 1  # one graph, every seed
    assert fast.stats.segment_calls == 0 and fast.stats.compiles == len(fast.last_plan.variants)
