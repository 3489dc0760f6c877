"""The seed document's two examples, verbatim apart from the import line, run with ints and tensors."""

import pytest
import torch

# --- verbatim from the seed document (only the import line changed) -------------------------------------
from loopgraph.modular_pipelines import LoopSequentialPipelineBlocks, ModularPipelineBlocks, InputParam, OutputParam

class LoopWrapper(LoopSequentialPipelineBlocks):
    model_name = "test"
    @property
    def description(self):
        return "I'm a loop!!"
    @property
    def loop_inputs(self):
        return [InputParam(name="num_steps")]
    @torch.no_grad()
    def __call__(self, components, state):
        block_state = self.get_block_state(state)
        # Loop structure - can be customized to your needs
        for i in range(block_state.num_steps):
            # loop_step executes all registered blocks in sequence
            components, block_state = self.loop_step(components, block_state, i=i)
        self.set_block_state(state, block_state)
        return components, state

class LoopBlock(ModularPipelineBlocks):
    model_name = "test"
    @property
    def inputs(self):
        return [InputParam(name="x")]
    @property
    def intermediate_outputs(self):
        # outputs produced by this block
        return [OutputParam(name="x")]
    @property
    def description(self):
        return "I'm a block used inside the `LoopWrapper` class"
    def __call__(self, components, block_state, i: int):
        block_state.x += 1
        return components, block_state
# ----------------------------------------------------------------------------------------------------------

from loopgraph import PipelineState  # noqa: E402


def _run(loop, **values):
    state = PipelineState()
    for k, v in values.items():
        state.set(k, v)
    _, state = loop(None, state)
    return state


def test_first_example_single_block_class():
    loop = LoopWrapper.from_blocks_dict({"block1": LoopBlock})
    assert list(loop.sub_blocks) == ["block1"]
    assert isinstance(loop.sub_blocks["block1"], LoopBlock)
    assert _run(loop, num_steps=3, x=0).get("x") == 3


def test_second_example_instance_and_class_mixed():
    loop = LoopWrapper.from_blocks_dict({"block1": LoopBlock(), "block2": LoopBlock})
    assert [type(b) for b in loop.sub_blocks.values()] == [LoopBlock, LoopBlock]
    assert _run(loop, num_steps=4, x=10).get("x") == 18  # 4 steps x 2 blocks x (+1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.int64])
def test_examples_with_tensors(dtype):
    loop = LoopWrapper.from_blocks_dict({"block1": LoopBlock(), "block2": LoopBlock})
    x = torch.zeros(2, 3, dtype=dtype)
    state = _run(loop, num_steps=5, x=x)
    assert torch.equal(state.get("x"), torch.full((2, 3), 10, dtype=dtype))
    # `+=` on a tensor is in place: the caller's tensor was advanced and is the same object
    assert state.get("x") is x


def test_example_interface():
    loop = LoopWrapper.from_blocks_dict({"block1": LoopBlock(), "block2": LoopBlock})
    assert [p.name for p in loop.inputs] == ["num_steps", "x"]
    assert [o.name for o in loop.intermediate_outputs] == ["x"]
    assert loop.description == "I'm a loop!!"
    assert loop.model_name == "test"


def test_example_through_modular_pipeline():
    loop = LoopWrapper.from_blocks_dict({"block1": LoopBlock(), "block2": LoopBlock})
    pipe = loop.init_pipeline()
    assert pipe(num_steps=2, x=1, output="x") == 5
