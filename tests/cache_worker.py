"""One process of the persistent-cache tests (tests/test_cache.py): compiles a zoo loop with the cache in
``$LOOPGRAPH_CACHE_DIR`` and reports, as one JSON line, what it compiled, counted by torch's own machinery:

    inductor_graphs   Inductor graph lowerings (``GraphLowering`` objects made: any Inductor compilation)
    cpp_builds        C++ builds (``CppBuilder.build``: kernels, host code, packages)
    exports           ``torch.export.export`` calls
    dynamo_graphs     graphs Dynamo captured (``counters["stats"]["unique_graphs"]``)

Usage: python tests/cache_worker.py OUT.pt STEPS[,STEPS...] [--seed S] [--torch-version V]
Each step count is one call with a fresh state; the final latents of each go into OUT.pt, with eager's.
"""

import argparse
import json
import time

import torch


def small_loop(steps: int = 4, seed: int = 0, preset: str = "dit", **options):
    """A zoo loop small enough that its AOTInductor package builds in seconds (tests/test_cache.py uses it too)."""
    from loopgraph.zoo.loops import build_loop

    model = {"hidden_dim": 32, "depth": 1} if preset.startswith("dit") else {}
    return build_loop(preset, steps=steps, seed=seed, sample_size=8, **model, **options)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--torch-version", help="pretend to be another torch (the key and the entry's check)")
    args = parser.parse_args()
    if args.torch_version:
        torch.__version__ = args.torch_version

    import torch._inductor.cpp_builder as cpp_builder
    import torch._inductor.graph as inductor_graph
    from torch._dynamo.utils import counters

    counts = {"inductor_graphs": 0, "cpp_builds": 0, "exports": 0}

    def counting(owner, name, key):
        original = getattr(owner, name)

        def wrapper(*a, **k):
            counts[key] += 1
            return original(*a, **k)

        setattr(owner, name, wrapper)

    counting(inductor_graph.GraphLowering, "__init__", "inductor_graphs")
    counting(cpp_builder.CppBuilder, "build", "cpp_builds")
    counting(torch.export, "export", "exports")

    from loopgraph import compile_loop

    results, seconds = {}, []
    steps = [int(s) for s in args.steps.split(",")]
    setup = small_loop(steps=steps[0], seed=args.seed)
    fast = compile_loop(setup.wrapper)
    for n in steps:
        setup.steps = n
        _, eager = setup.wrapper(setup.components, setup.new_state())
        for call in range(2):  # the first call traces (eager's result), the second runs the compiled loop
            start = time.perf_counter()
            _, state = fast(setup.components, setup.new_state())
            seconds.append(time.perf_counter() - start)
        results[n] = (state.get("latents"), eager.get("latents"))
    torch.save(results, args.out)
    counts["dynamo_graphs"] = counters["stats"]["unique_graphs"]
    print(json.dumps({**counts, "loaded": fast.stats.loaded, "compiles": fast.stats.compiles, "seconds": seconds,
                      "origin": fast.last_plan.executable.compiled.origin, "explain": fast.explain()}))


if __name__ == "__main__":
    main()
