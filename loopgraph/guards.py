"""What a plan is valid for, checked on every call, and the plan cache.

A plan's compiled code bakes what the traced call read. A later call may reuse the plan only when everything
that was read is as it was (otherwise it re-plans: one traced eager call, whose result it returns):

    inputs   the BlockState's keys; each data tensor's shape, strides, dtype and device; which data inputs
             are one tensor or share storage; every other input by value (``InputGuard``)
    state    every attribute of the components, models, blocks and wrapper that the traced call read before it
             wrote it, absent ones included, as ``components.record`` logged them (``StateGuard``)

Guards run on every call, so the state check is vectorised: the thousands of reads of a UNet's modules are
compared a few C-level passes at a time (``map`` over the holding dicts), and only a mismatch walks entries one
by one to say which value changed. ``PlanCache`` keeps the plans, newest used first, within a bound.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass
from itertools import chain, repeat
from typing import Any, Callable

import torch

from .components import ABSENT, ATOMS, ContainerSnap, Read, TensorSnap, describe, difference, same
from .state import _atoms_only, values_equal

__all__ = ["InputGuard", "StateGuard", "PlanGuard", "PlanCache", "match_form", "plan_guard", "stable_guard",
           "tensor_rules", "tensor_spec"]

_ATOM_TYPES = set(ATOMS)
_is = operator.is_
_getdict = operator.attrgetter("__dict__")


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

    def __init__(self, slots: dict[str, Any], schedule_inputs: list[str]) -> None:
        self.data = {k: tensor_spec(v) for k, v in slots.items()
                     if isinstance(v, torch.Tensor) and k not in schedule_inputs}
        ids = {id(slots[k]): k for k in self.data}
        self.schedule = {k: copy.deepcopy(match_form(v, ids)) for k, v in slots.items() if k not in self.data}
        self.keys = set(slots)
        self.aliasing = _aliasing([slots[k] for k in self.data])

    def check(self, slots: dict[str, Any]) -> str | None:
        """None when ``slots`` (a call's BlockState) fits, else why not."""
        if set(slots) != self.keys:
            return f"inputs {sorted(set(slots) ^ self.keys)} present in only one of this call and the plan"
        for k, spec in self.data.items():
            value = slots[k]
            if not isinstance(value, torch.Tensor):
                return f"input {k!r} is a {type(value).__name__}, was a tensor"
            if tensor_spec(value) != spec:
                return f"input {k!r}: {_spec_text(tensor_spec(value))}, was {_spec_text(spec)}"
        ids = {id(slots[k]): k for k in self.data}
        for k, expected in self.schedule.items():
            if not values_equal(match_form(slots[k], ids), expected):
                return f"input {k!r}: {describe(slots[k])}, was {describe(expected)}"
        if _aliasing([slots[k] for k in self.data]) != self.aliasing:
            return "other data inputs are one tensor (or share storage) than when traced"
        return None


def _spec_text(spec: tuple) -> str:
    shape, stride, dtype, device = spec
    return f"shape {shape} strides {stride} {str(dtype).replace('torch.', '')} on {device}"


# -- Python state -------------------------------------------------------------------------------------------------------
def tensor_rules(reads: list[Read], used: set[int], eager: set[int], const: set[int],
                 present_at_end: set[int]) -> dict[int, str]:
    """How each tensor a read holds is compared (``components.tensor_matches``): by identity when the compiled
    code reads that very tensor (a graph constant: a parameter), by value when the traced call evaluated it
    eagerly and baked the result (a scheduler's sigmas), both when both; a tensor no op used is compared by its
    spec, unless it is still held when the call ends (then by identity: its place is replayed)."""
    rules: dict[int, str] = {}
    for snap in chain.from_iterable(_tensor_snaps(r.value) for r in reads):
        tid = id(snap.tensor)
        if tid in eager:
            rules[tid] = "identity+value" if tid in const else "value"
        elif tid in const or tid in used:
            rules[tid] = "identity"
        else:
            rules[tid] = "identity" if tid in present_at_end else "spec"
    return rules


def _tensor_snaps(snap: Any):
    if isinstance(snap, TensorSnap):
        yield snap
    elif isinstance(snap, ContainerSnap) and not isinstance(snap.items, frozenset):
        for item in (snap.items.values() if isinstance(snap.items, dict) else snap.items):
            yield from _tensor_snaps(item)


def _is_leaf(snap: Any, rules: dict[int, str]) -> bool:
    """Compared by identity alone: objects, absent markers, tensors read by identity."""
    if isinstance(snap, TensorSnap):
        return rules.get(id(snap.tensor)) == "identity"
    return not isinstance(snap, ContainerSnap) and type(snap) not in _ATOM_TYPES and not isinstance(snap, torch.Size)


def _leaf(snap: Any) -> Any:
    return snap.tensor if isinstance(snap, TensorSnap) else snap


def _plain(snap: Any) -> Any:
    """An atom-only snapshot as the plain value it was (raises TypeError when it holds anything else)."""
    if type(snap) in _ATOM_TYPES or isinstance(snap, torch.Size):
        return snap
    if isinstance(snap, ContainerSnap):
        if isinstance(snap.items, frozenset):
            if all(type(v) in _ATOM_TYPES for v in snap.items):
                return snap.type(snap.items)
            raise TypeError
        if isinstance(snap.items, dict):
            return {k: _plain(v) for k, v in snap.items.items()}
        items = [_plain(v) for v in snap.items]
        return tuple(items) if issubclass(snap.type, tuple) else items
    raise TypeError


class _Group:
    """Reads of one kind whose holders are mappings of one type, checked with a few C-level passes."""

    def __init__(self, getter: Callable) -> None:
        self.getter = getter
        self.holders: list = []
        self.keys: list = []
        self.reads: list[Read] = []

    def add(self, read: Read) -> None:
        self.holders.append(read.holder)
        self.keys.append(read.key)
        self.reads.append(read)

    def current(self) -> list:
        return list(map(self.getter, self.holders, self.keys, repeat(ABSENT, len(self.keys))))


class StateGuard:
    """Every read of a recording holds its traced value: checked with C-level passes, explained on a miss."""

    def __init__(self, reads: list[Read], rules: dict[int, str]) -> None:
        self.rules = rules
        self.reads = reads
        self.identity: dict[type, _Group] = {}   # by holder type: current value is the expected object
        self.atoms: dict[type, _Group] = {}      # type and == of an atom (a float, a flag, None)
        self.flat_dicts: dict[type, _Group] = {}   # dicts of objects: same keys, same objects (_parameters)
        self.flat_lists: dict[type, _Group] = {}   # lists and tuples of objects
        self.plain: dict[type, _Group] = {}        # containers of atoms only: == of the plain value
        self.slow: list[Read] = []                 # the rest: compared one by one
        self.expected: dict[int, Any] = {}         # per group, the expected values (flattened where flat)
        owners = {}
        for r in reads:
            if r.owner_key is not None:  # a module's container: it must still be that module's
                owners[(id(r.obj), r.owner_key)] = Read(r.obj, _getdict(r.obj), r.owner_key, r.holder, r.path)
            self._add(r)
        for r in owners.values():
            self._add(r)
        objs = list({id(r.obj): r.obj for r in reads if r.holder is not None and r.owner_key is None
                     and not isinstance(r.obj, type)}.values())
        self.objects = objs                       # their __dict__ and class are what the reads assume
        self.object_dicts = [_getdict(o) for o in objs]
        self.object_types = [type(o) for o in objs]
        self._freeze()

    def _add(self, r: Read) -> None:
        getter = _getter(r.holder)
        if getter is None:
            self.slow.append(r)
            return
        kind = type(r.holder)
        snap = r.value
        if _is_leaf(snap, self.rules):
            self.identity.setdefault(kind, _Group(getter)).add(r)
        elif type(snap) in _ATOM_TYPES:
            self.atoms.setdefault(kind, _Group(getter)).add(r)
        elif (isinstance(snap, ContainerSnap) and isinstance(snap.items, dict)
              and all(_is_leaf(v, self.rules) for v in snap.items.values())):
            self.flat_dicts.setdefault(kind, _Group(getter)).add(r)
        elif (isinstance(snap, ContainerSnap) and isinstance(snap.items, list)
              and all(_is_leaf(v, self.rules) for v in snap.items)):
            self.flat_lists.setdefault(kind, _Group(getter)).add(r)
        else:
            try:
                _plain(snap)
            except TypeError:
                self.slow.append(r)
                return
            self.plain.setdefault(kind, _Group(getter)).add(r)

    def _freeze(self) -> None:
        self._checks: list[Callable[[], bool]] = []
        for g in self.identity.values():
            expected = [_leaf(r.value) for r in g.reads]
            self._checks.append(lambda g=g, e=expected: all(map(_is, g.current(), e)))
        for g in self.atoms.values():
            values = [r.value for r in g.reads]
            types = list(map(type, values))
            self._checks.append(lambda g=g, v=values, t=types: _atoms_match(g.current(), v, t))
        for g in self.flat_dicts.values():
            types = [r.value.type for r in g.reads]
            keys = list(chain.from_iterable(r.value.items for r in g.reads))
            values = [_leaf(s) for s in chain.from_iterable(r.value.items.values() for r in g.reads)]
            self._checks.append(lambda g=g, t=types, k=keys, v=values: _dicts_match(g.current(), t, k, v))
        for g in self.flat_lists.values():
            types = [r.value.type for r in g.reads]
            lens = [len(r.value.items) for r in g.reads]
            values = [_leaf(s) for s in chain.from_iterable(r.value.items for r in g.reads)]
            self._checks.append(lambda g=g, t=types, n=lens, v=values: _lists_match(g.current(), t, n, v))
        for g in self.plain.values():
            types = [r.value.type if isinstance(r.value, ContainerSnap) else type(r.value) for r in g.reads]
            values = [_plain(r.value) for r in g.reads]
            self._checks.append(lambda g=g, t=types, v=values: _plain_match(g.current(), t, v))
        self._checks.append(lambda: all(map(_is, map(_getdict, self.objects), self.object_dicts)))
        self._checks.append(lambda: list(map(type, self.objects)) == self.object_types)
        self._checks.append(lambda: all(same(r.current(), r.value, self.rules) for r in self.slow))

    def __len__(self) -> int:
        return len(self.reads)

    def holds(self) -> bool:
        """Whether every read still has its traced value (the fast path of every call)."""
        return all(check() for check in self._checks)

    def check(self) -> str | None:
        """None when every read holds, else the first read that does not, with its value now and then."""
        if self.holds():
            return None
        return self.explain_miss()

    def explain_miss(self) -> str:
        for o, d, t in zip(self.objects, self.object_dicts, self.object_types):
            if type(o) is not t:
                return f"an object's class changed: {type(o).__qualname__}, was {t.__qualname__}"
            if _getdict(o) is not d:
                return f"an object's __dict__ was replaced ({type(o).__qualname__})"
        for r in self.reads:
            now = r.current()
            if not same(now, r.value, self.rules):
                where, now, then = difference(now, r.value, self.rules)
                path = r.path + where
                if then is ABSENT:
                    return f"{path} is set ({describe(now)}); it was absent when traced"
                if now is ABSENT:
                    return f"{path} is absent; it was {describe(then)} when traced"
                if isinstance(then, TensorSnap):
                    rule = self.rules.get(id(then.tensor), "value")
                    what = "another tensor object" if rule == "identity" or now is not then.tensor else "changed values"
                    return f"{path} holds {what} ({describe(now)}); the compiled code {_RULE_TEXT[rule]}"
                if _is_leaf(then, self.rules):
                    return f"{path} is another object: {describe(now)}, was {describe(then)}"
                return f"{path} is {describe(now)}, was {describe(then)}"
        return "the components' Python state differs from the traced call's"


_RULE_TEXT = {"identity": "reads the traced tensor itself", "value": "baked values computed from it",
              "identity+value": "reads it and baked values computed from it", "spec": "depends on its shape only"}


def _getter(holder: Any) -> Callable | None:
    if isinstance(holder, dict):
        return dict.get
    if isinstance(holder, type(type.__dict__)):  # a class's mappingproxy
        return type(holder).get
    return None


def _atoms_match(current: list, values: list, types: list) -> bool:
    if list(map(type, current)) != types:
        return False
    if current == values:
        return True
    # NaN is not == NaN: compare those one by one
    return all(c == v or (c != c and v != v) for c, v in zip(current, values))


def _dicts_match(current: list, types: list, keys: list, values: list) -> bool:
    if list(map(type, current)) != types:
        return False
    return (list(chain.from_iterable(current)) == keys
            and all(map(_is, chain.from_iterable(map(dict.values, current)), values)))


def _lists_match(current: list, types: list, lens: list, values: list) -> bool:
    if list(map(type, current)) != types or list(map(len, current)) != lens:
        return False
    return all(map(_is, chain.from_iterable(current), values))


def _plain_match(current: list, types: list, values: list) -> bool:
    # == of lists, tuples and dicts compares item by item in C (a dict subclass equals a plain dict)
    return list(map(type, current)) == types and current == values


def plan_guard(trace) -> PlanGuard:
    """The guard of a plan made from ``trace`` (a ``trace.LoopTrace``)."""
    python, usage = trace.python, trace.usage
    reads = list(python.reads.values())
    rules = tensor_rules(reads, usage.used, usage.eager, usage.const, python.present)
    return PlanGuard(trace.components, InputGuard(trace.initial_slots, trace.schedule_inputs), StateGuard(reads, rules))


def stable_guard(trace, guard: PlanGuard) -> StateGuard:
    """The reads a traced call never wrote nor changed: they hold at every cut of the loop (eager segments)."""
    return StateGuard(trace.python.stable, guard.state.rules)


# -- a plan's guards, and the plans ----------------------------------------------------------------------------------------
class PlanGuard:
    """Everything a plan is valid for: the components object, the BlockState inputs and the Python state its
    traced call read."""

    def __init__(self, components: Any, inputs: InputGuard, state: StateGuard) -> None:
        self.components, self.inputs, self.state = components, inputs, state

    def check(self, components: Any, slots: dict[str, Any]) -> str | None:
        """None when a call with ``components`` and BlockState ``slots`` (and the Python state as it is now)
        may reuse the plan, else why not."""
        if components is not self.components:
            return "another components object than the traced call's"
        return self.inputs.check(slots) or self.state.check()

    def describe(self) -> str:
        s = self.state
        groups = {"identity": s.identity, "atoms": s.atoms, "dicts": s.flat_dicts, "lists": s.flat_lists,
                  "plain": s.plain}
        counts = ", ".join(f"{sum(len(g.reads) for g in v.values())} {k}" for k, v in groups.items())
        return (f"{len(self.inputs.keys)} inputs ({len(self.inputs.data)} data tensors by spec and sharing); "
                f"{len(s)} attribute reads of {len(s.objects)} objects ({counts}, {len(s.slow)} one by one)")


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

    def find(self, components: Any, slots: dict[str, Any]):
        misses = []
        for plan in reversed(self.plans):  # the newest plan is the one a settled caller matches
            reason = plan.guard.check(components, slots)
            if reason is None:
                self.plans.remove(plan)  # most recently used last: a repeat call matches it first,
                self.plans.append(plan)  # so the lookup's cost does not depend on older plans
                self.misses = []
                return plan
            misses.append(reason)
        self.misses = misses
        if self.plans and self.static_shapes:
            raise ValueError(
                f"{self.owner} (compiled with static_shapes=True): this call does not fit the compiled plan: "
                f"{misses[0]}. Reset the scheduler (set_timesteps) and pass the inputs it was compiled for, or use "
                f"static_shapes=False."
            )
        return None

    def add(self, plan) -> None:
        self.plans.append(plan)
        del self.plans[:-self.bound]  # the least recently used beyond the bound
