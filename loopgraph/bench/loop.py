"""What one bench run measures: its options (``BenchConfig``) and the loop each method gets a fresh copy of (a zoo
preset, a diffusers loop, or the user's own ``--loop MODULE:FUNCTION``)."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from .methods import DEFAULT_METHODS, METHODS

__all__ = ["BenchConfig", "UserLoop", "build_setup", "user_loop", "with_overrides"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class BenchConfig:
    """Everything one bench run depends on; written whole into ``bench.json``."""

    preset: str = "dit"
    steps: int = 20
    batch: int = 1
    sample_size: int | None = None
    dtype: str = "float32"
    device: str = "auto"
    repeats: int = 30
    warmup: int = 2
    methods: tuple[str, ...] = DEFAULT_METHODS
    scaling: tuple[int, ...] = (5, 10, 20, 50)
    scaling_repeats: int = 5
    compile_timeout: float = 300.0
    seed: int = 0
    model: dict[str, Any] = field(default_factory=dict)  # denoiser config overrides, e.g. hidden_dim=128
    loop: str | None = None  # "package.module:function": the user's own loop (see ``user_loop``), not a preset
    cold_start: bool = False  # also time each method's first result in fresh processes (cold_start.py)
    denoiser: str | None = None  # the component compile_denoiser compiles (default: denoiser, unet or transformer)

    @classmethod
    def quick(cls, **overrides: Any) -> "BenchConfig":
        """CI-sized: few steps, few repeats, two points of scaling."""
        return cls(**{"steps": 4, "repeats": 3, "warmup": 1, "scaling": (2, 4), "scaling_repeats": 2,
                      **overrides})

    def __post_init__(self) -> None:
        self.methods = tuple(self.methods)
        self.scaling = tuple(sorted(set(self.scaling)))
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
        if "eager" not in self.methods:
            raise ValueError("'eager' must be among the methods: every method is checked against it")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {self.dtype!r}")
        if self.steps < 1 or self.batch < 1 or self.repeats < 1 or self.warmup < 1:
            raise ValueError("steps, batch, repeats and warmup must be >= 1")
        if len(self.scaling) < 2 or min(self.scaling) < 1:
            raise ValueError(f"scaling needs at least two step counts >= 1, got {self.scaling}")
        if self.cold_start and (self.loop is not None or self.device not in ("auto", "cpu")):
            raise ValueError("--cold-start times the presets on CPU (not --loop, not --device cuda)")
        if self.loop is None:
            self._check_preset()

    def _check_preset(self) -> None:
        from ..zoo.diffusers_families import FAMILIES  # diffusers itself is imported by the builders only
        from ..zoo.diffusers_loops import DIFFUSERS_LOOPS
        from ..zoo.loops import PRESETS

        if self.preset in PRESETS:
            return
        if self.preset not in DIFFUSERS_LOOPS and self.preset not in FAMILIES:
            raise ValueError(f"unknown preset {self.preset!r}; zoo presets: {sorted(PRESETS)}, diffusers loops: "
                             f"{sorted(DIFFUSERS_LOOPS)}, diffusers families' core denoise steps: {list(FAMILIES)}")
        fixed = {"batch": 1, "dtype": "float32", "sample_size": None, "model": {}}
        changed = [k for k, v in fixed.items() if getattr(self, k) != v]
        if changed or self.torch_device.type != "cpu":
            raise ValueError(f"the diffusers loops are built at their tiny test configs, batch 1, float32, on CPU; "
                             f"drop {changed or ['--device']} for preset {self.preset!r}")

    @property
    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)


def with_overrides(config: BenchConfig, **changes: Any) -> BenchConfig:
    """``config`` with the options given; None is an option not given (the CLI's default), so ``config``'s stays."""
    return replace(config, **{k: v for k, v in changes.items() if v is not None})


@dataclass
class UserLoop:
    """The user's own loop, benchmarked like a preset: ``make_state(steps)`` (or ``make_state()``) makes a fresh
    state for each call; ``output`` names the state value every method is checked by (the latents)."""

    wrapper: Any
    components: Any
    make_state: Callable
    output: str = "latents"
    steps: int = 20
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        params = inspect.signature(self.make_state).parameters.values()
        self.takes_steps = any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
                               for p in params)
        state = self.new_state()
        tensors = [v for v in getattr(state, "values", {}).values() if isinstance(v, torch.Tensor)]
        if tensors:
            self.device = tensors[0].device

    def new_state(self):
        return self.make_state(self.steps) if self.takes_steps else self.make_state()


def user_loop(spec: str, steps: int) -> UserLoop:
    """Import ``package.module:function`` (or ``path/to/file.py:function``) and call it: it returns ``(wrapper,
    components, make_state)``, optionally with the output's name as a fourth item (default "latents");
    ``make_state(steps)`` makes a fresh state."""
    module_name, _, function = spec.rpartition(":")
    if not module_name or not function:
        raise ValueError(f"--loop wants package.module:function or path/to/file.py:function, got {spec!r}")
    try:
        make = getattr(_loop_module(module_name), function)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot load --loop {spec!r}: {error}") from error
    made = make()
    if not isinstance(made, (tuple, list)) or len(made) not in (3, 4):
        raise ValueError(f"{spec} must return (wrapper, components, make_state[, output name]), got "
                         f"{type(made).__name__}")
    return UserLoop(*made[:3], **({"output": made[3]} if len(made) == 4 else {}), steps=steps)


def _loop_module(name: str):
    """``--loop``'s module: imported with the current directory first on ``sys.path``, as ``python -m`` does (the
    ``loopgraph`` script's own folder is first otherwise); a file path is imported as its module, its folder first."""
    folder, path = os.getcwd(), None
    if name.endswith(".py"):
        path = Path(name).resolve()
        if not path.is_file():
            raise ImportError(f"no file {path}")
        folder, name = str(path.parent), path.stem
    if sys.path[:1] != [folder]:
        sys.path.insert(0, folder)
    module = importlib.import_module(name)
    if path is not None and Path(module.__file__ or "").resolve() != path:
        raise ImportError(f"a module named {name!r} is already imported from {module.__file__}; rename {path.name}")
    return module


def build_setup(config: BenchConfig):
    """A fresh copy of the benchmarked loop (zoo preset, a diffusers loop when diffusers is installed, or the
    user's ``--loop``)."""
    from ..zoo.loops import PRESETS, build_loop

    if config.loop is not None:
        return user_loop(config.loop, config.steps)

    kwargs = dict(steps=config.steps, batch=config.batch, seed=config.seed, device=config.torch_device,
                  dtype=_DTYPES[config.dtype], **config.model)
    if config.sample_size is not None:
        kwargs["sample_size"] = config.sample_size
    if config.preset in PRESETS:
        return build_loop(config.preset, **kwargs)
    from ..zoo import diffusers_families, diffusers_loops  # BenchConfig checked the name and the fixed options

    if config.preset in diffusers_loops.DIFFUSERS_LOOPS:
        return diffusers_loops.build_diffusers_loop(config.preset, steps=config.steps, seed=config.seed)
    return diffusers_families.build_family(config.preset, steps=config.steps, seed=config.seed)
