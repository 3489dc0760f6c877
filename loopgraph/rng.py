"""Counter-based noise for stochastic samplers inside a compiled loop (``compile_loop(..., rng="counter")``).

A draw is a pure function of a per-call *seed* and a *counter*: Philox4x32-10 (Salmon et al., SC'11, the
generator behind cuRAND and Triton's ``tl.rand``) written in int64 torch ops, so Inductor fuses it into the
step like any other elementwise work. It reads no generator state and writes none: inside a CUDA graph every
replay draws new noise from the seed copied in for that call, and the same seed gives the same values on
every device and backend (up to the float rounding of ``log``/``cos``).

Seed policy (what ``rng="counter"`` promises):

- Before the loop, each generator that the loop's random ops use (their ``generator=``, or the device's
  default generator when none is given) gives one seed: ``torch.randint(2**62, (), generator=g)``. So a call
  advances each generator by one draw, and the same generator state gives the same noise.
- Draw ``k`` of step ``i`` from a generator (``k`` counts that generator's draws in the step, in order)
  fills element ``e`` (row-major) from Philox4x32-10 with key = its seed and counter = (e, i << 32 | k):
  independent across elements, draws, steps and seeds. As in eager, a draw depends on its own generator
  only: items of a batch drawn each from its own generator (diffusers' list of generators) get noise that
  does not depend on their position, and two generators in the same state give the same noise.
- ``randn``/``randn_like``: Box-Muller on the first two 32-bit outputs, in float32 (tails reach 5.9 sigma),
  then cast. ``rand``/``rand_like``: the top 24 bits of the first output, uniform on [0, 1).

The values differ from eager's ``torch.randn``: the distribution is the same, the stream is not.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
import torch
from torch.overrides import TorchFunctionMode

__all__ = ["COUNTER_OPS", "CounterDraws", "CounterMode", "DrawSpec", "counter_draw", "draw_seed", "draw_spec",
           "eager_loop", "philox4x32", "source_key"]

COUNTER_OPS = {"randn": "normal", "randn_like": "normal", "rand": "uniform", "rand_like": "uniform"}
SEED_HIGH = 1 << 62
_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57  # Philox4x32 multipliers
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85      # Weyl key increments


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The high and low 32 bits of ``a * m`` (a < 2**32 in int64, m < 2**32), with no int64 overflow:
    ``a`` is split in 16-bit halves so every partial product stays below 2**48."""
    x = (a >> 16) * m
    y = (a & 0xFFFF) * m
    return (x + (y >> 16)) >> 16, (((x & 0xFFFF) << 16) + y) & _MASK32


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox4x32: four 32-bit counter words and a two-word key (int64 tensors holding values < 2**32)."""
    for _ in range(rounds):
        hi_a, lo_a = _mulhilo(c0, _ROUND_A)
        hi_b, lo_b = _mulhilo(c2, _ROUND_B)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    return c0, c1, c2, c3


def counter_draw(seed: torch.Tensor, stream: torch.Tensor, shape: tuple, dtype: torch.dtype, device: torch.device,
                 kind: str) -> torch.Tensor:
    """``shape`` values of ``kind`` ("normal" or "uniform") for key ``seed`` and stream ``stream`` (0-d int64)."""
    index = torch.arange(math.prod(shape), dtype=torch.int64, device=device)
    seed, stream = seed.to(device), stream.to(device)
    x0, x1, _, _ = philox4x32(index & _MASK32, index >> 32, stream & _MASK32, (stream >> 32) & _MASK32,
                              seed & _MASK32, (seed >> 32) & _MASK32)
    if kind == "uniform":
        values = (x0 >> 8).to(torch.float32) * 2.0**-24
    else:  # Box-Muller; u1 in (0, 1) so the log is finite
        u1 = ((x0 >> 8).to(torch.float32) + 0.5) * 2.0**-24
        u2 = (x1 >> 8).to(torch.float32) * 2.0**-24
        values = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
    return values.reshape(shape).to(dtype)


@dataclass(frozen=True)
class DrawSpec:
    """What one random op asks for."""

    kind: str
    shape: tuple
    dtype: torch.dtype
    device: torch.device
    generator: torch.Generator | None


def draw_spec(name: str, args: tuple, kwargs: dict) -> DrawSpec:
    """Parse a ``COUNTER_OPS`` call; ValueError for what the counter policy does not draw (``out=``, layouts)."""
    if "out" in kwargs or kwargs.get("layout") not in (None, torch.strided) or kwargs.get("requires_grad"):
        raise ValueError(f"`{name}` with out=, a non-strided layout or requires_grad=True")
    if name.endswith("_like"):
        like = args[0] if args else kwargs["input"]
        shape, dtype, device = tuple(like.shape), kwargs.get("dtype") or like.dtype, like.device
    else:
        size = kwargs.get("size", args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args)
        shape, dtype, device = tuple(int(s) for s in size), kwargs.get("dtype") or torch.get_default_dtype(), None
    if kwargs.get("device") is not None:
        device = torch.device(kwargs["device"])
    device = device if device is not None else torch.get_default_device()
    return DrawSpec(COUNTER_OPS[name], shape, dtype, device, kwargs.get("generator"))


def draw_seed(generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """One seed from ``generator`` (the device's default generator when None): a 0-d int64 tensor."""
    where = generator.device if generator is not None else device
    return torch.randint(SEED_HIGH, (), generator=generator, device=where, dtype=torch.int64)


def source_key(generator: torch.Generator | None, device: torch.device) -> tuple:
    """Which generator a draw's seed comes from: a generator object, or a device's default one."""
    if generator is not None:
        return ("generator", id(generator))
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return ("default", str(device))


class CounterDraws:
    """The draws of one call under the seed policy: seeds per generator, the step, and the draws per seed.

    ``seeds`` maps a ``source_key`` to (seed name, seed tensor); ``counts`` maps a seed name to its draws so
    far in this step (by name, which is the same in every call, unlike the generator objects). Seeds not
    given are drawn at first use, in the order of first use (a traced or eager call); a compiled call draws
    them all before the loop, in the same order, so every path takes one draw from each generator.
    """

    def __init__(self, seeds: dict[tuple, tuple[str, torch.Tensor]] | None = None) -> None:
        self.seeds = dict(seeds or {})
        self.generators: dict[tuple, torch.Generator | None] = {}  # keeps every keyed generator alive
        self.step = 0
        self.counts: dict[str, int] = {}

    def start_step(self, index: int, counts: dict[str, int] | None = None) -> None:
        self.step, self.counts = index, dict(counts or {})

    def seed(self, spec: DrawSpec) -> tuple[str, torch.Tensor, bool]:
        """This draw's seed name and tensor, and whether it was drawn just now."""
        key = source_key(spec.generator, spec.device)
        self.generators.setdefault(key, spec.generator)
        if key in self.seeds:
            return (*self.seeds[key], False)
        name = f"rng_seed{len(self.seeds)}"
        self.seeds[key] = (name, draw_seed(spec.generator, spec.device))
        return (*self.seeds[key], True)

    def stream(self, spec: DrawSpec, name: str) -> torch.Tensor:
        """This draw's stream (``step << 32 | k``, k = the draws of seed ``name`` so far), and count it."""
        k = self.counts.get(name, 0)
        self.counts[name] = k + 1
        return torch.tensor((self.step << 32) | k, dtype=torch.int64, device=spec.device)

    def draw(self, spec: DrawSpec) -> torch.Tensor:
        name, seed, _ = self.seed(spec)
        return counter_draw(seed, self.stream(spec, name), spec.shape, spec.dtype, spec.device, spec.kind)


class CounterMode(TorchFunctionMode):
    """Eager code under the seed policy: ``COUNTER_OPS`` calls draw from ``draws``; every other op runs as is.

    Used for blocks that run eagerly in a compiled loop with ``rng="counter"`` (data-dependent Python, or the
    whole loop falling back), so every path of one call draws the same noise."""

    def __init__(self, draws: CounterDraws) -> None:
        super().__init__()
        self.draws = draws

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in COUNTER_OPS:
            try:
                spec = draw_spec(name, args, kwargs)
            except ValueError:
                return func(*args, **kwargs)
            return self.draws.draw(spec)
        return func(*args, **kwargs)


def eager_loop(wrapper, components, state):
    """Call a loop wrapper eagerly with its random ops drawing by the seed policy: what a loop compiled with
    ``rng="counter"`` computes, without compiling (the reference to compare it with, and its eager fallback).

    Seeds are drawn at each generator's first use, as in the traced call; the wrapper's ``loop_step`` is
    wrapped to count steps.
    """
    draws, steps = CounterDraws(), itertools.count()
    loop_step = wrapper.loop_step

    def counted_step(comps, block_state, **kwargs):
        draws.start_step(next(steps))
        return loop_step(comps, block_state, **kwargs)

    wrapper.loop_step = counted_step
    try:
        with CounterMode(draws):
            return wrapper(components, state)
    finally:
        del wrapper.loop_step


# -- a plan's seeds ------------------------------------------------------------------------------------------------
def seed_sources(trace) -> dict[str, tuple]:
    """Where each traced seed's generator comes from in a call (``trace``: a ``trace.LoopTrace``): ("slot", name[,
    index]) for a BlockState input (one generator, or one of a per-item list), ("default", device), or ("object",
    generator) for one held elsewhere (the same object every call)."""
    sources = {}
    for name, seed in trace.seeds.items():
        g = seed.generator
        found = [("slot", k) for k, v in trace.initial_slots.items() if v is g] + [
            ("slot", k, j) for k, v in trace.initial_slots.items() if isinstance(v, (list, tuple))
            for j, item in enumerate(v) if item is g]
        sources[name] = ("default", seed.device) if g is None else (found[0] if found else ("object", g))
    return sources


def draw_seeds(sources: dict[str, tuple], slots: dict) -> tuple[dict[str, torch.Tensor], CounterDraws]:
    """This call's seeds, one draw from each generator in the traced order of first use: by seed name (the
    compiled loop's inputs), and as the draws eager blocks make (keyed by this call's generators)."""
    by_name, by_key = {}, {}
    for name, source in sources.items():
        if source[0] == "default":
            generator, device = None, source[1]
        else:
            generator = source[1] if source[0] == "object" else slots[source[1]]
            generator = generator[source[2]] if len(source) == 3 else generator
            device = generator.device
        by_name[name] = draw_seed(generator, device)
        by_key[source_key(generator, device)] = (name, by_name[name])
    return by_name, CounterDraws(by_key)


def describe_source(source: tuple) -> str:
    if source[0] == "default":
        return f"the default generator of {source[1]}"
    if source[0] == "object":
        return f"the generator object {source[1]!r} (the same every call)"
    return f"the generator in input {source[1]!r}" + (f" (item {source[2]})" if len(source) == 3 else "")
