"""The Python-state guard: every attribute read of a traced call (``attribute_log.AttributeLog``) still holds its traced
value, checked on every call with a few C-level passes, and explained on a miss.

Guards run on every call, so the check is vectorised: the thousands of reads of a UNet's modules are compared a
few C-level passes at a time (``map`` over the holding dicts), and only a mismatch walks entries one by one to say
which value changed. How each tensor read is compared is set by ``tensor_rules``.
"""

from __future__ import annotations

import operator
from itertools import chain, repeat
from typing import Any, Callable

import torch

from ..pystate.attribute_log import Read
from ..pystate.snapshots import (
    ABSENT,
    ATOMS,
    ContainerSnap,
    TensorRule,
    TensorSnap,
    describe,
    difference,
    object_state,
    same,
    tensor_snaps,
)
from ..trace.floats import Source

__all__ = ["StateGuard", "tensor_rules"]

_ATOM_TYPES = set(ATOMS)
_BY_IDENTITY = (TensorRule.IDENTITY, TensorRule.KEPT)  # the rules that compare a tensor by identity alone

_is = operator.is_

_getdict = operator.attrgetter("__dict__")


# -- Python state ------------------------------------------------------------------------------------------------------
def tensor_rules(reads: list[Read], used: set[int], eager: set[int], const: set[int],
                 present_at_end: set[int]) -> dict[int, TensorRule]:
    """How each tensor a read holds is compared (``components.tensor_matches``): by identity when the compiled
    code reads that very tensor (a graph constant: a parameter), by value when the traced call evaluated it
    eagerly and baked the result (a scheduler's sigmas), both when both; a tensor no op used is compared by its
    spec, unless it is still held when the call ends (then by identity: its place is replayed)."""
    rules: dict[int, TensorRule] = {}
    for snap in chain.from_iterable(tensor_snaps(r.value) for r in reads):
        tid = id(snap.tensor)
        if tid in eager:
            rules[tid] = TensorRule.IDENTITY_VALUE if tid in const else TensorRule.VALUE
        elif tid in const or tid in used:
            rules[tid] = TensorRule.IDENTITY
        else:
            rules[tid] = TensorRule.KEPT if tid in present_at_end else TensorRule.SPEC
    return rules


def _is_leaf(snap: Any, rules: dict[int, TensorRule]) -> bool:
    """Compared by identity alone: objects, absent markers, tensors read by identity."""
    if isinstance(snap, TensorSnap):
        return rules.get(id(snap.tensor)) in _BY_IDENTITY
    return not isinstance(snap, ContainerSnap) and type(snap) not in _ATOM_TYPES and not isinstance(snap, torch.Size)


def _leaf(snap: Any) -> Any:
    return snap.tensor if isinstance(snap, TensorSnap) else snap


class _Number:
    """A number as read, for ``==`` in C: equal only to a number of its own type (Python's 1, 1.0 and True are
    equal, but an int and a float operand give tensors of other dtypes)."""

    __slots__ = ("value",)
    __hash__ = None

    def __init__(self, value: bool | int | float | complex) -> None:
        self.value = value

    def __eq__(self, other: Any) -> bool:
        return type(other) is type(self.value) and other == self.value

    def __repr__(self) -> str:
        return repr(self.value)


def _plain(snap: Any) -> Any:
    """A snapshot without tensors as the plain value it was: numbers as ``_Number``, other atoms and objects as
    they are, containers rebuilt as dicts, lists, tuples and frozensets (raises TypeError when it holds a
    tensor)."""
    if type(snap) in (bool, int, float, complex):
        return _Number(snap)
    if isinstance(snap, TensorSnap):
        raise TypeError
    if isinstance(snap, ContainerSnap):
        if isinstance(snap.items, frozenset):
            return snap.items
        if isinstance(snap.items, dict):
            return {k: _plain(v) for k, v in snap.items.items()}
        items = [_plain(v) for v in snap.items]
        return tuple(items) if issubclass(snap.type, tuple) else items
    return snap


class _Group:
    """Reads whose holders are mappings of one type, fetched with one C-level pass (``map`` of the holder type's
    ``get``), then compared by one rule."""

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


_call = operator.itemgetter.__call__


def read_holds(read: Read, rules: dict[int, TensorRule] | None = None) -> bool:
    """Whether one read still holds (its value now is its snapshot, or for a read of an attribute the traced call
    made, ``Read.created``: as traced, or that very object (a container in the state the call left it in))."""
    now = read.current()
    if read.created is not None and now is read.created[0]:
        made, state = read.created
        return state is None or object_state(made) == state
    return same(now, read.value, rules)


class _PerHolder:
    """The reads of atoms, objects and tensor-free containers, one ``itemgetter`` per holder: a module's dozen
    reads (its hook dicts, ``_compiled_call_impl``, ``training``, ``eps``) are fetched in one C call and compared
    with ``==`` in C (items by identity first; an object without ``__eq__`` by identity; a container by content).
    Attributes read absent are checked with one ``__contains__`` pass."""

    def __init__(self) -> None:
        self.reads: dict[int, list[Read]] = {}
        self.absent: list[Read] = []
        self.created: list[Read] = []  # absent, or the object the traced call made there, unchanged

    def add(self, read: Read) -> None:
        if read.created is not None:
            self.created.append(read)
        elif read.value is ABSENT and isinstance(read.holder, dict):
            self.absent.append(read)
        else:
            self.reads.setdefault(id(read.holder), []).append(read)

    def __len__(self) -> int:
        return sum(map(len, self.reads.values())) + len(self.absent) + len(self.created)

    def freeze(self) -> None:
        self.holders = [reads[0].holder for reads in self.reads.values()]
        self.getters = [operator.itemgetter(*[r.key for r in reads]) for reads in self.reads.values()]
        self.expected = [tuple(_plain(r.value) for r in reads) if len(reads) > 1 else _plain(reads[0].value)
                         for reads in self.reads.values()]
        self.absent_holders = [r.holder for r in self.absent]
        self.absent_keys = [r.key for r in self.absent]
        self.flat = [r for reads in self.reads.values() for r in reads]

    def holds(self, rules: dict[int, TensorRule]) -> bool:
        if any(map(dict.__contains__, self.absent_holders, self.absent_keys)):
            return False
        if self.created and not all(map(read_holds, self.created)):
            return False
        try:
            if list(map(_call, self.getters, self.holders)) == self.expected:
                return True
        except Exception:  # a key gone (KeyError), or an item whose == cannot say: the exact check decides
            pass
        return all(same(r.current(), r.value, rules) for r in self.flat)


_HOOK_DICTS = {"_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"}


def _hook_counter() -> int:
    """torch's count of hook handles ever made: every hook registered through torch's API makes one."""
    from torch.utils.hooks import RemovableHandle

    return RemovableHandle.next_id


class _EmptyHookDicts:
    """A module's hook dicts that were empty when traced (every module call reads four of them). Fetching
    thousands of them on every call costs more than everything else (one cache miss each, after a compiled call
    has evicted them), so they are checked only when torch has made a hook handle since they were last seen
    empty: registering a hook through torch's API (``register_forward_hook`` and friends) always makes one."""

    def __init__(self) -> None:
        self.reads: list[Read] = []
        self.seen = -1

    def add(self, read: Read) -> None:
        self.reads.append(read)

    def __len__(self) -> int:
        return len(self.reads)

    def freeze(self) -> None:
        self.holds()  # made right after the traced call: seen empty now, the counter is today's

    def holds(self) -> bool:
        counter = _hook_counter()
        if counter == self.seen:
            return True
        if all(type(r.holder.get(r.key)) is r.value.type and not r.holder.get(r.key) for r in self.reads):
            self.seen = counter
            return True
        return False


class StateGuard:
    """Every read of a recording holds its traced value: checked with C-level passes, explained on a miss.

    Groups, by what a read holds:
        hooks       a module's hook dicts empty when traced: by torch's hook-handle counter (``_EmptyHookDicts``)
        per holder  atoms, objects and containers without tensors (a module's flags and sizes, its
                    ``_modules``; a scheduler's counters): one itemgetter call per holder and ``==`` in C
        identity    tensors the compiled code reads (``_parameters`` entries): the same objects (``is``)
        tensors     containers of such tensors: same keys, same objects
        slow        the rest (tensors compared by value, containers of them): one by one
    Numbers in the first group compare by type too (``_Number``): 1 and 1.0 are ``==`` in Python.
    """

    def __init__(self, reads: list[Read], rules: dict[int, TensorRule], floats: list[Source] = ()) -> None:
        self.rules = rules
        self.reads = reads
        self.floats = list(floats)  # floats the plan takes as inputs (trace/floats.py): by type and outcomes, not value
        self.per_holder = _PerHolder()
        self.hooks = _EmptyHookDicts()
        self.identity: dict[type, _Group] = {}
        self.tensor_dicts: dict[type, _Group] = {}
        self.tensor_lists: dict[type, _Group] = {}
        self.slow: list[Read] = []
        owners = {}
        for r in reads:
            if r.owner_key is not None:  # a module's container: it must still be that module's
                owners[(id(r.obj), r.owner_key)] = Read(r.obj, _getdict(r.obj), r.owner_key, r.holder, r.path)
            self._add(r)
        for r in owners.values():
            self._add(r)
        objs = list({id(r.obj): r.obj for r in [*reads, *(s.read for s in self.floats)]
                     if r.holder is not None and r.owner_key is None and not isinstance(r.obj, type)}.values())
        self.objects = objs                       # their class and __dict__ are what the reads assume
        self.classes = [type(o) for o in objs]
        self.dicts = [_getdict(o) for o in objs]  # held: their ids stay theirs
        self._freeze()

    def _add(self, r: Read) -> None:
        getter = _getter(r.holder)
        snap = r.value
        if getter is None:
            self.slow.append(r)
        elif (r.key in _HOOK_DICTS and isinstance(r.obj, torch.nn.Module) and isinstance(snap, ContainerSnap)
              and not snap.items and isinstance(r.holder, dict)):
            self.hooks.add(r)
        elif isinstance(snap, TensorSnap):
            if _is_leaf(snap, self.rules):
                self.identity.setdefault(type(r.holder), _Group(getter)).add(r)
            else:
                self.slow.append(r)
        elif isinstance(snap, ContainerSnap) and not isinstance(snap.items, frozenset) and any(
                isinstance(v, TensorSnap) for v in _items(snap)):
            if all(isinstance(v, TensorSnap) and _is_leaf(v, self.rules) for v in _items(snap)):
                groups = self.tensor_dicts if isinstance(snap.items, dict) else self.tensor_lists
                groups.setdefault(type(r.holder), _Group(getter)).add(r)
            else:
                self.slow.append(r)
        else:
            try:
                _plain(snap)
            except TypeError:  # a tensor deeper inside
                self.slow.append(r)
                return
            self.per_holder.add(r)

    def _freeze(self) -> None:
        self.per_holder.freeze()
        self.hooks.freeze()
        self._checks: list[Callable[[], bool]] = [self.hooks.holds, lambda: self.per_holder.holds(self.rules)]
        for g in self.identity.values():
            expected = [_leaf(r.value) for r in g.reads]
            self._checks.append(lambda g=g, e=expected: all(map(_is, g.current(), e)))
        for g in self.tensor_dicts.values():
            types = [r.value.type for r in g.reads]
            keys = list(chain.from_iterable(r.value.items for r in g.reads))
            values = [_leaf(s) for s in chain.from_iterable(r.value.items.values() for r in g.reads)]
            self._checks.append(lambda g=g, t=types, k=keys, v=values: _dicts_match(g.current(), t, k, v))
        for g in self.tensor_lists.values():
            types = [r.value.type for r in g.reads]
            lens = [len(r.value.items) for r in g.reads]
            values = [_leaf(s) for s in chain.from_iterable(r.value.items for r in g.reads)]
            self._checks.append(lambda g=g, t=types, n=lens, v=values: _lists_match(g.current(), t, n, v))
        # each object's class and __dict__ are the very ones the reads were made on (compared by identity: a
        # replaced __dict__ holding tensors cannot be compared by content)
        self._checks.append(lambda: all(map(_is, map(type, self.objects), self.classes))
                            and all(map(_is, map(_getdict, self.objects), self.dicts)))
        self._checks.append(lambda: all(same(r.current(), r.value, self.rules) for r in self.slow))
        if self.floats:
            self._checks.append(lambda: all(s.fits(s.read.current()) for s in self.floats))

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
        for o, t, d in zip(self.objects, self.classes, self.dicts):
            if type(o) is not t:
                return f"an object's class changed: {type(o).__qualname__}, was {t.__qualname__}"
            if _getdict(o) is not d:
                return f"an object's __dict__ was replaced ({type(o).__qualname__})"
        for s in self.floats:
            if not s.fits(s.read.current()):
                return s.misfit(s.read.current())
        for r in self.reads:
            now = r.current()
            if r.created is not None and now is r.created[0] and not read_holds(r):
                return f"{r.path} holds the object the traced call made there, changed since"
            if not read_holds(r, self.rules):
                where, now, then = difference(now, r.value, self.rules)
                path = r.path + where
                if then is ABSENT:
                    return f"{path} is set ({describe(now)}); it was absent when traced"
                if now is ABSENT:
                    return f"{path} is absent; it was {describe(then)} when traced"
                if isinstance(then, TensorSnap):
                    rule = self.rules.get(id(then.tensor), TensorRule.VALUE)
                    what = ("another tensor object" if rule in _BY_IDENTITY or now is not then.tensor
                            else "changed values")
                    return f"{path} holds {what} ({describe(now)}); the compiled code {_RULE_TEXT[rule]}"
                if _is_leaf(then, self.rules):
                    return f"{path} is another object: {describe(now)}, was {describe(then)}"
                return f"{path} is {describe(now)}, was {describe(then)}"
        return "the components' Python state differs from the traced call's"


_RULE_TEXT = {TensorRule.IDENTITY: "reads the traced tensor itself", TensorRule.VALUE: "baked values computed from it",
              TensorRule.IDENTITY_VALUE: "reads it and baked values computed from it",
              TensorRule.SPEC: "depends on its shape only",
              TensorRule.KEPT: "leaves the traced tensor there after a call (the call never used it but kept it in "
                               "place)"}


def _getter(holder: Any) -> Callable | None:
    if isinstance(holder, dict):
        return dict.get
    if isinstance(holder, type(type.__dict__)):  # a class's mappingproxy
        return type(holder).get
    return None


def _items(snap: ContainerSnap) -> list:
    return list(snap.items.values()) if isinstance(snap.items, dict) else list(snap.items)


def _dicts_match(current: list, types: list, keys: list, values: list) -> bool:
    if list(map(type, current)) != types:
        return False
    return (list(chain.from_iterable(current)) == keys
            and all(map(_is, chain.from_iterable(map(dict.values, current)), values)))


def _lists_match(current: list, types: list, lens: list, values: list) -> bool:
    if list(map(type, current)) != types or list(map(len, current)) != lens:
        return False
    return all(map(_is, chain.from_iterable(current), values))
