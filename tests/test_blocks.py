"""Block semantics (diffusers 0.42, reference §2.3–2.5, 2.11), each point against an explicit value."""

import io

import pytest
import torch

from loopgraph import (
    AutoPipelineBlocks,
    BlockState,
    ComponentSpec,
    ConfigSpec,
    InputParam,
    LoopSequentialPipelineBlocks,
    ModularPipelineBlocks,
    OutputParam,
    PipelineState,
    SequentialPipelineBlocks,
)

from .helpers import make_block


def state_of(**values):
    s = PipelineState()
    for k, v in values.items():
        s.set(k, v)
    return s


# -- get_block_state -----------------------------------------------------------------------------------------
def test_get_block_state_defaults_apply_when_none():
    B = make_block("B", [InputParam("a", default=5), InputParam("b", default=6), InputParam("c")])
    bs = B().get_block_state(state_of(a=None, c=1))  # a explicitly None, b missing
    assert bs.as_dict() == {"a": 5, "b": 6, "c": 1}


def test_get_block_state_missing_required_names_it():
    B = make_block("B", [InputParam("latents", required=True)])
    with pytest.raises(ValueError, match="Required input 'latents' is missing"):
        B().get_block_state(state_of())
    with pytest.raises(ValueError, match="Required input 'latents' is missing"):
        B().get_block_state(state_of(latents=None))
    R = make_block("R", [InputParam("n", required=True, default=3)])
    assert R().get_block_state(state_of()).n == 3  # a default satisfies a required input


def test_get_block_state_gathers_kwargs_type_and_skips_none():
    B = make_block("B", [InputParam(kwargs_type="fields"), InputParam("x")])
    s = PipelineState()
    s.set("p", 1, kwargs_type="fields")
    s.set("q", None, kwargs_type="fields")
    s.set("other", 2, kwargs_type="else")
    bs = B().get_block_state(s)
    assert bs.fields == {"p": 1}
    assert bs.p == 1 and not hasattr(bs, "q") and not hasattr(bs, "other")
    assert bs.x is None


def test_get_block_state_holds_references():
    t = torch.ones(2)
    B = make_block("B", [InputParam("t")])
    assert B().get_block_state(state_of(t=t)).t is t


# -- set_block_state -----------------------------------------------------------------------------------------
def test_set_block_state_outputs_modified_inputs_and_drops_scratch():
    B = make_block("B", [InputParam("x"), InputParam("y"), InputParam("z")], [OutputParam("out", kwargs_type="kw")])
    t = torch.zeros(1)
    s = state_of(x=1, y=t, z=3)
    bs = B().get_block_state(s)
    bs.out = 9
    bs.x = 2  # a new object: written back
    bs.y.add_(1)  # in place: the same object, nothing to write
    bs.scratch = "dropped"
    B().set_block_state(s, bs)
    assert s.values == {"x": 2, "y": t, "z": 3, "out": 9}
    assert s.kwargs_mapping == {"kw": ["out"]}
    assert torch.equal(t, torch.ones(1))


def test_set_block_state_missing_output_raises():
    B = make_block("B", [], [OutputParam("noise_pred")])
    with pytest.raises(ValueError, match="Intermediate output 'noise_pred' is missing in block state"):
        B().set_block_state(PipelineState(), BlockState())


def test_set_block_state_writes_back_changed_kwargs_values():
    B = make_block("B", [InputParam(kwargs_type="fields")])
    s = PipelineState()
    s.set("p", 1, kwargs_type="fields")
    s.set("q", 2, kwargs_type="fields")
    bs = B().get_block_state(s)
    bs.p = 10
    B().set_block_state(s, bs)
    assert s.values == {"p": 10, "q": 2}
    assert s.kwargs_mapping["fields"] == ["p", "q", "p"]


# -- seed-era vocabulary --------------------------------------------------------------------------------------
class SeedBlock(ModularPipelineBlocks):
    @property
    def inputs(self):
        return [InputParam("a")]

    @property
    def intermediate_inputs(self):
        return [InputParam("b", required=True), InputParam("a", description="dup")]

    @property
    def intermediate_outputs(self):
        return [OutputParam("b")]

    def __call__(self, components, block_state, i):
        block_state.b = block_state.b + block_state.a
        return components, block_state


class OnlyIntermediate(ModularPipelineBlocks):
    @property
    def intermediate_inputs(self):
        return [InputParam("m")]


class SeedWrapper(LoopSequentialPipelineBlocks):
    block_classes = [SeedBlock]
    block_names = ["seed"]

    @property
    def description(self):
        return "seed-era wrapper"

    @property
    def loop_inputs(self):
        return [InputParam("n")]

    @property
    def loop_intermediate_inputs(self):
        return [InputParam("k", required=True)]

    def __call__(self, components, state):
        bs = self.get_block_state(state)
        for i in range(bs.n * bs.k):
            components, bs = self.loop_step(components, bs, i=i)
        self.set_block_state(state, bs)
        return components, state


def test_intermediate_inputs_are_read_as_inputs():
    assert [(p.name, p.required) for p in SeedBlock().inputs] == [("a", False), ("b", True)]
    assert [p.name for p in OnlyIntermediate().inputs] == ["m"]
    w = SeedWrapper()
    assert [p.name for p in w.loop_inputs] == ["n", "k"]
    assert [p.name for p in w.inputs] == ["n", "k", "a", "b"]
    assert w.required_inputs == ["b", "k"]
    _, s = w(None, state_of(n=2, k=3, a=2, b=1))
    assert s.get("b") == 13
    with pytest.raises(ValueError, match="Required input 'k' is missing"):
        w(None, state_of(n=1, a=1, b=1))


# -- loop wrapper aggregation ---------------------------------------------------------------------------------
A = make_block("A", [InputParam("x", required=True), InputParam("shared", description="one")],
               [OutputParam("y"), OutputParam("tagged")], components=[ComponentSpec("s1"), ComponentSpec("c")],
               configs=[ConfigSpec("k1", 1)])
Bk = make_block("Bk", [InputParam("y", required=True), InputParam("z"), InputParam("shared", description="two")],
                [OutputParam("w"), OutputParam("tagged", kwargs_type="kw")], components=[ComponentSpec("c")])


class Wrap(LoopSequentialPipelineBlocks):
    block_classes = [A, Bk]
    block_names = ["a", "b"]

    @property
    def description(self):
        return "wrap"

    @property
    def loop_inputs(self):
        return [InputParam("timesteps", required=True)]

    @property
    def loop_intermediate_outputs(self):
        return [OutputParam("acc"), OutputParam("w")]

    @property
    def loop_expected_components(self):
        return [ComponentSpec("loopc"), ComponentSpec("c")]

    @property
    def loop_expected_configs(self):
        return [ConfigSpec("k2", 2)]


def test_loop_aggregate_interface():
    w = Wrap()
    # y is produced by a before b reads it; "shared" appears twice (different descriptions, full equality)
    assert [(p.name, p.description) for p in w.inputs] == [
        ("timesteps", ""), ("x", ""), ("shared", "one"), ("z", ""), ("shared", "two")]
    assert [p.required for p in w.inputs] == [True, True, False, False, False]
    assert w.required_inputs == ["timesteps", "x", "y"]
    assert w.loop_required_inputs == ["timesteps"]
    assert [(o.name, o.kwargs_type) for o in w.intermediate_outputs] == [
        ("y", None), ("tagged", "kw"), ("w", None), ("acc", None)]
    assert [o.name for o in w.outputs] == ["w", "tagged"]  # only the last sub-block's
    assert [c.name for c in w.expected_components] == ["s1", "c", "loopc"]
    assert [c.name for c in w.expected_configs] == ["k1", "k2"]


def test_loop_wrapper_description_must_be_overridden():
    class NoDesc(LoopSequentialPipelineBlocks):
        pass

    with pytest.raises(NotImplementedError, match="description"):
        NoDesc().description  # noqa: B018
    with pytest.raises(NotImplementedError, match="__call__"):
        NoDesc()(None, PipelineState())


def test_loop_step_passes_same_kwargs_to_every_block_and_shares_state():
    seen = []

    def body(tag):
        def fn(self, comps, bs, **kw):
            seen.append((tag, kw))
            bs.count = bs["count"] or 0
            bs.count += 1
            return comps, bs
        return fn

    class W(LoopSequentialPipelineBlocks):
        description = "w"

    w = W.from_blocks_dict({"one": make_block("One", fn=body("one")), "two": make_block("Two", fn=body("two"))()})
    bs = BlockState()
    _, out = w.loop_step("comps", bs, i=3, t="t3")
    assert out is bs and bs.count == 2
    assert seen == [("one", {"i": 3, "t": "t3"}), ("two", {"i": 3, "t": "t3"})]


def test_loop_sub_blocks_must_be_leaves():
    Leaf = make_block("Leaf")
    Seq = SequentialPipelineBlocks.from_blocks_dict({"leaf": Leaf})

    class W(LoopSequentialPipelineBlocks):
        description = "w"
        block_classes = [Leaf, Seq]
        block_names = ["leaf", "seq"]

    msg = r"In W, sub_blocks must be leaf blocks \(no sub_blocks\). Block 'seq' \(SequentialPipelineBlocks\)"
    with pytest.raises(ValueError, match=msg):
        W()

    class V(LoopSequentialPipelineBlocks):
        description = "v"

    with pytest.raises(ValueError, match=msg.replace("In W", "In V")):
        V.from_blocks_dict({"leaf": Leaf, "seq": Seq})  # diffusers' from_blocks_dict skips this check


def test_block_names_and_classes_length_mismatch():
    class W(LoopSequentialPipelineBlocks):
        description = "w"
        block_classes = [make_block("L")]
        block_names = []

    with pytest.raises(ValueError, match="number of block_names and block_classes"):
        W()


def test_progress_bar():
    class W(LoopSequentialPipelineBlocks):
        description = "w"

    w = W()
    out = io.StringIO()
    w.set_progress_bar_config(file=out, desc="denoise")
    with w.progress_bar(total=3) as bar:
        bar.update(3)
    assert bar.n == 3 and "denoise" in out.getvalue() and "3/3" in out.getvalue()
    assert list(w.progress_bar(iterable=[1, 2])) == [1, 2]
    with pytest.raises(ValueError, match="Either `total` or `iterable`"):
        w.progress_bar()
    w._progress_bar_config = ["bad"]
    with pytest.raises(ValueError, match="should be of type `dict`"):
        w.progress_bar(total=1)


# -- errors name the block ------------------------------------------------------------------------------------
def test_error_inside_loop_block_names_block_and_chains():
    def boom(self, comps, bs, **kw):
        raise KeyError("inner")

    class W(LoopSequentialPipelineBlocks):
        description = "w"

    w = W.from_blocks_dict({"exploder": make_block("Exploder", fn=boom)})
    with pytest.raises(KeyError, match=r"Error in block 'exploder' \(Exploder\)") as info:
        w.loop_step(None, BlockState(), i=0)
    assert isinstance(info.value.__cause__, KeyError) and info.value.__cause__.args == ("inner",)


def test_error_with_custom_constructor_keeps_original_with_note():
    class Odd(Exception):
        def __init__(self, a, b):
            super().__init__(a, b)

    def boom(self, comps, state):
        raise Odd(1, 2)

    seq = SequentialPipelineBlocks.from_blocks_dict({"odd": make_block("OddBlock", fn=boom)})
    with pytest.raises(Odd) as info:
        seq(None, PipelineState())
    assert "Error in block 'odd' (OddBlock)" in info.value.__notes__


# -- sequential -------------------------------------------------------------------------------------------------
def test_sequential_inputs_outputs_and_call():
    def first(self, comps, state):
        bs = self.get_block_state(state)
        bs.y = bs.x * 2
        self.set_block_state(state, bs)
        return comps, state

    def second(self, comps, state):
        bs = self.get_block_state(state)
        bs.w = bs.y + bs.z
        self.set_block_state(state, bs)
        return comps, state

    F = make_block("F", [InputParam("x", required=True), InputParam(kwargs_type="kw")], [OutputParam("y")], first)
    S = make_block("S", [InputParam("y"), InputParam("z", default=1), InputParam(kwargs_type="other")],
                   [OutputParam("w"), OutputParam("y", kwargs_type="kw")], second)
    seq = SequentialPipelineBlocks.from_blocks_dict({"f": F, "s": S()}, description="two steps")
    assert seq.description == "two steps"
    # by-name dedupe keeps only the first kwargs-only param (name None)
    assert [(p.name, p.kwargs_type) for p in seq.inputs] == [("x", None), (None, "kw"), ("z", None)]
    assert seq.required_inputs == ["x"]
    assert [(o.name, o.kwargs_type) for o in seq.intermediate_outputs] == [("y", "kw"), ("w", None)]
    _, state = seq(None, state_of(x=3))
    assert state.get(["y", "w"]) == {"y": 6, "w": 7}


# -- auto blocks -------------------------------------------------------------------------------------------------
def test_auto_blocks_select_by_trigger():
    def tag(value):
        def fn(self, comps, state):
            state.set("ran", value)
            return comps, state
        return fn

    class Auto(AutoPipelineBlocks):
        block_classes = [make_block("Img", [InputParam("image", required=True)], [OutputParam("ran")], tag("img")),
                         make_block("Txt", [InputParam("prompt", required=True)], [OutputParam("ran")], tag("txt"))]
        block_names = ["img2img", "text2img"]
        block_trigger_inputs = ["image", None]

    auto = Auto()
    assert auto.default_block_name == "text2img"
    assert auto(None, state_of(image=1))[1].get("ran") == "img"
    assert auto(None, state_of(image=None))[1].get("ran") == "txt"
    assert [p.name for p in auto.inputs] == ["image", "prompt"]
    assert auto.required_inputs == []  # no input is required by every branch

    class NoDefault(Auto):
        block_trigger_inputs = ["image", "mask"]

    assert NoDefault()(None, state_of())[1].get("ran") is None  # skipped

    class Bad(Auto):
        default_block_name = "x"

    with pytest.raises(ValueError, match="default_block_name"):
        Bad()
