"""``LoopSequentialPipelineBlocks``, the loop wrapper (what ``compile_loop`` compiles): its ``__call__`` loops and
calls ``loop_step``, which runs every leaf sub-block on one shared ``BlockState``.

Semantics are diffusers 0.42's (``shared/reference/diffusers-modular-api.md`` §2). Two departures, both
deliberate: ``from_blocks_dict`` accepts classes (diffusers' is broken for them) and keeps the leaf-only check,
and the seed-era ``loop_intermediate_inputs`` on a wrapper is read as ``loop_inputs``.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

from .blocks import ModularPipelineBlocks, _instantiate, _union, _with_seed_inputs, run_block
from .state import BlockState, ComponentSpec, ConfigSpec, InputParam, OutputParam, PipelineState, combine_outputs

__all__ = ["LoopSequentialPipelineBlocks"]


class LoopSequentialPipelineBlocks(ModularPipelineBlocks):
    """The loop wrapper: its ``__call__`` loops and calls ``loop_step``, which runs every sub-block on one
    shared ``BlockState`` with the same keyword arguments (in practice ``i`` and ``t``)."""

    model_name: str | None = None
    block_classes: list = []
    block_names: list = []

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("loop_inputs")
        if isinstance(own, property) and not hasattr(own.fget, "__wrapped__"):
            cls.loop_inputs = property(_with_seed_inputs(own.fget, "loop_intermediate_inputs"))

    def __init__(self) -> None:
        if len(self.block_names) != len(self.block_classes):
            raise ValueError(
                f"In {type(self).__name__}, the number of block_names and block_classes must be the same."
            )
        self.sub_blocks = _instantiate(zip(self.block_names, self.block_classes))
        self._check_leaf_blocks()

    @classmethod
    def from_blocks_dict(cls, blocks_dict: dict[str, Any]) -> LoopSequentialPipelineBlocks:
        """Build a wrapper from ``{name: block class or instance}`` (classes are instantiated)."""
        instance = cls()
        instance.sub_blocks = _instantiate(blocks_dict.items())
        instance.block_classes = [type(b) for b in instance.sub_blocks.values()]
        instance.block_names = list(instance.sub_blocks)
        instance._check_leaf_blocks()
        return instance

    def _check_leaf_blocks(self) -> None:
        for name, block in self.sub_blocks.items():
            if getattr(block, "sub_blocks", None):
                raise ValueError(
                    f"In {type(self).__name__}, sub_blocks must be leaf blocks (no sub_blocks). "
                    f"Block '{name}' ({type(block).__name__}) has sub_blocks."
                )

    # -- the wrapper's own declarations ----------------------------------------------------------------------
    @property
    def description(self) -> str:
        raise NotImplementedError(f"{type(self).__name__}: a loop wrapper must define `description`")

    @property
    def loop_expected_components(self) -> list[ComponentSpec]:
        return []

    @property
    def loop_expected_configs(self) -> list[ConfigSpec]:
        return []

    @property
    def loop_inputs(self) -> list[InputParam]:
        return list(self.loop_intermediate_inputs)

    @property
    def loop_intermediate_inputs(self) -> list[InputParam]:
        """Seed-era vocabulary: values the wrapper reads from earlier blocks. Read like ``loop_inputs``."""
        return []

    @property
    def loop_required_inputs(self) -> list[str]:
        return [p.name for p in self.loop_inputs if p.required]

    @property
    def loop_intermediate_outputs(self) -> list[OutputParam]:
        return []

    # -- aggregate interface -----------------------------------------------------------------------------------
    @property
    def expected_components(self) -> list[ComponentSpec]:
        specs = [s for b in self.sub_blocks.values() for s in b.expected_components]
        return _union(specs + list(self.loop_expected_components))

    @property
    def expected_configs(self) -> list[ConfigSpec]:
        specs = [s for b in self.sub_blocks.values() for s in b.expected_configs]
        return _union(specs + list(self.loop_expected_configs))

    @property
    def inputs(self) -> list[InputParam]:
        inputs = list(self.loop_inputs)
        produced: set[str] = set()
        for block in self.sub_blocks.values():
            for param in block.inputs:
                # full dataclass equality, as diffusers: same name with another description appears twice
                if param.name not in produced and param not in inputs:
                    inputs.append(param)
            produced.update(o.name for o in block.intermediate_outputs)
        required = set(self.required_inputs)
        for param in inputs:  # diffusers sets `required` in place on the collected params
            param.required = param.name in required
        return inputs

    @property
    def required_inputs(self) -> list[str]:
        names = set(self.loop_required_inputs)
        for block in self.sub_blocks.values():
            names.update(block.required_inputs)
        return sorted(names)

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        combined = combine_outputs(*((name, b.intermediate_outputs) for name, b in self.sub_blocks.items()))
        names = {o.name for o in combined}
        return combined + [o for o in self.loop_intermediate_outputs if o.name not in names]

    @property
    def outputs(self) -> list[OutputParam]:
        if not self.sub_blocks:
            return []
        return next(reversed(self.sub_blocks.values())).intermediate_outputs

    # -- running -------------------------------------------------------------------------------------------
    def loop_step(self, components, block_state: BlockState, **kwargs: Any):
        """One iteration: every sub-block in order on the shared ``block_state``, same ``kwargs`` to each."""
        for name, block in self.sub_blocks.items():
            components, block_state = run_block(name, block, components, block_state, **kwargs)
        return components, block_state

    def __call__(self, components, state: PipelineState):
        raise NotImplementedError("`__call__` method needs to be implemented by the subclass")

    @torch.compiler.disable
    def progress_bar(self, iterable: Iterable | None = None, total: int | None = None):
        config = getattr(self, "_progress_bar_config", {})
        if not isinstance(config, dict):
            raise ValueError(f"`self._progress_bar_config` should be of type `dict`, but is {type(config)}.")
        if iterable is not None:
            return tqdm(iterable, **config)
        if total is not None:
            return tqdm(total=total, **config)
        raise ValueError("Either `total` or `iterable` has to be defined.")

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        self._progress_bar_config = kwargs
