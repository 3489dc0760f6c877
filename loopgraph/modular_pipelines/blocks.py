"""The base of every block, ``ModularPipelineBlocks`` (what a leaf block subclasses), and ``run_block``, the one way
a block calls a sub-block (an error raised inside names the block).

Semantics are diffusers 0.42's (``shared/reference/diffusers-modular-api.md`` §2). One departure, deliberate: the
seed-era vocabulary (``intermediate_inputs`` on a block) is read as inputs. The blocks that hold sub-blocks are
built on this base, one file each: ``sequential_blocks.py``, ``loop_blocks.py``, ``auto_blocks.py``; the helpers
they share (sub-blocks built from classes or instances, the union of specs) are here.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections import OrderedDict
from typing import Any, Iterable

from .state import BlockState, ComponentSpec, ConfigSpec, InputParam, OutputParam, PipelineState

__all__ = ["ModularPipelineBlocks", "run_block"]

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


def _union(specs: Iterable[Any]) -> list[Any]:
    out: list[Any] = []
    for spec in specs:
        if spec not in out:
            out.append(spec)
    return out
