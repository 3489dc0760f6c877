"""Triton kernels for fused guidance + scheduler updates (GPU work in progress)."""
