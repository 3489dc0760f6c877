"""The data a pipeline passes around: parameter declarations, component specs and the two states.

Semantics follow diffusers 0.42's ``modular_pipelines`` (see ``shared/reference/diffusers-modular-api.md``
§2.6–2.9), with one deliberate difference: ``BlockState`` equality compares contents (diffusers' dataclass
with no fields makes any two block states equal).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["InputParam", "OutputParam", "ComponentSpec", "ConfigSpec", "PipelineState", "BlockState"]


@dataclass
class InputParam:
    """An input a block reads from the pipeline state.

    ``name=None`` with a ``kwargs_type`` means "every value tagged with that kwargs type".
    """

    name: str | None = None
    type_hint: Any = None
    default: Any = None
    required: bool = False
    description: str = ""
    kwargs_type: str | None = None
    metadata: dict | None = None
    defaults_by_block: dict | None = None

    def __repr__(self) -> str:
        if self.name is None and self.kwargs_type is not None:
            return f"<*{self.kwargs_type}>"
        return f"<{self.name}: {'required' if self.required else 'optional'}, default={self.default!r}>"


@dataclass
class OutputParam:
    """A value a block publishes to the pipeline state (tagged with ``kwargs_type`` when set)."""

    name: str
    type_hint: Any = None
    description: str = ""
    kwargs_type: str | None = None
    metadata: dict | None = None

    def __repr__(self) -> str:
        type_name = getattr(self.type_hint, "__name__", None) if self.type_hint is not None else "Any"
        return f"<{self.name}: {type_name}>"


@dataclass(eq=False)
class ComponentSpec:
    """How to make a component. Equality is ``(name, load_id, default_creation_method)`` as in diffusers.

    loopgraph never downloads: ``create()`` builds from config; ``load()`` explains what to do instead.
    """

    name: str | None = None
    type_hint: type | None = None
    description: str | None = None
    config: dict | None = None
    pretrained_model_name_or_path: str | None = None
    subfolder: str | None = ""
    variant: str | None = None
    revision: str | None = None
    default_creation_method: str = "from_pretrained"
    repo: str | None = None

    def __post_init__(self) -> None:
        if self.default_creation_method not in ("from_config", "from_pretrained"):
            raise ValueError(
                f"ComponentSpec {self.name!r}: default_creation_method must be 'from_config' or "
                f"'from_pretrained', got {self.default_creation_method!r}"
            )
        if self.repo is not None and self.pretrained_model_name_or_path is None:
            self.pretrained_model_name_or_path = self.repo

    @property
    def load_id(self) -> str:
        if self.default_creation_method == "from_config":
            return "null"
        parts = [self.pretrained_model_name_or_path, self.subfolder, self.variant, self.revision]
        return "|".join("null" if p is None else str(p) for p in parts)

    def _key(self) -> tuple:
        return (self.name, self.load_id, self.default_creation_method)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ComponentSpec) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def create(self, config: dict | None = None, **kwargs: Any) -> Any:
        """Build the component from ``config`` (or the spec's own) with ``type_hint``."""
        if self.type_hint is None:
            raise ValueError(f"ComponentSpec {self.name!r} has no type_hint, so it cannot create the component")
        config = dict(config or self.config or {})
        config.update(kwargs)
        from_config = getattr(self.type_hint, "from_config", None)
        component = from_config(config) if callable(from_config) else self.type_hint(**config)
        try:
            component._diffusers_load_id = "null"
        except AttributeError:  # objects with __slots__ cannot be tagged; the tag is informational only
            pass
        return component

    def load(self, **kwargs: Any) -> Any:
        raise NotImplementedError(
            f"ComponentSpec {self.name!r}: loopgraph does not download weights. Build the component yourself "
            f"(e.g. from a config with seeded random weights) and pass it to pipe.update_components({self.name}=...)."
        )


@dataclass
class ConfigSpec:
    """A pipeline-level configuration value, registered into ``pipe.config``."""

    name: str
    default: Any = None
    description: str | None = None


def _summary(value: Any) -> str:
    """A short, tensor-aware rendering for state reprs."""
    if isinstance(value, torch.Tensor):
        return f"Tensor(dtype={value.dtype}, shape={tuple(value.shape)})"
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
        kind = type(value).__name__
        return f"{kind}[{len(value)}] of Tensors with shapes {[tuple(v.shape) for v in value]}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_summary(v)}" for k, v in value.items()) + "}"
    return repr(value)


_ATOMS = {int, float, bool, str, type(None)}


def _atoms_only(values: list | tuple) -> bool:
    return set(map(type, values)) <= _ATOMS  # map/set run in C: no Python call per element


_NUMBERS = (bool, int, float, complex)


def _is_array(value: Any) -> bool:
    return type(value).__module__ == "numpy" and hasattr(value, "shape") and hasattr(value, "dtype")


def values_equal(a: Any, b: Any) -> bool:
    """Structural equality that treats tensors by value (same dtype, shape and elements)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype
            and a.device == b.device
            and torch.equal(a, b)
        )
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and _atoms_only(a) and _atoms_only(b):
        # C-level comparisons: cost does not grow with N in Python; 1 == 1.0, but not as a tensor's operand
        return type(a) is type(b) and a == b and list(map(type, a)) == list(map(type, b))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(values_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(values_equal(a[k], b[k]) for k in a)
    if a is b:
        return True
    if _is_array(a) or _is_array(b):  # a numpy array made anew per call (Helios' sigmas): by dtype, shape, values
        return (_is_array(a) and _is_array(b) and a.dtype == b.dtype and a.shape == b.shape
                and a.tobytes() == b.tobytes())  # bytewise: NaN equals NaN
    if isinstance(a, _NUMBERS) and type(a) is not type(b):  # 1, 1.0 and True are ==, but give other dtypes
        return False
    try:
        return bool(a == b)
    except Exception:  # objects whose == does not give a truth value are equal only when identical
        return False


@dataclass
class PipelineState:
    """All values of one pipeline run, in one flat namespace, plus which keys carry which kwargs type."""

    values: dict[str, Any] = field(default_factory=dict)
    kwargs_mapping: dict[str, list[str]] = field(default_factory=dict)

    def set(self, key: str, value: Any, kwargs_type: str | None = None) -> None:
        self.values[key] = value
        if kwargs_type is not None:
            # diffusers appends on every set, so a key set twice is listed twice; readers dedupe by name.
            self.kwargs_mapping.setdefault(kwargs_type, []).append(key)

    def get(self, keys: str | list[str], default: Any = None) -> Any:
        if isinstance(keys, str):
            return self.values.get(keys, default)
        return {key: self.values.get(key, default) for key in keys}

    def get_by_kwargs(self, kwargs_type: str) -> dict[str, Any]:
        return self.get(self.kwargs_mapping.get(kwargs_type, []))

    def to_dict(self) -> dict[str, Any]:
        return {"values": self.values, "kwargs_mapping": self.kwargs_mapping}

    def __getattr__(self, name: str) -> Any:
        # object.__getattribute__ keeps deepcopy/pickle (which probe attributes before __init__) from recursing.
        try:
            values = object.__getattribute__(self, "values")
        except AttributeError:
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'") from None
        if name in values:
            return values[name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __repr__(self) -> str:
        values = "\n".join(f"    {k}: {_summary(v)}" for k, v in self.values.items())
        mapping = "\n".join(f"    {k}: {v}" for k, v in self.kwargs_mapping.items())
        return f"PipelineState(\n  values={{\n{values}\n  }},\n  kwargs_mapping={{\n{mapping}\n  }}\n)"


class BlockState:
    """The attribute bag one block (or one whole loop) works on.

    ``bs["x"]`` returns None for a missing key, ``bs.x`` raises ``AttributeError``. Two block states are equal
    when they hold the same names with equal values (tensors compared by value).
    """

    def __init__(self, **kwargs: Any) -> None:
        for key, value in kwargs.items():
            setattr(self, key, value)

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key, None)

    def __setitem__(self, key: str, value: Any) -> None:
        setattr(self, key, value)

    def __contains__(self, key: str) -> bool:
        return key in self.__dict__

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockState):
            return NotImplemented
        return values_equal(self.__dict__, other.__dict__)

    __hash__ = None  # mutable and compared by contents

    def __repr__(self) -> str:
        attributes = "\n".join(f"    {k}: {_summary(v)}" for k, v in self.__dict__.items())
        return f"BlockState(\n{attributes}\n)"


def combine_outputs(*named_outputs: tuple[str, list[OutputParam]]) -> list[OutputParam]:
    """First occurrence of a name wins, except that a later param with a kwargs_type replaces one without."""
    combined: dict[str, OutputParam] = {}
    for _, outputs in named_outputs:
        for out in outputs:
            if out.name not in combined or (combined[out.name].kwargs_type is None and out.kwargs_type is not None):
                combined[out.name] = out
    return list(combined.values())


def combine_inputs(*named_inputs: tuple[str, list[InputParam]]) -> list[InputParam]:
    """Union of branch inputs keyed by name (``*_<kwargs_type>`` for kwargs-only params).

    When branches disagree on a default, the merged param gets ``default=None`` and ``defaults_by_block``.
    """
    combined: dict[str, InputParam] = {}
    defaults: dict[str, dict[str, Any]] = {}
    for block_name, inputs in named_inputs:
        for param in inputs:
            key = param.name if param.name is not None else f"*_{param.kwargs_type}"
            if param.defaults_by_block:
                new = {f"{block_name}.{k}": v for k, v in param.defaults_by_block.items()}
            else:
                new = {block_name: param.default}
            if key not in combined:
                combined[key], defaults[key] = param, new
                continue
            defaults[key].update(new)
            seen = list(defaults[key].values())
            if any(not values_equal(d, seen[0]) for d in seen[1:]):
                combined[key] = dataclasses.replace(combined[key], default=None, defaults_by_block=dict(defaults[key]))
    return list(combined.values())
