"""Trace: one real eager call of the wrapper, each step recorded into an fx graph (the ops on loop data), the floats
it reads as inputs, and the result: ``LoopTrace`` / ``StepTrace`` (ir.py)."""
