"""``compile_loop``: the public entry point, and ``CompiledLoop``, the drop-in replacement for a loop wrapper.

A call finds a plan whose guard holds, or makes one (planner.py: trace -> guards -> passes -> backend -> verify),
and runs the plan's executable (runtime/). Each stage is a package; docs/how-compile-loop-works.md,
"Architecture", maps every stage to its package and files.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading
import time
import warnings

import torch

from .backend.compiler import Backend
from .config import CompileConfig, LoopStats
from .guards.plan_guard import PlanCache
from .inner_loops import LOCAL, InnerLoop, step_loop_blocks, wrapper_lock
from .modular_pipelines.blocks import ModularPipelineBlocks
from .planner import Planner
from .report import PlanReport, explain_lines, report
from .runtime.executables import CallFailed, Context, Eager
from .runtime.watch import StepWatch
from .trace.ir import Unsupported
from .verify import matches_eager, max_error, tolerance

logger = logging.getLogger(__name__)

__all__ = ["CompileConfig", "CompiledLoop", "LoopStats", "compile_loop", "matches_eager", "max_error", "tolerance"]


class CompiledLoop(ModularPipelineBlocks):
    """A loop wrapper compiled by ``compile_loop``: same interface, same results, no Python per step.

    Called as ``components, state = fast(components, state)``; drops into a ``SequentialPipelineBlocks`` or
    a ``ModularPipeline`` in place of the wrapper.

    Attributes:
        wrapper: the loop wrapper it compiles (called as it is by the calls that trace).
        config: the ``CompileConfig`` (``compile_loop``'s options).
        stats: a ``LoopStats``, counted over every call: ``calls``, ``compiled_calls`` (calls that ran compiled
            code), ``plans`` (traced eager calls: the first, and each call no plan's guard accepted),
            ``compiles`` and ``loaded`` (compiled code built, or loaded from the persistent cache),
            ``step_graphs``, ``eager_blocks`` (blocks that run eagerly each step), ``segment_calls``,
            ``plan_seconds``, ``compile_seconds`` and ``guard_seconds``.
        last_plan: the newest plan as a read-only report (how it runs, slots, step graphs, passes).
        explain(verbose=False): the same as text, and why a block runs eagerly; ``guard_check(components,
            state)`` says why a call would re-plan, without running it.
        inner_loops: by block name, the step loops inside the wrapper's blocks (``loopgraph.inner_loops``), each
            with its own compiled loop (``.compiled``); empty for a wrapper whose ``loop_step`` is the step.
    """

    def __init__(self, wrapper, config: CompileConfig, watch: StepWatch | None = None) -> None:
        super().__init__()
        self.wrapper = wrapper
        self.config = config
        self.stats = LoopStats()
        # a step loop inside a block of another compiled loop reports to that loop's watch (inner_loops.py)
        self._own_watch = watch is None
        self._watch = watch or StepWatch(type(wrapper).__name__)
        self._ctx = Context(wrapper, config, self.stats, self._watch)
        self._planner = Planner(self._ctx, Backend(config))
        self._plans = PlanCache(config.max_plans, config.static_shapes, f"{type(wrapper).__name__}")
        self._lock = threading.Lock()  # calls never share the plan's buffers mid-flight
        self._replans: list[str] = []  # why each of the latest consecutive calls re-planned
        self.path = None
        self._find_inner_loops()

    def _find_inner_loops(self) -> None:
        """Blocks that run the steps in a loop of their own (inner_loops.py): the wrapper's loop runs eagerly and
        each such loop compiled where it is. Found again when the wrapper's blocks change."""
        blocks = self.wrapper.sub_blocks
        found = step_loop_blocks(self.wrapper)
        self.inner_loops: dict[str, InnerLoop] = {
            name: InnerLoop(name, blocks[name], loop, self._compile_inner)
            for name, loop in found.items() if loop.problem is None}
        self._inner_problems = {name: loop for name, loop in found.items() if loop.problem is not None}
        self._blocks_seen = [(name, id(block)) for name, block in blocks.items()]

    def _compile_inner(self, inner_wrapper) -> "CompiledLoop":
        fast = CompiledLoop(inner_wrapper, self.config, self._watch)
        self._watch.spellings = (LOCAL + "{}", "{}")  # a callback's "latents": the block's carried local first
        fast.path = f"{self.path or type(self.wrapper).__name__}.{inner_wrapper.name}"
        return fast

    @property
    def path(self) -> str | None:
        """Where compile_pipeline found the wrapper ("denoise.denoise"): in logs and step events."""
        return self._path

    @path.setter
    def path(self, value: str | None) -> None:
        self._path = value
        if self._own_watch:
            self._watch.path = value or type(self.wrapper).__name__

    def __deepcopy__(self, memo):
        # ModularPipeline / init_pipeline deep-copy their blocks: the copy gets the wrapper's copy and its own
        # (empty) plan cache; locks and compiled code are not copyable state.
        fast = CompiledLoop(copy.deepcopy(self.wrapper, memo), self.config)
        fast.path = self.path
        return fast

    # -- the wrapper's interface ---------------------------------------------------------------------------
    @property
    def description(self) -> str:
        return f"[compiled] {self.wrapper.description}"

    @property
    def inputs(self):
        return self.wrapper.inputs

    @property
    def intermediate_outputs(self):
        return self.wrapper.intermediate_outputs

    @property
    def expected_components(self):
        return self.wrapper.expected_components

    @property
    def expected_configs(self):
        return getattr(self.wrapper, "expected_configs", [])

    @property
    def model_name(self):
        return getattr(self.wrapper, "model_name", None)

    # -- calling ---------------------------------------------------------------------------------------------
    def __call__(self, components, state):
        if [(name, id(block)) for name, block in self.wrapper.sub_blocks.items()] != self._blocks_seen:
            self._find_inner_loops()  # a block replaced since: it may hold a step loop, or no longer
        if self.inner_loops:
            return self._call_with_inner_loops(components, state)
        with self._lock, torch.no_grad(), self._watch.calling():
            self.stats.calls += 1
            block_state = self.wrapper.get_block_state(state)  # eager's input checks and errors
            start = time.perf_counter()
            plan = self._plans.find(components, vars(block_state))
            self.stats.guard_seconds += time.perf_counter() - start
            if plan is None:
                self._note_replan()
                name = self._planner.backend.label = self.path or type(self.wrapper).__name__
                logger.info("compile_loop: %s: tracing (one eager call) and planning%s", name,
                            "" if self.stats.plans else ", compiling")
                plan, result = self._planner.plan(components, state)
                logger.info("compile_loop: %s: planned in %.1f s (%s)", name, time.perf_counter() - start,
                            plan.executable.kind.value if plan is not None else "not guarded: runs eagerly")
                if plan is not None:
                    self._plans.add(plan)
                return result
            self._replans = []
            try:
                return plan.executable.run(components, state, block_state)
            except CallFailed as e:  # the compiled code failed where eager runs: nothing was written yet
                if self.config.strict:
                    raise e.__cause__
                warnings.warn(f"compile_loop: {type(self.wrapper).__name__}: the compiled loop failed on this call "
                              f"({e}); this plan runs eagerly from now on", stacklevel=2)
                plan.executable = Eager(self._ctx)
                plan.problems = [Unsupported(f"the compiled loop failed on a call: {e}")]
                return plan.executable.run(components, state, block_state)
            finally:
                counter = self._planner.backend.counter
                self.stats.compiles, self.stats.compile_seconds = counter.count, counter.seconds
                self.stats.loaded = counter.loaded

    def _call_with_inner_loops(self, components, state):
        """The wrapper's own loop eagerly, its blocks' step loops compiled (inner_loops.py): each block that holds
        one runs its ``__call__`` with the loop handed to the block's inner compiled loop."""
        with self._lock, wrapper_lock(self.wrapper), self._watch.calling():  # (another compiled loop of the same
            self.stats.calls += 1                                             # wrapper swaps its blocks too)
            blocks = self.wrapper.sub_blocks
            originals = {name: blocks[name] for name in self.inner_loops}
            try:
                for name, inner in self.inner_loops.items():
                    blocks[name] = inner.proxy()
                return self.wrapper(components, state)
            finally:
                blocks.update(originals)
                self._sum_inner_stats()

    def _sum_inner_stats(self) -> None:
        """The inner loops' stats as this loop's (its own: the calls)."""
        inner = [loop.compiled.stats for loop in self.inner_loops.values() if loop.compiled is not None]
        for f in dataclasses.fields(LoopStats):
            if f.name != "calls":
                setattr(self.stats, f.name, sum(getattr(s, f.name) for s in inner) if inner else f.default)

    def on_step_end(self, callback, every: int = 1, tensors=("latents",)):
        """Call ``callback(event)`` after every ``every``-th step of each call (steps ``every - 1``,
        ``2 * every - 1``, ...), with a ``loopgraph.StepEvent``: the loop's path, the step, the call's number of
        steps, the step's timestep and copies of the BlockState tensors named in ``tensors`` after the step (to
        decode a preview, report progress). No block runs eagerly for it: the compiled loop stops there and goes
        on. The callback observes: changing its tensors raises an error. Returns a function that removes it.

        Example:
            >>> previews = []
            >>> remove = fast.on_step_end(lambda e: previews.append(e.tensors["latents"]), every=5)
            >>> _, state = fast(components, state)    # previews after steps 4, 9, 14, ...
            >>> remove()
        """
        return self._watch.add(callback, every, tuple(tensors))

    def interrupt(self) -> None:
        """Stop the call in flight (from another thread: a UI's cancel button) at its next step or chunk boundary:
        it raises ``loopgraph.Interrupted`` with the steps done and copies of the loop's tensors there. A compiled
        call writes nothing back; a call that runs eagerly (the first, which traces) stops as an eager loop
        stopped there by an exception would. No call in flight: nothing happens."""
        if self._watch.running:
            self._watch.interrupt()

    def guard_check(self, components, state) -> str | None:
        """Would a call with ``components`` and ``state`` reuse a plan? None if so, else why each plan does not fit
        (a call with no fitting plan re-plans: one traced eager run). Runs nothing and changes nothing.

        Example:
            >>> fast.guard_check(setup.components, setup.new_state())   # None: the next call runs compiled
            >>> setup.components.guider.guidance_scale = 7.5
            >>> fast.guard_check(setup.components, setup.new_state())
            'plan 0: components.guider.guidance_scale is 7.5, was 4.0'
        """
        if self.inner_loops:
            raise NotImplementedError(
                f"guard_check: {type(self.wrapper).__name__}'s plans are its blocks' step loops', whose state the "
                f"blocks before them make on each iteration: only a call can tell (explain() shows why a step loop "
                f"planned again)")
        with self._lock, torch.no_grad():
            if not self._plans:
                return "not planned yet: the first call traces the loop"
            block_state = self.wrapper.get_block_state(state)
            if self._plans.find(components, vars(block_state), touch=False) is not None:
                return None
            return "; ".join(f"plan {k}: {reason}" for k, reason in enumerate(self._plans.misses))

    def _note_replan(self) -> None:
        """Say so when every call re-plans for the same thing (a counter that changes each call, a new tensor
        object set each call, a list cleared each call): each runs a traced eager call."""
        if not self._plans.misses:
            return
        self._replans.append(self._plans.misses[0])
        if len(self._replans) == 4 and all(
                r.split(" is ")[0] == self._replans[0].split(" is ")[0] for r in self._replans):
            warnings.warn(f"compile_loop: {type(self.wrapper).__name__} re-plans on every call (a traced eager run "
                          f"each, no speed-up): {self._replans[-1]}. Keep that value the same between calls, or "
                          f"call the eager wrapper.", stacklevel=3)

    # -- introspection ---------------------------------------------------------------------------------------
    @property
    def last_plan(self) -> PlanReport | None:
        """The plan of the most recent call (found or made), as a read-only report; None before the first call. A
        loop whose step loops run inside its blocks: the newest plan of its (last) step loop."""
        if self.inner_loops:
            ran = [i.compiled for i in self.inner_loops.values() if i.compiled is not None and i.compiled._plans]
            return ran[-1].last_plan if ran else None
        return report(self._plans.newest) if self._plans else None

    @property
    def graph(self) -> torch.fx.GraphModule | None:
        """The fused step of the most recent whole-loop plan (its most used variant)."""
        plan = next((p for p in reversed(self._plans) if p.loop is not None), None)
        if plan is None:
            return None
        return max(plan.loop.variants, key=lambda v: len(v.steps)).module

    def explain(self, verbose: bool = False) -> str:
        """What was compiled and how it runs, what runs eagerly and why, the step graphs and the stats (a summary);
        ``verbose=True`` adds the slot table, each step graph's steps, the hoisted tables and the passes."""
        lines = [f"CompiledLoop({type(self.wrapper).__name__}) backend={self.config.backend} "
                 f"mode={self.config.mode} strict={self.config.strict}"]
        for name, loop in self._inner_problems.items():
            lines.append(f"block {name!r} runs its steps in a loop of its own ({loop.owner.__name__}.__call__, "
                         f"{loop.where}) that cannot be compiled where it is: {loop.problem}")
        if self.inner_loops:
            lines.append(f"runs as: its own loop eagerly (Python per iteration); the step loops of its blocks "
                         f"compiled where they are (stats: theirs, summed)")
            for name, inner in self.inner_loops.items():
                lines.append(f"block {name!r}: the step loop in {inner.loop.owner.__name__}.__call__ "
                             f"({inner.loop.where}):")
                lines += [f"  ran as written on {n} call(s): {why}" for why, n in inner.as_written.items()]
                text = inner.compiled.explain(verbose) if inner.compiled is not None else "  not compiled yet"
                lines.extend("  " + line for line in text.splitlines())
            return "\n".join(lines)
        if not self._plans:
            return "\n".join(lines + ["  not planned yet: the first call traces the loop"])
        if self._plans.misses:
            lines.append("the last call re-planned: " + "; ".join(
                f"plan {k}: {reason}" for k, reason in enumerate(self._plans.misses)))
        return "\n".join(lines + explain_lines(self._plans.newest, self.wrapper, self.stats, verbose))


def compile_loop(wrapper, config: CompileConfig | None = None, **options) -> CompiledLoop:
    """Compile a loop wrapper's whole denoising loop.

    Args:
        wrapper: a loop wrapper (loopgraph's or diffusers' ``LoopSequentialPipelineBlocks``, or any object
            with ``sub_blocks``, ``loop_step``, ``get_block_state``/``set_block_state`` and a looping
            ``__call__``). A wrapper one of whose blocks runs the steps in a ``for`` loop of its own (a loop over
            chunks: diffusers' Helios) runs its own loop eagerly and that step loop compiled where it is
            (``loopgraph.inner_loops``; ``CompiledLoop.inner_loops``).
        config: a ``CompileConfig``; ``options`` (its field names, below) replace its fields.
        backend: "inductor" (default; C++ host loop on CPU), or "eager"/"aot_eager" for debugging.
        mode: an Inductor mode such as "max-autotune-no-cudagraphs".
        strict: raise instead of falling back to eager on data-dependent Python or a failed compilation.
        cuda_graphs: "auto" | True | False (the whole-loop CUDA graph; not used on CPU).
        static_shapes: raise instead of re-planning when shapes or component state change.
        check: compare the first compiled run with the eager run it was traced from (fall back if they differ).
        fused_kernels: "auto" (on CUDA) | True | False: replace guidance + scheduler updates with fused Triton
            kernels (``loopgraph.passes.fused_kernels``); True forces them on CPU too (needs TRITON_INTERPRET=1;
            testing).
        rng: how random ops inside the loop (a stochastic sampler's noise) draw. "eager" (default): from
            torch's generators, as eager does, so results equal eager's exactly; a block that draws runs
            eagerly each step between compiled segments (on CUDA, no whole-loop graph). "counter": inside the
            compiled loop (and the CUDA graph), counter-based by the seed policy of ``loopgraph.rng``: one seed
            per generator per call, same distribution as eager, not the same values.
        max_plans: plans kept (least recently used out); an evicted one re-plans with one traced eager call.
        batch_guidance: "auto" (default) | True | False: a model called once per guidance batch in a step runs
            once on the batches concatenated (``loopgraph.passes.batching``), where the batched call, traced,
            gives the separate calls' results; True also warns about call sites left apart, False never batches.
        cache: True (default) | False | a folder: the persistent cache of compiled loops
            (``loopgraph.backend.disk_cache``), so that a new process loads the compiled loop instead of compiling
            it (its first call still traces: one eager run). True: ``$LOOPGRAPH_CACHE_DIR`` (an empty string turns
            it off), else the user cache directory (``~/.cache/loopgraph``); False: compiled in this process only.
            Inductor only.
        lift_floats: True (default) | False: a Python float the traced call read (a block input, a component's
            attribute) and used only as an operand of tensor arithmetic is an input of the compiled loop: a new
            guidance scale runs the same plan (``loopgraph.trace.floats``). False guards every float by value (for
            code whose C reads a float's value past its Python methods, such as ``"%f" % scale`` or ``struct.pack``).

    Returns:
        A ``CompiledLoop``: call it as ``components, state = fast(components, state)``.

    Example:
        >>> from loopgraph.zoo.loops import build_loop
        >>> setup = build_loop("dit", steps=8)
        >>> fast = compile_loop(setup.wrapper)
        >>> _, state = fast(setup.components, setup.new_state())   # traces (eagerly) and compiles
        >>> _, state = fast(setup.components, setup.new_state())   # runs the compiled loop
    """
    config = CompileConfig.of(config, options)
    missing = [a for a in ("sub_blocks", "loop_step", "get_block_state", "set_block_state") if not hasattr(wrapper, a)]
    if missing or not callable(wrapper):
        raise TypeError(
            f"compile_loop expects a loop wrapper (a LoopSequentialPipelineBlocks); {type(wrapper).__name__} "
            f"lacks {missing or ['__call__']}. Pass the denoise loop block itself, not a pipeline or a leaf block."
        )
    if isinstance(wrapper, CompiledLoop):
        raise TypeError("compile_loop: this wrapper is already compiled")
    return CompiledLoop(wrapper, config)
