"""``ModularPipeline``: holds components and config, seeds a ``PipelineState`` from keyword inputs, runs blocks.

No hub loading: components are built by the caller (or from ``from_config`` specs) and registered with
``update_components``. The pipeline object is what every block receives as ``components``.
"""

from __future__ import annotations

import copy
import logging
import types
import warnings
from typing import Any

import torch

from .blocks import ModularPipelineBlocks
from .state import ComponentSpec, PipelineState

__all__ = ["ModularPipeline"]

logger = logging.getLogger(__name__)


class ModularPipeline:
    """Runs ``blocks`` with registered components.

    Example:
        >>> pipe = blocks.init_pipeline()            # or ModularPipeline(blocks)
        >>> pipe.update_components(scheduler=sched, denoiser=model)
        >>> latents = pipe(latents=x, num_inference_steps=20, output="latents")
    """

    def __init__(self, blocks: ModularPipelineBlocks | None = None, **components: Any) -> None:
        if blocks is None:
            raise ValueError("ModularPipeline needs `blocks` (loopgraph has no default blocks to load from a hub)")
        if not isinstance(blocks, ModularPipelineBlocks) and not callable(blocks):
            raise TypeError(f"ModularPipeline: `blocks` must be pipeline blocks, got {type(blocks).__name__}")
        self._blocks = blocks
        self._component_specs: dict[str, ComponentSpec] = {s.name: s for s in blocks.expected_components}
        self._config_specs = {s.name: s for s in getattr(blocks, "expected_configs", [])}
        self.config = types.SimpleNamespace(**{name: spec.default for name, spec in self._config_specs.items()})
        for name, spec in self._component_specs.items():
            made = spec.create() if spec.default_creation_method == "from_config" and spec.type_hint else None
            setattr(self, name, made)
        if components:
            self.update_components(**components)

    # -- components ------------------------------------------------------------------------------------------
    @property
    def blocks(self) -> ModularPipelineBlocks:
        """A deep copy of the blocks (edit it and build a new pipeline; this one keeps its own)."""
        return copy.deepcopy(self._blocks)

    @property
    def component_names(self) -> list[str]:
        return list(self._component_specs)

    @property
    def null_component_names(self) -> list[str]:
        return [name for name in self._component_specs if getattr(self, name, None) is None]

    @property
    def components(self) -> dict[str, Any]:
        return {name: getattr(self, name, None) for name in self._component_specs}

    def get_component_spec(self, name: str) -> ComponentSpec:
        if name not in self._component_specs:
            raise ValueError(f"No component named {name!r}; known: {sorted(self._component_specs)}")
        return copy.deepcopy(self._component_specs[name])

    def update_components(self, **kwargs: Any) -> None:
        """Register component objects and config values by name. Unknown names are ignored with a warning."""
        for name in list(kwargs):
            if name in self._component_specs:
                component = kwargs.pop(name)
                hint = self._component_specs[name].type_hint
                if component is not None and isinstance(hint, type) and not isinstance(component, hint):
                    logger.warning(
                        "update_components: %s is a %s, expected %s", name, type(component).__name__, hint.__name__
                    )
                setattr(self, name, component)
            elif name in self._config_specs:
                setattr(self.config, name, kwargs.pop(name))
        if kwargs:
            warnings.warn(f"update_components: unexpected keyword arguments {sorted(kwargs)} are ignored", stacklevel=2)

    def _modules(self):
        return [c for c in self.components.values() if isinstance(c, torch.nn.Module)]

    @property
    def device(self) -> torch.device:
        modules = self._modules()
        for module in modules:
            for p in module.parameters():
                return p.device
        return torch.device("cpu")

    _execution_device = device

    @property
    def dtype(self) -> torch.dtype:
        for module in self._modules():
            for p in module.parameters():
                return p.dtype
        return torch.float32

    def to(self, *args: Any, **kwargs: Any) -> ModularPipeline:
        for module in self._modules():
            module.to(*args, **kwargs)
        return self

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        """Configure the progress bar of every loop wrapper, however deeply nested (diffusers only reaches
        direct children)."""
        stack = [self._blocks]
        while stack:
            block = stack.pop()
            if hasattr(block, "set_progress_bar_config"):
                block.set_progress_bar_config(**kwargs)
            stack.extend(getattr(block, "sub_blocks", {}).values())

    @property
    def default_call_parameters(self) -> dict[str, Any]:
        return {p.name: p.default for p in self._blocks.inputs if p.name is not None}

    # -- running -----------------------------------------------------------------------------------------------
    def __call__(self, state: PipelineState | None = None, output: str | list[str] | tuple | None = None,
                 **kwargs: Any) -> Any:
        """Seed a state from ``kwargs`` (a deep copy of ``state`` when given), run the blocks, return ``output``.

        Args:
            state: a ``PipelineState`` to continue from; it is deep-copied, never mutated.
            output: None for the whole state, a name for one value, a list/tuple of names for a dict.
            **kwargs: inputs by name, or one dict per kwargs type (e.g. ``denoiser_input_fields={...}``).
        """
        if output is not None and not isinstance(output, (str, list, tuple)):
            raise ValueError(f"`output` must be None, a str or a list of str, got {type(output).__name__}")
        state = PipelineState() if state is None else copy.deepcopy(state)
        passed = dict(kwargs)
        for param in self._blocks.inputs:
            if param.name in passed:
                state.set(param.name, passed.pop(param.name), param.kwargs_type)
            elif param.kwargs_type is not None and param.kwargs_type in passed:
                bag = passed.pop(param.kwargs_type)
                if not isinstance(bag, dict):
                    raise TypeError(f"input {param.kwargs_type!r} must be a dict of values, got {type(bag).__name__}")
                for key, value in bag.items():
                    state.set(key, value, param.kwargs_type)
            elif param.name is not None and param.name not in state.values:
                state.set(param.name, param.default, param.kwargs_type)
        if passed:
            warnings.warn(f"Unexpected input '{passed.keys()}' provided. This input will be ignored.", stacklevel=2)
        with torch.no_grad():
            _, state = self._blocks(self, state)
        if output is None:
            return state
        if isinstance(output, str):
            return state.get(output)
        return {name: state.get(name) for name in output}

    def __repr__(self) -> str:
        comps = "\n".join(f"  {name}: {type(obj).__name__}" for name, obj in self.components.items())
        return f"{type(self).__name__}(\n  blocks: {type(self._blocks).__name__}\n{comps}\n)"
