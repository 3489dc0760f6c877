"""Batched vs unbatched compile_loop on a larger, compute-bound DiT on CPU: peak memory (3 calls) and median time
(5 calls) of each; writes the JSON recorded in docs/benchmarks/cpu-batched-guidance/memory-dit-256-64.json.

    .venv/bin/python benchmarks/batched_guidance_memory.py [OUT.json]
"""
import sys
import torch, time, json
from loopgraph import compile_loop
from loopgraph.bench import peak_memory
from loopgraph.zoo.loops import build_loop
from loopgraph.verify import matches_eager
out = {}
for b in ["auto", False]:
    setup = build_loop("dit", steps=4, sample_size=64, hidden_dim=256)
    exp = setup.run()
    fast = compile_loop(setup.wrapper, batch_guidance=b)
    for _ in range(2):
        _, st = fast(setup.components, setup.new_state())
    assert matches_eager(st.latents, exp)
    peaks = [peak_memory(lambda: fast(setup.components, setup.new_state()), torch.device("cpu")) for _ in range(3)]
    t = []
    for _ in range(5):
        s = setup.new_state(); t0 = time.perf_counter(); fast(setup.components, s); t.append(time.perf_counter() - t0)
    out[str(b)] = dict(peak_mib=[p / 2**20 for p in peaks], median_ms=sorted(t)[2] * 1e3)
    print(b, out[str(b)], flush=True)
json.dump(out, open(sys.argv[1] if len(sys.argv) > 1 else "memory-dit-256-64.json", "w"), indent=1)
