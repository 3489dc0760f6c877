"""``loopgraph bench``: the CLI end to end (--quick), the output schema, and the pieces that decide what is
reported (equality check, Python-call counting, memory measurement, config validation)."""

import csv
import json
import subprocess
import sys

import pytest
import torch

from loopgraph.bench import BenchConfig, _check, count_python_calls, _Method, peak_memory
from loopgraph.compile import matches_eager

from .background import background

RESULT_KEYS = {"method": str, "median_ms": float, "p20_ms": float, "p80_ms": float, "steps_per_s": float,
               "compile_s": float, "compilations": int, "python_calls_per_step": float,
               "peak_mem_bytes": (int, type(None))}


@background
def quick_run(tmp):
    out = tmp / "bench"
    proc = subprocess.run([sys.executable, "-m", "loopgraph", "bench", "--quick", "--out", str(out)],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc.stdout


def test_bench_quick_writes_json_csv_png_with_the_schema(quick_run):
    out, stdout = quick_run
    report = json.loads((out / "bench.json").read_text())
    assert report["device"] and report["versions"]["torch"] == torch.__version__
    assert report["config"]["preset"] == "dit" and report["config"]["steps"] == 4
    assert [r["method"] for r in report["results"]] == ["eager", "compile_denoiser", "compile_loop"]
    assert report["rejected"] == []
    for row in report["results"]:
        for key, kind in RESULT_KEYS.items():
            assert isinstance(row[key], kind), (row["method"], key, row[key])
        assert row["p20_ms"] <= row["median_ms"] <= row["p80_ms"]
    rows = {r["method"]: r for r in report["results"]}
    assert rows["eager"]["compilations"] == 0
    assert rows["compile_loop"]["compilations"] == 1  # one whole-loop graph, also across the scaling Ns
    assert rows["compile_loop"]["python_calls_per_step"] == 0
    assert rows["eager"]["python_calls_per_step"] > 10
    assert {(s["method"], s["steps"]) for s in report["scaling"]} == {
        (m, n) for m in rows for n in (2, 4)}
    with (out / "bench.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == list(rows) and set(RESULT_KEYS) <= set(table[0])
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "compile_loop" in stdout and "wrote" in stdout
    # the guided steps' two denoiser calls ran as one (--quick: CFG in all 4 steps)
    assert rows["compile_loop"]["batched_calls"] == "components.denoiser x2 in 4/4 steps"
    assert rows["eager"]["batched_calls"] is None
    assert "batched calls (compile_loop): components.denoiser x2 in 4/4 steps" in stdout


def test_a_method_that_disagrees_with_eager_is_not_reported():
    reference = torch.ones(2, 3)
    methods = {"eager": _Method("eager", None, None, output=reference),
               "close": _Method("close", None, None, output=reference + 1e-7),
               "wrong": _Method("wrong", None, None, output=reference * 1.01),
               "shape": _Method("shape", None, None, output=torch.ones(3, 2))}
    _check(methods)
    assert methods["close"].failure is None
    assert "differs from eager's (max abs diff 0.01" in methods["wrong"].failure
    assert "(3, 2)" in methods["shape"].failure


def test_matches_eager_scales_the_tolerance_by_the_largest_magnitude():
    expected = torch.tensor([10.0, 0.3, -0.01])
    inductor_like = expected + torch.tensor([0.0, 4.4e-5, 0.0])  # float reassociation on a magnitude-10 tensor
    assert not torch.allclose(inductor_like, expected, rtol=1e-4, atol=1e-5)  # elementwise fails on 0.3
    assert matches_eager(inductor_like, expected)                           # 4.4e-5 <= 1e-5 + 1e-4 * 10
    assert not matches_eager(expected + torch.tensor([0.0, 2e-3, 0.0]), expected)  # a real difference
    assert not matches_eager(expected[:2], expected)
    half = expected.half()
    assert matches_eager(half + 0.05, half) and not matches_eager(half + 0.2, half)  # fp16: 1e-2 + 1e-2 * 10


def test_python_call_counter_counts_python_frames_only():
    def leaf():
        return 1

    def three():
        return leaf() + leaf() + len([1, 2])  # len is a C call: not counted

    assert count_python_calls(three) == 3  # three, leaf, leaf


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="CPU peak memory is read from /proc (Linux)")
def test_cpu_peak_memory_sees_a_temporary_allocation():
    x = torch.ones(1 << 21)  # 8 MiB

    def two_temporaries():
        y = x * 2           # 8 MiB alive ...
        return (y + 1).sum()  # ... while 8 MiB more are made

    peak = peak_memory(two_temporaries, torch.device("cpu"))
    assert 14 * 2**20 <= peak <= 24 * 2**20


@pytest.mark.parametrize("kwargs, message", [
    (dict(methods=("eager", "fast")), "unknown methods ['fast']"),
    (dict(methods=("compile_loop",)), "'eager' must be among the methods"),
    (dict(scaling=(5,)), "at least two step counts"),
    (dict(dtype="float64"), "dtype must be one of"),
    (dict(steps=0), "must be >= 1"),
    (dict(cold_start=True, loop="my_loop:make"), "--cold-start times the presets"),
])
def test_bench_config_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        BenchConfig(**kwargs)


def test_cli_reports_bad_options_without_a_traceback():
    proc = subprocess.run([sys.executable, "-m", "loopgraph", "bench", "--methods", "eager,fast"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "unknown methods ['fast']" in proc.stderr and "Traceback" not in proc.stderr


def test_cold_start_runs_each_method_in_fresh_processes_and_reports_it(tmp_path):
    """Eager only (compiling methods take minutes: recorded in docs/benchmarks/cpu-cold-start, not run here)."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "loopgraph", "bench", "--quick", "--methods", "eager", "--cold-start",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (row,) = json.loads((out / "bench.json").read_text())["cold_start"]
    assert row["method"] == "eager" and row["process"] == "first" and row["preset"] == "dit"
    assert 0 < row["first_call_s"] < row["process_s"] and row["build_s"] > 0
    assert "cold start (fresh processes" in proc.stdout and "| eager | first |" in proc.stdout


# -- the user's own loop: `--loop package.module:function` and run_loop ------------------------------------------------
USER_LOOP = '''
from loopgraph.zoo.loops import build_loop


def make():
    setup = build_loop("dit", steps=4, sample_size=8)

    def make_state(steps):
        setup.steps = steps
        return setup.new_state()

    return setup.wrapper, setup.components, make_state
'''


@background
def user_loop_run(tmp):
    (tmp / "my_loop.py").write_text(USER_LOOP)
    out = tmp / "out"
    proc = subprocess.run([sys.executable, "-m", "loopgraph", "bench", "--quick", "--loop", "my_loop:make",
                           "--methods", "eager,compile_loop", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=tmp)
    return tmp, out, proc


def test_bench_loop_runs_the_users_own_loop_from_a_module(user_loop_run):
    tmp_path, out, proc = user_loop_run
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "bench.json").read_text())
    assert report["config"]["loop"] == "my_loop:make" and report["rejected"] == []  # checked against eager
    rows = {r["method"]: r for r in report["results"]}
    assert list(rows) == ["eager", "compile_loop"] and rows["compile_loop"]["compilations"] == 1
    assert rows["compile_loop"]["python_calls_per_step"] == 0
    assert (out / "bench.csv").exists() and (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
    assert "loopgraph bench: my_loop:make, 4 steps" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "loopgraph", "bench", "--loop", "no_such_module:make"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode == 2 and "cannot load --loop 'no_such_module:make'" in bad.stderr


def test_run_loop_benchmarks_a_loop_from_python_with_every_method_checked(tmp_path):
    from loopgraph.bench import run_loop

    from .test_batching import Net, components, two_call_loop

    loop, net = two_call_loop(), Net()

    def make_state(steps):
        from loopgraph import PipelineState

        g = torch.Generator().manual_seed(1)
        state = PipelineState()
        for name, shape in (("x", (2, 4, 6, 6)), ("cond", (2, 5, 8)), ("uncond", (2, 5, 8))):
            state.set(name, torch.randn(*shape, generator=g))
        state.set("num_steps", steps)
        return state

    report = run_loop(loop, components(net), make_state, methods=("eager", "compile_loop_unbatched", "compile_loop"),
                      steps=4, output="x", out=tmp_path, repeats=2, warmup=1, scaling=(2, 4), scaling_repeats=1)
    rows = {r["method"]: r for r in report["results"]}
    assert list(rows) == ["eager", "compile_loop_unbatched", "compile_loop"] and report["rejected"] == []
    assert rows["compile_loop"]["batched_calls"] == "components['net'] x2 in 4/4 steps"
    assert rows["compile_loop_unbatched"]["batched_calls"] is None
    assert report["floor"]["ms_per_loop"] is None and rows["eager"]["overhead_per_step_us"] is None  # no denoiser
    assert (tmp_path / "bench.json").exists() and (tmp_path / "bench.png").exists()
