"""A failed post-copy move loses nothing and does nothing twice (issue #18): the job runs on
the target while its memory follows, and when the link between the nodes is cut then, the
target's copy is killed and the source's frozen copy resumes.  What the user reads (the
attached ``omuscd run``) and the file the job appends to are then byte for byte those of
a run that never moved: the target copy's output never reached the home, and the lines
it appended to the file (the nodes share the filesystem) are cut off again, as the job's
user and never through a link, before the source's copy writes them once more.

Real daemons in network namespaces, real CRIU, the link slowed for real with ``tc`` (as
tests/test_progress.py) so that the memory takes seconds to follow, then cut (``ip link
set down``) in the middle of it."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cluster import (
    as_user,
    namespace_cluster,
    ordinary_user,
    sh,
    slow_links,
    wait_for,
)
from tests.test_migration import REASON, job_processes
from tests.test_progress import SLOW

PY = sys.executable
TAG = "omuscd-rollback-test"
pytestmark = pytest.mark.netns
MB = 80  # its memory: ~6.5 s to follow over SLOW's 100 Mbit/s
LINES = 500  # one every DELAY s: ~10 s of running in all
DELAY = 0.02
#: a job that appends a numbered line to a file (argv 2) every ``delay`` s and prints it,
#: ``n`` lines, then says whether its ``mb`` MB of memory came through intact
JOB = """
import hashlib, os, sys, time
mb, path, n, delay = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
data = bytearray(os.urandom(1 << 20)) * mb
want = hashlib.sha256(data).hexdigest()
print("ready", flush=True)
with open(path, "a") as f:
    for i in range(1, n + 1):
        line = f"line {i} of {n}\\n"
        f.write(line)
        f.flush()
        print(line, end="", flush=True)
        time.sleep(delay)
print("memory", "intact" if hashlib.sha256(data).hexdigest() == want else "CHANGED",
      flush=True)
print("end", flush=True)
"""


@pytest.fixture(scope="module")
def cluster():
    if REASON is not None:
        pytest.skip(REASON)
    with namespace_cluster("ab", prefix=f"omr{os.getpid() % 10000}x", open_to_all=True,
                           leftovers=TAG) as c:
        lan, _, _, n = c
        for d in n.values():
            assert d.json("status")["migration"].startswith("criu 4"), d.json("status")
            assert d.ctl("set balancing off").ok  # the tests say which moves happen
            assert d.ctl("set post_copy_mb 1").ok
        with slow_links(lan, range(2), SLOW):  # both ways: each node's eth0
            yield c


def unmoved(tmp: Path) -> tuple[bytes, bytes]:
    """What the program prints and writes when nothing moves it (run here, at once): the
    expected output and file."""
    path = tmp / "unmoved.txt"
    r = subprocess.run([PY, "-c", JOB, "1", str(path), str(LINES), "0"], capture_output=True,
                       timeout=60)
    assert r.returncode == 0 and r.stdout.endswith(b"memory intact\nend\n"), r
    return r.stdout, path.read_bytes()


def job_id(node, tag: str) -> str:
    found: list[str] = []

    def listed() -> bool:
        found[:] = [j["id"] for j in node.json("jobs")["jobs"]
                    if tag in j["command"] and j["state"] == "running"]
        return bool(found) and bool(job_processes(tag))
    wait_for(listed, 10, f"the job {tag} to be listed")
    return found[0]


def lines_in(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except OSError:
        return 0


def cut_mid_follow(cluster, job: str, path: Path,
                   meanwhile: Callable[[], None] = lambda: None, kill: bool = False) -> str:
    """Move ``job`` from a to b post-copy; once b runs it and its memory follows (the
    file grows while a's copy stands still: b's copy runs), call ``meanwhile`` and cut
    b's link (``kill``: kill b's daemon instead).  Returns what ``omuscd ctl migrate``
    said once the move failed; the link is back up and the nodes see each other again
    (unless b was killed)."""
    lan, _, _, n = cluster
    mig = subprocess.Popen([PY, "-m", "omuscd", "ctl", "--connect", n["a"].socket, "migrate",
                            job, "b"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        assert mig.stderr is not None
        for line in mig.stderr:
            if "memory following" in line:
                break
        else:
            pytest.fail(f"no post-copy: {mig.communicate()}")
        at = lines_in(path)
        # b's copy appends while a's stands frozen (the nodes share the filesystem)
        wait_for(lambda: lines_in(path) >= at + 20, 10, "b's copy to write")
        assert n["a"].json(f"job {job}")["state"] == "migrating"
        meanwhile()
        if kill:
            n["b"].popen.kill()
            n["b"].popen.wait()
            out, err = mig.communicate(timeout=120)
            assert mig.returncode != 0 and "resumed here" in out + err, (out, err)
            return out + err
        sh("ip", "-n", lan.ns(1), "link", "set", "eth0", "down")
        try:
            out, err = mig.communicate(timeout=120)
        finally:
            sh("ip", "-n", lan.ns(1), "link", "set", "eth0", "up")
    finally:
        mig.kill()
    assert mig.returncode != 0 and "resumed here" in out + err, (out, err)
    for d, other in ((n["a"], "b"), (n["b"], "a")):
        wait_for(lambda d=d, other=other: d.nodes().get(other, {}).get("state") == "alive",
                 60, f"{d.name} to see {other} again")
    return out + err


def finish(p: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, (p.returncode, out[-300:], err[-300:])
    return out, err


@pytest.mark.parametrize("kill", [False, True], ids=["link-cut", "target-killed-link-planted"])
def test_an_ordinary_users_job_rolls_back_exactly_and_a_link_is_never_followed(cluster,
                                                                               tmp_path, kill):
    """An ordinary user's job moved post-copy, the move cut mid-follow; the job resumes
    on a and ends, what ``omuscd run`` printed exactly that of a run that never moved.
    The link cut: the file is cut back to the freeze, exactly as unmoved.  The target
    daemon killed (last: it ends the cluster's b) while the user makes the job's file a
    link to root's file: the cut-back refuses it (root's file keeps every byte).  (Root's
    jobs: test_migration's target killed mid-move.)"""
    _, _, _, n = cluster
    want_out, want_file = unmoved(tmp_path)
    os.chmod(tmp_path, 0o755)
    victim = tmp_path / "roots-file"
    victim.write_bytes(b"root's data, not to be cut\n" * 4000)
    kept = victim.read_bytes()
    attack = kill
    with ordinary_user("rb") as user:
        tag = f"{TAG}-user{int(attack)}"
        path = user.home / f"moved{int(attack)}.txt"
        p = user.popen(user.run_argv(n["a"].socket, "--home", "--", user.python, "-c",
                                     JOB, str(MB), str(path), str(LINES), str(DELAY), tag))
        try:
            job = job_id(n["a"], tag)
            time.sleep(0.5)  # past 'still starting' (see jobs.starting)

            def link() -> None:  # as the user, during the follow
                as_user(user.uid, lambda: (path.unlink(), path.symlink_to(victim)))
            said = cut_mid_follow(cluster, job, path, link if attack else lambda: None,
                                  kill=kill)
            assert n["a"].json(f"job {job}")["node_name"] == "a"
            out, err = finish(p)
        finally:
            p.kill()
        assert out == want_out, (attack, len(out), out[-200:], said)
        assert b"line " not in err, err[-300:]
        if attack:
            assert path.is_symlink() and victim.read_bytes() == kept
            assert "cannot cut its files back to the freeze" in n["a"].log()
        else:
            assert path.stat().st_uid == user.uid
            assert path.read_bytes() == want_file
