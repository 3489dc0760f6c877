"""loopgraph: fast, faithful diffusion denoising loops written as modular pipeline blocks.

The flow:
    block API (``blocks``, ``state``, ``pipeline``)  — diffusers-compatible, runs eagerly
    → ``compile_loop(wrapper)``: trace one iteration (and the Python state it reads and writes) → guard the plan
      → analyse slots → hoist the schedule into per-step tables → lower the BlockState to buffers → compile once
      → run all N steps without Python per step, while the guards hold
    → ``loopgraph bench``: eager vs compiled-denoiser vs compiled-loop throughput.

The reference denoising loops (tiny DiT / UNet, schedulers, guidance) live in ``loopgraph.zoo``.
"""

from .compile import CompileConfig, CompiledLoop, compile_loop
from .blocks import AutoPipelineBlocks, LoopSequentialPipelineBlocks, ModularPipelineBlocks, SequentialPipelineBlocks
from .pipeline import ModularPipeline
from .state import BlockState, ComponentSpec, ConfigSpec, InputParam, OutputParam, PipelineState

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
    # state and declarations
    "PipelineState",
    "BlockState",
    "InputParam",
    "OutputParam",
    "ComponentSpec",
    "ConfigSpec",
]
