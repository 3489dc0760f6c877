"""Loops, blocks and helpers that several test modules share (a test module imports from here, never from
another test module: tests/test_source_tree.py checks it)."""

import copy
import types
import warnings

import torch

from loopgraph import InputParam, LoopSequentialPipelineBlocks, ModularPipelineBlocks, PipelineState
from loopgraph.backend.lower import run_step
from loopgraph.compile import matches_eager


# -- the seed document's loop (Python ints, in-place tensor updates) ---------------------------------------------------
class Scale(ModularPipelineBlocks):
    @property
    def inputs(self):
        return [InputParam("x")]

    def __call__(self, components, block_state, i: int):
        block_state.x = block_state.x * (0.5 if i % 2 else 2.0)
        return components, block_state


class Loop(LoopSequentialPipelineBlocks):
    @property
    def description(self):
        return "seed loop"

    @property
    def loop_inputs(self):
        return [InputParam("num_steps")]

    def __call__(self, components, state):
        bs = self.get_block_state(state)
        for i in range(bs.num_steps):
            components, bs = self.loop_step(components, bs, i=i)
        self.set_block_state(state, bs)
        return components, state


def run_loop(loop, x, n, components=None):
    state = PipelineState()
    state.set("x", x)
    state.set("num_steps", n)
    _, state = loop(components, state)
    return state.get("x")


class ChunkScheduler:
    """A scheduler with Python state: a step index that ``set_timesteps`` resets, as diffusers' have."""

    def __init__(self):
        self.step_index = None

    def set_timesteps(self, n):
        self.step_index = 0
        return torch.linspace(1.0, 0.1, n)

    def step(self, model_output, t, sample):
        self.step_index += 1
        return (sample - 0.1 * t * model_output,)


class PrepareChunk(ModularPipelineBlocks):
    """A chunk's fresh latents (row ``k`` of ``noise``) and timesteps."""

    @property
    def inputs(self):
        return [InputParam("noise"), InputParam("num_steps")]

    def __call__(self, components, block_state, k: int):
        block_state.latents = block_state.noise[k].clone()
        block_state.timesteps = components.scheduler.set_timesteps(block_state.num_steps)
        return components, block_state


class ChunkLoop(LoopSequentialPipelineBlocks):
    """A loop over chunks (diffusers' Helios, MiniMax Music 3): ``loop_step`` gets the chunk index ``k``; a
    subclass's blocks run the steps of each chunk in a loop of their own (loopgraph/inner_loops.py)."""

    @property
    def description(self):
        return "loops over chunks; a block loops over the timesteps"

    @property
    def loop_inputs(self):
        return [InputParam("num_chunks")]

    def __call__(self, components, state):
        bs = self.get_block_state(state)
        bs.chunks = []
        for k in range(bs.num_chunks):
            components, bs = self.loop_step(components, bs, k=k)
        self.set_block_state(state, bs)
        return components, state


# -- the guards' toy loops ---------------------------------------------------------------------------------------------
class XBlock(ModularPipelineBlocks):
    """A loop block that reads the slot ``x`` (the toy loops' latents)."""

    @property
    def inputs(self):
        return [InputParam("x")]


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


class Components:
    """A components bag for the toy loops (what a ModularPipeline is to the blocks)."""

    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


def toy_call(loop, components, n=3, **inputs):
    state = PipelineState()
    for k, v in inputs.items():
        state.set(k, v)
    state.set("num_steps", n)
    _, state = loop(components, state)
    return state


class MixTwo(ModularPipelineBlocks):
    @property
    def inputs(self):
        return [InputParam("x"), InputParam("a"), InputParam("b")]

    def __call__(self, components, block_state, i: int):
        block_state.a.mul_(0.5)  # in place: seen through `b` when a and b are one tensor
        block_state.x = block_state.x + block_state.a - 2 * block_state.b
        return components, block_state


# -- blocks with data-dependent Python: run eagerly between compiled segments ------------------------------------------
class Shift(ModularPipelineBlocks):
    @property
    def inputs(self):
        return [InputParam("x")]

    def __call__(self, components, block_state, i: int):
        block_state.x = block_state.x * 1.5 + 1
        return components, block_state


class Clamp(ModularPipelineBlocks):
    sides: list[bool] = []  # which side of the branch each call took

    @property
    def inputs(self):
        return [InputParam("x")]

    def __call__(self, components, block_state, i: int):
        big = block_state.x.abs().max().item() > 4.0  # data-dependent: must never be baked
        Clamp.sides.append(big)
        if big:
            block_state.x = block_state.x * 0.5
        return components, block_state


class RescaleLatents(ModularPipelineBlocks):
    threshold = 1.0
    peaks: list[float] = []  # the value each call branched on

    @property
    def inputs(self):
        return [InputParam("latents")]

    def __call__(self, components, block_state, i, t):
        peak = block_state.latents.abs().max().item()  # data-dependent: must never be baked
        RescaleLatents.peaks.append(peak)
        if peak > RescaleLatents.threshold:
            block_state.latents = block_state.latents * 0.9
        return components, block_state


# -- a block calling the model twice per step (batched guidance) -------------------------------------------------------
class Net(torch.nn.Module):
    """A small conditional conv net: latents [B, 4, 6, 6], context [B, L, 8]."""

    def __init__(self, sum_batch: bool = False, mix_batch: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.ctx = torch.nn.Linear(8, 4)
        self.extra = torch.nn.Conv2d(4, 4, 1)
        self.skip = False
        self.sum_batch, self.mix_batch = sum_batch, mix_batch

    def forward(self, x, t, context, scale: float = 1.0):
        h = torch.nn.functional.silu(self.conv(x)) * (1 + t)
        h = h + self.ctx(context).mean(1)[:, :, None, None] * scale
        if not self.skip:  # skip-layer guidance: the model changed between the calls
            h = h + self.extra(h)
        if self.mix_batch:  # rows depend on the other rows of the batch: batching would change them
            h = h - h.mean(0, keepdim=True)
        return h.sum(0, keepdim=True) if self.sum_batch else h


class TwoCalls(ModularPipelineBlocks):
    """CFG written by hand: the block calls the model twice. ``mode`` makes the calls unbatchable in one way."""

    mode = "ok"

    @property
    def inputs(self):
        return [InputParam("x"), InputParam("cond"), InputParam("uncond")]

    def __call__(self, components, block_state, i: int):
        net, x, mode = components.net, block_state.x, self.mode
        t = torch.tensor(1.0 - i / 10)
        cond = net(x, t, block_state.cond)
        if mode == "changed":
            net.skip = True
        second = cond if mode == "chain" else x
        uncond = net(second, t, block_state.uncond, scale=0.5 if mode == "literal" else 1.0)
        net.skip = False
        block_state.x = x - 0.1 * (uncond + 3.0 * (cond - uncond))
        return components, block_state


class Noise(ModularPipelineBlocks):
    """A random op: this block runs eagerly between compiled segments (rng="eager")."""

    @property
    def inputs(self):
        return [InputParam("x")]

    def __call__(self, components, block_state, i: int):
        block_state.x = block_state.x + 0.01 * torch.randn_like(block_state.x)
        return components, block_state


def two_call_loop(mode="ok", noise=False):
    block = TwoCalls()
    block.mode = mode
    return Loop.from_blocks_dict({"denoise": block, **({"noise": Noise()} if noise else {})})


_COMPONENTS: dict[int, types.SimpleNamespace] = {}


def components(net: Net) -> types.SimpleNamespace:
    """One components object per model (a plan is guarded on the components object it was traced with)."""
    found = _COMPONENTS.get(id(net))
    if found is None or found.net is not net:
        found = _COMPONENTS[id(net)] = types.SimpleNamespace(net=net)
    return found


# -- a leaf block class from its declarations --------------------------------------------------------------------------
def make_block(name, inputs=(), outputs=(), fn=None, components=(), configs=()):
    """A leaf block class with the given declarations; ``fn(components, state_or_bs, **kw)`` is its body."""

    def call(self, components, state, **kw):
        return fn(self, components, state, **kw)

    return type(name, (ModularPipelineBlocks,), {
        "inputs": property(lambda self: list(inputs)),
        "intermediate_outputs": property(lambda self: list(outputs)),
        "expected_components": property(lambda self: list(components)),
        "expected_configs": property(lambda self: list(configs)),
        "description": property(lambda self: name),
        "__call__": call,
    })


# -- the CUDA whole-loop graph's steps, uncompiled (run on CPU) --------------------------------------------------------
def uncompiled_step(module, whole_tables):
    return lambda carried, invariants, tables, i: run_step(module, whole_tables, carried, invariants, tables, i)


# -- diffusers loops: the scheduler's and guider's Python state, compared with eager's ---------------------------------
def python_state(setup) -> dict:
    """Deep copies of the scheduler's and guider's instance attributes."""
    comps = setup.components
    return {name: copy.deepcopy(vars(getattr(comps, name))) for name in ("scheduler", "guider")
            if getattr(comps, name, None) is not None}


def assert_same(got, expected, path="state", depth=0):
    """Equal structure; tensors allclose (fp32 tolerance), numpy arrays equal, other objects attribute by attribute
    (a scheduler deep-copied per call), generators skipped, everything else ==."""
    if isinstance(expected, torch.Generator):
        return
    if isinstance(expected, torch.Tensor):
        assert isinstance(got, torch.Tensor) and got.shape == expected.shape, path
        assert matches_eager(got, expected), f"{path}: max abs diff {(got - expected).abs().max():.3g}"
    elif type(expected).__module__ == "numpy" and hasattr(expected, "shape"):
        import numpy as np
        assert np.array_equal(got, expected), path
    elif isinstance(expected, (list, tuple)):
        assert type(got) is type(expected) and len(got) == len(expected), path
        for k, (a, b) in enumerate(zip(got, expected)):
            assert_same(a, b, f"{path}[{k}]", depth)
    elif isinstance(expected, dict):
        assert got.keys() == expected.keys(), path
        for k in expected:
            assert_same(got[k], expected[k], f"{path}.{k}", depth)
    elif (hasattr(expected, "__dict__") and not isinstance(expected, (type, types.FunctionType, types.MethodType,
                                                                        torch.nn.Module)) and got is not expected):
        assert type(got) is type(expected), f"{path}: {type(got)} != {type(expected)}"
        if depth < 3:
            assert_same(vars(got), vars(expected), path, depth + 1)
    else:
        assert got == expected, f"{path}: {got!r} != {expected!r}"
