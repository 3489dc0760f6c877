"""What a request that changes a value costs (issue 30), on the docs' quick-start loop (CFG + flow-matching Euler,
docs/examples/my_loop.py), compiled with Inductor:

    guidance scale   a call with the scale of the previous call vs a call with a scale never seen before
    schedule         the sigmas as the wrapper's loop input (my_loop) vs as a block input the Euler step indexes
                     by the step (``block_state.sigmas[i + 1]``), at two step counts

timed interleaved, medians side by side in one run, every result checked against eager first; the plans,
compilations (Dynamo's own count), step graphs and Python calls per call are recorded with them. Writes
requests.json and prints the table (recorded in docs/benchmarks/README.md).

    .venv/bin/python benchmarks/request_changes.py [OUT_FOLDER] [--repeats 30]
"""

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._dynamo.utils as dynamo_utils

from loopgraph import InputParam, ModularPipelineBlocks, OutputParam, compile_loop
from loopgraph.bench.measure import count_python_calls
from loopgraph.bench.report import _cpu_name, _versions
from loopgraph.verify import matches_eager

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "docs" / "examples"))
import my_loop  # noqa: E402  (the quick start's loop, as the docs show it)


class IndexedStep(ModularPipelineBlocks):  # the Euler step reading the sigmas as a block input
    inputs = [InputParam("latents", required=True), InputParam("noise_pred", required=True),
              InputParam("sigmas", required=True)]
    intermediate_outputs = [OutputParam("latents")]

    def __call__(self, components, block_state, i: int, t: torch.Tensor):
        dt = block_state.sigmas[i + 1] - block_state.sigmas[i]
        block_state.latents = block_state.latents + dt * block_state.noise_pred
        return components, block_state


class IndexedLoop(my_loop.DenoiseLoop):
    block_classes = [my_loop.Denoise, IndexedStep]
    loop_inputs = [InputParam("timesteps", required=True)]

    @torch.no_grad()
    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        for i, t in enumerate(block_state.timesteps):
            components, block_state = self.loop_step(components, block_state, i=i, t=t)
        self.set_block_state(state, block_state)
        return components, state


def indexed_state(steps: int):
    state = my_loop.make_state(steps)
    state.set("timesteps", state.get("sigmas")[:-1].clone())
    return state


def timed(fast, components, state) -> float:
    """Seconds of one call (its state made before)."""
    start = time.perf_counter()
    fast(components, state)
    return time.perf_counter() - start


def guidance(repeats: int) -> dict:
    wrapper, components, make_state = my_loop.setup()
    fast = compile_loop(wrapper, cache=False)
    scales = (4.0 + 0.01 * k for k in itertools.count(1))  # never the same twice

    def state_with(scale):
        state = make_state(20)
        state.set("guidance_scale", scale)
        return state

    dynamo_utils.counters.clear()
    for scale in (4.0, 4.0, next(scales)):  # plan, warm, one new scale; each checked against eager
        latents = fast(components, state_with(scale))[1].get("latents")
        assert matches_eager(latents, wrapper(components, state_with(scale))[1].get("latents")), scale
    times = {"same scale": [], "new scale": []}
    for _ in range(repeats):
        times["same scale"].append(timed(fast, components, state_with(4.0)))
        times["new scale"].append(timed(fast, components, state_with(next(scales))))
    base = statistics.median(times["same scale"])
    return {"loop": "docs/examples/my_loop.py", "steps": 20, "plans": fast.stats.plans,
            "compilations": dynamo_utils.counters["stats"]["unique_graphs"], "calls": fast.stats.calls,
            "methods": [{"method": m, "median_ms": statistics.median(t) * 1e3, "vs_same": statistics.median(t) / base}
                        for m, t in times.items()]}


def schedule(repeats: int, steps: tuple[int, ...]) -> dict:
    _, components, make_state = my_loop.setup()
    loops = {"loop input": (compile_loop(my_loop.DenoiseLoop(), cache=False), make_state),
             "block input": (compile_loop(IndexedLoop(), cache=False), indexed_state)}
    rows = []
    dynamo_utils.counters.clear()
    for name, (fast, new_state) in loops.items():
        before = dynamo_utils.counters["stats"]["unique_graphs"]
        for n in steps:
            for _ in range(2):
                fast(components, new_state(n))
            expected = my_loop.DenoiseLoop()(components, make_state(n))[1].get("latents")
            assert matches_eager(fast(components, new_state(n))[1].get("latents"), expected), (name, n)
        calls = {}
        for n in steps:
            state = new_state(n)
            calls[n] = count_python_calls(lambda: fast(components, state))
        rows.append({"sigmas as": name, "compilations": dynamo_utils.counters["stats"]["unique_graphs"] - before,
                     "step graphs": fast.stats.step_graphs, "plans": fast.stats.plans,
                     "python calls per call": calls, "median_ms": {}})
    for _ in range(repeats):
        for row, (fast, new_state) in zip(rows, loops.values()):  # interleaved
            for n in steps:
                row["median_ms"].setdefault(n, []).append(timed(fast, components, new_state(n)))
    for row in rows:
        row["median_ms"] = {n: statistics.median(t) * 1e3 for n, t in row["median_ms"].items()}
    base = rows[0]["median_ms"]
    for row in rows:
        row["vs_loop_input"] = {n: row["median_ms"][n] / base[n] for n in steps}
    return {"loop": "docs/examples/my_loop.py", "steps": list(steps), "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="docs/benchmarks/cpu-requests")
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)
    result = {"device": _cpu_name(), "versions": _versions(), "threads": torch.get_num_threads(),
              "command": "python benchmarks/request_changes.py " + " ".join(sys.argv[1:]),
              "guidance": guidance(args.repeats), "schedule": schedule(args.repeats, (20, 50))}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "requests.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    g = result["guidance"]
    print(f"guidance scale ({g['steps']} steps): {g['plans']} plan(s), {g['compilations']} compilation(s) "
          f"for {g['calls']} calls")
    for m in g["methods"]:
        print(f"  {m['method']:<12} {m['median_ms']:8.2f} ms  {m['vs_same']:.2f}x")
    for row in result["schedule"]["rows"]:
        ms = ", ".join(f"N={n}: {v:.2f} ms ({row['vs_loop_input'][n]:.2f}x)" for n, v in row["median_ms"].items())
        print(f"sigmas as {row['sigmas as']:<12} compilations {row['compilations']}, step graphs "
              f"{row['step graphs']}, Python calls per call {row['python calls per call']}: {ms}")


if __name__ == "__main__":
    main()
