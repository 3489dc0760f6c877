"""Pass: replace classifier-free guidance + a scheduler update in a fused step with one Triton kernel call.

A step traced from a guided loop ends with the guider's combine feeding the scheduler's update::

    pred = uncond + g * (cond - uncond)                   g: a literal or a per-step value
    flow-matching Euler   out = x + dt * pred
    Euler (sigma space)   out = x + (x - (x - sigma * pred)) / sigma * dt
    DDIM (eta = 0)        out = sqrt_alpha_prev * ((x - sqrt_beta * pred) / sqrt_alpha) + dir_coef * pred

(``pred`` and ``x`` possibly upcast to float32 and ``out`` cast back, as the schedulers do for half precision
models), where every coefficient is a lifted per-step value whose table is 1-D. Each match becomes one call to
``torch.ops.loopgraph.cfg_*`` (``loopgraph.kernels``), which reads the coefficients from the *whole tables* at
the device step counter. A rewritten step therefore takes ``(*state, *invariants, *tables, step)`` rather than
table rows: its other lifted values are read with ``lower.row`` inside the graph, and its variant's
``whole_tables`` is set so that ``lower.run_step`` calls it that way.

Anything else (guidance rescale, no guidance, per-sample coefficients) is left as it is.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
from typing import NamedTuple, Sequence

import torch
import torch.fx as fx

from ..backend.lower import row
from .loop_plan import LoopPlan

__all__ = ["Match", "find_guided_updates", "fuse_guided_updates", "fuse_loop_kernels"]

logger = logging.getLogger(__name__)

_ADD = {torch.Tensor.add, torch.add, operator.add, torch.Tensor.__add__, torch.Tensor.__radd__}
_SUB = {torch.Tensor.sub, torch.sub, operator.sub, torch.Tensor.__sub__}
_MUL = {torch.Tensor.mul, torch.mul, operator.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__}
_DIV = {torch.Tensor.div, torch.div, operator.truediv, torch.Tensor.__truediv__}


class Match(NamedTuple):
    """One guided update found in a step graph."""

    kernel: str                   # "cfg_flow_euler" | "cfg_euler" | "cfg_ddim"
    out: fx.Node                  # the node whose value the kernel call replaces
    latents: fx.Node
    uncond: fx.Node
    cond: fx.Node
    scale: fx.Node | float        # a lifted placeholder or a literal
    coefficients: tuple[fx.Node, ...]   # lifted placeholders, in the kernel's argument order
    nodes: tuple[fx.Node, ...]    # the pattern's own nodes (removed when nothing else uses them)


# -- matching ---------------------------------------------------------------------------------------------------
def _binary(node, ops) -> tuple | None:
    """``(a, b)`` when ``node`` is ``a <op> b`` for an op in ``ops`` (no alpha / rounding_mode keywords)."""
    if (isinstance(node, fx.Node) and node.op == "call_function" and node.target in ops
            and len(node.args) == 2 and not node.kwargs):
        return node.args
    return None


def _either_order(node, ops) -> list[tuple]:
    """Both operand orders of a commutative op (add, mul); none when ``node`` is not one."""
    args = _binary(node, ops)
    return [] if args is None else [args, args[::-1]]


def _cast(node) -> tuple[fx.Node, torch.dtype] | None:
    """``(source, dtype)`` when ``node`` is ``source.to(dtype)`` or ``source.float()``."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target is torch.Tensor.float and len(node.args) == 1 and not node.kwargs:
        return node.args[0], torch.float32
    if node.target is not torch.Tensor.to:
        return None
    if len(node.args) == 2 and not node.kwargs:
        dtype = node.args[1]
    elif len(node.args) == 1 and set(node.kwargs) == {"dtype"}:
        dtype = node.kwargs["dtype"]
    else:
        return None
    return (node.args[0], dtype) if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def _upcast(node, nodes: list) -> fx.Node:
    """The value before a ``.to(float32)``, recording the cast among the pattern's nodes."""
    cast = _cast(node)
    if cast is not None and cast[1] == torch.float32:
        nodes.append(node)
        return cast[0]
    return node


def _cfg(node, coefs: dict) -> tuple[fx.Node, fx.Node, fx.Node | float, list] | None:
    """``(uncond, cond, scale, nodes)`` when ``node`` is ``uncond + scale * (cond - uncond)``."""
    for uncond, scaled in _either_order(node, _ADD):
        for diff, scale in _either_order(scaled, _MUL):
            sub = _binary(diff, _SUB)
            literal = isinstance(scale, (int, float)) and not isinstance(scale, bool)
            if sub is not None and sub[1] is uncond and (literal or scale in coefs):
                return uncond, sub[0], scale, [node, scaled, diff]
    return None


def _same(a, b, coefs: dict) -> bool:
    """The same per-step value: one node, or two lifted values with equal tables."""
    return a is b or (a in coefs and b in coefs and torch.equal(coefs[a], coefs[b]))


def _flow_euler(node, coefs: dict) -> Match | None:
    """``x + dt * pred``."""
    for x, update in _either_order(node, _ADD):
        for dt, pred in _either_order(update, _MUL):
            nodes = [node, update]
            cfg = _cfg(_upcast(pred, nodes), coefs) if dt in coefs else None
            if cfg is not None:
                uncond, cond, scale, cfg_nodes = cfg
                return Match("cfg_flow_euler", node, _upcast(x, nodes), uncond, cond, scale, (dt,),
                             tuple(nodes + cfg_nodes))
    return None


def _euler(node, coefs: dict) -> Match | None:
    """``x + (x - (x - sigma * pred)) / sigma * dt``: the same sigma twice (equal tables if two lifted values)."""
    for x, update in _either_order(node, _ADD):
        for derivative, dt in _either_order(update, _MUL):
            quotient = _binary(derivative, _DIV)
            if dt not in coefs or quotient is None or quotient[1] not in coefs:
                continue
            diff = _binary(quotient[0], _SUB)  # x - x0
            x0 = _binary(diff[1], _SUB) if diff is not None and diff[0] is x else None  # x - sigma * pred
            if x0 is None or x0[0] is not x:
                continue
            for sigma, pred in _either_order(x0[1], _MUL):
                nodes = [node, update, derivative, quotient[0], diff[1], x0[1]]
                cfg = _cfg(_upcast(pred, nodes), coefs) if _same(sigma, quotient[1], coefs) else None
                if cfg is not None:
                    uncond, cond, scale, cfg_nodes = cfg
                    return Match("cfg_euler", node, _upcast(x, nodes), uncond, cond, scale, (sigma, dt),
                                 tuple(nodes + cfg_nodes))
    return None


def _ddim(node, coefs: dict) -> Match | None:
    """``sqrt_alpha_prev * ((x - sqrt_beta * pred) / sqrt_alpha) + dir_coef * pred``."""
    for first, second in _either_order(node, _ADD):
        for sqrt_alpha_prev, x0 in _either_order(first, _MUL):
            quotient = _binary(x0, _DIV)
            diff = _binary(quotient[0], _SUB) if quotient is not None else None  # x - sqrt_beta * pred
            if diff is None or sqrt_alpha_prev not in coefs or quotient[1] not in coefs:
                continue
            for dir_coef, pred in _either_order(second, _MUL):
                for sqrt_beta, pred_again in _either_order(diff[1], _MUL):
                    if pred_again is not pred or dir_coef not in coefs or sqrt_beta not in coefs:
                        continue
                    nodes = [node, first, second, x0, quotient[0], diff[1]]
                    cfg = _cfg(_upcast(pred, nodes), coefs)
                    if cfg is not None:
                        uncond, cond, scale, cfg_nodes = cfg
                        return Match("cfg_ddim", node, _upcast(diff[0], nodes), uncond, cond, scale,
                                     (sqrt_beta, quotient[1], sqrt_alpha_prev, dir_coef), tuple(nodes + cfg_nodes))
    return None


def _coefficients(gm: fx.GraphModule, tables: Sequence[torch.Tensor], device: torch.device) -> dict:
    """Lifted placeholders (the last ``len(tables)``) whose table is a 1-D float table on ``device``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    lifted = placeholders[len(placeholders) - len(tables):] if tables else []
    return {node: table for node, table in zip(lifted, tables)
            if table.ndim == 1 and table.is_floating_point() and table.device == device}


def find_guided_updates(gm: fx.GraphModule, tables: Sequence[torch.Tensor], *,
                        device: torch.device | str = "cpu") -> list[Match]:
    """The guided updates in ``gm`` that a kernel can replace (see the module docstring).

    ``tables`` are the step's lifted tables, one per trailing placeholder; only coefficients whose table is 1-D
    and on ``device`` qualify.
    """
    coefs = _coefficients(gm, tables, torch.device(device))
    matches, taken = [], set()
    for node in reversed(gm.graph.nodes):  # outermost first: a cast back to half precision before its update
        if node in taken or node.op != "call_function":
            continue
        cast = _cast(node)
        nodes = [node] if cast is not None else []
        inner = cast[0] if cast is not None else node
        for find in (_euler, _ddim, _flow_euler):
            found = find(inner, coefs)
            if found is not None:
                found = found._replace(out=node, nodes=tuple(nodes) + found.nodes)
                matches.append(found)
                taken.update(found.nodes)
                break
    return matches


# -- rewriting --------------------------------------------------------------------------------------------------
def fuse_guided_updates(gm: fx.GraphModule, tables: Sequence[torch.Tensor], *,
                        device: torch.device | str = "cpu") -> tuple[fx.GraphModule, bool]:
    """Replace each guided update in ``gm`` by a fused kernel call.

    Args:
        gm: a fused step (``Variant.module``): ``(*state, *invariants, *lifted rows) -> state``.
        tables: the step's lifted tables (``Variant.tables``), one per trailing placeholder.
        device: the loop's device; coefficient tables elsewhere are not matched.

    Returns:
        ``(module, changed)``. When changed, ``module`` is a new GraphModule (``gm`` is left as it was) that takes
        ``(*state, *invariants, *tables, step)`` (call it with whole tables); otherwise ``gm``.
    """
    matches = find_guided_updates(gm, tables, device=device)
    if not matches:
        return gm, False
    # each kernel module registers its torch.ops.loopgraph.* op when imported (and imports Triton)
    from loopgraph.kernels import cfg_ddim, cfg_euler, cfg_flow_euler  # noqa: F401

    graph = fx.Graph()
    copied: dict[fx.Node, fx.Node] = {}
    graph.output(graph.graph_copy(gm.graph, copied))
    new = fx.GraphModule(gm, graph, class_name=type(gm).__name__)  # shares gm's weights, not its graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    with graph.inserting_after(placeholders[-1]):
        step = graph.placeholder("step")
    for table in reversed(placeholders[len(placeholders) - len(tables):]):
        with graph.inserting_after(step):  # the lifted value's other readers now read its row at `step`
            value = graph.call_function(row, (table, step))
        table.replace_all_uses_with(value, delete_user_cb=lambda user, value=value: user is not value)
    for k, match in enumerate(matches):
        scale = copied.get(match.scale) if isinstance(match.scale, fx.Node) else None
        with graph.inserting_before(copied[match.out]):
            if scale is None:  # a literal guidance scale: a [1] table, the same every step
                new.register_buffer(f"guidance_scale_{k}", torch.tensor([float(match.scale)], device=device),
                                    persistent=False)
                scale = graph.get_attr(f"guidance_scale_{k}")
            args = [copied[n] for n in (match.latents, match.uncond, match.cond)]
            kernel = getattr(torch.ops.loopgraph, match.kernel).default
            call = graph.call_function(kernel, (*args, scale, *[copied[c] for c in match.coefficients], step))
        copied[match.out].replace_all_uses_with(call)
    graph.eliminate_dead_code()
    graph.lint()
    new.recompile()
    return new, True


def fuse_loop_kernels(plan: LoopPlan, device: torch.device) -> tuple[LoopPlan, int]:
    """``fuse_guided_updates`` on every variant of ``plan``: a new plan (``plan`` is left as it was) whose
    rewritten variants take whole tables, and the number of kernel calls."""
    calls, variants = 0, []
    for k, variant in enumerate(plan.variants):
        try:
            module, changed = fuse_guided_updates(variant.module, variant.tables, device=device)
        except Exception as e:
            raise RuntimeError(f"kernel pass (fuse_guided_updates) failed on variant {k} (steps "
                               f"{variant.steps[0]}-{variant.steps[-1]}): {e}; compile with fused_kernels=False "
                               f"to skip it") from e
        if changed:
            variant = dataclasses.replace(variant, module=module, whole_tables=True)
            found = sum(1 for n in module.graph.nodes if getattr(n.target, "namespace", None) == "loopgraph")
            calls += found
            logger.info("variant %d: %d guided update(s) replaced by fused Triton kernels", k, found)
        variants.append(variant)
    return dataclasses.replace(plan, variants=variants), calls
