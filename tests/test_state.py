"""PipelineState, BlockState, InputParam/OutputParam, ComponentSpec: each semantic point vs an explicit value."""

import copy

import pytest
import torch

from loopgraph import BlockState, ComponentSpec, ConfigSpec, InputParam, OutputParam, PipelineState


def test_pipeline_state_set_get_and_kwargs_mapping():
    s = PipelineState()
    s.set("a", 1, kwargs_type="kw")
    s.set("b", 2, kwargs_type="kw")
    s.set("a", 3, kwargs_type="kw")  # diffusers appends on every set
    s.set("c", None)
    assert s.values == {"a": 3, "b": 2, "c": None}
    assert s.kwargs_mapping == {"kw": ["a", "b", "a"]}
    assert s.get("a") == 3
    assert s.get("missing") is None
    assert s.get("missing", default=7) == 7
    assert s.get(["a", "missing"], default=0) == {"a": 3, "missing": 0}
    assert s.get_by_kwargs("kw") == {"a": 3, "b": 2}
    assert s.get_by_kwargs("other") == {}
    assert s.to_dict() == {"values": {"a": 3, "b": 2, "c": None}, "kwargs_mapping": {"kw": ["a", "b", "a"]}}


def test_pipeline_state_attribute_access():
    s = PipelineState()
    s.set("latents", 5)
    assert s.latents == 5
    with pytest.raises(AttributeError, match="'PipelineState' object has no attribute 'nope'"):
        s.nope  # noqa: B018


def test_pipeline_state_repr_and_deepcopy():
    s = PipelineState()
    s.set("x", torch.zeros(2, 3))
    s.set("xs", [torch.zeros(1), torch.zeros(2)])
    s.set("n", 4, kwargs_type="kw")
    text = repr(s)
    assert "x: Tensor(dtype=torch.float32, shape=(2, 3))" in text
    assert "xs: list[2] of Tensors with shapes [(1,), (2,)]" in text
    assert "n: 4" in text and "kw: ['n']" in text
    c = copy.deepcopy(s)
    assert c.values["n"] == 4 and c.values["x"] is not s.values["x"]


def test_block_state_bag_items_and_dict():
    b = BlockState(a=1, t=torch.ones(2))
    assert b.a == 1 and b["a"] == 1
    assert b["missing"] is None
    with pytest.raises(AttributeError):
        b.missing  # noqa: B018
    b["c"] = 3
    assert b.c == 3
    assert list(b.as_dict()) == ["a", "t", "c"]
    assert "c" in b and "zz" not in b


def test_block_state_equality_compares_contents():
    # diffusers' BlockState(a=1) == BlockState(b=2) is True; ours compares contents
    assert BlockState(a=1) != BlockState(b=2)
    assert BlockState(a=1) != BlockState(a=2)
    assert BlockState(a=1, b=[1, 2]) == BlockState(a=1, b=[1, 2])
    assert BlockState(t=torch.ones(3)) == BlockState(t=torch.ones(3))
    assert BlockState(t=torch.ones(3)) != BlockState(t=torch.zeros(3))
    assert BlockState(t=torch.ones(3)) != BlockState(t=torch.ones(4))
    assert BlockState(t=torch.ones(3)) != BlockState(t=torch.ones(3, dtype=torch.float64))
    assert BlockState(d={"k": torch.ones(1)}) == BlockState(d={"k": torch.ones(1)})


def test_block_state_repr():
    b = BlockState(t=torch.zeros(1, 4), ts=(torch.zeros(2),), d={"e": torch.zeros(3)}, n=2)
    text = repr(b)
    assert text.startswith("BlockState(\n")
    assert "t: Tensor(dtype=torch.float32, shape=(1, 4))" in text
    assert "ts: tuple[1] of Tensors with shapes [(2,)]" in text
    assert "d: {'e': Tensor(dtype=torch.float32, shape=(3,))}" in text
    assert "n: 2" in text


def test_input_output_param_fields_and_repr():
    p = InputParam("x", default=3, required=True)
    assert (p.name, p.type_hint, p.default, p.required, p.description, p.kwargs_type) == ("x", None, 3, True, "", None)
    assert repr(p) == "<x: required, default=3>"
    assert repr(InputParam(kwargs_type="denoiser_input_fields")) == "<*denoiser_input_fields>"
    assert InputParam("x") == InputParam("x") and InputParam("x") != InputParam("x", description="d")
    o = OutputParam("latents", type_hint=torch.Tensor)
    assert repr(o) == "<latents: Tensor>"


def test_component_spec_equality_and_create():
    class Thing:
        def __init__(self, size=1):
            self.size = size

    a = ComponentSpec("thing", Thing, config={"size": 2}, default_creation_method="from_config")
    b = ComponentSpec("thing", dict, default_creation_method="from_config")
    c = ComponentSpec("thing", Thing)  # from_pretrained: a different load id
    assert a == b and hash(a) == hash(b)  # type_hint and config are not compared
    assert a != c
    assert a.load_id == "null" and c.load_id == "null||null|null"
    made = a.create()
    assert isinstance(made, Thing) and made.size == 2 and made._diffusers_load_id == "null"
    assert a.create(size=5).size == 5
    with pytest.raises(NotImplementedError, match="does not download"):
        c.load()
    with pytest.raises(ValueError, match="default_creation_method"):
        ComponentSpec("x", default_creation_method="from_hub")


def test_config_spec():
    s = ConfigSpec("boundary_ratio", 0.875)
    assert (s.name, s.default, s.description) == ("boundary_ratio", 0.875, None)
