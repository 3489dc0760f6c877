"""Every diffusers modular family's own core denoise step, built offline from tiny configs.

A family recipe (``loopgraph/zoo/families/<family>.py``) names the family's ``*CoreDenoiseStep`` (its input,
set-timesteps, prepare-latents and denoise blocks, unchanged), tiny components with seeded random weights
(configs from diffusers' own fast tests) and the user inputs the step takes (embeddings instead of prompts:
no text encoder, no tokenizer). ``build_family`` finds the loop wrapper among the step's blocks; every
``new_state()`` runs the blocks before it eagerly, as the pipeline would, so the loop starts from the state
diffusers makes — the scheduler reset, the latents prepared, the guider configured.

diffusers is optional: it is imported inside the builders only (``pip install loopgraph[diffusers]``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .diffusers_loops import require_diffusers

__all__ = ["FAMILIES", "Calls", "Coverage", "FamilyRecipe", "FamilySetup", "build_family", "coverage", "describe",
           "run_calls", "table_rows"]

# family -> its loop as diffusers names it; recipes live in loopgraph/zoo/families/<family>.py
FAMILIES: tuple[str, ...] = (
    "anima", "cosmos", "echo", "ernie_image", "flux", "flux2", "flux3", "helios", "hunyuan_video1_5",
    "ideogram4", "krea2", "ltx", "ltx2", "minimax_h3", "minimax_music3", "qwenimage", "qwenimage21",
    "stable_diffusion_3", "stable_diffusion_xl", "wan", "wan_animate_2", "z_image",
)


@dataclass(frozen=True)
class FamilyRecipe:
    """What a family file returns: the core denoise step, its components and its user inputs."""

    core: Any                                   # the family's *CoreDenoiseStep instance
    components: dict[str, Any]
    inputs: dict[str, Any]                      # user inputs of the core step (not num_inference_steps)
    generator_input: str | None = "generator"   # the input given a fresh seeded torch.Generator per call
    steps_input: str | None = "num_inference_steps"  # None: the family takes no step count (see per_steps)
    per_steps: Callable[[int], dict[str, Any]] | None = None  # inputs that depend on N (a schedule of N values)
    kwargs_types: dict[str, str] = field(default_factory=dict)  # input -> kwargs type (``denoiser_input_fields``)
    core_name: str | None = None  # the step's class name, when ``core`` is a resolved copy (``get_execution_blocks``)


def _is_loop_wrapper(block: Any) -> bool:
    return all(hasattr(block, name) for name in ("loop_step", "sub_blocks", "get_block_state", "set_block_state"))


@dataclass
class FamilySetup:
    """A family's core denoise step, split at its loop wrapper.

    ``new_state()`` fills a ``PipelineState`` with the inputs (defaults for the rest, as ``ModularPipeline``
    does) and runs the blocks before the loop; ``wrapper(components, state)`` runs the loop (``compile_loop``
    it); ``run()`` does both and the blocks after, eagerly, and returns the final latents.
    """

    family: str
    core: Any
    wrapper: Any
    loop_name: str
    before: list[tuple[str, Any]]
    after: list[tuple[str, Any]]
    components: Any                            # the family's ModularPipeline, holding the tiny components
    inputs: dict[str, Any]
    steps: int
    seed: int
    generator_input: str | None = "generator"
    steps_input: str | None = "num_inference_steps"
    per_steps: Callable[[int], dict[str, Any]] | None = None
    kwargs_types: dict[str, str] = field(default_factory=dict)
    core_name: str = ""
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def call_inputs(self, steps: int | None = None) -> dict[str, Any]:
        """The inputs of one pipeline call: the inputs, the step count (and what depends on it), a fresh seeded
        generator."""
        steps = self.steps if steps is None else steps
        kwargs = dict(self.inputs)
        if self.steps_input is not None:
            kwargs[self.steps_input] = steps
        if self.per_steps is not None:
            kwargs.update(self.per_steps(steps))
        if self.generator_input is not None:
            kwargs[self.generator_input] = torch.Generator().manual_seed(self.seed)
        return kwargs

    def pipeline_kwargs(self, steps: int | None = None) -> dict[str, Any]:
        """``call_inputs`` as ``ModularPipeline.__call__`` takes them: kwargs-type inputs grouped in one dict each."""
        kwargs: dict[str, Any] = {}
        for name, value in self.call_inputs(steps).items():
            kind = self.kwargs_types.get(name)
            if kind is None:
                kwargs[name] = value
            else:
                kwargs.setdefault(kind, {})[name] = value
        return kwargs

    def new_state(self, steps: int | None = None):
        """A fresh state as the loop receives it: inputs set, the blocks before the loop run eagerly."""
        from diffusers.modular_pipelines import PipelineState

        state = PipelineState()
        given = self.call_inputs(steps)
        for name, kind in self.kwargs_types.items():  # a kwargs-type bag's entries, as ModularPipeline tags them
            if name in given:
                state.set(name, given.pop(name), kind)
        for param in self.core.inputs:
            if param.name in given:
                state.set(param.name, given.pop(param.name), param.kwargs_type)
            elif param.name is not None and param.name not in state.values:
                state.set(param.name, param.default, param.kwargs_type)
        for name, value in given.items():   # inputs the step does not declare (a family file's extra)
            state.set(name, value)
        with torch.no_grad():
            for _, block in self.before:
                _, state = block(self.components, state)
        return state

    def finish(self, state):
        """The blocks after the loop, eagerly."""
        with torch.no_grad():
            for _, block in self.after:
                _, state = block(self.components, state)
        return state

    def run(self, loop: Any = None, steps: int | None = None):
        """One whole call of the core step (``loop`` in place of the wrapper); returns the final state."""
        loop = self.wrapper if loop is None else loop
        with torch.no_grad():
            _, state = loop(self.components, self.new_state(steps))
        return self.finish(state)


def _split(core: Any) -> tuple[str, Any, list, list]:
    blocks = list(core.sub_blocks.items())
    found = [i for i, (_, block) in enumerate(blocks) if _is_loop_wrapper(block)]
    if len(found) != 1:
        raise ValueError(f"{type(core).__name__}: expected one loop wrapper among its blocks "
                         f"{[name for name, _ in blocks]}, found {len(found)}")
    i = found[0]
    return blocks[i][0], blocks[i][1], blocks[:i], blocks[i + 1:]


def build_family(family: str, *, steps: int = 4, seed: int = 0, progress: bool = False) -> FamilySetup:
    """Build a diffusers family's core denoise step offline, split at its loop wrapper.

    Args:
        family: one of ``FAMILIES``.
        steps: number of denoising steps N.
        seed: seeds the weights, the inputs and each call's generator.
        progress: show the wrapper's progress bar.

    Example:
        >>> setup = build_family("stable_diffusion_3", steps=2)
        >>> setup.run().get("latents").shape
        torch.Size([1, 4, 8, 8])
    """
    require_diffusers()
    if family not in FAMILIES:
        raise ValueError(f"unknown diffusers family {family!r}; known: {list(FAMILIES)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    module = importlib.import_module(f"{__package__}.families.{family}")
    recipe: FamilyRecipe = module.recipe(seed, torch.Generator().manual_seed(seed + 1))
    core = recipe.core
    loop_name, wrapper, before, after = _split(core)
    wrapper.set_progress_bar_config(disable=not progress)
    components = core.init_pipeline()  # the family's ModularPipeline; no network with no repo id
    components.update_components(**recipe.components)
    return FamilySetup(family=family, core=core, wrapper=wrapper, loop_name=loop_name, before=before,
                       after=after, components=components, inputs=recipe.inputs, steps=steps, seed=seed,
                       generator_input=recipe.generator_input, steps_input=recipe.steps_input,
                       per_steps=recipe.per_steps, kwargs_types=dict(recipe.kwargs_types),
                       core_name=recipe.core_name or type(core).__name__)


# -- coverage: how compile_loop runs each family -----------------------------------------------------------------------
TABLE_BEGIN, TABLE_END = "<!-- families: begin (python -m loopgraph.zoo.diffusers_families --write FILE) -->", \
    "<!-- families: end -->"


@dataclass(frozen=True)
class Coverage:
    """One row of the coverage table: how ``compile_loop`` runs a family's loop, and why when not whole."""

    family: str
    core: str       # the core denoise step's class
    loop: str       # its loop wrapper's class
    runs_as: str    # "whole loop on state buffers", "eager segments", "eager"
    why: str        # "" when whole and planned once per N; else what keeps it from that

    def markdown(self) -> str:
        return f"| {self.family} | `{self.core}` → `{self.loop}` | {self.runs_as} | {self.why or '—'} |"


def _short(text: str) -> str:
    """Paths made machine-independent: ``.../site-packages/diffusers/x.py`` -> ``diffusers/x.py``."""
    import re

    return re.sub(r" at 0x[0-9a-f]+", "", re.sub(r"/\S*/site-packages/", "", text)).replace("|", "\\|")


@dataclass
class Calls:
    """What ``run_calls`` saw: why a call planned again (by call number: 2, 3), and the compiles after each N."""

    again: dict[int, list[str]] = field(default_factory=dict)
    compiles: dict[int, int] = field(default_factory=dict)


def run_calls(setup: FamilySetup, fast: Any, steps: tuple[int, ...] = (4, 6), calls: int = 3,
              each: Callable[[int, int, Any], None] | None = None) -> Calls:
    """Call the compiled loop ``calls`` times at each step count; ``each(n, call, state)`` sees every result. The
    first call at each count plans; a later one that plans again is noted with why."""
    seen = Calls()
    for n in steps:
        setup.steps = n
        for call in range(1, calls + 1):
            plans = fast.stats.plans
            state = setup.run(fast)
            if call > 1 and fast.stats.plans > plans:  # why the newest plan did not fit
                seen.again.setdefault(call, []).extend(m for loop in _compiled(fast) for m in loop._plans.misses[:1])
            if each is not None:
                each(n, call, state)
        seen.compiles[n] = fast.stats.compiles
    return seen


def describe(setup: FamilySetup, fast: Any, calls: Calls) -> Coverage:
    """The coverage row of a compiled family loop after ``run_calls``: how its newest plan runs, and why not as
    a whole compiled loop planned once per step count and compiled once."""
    import re

    loops = _compiled(fast)
    why = sorted({_short(p) for loop in loops for p in loop.last_plan.problems})
    runs_as = loops[0].last_plan.kind
    inner = getattr(fast, "inner_loops", {})
    if inner:
        runs_as = f"its step loop: {runs_as}"
        why.insert(0, "; ".join(
            f"its own loop runs eagerly (Python per chunk); compile_loop plans the step loop in "
            f"`{i.loop.owner.__name__}.__call__` ({_short(i.loop.where)})" for i in inner.values()))
    again = calls.again
    if again:
        when = "every call" if max(again) > 2 else "call 2"
        why.insert(0, f"plans again on {when}: " + "; ".join(dict.fromkeys(_short(m) for m in again[max(again)])))
    counts = list(calls.compiles.values())
    if counts and counts[-1] > counts[0] > 0:
        why.append("a new step count compiles new code (" + ", ".join(
            f"{c} compiled after N={n}" for n, c in calls.compiles.items()) + ")")
    text = re.sub(r" at 0x[0-9a-f]+", "", "; ".join(why))
    return Coverage(setup.family, setup.core_name, type(setup.wrapper).__name__, runs_as, text)


def _compiled(fast: Any) -> list:
    """The compiled loops that ran: the loop itself, or the step loops compiled inside its blocks."""
    inner = [i.compiled for i in getattr(fast, "inner_loops", {}).values() if i.compiled is not None]
    return inner or [fast]


def coverage(family: str, **options) -> tuple[Coverage, Any, FamilySetup]:
    """Compile ``family``'s loop (``options`` as for ``compile_loop``; backend "eager" unless given), ``run_calls``
    it and say how it ran. Returns the row, the compiled loop and the setup."""
    import warnings

    from ..compile import compile_loop

    setup = build_family(family)
    fast = compile_loop(setup.wrapper, **{"backend": "eager", **options})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calls = run_calls(setup, fast)
    return describe(setup, fast, calls), fast, setup


def coverage_table(rows: list[Coverage]) -> str:
    head = ["| family | core denoise step → loop wrapper | runs as | why not a whole compiled loop |",
            "|---|---|---|---|"]
    return "\n".join([TABLE_BEGIN, *head, *(r.markdown() for r in rows), TABLE_END])


def table_rows(text: str) -> dict[str, str]:
    """The rows of the coverage table in ``text`` (a markdown page), by family."""
    body = text.split(TABLE_BEGIN, 1)[1].split(TABLE_END, 1)[0]
    return {line.split("|")[1].strip(): line for line in body.strip().splitlines()[2:]}


def main(argv: list[str] | None = None) -> None:
    import argparse
    from pathlib import Path

    parser = argparse.ArgumentParser(description="How compile_loop runs each diffusers family (backend eager).")
    parser.add_argument("families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--write", metavar="FILE", help="replace the table between the markers in FILE")
    args = parser.parse_args(argv)
    rows = []
    for family in args.families:
        try:
            rows.append(coverage(family)[0])
        except Exception as e:  # a loop that raises where eager works: the table says so
            setup = build_family(family)
            first = _short(str(e).strip().splitlines()[0]) if str(e).strip() else ""
            rows.append(Coverage(family, setup.core_name, type(setup.wrapper).__name__, "raises",
                                 f"{type(e).__name__}: {first}"))
        print(rows[-1].markdown(), flush=True)
    if args.write:
        path = Path(args.write)
        text = path.read_text()
        before, rest = text.split(TABLE_BEGIN, 1)
        old = table_rows(text)
        old.update({r.family: r.markdown() for r in rows})
        new_rows = [old[f] for f in FAMILIES if f in old]
        head = coverage_table([]).splitlines()[1:3]
        path.write_text(before + "\n".join([TABLE_BEGIN, *head, *new_rows, TABLE_END]) + rest.split(TABLE_END, 1)[1])


if __name__ == "__main__":
    main()
