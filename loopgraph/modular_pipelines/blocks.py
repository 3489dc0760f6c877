"""Pipeline blocks: leaf blocks, sequences, loop wrappers and auto (conditional) blocks.

Semantics are diffusers 0.42's (``shared/reference/diffusers-modular-api.md`` §2). Two departures, both
deliberate: ``LoopSequentialPipelineBlocks.from_blocks_dict`` accepts classes (diffusers' is broken for them)
and keeps the leaf-only check, and the seed-era vocabulary (``intermediate_inputs`` on a block,
``loop_intermediate_inputs`` on a wrapper) is read as inputs.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections import OrderedDict
from typing import Any, Iterable

import torch
from tqdm.auto import tqdm

from .state import (
    BlockState,
    ComponentSpec,
    ConfigSpec,
    InputParam,
    OutputParam,
    PipelineState,
    combine_inputs,
    combine_outputs,
)

__all__ = [
    "ModularPipelineBlocks",
    "SequentialPipelineBlocks",
    "LoopSequentialPipelineBlocks",
    "AutoPipelineBlocks",
    "run_block",
]

logger = logging.getLogger(__name__)


def _merge_by_name(first: list[InputParam], extra: list[InputParam]) -> list[InputParam]:
    names = {p.name for p in first if p.name is not None}
    return list(first) + [p for p in extra if p.name is None or p.name not in names]


def _with_seed_inputs(fget, extra_attr: str):
    """Wrap an ``inputs``-like property getter so it also returns the seed-era ``extra_attr`` params."""

    def merged(self):
        return _merge_by_name(fget(self), getattr(self, extra_attr))

    merged.__wrapped__ = fget
    merged.__doc__ = fget.__doc__
    return merged


def run_block(name: str, block: Any, *args: Any, **kwargs: Any) -> Any:
    """Call ``block(*args, **kwargs)``; an error raised inside names the block and chains the original.

    The re-raised error keeps the original type when that type can be built from a message (so callers that
    catch ``ValueError`` still do); otherwise the original is re-raised with a note naming the block.
    """
    try:
        return block(*args, **kwargs)
    except Exception as e:
        where = f"Error in block '{name}' ({type(block).__name__})"
        logger.debug("%s", where, exc_info=True)
        try:
            wrapped = type(e)(f"{where}: {e}")
        except Exception:  # a constructor that wants more than a message: keep the original, with a note
            wrapped = None
        if wrapped is None:
            e.add_note(where)
            raise
        raise wrapped from e


class ModularPipelineBlocks:
    """Base class of every block. A leaf block overrides ``inputs``, ``intermediate_outputs``,
    ``expected_components`` and implements ``__call__(components, state) -> (components, state)``
    (or, inside a loop, ``__call__(components, block_state, **loop_kwargs) -> (components, block_state)``).
    """

    model_name: str | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Seed-era blocks declare `intermediate_inputs` beside `inputs`; both are read the same way
        # (diffusers folded them together in 0.35), so a subclass's own `inputs` gets them merged in.
        own = cls.__dict__.get("inputs")
        if isinstance(own, property) and not hasattr(own.fget, "__wrapped__"):
            cls.inputs = property(_with_seed_inputs(own.fget, "intermediate_inputs"))

    def __init__(self) -> None:
        self.sub_blocks: OrderedDict[str, ModularPipelineBlocks] = OrderedDict()

    # -- declarations ------------------------------------------------------------------------------------
    @property
    def description(self) -> str:
        return ""

    @property
    def expected_components(self) -> list[ComponentSpec]:
        return []

    @property
    def expected_configs(self) -> list[ConfigSpec]:
        return []

    @property
    def inputs(self) -> list[InputParam]:
        return list(self.intermediate_inputs)

    @property
    def intermediate_inputs(self) -> list[InputParam]:
        """Seed-era vocabulary: values produced by earlier blocks. Read exactly like ``inputs``."""
        return []

    @property
    def intermediate_outputs(self) -> list[OutputParam]:
        return []

    # -- derived -------------------------------------------------------------------------------------------
    @property
    def required_inputs(self) -> list[str]:
        return [p.name for p in self.inputs if p.required and p.name is not None]

    @property
    def outputs(self) -> list[OutputParam]:
        return self.intermediate_outputs

    @property
    def input_names(self) -> list[str]:
        return [p.name for p in self.inputs if p.name is not None]

    @property
    def intermediate_output_names(self) -> list[str]:
        return [p.name for p in self.intermediate_outputs]

    @property
    def output_names(self) -> list[str]:
        return [p.name for p in self.outputs]

    @property
    def component_names(self) -> list[str]:
        return [c.name for c in self.expected_components]

    # -- state ---------------------------------------------------------------------------------------------
    def get_block_state(self, state: PipelineState) -> BlockState:
        """Gather this block's inputs from ``state`` into a new ``BlockState`` (references, no copies)."""
        data: dict[str, Any] = {}
        for param in self.inputs:
            if param.name:
                value = state.get(param.name)
                if value is None:  # missing or explicitly None: the declared default applies (diffusers 0.40+)
                    value = param.default
                if param.required and value is None:
                    raise ValueError(f"Required input '{param.name}' is missing")
                if value is not None or param.name not in data:
                    data[param.name] = value
            elif param.kwargs_type:
                bag = data.setdefault(param.kwargs_type, {})
                for key, value in state.get_by_kwargs(param.kwargs_type).items():
                    if value is not None:
                        data[key] = value
                        bag[key] = value
        return BlockState(**data)

    def set_block_state(self, state: PipelineState, block_state: BlockState) -> None:
        """Write declared outputs, and inputs whose object changed, back to ``state``; drop the rest."""
        for out in self.intermediate_outputs:
            if not hasattr(block_state, out.name):
                raise ValueError(f"Intermediate output '{out.name}' is missing in block state")
            state.set(out.name, getattr(block_state, out.name), out.kwargs_type)
        for param in self.inputs:
            if param.name and hasattr(block_state, param.name):
                value = getattr(block_state, param.name)
                if state.get(param.name) is not value:  # identity: an in-place update needs no write
                    state.set(param.name, value, param.kwargs_type)
            elif param.name is None and param.kwargs_type:
                for key, current in state.get_by_kwargs(param.kwargs_type).items():
                    if key is not None and hasattr(block_state, key) and getattr(block_state, key) is not current:
                        state.set(key, getattr(block_state, key), param.kwargs_type)

    # -- pipeline ------------------------------------------------------------------------------------------
    def init_pipeline(self, pretrained_model_name_or_path: str | None = None, **kwargs: Any):
        """A ``ModularPipeline`` running a deep copy of these blocks (no hub loading)."""
        from .pipeline import ModularPipeline

        if pretrained_model_name_or_path is not None:
            raise NotImplementedError(
                "loopgraph does not load pipelines from the hub; call init_pipeline() and then "
                "pipe.update_components(...) with components you built."
            )
        return ModularPipeline(blocks=copy.deepcopy(self), **kwargs)

    def get_execution_blocks(self, **kwargs: Any):
        raise NotImplementedError(f"{type(self).__name__} has no execution blocks to resolve")

    @property
    def doc(self) -> str:
        lines = [f"class {type(self).__name__}", "", f"  {self.description}", "", "  Inputs:"]
        lines += [f"    {p!r}" for p in self.inputs]
        lines += ["", "  Outputs:"] + [f"    {p!r}" for p in self.outputs]
        if self.expected_components:
            lines += ["", "  Components:"] + [f"    {c.name} ({getattr(c.type_hint, '__name__', None)})"
                                              for c in self.expected_components]
        return "\n".join(lines)

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__}(", f"  Description: {self.description}"]
        for i, (name, block) in enumerate(self.sub_blocks.items()):
            lines.append(f"  [{i}] {name} ({type(block).__name__})")
        return "\n".join(lines) + "\n)"


def _instantiate(blocks: Iterable[tuple[str, Any]]) -> OrderedDict:
    return OrderedDict((name, block() if inspect.isclass(block) else block) for name, block in blocks)


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


def _union(specs: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for spec in specs:
        if spec not in out:
            out.append(spec)
    return out


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
