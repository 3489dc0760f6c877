"""Plain objects in the BlockState (LTX-2's `audio_scheduler`: a deep copy of the scheduler made by its
set-timesteps step on every call). The traced call's reads and writes of such an object are recorded like a
component's; a later call may bring another object of the same state: the plan runs, and what the call wrote is
set on that call's own object, as eager leaves it. Equality with eager first."""

import copy
import functools

import torch

from loopgraph import InputParam, PipelineState, compile_loop
from loopgraph.compile import matches_eager

from .helpers import Components, Loop, XBlock, quiet


class TinyScheduler:
    def __init__(self, steps=3, shift=1.0):
        self.sigmas = torch.linspace(1.0, 0.0, steps + 1) * shift
        self.step_index = None
        self.history = []

    def step(self, x, eps):
        if self.step_index is None:
            self.step_index = 0
        dt = self.sigmas[self.step_index + 1] - self.sigmas[self.step_index]
        self.step_index += 1
        self.history.append(float(dt))
        return x + dt * eps


class StepWithStateScheduler(XBlock):
    @property
    def inputs(self):
        return [InputParam("x"), InputParam("sched")]

    def __call__(self, components, block_state, i: int):
        block_state.x = block_state.sched.step(block_state.x, torch.tanh(block_state.x))
        return components, block_state


def call(loop, x, sched, n=3):
    state = PipelineState()
    state.set("x", x)
    state.set("sched", sched)
    state.set("num_steps", n)
    _, state = loop(None, state)
    return state


def test_a_fresh_copy_of_the_same_object_per_call_runs_the_plan_and_gets_eagers_writes():
    loop = Loop.from_blocks_dict({"step": StepWithStateScheduler()})
    original = TinyScheduler()
    x = torch.randn(2, 3)
    fast = compile_loop(loop, backend="eager")
    for k in range(3):
        eager_sched, sched = copy.deepcopy(original), copy.deepcopy(original)
        want = call(loop, x, eager_sched)
        got = quiet(call, fast, x, sched)
        assert matches_eager(got.get("x"), want.get("x")), k
        assert got.get("sched") is sched  # the caller's own object, advanced as eager advances it
        assert sched.step_index == eager_sched.step_index == 3 and sched.history == eager_sched.history, k
    assert fast.stats.plans == 1 and fast.stats.compiled_calls == 2


def test_an_object_of_another_state_re_plans_and_says_which_input():
    loop = Loop.from_blocks_dict({"step": StepWithStateScheduler()})
    x = torch.randn(2, 3)
    fast = compile_loop(loop, backend="eager")
    quiet(call, fast, x, TinyScheduler())
    for sched, eager_sched in [(TinyScheduler(shift=2.0), TinyScheduler(shift=2.0)),
                               (TinyScheduler(), TinyScheduler())]:
        state = PipelineState()
        state.set("x", x)
        state.set("sched", sched)
        state.set("num_steps", 3)
        why = fast.guard_check(None, state)
        if sched.sigmas[0] == 2.0:
            assert "input 'sched'" in why and "not the object the plan was traced with in value" in why
        else:
            assert why is None
        got = quiet(call, fast, x, sched)
        assert matches_eager(got.get("x"), call(loop, x, eager_sched).get("x"))
        assert sched.history == eager_sched.history
    advanced = TinyScheduler()
    quiet(call, fast, x, advanced)  # the same object again, now at step 3: eager's own error, not a result
    try:
        call(loop, x, copy.deepcopy(advanced))
    except (IndexError, RuntimeError) as e:
        eager_error = type(e)
    else:
        eager_error = None
    try:
        quiet(call, fast, x, advanced)
    except (IndexError, RuntimeError) as e:
        assert type(e) is eager_error
    else:
        assert eager_error is None


def shift(value, k):
    return value * k


class PartialScheduler(TinyScheduler):
    """Keeps state where a picture by value cannot see it: a partial's arguments."""

    def __init__(self, k):
        super().__init__()
        self.scale = functools.partial(shift, k=k)

    def step(self, x, eps):
        return super().step(x, self.scale(eps))


class KeepsTheScheduler(XBlock):
    """Also leaves the BlockState's scheduler in a component (``holder.current = bs.sched``)."""

    @property
    def inputs(self):
        return [InputParam("x"), InputParam("sched")]

    def __call__(self, components, block_state, i: int):
        components.holder.current = block_state.sched
        block_state.x = block_state.sched.step(block_state.x, torch.tanh(block_state.x))
        return components, block_state


class StepsTheComponent(XBlock):
    """Steps the components' scheduler, which the pipeline also put in the BlockState."""

    @property
    def inputs(self):
        return [InputParam("x"), InputParam("sched")]

    def __call__(self, components, block_state, i: int):
        block_state.x = components.scheduler.step(block_state.x, torch.tanh(block_state.x))
        return components, block_state


def call_with(loop, components, x, sched, n=3):
    state = PipelineState()
    state.set("x", x)
    state.set("sched", sched)
    state.set("num_steps", n)
    _, state = loop(components, state)
    return state


def test_an_object_whose_state_a_picture_cannot_see_is_that_very_object():
    loop = Loop.from_blocks_dict({"step": StepWithStateScheduler()})
    x = torch.randn(2, 3)
    fast = compile_loop(loop, backend="eager")
    for k in (0.5, 3.0):
        want = call(loop, x, PartialScheduler(k)).get("x")
        assert matches_eager(quiet(call, fast, x, PartialScheduler(k)).get("x"), want), k


def test_an_object_the_call_leaves_elsewhere_is_this_calls_object_there():
    loop = Loop.from_blocks_dict({"step": KeepsTheScheduler()})
    x = torch.randn(2, 3)
    fast = compile_loop(loop, backend="eager")
    for _ in range(3):
        comps, sched = Components(holder=Components()), TinyScheduler()
        quiet(call_with, fast, comps, x, sched)
        assert comps.holder.current is sched


def test_a_components_scheduler_also_in_the_blockstate_is_guarded_as_a_component():
    loop = Loop.from_blocks_dict({"step": StepsTheComponent()})
    x = torch.randn(2, 3)
    fast = compile_loop(loop, backend="eager")
    comps, eager_comps = Components(scheduler=TinyScheduler()), Components(scheduler=TinyScheduler())
    for k in range(2):  # the second call finds the components' scheduler exhausted: eager raises, so must this
        outcomes = []
        for run, c in ((lambda: call_with(loop, eager_comps, x, eager_comps.scheduler), eager_comps),
                       (lambda: quiet(call_with, fast, comps, x, TinyScheduler() if k else comps.scheduler), comps)):
            try:
                outcomes.append(run().get("x"))
            except IndexError as e:
                outcomes.append(type(e))
        if k == 0:
            assert matches_eager(outcomes[1], outcomes[0])
        else:
            assert outcomes == [IndexError, IndexError]
