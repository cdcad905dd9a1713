"""A post-copy move settles before a checkpoint is taken (issue #20): ``checkpoint JOB`` asked
while the job's memory still follows it to its new node waits for the move to end, then
dumps the whole job; never a dump of a job half arrived.  Real CRIU between real daemons in
network namespaces whose link is slowed for real (``tc``, as tests/test_progress.py), so the
memory takes seconds to follow; the checkpoint is then restored and the job checks that its
memory is intact."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.cluster import namespace_cluster, slow_links, wait_for
from tests.test_migration import REASON
from tests.test_progress import SLOW, ctl, finish, intact, start

PY = sys.executable
TAG = "omuscd-ckpt-postcopy-test"
pytestmark = pytest.mark.netns


@pytest.fixture(scope="module")
def cluster():
    if REASON is not None:
        pytest.skip(REASON)
    with namespace_cluster("ab", prefix=f"omq{os.getpid() % 10000}x", leftovers=TAG) as c:
        lan, _, _, n = c
        for d in n.values():
            assert d.json("status")["migration"].startswith("criu 4"), d.json("status")
            assert d.ctl("set balancing off").ok
        with slow_links(lan, range(2), SLOW):  # both ways: each node's eth0
            yield c


def test_a_checkpoint_asked_while_the_memory_follows_waits_for_the_move(cluster, tmp_path):
    """180 MB follow over 100 Mbit/s for ~15 s; ``checkpoint --stop`` asked meanwhile answers
    only after the move ended, and the job resumed from that checkpoint has its memory
    intact and its output whole."""
    _, _, _, n = cluster
    tag, flag = f"{TAG}-1", tmp_path / "end"
    assert n["a"].ctl("set post_copy_mb 1").ok
    p, job = start(n["a"], ["--home"], 180, flag, tag)
    mig = subprocess.Popen([PY, "-m", "omuscd", "ctl", "--connect", n["a"].socket, "migrate",
                            job, "b"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True)
    try:
        assert mig.stderr is not None
        for line in mig.stderr:  # the job runs on b; its memory follows
            if "memory following" in line:
                break
        else:
            pytest.fail(f"no post-copy: {mig.communicate()}")
        assert mig.poll() is None
        asked = time.monotonic()
        r = ctl(n["a"], "checkpoint", "--stop", job, timeout=120)
        took = time.monotonic() - asked
        assert mig.poll() is not None, "the checkpoint answered before the move ended"
        out, _ = mig.communicate(timeout=10)
        assert mig.returncode == 0 and "memory followed in" in out, out
        assert r.returncode == 0 and f"job {job} checkpointed on b" in r.stdout, \
            (r.stdout, r.stderr, took)
        view = n["a"].json(f"job {job}")
        assert view["state"] == "checkpointed", view
        r = ctl(n["a"], "resume", job, "a")
        assert r.returncode == 0 and "resumed on a" in r.stdout, (r.stdout, r.stderr)
        wait_for(lambda: n["a"].json(f"job {job}")["state"] == "running", 10, "the job")
        code, out, err = finish(p, flag)
        assert code == 0, err
        assert intact(out.split("ready\n", 1)[-1]), out
    finally:
        mig.kill()
        p.kill()
        n["a"].ctl("set post_copy_mb 128")
