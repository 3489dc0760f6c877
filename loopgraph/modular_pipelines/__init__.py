"""The block API under diffusers' import path: ``from loopgraph.modular_pipelines import ...`` ports code
written against ``diffusers.modular_pipelines`` by changing one import."""

from .auto_blocks import AutoPipelineBlocks
from .blocks import ModularPipelineBlocks
from .loop_blocks import LoopSequentialPipelineBlocks
from .sequential_blocks import SequentialPipelineBlocks
from .pipeline import ModularPipeline
from .state import BlockState, ComponentSpec, ConfigSpec, InputParam, OutputParam, PipelineState

__all__ = [
    "ModularPipelineBlocks",
    "SequentialPipelineBlocks",
    "LoopSequentialPipelineBlocks",
    "AutoPipelineBlocks",
    "ModularPipeline",
    "PipelineState",
    "BlockState",
    "InputParam",
    "OutputParam",
    "ComponentSpec",
    "ConfigSpec",
]
