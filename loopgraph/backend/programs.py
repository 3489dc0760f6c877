"""The programs stored as AOTInductor packages (backend/artifacts.py), one per way a plan runs:

    WholeLoopProgram   the lowered loop (lower.lower_lifted): every step, while_loops, a C++ loop on CPU
    StepProgram        one step at a device counter, for the whole-loop CUDA graph (backend/cudagraph.py)
    SegmentProgram     one compiled segment's step graph, between eager blocks (runtime/eager_segments.py)

Each says how a call's arguments become flat tensor inputs (``flatten``), how the exported code runs on them
(``run_flat``), what the call returns (``finish``), and the code the cache key covers (``code``).

Weights are not in the package. A step graph's constants (the model's parameters and buffers, the scheduler's
tensors) are *lifted* (``lift_constants``): they become leading inputs of the exported program, and every call
passes the step graphs' own tensors, so the code reads the live parameters (an in-place update is seen, as with
torch.compile) and one package serves any weights of the same shapes.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.fx as fx

from ..passes.loop_plan import LoopPlan
from .lower import lower_lifted, run_step

__all__ = ["WholeLoopProgram", "StepProgram", "SegmentProgram", "lift_constants"]


def lift_constants(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[str]]:
    """A copy of ``gm`` whose tensor attributes (parameters, buffers) are its leading inputs, one per distinct
    tensor, and their attribute names in ``gm`` in that order. Raises ``TypeError`` on an attribute that is not a
    tensor (it could not be passed in)."""
    graph = copy.deepcopy(gm.graph)
    first = next(iter(graph.nodes))
    names: list[str] = []
    inputs: dict[int, fx.Node] = {}
    for node in [n for n in graph.nodes if n.op == "get_attr"]:
        value = _attr(gm, node.target)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"step graph attribute {node.target!r} is a {type(value).__name__}, not a tensor")
        if id(value) not in inputs:
            with graph.inserting_before(first):
                inputs[id(value)] = graph.placeholder(f"constant_{len(names)}")
            names.append(node.target)
        node.replace_all_uses_with(inputs[id(value)])
        graph.erase_node(node)
    return fx.GraphModule(torch.nn.Module(), graph), names


def _attr(module: torch.nn.Module, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    return module


class _Lifted:
    """A step graph with its constants lifted: the lifted module, and how to read the constants' live values."""

    def __init__(self, module: fx.GraphModule) -> None:
        self.source = module
        self.module, self.names = lift_constants(module)
        self.code = self.module.code

    def constants(self) -> list[torch.Tensor]:
        return [_attr(self.source, name) for name in self.names]


class WholeLoopProgram:
    """The lowered loop over flat inputs: every variant's constants, the state, the invariants, every variant's
    tables, ends, start -> the final state. Called like lower.lower's function: ``(buffers, invariants, tables,
    ends, start)``, the final state written into ``buffers``."""

    kind = "whole loop"

    def __init__(self, plan: LoopPlan) -> None:
        self.steps = [_Lifted(v.module) for v in plan.variants]
        self.run = lower_lifted(plan, [s.module for s in self.steps], export=True)
        self.code = [s.code for s in self.steps] + [repr([v for v, _, _ in plan.runs]),
                                                    repr([v.whole_tables for v in plan.variants])]
        self.describe = f"whole loop: {len(plan.variants)} step graph(s), runs {[v for v, _, _ in plan.runs]}"

    def flatten(self, buffers, invariants, tables, ends, start) -> tuple[list[torch.Tensor], list[int], tuple]:
        """The flat inputs, which of them are tables (their length N is dynamic), and the sizes of their groups."""
        constants = [c for s in self.steps for c in s.constants()]
        counts = ([len(s.names) for s in self.steps], len(buffers), len(invariants), [len(vt) for vt in tables])
        flat = [*constants, *buffers, *invariants, *(t for vt in tables for t in vt), ends, start]
        first = len(constants) + len(buffers) + len(invariants)
        return flat, list(range(first, first + sum(map(len, tables)))), counts

    def run_flat(self, counts: tuple, flat: list) -> tuple:
        n_consts, n_state, n_inv, n_tables = counts
        constants = [_take(flat, n) for n in n_consts]
        state, invariants = _take(flat, n_state), _take(flat, n_inv)
        tables = [_take(flat, n) for n in n_tables]
        ends, start = flat
        return tuple(self.run(state, invariants, tables, ends, start, constants))

    def finish(self, args, outputs):
        for buffer, final in zip(args[0], outputs):
            buffer.copy_(final)


class StepProgram:
    """One step of a variant at a device counter, ``(carried, invariants, tables, i) -> outputs``: the whole-loop
    CUDA graph's step (backend/cudagraph.py)."""

    kind = "step"

    def __init__(self, module: fx.GraphModule, whole_tables: bool) -> None:
        self.step, self.whole_tables = _Lifted(module), whole_tables
        self.code = [self.step.code, repr(whole_tables)]
        self.describe = "one step graph"

    def flatten(self, carried, invariants, tables, i):
        constants = self.step.constants()
        counts = (len(constants), len(carried), len(invariants), len(tables))
        first = len(constants) + len(carried) + len(invariants)
        return [*constants, *carried, *invariants, *tables, i], list(range(first, first + len(tables))), counts

    def run_flat(self, counts: tuple, flat: list) -> tuple:
        constants, carried, invariants, tables = (_take(flat, n) for n in counts)
        return tuple(run_step(self.step.module, self.whole_tables, carried, invariants, tables, flat[0], constants))

    def finish(self, args, outputs):
        return list(outputs)


class SegmentProgram:
    """A compiled segment's step graph, ``(*inputs, *table rows) -> outputs`` (runtime/eager_segments.py)."""

    kind = "segment step"

    def __init__(self, module: fx.GraphModule) -> None:
        self.step = _Lifted(module)
        self.code = [self.step.code]
        self.describe = "one segment step graph"

    def flatten(self, *args):
        return [*self.step.constants(), *args], [], ()

    def run_flat(self, counts: tuple, flat: list) -> tuple:
        return tuple(self.step.module(*flat))

    def finish(self, args, outputs):
        return outputs


def _take(flat: list, n: int) -> list:
    taken = flat[:n]
    del flat[:n]
    return taken
