"""tests/background.py: a declared run starts when collection is over and overlaps the other tests, the tests
that use it run last, and a run no selected test uses never starts."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

SUITE = '''
import subprocess, sys, time
from pathlib import Path

from tests.background import background

LOG = Path(__file__).with_name("log")


@background
def sleeper(tmp):
    LOG.open("a").write("sleeper started\\n")
    proc = subprocess.run([sys.executable, "-c", "import time; time.sleep(1); print('slept')"],
                          capture_output=True, text=True)
    LOG.open("a").write("sleeper finished\\n")
    return tmp, proc.stdout


@background
def unused(tmp):
    LOG.open("a").write("unused started\\n")


def test_a_uses_it(sleeper):
    tmp, out = sleeper
    assert out == "slept\\n" and tmp.is_dir()
    LOG.open("a").write("a\\n")


def test_b_runs_meanwhile():
    time.sleep(4)
    LOG.open("a").write("b\\n")


def test_c_deselected(unused):
    pass
'''


def test_a_run_overlaps_the_other_tests_and_its_tests_run_last(tmp_path):
    (tmp_path / "test_suite.py").write_text(SUITE)
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                           str(tmp_path / "test_suite.py"), "-k", "not deselected"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    # the run (one second) was over before test_b (four seconds) was: it ran meanwhile; test_a ran last; `unused`,
    # wanted by a deselected test only, never started
    assert (tmp_path / "log").read_text().splitlines() == ["sleeper started", "sleeper finished", "b", "a"]
