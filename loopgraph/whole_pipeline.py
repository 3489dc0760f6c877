"""``compile_pipeline``: every loop wrapper nested in a pipeline's blocks, compiled in place, in one line.

A pipeline holds its blocks as a tree: containers (sequential, auto, conditional: loopgraph's or diffusers') hold
named ``sub_blocks``, and somewhere below sit the loop wrappers (diffusers' SDXL preset:
``StableDiffusionXLAutoBlocks`` → ``denoise`` → ``denoise`` → ``denoise``, beside the inpainting and ControlNet
loops). ``compile_pipeline`` walks the whole tree, every branch (not only the one a given call takes), and puts
a ``CompiledLoop`` where each loop wrapper was, in the live tree (diffusers' ``ModularPipeline.blocks`` returns
a deep copy; the live one is ``_blocks``). A pipeline whose blocks are a loop wrapper themselves
(``Loop().init_pipeline()``) gets the ``CompiledLoop`` as its blocks; its path is ``<root>``.

The loop-wrapper protocol: an object is a loop wrapper when it is callable as ``wrapper(components, state)`` and
has ``sub_blocks`` (its loop blocks), ``loop_step``, ``get_block_state`` and ``set_block_state`` (what
``compile_loop`` needs); a container is any other object with a ``sub_blocks`` mapping. Loop classes that follow
it (diffusers' successor to ``LoopSequentialPipelineBlocks``) are found too.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, NamedTuple

import torch

from .compile import CompiledLoop, compile_loop

__all__ = ["CompiledSite", "compile_pipeline", "compiled_loops", "explain", "is_loop_wrapper"]

logger = logging.getLogger(__name__)

_WRAPPER_METHODS = ("loop_step", "get_block_state", "set_block_state")
_ROOT = "<root>"  # the path of a loop that is the pipeline's blocks themselves


class CompiledSite(NamedTuple):
    """One compiled thing of a pipeline: a loop (its dotted block path) or a component compiled by torch.compile."""

    path: str                  # "denoise.denoise.denoise", or "components.vae.decoder"
    kind: str                  # "loop" | "encoder" | "decoder"
    compiled: Any              # the CompiledLoop, or the module compiled in place


def is_loop_wrapper(block: Any) -> bool:
    """Whether ``block`` follows the loop-wrapper protocol (see the module docstring)."""
    return (callable(block) and isinstance(getattr(block, "sub_blocks", None), dict)
            and all(callable(getattr(block, name, None)) for name in _WRAPPER_METHODS))


def _root(pipe_or_blocks: Any) -> Any:
    """The live block tree: a pipeline's ``_blocks`` (``blocks`` may be a copy), or the blocks themselves."""
    blocks = vars(pipe_or_blocks).get("_blocks") if hasattr(pipe_or_blocks, "__dict__") else None
    return blocks if blocks is not None else pipe_or_blocks


def _walk(container: Any, path: str, seen: set[int], searched: list[str]):
    """(container, name, block, dotted path) for every block below ``container``, depth first."""
    if id(container) in seen:
        return
    seen.add(id(container))
    searched.append(f"{path or '<root>'} ({type(container).__name__})")
    for name, block in list(container.sub_blocks.items()):
        where = f"{path}.{name}" if path else name
        yield container, name, block, where
        if not isinstance(block, CompiledLoop) and not is_loop_wrapper(block) and isinstance(
                getattr(block, "sub_blocks", None), dict):
            yield from _walk(block, where, seen, searched)


def compile_pipeline(pipe_or_blocks: Any, *, encoders: bool = False, decoder: bool = False, **options) -> Any:
    """Compile every loop wrapper nested in a pipeline's blocks, in place, and return the pipeline.

    Args:
        pipe_or_blocks: a ``ModularPipeline`` (loopgraph's or diffusers') or a block tree (a container of blocks),
            or a loop wrapper itself.
        encoders: also compile the pipeline's text encoders (components named ``text_encoder*``) with
            ``torch.compile``, in place (``module.compile(backend=...)``, ``backend`` as for the loops). Off by
            default.
        decoder: also compile the VAE's decoder (``components.vae.decoder``), in place. Off by default.
        **options: ``compile_loop``'s options (``backend``, ``batch_guidance``, ...), for every loop.

    Returns:
        ``pipe_or_blocks``, its loops compiled in place: ``pipe(...)`` runs them compiled. A pipeline whose blocks are
        a loop wrapper (``Loop().init_pipeline()``) gets the ``CompiledLoop`` as its blocks. A bare loop wrapper,
        which nothing holds to replace, comes back compiled: ``compile_pipeline(wrapper)`` is
        ``compile_loop(wrapper, **options)``.

    Every branch is searched, not only the one a given call takes; a loop already compiled is left as it is (calling
    this twice compiles nothing more). ``loopgraph.explain(pipe)`` lists what is compiled, with dotted block paths.

    Example:
        >>> pipe = compile_pipeline(pipe)           # SDXL's, Flux's ... loops, wherever they sit
        >>> print(loopgraph.explain(pipe))
    """
    root = _root(pipe_or_blocks)
    if isinstance(root, CompiledLoop) or is_loop_wrapper(root):
        result = _compile_root(pipe_or_blocks, root, options)
    elif isinstance(getattr(root, "sub_blocks", None), dict):
        result = pipe_or_blocks
        _compile_tree(root, type(pipe_or_blocks).__name__, options)
    else:
        raise TypeError(f"compile_pipeline expects a ModularPipeline or pipeline blocks (blocks with `sub_blocks`, or "
                        f"a loop wrapper); got {type(pipe_or_blocks).__name__}")
    if encoders or decoder:
        if root is pipe_or_blocks:  # blocks hold no components
            warnings.warn("compile_pipeline: encoders=/decoder= compile a pipeline's components; these are blocks "
                          "without components: pass the pipeline", stacklevel=2)
        else:
            _compile_components(pipe_or_blocks, encoders, decoder, options.get("backend", "inductor"))
    return result


def _compile_root(pipe_or_blocks: Any, root: Any, options: dict[str, Any]) -> Any:
    """A loop wrapper that is the whole block tree: a pipeline runs its compiled loop as its blocks; a bare
    wrapper has no holder, so its compiled loop is the result. One already compiled is left as it is."""
    if isinstance(root, CompiledLoop):
        fast = root
    else:
        fast = compile_loop(root, **options)
        logger.info("compile_pipeline: %s (%s) will be traced and compiled on its first call", _ROOT,
                    type(root).__name__)
    if root is pipe_or_blocks:
        return fast
    pipe_or_blocks._blocks = fast  # the live tree (see _root): pipe(...) calls its blocks
    return pipe_or_blocks


def _compile_tree(root: Any, what: str, options: dict[str, Any]) -> None:
    """Put a ``CompiledLoop`` where each loop wrapper below ``root`` is; warn, naming what was searched, if none."""
    searched: list[str] = []
    found = 0
    for container, name, block, path in list(_walk(root, "", set(), searched)):
        if isinstance(block, CompiledLoop):
            block.path = block.path or path
            found += 1
        elif is_loop_wrapper(block):
            fast = compile_loop(block, **options)
            fast.path = path
            container.sub_blocks[name] = fast
            logger.info("compile_pipeline: %s (%s) will be traced and compiled on its first call", path,
                        type(block).__name__)
            found += 1
    if not found:
        warnings.warn(f"compile_pipeline: no loop wrapper found in {what}; searched {', '.join(searched)} (a loop "
                      f"wrapper has sub_blocks, loop_step, get_block_state and set_block_state)", stacklevel=3)


def _compile_components(pipe: Any, encoders: bool, decoder: bool, backend: str) -> None:
    compiled = vars(pipe).setdefault("_loopgraph_compiled", {})
    names = [n for n in getattr(pipe, "components", {}) if encoders and n.startswith("text_encoder")]
    targets = [(f"components.{n}", "encoder", getattr(pipe, n, None)) for n in names]
    if decoder:
        vae = getattr(pipe, "vae", None)
        targets.append(("components.vae.decoder", "decoder", getattr(vae, "decoder", None)))
    for path, kind, module in targets:
        if isinstance(module, torch.nn.Module) and path not in compiled:
            module.compile(backend=backend)  # in place: the pipeline keeps the same module object
            compiled[path] = CompiledSite(path, kind, module)


def compiled_loops(pipe_or_blocks: Any) -> list[CompiledSite]:
    """The compiled loops in a pipeline's blocks (and the components compile_pipeline compiled), with paths; a
    compiled loop that is the blocks themselves (``compile_loop(Loop()).init_pipeline()``) has the path ``<root>``."""
    root = _root(pipe_or_blocks)
    if isinstance(root, CompiledLoop):
        sites = [CompiledSite(_ROOT, "loop", root)]
    else:
        sites = [CompiledSite(path, "loop", block)
                 for _, _, block, path in _walk(root, "", set(), []) if isinstance(block, CompiledLoop)]
    extra = vars(pipe_or_blocks).get("_loopgraph_compiled", {}) if hasattr(pipe_or_blocks, "__dict__") else {}
    return sites + list(extra.values())


def explain(pipe_or_blocks: Any) -> str:
    """What ``compile_pipeline`` compiled in a pipeline: each loop's dotted path, its class, whether it has run
    compiled yet (and how), and the components compiled with ``torch.compile``."""
    sites = compiled_loops(pipe_or_blocks)
    if not sites:
        return f"{type(pipe_or_blocks).__name__}: nothing compiled (run loopgraph.compile_pipeline on it)"
    lines = [f"{type(pipe_or_blocks).__name__}: {len(sites)} compiled"]
    for site in sites:
        if site.kind != "loop":
            lines.append(f"  {site.path}: {type(site.compiled).__name__} ({site.kind}, torch.compile in place)")
            continue
        fast = site.compiled
        plan = fast.last_plan
        status = "not called yet (its first call traces and compiles)" if plan is None else (
            f"{plan.kind}; calls={fast.stats.calls} compiled_calls={fast.stats.compiled_calls}")
        lines.append(f"  {site.path}: {type(fast.wrapper).__name__} -> {status}")
    return "\n".join(lines)
