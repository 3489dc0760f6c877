"""Snapshots of Python values, and how a value now is compared with one (the guards' and the replay's values).

    snapshot   what a read keeps of a value: atoms as they are, tensors as ``TensorSnap`` (the object, its
               version counter, a copy of a small one's value), containers item by item, other objects by
               reference
    same       whether a value now is what a snapshot recorded; tensors by their rule (``tensor_matches``)
    difference where a container first differs, for a guard's reason; ``describe`` renders a value briefly
    copy_value what a compiled call replays: a copy of a value the traced call left
"""

from __future__ import annotations

import enum
import types
from typing import Any, Iterator

import torch

from ..modular_pipelines.state import _atoms_only

__all__ = ["ABSENT", "ATOMS", "HEAPTYPE", "ContainerSnap", "TensorRule", "TensorSnap", "copy_value", "describe",
           "difference", "is_plain_object", "object_state", "same", "snapshot", "tensor_matches", "tensor_snaps",
           "value_state", "walk_tensors"]

ATOMS = (int, float, bool, str, bytes, complex, type(None), torch.dtype, torch.device, torch.memory_format,
         torch.layout)
# Values compared by identity and never watched: code, classes, generators.
OPAQUE_LEAVES = (types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.BuiltinMethodType,
                 types.ModuleType, type, torch.Generator, property, staticmethod, classmethod)
# Small tensors are snapshot by value (a scheduler's sigmas, made anew by every set_timesteps); larger ones by
# identity and version counter.
TENSOR_VALUE_NUMEL = 1 << 16
MAX_DEPTH = 6
HEAPTYPE = 1 << 9  # Py_TPFLAGS_HEAPTYPE: a class made at run time (a class statement, or a C type from a spec)
IMMUTABLETYPE = 1 << 8  # Py_TPFLAGS_IMMUTABLETYPE: C types (functools.partial); a class statement's classes lack it


class _Absent:
    """The value of an attribute that is not there (``getattr(obj, name, default)`` took the default)."""

    _instance = None

    def __new__(cls):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "<absent>"

    def __deepcopy__(self, memo):
        return self


ABSENT = _Absent()


class TensorRule(str, enum.Enum):
    """How a tensor now is compared with its snapshot (``tensor_matches``); a str, so it reads as its value."""

    IDENTITY = "identity"              # the compiled code reads that very tensor
    VALUE = "value"                    # its value was evaluated eagerly and baked
    IDENTITY_VALUE = "identity+value"  # both
    SPEC = "spec"                      # no op used it: shape, dtype and device only
    KEPT = "kept"                      # no op used it, but the call left it where a compiled call replays it

    def __str__(self) -> str:
        return self.value


class TensorSnap:
    """A tensor as first read: the object, its version counter, and (small tensors) a copy of its value."""

    __slots__ = ("tensor", "version", "value", "spec", "data_ptr")

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor = tensor
        self.version = _version(tensor)
        self.value = tensor.detach().clone() if tensor.numel() <= TENSOR_VALUE_NUMEL else None
        self.spec = (tuple(tensor.shape), tensor.dtype, tensor.device)
        self.data_ptr = tensor.data_ptr() if tensor.device.type != "meta" else 0

    def __repr__(self) -> str:
        return f"Tensor{self.spec[0]} {str(self.spec[1]).replace('torch.', '')}"


class ContainerSnap:
    """A list, tuple, dict or set as first read: its type and a snapshot of every item."""

    __slots__ = ("obj", "type", "items")

    def __init__(self, obj: Any, items: Any) -> None:
        self.obj, self.type, self.items = obj, type(obj), items  # items: list of snaps, or dict key -> snap

    def __repr__(self) -> str:
        return f"{self.type.__name__}[{len(self.items)}]"


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter (and cannot be changed in place)
        return 0


def snapshot(value: Any, depth: int = 0) -> Any:
    """What a read keeps of a value: atoms as they are, tensors as ``TensorSnap``, containers item by item,
    anything else by reference (compared by identity)."""
    if isinstance(value, ATOMS) and type(value) in ATOM_TYPES:
        return value
    if isinstance(value, torch.Tensor):
        return TensorSnap(value)
    if depth < MAX_DEPTH:
        if isinstance(value, (list, tuple)) and not isinstance(value, torch.Size):
            return ContainerSnap(value, [snapshot(v, depth + 1) for v in value])
        if isinstance(value, torch.Size):
            return value
        if isinstance(value, dict):
            return ContainerSnap(value, {k: snapshot(v, depth + 1) for k, v in value.items()})
        if isinstance(value, (set, frozenset)):
            return ContainerSnap(value, frozenset(value))  # items by hash: atoms by value, objects by identity
    return value


ATOM_TYPES = set(ATOMS)


def same(current: Any, snap: Any, tensor_rules: dict[int, TensorRule] | None = None,
         default: TensorRule = TensorRule.VALUE) -> bool:
    """Whether ``current`` is what ``snap`` (a ``snapshot``) recorded, tensors by their rule (see
    ``tensor_matches``; by ``default`` when no rule is given)."""
    if isinstance(snap, TensorSnap):
        return isinstance(current, torch.Tensor) and tensor_matches(current, snap, (tensor_rules or {}).get(
            id(snap.tensor), default))
    if isinstance(snap, ContainerSnap):
        if type(current) is not snap.type:
            return False
        if isinstance(snap.items, dict):
            return (current.keys() == snap.items.keys()
                    and all(same(current[k], s, tensor_rules, default) for k, s in snap.items.items()))
        if isinstance(snap.items, frozenset):
            return frozenset(current) == snap.items
        return len(current) == len(snap.items) and all(same(c, s, tensor_rules, default)
                                                       for c, s in zip(current, snap.items))
    if type(snap) in ATOM_TYPES:
        if type(current) is not type(snap):
            return False
        return current == snap or (current != current and snap != snap)  # NaN equals NaN here
    if isinstance(snap, torch.Size):
        return isinstance(current, torch.Size) and current == snap
    return current is snap


def tensor_matches(current: torch.Tensor, snap: TensorSnap, rule: TensorRule) -> bool:
    """Whether ``current`` matches ``snap`` by ``rule`` (see ``TensorRule``)."""
    if rule == TensorRule.SPEC:
        return (tuple(current.shape), current.dtype, current.device) == snap.spec
    if rule in (TensorRule.IDENTITY, TensorRule.KEPT):
        return current is snap.tensor
    if rule == TensorRule.IDENTITY_VALUE and current is not snap.tensor:
        return False
    if (tuple(current.shape), current.dtype, current.device) != snap.spec:
        return False
    if snap.value is not None:  # small: by value (``.data`` assignments and copies bypass the version counter)
        return torch.equal(current, snap.value)
    return current is snap.tensor and _version(current) == snap.version and current.data_ptr() == snap.data_ptr


def a_type(value: Any) -> str:
    """``value``'s type with its article, for messages: "an int", "a str"."""
    return _with_article(type(value).__name__)


def _with_article(name: str) -> str:
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def describe(value: Any) -> str:
    """A short rendering of a value for a guard's reason."""
    if isinstance(value, TensorSnap):
        return repr(value)
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
    if isinstance(value, ContainerSnap):
        return f"{_with_article(value.type.__name__)} of {len(value.items)}"
    if isinstance(value, (list, tuple, dict, set)) and not isinstance(value, torch.Size):
        return f"{a_type(value)} of {len(value)}"
    if type(value) in ATOM_TYPES or value is ABSENT:
        text = repr(value)
        return text if len(text) <= 60 else text[:57] + "..."
    return f"<{type(value).__qualname__} ({type(value).__module__}) at {id(value):#x}>"


def difference(current: Any, snap: Any, rules: dict[int, TensorRule] | None = None,
               path: str = "") -> tuple[str, Any, Any]:
    """Where ``current`` first differs from ``snap`` (a ``snapshot``): (the item's path, its value now, then)."""
    if isinstance(snap, ContainerSnap) and type(current) is snap.type and not isinstance(snap.items, frozenset):
        if isinstance(snap.items, dict):
            for k in [*snap.items, *[k for k in current if k not in snap.items]]:
                now, then = current.get(k, ABSENT), snap.items.get(k, ABSENT)
                if not (same(now, then, rules) if then is not ABSENT else now is ABSENT):
                    return difference(now, then, rules, f"{path}[{k!r}]")
        elif len(current) == len(snap.items):
            for k, (now, then) in enumerate(zip(current, snap.items)):
                if not same(now, then, rules):
                    return difference(now, then, rules, f"{path}[{k}]")
    return path, current, snap


def copy_value(value: Any) -> Any:
    """A copy to replay: atoms as they are, plain containers copied item by item (a flat list of numbers in C, so
    the cost does not grow with N in Python), tensors cloned, other objects by reference (their identity is
    what the call left there)."""
    if type(value) in ATOM_TYPES or value is ABSENT:
        return value
    if isinstance(value, torch.Tensor):
        return value.clone()
    if type(value) in (list, tuple):
        return type(value)(value) if _atoms_only(value) else type(value)(copy_value(v) for v in value)
    if type(value) is dict:
        return {k: copy_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, dict, set, frozenset)) and not isinstance(value, torch.Size):
        try:  # a container of another kind (an OrderedDict, a named tuple): rebuilt from copied items
            if isinstance(value, dict):
                return type(value)((k, copy_value(v)) for k, v in value.items())
            items = [copy_value(v) for v in value]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        except Exception:  # a container that cannot be rebuilt: the object itself
            return value
    return value


class _TensorValue:
    """A tensor in a ``value_state``: equal to another of the same dtype, shape, device and elements (``keep``: a
    copy, for the picture a plan keeps; else the tensor itself, for the call's side)."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor, keep: bool) -> None:
        self.tensor = tensor.detach().clone() if keep else tensor

    def __eq__(self, other: Any) -> bool:
        t = getattr(other, "tensor", None)
        return (isinstance(t, torch.Tensor) and t.dtype == self.tensor.dtype and t.shape == self.tensor.shape
                and t.device == self.tensor.device and torch.equal(t, self.tensor))

    __hash__ = None


def is_plain_object(value: Any) -> bool:
    """An object that keeps all its state in its ``__dict__`` (a scheduler): an instance of classes made by class
    statements only, without ``__slots__`` (not an atom, tensor, container, module, code, partial or other C type)."""
    return (not isinstance(value, (torch.Tensor, torch.nn.Module))
            and isinstance(getattr(value, "__dict__", None), dict)
            and all(c is object or (c.__flags__ & HEAPTYPE and not c.__flags__ & IMMUTABLETYPE
                                    and "__slots__" not in vars(c)) for c in type(value).__mro__))


def _picture(value: Any, by_value: bool, keep: bool = False, depth: int = 0, seen: frozenset = frozenset()) -> Any:
    """A comparable picture of a value, its containers' items and its plain objects' attributes (to ``MAX_DEPTH``):
    atoms by type and value; modules, code and objects already on the path by identity; tensors by their elements
    (``by_value``) or by identity and version counter; objects, by value, also by identity unless ``by_value``."""
    if type(value) in ATOM_TYPES:
        return (type(value), value)
    if isinstance(value, torch.Tensor):
        if by_value and value.numel() <= TENSOR_VALUE_NUMEL:
            return _TensorValue(value, keep)
        return ("tensor", id(value), value._version if not value.is_inference() else 0)
    if by_value and type(value).__module__ == "numpy" and hasattr(value, "shape"):
        return (type(value), str(getattr(value, "dtype", "")), tuple(value.shape), value.tobytes())
    if isinstance(value, (torch.nn.Module, *OPAQUE_LEAVES)) or depth >= MAX_DEPTH or id(value) in seen:
        return ("is", id(value))
    seen = seen | {id(value)}
    if isinstance(value, (list, tuple)):
        return (type(value), tuple(_picture(v, by_value, keep, depth + 1, seen) for v in value))
    if isinstance(value, dict):
        return (type(value), tuple((k, _picture(v, by_value, keep, depth + 1, seen)) for k, v in value.items()))
    if isinstance(value, (set, frozenset)):
        return (type(value), frozenset(value))
    if is_plain_object(value):
        attrs = tuple((k, _picture(v, by_value, keep, depth + 1, seen)) for k, v in vars(value).items())
        return (type(value), attrs) if by_value else (type(value), id(value), attrs)
    return ("is", id(value))


def object_state(value: Any) -> Any:
    """A picture of an object's state: ``==`` to another when nothing in it changed that its code could see (tensors
    by identity and version counter, objects by identity too)."""
    return _picture(value, by_value=False)


def value_state(value: Any, keep: bool = False) -> Any:
    """A picture of a value by value: ``==`` to another when a deep copy of one would be (a scheduler deep-copied per
    call, a fresh numpy array of the same values); modules, code and large tensors by identity. ``keep``: the
    picture holds copies of the tensors (one a plan keeps), else the tensors themselves (a call's, compared now)."""
    return _picture(value, by_value=True, keep=keep)


def walk_tensors(value: Any, depth: int = 0) -> Iterator[torch.Tensor]:
    """The tensors ``value`` holds, through plain containers."""
    if isinstance(value, torch.Tensor):
        yield value
    elif depth < MAX_DEPTH and isinstance(value, (list, tuple)) and not _atoms_only(value):
        for item in value:
            yield from walk_tensors(item, depth + 1)
    elif depth < MAX_DEPTH and isinstance(value, dict):
        for item in value.values():
            yield from walk_tensors(item, depth + 1)


def tensor_snaps(snap: Any) -> Iterator[TensorSnap]:
    """The tensor snapshots a snapshot holds, through its containers."""
    if isinstance(snap, TensorSnap):
        yield snap
    elif isinstance(snap, ContainerSnap) and not isinstance(snap.items, frozenset):
        for item in (snap.items.values() if isinstance(snap.items, dict) else snap.items):
            yield from tensor_snaps(item)
