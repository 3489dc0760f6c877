"""The persistent cache of compiled loops (loopgraph.backend.disk_cache: the files; loopgraph.backend.artifacts:
AOTInductor packages).

The suite runs with the cache off (conftest.py); these tests turn it on with folders of their own. Processes:
two compile one entry at once, a new process loads it (no Inductor compilation, counted by torch's machinery in
tests/cache_worker.py) for other N and other weights and inputs, a corrupted entry is rebuilt. In process: each
program (whole loop, CUDA-graph step, eager segment) equals eager; weights are read live; the key; the store.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import torch

from loopgraph import compile_loop
from loopgraph.backend.cache_key import _key, _specs, environment
from loopgraph.backend.disk_cache import CacheStore, cache_root
from loopgraph.backend.programs import WholeLoopProgram, lift_constants
from loopgraph.verify import matches_eager

from .background import background
from .cache_worker import small_loop

ROOT = Path(__file__).resolve().parent.parent


def worker(cache: Path, steps: str, *extra: str, out: Path) -> subprocess.Popen:
    env = {**os.environ, "LOOPGRAPH_CACHE_DIR": str(cache), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(ROOT / "tests" / "cache_worker.py"), str(out), steps, *extra],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, out: Path) -> tuple[dict, dict, str]:
    stdout, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stderr[-3000:]
    report = json.loads(stdout.strip().splitlines()[-1])
    results = torch.load(out)
    for n, (compiled, eager) in results.items():
        assert matches_eager(compiled, eager), f"N={n}: the compiled loop differs from eager"
    return report, results, stderr


@background
def cache_processes(tmp):
    """This module's processes that compile (the slow ones, run in the background): two compile one loop into an
    empty cache at the same time; then a third rebuilds a corrupted copy of that cache, and a fourth, posing as
    another torch version, adds its own entry to another copy (a fifth, this torch, still finds its own)."""
    cache = tmp / "cache"
    cache.mkdir()
    outs = [tmp / f"a{k}.pt" for k in range(2)]
    processes = [worker(cache, "4", out=out) for out in outs]
    populated = [finish(p, out)[0] for p, out in zip(processes, outs)]

    corrupted = tmp / "corrupted"
    shutil.copytree(cache, corrupted)
    (entry,) = CacheStore(corrupted).entries()
    data = bytearray(entry.path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.path.write_bytes(bytes(data))
    report, _, stderr = finish(worker(corrupted, "4", out=tmp / "c.pt"), tmp / "c.pt")

    other = tmp / "other"
    shutil.copytree(cache, other)
    other_torch = finish(worker(other, "4", "--torch-version", "2.99.0", out=tmp / "d.pt"), tmp / "d.pt")[0]
    this_torch = finish(worker(other, "4", out=tmp / "d.pt"), tmp / "d.pt")[0]
    return {"populated": (cache, populated), "corrupted": (corrupted, report, stderr),
            "other": (other, other_torch, this_torch)}


@pytest.fixture(scope="module")
def populated(cache_processes):
    """The cache two processes compiled one entry into at once, and their reports."""
    return cache_processes["populated"]


def test_two_processes_compiling_one_entry_at_once_leave_one_whole_entry(populated):
    cache, reports = populated
    assert [r["compiles"] + r["loaded"] for r in reports] == [1, 1]
    assert sum(r["compiles"] for r in reports) >= 1
    store = CacheStore(cache)
    (entry,) = store.entries()
    assert store.get(entry.key, environment(torch.device("cpu"))) is not None  # checksum and versions hold


def test_a_new_process_loads_the_loop_and_compiles_nothing_for_other_n_and_other_weights(populated, tmp_path):
    cache, _ = populated
    out = tmp_path / "b.pt"
    report, results, _ = finish(worker(cache, "4,7", "--seed", "1", out=out), out)
    assert report["inductor_graphs"] == 0 and report["cpp_builds"] == 0  # no Inductor compilation, no C++ build
    assert report["exports"] == 0 and report["dynamo_graphs"] == 0
    assert report["compiles"] == 0 and report["loaded"] >= 1
    assert report["origin"].startswith("loaded from " + str(cache))
    assert "loaded from" in report["explain"]
    assert set(results) == {4, 7}


def test_a_corrupted_entry_is_rebuilt_with_a_warning(cache_processes):
    cache, report, stderr = cache_processes["corrupted"]
    assert "does not match its checksum" in stderr
    assert report["compiles"] == 1 and report["loaded"] == 0 and report["inductor_graphs"] >= 1
    (rebuilt,) = CacheStore(cache).entries()
    assert CacheStore(cache).get(rebuilt.key, environment(torch.device("cpu"))) is not None


def test_another_torch_version_misses_and_leaves_the_entry_of_this_one(cache_processes):
    cache, other_torch, this_torch = cache_processes["other"]
    assert other_torch["compiles"] == 1 and other_torch["loaded"] == 0 and other_torch["inductor_graphs"] >= 1
    assert sorted(e.meta["torch"] for e in CacheStore(cache).entries()) == sorted(["2.99.0", torch.__version__])
    assert this_torch["compiles"] == 0 and this_torch["loaded"] == 1  # this torch still finds its own


def traced_program():
    """The small loop's program from one traced call (eager backend: nothing compiled), its inputs, its plan."""
    setup = small_loop(4)
    fast = compile_loop(setup.wrapper, backend="eager")
    state = setup.new_state()
    inputs = dict(state.values)
    fast(setup.components, state)
    return fast.last_plan.program, inputs, fast.last_plan


@pytest.fixture
def lowerings(monkeypatch):
    """Inductor graph lowerings in this process (any Inductor compilation makes one), counted by wrapping torch's
    ``GraphLowering``, independently of loopgraph's stats: ``lowerings()`` is the count so far."""
    import torch._inductor.graph as inductor_graph

    count, original = [0], inductor_graph.GraphLowering.__init__

    def counting(self, *args, **kwargs):
        count[0] += 1
        original(self, *args, **kwargs)

    monkeypatch.setattr(inductor_graph.GraphLowering, "__init__", counting)
    return lambda: count[0]


# -- in process: each program through the cache equals eager ---------------------------------------------------
def _compiled(setup, cache, **options):
    fast = compile_loop(setup.wrapper, cache=cache, **options)
    fast(setup.components, setup.new_state())  # traces; the package is built (and checked) here
    return fast


def test_whole_loop_with_counter_noise_equals_eager_through_the_cache(tmp_path, lowerings):
    import dataclasses

    setup = small_loop(6, preset="dit-ddim")
    scheduler = setup.components.scheduler
    scheduler.config = dataclasses.replace(scheduler.config, eta=1.0)  # stochastic: draws noise every step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = _compiled(setup, tmp_path, rng="counter")
    noise = [str(w.message) for w in caught if "LeafSpec" in str(w.message)]
    assert not noise, noise  # torch's deprecation inside its own AOTInductor path: not the user's to see
    plan = fast.last_plan
    assert len(plan.runs) == 2 and plan.seeds and fast.stats.compiles == 1
    (entry,) = CacheStore(tmp_path).entries()  # what tells it apart from another entry of this loop
    assert entry.meta["steps"] == "any N >= 2" and entry.meta["options"] == {}
    assert len(entry.meta["code"]) == 12 and len(entry.meta["inputs"]) == 12
    assert "freezing" in entry.meta["inductor_settings"] and "compile_threads" not in entry.meta["inductor_settings"]
    assert lowerings() >= 1
    built = lowerings()
    assert plan.code[0].startswith("compiled in") and "stored as" in fast.explain()
    traced = plan.executable.execute({**setup.new_state().values, **plan.traced_seeds})
    assert matches_eager(traced[plan.state_slots.index("latents")], plan.executable.trace.final_value("latents"))
    # a second compiled loop in this process loads the package: compiles nothing
    again = compile_loop(setup.wrapper, cache=tmp_path, rng="counter")
    again(setup.components, setup.new_state())
    assert again.stats.loaded == 1 and again.stats.compiles == 0 and again.last_plan.code[0].startswith("loaded")
    assert lowerings() == built


def test_in_place_weight_updates_are_read_by_the_loaded_loop(populated, tmp_path, lowerings):
    cache = tmp_path / "cache"
    shutil.copytree(populated[0], cache)
    setup = small_loop(4)
    fast = compile_loop(setup.wrapper, cache=cache)
    fast(setup.components, setup.new_state())
    assert fast.stats.loaded == 1 and fast.stats.compiles == 0  # the entry another process stored
    with torch.no_grad():
        for p in setup.components.denoiser.parameters():
            p.mul_(1.05)  # a LoRA merge, a fine-tuning step: in place, same tensors
    expected = setup.run()
    fast(setup.components, setup.new_state())  # the guard saw the weights change: one traced call
    _, state = fast(setup.components, setup.new_state())
    assert fast.stats.compiled_calls == 1 and fast.stats.compiles == 0 and fast.stats.loaded == 1  # no new code
    assert lowerings() == 0  # Inductor never ran in this test
    assert matches_eager(state.get("latents"), expected)


def test_eager_segments_and_cuda_graph_steps_go_through_the_cache_and_equal_eager(tmp_path):
    from tests.helpers import RescaleLatents
    from loopgraph.backend.compiler import Backend
    from loopgraph.backend.lower import run_step
    from loopgraph.config import CompileConfig
    from loopgraph.zoo.loops import DenoiseLoop

    class RescaleLoop(DenoiseLoop):  # a block with data-dependent Python: eager between compiled segments
        block_classes = [*DenoiseLoop.block_classes, RescaleLatents]
        block_names = [*DenoiseLoop.block_names, "rescale"]

    setup = small_loop(6)
    setup.wrapper = RescaleLoop()
    setup.wrapper.set_progress_bar_config(disable=True)
    RescaleLatents.threshold = 1.0
    fast = compile_loop(setup.wrapper, cache=tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "block 'rescale' runs eagerly": the point of this loop
        fast(setup.components, setup.new_state())
    assert fast.last_plan.kind == "eager segments"
    assert fast.last_plan.code and all(c.startswith("compiled in") for c in fast.last_plan.code)
    _, state = fast(setup.components, setup.new_state())
    assert matches_eager(state.get("latents"), setup.run())

    # the CUDA graph's step (backend.step: one step at a device counter), run on CPU: equal to the step graph's
    program, inputs, _ = traced_program()
    variant = program.variants[-1]
    step = Backend(CompileConfig(cache=tmp_path)).step(variant.module, variant.whole_tables, torch.device("cpu"), 0)
    args = ([inputs[n] for n in program.state_slots], [inputs[n] for n in program.invariant_slots], variant.tables,
            torch.tensor(variant.steps[0]))
    got, expected = step(*args), run_step(variant.module, variant.whole_tables, *args)
    assert step.origin.startswith("compiled in") and len(got) == len(expected)
    assert all(matches_eager(g, e) for g, e in zip(got, expected))


# -- the key ------------------------------------------------------------------------------------------------------
def test_the_key_covers_versions_device_options_and_specs_and_not_n_or_weights():
    loop, inputs, plan = traced_program()
    program = WholeLoopProgram(loop)
    args = ([inputs[n] for n in loop.state_slots], [inputs[n] for n in loop.invariant_slots],
            [v.tables for v in loop.variants], plan.executable.ends, torch.zeros((), dtype=torch.int64))
    env = environment(torch.device("cpu"))

    def key(args=args, options=None, **changed):
        flat, tables, _ = program.flatten(*args)
        return _key(program, _specs(flat, tables), options or {}, {**env, **changed})

    base = key()
    assert base == key()
    for changed in ({"torch": "9.9.9"}, {"triton": "0.1"}, {"python": "3.99.0"}, {"loopgraph": "other"},
                    {"device": "cpu x86_64 DEFAULT flags:0"}, {"inductor_config": "freezing"}):
        assert key(**changed) != base, changed
    assert key(options={"max_autotune": True}) != base
    from torch._inductor import config as inductor_config

    with inductor_config.patch(freezing=True):  # a user's global Inductor setting
        assert environment(torch.device("cpu"))["inductor_config"] != env["inductor_config"]
    longer = [[torch.cat([t, t[:3]]) for t in vt] for vt in args[2]]  # another N: the same code
    assert key((*args[:2], longer, *args[3:])) == base
    heavier = [[c * 2 for c in vt] for vt in args[2]]
    assert key((*args[:2], heavier, *args[3:])) == base  # values are not in the key
    half = [[t.half() if t.is_floating_point() else t for t in vt] for vt in args[2]]
    if any(t.is_floating_point() for vt in args[2] for t in vt):
        assert key((*args[:2], half, *args[3:])) != base
    wide = [torch.cat([t, t], dim=-1) for t in args[0]]
    assert key((wide, *args[1:])) != base  # another latent shape
    shared = [args[1][0], args[1][0], *args[1][2:]]
    if len(args[1]) >= 2 and args[1][0].shape == args[1][1].shape:
        assert key((args[0], shared, *args[2:])) != base  # two inputs that are one tensor


def test_lifted_constants_are_inputs_one_per_tensor():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(3, 3))
            self.register_buffer("b", torch.randn(3))

        def forward(self, x):  # the weight read twice
            return torch.nn.functional.linear(torch.nn.functional.linear(x, self.w, self.b), self.w)

    gm = torch.fx.symbolic_trace(Twice())
    lifted, names = lift_constants(gm)
    assert len(names) == 2 and not list(lifted.parameters()) and not list(lifted.buffers())
    x = torch.randn(2, 3)
    assert torch.equal(lifted(*[getattr(gm, n) for n in names], x), gm(x))


# -- the store ----------------------------------------------------------------------------------------------------
def _put(store, key, payload=b"x" * 100, **meta):
    return store.put(key, lambda path: path.write_bytes(payload), {"torch": "1", **meta})


def test_store_round_trip_checksum_foreign_entry_and_listing(tmp_path):
    store = CacheStore(tmp_path)
    path, meta = _put(store, "k1")
    assert store.get("k1", {"torch": "1"})[0] == path and meta["bytes"] == 100
    assert [e.key for e in store.entries()] == ["k1"]
    with pytest.warns(UserWarning, match="built with torch='1', this process has '2'"):
        assert store.get("k1", {"torch": "2"}) is None  # foreign: removed
    assert store.entries() == []
    path, _ = _put(store, "k2")
    path.write_bytes(b"y" * 100)
    with pytest.warns(UserWarning, match="does not match its checksum"):
        assert store.get("k2", {"torch": "1"}) is None
    (tmp_path / "k3.json").write_text("{not json")
    with pytest.warns(UserWarning, match="metadata is unreadable"):
        assert store.get("k3", {}) is None
    assert store.get("missing", {}) is None


def test_store_keeps_its_size_bound_least_recently_used_out(tmp_path):
    store = CacheStore(tmp_path, max_bytes=250)
    for k in ("a", "b"):
        _put(store, k)
        time.sleep(0.02)
    store.get("a", {})  # used: b is now the least recently used
    time.sleep(0.02)
    _put(store, "c")
    assert sorted(e.key for e in store.entries()) == ["a", "c"]
    big = CacheStore(tmp_path, max_bytes=10)
    _put(big, "d", payload=b"z" * 50)  # bigger than the bound: kept alone (the entry just written stays)
    assert [e.key for e in big.entries()] == ["d"]


def test_store_writers_at_once_leave_a_whole_entry(tmp_path):
    store = CacheStore(tmp_path)
    errors = []

    def write(k):
        try:
            for _ in range(20):
                _put(store, "same", payload=bytes([k]) * 1000)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=write, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    path, meta = store.get("same", {"torch": "1"})
    assert path.read_bytes() in {bytes([k]) * 1000 for k in range(4)}
    assert not list(tmp_path.glob(".tmp-*"))


def test_where_the_cache_lives(tmp_path, monkeypatch):
    monkeypatch.setenv("LOOPGRAPH_CACHE_DIR", str(tmp_path / "env"))
    assert cache_root(True) == tmp_path / "env"
    assert cache_root(str(tmp_path / "given")) == tmp_path / "given"
    assert cache_root(False) is None
    monkeypatch.setenv("LOOPGRAPH_CACHE_DIR", "")
    assert cache_root(True) is None
    monkeypatch.delenv("LOOPGRAPH_CACHE_DIR")
    assert cache_root(True).name == "loopgraph"
    with pytest.raises(ValueError, match="cache must be"):
        compile_loop(small_loop(2).wrapper, cache=3)


def test_cache_false_compiles_in_process_and_says_so():
    setup = small_loop(2)
    fast = compile_loop(setup.wrapper, cache="/nonexistent/never-written", backend="eager")
    fast(setup.components, setup.new_state())  # debugging backends are not stored
    assert not Path("/nonexistent/never-written").exists()
    assert "compiled in this process" in fast.explain()


def test_cache_command_lists_and_clears(tmp_path, capsys):
    from loopgraph.__main__ import main

    store = CacheStore(tmp_path)
    _put(store, "k1", what="DenoiseLoop: whole loop")
    assert main(["cache", "list", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "k1" in out and "DenoiseLoop: whole loop" in out and "1 entr" in out
    assert main(["cache", "clear", "--dir", str(tmp_path)]) == 0
    assert "removed 1" in capsys.readouterr().out
    assert store.entries() == []


def test_cache_list_says_what_tells_two_entries_of_one_loop_apart(tmp_path):
    from loopgraph.backend.disk_cache import listing

    store = CacheStore(tmp_path)
    common = dict(what="DenoiseLoop: whole loop: 2 step graph(s)", steps="any N >= 2", code="c0ffee", inputs="i1",
                  options={})
    _put(store, "k1", **common, inductor_settings={"freezing": "False", "cpp.simdlen": "None"})
    _put(store, "k2", **common, inductor_settings={"freezing": "True", "cpp.simdlen": "None"})
    _put(store, "k3", **{**common, "inputs": "i2", "options": {"mode": "'max-autotune'"}},
         inductor_settings={"freezing": "False", "cpp.simdlen": "None"})
    text = "\n".join(listing(store.entries()))
    assert text.count("for any N >= 2") == 3 and "(mode='max-autotune')" in text
    assert re.search(r"Inductor settings \(freezing: (True vs False|False vs True)\)", text), text
    assert "input shapes, dtypes or strides, options" in text
    _put(store, "k4", what="another loop")
    assert "nothing recorded" not in text and len(listing(store.entries())) == len(text.splitlines()) + 1
    from loopgraph.__main__ import main

    assert main(["cache", "list", "--dir", str(tmp_path)]) == 0  # the command prints the listing


def test_the_key_ignores_inductor_settings_that_do_not_change_the_code():
    """``compile_threads`` follows the CPU affinity: two processes of one machine compiled one loop twice.
    (Inductor's settings are changed with its own ``patch``: pytest's monkeypatch deletes them on undo.)"""
    from torch._inductor import config as inductor_config

    before = environment(torch.device("cpu"))["inductor_config"]
    with inductor_config.patch(compile_threads=inductor_config.compile_threads + 3):
        assert environment(torch.device("cpu"))["inductor_config"] == before
    with inductor_config.patch(freezing=not inductor_config.freezing):
        assert environment(torch.device("cpu"))["inductor_config"] != before  # a setting that changes the code
    assert environment(torch.device("cpu"))["inductor_config"] == before
