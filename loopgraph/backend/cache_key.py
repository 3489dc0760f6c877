"""The key of compiled code in the persistent cache (backend/artifacts.py stores it, backend/disk_cache.py keeps
the files): what the code depends on. ``_key`` hashes the program's code (its lifted graphs), the specs (shape,
strides, dtype, device) of every input and which inputs are one tensor (``_specs``), the compile options, and
``environment``: Inductor's settings and this process's torch / triton / Python versions, loopgraph's source, the
CPU's vector ISA or the GPU's architecture, checked again when an entry is loaded.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import sys
from pathlib import Path

import torch

from .disk_cache import FORMAT

__all__ = ["environment"]


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
