# Two commands on a fresh clone: `make run` and `make test`. Both build .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test fuzz venv clean

venv: $(STAMP)

# torch is installed first, pinned, and only when it is not importable: the pinned version is a local
# CPU wheel here, while an unpinned `torch` would pull several GB of CUDA packages.
# The diffusers extra is installed too, so `make test` runs the diffusers interop tests; the bench extra
# (rich, matplotlib) serves `loopgraph bench` only.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[test,diffusers,bench]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m loopgraph bench

test: $(STAMP)
	$(BIN)/python -m pytest -q

# A long differential-fuzzing campaign (eager vs compile_loop over generated loops), Inductor included; `make test`
# runs a bounded, derandomised part of it. FUZZ_EXAMPLES sets the number of generated loops.
FUZZ_EXAMPLES ?= 500
fuzz: $(STAMP)
	LOOPGRAPH_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) LOOPGRAPH_FUZZ_BACKENDS=eager,inductor \
		$(BIN)/python -m pytest -q tests/test_fuzz.py --hypothesis-show-statistics

clean:
	rm -rf $(VENV) bench-results .pytest_cache
