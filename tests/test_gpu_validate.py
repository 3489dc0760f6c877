"""benchmarks/gpu/validate.sh: the GPU validation's stages, run on the CPU at tiny sizes (``--dry-run``) so that
the script cannot rot while no GPU is around; one stage failing or running out of time never stops the next."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from .background import background

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["env", "cuda-tests", "bench-default", "launches", "bench-compute", "cache"]


def load_validate():
    spec = importlib.util.spec_from_file_location("gpu_validate", ROOT / "benchmarks" / "gpu" / "validate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@background
def dry_run(tmp):
    out = tmp / "gpu-validate"
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu" / "validate.sh"), str(out), "--dry-run"],
                          cwd=tmp, capture_output=True, text=True, timeout=900)
    return out, proc


def test_dry_run_runs_every_stage_and_writes_the_record(dry_run):
    out, proc = dry_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] and [s["stage"] for s in summary["stages"]] == STAGES
    assert all(s["status"] == "ok" for s in summary["stages"]), proc.stdout[-4000:]
    assert proc.returncode == 0
    env = json.loads((out / "env.json").read_text())
    assert env["torch"] == torch.__version__ and env["device"] == "cpu" and not env["cuda_available"]
    launches = json.loads((out / "launches.json").read_text())
    assert launches["plan"] == "whole loop on state buffers" and launches["compiled_calls"] == 3
    assert launches["graph_launches"] == 0  # no CUDA on a dry run; on a GPU one launch per call is the target
    for name, dtype in (("bench-default", "float32"), ("bench-compute", "bfloat16")):
        bench = json.loads((out / name / "bench.json").read_text())
        assert bench["config"]["dtype"] == dtype and bench["device_type"] == "cpu"
        assert {r["method"] for r in bench["results"]} >= {"eager", "compile_loop"} and not bench["rejected"]
        assert (out / name / "bench.png").exists()
    assert "passed" in (out / "cuda-tests.log").read_text()
    cache = json.loads((out / "cache.json").read_text())
    assert cache["ok"] and cache["first"]["compiles"] == 1 and cache["second"]["loaded"] == 1
    assert cache["second"]["code"][0].startswith("loaded from")


def test_a_failing_or_slow_stage_does_not_stop_the_next(tmp_path, monkeypatch):
    validate = load_validate()
    py = sys.executable
    monkeypatch.setattr(validate, "stages", lambda out, dry: [
        ("fails", [py, "-c", "raise SystemExit(3)"], 30),
        ("hangs", [py, "-c", "import time; time.sleep(60)"], 1),
        ("works", [py, "-c", "print('fine')"], 30)])
    assert validate.main([str(tmp_path), "--dry-run"]) == 1
    stages = json.loads((tmp_path / "summary.json").read_text())["stages"]
    assert [(s["stage"], s["status"], s["returncode"]) for s in stages] == [
        ("fails", "failed", 3), ("hangs", "timed out", None), ("works", "ok", 0)]
    assert (tmp_path / "works.log").read_text() == "fine\n"


def test_loopgraph_test_timeout_fails_a_test_that_runs_too_long(tmp_path):
    (tmp_path / "test_slow.py").write_text("import time\n\ndef test_slow():\n    time.sleep(30)\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                           str(tmp_path / "test_slow.py")], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LOOPGRAPH_TEST_TIMEOUT": "1"})
    assert proc.returncode == 1 and "TimeoutError: test ran past LOOPGRAPH_TEST_TIMEOUT=1 s" in proc.stdout


def test_the_kernels_import_from_a_source_tree_with_nothing_installed():
    """The GPU machines run the tree from PYTHONPATH: ``kernels/`` must still be ``loopgraph.kernels`` there (the
    wheel and the editable install map it; a plain checkout does not)."""
    code = ("import sys\n"
            "sys.meta_path = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
            f"sys.path.insert(0, {str(ROOT)!r})\n"
            "import loopgraph.kernels._common as common, loopgraph.passes.fused_kernels\n"
            "print(common.__file__)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT.parent, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(ROOT / "kernels" / "_common.py")
