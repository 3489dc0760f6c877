"""Watching a compiled loop while it runs: step callbacks (previews), interruption from another thread, and a stream
of per-step events. The compiled loop stops only where it is asked to: a callback every k steps ends a chunk of the
compiled loop there (executables.WholeLoop); with none requested, nothing changes (no Python per step).

A callback observes the loop: it gets a ``StepEvent`` whose tensors are copies of the loop's tensors after the
step, on every route (traced, eager segments, compiled, eager), so a kept preview is never overwritten. A callback
that changes them (in place, or by returning new values, as diffusers' ``callback_on_step_end`` may) is refused
with an error naming it and the step: the compiled loop cannot take a new value from outside mid-loop faithfully.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

__all__ = ["StepEvent", "Interrupted", "StepWatch", "stream"]


@dataclass(frozen=True)
class StepEvent:
    """One finished step of a loop: ``path`` is the loop (its path inside ``compile_pipeline``, else its wrapper's
    class name), ``step`` the step's index (0-based), ``total`` the call's number of steps, ``t`` the step's
    timestep (``timesteps[step]``, where the loop has them), ``tensors`` copies of the BlockState tensors asked
    for, as they are after the step."""

    path: str
    step: int
    total: int
    t: Any
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)


class Interrupted(Exception):
    """A compiled loop's call stopped by ``CompiledLoop.interrupt()`` after ``step`` steps. A compiled call wrote
    nothing back (the caller's state and components are as before the call); ``tensors`` holds copies of the loop's
    tensors where it stopped. A call that ran eagerly (tracing, or a loop that is not compiled) stops as an eager
    loop stopped there by an exception would."""

    def __init__(self, path: str, step: int, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(f"{path}: interrupted after {step} step(s)")
        self.path, self.step, self.tensors = path, step, tensors


@dataclass
class _Callback:
    fn: Callable[[StepEvent], Any]
    every: int
    tensors: tuple[str, ...]


class StepWatch:
    """A compiled loop's step callbacks and interrupt flag. ``after(step, ...)`` runs after each step where a
    callback or an interruption may act; ``stops(total)`` says after which steps that is."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.callbacks: list[_Callback] = []
        self.stop = False      # interrupt() asked the call in flight to stop (a plain flag: set from any thread)
        self.running = False   # a call is in flight: interrupt() applies to it
        # how a callback's tensor name is spelled in the loop's state: a step loop inside a block keeps the block's
        # locals as ``local_<name>`` (inner_loops.py), so ``latents`` is found there too
        self.spellings: tuple[str, ...] = ("{}",)

    def add(self, fn: Callable[[StepEvent], Any], every: int, tensors: tuple[str, ...]) -> Callable[[], None]:
        if not callable(fn):
            raise TypeError(f"on_step_end: the callback must be callable, not {type(fn).__name__}")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"on_step_end: every must be a whole number >= 1, not {every!r}")
        if isinstance(tensors, str) or not all(isinstance(n, str) for n in tensors):
            raise TypeError(f"on_step_end: tensors must be a list of BlockState names, not {tensors!r}")
        callback = _Callback(fn, every, tuple(tensors))
        self.callbacks.append(callback)
        return lambda: self.callbacks.remove(callback) if callback in self.callbacks else None

    def interrupt(self) -> None:
        self.stop = True

    @contextlib.contextmanager
    def calling(self):
        """Around one call: an interruption asked for before it or after it does not carry over. A call inside the
        call in flight (a step loop compiled inside one of its blocks, sharing its watch) is part of it."""
        if self.running:
            yield
            return
        self.stop, self.running = False, True
        try:
            yield
        finally:
            self.stop = self.running = False

    def stops(self, total: int) -> list[int]:
        """The steps (0-based) after which a callback is due, ascending."""
        return sorted({s for c in self.callbacks for s in range(c.every - 1, total, c.every)})

    def after(self, step: int, total: int, read: Callable[[str], torch.Tensor | None], t: Any = None) -> None:
        """Step ``step`` of ``total`` is done: call the callbacks due, then stop if interrupted. ``read(name)`` is
        the BlockState tensor ``name`` as it is now (None: the loop has no such tensor)."""
        def spelled(name: str) -> torch.Tensor | None:
            return next((v for form in self.spellings if (v := read(form.format(name))) is not None), None)

        spelled.names = getattr(read, "names", [])
        for callback in list(self.callbacks):
            if (step + 1) % callback.every:
                continue
            tensors = {name: _copy(spelled, name, self.path) for name in callback.tensors}
            versions = {name: v._version for name, v in tensors.items()}
            returned = callback.fn(StepEvent(self.path, step, total, t, tensors))
            changed = {n for n, v in tensors.items() if v._version != versions[n]}
            if isinstance(returned, dict):  # diffusers' callbacks return their tensors: new ones are a change
                changed |= {n for n, v in returned.items() if tensors.get(n) is not v}
            changed = sorted(changed)
            if changed:
                raise ValueError(
                    f"{self.path}: the step callback {getattr(callback.fn, '__qualname__', callback.fn)!r} changed "
                    f"{changed} at step {step}: step callbacks observe the loop (their tensors are copies). Change "
                    f"the loop's state in a block of the loop instead (it then compiles with the loop).")
        if self.stop and step + 1 < total:
            raise Interrupted(self.path, step + 1, _all_tensors(read))


def _copy(read: Callable[[str], torch.Tensor | None], name: str, path: str) -> torch.Tensor:
    value = read(name)
    if not isinstance(value, torch.Tensor):
        raise KeyError(f"{path}: a step callback asks for {name!r}, which is not a tensor of the loop's BlockState "
                       f"after a step" + (f" (it has: {', '.join(sorted(read.names))})" if hasattr(read, "names")
                                          else ""))
    return value.detach().clone()


def _all_tensors(read) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name in getattr(read, "names", ())
            if isinstance(value := read(name), torch.Tensor)}


class Reader:
    """``read(name)`` over a mapping of names to tensors (a BlockState's vars, the compiled loop's buffers by
    slot), with ``names`` for error messages and ``Interrupted.tensors``."""

    def __init__(self, values: dict[str, Any], state: list[str] | None = None) -> None:
        self.values = values
        self.state = state  # the names that are the loop's state (Interrupted.tensors); None: every tensor

    @property
    def names(self) -> list[str]:
        return [k for k, v in self.values.items()
                if isinstance(v, torch.Tensor) and (self.state is None or k in self.state)]

    def __call__(self, name: str) -> torch.Tensor | None:
        value = self.values.get(name)
        return value if isinstance(value, torch.Tensor) else None


def timestep(slots: dict[str, Any], step: int) -> Any:
    """The step's timestep, ``timesteps[step]``, where the BlockState has a ``timesteps`` tensor that long."""
    timesteps = slots.get("timesteps")
    if isinstance(timesteps, torch.Tensor) and timesteps.dim() == 1 and step < timesteps.shape[0]:
        return timesteps[step]
    return None


def eager_hook(watch: StepWatch) -> Callable[[int, Any, dict], None]:
    """For a call that runs the wrapper's own loop (tracing, or eagerly): ``hook(i, block_state, kwargs)`` after
    its step ``i``, with the step's ``t`` as loop_step got it."""
    def hook(i: int, block_state, kwargs: dict) -> None:
        if not (watch.callbacks or watch.stop):
            return
        values = vars(block_state)
        total = values.get("num_inference_steps")
        if not isinstance(total, int):
            timesteps = values.get("timesteps")
            total = len(timesteps) if timesteps is not None and hasattr(timesteps, "__len__") else i + 2
        watch.after(i, total, Reader(values), kwargs.get("t", timestep(values, i)))

    return hook


@contextlib.contextmanager
def eager_steps(wrapper, hook: Callable[[int, Any, dict], None]):
    """For one eager call of ``wrapper`` in this thread: its ``loop_step`` followed by ``hook``. An instance
    attribute, so it holds ``TRACE_LOCK`` (as a trace, which patches the same wrapper, does) and calls from other
    threads get the original."""
    from ..pystate.attribute_log import TRACE_LOCK

    with TRACE_LOCK:
        loop_step, count, thread = wrapper.loop_step, [0], threading.get_ident()

        def watched_step(comps, block_state, **kwargs):
            comps, block_state = loop_step(comps, block_state, **kwargs)
            if threading.get_ident() == thread:
                count[0] += 1
                hook(count[0] - 1, block_state, kwargs)
            return comps, block_state

        had = "loop_step" in vars(wrapper)
        wrapper.loop_step = watched_step
        try:
            yield
        finally:
            if had:
                wrapper.loop_step = loop_step
            else:
                vars(wrapper).pop("loop_step", None)  # (rng.eager_loop, inside, may have removed it already)


_DONE = object()


def stream(target: Any, *args, every: int = 1, tensors: tuple[str, ...] | list[str] = ("latents",),
           **kwargs) -> Iterator[StepEvent]:
    """Run ``target(*args, **kwargs)`` (a ``CompiledLoop``, or a pipeline that ``compile_pipeline`` compiled) in
    a worker thread and yield a ``StepEvent`` after every ``every``-th step of each compiled loop in it, as the
    steps finish. When exhausted, the generator returns ``target``'s own return value (``StopIteration.value``;
    ``yield from`` gives it). Closing it early (``break``) interrupts the loops and waits for the worker.

    Example:
        >>> for event in loopgraph.stream(fast, components, state, every=5):
        ...     show(event.step, event.tensors["latents"])
    """
    from ..compile import CompiledLoop
    from ..whole_pipeline import compiled_loops

    loops = [target] if isinstance(target, CompiledLoop) else [
        site.compiled for site in compiled_loops(target) if isinstance(site.compiled, CompiledLoop)]
    if not loops:
        raise ValueError(f"stream: {type(target).__name__} has no compiled loop to watch (compile it with "
                         f"loopgraph.compile_loop or loopgraph.compile_pipeline first)")
    events: queue.Queue = queue.Queue()
    removers = [loop.on_step_end(events.put, every=every, tensors=tuple(tensors)) for loop in loops]
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["result"] = target(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 — handed to the consumer
            outcome["error"] = e
        finally:
            events.put(_DONE)

    worker = threading.Thread(target=work, name="loopgraph-stream", daemon=True)
    worker.start()
    finished = False
    try:
        while (event := events.get()) is not _DONE:
            yield event
        finished = True
    finally:
        if not finished:
            for loop in loops:
                loop.interrupt()
        worker.join()
        for remove in removers:
            remove()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]
