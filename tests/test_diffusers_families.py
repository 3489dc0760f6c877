"""compile_loop on every diffusers modular family's own core denoise step (diffusers 0.42's 22 families), built
offline from tiny configs (loopgraph/zoo/families/): the blocks before the loop run eagerly to make the state, then
the family's loop wrapper runs compiled. Equality with diffusers' eager run first (every state value and the
components' Python state), for two step counts; then the coverage table in docs/diffusers.md is what the loop
does; then compile_pipeline on the family's core denoise step. Backend "eager" (the same trace -> analyse ->
lower pipeline, run by Dynamo's eager backend) keeps the suite short; Inductor: the slow tests at the end."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch._dynamo.utils as dynamo_utils

from loopgraph import compile_loop, compile_pipeline
from loopgraph.bench.measure import count_python_calls
from loopgraph.guards import plan_guard
from loopgraph.runtime import executables
from loopgraph.zoo.diffusers_families import FAMILIES, build_family, describe, run_calls, table_rows

from .helpers import assert_same, quiet

needs_diffusers = pytest.mark.skipif(
    importlib.util.find_spec("diffusers") is None,
    reason="diffusers is not installed (pip install loopgraph[diffusers]; `make test` installs it)",
)
DOC = Path(__file__).resolve().parents[1] / "docs" / "diffusers.md"
WHOLE = "whole loop on state buffers"
INNER_WHOLE = f"its step loop: {WHOLE}"  # a loop over chunks whose block runs the steps (loopgraph/inner_loops.py)
GUARDS = str(Path(plan_guard.__file__).parent)


def python_state(setup) -> dict:
    """Deep copies of the instance attributes of every component that is not a model (schedulers, guiders)."""
    return {name: copy.deepcopy(vars(c)) for name, c in setup.components.components.items()
            if c is not None and not isinstance(c, torch.nn.Module) and hasattr(c, "__dict__")}


def eager_runs(family: str, steps: tuple[int, ...]) -> dict[int, tuple[dict, dict]]:
    """diffusers' own runs, on a setup of its own (the same seed: the same weights and inputs)."""
    setup = build_family(family)
    runs = {}
    for n in steps:
        setup.steps = n
        runs[n] = (dict(setup.run().values), python_state(setup))
    return runs


@needs_diffusers
@pytest.mark.parametrize("family", FAMILIES)
def test_a_familys_loop_compiled_equals_eager_and_runs_as_the_coverage_table_says(family):
    expected = eager_runs(family, (4, 6))
    setup = build_family(family)
    fast = compile_loop(setup.wrapper, backend="eager")
    dynamo_utils.counters.clear()
    graphs = {}

    def same_as_eager(n, call, state):  # call 1 traces; 2 may trace again (state call 1 left); 3 is compiled
        assert_same(dict(state.values), expected[n][0], f"N={n} call {call}: state")
        assert_same(python_state(setup), expected[n][1], f"N={n} call {call}: components")
        graphs[n] = dynamo_utils.counters["stats"]["unique_graphs"]

    calls = quiet(run_calls, setup, fast, each=same_as_eager)
    row = describe(setup, fast, calls)
    assert row.markdown() == table_rows(DOC.read_text()).get(family), (
        f"docs/diffusers.md's row for {family} is stale: run python -m loopgraph.zoo.diffusers_families {family} "
        f"--write docs/diffusers.md")
    if row.runs_as in (WHOLE, INNER_WHOLE) and "every call" not in row.why:
        assert fast.stats.eager_blocks == 0 and fast.stats.compiled_calls >= 2  # a compiled call at each N
    # Dynamo's own count agrees with the row: a new step count compiles nothing, or the row says it does
    assert (graphs[6] == graphs[4]) == ("a new step count compiles" not in row.why), graphs


@needs_diffusers
@pytest.mark.parametrize("family", FAMILIES)
def test_compile_pipeline_on_a_familys_core_denoise_step_equals_eager(family):
    reference = build_family(family)
    expected = reference.components(**reference.pipeline_kwargs())
    setup = build_family(family)
    pipe = compile_pipeline(setup.components, backend="eager")
    for call in range(2):
        got = quiet(pipe, **setup.pipeline_kwargs())
        assert_same(dict(got.values), dict(expected.values), f"call {call + 1}")
    assert "compiled" in quiet(lambda: __import__("loopgraph").explain(pipe))


# -- Inductor: compiled once, no Python per step (`make test-all`) -----------------------------------------------------
@pytest.mark.slow
@needs_diffusers
@pytest.mark.parametrize("family", FAMILIES)
def test_inductor_runs_a_whole_compiled_familys_loop_with_no_python_per_step(family, monkeypatch):
    monkeypatch.setattr(executables, "CHUNK_SECONDS", 1e9)  # one chunk per call: Python per step, not per chunk
    expected = eager_runs(family, (4, 6))
    setup = build_family(family)
    fast = compile_loop(setup.wrapper)
    dynamo_utils.counters.clear()
    calls = quiet(run_calls, setup, fast,
                  each=lambda n, call, state: assert_same(dict(state.values), expected[n][0], f"N={n} call {call}"))
    row = describe(setup, fast, calls)
    if row.runs_as not in (WHOLE, INNER_WHOLE) or "every call" in row.why:
        pytest.skip(f"{family} does not run as a whole compiled loop (docs/diffusers.md says why)")
    assert dynamo_utils.counters["stats"]["unique_graphs"] == fast.stats.compiles
    python_calls, inputs = {}, {}
    for n in (6, 8):  # plans traced alike (the first, at N=4, also made diffusers' hook registry: more bookkeeping)
        setup.steps = n
        quiet(setup.run, fast)  # plans N=8; makes the counted call's plan the newest
        quiet(setup.run, fast)  # and runs it compiled once (a first call of new compiled code does more, once)
        state = setup.new_state()
        # (the plan guards' own calls follow how many plans are tried before the one that fits, not the steps:
        # a loop over chunks keeps a plan per chunk)
        python_calls[n] = count_python_calls(lambda: fast(setup.components, state), skip=GUARDS)
        loops = [inner.compiled for inner in fast.inner_loops.values()] or [fast]
        inputs[n] = {k: len(v) for loop in loops for k, v in loop._plans.newest.guard.inputs.schedule.items()
                     if isinstance(v, (list, tuple))}
    if inputs[6] == inputs[8]:
        assert python_calls[6] == python_calls[8], python_calls  # no Python per step
    else:  # an input with a value per step (MiniMax H3's row_timestep_plan): the guard compares it item by item
        assert python_calls[8] > python_calls[6], python_calls


@needs_diffusers
def test_echo_with_counter_draws_runs_as_a_whole_compiled_loop():
    # Echo re-noises with the generator every step: with rng="eager" that block runs eagerly (the table); with
    # rng="counter" the draws are compiled (eager's distribution, not its values: tests/test_rng.py)
    setup = build_family("echo")
    fast = compile_loop(setup.wrapper, backend="eager", rng="counter")
    latents = []
    quiet(run_calls, setup, fast, each=lambda n, call, state: latents.append(state.get("latents")))
    assert fast.last_plan.kind == WHOLE and fast.stats.eager_blocks == 0
    assert torch.equal(latents[1], latents[2])  # one generator seed, one result: the compiled call is the traced one
    assert all(torch.isfinite(x).all() for x in latents)
