"""The guards one at a time, table by table: each row a change between the traced call and a later one, and the
exact reason the guard gives for it (None: the plan still fits).

    InputGuard    a call's BlockState against the traced one's (guards/plan_guard.py), built directly
    PlanGuard     the guard of a tiny traced loop (``plan_guard(trace)``): lifted floats, components, attributes
    StateGuard    attribute reads against their snapshots, tensors by their rule (guards/attribute_guard.py)
    PlanCache     newest-first lookup, the LRU bound, static_shapes
    snapshots     ``same`` and ``tensor_matches``, rule by rule (pystate/snapshots.py)

A guard's row checks its fast path (``holds``) and its explanation (``check``) agree.
"""

import copy
import types

import pytest
import torch

from loopgraph import InputParam, ModularPipelineBlocks, PipelineState
from loopgraph.guards.attribute_guard import StateGuard, tensor_rules
from loopgraph.guards.plan_guard import InputGuard, PlanCache, PlanGuard, plan_guard
from loopgraph.pystate import snapshots  # its ABSENT not imported by name: see traced_guard
from loopgraph.pystate.attribute_log import Read
from loopgraph.pystate.snapshots import TENSOR_VALUE_NUMEL, TensorSnap, same, snapshot, tensor_matches
from loopgraph.trace.tracer import trace_loop

from .helpers import Components, Loop

WAS = "was shape (2, 3) strides (3, 1) float32 on cpu"


def rows(table: list[tuple]) -> dict:
    """A table's rows for ``parametrize``: each row's first item names it."""
    return dict(argvalues=[row[1:] for row in table], ids=[row[0] for row in table])


# -- InputGuard: the BlockState -----------------------------------------------------------------------------------
def input_slots() -> dict:
    """A call's BlockState: three data tensors, a schedule (a tensor and a count), a string, a dict holding one of
    the data tensors, a generator. Every call makes new objects: data tensors are guarded by spec, not identity."""
    x = torch.ones(2, 3)
    return {"x": x, "cond": torch.zeros(2, 3), "uncond": torch.zeros(2, 3), "sigmas": torch.linspace(1.0, 0.0, 4),
            "num_steps": 4, "mode": "euler", "kwargs": {"hidden": x, "scale": 1.5},
            "generator": torch.Generator().manual_seed(0)}


def set_x(slots, x):
    slots["x"] = slots["kwargs"]["hidden"] = x  # the dict keeps holding the data input: only x's spec changes


INPUT_ROWS = [
    ("a new call alike", lambda s: None, None),
    ("x's values", lambda s: s["x"].fill_(5.0), None),
    ("another generator", lambda s: s.update(generator=torch.Generator().manual_seed(7)), None),
    ("an extra input", lambda s: s.update(extra=1), "inputs ['extra'] present in only one of this call and the plan"),
    ("an input missing", lambda s: s.pop("cond"), "inputs ['cond'] present in only one of this call and the plan"),
    ("x's shape", lambda s: set_x(s, torch.ones(4, 3)),
     f"input 'x': shape (4, 3) strides (3, 1) float32 on cpu, {WAS}"),
    ("x's dtype", lambda s: set_x(s, torch.ones(2, 3, dtype=torch.float64)),
     f"input 'x': shape (2, 3) strides (3, 1) float64 on cpu, {WAS}"),
    ("x's strides", lambda s: set_x(s, torch.ones(3, 2).t()),
     f"input 'x': shape (2, 3) strides (1, 2) float32 on cpu, {WAS}"),
    ("x not a tensor", lambda s: set_x(s, 1.0), "input 'x' is a float, was a tensor"),
    ("the step count", lambda s: s.update(num_steps=5), "input 'num_steps': 5, was 4"),
    ("the schedule's values", lambda s: s.update(sigmas=torch.linspace(1.0, 0.5, 4)),
     "input 'sigmas': Tensor(4,) float32 with other values than when traced"),
    ("the schedule's dtype", lambda s: s.update(sigmas=torch.linspace(1.0, 0.0, 4, dtype=torch.float64)),
     "input 'sigmas': Tensor(4,) float64, was Tensor(4,) float32"),
    ("a string", lambda s: s.update(mode="ddim"), "input 'mode': 'ddim', was 'euler'"),
    ("a number in a dict", lambda s: s["kwargs"].update(scale=2.0), "input 'kwargs'['scale']: 2.0, was 1.5"),
    ("an int for a float", lambda s: s["kwargs"].update(scale=2),
     "input 'kwargs'['scale']: 2 (an int), was 1.5 (a float)"),
    ("a dict holding a copy of x, not x", lambda s: s["kwargs"].update(hidden=s["x"].clone()),
     "input 'kwargs'['hidden']: Tensor(2, 3) float32, was the data input 'x'"),
    ("two data inputs one tensor", lambda s: s.update(uncond=s["cond"]),
     "input 'uncond' is the same tensor as input 'cond' (was a tensor of its own when traced)"),
    ("two data inputs sharing storage", lambda s: s.update(uncond=s["cond"].view(2, 3)),
     "input 'uncond' is a view of the storage of input 'cond' (was a tensor of its own when traced)"),
]


@pytest.mark.parametrize("change, expected", **rows(INPUT_ROWS))
def test_input_guard(change, expected):
    guard = InputGuard(input_slots(), schedule_inputs=["num_steps", "sigmas"])
    slots = input_slots()
    change(slots)
    assert guard.check(slots) == expected
    assert guard.holds(slots) is (expected is None)


# -- PlanGuard of a traced loop: lifted floats, the components, their attributes -----------------------------------
class Step(ModularPipelineBlocks):
    @property
    def inputs(self):
        return [InputParam("x"), InputParam("scale")]

    def __call__(self, components, block_state, i: int):
        x = block_state.x * components.weight  # the compiled code reads this very tensor
        if block_state.scale > 1.0:  # a predicate on a float input: its outcome is guarded, not the value
            x = x * block_state.scale
        if components.mode == "shift":  # a string attribute: by value
            x = x + 1.0
        block_state.x = x * components.gain  # a float attribute used in arithmetic only: lifted, by type
        return components, block_state


def traced_guard():
    """The guard of one traced call of a one-block loop. The block's module globals are guarded too (a global the
    block reads could be changed by the user): none of them may hold ``snapshots.ABSENT``, which the guard takes for
    an attribute read absent, so that every call would re-plan (with no reason found)."""
    components = Components(weight=torch.full((3,), 2.0), mode="shift", gain=1.5)
    loop = Loop.from_blocks_dict({"step": Step})
    trace, _ = trace_loop(loop, components, toy_state())
    return loop, components, plan_guard(trace)


def toy_state(**values) -> PipelineState:
    state = PipelineState()
    for k, v in {"x": torch.ones(2, 3), "scale": 2.0, "num_steps": 3, **values}.items():
        state.set(k, v)
    return state


TRACED_ROWS = [  # the call's inputs (beside x, scale=2.0, num_steps=3), a change to the components, the reason
    ("a new call alike", {}, lambda c: None, None),
    ("the float input, the predicate alike", dict(scale=3.0), lambda c: None, None),
    ("the float input across the predicate", dict(scale=0.5), lambda c: None,
     "input 'scale' is 0.5: float.__gt__(0.5, 1.0), was True when traced"),
    ("the float input an int", dict(scale=3), lambda c: None,
     "input 'scale' is an int, was a float (an input of the compiled loop)"),
    ("x's dtype", dict(x=torch.ones(2, 3, dtype=torch.float64)), lambda c: None,
     f"input 'x': shape (2, 3) strides (3, 1) float64 on cpu, {WAS}"),
    ("the lifted float attribute", {}, lambda c: setattr(c, "gain", 2.5), None),
    ("the lifted float attribute an int", {}, lambda c: setattr(c, "gain", 2),
     "components.gain is an int, was a float (an input of the compiled loop)"),
    ("the string attribute", {}, lambda c: setattr(c, "mode", "none"), "components.mode is 'none', was 'shift'"),
    ("the weight updated in place", {}, lambda c: c.weight.mul_(3.0), None),
    ("the weight replaced by an equal tensor", {}, lambda c: setattr(c, "weight", c.weight.clone()),
     "components.weight holds another tensor object (Tensor(3,) float32); the compiled code reads the traced "
     "tensor itself"),
]


@pytest.mark.parametrize("values, change, expected", **rows(TRACED_ROWS))
def test_plan_guard_of_a_traced_loop(values, change, expected):
    loop, components, guard = traced_guard()
    change(components)
    slots = dict(vars(loop.get_block_state(toy_state(**values))))
    assert guard.check(components, slots) == expected
    assert guard.holds(components, slots) is (expected is None)


def test_plan_guard_of_another_components_object():
    loop, components, guard = traced_guard()
    slots = dict(vars(loop.get_block_state(toy_state())))
    assert guard.check(Components(**vars(components)), slots) == "another components object than the traced call's"
    assert not guard.holds(Components(**vars(components)), slots)


# -- StateGuard: the attributes a traced call read ---------------------------------------------------------------
def settings_guard():
    """A component's attributes as a traced call read them (a fresh class each time: a row changes its attribute),
    each tensor's rule from what the call did with it (``tensor_rules``)."""
    cls = type("Settings", (), {"default_steps": 3})
    s = cls()
    s.steps, s.mode = 4, "euler"
    s.weight = torch.ones(3)                    # the compiled code reads it: identity
    s.sigmas = torch.linspace(1.0, 0.0, 4)      # evaluated eagerly and baked: value
    s.shift = torch.ones(2)                     # both: identity+value
    s.unused = torch.zeros(2)                   # no op used it: spec
    s.kept = torch.zeros(2)                     # no op used it, still held when the call ended: kept
    s.table = {"a": torch.ones(2)}              # a dict of tensors the compiled code reads
    s.layers = [torch.ones(2)]                  # a list of them
    s.mixed = {"w": torch.ones(2), "n": 1}      # a tensor baked and a number: compared one by one
    reads = [Read(s, vars(s), k, snapshot(v), f"settings.{k}") for k, v in vars(s).items()]
    reads += [Read(s, vars(s), "extra", snapshots.ABSENT, "settings.extra"),  # getattr(s, "extra", None): the default
              Read(cls, vars(cls), "default_steps", 3, "Settings.default_steps")]
    rules = tensor_rules(reads, used={id(s.weight), id(s.table["a"]), id(s.layers[0])},
                         eager={id(s.sigmas), id(s.shift), id(s.mixed["w"])}, const={id(s.shift)},
                         present_at_end={id(s.kept)})
    return s, StateGuard(reads, rules)


def replace(name, value):
    return lambda s: setattr(s, name, value)


def another(name):
    """An equal tensor in place of the attribute's own."""
    return lambda s: setattr(s, name, getattr(s, name).clone())


IDENTITY = "the compiled code reads the traced tensor itself"
VALUE = "the compiled code baked values computed from it"
BOTH = "the compiled code reads it and baked values computed from it"
SPEC = "the compiled code depends on its shape only"
KEPT = "the compiled code leaves the traced tensor there after a call (the call never used it but kept it in place)"

STATE_ROWS = [
    ("nothing", lambda s: None, None),
    ("a number", replace("steps", 5), "settings.steps is 5, was 4"),
    ("a string", replace("mode", "ddim"), "settings.mode is 'ddim', was 'euler'"),
    ("an attribute deleted", lambda s: delattr(s, "steps"), "settings.steps is absent; it was 4 when traced"),
    ("an attribute absent when traced, set", replace("extra", 1),
     "settings.extra is set (1); it was absent when traced"),
    ("a class attribute", lambda s: setattr(type(s), "default_steps", 10), "Settings.default_steps is 10, was 3"),
    ("the class", lambda s: setattr(s, "__class__", type("Other", (), {})),
     "an object's class changed: Other, was Settings"),
    ("the __dict__, with another number", lambda s: setattr(s, "__dict__", {**vars(s), "steps": 5}),
     "an object's __dict__ was replaced (Settings)"),
    ("identity: updated in place", lambda s: s.weight.mul_(2.0), None),
    ("identity: an equal tensor", another("weight"),
     f"settings.weight holds another tensor object (Tensor(3,) float32); {IDENTITY}"),
    ("value: an equal tensor", another("sigmas"), None),
    ("value: updated in place", lambda s: s.sigmas.mul_(2.0),
     f"settings.sigmas holds changed values (Tensor(4,) float32); {VALUE}"),
    ("value: another tensor, other values", replace("sigmas", torch.linspace(1.0, 0.5, 4)),
     f"settings.sigmas holds another tensor object (Tensor(4,) float32); {VALUE}"),
    ("identity+value: updated in place", lambda s: s.shift.add_(1.0),
     f"settings.shift holds changed values (Tensor(2,) float32); {BOTH}"),
    ("identity+value: an equal tensor", another("shift"),
     f"settings.shift holds another tensor object (Tensor(2,) float32); {BOTH}"),
    ("spec: other values", replace("unused", torch.ones(2)), None),
    ("spec: another shape", replace("unused", torch.zeros(3)),
     f"settings.unused holds another tensor object (Tensor(3,) float32); {SPEC}"),
    ("spec: another dtype", replace("unused", torch.zeros(2, dtype=torch.float64)),
     f"settings.unused holds another tensor object (Tensor(2,) float64); {SPEC}"),
    ("kept: updated in place", lambda s: s.kept.add_(1.0), None),
    ("kept: an equal tensor", another("kept"),
     f"settings.kept holds another tensor object (Tensor(2,) float32); {KEPT}"),
    ("a dict of tensors: one replaced", lambda s: s.table.update(a=torch.ones(2)),
     f"settings.table['a'] holds another tensor object (Tensor(2,) float32); {IDENTITY}"),
    ("a dict of tensors: a key added", lambda s: s.table.update(b=torch.ones(2)),
     "settings.table['b'] is set (Tensor(2,) float32); it was absent when traced"),
    ("a list of tensors: one replaced", lambda s: s.layers.__setitem__(0, torch.ones(2)),
     f"settings.layers[0] holds another tensor object (Tensor(2,) float32); {IDENTITY}"),
    ("a list of tensors: one appended", lambda s: s.layers.append(torch.ones(2)),
     "settings.layers is a list of 2, was a list of 1"),
    ("a dict of a tensor and a number: the number", lambda s: s.mixed.update(n=2), "settings.mixed['n'] is 2, was 1"),
    ("a dict of a tensor and a number: the tensor in place", lambda s: s.mixed["w"].sub_(1.0),
     f"settings.mixed['w'] holds changed values (Tensor(2,) float32); {VALUE}"),
]


@pytest.mark.parametrize("change, expected", **rows(STATE_ROWS))
def test_state_guard(change, expected):
    settings, guard = settings_guard()
    change(settings)
    assert guard.check() == expected
    assert guard.holds() is (expected is None)


def test_tensor_rules_follow_what_the_call_did_with_each_tensor():
    settings, guard = settings_guard()
    rule = {name: guard.rules[id(getattr(settings, name))] for name in ("weight", "sigmas", "shift", "unused", "kept")}
    assert rule == {"weight": "identity", "sigmas": "value", "shift": "identity+value", "unused": "spec",
                    "kept": "kept"}


# -- PlanCache: newest first, the bound, static_shapes ------------------------------------------------------------
def plan(width: int, components) -> types.SimpleNamespace:
    """A plan made for an input ``x`` of that width (a plan, to the cache, is its guard)."""
    guard = PlanGuard(components, InputGuard(call(width), schedule_inputs=[]), StateGuard([], {}))
    return types.SimpleNamespace(width=width, guard=guard)


def plan_cache(*widths, bound=3, static_shapes=False):
    """A cache holding a plan for each width, added in that order, all for one components object."""
    components = object()
    cache = PlanCache(bound, static_shapes=static_shapes)
    for width in widths:
        cache.add(plan(width, components))
    return cache, components


def call(width: int) -> dict:
    return {"x": torch.ones(width)}


def miss(now: int, then: int) -> str:
    return f"input 'x': shape ({now},) strides (1,) float32 on cpu, was shape ({then},) strides (1,) float32 on cpu"


FIND_ROWS = [  # bound, the plans' widths (oldest first), the call's width, the plan found, the plans after, misses
    ("the newest fits", 3, [2, 3, 4], 4, 4, [2, 3, 4], []),
    ("an older one fits: it moves to the newest place", 3, [2, 3, 4], 2, 2, [3, 4, 2], []),
    ("none fits: why each misses, newest first", 3, [2, 3, 4], 5, None, [2, 3, 4],
     [miss(5, 4), miss(5, 3), miss(5, 2)]),
    ("the bound dropped the oldest", 2, [2, 3, 4], 2, None, [3, 4], [miss(2, 4), miss(2, 3)]),
    ("a bound of one", 1, [2, 3], 3, 3, [3], []),
]


@pytest.mark.parametrize("bound, widths, width, found, after, misses", **rows(FIND_ROWS))
def test_plan_cache_find(bound, widths, width, found, after, misses):
    cache, components = plan_cache(*widths, bound=bound)
    got = cache.find(components, call(width))
    assert (got and got.width) == found
    assert [p.width for p in cache] == after and cache.misses == misses


LRU_ROWS = [  # bound, what happens in order (a plan added, a call found, a call looked up without touching)
    ("the oldest goes", 2, [("add", 2), ("add", 3), ("add", 4)], [3, 4]),
    ("the least recently used goes", 2, [("add", 2), ("add", 3), ("find", 2), ("add", 4)], [2, 4]),
    ("a look-up without touching leaves the order", 2, [("add", 2), ("add", 3), ("peek", 2), ("add", 4)], [3, 4]),
    ("a miss changes nothing", 3, [("add", 2), ("find", 5), ("add", 5)], [2, 5]),
]


@pytest.mark.parametrize("bound, events, after", **rows(LRU_ROWS))
def test_plan_cache_keeps_the_most_recently_used_within_its_bound(bound, events, after):
    cache, components = plan_cache(bound=bound)
    for what, width in events:
        if what == "add":
            cache.add(plan(width, components))
        else:
            cache.find(components, call(width), touch=what == "find")
    assert [p.width for p in cache] == after


def test_plan_cache_static_shapes_turns_a_miss_into_an_error():
    cache, components = plan_cache(2, static_shapes=True)
    assert cache.find(components, call(2)).width == 2
    assert cache.find(components, call(3), touch=False) is None  # a look-up only (explain): no error
    with pytest.raises(ValueError) as error:
        cache.find(components, call(3))
    assert str(error.value) == (
        f"loop (compiled with static_shapes=True): this call does not fit the compiled plan: {miss(3, 2)}. Reset the "
        "scheduler (set_timesteps) and pass the inputs it was compiled for, or use static_shapes=False.")
    assert PlanCache(1, static_shapes=True).find(components, call(3)) is None  # nothing planned yet: plan it


# -- snapshots: what a read keeps, and whether a value now is the same ------------------------------------------
TENSOR_ROWS = [  # the rule, what happened to a small tensor (arange(4.)) after the snapshot, whether it matches
    ("identity: itself", "identity", lambda t: t, True),
    ("identity: updated in place", "identity", lambda t: t.add_(1.0), True),  # the compiled code reads it as it is
    ("identity: an equal copy", "identity", lambda t: t.clone(), False),
    ("value: an equal copy", "value", lambda t: t.clone(), True),
    ("value: updated in place", "value", lambda t: t.add_(1.0), False),
    ("value: another dtype", "value", lambda t: t.double(), False),
    ("value: another shape", "value", lambda t: t.reshape(2, 2), False),
    ("identity+value: itself", "identity+value", lambda t: t, True),
    ("identity+value: an equal copy", "identity+value", lambda t: t.clone(), False),
    ("identity+value: updated in place", "identity+value", lambda t: t.add_(1.0), False),
    ("spec: other values", "spec", lambda t: t + 1.0, True),
    ("spec: another dtype", "spec", lambda t: t.double(), False),
    ("spec: another shape", "spec", lambda t: t.reshape(2, 2), False),
    ("kept: updated in place", "kept", lambda t: t.add_(1.0), True),
    ("kept: an equal copy", "kept", lambda t: t.clone(), False),
]


@pytest.mark.parametrize("rule, change, expected", **rows(TENSOR_ROWS))
def test_tensor_matches_by_rule(rule, change, expected):
    t = torch.arange(4.0)
    snap = snapshot(t)
    current = change(t)
    assert tensor_matches(current, snap, rule) is expected
    assert same(current, snap, {id(t): rule}) is expected


LARGE_ROWS = [  # "value" on a tensor too large to copy: the same object, its version counter and its storage
    ("itself", lambda t: t, True),
    ("an equal copy", lambda t: t.clone(), False),
    ("updated in place", lambda t: t.add_(1.0), False),
    (".data assigned", lambda t: setattr(t, "data", torch.ones_like(t)) or t, False),  # no version bump
]


@pytest.mark.parametrize("change, expected", **rows(LARGE_ROWS))
def test_a_large_tensor_is_compared_by_identity_version_and_storage(change, expected):
    t = torch.zeros(TENSOR_VALUE_NUMEL + 1)
    snap = snapshot(t)
    assert isinstance(snap, TensorSnap) and snap.value is None  # no copy kept
    assert tensor_matches(change(t), snap, "value") is expected


VALUE_ROWS = [  # the value read, what happened to it after the snapshot, whether it is the same (tensors by value)
    ("an int", 1, lambda v: 1, True),
    ("an int, then a float", 1, lambda v: 1.0, False),
    ("a bool, then an int", True, lambda v: 1, False),
    ("NaN", float("nan"), lambda v: float("nan"), True),
    ("a string", "a", lambda v: "b", False),
    ("a list, a new one alike", [1, 2], lambda v: [1, 2], True),
    ("a list appended in place", [1, 2], lambda v: v.append(3) or v, False),
    ("a tuple, then a list", (1, 2), lambda v: [1, 2], False),
    ("a dict, a new one alike", {"a": 1}, lambda v: {"a": 1}, True),
    ("a dict with a key added in place", {"a": 1}, lambda v: v.update(b=2) or v, False),
    ("a dict's int a float", {"a": 1}, lambda v: {"a": 1.0}, False),
    ("a set, reordered", {1, 2}, lambda v: {2, 1}, True),
    ("a set changed in place", {1, 2}, lambda v: v.add(3) or v, False),
    ("a torch.Size", torch.Size([2, 3]), lambda v: torch.Size([2, 3]), True),
    ("a torch.Size, then a tuple", torch.Size([2, 3]), lambda v: (2, 3), False),
    ("an object, itself", types.SimpleNamespace(a=1), lambda v: v, True),
    ("an object, an equal one", types.SimpleNamespace(a=1), lambda v: types.SimpleNamespace(a=1), False),
    ("a tensor in a dict, an equal one", {"w": torch.ones(2)}, lambda v: {"w": torch.ones(2)}, True),
    ("a tensor in a dict, updated in place", {"w": torch.ones(2)}, lambda v: {"w": v["w"].add_(1.0)}, False),
    ("a tensor in a list, another dtype", [torch.ones(2)], lambda v: [torch.ones(2, dtype=torch.float64)], False),
    ("absent, still absent", snapshots.ABSENT, lambda v: snapshots.ABSENT, True),
    ("absent, then set", snapshots.ABSENT, lambda v: None, False),
]


@pytest.mark.parametrize("value, change, expected", **rows(VALUE_ROWS))
def test_same_compares_a_value_now_with_its_snapshot(value, change, expected):
    value = copy.deepcopy(value)  # rows change their value in place
    snap = snapshot(value)
    assert same(change(value), snap) is expected
