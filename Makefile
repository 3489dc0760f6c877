# Two commands on a fresh clone: `make run` and `make test`. Both build .venv when it is missing or stale.
SHELL := bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS := test,diffusers,bench
# torch stays pinned: 2.13.0 is a local CPU wheel here, while an unpinned `torch` would pull several GB of CUDA
# packages. `make test-latest TORCH=torch==X` tries another.
TORCH ?= torch==2.13.0
LATEST := .venv-latest
# The lock: the exact versions `make test` was last run with (see "Dependencies" in the README).
CONSTRAINTS := constraints.txt
# pip freeze writes torch's local label (2.13.0+cpu); the lock keeps the public version, which here still takes
# the local CPU wheel (local versions sort after the public one) and elsewhere the index's.
freeze = $(1)/bin/pip freeze --all --exclude-editable | grep -v '^loopgraph==' | sed -E 's/^(torch==[^+]*)\+.*/\1/'

.PHONY: run test test-all test-latest lock fuzz venv clean

venv: $(STAMP)

# .venv is made anew from the lock whenever the lock or pyproject.toml changes, so it holds exactly the lock.
# The build backend (setuptools, wheel) and pip come from the lock too: loopgraph is installed without build
# isolation, which would fetch the newest setuptools. The check after the install fails when a package is not
# pinned in the lock at the version installed (a dependency added to pyproject.toml without `make lock`).
$(STAMP): pyproject.toml $(CONSTRAINTS)
	rm -rf $(VENV)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -c $(CONSTRAINTS) pip setuptools wheel
	$(BIN)/pip install -c $(CONSTRAINTS) --no-build-isolation -e ".[$(EXTRAS)]"
	@unpinned=$$(LC_ALL=C comm -23 <($(call freeze,$(VENV)) | LC_ALL=C sort) \
	                               <(grep -v '^#' $(CONSTRAINTS) | LC_ALL=C sort)); \
	if [ -n "$$unpinned" ]; then \
		echo "installed but not pinned in $(CONSTRAINTS) at this version:"; echo "$$unpinned"; \
		echo "refresh the lock on purpose: make lock (README, Dependencies)"; exit 1; fi
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m loopgraph bench

# The routine suite (CI runs it), with its 30 slowest tests listed at the end. Tests marked `slow` (pyproject.toml
# says which) run in `make test-all` as well.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" --durations=30

test-all: $(STAMP)
	$(BIN)/python -m pytest -q --durations=30

# The newest versions pyproject.toml allows (torch aside), in a venv of their own, made anew each time: an
# upstream release that breaks loopgraph shows here before the lock is refreshed. Not in CI.
$(LATEST)/.installed:
	rm -rf $(LATEST)
	$(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install --upgrade pip setuptools wheel
	$(LATEST)/bin/pip install --no-build-isolation $(TORCH) -e ".[$(EXTRAS)]"
	touch $@

test-latest:
	rm -rf $(LATEST)
	$(MAKE) $(LATEST)/.installed
	$(LATEST)/bin/python -m pytest -q

# Refresh the lock from the newest allowed versions: `make test-latest` first, then `make lock`, then `make test`
# (which rebuilds .venv from the new lock) and commit constraints.txt with what changed in its message.
lock: $(LATEST)/.installed
	{ echo "# The lock: exact versions for .venv (make test, make run), written by \`make lock\` from $(LATEST)"; \
	  echo "# on $$(uname -sm), $$($(LATEST)/bin/python -V). Refresh on purpose only (README, Dependencies)."; \
	  $(call freeze,$(LATEST)); } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	git diff --stat -- $(CONSTRAINTS) || true

# A long differential-fuzzing campaign (eager vs compile_loop over generated loops), Inductor included; `make test`
# runs a bounded, derandomised part of it. FUZZ_EXAMPLES sets the number of generated loops.
FUZZ_EXAMPLES ?= 500
fuzz: $(STAMP)
	LOOPGRAPH_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) LOOPGRAPH_FUZZ_BACKENDS=eager,inductor \
		$(BIN)/python -m pytest -q tests/test_fuzz.py --hypothesis-show-statistics

clean:
	rm -rf $(VENV) $(LATEST) bench-results .pytest_cache
