"""Shared pieces of the benchmarks: the device, and loops prepared for each method.

Run with ``.venv/bin/python -m pytest benchmarks/`` (add ``--benchmark-json=FILE`` to keep the numbers).
Each file answers one question; every file runs on CPU and uses CUDA when it is present.
"""

import pytest
import torch


@pytest.fixture(scope="session")
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
