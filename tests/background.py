"""Background runs: the suite's heaviest subprocess runs use the second core.

The suite runs on one core: compiling (Dynamo, Inductor's lowering and codegen) is single-threaded Python. A few
tests only check what a subprocess wrote (the CLI's bench, the GPU validation's dry run, processes sharing the
persistent cache): declared with ``@background``, such a run starts in a worker thread as soon as collection is
over, one run at a time, while the rest of the suite runs in pytest's process; the tests that use one (as a
fixture of that name) run last, in their usual order, so that they rarely wait. Only runs that a selected test
uses are started. tests/conftest.py imports the hooks below; test modules import ``background`` from here (this
module has no import-time side effects: subprocesses may import test modules).
"""

import shutil
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pytest

_JOBS: dict[str, Callable[[Path], Any]] = {}
_started: dict[str, Future] = {}
_worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loopgraph-background")
_tmp: list[Path] = []  # the runs' folder, made when the first one starts


def background(job: Callable[[Path], Any]):
    """Declare ``job(tmp_dir)`` as a background run: it should spend its time in subprocesses (the little it does
    here, such as comparing their outputs with eager, shares this process with the running test). The test module
    gets a session fixture of the same name whose value is the job's return value."""
    name = job.__name__
    if name in _JOBS:
        raise ValueError(f"background job {name!r} is declared twice")
    _JOBS[name] = job

    @pytest.fixture(scope="session", name=name)
    def result():
        if name not in _started:  # a run pytest did not see at collection (e.g. requested from another fixture)
            _start(name)
        return _started[name].result()

    return result


def _start(name: str) -> None:
    if not _tmp:
        _tmp.append(Path(tempfile.mkdtemp(prefix="loopgraph-background-")))
    folder = _tmp[0] / name
    folder.mkdir()
    _started[name] = _worker.submit(_JOBS[name], folder)


def _uses_background(item) -> bool:
    return any(name in _JOBS for name in getattr(item, "fixturenames", ()))


def pytest_collection_modifyitems(items):
    items.sort(key=_uses_background)  # a stable sort: the others first, each group in its usual order


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        return
    for item in session.items:  # the order tests run in: the first needed starts first
        for name in getattr(item, "fixturenames", ()):
            if name in _JOBS and name not in _started:
                _start(name)


def pytest_sessionfinish(session):
    for future in _started.values():
        future.cancel()  # runs not started yet; a running one finishes (its subprocess has its own timeout)
    _worker.shutdown(wait=True)
    for folder in _tmp:
        shutil.rmtree(folder, ignore_errors=True)
