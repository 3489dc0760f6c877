"""A bench run's report: its rows (``bench.json``), the table and legend the CLI prints, the findings under it,
and the files written (``bench.json``, ``bench.csv``, ``bench.png``)."""

from __future__ import annotations

import contextlib
import csv
import json
import platform
import statistics
import sys
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from ..compile import CompiledLoop
from .loop import BenchConfig
from .measure import _Method

__all__ = ["LEGEND", "default_out", "findings", "floor_line", "markdown_table", "render_table", "write_report"]


def _report(config: BenchConfig, methods: dict[str, _Method], floor: dict, started: datetime) -> dict[str, Any]:
    """The report ``bench.json`` holds: a row per reported method, the ones rejected or skipped and why, the scaling
    run, and where and with what it ran."""
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


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


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


def floor_line(floor: dict[str, Any]) -> str:
    if floor["ms_per_loop"] is None:
        return ("Floor: none (no denoiser, unet or transformer component to time alone; --denoiser NAME names the "
                "component)")
    return (f"Floor: the bare {floor['denoiser']} denoiser, {floor['calls_per_loop']} calls per loop, "
            f"{floor['ms_per_loop']:.2f} ms per loop")


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


def default_out() -> Path:
    return Path("bench-results") / datetime.now().strftime("%Y%m%d-%H%M%S")
