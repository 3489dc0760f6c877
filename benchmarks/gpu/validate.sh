#!/usr/bin/env bash
# Validate every CUDA path of loopgraph in one call of the device machine (<= 9 minutes of wall time):
#
#   benchmarks/gpu/validate.sh [OUT_DIR] [--dry-run] [--only STAGE,...]
#
# Run from the repository root. Installs nothing (the source tree goes on PYTHONPATH). Writes logs,
# bench.json/csv/png, launches.json, env.json and summary.json under OUT_DIR (default: $OUT, else
# ./gpu-validate): copy them into docs/benchmarks/gpu-<device>/ afterwards. Stages and budgets:
# benchmarks/gpu/validate.py. --dry-run: the same stages on the CPU at tiny sizes (the test suite runs it).
set -u
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || command -v python3 || command -v python )}"
exec "$PYTHON" benchmarks/gpu/validate.py "$@"
