"""Which Python attributes of a component does a loop read before writing, and which does it write?

A compiled plan replays what the traced run did to the components' Python state (a scheduler's step index,
a guider's step). Only the attributes the loop *reads before it writes them* decide whether a later call
may reuse the plan: a guider's ``_step`` left over from the previous call is overwritten at step 0 before
anything reads it, so it must not force a new plan. And only the attributes the loop *writes* (or changes in
place) are set after a compiled call: the others stay as the caller left them.

``watch_attributes`` finds both by giving each watched object, for the duration of the traced run, a
subclass of its own class that logs instance-attribute reads and writes. Objects whose class cannot be
swapped (``__slots__``, extension types) are reported as unwatched: callers treat all their attributes as
both read and written, which is always safe.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

from .state import values_equal


@dataclass
class AttributeLog:
    read_first: set[str] = field(default_factory=set)  # read while still holding the value from before the loop
    written: set[str] = field(default_factory=set)
    watched: bool = True


def _watching(cls: type, log: AttributeLog) -> type:
    def __getattribute__(self, name):
        if name not in log.written and name in object.__getattribute__(self, "__dict__"):
            log.read_first.add(name)
        return super(watched, self).__getattribute__(name)

    def __setattr__(self, name, value):
        log.written.add(name)
        super(watched, self).__setattr__(name, value)

    def __delattr__(self, name):
        log.written.add(name)
        super(watched, self).__delattr__(name)

    watched = type(cls.__name__, (cls,), {"__getattribute__": __getattribute__, "__setattr__": __setattr__,
                                          "__delattr__": __delattr__, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__})
    return watched


@contextlib.contextmanager
def watch_attributes(objects: dict[str, Any]) -> Iterator[dict[str, AttributeLog]]:
    """Log, per named object, the instance attributes read before written and those written, inside the block."""
    logs: dict[str, AttributeLog] = {}
    swapped: list[tuple[Any, type]] = []
    try:
        for name, obj in objects.items():
            log = logs[name] = AttributeLog()
            cls = type(obj)
            try:
                obj.__class__ = _watching(cls, log)
                swapped.append((obj, cls))
            except TypeError:  # __slots__, extension types, classes that refuse subclassing
                log.watched = False
        yield logs
    finally:
        for obj, cls in swapped:
            object.__setattr__(obj, "__class__", cls)  # not through the logging __setattr__


def live_in(snapshot: dict[str, dict[str, Any]], logs: dict[str, AttributeLog]) -> dict[str, dict[str, Any]]:
    """The part of a start-of-loop snapshot the loop depends on: attributes read before written."""
    return {name: {k: v for k, v in attrs.items()
                   if name not in logs or not logs[name].watched or k in logs[name].read_first}
            for name, attrs in snapshot.items()}


def live_out(snapshot: dict[str, dict[str, Any]], logs: dict[str, AttributeLog],
             start: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The part of an end-of-loop snapshot the loop produced: attributes it wrote, and those whose value
    differs from the ``start`` snapshot (a list changed in place, like UniPC's ``timestep_list[i] = ...``)."""
    missing = object()
    return {name: {k: v for k, v in attrs.items()
                   if name not in logs or not logs[name].watched or k in logs[name].written
                   or not values_equal(start.get(name, {}).get(k, missing), v)}
            for name, attrs in snapshot.items()}
