"""Batched vs unbatched compile_loop on a larger, compute-bound DiT on CPU: peak memory (3 calls) and median time
(5 calls) of each; writes the JSON recorded in docs/benchmarks/cpu-batched-guidance/memory-dit-256-64.json.

    .venv/bin/python benchmarks/batched_guidance_memory.py [OUT.json]
"""

import json
import sys
import time

import torch

from loopgraph import compile_loop
from loopgraph.bench.measure import peak_memory
from loopgraph.verify import matches_eager
from loopgraph.zoo.loops import build_loop


def main(path: str) -> None:
    out = {}
    for batch in ("auto", False):
        setup = build_loop("dit", steps=4, sample_size=64, hidden_dim=256)
        expected = setup.run()
        fast = compile_loop(setup.wrapper, batch_guidance=batch)
        for _ in range(2):  # plans and compiles, then a warm call
            _, state = fast(setup.components, setup.new_state())
        assert matches_eager(state.latents, expected)
        peaks = [peak_memory(lambda: fast(setup.components, setup.new_state()), torch.device("cpu"))
                 for _ in range(3)]
        times = []
        for _ in range(5):
            state = setup.new_state()
            start = time.perf_counter()
            fast(setup.components, state)
            times.append(time.perf_counter() - start)
        out[str(batch)] = dict(peak_mib=[p / 2**20 for p in peaks], median_ms=sorted(times)[2] * 1e3)
        print(batch, out[str(batch)], flush=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "memory-dit-256-64.json")
