from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import Daemon, short_tmpdir


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
