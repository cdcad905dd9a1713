"""The check after every module (tests/conftest.py, ``nothing_left_behind``): what a test
of this run leaves behind (a process holding its directories, a network namespace, a
test user) is found and removed, and what another run beside it has is not touched."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.cluster import (
    MADE_NETNS,
    MADE_USERS,
    NetnsLan,
    can_netns,
    leftovers,
    run_marks,
    short_tmpdir,
)


def test_a_process_in_this_runs_directory_is_named_and_killed_another_runs_is_not(
        tmp_path_factory: pytest.TempPathFactory):
    """One ``sleep`` works in a directory of this run, one holds a file of one; a third
    works in a directory named as another run's (pid 1's: never a test run): the first
    two are named and killed, the third runs on."""
    ours, theirs = short_tmpdir(), Path(tempfile.mkdtemp(prefix="omt-1-"))
    held = open(ours / "log", "w")
    procs = [subprocess.Popen(["sleep", "60"], cwd=ours),
             subprocess.Popen(["sleep", "60"], cwd="/", stdout=held),
             subprocess.Popen(["sleep", "60"], cwd=theirs)]
    held.close()
    try:
        found = leftovers(run_marks(tmp_path_factory.getbasetemp()), wait=0.2)
        assert sorted(found) == sorted(f"process {p.pid}: sleep 60" for p in procs[:2])
        assert [p.wait(5) for p in procs[:2]] == [-9, -9]
        assert procs[2].poll() is None
    finally:
        for p in procs:
            p.kill()
            p.wait()
        shutil.rmtree(ours)
        shutil.rmtree(theirs)


@pytest.mark.skipif(can_netns() is not None, reason=can_netns() or "")
def test_a_namespace_and_a_user_this_run_made_are_named_and_removed():
    """A LAN whose namespaces were not removed and a test user not deleted are named and
    removed; a namespace of another run is not."""
    lan = NetnsLan(1, prefix=f"oml{os.getpid() % 10000}x").__enter__()
    other = f"oml{os.getpid() % 10000}y"
    subprocess.run(["ip", "netns", "add", other], check=True)  # made, not registered
    name = f"omt{os.getpid() % 100000}lo"
    subprocess.run(["useradd", "--no-create-home", name], check=True, capture_output=True)
    MADE_USERS.add(name)
    try:
        found = leftovers((), wait=0)
        assert found == [f"network namespace {lan.bridge}", f"network namespace {lan.ns(0)}",
                         f"user {name}"], found
        names = subprocess.run(["ip", "netns", "list"], capture_output=True,
                               text=True).stdout.split()
        assert lan.bridge not in names and lan.ns(0) not in names and other in names
        assert subprocess.run(["id", name], capture_output=True).returncode != 0
        assert not MADE_NETNS and not MADE_USERS
    finally:
        subprocess.run(["ip", "netns", "del", other], capture_output=True)
        lan.__exit__()
        subprocess.run(["userdel", "-f", name], capture_output=True)
