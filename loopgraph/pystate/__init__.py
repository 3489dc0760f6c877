"""Python state: what a traced call reads and writes of the objects it reaches (the attribute log, its class hooks and
the module globals user code reads), snapshots of values, and how compiled calls put that state back."""
