"""The logging hooks ``attribute_log.record`` puts on the classes of the objects a traced call reaches (and on
``torch.nn.Module``, once), for the duration of the trace: ``__getattribute__``, ``__getattr__``, ``__setattr__``
and ``__delattr__`` that report to the active ``Recording``, only on the tracing thread and only for watched
objects. ``Patcher`` puts them on, once per class, and takes them off again."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

import torch

from .snapshots import ABSENT, HEAPTYPE

if TYPE_CHECKING:
    from .attribute_log import Recording

__all__ = ["Patcher", "active"]


_HOOK = "_loopgraph_hook"

# -- the hooks ------------------------------------------------------------------------------------------------------
active: Recording | None = None  # set by attribute_log.record

_get_ident = threading.get_ident


def _recording() -> Recording | None:
    rec = active
    if rec is None or rec.busy or rec.thread != _get_ident():
        return None
    return rec


def _getattribute_hook(original):
    def __getattribute__(self, name):
        rec = _recording()
        if rec is None or id(self) not in rec.objects:
            return original(self, name)
        if (id(self), name) in rec.handled:
            value = original(self, name)
        else:
            try:
                value = original(self, name)
            except AttributeError:
                _logged(rec, rec.on_read, self, name, ABSENT)
                raise
            _logged(rec, rec.on_read, self, name, value)
        if type(value) is float and rec.lifts is not None:  # a float the call may use as an input (trace/floats.py)
            return rec.lifts.attribute(self, name, value)
        return value

    setattr(__getattribute__, _HOOK, True)
    return __getattribute__


def _getattr_hook(original):
    def __getattr__(self, name):
        rec = _recording()
        if rec is None or id(self) not in rec.objects:
            return original(self, name)
        handled = (id(self), name, "resolved") in rec.handled
        rec.busy = True  # what __getattr__ itself reads (a module's __dict__) is not the user's read, logged or not
        value = ABSENT
        try:
            value = original(self, name)
        finally:
            rec.busy = False
            if not handled:
                _logged(rec, rec.on_resolved, self, name, value)
        return value

    setattr(__getattr__, _HOOK, True)
    return __getattr__


def _write_hook(original):
    """``__setattr__`` (self, name, value) and ``__delattr__`` (self, name): the write is logged after it is done."""
    def write(self, name, *value):
        rec = active
        if rec is None or rec.thread != _get_ident():
            return original(self, name, *value)
        busy, rec.busy = rec.busy, True  # what the write itself reads (a module's __dict__) is not the user's read
        try:
            original(self, name, *value)
        finally:
            rec.busy = busy
        rec.on_write(self, name)

    setattr(write, _HOOK, True)
    return write


def _logged(rec: Recording, log, obj, name, value) -> None:
    """Run a logging callback with the hooks off and torch functions not recorded (snapshots clone tensors)."""
    rec.busy = True
    try:
        with torch._C.DisableTorchFunction():
            log(obj, name, value)
    finally:
        rec.busy = False


_HOOKS = (("__getattribute__", _getattribute_hook), ("__getattr__", _getattr_hook),
          ("__setattr__", _write_hook), ("__delattr__", _write_hook))


class Patcher:
    """Puts the logging hooks on classes, once each, and takes them off again."""

    def __init__(self) -> None:
        self.done: dict[type, bool] = {}
        self.undo: list[tuple[type, str, bool, Any]] = []

    def ensure(self, cls: type) -> bool:
        """Hook ``cls`` (if no base already hooks it); False when its class cannot take hooks."""
        known = self.done.get(cls)
        if known is not None:
            return known
        ok = bool(cls.__flags__ & HEAPTYPE) and cls is not object
        if ok:
            for attr, make in _HOOKS:
                current = getattr(cls, attr, None)
                if current is None or getattr(current, _HOOK, False):
                    continue  # no such method (__getattr__), or inherited from a hooked base
                had = attr in cls.__dict__
                try:
                    setattr(cls, attr, make(current))
                except (TypeError, AttributeError):
                    ok = False
                    break
                self.undo.append((cls, attr, had, current if had else None))
        self.done[cls] = ok
        return ok

    def restore(self) -> None:
        for cls, attr, had, original in reversed(self.undo):
            if had:
                setattr(cls, attr, original)
            else:
                delattr(cls, attr)
        self.undo.clear()
