"""Each stage alone: the trace's graphs, slot classification, hoisting, lowering (structure + numbers)."""

import pytest
import torch

from loopgraph import compile_loop

from loopgraph.backend.lower import lower
from loopgraph.passes.loop_plan import loop_steps, plan_loop
from loopgraph.trace.ir import Unsupported
from loopgraph.trace.tracer import trace_loop
from loopgraph.zoo.loops import build_loop


def traced(steps=4, **kw):
    setup = build_loop("dit", steps=steps, sample_size=8, **kw)
    trace, (_, state) = trace_loop(setup.wrapper, setup.components, setup.new_state())
    return setup, trace, state


def test_trace_records_only_loop_data_and_returns_eagers_result():
    setup, trace, state = traced()
    assert torch.equal(state.get("latents"), setup.run())
    assert trace.problems == []
    first = trace.steps[0]
    assert first.inputs == ["latents", "prompt_embeds", "negative_prompt_embeds"]  # not timesteps: schedule
    assert "latents" in first.outputs and first.outputs["latents"].op == "call_function"
    assert all(n.op != "placeholder" or n.target in first.inputs for n in first.graph.nodes)
    # the scheduler's nonzero().item() lookup and sigma reads were evaluated, not recorded
    names = {getattr(n.target, "__name__", str(n.target)) for s in trace.steps for n in s.graph.nodes}
    assert "getitem" in names and not names & {"nonzero", "item", "_local_scalar_dense"}


def test_classification():
    setup, trace, state = traced()
    plan = plan_loop(loop_steps(trace), set(trace.initial_slots))
    roles = {name: info.role for name, info in plan.slots.items()}
    assert roles == {"timesteps": "schedule", "num_inference_steps": "schedule", "latents": "carried",
                     "scale_initial_noise": "schedule", "prompt_embeds": "invariant",
                     "negative_prompt_embeds": "invariant", "generator": "schedule", "scaled_latents": "dead",
                     "noise_pred": "dead"}
    assert plan.state_slots == ["latents"]
    assert plan.invariant_slots == ["prompt_embeds", "negative_prompt_embeds"]


def test_hoisting_groups_steps_and_replays_every_step():
    setup, trace, state = traced(steps=6, guidance_window=(0.0, 0.5))
    plan = plan_loop(loop_steps(trace), set(trace.initial_slots))
    assert [v.steps for v in plan.variants] == [[0], [1, 2], [3, 4, 5]]
    assert plan.runs == [(0, 0, 1), (1, 1, 3), (2, 3, 6)]
    for v in plan.variants:
        assert all(t.shape[0] == 6 for t in v.tables)
        assert not any(n.op == "get_attr" and "lift" in str(n.target) for n in v.module.graph.nodes)
    # replay step by step in Python: the variants + table rows reproduce eager exactly
    x = setup.inputs["latents"]
    inv = [setup.inputs["prompt_embeds"], setup.inputs["negative_prompt_embeds"]]
    for k, first, end in plan.runs:
        v = plan.variants[k]
        for i in range(first, end):
            (x,) = v.module(x, *inv, *[t[i] for t in v.tables])
    assert torch.allclose(x, state.get("latents"), rtol=1e-5, atol=1e-6)


def test_lowered_whole_loop_matches_eager_without_compiling():
    setup, trace, state = traced(steps=5)
    plan = plan_loop(loop_steps(trace), set(trace.initial_slots))
    fn = lower(plan)
    tables = [v.tables for v in plan.variants]
    ends = torch.tensor([end for _, _, end in plan.runs])
    buffer = setup.inputs["latents"].clone()
    address = buffer.data_ptr()
    assert fn([buffer], [setup.inputs["prompt_embeds"], setup.inputs["negative_prompt_embeds"]],
              tables, ends, torch.zeros((), dtype=torch.int64)) is None
    # the final state is written into the state buffer in place
    assert buffer.data_ptr() == address
    assert torch.allclose(buffer, state.get("latents"), rtol=1e-5, atol=1e-6)


def test_a_slot_read_but_neither_carried_nor_invariant_is_unsupported_not_a_value_error():
    setup, trace, state = traced()
    steps = loop_steps(trace)
    steps.schedule.add("latents")  # classified as schedule, yet the step graphs read it
    with pytest.raises(Unsupported, match="slot 'latents' is read before it is written but is not loop state"):
        plan_loop(steps, set(trace.initial_slots))


def test_an_unsupported_loop_found_while_planning_falls_back_and_names_the_pass(monkeypatch):
    import loopgraph.passes.run

    real = loopgraph.passes.run.loop_steps

    def latents_as_schedule(trace):
        steps = real(trace)
        steps.schedule.add("latents")
        return steps

    monkeypatch.setattr("loopgraph.passes.run.loop_steps", latents_as_schedule)
    setup = build_loop("dit", steps=3, sample_size=8)
    fast = compile_loop(setup.wrapper, backend="eager")
    reason = r"runs eagerly: .*slot 'latents' is read before it is written.*\(pass 'plan'\)"
    with pytest.warns(UserWarning, match=reason):
        _, state = fast(setup.components, setup.new_state())
    assert torch.equal(state.get("latents"), setup.run())
    assert fast.last_plan.kind == "eager" and "please report" not in fast.last_plan.problems[0]
    strict = compile_loop(setup.wrapper, backend="eager", strict=True)
    with pytest.raises(RuntimeError, match=r"compile_loop\(strict=True\).*\(pass 'plan'\)"):
        strict(setup.components, setup.new_state())


def test_a_bug_in_a_pass_names_the_pass_and_asks_for_a_report(monkeypatch):
    def broken(loop, given):
        raise IndexError("a pass bug")

    monkeypatch.setattr("loopgraph.passes.run.place_tables", broken)
    setup = build_loop("dit", steps=3, sample_size=8)
    fast = compile_loop(setup.wrapper, backend="eager")
    with pytest.warns(UserWarning, match=r"planning failed \(IndexError: a pass bug\) raised in loopgraph pass "
                                         r"'place tables'; please report this"):
        _, state = fast(setup.components, setup.new_state())
    assert torch.equal(state.get("latents"), setup.run())
    with pytest.raises(IndexError, match="a pass bug") as raised:
        compile_loop(setup.wrapper, backend="eager", strict=True)(setup.components, setup.new_state())
    assert "raised in loopgraph pass 'place tables'" in raised.value.__notes__
