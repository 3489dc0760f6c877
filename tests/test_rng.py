"""rng="counter": noise drawn inside the compiled loop by the seed policy of loopgraph.rng.

First equality: a compiled call equals the eager loop drawing by the same policy (``rng.eager_loop``) for the
same generator state; then the generator itself (Philox against Random123's known answer and Triton's own
Philox, its distributions), what is compiled, how generators are consumed, and eager blocks under the policy.
"""

import dataclasses
import math
import warnings

import pytest
import torch

from loopgraph import InputParam, ModularPipelineBlocks, PipelineState, compile_loop
from loopgraph.bench.measure import count_python_calls
from loopgraph.rng import SEED_HIGH, counter_draw, draw_spec, eager_loop, philox4x32
from loopgraph.runtime import executables
from loopgraph.verify import matches_eager
from loopgraph.zoo.loops import build_loop

from .helpers import Loop, Scale


class Noise(ModularPipelineBlocks):
    """A stochastic update drawing from the BlockState's generator (None: the global one)."""

    @property
    def inputs(self):
        return [InputParam("x"), InputParam("generator")]

    def __call__(self, components, block_state, i: int):
        noise = torch.randn(block_state.x.shape, generator=block_state.generator, dtype=block_state.x.dtype)
        block_state.x = block_state.x * 0.9 + 0.1 * noise
        return components, block_state


class NoisePerItem(ModularPipelineBlocks):
    """diffusers' randn_tensor with a list of generators: one draw per batch item, each from its own."""

    @property
    def inputs(self):
        return [InputParam("x"), InputParam("generator")]

    def __call__(self, components, block_state, i: int):
        x = block_state.x
        noise = torch.cat([torch.randn((1, *x.shape[1:]), generator=g) for g in block_state.generator])
        block_state.x = x * 0.9 + 0.1 * noise
        return components, block_state


class Jitter(ModularPipelineBlocks):
    """Two draws in one block, with `_like` forms: uniform and normal."""

    @property
    def inputs(self):
        return [InputParam("x")]

    def __call__(self, components, block_state, i: int):
        block_state.x = block_state.x + (torch.rand_like(block_state.x) - 0.5) * torch.randn_like(block_state.x)
        return components, block_state


class ClampNoise(ModularPipelineBlocks):
    """Data-dependent Python and a draw in one block: it runs eagerly, under the policy."""

    @property
    def inputs(self):
        return [InputParam("x")]

    def __call__(self, components, block_state, i: int):
        if block_state.x.abs().max().item() > 2.0:
            block_state.x = block_state.x * 0.5
        block_state.x = block_state.x + 0.05 * torch.randn(block_state.x.shape)
        return components, block_state


class NormalNoise(ModularPipelineBlocks):
    """`torch.normal`: a random op the counter policy does not draw."""

    @property
    def inputs(self):
        return [InputParam("x")]

    def __call__(self, components, block_state, i: int):
        block_state.x = block_state.x + torch.normal(torch.zeros_like(block_state.x), 0.1)
        return components, block_state


def new_state(x, n, generator=None):
    state = PipelineState()
    state.set("x", x.clone())
    state.set("num_steps", n)
    if generator is not None:
        state.set("generator", generator)
    return state


def run(loop, x, n, seed, generator=False):
    """Seed the global RNG (or a fresh generator) and run: the final x and the generator used."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed) if generator else None
    _, state = loop(None, new_state(x, n, g))
    return state.get("x"), g


def eagerly(loop, x, n, seed, generator=False):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed) if generator else None
    _, state = eager_loop(loop, None, new_state(x, n, g))
    return state.get("x")


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# -- the compiled loop against the eager loop under the same policy ----------------------------------------------------
@pytest.mark.parametrize("generator", [False, True])
def test_counter_rng_compiles_a_stochastic_loop_whole_and_matches_the_eager_loop(generator):
    loop = Loop.from_blocks_dict({"noise": Noise, "scale": Scale, "jitter": Jitter})
    fast = compile_loop(loop, backend="eager", rng="counter")
    x = torch.linspace(-1, 1, 12).reshape(3, 4)
    results = {}
    for seed in (0, 0, 1, 2, 1):
        expected = eagerly(loop, x, 5, seed, generator)
        got, _ = run(fast, x, 5, seed, generator)
        assert matches_eager(got, expected), seed
        results.setdefault(seed, got)
        assert torch.equal(got, results[seed])  # the same generator state: the same noise
    assert not torch.allclose(results[0], results[1])  # another seed: other noise
    assert fast.stats.plans == 1 and fast.stats.compiled_calls == 4 and fast.stats.compiles == 1
    assert fast.stats.eager_blocks == 0 and fast.stats.segment_calls == 0  # nothing runs eagerly per step
    source = "the generator in input 'generator'" if generator else "the default generator of cpu"
    assert f"seed rng_seed0 drawn per call from {source}" in fast.explain()


@pytest.mark.parametrize("generator", [False, True])
def test_each_call_takes_one_draw_from_the_generator(generator):
    loop = Loop.from_blocks_dict({"noise": Noise, "jitter": Jitter})
    fast = compile_loop(loop, backend="eager", rng="counter")
    x = torch.ones(2, 3)
    for call in range(3):  # traced, then compiled
        _, g = run(fast, x, 4, seed=7, generator=generator)
        reference = torch.Generator().manual_seed(7)
        torch.randint(SEED_HIGH, (), generator=reference)  # the one seed draw of the policy
        after = g.get_state() if generator else torch.get_rng_state()
        assert torch.equal(after, reference.get_state()), call


def test_a_list_of_generators_gives_one_seed_each_from_this_calls_list():
    loop = Loop.from_blocks_dict({"noise": NoisePerItem, "scale": Scale})
    fast = compile_loop(loop, backend="eager", rng="counter")
    x = torch.zeros(2, 5)

    def state(seeds):
        return new_state(x, 3, [torch.Generator().manual_seed(s) for s in seeds])

    for seeds in ((0, 1), (0, 1), (1, 0), (2, 2)):
        expected = eager_loop(loop, None, state(seeds))[1].get("x")
        got = fast(None, state(seeds))[1].get("x")
        assert matches_eager(got, expected), seeds
        if seeds == (2, 2):  # both items drew from generators in the same state: the same noise
            assert torch.allclose(got[0], got[1])
    assert fast.stats.plans == 1 and fast.stats.compiled_calls == 3
    text = fast.explain()
    assert "rng_seed0 drawn per call from the generator in input 'generator' (item 0)" in text
    assert "rng_seed1 drawn per call from the generator in input 'generator' (item 1)" in text


def test_noise_differs_between_steps_draws_and_elements():
    loop = Loop.from_blocks_dict({"jitter": Jitter})
    fast = compile_loop(loop, backend="eager", rng="counter")
    run(fast, torch.zeros(64), 3, seed=0)
    plan = fast.last_plan
    seed = next(iter(plan.traced_seeds.values()))
    draws = [counter_draw(seed, torch.tensor((i << 32) | k), (64,), torch.float32, torch.device("cpu"), "normal")
             for i in range(3) for k in range(2)]
    assert len({tuple(d.tolist()) for d in draws}) == 6 and all(len(set(d.tolist())) == 64 for d in draws)
    tables = [t for v in plan.program.variants for t in v.tables if t.dtype == torch.int64]
    assert any(t.tolist() == [0, 1 << 32, 2 << 32] for t in tables)  # the first draw's stream, per step


def test_same_distribution_as_eager_on_a_stochastic_ddim_loop():
    """DDIM with eta=1 over 48 seeds: the final latents' mean and spread match eager's, not its values."""
    setup = build_loop("dit-ddim", steps=4, sample_size=8)
    scheduler = setup.components.scheduler
    scheduler.config = dataclasses.replace(scheduler.config, eta=1.0)
    fast = compile_loop(setup.wrapper, backend="eager", rng="counter")
    eager, counter = [], []
    for seed in range(48):
        torch.manual_seed(seed)
        eager.append(setup.run())
        torch.manual_seed(seed)
        _, state = fast(setup.components, setup.new_state())
        counter.append(state.get("latents"))
    eager, counter = torch.stack(eager), torch.stack(counter)
    assert not torch.allclose(eager, counter)  # another stream of noise
    spread_e, spread_c = eager.std(0), counter.std(0)
    assert spread_e.mean() > 0.1  # the noise matters to the result (the test can tell)
    assert abs(spread_c.mean() / spread_e.mean() - 1) < 0.1
    # per-element means agree within a few standard errors of the difference of two 48-sample means
    standard_error = (spread_e**2 / 48 + spread_c**2 / 48).sqrt()
    assert ((eager.mean(0) - counter.mean(0)).abs() / standard_error).mean() < 1.2  # ~0.8 for equal means
    assert fast.stats.segment_calls == 0 and fast.stats.eager_blocks == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_counter_rng_in_half_precision_matches_the_eager_loop(dtype):
    setup = build_loop("dit-ddim", steps=3, sample_size=8, dtype=dtype)
    scheduler = setup.components.scheduler
    scheduler.config = dataclasses.replace(scheduler.config, eta=1.0)
    # unbatched: a half GEMM over the batched guidance calls may round otherwise than two calls (CPUs differ)
    fast = compile_loop(setup.wrapper, backend="eager", rng="counter", batch_guidance=False)
    for seed in (0, 1, 0):
        torch.manual_seed(seed)
        expected = eager_loop(setup.wrapper, setup.components, setup.new_state())[1].get("latents")
        torch.manual_seed(seed)
        got = fast(setup.components, setup.new_state())[1].get("latents")
        assert got.dtype == dtype and torch.equal(got, expected), seed
    assert fast.stats.compiled_calls == 2 and fast.stats.segment_calls == 0


# -- eager blocks draw by the policy too -------------------------------------------------------------------------------
def test_an_eager_block_draws_by_the_policy_between_compiled_segments():
    loop = Loop.from_blocks_dict({"noise": Noise, "clamp": ClampNoise, "jitter": Jitter})
    fast = compile_loop(loop, backend="eager", rng="counter")
    for seed, start in ((0, 1.0), (0, 1.0), (1, 3.0), (2, 0.1)):
        x = torch.full((6,), start)
        expected = eagerly(loop, x, 4, seed)
        got, _ = quiet(run, fast, x, 4, seed)
        assert matches_eager(got, expected), (seed, start)
    assert fast.stats.eager_blocks == 1 and fast.stats.segment_calls > 0 and fast.stats.plans == 1
    assert "eager clamp" in fast.explain()


def test_a_random_op_the_policy_does_not_draw_runs_eagerly_from_torchs_generator():
    loop = Loop.from_blocks_dict({"noise": NormalNoise, "scale": Scale})
    fast = compile_loop(loop, backend="eager", rng="counter")
    with pytest.warns(UserWarning, match=r"rng='counter' draws randn, randn_like, rand and rand_like only"):
        got, _ = run(fast, torch.ones(5), 4, seed=3)
    for seed in (3, 4):
        torch.manual_seed(seed)
        expected = Loop.from_blocks_dict({"noise": NormalNoise, "scale": Scale})(None, new_state(torch.ones(5), 4))[1]
        got, _ = run(fast, torch.ones(5), 4, seed)
        assert torch.equal(got, expected.get("x"))  # eager's own draws
    assert fast.stats.eager_blocks == 1


def test_default_rng_keeps_eagers_draws_and_a_new_generator_per_call_reuses_the_plan():
    loop = Loop.from_blocks_dict({"noise": Noise, "scale": Scale})
    fast = compile_loop(loop, backend="eager")  # rng="eager"
    x = torch.ones(4)
    for seed in (0, 1, 0):
        expected, _ = run(loop, x, 3, seed, generator=True)
        got, _ = quiet(run, fast, x, 3, seed, generator=True)
        assert torch.equal(got, expected)
    assert fast.stats.plans == 1 and fast.stats.compiled_calls == 2  # a generator input is not plan structure


# -- the generator -----------------------------------------------------------------------------------------------------
def test_philox_matches_random123s_known_answer():
    zero = torch.zeros((), dtype=torch.int64)
    assert [int(v) for v in philox4x32(zero, zero, zero, zero, zero, zero)] == [
        0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


def test_philox_matches_tritons_philox_in_the_interpreter():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    @triton.jit
    def philox_kernel(counter_ptr, out_ptr, seed, n, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        words = [tl.load(counter_ptr + offsets * 4 + w, mask=mask).to(tl.uint32) for w in range(4)]
        out = tl.philox(seed, words[0], words[1], words[2], words[3])
        for w in tl.static_range(4):
            tl.store(out_ptr + offsets * 4 + w, out[w].to(tl.int64), mask=mask)

    counters = torch.randint(0, 1 << 32, (37, 4), generator=torch.Generator().manual_seed(0), dtype=torch.int64)
    counters[0], counters[1] = 0, (1 << 32) - 1
    seed = 0x299F31D0A4093822
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = torch.zeros(37, 4, dtype=torch.int64, device=device)
    philox_kernel[(1,)](counters.to(device), out, seed, 37, BLOCK=64)
    key = torch.tensor(seed)
    ours = torch.stack(philox4x32(*counters.unbind(1), key & 0xFFFFFFFF, key >> 32), 1)
    assert torch.equal(out.cpu() & 0xFFFFFFFF, ours)


def test_counter_draws_have_the_right_distribution():
    n = 1 << 18
    seed, stream = torch.tensor(12345), torch.tensor(3 << 32)
    normal = counter_draw(seed, stream, (n,), torch.float64, torch.device("cpu"), "normal")
    uniform = counter_draw(seed, stream, (n,), torch.float32, torch.device("cpu"), "uniform")
    assert normal.dtype == torch.float64 and normal.shape == (n,)
    assert abs(normal.mean()) < 4 / math.sqrt(n) and abs(normal.var() - 1) < 4 * math.sqrt(2 / n)
    assert uniform.min() >= 0 and uniform.max() < 1 and abs(uniform.mean() - 0.5) < 4 * math.sqrt(1 / 12 / n)
    # Kolmogorov-Smirnov against the exact CDFs (critical value at 0.1%: 1.95 / sqrt(n))
    grid = torch.linspace(0, 1, n + 1, dtype=torch.float64)[1:]
    normal_cdf = 0.5 * (1 + torch.erf(normal.sort().values / math.sqrt(2)))
    assert (normal_cdf - grid).abs().max() < 1.95 / math.sqrt(n)
    assert (uniform.double().sort().values - grid).abs().max() < 1.95 / math.sqrt(n)
    # neighbouring elements, the next stream and the next seed are uncorrelated
    others = [normal[1:], counter_draw(seed, stream + 1, (n,), torch.float64, torch.device("cpu"), "normal"),
              counter_draw(seed + 1, stream, (n,), torch.float64, torch.device("cpu"), "normal")]
    for other in others:
        a = normal[: other.numel()]
        assert abs(torch.corrcoef(torch.stack([a, other]))[0, 1]) < 4 / math.sqrt(n)


def test_counter_draw_under_inductor_equals_eager():
    def f(seed, stream, x):
        return x + counter_draw(seed, stream, (3, 5, 7), torch.float32, torch.device("cpu"), "normal")

    seed, stream, x = torch.tensor(987654321987), torch.tensor((5 << 32) | 2), torch.zeros(3, 5, 7)
    compiled = torch.compile(f, fullgraph=True)
    assert torch.allclose(compiled(seed, stream, x), f(seed, stream, x), atol=1e-5)


def test_draw_spec_reads_every_form_and_refuses_what_it_cannot_draw():
    x = torch.zeros(2, 3, dtype=torch.float16)
    g = torch.Generator()
    assert draw_spec("randn", (2, 3), {}).shape == (2, 3)
    assert draw_spec("randn", ((2, 3),), {"generator": g}).generator is g
    assert draw_spec("rand", (), {"size": torch.Size([4])}).shape == (4,)
    spec = draw_spec("randn_like", (x,), {"dtype": torch.float32})
    assert (spec.kind, spec.shape, spec.dtype, spec.device) == ("normal", (2, 3), torch.float32, x.device)
    assert draw_spec("rand_like", (x,), {}).kind == "uniform"
    with pytest.raises(ValueError, match="out="):
        draw_spec("randn", (2,), {"out": torch.empty(2)})


# -- Inductor: one compile, no Python per step, any N ------------------------------------------------------------------
def test_inductor_counter_rng_loop_compiles_once_and_runs_no_python_per_step(monkeypatch):
    monkeypatch.setattr(executables, "CHUNK_SECONDS", 1e9)  # one chunk per call: Python per step, not per chunk
    loop = Loop.from_blocks_dict({"noise": Noise, "jitter": Jitter})
    loop.set_progress_bar_config(disable=True)  # its text (4/4 or 12/12) is not the loop's Python
    fast = compile_loop(loop, rng="counter")
    x = torch.linspace(-1, 1, 10)
    calls = {}
    for n in (4, 12):
        for seed in (0, 1):
            expected = eagerly(loop, x, n, seed, generator=True)
            got, _ = run(fast, x, n, seed, generator=True)
            assert matches_eager(got, expected), (n, seed)
        torch.manual_seed(0)
        state = new_state(x, n, torch.Generator().manual_seed(0))
        calls[n] = count_python_calls(lambda: fast(None, state))
    assert fast.stats.compiles == 1 and fast.stats.plans == 2  # a new N re-plans but compiles nothing
    assert calls[4] == calls[12], calls
