"""Compiled code that outlives the process: AOTInductor packages in the persistent cache (backend/disk_cache.py).

Inductor's own caches do not cover the whole loop: its FX-graph cache refuses any graph holding a ``while_loop``,
and even a cached graph is traced again by Dynamo in every process. So the compiled code is made here as an
AOTInductor package instead: the program (backend/programs.py) is exported (``torch.export``, tables' length N
dynamic) and compiled by ``aoti_compile_and_package`` into one file, loaded by AOTInductor's package loader
(milliseconds) in a later process, or on CPU called through its C interface (``CModel``, the GIL released).
Measured: docs/benchmarks/cpu-cold-start.

``Artifact`` is the callable a plan runs: on its first call (and on inputs of other specs) it makes the key
(backend/cache_key.py), loads the package or builds and stores it, then calls it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import tempfile
import time
import warnings
import weakref
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from .cache_key import _inductor_settings, _key, _specs, environment
from .disk_cache import CacheStore

logger = logging.getLogger("loopgraph.compile")

__all__ = ["Artifact"]


class _Exported(torch.nn.Module):
    """What ``torch.export`` takes: a program's ``run_flat`` over flat tensor inputs, their group sizes fixed."""

    def __init__(self, program, counts: tuple) -> None:
        super().__init__()
        self.program, self.counts = program, counts

    def forward(self, *flat):
        return self.program.run_flat(self.counts, list(flat))


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
    ``torch._inductor.aoti_load_package`` first reads the whole archive in Python (``load_pt2``: most of a warm
    start's time), and the inputs are flat tensors already (no
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
