"""The trace is immutable: every change after tracing is a pass that returns a new trace, and the guard is built
from what the passes return (so the order is in the data, not in the call order of the planner)."""

import dataclasses
import types

import pytest
import torch

from loopgraph import InputParam, ModularPipelineBlocks, PipelineState, compile_loop
from loopgraph.guards.plan_guard import plan_guard
from loopgraph.passes.batching import batch_calls
from loopgraph.trace.tracer import trace_loop

from .helpers import Loop


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.ctx = torch.nn.Linear(8, 4)

    def forward(self, x, context):
        return torch.nn.functional.silu(self.conv(x)) + self.ctx(context).mean(1)[:, :, None, None]


class Guided(ModularPipelineBlocks):
    """CFG by hand: the contexts are a component's tensors, not loop data (ops on them alone are evaluated)."""

    @property
    def inputs(self):
        return [InputParam("x")]

    def __call__(self, components, block_state, i: int):
        net, x = components.net, block_state.x
        cond, uncond = net(x, components.cond), net(x, components.uncond)
        block_state.x = x - 0.1 * (uncond + 3.0 * (cond - uncond))
        return components, block_state


def guided_loop():
    return Loop.from_blocks_dict({"guided": Guided()})


def traced():
    g = torch.Generator().manual_seed(1)
    components = types.SimpleNamespace(net=Net(), cond=torch.randn(2, 5, 8, generator=g),
                                       uncond=torch.randn(2, 5, 8, generator=g))
    state = PipelineState()
    state.set("x", torch.randn(2, 4, 6, 6, generator=g))
    state.set("num_steps", 2)
    trace, _ = trace_loop(guided_loop(), components, state, batch=True)
    return trace, components


def shape_of(trace) -> list:
    """What a pass must not change in the trace it is given."""
    return [(len(step.graph.nodes), sorted(step.constants), dict(step.outputs), len(step.batched)) for step in
            trace.steps] + [sorted(trace.usage.const), [s.use for s in trace.floats]]


def convolutions(step) -> int:
    return sum("conv2d" in str(n.target) for n in step.graph.nodes)


def test_batch_calls_returns_a_new_trace_and_leaves_the_traced_one_as_it_was():
    trace, _ = traced()
    before = shape_of(trace)
    batched, sites, summary = batch_calls(trace)
    assert batched is not trace and summary == "batched: components['net'] x2 in 2 step(s)", summary
    assert shape_of(trace) == before
    for old, new in zip(trace.steps, batched.steps):
        assert new.graph is not old.graph
        assert (convolutions(old), convolutions(new)) == (2, 1)  # two model calls, then one batched
        assert not set(new.graph.nodes) & set(old.graph.nodes)
        used = {n for n in new.graph.nodes}
        assert all(node in used for cut in new.cuts.values() for node in cut.tainted().values())
        assert all(node in used for node in new.outputs.values())


def test_a_batched_traces_guard_checks_the_constants_the_batched_calls_add():
    trace, components = traced()
    batched, _, _ = batch_calls(trace)
    for context in (components.cond, components.uncond):
        # traced apart, the contexts only fed ops evaluated eagerly: the plan baked their values
        assert plan_guard(trace).state.rules[id(context)] == "value"
        # batched, they are concatenated inside the graph: the compiled code reads those very tensors
        assert id(context) in batched.usage.const and id(context) not in trace.usage.const
        assert plan_guard(batched).state.rules[id(context)] == "identity+value"


def test_the_planner_guards_the_trace_the_batch_pass_returned():
    _, components = traced()
    loop = guided_loop()
    fast = compile_loop(loop, backend="eager")
    state = PipelineState()
    state.set("x", torch.randn(2, 4, 6, 6))
    state.set("num_steps", 2)
    fast(components, state)
    plan = fast._plans.newest
    assert [p.name for p in plan.passes][:1] == ["batch calls"]
    assert plan.guard.state.rules[id(components.uncond)] == "identity+value"


def test_traces_are_frozen():
    trace, _ = traced()
    with pytest.raises(dataclasses.FrozenInstanceError):
        trace.steps = []
    with pytest.raises(dataclasses.FrozenInstanceError):
        trace.steps[0].graph = None
    with pytest.raises(dataclasses.FrozenInstanceError):
        trace.steps[0].cuts["guided"].slots = {}
