"""A user's settings module for the fuzzer (tests/fuzz_loops.py): blocks read ``fuzz_settings.STRENGTH``, a change
between calls sets it."""

STRENGTH = 0.5
UNREAD = 1.0  # nothing loads it: changing it must not re-plan
