"""Analyse a trace: classify BlockState slots, group steps by structure, hoist the schedule into tables.

Slots are classified on a networkx dataflow graph (slot -> block when a block reads it, block -> slot when
it writes it):

    carried    read at the start of some step and written during the loop (``latents``, a scheduler's
               history ``scheduler.model_outputs[1]``)
    invariant  read, never written (``prompt_embeds``; with ``rng="counter"``, the random draws' seeds)
    temporary  written before it is read in every step (``noise_pred``); never a loop input
    dead       written, never read and not needed after the loop
    unread     an input no step reads or writes (the caller's own object after the loop: no state buffer)
    schedule   the wrapper's own loop inputs and every untainted value (``timesteps``, ``t``, Python state)

Steps whose graphs are the same modulo per-step constants share one *variant*; the constants that differ
(``t``, ``sigma``, ``dt``, Python floats and ints, the ``i`` of ``sigmas[i]``) are lifted into per-step tables
indexed by a device-side counter; an input indexed by the step is gathered into such a table on each call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import networkx as nx
import torch
import torch.fx as fx

from ..config import LIFT_MAX_NUMEL
from ..trace.floats import ARITHMETIC, Source
from ..trace.ir import StepTrace, Unsupported, func_name
from .step_tables import (float_table_dtype, gathered_table, gathers_always, input_shapes, lift_candidates,
                          liftable_number, mutated_nodes, read_rows, step_index, take_at)


__all__ = ["SlotInfo", "Variant", "LoopPlan", "LoopSteps", "loop_steps", "classify_slots", "plan_loop"]


class SlotInfo(NamedTuple):
    name: str
    role: str          # carried | invariant | temporary | dead | unread | schedule
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
    # lifted floats a call fills in: (table index, its rows or None for all of them, where the value is read)
    sources: list[tuple[int, torch.Tensor | None, Source]] = field(default_factory=list)
    # step-indexed reads of an input (``sigmas[i]``) a call gathers into a table: (table index, the variant's
    # steps or None for all, the input's name, the dim, the index at each of those steps)
    gathers: list[tuple[int, torch.Tensor | None, str, int, torch.Tensor]] = field(default_factory=list)


@dataclass
class LoopPlan:
    """The result of analysis: what the runtime needs to run all N steps without Python per step."""

    slots: dict[str, SlotInfo]
    state_slots: list[str]       # loop state carried by the compiled loop (carried + needed-at-end temporaries)
    invariant_slots: list[str]   # inputs read every step, never written
    variants: list[Variant]
    runs: list[tuple[int, int, int]]   # (variant index, first step, end step)
    num_steps: int
    growth: str | None = None    # why the number of step graphs grows with N (when it does)


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
        elif name not in written and not any(graph.successors(("slot", name))):
            role = "unread"  # an input no step reads or writes: the caller's own object after the loop, no buffer
        elif name in needed_at_end or any(graph.successors(("slot", name))):
            role = "temporary"
        else:
            role = "dead"
        if role == "temporary" and name not in needed_at_end and not any(graph.successors(("slot", name))):
            role = "dead"
        slots[name] = SlotInfo(name, role, name in needed_at_end, _slot_kind(value))
    return slots


# -- step signatures --------------------------------------------------------------------------------------------
def _signature(step: StepTrace, stable_ids: set[int]) -> tuple:
    # A slot in the BlockState that this step never reads (step 0 has no `noise_pred` yet, later steps do)
    # does not make the step different: unused placeholders are left out.
    live = [n for n in step.graph.nodes if n.op != "placeholder" or n.users]
    index = {node: k for k, node in enumerate(live)}
    mutated, shapes = mutated_nodes(step.graph), input_shapes(step)

    def enc(a: Any, top: bool = False, node: fx.Node | None = None, pos: Any = None) -> Any:
        if isinstance(a, fx.Node):
            return ("node", index[a]) if a in index else ("unread slot", a.target)
        if top and liftable_number(node, pos, a):  # a direct argument may be lifted; one inside a list is the step's
            return (type(a).__name__,)
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(enc(x) for x in a))
        if isinstance(a, dict):
            return ("dict", tuple((k, enc(v)) for k, v in a.items()))
        return ("lit", repr(a))

    parts = []
    for node in live:
        if node.op == "get_attr":
            t = step.constants[node.target]
            key = ("const", id(t)) if id(t) in stable_ids else ("lift", tuple(t.shape), str(t.dtype), str(t.device))
            parts.append(("get_attr", key))
        elif node.op == "placeholder":
            parts.append(("placeholder", node.target, len(node.users) > 0))
        elif (at := step_index(node, mutated, shapes)) is not None:  # x[i]: the step's i may be a table row
            parts.append((node.op, str(node.target), enc(node.args[0]), "step index", at))
        else:
            parts.append((node.op, str(node.target), tuple(enc(a, True, node, pos) for pos, a in enumerate(node.args)),
                          tuple((k, enc(v, True, node, k)) for k, v in node.kwargs.items())))
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


def plan_loop(trace: LoopSteps, needed_at_end: set[str], lift: dict[tuple, set[int]] | None = None,
              gather: bool = False) -> LoopPlan:
    """Group steps into variants, lift per-step values into tables, and build one GraphModule per variant.

    ``lift`` names, per variant signature, more float positions to lift (``Variant.literals`` positions).
    ``gather``: a step-indexed read of an input (``sigmas[i]``) becomes a table the call gathers from the input
    (``Variant.gathers``), and an input read no other way is not an input of the step graphs (so its length, N + 1
    for a schedule, is not part of the compiled code).
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
    variants = [_build_variant(members, state_slots, invariant_slots, n, stable, sig, (lift or {}).get(sig, set()),
                               gather) for sig, members in groups.items()]
    if gather:
        invariant_slots = _drop_unread(variants, state_slots, invariant_slots)
    step_variant = {s.index: k for k, v in enumerate(variants) for s in [trace.steps[i] for i in v.steps]}
    runs: list[tuple[int, int, int]] = []
    for i in range(n):
        if runs and runs[-1][0] == step_variant[i] and runs[-1][2] == i:
            runs[-1] = (runs[-1][0], runs[-1][1], i + 1)
        else:
            runs.append((step_variant[i], i, i + 1))
    growth = None
    if len(variants) >= 4 and 2 * len(variants) > n:  # about one step graph per step: find what differs
        pairs = (trace.steps[a: a + 2] for a in range(n - 1) if step_variant[a] != step_variant[a + 1])
        growth = next(filter(None, (_why_steps_differ(a, b, stable) for a, b in pairs)), None)
    return LoopPlan(slots=slots, state_slots=state_slots, invariant_slots=invariant_slots, variants=variants,
                    runs=runs, num_steps=n, growth=growth)


def _why_steps_differ(a: StepTrace, b: StepTrace, stable: set[int]) -> str | None:
    """The op that makes two steps' graphs differ by a Python argument, and what to change; None where they run
    different ops (a guidance window, a first or last step: another path, not a value baked per step)."""
    parts_a, parts_b = _signature(a, stable), _signature(b, stable)
    live_a = [n for n in a.graph.nodes if n.op != "placeholder" or n.users]
    live_b = [n for n in b.graph.nodes if n.op != "placeholder" or n.users]
    j = next((j for j, (x, y) in enumerate(zip(parts_a, parts_b)) if x != y), min(len(parts_a), len(parts_b)))
    if j >= min(len(live_a), len(live_b)) or live_a[j].op != "call_function" or live_a[j].target != live_b[j].target:
        return None
    na, nb = live_a[j], live_b[j]
    shown = [(repr(x), repr(y)) for x, y in zip([*na.args, *na.kwargs.values()], [*nb.args, *nb.kwargs.values()])
             if not isinstance(x, fx.Node) and repr(x) != repr(y)]
    if not shown:
        return None
    values = "; ".join(f"{x} in step {a.index}, {y} in step {b.index}" for x, y in shown)
    return (f"`{func_name(na.target)}` in block {na.meta.get('block')!r} takes {values}: a Python value that changes "
            f"every step is baked into each step's graph unless it is an operand of arithmetic or the index of "
            f"`x[i]`; make it a tensor (index a tensor input by the step, or pass it in the wrapper's loop_inputs)")


def _drop_unread(variants: list[Variant], state_slots: list[str], invariant_slots: list[str]) -> list[str]:
    """The invariant slots some step graph reads; the others' placeholders are taken out of every graph."""
    position = {name: len(state_slots) + k for k, name in enumerate(invariant_slots)}
    read = set()
    for v in variants:
        holders = [n for n in v.module.graph.nodes if n.op == "placeholder"]
        read |= {name for name, k in position.items() if holders[k].users}
    if read == set(invariant_slots):
        return invariant_slots
    for v in variants:
        holders = [n for n in v.module.graph.nodes if n.op == "placeholder"]
        for name, k in position.items():
            if name not in read:
                v.module.graph.erase_node(holders[k])
        v.module.recompile()
    return [name for name in invariant_slots if name in read]


def _build_variant(members: list[StepTrace], state_slots: list[str], invariant_slots: list[str], n: int,
                   stable: set[int], signature: tuple, extra: set[int], gather: bool = False) -> Variant:
    template = members[0]
    per_step = [lift_candidates(s) for s in members]
    # the floats a call reads and the plan takes as inputs (trace/floats.py), by candidate, per step
    read_at = [[(node.meta.get("sources") or {}).get(pos) if pos is not None else None for node, pos, _ in c]
               for c in per_step]
    # Lifted into per-step tables: every value that differs between this variant's steps, and every small
    # tensor made afresh each step (t, sigma, a timestep embedding), so a variant used by one step (the
    # first) does not bake its values and a new N reuses the compiled code. Python floats stay literals
    # unless they differ (some ops insist on a Python number).
    # the slots as the step was given them (a plan with gathers has them)
    inputs = next(iter(template.cuts.values())).slots if gather and template.cuts else {}
    lift_positions = [
        k for k, (node, pos, value) in enumerate(per_step[0])
        if any(not _same_value(value, p[k][2]) for p in per_step[1:])
        or (pos is None and id(value) not in stable and value.numel() <= LIFT_MAX_NUMEL) or k in extra
        or any(row[k] is not None and row[k].lifted for row in read_at)
        or gather and gathers_always(node, pos, invariant_slots, inputs)
    ]
    literals = {k: value for k, (node, pos, value) in enumerate(per_step[0])
                if pos is not None and k not in lift_positions and func_name(node.target) in ARITHMETIC}
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
    step_indices = {id(node): k for k, (node, pos, _) in enumerate(candidates) if type(pos) is tuple}
    gathered: dict[int, tuple[str, int]] = {}
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
        at = step_indices.get(id(node))
        if at is not None and at in lift_nodes:  # x[i] with the step's i
            base, (_, dim, width) = node.args[0], candidates[at][1]
            if gather and base.op == "placeholder" and base.target in invariant_slots:  # gathered per call
                env[node] = lift_nodes[at]
                gathered[at] = (base.target, dim, width)
            else:  # a device-side index into a tensor the step computes
                env[node] = graph.call_function(take_at, (args[0], dim, lift_nodes[at], width))
            continue
        lifted_here = False
        for pos in [*range(len(args)), *kwargs]:
            k = cand_index.get((id(node), pos))
            if k is not None and k in lift_nodes:  # a Python float that changes per step becomes a 0-d table row
                lifted_here = True
                if isinstance(pos, int):
                    args[pos] = lift_nodes[k]
                else:
                    kwargs[pos] = lift_nodes[k]
        env[node] = graph.call_function(node.target, tuple(args), kwargs)
        env[node].meta["mutates"] = node.meta.get("mutates", False)
        if lifted_here and node.meta.get("0-d") and not node.meta.get("mutates"):
            # between 0-d tensors the table row's dtype counts where the Python number's did not (a half sigma
            # times a float32 row is float32; an int32 counter plus an int64 row is int64): computed at the row's
            # precision, as eager computes a half op with a number, and cast back to the dtype eager gave
            env[node] = graph.call_function(torch.Tensor.to, (env[node], node.meta["dtype"]))
    outs = []
    for name in state_slots:
        node = template.outputs.get(name)
        outs.append(env[node] if node is not None else holders[name])
    graph.output(tuple(outs))
    graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure() or n.meta.get("mutates", False))
    module = fx.GraphModule(root, graph, class_name="FusedStep")
    tables, gathers = [], []
    every = [s.index for s in members] == list(range(n))
    steps = None if every else torch.tensor([s.index for s in members], dtype=torch.int64)
    for k in lift_positions:
        if k in gathered:
            name, dim, width = gathered[k]
            table, at = gathered_table(inputs[name], dim, [p[k][2] for p in per_step], steps, n, width)
            gathers.append((len(tables), steps, name, dim, at))
            tables.append(table)
            continue
        rows = [torch.as_tensor(p[k][2]) for p in per_step]
        proto = rows[0]
        dtype = float_table_dtype(per_step[0][k][0]) if isinstance(per_step[0][k][2], float) else proto.dtype
        table = torch.zeros((n, *proto.shape), dtype=dtype, device=proto.device)
        for step, row in zip(members, rows):
            table[step.index] = row.to(dtype)
        tables.append(table)
    return Variant(module=module, steps=[s.index for s in members], lifted=lifted_names, tables=tables,
                   signature=signature, literals=literals, sources=read_rows(lift_positions, members, read_at),
                   gathers=gathers)


