"""Session setup shared by the test modules."""

import os

import torch

# Without a GPU the Triton kernels (loopgraph.kernels) run in Triton's CPU interpreter. Triton reads
# TRITON_INTERPRET when @triton.jit decorates a kernel, i.e. when the kernel modules are imported, so it is
# set here, before any test module imports them. Inductor generates C++ (not Triton) on CPU, so the rest of the
# suite is unaffected; on a GPU machine the variable stays unset and the kernels are compiled for real.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
