"""LoRA adapters (peft) changed between compiled calls: added after the first call, reweighted, disabled, enabled.

Every call equals the eager loop's. What each change costs is asserted too (and documented in
docs/how-compile-loop-works.md): adding an adapter changes the model's structure (a re-plan and a new
compilation); a new adapter weight changes a float the step multiplies by (a re-plan; the second distinct
weight compiles once more, every later one only re-plans); disabling and enabling switch between structures
already compiled (a re-plan each, no compilation).
"""

import warnings

import pytest
import torch

from loopgraph import compile_loop
from loopgraph.compile import matches_eager
from loopgraph.zoo.loops import build_loop

peft = pytest.importorskip("peft", reason="LoRA tests need peft (pip install loopgraph[test])")


def lora_layers(model):
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def quiet_call(fast, setup):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, state = fast(setup.components, setup.new_state())
    return state.get("latents")


def test_lora_on_the_zoo_dit_added_reweighted_and_disabled_between_calls():
    from peft import LoraConfig, inject_adapter_in_model

    eager = build_loop("dit", steps=4, sample_size=8)
    compiled = build_loop("dit", steps=4, sample_size=8)
    fast = compile_loop(compiled.wrapper, backend="eager")
    costs = []

    def check(label):
        want = eager.run()
        got = quiet_call(fast, compiled)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (label, (got - want).abs().max())
        costs.append((label, fast.stats.plans, fast.stats.compiles))

    check("first")
    check("again")
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_v", "proj_out"], init_lora_weights=False)
    for setup in (eager, compiled):
        torch.manual_seed(0)
        inject_adapter_in_model(config, setup.components.denoiser, adapter_name="style")
    check("added")
    check("added again")
    for k, scale in enumerate((0.5, 0.25, 0.5)):
        for setup in (eager, compiled):
            for layer in lora_layers(setup.components.denoiser):
                layer.set_scale("style", scale)
        check(f"scale {k}")
    for enabled in (False, True):
        for setup in (eager, compiled):
            for layer in lora_layers(setup.components.denoiser):
                layer.enable_adapters(enabled)
        check(f"enabled {enabled}")
    plans = {label: p for label, p, _ in costs}
    compiles = {label: c for label, _, c in costs}
    assert plans["again"] == 1 and compiles["again"] == 1
    assert plans["added"] == 2 and compiles["added"] == 2 and plans["added again"] == 2  # structure: re-plan, compile
    # the first new weight compiles with the weight in a table; later weights re-plan once each and reuse that code
    assert [compiles[f"scale {k}"] for k in range(3)] == [3, 3, 3]
    assert [plans[f"scale {k}"] for k in range(3)] == [3, 4, 4]  # 0.5 again finds its plan
    # disabled: the structure without LoRA, compiled for the first call; enabled: the plan of the last weight
    assert compiles["enabled False"] == 3 and compiles["enabled True"] == 3
    assert plans["enabled False"] == 5 and plans["enabled True"] == 5


def test_lora_on_diffusers_sdxl_unet_with_set_adapters_and_disable():
    pytest.importorskip("diffusers")
    from peft import LoraConfig

    from loopgraph.zoo.diffusers_loops import build_diffusers_loop

    eager = build_diffusers_loop("sdxl", steps=3)
    compiled = build_diffusers_loop("sdxl", steps=3)
    fast = compile_loop(compiled.wrapper, backend="eager")

    def check(label):
        want = eager.run()
        got = quiet_call(fast, compiled)
        assert matches_eager(got, want), (label, (got - want).abs().max())

    check("first")
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                        init_lora_weights=False)
    for setup in (eager, compiled):
        torch.manual_seed(0)
        setup.components.unet.add_adapter(config, adapter_name="style")
    check("added")
    compiles_after_add = fast.stats.compiles
    for weight in (0.5, 1.5):
        for setup in (eager, compiled):
            setup.components.unet.set_adapters(["style"], weights=[weight])
        check(f"weight {weight}")
    for setup in (eager, compiled):
        setup.components.unet.disable_adapters()
    check("disabled")
    for setup in (eager, compiled):
        setup.components.unet.enable_adapters()
    check("enabled")
    check("enabled again")
    assert fast.stats.compiled_calls >= 1
    assert fast.stats.compiles <= compiles_after_add + 2  # weights: one more; disable: its own structure
