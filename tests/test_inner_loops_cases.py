"""Step loops inside plain blocks (loopgraph/inner_loops.py), the cases a review found where the first version
differed from eager (each test failed then): values first made inside the loop, numbers read off tensors in dict
locals, liveness (annotations, walrus), closures, ``del``, ``try`` around the loop, progress bars, decorators
defined in the class, a source edited after import, a block replaced after compile_loop, two compiled loops of one
wrapper in two threads, step callbacks. Each runs the same wrapper eagerly and compiled and compares; a loop that
cannot be compiled where it is says why and still equals eager."""

import io

import torch

from loopgraph import InputParam, ModularPipelineBlocks, OutputParam, PipelineState, compile_loop
from loopgraph.inner_loops import find_step_loop

from .helpers import ChunkLoop as ChunkWrapper
from .helpers import ChunkScheduler as Scheduler
from .helpers import Components
from .helpers import PrepareChunk as Prepare
from .helpers import assert_same, quiet


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(4, 4)

    def forward(self, x, t):
        return torch.tanh(self.lin(x) * (1 + t))


def comps():
    return Components(net=Net(), scheduler=Scheduler())


class Collect(ModularPipelineBlocks):
    @property
    def intermediate_outputs(self):
        return [OutputParam("chunks")]

    def __call__(self, components, block_state, k: int):
        block_state.chunks.append((block_state.latents, getattr(block_state, "out", None)))
        return components, block_state


class ChunkLoop(ChunkWrapper):
    block_classes = [Prepare]
    block_names = ["prepare"]


def loop_of(denoise):
    return type(f"Loop_{denoise.__name__}", (ChunkLoop,), {"block_classes": [Prepare, denoise, Collect],
                                                          "block_names": ["prepare", "denoise", "collect"]})


def new_state(steps=4, chunks=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    state = PipelineState()
    for name, value in {"noise": torch.randn(chunks, 1, 3, 4, generator=gen), "num_steps": steps,
                        "num_chunks": chunks}.items():
        state.set(name, value)
    return state


def eager_and_compiled(denoise, calls=2, keys=("chunks", "latents"), refused=None, eager=False, **kw):
    """(eager results, compiled results) per call; the step loop compiles where it is, or (``refused``) says why
    not."""
    Loop = loop_of(denoise)
    loop = find_step_loop(denoise())
    assert loop is not None and (refused in (loop.problem or "") if refused else loop.problem is None), loop.problem
    fast = compile_loop(Loop(), backend="eager")
    ce, cc = comps(), comps()
    pairs = []
    for call in range(calls):
        _, se = Loop()(ce, new_state(seed=call, **kw))
        _, sc = quiet(fast, cc, new_state(seed=call, **kw))
        pairs.append(({k: se.get(k) for k in keys}, {k: sc.get(k) for k in keys}))
    if not refused and not eager:  # the step loop ran compiled (a chunk whose inputs differ plans again)
        assert fast.stats.compiled_calls >= 1, fast.explain()
    return pairs, fast


def assert_all_same(pairs):
    for call, (e, c) in enumerate(pairs):
        assert_same(c, e, f"call {call}")


# -- probes ---------------------------------------------------------------------------------------------------------
class ClosureReadAfter(ModularPipelineBlocks):
    """A helper defined before the loop reads a local the loop assigns; it is called only after the loop."""

    def __call__(self, components, block_state, k: int):
        latents = block_state.latents
        last = None

        def final():
            return last

        for t in block_state.timesteps:
            latents = components.scheduler.step(components.net(latents, t), t, latents)[0]
            last = latents * 2
        block_state.out = final()
        block_state.latents = latents
        return components, block_state


def test_a_local_read_after_the_loop_only_through_a_nested_function_is_kept():
    pairs, _ = eager_and_compiled(ClosureReadAfter, refused='a function defined outside the loop')
    assert_all_same(pairs)


class ClosureInLoop(ModularPipelineBlocks):
    """A helper defined before the loop reads a carried local; the body calls it."""

    def __call__(self, components, block_state, k: int):
        latents = block_state.latents
        scale = lambda: latents.mean()  # noqa: E731
        for t in block_state.timesteps:
            latents = components.scheduler.step(components.net(latents, t), t, latents)[0] + scale()
        block_state.latents = latents
        return components, block_state


def test_a_nested_function_in_the_body_sees_the_current_iterations_local():
    pairs, _ = eager_and_compiled(ClosureInLoop, refused='a function defined outside the loop')
    assert_all_same(pairs)


class AnnotatedOnly(ModularPipelineBlocks):
    def __call__(self, components, block_state, k: int):
        latents = block_state.latents
        for t in block_state.timesteps:
            latents: torch.Tensor
            latents = components.scheduler.step(components.net(latents, t), t, latents)[0]
        block_state.latents = latents
        return components, block_state


def test_a_bare_annotation_in_the_body_does_not_count_as_an_assignment():
    pairs, _ = eager_and_compiled(AnnotatedOnly)
    assert_all_same(pairs)


class DelAttr(ModularPipelineBlocks):
    def __call__(self, components, block_state, k: int):
        latents = block_state.latents
        block_state.out = "tmp"
        for i, t in enumerate(block_state.timesteps):
            latents = components.scheduler.step(components.net(latents, t), t, latents)[0]
            if i == 0:
                del block_state.out
        block_state.latents = latents
        return components, block_state


def test_a_block_state_attribute_the_body_deletes():
    pairs, _ = eager_and_compiled(DelAttr, calls=2, refused="`del` in the loop's body")
    assert_all_same(pairs)


class DelLocal(ModularPipelineBlocks):
    def __call__(self, components, block_state, k: int):
        latents = block_state.latents
        noise_pred = None
        for t in block_state.timesteps:
            noise_pred = components.net(latents, t)
            latents = components.scheduler.step(noise_pred, t, latents)[0]
            del noise_pred
        try:
            block_state.out = noise_pred
        except NameError:
            block_state.out = "deleted"
        block_state.latents = latents
        return components, block_state


def test_a_local_the_body_deletes_stays_deleted_after_the_loop():
    pairs, _ = eager_and_compiled(DelLocal, refused="`del` in the loop's body")
    assert_all_same(pairs)


class Raises(ModularPipelineBlocks):
    def __call__(self, components, block_state, k: int):
        latents = block_state.latents
        try:
            for i, t in enumerate(block_state.timesteps):
                latents = components.scheduler.step(components.net(latents, t), t, latents)[0]
                block_state.out = i
                if i == 2:
                    raise ValueError("stop early")
        except ValueError:
            pass
        block_state.latents = latents
        return components, block_state


def test_an_exception_the_block_catches_around_its_step_loop():
    pairs, _ = eager_and_compiled(Raises, calls=2, refused='inside a `try`')
    assert_all_same(pairs)


class WithBar(ModularPipelineBlocks):
    def __call__(self, components, block_state, k: int):
        from tqdm.auto import tqdm
        latents = block_state.latents
        with tqdm(total=len(block_state.timesteps), disable=True) as bar:
            for t in block_state.timesteps:
                latents = components.scheduler.step(components.net(latents, t), t, latents)[0]
                bar.set_postfix_str(f"t={float(t):.2f}")
                bar.update()
            block_state.out = bar.n
        block_state.latents = latents
        return components, block_state


def test_a_progress_bar_used_for_more_than_update_runs_the_loop_as_written():
    pairs, fast = eager_and_compiled(WithBar, eager=True)
    assert_all_same(pairs)
    assert "ran as written on 4 call(s): its progress bar 'local_bar' is used for more than update()" in fast.explain()


class BarEveryOther(ModularPipelineBlocks):
    def __call__(self, components, block_state, k: int):
        from tqdm.auto import tqdm
        latents = block_state.latents
        with tqdm(total=len(block_state.timesteps), file=io.StringIO()) as bar:
            for i, t in enumerate(block_state.timesteps):
                latents = components.scheduler.step(components.net(latents, t), t, latents)[0]
                if i % 2 == 1:
                    bar.update()
            block_state.out = bar.n
        block_state.latents = latents
        return components, block_state


def test_a_progress_bar_updated_on_some_steps_only():
    pairs, _ = eager_and_compiled(BarEveryOther)
    assert_all_same(pairs)



class FloatOfCarried(ModularPipelineBlocks):
    """Python reads a number off the carried local at step 0 (the caller's tensor)."""

    def __call__(self, components, block_state, k: int):
        latents = block_state.latents
        for t in block_state.timesteps:
            norms = [float(x.norm()) for x in latents]
            latents = components.scheduler.step(components.net(latents, t), t, latents)[0]
        block_state.out = len(norms)
        block_state.latents = latents
        return components, block_state


def test_a_python_number_read_off_a_carried_local_that_holds_the_callers_tensor():
    pairs, _ = eager_and_compiled(FloatOfCarried, eager=True)
    assert_all_same(pairs)


class FloatInDict(ModularPipelineBlocks):
    """Python reads a number off a tensor inside a dict local (Helios passes its conditions in a dict)."""

    def __call__(self, components, block_state, k: int):
        latents = block_state.latents
        extra = {"scale": block_state.noise[k].mean()}
        for t in block_state.timesteps:
            s = float(extra["scale"])
            latents = components.scheduler.step(components.net(latents, t) * s, t, latents)[0]
        block_state.latents = latents
        return components, block_state


def test_a_python_number_read_off_a_tensor_inside_a_dict_local():
    pairs, _ = eager_and_compiled(FloatInDict, eager=True)
    assert_all_same(pairs)


class ClassScopedDecorator(ModularPipelineBlocks):
    """``__call__`` decorated by a helper defined in the class body (not a module global)."""

    def _logged(f):
        import functools

        @functools.wraps(f)
        def wrapped(*args, **kwargs):
            return f(*args, **kwargs)
        return wrapped

    @_logged
    def __call__(self, components, block_state, k: int):
        latents = block_state.latents
        for t in block_state.timesteps:
            latents = components.scheduler.step(components.net(latents, t), t, latents)[0]
        block_state.latents = latents
        return components, block_state


def test_a_decorator_defined_in_the_class_body():
    Loop = loop_of(ClassScopedDecorator)
    expected = Loop()(comps(), new_state())[1].get("chunks")
    fast = compile_loop(Loop(), backend="eager")  # eager works; compile_loop should not raise
    assert_same(quiet(fast, comps(), new_state())[1].get("chunks"), expected)


class Plain(ModularPipelineBlocks):
    def __call__(self, components, block_state, k: int):
        latents = block_state.latents
        for t in block_state.timesteps:
            latents = components.scheduler.step(components.net(latents, t), t, latents)[0]
        block_state.latents = latents
        return components, block_state


class Doubled(Plain):
    def __call__(self, components, block_state, k: int):
        latents = block_state.latents
        for t in block_state.timesteps:
            latents = components.scheduler.step(components.net(latents, t), t, latents)[0] * 2
        block_state.latents = latents
        return components, block_state


def test_a_block_replaced_after_compile_loop_runs_the_new_block():
    fast = compile_loop(loop_of(Plain)(), backend="eager")
    quiet(fast, comps(), new_state())
    fast.wrapper.sub_blocks["denoise"] = Doubled()  # what the wrapper now runs eagerly
    expected = fast.wrapper(comps(), new_state())[1].get("chunks")
    assert_same(quiet(fast, comps(), new_state())[1].get("chunks"), expected)


def test_a_block_edited_on_disk_after_import_runs_the_imported_code(tmp_path):
    import importlib.util
    import sys
    path = tmp_path / "edited_block.py"
    source = ("from loopgraph import ModularPipelineBlocks\n\n"
              "class Edited(ModularPipelineBlocks):\n"
              "    def __call__(self, components, block_state, k):\n"
              "        latents = block_state.latents\n"
              "        for t in block_state.timesteps:\n"
              "            latents = components.scheduler.step(components.net(latents, t), t, latents)[0]\n"
              "        block_state.latents = latents\n"
              "        return components, block_state\n")
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("edited_block", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["edited_block"] = module
    spec.loader.exec_module(module)
    path.write_text(source.replace("[0]\n", "[0] * 0\n"))  # edited, not reloaded: Python runs the imported code
    Loop = loop_of(module.Edited)
    expected = Loop()(comps(), new_state())[1].get("chunks")
    fast = compile_loop(Loop(), backend="eager")
    assert_same(quiet(fast, comps(), new_state())[1].get("chunks"), expected)


class ShortCircuitWalrus(ModularPipelineBlocks):
    """A walrus that runs on the first step only: later steps read the value it left (carried)."""

    def __call__(self, components, block_state, k: int):
        latents = block_state.latents
        for i, t in enumerate(block_state.timesteps):
            first = i == 0 and (scale := latents.mean())
            latents = components.scheduler.step(components.net(latents, t) * scale, t, latents)[0]
        block_state.latents = latents
        return components, block_state


def test_a_walrus_that_runs_on_some_steps_only():
    pairs, _ = eager_and_compiled(ShortCircuitWalrus)
    assert_all_same(pairs)


class Gated(Prepare):
    def __call__(self, components, block_state, k: int):
        if k == 0 and getattr(components, "gate", None):
            components.gate()
        return super().__call__(components, block_state, k)


def test_two_compiled_loops_of_one_wrapper_called_from_two_threads_leave_its_blocks_as_they_were():
    import threading
    Loop = type("GatedLoop", (ChunkLoop,), {"block_classes": [Gated, Plain, Collect],
                                           "block_names": ["prepare", "denoise", "collect"]})
    wrapper = Loop()
    a, b = compile_loop(wrapper, backend="eager"), compile_loop(wrapper, backend="eager")
    a_in, b_in, a_done = threading.Event(), threading.Event(), threading.Event()

    def gate_a():  # a's proxy is in the wrapper: let b install its own, then finish first
        a_in.set()
        assert b_in.wait(10)

    def gate_b():
        b_in.set()
        assert a_done.wait(10)

    def run_a():
        quiet(a, Components(net=Net(), scheduler=Scheduler(), gate=gate_a), new_state())
        a_done.set()

    def run_b():
        assert a_in.wait(10)
        quiet(b, Components(net=Net(), scheduler=Scheduler(), gate=gate_b), new_state())

    threads = [threading.Thread(target=run_a), threading.Thread(target=run_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    block = wrapper.sub_blocks["denoise"]
    assert type(block) is Plain, f"the wrapper now holds {type(block).__name__} (a's proxy, outside a's lock)"


class FirstOnly(ModularPipelineBlocks):
    """A local first assigned inside the loop (at step 0 only), read after it."""

    def __call__(self, components, block_state, k: int):
        latents = block_state.latents
        for i, t in enumerate(block_state.timesteps):
            if i == 0:
                first = latents * 3
            latents = components.scheduler.step(components.net(latents, t), t, latents)[0]
        block_state.out = first
        block_state.latents = latents
        return components, block_state


def test_a_tensor_local_first_assigned_in_the_loop_and_read_after_it():
    pairs, _ = eager_and_compiled(FirstOnly)
    assert_all_same(pairs)


class NewAttr(ModularPipelineBlocks):
    """A block_state attribute first set inside the loop (every step), read after it."""

    def __call__(self, components, block_state, k: int):
        latents = block_state.latents
        for t in block_state.timesteps:
            block_state.noise_pred = components.net(latents, t)
            latents = components.scheduler.step(block_state.noise_pred, t, latents)[0]
        block_state.out = block_state.noise_pred
        block_state.latents = latents
        return components, block_state


def test_a_block_state_attribute_first_set_inside_the_loop_and_read_after_it():
    pairs, _ = eager_and_compiled(NewAttr)
    assert_all_same(pairs)


class LastNoisePred(ModularPipelineBlocks):
    """A local assigned every step (not carried), read after the loop."""

    def __call__(self, components, block_state, k: int):
        latents = block_state.latents
        for t in block_state.timesteps:
            noise_pred = components.net(latents, t)
            latents = components.scheduler.step(noise_pred, t, latents)[0]
        block_state.out = noise_pred
        block_state.latents = latents
        return components, block_state


def test_a_tensor_local_assigned_every_step_and_read_after_the_loop():
    pairs, _ = eager_and_compiled(LastNoisePred)
    assert_all_same(pairs)


class ReadsChunkStart(ModularPipelineBlocks):
    """The body also reads ``block_state.latents`` (the chunk's start) while it carries the local ``latents``."""

    def __call__(self, components, block_state, k: int):
        latents = block_state.latents
        for t in block_state.timesteps:
            out = components.net(latents, t) + 0.01 * block_state.latents
            latents = components.scheduler.step(out, t, latents)[0]
        block_state.latents = latents
        return components, block_state


def test_a_step_callbacks_latents_is_the_loops_current_local():
    fast = compile_loop(loop_of(ReadsChunkStart)(), backend="eager")
    quiet(fast, comps(), new_state())  # traces
    last = []
    fast.on_step_end(lambda e: last.append(e.tensors["latents"]) if e.step == e.total - 1 else None)
    chunks = quiet(fast, comps(), new_state())[1].get("chunks")
    assert len(last) == len(chunks) == 2
    for seen, (final, _) in zip(last, chunks):  # after the last step, the block's latents are the chunk's result
        assert_same(seen, final)
