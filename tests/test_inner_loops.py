"""Step loops inside plain blocks (loopgraph/inner_loops.py): a wrapper that loops over chunks, one of whose blocks
runs the timesteps in a ``for`` loop of its own (diffusers' Helios, MiniMax Music 3, Wan-Animate-2). compile_loop
runs the chunks eagerly and the step loop compiled where it is. Equality with eager first; the model's forward
is counted independently (a compiled call does not run it)."""

import importlib.util
import io
import sys

import pytest
import torch
from tqdm.auto import tqdm

from loopgraph import InputParam, Interrupted, ModularPipelineBlocks, OutputParam, PipelineState, compile_loop
from loopgraph.inner_loops import LOCAL, find_step_loop

from .helpers import ChunkLoop as ChunkWrapper
from .helpers import ChunkScheduler as Scheduler
from .helpers import Components
from .helpers import PrepareChunk as Prepare
from .helpers import assert_same, quiet


class CountedNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, t, context):
        return torch.tanh(self.lin(x) * (1 + t) + context.mean(1, keepdim=True))


class Denoise(ModularPipelineBlocks):
    """The step loop: locals carried across iterations, a dict of tensors, a progress bar, a comprehension whose
    variable is named like the chunk index."""

    @property
    def inputs(self):
        return [InputParam("latents"), InputParam("timesteps"), InputParam("context"), InputParam("bias"),
                InputParam("bar_file")]

    @property
    def intermediate_outputs(self):
        return [OutputParam("latents"), OutputParam("last_i")]

    @torch.no_grad()
    def __call__(self, components, block_state, k: int):
        latents = block_state.latents
        timesteps = block_state.timesteps
        extra = {"context": block_state.context, "bias": (block_state.bias, block_state.bias * 2)}
        keys = [k for k in extra]  # `k` here is the comprehension's, not the chunk index
        with tqdm(total=len(timesteps), file=block_state.bar_file, disable=block_state.bar_file is None) as bar:
            for i, t in enumerate(timesteps):
                out = components.net(latents, t, extra[keys[0]])
                out = out + extra["bias"][1]
                latents = components.scheduler.step(out, t, latents)[0]
                bar.update()
        block_state.latents = latents
        block_state.last_i = i
        return components, block_state


class Collect(ModularPipelineBlocks):
    @property
    def intermediate_outputs(self):
        return [OutputParam("chunks")]

    def __call__(self, components, block_state, k: int):
        block_state.chunks.append(block_state.latents)
        return components, block_state


class ChunkLoop(ChunkWrapper):
    block_classes = [Prepare, Denoise, Collect]
    block_names = ["prepare", "denoise", "collect"]


def new_state(steps=4, chunks=2, bias=0.0, bar_file=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    state = PipelineState()
    for name, value in {"noise": torch.randn(chunks, 1, 3, 4, generator=gen), "num_steps": steps,
                        "context": torch.randn(1, 3, 4, generator=gen), "bias": torch.full((1, 1, 4), bias),
                        "num_chunks": chunks, "bar_file": bar_file}.items():
        state.set(name, value)
    return state


def forwards(fn):
    """``fn()``'s result, and how many times the model's forward ran meanwhile (counted by the interpreter's profile
    hook, outside anything the compiled loop sees)."""
    count = 0

    def profile(frame, event, arg):
        nonlocal count
        count += event == "call" and frame.f_code is CountedNet.forward.__code__

    sys.setprofile(profile)
    try:
        return fn(), count
    finally:
        sys.setprofile(None)


def components():
    return Components(net=CountedNet(), scheduler=Scheduler())


def results(state):
    return {"chunks": state.get("chunks"), "latents": state.get("latents"), "last_i": state.get("last_i")}


def test_the_step_loop_is_found_with_what_its_body_reads_and_keeps():
    loop = find_step_loop(Denoise())
    assert loop is not None and loop.problem is None, loop and loop.problem
    lines = open(__file__).read().splitlines()
    line = next(k + 1 for k, text in enumerate(lines) if "for i, t in enumerate(timesteps):" in text)
    assert loop.where.endswith(f"test_inner_loops.py:{line}"), loop.where
    # `k` (the comprehension's) and `out` (assigned before it is read) are not loaded; `latents` is carried; `i`
    # is read after the loop
    assert set(loop.loads) == {"latents", "extra", "keys", "bar", "timesteps"}, loop.loads
    assert set(loop.stores) == {"latents", "i"}, loop.stores
    assert loop.enumerate and loop.schedule == LOCAL + "timesteps"


def test_a_step_loop_inside_a_block_runs_compiled_and_equals_eager():
    eager_comps, comps = components(), components()
    wrapper = ChunkLoop()
    fast = compile_loop(ChunkLoop(), backend="eager")
    assert list(fast.inner_loops) == ["denoise"]
    for call in range(3):
        expected = results(wrapper(eager_comps, new_state(seed=call))[1])
        (_, state), ran = forwards(lambda: quiet(fast, comps, new_state(seed=call)))
        assert_same(results(state), expected, f"call {call}")
        assert comps.scheduler.step_index == eager_comps.scheduler.step_index == 4
        # the first chunk traces (eagerly: its 4 steps); every later chunk runs the compiled step loop: no forward
        assert ran == (4 if call == 0 else 0), ran
    inner = fast.inner_loops["denoise"].compiled
    assert fast.stats.plans == inner.stats.plans == 1  # the same program for both chunks: one plan
    assert inner.stats.compiled_calls == 5 and fast.stats.compiled_calls == 5  # (stats: the inner loops', summed)
    assert inner.last_plan.kind == "whole loop on state buffers"
    assert "compiled where they are" in fast.explain() and "Denoise.__call__" in fast.explain()
    assert fast.wrapper.sub_blocks["denoise"].__class__ is Denoise  # the block is put back after each call


def test_tensors_inside_a_dict_local_are_data_inputs_a_new_value_runs_the_same_plan():
    eager_comps, comps = components(), components()
    fast = compile_loop(ChunkLoop(), backend="eager")
    for bias in (0.0, 0.5, -1.0):
        expected = results(ChunkLoop()(eager_comps, new_state(bias=bias))[1])
        assert_same(results(quiet(fast, comps, new_state(bias=bias))[1]), expected, f"bias {bias}")
    assert fast.stats.plans == 1


def test_a_new_step_count_plans_the_step_loop_again_and_equals_eager():
    eager_comps, comps = components(), components()
    fast = compile_loop(ChunkLoop(), backend="eager")
    for steps in (4, 6, 4):
        expected = results(ChunkLoop()(eager_comps, new_state(steps=steps))[1])
        assert_same(results(quiet(fast, comps, new_state(steps=steps))[1]), expected, f"N={steps}")
    assert fast.stats.plans == 2


def test_the_blocks_progress_bar_advances_once_per_step_on_compiled_calls():
    fast = compile_loop(ChunkLoop(), backend="eager")
    comps = components()
    quiet(fast, comps, new_state())
    file = io.StringIO()
    quiet(fast, comps, new_state(bar_file=file, steps=4))
    assert fast.stats.compiled_calls >= 2 and "4/4" in file.getvalue(), file.getvalue()


class InPlaceThenRebound(Denoise):
    """MiniMax Music 3's pattern: the caller's latents are updated in place in the first step, then the local is
    rebound to the scheduler's new tensor; the caller's tensor keeps the intermediate value."""

    @property
    def intermediate_outputs(self):
        return [*super().intermediate_outputs, OutputParam("given")]

    @torch.no_grad()
    def __call__(self, components, block_state, k: int):
        latents = block_state.latents
        for i, t in enumerate(block_state.timesteps):
            if i == 0:
                latents[..., :2] = 0.5 * latents[..., :2]
            out = components.net(latents, t, block_state.context)
            latents = components.scheduler.step(out, t, latents)[0]
        block_state.given = block_state.latents  # the caller's tensor, kept to compare
        block_state.latents, block_state.last_i = latents, i
        return components, block_state


class InPlaceLoop(ChunkLoop):
    block_classes = [Prepare, InPlaceThenRebound, Collect]


def test_the_callers_tensor_updated_in_place_then_rebound_keeps_eagers_intermediate_value():
    eager_comps, comps = components(), components()
    fast = compile_loop(InPlaceLoop(), backend="eager")
    for call in range(2):
        _, eager_state = InPlaceLoop()(eager_comps, new_state())
        _, state = quiet(fast, comps, new_state())
        assert isinstance(eager_state.get("given"), torch.Tensor)
        assert_same(state.get("given"), eager_state.get("given"), f"call {call}: the caller's tensor")
        assert_same(results(state), results(eager_state), f"call {call}")
    assert fast.inner_loops["denoise"].compiled.stats.compiled_calls == 3  # every chunk but the traced one


class Breaks(Denoise):
    def __call__(self, components, block_state, k: int):
        latents = block_state.latents
        for i, t in enumerate(block_state.timesteps):
            latents = components.scheduler.step(components.net(latents, t, block_state.context), t, latents)[0]
            if latents.abs().max() > 100:
                break
        block_state.latents, block_state.last_i = latents, i
        return components, block_state


class BreakLoop(ChunkLoop):
    block_classes = [Prepare, Breaks, Collect]


def test_a_step_loop_that_cannot_be_compiled_where_it_is_says_why_and_the_loop_equals_eager():
    loop = find_step_loop(Breaks())
    assert loop.problem is not None and "`break`" in loop.problem and "line" in loop.problem
    eager_comps, comps = components(), components()
    fast = compile_loop(BreakLoop(), backend="eager")
    assert not fast.inner_loops
    expected = results(BreakLoop()(eager_comps, new_state())[1])
    assert_same(results(quiet(fast, comps, new_state())[1]), expected)
    assert "cannot be compiled where it is: `break` in the loop's body" in fast.explain()


@pytest.mark.parametrize("body, why", [
    ("x = components.scheduler.step(x, t)\n        return x", "`return` in the loop's body"),
    ("x = components.scheduler.step(x, t)\n        continue", "`continue` in the loop's body"),
    ("x = components.scheduler.step(x, t)\n        g(block_state)", "`block_state` used other than through"),
    ("x = components.scheduler.step(x, t)\n    else:\n        x = 0", "an `else:` clause"),
    ("global G\n        x = components.scheduler.step(x, t)", "`global` in the function"),
])
def test_what_keeps_a_step_loop_from_being_compiled_where_it_is_is_named(tmp_path, body, why):
    path = tmp_path / "step_loop_block.py"
    path.write_text(f"class Block:\n    def __call__(self, components, block_state, k):\n        x = 1\n"
                    f"        for t in block_state.ts:\n            {body.replace(chr(10), chr(10) + '    ')}\n"
                    f"        return components, block_state\n")
    spec = importlib.util.spec_from_file_location("step_loop_block", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    loop = find_step_loop(module.Block())
    assert loop is not None and why in loop.problem, loop and loop.problem


def test_step_callbacks_and_interruption_reach_the_step_loop_compiled_inside_a_block():
    comps = components()
    fast = compile_loop(ChunkLoop(), backend="eager")
    quiet(fast, comps, new_state())  # traces
    seen = []
    remove = fast.on_step_end(lambda e: seen.append((e.step, e.total, e.tensors["latents"])), every=2)
    _, state = quiet(fast, comps, new_state())
    remove()
    eager_steps = []
    wrapper = ChunkLoop()
    wrapper.sub_blocks["denoise"] = StepsSeen(eager_steps)
    wrapper(components(), new_state())
    assert [(s, n) for s, n, _ in seen] == [(1, 4), (3, 4)] * 2  # every 2nd step of each chunk's 4
    for (_, _, got), want in zip(seen, [eager_steps[1], eager_steps[3], eager_steps[5], eager_steps[7]]):
        assert torch.equal(got, want)
    fast.on_step_end(lambda e: fast.interrupt() if e.step == 1 else None)
    with pytest.raises(Interrupted, match="after 2 step"):
        quiet(fast, comps, new_state())


class StepsSeen(Denoise):
    """Denoise that keeps a copy of the latents after each step (the eager reference for step callbacks)."""

    def __init__(self, kept):
        super().__init__()
        self.kept = kept

    def __call__(self, components, block_state, k: int):
        latents = block_state.latents
        for i, t in enumerate(block_state.timesteps):
            out = components.net(latents, t, block_state.context) + block_state.bias * 2
            latents = components.scheduler.step(out, t, latents)[0]
            self.kept.append(latents.clone())
        block_state.latents, block_state.last_i = latents, i
        return components, block_state


def test_guard_check_on_a_loop_whose_step_loops_are_inside_its_blocks_says_it_cannot_tell():
    fast = compile_loop(ChunkLoop(), backend="eager")
    with pytest.raises(NotImplementedError, match="only a call can tell"):
        fast.guard_check(components(), new_state())


def test_last_plan_of_a_loop_whose_step_loop_is_inside_a_block_is_the_step_loops():
    fast = compile_loop(ChunkLoop(), backend="eager")
    assert fast.last_plan is None
    quiet(fast, components(), new_state())
    assert fast.last_plan.kind == "whole loop on state buffers"
    assert fast.last_plan == fast.inner_loops["denoise"].compiled.last_plan
