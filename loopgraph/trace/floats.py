"""Python floats a traced call reads that only feed tensor math: inputs of the compiled loop, not guards.

A guidance scale, a strength or a LoRA weight that a block reads (a BlockState input, an attribute of a
component or block) and uses as an operand of tensor arithmetic (``uncond + scale * (cond - uncond)``) need not be
baked into the plan. While tracing, such a float is handed to the call as a ``TracedFloat``: a ``float`` subclass
of the same value that notes every use Python makes of it besides being a torch op's operand:

    compared, hashed, formatted, converted, computed with in Python, passed to ``math``   (its value steers Python)
    an argument of a torch op evaluated when tracing (a factory), inside a list, of an op that needs a number
    stored where the call leaves it (an attribute, a BlockState slot)                    (a compiled call replays it)

A float used only as a direct operand of the step graphs' arithmetic is *lifted*: its positions become rows of
the step tables, filled on every call from the value read then, and the plan guards its type, not its value (a new
guidance scale is a new input, not a new plan). Any other use keeps the value guarded, and ``explain()`` says where
it was used. numpy converts it with ``__float__`` (seen); C code that reads a float's value past its methods
(``"%f" % scale``, ``struct.pack``, a ``math`` function bound before the trace) is not: an attribute read with no
use seen is guarded by value, but a BlockState input used only there, or a float also used as an operand, is not
caught: ``compile_loop(..., lift_floats=False)`` guards every float by value.
"""

from __future__ import annotations

import contextlib
import enum
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from ..pystate.snapshots import a_type

__all__ = ["ARITHMETIC", "Source", "SourceKind", "TracedFloat", "Lifts", "floats_in", "plain"]

# Ops whose Python-float operand may as well be a 0-d tensor: a float read from a block input or an attribute is
# lifted only there (other ops insist on a Python number), and so is one that differs between plans (passes/run.py).
ARITHMETIC = {"add", "sub", "mul", "div", "true_divide", "rsub", "__add__", "__radd__", "__sub__", "__rsub__",
              "__mul__", "__rmul__", "__truediv__", "__rtruediv__", "add_", "sub_", "mul_", "div_", "__iadd__",
              "__isub__", "__imul__", "__itruediv__"}


class SourceKind(str, enum.Enum):
    """Where a traced float was read; a str, so it reads as its value."""

    INPUT = "input"          # a BlockState slot
    ATTRIBUTE = "attribute"  # an attribute read (``Source.read``)

    def __str__(self) -> str:
        return self.value


@dataclass(eq=False)
class Source:
    """Where a traced float came from, and whether it may be lifted."""

    kind: SourceKind        # a BlockState slot, or an attribute read (``read``)
    name: str               # the slot's name, or the attribute's path ("components.guider.guidance_scale")
    original: float         # the value the traced call read (the object itself)
    read: Any = None        # recording.Read of an attribute
    use: str | None = None  # the first use that keeps its value guarded, and where
    linked: bool = False    # it reached a step graph as a direct operand of arithmetic
    checks: list[Check] = field(default_factory=list)  # the predicates Python evaluated on it, with their outcomes

    @property
    def lifted(self) -> bool:
        """Whether a call may read it anew: it reached the step graphs only as an operand of arithmetic, or Python
        only evaluated predicates on it (``checks``), or it is a BlockState input with no use seen (most are never
        read: a block's state holds every input). An attribute read with no use seen is not: C code may have read
        it past its methods (``from math import sqrt`` bound before the trace) into a value the graph bakes."""
        return self.use is None and (self.kind == SourceKind.INPUT or self.linked or bool(self.checks))

    @property
    def path(self) -> str:
        return f"input {self.name!r}" if self.kind == SourceKind.INPUT else self.name

    def current(self, slots: dict[str, Any]) -> Any:
        """The value a call reads: its BlockState slot, or the attribute as it is now."""
        return slots.get(self.name) if self.kind == SourceKind.INPUT else self.read.current()

    def note(self, what: str) -> None:
        if self.use is None:
            from .taint import _user_location

            self.use = f"{what} ({_user_location()})"

    def check(self, check: Check) -> None:
        if check not in self.checks:
            self.checks.append(check)

    def fits(self, value: Any) -> bool:
        """Whether a call reading ``value`` may run the plan: a float on which every predicate the traced call
        evaluated (``scale > 1``, ``math.isclose(scale, 1.0)``) comes out as it did then."""
        return type(value) is float and all(c.holds(value) for c in self.checks)

    def misfit(self, value: Any) -> str:
        """Why ``value`` does not fit (``fits`` is False)."""
        if type(value) is not float:
            return f"{self.path} is {a_type(value)}, was a float (an input of the compiled loop)"
        check = next(c for c in self.checks if not c.holds(value))
        return f"{self.path} is {value!r}: {check.text(value)}, was {check.outcome!r} when traced"


_SELF = object()  # stands for the traced float in a check's arguments


@dataclass(frozen=True)
class Check:
    """A predicate Python evaluated on a traced float, and its outcome: the plan holds while it comes out the same
    (a guidance scale on which CFG is enabled may change, as long as it stays enabled)."""

    fn: Callable
    args: tuple
    outcome: Any
    name: str

    def holds(self, value: float) -> bool:
        return self.fn(*[value if a is _SELF else a for a in self.args]) == self.outcome

    def text(self, value: float) -> str:
        return f"{self.name}({', '.join(repr(value) if a is _SELF else repr(a) for a in self.args)})"


_PLAIN = (float, int, bool)


_ACTIVE: Lifts | None = None  # the trace in progress (one at a time: recording.TRACE_LOCK)


def _noting() -> Lifts | None:
    lifts = _ACTIVE
    if lifts is None or lifts.thread != threading.get_ident() or lifts.quiet():
        return None
    return lifts


class TracedFloat(float):
    """A float a traced call read; every Python use of it other than as a tensor op's operand is noted."""

    __slots__ = ("source",)

    def __new__(cls, value: float, source: Source) -> TracedFloat:
        self = float.__new__(cls, value)
        self.source = source
        return self

    def __reduce_ex__(self, protocol):
        return float, (float(self.source.original),)

    def __copy__(self) -> float:
        return self.source.original

    def __deepcopy__(self, memo) -> float:
        return self.source.original


def _noted(name: str, binary: bool) -> Callable:
    base = getattr(float, name)
    what = {"__eq__": "compared", "__ne__": "compared", "__lt__": "compared", "__le__": "compared",
            "__gt__": "compared", "__ge__": "compared", "__bool__": "tested for truth", "__hash__": "hashed"}.get(
        name, f"used by Python ({name})")

    if name in _PREDICATES:
        def method(self, *args):
            if args and isinstance(args[0], torch.Tensor):  # `scale > tensor`: the tensor's reflected op
                return NotImplemented
            outcome = base(self, *args)
            if _noting() is not None:
                if all(type(a) in _PLAIN for a in args) and type(outcome) is bool:
                    self.source.check(Check(base, (_SELF, *args), outcome, f"float.{name}"))
                else:
                    self.source.note(what)
            return outcome
    elif binary:
        def method(self, other, *rest):
            if isinstance(other, torch.Tensor):  # `scale * tensor`: the tensor's reflected op records it
                return NotImplemented
            if _noting() is not None:
                self.source.note(what)
            return base(self, other, *rest)
    else:
        def method(self, *args):
            if _noting() is not None:
                self.source.note(what)
            return base(self, *args)
    method.__name__ = name
    return method


_PREDICATES = {"__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__bool__", "is_integer"}
_BINARY = ["__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__add__", "__radd__", "__sub__", "__rsub__",
           "__mul__", "__rmul__", "__truediv__", "__rtruediv__", "__floordiv__", "__rfloordiv__", "__mod__",
           "__rmod__", "__divmod__", "__rdivmod__", "__pow__", "__rpow__"]
_OTHER = ["__bool__", "__hash__", "__neg__", "__pos__", "__abs__", "__int__", "__float__", "__round__",
          "__trunc__", "__floor__", "__ceil__", "__format__", "__repr__", "__str__", "__getnewargs__", "is_integer",
          "as_integer_ratio", "hex", "conjugate", "__complex__"]
for _name in _BINARY + _OTHER:
    if hasattr(float, _name):
        setattr(TracedFloat, _name, _noted(_name, _name in _BINARY))


_MATH_PREDICATES = {"isclose", "isfinite", "isinf", "isnan"}


def _math_noting(fn: Callable, name: str) -> Callable:
    def call(*args, **kwargs):
        outcome = fn(*args, **kwargs)
        if _noting() is None:
            return outcome
        traced = [v for v in args if type(v) is TracedFloat]
        if (name in _MATH_PREDICATES and len(traced) == 1 and not kwargs and type(outcome) is bool
                and all(type(v) in _PLAIN or v is traced[0] for v in args)):
            checked = tuple(_SELF if v is traced[0] else v for v in args)
            traced[0].source.check(Check(fn, checked, outcome, f"math.{name}"))
        else:
            for v in [*args, *kwargs.values()]:
                if type(v) is TracedFloat:
                    v.source.note(f"passed to math.{name}")
        return outcome
    return call


class Lifts:
    """The traced floats of one trace: hands them out, and knows which may be lifted when it ends."""

    def __init__(self, enabled: bool, quiet: Callable[[], bool]) -> None:
        self.enabled = enabled
        self.quiet = quiet  # True while the tracer's own code runs (its reads and copies are not uses)
        self.thread = threading.get_ident()
        self.sources: list[Source] = []
        self._by_attribute: dict[tuple[int, str], TracedFloat] = {}

    def input(self, name: str, value: Any) -> Any:
        """A BlockState input as the traced call sees it."""
        if not self.enabled or type(value) is not float:
            return value
        source = Source(SourceKind.INPUT, name, value)
        self.sources.append(source)
        return TracedFloat(value, source)

    def attribute(self, obj: Any, name: str, value: Any, read: Any = None) -> Any:
        """``obj.name`` as the traced call sees it; ``read`` (a recording.Read) on its first read."""
        if not self.enabled or type(value) is not float:
            return value
        key = (id(obj), name)
        proxy = self._by_attribute.get(key)
        if proxy is None and read is not None:
            source = Source(SourceKind.ATTRIBUTE, read.path, value, read)
            self.sources.append(source)
            proxy = self._by_attribute[key] = TracedFloat(value, source)
        return proxy if proxy is not None and proxy.source.original is value else value

    @contextlib.contextmanager
    def active(self) -> Iterator[Lifts]:
        """For the traced call: traced floats note their uses, and so does ``math``."""
        global _ACTIVE
        patched = {}
        if self.enabled:
            for name, fn in vars(math).items():
                if callable(fn) and not name.startswith("_"):
                    patched[name] = fn
                    setattr(math, name, _math_noting(fn, name))
        previous, _ACTIVE = _ACTIVE, self
        try:
            yield self
        finally:
            _ACTIVE = previous
            for name, fn in patched.items():
                setattr(math, name, fn)


def plain(value: Any) -> Any:
    """``value`` with a traced float replaced by the float the call read."""
    return value.source.original if type(value) is TracedFloat else value


def floats_in(value: Any, depth: int = 0) -> Iterator[TracedFloat]:
    """The traced floats ``value`` holds, through plain containers."""
    if type(value) is TracedFloat:
        yield value
    elif depth < 4 and isinstance(value, (list, tuple, set, frozenset)):
        for v in value:
            yield from floats_in(v, depth + 1)
    elif depth < 4 and isinstance(value, dict):
        for v in value.values():
            yield from floats_in(v, depth + 1)
    elif depth < 4 and _user_object(value):
        yield from floats_in(vars(value), depth + 1)


def _user_object(value: Any) -> bool:
    """An object with attributes of its own that may hold a float (not a tensor, a module, a class or code)."""
    return (hasattr(value, "__dict__") and not isinstance(value, (torch.Tensor, torch.nn.Module, type))
            and not callable(value) and type(value).__module__ not in ("builtins", "types"))
