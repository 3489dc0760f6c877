"""Compiled code that outlives the process: AOTInductor packages in the persistent cache (backend/disk_cache.py).

Inductor's own caches do not cover the whole loop: its FX-graph cache refuses any graph holding a ``while_loop``,
and even a cached graph is traced again by Dynamo in every process. So the compiled code is made here as an
AOTInductor package instead: the program is exported (``torch.export``, tables' length N dynamic) and compiled by
``aoti_compile_and_package`` into one file, loaded by AOTInductor's package loader (milliseconds) in a later
process.
Measured: docs/benchmarks/cpu-cold-start.

Weights are not in the package. A step graph's constants (the model's parameters and buffers, the scheduler's
tensors) are *lifted*: they become leading inputs of the exported program, and every call passes the step
graphs' own tensors, so the code reads the live parameters (an in-place update is seen, as with torch.compile)
and one package serves any weights of the same shapes.

Three programs are stored, one per way a plan runs:

    WholeLoopProgram   the lowered loop (lower.lower_lifted): every step, while_loops, a C++ loop on CPU
    StepProgram        one step at a device counter, for the whole-loop CUDA graph (backend/cudagraph.py)
    SegmentProgram     one compiled segment's step graph, between eager blocks (runtime/eager_segments.py)

``Artifact`` is the callable a plan runs: on its first call (and on inputs of other specs) it makes the key,
loads the package or builds and stores it, then calls it. The key covers what the code depends on: the lifted
graphs' code, the specs (shape, strides, dtype, device) of every input and which inputs are one tensor, the
compile options and Inductor's settings, and this process's torch / triton / Python versions, loopgraph's source,
the CPU's vector ISA or the GPU's architecture.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import hashlib
import logging
import platform
import sys
import tempfile
import time
import warnings
import weakref
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx

from ..passes.loop_plan import LoopPlan
from .disk_cache import FORMAT, CacheStore
from .lower import lower_lifted, run_step

logger = logging.getLogger("loopgraph.compile")

__all__ = ["Artifact", "WholeLoopProgram", "StepProgram", "SegmentProgram", "lift_constants", "environment"]


def lift_constants(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[str]]:
    """A copy of ``gm`` whose tensor attributes (parameters, buffers) are its leading inputs, one per distinct
    tensor, and their attribute names in ``gm`` in that order. Raises ``TypeError`` on an attribute that is not a
    tensor (it could not be passed in)."""
    graph = copy.deepcopy(gm.graph)
    first = next(iter(graph.nodes))
    names: list[str] = []
    inputs: dict[int, fx.Node] = {}
    for node in [n for n in graph.nodes if n.op == "get_attr"]:
        value = _attr(gm, node.target)
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"step graph attribute {node.target!r} is a {type(value).__name__}, not a tensor")
        if id(value) not in inputs:
            with graph.inserting_before(first):
                inputs[id(value)] = graph.placeholder(f"constant_{len(names)}")
            names.append(node.target)
        node.replace_all_uses_with(inputs[id(value)])
        graph.erase_node(node)
    return fx.GraphModule(torch.nn.Module(), graph), names


def _attr(module: torch.nn.Module, target: str) -> Any:
    for part in target.split("."):
        module = getattr(module, part)
    return module


class _Lifted:
    """A step graph with its constants lifted: the lifted module, and how to read the constants' live values."""

    def __init__(self, module: fx.GraphModule) -> None:
        self.source = module
        self.module, self.names = lift_constants(module)
        self.code = self.module.code

    def constants(self) -> list[torch.Tensor]:
        return [_attr(self.source, name) for name in self.names]


class WholeLoopProgram:
    """The lowered loop over flat inputs: every variant's constants, the state, the invariants, every variant's
    tables, ends, start -> the final state. Called like lower.lower's function: ``(buffers, invariants, tables,
    ends, start)``, the final state written into ``buffers``."""

    kind = "whole loop"

    def __init__(self, plan: LoopPlan) -> None:
        self.steps = [_Lifted(v.module) for v in plan.variants]
        self.run = lower_lifted(plan, [s.module for s in self.steps], export=True)
        self.code = [s.code for s in self.steps] + [repr([v for v, _, _ in plan.runs]),
                                                    repr([v.whole_tables for v in plan.variants])]
        self.describe = f"whole loop: {len(plan.variants)} step graph(s), runs {[v for v, _, _ in plan.runs]}"

    def flatten(self, buffers, invariants, tables, ends, start) -> tuple[list[torch.Tensor], list[int], tuple]:
        """The flat inputs, which of them are tables (their length N is dynamic), and the sizes of their groups."""
        constants = [c for s in self.steps for c in s.constants()]
        counts = ([len(s.names) for s in self.steps], len(buffers), len(invariants), [len(vt) for vt in tables])
        flat = [*constants, *buffers, *invariants, *(t for vt in tables for t in vt), ends, start]
        first = len(constants) + len(buffers) + len(invariants)
        return flat, list(range(first, first + sum(map(len, tables)))), counts

    def run_flat(self, counts: tuple, flat: list) -> tuple:
        n_consts, n_state, n_inv, n_tables = counts
        constants = [_take(flat, n) for n in n_consts]
        state, invariants = _take(flat, n_state), _take(flat, n_inv)
        tables = [_take(flat, n) for n in n_tables]
        ends, start = flat
        return tuple(self.run(state, invariants, tables, ends, start, constants))

    def finish(self, args, outputs):
        for buffer, final in zip(args[0], outputs):
            buffer.copy_(final)


class StepProgram:
    """One step of a variant at a device counter, ``(carried, invariants, tables, i) -> outputs``: the whole-loop
    CUDA graph's step (backend/cudagraph.py)."""

    kind = "step"

    def __init__(self, module: fx.GraphModule, whole_tables: bool) -> None:
        self.step, self.whole_tables = _Lifted(module), whole_tables
        self.code = [self.step.code, repr(whole_tables)]
        self.describe = "one step graph"

    def flatten(self, carried, invariants, tables, i):
        constants = self.step.constants()
        counts = (len(constants), len(carried), len(invariants), len(tables))
        first = len(constants) + len(carried) + len(invariants)
        return [*constants, *carried, *invariants, *tables, i], list(range(first, first + len(tables))), counts

    def run_flat(self, counts: tuple, flat: list) -> tuple:
        constants, carried, invariants, tables = (_take(flat, n) for n in counts)
        return tuple(run_step(self.step.module, self.whole_tables, carried, invariants, tables, flat[0], constants))

    def finish(self, args, outputs):
        return list(outputs)


class SegmentProgram:
    """A compiled segment's step graph, ``(*inputs, *table rows) -> outputs`` (runtime/eager_segments.py)."""

    kind = "segment step"

    def __init__(self, module: fx.GraphModule) -> None:
        self.step = _Lifted(module)
        self.code = [self.step.code]
        self.describe = "one segment step graph"

    def flatten(self, *args):
        return [*self.step.constants(), *args], [], ()

    def run_flat(self, counts: tuple, flat: list) -> tuple:
        return tuple(self.step.module(*flat))

    def finish(self, args, outputs):
        return outputs


class _Exported(torch.nn.Module):
    """What ``torch.export`` takes: a program's ``run_flat`` over flat tensor inputs, their group sizes fixed."""

    def __init__(self, program, counts: tuple) -> None:
        super().__init__()
        self.program, self.counts = program, counts

    def forward(self, *flat):
        return self.program.run_flat(self.counts, list(flat))


def _take(flat: list, n: int) -> list:
    taken = flat[:n]
    del flat[:n]
    return taken


class Artifact:
    """A program's compiled code from the persistent cache: loaded, or built and stored, on its first call (and
    on inputs of new specs). ``fallback()`` makes the in-process torch.compile route, used when the program
    cannot be exported or packaged (with a warning saying why). ``origin`` says where the code came from."""

    def __init__(self, program, store: CacheStore, options: dict, device: torch.device, counter,
                 fallback: Callable[[], Callable], label: str = "") -> None:
        self.program, self.store, self.options, self.device = program, store, options, device
        self.counter, self.fallback, self.label = counter, fallback, label
        self.loaded: dict[tuple, Any] = {}       # input specs -> the loaded package
        self.origin: str | None = None          # "loaded from ..." / "compiled in ... s, stored as ..."
        self.compiled: Callable | None = None   # the in-process route, once the package route failed

    def __call__(self, *args):
        return self.bind(*args)()

    def bind(self, *args) -> Callable:
        """The call on ``args``, prepared once (inputs flattened, their specs checked, the code found) and run by
        the returned function, which may be called again with new values for the last inputs, of the same specs
        (a whole loop's chunks: ``run(ends, start)``) without preparing again."""
        if self.compiled is None:
            flat, tables, counts = self.program.flatten(*args)
            specs = _specs(flat, tables)
            runner = self.loaded.get(specs)
            if runner is None:
                runner = self._find(flat, tables, counts, specs)
                if runner is not None:
                    self.loaded[specs] = runner
            if runner is not None:
                return lambda *last: self.program.finish(args, runner(*flat[:len(flat) - len(last)], *last))
        return lambda *last: self.compiled(*args[:len(args) - len(last)], *last)

    def _find(self, flat: list[torch.Tensor], tables: list[int], counts: tuple, specs: tuple):
        env = environment(self.device)
        key = _key(self.program, specs, self.options, env)
        found = self.store.get(key, env)
        name = self.label or self.program.kind
        if found is not None:
            start = time.perf_counter()
            try:
                runner = _load(found[0], self.device)
            except Exception as e:  # noqa: BLE001 — an entry this torch cannot load: built again
                warnings.warn(f"loopgraph cache: could not load {found[0]} ({type(e).__name__}: {e}); removed, "
                              f"it is built again", stacklevel=5)
                self.store.remove(key)
            else:
                self.counter.loaded += 1
                self.origin = f"loaded from {found[0]} ({time.perf_counter() - start:.2f} s)"
                logger.info("compile_loop: %s: %s", name, self.origin)
                return runner
        logger.info("compile_loop: %s: compiling the %s (AOTInductor) into %s", name, self.program.describe,
                    self.store.root)
        start = time.perf_counter()
        self.counter.count += 1
        try:
            path, _ = self.store.put(key, functools.partial(self._build, flat, tables, counts),
                                     {**env, **self._about(specs, tables), "what": f"{name}: {self.program.describe}"})
            runner = _load(path, self.device)
        except Exception as e:  # noqa: BLE001 — not exportable or packageable: compiled in this process instead
            self.counter.count -= 1  # the in-process compilation counts itself
            warnings.warn(f"compile_loop: {name}: the compiled {self.program.kind} cannot be stored in the persistent "
                          f"cache ({type(e).__name__}: {e}); compiled in this process only (cache=False skips "
                          f"trying)", stacklevel=5)
            self.compiled = self.fallback()
            self.origin = f"compiled in this process (not storable: {type(e).__name__})"
            return None
        seconds = time.perf_counter() - start
        self.counter.seconds += seconds
        self.origin = f"compiled in {seconds:.1f} s (AOTInductor), stored as {path}"
        logger.info("compile_loop: %s: %s", name, self.origin)
        return runner

    def _about(self, specs: tuple, tables: list[int]) -> dict:
        """What tells this entry apart from another of the same loop (``loopgraph cache list``): digests of the
        code and of the inputs' specs, the options, for which N, and the Inductor settings the key hashed."""
        def digest(value) -> str:
            return hashlib.sha256(repr(value).encode()).hexdigest()[:12]

        dynamic = any(spec[0][:1] == ("N",) for spec in specs)
        return {"code": digest(self.program.code), "inputs": digest(specs),
                "options": {k: repr(v) for k, v in sorted(self.options.items())},
                "steps": "any N >= 2" if dynamic else ("any N" if not tables else "the traced N only"),
                "inductor_settings": _inductor_settings()}

    def _build(self, flat: list[torch.Tensor], tables: list[int], counts: tuple, path: Path) -> None:
        import torch._inductor

        steps = torch.export.Dim("steps", min=2)
        dynamic = [{0: steps} if k in tables and flat[k].shape[0] >= 2 else None for k in range(len(flat))]
        with torch.no_grad(), warnings.catch_warnings():
            # torch 2.13's own AOTInductor path deep-copies pytree specs and warns of its deprecated LeafSpec
            warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)", FutureWarning)
            exported = torch.export.export(_Exported(self.program, counts), tuple(flat),
                                           dynamic_shapes=(tuple(dynamic),), strict=False)
            torch._inductor.aoti_compile_and_package(exported, package_path=str(path),
                                                     inductor_configs=dict(self.options))


def _load(path: Path, device: torch.device) -> Callable:
    """A package's compiled code as ``(*flat inputs) -> outputs``. On CPU, through the AOTInductor C interface of
    the package's model library, called with ``ctypes``, which releases the GIL for the call (the package loader's
    Python binding holds it for the whole loop: a server's other threads froze for a whole generation). Elsewhere,
    and for a package whose constants live outside its library, from AOTInductor's C++ loader itself:
    ``torch._inductor.aoti_load_package`` first reads the whole archive in Python (``load_pt2``: 1.5 s for the
    default loop's package on this CPU, most of a warm start's budget), and the inputs are flat tensors already (no
    pytree specs to apply). On CUDA the runner skips its thread synchronisation (``run_single_threaded``, as
    AOTInductor advises under CUDA graphs); calls of one compiled loop are serialised by its lock."""
    if device.type == "cpu":
        library = _model_library(path)
        if library is not None:
            return CModel(path, library)
    loader = torch._C._aoti.AOTIModelPackageLoader(str(path), "model", device.type == "cuda", 1, -1)
    return lambda *flat: loader.boxed_run(list(flat))


def _model_library(path: Path) -> str | None:
    """The name in the package of its one model library, when the package holds nothing else it needs at run time
    (no constants or weights files, no custom objects): the sources and metadata beside it are for people."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    libraries = [n for n in names if "/data/aotinductor/model/" in n and n.endswith(".so")]
    others = [n for n in names if "/data/" in n and "/data/aotinductor/model/" not in n]
    return libraries[0] if len(libraries) == 1 and not others else None


_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype, _capsule_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
_new_capsule = ctypes.pythonapi.PyCapsule_New
_new_capsule.restype, _new_capsule.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]


class CModel:
    """A CPU package's model library, called through AOTInductor's C interface (``aoti_runtime/interface.h``) with
    ``ctypes``: the GIL is released while the compiled loop runs. Input tensors are passed as new handles (the
    call takes them), outputs come back as handles that become tensors."""

    def __init__(self, path: Path, library: str) -> None:
        with tempfile.TemporaryDirectory(prefix="loopgraph-") as folder:  # the library stays loaded once deleted
            with zipfile.ZipFile(path) as archive:
                self.lib = ctypes.CDLL(archive.extract(library, folder))
        handle = ctypes.c_void_p()
        self._check(self.lib.AOTInductorModelContainerCreateWithDevice(ctypes.byref(handle), ctypes.c_size_t(1),
                                                                          b"cpu", None), "create its model")
        self.handle = handle
        weakref.finalize(self, self.lib.AOTInductorModelContainerDelete, handle)
        outputs = ctypes.c_size_t()
        self._check(self.lib.AOTInductorModelContainerGetNumOutputs(handle, ctypes.byref(outputs)), "count outputs")
        self.outputs = outputs.value
        self.run = self.lib.AOTInductorModelContainerRun
        self.run.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t,
                             ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p]
        self.path = path

    def _check(self, code: int, what: str) -> None:
        if code != 0:
            raise RuntimeError(f"AOTInductor package {self.path if hasattr(self, 'path') else ''}: could not {what} "
                               f"(error {code}; its message is on stderr)")

    def __call__(self, *flat: torch.Tensor) -> list[torch.Tensor]:
        handles = torch._C._aoti.unsafe_alloc_void_ptrs_from_tensors(list(flat))
        inputs = (ctypes.c_void_p * len(handles))(*[_capsule_pointer(h, None) for h in handles])
        outputs = (ctypes.c_void_p * self.outputs)()
        self._check(self.run(self.handle, inputs, len(handles), outputs, self.outputs, None, None), "run")
        return torch._C._aoti.alloc_tensors_by_stealing_from_void_ptrs(
            [_new_capsule(h, None, None) for h in outputs])


def _specs(flat: list[torch.Tensor], tables: list[int]) -> tuple:
    """What the compiled code depends on in its inputs: each one's spec (a table's length N aside, when it is
    exported dynamic) and which inputs are one tensor."""
    tables_set = set(tables)
    first: dict[int, int] = {}
    specs = []
    for k, t in enumerate(flat):
        shape = tuple(t.shape)
        if k in tables_set and shape[0] >= 2:
            shape = ("N", *shape[1:])
        specs.append((shape, t.stride()[1:] if k in tables_set else t.stride(), t.dtype, t.device.type,
                      first.setdefault(id(t), k)))
    return tuple(specs)


def _key(program, specs: tuple, options: dict, env: dict) -> str:
    text = repr((FORMAT, program.kind, program.code, specs, sorted(options.items()), sorted(env.items())))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=None)
def _loopgraph_source() -> str:
    """A digest of loopgraph's own source (the package and its kernels): code built by another loopgraph misses."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for folder in (root, root.parent / "kernels"):
        for path in sorted(folder.rglob("*.py")) if folder.is_dir() else ():
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def _device_fingerprint(device_type: str, index: int | None) -> str:
    """The GPU's architecture, or the CPU's: ATen's vector capability and a digest of the CPU's feature flags
    (code built for AVX-512 must not load where there is none). Cheap: Inductor's own ISA probe compiles."""
    if device_type == "cuda":
        props = torch.cuda.get_device_properties(index or 0)
        return f"cuda sm_{props.major}{props.minor} {props.name}"
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = platform.processor()
    return (f"{device_type} {platform.machine()} {torch.backends.cpu.get_cpu_capability()} "
            f"flags:{hashlib.sha256(flags.encode()).hexdigest()[:12]}")


def environment(device: torch.device) -> dict[str, str]:
    """What, besides the program, the compiled code depends on: checked again when an entry is loaded. The
    Inductor settings are the process's (``torch._inductor.config``, which a user may change: ``freezing``,
    ``cpp.simdlen``...), as Inductor's own FX-graph cache keys them."""
    from torch._inductor import config as inductor_config

    return {"torch": torch.__version__, "triton": _triton(), "python": ".".join(map(str, sys.version_info[:3])),
            "loopgraph": _loopgraph_source(), "device": _device_fingerprint(device.type, device.index),
            "inductor_config": _inductor_hash()}


def _inductor_settings() -> dict[str, str]:
    """The Inductor settings the key hashes, by name, as text: those Inductor's own FX-graph cache hashes. Left
    out: the compile-ignored ones, those under its ``_cache_config_ignore_prefix`` (``compile_threads`` follows
    the process's CPU affinity: two processes of one machine would compile one loop twice) and
    ``aot_inductor.metadata`` (which AOTInductor fills in place while it compiles). Empty where this torch does
    not say which they are."""
    from torch._inductor import config as inductor_config

    try:  # aot_inductor.metadata: AOTInductor adds the device to it, in place, while it compiles
        settings = inductor_config._get_dict(ignored_keys=[*inductor_config._compile_ignored_keys,
                                                           "aot_inductor.metadata"],
                                             ignored_prefixes=list(inductor_config._cache_config_ignore_prefix))
    except (AttributeError, TypeError):
        return {}
    return {k: repr(v)[:80] for k, v in sorted(settings.items())}


def _inductor_hash() -> str:
    from torch._inductor import config as inductor_config

    settings = _inductor_settings()
    if not settings:
        return inductor_config.get_hash().hex()
    return hashlib.md5(repr(sorted(settings.items())).encode(), usedforsecurity=False).hexdigest()


@functools.lru_cache(maxsize=None)
def _triton() -> str:
    try:
        from importlib.metadata import version

        return version("triton")
    except Exception:  # noqa: BLE001 — not installed
        return "none"
