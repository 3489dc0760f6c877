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

Module-level globals are reads too, as they are when the call ends: the globals, the closure variables and the
attributes of user modules (``settings.STRENGTH``) that the code of user modules reachable from the call loads
(pystate/user_globals.py: through decorators, partials and bound methods; not the standard library's nor installed
libraries'), a user object such a global holds (compared whole); and torch's global module hooks.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
import types
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from . import class_hooks
from ..modular_pipelines.state import _atoms_only
from ..trace.floats import Lifts
from .class_hooks import Patcher
from .components import _TORCH_GLOBAL_HOOKS, _class_lookup, value_of
from .snapshots import (
    ABSENT,
    ATOM_TYPES,
    HEAPTYPE,
    MAX_DEPTH,
    OPAQUE_LEAVES,
    ContainerSnap,
    TensorRule,
    copy_value,
    object_state,
    same,
    snapshot,
    walk_tensors,
)
from .user_globals import global_reads, is_user_code

__all__ = ["INPUT_ROOT", "AttributeLog", "Read", "Recording", "TRACE_LOCK", "Write", "record"]

# Objects watched because the BlockState holds them (a scheduler the pipeline deep-copies per call) have paths
# "state['name']...": guarded by value with the inputs, not read by read (guards/plan_guard.py).
INPUT_ROOT = "state["

# One trace at a time in a process: tracing patches classes (and the traced wrapper instance).
TRACE_LOCK = threading.RLock()

_MODULE_CONTAINERS = ("_parameters", "_buffers", "_modules")
_CODE_CARRIERS = (types.FunctionType, types.MethodType, functools.partial, type, types.ModuleType)


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
    created: tuple[Any, Any] | None = None  # read absent or None, then set by the call to an object it made:
                                             # (that object, a container's ``object_state``); ``_settle_created``

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


@dataclass(frozen=True)
class AttributeLog:
    """What a traced call read and wrote of the Python state, once it ended (``Recording.log``): what the guards,
    eager segments and the write-back of later calls are made from.

    ``reads``/``writes``: every read (first value) and write, by key; ``end``: each attribute the call wrote or
    changed in place, as it left it (obj, name, a copy), in the order first written; ``stable``: the reads it
    never wrote nor changed; ``present``: ids of the tensors those end values hold; ``paths``: id -> where the
    call found an object (for messages)."""

    reads: dict[tuple, Read]
    writes: dict[tuple[int, str], Write]
    end: list[tuple[Any, str, Any]]
    stable: list[Read]
    present: set[int]
    paths: dict[int, str]
    made: frozenset[tuple[int, str]] = frozenset()  # (id, name): set to an object the call made (Read.created)

    def replay(self, obj: Any, name: str, value: Any) -> Any:
        """The value to put back in ``obj.name``: a copy of ``value``, or the very object the call made there."""
        return value if (id(obj), name) in self.made else copy_value(value)


class Recording:
    """What one traced call read and wrote of the Python state of the objects it reached (see the module
    docstring). ``step`` and ``block`` are set by the tracer, so writes know who made them."""

    def __init__(self) -> None:
        self.objects: dict[int, Any] = {}
        self.paths: dict[int, str] = {}
        self.reads: dict[tuple, Read] = {}
        self.writes: dict[tuple[int, str], Write] = {}
        self.opaque: dict[int, Any] = {}  # objects watched whole (their class takes no hooks)
        self.reached: dict[int, Any] = {}  # functions, methods, partials, classes and modules found in attributes
        self.step: int | None = None
        self.block: str | None = None
        self.lifts: Lifts | None = None  # hands out the floats the call reads as traced floats (trace/floats.py)
        self.busy = False
        self.thread = threading.get_ident()
        self._written: set[tuple[int, str]] = set()
        self.created: dict[tuple[int, str], tuple[Any, Any] | None] = {}  # see ``_note_created``
        self.made: set[tuple[int, str]] = set()                          # see ``_settle_created``
        self.handled: set[tuple] = set()  # (id, name) reads already logged or not to log: the hooks' fast exit
        self._patcher: Patcher | None = None
        self._wrapper: Any = None  # the root named "wrapper": the changer of a global no block changed
        self._globals: dict[tuple, tuple[Read, Any, Any]] = {}  # key -> (where, value, snapshot), as last noted
        self.global_start: dict[tuple, Any] = {}                # key -> its snapshot when the call started
        self.global_changes: dict[tuple, tuple[str, list[tuple[int | None, str | None]]]] = {}  # key -> (path,
                                                                # the (step, block) of each change)

    # -- what the hooks call -----------------------------------------------------------------------------------
    def watch(self, obj: Any, path: str) -> None:
        """Start watching ``obj`` (and, for objects watched whole, what their attributes hold). Functions,
        classes and modules are noted for the globals their code loads; a bound method's object is watched."""
        if isinstance(obj, _CODE_CARRIERS):
            self.reached.setdefault(id(obj), obj)
            if isinstance(obj, types.MethodType):
                self.watch(obj.__self__, f"{path}.__self__")
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
        read = Read(obj, holder, name, snapshot(here), path)
        self._add_read(read, key)
        if type(here) is float and attrs is not None and self.lifts is not None and not path.startswith(INPUT_ROOT):
            self.lifts.attribute(obj, name, here, read)
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
        self._note_created(obj, name)
        write.events.append((self.step, self.block))

    def _note_created(self, obj: Any, name: str) -> None:
        """A write of an attribute read absent or None: a lazily made registry, cache or helper when the call sets
        it once to an object it made (after None, maybe). That object is watched from then on (what the call reads
        of it is guarded, what it writes is replayed); a container's state is noted, to tell at the end whether
        the call changed it. Any other write (a number, an object it found) rules the attribute out; so do writes
        in more than one step or block (``_settle_created``: ``self.prev = [x]`` every step is state, not a cache)."""
        attrs = _own_dict(obj)
        read = self.reads.get((id(attrs), name)) if attrs is not None else None
        key = (id(obj), name)
        if read is None or (read.value is not ABSENT and read.value is not None) or self.created.get(key, 0) is None:
            return
        value = attrs.get(name, ABSENT)
        if value is None:
            return
        if (value is ABSENT or type(value) in ATOM_TYPES or isinstance(value, (torch.Tensor, *OPAQUE_LEAVES))
                or id(value) in self.objects):
            self.created[key] = None  # deleted, or set to a number, a tensor, code or an object it found
            return
        with self.paused():
            if isinstance(value, (list, tuple, dict)):
                self.created[key] = (value, object_state(value))
            else:
                self.created[key] = (value, None)
                self.watch(value, f"{self.paths[id(obj)]}.{name}")

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
        if isinstance(value, (list, tuple, dict, set, frozenset)) and not type(value).__flags__ & HEAPTYPE:
            return  # a container of the standard library (an OrderedDict of hooks): its items are what counts
        self.watch(value, path)

    # -- side effects on module globals --------------------------------------------------------------------------
    def watch_globals(self) -> None:
        """Note the module globals (and closure variables, user-module attributes) the roots' code can load, as
        they are when the call starts: a block that changes one (appends a preview to a module-level list, counts
        steps in a global) makes a side effect that a compiled step would not make (``note_globals``)."""
        for owner, holder, key, path in global_reads(self._classes(), list(self.reached.values())):
            read = Read(owner, holder, key, ABSENT, path)
            value = read.current()
            self._globals[_global_key(owner, holder, key)] = (read, value, _global_snapshot(value))
        self.global_start = {key: snap for key, (_, _, snap) in self._globals.items()}

    def note_globals(self, step: int | None, block: str | None) -> list[str]:
        """The paths of the globals changed since the last note (rebound, or changed in place), which ``block``
        (None: the wrapper's own code) of ``step`` made."""
        found = []
        for key, (read, value, snap) in self._globals.items():
            now = read.current()
            if _global_same(now, value, snap):
                continue
            self._globals[key] = (read, now, _global_snapshot(now))
            self.global_changes.setdefault(key, (read.path, []))[1].append((step, block))
            found.append(read.path)
        return found

    def _guard_changed_global(self, key: tuple, blocks: dict[str, Any]) -> bool:
        """Whether a global the call changed is guarded (by its value when the call started): when code other
        than the blocks that change it can load it (a compiled block would bake what it read)."""
        changers = {id(blocks.get(b, self._wrapper)) for _, b in self.global_changes[key][1]}
        others = [c for obj in self.objects.values() if id(obj) not in changers for c in type(obj).__mro__]
        reads = global_reads(list({id(c): c for c in others}.values()), list(self.reached.values()),
                             whole_modules=False)
        return any(_global_key(o, h, k) == key for o, h, k, _ in reads)

    def _classes(self) -> list[type]:
        return list({id(c): c for obj in self.objects.values() for c in type(obj).__mro__}.values())

    def _read_globals(self, blocks: dict[str, Any]) -> None:
        """Reads of the module globals and user-module attributes the call's code can load (user_globals.py), from
        the watched objects' classes and the functions, classes and modules the call found in attributes; and
        torch's global module hooks. A global the call changed is read as it was when the call started, and only
        when code other than the blocks that change it loads it (``_guard_changed_global``)."""
        for owner, holder, key, path in global_reads(self._classes(), list(self.reached.values())):
            rkey = _global_key(owner, holder, key)
            if rkey in self.reads:
                continue
            if rkey in self.global_changes:
                value, attrs = self.global_start[rkey]
                if self._guard_changed_global(rkey, blocks):
                    self._add_read(Read(owner, holder, key, value, path), rkey)
                    if attrs is not None:  # compared whole, as it was
                        self._add_read(Read(value, None, "__dict__", attrs, path), ("whole", id(value)))
                continue
            read = Read(owner, holder, key, ABSENT, path)
            value = read.current()
            read.value = snapshot(value)
            self._add_read(read, rkey)
            if _user_instance(value) and id(value) not in self.objects:  # a settings object: compared whole
                self._add_read(Read(value, None, "__dict__", snapshot(dict(vars(value))), path), ("whole", id(value)))
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

    def log(self) -> AttributeLog:
        """The result, once ``finish`` ran (and the tracer settled the floats in ``end``)."""
        return AttributeLog(self.reads, self.writes, list(self.end), self.stable, self.present, self.paths,
                            frozenset(self.made))

    def finish(self, blocks: dict[str, Any]) -> None:
        """At the end of the call: ``end``, each attribute the call wrote or changed in place, as it left it
        (obj, name, a copy), in the order first written; ``stable``, the reads it never wrote nor changed.
        ``blocks``: the wrapper's blocks by name (who changed a global)."""
        self._read_globals(blocks)
        changed = set()
        self.end: list[tuple[Any, str, Any]] = []
        originals = []  # the values themselves: which tensors stay where the call left them
        for (oid, name), write in self.writes.items():
            originals.append(value_of(write.obj, name))
            self.end.append((write.obj, name, copy_value(originals[-1])))
        for key, r in self.reads.items():
            if (id(r.obj), r.key) in self.writes or isinstance(r.obj, (type, types.ModuleType, dict)):
                continue
            # a container holding other tensors of equal values changed too: eager segments may have set it to a
            # step's state on the way, and eager's own objects are the new ones
            if ((r.key == "__dict__" or isinstance(r.value, ContainerSnap))
                    and not same(r.current(), r.value, default=TensorRule.IDENTITY_VALUE)):
                changed.add(key)
                if r.key == "__dict__":  # watched whole: every attribute as it is now (and the gone ones gone)
                    now = vars(r.obj)
                    originals.append(now)
                    self.end.extend((r.obj, k, copy_value(v)) for k, v in now.items())
                    self.end.extend((r.obj, k, ABSENT) for k in r.value.items if k not in now)
                else:
                    originals.append(r.current())
                    self.end.append((r.obj, r.key, copy_value(originals[-1])))
        self._settle_created()
        self.kept = originals  # the values themselves
        self.present = {id(t) for value in originals for t in walk_tensors(value)}
        self.stable = [r for key, r in self.reads.items()
                       if key not in changed and (id(r.obj), r.key) not in self.writes]


    def _settle_created(self) -> None:
        """Reads of an attribute the call found absent (or None), then set to an object it made and still held at
        the end (``_note_created``): a later call finds either what the trace found or that very object, and
        both run the same code (``if not hasattr(model, "_registry"): model._registry = Registry()``, diffusers'
        hook registry made by ``cache_context``; a rope cache filled on first use). Such reads accept both
        (``Read.created``) instead of making the second call trace again: an object as its own reads are guarded,
        a container unchanged since it was set. The end value replayed is the object itself."""
        with self.paused():
            for (oid, name), made in self.created.items():
                if made is None:
                    continue
                value, state = made
                obj = self.objects[oid]
                attrs = _own_dict(obj)
                read = self.reads.get((id(attrs), name))
                events = self.writes[(oid, name)].events
                if read is None or attrs.get(name, ABSENT) is not value or len(set(events)) > 1:
                    continue
                if state is None or object_state(value) == state:
                    read.created = (value, state)
                    self.made.add((oid, name))
                    self.end = [(o, n, value if o is obj and n == name else v) for o, n, v in self.end]

def _own_dict(obj: Any) -> dict | None:
    try:
        return object.__getattribute__(obj, "__dict__")
    except AttributeError:
        return None


def _global_key(owner: Any, holder: dict | None, key: str) -> tuple:
    return (id(holder), key) if holder is not None else ("getattr", id(owner), key)


def _global_snapshot(value: Any) -> tuple[Any, Any]:
    """A global's value, and the attributes of a user object it holds (a settings or stats object)."""
    return snapshot(value), snapshot(dict(vars(value))) if _user_instance(value) else None


def _global_same(now: Any, value: Any, snap: tuple[Any, Any]) -> bool:
    """Whether a global is as noted: the same object (or an equal atom), with the same items or attributes."""
    if (type(now) not in ATOM_TYPES and now is not value) or not same(now, snap[0]):
        return False
    return snap[1] is None or same(dict(vars(now)), snap[1])


def _user_instance(value: Any) -> bool:
    """An instance of a user class that keeps attributes (not a module, class, function or torch module)."""
    cls = type(value)
    module = sys.modules.get(cls.__module__)
    return (hasattr(value, "__dict__") and not isinstance(value, (*OPAQUE_LEAVES, torch.nn.Module))
            and module is not None and is_user_code(vars(module)))


@contextlib.contextmanager
def record(roots: dict[str, Any]) -> Iterator[Recording]:
    """Watch ``roots`` (path -> object) and what the code inside the block reaches from them.

    Holds ``TRACE_LOCK`` and hooks ``torch.nn.Module`` and the roots' classes for the duration; every hook is
    removed on exit, also when the block raises.
    """
    with TRACE_LOCK:
        rec = Recording()
        patcher = rec._patcher = Patcher()
        previous = class_hooks.active
        try:
            patcher.ensure(torch.nn.Module)
            for path, obj in roots.items():
                rec.watch(obj, path)
            rec._wrapper = roots.get("wrapper")
            rec.watch_globals()
            class_hooks.active = rec
            yield rec
        finally:
            class_hooks.active = previous
            patcher.restore()
            rec._patcher = None
