"""Guards: what a plan is valid for, checked on every call (inputs, the Python state it read), and the plan cache."""
