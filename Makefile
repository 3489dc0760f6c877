# Two commands on a fresh clone: `make run` and `make test`. Both build .venv when it is missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test venv clean

venv: $(STAMP)

# torch is installed first, pinned, and only when it is not importable: the pinned version is a local
# CPU wheel here, while an unpinned `torch` would pull several GB of CUDA packages.
# The diffusers extra is installed too, so `make test` runs the diffusers interop tests.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[test,diffusers]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python -m loopgraph bench

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) bench-results .pytest_cache
