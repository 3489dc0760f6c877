"""The differential fuzzer: generated loop wrappers (tests/fuzz_loops.py), eager vs ``compile_loop``, over
several calls with a change between them (new inputs, N, guidance scale or window, a swapped or patched model, a
block attribute, a scheduler not reset, aliased inputs, an attribute set or deleted, empty prompts, a model that
starts mixing its batch's rows or returning a dataclass, a module global or a settings module's attribute).

After every call both sides must agree on: raising (the same exception type), every value of the returned
state, the components' and blocks' Python state, and warnings (the compiled side may only add loopgraph's own).

A bounded, derandomised run is part of ``make test`` (backend="eager"). ``make fuzz`` runs a long random
campaign, Inductor included: ``LOOPGRAPH_FUZZ_EXAMPLES`` (default 30) and ``LOOPGRAPH_FUZZ_BACKENDS``
(default "eager"; e.g. "eager,inductor"). Every bug it finds becomes a named test in tests/test_guards.py.
"""

import os
import warnings

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the fuzzer needs hypothesis (pip install loopgraph[test])")
from hypothesis import HealthCheck, event, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from loopgraph import compile_loop  # noqa: E402
from loopgraph.rng import eager_loop  # noqa: E402

from .fuzz_loops import BLOCKS, CHANGES, LoopSpec, World, change, equal, reset_globals  # noqa: E402

EXAMPLES = int(os.environ.get("LOOPGRAPH_FUZZ_EXAMPLES", "30"))
BACKENDS = os.environ.get("LOOPGRAPH_FUZZ_BACKENDS", "eager").split(",")
CAMPAIGN = "LOOPGRAPH_FUZZ_EXAMPLES" in os.environ

SPECS = st.builds(
    LoopSpec,
    blocks=st.lists(st.tuples(st.sampled_from(sorted(BLOCKS)), st.sampled_from([0.25, 0.5, 1.0])),
                    min_size=1, max_size=4).map(tuple),
    work=st.sampled_from(["none"] * 8 + ["before", "after"]),  # tensor work in the wrapper: always eager
    steps=st.integers(1, 5),
)
CALLS = st.lists(st.tuples(st.sampled_from(CHANGES), st.sampled_from([0.2, 0.5, 0.8])), min_size=2, max_size=5)


def run(world: World, runner):
    try:
        return world.call(runner), None
    except Exception as e:  # compared with the other side's
        return None, e


def check_call(eager: World, compiled: World, fast, reference, label: str, tolerance: dict) -> None:
    want, want_error = run(eager, reference)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, got_error = run(compiled, fast)
    assert type(got_error) is type(want_error), f"{label}: eager raised {want_error!r}, compiled {got_error!r}"
    # the compiled side may add loopgraph's own warnings, and libraries' while compiling (Dynamo, Inductor)
    foreign = [str(w.message) for w in caught if not str(w.message).startswith("compile_loop")
               and "site-packages" not in w.filename and "dist-packages" not in w.filename]
    assert not foreign, f"{label}: warnings eager would not give: {foreign}"
    if want_error is None:
        assert set(got.values) == set(want.values), f"{label}: state keys {set(got.values) ^ set(want.values)}"
        for key, value in want.values.items():
            assert equal(got.values[key], value, **tolerance), f"{label}: state {key!r} differs"
    python_now, python_want = compiled.python_state(), eager.python_state()
    for name, attrs in python_want.items():
        assert equal(python_now[name], attrs, **tolerance), f"{label}: Python state of {name} differs"


@settings(max_examples=EXAMPLES, deadline=None, derandomize=not CAMPAIGN, database=None, print_blob=True,
          suppress_health_check=list(HealthCheck))
@given(spec=SPECS, calls=CALLS, backend=st.sampled_from(BACKENDS), rng=st.sampled_from(["eager", "eager", "counter"]))
def test_compiled_loop_equals_eager_over_calls_with_changes(spec, calls, backend, rng):
    note(f"spec={spec} calls={calls} backend={backend} rng={rng}")
    if CAMPAIGN:  # a crash (not an assertion) loses hypothesis's report: the last example is on stdout
        print(f"\nexample: spec={spec} calls={calls} backend={backend} rng={rng}", flush=True)
    reset_globals()
    eager, compiled = World(spec), World(spec)
    fast = compile_loop(compiled.loop, backend=backend, rng=rng)
    reference = eager.loop if rng == "eager" else (lambda c, s: eager_loop(eager.loop, c, s))
    tolerance = dict(rtol=1e-4, atol=1e-5) if backend != "inductor" else dict(rtol=1e-3, atol=1e-4)
    for k, (kind, value) in enumerate([("same", 0.0), ("same", 0.0), *calls]):
        change(eager, kind, value)
        change(compiled, kind, value)
        check_call(eager, compiled, fast, reference, f"call {k} after {kind}({value})", tolerance)
    event("some call ran compiled" if fast.stats.compiled_calls else "every call ran eagerly (traced or fell back)")
