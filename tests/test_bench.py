"""``loopgraph bench``: the CLI end to end (--quick), the output schema, and the pieces that decide what is
reported (equality check, Python-call counting, memory measurement, config validation)."""

import csv
import json
import subprocess
import sys
import types
import warnings
from datetime import datetime
from pathlib import Path

import pytest
import torch

from loopgraph.__main__ import _config, _parser
from loopgraph.bench.loop import BenchConfig, UserLoop, user_loop
from loopgraph.bench.measure import _Method, count_python_calls, peak_memory
from loopgraph.bench.methods import make_method
from loopgraph.bench.report import _COLUMNS, LEGEND, _plot, _report, findings, markdown_table
from loopgraph.bench.run import _check, run_loop
from loopgraph.compile import compile_loop, matches_eager

from .background import background

RESULT_KEYS = {"method": str, "median_ms": float, "p20_ms": float, "p80_ms": float, "steps_per_s": float,
               "first_call_s": float, "compile_s": float, "compilations": int, "python_calls_per_step": float,
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
    assert rows["compile_loop"]["loaded"] == 0 and rows["compile_loop"]["runs_as"] == "whole loop on state buffers"
    assert rows["compile_loop"]["first_call_s"] > rows["compile_loop"]["compile_s"] > 0  # trace + compile + run
    assert rows["compile_loop"]["python_calls_per_step"] == 0
    assert rows["eager"]["python_calls_per_step"] > 10
    assert {(s["method"], s["steps"]) for s in report["scaling"]} == {
        (m, n) for m in rows for n in (2, 4)}
    with (out / "bench.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == list(rows) and set(RESULT_KEYS) <= set(table[0])
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "compile_loop" in stdout and "wrote" in stdout
    assert LEGEND in stdout
    assert "| compiled 1 |" in markdown_table(report)
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
    (dict(preset="nosuch"), "unknown preset 'nosuch'; zoo presets: ['dit'"),
    (dict(preset="flux", batch=2), "drop ['batch'] for preset 'flux'"),
])
def test_bench_config_rejects_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(")):
        BenchConfig(**kwargs)


@pytest.mark.parametrize("args, message", [
    (["--methods", "eager,fast"], "unknown methods ['fast']"),
    (["--preset", "nosuch"], "unknown preset 'nosuch'; zoo presets: ['dit', 'dit-ddim', 'unet', 'unet-ddim'], "
                             "diffusers loops: ['flux', 'qwenimage', 'sdxl', 'wan']"),
])
def test_cli_reports_bad_options_in_one_line_without_a_traceback(args, message):
    proc = subprocess.run([sys.executable, "-m", "loopgraph", "bench", *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"loopgraph bench: {message}") and proc.stderr.count("\n") == 1, proc.stderr


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
    # not the default loop: no verdicts, what explains the result instead
    assert "target" not in proc.stdout.replace("no targets checked", "") and "MISSED" not in proc.stdout
    assert (f"compile_loop: runs as whole loop on state buffers, {rows['compile_loop']['step_graphs']} step graph(s), "
            "0 eager block(s), 0 Python calls per step") in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "loopgraph", "bench", "--loop", "no_such_module:make"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert bad.returncode == 2 and "cannot load --loop 'no_such_module:make'" in bad.stderr


def _net_loop():
    from loopgraph import PipelineState

    from .helpers import Net, components, two_call_loop

    def make_state(steps):
        g = torch.Generator().manual_seed(1)
        state = PipelineState()
        for name, shape in (("x", (2, 4, 6, 6)), ("cond", (2, 5, 8)), ("uncond", (2, 5, 8))):
            state.set(name, torch.randn(*shape, generator=g))
        state.set("num_steps", steps)
        return state

    net = Net()
    return two_call_loop(), components(net), make_state, net


def test_run_loop_benchmarks_a_loop_from_python_with_every_method_checked(tmp_path):
    loop, comps, make_state, _ = _net_loop()
    report = run_loop(loop, comps, make_state, methods=("eager", "compile_loop_unbatched", "compile_loop"),
                      steps=4, output="x", out=tmp_path, repeats=2, warmup=1, scaling=(2, 4), scaling_repeats=1)
    rows = {r["method"]: r for r in report["results"]}
    assert list(rows) == ["eager", "compile_loop_unbatched", "compile_loop"] and report["rejected"] == []
    assert rows["compile_loop"]["batched_calls"] == "components['net'] x2 in 4/4 steps"
    assert rows["compile_loop_unbatched"]["batched_calls"] is None
    assert report["floor"]["ms_per_loop"] is None and rows["eager"]["overhead_per_step_us"] is None  # no denoiser
    assert rows["compile_loop"]["compilations"] == 1 and rows["compile_loop"]["loaded"] == 0
    assert rows["compile_loop"]["first_call_s"] > rows["compile_loop"]["median_ms"] / 1e3  # it traced and compiled
    # explain()'s facts at the benchmarked N (taken before the scaling run plans the other Ns)
    assert ({k: rows["compile_loop"][k] for k in ("runs_as", "step_graphs", "eager_blocks", "eager_reasons")}
            == {"runs_as": "whole loop on state buffers", "step_graphs": 1, "eager_blocks": 0, "eager_reasons": []})
    assert (tmp_path / "bench.json").exists() and (tmp_path / "bench.png").exists()


# -- what the output says: honest counts, findings, the legend ---------------------------------------------------------
def _row(method: str, **values) -> dict:
    row = {"method": method, "median_ms": 10.0, "speedup_vs_eager": 1.0, "python_calls_per_step": 0.0,
           "overhead_per_step_us": None, "runs_as": None, "step_graphs": None, "eager_blocks": None,
           "eager_reasons": None}
    return {**row, **values}


def _findings_report(config: BenchConfig, compile_loop_row: dict) -> dict:
    rows = [_row("eager", median_ms=20.0, python_calls_per_step=600.0), _row("compile_denoiser", median_ms=15.0),
            compile_loop_row]
    return {"config": vars(config), "device_type": "cpu", "results": rows}


def test_findings_on_a_user_loop_explain_the_result_instead_of_verdicts():
    mine = _row("compile_loop", median_ms=12.5, speedup_vs_eager=1.6, runs_as="whole loop on state buffers",
                step_graphs=1, eager_blocks=0, eager_reasons=[])
    lines = findings(_findings_report(BenchConfig(loop="my_loop:make"), mine))
    text = "\n".join(lines)
    assert "MISSED" not in text and "met" not in text and "(target" not in text
    assert lines[:2] == ["compile_loop vs eager: 1.60x steps/s", "compile_loop vs compile_denoiser: 1.20x"]
    assert ("compile_loop: runs as whole loop on state buffers, 1 step graph(s), 0 eager block(s), 0 Python calls per "
            "step") in lines
    assert any(line.startswith("no targets checked: they are set for the built-in default loop") for line in lines)
    other_preset = findings(_findings_report(BenchConfig(preset="unet"), mine))
    assert "MISSED" not in "\n".join(other_preset)


def test_a_missed_target_on_the_default_loop_says_why_and_what_to_do_next():
    mine = _row("compile_loop", median_ms=10.0, speedup_vs_eager=2.0, python_calls_per_step=6.0,
                runs_as="eager segments", step_graphs=2, eager_blocks=1,
                eager_reasons=["random op (torch.randn_like) in block 'noise' at loop.py:12"])
    lines = findings(_findings_report(BenchConfig(), mine))
    assert lines[0].startswith("compile_loop vs eager: 2.00x steps/s (target >= 3x: MISSED; cause: part of the loop "
                               "runs eagerly")
    assert "next: CompiledLoop.explain() names each eager block" in lines[0]
    assert lines[1] == "compile_loop vs compile_denoiser: 1.50x (target >= 1.5x: met)"
    assert lines[2].startswith("compile_loop Python calls per step: 6.0 (target 0: MISSED; cause:")
    assert lines[-1] == ("compile_loop: runs as eager segments, 2 step graph(s), 1 eager block(s) (random op "
                         "(torch.randn_like) in block 'noise' at loop.py:12), 6 Python calls per step")
    whole = findings(_findings_report(BenchConfig.quick(), {**mine, "eager_reasons": [], "eager_blocks": 0}))
    assert "MISSED; cause: nothing runs eagerly" in whole[0] and "next: compare ms/step with the floor" in whole[0]


def test_report_counts_what_a_compiled_loop_compiled_or_loaded_not_dynamos_counter():
    """The persistent cache's AOTInductor route compiles outside Dynamo: its counter says 0 for a run that compiled
    (the bug: "compile s 0.0, compiles 0" with plan_s 40.8); the compiled loop's own stats say what happened."""
    from .helpers import two_call_loop

    def method(name: str, first: float, compiled=None) -> _Method:
        run = types.SimpleNamespace(compiled=compiled)
        return _Method(name, types.SimpleNamespace(device=torch.device("cpu")), run, times=[0.01, 0.01],
                       first_call_s=first)

    def report_of(fast):
        methods = {"eager": method("eager", 0.02), "compile_loop": method("compile_loop", 41.0, fast)}
        floor = {"denoiser": None, "calls_per_loop": 0, "ms_per_loop": None}
        return _report(BenchConfig.quick(), methods, floor, datetime.now())

    compiled = compile_loop(two_call_loop())
    compiled.stats.compiles, compiled.stats.compile_seconds = 1, 39.5  # as the AOTInductor route counts them
    row = report_of(compiled)["results"][1]
    assert (row["compilations"], row["loaded"], row["compile_s"], row["first_call_s"]) == (1, 0, 39.5, 41.0)
    loaded = compile_loop(two_call_loop())
    loaded.stats.loaded = 1
    table = markdown_table(report_of(loaded))
    assert "| compile_loop |" in table and "| loaded 1 |" in table and "| none |" in table  # eager: nothing
    assert "| first call s | code |" in table and "compile s" not in table


def test_the_legend_and_the_docs_define_every_column():
    assert "negative: faster than the model alone" in LEGEND and "first call s:" in LEGEND
    docs = (Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "README.md").read_text()
    definitions = docs.split("## Definitions", 1)[1].split("\n## ", 1)[0]
    for _, header, _ in _COLUMNS[1:]:  # after the method's name
        assert f"`{header}`" in definitions, header
    assert "**floor**" in definitions and "**Negative** means" in definitions


def test_plot_labels_only_what_is_there(tmp_path):
    """No floor (no denoiser) and no scaling run (make_state takes no N): no legend, so no matplotlib warning."""
    report = {"results": [{"method": "eager", "ms_per_step": 2.0}], "scaling": [], "device": "cpu",
              "floor": {"denoiser": None, "calls_per_loop": 0, "ms_per_loop": None},
              "config": {"steps": 4, "loop": "my_loop:make", "preset": "dit"}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _plot(report, tmp_path / "bench.png")
    assert not [w for w in caught if "legend" in str(w.message)], [str(w.message) for w in caught]
    assert (tmp_path / "bench.png").read_bytes()[:4] == b"\x89PNG"


# -- loading --loop, naming the denoiser -----------------------------------------------------------------------------
TRIVIAL_LOOP = """
from loopgraph import PipelineState


def make():
    return "wrapper", "components", lambda steps: PipelineState()
"""


@pytest.fixture
def path_without_cwd(monkeypatch):
    """sys.path as the ``loopgraph`` script sees it: its own folder first, not the current directory."""
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".")])
    yield
    for name in ("bench_cwd_loop", "bench_file_loop"):
        sys.modules.pop(name, None)


def test_loop_module_is_imported_from_the_current_directory(tmp_path, monkeypatch, path_without_cwd):
    (tmp_path / "bench_cwd_loop.py").write_text(TRIVIAL_LOOP)
    monkeypatch.chdir(tmp_path)
    loop = user_loop("bench_cwd_loop:make", 4)  # as `python -m` would: the current directory first on sys.path
    assert isinstance(loop, UserLoop) and loop.wrapper == "wrapper" and loop.takes_steps
    assert sys.path[0] == str(tmp_path)


def test_loop_accepts_a_file_path(tmp_path, monkeypatch, path_without_cwd):
    folder = tmp_path / "loops"
    folder.mkdir()
    (folder / "bench_file_loop.py").write_text(TRIVIAL_LOOP)
    monkeypatch.chdir(tmp_path)
    assert user_loop("loops/bench_file_loop.py:make", 4).components == "components"
    with pytest.raises(ValueError, match=r"cannot load --loop 'loops/missing.py:make': no file .*missing\.py"):
        user_loop("loops/missing.py:make", 4)
    with pytest.raises(ValueError, match="cannot load --loop 'loops/bench_file_loop.py:nothing'"):
        user_loop("loops/bench_file_loop.py:nothing", 4)


def test_compile_denoiser_without_a_denoiser_is_skipped_with_the_flag_that_fixes_it():
    loop, comps, make_state, _ = _net_loop()  # the model is components.net: not a name the bench guesses
    report = run_loop(loop, comps, make_state, methods=("eager", "compile_denoiser"), steps=4, output="x",
                      repeats=1, warmup=1, scaling=(2, 4), scaling_repeats=1)
    assert [r["method"] for r in report["results"]] == ["eager"] and report["rejected"] == []
    (skipped,) = report["skipped"]
    assert skipped["method"] == "compile_denoiser"
    assert "no component named denoiser, unet or transformer" in skipped["reason"]
    assert "(modules: ['net']); name the denoiser with --denoiser NAME" in skipped["reason"]


def test_denoiser_names_the_component_to_compile_and_time_alone():
    loop, comps, make_state, net = _net_loop()
    report = run_loop(loop, comps, make_state, methods=("eager",), steps=4, output="x", denoiser="net",
                      repeats=1, warmup=1, scaling=(2, 4), scaling_repeats=1)
    assert report["floor"]["calls_per_loop"] == 8 and report["floor"]["ms_per_loop"] > 0  # two calls per step
    setup = UserLoop(loop, comps, make_state, output="x", steps=4)
    assert make_method("compile_denoiser", setup, denoiser="net").compiled._orig_mod is net  # compiled on first call
    with pytest.raises(ValueError, match=r"no component 'unet' is a torch.nn.Module .* --denoiser NAME"):
        make_method("compile_denoiser", setup, denoiser="unet")
    assert _config(_parser().parse_args(["bench", "--quick", "--denoiser", "net"])).denoiser == "net"
