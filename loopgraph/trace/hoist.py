"""Data-dependent Python on loop-invariant inputs, evaluated once per call instead of making a block eager.

``if torch.all(image_embeds == 0):`` (HunyuanVideo 1.5), ``if noisy_mask.sum() > 0:`` (Cosmos),
``mask.tolist()``: Python that needs a tensor's values cannot be a graph op. When those values derive only from
BlockState inputs that no step writes (masks, embeddings), the outcome is the same at every step of a call: the
tracer takes the traced outcome (the branch it took, the list, the indices) as a constant of the step graph and
keeps a ``Hoisted`` check: the ops from those inputs to the value, copied out of the step graph. A plan is
reused only when every check gives the traced outcome again on the call's own inputs (``PlanGuard``); another
outcome re-plans. An input a step writes after all makes the check a problem again (``settle``): that block runs
eagerly, as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx

__all__ = ["HOISTABLE", "Hoisted", "NotHoistable", "extract", "same_outcome"]

# The data-dependent ops whose outcome is a Python value or a tensor a check can compare (not `numpy()`, whose array
# shares the tensor's memory, nor `repr`/`format`)
HOISTABLE = frozenset({
    "item", "__bool__", "__int__", "__float__", "__index__", "__complex__", "tolist", "nonzero", "nonzero_static",
    "argwhere", "is_nonzero", "equal", "allclose", "_local_scalar_dense", "masked_select", "unique",
    "unique_consecutive", "bincount",
})


class NotHoistable(Exception):
    """The value depends on more than BlockState inputs (a carried component tensor, a seed, a lifted float)."""


@dataclass(frozen=True)
class _Arg:
    """Where the k-th computed tensor goes in the op's arguments."""

    k: int


@dataclass(frozen=True)
class Hoisted:
    """One data-dependent op on values computed from BlockState inputs only, and what it gave when traced."""

    name: str                       # the op: "__bool__", "tolist", "nonzero", ...
    where: str                      # file:line of the user code that did it
    block: str | None
    func: Callable
    template: tuple                 # (args, kwargs) with ``_Arg(k)`` in place of the computed tensors
    module: fx.GraphModule          # the slots (``inputs``, in order) -> the computed tensors
    inputs: tuple[str, ...]         # BlockState slots it reads
    outcome: Any                    # what the op gave when traced

    def now(self, slots: dict[str, Any]) -> Any:
        """What the op gives on the call's inputs ``slots``."""
        values = self.module(*[slots[name] for name in self.inputs])
        args, kwargs = _fill(self.template, values)
        with torch.no_grad():
            return self.func(*args, **kwargs)

    def holds(self, slots: dict[str, Any]) -> bool:
        try:
            return same_outcome(self.now(slots), self.outcome)
        except Exception:  # an input missing or of another shape: the plan does not fit
            return False

    def check(self, slots: dict[str, Any]) -> str | None:
        if self.holds(slots):
            return None
        try:
            now = _shown(self.now(slots))
        except Exception as e:
            now = f"an error ({type(e).__name__})"
        return (f"the data-dependent `{self.name}` at {self.where} (block {self.block!r}, on input "
                f"{', '.join(map(repr, self.inputs))}) gives {now} now, {_shown(self.outcome)} when traced")

    def key(self) -> tuple:
        """Equal for the same op on the same computation (the same site in each step): one check for all."""
        constants = tuple(sorted((k, id(v)) for k, v in vars(self.module).items() if isinstance(v, torch.Tensor)))
        return (self.where, self.name, self.inputs, self.module.code, constants, _shown(self.outcome))


def extract(graph: fx.Graph, constants: dict[str, torch.Tensor], nodes: list[fx.Node], slots: dict[str, str]) -> tuple[
        fx.GraphModule, tuple[str, ...]]:
    """The ops of ``graph`` that compute ``nodes`` from its placeholders, as a module of its own taking BlockState
    slots (``slots``: placeholder -> the slot it holds); raises ``NotHoistable`` when one of those placeholders is
    not a BlockState slot or an op takes a lifted float."""
    needed: set[fx.Node] = set()
    stack = list(nodes)
    mutations = [n for n in graph.nodes if n.meta.get("mutates")]  # in-place ops: the graph's order carries them
    while stack:
        while stack:
            node = stack.pop()
            if node in needed:
                continue
            needed.add(node)
            if node.op == "placeholder" and node.target not in slots:
                raise NotHoistable(f"depends on {node.target!r}, which is not a BlockState input")
            if node.op not in ("placeholder", "get_attr", "call_function", "call_method") or node.meta.get("sources"):
                raise NotHoistable(f"node {node.name} ({node.op}) cannot be copied out of the step")
            stack.extend(node.all_input_nodes)
        # an in-place op on a tensor the value is computed from (``mask[idx] = True``) is part of it too
        stack = [n for n in mutations if n not in needed and any(a in needed for a in n.all_input_nodes[:1])]
    new = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs: dict[str, fx.Node] = {}
    for node in graph.nodes:
        if node in needed and node.op == "placeholder":
            slot = slots[node.target]
            if slot not in inputs:  # (a slot's name need not be an identifier: `local_d:['k']`, `x[0]`)
                inputs[slot] = new.placeholder(f"input_{len(inputs)}")
            env[node] = inputs[slot]
        elif node in needed:
            env[node] = new.node_copy(node, lambda n: env[n])
    new.output(tuple(env[n] for n in nodes))
    root = {n.target: constants[n.target] for n in needed if n.op == "get_attr"}
    return fx.GraphModule(root, new), tuple(inputs)


def same_outcome(now: Any, then: Any) -> bool:
    if isinstance(then, torch.Tensor):
        return (isinstance(now, torch.Tensor) and now.shape == then.shape and now.dtype == then.dtype
                and torch.equal(now, then))
    if isinstance(then, (list, tuple)):
        return (type(now) is type(then) and len(now) == len(then)
                and all(same_outcome(a, b) for a, b in zip(now, then)))
    return type(now) is type(then) and now == then


def template_of(value: Any, node_of: Callable[[Any], fx.Node | None], nodes: list[fx.Node]) -> Any:
    """``value`` (an op's arguments) with each computed tensor replaced by ``_Arg(k)``, its node appended to
    ``nodes``."""
    if type(value) in (tuple, list):
        return type(value)(template_of(v, node_of, nodes) for v in value)
    if type(value) is dict:
        return {k: template_of(v, node_of, nodes) for k, v in value.items()}
    node = node_of(value) if isinstance(value, torch.Tensor) else None
    if node is None:
        return value
    nodes.append(node)
    return _Arg(len(nodes) - 1)


def _fill(value: Any, values: tuple) -> Any:
    if type(value) in (tuple, list):
        return type(value)(_fill(v, values) for v in value)
    if type(value) is dict:
        return {k: _fill(v, values) for k, v in value.items()}
    return values[value.k] if isinstance(value, _Arg) else value


def _shown(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}" if value.numel() > 8 else f"{value.tolist()!r}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
