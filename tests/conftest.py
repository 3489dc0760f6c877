"""Session setup shared by the test modules."""

import os
import signal

import pytest
import torch

# Without a GPU the Triton kernels (loopgraph.kernels) run in Triton's CPU interpreter. Triton reads
# TRITON_INTERPRET when @triton.jit decorates a kernel, i.e. when the kernel modules are imported, so it is
# set here, before any test module imports them. Inductor generates C++ (not Triton) on CPU, so the rest of the
# suite is unaffected; on a GPU machine the variable stays unset and the kernels are compiled for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _per_test_timeout():
    """LOOPGRAPH_TEST_TIMEOUT=<seconds> (benchmarks/gpu/validate.sh sets it): a test that runs longer fails with
    a TimeoutError instead of taking the run's time (pytest-timeout is not on the GPU machines)."""
    seconds = int(os.environ.get("LOOPGRAPH_TEST_TIMEOUT", "0") or 0)
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutError(f"test ran past LOOPGRAPH_TEST_TIMEOUT={seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# The persistent cache of compiled loops (loopgraph.backend.disk_cache) is off for the suite: compile-count tests count
# torch.compile's compilations, and a loop another test (or an earlier run) compiled would load instead.
# tests/test_cache.py turns it on with folders of its own.
os.environ["LOOPGRAPH_CACHE_DIR"] = ""

# Background runs of the heaviest subprocess tests (tests/background.py): its hooks, imported to be seen here.
from .background import (pytest_collection_finish, pytest_collection_modifyitems,  # noqa: E402,F401
                         pytest_sessionfinish)
