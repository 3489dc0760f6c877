"""A grammar of loop wrappers for differential testing: eager vs ``compile_loop``, over several calls.

A ``LoopSpec`` names the blocks of a loop (what real loop blocks do: schedulers with Python counters and CPU
tables, a history a component keeps, guidance with a window and a scale read from the guider, branches on
``i`` and on the data, in-place and view updates, containers, casts, random ops, model calls that read the
model's Python state, a block's own attributes, undeclared components (some keeping loop tensors), type checks,
``.data`` assignment (also on the caller's input), globals read in decorated methods, in a block class defined
after the first trace and in a settings module, models that mix the rows of their batch or return a dataclass) and
the wrapper around them (tensor work before or after its loop, or none). ``World`` builds one loop and its
components from a spec, deterministically, so two worlds built from one spec start equal; ``CHANGES`` are
what a user does between calls, applied to both worlds alike.

``tests/test_fuzz.py`` drives it with hypothesis.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from loopgraph import ComponentSpec, InputParam, LoopSequentialPipelineBlocks, ModularPipelineBlocks, OutputParam
from loopgraph import PipelineState

from . import fuzz_settings

SHAPE = (2, 3)


# -- components ------------------------------------------------------------------------------------------------------
class ToyScheduler:
    """A scheduler in diffusers' idiom: a CPU sigma table, a Python step index that must be reset."""

    def __init__(self):
        self.sigmas = None
        self._step_index = None
        self.num_steps = 0

    def set_timesteps(self, n: int) -> None:
        self.num_steps = n
        self.sigmas = torch.linspace(1.0, 0.0, n + 1)
        self._step_index = None

    def step(self, v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self._step_index is None:
            self._step_index = 0
        if self._step_index >= self.num_steps:
            raise IndexError("ToyScheduler: step index past the schedule; call set_timesteps first")
        dt = self.sigmas[self._step_index + 1] - self.sigmas[self._step_index]
        self._step_index += 1
        return x + dt * v


class ToyHistory:
    """Keeps loop tensors across steps (a multistep scheduler's history) and leftovers it never reads."""

    def __init__(self):
        self.previous = [None, None]
        self.count = 0
        self.stamps = [torch.tensor(-1.0), torch.tensor(-1.0)]

    def reset(self):
        self.previous, self.count = [None, None], 0


class ToyGuider:
    def __init__(self, scale: float = 3.0, start: float = 0.0, stop: float = 1.0):
        self.guidance_scale, self.start, self.stop = scale, start, stop
        self._step = None

    def guided(self, i: int, n: int) -> bool:
        return not math.isclose(self.guidance_scale, 1.0) and int(self.start * n) <= i < int(self.stop * n)


@dataclass
class ToyOut:
    """A model output that is a plain dataclass (diffusers' models return output objects)."""

    sample: torch.Tensor


class ToyNet(torch.nn.Module):
    """A model whose forward reads Python state: a scale, a flag, a LoRA-like scaling dict; when asked, it mixes
    the rows of its batch (batch statistics) or returns a dataclass."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = torch.nn.Linear(SHAPE[-1], SHAPE[-1])
        self.extra = torch.nn.Linear(SHAPE[-1], SHAPE[-1], bias=False)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.scale = 1.0
        self.use_act = True
        self.scaling = {"default": 0.5}
        self.mix_rows = False
        self.as_dataclass = False

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        h = self.lin(x if cond is None else x + cond)
        if self.use_act:
            h = torch.tanh(h)
        out = h * self.scale + self.extra(x) * self.scaling["default"]
        if self.mix_rows:
            out = out - out.mean(0, keepdim=True)
        return ToyOut(out) if self.as_dataclass else out


def sample(out):
    return getattr(out, "sample", out)


class Extra:
    """A component the blocks use without declaring it."""

    def __init__(self):
        self.k = 0
        self.previous = None


# -- blocks ------------------------------------------------------------------------------------------------------------
class _Block(ModularPipelineBlocks):
    components_used: tuple[str, ...] = ()

    def __init__(self, param: float = 0.5):
        super().__init__()
        self.param = param

    @property
    def expected_components(self):
        return [ComponentSpec(name) for name in self.components_used]

    @property
    def inputs(self):
        return [InputParam("x")]

    @property
    def intermediate_outputs(self):
        return [OutputParam("x")]


class Affine(_Block):
    def __call__(self, components, bs, i: int):
        bs.x = bs.x * (1.0 - 0.1 * self.param) + 0.05
        return components, bs


class StepFloat(_Block):
    def __call__(self, components, bs, i: int):
        bs.x = bs.x * (1.0 + 0.05 * i * self.param)
        return components, bs


class KwargFloat(_Block):
    def __call__(self, components, bs, i: int):
        c = 1.0 + 0.5 * i * self.param
        bs.x = torch.lerp(bs.x.clamp(min=-c, max=c), torch.zeros_like(bs.x), weight=0.05 * (i + 1))
        return components, bs


class SchedStep(_Block):
    components_used = ("scheduler",)

    def __call__(self, components, bs, i: int):
        bs.x = components.scheduler.step(-bs.x * self.param, bs.x)
        return components, bs


class History(_Block):
    components_used = ("history",)

    def __call__(self, components, bs, i: int):
        h = components.history
        x = bs.x
        if h.previous[0] is not None:
            x = x - 0.1 * self.param * h.previous[0]
        h.previous = [h.previous[1], x * 0.9]
        h.stamps[0] = h.stamps[1]
        h.stamps[1] = torch.tensor(float(i))
        h.count += 1
        bs.x = x
        return components, bs


class Guidance(_Block):
    components_used = ("net", "guider")

    @property
    def inputs(self):
        return [InputParam("x"), InputParam("cond"), InputParam("uncond"), InputParam("num_steps")]

    def __call__(self, components, bs, i: int):
        guider, net = components.guider, components.net
        guider._step = i
        pred = sample(net(bs.x, bs.cond))
        if guider.guided(i, bs.num_steps):
            uncond = sample(net(bs.x, bs.uncond))
            pred = uncond + guider.guidance_scale * (pred - uncond)
        rescale = getattr(guider, "rescale", 0.0)
        bs.x = bs.x - 0.1 * self.param * pred * (1.0 - rescale)
        return components, bs


class Model(_Block):
    components_used = ("net",)

    def __call__(self, components, bs, i: int):
        bs.x = bs.x + 0.1 * self.param * sample(components.net(bs.x))
        return components, bs


class BranchOnStep(_Block):
    def __call__(self, components, bs, i: int):
        bs.x = bs.x * 1.1 if i % 2 == 0 else bs.x * (0.9 - 0.1 * self.param)
        return components, bs


class BranchOnData(_Block):
    def __call__(self, components, bs, i: int):
        if bs.x.abs().max().item() > 1.0 + self.param:  # data-dependent: runs eagerly
            bs.x = bs.x * 0.5
        return components, bs


class InPlace(_Block):
    def __call__(self, components, bs, i: int):
        bs.x.mul_(1.0 - 0.1 * self.param).add_(0.01)
        return components, bs


class ViewInPlace(_Block):
    def __call__(self, components, bs, i: int):
        bs.x[..., 0].mul_(1.0 + 0.1 * self.param)
        bs.x.narrow(0, 0, 1).add_(0.01)
        return components, bs


class Cast(_Block):
    def __call__(self, components, bs, i: int):
        bs.y = bs.x.to(bs.x.dtype)  # a no-op: y is x itself
        bs.x = bs.y * 0.95 + 0.01 * self.param
        return components, bs


class Random(_Block):
    def __call__(self, components, bs, i: int):
        bs.x = bs.x + 0.01 * self.param * torch.randn_like(bs.x)
        return components, bs


class Previews(_Block):
    @property
    def inputs(self):
        return [InputParam("x"), InputParam("previews")]

    @property
    def intermediate_outputs(self):
        return [OutputParam("x"), OutputParam("previews"), OutputParam("extras")]

    def __call__(self, components, bs, i: int):
        bs.x = bs.x * 0.98
        bs.previews = list(bs.previews or []) + [bs.x * self.param]
        bs.extras = {"last": bs.x + 1.0}
        return components, bs


class CountCalls(_Block):
    def __init__(self, param: float = 0.5):
        super().__init__(param)
        self.calls = 0

    def __call__(self, components, bs, i: int):
        self.calls += 1
        self.last = i
        bs.x = bs.x + 0.001 * self.param
        return components, bs


class TypeCheck(_Block):
    components_used = ("scheduler",)

    def __call__(self, components, bs, i: int):
        if type(components.scheduler) is ToyScheduler:  # noqa: E721 -- what users write
            bs.x = bs.x * (1.0 - 0.01 * self.param)
        else:
            bs.x = bs.x + 100.0
        return components, bs


class DataAssign(_Block):
    def __call__(self, components, bs, i: int):
        bs.x = bs.x * 1.2
        bs.x.data = bs.x.data.clamp(-1.0 - self.param, 1.0 + self.param)
        return components, bs


class Undeclared(_Block):
    def __call__(self, components, bs, i: int):
        components.extra.k += 1
        bs.x = bs.x * (1.0 - 0.01 * components.extra.k * self.param)
        return components, bs


class Aliased(_Block):
    @property
    def inputs(self):
        return [InputParam("x"), InputParam("a"), InputParam("b")]

    def __call__(self, components, bs, i: int):
        bs.a.mul_(0.9)  # seen through b when a and b are one tensor
        bs.x = bs.x + 0.1 * self.param * (bs.a - bs.b)
        return components, bs


class UndeclaredHistory(_Block):
    def __call__(self, components, bs, i: int):
        extra = components.extra  # undeclared, and keeps a loop tensor across steps
        if extra.previous is not None:
            bs.x = bs.x - 0.1 * self.param * extra.previous
        extra.previous = bs.x * 0.5
        return components, bs


class DataOnInput(_Block):
    def __call__(self, components, bs, i: int):
        bs.x.data = bs.x.data.clamp(-0.5 - self.param, 0.5 + self.param)  # in step 0, the caller's tensor
        bs.x = bs.x * 0.9 + 0.01
        return components, bs


class Strength(_Block):
    """A float block input used in tensor math (lifted) and in a predicate (guarded by its outcome)."""

    @property
    def inputs(self):
        return [InputParam("x"), InputParam("strength")]

    def __call__(self, components, bs, i: int):
        if bs.strength > 0.5:
            bs.x = bs.x * (1.0 - 0.2 * bs.strength) + 0.01 * self.param
        else:
            bs.x = bs.x - bs.strength * 0.1 * bs.x
        return components, bs


class KeptScale(_Block):
    """Keeps the guider's scale on itself (a value a compiled call replays: guarded by value) and uses it."""

    components_used = ("guider",)

    def __call__(self, components, bs, i: int):
        self.last_scale = components.guider.guidance_scale
        bs.x = bs.x * (1.0 - 0.01 * self.param * self.last_scale)
        return components, bs


class IndexedSchedule(_Block):
    """A schedule tensor in the BlockState indexed by the step, from both ends, and sliced (gathered per call)."""

    @property
    def inputs(self):
        return [InputParam("x"), InputParam("sched")]

    def __call__(self, components, bs, i: int):
        sched = bs.sched
        pair = sched[i:i + 2]  # a slice by the step, too
        bs.x = bs.x + (sched[i + 1] - sched[i]) * self.param * bs.x + 0.01 * sched[-(i + 1)] + 0.001 * pair.sum()
        return components, bs


STRENGTH = 0.5  # a global read by decorated methods and by the block defined late


def logged(fn):
    """A user's decorator (``functools.wraps``): the method's code is behind ``__wrapped__``."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)
    return wrapper


class NoGradGlobal(_Block):
    @torch.no_grad()  # what diffusers' blocks do
    def __call__(self, components, bs, i: int):
        bs.x = bs.x * (1.0 - 0.1 * STRENGTH * self.param)
        return components, bs


class WrappedGlobal(_Block):
    @logged
    def __call__(self, components, bs, i: int):
        bs.x = bs.x + 0.01 * STRENGTH * self.param
        return components, bs


class SettingsModule(_Block):
    def __call__(self, components, bs, i: int):
        bs.x = bs.x * (1.0 - 0.1 * fuzz_settings.STRENGTH * self.param)
        return components, bs


def late_block() -> type[_Block]:
    """A block class defined anew (``exec``'d into this module, as a notebook cell defines one) for each world,
    reading a global that no code defined before it reads."""
    namespace = globals()
    exec(compile("class Late(_Block):\n"
                 "    def __call__(self, components, bs, i):\n"
                 "        bs.x = bs.x * (1.0 - 0.05 * LATE_STRENGTH * self.param)\n"
                 "        return components, bs\n", "<late cell>", "exec"), namespace)
    namespace.setdefault("LATE_STRENGTH", 0.5)
    return namespace.pop("Late")


BLOCKS: dict[str, Callable[[float], _Block]] = {cls.__name__: cls for cls in (
    Affine, StepFloat, KwargFloat, SchedStep, History, Guidance, Model, BranchOnStep, BranchOnData, InPlace,
    ViewInPlace, Cast, Random, Previews, CountCalls, TypeCheck, DataAssign, Undeclared, Aliased, UndeclaredHistory,
    DataOnInput, NoGradGlobal, WrappedGlobal, SettingsModule, Strength, KeptScale, IndexedSchedule)}
BLOCKS["Late"] = lambda param: late_block()(param)  # a new class per world


def reset_globals() -> None:
    """The module globals and settings the blocks read, as a new example starts."""
    globals()["STRENGTH"] = globals()["LATE_STRENGTH"] = 0.5
    fuzz_settings.STRENGTH, fuzz_settings.UNREAD = 0.5, 1.0


class FuzzLoop(LoopSequentialPipelineBlocks):
    """The wrapper: a plain loop over ``num_steps``, with tensor work before or after it when asked."""

    work = "none"  # "none" | "before" | "after"

    @property
    def description(self):
        return "a generated loop"

    @property
    def loop_inputs(self):
        return [InputParam("num_steps")]

    def __call__(self, components, state):
        bs = self.get_block_state(state)
        if self.work == "before":
            bs.x = bs.x / 0.5
        for i in range(bs.num_steps):
            components, bs = self.loop_step(components, bs, i=i)
        if self.work == "after":
            bs.x = bs.x.clamp(-3.0, 3.0) * 0.5
        self.set_block_state(state, bs)
        return components, state


# -- specs, worlds and changes -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoopSpec:
    blocks: tuple[tuple[str, float], ...]   # (block kind, its parameter)
    work: str = "none"
    steps: int = 3


class World:
    """One loop built from a spec, its components and its inputs; ``call`` runs ``runner`` (the eager wrapper or
    its CompiledLoop) on a fresh state."""

    def __init__(self, spec: LoopSpec):
        self.spec = spec
        blocks = {f"b{k}_{kind}": BLOCKS[kind](param) for k, (kind, param) in enumerate(spec.blocks)}
        self.loop = FuzzLoop.from_blocks_dict(blocks)
        self.loop.work = spec.work
        self.components = _Components(scheduler=ToyScheduler(), history=ToyHistory(), guider=ToyGuider(),
                                      net=ToyNet(0), extra=Extra())
        self.steps = spec.steps
        self.seed = 0
        self.reset = True
        self.aliased = False
        self.empty_prompts = False
        self.strength = 0.7
        self.power = 1.0
        self.given: dict[str, Any] = {}

    def inputs(self) -> dict[str, Any]:
        g = torch.Generator().manual_seed(self.seed)
        a = torch.randn(SHAPE, generator=g)
        x, cond = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
        if self.empty_prompts:  # a warm-up on empty prompts: both guidance halves alike
            cond = torch.zeros(SHAPE)
        return {"x": x, "cond": cond, "uncond": torch.zeros(SHAPE), "a": a, "b": a if self.aliased else a.clone(),
                "previews": [], "strength": self.strength,
                "sched": torch.linspace(1.0, 0.0, self.steps + 1) ** self.power}

    def call(self, runner) -> PipelineState:
        c = self.components
        if self.reset:
            c.scheduler.set_timesteps(self.steps)
            c.history.reset()
            c.extra.k, c.extra.previous = 0, None
        state = PipelineState()
        self.given = self.inputs()
        for k, v in self.given.items():
            state.set(k, v)
        state.set("num_steps", self.steps)
        torch.manual_seed(1234 + self.seed)  # random blocks draw the same numbers in both worlds
        _, state = runner(c, state)
        return state

    def python_state(self) -> dict[str, Any]:
        """The Python state a user could look at after a call (tensors by value)."""
        c = self.components
        state = {"inputs": dict(self.given),  # the caller's tensors, as the call left them
                 "scheduler": dict(vars(c.scheduler)), "history": dict(vars(c.history)),
                 "guider": dict(vars(c.guider)), "extra": dict(vars(c.extra)),
                 "net": {k: v for k, v in vars(c.net).items() if not k.startswith("_")},
                 "weights": dict(c.net.state_dict())}
        for name, block in self.loop.sub_blocks.items():
            state[name] = {k: v for k, v in vars(block).items() if k != "sub_blocks"}
        return state


class _Components:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


def change(world: World, kind: str, value: float) -> None:
    """What a user does between two calls (applied to both worlds alike)."""
    c = world.components
    world.reset = True
    if kind == "new_inputs":
        world.seed += 1
    elif kind == "new_n":
        world.steps = 2 + int(value * 4)
    elif kind == "guidance_scale":
        c.guider.guidance_scale = round(1.0 + 4.0 * value, 2)
    elif kind == "guidance_window":
        c.guider.stop = round(value, 2)
    elif kind == "swap_model":
        c.net = ToyNet(1 + int(value * 10))
    elif kind == "patch_model":
        c.net.scaling["default"] = round(value, 2)
    elif kind == "model_flag":
        c.net.use_act = not c.net.use_act
    elif kind == "model_scale":
        c.net.scale = round(2 * value, 2)
    elif kind == "block_attr":
        first = next(iter(world.loop.sub_blocks.values()))
        first.param = round(value, 2)
    elif kind == "no_reset":
        world.reset = False
    elif kind == "alias":
        world.aliased = not world.aliased
    elif kind == "set_rescale":
        if hasattr(c.guider, "rescale"):
            del c.guider.rescale
        else:
            c.guider.rescale = round(value / 2, 2)
    elif kind == "weights_in_place":
        with torch.no_grad():
            c.net.lin.weight.mul_(1.0 + value)
    elif kind == "new_scheduler":
        c.scheduler = ToyScheduler()
    elif kind == "hook":
        handle = getattr(c.net, "_fuzz_handle", None)
        if handle is None:
            c.net._fuzz_handle = c.net.lin.register_forward_hook(lambda module, args, out: out * (1.0 + value))
        else:
            handle.remove()
            del c.net._fuzz_handle
    elif kind == "empty_prompts":
        world.empty_prompts = not world.empty_prompts
    elif kind == "mix_rows":
        c.net.mix_rows = not c.net.mix_rows
    elif kind == "dataclass_out":
        c.net.as_dataclass = not c.net.as_dataclass
    elif kind == "global":  # module globals: one process, both worlds see the same value
        globals()["STRENGTH"] = globals()["LATE_STRENGTH"] = round(2 * value, 2)
    elif kind == "settings":
        fuzz_settings.STRENGTH = round(2 * value, 2)
    elif kind == "settings_unread":
        fuzz_settings.UNREAD = round(2 * value, 2)
    elif kind == "strength":
        world.strength = round(value, 2)
    elif kind == "schedule":
        world.power = round(1.0 + 2 * value, 2)
    elif kind == "same":
        pass
    else:
        raise ValueError(kind)


CHANGES = ("same", "new_inputs", "new_n", "guidance_scale", "guidance_window", "swap_model", "patch_model",
           "model_flag", "model_scale", "block_attr", "no_reset", "alias", "set_rescale", "weights_in_place",
           "new_scheduler", "hook", "empty_prompts", "mix_rows", "dataclass_out", "global", "settings",
           "settings_unread", "strength", "schedule")


def equal(a: Any, b: Any, rtol: float = 1e-4, atol: float = 1e-5) -> bool:
    """Values equal up to float rounding (tensors by value, through containers)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True))
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(equal(x, y, rtol, atol) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(equal(a[k], b[k], rtol, atol) for k in a)
    if dataclasses.is_dataclass(a) or isinstance(a, (ToyNet, torch.nn.Module)):
        return type(a) is type(b)
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=rtol, abs_tol=atol) or (a != a and b != b)
    return type(a) is type(b) and a == b
