"""How much memory does one call add, per method? (CUDA: allocator peak; CPU: peak resident set growth.)"""

import pytest
import torch

from common import METHODS, prepared, time_loop
from loopgraph.bench.measure import peak_memory


@pytest.mark.parametrize("method", METHODS)
def test_memory(benchmark, device, method):
    setup, run = prepared(method, 20, device, hidden_dim=128, sample_size=32)
    peak = peak_memory(lambda: run(setup.new_state()), torch.device(device))
    benchmark.group = "memory"
    benchmark.extra_info.update(method=method, steps=20, device=device, peak_mem_bytes=peak)
    time_loop(benchmark, setup, run, rounds=3)
