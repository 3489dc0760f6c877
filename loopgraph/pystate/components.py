"""The components a loop reaches, and how compiled calls put their state back: the objects (``component_objects``)
and the loop tensors they hold (``component_tensors``), an attribute's value as an attribute read finds it
(``value_of``), setting one back (``set_attribute``, ``put``)."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from .snapshots import ABSENT

__all__ = ["component_objects", "component_tensors", "put", "set_attribute", "slot_aliases", "value_of"]


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


_TORCH_GLOBAL_HOOKS = ("_global_backward_pre_hooks", "_global_backward_hooks", "_global_forward_hooks",
                       "_global_forward_pre_hooks", "_global_forward_hooks_always_called",
                       "_global_forward_hooks_with_kwargs")


def _class_lookup(cls: type, name: str) -> tuple[type, Any] | None:
    """The class in ``cls``'s MRO that defines ``name``, and the value it holds there."""
    for klass in cls.__mro__:
        attrs = klass.__dict__
        if name in attrs:
            return klass, attrs[name]
    return None


# -- component state that the loop carries (a scheduler's history) ----------------------------------------------------
def component_objects(wrapper, components) -> dict[str, Any]:
    """The components that keep Python state (schedulers, guiders: every non-module one): the wrapper's declared
    ones, then the pipeline's others (a scheduler a loop block uses without declaring it keeps its history too)."""
    names = [spec.name for spec in wrapper.expected_components]
    every = getattr(components, "components", None)  # a ModularPipeline's (loopgraph's, diffusers')
    if isinstance(every, dict):
        names += list(every)
    elif hasattr(components, "__dict__"):  # a plain bag of components
        names += [name for name in vars(components) if not name.startswith("_")]
    found = {}
    for name in names:
        obj = getattr(components, name, None)
        if obj is not None and not isinstance(obj, torch.nn.Module) and hasattr(obj, "__dict__"):
            found.setdefault(name, obj)
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


def slot_aliases(objects: dict[str, Any], slots: dict[str, Any]) -> frozenset:
    """(path, slot) for each component tensor that is a BlockState slot's tensor (a scheduler's timesteps handed to
    the loop as its own input): the step reads it through the slot, so a plan holds only while the same ones are
    one tensor."""
    ids = {id(v): k for k, v in slots.items() if isinstance(v, torch.Tensor)}
    return frozenset((path, ids[id(t)]) for path, t in component_tensors(objects).values() if id(t) in ids)


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
