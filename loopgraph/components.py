"""The Python state a traced call reaches: what it read, what it wrote, and how compiled calls put it back.

A compiled plan bakes whatever Python the traced call read: a guidance scale, a scheduler's step index, a
LoRA's scaling dict, which model a block called and its parameters, an attribute it found absent, a block's
own attribute. ``record`` watches every attribute read and write of the objects the call reaches, while the
traced call runs, without changing any object's ``type()``: for the duration of the trace the *classes* of
those objects get logging ``__getattribute__``, ``__getattr__``, ``__setattr__`` and ``__delattr__``
(``torch.nn.Module``'s once, for every module), under a process-wide lock, and get their own back afterwards.
The hooks log only on the tracing thread and only for watched objects; other threads see the original
behaviour.

Watched objects are the call's roots (the components, the blocks, the wrapper) and every object the call
reaches from them by reading an attribute (or an item of a list, tuple or dict so read). Objects created during
the call are not watched: their attributes are written before they are read. The ``Recording`` says:

    reads    every attribute read before the call wrote it, with the value it had then (a plan's guards)
    writes   every attribute the call wrote, and the blocks that wrote it (replayed after a compiled call)

Objects whose class cannot take the hooks (C types such as ``types.SimpleNamespace``) are watched whole: their
``vars()`` are one read, and one write when they differ at the end.

Module-level globals are reads too, as they are when the call ends: every global that the functions and methods
of a user module load (their bytecode), for the modules the watched objects' classes come from and the user
modules of the functions and classes those globals hold, transitively (not the standard library's globals, nor
installed libraries'); and torch's global module hooks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import dis
import sys
import threading
import types
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from .snapshots import (ABSENT, ATOM_TYPES, MAX_DEPTH, OPAQUE_LEAVES, ContainerSnap, copy_value, same, snapshot,
                        walk_tensors)
from .state import _atoms_only

__all__ = ["Read", "Recording", "TRACE_LOCK", "Write", "component_objects", "component_tensors", "put", "record",
           "set_attribute", "value_of"]

# One trace at a time in a process: tracing patches classes (and the traced wrapper instance).
TRACE_LOCK = threading.RLock()
_MODULE_CONTAINERS = ("_parameters", "_buffers", "_modules")
_HOOK = "_loopgraph_hook"
_HEAPTYPE = 1 << 9

@dataclass
class Read:
    """One attribute read before the call wrote it: where the value lives and what it was."""

    obj: Any            # the object read from
    holder: Any         # the mapping the value lives in: obj.__dict__, a module's _parameters/_buffers/_modules, a
                        # class's __dict__; None: read with getattr (slotted objects, __getattr__ results, vars())
    key: str
    value: Any          # a snapshot (see ``snapshot``), ABSENT when the attribute was not there
    path: str           # for messages: "components.denoiser.blocks.0.scaling"
    owner_key: str | None = None  # a module container's name in obj.__dict__ ("_parameters"); else None

    def current(self) -> Any:
        """The value now, in the same place."""
        if self.holder is not None:
            return self.holder.get(self.key, ABSENT)
        if self.key == "__dict__":
            return dict(vars(self.obj))
        return getattr(self.obj, self.key, ABSENT)


@dataclass
class Write:
    """An attribute the call wrote (or deleted), and when: (step or None outside the loop, block or None)."""

    obj: Any
    name: str
    path: str
    events: list[tuple[int | None, str | None]] = field(default_factory=list)


class Recording:
    """What one traced call read and wrote of the Python state of the objects it reached (see the module
    docstring). ``step`` and ``block`` are set by the tracer, so writes know who made them."""

    def __init__(self) -> None:
        self.objects: dict[int, Any] = {}
        self.paths: dict[int, str] = {}
        self.reads: dict[tuple, Read] = {}
        self.writes: dict[tuple[int, str], Write] = {}
        self.opaque: dict[int, Any] = {}  # objects watched whole (their class takes no hooks)
        self.step: int | None = None
        self.block: str | None = None
        self.busy = False
        self.thread = threading.get_ident()
        self._written: set[tuple[int, str]] = set()
        self.handled: set[tuple] = set()  # (id, name) reads already logged or not to log: the hooks' fast exit
        self._patcher: _Patcher | None = None

    # -- what the hooks call -----------------------------------------------------------------------------------
    def watch(self, obj: Any, path: str) -> None:
        """Start watching ``obj`` (and, for objects watched whole, what their attributes hold)."""
        if obj is None or type(obj) in ATOM_TYPES or isinstance(obj, (torch.Tensor, *OPAQUE_LEAVES)):
            return
        if id(obj) in self.objects:
            return
        self.objects[id(obj)] = obj
        self.paths[id(obj)] = path
        if self._patcher is not None and self._patcher.ensure(type(obj)):
            return
        if hasattr(obj, "__dict__"):  # watched whole: all its attributes count as read
            self.opaque[id(obj)] = obj
            attrs = dict(vars(obj))
            self._add_read(Read(obj, None, "__dict__", snapshot(attrs), path), ("whole", id(obj)))
            self._adopt(attrs, path)

    def on_read(self, obj: Any, name: str, value: Any) -> None:
        """``obj.name`` was read through ``__getattribute__`` (``value`` is ABSENT when it raised)."""
        oid = id(obj)
        if oid not in self.objects:
            return
        self.handled.add((oid, name))
        if (oid, name) in self._written:
            return
        if name == "__dict__":  # vars(obj), obj.__dict__: every attribute is read
            key = ("whole", oid)
            if key not in self.reads:
                attrs = dict(object.__getattribute__(obj, "__dict__"))
                self._add_read(Read(obj, None, "__dict__", snapshot(attrs), self.paths[oid]), key)
                self._adopt(attrs, self.paths[oid])
            return
        try:
            attrs = object.__getattribute__(obj, "__dict__")
        except AttributeError:  # slotted: read again with getattr when checked
            attrs = None
        holder = attrs if attrs is not None else None
        key = (id(holder) if holder is not None else oid, name)
        if key in self.reads:
            return
        path = f"{self.paths[oid]}.{name}"
        here = attrs.get(name, ABSENT) if attrs is not None else value
        self._add_read(Read(obj, holder, name, snapshot(here), path), key)
        if name in _MODULE_CONTAINERS and isinstance(obj, torch.nn.Module) and isinstance(here, dict):
            for child_name, child in here.items():  # a module's children by their attribute paths
                self._adopt(child, f"{self.paths[oid]}.{child_name}")
            return
        if here is ABSENT and attrs is not None:
            found = _class_lookup(type(obj), name)
            if found is not None:
                cls, cls_value = found
                ckey = (id(cls), name)
                if ckey not in self.reads:
                    self._add_read(Read(cls, cls.__dict__, name, snapshot(cls_value),
                                        f"{cls.__qualname__}.{name}"), ckey)
        else:
            self._adopt(here, path)

    def on_resolved(self, obj: Any, name: str, value: Any) -> None:
        """``obj.__getattr__(name)`` gave ``value`` (ABSENT: raised): for a module, from its parameters, buffers or
        submodules."""
        oid = id(obj)
        if oid not in self.objects or (oid, name) in self._written:
            return
        self.handled.add((oid, name, "resolved"))
        path = f"{self.paths[oid]}.{name}"
        if isinstance(obj, torch.nn.Module):
            attrs = object.__getattribute__(obj, "__dict__")
            containers = [(c, attrs[c]) for c in _MODULE_CONTAINERS if attrs.get(c) is not None]
            found = [(c, holder) for c, holder in containers if name in holder]
            for owner, holder in found or containers:
                key = (id(holder), name)
                if key not in self.reads:
                    self._add_read(Read(obj, holder, name, snapshot(holder.get(name, ABSENT)), path, owner), key)
            if found:  # nn.Module keeps a name in one place: its absence from __dict__ adds nothing
                self.reads.pop((id(attrs), name), None)
        else:
            key = ("getattr", oid, name)
            if key not in self.reads:
                self._add_read(Read(obj, None, name, snapshot(value), path), key)
        if value is not ABSENT:
            self._adopt(value, path)

    def on_write(self, obj: Any, name: str) -> None:
        oid = id(obj)
        if oid not in self.objects:
            return
        self._written.add((oid, name))
        write = self.writes.get((oid, name))
        if write is None:
            write = self.writes[(oid, name)] = Write(obj, name, f"{self.paths[oid]}.{name}")
        write.events.append((self.step, self.block))

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Reads and writes inside are the tracer's own, not the call's: not logged."""
        busy, self.busy = self.busy, True
        try:
            yield
        finally:
            self.busy = busy

    def hide(self, obj: Any, *names: str) -> None:
        """Attributes that are not the call's (the tracer's own interceptors on the wrapper): never logged."""
        self._written.update((id(obj), name) for name in names)

    def _add_read(self, read: Read, key: tuple) -> None:
        self.reads[key] = read

    def _adopt(self, value: Any, path: str, depth: int = 0) -> None:
        """Watch the objects ``value`` holds (itself, or the items of a plain container)."""
        if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
            if depth < MAX_DEPTH and not _atoms_only(value):
                for k, item in enumerate(value):
                    self._adopt(item, f"{path}[{k}]", depth + 1)
        elif isinstance(value, dict):
            if depth < MAX_DEPTH:
                for k, item in value.items():
                    self._adopt(item, f"{path}[{k!r}]", depth + 1)
        if isinstance(value, (list, tuple, dict, set, frozenset)) and not type(value).__flags__ & _HEAPTYPE:
            return  # a container of the standard library (an OrderedDict of hooks): its items are what counts
        self.watch(value, path)

    def _read_globals(self) -> None:
        """Reads of the module globals the call's code can load (see the module docstring): every global that a
        function or method of a user module loads, for the modules the watched objects' classes come from and,
        transitively, the user modules of the functions and classes those globals hold; and torch's global module
        hooks."""
        modules = {m for obj in self.objects.values() for m in map(_user_module, type(obj).__mro__) if m}
        seen: set[str] = set()
        while modules:
            module = modules.pop()
            if module.__name__ in seen:
                continue
            seen.add(module.__name__)
            namespace = vars(module)
            for key in sorted(_module_global_names(module)):
                if key not in namespace or (id(namespace), key) in self.reads:
                    continue  # a builtin, or not defined (an error eager would give too)
                value = namespace[key]
                self._add_read(Read(module, namespace, key, snapshot(value), f"{module.__name__}.{key}"),
                               (id(namespace), key))
                found = _user_module(value) if isinstance(value, (type, types.FunctionType)) else None
                if found is not None and found.__name__ not in seen:
                    modules.add(found)
        hooks = sys.modules["torch.nn.modules.module"]
        for key in _TORCH_GLOBAL_HOOKS:  # a global hook registered later runs in eager
            if hasattr(hooks, key):
                self._add_read(Read(hooks, vars(hooks), key, snapshot(getattr(hooks, key)),
                                    f"torch.nn.modules.module.{key}"), (id(vars(hooks)), key))

    # -- during and after the call ------------------------------------------------------------------------------
    def state_now(self) -> dict[tuple[int, str], tuple[Any, str, Any]]:
        """(id(obj), name) -> (obj, name, a copy of its value now), for every attribute the call wrote so far
        and every attribute it read of an object that is not a module or a class (a container it may change in
        place): the Python state that eager segments compare and restore at a cut."""
        found = {}
        for (oid, name), write in self.writes.items():
            found[(oid, name)] = (write.obj, name, copy_value(value_of(write.obj, name)))
        for r in self.reads.values():
            if r.owner_key is None and not isinstance(r.obj, (type, torch.nn.Module)):
                key = (id(r.obj), r.key)
                if key not in found:
                    found[key] = (r.obj, r.key, copy_value(value_of(r.obj, r.key)))
        return found

    def finish(self) -> None:
        """At the end of the call: ``end``, each attribute the call wrote or changed in place, as it left it
        (obj, name, a copy), in the order first written; ``stable``, the reads it never wrote nor changed."""
        self._read_globals()
        changed = set()
        self.end: list[tuple[Any, str, Any]] = []
        originals = []  # the values themselves: which tensors stay where the call left them
        for (oid, name), write in self.writes.items():
            originals.append(value_of(write.obj, name))
            self.end.append((write.obj, name, copy_value(originals[-1])))
        for key, r in self.reads.items():
            if (id(r.obj), r.key) in self.writes or isinstance(r.obj, (type, types.ModuleType, dict)):
                continue
            if (r.key == "__dict__" or isinstance(r.value, ContainerSnap)) and not same(r.current(), r.value):
                changed.add(key)
                if r.key == "__dict__":  # watched whole: every attribute as it is now (and the gone ones gone)
                    now = vars(r.obj)
                    originals.append(now)
                    self.end.extend((r.obj, k, copy_value(v)) for k, v in now.items())
                    self.end.extend((r.obj, k, ABSENT) for k in r.value.items if k not in now)
                else:
                    originals.append(r.current())
                    self.end.append((r.obj, r.key, copy_value(originals[-1])))
        self.present = {id(t) for value in originals for t in walk_tensors(value)}
        self.stable = [r for key, r in self.reads.items()
                       if key not in changed and (id(r.obj), r.key) not in self.writes]


def value_of(obj: Any, name: str) -> Any:
    """``obj.name`` where an attribute read finds it (ABSENT if not there); "__dict__": a copy of ``vars(obj)``."""
    if name == "__dict__":
        return dict(vars(obj))
    try:
        attrs = object.__getattribute__(obj, "__dict__")
    except AttributeError:
        return getattr(obj, name, ABSENT)
    if name in attrs:
        return attrs[name]
    return getattr(obj, name, ABSENT) if isinstance(obj, torch.nn.Module) else ABSENT  # a parameter, a submodule


_ENGINE_DIR = __file__.rsplit("/", 1)[0] + "/"  # loopgraph's own modules (the zoo is user code, in a subfolder)


_TORCH_GLOBAL_HOOKS = ("_global_backward_pre_hooks", "_global_backward_hooks", "_global_forward_hooks",
                       "_global_forward_pre_hooks", "_global_forward_hooks_always_called",
                       "_global_forward_hooks_with_kwargs")
_MODULE_GLOBALS: dict[str, frozenset] = {}


def _user_module(obj: Any) -> types.ModuleType | None:
    """The module ``obj`` (a class or function) comes from, when it is user code: not loopgraph's engine, the
    standard library or an installed library (whose globals are machinery, some changing all the time)."""
    module = sys.modules.get(getattr(obj, "__module__", None) or "")
    filename = getattr(module, "__file__", None) or ""
    if module is None or not filename or filename.rsplit("/", 1)[0] + "/" == _ENGINE_DIR:
        return None
    if module.__name__.split(".", 1)[0] in sys.stdlib_module_names or "-packages/" in filename:
        return None
    return module


def _module_global_names(module: types.ModuleType) -> frozenset:
    """The global names the functions and methods defined in ``module`` load (their bytecode, nested code too)."""
    names = _MODULE_GLOBALS.get(module.__name__)
    if names is None:
        codes = []
        for value in list(vars(module).values()):
            if getattr(value, "__module__", None) != module.__name__:
                continue
            if isinstance(value, types.FunctionType):
                codes.append(value.__code__)
            elif isinstance(value, type):
                for member in vars(value).values():
                    for fn in (member, getattr(member, "__func__", None), getattr(member, "fget", None)):
                        if isinstance(fn, types.FunctionType):
                            codes.append(fn.__code__)
        found: set[str] = set()
        while codes:
            code = codes.pop()
            found.update(ins.argval for ins in dis.get_instructions(code) if ins.opname == "LOAD_GLOBAL")
            codes.extend(c for c in code.co_consts if isinstance(c, types.CodeType))
        names = _MODULE_GLOBALS[module.__name__] = frozenset(found)
    return names


def _class_lookup(cls: type, name: str) -> tuple[type, Any] | None:
    """The class in ``cls``'s MRO that defines ``name``, and the value it holds there."""
    for klass in cls.__mro__:
        attrs = klass.__dict__
        if name in attrs:
            return klass, attrs[name]
    return None


# -- the hooks ------------------------------------------------------------------------------------------------------
_active: Recording | None = None
_get_ident = threading.get_ident


def _recording() -> Recording | None:
    rec = _active
    if rec is None or rec.busy or rec.thread != _get_ident():
        return None
    return rec


def _getattribute_hook(original):
    def __getattribute__(self, name):
        rec = _recording()
        if rec is None or (id(self), name) in rec.handled or id(self) not in rec.objects:
            return original(self, name)
        try:
            value = original(self, name)
        except AttributeError:
            _logged(rec, rec.on_read, self, name, ABSENT)
            raise
        _logged(rec, rec.on_read, self, name, value)
        return value

    setattr(__getattribute__, _HOOK, True)
    return __getattribute__


def _getattr_hook(original):
    def __getattr__(self, name):
        rec = _recording()
        if rec is None or (id(self), name, "resolved") in rec.handled or id(self) not in rec.objects:
            return original(self, name)
        rec.busy = True  # what __getattr__ itself reads (a module's __dict__) is not the user's read
        value = ABSENT
        try:
            value = original(self, name)
        finally:
            rec.busy = False
            _logged(rec, rec.on_resolved, self, name, value)
        return value

    setattr(__getattr__, _HOOK, True)
    return __getattr__


def _write_hook(original):
    """``__setattr__`` (self, name, value) and ``__delattr__`` (self, name): the write is logged after it is done."""
    def write(self, name, *value):
        rec = _active
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


class _Patcher:
    """Puts the logging hooks on classes, once each, and takes them off again."""

    def __init__(self) -> None:
        self.done: dict[type, bool] = {}
        self.undo: list[tuple[type, str, bool, Any]] = []

    def ensure(self, cls: type) -> bool:
        """Hook ``cls`` (if no base already hooks it); False when its class cannot take hooks."""
        known = self.done.get(cls)
        if known is not None:
            return known
        ok = bool(cls.__flags__ & _HEAPTYPE) and cls is not object
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


@contextlib.contextmanager
def record(roots: dict[str, Any]) -> Iterator[Recording]:
    """Watch ``roots`` (path -> object) and what the code inside the block reaches from them.

    Holds ``TRACE_LOCK`` and hooks ``torch.nn.Module`` and the roots' classes for the duration; every hook is
    removed on exit, also when the block raises.
    """
    global _active
    with TRACE_LOCK:
        rec = Recording()
        patcher = rec._patcher = _Patcher()
        previous = _active
        try:
            patcher.ensure(torch.nn.Module)
            for path, obj in roots.items():
                rec.watch(obj, path)
            _active = rec
            yield rec
        finally:
            _active = previous
            patcher.restore()
            rec._patcher = None


# -- component state that the loop carries (a scheduler's history) ----------------------------------------------------
def component_objects(wrapper, components) -> dict[str, Any]:
    """The wrapper's declared components that keep Python state (schedulers, guiders): every non-module one."""
    found = {}
    for spec in wrapper.expected_components:
        obj = getattr(components, spec.name, None)
        if obj is not None and not isinstance(obj, torch.nn.Module) and hasattr(obj, "__dict__"):
            found[spec.name] = obj
    return found


def component_tensors(objects: dict[str, Any]) -> dict[str, tuple[tuple, torch.Tensor]]:
    """Every tensor in the components' attributes, through lists, tuples and dicts: name -> (path, tensor).

    Only plain containers are walked (a named tuple or another object is not): a loop-derived tensor held
    anywhere else is reported by the tracer as state carried across steps outside the loop's reach."""
    found: dict[str, tuple[tuple, torch.Tensor]] = {}

    def walk(value: Any, path: tuple, name: str) -> None:
        if isinstance(value, torch.Tensor):
            found[name] = (path, value)
        elif type(value) in (list, tuple):
            for k, item in enumerate(value):
                walk(item, (*path, k), f"{name}[{k}]")
        elif type(value) is dict:
            for k, item in value.items():
                walk(item, (*path, k), f"{name}[{k!r}]")

    for comp, obj in objects.items():
        for attr, value in vars(obj).items():
            walk(value, (comp, attr), f"{comp}.{attr}")
    return found


def put(components, path: tuple, value: torch.Tensor) -> None:
    """Store ``value`` at ``path`` = (component, attribute, index or key, ...) in the components' state."""
    comp, attr, *keys = path
    obj = getattr(components, comp)
    setattr(obj, attr, _replaced(getattr(obj, attr), keys, value))


def _replaced(container: Any, keys: list, value: Any) -> Any:
    """``container`` with the item at ``keys`` set to ``value``: lists and dicts in place, tuples rebuilt."""
    if not keys:
        return value
    key, *rest = keys
    item = _replaced(container[key], rest, value)
    if isinstance(container, tuple):
        return container[:key] + (item,) + container[key + 1:]
    container[key] = item
    return container


def set_attribute(obj: Any, name: str, value: Any) -> None:
    """``obj.name = value`` (deleted when ``value`` is ABSENT), as the traced call left it; containers of the
    same kind are updated in place, as the call itself did."""
    if value is ABSENT:
        if hasattr(obj, "__dict__") and name in vars(obj):
            delattr(obj, name)
        return
    current = vars(obj).get(name, ABSENT) if hasattr(obj, "__dict__") else getattr(obj, name, ABSENT)
    if type(current) is list and type(value) is list:
        current[:] = value
    elif type(current) is dict and type(value) is dict:
        current.clear()
        current.update(value)
    else:
        try:
            setattr(obj, name, value)
        except (AttributeError, TypeError, dataclasses.FrozenInstanceError):  # as the object's own code set it
            object.__setattr__(obj, name, value)


