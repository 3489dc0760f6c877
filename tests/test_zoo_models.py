"""Tiny zoo denoisers: shapes, seeded determinism, conditioning, config validation."""

import pytest
import torch

from loopgraph.zoo.models import DiTConfig, TinyDiT, TinyUNet, UNetConfig, build_denoiser

NAMES = ["dit", "unet"]


def _inputs(batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 16, 16, generator=g)  # [B, C, H, W]
    context = torch.randn(batch, 8, 32, generator=g)  # [B, L, text_dim]
    return x, context


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("batch", [1, 2])
def test_output_shape_and_finite(name, batch):
    model = build_denoiser(name)
    x, context = _inputs(batch)
    out = model(x, torch.tensor(500.0), context)
    assert out.shape == x.shape
    assert out.dtype == x.dtype
    assert torch.isfinite(out).all()
    # Not degenerate (no adaLN-zero style all-zero output).
    assert out.std() > 0.05


def test_build_returns_right_class_eval_and_frozen():
    dit, unet = build_denoiser("dit"), build_denoiser("unet")
    assert isinstance(dit, TinyDiT) and isinstance(dit.config, DiTConfig)
    assert isinstance(unet, TinyUNet) and isinstance(unet.config, UNetConfig)
    for model in (dit, unet):
        assert not model.training
        assert all(not p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_weights_and_outputs(name):
    a, b = build_denoiser(name, seed=3), build_denoiser(name, seed=3)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb
        assert torch.equal(pa, pb), na
    x, context = _inputs(2)
    t = torch.tensor([10.0, 900.0])
    assert torch.equal(a(x, t, context), b(x, t, context))


@pytest.mark.parametrize("name", NAMES)
def test_different_seeds_differ(name):
    a, b = build_denoiser(name, seed=0), build_denoiser(name, seed=1)
    x, context = _inputs(1)
    assert not torch.allclose(a(x, torch.tensor(500.0), context), b(x, torch.tensor(500.0), context))


def test_build_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_denoiser("dit", seed=7)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("name", NAMES)
def test_output_depends_on_x_t_and_context(name):
    model = build_denoiser(name)
    x, context = _inputs(2)
    x2, context2 = _inputs(2, seed=1)
    base = model(x, torch.tensor(500.0), context)
    assert (model(x2, torch.tensor(500.0), context) - base).abs().mean() > 1e-2
    assert (model(x, torch.tensor(100.0), context) - base).abs().mean() > 1e-2
    assert (model(x, torch.tensor(500.0), context2) - base).abs().mean() > 1e-2


@pytest.mark.parametrize("name", NAMES)
def test_scalar_t_equals_batched_t_and_int_t_works(name):
    model = build_denoiser(name)
    x, context = _inputs(2)
    scalar = model(x, torch.tensor(250.0), context)
    batched = model(x, torch.tensor([250.0, 250.0]), context)
    as_int = model(x, torch.tensor(250), context)
    torch.testing.assert_close(scalar, batched, rtol=0, atol=0)
    torch.testing.assert_close(scalar, as_int, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_per_sample_t_matches_single_sample_runs(name):
    model = build_denoiser(name)
    x, context = _inputs(2)
    t = torch.tensor([100.0, 800.0])
    both = model(x, t, context)
    for i in range(2):
        one = model(x[i : i + 1], t[i], context[i : i + 1])
        torch.testing.assert_close(both[i : i + 1], one, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_build(name):
    model = build_denoiser(name, dtype=torch.bfloat16)
    x, context = _inputs(1)
    out = model(x.bfloat16(), torch.tensor(500.0), context.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_overrides_go_into_config():
    model = build_denoiser("dit", hidden_dim=32, depth=1, num_heads=2)
    assert (model.config.hidden_dim, model.config.depth, model.config.num_heads) == (32, 1, 2)
    unet = build_denoiser("unet", channels=[16, 32])
    assert unet.config.channels == (16, 32)
    x, context = _inputs(1)
    assert model(x, torch.tensor(1.0), context).shape == x.shape
    assert unet(x, torch.tensor(1.0), context).shape == x.shape


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sample_size=15, patch_size=2), "sample_size .* divisible by patch_size"),
        (dict(hidden_dim=64, num_heads=5), "hidden_dim .* divisible by num_heads"),
        (dict(depth=0), "depth must be > 0"),
    ],
)
def test_bad_dit_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiTConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(channels=(32, 64, 128)), "exactly 2 entries"),
        (dict(channels=(30, 64)), "divisible by groups"),
        (dict(sample_size=15), "must be even"),
        (dict(attention_heads=5), "divisible by attention_heads"),
    ],
)
def test_bad_unet_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNetConfig(**kwargs)


def test_unknown_name_and_override_raise():
    with pytest.raises(ValueError, match=r"unknown denoiser name 'vae'.*'dit'.*'unet'"):
        build_denoiser("vae")
    with pytest.raises(ValueError, match="unknown DiTConfig override"):
        build_denoiser("dit", hidden=3)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        build_denoiser("dit", num_heads=3)


def test_bad_input_shapes_raise():
    model = build_denoiser("dit")
    x, context = _inputs(2)
    with pytest.raises(ValueError, match="context must have shape"):
        model(x, torch.tensor(1.0), context[..., :16])
    with pytest.raises(ValueError, match="t must be"):
        model(x, torch.tensor([1.0, 2.0, 3.0]), context)
    with pytest.raises(ValueError, match="x must have shape"):
        model(x[:, :3], torch.tensor(1.0), context)
