"""Eager segments: per step, the compiled segments between blocks that must run eagerly (data-dependent Python,
random ops with ``rng="eager"``), and those blocks called for real (planned by passes/partition.py)."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from ..guards.attribute_guard import StateGuard
from ..guards.plan_guard import tensor_spec
from ..modular_pipelines.blocks import run_block
from ..modular_pipelines.state import BlockState, values_equal
from ..passes.partition import Segment, segment_end
from ..pystate.components import (
    component_objects,
    component_tensors,
    put,
    set_attribute,
    value_of,
)
from ..rng import CounterDraws, draw_seeds
from ..trace.ir import LoopTrace
from ..verify import check_slots
from .executables import Context, ExecutableKind, drawing, origin, progress, write_back
from .watch import Reader, timestep

__all__ = ["EagerSegments"]


class EagerSegments:
    """Every step: compiled segments on the current slot values, eager blocks called for real.

    ``fns[k][v]`` is segment k's compiled step graph of variant v; ``data_slots`` the BlockState inputs that
    are loop data (the plan's data tensors); ``stable`` the reads of the traced call that
    hold at every cut; ``restores`` (step, eager block) -> the attributes compiled blocks wrote since the last
    eager block (partition.restores)."""

    kind = ExecutableKind.EAGER_SEGMENTS

    def __init__(self, ctx: Context, trace: LoopTrace, segments: list[Segment], fns: list[list[Callable]],
                 sources: dict[str, tuple], data_slots: set[str], stable: StateGuard,
                 restores: dict[tuple[int, str], list[tuple]]) -> None:
        self.ctx, self.trace, self.segments, self.fns = ctx, trace, segments, fns
        self.sources, self.data_slots, self.stable, self.restores = sources, data_slots, stable, restores

    def describe(self) -> list[str]:
        return ["segments per step: " + " | ".join(
            f"eager {seg.blocks[0]}" if seg.eager else
            f"compiled {'+'.join(seg.blocks)} ({len(seg.plan.variants)} step graphs)" for seg in self.segments),
            *(f"compiled code of {'+'.join(seg.blocks)} step graph {v}: {origin(fn)}"
              for seg, fns in zip(self.segments, self.fns) for v, fn in enumerate(fns))]

    def code(self) -> list[Callable]:
        return [fn for fns in self.fns for fn in fns]

    def verify(self) -> None:
        """Each compiled segment, run on the loop tensors the traced call had where it starts, against the ones it
        had where it ends, step by step: no block runs again (its side effects happen once per step)."""
        trace, stats = self.trace, self.ctx.stats
        seeds = {name: seed.value for name, seed in trace.seeds.items()}
        checked, calls = 0, stats.segment_calls
        for step in trace.steps:
            for k, seg in enumerate(self.segments):
                start_values = step.cuts[seg.blocks[0]].values
                end_values = step.cuts[segment_end(self.segments, k)].values
                if seg.eager or start_values is None or end_values is None:
                    continue
                env = {**{n: v.clone() for n, v in start_values.items()}, **seeds}
                self._call_segment(k, env, step.index)
                check_slots(f"compiled segment {'+'.join(seg.blocks)} at step {step.index}",
                            {name: env[name] for name in seg.plan.state_slots}, end_values)
                checked += 1
        stats.segment_calls = calls
        if not checked and any(not seg.eager for seg in self.segments):
            raise RuntimeError("no step of the traced call to check the compiled segments against")

    def run(self, components, state, block_state: BlockState):
        self.ctx.stats.compiled_calls += 1
        slots = vars(block_state)
        with progress(self.ctx.wrapper, self.trace, block_state) as bar:
            computed, eager_state = self._run_segments(components, slots, draw_seeds(self.sources, slots)[1], bar)
        if eager_state is None:
            return write_back(self.ctx, self.trace, components, state, block_state, computed, segmented=True)
        self.ctx.wrapper.set_block_state(state, eager_state)  # its tensors are the ones eager's own run left
        return components, state

    def _run_segments(self, components, slots: dict[str, Any], draws: CounterDraws, bar=None):
        """Returns the final tainted slot values, and the BlockState when an eager block did something the trace
        did not show (other slots, shapes or Python state): then the rest of the loop ran eagerly. After each
        step: the progress bar, step callbacks and an interruption (runtime/watch.py)."""
        trace, wrapper = self.trace, self.ctx.wrapper
        total = len(trace.steps)
        env = {k: v for k, v in slots.items() if k in self.data_slots}
        env.update(draws.seeds.values())  # rng="counter": seed name -> this call's seed
        for step in trace.steps:
            i = step.index
            for k, seg in enumerate(self.segments):
                if not seg.eager:
                    self._call_segment(k, env, i, step)
                    continue
                name = seg.blocks[0]
                cut = step.cuts[name]
                block_state = _eager_block_state(trace, cut.slots, cut.nodes, env, slots)
                # the Python state the compiled blocks before it would have left (they run no Python), holding this
                # call's loop tensors (a scheduler's history)
                for key in self.restores.get((i, name), ()):
                    obj, attr, value = cut.python[key]
                    set_attribute(obj, attr, trace.python.replay(obj, attr, value))
                for slot, (path, _, _) in cut.held.items():
                    put(components, path, env[slot])
                with drawing(self.ctx.config, draws, i, cut.draws):
                    components, block_state = run_block(name, wrapper.sub_blocks[name], components, block_state,
                                                        **step.kwargs)
                rest = trace.block_names[trace.block_names.index(name) + 1:]
                after = rest[0] if rest else "__end__"
                held = _held_tensors(wrapper, components, step.cuts[after].held)
                if held is None or not self._as_traced(step, after, block_state, held, slots):
                    warnings.warn(f"compile_loop: block {name!r} did not do at step {i} what it did when traced "
                                  f"(other slots, shapes or Python state): the rest of the loop runs eagerly",
                                  stacklevel=4)
                    return {}, self._finish_eagerly(components, block_state, step, rest, draws, bar)
                env.update({slot: vars(block_state)[slot] for slot in step.cuts[after].nodes})
                env.update(held)
            self._after_step(i, total, {**slots, **env}, list(env), bar)
        return env, None

    def _after_step(self, i: int, total: int, values: dict[str, Any], state: list[str], bar) -> None:
        if bar is not None:
            bar.update(1)
        watch = self.ctx.watch
        if watch.callbacks or watch.stop:
            watch.after(i, total, Reader(values, state), timestep(values, i))

    def _call_segment(self, k: int, env: dict[str, Any], i: int, step=None) -> None:
        """Compiled segment ``k`` at step ``i`` on ``env``. With the traced ``step`` given, a slot the traced call
        updated in place across the segment is updated in place here too (eager's aliasing: the caller's tensor
        where eager wrote it, another one where an eager block rebound the slot first); others are rebound."""
        seg = self.segments[k]
        loop, v = seg.plan, seg.step_variant[i]
        args = [env[n] if n in env else torch.zeros_like(seg.examples[n])
                for n in [*loop.state_slots, *loop.invariant_slots]]
        outputs = self.fns[k][v](*args, *[table[i] for table in loop.variants[v].tables])
        if step is not None:
            before, after = step.cuts[seg.blocks[0]].slots, step.cuts[segment_end(self.segments, k)].slots
        for name, out in zip(loop.state_slots, outputs):
            current = env.get(name)
            if (step is not None and isinstance(current, torch.Tensor) and name in before
                    and before[name] is after.get(name) and current.shape == out.shape and current.dtype == out.dtype):
                current.copy_(out)
            else:
                env[name] = out
        self.ctx.stats.segment_calls += 1

    def _as_traced(self, step, after: str, block_state: BlockState, held: dict[str, torch.Tensor],
                   slots: dict[str, Any]) -> bool:
        """Whether an eager block left the slots and the Python state as in the traced run."""
        trace = self.trace
        cut = step.cuts[after]
        expected, tainted = cut.slots, cut.nodes
        got = vars(block_state)
        if got.keys() != expected.keys():
            return False
        # slots that held one tensor when traced must still do: the compiled graph cannot tell them apart
        shared: dict[Any, Any] = {}  # traced node -> this call's tensor
        nodes = [(node, held[slot]) for slot, (_, _, node) in cut.held.items()]
        for node, value in nodes + [(node, got[slot]) for slot, node in tainted.items()]:
            if shared.setdefault(node, value) is not value:
                return False
        for k, value in got.items():
            if k in tainted:
                ok = isinstance(value, torch.Tensor) and tensor_spec(value) == tensor_spec(expected[k])
            else:
                ok = (value is expected[k] or (k in slots and expected[k] is trace.initial_slots.get(k)
                                               and value is slots[k]) or values_equal(value, expected[k]))
            if not ok:
                return False
        # every attribute the traced call had written by then or may change in place, as it was there (the loop
        # tensors components hold: this call's, compared by shape and dtype), and every other read as it was
        loop_ids = {id(t) for t in held.values()}
        return all(_same_state(value_of(obj, name), value, loop_ids)
                   for obj, name, value in cut.python.values()) and self.stable.holds()

    def _finish_eagerly(self, components, block_state: BlockState, step, rest: list[str],
                        draws: CounterDraws, bar=None) -> BlockState:
        wrapper, config = self.ctx.wrapper, self.ctx.config
        total = len(self.trace.steps)
        with drawing(config, draws, step.index, draws.counts):  # the step's draws go on where the block left them
            for name in rest:
                components, block_state = run_block(name, wrapper.sub_blocks[name], components, block_state,
                                                    **step.kwargs)
        self._after_step(step.index, total, vars(block_state), None, bar)
        for later in self.trace.steps[step.index + 1:]:
            with drawing(config, draws, later.index, {}):
                components, block_state = wrapper.loop_step(components, block_state, **later.kwargs)
            self._after_step(later.index, total, vars(block_state), None, bar)
        return block_state


def _held_tensors(wrapper, components, traced: dict[str, tuple]) -> dict[str, torch.Tensor] | None:
    """This call's tensors at the places the traced run's components held loop tensors (None if any is gone)."""
    if not traced:  # most loops: no component holds loop tensors (no walk of the components each step)
        return {}
    found = component_tensors(component_objects(wrapper, components))
    held = {slot: found[slot][1] for slot in traced if slot in found}
    ok = all(tensor_spec(held[slot]) == tensor_spec(value) for slot, (_, value, _) in traced.items()
             if slot in held)
    return held if ok and len(held) == len(traced) else None


def _same_state(value: Any, expected: Any, loop_ids: set[int]) -> bool:
    """``values_equal``, except that a loop tensor (``loop_ids``: this call's) is compared by spec only."""
    if isinstance(value, torch.Tensor) and id(value) in loop_ids:
        return isinstance(expected, torch.Tensor) and tensor_spec(value)[::2] == tensor_spec(expected)[::2]
    if type(value) in (list, tuple) and type(expected) is type(value):
        return len(value) == len(expected) and all(_same_state(a, b, loop_ids) for a, b in zip(value, expected))
    if type(value) is dict and type(expected) is dict:
        return value.keys() == expected.keys() and all(_same_state(value[k], expected[k], loop_ids) for k in value)
    return values_equal(value, expected)


def _eager_block_state(trace: LoopTrace, traced: dict[str, Any], tainted: dict[str, Any], env: dict[str, Any],
                       slots: dict[str, Any]) -> BlockState:
    """The BlockState an eager block gets: this call's tensors where the trace had loop data, this call's own
    inputs where the trace had its inputs (a generator), and the traced (schedule) values elsewhere."""
    block_state = BlockState()
    for k, value in traced.items():
        if k in tainted:
            block_state[k] = env[k]
        elif k in slots and value is trace.initial_slots.get(k):
            block_state[k] = slots[k]
        else:
            block_state[k] = value
    return block_state
