"""``SequentialPipelineBlocks``: sub-blocks run one after the other on one ``PipelineState``.

Semantics are diffusers 0.42's (``shared/reference/diffusers-modular-api.md`` §2). ``get_execution_blocks``
resolves the auto blocks among the sub-blocks (auto_blocks.py) into the flat sequence that would run.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from .auto_blocks import AutoPipelineBlocks
from .blocks import ModularPipelineBlocks, _instantiate, _union, run_block
from .state import ComponentSpec, ConfigSpec, InputParam, OutputParam, PipelineState, combine_outputs

__all__ = ["SequentialPipelineBlocks"]


class SequentialPipelineBlocks(ModularPipelineBlocks):
    """Runs its sub-blocks one after the other on the same ``PipelineState``."""

    block_classes: list = []
    block_names: list = []

    def __init__(self) -> None:
        if len(self.block_names) != len(self.block_classes):
            raise ValueError(
                f"In {type(self).__name__}, the number of block_names and block_classes must be the same."
            )
        self.sub_blocks = _instantiate(zip(self.block_names, self.block_classes))

    @classmethod
    def from_blocks_dict(cls, blocks_dict: dict[str, Any], description: str | None = None):
        """Build an instance from ``{name: block class or instance}``."""
        instance = cls.__new__(cls)
        instance.sub_blocks = _instantiate(blocks_dict.items())
        instance.block_classes = [type(b) for b in instance.sub_blocks.values()]
        instance.block_names = list(instance.sub_blocks)
        instance._check_sub_blocks()
        if description is not None:
            instance._description = description
        return instance

    def _check_sub_blocks(self) -> None:
        for name, block in self.sub_blocks.items():
            if not isinstance(block, ModularPipelineBlocks) and not callable(block):
                raise TypeError(f"In {type(self).__name__}, block '{name}' is not a pipeline block: {block!r}")

    @property
    def description(self) -> str:
        return getattr(self, "_description", "")

    @property
    def model_name(self) -> str | None:
        return next((b.model_name for b in self.sub_blocks.values() if b.model_name is not None), None)

    @property
    def expected_components(self) -> list[ComponentSpec]:
        return _union(spec for b in self.sub_blocks.values() for spec in b.expected_components)

    @property
    def expected_configs(self) -> list[ConfigSpec]:
        return _union(spec for b in self.sub_blocks.values() for spec in b.expected_configs)

    @property
    def inputs(self) -> list[InputParam]:
        # An input produced by an earlier sub-block is internal; names are collected once (first wins).
        inputs: list[InputParam] = []
        produced: set[str] = set()
        for block in self.sub_blocks.values():
            for param in block.inputs:
                if param.name not in produced and param.name not in {p.name for p in inputs}:
                    inputs.append(param)
            if not (isinstance(block, AutoPipelineBlocks) and block.default_block_name is None):
                produced.update(o.name for o in block.intermediate_outputs)  # a skippable block may not produce
        return inputs

    @property
    def required_inputs(self) -> list[str]:
        return sorted({name for b in self.sub_blocks.values() for name in b.required_inputs})

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return combine_outputs(*((name, b.intermediate_outputs) for name, b in self.sub_blocks.items()))

    @property
    def outputs(self) -> list[OutputParam]:
        return self.intermediate_outputs

    @torch.no_grad()
    def __call__(self, pipeline, state: PipelineState):
        for name, block in self.sub_blocks.items():
            pipeline, state = run_block(name, block, pipeline, state)
        return pipeline, state

    def get_execution_blocks(self, **kwargs: Any) -> SequentialPipelineBlocks:
        """The flat sequence of blocks that would run for inputs ``kwargs`` (auto blocks resolved)."""
        active = dict(kwargs)
        chosen: OrderedDict[str, Any] = OrderedDict()
        for name, block in self.sub_blocks.items():
            if isinstance(block, AutoPipelineBlocks):
                picked = block.select_block(**{t: active.get(t) for t in block.block_trigger_inputs if t})
                picked = picked or block.default_block_name
                if picked is None:
                    continue
                name, block = f"{name}.{picked}", block.sub_blocks[picked]
            if isinstance(block, SequentialPipelineBlocks):
                for sub_name, sub in block.get_execution_blocks(**active).sub_blocks.items():
                    chosen[f"{name}.{sub_name}"] = sub
            else:
                chosen[name] = block
            active.update({o.name: True for o in block.intermediate_outputs})
        return SequentialPipelineBlocks.from_blocks_dict(chosen)
