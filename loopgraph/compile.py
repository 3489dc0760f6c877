"""``compile_loop``: the public entry point, and ``CompiledLoop``, the drop-in replacement for a loop wrapper.

    trace    run the wrapper's own __call__ for real, recording each loop_step and the Python state it reads
             and writes (trace.py, components.py, snapshots.py)
    guard    what a later call must match to reuse the plan (guards.py)
    analyse  classify slots, group steps into variants, hoist per-step values into tables (analysis.py)
    lower    one whole-loop function of while_loops over a device-side step counter (runtime.py)
    compile  once per (structure, shapes); checked against the eager result it was traced from
    run      get_block_state -> find a plan whose guard holds -> compiled loop -> the Python state as eager
             leaves it (with the tensors the loop computed in place of the traced run's) -> set_block_state

A loop whose only problems are data-dependent Python or random ops inside some blocks runs in *eager
segments* instead: per step, the compiled segments between those blocks, and the blocks themselves called
for real (``_run_segments``). With ``rng="counter"``, random ops are no problem: they draw by the seed
policy of rng.py, inside the compiled loop and wherever a block runs eagerly.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .analysis import LoopPlan, Segment, plan_loop, plan_segments
from .blocks import ModularPipelineBlocks, run_block
from .components import component_objects, component_tensors, put, set_attribute, value_of
from .snapshots import ContainerSnap, TensorSnap, copy_value, same
from .guards import PlanCache, PlanGuard, StateGuard, plan_guard, stable_guard, tensor_spec
from .runtime import WHOLE_TABLES, CompileCounter, StateBuffers, compile_fn, lower, module_ops, op_count
from .state import BlockState, values_equal
from .rng import CounterDraws, CounterMode, draw_seed, eager_loop, source_key
from .trace import LoopTrace, Unsupported, trace_loop

__all__ = ["CompileConfig", "CompiledLoop", "LoopStats", "compile_loop", "matches_eager", "tolerance"]

_BACKENDS = ("inductor", "eager", "aot_eager")
_RNG = ("eager", "counter")
# Plans kept per compiled loop (most recently used first to stay): a sweep over guidance scales or prompts
# of new shapes re-plans an evicted one with one traced eager call; its compiled code is kept apart.
MAX_PLANS = 16


@dataclass(frozen=True)
class CompileConfig:
    """Options of ``compile_loop`` (see its docstring)."""

    backend: str = "inductor"
    mode: str | None = None
    strict: bool = False
    cuda_graphs: bool | str = "auto"
    static_shapes: bool = False
    check: bool = True
    fused_kernels: bool | str = "auto"
    rng: str = "eager"

    def __post_init__(self) -> None:
        if self.backend not in _BACKENDS:
            raise ValueError(f"compile_loop: backend must be one of {_BACKENDS}, got {self.backend!r}")
        if self.mode is not None and self.backend != "inductor":
            raise ValueError(f"compile_loop: mode={self.mode!r} needs backend='inductor'")
        if self.cuda_graphs not in (True, False, "auto"):
            raise ValueError(f"compile_loop: cuda_graphs must be True, False or 'auto', got {self.cuda_graphs!r}")
        if self.fused_kernels not in (True, False, "auto"):
            raise ValueError(f"compile_loop: fused_kernels must be True, False or 'auto', got {self.fused_kernels!r}")
        if self.rng not in _RNG:
            raise ValueError(f"compile_loop: rng must be one of {_RNG}, got {self.rng!r}")


@dataclass
class LoopStats:
    compiles: int = 0          # backend compilations (Dynamo frames handed to the backend)
    step_graphs: int = 0       # distinct fused step graphs (variants) over all plans
    eager_blocks: int = 0      # blocks that run eagerly (data-dependent Python, unsupported ops)
    segment_calls: int = 0     # compiled segment calls (loops with eager blocks: per step, per segment)
    calls: int = 0
    compiled_calls: int = 0
    plans: int = 0
    plan_seconds: float = 0.0
    compile_seconds: float = 0.0
    guard_seconds: float = 0.0  # checking the plans' guards, over all calls (the cost of never a wrong plan)


@dataclass(eq=False)  # compared by identity: the plan cache removes a plan by identity, never field by field
class _Plan:
    trace: LoopTrace
    guard: PlanGuard                    # what a call must match to reuse the plan (guards.py)
    final_untainted: dict[str, Any]
    loop: LoopPlan | None = None
    fn: Callable | None = None
    tables: list[list[torch.Tensor]] = field(default_factory=list)
    ends: torch.Tensor | None = None
    problems: list[Unsupported] = field(default_factory=list)
    segments: list[Segment] | None = None         # eager segments: compiled segments and eager blocks
    segment_fns: list[list[Callable]] = field(default_factory=list)  # per segment, per variant
    seed_sources: dict[str, tuple] = field(default_factory=dict)  # rng="counter": seed name -> its generator
    stable: StateGuard | None = None    # eager segments: the reads of the traced call that hold at every cut
    # eager segments: (step, eager block) -> the attributes compiled blocks wrote since the last eager block
    restores: dict[tuple[int, str], list[tuple]] = field(default_factory=dict)

    @property
    def data_specs(self) -> dict[str, tuple]:
        return self.guard.inputs.data


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """The issue's tolerance by dtype (fp32: rtol 1e-4, atol 1e-5)."""
    return {torch.float16: dict(rtol=1e-2, atol=1e-2), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}.get(
        dtype, dict(rtol=1e-4, atol=1e-5))


def max_error(value: torch.Tensor, expected: torch.Tensor) -> float:
    """The largest absolute difference, in float32."""
    return (value.float() - expected.float()).abs().max().item() if expected.numel() else 0.0


def matches_eager(value: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether a compiled result is eager's up to float rounding: its largest difference from ``expected`` is
    within ``atol + rtol * max|expected|`` (``tolerance`` of expected's dtype).

    Scaled by the tensor's largest magnitude, not element by element: Inductor's reassociated float math
    alone (``torch.compile`` of SDXL's UNet, nothing of loopgraph) leaves 4.4e-5 on 8-step latents of
    magnitude 11, which fails an elementwise 1e-4/1e-5 on small elements. A wrong table row or a baked
    value moves the result by orders of magnitude more.
    """
    if value.shape != expected.shape or value.dtype != expected.dtype:
        return False
    tol = tolerance(expected.dtype)
    scale = expected.float().abs().max().item() if expected.numel() else 0.0
    return max_error(value, expected) <= tol["atol"] + tol["rtol"] * scale


class CompiledLoop(ModularPipelineBlocks):
    """A loop wrapper compiled by ``compile_loop``: same interface, same results, no Python per step.

    Called as ``components, state = fast(components, state)``; drops into a ``SequentialPipelineBlocks`` or
    a ``ModularPipeline`` in place of the wrapper.
    """

    def __init__(self, wrapper, config: CompileConfig) -> None:
        super().__init__()
        self.wrapper = wrapper
        self.config = config
        self.stats = LoopStats()
        self._plans = PlanCache(MAX_PLANS, config.static_shapes, f"{type(wrapper).__name__}")
        self._compiled: dict[Any, Callable] = {}
        self._literals: dict[tuple, dict[int, float]] = {}  # variant signature -> its first plan's float literals
        self._lifts: dict[tuple, set[int]] = {}             # variant signature -> literal positions lifted since
        self._counter = CompileCounter()
        self._graph_pool = None  # CUDA graphs of this loop share one memory pool
        self._lock = threading.Lock()  # calls never share the plan's buffers mid-flight
        self._replans: list[str] = []  # why each of the latest consecutive calls re-planned

    def __deepcopy__(self, memo):
        # ModularPipeline / init_pipeline deep-copy their blocks: the copy gets the wrapper's copy and its own
        # (empty) plan cache; locks and compiled code are not copyable state.
        return CompiledLoop(copy.deepcopy(self.wrapper, memo), self.config)

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

    @property
    def graph(self) -> torch.fx.GraphModule | None:
        """The fused step of the most recent plan (its most used variant)."""
        plan = next((p for p in reversed(self._plans) if p.loop is not None), None)
        if plan is None:
            return None
        return max(plan.loop.variants, key=lambda v: len(v.steps)).module

    # -- calling ---------------------------------------------------------------------------------------------
    def __call__(self, components, state):
        with self._lock, torch.no_grad():
            self.stats.calls += 1
            block_state = self.wrapper.get_block_state(state)  # eager's input checks and errors
            self._plans.bound = MAX_PLANS
            start = time.perf_counter()
            plan = self._plans.find(components, vars(block_state))
            self.stats.guard_seconds += time.perf_counter() - start
            if plan is None:
                self._note_replan()
                return self._plan_and_run(components, state)
            self._replans = []
            if plan.segments is not None:
                self.stats.compiled_calls += 1
                return self._run_segmented(plan, components, state, block_state)
            if plan.fn is None:
                return self._eager_call(components, state)
            self.stats.compiled_calls += 1
            return self._run(plan, components, state, block_state)

    def guard_check(self, components, state) -> str | None:
        """Would a call with ``components`` and ``state`` reuse a plan? None if so, else why each plan does not fit
        (a call with no fitting plan re-plans: one traced eager run). Runs nothing and changes nothing.

        Example:
            >>> fast.guard_check(setup.components, setup.new_state())   # None: the next call runs compiled
            >>> setup.components.guider.guidance_scale = 7.5
            >>> fast.guard_check(setup.components, setup.new_state())
            'plan 0: components.guider.guidance_scale is 7.5, was 4.0'
        """
        with self._lock, torch.no_grad():
            if not self._plans:
                return "not planned yet: the first call traces the loop"
            block_state = self.wrapper.get_block_state(state)
            if self._plans.find(components, vars(block_state), touch=False) is not None:
                return None
            return "; ".join(f"plan {k}: {reason}" for k, reason in enumerate(self._plans.misses))

    def _note_replan(self) -> None:
        """Say so when every call re-plans (a counter that changes each call): each runs a traced eager call."""
        if not self._plans.misses:
            return
        self._replans.append(self._plans.misses[0])
        if len(self._replans) == 4 and len(set(self._replans)) > 1 and all(
                r.split(" is ")[0] == self._replans[0].split(" is ")[0] for r in self._replans):
            warnings.warn(f"compile_loop: {type(self.wrapper).__name__} re-plans on every call (a traced eager run "
                          f"each, no speed-up): {self._replans[-1]}. Keep that value the same between calls, or "
                          f"call the eager wrapper.", stacklevel=3)

    def _plan_and_run(self, components, state):
        start = time.perf_counter()
        trace, result = trace_loop(self.wrapper, components, state, strict=self.config.strict, rng=self.config.rng)
        try:
            plan = _Plan(trace=trace, guard=plan_guard(trace), problems=list(trace.problems),
                         final_untainted={k: v for k, v in trace.final_slots.items() if k not in trace.tainted_final},
                         seed_sources=_seed_sources(trace))
        except Exception as e:  # nothing to reuse: every call traces (and returns eager's result)
            if self.config.strict:
                raise
            warnings.warn(f"compile_loop: {type(self.wrapper).__name__}: could not guard a plan ({type(e).__name__}: "
                          f"{e}); this call ran eagerly. Please report this.", stacklevel=3)
            return result
        self.stats.plans += 1
        self._plans.add(plan)
        try:
            if not plan.problems and trace.steps:
                self._lower_and_compile(plan)
            elif plan.problems and self._eager_blocks(plan):
                self._segment_and_compile(plan)
            elif plan.problems:
                self._fall_back(plan, None)
        except Exception as e:  # planning broke: the traced call's result stands, and this plan runs eagerly
            if self.config.strict or isinstance(e, RuntimeError) and "strict=True" in str(e):
                raise
            plan.fn, plan.segments = None, None
            plan.problems = [Unsupported(f"planning failed ({type(e).__name__}: {e}); please report this")]
            self._fall_back(plan, e)
        self.stats.plan_seconds += time.perf_counter() - start
        return result

    def _lower_and_compile(self, plan: _Plan) -> None:
        trace = plan.trace
        needed = set(trace.initial_slots) | {o.name for o in self.wrapper.intermediate_outputs} | set(
            trace.final_components)
        try:
            plan.loop = plan_loop(trace, needed, self._lifts)
            if self._lift_new_literals(plan.loop):
                plan.loop = plan_loop(trace, needed, self._lifts)
        except Unsupported as e:
            return self._fall_back(plan, e)
        loop = plan.loop
        device = _loop_device(trace)
        if self.config.fused_kernels is True or (self.config.fused_kernels == "auto" and device.type == "cuda"):
            from .kernel_pass import fuse_loop_kernels  # imports Triton: only where the kernels can run

            fuse_loop_kernels(loop, device)
        # Tables, run ends and the step counter live on the loop's device (no host scalars per step); a
        # table's length N is an unbacked size, so one compiled loop serves every N.
        plan.tables = [[_unbacked_rows(t.to(device)) for t in v.tables] for v in loop.variants]
        plan.ends = torch.tensor([end for _, _, end in loop.runs], dtype=torch.int64, device=device)
        key = self._compile_key(plan)
        fn = self._compiled.get(key)
        if fn is None:
            fn = self._compile_whole_loop(loop, device)
            self.stats.step_graphs += len(loop.variants)
        plan.fn = fn
        if self.config.check:
            try:
                self._check_against_eager(plan)
            except Exception as e:  # a failed compilation or a mismatch: never a silently different result
                plan.fn = None
                return self._fall_back(plan, e)
        self._compiled[key] = fn

    def _lift_new_literals(self, loop: LoopPlan) -> bool:
        """Lift the arithmetic floats that differ from the first plan of the same structure (a new guidance
        scale): this plan compiles once more, and every later value reuses its code. True if any was new."""
        grown = False
        for v in loop.variants:
            first = self._literals.setdefault(v.signature, v.literals)
            lifted = self._lifts.setdefault(v.signature, set())
            new = {k for k, value in v.literals.items() if k in first and first[k] != value} - lifted
            lifted |= new
            grown = grown or bool(new)
        return grown

    def _compile_whole_loop(self, loop: LoopPlan, device: torch.device) -> Callable:
        """CUDA: the steps captured into one CUDA graph; otherwise (and with cuda_graphs=False) the while_loops."""
        ops = op_count(loop)

        def compile_one(fn):
            return compile_fn(fn, backend=self.config.backend, mode=self.config.mode, counter=self._counter,
                              device=device, ops=ops)

        if device.type == "cuda" and self.config.cuda_graphs is not False and self.config.backend == "inductor":
            from .cudagraph import WholeLoopGraph

            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()  # shared by every graph of this loop
            return WholeLoopGraph(loop, compile_one, self._graph_pool,
                                  [v.module.meta.get(WHOLE_TABLES, False) for v in loop.variants])
        if self.config.cuda_graphs is True and device.type != "cuda":
            warnings.warn(f"compile_loop: cuda_graphs=True has no effect on a {device.type} loop", stacklevel=4)
        return StateBuffers(compile_one(lower(loop)))

    def _compile_key(self, plan: _Plan) -> tuple:
        """What compiled code a plan can share with another: the step graphs (structure and baked literals), the
        runs, the input and table specs (any N: one key), and the constants the code reads. Constants the traced
        call read from the components (parameters, buffers, a scheduler's tables) are the objects the code reads:
        by identity. Others (made during the call) by content, so a re-plan finds the same code."""
        loop = plan.loop
        inputs = [plan.data_specs.get(k) for k in [*loop.state_slots, *loop.invariant_slots]]
        held = _read_tensor_ids(plan.trace)
        consts = tuple(
            (name, "id", id(t)) if isinstance(t, torch.nn.Parameter) or id(t) in held or t.numel() > 1 << 16
            else (name, t.dtype, tuple(t.shape), hash(tuple(t.flatten().tolist())))
            for v in loop.variants for name, t in [*v.module.named_parameters(), *v.module.named_buffers()])
        return (tuple(v.module.code for v in loop.variants), tuple(v for v, _, _ in loop.runs),
                tuple(map(str, inputs)), consts,
                tuple(tuple((t.shape[1:], t.dtype) for t in ts) for ts in plan.tables))

    def _check_against_eager(self, plan: _Plan) -> None:
        """Run the compiled loop on the traced call's inputs and compare with the eager result it produced."""
        traced_seeds = {name: seed.value for name, seed in plan.trace.seeds.items()}
        outputs = self._execute(plan, {**plan.trace.initial_inputs_copy, **traced_seeds})
        for name, value in zip(plan.loop.state_slots, outputs):
            expected = plan.trace.final_value(name)
            if expected is None:  # a component tensor gone by the end of the loop
                continue
            if not matches_eager(value, expected):
                raise RuntimeError(f"compiled loop differs from eager on slot {name!r} (max abs error "
                                   f"{max_error(value, expected):.3g})")
        self.stats.compiles = self._counter.count
        self.stats.compile_seconds = self._counter.seconds

    def _execute(self, plan: _Plan, slots: dict[str, Any]) -> list[torch.Tensor]:
        loop = plan.loop
        state = []
        for name in loop.state_slots:
            value = slots.get(name)
            if not isinstance(value, torch.Tensor):  # first written inside the loop (a temporary, a history)
                slot = plan.trace.component_slots.get(name)
                value = torch.zeros_like(slot.value if slot else plan.trace.final_slots[name])
            state.append(value)
        invariants = [slots[name] for name in loop.invariant_slots]
        start = torch.zeros((), dtype=torch.int64, device=plan.ends.device)
        return plan.fn(state, invariants, plan.tables, plan.ends, start)

    def _run(self, plan: _Plan, components, state, block_state: BlockState):
        with self._progress(plan, block_state) as bar:
            seeds, _ = _draw_seeds(plan, vars(block_state))
            try:
                outputs = self._execute(plan, {**vars(block_state), **seeds})
            except Exception as e:  # the compiled code failed where eager runs: nothing was written yet
                if self.config.strict:
                    raise
                warnings.warn(f"compile_loop: {type(self.wrapper).__name__}: the compiled loop failed on this call "
                              f"({type(e).__name__}: {e}); this plan runs eagerly from now on", stacklevel=3)
                plan.fn = None
                plan.problems = [Unsupported(f"the compiled loop failed on a call: {e}")]
                return self._eager_call(components, state)
            if bar is not None:
                bar.update(bar.total)  # no Python runs per step: the wrapper's bar completes in one update
        return self._finish(plan, components, state, block_state, dict(zip(plan.loop.state_slots, outputs)))

    def _progress(self, plan: _Plan, block_state: BlockState):
        """The wrapper's own progress bar (its config, its total) when its traced call opened it, else nothing."""
        steps = len(plan.trace.steps)
        if not plan.trace.progress or not callable(getattr(self.wrapper, "progress_bar", None)):
            return contextlib.nullcontext()
        return self.wrapper.progress_bar(total=getattr(block_state, "num_inference_steps", None) or steps)

    def _finish(self, plan: _Plan, components, state, block_state: BlockState, computed: dict[str, Any],
                segmented: bool = False):
        """Write the loop's results back as eager would: BlockState slots, then the Python state.

        ``computed`` holds the loop's tensors: fresh ones from the whole compiled loop (copied into the caller's
        tensor where eager updated it in place), or the very objects eager segments left (``segmented``)."""
        final = BlockState()
        for name in plan.trace.final_slots:
            if name in computed:
                value = computed[name]
                original = vars(block_state).get(name)
                if not segmented and name in plan.trace.inplace_slots and isinstance(original, torch.Tensor):
                    original.copy_(value)  # eager mutated the caller's tensor in place: so do we
                    value = original
                final[name] = value
            elif name in plan.trace.tainted_final:
                if name in vars(block_state):  # invariant inputs: the caller's own objects
                    final[name] = vars(block_state)[name]
            elif name in vars(block_state) and plan.trace.initial_slots.get(name) is plan.final_untainted[name]:
                # an input the loop never rebound: the caller's own object, so set_block_state skips it as
                # eagerly (re-setting a kwargs-type input would tag it twice in the PipelineState)
                final[name] = vars(block_state)[name]
            else:
                value = plan.final_untainted[name]
                final[name] = value.clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
        for obj, name, value in plan.trace.python.end:  # every attribute the traced call wrote, as it left it
            set_attribute(obj, name, copy_value(value))
        for name in plan.trace.final_components:  # the loop's own tensors, not the traced run's
            put(components, plan.trace.component_slots[name].path, computed[name])
        self.wrapper.set_block_state(state, final)
        self.stats.compiles = self._counter.count
        self.stats.compile_seconds = self._counter.seconds
        return components, state

    # -- eager segments ----------------------------------------------------------------------------------------
    def _eager_blocks(self, plan: _Plan) -> set[str]:
        """The blocks that can run eagerly between compiled segments, or an empty set (whole loop eager)."""
        confined = all(p.block and p.reason.startswith(("data-dependent Python", "random op"))
                       for p in plan.problems)
        blocks = {p.block for p in plan.problems}
        if not confined or not plan.trace.steps or blocks >= set(plan.trace.block_names):
            return set()
        return blocks

    def _segment_and_compile(self, plan: _Plan) -> None:
        trace = plan.trace
        eager = self._eager_blocks(plan)
        try:
            plan.segments = plan_segments(trace, eager)
        except Unsupported as e:
            plan.problems.append(e)
            return self._fall_back(plan, e)
        plan.stable = stable_guard(trace, plan.guard)
        plan.restores = _restores(trace, eager)
        device = _loop_device(trace)
        for seg in plan.segments:
            variants = seg.plan.variants if seg.plan is not None else []
            plan.segment_fns.append([compile_fn(v.module, backend=self.config.backend, mode=self.config.mode,
                                                counter=self._counter, device=device, ops=module_ops(v.module))
                                     for v in variants])
            self.stats.step_graphs += len(variants)
        if self.config.check:
            try:
                self._check_segments(plan)
            except Exception as e:  # a failed compilation or a mismatch: never a silently different result
                plan.segments = None
                return self._fall_back(plan, e)
        self.stats.eager_blocks = len(eager)
        compiled = [b for b in trace.block_names if b not in eager]
        text = "; ".join(f"{p.reason} in block {p.block!r} at {p.where}" for p in plan.problems)
        warnings.warn(f"compile_loop: {type(self.wrapper).__name__}: {text}. Block(s) "
                      f"{', '.join(map(repr, sorted(eager)))} run eagerly each step between compiled segments; "
                      f"compiled: {', '.join(map(repr, compiled))} (strict=True raises instead)", stacklevel=4)

    def _check_segments(self, plan: _Plan) -> None:
        """Each compiled segment, run on the loop tensors the traced call had where it starts, against the ones it
        had where it ends, step by step: no block runs again (its side effects happen once per step)."""
        trace = plan.trace
        seeds = {name: seed.value for name, seed in trace.seeds.items()}
        checked = 0
        calls = self.stats.segment_calls
        for step in trace.steps:
            for k, seg in enumerate(plan.segments):
                end = _segment_end(trace, plan.segments, k)
                start_values, end_values = step.values_before.get(seg.blocks[0]), step.values_before.get(end)
                if seg.eager or start_values is None or end_values is None:
                    continue
                env = {**{n: v.clone() for n, v in start_values.items()}, **seeds}
                self._call_segment(seg, plan.segment_fns[k], env, step.index)
                for name in seg.plan.state_slots:
                    expected = end_values.get(name)
                    if expected is not None and not matches_eager(env[name], expected):
                        raise RuntimeError(f"compiled segment {'+'.join(seg.blocks)} differs from eager on slot "
                                           f"{name!r} at step {step.index} (max abs error "
                                           f"{max_error(env[name], expected):.3g})")
                checked += 1
        self.stats.segment_calls = calls
        if not checked and any(not seg.eager for seg in plan.segments):
            raise RuntimeError("no step of the traced call to check the compiled segments against")
        self.stats.compiles = self._counter.count
        self.stats.compile_seconds = self._counter.seconds

    def _run_segmented(self, plan: _Plan, components, state, block_state: BlockState):
        computed, eager_state = self._run_segments(plan, components, vars(block_state),
                                                   _draw_seeds(plan, vars(block_state))[1])
        if eager_state is None:
            return self._finish(plan, components, state, block_state, computed, segmented=True)
        self.wrapper.set_block_state(state, eager_state)  # its tensors are the ones eager's own run left
        return components, state

    def _run_segments(self, plan: _Plan, components, slots: dict[str, Any], draws: CounterDraws):
        """Every step: compiled segments on the current slot values, eager blocks called for real.

        Returns the final tainted slot values, and the BlockState when an eager block did something the trace
        did not show (other slots, shapes or Python state): then the rest of the loop ran eagerly."""
        trace = plan.trace
        env = {k: v for k, v in slots.items() if k in plan.data_specs}
        env.update(draws.seeds.values())  # rng="counter": seed name -> this call's seed
        for step in trace.steps:
            i = step.index
            for k, seg in enumerate(plan.segments):
                if not seg.eager:
                    self._call_segment(seg, plan.segment_fns[k], env, i, step, _segment_end(trace, plan.segments, k))
                    continue
                name = seg.blocks[0]
                block_state = _eager_block_state(trace, step.slots_before[name], step.nodes_before[name], env, slots)
                # the Python state the compiled blocks before it would have left (they run no Python), holding this
                # call's loop tensors (a scheduler's history)
                for key in plan.restores.get((i, name), ()):
                    obj, attr, value = step.python_before[name][key]
                    set_attribute(obj, attr, copy_value(value))
                for slot, (path, _, _) in step.held_before[name].items():
                    put(components, path, env[slot])
                with self._drawing(draws, i, step.draws_before[name]):
                    components, block_state = run_block(name, self.wrapper.sub_blocks[name], components,
                                                        block_state, **step.kwargs)
                rest = trace.block_names[trace.block_names.index(name) + 1:]
                after = rest[0] if rest else "__end__"
                held = _held_tensors(self.wrapper, components, step.held_before[after])
                if held is None or not self._as_traced(plan, step, after, block_state, held, slots):
                    warnings.warn(f"compile_loop: block {name!r} did not do at step {i} what it did when traced "
                                  f"(other slots, shapes or Python state): the rest of the loop runs eagerly",
                                  stacklevel=4)
                    return {}, self._finish_eagerly(trace, components, block_state, step, rest, draws)
                env.update({slot: vars(block_state)[slot] for slot in step.nodes_before[after]})
                env.update(held)
        return env, None

    def _call_segment(self, seg: Segment, fns: list[Callable], env: dict[str, Any], i: int, step=None,
                      end: str | None = None) -> None:
        """One compiled segment at step ``i`` on ``env``. With the traced ``step`` given, a slot the traced call
        updated in place across the segment is updated in place here too (eager's aliasing: the caller's tensor
        where eager wrote it, another one where an eager block rebound the slot first); others are rebound."""
        loop, v = seg.plan, seg.step_variant[i]
        args = [env[n] if n in env else torch.zeros_like(seg.examples[n])
                for n in [*loop.state_slots, *loop.invariant_slots]]
        outputs = fns[v](*args, *[table[i] for table in loop.variants[v].tables])
        for name, out in zip(loop.state_slots, outputs):
            current = env.get(name)
            if (step is not None and isinstance(current, torch.Tensor) and name in step.slots_before[seg.blocks[0]]
                    and step.slots_before[seg.blocks[0]][name] is step.slots_before[end].get(name)
                    and current.shape == out.shape and current.dtype == out.dtype):
                current.copy_(out)
            else:
                env[name] = out
        self.stats.segment_calls += 1

    def _as_traced(self, plan: _Plan, step, after: str, block_state: BlockState, held: dict[str, torch.Tensor],
                   slots: dict[str, Any]) -> bool:
        """Whether an eager block left the slots and the Python state as in the traced run."""
        trace = plan.trace
        expected, tainted = step.slots_before[after], step.nodes_before[after]
        got = vars(block_state)
        if got.keys() != expected.keys():
            return False
        # slots that held one tensor when traced must still do: the compiled graph cannot tell them apart
        shared: dict[Any, Any] = {}  # traced node -> this call's tensor
        nodes = [(node, held[slot]) for slot, (_, _, node) in step.held_before[after].items()]
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
                   for obj, name, value in step.python_before[after].values()) and plan.stable.holds()

    def _finish_eagerly(self, trace: LoopTrace, components, block_state: BlockState, step,
                        rest: list[str], draws: CounterDraws) -> BlockState:
        with self._drawing(draws, step.index, draws.counts):  # the step's draws go on where the block left them
            for name in rest:
                components, block_state = run_block(name, self.wrapper.sub_blocks[name], components, block_state,
                                                    **step.kwargs)
        for later in trace.steps[step.index + 1:]:
            with self._drawing(draws, later.index, {}):
                components, block_state = self.wrapper.loop_step(components, block_state, **later.kwargs)
        return block_state

    def _drawing(self, draws: CounterDraws, step: int, counts: dict[str, int]):
        """rng="counter": eager code draws by the seed policy, as step ``step`` after ``counts`` draws per seed."""
        if self.config.rng != "counter":
            return contextlib.nullcontext()
        draws.start_step(step, counts)
        return CounterMode(draws)

    def _eager_call(self, components, state):
        """The wrapper called eagerly (a loop that could not be compiled), drawing as ``config.rng`` says."""
        if self.config.rng != "counter":
            return self.wrapper(components, state)
        return eager_loop(self.wrapper, components, state)

    def _fall_back(self, plan: _Plan, error: Exception | None) -> None:
        problems = plan.problems or [Unsupported(f"compilation failed: {error}")]
        plan.problems = problems
        self.stats.eager_blocks = len({p.block for p in problems if p.block})
        text = "; ".join(f"{p.reason} in block {p.block!r} at {p.where}" if p.block else p.reason
                         for p in problems)
        if self.config.strict:
            raise RuntimeError(f"compile_loop(strict=True): {type(self.wrapper).__name__}: {text}") from error
        warnings.warn(f"compile_loop: {type(self.wrapper).__name__} runs eagerly: {text}", stacklevel=4)

    # -- introspection ---------------------------------------------------------------------------------------
    def explain(self) -> str:
        """What was compiled, what runs eagerly and why, the slot table, the step graphs and hoisted tables."""
        lines = [f"CompiledLoop({type(self.wrapper).__name__}) backend={self.config.backend} "
                 f"mode={self.config.mode} strict={self.config.strict}"]
        if not self._plans:
            return "\n".join(lines + ["  not planned yet: the first call traces the loop"])
        plan = self._plans.newest
        lines.append(f"guards: {plan.guard.describe()}")
        if self._plans.misses:
            lines.append("the last call re-planned: " + "; ".join(
                f"plan {k}: {reason}" for k, reason in enumerate(self._plans.misses)))
        eager = {p.block: p for p in plan.problems if p.block}
        lines.append("blocks:")
        for name, block in self.wrapper.sub_blocks.items():
            try:
                where = f"{inspect.getsourcefile(type(block))}:{inspect.getsourcelines(type(block))[1]}"
            except (TypeError, OSError):
                where = "<unknown source>"
            if name in eager:
                status = f"eager ({eager[name].reason}, {eager[name].where})"
            elif plan.fn is None and plan.segments is None:
                status = "eager: the whole loop fell back (" + "; ".join(p.reason for p in plan.problems) + ")"
            else:
                status = f"compiled ({plan.trace.steps[-1].block_ops.get(name, 0)} ops/step)"
            lines.append(f"  {name} ({type(block).__name__}, {where}): {status}")
        if plan.segments is not None:
            lines.append("segments per step: " + " | ".join(
                f"eager {seg.blocks[0]}" if seg.eager else
                f"compiled {'+'.join(seg.blocks)} ({len(seg.plan.variants)} step graphs)" for seg in plan.segments))
        if plan.loop is None:
            return "\n".join(lines)
        loop = plan.loop
        lines.append("slots:")
        for info in loop.slots.values():
            end = ", written back" if info.needed_at_end else ""
            lines.append(f"  {info.name:<28} {info.role:<10} {info.kind}{end}")
        if isinstance(plan.fn, StateBuffers):
            lines.append(f"state buffers (preallocated, updated in place): {', '.join(loop.state_slots)}")
        for name, source in plan.seed_sources.items():
            lines.append(f"random draws (rng='counter'): seed {name} drawn per call from {_describe_source(source)}")
        lines.append(f"step graphs: {len(loop.variants)} for {loop.num_steps} steps")
        for k, v in enumerate(loop.variants):
            lines.append(f"  variant {k}: {module_ops(v.module)} ops, steps {_ranges(v.steps)}")
        lines.append("runs: " + ", ".join(f"variant {v} for steps [{a}, {b})" for v, a, b in loop.runs))
        lines.append("hoisted per-step tables:")
        for k, v in enumerate(loop.variants):
            for name, table in zip(v.lifted, v.tables):
                lines.append(f"  variant {k} {name}: {tuple(table.shape)} {str(table.dtype).replace('torch.', '')}")
        s = self.stats
        lines.append(f"stats: compiles={s.compiles} step_graphs={s.step_graphs} plans={s.plans} calls={s.calls} "
                     f"plan_s={s.plan_seconds:.2f} compile_s={s.compile_seconds:.2f}")
        return "\n".join(lines)


def _seed_sources(trace: LoopTrace) -> dict[str, tuple]:
    """Where each traced seed's generator comes from in a call: ("slot", name[, index]) for a BlockState
    input (one generator, or one of a per-item list), ("default", device), or ("object", generator) for one
    held elsewhere (the same object every call)."""
    sources = {}
    for name, seed in trace.seeds.items():
        g = seed.generator
        found = [("slot", k) for k, v in trace.initial_slots.items() if v is g] + [
            ("slot", k, j) for k, v in trace.initial_slots.items() if isinstance(v, (list, tuple))
            for j, item in enumerate(v) if item is g]
        sources[name] = ("default", seed.device) if g is None else (found[0] if found else ("object", g))
    return sources


def _draw_seeds(plan: _Plan, slots: dict[str, Any]) -> tuple[dict[str, torch.Tensor], CounterDraws]:
    """This call's seeds, one draw from each generator in the traced order of first use: by seed name (the
    compiled loop's inputs), and as the draws eager blocks make (keyed by this call's generators)."""
    by_name, by_key = {}, {}
    for name, source in plan.seed_sources.items():
        if source[0] == "default":
            generator, device = None, source[1]
        else:
            generator = source[1] if source[0] == "object" else slots[source[1]]
            generator = generator[source[2]] if len(source) == 3 else generator
            device = generator.device
        by_name[name] = draw_seed(generator, device)
        by_key[source_key(generator, device)] = (name, by_name[name])
    return by_name, CounterDraws(by_key)


def _describe_source(source: tuple) -> str:
    if source[0] == "default":
        return f"the default generator of {source[1]}"
    if source[0] == "object":
        return f"the generator object {source[1]!r} (the same every call)"
    return f"the generator in input {source[1]!r}" + (f" (item {source[2]})" if len(source) == 3 else "")


def _held_tensors(wrapper, components, traced: dict[str, tuple]) -> dict[str, torch.Tensor] | None:
    """This call's tensors at the places the traced run's components held loop tensors (None if any is gone)."""
    found = component_tensors(component_objects(wrapper, components))
    held = {slot: found[slot][1] for slot in traced if slot in found}
    ok = all(tensor_spec(held[slot]) == tensor_spec(value) for slot, (_, value, _) in traced.items()
             if slot in held)
    return held if ok and len(held) == len(traced) else None


def _read_tensor_ids(trace: LoopTrace) -> set[int]:
    """Ids of the tensors the traced call read from the Python state (parameters, buffers, a scheduler's tables)."""
    found = set()

    def walk(snap):
        if isinstance(snap, TensorSnap):
            found.add(id(snap.tensor))
        elif isinstance(snap, ContainerSnap) and not isinstance(snap.items, frozenset):
            for item in (snap.items.values() if isinstance(snap.items, dict) else snap.items):
                walk(item)

    for read in trace.python.reads.values():
        walk(read.value)
    return found


def _segment_end(trace: LoopTrace, segments: list[Segment], k: int) -> str:
    """The cut where segment ``k`` ends: the next segment's first block, or "__end__"."""
    return segments[k + 1].blocks[0] if k + 1 < len(segments) else "__end__"


def _restores(trace: LoopTrace, eager: set[str]) -> dict[tuple[int, str], list[tuple]]:
    """(step, eager block) -> the attributes (keys of ``StepTrace.python_before``) that compiled blocks wrote or
    changed in place since the previous eager block: compiled segments run no Python, so these are set as the
    traced call had them before the eager block runs. What an eager block writes is its own (this call's) value."""
    written: dict[tuple, set] = {}
    for key, write in trace.python.writes.items():
        for step, block in write.events:
            written.setdefault((step, block), set()).add(key)
    first_read = {(id(r.obj), r.key): r for r in trace.python.reads.values()}
    restores, pending = {}, set()
    for step in trace.steps:
        cuts = [*trace.block_names, "__end__"]
        for block, after in zip(cuts, cuts[1:]):
            if block in eager:
                restores[(step.index, block)] = [k for k in pending if k in step.python_before[block]]
                pending = set()
                continue
            before, now = step.python_before[block], step.python_before[after]
            pending |= written.get((step.index, block), set())
            pending |= {k for k, (_, _, value) in now.items()  # changed in place (or first read and changed)
                        if (not values_equal(before[k][2], value) if k in before
                            else k in first_read and not same(value, first_read[k].value))}
    return restores


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


def _loop_device(trace: LoopTrace) -> torch.device:
    """Where the loop's data lives: the device of its first tensor slot (CPU when it has none)."""
    return next((v.device for v in trace.initial_slots.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))


def _unbacked_rows(table: torch.Tensor) -> torch.Tensor:
    torch._dynamo.decorators.mark_unbacked(table, 0)
    return table


def _ranges(steps: list[int]) -> str:
    spans, start = [], steps[0]
    for a, b in zip(steps, steps[1:] + [None]):
        if b != a + 1:
            spans.append(f"{start}" if start == a else f"{start}-{a}")
            start = b
    return ", ".join(spans)


def compile_loop(wrapper, *, backend: str = "inductor", mode: str | None = None, strict: bool = False,
                 cuda_graphs: bool | str = "auto", static_shapes: bool = False, check: bool = True,
                 fused_kernels: bool | str = "auto", rng: str = "eager") -> CompiledLoop:
    """Compile a loop wrapper's whole denoising loop.

    Args:
        wrapper: a loop wrapper (loopgraph's or diffusers' ``LoopSequentialPipelineBlocks``, or any object
            with ``sub_blocks``, ``loop_step``, ``get_block_state``/``set_block_state`` and a looping
            ``__call__``).
        backend: "inductor" (default; C++ host loop on CPU), or "eager"/"aot_eager" for debugging.
        mode: an Inductor mode such as "max-autotune-no-cudagraphs".
        strict: raise instead of falling back to eager on data-dependent Python or a failed compilation.
        cuda_graphs: "auto" | True | False (the whole-loop CUDA graph; not used on CPU).
        static_shapes: raise instead of re-planning when shapes or component state change.
        check: compare the first compiled run with the eager run it was traced from (fall back if they differ).
        fused_kernels: "auto" (on CUDA) | True | False: replace guidance + scheduler updates with fused Triton
            kernels (``loopgraph.kernel_pass``); True forces them on CPU too (needs TRITON_INTERPRET=1; testing).
        rng: how random ops inside the loop (a stochastic sampler's noise) draw. "eager" (default): from
            torch's generators, as eager does, so results equal eager's exactly; a block that draws runs
            eagerly each step between compiled segments (on CUDA, no whole-loop graph). "counter": inside the
            compiled loop (and the CUDA graph), counter-based by the seed policy of ``loopgraph.rng``: one seed
            per generator per call, same distribution as eager, not the same values.

    Returns:
        A ``CompiledLoop``: call it as ``components, state = fast(components, state)``.

    Example:
        >>> from loopgraph.zoo.loops import build_loop
        >>> setup = build_loop("dit", steps=8)
        >>> fast = compile_loop(setup.wrapper)
        >>> _, state = fast(setup.components, setup.new_state())   # traces (eagerly) and compiles
        >>> _, state = fast(setup.components, setup.new_state())   # runs the compiled loop
    """
    config = CompileConfig(backend=backend, mode=mode, strict=strict, cuda_graphs=cuda_graphs,
                           static_shapes=static_shapes, check=check, fused_kernels=fused_kernels, rng=rng)
    missing = [a for a in ("sub_blocks", "loop_step", "get_block_state", "set_block_state") if not hasattr(wrapper, a)]
    if missing or not callable(wrapper):
        raise TypeError(
            f"compile_loop expects a loop wrapper (a LoopSequentialPipelineBlocks); {type(wrapper).__name__} "
            f"lacks {missing or ['__call__']}. Pass the denoise loop block itself, not a pipeline or a leaf block."
        )
    if isinstance(wrapper, CompiledLoop):
        raise TypeError("compile_loop: this wrapper is already compiled")
    return CompiledLoop(wrapper, config)
