"""Fused guidance + scheduler Triton kernels against their torch references, and the references against the zoo.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

from dataclasses import dataclass
from typing import Callable

import pytest
import torch

import loopgraph.kernels._common as common
from loopgraph.kernels._common import BLOCK_SIZE
from loopgraph.kernels.cfg_ddim import cfg_ddim, cfg_ddim_reference
from loopgraph.kernels.cfg_euler import cfg_euler, cfg_euler_reference
from loopgraph.kernels.cfg_flow_euler import cfg_flow_euler, cfg_flow_euler_reference
from loopgraph.zoo.guidance import ClassifierFreeGuidance
from loopgraph.zoo.schedulers import build_scheduler

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
STEPS = 10
# one output-dtype rounding apart at most (fused multiply-adds on a GPU may round the float32 math differently)
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
             torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
SHAPES = [(1,), (7,), (1000,), (BLOCK_SIZE + 1,), (4, 3, 17, 19)]


@dataclass(frozen=True)
class Family:
    name: str
    kernel: Callable
    reference: Callable
    tables: tuple[str, ...]   # coefficient tables after the guidance scale, in argument order


FAMILIES = [
    Family("cfg_flow_euler", cfg_flow_euler, cfg_flow_euler_reference, ("dt",)),
    Family("cfg_euler", cfg_euler, cfg_euler_reference, ("sigma", "dt")),
    Family("cfg_ddim", cfg_ddim, cfg_ddim_reference, ("sqrt_beta", "sqrt_alpha", "sqrt_alpha_prev", "dir_coef")),
]


def make_args(family: Family, shape, dtype, seed=0, per_step_scale=True):
    """latents, uncond, cond and the tables: coefficients in [0.5, 2) so no division blows rounding up."""
    gen = torch.Generator().manual_seed(seed)
    x, uncond, cond = (torch.randn(shape, generator=gen).to(DEVICE, dtype) for _ in range(3))
    scale = (torch.rand(STEPS if per_step_scale else 1, generator=gen, dtype=torch.float64) * 6 + 1).to(DEVICE)
    tables = [(torch.rand(STEPS, generator=gen) * 1.5 + 0.5).to(DEVICE) for _ in family.tables]
    return [x, uncond, cond, scale, *tables]


def step(i: int) -> torch.Tensor:
    return torch.tensor(i, dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_kernel_matches_reference(family, shape, dtype):
    args = make_args(family, shape, dtype, per_step_scale=len(shape) % 2 == 0)
    for i in (0, 3, STEPS - 1):
        out = family.kernel(*args, step(i))
        expected = family.reference(*args, step(i))
        assert out.dtype == dtype and out.shape == torch.Size(shape)
        assert_matches_reference(out, expected)


def assert_matches_reference(out, expected):
    tolerance = TOLERANCE[out.dtype]
    if out.dtype == torch.bfloat16 and common.INTERPRETED:
        # Triton's interpreter truncates float32 -> bfloat16 where a GPU rounds to nearest even: each rounding of
        # the guidance combine may be one ulp off, then scaled by the update. Allow a few ulps of the largest value.
        tolerance = dict(tolerance, atol=4 * 2**-7 * expected.abs().max().item())
    torch.testing.assert_close(out, expected, **tolerance)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_kernel_reads_the_step_counter_at_launch(family):
    args = make_args(family, (4, 3, 17, 19), torch.float32)
    counter = step(0)
    rows = []
    for i in range(3):
        counter.fill_(i)  # the same tensor, a new value: nothing about the step is baked into the call
        rows.append(family.kernel(*args, counter))
    for i, out in enumerate(rows):
        torch.testing.assert_close(out, family.reference(*args, step(i)), **TOLERANCE[torch.float32])
    assert not torch.equal(rows[0], rows[1])


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_kernel_out_in_place_and_noncontiguous_inputs(family):
    x, uncond, cond, *tables = make_args(family, (6, 40), torch.float16)
    expected = family.reference(x, uncond, cond, *tables, step(5))
    cond_view = cond.t().contiguous().t()  # same values, transposed strides
    assert not cond_view.is_contiguous()
    out = family.kernel(x, uncond, cond_view, *tables, step(5), out=x)
    assert out is x
    torch.testing.assert_close(x, expected, **TOLERANCE[torch.float16])


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.name)
def test_kernel_one_row_table_is_shared_by_all_steps(family):
    x, uncond, cond, scale, *tables = make_args(family, (100,), torch.float32)
    shared = [t[:1] for t in tables]
    repeated = [t[:1].expand(STEPS).contiguous() for t in tables]
    for i in (0, STEPS - 1):
        torch.testing.assert_close(family.kernel(x, uncond, cond, scale[:1], *shared, step(i)),
                                   family.kernel(x, uncond, cond, scale[:1].expand(STEPS).contiguous(), *repeated,
                                                 step(i)), rtol=0, atol=0)


def _bad_calls():
    """(case id, how to break the arguments of cfg_euler, error type, message fragment)."""
    def edit(index, value):
        return lambda args: args[:index] + [value(args)] + args[index + 1:]

    return [
        ("shape", edit(2, lambda a: a[2][:2]), ValueError, "pred_cond must have the latents' shape"),
        ("dtype", edit(1, lambda a: a[1].half()), ValueError, "pred_uncond must have the latents' shape and dtype"),
        ("float64", lambda a: [t.double() for t in a[:3]] + a[3:], TypeError, "float32, float16 or bfloat16"),
        ("table_2d", edit(4, lambda a: a[4].reshape(2, 5)), ValueError, "table 'sigma' must be a 1-D floating"),
        ("table_int", edit(5, lambda a: a[5].long()), ValueError, "table 'dt' must be a 1-D floating"),
        ("step_float", edit(6, lambda a: torch.tensor(1.0, device=DEVICE)), ValueError,
         "step must be a one-element int64 tensor"),
        ("step_two", edit(6, lambda a: torch.tensor([1, 2], device=DEVICE)), ValueError,
         "step must be a one-element int64"),
        ("step_int", edit(6, lambda a: 1), TypeError, "step must be a torch.Tensor"),
        ("device", edit(6, lambda a: torch.zeros((), dtype=torch.int64, device="meta")), ValueError,
         "every tensor must be on the latents' device"),
    ]


@pytest.mark.parametrize("case", _bad_calls(), ids=lambda c: c[0])
def test_kernel_precondition_errors(case):
    _, edit, error, message = case
    args = make_args(FAMILIES[1], (3, 4), torch.float32) + [step(1)]
    with pytest.raises(error, match=message):
        cfg_euler(*edit(args))


def test_kernel_out_must_match_and_be_contiguous():
    args = make_args(FAMILIES[0], (3, 4), torch.float32) + [step(1)]
    with pytest.raises(ValueError, match="out must match latents"):
        cfg_flow_euler(*args, out=torch.empty(3, 4, dtype=torch.float16, device=DEVICE))
    with pytest.raises(ValueError, match="out must be contiguous"):
        cfg_flow_euler(*args, out=torch.empty(4, 3, device=DEVICE).t())


@pytest.mark.skipif(DEVICE.type == "cuda", reason="checks the CPU error when the kernels are not interpreted")
def test_kernel_on_cpu_without_interpreter_says_what_to_do(monkeypatch):
    monkeypatch.setattr(common, "INTERPRETED", False)
    with pytest.raises(RuntimeError, match="set TRITON_INTERPRET=1 before loopgraph.kernels is imported"):
        cfg_flow_euler(*make_args(FAMILIES[0], (3,), torch.float32), step(0))


# -- the references are the zoo's guider + scheduler step ---------------------------------------------------------
def _zoo_step(scheduler_name: str, i: int, x, uncond, cond, scale: float):
    guider = ClassifierFreeGuidance(scale)
    guider.set_state(step=i, num_inference_steps=STEPS, timestep=None)
    batches = guider.prepare_inputs({"unused": (0, 1)})
    for batch in batches:
        batch.noise_pred = cond if batch["__guidance_identifier__"] == "pred_cond" else uncond
    scheduler = build_scheduler(scheduler_name)
    scheduler.set_timesteps(STEPS)
    scheduler.set_begin_index(i)
    return scheduler, scheduler.step(guider(batches), scheduler.timesteps[i], x, return_dict=False)[0]


def _tables(scheduler_name: str, scheduler) -> list[torch.Tensor]:
    """The per-step coefficient tables of a zoo scheduler, as a compiled loop hoists them."""
    sigmas = scheduler.sigmas
    if scheduler_name == "flow_euler":
        return [sigmas[1:] - sigmas[:-1]]
    if scheduler_name == "euler":
        return [sigmas[:-1], sigmas[1:] - sigmas[:-1]]
    a = scheduler.alphas_cumprod[scheduler.timesteps]
    prev = scheduler.timesteps - scheduler.config.num_train_timesteps // STEPS
    a_prev = torch.where(prev >= 0, scheduler.alphas_cumprod[prev.clamp(min=0)], scheduler.final_alpha_cumprod)
    return [(1 - a) ** 0.5, a**0.5, a_prev**0.5, (1 - a_prev) ** 0.5]


@pytest.mark.parametrize("family, scheduler_name", list(zip(FAMILIES, ["flow_euler", "euler", "ddim"])),
                         ids=["flow_euler", "euler", "ddim"])
def test_kernel_references_are_the_zoo_guider_and_scheduler(family, scheduler_name):
    gen = torch.Generator().manual_seed(3)
    x, uncond, cond = torch.randn(3, 2, 4, 8, 8, generator=gen).unbind(0)
    for i in (0, 4, STEPS - 1):
        scheduler, expected = _zoo_step(scheduler_name, i, x, uncond, cond, 5.0)
        args = [x, uncond, cond, torch.tensor([5.0]), *_tables(scheduler_name, scheduler), torch.tensor(i)]
        torch.testing.assert_close(family.reference(*args), expected, rtol=1e-5, atol=1e-5)
        on_device = [a.to(DEVICE) for a in args]
        torch.testing.assert_close(family.kernel(*on_device).cpu(), expected, rtol=1e-5, atol=1e-5)
