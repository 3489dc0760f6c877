"""Eager segments: cut every step at the blocks that must run eagerly, and plan each run of compiled blocks
between them like a loop of its own (executed by ``segments.EagerSegments``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..modular_pipelines.state import values_equal
from ..pystate.snapshots import same
from ..trace.ir import LoopTrace, ProblemKind, StepTrace, Unsupported
from .loop_plan import LoopPlan, LoopSteps, plan_loop

__all__ = ["Segment", "eager_blocks", "plan_segments", "segment_end", "restores"]


@dataclass
class Segment:
    """Consecutive blocks of every step that run together: one eager block, or compiled ones as a plan."""

    blocks: list[str]
    eager: bool
    plan: LoopPlan | None = None          # compiled: one variant per distinct per-step graph of these blocks
    step_variant: list[int] = field(default_factory=list)   # step -> variant index in plan.variants
    examples: dict[str, torch.Tensor] = field(default_factory=dict)  # a traced value of every slot it uses


# the problems a block confines: it runs eagerly between compiled segments
_CONFINED = (ProblemKind.DATA_DEPENDENT, ProblemKind.RANDOM_OP, ProblemKind.SIDE_EFFECT)


def eager_blocks(trace: LoopTrace, problems: list[Unsupported]) -> set[str]:
    """The blocks that can run eagerly between compiled segments, or an empty set (the whole loop runs eagerly):
    every problem is data-dependent Python, a random op or a side effect inside a block, and some block is left to
    compile."""
    confined = all(p.block and p.kind in _CONFINED for p in problems)
    blocks = {p.block for p in problems}
    if not confined or not trace.steps or blocks >= set(trace.block_names):
        return set()
    return blocks


def plan_segments(trace: LoopTrace, eager: set[str]) -> list[Segment]:
    """Cut every step at the eager blocks; plan each run of compiled blocks like a loop of its own.

    A compiled segment's per-step graph takes the tainted tensors of the BlockState and of the components
    (a scheduler's history) as they are when it starts and returns those it rebinds; values cross an eager
    block only through those two (anything else raises ``Unsupported``). Each segment is planned by
    ``plan_loop`` with every slot needed at its end.
    """
    segments: list[Segment] = []
    for name in trace.block_names:
        if name in eager:
            segments.append(Segment([name], eager=True))
        elif segments and not segments[-1].eager:
            segments[-1].blocks.append(name)
        else:
            segments.append(Segment([name], eager=False))
    for k, seg in enumerate(segments):
        if seg.eager:
            continue
        end = segment_end(segments, k)
        subs = [_cut_step(step, seg.blocks, end) for step in trace.steps]
        examples: dict[str, torch.Tensor] = {}
        for sub, step in zip(subs, trace.steps):
            passed = set(sub.outputs.values())  # a slot passed on unchanged as another one is used too
            used = {n.target for n in sub.graph.nodes
                    if n.op == "placeholder" and (n.users or n in passed)} | set(sub.outputs)
            for slot in used:
                key = seg.blocks[0] if slot in sub.inputs else end
                examples.setdefault(slot, step.value_before(key, slot))
        steps = LoopSteps(steps=subs, block_names=seg.blocks, values=examples, tainted=set(examples), schedule=set())
        seg.plan, seg.examples = plan_loop(steps, set(examples)), examples
        seg.step_variant = [v for v, a, b in seg.plan.runs for _ in range(a, b)]
    return segments


def segment_end(segments: list[Segment], k: int) -> str:
    """The cut where segment ``k`` ends: the next segment's first block, or "__end__"."""
    return segments[k + 1].blocks[0] if k + 1 < len(segments) else "__end__"


def restores(trace: LoopTrace, eager: set[str]) -> dict[tuple[int, str], list[tuple]]:
    """(step, eager block) -> the attributes (keys of ``Cut.python``) that compiled blocks wrote or
    changed in place since the previous eager block: compiled segments run no Python, so these are set as the
    traced call had them before the eager block runs. What an eager block writes is its own (this call's) value."""
    written: dict[tuple, set] = {}
    for key, write in trace.python.writes.items():
        for step, block in write.events:
            written.setdefault((step, block), set()).add(key)
    first_read = {(id(r.obj), r.key): r for r in trace.python.reads.values()}
    found, pending = {}, set()
    for step in trace.steps:
        cuts = [*trace.block_names, "__end__"]
        for block, after in zip(cuts, cuts[1:]):
            if block in eager:
                found[(step.index, block)] = [k for k in pending if k in step.cuts[block].python]
                pending = set()
                continue
            before, now = step.cuts[block].python, step.cuts[after].python
            pending |= written.get((step.index, block), set())
            pending |= {k for k, (_, _, value) in now.items()  # changed in place (or first read and changed)
                        if (not values_equal(before[k][2], value) if k in before
                            else k in first_read and not same(value, first_read[k].value))}
    return found


def _tainted_before(step: StepTrace, key: str) -> dict[str, fx.Node]:
    """Slot -> node of every tainted tensor before block ``key``: the BlockState's, the components', and the
    random draws' seeds (inputs of the whole step, even one first drawn later in it)."""
    return {**step.cuts[key].tainted(), **{slot: node for slot, (node, _) in step.seeds.items()}}


def _cut_step(step: StepTrace, blocks: list[str], end: str) -> StepTrace:
    """The part of one step's graph that ``blocks`` recorded, from the BlockState before them to ``end``."""
    graph = fx.Graph()
    sub = StepTrace(index=step.index, graph=graph, inputs=[], outputs={}, constants={}, stable={},
                    kwargs=step.kwargs, reads={b: step.reads.get(b, set()) for b in blocks},
                    writes={b: step.writes.get(b, set()) for b in blocks})
    env: dict[fx.Node, fx.Node] = {}
    start = _tainted_before(step, blocks[0])
    for slot, node in start.items():  # slots sharing one tensor read it from the first (eager checks they still do)
        holder = graph.placeholder(slot)
        env.setdefault(node, holder)
        sub.inputs.append(slot)
    inside = set(blocks)

    def arg(a: fx.Node) -> fx.Node:
        if a not in env:
            raise Unsupported(f"a tensor computed in block {a.meta.get('block')!r} reaches block "
                              f"{blocks[0]!r} outside the BlockState and the components' attributes, across a "
                              f"block that runs eagerly")
        return env[a]

    for node in step.graph.nodes:
        if node.meta.get("block") not in inside:
            continue
        if node.op == "get_attr":
            sub.constants[node.target] = step.constants[node.target]
            sub.stable[node.target] = step.stable[node.target]
            sub.versions[node.target] = step.versions[node.target]
            env[node] = graph.get_attr(node.target)
        else:
            env[node] = graph.call_function(node.target, fx.map_arg(node.args, arg), fx.map_arg(node.kwargs, arg))
            env[node].meta.update(node.meta)
    for slot, node in _tainted_before(step, end).items():
        if start.get(slot) is not node:  # only the slots the segment rebinds
            sub.outputs[slot] = arg(node)
    return sub
