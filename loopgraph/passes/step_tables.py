"""Per-step values and their tables: which values of a traced step may become rows of a per-step table (floats,
ints of arithmetic, the step index of ``x[i]`` / ``x[i:i + k]``), and how a table is filled, by the plan or, for
an input indexed by the step, by each call (``gather``).

A step graph reads its rows at a device-side step counter: ``take_at`` reads ``x[i]`` of a tensor the step
computes; a gathered table holds ``x[i]`` of an input for every step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ..trace.floats import ARITHMETIC, Source
from ..trace.ir import StepTrace, func_name

__all__ = ["lift_candidates", "input_shapes", "liftable_number", "mutated_nodes", "step_index", "take_at",
           "gathers_always", "gathered_table", "gather", "read_rows", "float_table_dtype", "GATHER_ROW_NUMEL"]


def lift_candidates(step: StepTrace) -> list[tuple[fx.Node, Any, Any]]:
    """Per-step values in graph order: (node, argument position or keyword, None for a get_attr, or ("index", dim,
    width) for a step index, value).

    Python floats passed directly (positionally or by keyword: ``clamp(min=-c)``), ints passed directly to
    arithmetic (``x * scale + i``), the int of ``x[i]`` / ``x[:, i]`` on loop data and the start of ``x[i:i + k]``
    on a step input (a schedule indexed by the step) can become table rows; a number inside a list or tuple
    argument cannot, and is part of the step's signature instead."""
    found = []
    mutated, shapes = mutated_nodes(step.graph), input_shapes(step)
    for node in step.graph.nodes:
        if node.op == "get_attr":
            found.append((node, None, step.constants[node.target]))
        elif node.op == "call_function":
            for pos, arg in [*enumerate(node.args), *node.kwargs.items()]:
                if liftable_number(node, pos, arg):
                    found.append((node, pos, arg))
            at = step_index(node, mutated, shapes)
            if at is not None:
                dim, width = at
                index = node.args[1]
                entry = index if type(index) is not tuple else index[dim]
                found.append((node, ("index", dim, width), entry.start if type(entry) is slice else entry))
    return found


def input_shapes(step: StepTrace) -> dict[str, torch.Size]:
    """The shapes of the tensors the step was given, by slot (the step graph's placeholders)."""
    given = next(iter(step.cuts.values())).slots if step.cuts else {}
    return {k: v.shape for k, v in given.items() if isinstance(v, torch.Tensor)}


def liftable_number(node: fx.Node, pos: int | str, arg: Any) -> bool:
    """A float operand, or an int operand of arithmetic (``alpha=`` must stay a Python number)."""
    if pos == "alpha":
        return False
    return type(arg) is float or (type(arg) is int and func_name(node.target) in ARITHMETIC)


def mutated_nodes(graph: fx.Graph) -> set[fx.Node]:
    """The nodes an in-place op changes (its first argument)."""
    return {n.args[0] for n in graph.nodes if n.meta.get("mutates") and n.args and isinstance(n.args[0], fx.Node)}


def step_index(node: fx.Node, mutated: set[fx.Node], shapes: dict[str, torch.Size]) -> tuple[int, int | None] | None:
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


# A small row of an input read at a fixed index in every step of a variant (``sigmas[0]`` in a first step of its
# own) is gathered too: the input's length (N + 1 for a schedule) then stays out of every step graph. A larger row
# (``prompt_embeds[0]``) is read in place: a table would copy it N times per call.
GATHER_ROW_NUMEL = 1024


def gathers_always(node: fx.Node, pos: Any, invariant_slots: list[str], inputs: dict[str, Any]) -> bool:
    base = node.args[0] if type(pos) is tuple else None
    if base is None or base.op != "placeholder" or base.target not in invariant_slots:
        return False
    x = inputs.get(base.target)
    return isinstance(x, torch.Tensor) and x.numel() // max(x.shape[pos[1]], 1) <= GATHER_ROW_NUMEL


def gathered_table(x: torch.Tensor, dim: int, indices: list[int], steps: torch.Tensor | None, n: int,
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


def read_rows(lift_positions: list[int], members: list[StepTrace], read_at: list[list]
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


def float_table_dtype(node: fx.Node) -> torch.dtype:
    """The dtype of a table of Python floats lifted from ``node``'s arguments: that of the op's result when it is
    float32 or float64 (a 0-d operand of that dtype promotes as the Python float did: an int tensor times it gives
    float32), float32 for a half or bfloat16 result (it stays half, and the operand is not rounded to half first:
    eager computes a half op with a Python float in float32), else the default float dtype (a comparison's bound)."""
    dtype = node.meta.get("dtype")
    if dtype is None or not dtype.is_floating_point:
        return torch.get_default_dtype()
    return dtype if dtype.itemsize >= 4 else torch.float32
