"""Lower a plan to one whole-loop function: the one table-row read and the one per-step function.

The lowered function runs every step of the plan: each *run* of consecutive steps that share a variant is a
``torch.while_loop`` whose body reads its per-step table rows at a device-side counter ``i`` and calls the
variant's fused step. The run bounds and the tables are inputs, so a new N with the same run pattern reuses
the compiled code. On CPU, Inductor with ``cpp_wrapper`` turns each while_loop into a C++ loop: no Python
per step. On CUDA the same per-step function is captured N times into one CUDA graph (backend/cudagraph.py).
"""

from __future__ import annotations

import itertools
import types
from typing import Callable

import torch
from torch._higher_order_ops.while_loop import while_loop, while_loop_op

from ..passes.loop_plan import LoopPlan

__all__ = ["row", "run_step", "named_function", "lower", "lower_lifted", "op_count", "module_ops"]


def row(table: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
    """Row ``i`` of a per-step table. table: [N, *shape], i: [] int64 -> [*shape]; ``index_select`` keeps the
    index a tensor (no ``.item()``, no host sync)."""
    return torch.index_select(table, 0, i.reshape(1)).reshape(table.shape[1:])


def run_step(module: torch.fx.GraphModule, whole_tables: bool, carried, invariants, tables,
             i: torch.Tensor, constants=()) -> list[torch.Tensor]:
    """One step of a variant (its ``module``) at step counter ``i``: its table rows (or, when the kernel pass
    made it take ``whole_tables``, the tables themselves and the counter) after the carried state and the
    invariants; a module whose constants were lifted into inputs (backend/programs.py) takes them first."""
    rows = [*tables, i] if whole_tables else [row(t, i) for t in tables]
    return list(module(*constants, *carried, *invariants, *rows))


_names = itertools.count(1)


def named_function(fn: Callable, name: str) -> Callable:
    """``fn`` with a code object of its own, named ``name_<n>``: Dynamo caches compiled code per code object, so
    each compiled loop (or step) keeps its cache entries and recompile limit to itself instead of piling them up
    on one shared function."""
    name = f"{name}_{next(_names)}"
    code = fn.__code__.replace(co_name=name)
    return types.FunctionType(code, fn.__globals__, name, None, fn.__closure__)


def _repeated_outputs(module: torch.fx.GraphModule) -> list[int]:
    """Positions of a step's outputs that repeat an earlier output (the same graph value)."""
    (output,) = [n for n in module.graph.nodes if n.op == "output"]
    values = list(output.args[0])
    return [k for k, value in enumerate(values) if value in values[:k]]


def _distinct_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` that Inductor does not merge with ``t``: Inductor's C++ wrapper (torch 2.13) crashes on a
    while_loop body that returns one value as two carried outputs, even as two ``clone()``s or two fresh buffers
    it copies into (it merges them)."""
    return t | False if t.dtype == torch.bool else t * 1


def _carried_like(carried: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """A step's output as the next step's carried value, in a fresh buffer with the carried value's strides: a
    while_loop body must return what it was given, and a step may change the memory format (a convolution of
    transposed latents). Another dtype is left to fail the while_loop's check (then the plan runs eagerly):
    casting it back would hide a dtype eager's loop changes."""
    if out.dtype != carried.dtype or out.shape != carried.shape:
        return out.clone()
    return torch.empty_strided(carried.shape, carried.stride(), dtype=carried.dtype, device=carried.device).copy_(out)


def lower(plan: LoopPlan) -> Callable:
    """The whole loop as a function ``(buffers, invariants, tables, ends, start) -> None``.

    ``buffers``/``invariants`` follow ``plan.state_slots``/``plan.invariant_slots``: the loop starts from the
    buffers' values and writes its final state back into them in place. ``tables[v]`` are variant v's lifted
    tables; ``ends[r]`` is run r's end step (an int64 tensor).
    """
    run = lower_lifted(plan, [v.module for v in plan.variants])
    none = [()] * len(plan.variants)

    def whole_loop(buffers: list[torch.Tensor], invariants: list[torch.Tensor],
                   tables: list[list[torch.Tensor]], ends: torch.Tensor, start: torch.Tensor):
        for buffer, final in zip(buffers, run(buffers, invariants, tables, ends, start, none)):
            buffer.copy_(final)

    return named_function(whole_loop, "whole_loop")


def lower_lifted(plan: LoopPlan, modules: list[torch.fx.GraphModule], export: bool = False) -> Callable:
    """The whole loop over the variants' step ``modules`` as a function ``(state, invariants, tables, ends, start,
    constants) -> final state``: ``constants[v]`` go first into variant v's module (empty unless its constants
    were lifted into inputs, backend/programs.py). Nothing is written in place.

    ``export``: for ``torch.export`` (artifacts.py), the while_loop operator is called directly with the loop's
    other tensors as its explicit inputs: ``torch.while_loop`` outside ``torch.compile`` traces its body with
    Dynamo first, a large share of a first call's time."""
    pattern = [v for v, _, _ in plan.runs]
    whole_tables = [v.whole_tables for v in plan.variants]
    repeated = [_repeated_outputs(m) for m in modules]

    def run(state, invariants, tables, ends, start, constants) -> list[torch.Tensor]:
        i, state = start, list(state)
        for r, v in enumerate(pattern):
            n, sizes = len(state), (len(invariants), len(tables[v]))
            extra = (ends[r], *invariants, *tables[v], *constants[v])

            def cond(i, *rest, n=n):
                return i < rest[n]

            def body(i, *rest, n=n, sizes=sizes, step=modules[v], whole=whole_tables[v], repeated=repeated[v]):
                carried, inv = rest[:n], rest[n + 1:n + 1 + sizes[0]]
                vt, consts = rest[n + 1 + sizes[0]:n + 1 + sum(sizes)], rest[n + 1 + sum(sizes):]
                out = run_step(step, whole, carried, inv, vt, i, consts)
                for k in repeated:  # one value for two slots (inputs that are one tensor, `y = x`)
                    out[k] = _distinct_copy(out[k])
                return (i + 1, *[_carried_like(c, o) for c, o in zip(carried, out)])

            if export:
                i, *state = while_loop_op(cond, body, (i, *state), extra)
            else:
                i, *state = while_loop(lambda *c, cond=cond, extra=extra: cond(*c, *extra),
                                       lambda *c, body=body, extra=extra: body(*c, *extra), (i, *state))
        return state

    return run


def op_count(plan: LoopPlan) -> int:
    """The ops of the lowered loop: each run's while_loop body holds its variant's step graph."""
    return sum(module_ops(plan.variants[v].module) for v, _, _ in plan.runs)


def module_ops(module: torch.fx.GraphModule) -> int:
    return sum(1 for n in module.graph.nodes if n.op == "call_function")
