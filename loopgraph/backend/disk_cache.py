"""The persistent cache of compiled loops: files on disk, one entry per key, safe to share between processes.

Where it lives: ``compile_loop(cache=...)`` (a folder), else ``$LOOPGRAPH_CACHE_DIR`` (set to an empty string:
no cache), else the user cache directory (``~/.cache/loopgraph``). Its size is bounded by
``$LOOPGRAPH_CACHE_MAX_MB`` (default ``DEFAULT_MAX_MB``); the least recently used entries go first.

An entry is two files: ``<key>-<sha>.pt2``, the artifact (named by its own checksum), and ``<key>.json``, its
metadata (the checksum, the versions it was built with, what it is). Both are written under a temporary name and
renamed into place, the metadata last, so a reader sees a whole entry or none, and two processes writing one key
at once each leave a whole entry (the last rename wins). A reader checks the checksum and the versions before it
hands the file out: a corrupt or foreign entry is removed, with a warning, and built again.

What is stored, and how its key is made, is ``backend/artifacts.py``'s and ``backend/cache_key.py``'s business;
this file only keeps files.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

__all__ = ["CacheStore", "Entry", "DEFAULT_MAX_MB", "cache_root", "open_store"]

DEFAULT_MAX_MB = 4096
FORMAT = 1                 # the layout of an entry; part of every key
_STALE_SECONDS = 3600      # temporary files older than this are left over from a crashed writer


def cache_root(option: bool | str | os.PathLike = True) -> Path | None:
    """The cache folder for ``compile_loop(cache=option)``: None when the cache is off."""
    if option is False:
        return None
    if option is not True:
        return Path(option).expanduser()
    env = os.environ.get("LOOPGRAPH_CACHE_DIR")
    if env is not None:
        return Path(env).expanduser() if env.strip() else None
    import platformdirs

    return Path(platformdirs.user_cache_dir("loopgraph", appauthor=False))


def _max_bytes() -> int:
    text = os.environ.get("LOOPGRAPH_CACHE_MAX_MB", "")
    try:
        return int(float(text) * 2**20) if text.strip() else DEFAULT_MAX_MB * 2**20
    except ValueError:
        raise ValueError(f"LOOPGRAPH_CACHE_MAX_MB must be a number of megabytes, got {text!r}") from None


@dataclass(frozen=True)
class Entry:
    """One cache entry, as ``loopgraph cache list`` shows it."""

    key: str
    path: Path             # the artifact
    bytes: int
    meta: dict             # what it is, the versions it was built with, when
    last_used: float       # seconds since the epoch (the metadata file's mtime, touched on every load)


class CacheStore:
    """The entries of one cache folder."""

    def __init__(self, root: Path, max_bytes: int | None = None) -> None:
        self.root = Path(root)
        self.max_bytes = _max_bytes() if max_bytes is None else max_bytes

    def __repr__(self) -> str:
        return f"CacheStore({str(self.root)!r})"

    # -- reading -----------------------------------------------------------------------------------------
    def get(self, key: str, expect: dict) -> tuple[Path, dict] | None:
        """The artifact of ``key`` and its metadata, checked: None when there is none. ``expect``: metadata fields
        the entry must carry as they are here (versions); an entry that does not, or whose file does not match its
        checksum, is removed with a warning (and built again by the caller)."""
        meta_path = self.root / f"{key}.json"
        try:
            meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            return self._reject(key, f"its metadata is unreadable ({type(e).__name__}: {e})")
        path = self.root / str(meta.get("file", ""))
        problem = next((f"it was built with {k}={meta.get(k)!r}, this process has {v!r}"
                        for k, v in expect.items() if meta.get(k) != v), None)
        if problem is None and meta.get("key") != key:
            problem = f"its metadata names another key ({meta.get('key')!r})"
        if problem is None:
            try:
                digest = _sha256(path)
            except OSError as e:
                problem = f"its artifact is unreadable ({type(e).__name__}: {e})"
            else:
                if digest != meta.get("sha256"):
                    problem = "its artifact does not match its checksum"
        if problem is not None:
            return self._reject(key, problem)
        os.utime(meta_path)  # last used: the size bound drops the least recently used first
        return path, meta

    def remove(self, key: str) -> None:
        """``key``'s entry (both files), if any."""
        for path in [self.root / f"{key}.json", *self.root.glob(f"{key}-*.pt2")]:
            path.unlink(missing_ok=True)

    def _reject(self, key: str, why: str) -> None:
        warnings.warn(f"loopgraph cache: entry {key} in {self.root} is corrupt or foreign ({why}); removed, it is "
                      f"built again", stacklevel=4)
        self.remove(key)
        return None

    # -- writing -----------------------------------------------------------------------------------------
    def put(self, key: str, build: Callable[[Path], None], meta: dict) -> tuple[Path, dict]:
        """Make ``key``'s entry: ``build(path)`` writes the artifact to a temporary ``path`` in the folder; it is
        checksummed and renamed into place, then the metadata is. Returns the artifact's path and metadata."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".tmp-", suffix=".pt2")
        os.close(fd)
        tmp = Path(tmp)
        try:
            build(tmp)
            digest = _sha256(tmp)
            path = self.root / f"{key}-{digest[:16]}.pt2"
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        meta = {**meta, "key": key, "file": path.name, "sha256": digest, "bytes": path.stat().st_size,
                "created": time.time()}
        _write_atomically(self.root / f"{key}.json", json.dumps(meta, indent=1, sort_keys=True))
        self.prune(keep=key)
        return path, meta

    def prune(self, keep: str | None = None) -> list[str]:
        """Keep the folder within its size bound: the least recently used entries out (never ``keep``), then
        artifacts no metadata names and temporary files left by crashed writers. Returns the keys removed."""
        entries = sorted(self.entries(), key=lambda e: e.last_used)
        total = sum(e.bytes for e in entries)
        removed = []
        for entry in entries:
            if total <= self.max_bytes:
                break
            if entry.key != keep:
                self.remove(entry.key)
                removed.append(entry.key)
                total -= entry.bytes
        named = {e.path.name for e in self.entries()}
        now = time.time()
        for path in [*self.root.glob(".tmp-*"), *self.root.glob("*.pt2")]:
            # a crashed writer's temporary file, or an artifact another process's write of its key superseded
            if path.name not in named and now - _mtime(path) > _STALE_SECONDS:
                path.unlink(missing_ok=True)
        return removed

    def clear(self) -> int:
        """Remove every entry; returns how many there were."""
        count = len(self.entries())
        for path in [*self.root.glob("*.pt2"), *self.root.glob("*.json")]:
            path.unlink(missing_ok=True)
        return count

    def entries(self) -> list[Entry]:
        """Every entry with readable metadata (checksums are checked on use, not here)."""
        found = []
        for meta_path in self.root.glob("*.json") if self.root.is_dir() else ():
            if meta_path.name.startswith("."):  # a metadata file being written
                continue
            try:
                meta = json.loads(meta_path.read_text())
                path = self.root / meta["file"]
                found.append(Entry(meta_path.stem, path, path.stat().st_size, meta, _mtime(meta_path)))
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return found

    def size(self) -> int:
        return sum(e.bytes for e in self.entries())


# The metadata that tells two entries of one loop apart, as ``loopgraph cache list`` names it.
_DISTINCT = {"code": "the step graphs' code", "inputs": "input shapes, dtypes or strides", "options": "options",
             "inductor_settings": "Inductor settings", "torch": "torch", "triton": "triton", "python": "Python",
             "loopgraph": "loopgraph's source", "device": "the device"}


def listing(entries: list[Entry]) -> list[str]:
    """``loopgraph cache list``: one line per entry, most recently used first (what it is, for which N, its
    options), and under an entry that another one of the same loop resembles, what tells them apart."""
    entries = sorted(entries, key=lambda e: e.last_used, reverse=True)
    lines = []
    for e in entries:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        steps = f"  for {e.meta['steps']}" if "steps" in e.meta else ""
        options = ", ".join(f"{k}={v}" for k, v in e.meta.get("options", {}).items())
        lines.append(f"{e.key}  {e.bytes / 2**20:7.1f} MB  used {used}  torch {e.meta.get('torch', '?')}  "
                     f"{e.meta.get('what', '')}{steps}{f'  ({options})' if options else ''}")
        twins = [o for o in entries if o is not e and o.meta.get("what") == e.meta.get("what")]
        for other in twins[:1]:
            lines.append(f"    differs from {other.key[:12]} in: {_differences(e.meta, other.meta)}")
    return lines


def _differences(meta: dict, other: dict) -> str:
    found = []
    for field, name in _DISTINCT.items():
        mine, theirs = meta.get(field), other.get(field)
        if mine == theirs:
            continue
        if field == "inductor_settings" and isinstance(mine, dict) and isinstance(theirs, dict):
            changed = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
            name += " (" + ", ".join(f"{k}: {mine.get(k, '-')} vs {theirs.get(k, '-')}" for k in changed[:4]) + (
                f", {len(changed) - 4} more" if len(changed) > 4 else "") + ")"
        found.append(name)
    if not found and meta.get("inductor_config") != other.get("inductor_config"):
        found.append("Inductor settings (hash)")
    return ", ".join(found) or "nothing recorded (an entry made before loopgraph recorded it)"


def open_store(option: bool | str | os.PathLike = True) -> CacheStore | None:
    """The store of ``compile_loop(cache=option)``, or None when the cache is off."""
    root = cache_root(option)
    return None if root is None else CacheStore(root)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
