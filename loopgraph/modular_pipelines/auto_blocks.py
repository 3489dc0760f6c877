"""``AutoPipelineBlocks``, the conditional block: it runs the first branch whose trigger input is set, else its
default branch (the one with a ``None`` trigger), else nothing.

Semantics are diffusers 0.42's (``shared/reference/diffusers-modular-api.md`` §2): an input is required only when
every branch requires it, and none is when there is no default branch.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch

from .blocks import ModularPipelineBlocks, _instantiate, _union, run_block
from .state import ComponentSpec, ConfigSpec, InputParam, OutputParam, PipelineState, combine_inputs, combine_outputs

__all__ = ["AutoPipelineBlocks"]

logger = logging.getLogger(__name__)


class AutoPipelineBlocks(ModularPipelineBlocks):
    """Runs the first branch whose trigger input is not None (a ``None`` trigger marks the default branch)."""

    block_classes: list = []
    block_names: list = []
    block_trigger_inputs: list = []

    def __init__(self) -> None:
        if not (len(self.block_classes) == len(self.block_names) == len(self.block_trigger_inputs)):
            raise ValueError(
                f"In {type(self).__name__}, block_classes, block_names and block_trigger_inputs must have the "
                f"same length."
            )
        if "default_block_name" in type(self).__dict__:
            raise ValueError(
                f"In {type(self).__name__}, do not set `default_block_name`: mark the default branch with a None "
                f"trigger input instead."
            )
        self.sub_blocks = _instantiate(zip(self.block_names, self.block_classes))

    @property
    def default_block_name(self) -> str | None:
        for name, trigger in zip(self.block_names, self.block_trigger_inputs):
            if trigger is None:
                return name
        return None

    @property
    def model_name(self) -> str | None:
        return next(iter(self.sub_blocks.values())).model_name if self.sub_blocks else None

    def select_block(self, **trigger_kwargs: Any) -> str | None:
        for name, trigger in zip(self.block_names, self.block_trigger_inputs):
            if trigger is not None and trigger_kwargs.get(trigger) is not None:
                return name
        return None

    @property
    def expected_components(self) -> list[ComponentSpec]:
        return _union(s for b in self.sub_blocks.values() for s in b.expected_components)

    @property
    def expected_configs(self) -> list[ConfigSpec]:
        return _union(s for b in self.sub_blocks.values() for s in b.expected_configs)

    @property
    def inputs(self) -> list[InputParam]:
        merged = combine_inputs(*((name, b.inputs) for name, b in self.sub_blocks.items()))
        required = set(self.required_inputs)
        return [p if (p.name in required) == p.required else _with_required(p, p.name in required) for p in merged]

    @property
    def required_inputs(self) -> list[str]:
        # required only when every branch requires it, and nothing is when there is no default branch
        if self.default_block_name is None or not self.sub_blocks:
            return []
        sets = [set(b.required_inputs) for b in self.sub_blocks.values()]
        return sorted(set.intersection(*sets))

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return combine_outputs(*((name, b.intermediate_outputs) for name, b in self.sub_blocks.items()))

    @torch.no_grad()
    def __call__(self, pipeline, state: PipelineState):
        triggers = {t: state.get(t) for t in self.block_trigger_inputs if t is not None}
        name = self.select_block(**triggers) or self.default_block_name
        if name is None:
            logger.info("%s: no trigger input is set and there is no default branch; skipping", type(self).__name__)
            return pipeline, state
        return run_block(name, self.sub_blocks[name], pipeline, state)


def _with_required(param: InputParam, required: bool) -> InputParam:
    new = copy.copy(param)
    new.required = required
    return new
