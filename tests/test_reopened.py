"""What a user's restored job holds, checked before it runs (omuscd.migrate.reopened): a
process of the job that had ended but was not yet reaped when it was dumped (make's
children, a shell's) is restored as such, a zombie, whose working directory and files
cannot be read; it holds nothing, and the move of the job goes on.  It failed every move
of a user's ``make -j2`` ("cannot look at restored process N", bench_programs)."""

from __future__ import annotations

import os
import pwd
import subprocess
import time

import pytest

from omuscd.jobs.record import Owner
from omuscd.migrate.reopened import beyond_user

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def nobody() -> Owner:
    return Owner.of_uid(pwd.getpwnam("nobody").pw_uid)


def test_a_zombie_of_a_users_job_holds_nothing():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    try:
        deadline = time.monotonic() + 5
        while open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "no zombie"
            time.sleep(0.01)
        assert beyond_user([pid], nobody(), set()) is None
    finally:
        os.waitpid(pid, 0)


def test_a_live_process_holding_what_the_user_may_not_open_is_still_found(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    p = subprocess.Popen(["sleep", "30"], cwd=private)
    try:
        time.sleep(0.1)
        why = beyond_user([p.pid], nobody(), set())
        assert why is not None and why.startswith(f"process {p.pid}:"), why
    finally:
        p.kill()
        p.wait()
