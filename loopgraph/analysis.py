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

from .config import LIFT_MAX_NUMEL
from .records import StepTrace, Unsupported, func_name

# Ops whose Python-float operand may as well be a 0-d tensor: a float the same in every step but different
# between calls (a guidance scale) is lifted there, so a new value compiles nothing.
_ARITHMETIC = {"add", "sub", "mul", "div", "true_divide", "rsub", "__add__", "__radd__", "__sub__", "__rsub__",
               "__mul__", "__rmul__", "__truediv__", "__rtruediv__"}

__all__ = ["SlotInfo", "Variant", "LoopPlan", "LoopSteps", "loop_steps", "classify_slots", "plan_loop"]


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
    whole_tables: bool = False           # called with the whole tables and the step counter (the kernel pass)


@dataclass
class LoopPlan:
    """The result of analysis: what the runtime needs to run all N steps without Python per step."""

    slots: dict[str, SlotInfo]
    state_slots: list[str]       # loop state carried by the compiled loop (carried + needed-at-end temporaries)
    invariant_slots: list[str]   # inputs read every step, never written
    variants: list[Variant]
    runs: list[tuple[int, int, int]]   # (variant index, first step, end step)
    num_steps: int


@dataclass
class LoopSteps:
    """What ``plan_loop`` plans from: the recorded steps of a loop (the whole loop's, or one eager-segments
    partition's) and an example value of every slot."""

    steps: list[StepTrace]
    block_names: list[str]
    values: dict[str, Any]     # slot -> a traced value (its kind in the slot table), in slot order
    tainted: set[str]          # slots that hold loop data (computed from the loop's inputs)
    schedule: set[str]         # the wrapper's own loop inputs: schedule, whatever they hold


def loop_steps(trace) -> LoopSteps:
    """The ``LoopSteps`` of a whole traced loop (a ``trace.LoopTrace``): BlockState slots, loop tensors held by
    components, and (``rng="counter"``) the random draws' seeds."""
    values = {name: trace.final_slots.get(name, trace.initial_slots.get(name))
              for name in dict.fromkeys([*trace.initial_slots, *trace.final_slots])}
    values.update({name: slot.value for name, slot in trace.component_slots.items()})
    values.update({name: seed.value for name, seed in trace.seeds.items()})
    tainted = set(trace.tainted_final) | set(trace.component_slots) | set(trace.seeds)
    return LoopSteps(trace.steps, trace.block_names, values, tainted, set(trace.schedule_inputs))


def _slot_kind(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)} {str(value.dtype).replace('torch.', '')} {value.device.type}"
    return type(value).__name__


def classify_slots(trace: LoopSteps, needed_at_end: set[str]) -> dict[str, SlotInfo]:
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
    slots: dict[str, SlotInfo] = {}
    for name, value in trace.values.items():
        graph.add_node(("slot", name))
        if name in trace.schedule or name not in trace.tainted:
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
    return slots


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


def _stable_ids(trace: LoopSteps) -> set[int]:
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


def plan_loop(trace: LoopSteps, needed_at_end: set[str], lift: dict[tuple, set[int]] | None = None) -> LoopPlan:
    """Group steps into variants, lift per-step values into tables, and build one GraphModule per variant.

    ``lift`` names, per variant signature, more float positions to lift (``Variant.literals`` positions).
    """
    slots = classify_slots(trace, needed_at_end)
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
                    runs=runs, num_steps=n)


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
        or (pos is None and id(value) not in stable and value.numel() <= LIFT_MAX_NUMEL) or k in extra
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
                raise Unsupported(f"slot {node.target!r} is read before it is written but is not loop state (neither "
                                  f"carried nor invariant): it reaches step {template.index}'s graph another way")
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
