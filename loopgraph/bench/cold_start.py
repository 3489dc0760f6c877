"""Cold start: the time a fresh process takes to its first result, per method (``loopgraph bench --cold-start``).

Each method runs in two fresh processes, one after the other, that share a new, empty Inductor cache folder
and (compile_loop) a new, empty loopgraph cache folder: the first process is a machine that never ran the loop,
the second a restarted service. Measured in each process: the first call (from a fresh state to the result; for
compile_loop it includes the traced eager run and the compilation or the load), building the loop (its
models from seeded random weights), and the whole process (interpreter start, imports, building the loop, the
first call) from the parent's side.

    eager                one process (nothing to compile or keep)
    compile_denoiser     the denoiser in torch.compile: the second process has Inductor's caches warm
    compile_loop         the second process loads the compiled loop from loopgraph's persistent cache
    compile_loop_nocache compile_loop(cache=False): compiled in each process (Inductor's caches warm in the
                         second, but its FX-graph cache refuses the loop's while_loop graph)

Run as ``python -m loopgraph.bench.cold_start PRESET STEPS METHOD`` it is the child process: it prints one JSON line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from .loop import BenchConfig, build_setup
from .methods import make_method

__all__ = ["COLD_METHODS", "measure", "markdown_table"]

COLD_METHODS = ("eager", "compile_denoiser", "compile_loop_nocache", "compile_loop")


def _child(preset: str, steps: int, method: str) -> None:
    imported = time.perf_counter()  # after the imports (torch, loopgraph): "build_s" is building the loop only
    setup = build_setup(BenchConfig(preset=preset, steps=steps, device="cpu"))
    run = make_method(method, setup)
    state = setup.new_state()
    built = time.perf_counter()
    run(state)
    done = time.perf_counter()
    fast = getattr(run, "compiled", None)
    stats = getattr(fast, "stats", None)
    print(json.dumps({"build_s": built - imported, "first_call_s": done - built,
                      "loaded": getattr(stats, "loaded", None), "compiles": getattr(stats, "compiles", None)}))


def measure(preset: str = "dit", steps: int = 20, methods=COLD_METHODS,
            progress: Callable[[str | None], None] | None = None) -> list[dict]:
    """Rows ``{method, process, first_call_s, process_s, ...}``: each method in fresh processes (see above).
    ``progress(what)`` is called as each process starts, ``progress(None)`` as it ends."""
    rows = []
    for method in methods:
        with tempfile.TemporaryDirectory(prefix="loopgraph-cold-") as folder:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(Path(folder) / "inductor"),
                   "LOOPGRAPH_CACHE_DIR": str(Path(folder) / "loopgraph")}
            for process in (("first",) if method == "eager" else ("first", "second")):
                if progress:
                    progress(f"cold start: {method}, {process} process")
                start = time.perf_counter()
                child = [sys.executable, "-m", "loopgraph.bench.cold_start", preset, str(steps), method]
                result = subprocess.run(child, env=env, capture_output=True, text=True, timeout=3600)
                seconds = time.perf_counter() - start
                if progress:
                    progress(None)  # done
                row = {"method": method, "process": process, "preset": preset, "steps": steps, "process_s": seconds}
                if result.returncode != 0:  # reported, as the bench reports a method it rejects; the others go on
                    error = (result.stderr.strip().splitlines() or ["exit code %d" % result.returncode])[-1]
                    rows.append({**row, "error": error[-300:]})
                    break
                rows.append({**row, **json.loads(result.stdout.strip().splitlines()[-1])})
    return rows


def markdown_table(rows: list[dict]) -> str:
    lines = ["| method | process | first call (s) | whole process (s) | building the loop (s) | compiled / loaded |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['process']} | failed: {r['error']} | | | |")
            continue
        code = "" if r["compiles"] is None else f"{r['compiles']} / {r['loaded']}"
        lines.append(f"| {r['method']} | {r['process']} | {r['first_call_s']:.2f} | {r['process_s']:.2f} | "
                     f"{r['build_s']:.2f} | {code} |")
    return "\n".join(lines)


if __name__ == "__main__":
    _child(sys.argv[1], int(sys.argv[2]), sys.argv[3])
