"""BlockState slots holding a list, tuple or dict of loop tensors (z_image's ``latent_model_input``: one tensor
per image, handed to the denoiser as a list): the loop carries each tensor as a slot of its own and puts the
container back together, so the loop stays compiled. Equality with eager first."""

import collections

import pytest
import torch

from loopgraph import InputParam, PipelineState, compile_loop
from loopgraph.compile import matches_eager

from .helpers import Components, Loop, XBlock, quiet


class Split(XBlock):
    """Writes ``parts``: the latents' rows as a list (tuple, dict)."""

    kind = list

    def __call__(self, components, block_state, i: int):
        rows = block_state.x.unbind(0)
        if self.kind is dict:
            block_state.parts = {f"image{k}": row for k, row in enumerate(rows)}
        else:
            block_state.parts = self.kind(rows)
        return components, block_state


class Join(XBlock):
    """Calls the model on the list of rows and steps the latents."""

    @property
    def inputs(self):
        return [InputParam("x"), InputParam("parts")]

    def __call__(self, components, block_state, i: int):
        parts = block_state.parts
        rows = list(parts.values()) if isinstance(parts, dict) else list(parts)
        out = components.model([row.unsqueeze(0) for row in rows])
        block_state.x = block_state.x - 0.1 * torch.cat(out)
        return components, block_state


class UsesLastParts(XBlock):
    """Reads the previous step's ``parts`` before Split makes new ones: loop state inside a list."""

    def __call__(self, components, block_state, i: int):
        parts = getattr(block_state, "parts", None)
        if parts is not None:
            block_state.x = block_state.x + 0.01 * parts[0].sum()
        return components, block_state


class ListModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, rows):
        return [torch.tanh(self.lin(row)) for row in rows]


def call(loop, components, x, n=3):
    state = PipelineState()
    state.set("x", x)
    state.set("num_steps", n)
    _, state = loop(components, state)
    return state


def assert_same_state(got, want):
    assert matches_eager(got.get("x"), want.get("x"))
    parts, expected = got.get("parts"), want.get("parts")
    assert type(parts) is type(expected)
    values = list(parts.values()) if isinstance(parts, dict) else list(parts)
    wanted = list(expected.values()) if isinstance(expected, dict) else list(expected)
    assert len(values) == len(wanted) and all(matches_eager(a, b) for a, b in zip(values, wanted))
    if isinstance(parts, dict):
        assert list(parts) == list(expected)


@pytest.mark.parametrize("kind", [list, tuple, dict])
def test_a_container_of_loop_tensors_is_carried_item_by_item_and_the_loop_stays_compiled(kind):
    split = Split()
    split.kind = kind
    loop = Loop.from_blocks_dict({"split": split, "join": Join()})
    comps = Components(model=ListModel())
    x = torch.randn(2, 4)
    fast = compile_loop(loop, backend="eager")
    for n in (3, 5):
        want = call(loop, comps, x, n)
        for _ in range(2):
            assert_same_state(quiet(call, fast, comps, x, n), want)
    assert fast.stats.compiled_calls == 2 and fast.stats.eager_blocks == 0
    assert "runs as: whole loop on state buffers" in fast.explain()


def test_a_container_read_by_the_next_step_runs_as_eager_runs_it():
    loop = Loop.from_blocks_dict({"use": UsesLastParts(), "split": Split(), "join": Join()})
    comps = Components(model=ListModel())
    x = torch.randn(2, 4)
    fast = compile_loop(loop, backend="eager")
    want = call(loop, comps, x)
    for _ in range(2):
        assert_same_state(quiet(call, fast, comps, x), want)
    assert "a tensor computed in an earlier step reached this step" in fast.explain()


class SplitAs(XBlock):
    """``parts`` as a named tuple or a defaultdict: not rebuilt item by item, the loop runs eagerly."""

    kind = "namedtuple"

    def __call__(self, components, block_state, i: int):
        rows = block_state.x.unbind(0)
        if self.kind == "namedtuple":
            block_state.parts = Pair(*rows)
        else:
            block_state.parts = collections.defaultdict(list, {f"image{k}": row for k, row in enumerate(rows)})
        return components, block_state


Pair = collections.namedtuple("Pair", "first second")


class FreeingLoop(Loop):
    """Sets the scratch list to None after its loop (frees it)."""

    def __call__(self, components, state):
        bs = self.get_block_state(state)
        for i in range(bs.num_steps):
            components, bs = self.loop_step(components, bs, i=i)
        bs.parts = None
        self.set_block_state(state, bs)
        return components, state


@pytest.mark.parametrize("kind", ["namedtuple", "defaultdict"])
def test_a_container_of_another_type_runs_as_eager_runs_it(kind):
    split = SplitAs()
    split.kind = kind
    loop = Loop.from_blocks_dict({"split": split, "join": Join()})
    comps = Components(model=ListModel())
    x = torch.randn(2, 4)
    fast = compile_loop(loop, backend="eager")
    want = call(loop, comps, x)
    for _ in range(2):
        got = quiet(call, fast, comps, x)
        assert matches_eager(got.get("x"), want.get("x")) and type(got.get("parts")) is type(want.get("parts"))


def test_a_container_slot_the_wrapper_empties_after_its_loop_is_left_as_eager_leaves_it():
    loop = FreeingLoop.from_blocks_dict({"split": Split(), "join": Join()})
    comps = Components(model=ListModel())
    x = torch.randn(2, 4)
    fast = compile_loop(loop, backend="eager")
    want = call(loop, comps, x)
    for _ in range(2):
        got = quiet(call, fast, comps, x)
        assert matches_eager(got.get("x"), want.get("x")) and got.get("parts") is None
