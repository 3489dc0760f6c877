"""Passes: every rewrite from a trace to the program that is compiled (plan the loop, batch calls, lift literals, fuse
kernels, place tables, cut eager segments), each with one contract (run.py)."""
