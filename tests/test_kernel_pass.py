"""kernel_pass: guided updates in real traced steps become one fused kernel call (structure + numbers).

Steps are traced on the GPU when there is one; without, the kernels run in Triton's interpreter
(tests/conftest.py sets TRITON_INTERPRET=1).
"""

import operator

import pytest
import torch

from loopgraph import compile_loop
from loopgraph.config import CompileConfig
from loopgraph.passes.fused_kernels import find_guided_updates, fuse_guided_updates, fuse_loop_kernels
from loopgraph.passes.loop_plan import loop_steps, plan_loop
from loopgraph.trace.tracer import trace_loop
from loopgraph.zoo.guidance import ClassifierFreeGuidance
from loopgraph.zoo.loops import build_loop

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ARITHMETIC = {torch.Tensor.add, torch.Tensor.sub, torch.Tensor.mul, torch.Tensor.div, operator.add, operator.mul}
# float16 is the eager guider's rounding exactly; bfloat16 casts truncate in Triton's interpreter (GPUs round)
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
             torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}


def planned(preset, scheduler=None, dtype=torch.float32, guidance_rescale=0.0):
    """A 4-step loop guided on steps 0-1: variants [0] (first step), [1] (guided), [2, 3] (unguided)."""
    setup = build_loop(preset, steps=4, sample_size=8, scheduler=scheduler, dtype=dtype, guidance_window=(0.0, 0.5),
                       device=DEVICE)
    if guidance_rescale:
        setup.components.update_components(guider=ClassifierFreeGuidance(4.0, stop=0.5,
                                                                          guidance_rescale=guidance_rescale))
    trace, _ = trace_loop(setup.wrapper, setup.components, setup.new_state())
    plan = plan_loop(loop_steps(trace), set(trace.initial_slots))
    for variant in plan.variants:  # the scheduler's sigmas live on the CPU: its coefficient tables too
        variant.tables = [t.to(DEVICE) for t in variant.tables]
    return setup, plan


def count(gm, targets) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target in targets)


def kernel_calls(gm) -> list:
    return [n for n in gm.graph.nodes if getattr(n.target, "namespace", None) == "loopgraph"]


def assert_same_outputs(setup, variant, fused, dtype):
    """Every step of the variant: original step on table rows == rewritten step on whole tables + counter."""
    invariants = [setup.inputs["prompt_embeds"], setup.inputs["negative_prompt_embeds"]]
    x = setup.inputs["latents"]
    for i in variant.steps:
        (expected,) = variant.module(x, *invariants, *[t[i] for t in variant.tables])
        (got,) = fused(x, *invariants, *variant.tables, torch.tensor(i, device=DEVICE))
        assert got.dtype == expected.dtype
        torch.testing.assert_close(got, expected, **TOLERANCE[dtype])


CASES = [  # preset, scheduler, dtype, kernel, arithmetic ops replaced, casts replaced
    ("dit", None, torch.float32, "cfg_flow_euler", 5, 0),
    ("unet", None, torch.float32, "cfg_euler", 9, 0),
    ("dit-ddim", None, torch.float32, "cfg_ddim", 9, 0),
    ("unet-ddim", None, torch.float32, "cfg_ddim", 9, 0),
    ("dit", "euler", torch.float16, "cfg_euler", 9, 3),
    ("dit", None, torch.bfloat16, "cfg_flow_euler", 5, 3),
]


@pytest.mark.parametrize("preset, scheduler, dtype, kernel, ops, casts", CASES,
                         ids=[f"{c[0]}-{c[1] or 'default'}-{str(c[2])[6:]}" for c in CASES])
def test_kernel_pass_replaces_each_guided_update(preset, scheduler, dtype, kernel, ops, casts):
    setup, plan = planned(preset, scheduler, dtype)
    guided, unguided = plan.variants[:2], plan.variants[2]
    for variant in guided:
        fused, changed = fuse_guided_updates(variant.module, variant.tables, device=DEVICE)
        assert changed and fused is not variant.module
        (call,) = kernel_calls(fused)
        assert call.target is getattr(torch.ops.loopgraph, kernel).default
        assert fused.graph.output_node().args[0] == (call,)  # the kernel's result is the step's new latents
        assert count(variant.module, ARITHMETIC) - count(fused, ARITHMETIC) == ops
        assert count(variant.module, {torch.Tensor.to}) - count(fused, {torch.Tensor.to}) == casts
        placeholders = [n.target for n in fused.graph.nodes if n.op == "placeholder"]
        assert placeholders[-1] == "step" and len(placeholders) == 3 + len(variant.tables) + 1
        assert not kernel_calls(variant.module)  # the input module is left as it was
        assert_same_outputs(setup, variant, fused, dtype)
    assert fuse_guided_updates(unguided.module, unguided.tables, device=DEVICE) == (unguided.module, False)


def test_fuse_loop_kernels_returns_a_new_plan_whose_fused_variants_take_whole_tables():
    setup, plan = planned("dit")
    modules = [v.module for v in plan.variants]
    fused, calls = fuse_loop_kernels(plan, torch.device(DEVICE))
    assert calls == 2 and fused is not plan
    assert [v.whole_tables for v in fused.variants] == [True, True, False]  # step 0, guided, unguided
    assert [v.module for v in plan.variants] == modules and not any(v.whole_tables for v in plan.variants)
    assert fused.variants[2].module is modules[2]


def test_kernel_pass_leaves_guidance_rescale_alone():
    setup, plan = planned("dit", guidance_rescale=0.7)
    for variant in plan.variants:
        assert fuse_guided_updates(variant.module, variant.tables, device=DEVICE) == (variant.module, False)


def test_kernel_pass_needs_one_value_per_step_on_the_device():
    setup, plan = planned("dit")
    variant = plan.variants[1]
    assert len(find_guided_updates(variant.module, variant.tables, device=DEVICE)) == 1
    per_sample = [t.reshape(-1, 1) if t.ndim == 1 else t for t in variant.tables]  # [N, 1]: not a scalar per step
    assert find_guided_updates(variant.module, per_sample, device=DEVICE) == []
    assert find_guided_updates(variant.module, variant.tables, device="meta") == []  # tables elsewhere


def test_kernel_pass_euler_needs_one_sigma_table():
    setup, plan = planned("unet")
    variant = plan.variants[1]
    (match,) = find_guided_updates(variant.module, variant.tables, device=DEVICE)
    lifted = [n for n in variant.module.graph.nodes if n.op == "placeholder"][-len(variant.tables):]
    sigma = lifted.index(match.coefficients[0])
    tables = list(variant.tables)
    tables[sigma] = tables[sigma] * 1.5  # the multiply's sigma and the divide's sigma now differ
    assert find_guided_updates(variant.module, tables, device=DEVICE) == []


@pytest.mark.skipif(DEVICE.type == "cuda", reason="forces the kernels on a CPU loop (Triton's interpreter); on "
                    "CUDA the sigma tables stay on the CPU until the runtime keeps tables on the device")
def test_kernel_pass_in_compile_loop_matches_eager():
    setup = build_loop("dit", steps=5, sample_size=8, guidance_window=(0.0, 0.6))
    expected = setup.run()
    fast = compile_loop(setup.wrapper, backend="eager", fused_kernels=True)
    fast(setup.components, setup.new_state())
    _, state = fast(setup.components, setup.new_state())
    torch.testing.assert_close(state.get("latents"), expected, rtol=1e-5, atol=1e-5)
    assert fast.stats.compiled_calls == 1  # the second call ran the compiled loop (no fallback to eager)
    variants = fast.last_plan.variants
    assert [len(kernel_calls(v.graph)) for v in variants] == [1, 1, 0]  # step 0, guided, unguided
    assert fast.last_plan.batching[0].batched_steps == (0, 1, 2)  # on the batched denoiser call's outputs


def test_kernel_pass_is_off_on_cpu_by_default():
    assert CompileConfig().fused_kernels == "auto"
    with pytest.raises(ValueError, match="fused_kernels must be True, False or 'auto'"):
        CompileConfig(fused_kernels="yes")
    setup = build_loop("dit", steps=3, sample_size=8)
    fast = compile_loop(setup.wrapper, backend="eager", check=False)  # plans and lowers; nothing to run yet
    fast(setup.components, setup.new_state())
    assert not any(kernel_calls(v.graph) for v in fast.last_plan.variants)
