"""Decisions by type, not by message text: a problem's kind decides which blocks run eagerly, and a strict refusal
is told apart by its exception type."""

import types
import warnings

import pytest
import torch

from loopgraph import compile_loop
from loopgraph.modular_pipelines.state import PipelineState
from loopgraph.passes.partition import eager_blocks
from loopgraph.planner import Planner, StrictError
from loopgraph.trace.ir import ProblemKind, Unsupported
from loopgraph.trace.tracer import trace_loop

from .helpers import Clamp, Loop, Scale, Shift

TRACE = types.SimpleNamespace(steps=[None], block_names=["shift", "clamp", "scale"])


def test_a_problems_kind_not_its_text_confines_it_to_its_block():
    odd = Unsupported("an unusual message", "clamp", "loop.py:1", ProblemKind.DATA_DEPENDENT)
    assert eager_blocks(TRACE, [odd]) == {"clamp"}
    for kind in (ProblemKind.RANDOM_OP, ProblemKind.SIDE_EFFECT):
        assert eager_blocks(TRACE, [Unsupported("whatever", "scale", "loop.py:2", kind)]) == {"scale"}
    looks_confined = Unsupported("data-dependent Python: but another kind", "clamp", "loop.py:1")
    assert looks_confined.kind is ProblemKind.OTHER and eager_blocks(TRACE, [looks_confined]) == set()
    assert eager_blocks(TRACE, [odd, Unsupported("no block", None, None, ProblemKind.DATA_DEPENDENT)]) == set()


def test_the_trace_gives_data_dependent_python_its_kind():
    state = PipelineState()
    state.set("x", torch.ones(3))
    state.set("num_steps", 2)
    trace, _ = trace_loop(Loop.from_blocks_dict({"shift": Shift, "clamp": Clamp, "scale": Scale}), None, state)
    assert [(p.block, p.kind) for p in trace.problems] == [("clamp", ProblemKind.DATA_DEPENDENT)]


def test_a_strict_refusal_is_told_by_its_type_not_its_text(monkeypatch):
    assert issubclass(StrictError, RuntimeError)

    def refuse(self, plan):
        raise StrictError("refused")

    def mention(self, plan):
        raise RuntimeError("not a refusal, though it says compile_loop(strict=True)")

    def run(loop):
        state = PipelineState()
        state.set("x", torch.ones(3))
        state.set("num_steps", 2)
        return loop(None, state)

    loop = Loop.from_blocks_dict({"shift": Shift, "scale": Scale})  # no problem: planned as a whole loop
    monkeypatch.setattr(Planner, "_whole_loop", lambda self, plan: self._fall_back(plan, ValueError("no")))
    with pytest.raises(StrictError, match=r"compile_loop\(strict=True\): Loop: compilation failed: no"):
        run(compile_loop(loop, backend="eager", strict=True))
    monkeypatch.setattr(Planner, "_whole_loop", refuse)
    with pytest.raises(StrictError, match="refused"):  # passed on, though this loop is not strict
        run(compile_loop(loop, backend="eager"))
    monkeypatch.setattr(Planner, "_whole_loop", mention)
    fast = compile_loop(loop, backend="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(fast)
    assert fast.last_plan.kind == "eager" and "planning failed (RuntimeError" in str(caught[-1].message)
