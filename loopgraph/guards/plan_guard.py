"""What a plan is valid for, checked on every call, and the plan cache.

A plan's compiled code bakes what the traced call read. A later call may reuse the plan only when everything
that was read is as it was (otherwise it re-plans: one traced eager call, whose result it returns):

    inputs   the BlockState's keys; each data tensor's shape, strides, dtype and device; which data inputs
             are one tensor or share storage; every other input by value (``InputGuard``)
    state    every attribute of the components, models, blocks and wrapper that the traced call read before it
             wrote it, absent ones included, as ``attribute_log.record`` logged them (``StateGuard``)

Guards run on every call, so the state check is vectorised: the thousands of reads of a UNet's modules are
compared a few C-level passes at a time (``map`` over the holding dicts), and only a mismatch walks entries one
by one to say which value changed. ``PlanCache`` keeps the plans, newest used first, within a bound.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from ..modular_pipelines.state import _atoms_only, values_equal
from ..pystate.attribute_log import INPUT_ROOT
from ..pystate.components import slot_aliases
from ..pystate.snapshots import MAX_DEPTH, ContainerSnap, a_type, describe, tensor_snaps, value_state
from ..trace.floats import Source, SourceKind
from .attribute_guard import StateGuard, tensor_rules

__all__ = ["InputGuard", "PlanGuard", "PlanCache", "match_form", "plan_guard", "stable_guard", "tensor_spec"]


def tensor_spec(t: torch.Tensor) -> tuple:
    """What a data input's compiled code depends on: shape, strides (memory format), dtype and device."""
    return (tuple(t.shape), t.stride(), t.dtype, t.device)


# -- BlockState inputs ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _GeneratorLike:
    """Stands for a ``torch.Generator`` input, compared by device only: its state is this call's input (the
    noise it draws), not part of the plan, so a new generator per call reuses the plan."""

    device: str


@dataclass(frozen=True)
class _InputRef:
    """Stands for a tensor inside a container input (a dict of denoiser inputs) that is the very tensor of
    another, data input: its value reaches the compiled loop through that input, so only the sharing and the
    spec are part of the plan."""

    slot: str
    spec: tuple


def match_form(value: Any, data: dict[int, str]) -> Any:
    """``value`` as plans compare it: a generator by its device (its state is this call's input, not plan
    structure), a tensor that is one of the call's data inputs (``data``: id -> name) as an ``_InputRef``, and
    plain lists, tuples and dicts item by item; anything else as it is. Unchanged values are returned as is."""
    if isinstance(value, torch.Generator):
        return _GeneratorLike(str(value.device))
    if isinstance(value, torch.Tensor):
        name = data.get(id(value))
        return value if name is None else _InputRef(name, tensor_spec(value))
    if type(value) in (list, tuple) and not _atoms_only(value):  # a list of numbers is compared as it is, in C
        items = [match_form(v, data) for v in value]
        return value if all(a is b for a, b in zip(items, value)) else type(value)(items)
    if type(value) is dict:
        items = {k: match_form(v, data) for k, v in value.items()}
        return value if all(items[k] is value[k] for k in value) else items
    return value


def _aliasing(tensors: list[torch.Tensor]) -> tuple:
    """For each data input, the first data input that is the same tensor, and the first sharing its storage."""
    ids, storages = {}, {}
    out = []
    for k, t in enumerate(tensors):
        ptr = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        out.append((ids.setdefault(id(t), k), storages.setdefault((t.device, ptr), k) if ptr else k))
    return tuple(out)


class InputGuard:
    """The BlockState a plan was made for: keys, data tensor specs and sharing, every other value."""

    def __init__(self, slots: dict[str, Any], schedule_inputs: list[str], floats: dict[str, Source] | None = None,
                 objects: dict[str, tuple[Any, Any, bool]] | None = None) -> None:
        floats = floats or {}
        self.data = {k: tensor_spec(v) for k, v in slots.items()
                     if isinstance(v, torch.Tensor) and k not in schedule_inputs}
        self.floats = floats  # floats the plan takes as inputs: by type and the predicates' outcomes (trace/floats.py)
        # plain objects (a scheduler): (the traced one, its value_state then, by value) - by value, any object of
        # the same state fits (one deep-copied per call); else that very object, its attributes read by read
        self.objects = objects or {}
        ids = {id(slots[k]): k for k in self.data}
        self.schedule = {k: copy.deepcopy(match_form(v, ids)) for k, v in slots.items()
                         if k not in self.data and k not in floats and k not in self.objects}
        self.keys = set(slots)
        self.aliasing = _aliasing([slots[k] for k in self.data])

    def holds(self, slots: dict[str, Any]) -> bool:
        """Whether ``slots`` (a call's BlockState) fits (the fast path of every call)."""
        if slots.keys() != self.keys:
            return False
        for k, spec in self.data.items():
            value = slots[k]
            if not isinstance(value, torch.Tensor) or tensor_spec(value) != spec:
                return False
        ids = {id(slots[k]): k for k in self.data}
        return (all(s.fits(slots[k]) for k, s in self.floats.items())
                and all(values_equal(match_form(slots[k], ids), expected) for k, expected in self.schedule.items())
                and all(map(self._object_fits, self.objects, map(slots.get, self.objects)))
                and _aliasing([slots[k] for k in self.data]) == self.aliasing)

    def _object_fits(self, k: str, now: Any) -> bool:
        traced, picture, by_value = self.objects[k]
        return now is traced if not by_value else (type(now) is type(traced) and value_state(now) == picture)

    def check(self, slots: dict[str, Any]) -> str | None:
        """None when ``slots`` (a call's BlockState) fits, else why not."""
        if self.holds(slots):
            return None
        if set(slots) != self.keys:
            return f"inputs {sorted(set(slots) ^ self.keys)} present in only one of this call and the plan"
        for k, spec in self.data.items():
            value = slots[k]
            if not isinstance(value, torch.Tensor):
                return f"input {k!r} is {a_type(value)}, was a tensor"
            if tensor_spec(value) != spec:
                return f"input {k!r}: {_spec_text(tensor_spec(value))}, was {_spec_text(spec)}"
        for k, s in self.floats.items():
            if not s.fits(slots[k]):
                return s.misfit(slots[k])
        for k, (traced, _, by_value) in self.objects.items():
            if not self._object_fits(k, slots[k]):
                if by_value:
                    return (f"input {k!r}: {describe(slots[k])} is not the object the plan was traced with in value "
                            f"(its attributes differ, or its class)")
                return (f"input {k!r}: {describe(slots[k])} is another object than the traced one (the plan reads "
                        f"that one's attributes; it differs by value, or writes objects inside it)")
        ids = {id(slots[k]): k for k in self.data}
        for k, expected in self.schedule.items():
            if not values_equal(match_form(slots[k], ids), expected):
                path, now, then = _first_difference(match_form(slots[k], ids), expected)
                return f"input {k!r}{path}: {_changed(now, then)}"
        now = _aliasing([slots[k] for k in self.data])
        names = list(self.data)
        for j, (a, b) in enumerate(zip(now, self.aliasing)):
            if a != b:
                return (f"input {names[j]!r} is {_sharing(names, j, a)} (was {_sharing(names, j, b)} when "
                        f"traced)")
        return "the inputs differ from the traced call's"


def _first_difference(now: Any, then: Any, path: str = "") -> tuple[str, Any, Any]:
    """Where an input's value first differs from the traced one: (the item's path, its value now, then)."""
    if type(now) is type(then) is dict and now.keys() == then.keys():
        k = next(k for k in now if not values_equal(now[k], then[k]))
        return _first_difference(now[k], then[k], f"{path}[{k!r}]")
    if type(now) is type(then) and type(now) in (list, tuple) and len(now) == len(then):
        k = next(k for k, (a, b) in enumerate(zip(now, then)) if not values_equal(a, b))
        return _first_difference(now[k], then[k], f"{path}[{k}]")
    return path, now, then


def _changed(now: Any, then: Any) -> str:
    """A value now and when traced, in words; the same rendering (a tensor's, a container's) says "other values"."""
    shown_now, shown_then = _shown(now), _shown(then)
    if shown_now == shown_then:
        return f"{shown_now} with other values than when traced"
    numbers = (bool, int, float, complex)
    if type(now) is not type(then) and isinstance(now, numbers) and isinstance(then, numbers):
        return f"{shown_now} ({a_type(now)}), was {shown_then} ({a_type(then)})"
    return f"{shown_now}, was {shown_then}"


def _shown(value: Any) -> str:
    return f"the data input {value.slot!r}" if isinstance(value, _InputRef) else describe(value)


def _sharing(names: list[str], j: int, alias: tuple[int, int]) -> str:
    """What data input ``j`` shares, by its ``_aliasing`` entry."""
    same, storage = alias
    if same != j:
        return f"the same tensor as input {names[same]!r}"
    if storage != j:
        return f"a view of the storage of input {names[storage]!r}"
    return "a tensor of its own"


def _spec_text(spec: tuple) -> str:
    shape, stride, dtype, device = spec
    return f"shape {shape} strides {stride} {str(dtype).replace('torch.', '')} on {device}"


def plan_guard(trace, lifted: bool = True) -> PlanGuard:
    """The guard of a plan made from ``trace`` (a ``trace.LoopTrace``). ``lifted``: the floats the plan takes as
    inputs (``trace.lifted``, trace/floats.py) are guarded by type, not value."""
    python, usage = trace.python, trace.usage
    floats = trace.lifted if lifted else []
    attributes = [s for s in floats if s.kind == SourceKind.ATTRIBUTE]
    by_type = {id(s.read) for s in attributes}
    reads = [r for r in python.reads.values() if id(r) not in by_type]
    by_value = rebound_objects(trace)
    if by_value:  # their state is compared whole, by value, with the inputs
        reads = [r for r in reads if not r.path.startswith(INPUT_ROOT)]
    rules = tensor_rules(reads, usage.used, usage.eager, usage.const, python.present)
    objects = {k: (obj, picture, k in by_value) for k, (obj, picture) in trace.input_objects.items()}
    inputs = InputGuard(trace.initial_slots, trace.schedule_inputs,
                        {s.name: s for s in floats if s.kind == SourceKind.INPUT}, objects)
    return PlanGuard(trace.components, inputs, StateGuard(reads, rules, attributes), trace.checks, trace.aliases)


def rebound_objects(trace) -> set[str]:
    """The BlockState's plain objects (``trace.input_objects``) a plan may take by value: another object of the same
    state (a scheduler the pipeline deep-copies per call) runs the plan, and what the call wrote is set on it
    (``runtime.executables.write_back``). All or none: when the call wrote an attribute of an object inside one
    (not its own), read one of their tensors as a graph constant, or runs blocks eagerly, each is that very
    object, guarded read by read."""
    if not trace.input_objects or trace.problems:
        return set()
    roots = {id(obj) for obj, _ in trace.input_objects.values()}
    python = trace.python
    tree = {oid for oid, path in python.paths.items() if path.startswith(INPUT_ROOT)} | roots
    if any(id(obj) in tree and id(obj) not in roots for obj, _, _ in python.end):
        return set()  # it wrote into an object inside one
    if any(_refers(value, tree) for _, _, value in python.end):
        return set()  # it left one (or an object inside it) somewhere else (`holder.current = bs.sched`)
    inside = [r for r in python.reads.values() if r.path.startswith(INPUT_ROOT)]
    if any(_refers(r.value, tree) for r in python.reads.values() if not r.path.startswith(INPUT_ROOT)):
        return set()  # the components or blocks hold one too (`state.set("sched", components.scheduler)`)
    if any(id(snap.tensor) in trace.usage.const for r in inside for snap in tensor_snaps(r.value)):
        return set()
    return set(trace.input_objects)


def _refers(value: Any, ids: set[int], depth: int = 0) -> bool:
    """Whether ``value`` (a read's snapshot, an attribute's end value) is or holds one of the objects ``ids``."""
    if id(value) in ids:
        return True
    if depth > MAX_DEPTH:
        return False
    items = getattr(value, "items", None) if isinstance(value, ContainerSnap) else value
    if isinstance(items, dict):
        return any(_refers(v, ids, depth + 1) for v in items.values())
    if isinstance(items, (list, tuple)):
        return any(_refers(v, ids, depth + 1) for v in items)
    return False


def stable_guard(trace, guard: PlanGuard) -> StateGuard:
    """The reads a traced call never wrote nor changed: they hold at every cut of the loop (eager segments)."""
    return StateGuard(trace.python.stable, guard.state.rules)


# -- a plan's guards, and the plans ------------------------------------------------------------------------------------
class PlanGuard:
    """Everything a plan is valid for: the components object, the BlockState inputs and the Python state its
    traced call read."""

    def __init__(self, components: Any, inputs: InputGuard, state: StateGuard, checks: tuple = (),
                 aliases: tuple = ((), frozenset())) -> None:
        self.components, self.inputs, self.state = components, inputs, state
        self.checks = checks  # data-dependent ops on the inputs, evaluated per call (trace/hoist.py)
        self.aliases = aliases  # component tensors that were BlockState slots' tensors (pystate/components.py)

    def _aliases_hold(self, slots: dict[str, Any]) -> bool:
        names, pairs = self.aliases
        objects = {n: o for n in names if (o := getattr(self.components, n, None)) is not None}
        return slot_aliases(objects, slots) == pairs

    def holds(self, components: Any, slots: dict[str, Any]) -> bool:
        """Whether a call with ``components`` and BlockState ``slots`` (and the Python state as it is now) may
        reuse the plan: the fast path, no reasons."""
        return (components is self.components and self.inputs.holds(slots) and self.state.holds()
                and all(c.holds(slots) for c in self.checks) and self._aliases_hold(slots))

    def check(self, components: Any, slots: dict[str, Any]) -> str | None:
        """None when the call may reuse the plan, else why not."""
        if components is not self.components:
            return "another components object than the traced call's"
        why = (self.inputs.check(slots) or self.state.check()
               or next((why for c in self.checks if (why := c.check(slots)) is not None), None))
        if why is None and not self._aliases_hold(slots):
            names, pairs = self.aliases
            now = slot_aliases({n: o for n in names if (o := getattr(self.components, n, None)) is not None}, slots)
            shown = lambda found: sorted(f"{'.'.join(map(str, path))} is input {slot!r}" for path, slot in found)
            why = (f"which component tensors are BlockState inputs' tensors changed: now {shown(now) or 'none'}, "
                   f"when traced {shown(pairs) or 'none'}")
        return why

    def describe(self) -> str:
        s = self.state
        groups = {"tensors by identity": s.identity, "tensor dicts": s.tensor_dicts, "tensor lists": s.tensor_lists}
        counts = ", ".join([f"{len(s.hooks)} empty hook dicts", f"{len(s.per_holder)} by holder"]
                           + [f"{sum(len(g.reads) for g in v.values())} {k}" for k, v in groups.items()])
        floats = len(self.inputs.floats) + len(s.floats)
        return (f"{len(self.inputs.keys)} inputs ({len(self.inputs.data)} data tensors by spec and sharing); "
                f"{len(s)} attribute reads of {len(s.objects)} objects ({counts}, {len(s.slow)} one by one)"
                + (f"; {floats} lifted float{'s' if floats > 1 else ''} by type" if floats else "")
                + (f"; {len(self.checks)} data-dependent op{'s' if len(self.checks) > 1 else ''} on inputs by outcome"
                   if self.checks else ""))


class PlanCache:
    """The plans of one compiled loop, most recently used last, at most ``bound`` of them.

    ``find`` returns the newest plan whose guard holds for a call, and keeps why each other plan did not
    (``misses``, shown by ``explain()``); ``static_shapes`` turns "no plan fits" into an error."""

    def __init__(self, bound: int, static_shapes: bool = False, owner: str = "loop") -> None:
        self.bound = bound
        self.static_shapes = static_shapes
        self.owner = owner
        self.plans: list = []
        self.misses: list[str] = []

    def __len__(self) -> int:
        return len(self.plans)

    def __iter__(self):
        return iter(self.plans)

    def __getitem__(self, index: int):
        return self.plans[index]

    @property
    def newest(self):
        return self.plans[-1] if self.plans else None

    def find(self, components: Any, slots: dict[str, Any], touch: bool = True):
        """The newest plan whose guard holds (moved to the newest place when ``touch``), else None (and then
        ``misses`` says why each plan does not fit)."""
        for plan in reversed(self.plans):  # the newest plan is the one a settled caller matches
            if plan.guard.holds(components, slots):
                if touch:
                    self.plans.remove(plan)  # most recently used last: a repeat call matches it first,
                    self.plans.append(plan)  # so the lookup's cost does not depend on older plans
                self.misses = []
                return plan
        misses = [plan.guard.check(components, slots) or "fits now" for plan in reversed(self.plans)]
        self.misses = misses
        if self.plans and self.static_shapes and touch:
            raise ValueError(
                f"{self.owner} (compiled with static_shapes=True): this call does not fit the compiled plan: "
                f"{misses[0]}. Reset the scheduler (set_timesteps) and pass the inputs it was compiled for, or use "
                f"static_shapes=False."
            )
        return None

    def add(self, plan) -> None:
        self.plans.append(plan)
        del self.plans[:-self.bound]  # the least recently used beyond the bound
