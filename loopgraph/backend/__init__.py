"""Backend: a program to compiled code: the lowered whole loop, the CUDA graph, the one compile call, and the persistent
cache of AOTInductor packages on disk."""
