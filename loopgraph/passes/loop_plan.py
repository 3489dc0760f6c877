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
def _lift_candidates(step: StepTrace) -> list[tuple[fx.Node, Any, Any]]:
    """Per-step values in graph order: (node, argument position or keyword, None for a get_attr, or ("index", dim,
    width) for a step index, value).

    Python floats passed directly (positionally or by keyword: ``clamp(min=-c)``), ints passed directly to
    arithmetic (``x * scale + i``), the int of ``x[i]`` / ``x[:, i]`` on loop data and the start of ``x[i:i + k]``
    on a step input (a schedule indexed by the step) can become table rows; a number inside a list or tuple
    argument cannot, and is part of the step's signature instead."""
    found = []
    mutated, shapes = _mutated(step.graph), _input_shapes(step)
    for node in step.graph.nodes:
        if node.op == "get_attr":
            found.append((node, None, step.constants[node.target]))
        elif node.op == "call_function":
            for pos, arg in [*enumerate(node.args), *node.kwargs.items()]:
                if _liftable_number(node, pos, arg):
                    found.append((node, pos, arg))
            at = _step_index(node, mutated, shapes)
            if at is not None:
                dim, width = at
                index = node.args[1]
                entry = index if type(index) is not tuple else index[dim]
                found.append((node, ("index", dim, width), entry.start if type(entry) is slice else entry))
    return found


def _input_shapes(step: StepTrace) -> dict[str, torch.Size]:
    """The shapes of the tensors the step was given, by slot (the step graph's placeholders)."""
    given = next(iter(step.cuts.values())).slots if step.cuts else {}
    return {k: v.shape for k, v in given.items() if isinstance(v, torch.Tensor)}


def _liftable_number(node: fx.Node, pos: int | str, arg: Any) -> bool:
    """A float operand, or an int operand of arithmetic (``alpha=`` must stay a Python number)."""
    if pos == "alpha":
        return False
    return type(arg) is float or (type(arg) is int and func_name(node.target) in ARITHMETIC)


def _mutated(graph: fx.Graph) -> set[fx.Node]:
    """The nodes an in-place op changes (its first argument)."""
    return {n.args[0] for n in graph.nodes if n.meta.get("mutates") and n.args and isinstance(n.args[0], fx.Node)}


def _step_index(node: fx.Node, mutated: set[fx.Node], shapes: dict[str, torch.Size]) -> tuple[int, int | None] | None:
    """(dim, width) of the one entry of an index on loop data that may take the step's value, the other entries
    full slices: an int (``x[i]``, ``x[:, i]``; width None) or, on a step input, a slice within its bounds
    (``x[i:i + k]``, ``x[:, i:i + 2]``; width k). Its result may be a copy instead of a view (neither it nor ``x``
    is changed in place), so the int or the start may become a device-side index (``take_at``). None for any
    other node."""
    if func_name(node.target) != "__getitem__" or len(node.args) != 2 or not isinstance(node.args[0], fx.Node):
        return None
    index = node.args[1]
    entries = index if type(index) is tuple else (index,)
    picked = [d for d, e in enumerate(entries) if e != slice(None)]
    if len(picked) != 1 or not all(type(e) in (int, slice) for e in entries):
        return None
    dim, entry = picked[0], entries[picked[0]]
    if node in mutated or node.args[0] in mutated:
        return None
    if type(entry) is int:
        return dim, None
    base = node.args[0]
    shape = shapes.get(base.target) if base.op == "placeholder" else None
    if (shape is None or entry.step is not None or type(entry.start) is not int or type(entry.stop) is not int
            or not 0 <= entry.start < entry.stop <= shape[dim]):  # Python clamps a slice past the end: not that
        return None
    return dim, entry.stop - entry.start


def take_at(x: torch.Tensor, dim: int, index: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """``x`` at ``index`` along ``dim`` (a 0-d int64 tensor, negative from the end): ``x[i]`` or ``x[:, i]`` with
    the step's ``i`` read from a table at the device-side step counter; with ``width``, ``x[i:i + width]`` (``i``
    not negative)."""
    if width is not None:
        return torch.index_select(x, dim, index + torch.arange(width, device=x.device))
    index = torch.where(index < 0, index + x.shape[dim], index)
    return torch.index_select(x, dim, index.reshape(1)).squeeze(dim)


def _signature(step: StepTrace, stable_ids: set[int]) -> tuple:
    # A slot in the BlockState that this step never reads (step 0 has no `noise_pred` yet, later steps do)
    # does not make the step different: unused placeholders are left out.
    live = [n for n in step.graph.nodes if n.op != "placeholder" or n.users]
    index = {node: k for k, node in enumerate(live)}
    mutated, shapes = _mutated(step.graph), _input_shapes(step)

    def enc(a: Any, top: bool = False, node: fx.Node | None = None, pos: Any = None) -> Any:
        if isinstance(a, fx.Node):
            return ("node", index[a]) if a in index else ("unread slot", a.target)
        if top and _liftable_number(node, pos, a):  # a direct argument may be lifted; one inside a list is the step's
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
        elif (at := _step_index(node, mutated, shapes)) is not None:  # x[i]: the step's i may be a table row
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
    per_step = [_lift_candidates(s) for s in members]
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
        or gather and _gathers_always(node, pos, invariant_slots, inputs)
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
        step_index = step_indices.get(id(node))
        if step_index is not None and step_index in lift_nodes:  # x[i] with the step's i
            base, (_, dim, width) = node.args[0], candidates[step_index][1]
            if gather and base.op == "placeholder" and base.target in invariant_slots:  # gathered per call
                env[node] = lift_nodes[step_index]
                gathered[step_index] = (base.target, dim, width)
            else:  # a device-side index into a tensor the step computes
                env[node] = graph.call_function(take_at, (args[0], dim, lift_nodes[step_index], width))
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
            table, at = _gathered_table(inputs[name], dim, [p[k][2] for p in per_step], steps, n, width)
            gathers.append((len(tables), steps, name, dim, at))
            tables.append(table)
            continue
        rows = [torch.as_tensor(p[k][2]) for p in per_step]
        proto = rows[0]
        dtype = _float_table_dtype(per_step[0][k][0]) if isinstance(per_step[0][k][2], float) else proto.dtype
        table = torch.zeros((n, *proto.shape), dtype=dtype, device=proto.device)
        for step, row in zip(members, rows):
            table[step.index] = row.to(dtype)
        tables.append(table)
    return Variant(module=module, steps=[s.index for s in members], lifted=lifted_names, tables=tables,
                   signature=signature, literals=literals, sources=_read_rows(lift_positions, members, read_at),
                   gathers=gathers)


# A small row of an input read at a fixed index in every step of a variant (``sigmas[0]`` in a first step of its
# own) is gathered too: the input's length (N + 1 for a schedule) then stays out of every step graph. A larger row
# (``prompt_embeds[0]``) is read in place: a table would copy it N times per call.
_GATHER_ROW_NUMEL = 1024


def _gathers_always(node: fx.Node, pos: Any, invariant_slots: list[str], inputs: dict[str, Any]) -> bool:
    base = node.args[0] if type(pos) is tuple else None
    if base is None or base.op != "placeholder" or base.target not in invariant_slots:
        return False
    x = inputs.get(base.target)
    return isinstance(x, torch.Tensor) and x.numel() // max(x.shape[pos[1]], 1) <= _GATHER_ROW_NUMEL


def _gathered_table(x: torch.Tensor, dim: int, indices: list[int], steps: torch.Tensor | None, n: int,
                    width: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The N-row table of ``x[..., i, ...]`` (``i`` at ``dim``; with ``width``, ``x[..., i:i + width, ...]``) at
    each of ``steps`` (None: every step, in order), and the indices read (made non-negative, on ``x``'s device;
    one row of ``width`` per step for a slice); a call fills the rows from its own ``x`` (``gather``)."""
    if width is None:
        at = torch.tensor([i % x.shape[dim] for i in indices], dtype=torch.int64, device=x.device)
        row = [*x.shape[:dim], *x.shape[dim + 1:]]
    else:
        at = torch.tensor([[i + j for j in range(width)] for i in indices], dtype=torch.int64, device=x.device)
        row = [*x.shape[:dim], width, *x.shape[dim + 1:]]
    table = x.new_zeros((n, *row))
    gather(table, steps, x, dim, at)
    return table, at


def gather(table: torch.Tensor, steps: torch.Tensor | None, x: torch.Tensor, dim: int, at: torch.Tensor) -> None:
    """Rows ``steps`` (None: all) of ``table`` = ``x`` at the indices ``at`` along ``dim`` (a call's schedule read
    by step; a 2-D ``at``: a slice of ``at.shape[1]`` per step). ``x`` may live on another device than the table
    (a CPU schedule of a CUDA loop)."""
    if steps is None and dim == 0 and at.dim() == 1 and x.device == table.device and x.dtype == table.dtype:
        torch.index_select(x, 0, at, out=table)  # one op, in place (a CUDA graph keeps reading the same memory)
        return
    rows = x.index_select(dim, at.flatten())
    if at.dim() == 2:
        rows = rows.unflatten(dim, tuple(at.shape))
    rows = rows.movedim(dim, 0)
    if steps is None:
        table.copy_(rows)
    else:
        table.index_copy_(0, steps, rows.to(table.device, table.dtype))


def _read_rows(lift_positions: list[int], members: list[StepTrace], read_at: list[list]
               ) -> list[tuple[int, torch.Tensor | None, Source]]:
    """For each table a lifted float fills: (table index, the rows it fills, None for all N, its source)."""
    found = []
    for j, k in enumerate(lift_positions):
        rows: dict[int, tuple[Source, list[int]]] = {}
        for step, row in zip(members, read_at):
            if row[k] is not None and row[k].lifted:
                rows.setdefault(id(row[k]), (row[k], []))[1].append(step.index)
        for source, at in rows.values():
            # every step of the variant reads it there: the whole table (rows of other variants' steps are unread)
            found.append((j, None if len(at) == len(members) else torch.tensor(at, dtype=torch.int64), source))
    return found


def _float_table_dtype(node: fx.Node) -> torch.dtype:
    """The dtype of a table of Python floats lifted from ``node``'s arguments: that of the op's result when it is
    float32 or float64 (a 0-d operand of that dtype promotes as the Python float did: an int tensor times it gives
    float32), float32 for a half or bfloat16 result (it stays half, and the operand is not rounded to half first:
    eager computes a half op with a Python float in float32), else the default float dtype (a comparison's bound)."""
    dtype = node.meta.get("dtype")
    if dtype is None or not dtype.is_floating_point:
        return torch.get_default_dtype()
    return dtype if dtype.itemsize >= 4 else torch.float32
