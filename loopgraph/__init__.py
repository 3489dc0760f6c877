"""loopgraph: fast, faithful diffusion denoising loops written as modular pipeline blocks.

The flow:
    the block API (``loopgraph.modular_pipelines``): diffusers-compatible, runs eagerly
    -> ``compile_loop(wrapper)`` (compile.py): trace one call (trace/, pystate/) -> guard the plan (guards/)
      -> passes: slots, per-step tables, batched calls, kernels (passes/) -> lower and compile once (backend/)
      -> run all N steps without Python per step, while the guards hold (runtime/)
    -> ``loopgraph bench``: eager vs compiled-denoiser vs compiled-loop throughput.

The reference denoising loops (tiny DiT / UNet, schedulers, guidance) live in ``loopgraph.zoo``.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path

from .compile import CompileConfig, CompiledLoop, compile_loop
from .modular_pipelines.auto_blocks import AutoPipelineBlocks
from .modular_pipelines.blocks import ModularPipelineBlocks
from .modular_pipelines.loop_blocks import LoopSequentialPipelineBlocks
from .modular_pipelines.sequential_blocks import SequentialPipelineBlocks
from .modular_pipelines.pipeline import ModularPipeline
from .modular_pipelines.state import BlockState, ComponentSpec, ConfigSpec, InputParam, OutputParam, PipelineState
from .runtime.watch import Interrupted, StepEvent, stream
from .whole_pipeline import compile_pipeline, compiled_loops, explain


class _SourceTreeKernels(importlib.abc.MetaPathFinder):
    """Run from a source checkout (``PYTHONPATH=<repo>``, as on the GPU machines, with nothing installed), the
    Triton kernels sit beside the package in ``kernels/``: this finds that folder as ``loopgraph.kernels``, where the
    wheel and the editable install put it. The folder has no ``__init__.py`` (a namespace package), so that
    ``import kernels`` from the repository root never shadows Hugging Face's ``kernels`` package. Lazy: nothing
    imports Triton until a kernel module is asked for."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def find_spec(self, name, path=None, target=None):
        if name != f"{__name__}.kernels":
            return None
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(self.folder)]
        return spec


_kernels = Path(__file__).resolve().parent.parent / "kernels"
if importlib.util.find_spec(f"{__name__}.kernels") is None and _kernels.is_dir():
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
    # watching a compiled loop run
    "StepEvent",
    "Interrupted",
    "stream",
    # state and declarations
    "PipelineState",
    "BlockState",
    "InputParam",
    "OutputParam",
    "ComponentSpec",
    "ConfigSpec",
]
