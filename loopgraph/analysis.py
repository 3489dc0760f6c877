"""Analyse a trace: classify BlockState slots, group steps by structure, hoist the schedule into tables.

Slots are classified on a networkx dataflow graph (slot -> block when a block reads it, block -> slot when
it writes it):

    carried    read at the start of some step and written during the loop (``latents``, a scheduler's
               history ``scheduler.model_outputs[1]``)
    invariant  read, never written (``prompt_embeds``; with ``rng="counter"``, the random draws' seeds)
    temporary  written before it is read in every step (``noise_pred``); never a loop input
    dead       written, never read and not needed after the loop
    schedule   the wrapper's own loop inputs and every untainted value (``timesteps``, ``t``, Python state)

Steps whose graphs are the same modulo per-step constants share one *variant*; the constants that differ
(``t``, ``sigma``, ``dt``, Python floats) are lifted into per-step tables indexed by a device-side counter.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import networkx as nx
import torch
import torch.fx as fx

from .trace import LoopTrace, StepTrace, Unsupported, func_name

_LIFT_MAX_NUMEL = 1 << 16  # larger per-step-constant tensors stay baked rather than copied into N-row tables
# Ops whose Python-float operand may as well be a 0-d tensor: a float the same in every step but different
# between calls (a guidance scale) is lifted there, so a new value compiles nothing.
_ARITHMETIC = {"add", "sub", "mul", "div", "true_divide", "rsub", "__add__", "__radd__", "__sub__", "__rsub__",
               "__mul__", "__rmul__", "__truediv__", "__rtruediv__"}

__all__ = ["SlotInfo", "Variant", "LoopPlan", "Segment", "classify_slots", "plan_loop", "plan_segments"]


class SlotInfo(NamedTuple):
    name: str
    role: str          # carried | invariant | temporary | dead | schedule
    needed_at_end: bool
    kind: str          # tensor shape/dtype or Python type


@dataclass
class Variant:
    """One compiled step graph and the steps that use it."""

    module: fx.GraphModule
    steps: list[int]
    lifted: list[str]                    # placeholder names of lifted per-step values, in order
    tables: list[torch.Tensor] = field(default_factory=list)  # [N, *shape] each, row i = value at step i
    signature: tuple = ()                # the steps' structure, float values aside (equal across calls)
    literals: dict[int, float] = field(default_factory=dict)  # arithmetic floats left in the graph, by position


@dataclass
class LoopPlan:
    """The result of analysis: what the runtime needs to run all N steps without Python per step."""

    slots: dict[str, SlotInfo]
    state_slots: list[str]       # loop state carried by the compiled loop (carried + needed-at-end temporaries)
    invariant_slots: list[str]   # inputs read every step, never written
    variants: list[Variant]
    runs: list[tuple[int, int, int]]   # (variant index, first step, end step)
    num_steps: int
    dataflow: nx.DiGraph


def _slot_kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)} {str(value.dtype).replace('torch.', '')} {value.device.type}"
    return type(value).__name__


def classify_slots(trace: LoopTrace, needed_at_end: set[str]) -> tuple[dict[str, SlotInfo], nx.DiGraph]:
    """Slot roles from the per-step reads and writes of every block (see the module docstring)."""
    graph = nx.DiGraph()
    read_first: set[str] = set()   # read at step start (its placeholder feeds some op)
    written: set[str] = set()
    for step in trace.steps:
        for block in trace.block_names:
            graph.add_node(("block", block))
            for slot in step.reads.get(block, ()):
                graph.add_edge(("slot", slot), ("block", block))
            for slot in step.writes.get(block, ()):
                graph.add_edge(("block", block), ("slot", slot))
        for node in step.graph.nodes:
            if node.op == "placeholder" and node.users:
                read_first.add(node.target)
        for slot, node in step.outputs.items():
            if node.op != "placeholder" or node.target != slot:
                written.add(slot)
            if node.op == "placeholder" and node.target != slot:  # `y = x.to(x.dtype)`: x passed on as y
                read_first.add(node.target)
    names = list(dict.fromkeys([*trace.initial_slots, *trace.final_slots, *trace.component_slots, *trace.seeds]))
    slots: dict[str, SlotInfo] = {}
    for name in names:
        if name in trace.component_slots:
            value = trace.component_slots[name].value
        elif name in trace.seeds:
            value = trace.seeds[name].value
        else:
            value = trace.final_slots.get(name, trace.initial_slots.get(name))
        graph.add_node(("slot", name))
        tainted = name in trace.tainted_final or name in trace.component_slots or name in trace.seeds
        if name in trace.schedule_inputs or not tainted:
            role = "schedule"
        elif name in read_first and name in written:
            role = "carried"
        elif name in read_first:
            role = "invariant"
        elif name in needed_at_end or any(graph.successors(("slot", name))):
            role = "temporary"
        else:
            role = "dead"
        if role == "temporary" and name not in needed_at_end and not any(graph.successors(("slot", name))):
            role = "dead"
        slots[name] = SlotInfo(name, role, name in needed_at_end, _slot_kind(value))
        graph.nodes[("slot", name)]["role"] = role
    return slots, graph


# -- step signatures --------------------------------------------------------------------------------------------
def _lift_candidates(step: StepTrace) -> list[tuple[fx.Node, int | str | None, Any]]:
    """Per-step values in graph order: (node, argument position or keyword, or None for a get_attr, value).

    Python floats passed directly (positionally or by keyword: ``clamp(min=-c)``) can become table rows; a float
    inside a list or tuple argument cannot, and is part of the step's signature instead."""
    found = []
    for node in step.graph.nodes:
        if node.op == "get_attr":
            found.append((node, None, step.constants[node.target]))
        elif node.op == "call_function":
            for pos, arg in [*enumerate(node.args), *node.kwargs.items()]:
                if type(arg) is float:
                    found.append((node, pos, arg))
    return found


def _signature(step: StepTrace, stable_ids: set[int]) -> tuple:
    # A slot in the BlockState that this step never reads (step 0 has no `noise_pred` yet, later steps do)
    # does not make the step different: unused placeholders are left out.
    live = [n for n in step.graph.nodes if n.op != "placeholder" or n.users]
    index = {node: k for k, node in enumerate(live)}

    def enc(a: Any, top: bool = False) -> Any:
        if isinstance(a, fx.Node):
            return ("node", index[a]) if a in index else ("unread slot", a.target)
        if type(a) is float:  # a direct argument may be lifted; one inside a list is the step's own
            return ("float",) if top else ("lit", repr(a))
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(enc(x) for x in a))
        if isinstance(a, dict):
            return ("dict", tuple((k, enc(v, top)) for k, v in a.items()))
        return ("lit", repr(a))

    parts = []
    for node in live:
        if node.op == "get_attr":
            t = step.constants[node.target]
            key = ("const", id(t)) if id(t) in stable_ids else ("lift", tuple(t.shape), str(t.dtype), str(t.device))
            parts.append(("get_attr", key))
        elif node.op == "placeholder":
            parts.append(("placeholder", node.target, len(node.users) > 0))
        else:
            parts.append((node.op, str(node.target), tuple(enc(a, top=True) for a in node.args),
                          tuple((k, enc(v, top=True)) for k, v in node.kwargs.items())))
    parts.append(("outputs", tuple((slot, enc(node)) for slot, node in sorted(step.outputs.items()))))
    return tuple(parts)


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    return a == b


def _stable_ids(trace: LoopTrace) -> set[int]:
    """Constants that are the very same tensor object in every step that uses them (parameters, tables)."""
    counts: dict[int, int] = {}
    for step in trace.steps:
        for tid in set(step.stable.values()):
            counts[tid] = counts.get(tid, 0) + 1
    # a tensor object created anew each step has one id per step; an id seen in >1 step is long-lived
    multi = {tid for tid, c in counts.items() if c > 1}
    versions: dict[int, int] = {}
    for step in trace.steps:
        for name, tid in step.stable.items():
            if tid in multi and versions.setdefault(tid, step.versions[name]) != step.versions[name]:
                raise Unsupported(f"constant {tuple(step.constants[name].shape)} tensor is updated in place "
                                  f"between steps (component state carried across steps)")
    return multi if len(trace.steps) > 1 else set(counts)


def plan_loop(trace: LoopTrace, needed_at_end: set[str], lift: dict[tuple, set[int]] | None = None) -> LoopPlan:
    """Group steps into variants, lift per-step values into tables, and build one GraphModule per variant.

    ``lift`` names, per variant signature, more float positions to lift (``Variant.literals`` positions).
    """
    slots, dataflow = classify_slots(trace, needed_at_end)
    state_slots = [n for n, s in slots.items() if s.role == "carried" or (s.role in ("temporary", "dead")
                                                                            and s.needed_at_end)]
    invariant_slots = [n for n, s in slots.items() if s.role == "invariant"]
    stable = _stable_ids(trace)
    groups: dict[tuple, list[StepTrace]] = {}
    for step in trace.steps:
        groups.setdefault(_signature(step, stable), []).append(step)
    n = len(trace.steps)
    variants = [_build_variant(members, state_slots, invariant_slots, n, stable, sig, (lift or {}).get(sig, set()))
                for sig, members in groups.items()]
    step_variant = {s.index: k for k, v in enumerate(variants) for s in [trace.steps[i] for i in v.steps]}
    runs: list[tuple[int, int, int]] = []
    for i in range(n):
        if runs and runs[-1][0] == step_variant[i] and runs[-1][2] == i:
            runs[-1] = (runs[-1][0], runs[-1][1], i + 1)
        else:
            runs.append((step_variant[i], i, i + 1))
    return LoopPlan(slots=slots, state_slots=state_slots, invariant_slots=invariant_slots, variants=variants,
                    runs=runs, num_steps=n, dataflow=dataflow)


def _build_variant(members: list[StepTrace], state_slots: list[str], invariant_slots: list[str], n: int,
                   stable: set[int], signature: tuple, extra: set[int]) -> Variant:
    template = members[0]
    per_step = [_lift_candidates(s) for s in members]
    # Lifted into per-step tables: every value that differs between this variant's steps, and every small
    # tensor made afresh each step (t, sigma, a timestep embedding), so a variant used by one step (the
    # first) does not bake its values and a new N reuses the compiled code. Python floats stay literals
    # unless they differ (some ops insist on a Python number).
    lift_positions = [
        k for k, (node, pos, value) in enumerate(per_step[0])
        if any(not _same_value(value, p[k][2]) for p in per_step[1:])
        or (pos is None and id(value) not in stable and value.numel() <= _LIFT_MAX_NUMEL) or k in extra
    ]
    literals = {k: value for k, (node, pos, value) in enumerate(per_step[0])
                if pos is not None and k not in lift_positions and func_name(node.target) in _ARITHMETIC}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    holders: dict[str, fx.Node] = {}
    for name in [*state_slots, *invariant_slots]:
        holders[name] = graph.placeholder(re.sub(r"\W", "_", name))  # `scheduler.model_outputs[1]`
    lifted_names = [f"lift_{k}" for k in range(len(lift_positions))]
    lift_nodes = {pos: graph.placeholder(name) for pos, name in zip(lift_positions, lifted_names)}
    root = torch.nn.Module()
    candidates = per_step[0]
    cand_index = {(id(node), pos): k for k, (node, pos, _) in enumerate(candidates)}
    for node in template.graph.nodes:
        if node.op == "placeholder":
            if node.target in holders:
                env[node] = holders[node.target]
            elif node.users:  # a slot read at step start that is not loop state: a problem in the trace
                raise ValueError(f"slot {node.target!r} is read before it is written but is not loop state")
            continue
        if node.op == "get_attr":
            k = cand_index[(id(node), None)]
            if k in lift_nodes:
                env[node] = lift_nodes[k]
            else:
                name = node.target.lstrip("_")
                value = template.constants[node.target]
                if not hasattr(root, name):
                    # constants keep their identity (no copies): in-place updates to weights are seen
                    if isinstance(value, torch.nn.Parameter):
                        root.register_parameter(name, value)
                    else:
                        root.register_buffer(name, value, persistent=False)
                env[node] = graph.get_attr(name)
            continue
        args = list(fx.map_arg(node.args, lambda a: env[a]))
        kwargs = dict(fx.map_arg(node.kwargs, lambda a: env[a]))
        for pos in [*range(len(args)), *kwargs]:
            k = cand_index.get((id(node), pos))
            if k is not None and k in lift_nodes:  # a Python float that changes per step becomes a 0-d table row
                if isinstance(pos, int):
                    args[pos] = lift_nodes[k]
                else:
                    kwargs[pos] = lift_nodes[k]
        env[node] = graph.call_function(node.target, tuple(args), kwargs)
        env[node].meta["mutates"] = node.meta.get("mutates", False)
    outs = []
    for name in state_slots:
        node = template.outputs.get(name)
        outs.append(env[node] if node is not None else holders[name])
    graph.output(tuple(outs))
    graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or n.meta.get("mutates", False))
    module = fx.GraphModule(root, graph, class_name="FusedStep")
    tables = []
    for k in lift_positions:
        rows = [torch.as_tensor(p[k][2]) for p in per_step]
        proto = rows[0]
        dtype = _float_table_dtype(per_step[0][k][0]) if isinstance(per_step[0][k][2], float) else proto.dtype
        table = torch.zeros((n, *proto.shape), dtype=dtype, device=proto.device)
        for step, row in zip(members, rows):
            table[step.index] = row.to(dtype)
        tables.append(table)
    return Variant(module=module, steps=[s.index for s in members], lifted=lifted_names, tables=tables,
                   signature=signature, literals=literals)


def _float_table_dtype(node: fx.Node) -> torch.dtype:
    """The dtype of a table of Python floats lifted from ``node``'s arguments: that of the op's result when it is
    a float (a 0-d operand of that dtype promotes as the Python float did: an int tensor times it gives float32,
    a half tensor stays half), else the default float dtype (a comparison's bound)."""
    dtype = node.meta.get("dtype")
    return dtype if dtype is not None and dtype.is_floating_point else torch.get_default_dtype()


# -- eager segments ---------------------------------------------------------------------------------------------
@dataclass
class Segment:
    """Consecutive blocks of every step that run together: one eager block, or compiled ones as a plan."""

    blocks: list[str]
    eager: bool
    plan: LoopPlan | None = None          # compiled: one variant per distinct per-step graph of these blocks
    step_variant: list[int] = field(default_factory=list)   # step -> variant index in plan.variants
    examples: dict[str, torch.Tensor] = field(default_factory=dict)  # a traced value of every slot it uses


def plan_segments(trace: LoopTrace, eager_blocks: set[str]) -> list[Segment]:
    """Cut every step at the eager blocks; plan each run of compiled blocks like a loop of its own.

    A compiled segment's per-step graph takes the tainted tensors of the BlockState and of the components
    (a scheduler's history) as they are when it starts and returns those it rebinds; values cross an eager
    block only through those two (anything else raises ``Unsupported``). Each segment is planned by
    ``plan_loop`` with every slot needed at its end.
    """
    segments: list[Segment] = []
    for name in trace.block_names:
        if name in eager_blocks:
            segments.append(Segment([name], eager=True))
        elif segments and not segments[-1].eager:
            segments[-1].blocks.append(name)
        else:
            segments.append(Segment([name], eager=False))
    ends = [seg.blocks[0] for seg in segments[1:]] + ["__end__"]
    for seg, end in zip(segments, ends):
        if seg.eager:
            continue
        subs = [_cut_step(step, seg.blocks, end) for step in trace.steps]
        examples: dict[str, torch.Tensor] = {}
        for sub, step in zip(subs, trace.steps):
            passed = set(sub.outputs.values())  # a slot passed on unchanged as another one is used too
            used = {n.target for n in sub.graph.nodes
                    if n.op == "placeholder" and (n.users or n in passed)} | set(sub.outputs)
            for slot in used:
                key = seg.blocks[0] if slot in sub.inputs else end
                examples.setdefault(slot, step.value_before(key, slot))
        sub_trace = LoopTrace(steps=subs, initial_slots=examples, initial_inputs_copy=examples, final_slots=examples,
                              tainted_final=set(examples), inplace_slots=set(), schedule_inputs=[], problems=[],
                              block_names=seg.blocks)
        seg.plan, seg.examples = plan_loop(sub_trace, set(examples)), examples
        seg.step_variant = [v for v, a, b in seg.plan.runs for _ in range(a, b)]
    return segments


def _tainted_before(step: StepTrace, key: str) -> dict[str, fx.Node]:
    """Slot -> node of every tainted tensor before block ``key``: the BlockState's, the components', and the
    random draws' seeds (inputs of the whole step, even one first drawn later in it)."""
    return {**step.nodes_before[key], **{slot: node for slot, (_, _, node) in step.held_before[key].items()},
            **{slot: node for slot, (node, _) in step.seeds.items()}}


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
