from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import cluster
from tests.cluster import Daemon, leftovers, run_marks, short_tmpdir


@pytest.fixture(scope="module", autouse=True)
def nothing_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """After each module: no process of this run (a daemon, CRIU, a job and its init),
    network namespace or test user is left; any is named (the module fails) and
    removed, so that the modules after it do not fail for it.  Only this run's are
    looked at: tests of other runs may be running beside it."""
    cluster.RUN_MARKS = marks = run_marks(tmp_path_factory.getbasetemp())
    yield
    found = leftovers(marks)
    if found:
        pytest.fail("left behind by this module (now removed):\n" + "\n".join(found),
                    pytrace=False)


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = short_tmpdir()
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def reaper() -> Iterator[list[Daemon]]:
    """Daemons appended here are stopped after the test, whatever happened."""
    daemons: list[Daemon] = []
    yield daemons
    for d in daemons:
        if d.alive():
            d.popen.kill()
            d.popen.wait()
