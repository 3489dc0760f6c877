"""The methods ``loopgraph bench`` compares, and how each one runs the loop.

Each method gets its own copy of the loop, built from the same seed, so inputs and weights are identical:

    eager             the wrapper run as written (the semantics of the seed API and of diffusers)
    compile_denoiser  the same eager loop with the denoiser in ``torch.compile`` (what diffusers recommends
                      today: ``mode="reduce-overhead"`` on CUDA, the default mode on CPU)
    compile_loop      loopgraph (its persistent cache on, as by default: a later run loads the compiled loop)
    compile_loop_nocache       loopgraph compiled in the process by torch.compile (``cache=False``; optional)
    compile_loop_unbatched     loopgraph without batched guidance (optional)
    compile_wrapper   plain ``torch.compile`` of the wrapper's ``__call__`` (optional; its first call is
                      bounded by ``compile_timeout``)
"""

from __future__ import annotations

from typing import Callable

import torch

from ..compile import compile_loop

__all__ = ["DEFAULT_METHODS", "METHODS", "NoDenoiser", "make_method"]


METHODS = ("eager", "compile_denoiser", "compile_loop", "compile_loop_nocache", "compile_loop_unbatched",
           "compile_wrapper")
DEFAULT_METHODS = ("eager", "compile_denoiser", "compile_loop")


class NoDenoiser(ValueError):
    """The loop has no denoiser component to compile alone (compile_denoiser is skipped; there is no floor)."""


def _denoiser_name(setup, name: str | None = None) -> str:
    """The component that is the denoiser: ``name`` (``--denoiser``), else ``denoiser`` (the zoo), ``unet`` or
    ``transformer`` (diffusers)."""
    for candidate in (name,) if name else ("denoiser", "unet", "transformer"):
        if isinstance(getattr(setup.components, candidate, None), torch.nn.Module):
            return candidate
    models = sorted(k for k, v in getattr(setup.components, "__dict__", {}).items() if isinstance(v, torch.nn.Module))
    looked = f"no component {name!r}" if name else "no component named denoiser, unet or transformer"
    raise NoDenoiser(f"{looked} is a torch.nn.Module in {type(setup.wrapper).__name__}'s components (modules: "
                     f"{models}); name the denoiser with --denoiser NAME (run_loop(..., denoiser=NAME))")


def make_method(name: str, setup, denoiser: str | None = None) -> Callable:
    """``run(state) -> output`` for one method (the latents; a user loop's ``output``). Methods may share one
    ``setup``: compile_denoiser puts its compiled denoiser in only for its own calls. What a method compiled
    (the denoiser, the ``CompiledLoop``) is ``run.compiled``. ``denoiser`` names the component compile_denoiser
    compiles (default: ``denoiser``, ``unet`` or ``transformer``; ``NoDenoiser`` if there is none)."""
    output = getattr(setup, "output", "latents")
    if name == "eager":
        return lambda state: setup.wrapper(setup.components, state)[1].get(output)
    if name == "compile_denoiser":
        mode = "reduce-overhead" if setup.device.type == "cuda" else None
        denoiser = _denoiser_name(setup, denoiser)
        model = getattr(setup.components, denoiser)
        compiled = torch.compile(model, mode=mode)

        def run(state):
            setattr(setup.components, denoiser, compiled)
            try:
                return setup.wrapper(setup.components, state)[1].get(output)
            finally:
                setattr(setup.components, denoiser, model)

        run.compiled = compiled
        return run
    if name.startswith("compile_loop"):  # unbatched: one model call per guidance batch; nocache: torch.compile
        fast = compile_loop(setup.wrapper, batch_guidance=name != "compile_loop_unbatched",
                            cache=name != "compile_loop_nocache")

        def run(state):
            return fast(setup.components, state)[1].get(output)

        run.compiled = fast
        return run
    if name == "compile_wrapper":
        call = torch.compile(setup.wrapper.__call__)
        return lambda state: call(setup.components, state)[1].get(output)
    raise ValueError(f"unknown method {name!r}; choose from {list(METHODS)}")
