"""Nothing lost during a move (#18): a signal for a moving job is held at its home and
delivered wherever the job runs once the move ends; ``ctl migrate`` waits as long as the
move takes.  Real CRIU between real daemons in network namespaces."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cluster import (
    Daemon,
    job_processes,
    migrating,
    namespace_cluster,
    start_job,
    wait_for,
)
from tests.test_migration import REASON

pytestmark = [pytest.mark.netns, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

PY = sys.executable
TAG = "omuscd-sig-test"
# resident memory (moved post-copy from a 1 MB threshold), then idle until killed: the
# default action of SIGTERM, so a delivered TERM ends it with 143
BIG = """
import sys, time
data = bytearray(b"x" * (int(sys.argv[1]) << 20))
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


@pytest.fixture(scope="module")
def cluster():
    with namespace_cluster("ab", prefix=f"omg{os.getpid() % 10000}x",
                           leftovers=TAG) as c:
        for d in c[3].values():
            assert d.json("status")["migration"].startswith("criu 4"), d.json("status")
            # the tests make the moves: the balancer's own ("job is moving already", a
            # job started on b found on a) failed them on a busy machine
            assert d.ctl("set balancing off").ok
        yield c


def run(node, where: list[str], mb: int, tag: str) -> tuple[subprocess.Popen[bytes], str]:
    """``omuscd run`` of the BIG job, attached, once it is ready: the client and the job id."""
    return start_job(node, where, [PY, "-c", BIG, str(mb), tag], tag)


def stopped(tag: str) -> bool:
    """Whether the job's command is frozen (CRIU's ptrace stop, or SIGSTOP)."""
    for pid in job_processes(tag):
        try:
            state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state in ("t", "T"):
            return True
    return False


def ended_by_term(t: threading.Thread, result: dict[str, Any], p: subprocess.Popen[bytes],
                  home: Daemon, job: str, where: str) -> dict[str, Any]:
    """The move (``t``, its reply in ``result``) succeeded, and the job ended there
    (``where``) by the TERM held for it: ``omuscd run`` (``p``) exits 143, the record at
    ``home`` says so; that record."""
    t.join(120)
    assert result["reply"].ok, result
    _, err = p.communicate(timeout=30)
    assert p.returncode == 143, err
    view = home.json(f"job {job}")
    assert view["state"] == "exited" and view["node_name"] == where, view
    assert view["exit"] == {"signal": 15}, view
    return view


def test_a_kill_while_the_memory_follows_is_held_and_ends_the_job_at_the_target(cluster):
    """``ctl kill JOB TERM`` while the job runs on b and its memory still follows from a
    (post-copy): the reply says it is held; once the move ends the TERM reaches the job
    on b, and ``omuscd run`` at its home exits 143.  It went to a's frozen copy, which the
    move then killed, and the job ran on at b."""
    _, _, _, n = cluster
    tag = f"{TAG}-1"
    assert n["a"].ctl("set post_copy_mb 1").ok
    try:
        p, job = run(n["a"], ["--home"], 1024, tag)
        t, result = migrating(n["a"], job, "b")
        wait_for(lambda: f"job {job} runs here; its memory follows" in n["b"].log(), 60,
                 "the job to run on b while its memory follows", interval=0.002)
        reply = n["a"].ctl(f"kill {job} TERM")
        assert reply.ok and "held" in reply.text and "until its move ends" in reply.text, reply
        view = ended_by_term(t, result, p, n["a"], job, "b")
        assert "held" not in view  # delivered once, gone from the queue
        assert f"job {job}: held signal 15 delivered on b" in n["a"].log()
    finally:
        n["a"].ctl("set post_copy_mb 16")  # the default
        subprocess.run(["pkill", "-9", "-f", tag], capture_output=True)


def test_a_term_to_omuscd_run_during_a_move_home_ends_the_job_at_home(cluster):
    """TERM to an attached ``omuscd run`` while its job, running on b, is frozen for a
    (pre-copy) move home: the client forwards it as a signal frame, the home holds it,
    and once the job runs at home it ends there with 143."""
    _, _, _, n = cluster
    tag = f"{TAG}-2"
    assert n["b"].ctl("set stream_pages off").ok  # the memory copied after the dump
    try:
        p, job = run(n["a"], ["--node", "b"], 1024, tag)
        assert n["a"].json(f"job {job}")["node_name"] == "b"
        t, result = migrating(n["a"], job, "home")
        wait_for(lambda: stopped(tag), 60, "the job to be frozen for its move",
                 interval=0.001)
        time.sleep(0.3)  # past the dump: its pages are on their way
        p.send_signal(signal.SIGTERM)
        ended_by_term(t, result, p, n["a"], job, "a")
        assert f"job {job}: signal 15 held until its move ends" in n["a"].log()
    finally:
        n["b"].ctl("set stream_pages on")
        subprocess.run(["pkill", "-9", "-f", tag], capture_output=True)


def test_a_held_signal_for_a_job_that_ends_in_the_move_is_dropped_with_it(cluster,
                                                                          tmp_path: Path):
    """A job that ends on the target while its memory follows takes the signals held
    for it along: none is sent to anything afterwards, and the log says so."""
    _, _, _, n = cluster
    tag = f"{TAG}-3"
    flag = tmp_path / "go"
    code = ("import os, sys, time\ndata = bytearray(b'x' * (1024 << 20))\n"
            "print('ready', flush=True)\n"
            "while not os.path.exists(sys.argv[1]):\n    time.sleep(0.01)\nsys.exit(7)\n")
    assert n["a"].ctl("set post_copy_mb 1").ok
    try:
        p, job = start_job(n["a"], ["--home"], [PY, "-c", code, str(flag), tag], tag)
        t, _ = migrating(n["a"], job, "b")
        wait_for(lambda: f"job {job} runs here; its memory follows" in n["b"].log(), 60,
                 "the job to run on b while its memory follows", interval=0.002)
        reply = n["a"].ctl(f"kill {job} USR1")  # would kill it (no handler): 138
        assert reply.ok and "held" in reply.text, reply
        flag.touch()
        t.join(120)
        _, err = p.communicate(timeout=30)
        assert p.returncode == 7, err
        # its end may come home before the move's end or after: dropped either way
        wait_for(lambda: f"job {job} ended (exited) during its move: held signal(s) [10] "
                 "dropped with it" in n["a"].log() or f"job {job}: held signal 10 dropped: "
                 f"job {job} has already ended" in n["a"].log(), 10, "the drop to be logged")
        view = n["a"].json(f"job {job}")
        assert view["exit"] == {"code": 7} and "held" not in view, view
    finally:
        n["a"].ctl("set post_copy_mb 16")  # the default
        subprocess.run(["pkill", "-9", "-f", tag], capture_output=True)


def test_ctl_migrate_waits_for_a_move_longer_than_ten_seconds(tmp_path: Path):
    """``omuscd ctl migrate`` against a daemon whose move answers after 12 s (a control
    socket speaking the protocol, answering late): it prints the answer and exits 0.  It
    said "timed out" (exit 1) after 10 s, about moves that then succeeded."""
    path = str(tmp_path / "ctl.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    seen: list[str] = []

    def serve() -> None:
        conn, _ = srv.accept()
        with conn, conn.makefile("rb") as f:
            conn.sendall(b"220 omuscd test ready\r\n")
            line = f.readline().decode().strip()
            seen.append(line)
            time.sleep(12)
            conn.sendall(b"200 job 1.1 migrated to b: frozen 0.500s, 2048.0 MB moved\r\n")
            f.readline()  # quit

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    r = subprocess.run([PY, "-m", "omuscd", "ctl", "--connect", path, "migrate", "1.1", "b"],
                       capture_output=True, text=True, timeout=60)
    srv.close()
    assert seen == ["migrate 1.1 b"]
    assert r.returncode == 0, r.stderr
    assert "job 1.1 migrated to b" in r.stdout


def test_a_held_signal_is_sent_again_while_the_node_running_the_job_cannot_be_reached(
        monkeypatch):
    """A signal held during a move goes, once the move ends, through the node running
    the job.  One that could not reach that node at all (no connection: nothing was
    asked of it) is sent again a second later, in order, instead of being dropped
    (before: "held signal dropped: node b did not answer", and the job ran on); one the
    node may have carried out (no reply in time) is not sent twice; after TRIES tries it
    is given up, and the next goes.  A job that ended meanwhile takes its held signals
    with it."""
    from types import SimpleNamespace

    import trio
    import trio.testing

    from omuscd.jobs import held
    from omuscd.jobs.record import EXITED, JobError, NodeUnreachable

    signals = held.JobSignals.__new__(held.JobSignals)  # only its delivery, no host
    signals.delivering = set()
    signals.moves = SimpleNamespace(moving=lambda job_id: False)
    sent: list[int] = []
    unreached = NodeUnreachable("node b did not answer: cannot connect")
    answers: list[Exception | None] = []

    async def send(job: Any, uid: int, sig: int, fresh: bool = False) -> None:
        sent.append(sig)
        answer = answers.pop(0)
        if answer is not None:
            raise answer
    signals._send_signal = send  # type: ignore[method-assign]
    job = SimpleNamespace(id="7.1", held=[], state="running", owner=SimpleNamespace(uid=0),
                          node_name="b")

    def deliver(held_now: list[int], replies: list[Exception | None]) -> list[int]:
        job.held, answers[:], sent[:] = held_now, replies, []
        trio.run(signals._deliver_held, job, clock=trio.testing.MockClock(autojump_threshold=0))
        assert job.held == [] and answers == []
        return list(sent)

    # TERM not reached twice, then taken; KILL perhaps carried out (no reply): once
    assert deliver([15, 9], [unreached, unreached, None,
                             JobError("node b did not answer: no answer within 3s")]) == \
        [15, 15, 15, 9]
    monkeypatch.setattr(held, "TRIES", 3)
    assert deliver([2, 15], [unreached] * 3 + [None]) == [2, 2, 2, 15]
    job.state = EXITED
    assert deliver([15], []) == []
