"""Pass "batch calls": repeated calls of one model in a step become one call on the concatenated batch.

While tracing, ``trace.calls.CallWatcher`` found the calls of a module that can share a batch and traced them
batched (``BatchedCall``). This pass rewrites a copy of each step's graph: the calls' regions give way to the
batched one, its outputs split back along dim 0. It returns a new trace (the traced one is left as it was): the
plan's guard is built from it, so the constants the batched calls add are among those it checks by identity. A
call that cannot join a batch keeps its own region, and why is said in ``CallSite.reason`` (``explain()``,
``last_plan.batching``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ..trace.calls import BatchedCall
from ..trace.ir import LoopTrace, StepTrace, TensorUse

__all__ = ["CallSite", "batch_calls", "describe_sites", "step_ranges"]


@dataclass(frozen=True)
class CallSite:
    """A module called more than once per step in one block, over the whole loop: batched or why not."""

    module: str
    block: str | None
    calls: int                       # calls per step (the most seen)
    batched_steps: tuple[int, ...]
    other_steps: tuple[int, ...]     # steps where the calls ran apart
    reason: str | None               # why they ran apart (the first reason seen)


def batch_calls(trace: LoopTrace) -> tuple[LoopTrace, list[CallSite], str]:
    """A new trace whose step graphs run each ``BatchedCall``'s calls as the batched call, its outputs split back
    along dim 0 (``trace`` is left as it was). Returns it, the call sites (batched or why not) and a one-line
    summary. A float the batched call bakes is guarded by value in the new trace (its own copies of the floats)."""
    if not any(step.batched for step in trace.steps):
        sites = _sites(trace.steps)
        return trace, sites, _summary(sites)
    sources = {id(s): dataclasses.replace(s) for s in trace.floats}  # every step's graph reads the copies
    usage = trace.usage and TensorUse(trace.usage.used, trace.usage.eager, set(trace.usage.const))
    steps = [step.copied(sources) for step in trace.steps]
    for step in steps:
        for key, batch in list(step.batched.items()):
            reason = _splice(step, batch, usage)
            if reason is not None:
                del step.batched[key]
                step.unbatched.append((batch.calls[-1], reason))
    new = dataclasses.replace(trace, steps=steps, usage=usage, floats=list(sources.values()))
    sites = _sites(steps)
    return new, sites, _summary(sites)


def _summary(sites: list[CallSite]) -> str:
    if not sites:
        return "no model called more than once per step"
    batched = [s for s in sites if s.batched_steps]
    text = "; ".join(f"{s.module} x{s.calls} in {len(s.batched_steps)} step(s)" for s in batched) or "none"
    apart = len(sites) - len(batched)
    return f"batched: {text}" + (f"; {apart} call site(s) left apart" if apart else "")


def _sites(steps: list[StepTrace]) -> list[CallSite]:
    found: dict[tuple, dict] = {}
    for step in steps:
        for batch in step.batched.values():
            call = batch.calls[0]
            site = found.setdefault((call.name, call.block), {"calls": 0, "batched": [], "other": [], "reason": None})
            site["calls"] = max(site["calls"], len(batch.calls))
            site["batched"].append(step.index)
        for call, reason in step.unbatched:
            site = found.setdefault((call.name, call.block), {"calls": 0, "batched": [], "other": [], "reason": None})
            site["calls"] = max(site["calls"], sum(c.module is call.module for c in step.calls))
            if step.index not in site["other"]:
                site["other"].append(step.index)
            site["reason"] = site["reason"] or reason
    return [CallSite(name, block, s["calls"], tuple(s["batched"]), tuple(s["other"]), s["reason"])
            for (name, block), s in found.items()]


def step_ranges(steps: list[int]) -> str:
    spans, start = [], steps[0]
    for a, b in zip(steps, steps[1:] + [None]):
        if b != a + 1:
            spans.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(spans)


def describe_sites(sites: list[CallSite]) -> list[str]:
    """``explain()``'s lines on batched calls."""
    lines = []
    for s in sites:
        where = f"{s.module} in block {s.block!r}"
        if s.batched_steps:
            steps = step_ranges(list(s.batched_steps))
            lines.append(f"  {where}: {s.calls} calls per step as one batched call in steps {steps}")
        if s.other_steps:
            lines.append(f"  {where}: not batched in steps {step_ranges(list(s.other_steps))}: {s.reason}")
    return lines


class _Constants:
    """Adds tensors to a step's constants (``StepTrace.add_constant``), each once, and to the constants a plan's
    guard checks by identity (``TensorUse.const``)."""

    def __init__(self, step: StepTrace, usage: TensorUse | None) -> None:
        self.step, self.usage = step, usage
        self.names = {tid: name for name, tid in step.stable.items()}

    def node(self, graph: fx.Graph, tensor: torch.Tensor) -> fx.Node:
        name = self.names.get(id(tensor))
        if name is None or self.step.constants[name] is not tensor:
            name = self.names[id(tensor)] = self.step.add_constant(tensor)
            if self.usage is not None:
                self.usage.const.add(id(tensor))
        return graph.get_attr(name)


def _batched_floats(batch: BatchedCall) -> tuple[dict[fx.Node, dict], set[tuple[fx.Node, Any]]]:
    """The traced floats (trace/floats.py) the batched call's ops read, and the calls' (node, position) they stand for.

    The batched call is traced after the calls (the floats are plain there); when its ops are the calls' ops in
    order (only the batch size changed), an op whose calls all read the same float at a position reads it there
    too. Any other float the calls read is baked by the batched call (``_splice`` guards it by value)."""
    ops = [n for n in batch.graph.nodes if n.op == "call_function"]
    per_call = [[n for n in c.nodes if n.op == "call_function"] for c in batch.calls]
    if any(len(nodes) != len(ops) or any(a.target != b.target for a, b in zip(nodes, ops)) for nodes in per_call):
        return {}, set()
    carried, covered = {}, set()
    for k, op in enumerate(ops):
        first = per_call[0][k].meta.get("sources")
        if first and all(nodes[k].meta.get("sources") == first for nodes in per_call[1:]):
            carried[op] = dict(first)
            covered |= {(nodes[k], pos) for nodes in per_call for pos in first}
    return carried, covered


def _splice(step: StepTrace, batch: BatchedCall, usage: TensorUse | None) -> str | None:
    """Replace the calls' regions in ``step.graph`` by the batched call; None when done, else why not (and the
    graph untouched)."""
    graph, calls = step.graph, batch.calls
    region = {n for c in calls for n in c.nodes}
    outs = {n for c in calls for n in c.out_nodes if n is not None}
    for n in region:
        if n not in outs and any(u not in region for u in n.users):
            return "a value computed inside the call is used outside it (not one of its outputs)"
    refs = [*step.outputs.values(), *(n for cut in step.cuts.values() for n in cut.tainted().values())]
    if any(n in region and n not in outs for n in refs):
        return "a value computed inside the call is kept in the loop state (not one of its outputs)"
    order = {n: k for k, n in enumerate(graph.nodes)}
    lo, hi = order[calls[0].nodes[0]], order[calls[-1].nodes[0]]
    between = [n for n in graph.nodes if lo < order[n] < hi and n not in region]
    if any(n.meta.get("mutates") for n in between):
        return "an in-place op runs between the calls"
    later: set[fx.Node] = set()  # ops between the calls on an earlier call's result: they move after the batch
    for n in between:
        if any(a in outs or a in later for a in n.all_input_nodes):
            later.add(n)
    if any(n in later for c in calls for n in c.inputs if n is not None):
        return "the call's input is computed from an earlier call's result"

    constants = _Constants(step, usage)
    carried, covered = _batched_floats(batch)
    anchor, block = calls[-1].nodes[0], calls[0].block
    first = calls[0]
    env: dict[fx.Node, fx.Node] = {}
    added: list[fx.Node] = []
    replace: dict[fx.Node, fx.Node] = {}
    with graph.inserting_before(anchor):
        for n in batch.graph.nodes:
            if n.op == "placeholder":
                j = int(n.target[3:])
                if j in batch.concat:
                    parts = [c.inputs[j] if c.inputs[j] is not None else constants.node(graph, c.leaves[j])
                             for c in calls]
                    added += [p for p in parts if p.op == "get_attr"]
                    env[n] = graph.call_function(torch.cat, (parts, 0))
                    env[n].meta["dtype"] = first.leaves[j].dtype
                    added.append(env[n])
                else:
                    env[n] = first.inputs[j]
            elif n.op == "get_attr":
                env[n] = constants.node(graph, batch.constants[n.target])
                added.append(env[n])
            elif n.op == "call_function":
                env[n] = graph.call_function(n.target, fx.map_arg(n.args, env.__getitem__),
                                             fx.map_arg(n.kwargs, env.__getitem__))
                env[n].meta.update(n.meta)
                if n in carried:  # the floats every call read there: read per call by the batched op too
                    env[n].meta["sources"] = carried[n]
                added.append(env[n])
        for k, out in enumerate(batch.out_nodes):
            if out is None:
                continue
            offset = 0
            for c, size in zip(calls, batch.sizes):
                part = graph.call_function(torch.narrow, (env[out], 0, offset, size))
                part.meta["dtype"] = env[out].meta.get("dtype")
                added.append(part)
                replace[c.out_nodes[k]] = part
                offset += size
    for n in added:
        n.meta["block"] = block
    for old, new in replace.items():
        old.replace_all_uses_with(new)
    step.outputs.update({k: replace.get(n, n) for k, n in step.outputs.items()})
    step.cuts.update({key: cut.renamed(replace) for key, cut in step.cuts.items()})
    for c in step.calls:  # another module's calls may read these outputs (and be batched next)
        c.inputs = [replace.get(n, n) for n in c.inputs]
    tail = added[-1]
    for n in between:
        if n in later:
            tail.append(n)
            tail = n
    for n in sorted(region, key=order.__getitem__, reverse=True):
        for pos, source in n.meta.get("sources", {}).items():
            if (n, pos) not in covered:  # a float the batched call bakes: guarded by value
                source.use = source.use or "an operand inside a model call batched for guidance"
        graph.erase_node(n)
    graph.lint()
    step.block_ops[block] = step.block_ops.get(block, 0) + len(added) - len(region)
    return None
