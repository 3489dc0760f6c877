"""Triton kernels: classifier-free guidance fused with a scheduler update, one kernel family per file.

Each kernel reads the step counter from a device tensor and its per-step coefficients from 1-D tables at that
row (no host scalars), computes in float32 and stores in the latents' dtype. Each file has the ``*_kernel``, a
wrapper that checks its preconditions and launches it, a plain torch ``*_reference``, and registers the wrapper
as a ``torch.ops.loopgraph.*`` op that Dynamo and Inductor can trace (``loopgraph.kernel_pass`` puts those ops
into compiled loops). Importing this package imports Triton; set ``TRITON_INTERPRET=1`` before importing it to
run the kernels on CPU.
"""

from .cfg_ddim import cfg_ddim, cfg_ddim_kernel, cfg_ddim_reference
from .cfg_euler import cfg_euler, cfg_euler_kernel, cfg_euler_reference
from .cfg_flow_euler import cfg_flow_euler, cfg_flow_euler_kernel, cfg_flow_euler_reference

__all__ = [
    # fused guidance + scheduler updates (wrappers that check and launch)
    "cfg_flow_euler",
    "cfg_euler",
    "cfg_ddim",
    # the Triton kernels
    "cfg_flow_euler_kernel",
    "cfg_euler_kernel",
    "cfg_ddim_kernel",
    # plain torch references
    "cfg_flow_euler_reference",
    "cfg_euler_reference",
    "cfg_ddim_reference",
]
