"""ModularPipeline: components, config, input seeding, warnings and output forms (reference §2.10)."""

import pytest
import torch

from loopgraph import ComponentSpec, ConfigSpec, InputParam, ModularPipeline, OutputParam, PipelineState
from loopgraph.modular_pipelines import ModularPipeline as MP2, SequentialPipelineBlocks
from tests.helpers import make_block


class Guider:
    def __init__(self, scale=1.0):
        self.scale = scale

    @classmethod
    def from_config(cls, config):
        return cls(**config)


def body(self, comps, state):
    bs = self.get_block_state(state)
    bs.out = (bs.a + comps.model.bias + comps.config.offset) * comps.guider.scale + len(bs.fields)
    self.set_block_state(state, bs)
    return comps, state


Block = make_block(
    "Block",
    [InputParam("a", required=True), InputParam("b", default=2), InputParam(kwargs_type="fields")],
    [OutputParam("out")],
    body,
    components=[ComponentSpec("model"),
                ComponentSpec("guider", Guider, config={"scale": 3.0}, default_creation_method="from_config")],
    configs=[ConfigSpec("offset", 10)],
)


class Model:
    bias = 1


def make_pipe():
    pipe = SequentialPipelineBlocks.from_blocks_dict({"block": Block}).init_pipeline()
    pipe.update_components(model=Model())
    return pipe


def test_same_class_from_both_import_paths():
    assert ModularPipeline is MP2


def test_components_created_and_registered():
    pipe = SequentialPipelineBlocks.from_blocks_dict({"block": Block}).init_pipeline()
    assert pipe.component_names == ["model", "guider"]
    assert pipe.model is None and pipe.null_component_names == ["model"]
    assert isinstance(pipe.guider, Guider) and pipe.guider.scale == 3.0  # from_config spec made at once
    assert pipe.config.offset == 10
    m = Model()
    pipe.update_components(model=m, offset=20)
    assert pipe.model is m and pipe.components["model"] is m and pipe.config.offset == 20
    with pytest.warns(UserWarning, match="unexpected keyword arguments \\['nope'\\]"):
        pipe.update_components(nope=1)
    assert ModularPipeline(Block(), model=m).model is m


def test_call_seeds_inputs_and_returns_output_forms():
    pipe = make_pipe()
    out = pipe(a=1, fields={"p": 1, "q": 2}, output="out")
    assert out == (1 + 1 + 10) * 3.0 + 2
    state = pipe(a=1)
    assert isinstance(state, PipelineState)
    # every declared input gets a key (None when not given), defaults filled in
    assert state.values["b"] == 2 and state.values["out"] == 36.0
    assert pipe(a=1, output=["out", "b"]) == {"out": 36.0, "b": 2}
    assert pipe(a=1, output=("out",)) == {"out": 36.0}
    with pytest.raises(ValueError, match="`output` must be"):
        pipe(a=1, output=3)


def test_call_warns_on_unexpected_input():
    with pytest.warns(UserWarning, match=r"Unexpected input 'dict_keys\(\['zzz'\]\)' provided"):
        make_pipe()(a=1, zzz=5)


def test_call_deep_copies_a_passed_state():
    pipe = make_pipe()
    s = PipelineState()
    s.set("a", torch.ones(1))
    result = pipe(state=s)
    assert "out" not in s.values and "out" in result.values
    assert result.get("a") is not s.get("a")


def test_call_missing_required_input():
    with pytest.raises(ValueError, match="Required input 'a' is missing"):
        make_pipe()()


def test_pipeline_needs_blocks():
    with pytest.raises(ValueError, match="needs `blocks`"):
        ModularPipeline()
    with pytest.raises(NotImplementedError, match="hub"):
        Block().init_pipeline("some/repo")


def test_blocks_property_is_a_copy_and_progress_config_reaches_nested_wrappers():
    from loopgraph.zoo.loops import DenoiseLoop

    outer = SequentialPipelineBlocks.from_blocks_dict(
        {"inner": SequentialPipelineBlocks.from_blocks_dict({"loop": DenoiseLoop})})
    pipe = outer.init_pipeline()
    assert pipe.blocks is not pipe._blocks
    pipe.set_progress_bar_config(disable=True)
    assert pipe._blocks.sub_blocks["inner"].sub_blocks["loop"]._progress_bar_config == {"disable": True}


def test_device_and_dtype_follow_modules():
    pipe = make_pipe()
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32
    pipe.update_components(model=torch.nn.Linear(1, 1).to(torch.float64))
    assert pipe.dtype == torch.float64
