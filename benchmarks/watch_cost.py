"""What watching a compiled loop costs (issue 29): a compiled call with nothing asked for, with the wrapper's
progress bar drawn, with a step callback every step and every 5 steps (it keeps the latents: a preview's cost less
the decoding), and a stream of every 5th step; timed interleaved, medians side by side in one run, each method's
result checked against the plain compiled call first. Writes watch.json and prints the table
(recorded in docs/benchmarks/README.md).

    .venv/bin/python benchmarks/watch_cost.py [OUT_FOLDER] [--loops dit,flux] [--repeats 30]
"""

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import loopgraph
from loopgraph import compile_loop
from loopgraph.bench.report import _cpu_name, _versions
from loopgraph.verify import matches_eager

METHODS = ["none", "progress", "callback every 1", "callback every 5", "stream every 5"]


def build(name: str, steps: int):
    if name == "dit":
        from loopgraph.zoo.loops import build_loop

        return build_loop("dit", steps=steps, progress=True)
    from loopgraph.zoo.diffusers_loops import build_diffusers_loop

    return build_diffusers_loop(name, steps=steps, progress=True)


def one_call(method: str, fast, setup, devnull):
    """One call of ``fast`` watched as ``method`` says: (seconds, final latents)."""
    setup.wrapper.set_progress_bar_config(disable=method != "progress", file=devnull)
    kept = []
    remove = None
    if method.startswith("callback"):
        remove = fast.on_step_end(lambda e: kept.append(e.tensors["latents"]), every=int(method.split()[-1]))
    state = setup.new_state()
    start = time.perf_counter()
    if method.startswith("stream"):
        events = loopgraph.stream(fast, setup.components, state, every=5)
        while True:
            try:
                kept.append(next(events).tensors["latents"])
            except StopIteration as done:
                _, state = done.value
                break
    else:
        _, state = fast(setup.components, state)
    seconds = time.perf_counter() - start
    if remove is not None:
        remove()
    return seconds, state.get("latents")


def measure(name: str, steps: int, repeats: int, devnull) -> dict:
    setup = build(name, steps)
    fast = compile_loop(setup.wrapper)
    for method in METHODS:  # plan (trace, compile or load), warm up, check each against the plain call
        for _ in range(2):
            _, latents = one_call(method, fast, setup, devnull)
        _, plain = one_call("none", fast, setup, devnull)
        assert matches_eager(latents, plain), method
    assert fast.stats.eager_blocks == 0 and fast.last_plan.kind == "whole loop on state buffers", fast.explain()
    times = {m: [] for m in METHODS}
    for _ in range(repeats):
        for method in METHODS:  # interleaved: a slow moment of the machine hits every method alike
            times[method].append(one_call(method, fast, setup, devnull)[0])
    base = statistics.median(times["none"])
    return {"loop": name, "steps": steps, "plan": fast.last_plan.kind, "methods": [
        {"method": m, "median_ms": statistics.median(t) * 1e3, "vs_none": statistics.median(t) / base}
        for m, t in times.items()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="docs/benchmarks/cpu-watch")
    parser.add_argument("--loops", default="dit,flux")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(os.devnull, "w") as devnull:
        results = [measure(name, args.steps, args.repeats, devnull) for name in args.loops.split(",")]
    record = {"device": _cpu_name(), "versions": _versions(),
              "command": "python benchmarks/watch_cost.py " + " ".join(
                  f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
              "results": results}
    (out / "watch.json").write_text(json.dumps(record, indent=1))
    lines = ["| loop | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for r in results:
        cells = [f"{m['median_ms']:.2f} ms ({m['vs_none']:.3f}x)" for m in r["methods"]]
        lines.append(f"| {r['loop']} ({r['steps']} steps) | " + " | ".join(cells) + " |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
