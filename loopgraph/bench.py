"""``loopgraph bench``: denoising throughput of one loop, every method run side by side on identical inputs.

Methods (each gets its own copy of the loop, built from the same seed, so inputs and weights are identical):

    eager             the wrapper run as written (the semantics of the seed API and of diffusers)
    compile_denoiser  the same eager loop with the denoiser in ``torch.compile`` (what diffusers recommends
                      today: ``mode="reduce-overhead"`` on CUDA, the default mode on CPU)
    compile_loop      loopgraph (its persistent cache on, as by default: a later run loads the compiled loop)
    compile_loop_nocache       loopgraph compiled in the process by torch.compile (``cache=False``; optional)
    compile_loop_unbatched     loopgraph without batched guidance (optional)
    compile_wrapper   plain ``torch.compile`` of the wrapper's ``__call__`` (optional; its first call is
                      bounded by ``compile_timeout``)

Measurements:

    latency            one call from a fresh state, warm; methods interleaved (the order rotates every
                       round) so drift hits all alike; CUDA calls are bracketed by synchronize
    first call         wall time of each method's first call: its time to a first result (compile_loop: trace,
                       plan, and compile or load from the persistent cache; compile_denoiser: Dynamo + Inductor)
    code               what a method compiled or loaded: a compiled loop's own counts (``stats.compiles``,
                       ``stats.loaded``: the AOTInductor route counts its own); else Dynamo's ``unique_graphs``
                       counter, read around the method's own calls
    compile_s          a compiled loop's ``stats.compile_seconds``; else the wall time of the calls that compiled
                       something, less their steady-state time
    python calls       ``sys.setprofile`` "call" events during one warm call; per step is the slope between
                       the smallest and the largest N of the scaling run (0 means no Python per step)
    peak memory        CUDA: ``max_memory_allocated`` during one call less what was allocated before it;
                       CPU (Linux): growth of the process's peak resident set during one call, measured
                       after ``malloc_trim`` and a reset of the high-water mark
    floor              the bare denoiser (compiled, when ``compile_denoiser`` runs) timed alone on the
                       inputs the loop gives it, times the calls per loop: per-step overhead is what a
                       method spends above it (negative: faster than the model alone, by fusion across the
                       model boundary); the denoiser is the component ``denoiser``, ``unet`` or
                       ``transformer``, or the one ``--denoiser`` names
    cold start         ``--cold-start``: each method's first result in fresh processes (``cold_start.py``)
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import importlib
import inspect
import json
import os
import platform
import re
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch

from .compile import CompiledLoop, compile_loop, matches_eager, max_error, tolerance

__all__ = ["BenchConfig", "METHODS", "NoDenoiser", "UserLoop", "run_bench", "run_loop", "user_loop", "write_report"]

METHODS = ("eager", "compile_denoiser", "compile_loop", "compile_loop_nocache", "compile_loop_unbatched",
           "compile_wrapper")
DEFAULT_METHODS = ("eager", "compile_denoiser", "compile_loop")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class BenchConfig:
    """Everything one bench run depends on; written whole into ``bench.json``."""

    preset: str = "dit"
    steps: int = 20
    batch: int = 1
    sample_size: int | None = None
    dtype: str = "float32"
    device: str = "auto"
    repeats: int = 30
    warmup: int = 2
    methods: tuple[str, ...] = DEFAULT_METHODS
    scaling: tuple[int, ...] = (5, 10, 20, 50)
    scaling_repeats: int = 5
    compile_timeout: float = 300.0
    seed: int = 0
    model: dict[str, Any] = field(default_factory=dict)  # denoiser config overrides, e.g. hidden_dim=128
    loop: str | None = None  # "package.module:function": the user's own loop (see ``user_loop``), not a preset
    cold_start: bool = False  # also time each method's first result in fresh processes (cold_start.py)
    denoiser: str | None = None  # the component compile_denoiser compiles (default: denoiser, unet or transformer)

    @classmethod
    def quick(cls, **overrides: Any) -> "BenchConfig":
        """CI-sized: few steps, few repeats, two points of scaling."""
        return cls(**{"steps": 4, "repeats": 3, "warmup": 1, "scaling": (2, 4), "scaling_repeats": 2,
                      **overrides})

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        self.scaling = tuple(sorted(set(self.scaling)))
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
        if "eager" not in self.methods:
            raise ValueError("'eager' must be among the methods: every method is checked against it")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {self.dtype!r}")
        if self.steps < 1 or self.batch < 1 or self.repeats < 1 or self.warmup < 1:
            raise ValueError("steps, batch, repeats and warmup must be >= 1")
        if len(self.scaling) < 2 or min(self.scaling) < 1:
            raise ValueError(f"scaling needs at least two step counts >= 1, got {self.scaling}")
        if self.cold_start and (self.loop is not None or self.device not in ("auto", "cpu")):
            raise ValueError("--cold-start times the presets on CPU (not --loop, not --device cuda)")
        if self.loop is None:
            self._check_preset()

    def _check_preset(self) -> None:
        from .zoo.diffusers_loops import DIFFUSERS_LOOPS  # diffusers itself is imported by the builder only
        from .zoo.loops import PRESETS

        if self.preset in PRESETS:
            return
        if self.preset not in DIFFUSERS_LOOPS:
            raise ValueError(f"unknown preset {self.preset!r}; zoo presets: {sorted(PRESETS)}, diffusers loops: "
                             f"{sorted(DIFFUSERS_LOOPS)}")
        fixed = {"batch": 1, "dtype": "float32", "sample_size": None, "model": {}}
        changed = [k for k, v in fixed.items() if getattr(self, k) != v]
        if changed or self.torch_device.type != "cpu":
            raise ValueError(f"the diffusers loops are built at their tiny test configs, batch 1, float32, on CPU; "
                             f"drop {changed or ['--device']} for preset {self.preset!r}")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


# --- the loop and the methods -------------------------------------------------------------------------------


@dataclass
class UserLoop:
    """The user's own loop, benchmarked like a preset: ``make_state(steps)`` (or ``make_state()``) makes a fresh
    state for each call; ``output`` names the state value every method is checked by (the latents)."""

    wrapper: Any
    components: Any
    make_state: Callable
    output: str = "latents"
    steps: int = 20
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        params = inspect.signature(self.make_state).parameters.values()
        self.takes_steps = any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
                               for p in params)
        state = self.new_state()
        tensors = [v for v in getattr(state, "values", {}).values() if isinstance(v, torch.Tensor)]
        if tensors:
            self.device = tensors[0].device

    def new_state(self):
        return self.make_state(self.steps) if self.takes_steps else self.make_state()


def user_loop(spec: str, steps: int) -> UserLoop:
    """Import ``package.module:function`` (or ``path/to/file.py:function``) and call it: it returns ``(wrapper,
    components, make_state)``, optionally with the output's name as a fourth item (default "latents");
    ``make_state(steps)`` makes a fresh state."""
    module_name, _, function = spec.rpartition(":")
    if not module_name or not function:
        raise ValueError(f"--loop wants package.module:function or path/to/file.py:function, got {spec!r}")
    try:
        make = getattr(_loop_module(module_name), function)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot load --loop {spec!r}: {error}") from error
    made = make()
    if not isinstance(made, (tuple, list)) or len(made) not in (3, 4):
        raise ValueError(f"{spec} must return (wrapper, components, make_state[, output name]), got "
                         f"{type(made).__name__}")
    return UserLoop(*made[:3], **({"output": made[3]} if len(made) == 4 else {}), steps=steps)


def _loop_module(name: str):
    """``--loop``'s module: imported with the current directory first on ``sys.path``, as ``python -m`` does (the
    ``loopgraph`` script's own folder is first otherwise); a file path is imported as its module, its folder first."""
    folder, path = os.getcwd(), None
    if name.endswith(".py"):
        path = Path(name).resolve()
        if not path.is_file():
            raise ImportError(f"no file {path}")
        folder, name = str(path.parent), path.stem
    if sys.path[:1] != [folder]:
        sys.path.insert(0, folder)
    module = importlib.import_module(name)
    if path is not None and Path(module.__file__ or "").resolve() != path:
        raise ImportError(f"a module named {name!r} is already imported from {module.__file__}; rename {path.name}")
    return module


def build_setup(config: BenchConfig):
    """A fresh copy of the benchmarked loop (zoo preset, a diffusers loop when diffusers is installed, or the
    user's ``--loop``)."""
    from .zoo.loops import PRESETS, build_loop

    if config.loop is not None:
        return user_loop(config.loop, config.steps)

    kwargs = dict(steps=config.steps, batch=config.batch, seed=config.seed, device=config.torch_device,
                  dtype=_DTYPES[config.dtype], **config.model)
    if config.sample_size is not None:
        kwargs["sample_size"] = config.sample_size
    if config.preset in PRESETS:
        return build_loop(config.preset, **kwargs)
    from .zoo import diffusers_loops  # a diffusers loop (BenchConfig checked the name and the fixed options)

    return diffusers_loops.build_diffusers_loop(config.preset, steps=config.steps, seed=config.seed)


class NoDenoiser(ValueError):
    """The loop has no denoiser component to compile alone (compile_denoiser is skipped; there is no floor)."""


def _denoiser_name(setup, name: str | None = None) -> str:
    """The component that is the denoiser: ``name`` (``--denoiser``), else ``denoiser`` (the zoo), ``unet`` or
    ``transformer`` (diffusers)."""
    for candidate in (name,) if name else ("denoiser", "unet", "transformer"):
        if isinstance(getattr(setup.components, candidate, None), torch.nn.Module):
            return candidate
    models = sorted(k for k, v in getattr(setup.components, "__dict__", {}).items() if isinstance(v, torch.nn.Module))
    looked = f"no component {name!r}" if name else "no component named denoiser, unet or transformer"
    raise NoDenoiser(f"{looked} is a torch.nn.Module in {type(setup.wrapper).__name__}'s components (modules: "
                     f"{models}); name the denoiser with --denoiser NAME (run_loop(..., denoiser=NAME))")


def make_method(name: str, setup, denoiser: str | None = None) -> Callable:
    """``run(state) -> output`` for one method (the latents; a user loop's ``output``). Methods may share one
    ``setup``: compile_denoiser puts its compiled denoiser in only for its own calls. What a method compiled
    (the denoiser, the ``CompiledLoop``) is ``run.compiled``. ``denoiser`` names the component compile_denoiser
    compiles (default: ``denoiser``, ``unet`` or ``transformer``; ``NoDenoiser`` if there is none)."""
    output = getattr(setup, "output", "latents")
    if name == "eager":
        return lambda state: setup.wrapper(setup.components, state)[1].get(output)
    if name == "compile_denoiser":
        mode = "reduce-overhead" if setup.device.type == "cuda" else None
        denoiser = _denoiser_name(setup, denoiser)
        model = getattr(setup.components, denoiser)
        compiled = torch.compile(model, mode=mode)

        def run(state):
            setattr(setup.components, denoiser, compiled)
            try:
                return setup.wrapper(setup.components, state)[1].get(output)
            finally:
                setattr(setup.components, denoiser, model)

        run.compiled = compiled
        return run
    if name.startswith("compile_loop"):  # unbatched: one model call per guidance batch; nocache: torch.compile
        fast = compile_loop(setup.wrapper, batch_guidance=name != "compile_loop_unbatched",
                            cache=name != "compile_loop_nocache")

        def run(state):
            return fast(setup.components, state)[1].get(output)

        run.compiled = fast
        return run
    if name == "compile_wrapper":
        call = torch.compile(setup.wrapper.__call__)
        return lambda state: call(setup.components, state)[1].get(output)
    raise ValueError(f"unknown method {name!r}; choose from {list(METHODS)}")


# --- measurements -------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


@dataclass
class _Method:
    name: str
    setup: Any
    run: Callable
    times: list[float] = field(default_factory=list)
    first_call_s: float | None = None  # the first call: trace and compile (or load), then run
    compilations: int = 0
    compile_wall: list[float] = field(default_factory=list)  # times of the calls that compiled
    output: torch.Tensor | None = None
    python_calls: dict[int, int] = field(default_factory=dict)
    scaling: dict[int, list[float]] = field(default_factory=dict)
    peak_mem_bytes: int | None = None
    failure: str | None = None
    skipped: bool = False  # not run at all (``failure`` says why): compile_denoiser without a denoiser
    batched_calls: str | None = None
    plan_facts: dict[str, Any] = field(default_factory=lambda: _plan_facts(None))

    def call(self) -> tuple[torch.Tensor, float]:
        """One timed call from a fresh state; counts what it compiled."""
        state = self.setup.new_state()
        device = self.setup.device
        before = _unique_graphs()
        _sync(device)
        start = time.perf_counter()
        out = self.run(state)
        _sync(device)
        seconds = time.perf_counter() - start
        if self.first_call_s is None:
            self.first_call_s = seconds
        compiled = _unique_graphs() - before
        if compiled:
            self.compilations += compiled
            self.compile_wall.append(seconds)
        return out, seconds


def count_python_calls(fn: Callable[[], Any]) -> int:
    """Python function calls (``sys.setprofile`` "call" events) while ``fn()`` runs; C calls do not count."""
    calls = 0

    def profile(frame, event, arg):
        nonlocal calls
        if event == "call":
            calls += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return calls


_LIBC = None


def _resident(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1)) * 1024


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak bytes a call adds over what was in use before it (see the module docstring); None if unknown."""
    global _LIBC
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    if not sys.platform.startswith("linux"):
        return None
    try:
        _LIBC = _LIBC or ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
        base = _resident("VmRSS")
        fn()
        return max(_resident("VmHWM") - base, 0)
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def _time_limit(seconds: float, what: str):
    """Interrupt a long first call (SIGALRM; main thread on Unix only, else unbounded)."""
    usable = hasattr(signal, "SIGALRM") and seconds > 0
    if usable:
        try:
            def alarm(signum, frame):
                raise TimeoutError(f"{what} took longer than {seconds:.0f} s")

            previous = signal.signal(signal.SIGALRM, alarm)
        except ValueError:  # not the main thread
            usable = False
    if usable:
        signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        if usable:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


def _denoiser_floor(eager: _Method, methods: dict[str, _Method], denoiser: str | None = None) -> dict[str, Any]:
    """Time the bare denoiser on the calls one loop makes; the compiled one when compile_denoiser ran."""
    calls: list[tuple[tuple, dict]] = []
    try:
        model = getattr(eager.setup.components, _denoiser_name(eager.setup, denoiser))
    except NoDenoiser:  # a user loop without a denoiser component: no floor to time
        return {"denoiser": None, "calls_per_loop": 0, "ms_per_loop": None}
    handle = model.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    try:
        eager.run(eager.setup.new_state())
    finally:
        handle.remove()
    compiled = methods.get("compile_denoiser")
    bare = compiled.run.compiled if compiled and not compiled.failure else model
    groups: dict[tuple, list] = {}
    for args, kwargs in calls:
        key = tuple((tuple(v.shape), v.dtype) if torch.is_tensor(v) else type(v).__name__
                    for v in (*args, *kwargs.values()))
        groups.setdefault(key, [args, kwargs, 0])[2] += 1
    device = eager.setup.device
    per_loop = 0.0
    with torch.no_grad():
        for args, kwargs, count in groups.values():
            for _ in range(3):
                bare(*args, **kwargs)
            times = []
            for _ in range(20):
                _sync(device)
                start = time.perf_counter()
                bare(*args, **kwargs)
                _sync(device)
                times.append(time.perf_counter() - start)
            per_loop += count * statistics.median(times)
    return {"denoiser": "compiled" if bare is not model else "eager", "calls_per_loop": len(calls),
            "ms_per_loop": per_loop * 1e3}


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


# --- the run ------------------------------------------------------------------------------------------------


def run_bench(config: BenchConfig, progress=None, setups: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Run every method of ``config`` side by side; returns the report written to ``bench.json``.

    ``progress``: a rich ``Progress`` (or anything with its ``add_task``/``update``/``advance``); by default
    live bars on a terminal, one line per phase otherwise (a CI log). ``setups``: makes each method's loop
    (default ``build_setup(config)``; ``run_loop`` shares one).
    """
    torch.manual_seed(config.seed)
    own = progress is None
    if own:
        progress = _default_progress()
    started = datetime.now().astimezone()
    with progress if own else contextlib.nullcontext():
        methods = _prepare(config, progress, setups or (lambda: build_setup(config)))
        eager = methods["eager"]
        _check(methods)
        live = [m for m in methods.values() if not m.failure]
        _time_interleaved(live, config.repeats, progress, f"timing N={config.steps}", lambda m, s: m.times.append(s))
        task = progress.add_task("bare denoiser (floor)", total=1)
        floor = _denoiser_floor(eager, methods, config.denoiser)
        progress.advance(task)
        task = progress.add_task("peak memory", total=len(live))
        for m in live:
            m.peak_mem_bytes = peak_memory(lambda: m.run(m.setup.new_state()), m.setup.device)
            progress.advance(task)
        if getattr(eager.setup, "takes_steps", True):  # a user loop whose make_state takes no N: one N only
            _scale(config, [m for m in live if m.name != "compile_wrapper"], progress)
        cold = _cold_start(config, progress) if config.cold_start else None
    report = _report(config, methods, floor, started)
    if cold is not None:
        report["cold_start"] = cold
    return report


def _cold_start(config: BenchConfig, progress) -> list[dict]:
    from .cold_start import COLD_METHODS, measure

    methods = [m for m in COLD_METHODS if m in config.methods]
    task = progress.add_task("cold start (fresh processes)", total=sum(1 if m == "eager" else 2 for m in methods))
    return measure(config.preset, config.steps, methods, progress=lambda what: progress.advance(task) if what is None
                   else progress.update(task, description=what))


def run_loop(wrapper, components, make_state: Callable, *, methods: tuple[str, ...] = DEFAULT_METHODS,
             steps: int = 20, output: str = "latents", out: str | Path | None = None, progress=None,
             **options: Any) -> dict[str, Any]:
    """Benchmark your own loop from Python, as ``loopgraph bench`` does the presets: every method checked against
    eager on identical inputs, then timed interleaved; returns the report (``bench.json``'s content) and writes
    ``bench.json``, ``bench.csv`` and ``bench.png`` into ``out`` when given.

    ``make_state(steps)`` (or ``make_state()``, then no scaling with N) makes a fresh state for one call; ``output``
    names the state value the methods are compared by. The methods share ``wrapper`` and ``components``
    (compile_denoiser puts its compiled denoiser in only for its own calls). ``options``: other ``BenchConfig``
    fields (``repeats``, ``scaling``, ``denoiser``: the component compile_denoiser compiles, ...).

    Example:
        >>> report = run_loop(wrapper, components, make_state, methods=("eager", "compile_loop"), steps=20)
        >>> {r["method"]: round(r["speedup_vs_eager"], 2) for r in report["results"]}
    """
    setup = UserLoop(wrapper, components, make_state, output=output, steps=steps)
    config = BenchConfig(loop=f"{type(wrapper).__name__} (run_loop)", methods=methods, steps=steps,
                         device=str(setup.device), **options)
    report = run_bench(config, progress, setups=lambda: setup)
    if out is not None:
        write_report(report, Path(out))
    return report


def _default_progress():
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not console.is_terminal:
        return _PhaseLines(console)
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                    TextColumn("{task.completed}/{task.total}"), TimeElapsedColumn(), console=console)


class _PhaseLines(contextlib.nullcontext):
    """Progress for logs: a time-stamped line when a phase starts (live bars do not render in a log)."""

    def __init__(self, console) -> None:
        super().__init__()
        self.console = console

    def add_task(self, description: str, total: int | None = None) -> str:
        self.update(description, description=description)
        return description

    def update(self, task: str, description: str | None = None) -> None:
        self.console.print(f"[{datetime.now():%H:%M:%S}] {description or task}", highlight=False)

    def advance(self, task: str) -> None:
        pass


def _prepare(config: BenchConfig, progress, setups: Callable[[], Any]) -> dict[str, _Method]:
    methods: dict[str, _Method] = {}
    task = progress.add_task("build, compile and warm up", total=len(config.methods) * config.warmup)
    for name in config.methods:
        progress.update(task, description=f"build, compile and warm up: {name}")
        setup = setups()
        method = _Method(name, setup, None)
        methods[name] = method
        try:
            method.run = make_method(name, setup, config.denoiser)
            limit = config.compile_timeout if name == "compile_wrapper" else 0
            with _time_limit(limit, f"{name}'s first call"):
                for _ in range(config.warmup):
                    method.output, _ = method.call()
                    progress.advance(task)
            # at the benchmarked N, before the scaling run plans the others
            method.batched_calls = _batched_calls(getattr(method.run, "compiled", None))
            method.plan_facts = _plan_facts(getattr(method.run, "compiled", None))
        except NoDenoiser as error:  # compile_denoiser with nothing to compile: skipped, and the output says why
            method.failure, method.skipped = str(error), True
        except Exception as error:  # a method that cannot run is reported, not fatal
            method.failure = f"{type(error).__name__}: {error}"
    if methods["eager"].failure:
        raise RuntimeError(f"the eager loop itself fails: {methods['eager'].failure}")
    return methods


def _check(methods: dict[str, _Method]) -> None:
    """Refuse to report a method whose output differs from eager's on identical inputs."""
    reference = methods["eager"].output
    for m in methods.values():
        if m.failure or m.name == "eager":
            continue
        out = m.output
        if out.shape != reference.shape or out.dtype != reference.dtype:
            m.failure = f"output {tuple(out.shape)} {out.dtype} differs from eager's {tuple(reference.shape)}"
        elif not matches_eager(out, reference):
            m.failure = (f"output differs from eager's (max abs diff {max_error(out, reference):.3g}; tolerance "
                         f"{tolerance(reference.dtype)}, atol + rtol x max|eager|)")


def _time_interleaved(methods: list[_Method], repeats: int, progress, what: str,
                      record: Callable[[_Method, float], None]) -> None:
    task = progress.add_task(what, total=repeats)
    for r in range(repeats):
        for k in range(len(methods)):
            m = methods[(r + k) % len(methods)]
            _, seconds = m.call()
            record(m, seconds)
        progress.advance(task)


def _scale(config: BenchConfig, methods: list[_Method], progress) -> None:
    """Latency and Python calls at each N of ``config.scaling``."""
    for steps in config.scaling:
        for m in methods:
            m.setup.steps = steps
            m.call()  # compile_loop plans the new N here (a traced eager run, no new compile)
            m.python_calls[steps] = count_python_calls(lambda: m.run(m.setup.new_state()))
            m.scaling[steps] = []
        _time_interleaved(methods, config.scaling_repeats, progress, f"scaling N={steps}",
                          lambda m, s, steps=steps: m.scaling[steps].append(s))
    for m in methods:
        m.setup.steps = config.steps


def _report(config: BenchConfig, methods: dict[str, _Method], floor: dict, started: datetime) -> dict[str, Any]:
    eager_median = statistics.median(methods["eager"].times)
    low, high = min(config.scaling), max(config.scaling)
    results, rejected, skipped, scaling = [], [], [], []
    for m in methods.values():
        if m.failure:
            (skipped if m.skipped else rejected).append({"method": m.name, "reason": m.failure})
            continue
        median = statistics.median(m.times)
        fast = getattr(m.run, "compiled", None)
        # a compiled loop's own counts: Dynamo's counter does not see the persistent cache's AOTInductor route
        stats = fast.stats if isinstance(fast, CompiledLoop) else None
        row = {
            "method": m.name,
            "steps": config.steps,
            "median_ms": median * 1e3,
            "p20_ms": _quantile(m.times, 0.2) * 1e3,
            "p80_ms": _quantile(m.times, 0.8) * 1e3,
            "steps_per_s": config.steps / median,
            "ms_per_step": median * 1e3 / config.steps,
            "overhead_per_step_us": ((median * 1e3 - floor["ms_per_loop"]) / config.steps * 1e3
                                     if floor["ms_per_loop"] is not None else None),
            "speedup_vs_eager": eager_median / median,
            "first_call_s": m.first_call_s,
            "compile_s": (stats.compile_seconds if stats
                          else max(sum(m.compile_wall) - len(m.compile_wall) * median, 0.0)),
            "plan_s": stats.plan_seconds if stats else None,
            "compilations": stats.compiles if stats else m.compilations,
            "loaded": stats.loaded if stats else None,
            "python_calls_per_call": m.python_calls.get(high),
            "python_calls_per_step": ((m.python_calls[high] - m.python_calls[low]) / (high - low)
                                      if low in m.python_calls else None),
            "peak_mem_bytes": m.peak_mem_bytes,
            "batched_calls": m.batched_calls,
            **m.plan_facts,
        }
        results.append(row)
        for steps, times in m.scaling.items():
            scaling.append({"method": m.name, "steps": steps, "median_ms": statistics.median(times) * 1e3,
                            "python_calls": m.python_calls[steps]})
    device = methods["eager"].setup.device  # the loop's own (a user loop's state decides it)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "device_type": device.type,
        "versions": _versions(),
        "config": {**asdict(config), "device": str(device)},
        "command": " ".join(["loopgraph", *sys.argv[1:]]) if sys.argv else "",
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now().astimezone().isoformat(timespec="seconds"),
        "floor": floor,
        "results": results,
        "rejected": rejected,
        "skipped": skipped,
        "scaling": scaling,
    }


def _batched_calls(fast) -> str | None:
    """What a compiled loop batched (``CallSite``s), in a few words: "components.denoiser x2 in 20/20 steps"."""
    plan = fast.last_plan if isinstance(fast, CompiledLoop) else None
    if plan is None or fast.config.batch_guidance is False:
        return None
    steps = plan.program.num_steps if plan.program else 0
    parts = [f"{s.module} x{s.calls} in {len(s.batched_steps)}/{steps} steps" for s in plan.batching if s.batched_steps]
    parts += [f"{s.module} apart: {s.reason}" for s in plan.batching if not s.batched_steps]
    return "; ".join(parts) or "none"


def _plan_facts(fast) -> dict[str, Any]:
    """What explains a compiled loop's result, from what ``explain()`` says: how it runs (``runs_as``), its step
    graphs, the blocks that run eagerly and why (None for a method that is not a compiled loop)."""
    plan = fast.last_plan if isinstance(fast, CompiledLoop) else None
    if plan is None:
        return {"runs_as": None, "step_graphs": None, "eager_blocks": None, "eager_reasons": None}
    return {"runs_as": plan.kind, "step_graphs": fast.stats.step_graphs, "eager_blocks": fast.stats.eager_blocks,
            "eager_reasons": list(plan.problems)}


def floor_line(floor: dict[str, Any]) -> str:
    if floor["ms_per_loop"] is None:
        return ("Floor: none (no denoiser, unet or transformer component to time alone; --denoiser NAME names the "
                "component)")
    return (f"Floor: the bare {floor['denoiser']} denoiser, {floor['calls_per_loop']} calls per loop, "
            f"{floor['ms_per_loop']:.2f} ms per loop")


def _cpu_name() -> str:
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} ({torch.get_num_threads()} threads)"


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("loopgraph", "triton", "diffusers"):
        with contextlib.suppress(PackageNotFoundError):
            found[package] = version(package)
    return found


# --- output -------------------------------------------------------------------------------------------------

_COLUMNS = [  # (key, header, format)
    ("method", "method", "{}"),
    ("median_ms", "median ms", "{:.2f}"),
    ("p20_ms", "p20", "{:.2f}"),
    ("p80_ms", "p80", "{:.2f}"),
    ("steps_per_s", "steps/s", "{:.0f}"),
    ("ms_per_step", "ms/step", "{:.3f}"),
    ("overhead_per_step_us", "overhead/step µs", "{:.0f}"),
    ("speedup_vs_eager", "vs eager", "{:.2f}x"),
    ("first_call_s", "first call s", "{:.2f}"),
    ("compilations", "code", None),
    ("python_calls_per_step", "py calls/step", "{:.1f}"),
    ("peak_mem_bytes", "peak MiB", None),
]


def _cell(row: dict, key: str, fmt: str | None) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    if key == "peak_mem_bytes":
        return f"{value / 2**20:.1f}"
    if key == "compilations":  # "compiled 1", "loaded 1" (from the persistent cache), both, or "none"
        done = [f"{what} {n}" for what, n in (("compiled", value), ("loaded", row.get("loaded"))) if n]
        return ", ".join(done) or "none"
    return fmt.format(value)


LEGEND = ("first call s: wall time of the method's first call (trace and compile, or load: code says which). "
          "overhead/step µs: time per step above the floor (the bare denoiser timed alone on the loop's own inputs); "
          "negative: faster than the model alone (the compiled loop fuses across the model boundary, no Python).")


def render_table(report: dict[str, Any]):
    from rich.table import Table

    config = report["config"]
    what = config["loop"] or f"{config['preset']}, batch {config['batch']}, {config['dtype']}"
    table = Table(title=f"loopgraph bench: {what}, {config['steps']} steps, {report['device']}")
    for _, header, _ in _COLUMNS:
        table.add_column(header, justify="left" if header == "method" else "right")
    for row in report["results"]:
        table.add_row(*[_cell(row, key, fmt) for key, _, fmt in _COLUMNS])
    return table


def markdown_table(report: dict[str, Any]) -> str:
    """The results as a Markdown table (for docs/benchmarks and the README)."""
    lines = ["| " + " | ".join(h for _, h, _ in _COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    for row in report["results"]:
        lines.append("| " + " | ".join(_cell(row, key, fmt) for key, _, fmt in _COLUMNS) + " |")
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    """Write ``bench.json``, ``bench.csv`` and ``bench.png`` into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "bench.json", out / "bench.csv", out / "bench.png"]
    paths[0].write_text(json.dumps(report, indent=2, default=str) + "\n")
    with paths[1].open("w", newline="") as f:
        keys = list(report["results"][0]) if report["results"] else ["method"]
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(report["results"])
    _plot(report, paths[2])
    return paths


def _plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (bars, lines) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r["method"] for r in report["results"]]
    bars.bar(names, [r["ms_per_step"] for r in report["results"]], color="tab:blue")
    if report["floor"]["ms_per_loop"] is not None:
        floor = report["floor"]["ms_per_loop"] / report["config"]["steps"]
        bars.axhline(floor, color="tab:red", linestyle="--", label=f"bare {report['floor']['denoiser']} denoiser")
    bars.set_ylabel("ms per step (median)")
    bars.set_title(f"per-step time, N={report['config']['steps']}")
    for name in names:
        points = sorted((s["steps"], s["median_ms"]) for s in report["scaling"] if s["method"] == name)
        if points:
            lines.plot(*zip(*points), marker="o", label=name)
    lines.set_xlabel("steps N")
    lines.set_ylabel("ms per call (median)")
    lines.set_title("scaling with N")
    for axes in (bars, lines):
        if axes.get_legend_handles_labels()[0]:  # no floor, no scaling run: nothing to label
            axes.legend()
    fig.suptitle(f"loopgraph bench: {report['config']['loop'] or report['config']['preset']} on {report['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def findings(report: dict[str, Any]) -> list[str]:
    """What the run found about compile_loop, a line each. On the built-in default loop: the targets, each with
    the measured value and "met" or "MISSED" (with the cause and a next step). On any other loop the targets do not
    apply: the ratios only. Then, for each compiled loop, what explains its result (``_how_it_runs``)."""
    rows = {r["method"]: r for r in report["results"]}
    mine = rows.get("compile_loop")
    explained = [f"{r['method']}: {_how_it_runs(r)}" for r in report["results"] if r.get("runs_as")]
    if mine is None:
        return ["compile_loop did not run or was rejected: no targets to check", *explained]
    cpu, targeted = report["device_type"] == "cpu", _is_default_loop(report["config"])

    def target(goal: str, met: bool) -> str:
        return f" (target {goal}: {'met' if met else 'MISSED; ' + _missed(mine)})" if targeted else ""

    goal = 3 if cpu else 10
    lines = [f"compile_loop vs eager: {mine['speedup_vs_eager']:.2f}x steps/s"
             + target(f">= {goal}x", mine["speedup_vs_eager"] >= goal)]
    if "compile_denoiser" in rows:
        ratio = rows["compile_denoiser"]["median_ms"] / mine["median_ms"]
        lines.append(f"compile_loop vs compile_denoiser: {ratio:.2f}x"
                     + (target(">= 1.5x", ratio >= 1.5) if cpu else ""))
    if targeted and cpu:
        per_step = mine["python_calls_per_step"]
        lines.append(f"compile_loop Python calls per step: {per_step}" + target("0", per_step == 0))
    elif targeted and mine["overhead_per_step_us"] is not None:
        lines.append(f"compile_loop overhead per step over the bare denoiser: {mine['overhead_per_step_us']:.1f} µs "
                     "(target <= 2 µs)")
    warm = [r for r in report.get("cold_start", ()) if r["method"] == "compile_loop" and r["process"] == "second"
            and "error" not in r]
    if warm:
        first = warm[0]["first_call_s"]
        lines.append(f"compile_loop first call in a new process, cache warm: {first:.2f} s"
                     + (target("<= 2 s", first <= 2) if cpu else ""))
    if not targeted:
        lines.append("no targets checked: they are set for the built-in default loop only (`loopgraph bench` with "
                     "no --loop, --preset, --model, --batch, --resolution or --dtype)")
    return lines + explained


def _is_default_loop(config: dict[str, Any]) -> bool:
    """Whether a report's ``config`` ran the built-in default loop (the tiny DiT as ``make run`` builds it, any N):
    the one loop the targets were set for."""
    default = BenchConfig()
    return config["loop"] is None and all(config[k] == getattr(default, k)
                                          for k in ("preset", "batch", "sample_size", "dtype", "model"))


def _how_it_runs(row: dict[str, Any]) -> str:
    """A compiled loop's result explained, from its ``explain()`` facts: how it runs, its step graphs, the blocks
    that run eagerly and why, and the Python calls per step."""
    reasons = "; ".join(row["eager_reasons"])
    calls = row["python_calls_per_step"]
    return (f"runs as {row['runs_as']}, {row['step_graphs']} step graph(s), {row['eager_blocks']} eager block(s)"
            + (f" ({reasons})" if reasons else "")
            + f", {'unmeasured' if calls is None else f'{calls:g}'} Python calls per step")


def _missed(row: dict[str, Any]) -> str:
    """Why a compiled loop missed a target, and what to do next."""
    if row["eager_reasons"]:
        return ("cause: part of the loop runs eagerly (why: the compile_loop line below); next: CompiledLoop.explain() "
                "names each eager block and why it cannot compile")
    return ("cause: nothing runs eagerly (the compile_loop line below), so the time left is mostly the model's own "
            "compute; next: compare ms/step with the floor, and rerun on an idle machine")


def default_out() -> Path:
    return Path("bench-results") / datetime.now().strftime("%Y%m%d-%H%M%S")


def with_overrides(config: BenchConfig, **changes: Any) -> BenchConfig:
    return replace(config, **{k: v for k, v in changes.items() if v is not None})
