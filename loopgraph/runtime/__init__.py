"""Runtime: the ways a plan runs (whole loop, CUDA graph, eager segments, eager), the write-back they share, and
watching a running loop (progress, callbacks, interruption, streaming)."""
