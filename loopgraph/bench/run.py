"""One bench run: build every method's loop, check each against eager, time them interleaved, scale with N, and
assemble the report (``run_bench``, which ``loopgraph bench`` calls; ``run_loop`` for a loop from Python)."""

from __future__ import annotations

import contextlib
import signal
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import torch

from ..compile import matches_eager, max_error, tolerance
from . import cold_start
from .loop import BenchConfig, UserLoop, build_setup
from .measure import _batched_calls, _denoiser_floor, _Method, _plan_facts, count_python_calls, peak_memory
from .methods import DEFAULT_METHODS, NoDenoiser, make_method
from .report import _report, write_report

__all__ = ["run_bench", "run_loop"]


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
    methods = [m for m in cold_start.COLD_METHODS if m in config.methods]
    task = progress.add_task("cold start (fresh processes)", total=sum(1 if m == "eager" else 2 for m in methods))
    return cold_start.measure(config.preset, config.steps, methods, progress=lambda what: progress.advance(task)
                              if what is None else progress.update(task, description=what))


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
