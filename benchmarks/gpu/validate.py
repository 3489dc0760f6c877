"""Validate every CUDA path of loopgraph in one short run (called by ``benchmarks/gpu/validate.sh``).

Stages, each a subprocess with its own time budget; a stage that fails or runs out of time is recorded and the
next one runs, so one broken path does not cost the whole run:

    env             device, driver, python / torch / triton versions
    cuda-tests      the CUDA tests (whole-loop CUDA graph, Triton kernels, kernel pass, counter noise, step
                    callbacks and interrupt in chunks), with a per-test timeout (LOOPGRAPH_TEST_TIMEOUT)
    bench-default   ``loopgraph bench --device cuda`` on the default loop
    launches        CUDA graph launches and kernel launches in one warm compiled call (torch.profiler)
    bench-compute   ``loopgraph bench --device cuda`` on a compute-bound preset (a larger DiT at bf16)
    cache           the persistent cache: one process compiles a small loop into an empty cache, a second one
                    loads it (no compilation) and its compiled call equals eager (``cache.json``)

The other stages run with the persistent cache off (``LOOPGRAPH_CACHE_DIR=""``): their budgets were sized for
compiling in the process, and the cache stage is where its path is validated.

Everything goes under the output folder: one log per stage, the benches' bench.json/csv/png, ``launches.json``,
``env.json`` and ``summary.json`` (each stage's status, seconds and exit code). ``--dry-run`` runs the same
stages on the CPU at tiny sizes (the test suite does, so the script cannot rot while no GPU is around).
Nothing is installed: the source tree is put on ``PYTHONPATH``; diffusers cases skip where it is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

ENV = r"""
import json, platform, subprocess, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
        "cuda": torch.version.cuda, "device": "cpu", "driver": None, "triton": None}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    pass
if torch.cuda.is_available():
    info["device"] = torch.cuda.get_device_name()
    info["capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    try:
        info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                        capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
print(json.dumps(info, indent=1))
json.dump(info, open(sys.argv[1], "w"), indent=1)
"""

LAUNCHES = r"""
import json, sys, warnings
import torch
from torch.profiler import ProfilerActivity, profile
from loopgraph import compile_loop
from loopgraph.zoo.loops import build_loop
device, steps, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
warnings.simplefilter("ignore")
setup = build_loop("dit", steps=steps, device=device, sample_size=8 if device == "cpu" else 16)
fast = compile_loop(setup.wrapper)
for _ in range(3):
    fast(setup.components, setup.new_state())
state = setup.new_state()
activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
with profile(activities=activities) as prof:
    fast(setup.components, state)
    if device == "cuda":
        torch.cuda.synchronize()
names = [e.name for e in prof.events()]
found = {"device": device, "steps": steps, "plan": fast.last_plan.kind,
         "graph_launches": sum("cudaGraphLaunch" in n for n in names),
         "kernel_launches": sum(n in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC") for n in names),
         "compiles": fast.stats.compiles, "compiled_calls": fast.stats.compiled_calls}
print(json.dumps(found, indent=1))
json.dump(found, open(out, "w"), indent=1)
"""

CACHE = r"""
import json, os, subprocess, sys, warnings
device, out = sys.argv[1], sys.argv[2]
if len(sys.argv) == 4:  # a child: compile_loop's first two calls in a fresh process
    import torch
    from loopgraph import compile_loop
    from loopgraph.verify import matches_eager
    from loopgraph.zoo.loops import build_loop
    warnings.simplefilter("ignore")
    setup = build_loop("dit", steps=4, sample_size=8, hidden_dim=32, depth=1, device=device)
    fast = compile_loop(setup.wrapper)
    fast(setup.components, setup.new_state())
    _, state = fast(setup.components, setup.new_state())
    print(json.dumps({"compiles": fast.stats.compiles, "loaded": fast.stats.loaded, "code": fast.last_plan.code,
                      "kind": fast.last_plan.kind, "equal": matches_eager(state.get("latents"), setup.run())}))
    sys.exit(0)
env = dict(os.environ, LOOPGRAPH_CACHE_DIR=os.path.join(os.path.dirname(out), "loopgraph-cache"))
found = {}
for process in ("first", "second"):
    child = subprocess.run([sys.executable, "-c", __CODE__, device, out, "child"], env=env, capture_output=True,
                           text=True)
    print(child.stderr[-3000:], file=sys.stderr)
    found[process] = json.loads(child.stdout.strip().splitlines()[-1]) if child.returncode == 0 else None
ok = (found["first"] and found["second"] and found["first"]["equal"] and found["second"]["equal"]
      and found["second"]["compiles"] == 0 and found["second"]["loaded"] >= 1)
found["ok"] = bool(ok)
print(json.dumps(found, indent=1))
json.dump(found, open(out, "w"), indent=1)
sys.exit(0 if ok else 1)
"""
CACHE = CACHE.replace("__CODE__", repr(CACHE))

CUDA_TESTS = ["tests/test_cudagraph.py", "tests/test_kernels.py", "tests/test_kernel_pass.py", "tests/test_rng.py",
              "tests/test_watch.py::test_on_cuda_without_the_graph_callbacks_progress_and_interrupt_work_per_chunk",
              "tests/test_watch.py::test_callbacks_on_the_whole_loop_cuda_graph_run_its_steps_one_by_one"]


def stages(out: Path, dry: bool) -> list[tuple[str, list[str], int]]:
    """(name, command, budget in seconds) per stage: 530 s in all, within 9 minutes on a GPU."""
    py = sys.executable
    device = "cpu" if dry else "cuda"
    bench = [py, "-m", "loopgraph", "bench", "--device", device]
    if dry:  # the same stages at tiny sizes
        default = bench + ["--quick", "--resolution", "8", "--methods", "eager,compile_loop",
                           "--out", str(out / "bench-default")]
        compute = bench + ["--quick", "--resolution", "8", "--dtype", "bfloat16", "--model", "hidden_dim=64",
                           "--methods", "eager,compile_loop", "--out", str(out / "bench-compute")]
        tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cudagraph.py"]
    else:
        default = bench + ["--scaling", "5,10,20,50", "--out", str(out / "bench-default")]
        compute = bench + ["--dtype", "bfloat16", "--resolution", "64", "--batch", "2", "--model", "hidden_dim=512",
                           "--model", "depth=8", "--model", "num_heads=8", "--scaling", "10,20", "--repeats", "10",
                           "--out", str(out / "bench-compute")]
        tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *CUDA_TESTS]
    # launches after bench-default: the same loop, so its compilation is a hit in Inductor's cache (cold, it took
    # more than a minute on a loaded 2-core CPU)
    return [
        ("env", [py, "-c", ENV, str(out / "env.json")], 15),
        ("cuda-tests", tests, 150),
        ("bench-default", default, 120),
        ("launches", [py, "-c", LAUNCHES, device, "4" if dry else "20", str(out / "launches.json")], 75),
        ("bench-compute", compute, 100),
        ("cache", [py, "-c", CACHE, device, str(out / "cache.json")], 150 if dry else 70),  # CPU: a 2-core AOTI build
    ]


def run_stage(name: str, command: list[str], budget: int, out: Path, env: dict) -> dict:
    log = out / f"{name}.log"
    start = time.perf_counter()
    print(f"== {name} (budget {budget} s)", flush=True)
    with open(log, "w") as f:
        try:
            rc = subprocess.run(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=budget).returncode
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            rc, status = None, "timed out"
    seconds = time.perf_counter() - start
    tail = log.read_text(errors="replace").splitlines()[-8:]
    print("\n".join(f"   {line}" for line in tail))
    print(f"== {name}: {status} in {seconds:.0f} s (log: {log})", flush=True)
    return {"stage": name, "status": status, "seconds": round(seconds, 1), "returncode": rc, "log": log.name,
            "command": command}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default=os.environ.get("OUT") or "gpu-validate",
                        help="output folder (default: $OUT, else ./gpu-validate)")
    parser.add_argument("--dry-run", action="store_true", help="the same stages on the CPU at tiny sizes")
    parser.add_argument("--only", default=None, help="comma-separated stage names to run (default: all)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]),
               LOOPGRAPH_TEST_TIMEOUT=os.environ.get("LOOPGRAPH_TEST_TIMEOUT", "120"), PYTHONUNBUFFERED="1",
               LOOPGRAPH_CACHE_DIR="")  # the cache stage sets its own folder
    if args.dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path even on a GPU machine
    chosen = set(args.only.split(",")) if args.only else None
    results = [run_stage(name, command, budget, out, env) for name, command, budget in stages(out, args.dry_run)
               if chosen is None or name in chosen]
    summary = {"dry_run": args.dry_run, "stages": results}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n".join(f"{r['stage']:<14} {r['status']:<10} {r['seconds']:>6.0f} s" for r in results))
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
