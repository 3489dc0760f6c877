"""Zoo schedulers: hand-derived tables, diffusers-style step-index state, and analytic-denoiser loops.

The analytic tests are the real proof of correctness: for data that is a single point x0 (or a
Gaussian) the ideal denoiser is known in closed form, so a correct scheduler driven by it must land
on x0 (or reproduce the data mean/std).
"""

import math

import pytest
import torch

from loopgraph.zoo.schedulers import (
    DDIMScheduler,
    EulerScheduler,
    FlowMatchEulerScheduler,
    SchedulerOutput,
    build_scheduler,
)

NAMES = ["flow_euler", "euler", "ddim"]


def _ref_alphas_cumprod() -> torch.Tensor:
    """Independent float64 reference of the SD "scaled_linear" schedule."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, dim=0)


def _toy_model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    # Any smooth function of (x, t) will do for state-machine tests.
    return torch.tanh(x) * 0.5 + t.to(torch.float32) / 1000


def _run_loop(s, model, x):
    for t in s.timesteps:
        x = s.step(model(s.scale_model_input(x, t), t), t, x, return_dict=False)[0]
    return x


# ----------------------------------------------------------------------------------------------------
# tables
# ----------------------------------------------------------------------------------------------------


def test_flow_euler_tables():
    s = FlowMatchEulerScheduler()
    s.set_timesteps(4)
    # linspace(1, 1/1000, 4) = 1, 0.667, 0.334, 0.001
    torch.testing.assert_close(s.timesteps, torch.tensor([1000.0, 667.0, 334.0, 1.0]))
    torch.testing.assert_close(s.sigmas, torch.tensor([1.0, 0.667, 0.334, 0.001, 0.0]))
    assert s.init_noise_sigma == 1.0


def test_flow_euler_shift():
    s = FlowMatchEulerScheduler(shift=3.0)
    s.set_timesteps(2)
    # shift*s / (1 + (shift-1)*s): 1 -> 1, 0.001 -> 0.003 / 1.002
    sig = 0.003 / 1.002
    torch.testing.assert_close(s.sigmas, torch.tensor([1.0, sig, 0.0]))
    torch.testing.assert_close(s.timesteps, torch.tensor([1000.0, 1000 * sig]))


def test_euler_tables():
    ac = _ref_alphas_cumprod()
    ref_sigma = ((1 - ac) / ac) ** 0.5
    s = EulerScheduler()
    s.set_timesteps(4)
    # linspace spacing: linspace(0, 999, 4) reversed
    torch.testing.assert_close(s.timesteps, torch.tensor([999.0, 666.0, 333.0, 0.0]))
    expected = torch.cat([ref_sigma[[999, 666, 333, 0]], torch.zeros(1, dtype=torch.float64)]).float()
    torch.testing.assert_close(s.sigmas, expected, rtol=1e-4, atol=1e-6)
    # Well-known Stable Diffusion values.
    assert s.sigmas[0].item() == pytest.approx(14.6146, abs=1e-3)
    assert s.sigmas[3].item() == pytest.approx(0.02916, abs=1e-4)
    assert s.init_noise_sigma == pytest.approx((s.sigmas[0].item() ** 2 + 1) ** 0.5)

    # Odd N puts a timestep between two integers: sigma is linearly interpolated.
    s.set_timesteps(3)
    torch.testing.assert_close(s.timesteps, torch.tensor([999.0, 499.5, 0.0]))
    mid = 0.5 * (ref_sigma[499] + ref_sigma[500])
    assert s.sigmas[1].item() == pytest.approx(mid.item(), rel=1e-4)


@pytest.mark.parametrize(
    "spacing, expected", [("leading", [750.0, 500.0, 250.0, 0.0]), ("trailing", [999.0, 749.0, 499.0, 249.0])]
)
def test_euler_other_spacings(spacing, expected):
    s = EulerScheduler(timestep_spacing=spacing)
    s.set_timesteps(4)
    torch.testing.assert_close(s.timesteps, torch.tensor(expected))


def test_ddim_tables():
    ac = _ref_alphas_cumprod()
    s = DDIMScheduler()
    s.set_timesteps(4)
    assert s.timesteps.dtype == torch.int64
    assert s.timesteps.tolist() == [750, 500, 250, 0]  # "leading": step_ratio = 1000 // 4
    a = ac[[750, 500, 250, 0]]
    expected = torch.cat([((1 - a) / a) ** 0.5, torch.zeros(1, dtype=torch.float64)]).float()
    torch.testing.assert_close(s.sigmas, expected, rtol=1e-4, atol=1e-6)
    assert s.init_noise_sigma == 1.0
    s.set_timesteps(10)
    assert s.timesteps.tolist() == list(range(900, -1, -100))


@pytest.mark.parametrize("name", NAMES)
def test_sigmas_stay_on_cpu(name):
    s = build_scheduler(name)
    s.set_timesteps(5, device="meta")  # any non-CPU device: timesteps follow it, sigmas do not
    assert s.timesteps.device.type == "meta"
    assert s.sigmas.device.type == "cpu"
    assert s.sigmas.dtype == torch.float32
    assert s.sigmas.shape == (6,) and s.sigmas[-1].item() == 0.0
    assert s.order == 1 and s.config.num_train_timesteps == 1000


# ----------------------------------------------------------------------------------------------------
# step-index state machine
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_step_index_lifecycle(name, monkeypatch):
    s = build_scheduler(name)
    s.set_timesteps(5)
    assert s.step_index is None and s.begin_index is None
    calls = []
    lookup = s.index_for_timestep
    monkeypatch.setattr(s, "index_for_timestep", lambda t: calls.append(t) or lookup(t))

    x = torch.randn(1, 4, 8, 8)
    for i, t in enumerate(s.timesteps):
        x = s.step(_toy_model(s.scale_model_input(x, t), t), t, x, return_dict=False)[0]
        assert s.step_index == i + 1
    assert len(calls) == 1  # only the very first call looks the timestep up
    assert s.step_index == 5


@pytest.mark.parametrize("name", NAMES)
def test_first_lookup_starts_mid_schedule(name):
    # img2img-style: start at the 3rd timestep without set_begin_index -> nonzero() lookup finds it.
    s = build_scheduler(name)
    s.set_timesteps(5)
    x = torch.randn(1, 4, 8, 8)
    s.scale_model_input(x, s.timesteps[2])
    assert s.step_index == 2


def test_index_for_timestep_prefers_second_duplicate():
    s = FlowMatchEulerScheduler()
    s.set_timesteps(4)
    s.timesteps = torch.tensor([3.0, 2.0, 2.0, 1.0])
    assert s.index_for_timestep(torch.tensor(2.0)) == 2
    assert s.index_for_timestep(torch.tensor(3.0)) == 0
    with pytest.raises(ValueError, match="not one of the scheduler's timesteps"):
        s.index_for_timestep(torch.tensor(7.0))


@pytest.mark.parametrize("name", NAMES)
def test_begin_index_path_matches_lookup_path(name, monkeypatch):
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    a = build_scheduler(name)
    a.set_timesteps(6)
    ref = _run_loop(a, _toy_model, x0)

    b = build_scheduler(name)
    b.set_timesteps(6)
    b.set_begin_index(0)
    monkeypatch.setattr(b, "index_for_timestep", lambda t: pytest.fail("lookup used despite begin_index"))
    assert b.begin_index == 0
    out = _run_loop(b, _toy_model, x0)
    assert torch.equal(out, ref)
    assert b.step_index == 6


@pytest.mark.parametrize("name", NAMES)
def test_stepping_past_end_raises_and_set_timesteps_resets(name):
    s = build_scheduler(name)
    s.set_timesteps(3)
    s.set_begin_index(0)
    x = torch.randn(1, 4, 8, 8)
    first = _run_loop(s, _toy_model, x)
    t = s.timesteps[0]
    with pytest.raises(ValueError, match="call set_timesteps before running the loop again"):
        s.step(_toy_model(x, t), t, x)

    s.set_timesteps(3)
    assert s.step_index is None and s.begin_index is None
    assert torch.equal(_run_loop(s, _toy_model, x), first)


@pytest.mark.parametrize("name", NAMES)
def test_misuse_raises_value_error(name):
    s = build_scheduler(name)
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="call set_timesteps"):
        s.step(x, torch.tensor(0), x)
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(1001)
    with pytest.raises(ValueError, match="begin_index"):
        s.set_begin_index(-1)


@pytest.mark.parametrize("name", NAMES)
def test_step_output_forms_and_dtype(name):
    s = build_scheduler(name)
    s.set_timesteps(2)
    x = torch.randn(1, 4, 8, 8)
    t = s.timesteps[0]
    out = s.step(_toy_model(x, t).bfloat16(), t, x)
    assert isinstance(out, SchedulerOutput)
    assert out.prev_sample.dtype == torch.bfloat16  # computed in float32, returned in model dtype
    t = s.timesteps[1]
    (prev,) = s.step(_toy_model(x, t), t, x, return_dict=False)
    assert prev.dtype == torch.float32


def test_build_scheduler_names_and_config_validation():
    assert isinstance(build_scheduler("flow_euler", shift=3.0), FlowMatchEulerScheduler)
    assert build_scheduler("ddim", eta=0.5).config.eta == 0.5
    with pytest.raises(ValueError, match=r"unknown scheduler name 'pndm'.*'ddim'.*'euler'.*'flow_euler'"):
        build_scheduler("pndm")
    with pytest.raises(ValueError, match="shift"):
        build_scheduler("flow_euler", shift=0.0)
    with pytest.raises(ValueError, match="beta_schedule"):
        build_scheduler("euler", beta_schedule="cosine")
    with pytest.raises(ValueError, match="timestep_spacing"):
        build_scheduler("euler", timestep_spacing="karras")
    with pytest.raises(ValueError, match="eta"):
        build_scheduler("ddim", eta=-1.0)


def test_add_noise_forward_processes():
    ac = _ref_alphas_cumprod()
    x0 = torch.full((2, 1, 2, 2), 2.0)
    noise = torch.ones(2, 1, 2, 2)

    flow = FlowMatchEulerScheduler()
    out = flow.add_noise(x0, noise, torch.tensor([250.0, 1000.0]))  # per-sample sigma 0.25, 1.0
    torch.testing.assert_close(out[0], torch.full((1, 2, 2), 0.75 * 2 + 0.25))
    torch.testing.assert_close(out[1], torch.full((1, 2, 2), 1.0))

    euler = EulerScheduler()
    sigma = ((1 - ac[500]) / ac[500]).sqrt().item()
    torch.testing.assert_close(euler.add_noise(x0, noise, torch.tensor(500.0)), torch.full_like(x0, 2 + sigma))

    ddim = DDIMScheduler()
    a = ac[500].item()
    expected = torch.full_like(x0, math.sqrt(a) * 2 + math.sqrt(1 - a))
    torch.testing.assert_close(ddim.add_noise(x0, noise, torch.tensor(500)), expected)


def test_ddim_eta_uses_generator():
    def run(eta, seed):
        s = DDIMScheduler(eta=eta)
        s.set_timesteps(4)
        x = torch.ones(1, 4, 4, 4)
        g = torch.Generator().manual_seed(seed)
        for t in s.timesteps:
            x = s.step(_toy_model(x, t), t, x, return_dict=False, generator=g)[0]
        return x

    assert torch.equal(run(1.0, 0), run(1.0, 0))
    assert not torch.allclose(run(1.0, 0), run(1.0, 1))
    assert not torch.allclose(run(1.0, 0), run(0.0, 0))


# ----------------------------------------------------------------------------------------------------
# analytic denoisers
# ----------------------------------------------------------------------------------------------------


def _point_denoiser(name, s, x0):
    """Ideal model output for data = the single point x0 (sees scale_model_input's output)."""
    ac = _ref_alphas_cumprod().float()

    def model(x_in, t):
        if name == "flow_euler":
            sigma = t / 1000  # x_t = (1 - sigma) x0 + sigma n  ->  v = n - x0 = (x_t - x0) / sigma
            return (x_in - x0) / sigma
        if name == "euler":
            sigma = s.sigmas[s.step_index]  # x = x0 + sigma n; the model saw x / sqrt(sigma^2 + 1)
            x = x_in * (sigma**2 + 1) ** 0.5
            return (x - x0) / sigma
        a = ac[int(t)]  # ddim: x_t = sqrt(a) x0 + sqrt(1 - a) n
        return (x_in - a.sqrt() * x0) / (1 - a).sqrt()

    return model


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", [1, 4, 10, 25])
def test_point_mass_is_recovered(name, n):
    g = torch.Generator().manual_seed(n)
    x0 = 2 * torch.randn(2, 4, 8, 8, generator=g)
    s = build_scheduler(name)
    s.set_timesteps(n)
    model = _point_denoiser(name, s, x0)
    x = torch.randn(2, 4, 8, 8, generator=g) * s.init_noise_sigma
    for i, t in enumerate(s.timesteps):
        x = s.step(model(s.scale_model_input(x, t), t), t, x, return_dict=False)[0]
    assert s.step_index == n
    torch.testing.assert_close(x, x0, rtol=0, atol=1e-4)


def _gaussian_denoiser(name, s, mu, std):
    """Ideal model output for data ~ N(mu, std^2 I): posterior means are linear in x."""
    ac = _ref_alphas_cumprod().float()
    var0 = std**2

    def model(x_in, t):
        if name == "flow_euler":
            sigma = t / 1000
            a = 1 - sigma  # x_t = a x0 + sigma n
            var = a**2 * var0 + sigma**2
            r = x_in - a * mu
            return sigma / var * r - (mu + a * var0 / var * r)  # E[n | x] - E[x0 | x]
        if name == "euler":
            sigma = s.sigmas[s.step_index]
            x = x_in * (sigma**2 + 1) ** 0.5
            denoised = mu + var0 / (var0 + sigma**2) * (x - mu)  # E[x0 | x]
            return (x - denoised) / sigma
        a = ac[int(t)]
        var = a * var0 + 1 - a
        return (1 - a).sqrt() / var * (x_in - a.sqrt() * mu)  # E[n | x]

    return model


@pytest.mark.parametrize("name", NAMES)
def test_gaussian_data_statistics(name):
    # All three samplers are first order: with the ideal denoiser the final std is off by O(1/N)
    # (about -10% at N=25, -1% at N=500), so use many steps to test the scheduler, not the solver.
    mu, std = 0.7, 0.5
    g = torch.Generator().manual_seed(0)
    s = build_scheduler(name)
    s.set_timesteps(500)
    model = _gaussian_denoiser(name, s, mu, std)
    # Start from the exact marginal at the first timestep (for flow matching that is pure noise).
    data = mu + std * torch.randn(8192, 4, generator=g)
    x = s.add_noise(data, torch.randn(8192, 4, generator=g), s.timesteps[0])
    x = _run_loop(s, model, x)
    assert x.mean().item() == pytest.approx(mu, abs=0.01)
    assert x.std().item() == pytest.approx(std, abs=0.01)
