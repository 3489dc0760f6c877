"""loopgraph: fast, faithful diffusion denoising loops written as modular pipeline blocks.

The flow:
    block API (``blocks``, ``state``, ``pipeline``)  — diffusers-compatible, runs eagerly
    → ``compile_loop(wrapper)``: trace one iteration (and the Python state it reads and writes) → guard the plan
      → analyse slots → hoist the schedule into per-step tables → lower the BlockState to buffers → compile once
      → run all N steps without Python per step, while the guards hold
    → ``loopgraph bench``: eager vs compiled-denoiser vs compiled-loop throughput.

The reference denoising loops (tiny DiT / UNet, schedulers, guidance) live in ``loopgraph.zoo``.
"""

import importlib.abc
import importlib.util
import sys
from pathlib import Path

from .compile import CompileConfig, CompiledLoop, compile_loop
from .blocks import AutoPipelineBlocks, LoopSequentialPipelineBlocks, ModularPipelineBlocks, SequentialPipelineBlocks
from .pipeline import ModularPipeline
from .whole_pipeline import compile_pipeline, compiled_loops, explain
from .state import BlockState, ComponentSpec, ConfigSpec, InputParam, OutputParam, PipelineState


class _SourceTreeKernels(importlib.abc.MetaPathFinder):
    """Run from a source checkout (``PYTHONPATH=<repo>``, as on the GPU machines, with nothing installed), the
    Triton kernels sit beside the package in ``kernels/``: this finds them as ``loopgraph.kernels``, where the
    wheel and the editable install put them. Lazy: nothing imports Triton until the kernels are asked for."""

    def __init__(self, init: Path) -> None:
        self.init = init

    def find_spec(self, name, path=None, target=None):
        if name != f"{__name__}.kernels":
            return None
        folder = [str(self.init.parent)]
        return importlib.util.spec_from_file_location(name, self.init, submodule_search_locations=folder)


_kernels = Path(__file__).resolve().parent.parent / "kernels" / "__init__.py"
if importlib.util.find_spec(f"{__name__}.kernels") is None and _kernels.exists():
    sys.meta_path.append(_SourceTreeKernels(_kernels))

__version__ = "0.1.0"

__all__ = [
    # block API (also importable from loopgraph.modular_pipelines)
    "ModularPipelineBlocks",
    "SequentialPipelineBlocks",
    "LoopSequentialPipelineBlocks",
    "AutoPipelineBlocks",
    "ModularPipeline",
    # compiling loops
    "compile_loop",
    "CompiledLoop",
    "CompileConfig",
    "compile_pipeline",
    "compiled_loops",
    "explain",
    # state and declarations
    "PipelineState",
    "BlockState",
    "InputParam",
    "OutputParam",
    "ComponentSpec",
    "ConfigSpec",
]
