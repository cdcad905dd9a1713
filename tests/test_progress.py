"""A move's progress (#18): ``omuscd ctl migrate`` waits as long as a move takes and, from a
second on, prints how far it has got (``110`` lines of the control protocol, relayed from
the node doing the move), then the reply as before.  Real CRIU between real daemons in
network namespaces whose link is slowed for real (``tc``), so moves last seconds."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import trio

from omuscd.client import ReplyParser
from tests.cluster import namespace_cluster, slow_links, start_job, telnet, wait_for
from tests.test_migration import REASON

PY = sys.executable
TAG = "omuscd-progress-test"
#: the link between the nodes: 100 Mbit/s, so 180 MB of memory take ~15 s to follow
SLOW = "100mbit"
#: a job whose memory (MB given) is a known pattern; it counts while it runs, checks its
#: memory is intact when told to end (the file given exists), and exits 0
JOB = """
import hashlib, os, sys, time
mb, flag = int(sys.argv[1]), sys.argv[2]
data = bytearray(os.urandom(1 << 20)) * mb
want = hashlib.sha256(data).hexdigest()
print("ready", flush=True)
i = 0
while not os.path.exists(flag):
    time.sleep(0.05)
    i += 1
    if i % 20 == 0:
        print("tick", i // 20, flush=True)
print("memory", "intact" if hashlib.sha256(data).hexdigest() == want else "CHANGED",
      flush=True)
print("end", flush=True)
"""


def ctl(node, *words: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``omuscd ctl`` as a script runs it: the real command line."""
    return subprocess.run([PY, "-m", "omuscd", "ctl", "--connect", node.socket, *words],
                          capture_output=True, text=True, timeout=timeout)


def start(node, where: list[str], mb: int, flag: Path, tag: str
          ) -> tuple[subprocess.Popen[bytes], str]:
    """``omuscd run`` of JOB, attached, once it is ready: the client and the job id."""
    return start_job(node, where, [PY, "-c", JOB, str(mb), str(flag), tag], tag)


def frozen(node, job: str) -> bool:
    """Whether the job is frozen for a move (its home's view: from the freeze until it
    runs on the target)."""
    return node.json(f"job {job}")["state"] == "migrating"


def finish(p: subprocess.Popen[bytes], flag: Path) -> tuple[int, str, str]:
    """Tell JOB to end; ``omuscd run``'s exit status and output."""
    flag.touch()
    out, err = p.communicate(timeout=60)
    return p.returncode, out.decode(), err.decode()


def intact(out: str) -> bool:
    """JOB's output after ``ready``, whole and in order: the ticks 1..n, then the end."""
    lines = out.splitlines()
    ticks = [int(ln.split()[1]) for ln in lines if ln.startswith("tick ")]
    return (lines[-2:] == ["memory intact", "end"] and ticks == list(range(1, len(ticks) + 1))
            and len(lines) == len(ticks) + 2)


@pytest.fixture(scope="module")
def cluster():
    if REASON is not None:
        pytest.skip(REASON)
    with namespace_cluster("ab", prefix=f"omp{os.getpid() % 10000}x",
                           leftovers=TAG) as c:
        lan, _, _, n = c
        for d in n.values():
            assert d.json("status")["migration"].startswith("criu 4"), d.json("status")
            assert d.ctl("set balancing off").ok  # the tests say which moves happen
        with slow_links(lan, range(2), SLOW):  # both ways
            yield c


@pytest.mark.netns
def test_a_fifteen_second_post_copy_migrate_prints_progress_and_exits_0(cluster, tmp_path):
    """Post-copy over a 100 Mbit/s link: the job runs on b within a second, its 180 MB
    follow for ~15 s.  ``ctl migrate`` exits 0 with the migrated reply alone on stdout
    and the move's phases on stderr as they came (the memory following, counted up), and
    the job's output is whole afterwards.  Before, the client said "timed out" (exit 1)
    after 10 s, and printed nothing meanwhile."""
    _, _, _, n = cluster
    tag, flag = f"{TAG}-1", tmp_path / "end1"
    assert n["a"].ctl("set post_copy_mb 1").ok
    try:
        p, job = start(n["a"], ["--home"], 180, flag, tag)
        began = time.monotonic()
        r = ctl(n["a"], "migrate", job, "b")
        took = time.monotonic() - began
        assert r.returncode == 0, (r.stdout, r.stderr)
        lines = r.stdout.splitlines()
        assert len(lines) == 1 and re.fullmatch(
            rf"job {re.escape(job)} migrated to b: frozen [0-9.]+s, [0-9.]+ MB moved "
            r"\(its memory followed in ([0-9.]+)s\)", lines[0]), r.stdout
        followed = float(lines[0].rsplit("in ", 1)[1].rstrip("s)"))
        assert followed > 10 and took > 10, (followed, took)
        progress = r.stderr.splitlines()
        following = [int(m.group(1)) for ln in progress if (m := re.fullmatch(
            rf"job {re.escape(job)}: memory following (\d+) of (\d+) MB \(post-copy\)", ln))]
        assert len(following) >= 5, r.stderr  # ~two a second for ~15 s, counted up
        assert following == sorted(following) and following[-1] > following[0], following
        assert progress[-1] == f"job {job}: done", r.stderr
        assert f"job {job}: restoring" in progress or following, r.stderr
        code, out, err = finish(p, flag)
        assert code == 0, err
        assert intact(out), out
        view = n["a"].json(f"job {job}")
        assert view["node_name"] == "b" and view["exit"] == {"code": 0}, view
    finally:
        n["a"].ctl("set post_copy_mb 16")  # the default
        subprocess.run(["pkill", "-9", "-f", tag], capture_output=True)


@pytest.mark.netns
def test_a_term_during_a_slow_pre_copy_move_is_held_and_ends_the_job_with_143(cluster,
                                                                              tmp_path):
    """``ctl kill JOB TERM`` while the job is frozen for a pre-copy move (its memory on
    the slowed link for seconds): the reply says it is held; once the move ends the TERM
    reaches the job on b, and ``omuscd run`` at its home exits 143.  ``ctl migrate``
    meanwhile printed the dump's progress, streamed MB counted up."""
    _, _, _, n = cluster
    tag, flag = f"{TAG}-2", tmp_path / "end2"
    assert n["a"].ctl("set post_copy_mb 100000").ok  # pre-copy, whatever its size
    try:
        p, job = start(n["a"], ["--home"], 60, flag, tag)
        result: dict[str, subprocess.CompletedProcess[str]] = {}
        t = threading.Thread(target=lambda: result.update(r=ctl(n["a"], "migrate", job, "b")))
        t.start()
        wait_for(lambda: frozen(n["a"], job), 60, "the job to be frozen for its move",
                 interval=0.01)
        time.sleep(1.0)  # in the middle of its memory on its way
        assert frozen(n["a"], job), "the move was over too soon to test anything"
        kill = ctl(n["a"], "kill", job, "TERM", timeout=30)
        assert kill.returncode == 0 and "held" in kill.stdout, (kill.stdout, kill.stderr)
        t.join(120)
        r = result["r"]
        assert r.returncode == 0 and f"job {job} migrated to b" in r.stdout, (r.stdout,
                                                                              r.stderr)
        dumped = [int(m.group(1)) for ln in r.stderr.splitlines() if (m := re.fullmatch(
            rf"job {re.escape(job)}: frozen, dumping (\d+) MB", ln))]
        assert len(dumped) >= 2 and dumped == sorted(dumped), r.stderr
        _, err = p.communicate(timeout=30)
        assert p.returncode == 143, err
        view = n["a"].json(f"job {job}")
        assert view["state"] == "exited" and view["node_name"] == "b", view
        assert view["exit"] == {"signal": 15}, view
    finally:
        n["a"].ctl("set post_copy_mb 16")  # the default
        subprocess.run(["pkill", "-9", "-f", tag], capture_output=True)


@pytest.mark.netns
def test_bring_over_telnet_shows_progress_relayed_from_the_source(cluster, tmp_path):
    """``bring`` typed in the real telnet client at a, for a job running on b: b does
    the move and tells a how far it has got over the cluster channel; the telnet user
    sees 110 lines, then the 200 reply."""
    lan, _, _, n = cluster
    tag, flag = f"{TAG}-3", tmp_path / "end3"
    try:
        p, job = start(n["a"], ["--node", "b"], 40, flag, tag)
        assert n["a"].json(f"job {job}")["node_name"] == "b"
        text = telnet("127.0.0.1", 4271, [("bring\r\n", 15.0), ("quit\r\n", 1.0)],
                      netns=lan.ns(0))
        progress = re.findall(rf"^110 job {re.escape(job)}: (.*?)\r?$", text, re.M)
        assert any(line.startswith("frozen, dumping") for line in progress), text
        assert progress[-1] == "done", text
        assert re.search(rf"^200 job {re.escape(job)} migrated to a", text, re.M), text
        assert text.index("110 ") < text.index(f"200 job {job}")
        code, out, err = finish(p, flag)
        assert code == 0 and intact(out), (out, err)
    finally:
        subprocess.run(["pkill", "-9", "-f", tag], capture_output=True)


@pytest.mark.netns
def test_expel_prints_progress_relayed_over_two_hops(cluster, tmp_path):
    """``ctl expel`` at b, for a job of a's running on b: b asks a (the home), which asks
    b (the source) to move it; b's progress goes to a and back to b's session, and ctl
    prints it on stderr, the reply alone on stdout."""
    _, _, _, n = cluster
    tag, flag = f"{TAG}-4", tmp_path / "end4"
    try:
        p, job = start(n["a"], ["--node", "b"], 40, flag, tag)
        assert n["a"].json(f"job {job}")["node_name"] == "b"
        r = ctl(n["b"], "expel")
        assert r.returncode == 0 and r.stdout.startswith(f"job {job} migrated to a"), (
            r.stdout, r.stderr)
        progress = r.stderr.splitlines()
        assert any(ln.startswith(f"job {job}: frozen, dumping") for ln in progress), r.stderr
        assert progress[-1] == f"job {job}: done", r.stderr
        code, out, err = finish(p, flag)
        assert code == 0 and intact(out), (out, err)
    finally:
        subprocess.run(["pkill", "-9", "-f", tag], capture_output=True)


@pytest.mark.netns
def test_a_move_refused_over_a_hop_says_why(cluster, tmp_path):
    """``ctl migrate`` at b for a job of a's told to stay: b asks a for the move (with
    progress), a refuses; ctl exits 5 with a's reason, not a dropped connection."""
    _, _, _, n = cluster
    tag, flag = f"{TAG}-5", tmp_path / "end5"
    try:
        p, job = start(n["a"], ["--home"], 1, flag, tag)
        assert n["a"].ctl(f"stay {job}").ok
        r = ctl(n["b"], "migrate", job, "b")
        assert r.returncode == 5, (r.stdout, r.stderr)
        assert r.stdout == "" and "it was told to stay" in r.stderr, r.stderr
        assert n["a"].json(f"job {job}")["node_name"] == "a"
        code, out, err = finish(p, flag)
        assert code == 0 and intact(out), (out, err)
    finally:
        subprocess.run(["pkill", "-9", "-f", tag], capture_output=True)


# ------------------------------------------------------------------ the pieces, alone
def test_a_peers_progress_message_is_taken_only_when_well_formed():
    """A node relays a move's progress to the one that asked; what it says ends up in a
    user's terminal, so a malformed message changes nothing: an unknown phase, a job id
    with a line break or a space, amounts that are not plausible byte counts."""
    from omuscd.events import FOLLOWING, SENDING, Progress

    p = Progress()
    p.update("1.4", SENDING, 5 << 20, 10 << 20)
    good = p.to_wire()
    for bad in ({"phase": "pwned\r\n200 ok"}, {"job": "1.4\r\n200 fake"}, {"job": "1 4"},
                {"job": ""}, {"job": "x" * 65}, {"job": 7}, {"done": -1}, {"done": 1.5},
                {"total": 1 << 60}, {"done": True}, {"phase": None}, {"done": "5"}):
        assert not p.take({**good, **bad}), bad
        assert p.line() == "job 1.4: sending 5 of 10 MB" and p.version == 1
    assert p.take({**good, "phase": FOLLOWING, "done": 1_000_000, "total": 3_000_000})
    assert p.line() == "job 1.4: memory following 1 of 3 MB (post-copy)"


def test_a_client_reads_past_preliminary_replies_to_the_final_one():
    """The one parser: 110 lines are replies of their own; the final one is the first
    of another code, and what a script gets, as before."""
    parser = ReplyParser()
    replies = [parser.feed(line) for line in
               ["110 job 1.4: checking\r\n", "110 job 1.4: done\r\n",
                "200-job 1.4 migrated to b\r\n", "200 second line\r\n"]]
    assert [r.code for r in replies if r] == [110, 110, 200]
    assert replies[0].preliminary and not replies[3].preliminary  # type: ignore[union-attr]
    assert replies[3].lines == ["job 1.4 migrated to b", "second line"]  # type: ignore


def test_progress_readers_see_the_latest_state_and_never_hold_the_work_up():
    from omuscd.events import SENDING, Progress

    async def main() -> None:
        p = Progress()
        seen: list[str] = []

        async def reader() -> None:
            v = 0
            while True:
                v = await p.changed_since(v)
                seen.append(p.line())
                await trio.sleep(0.05)  # slower than the updates

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            for i in range(100):
                p.update("2.1", SENDING, i * 1_000_000, 99_000_000)
                await trio.sleep(0.001)
            await trio.sleep(0.1)
            nursery.cancel_scope.cancel()
        assert 1 < len(seen) < 50 and seen[-1] == "job 2.1: sending 99 of 99 MB", seen

    trio.run(main)



def test_the_consoles_link_shows_progress_and_returns_the_final_reply():
    """The console's command line: its link hands the 110 lines to the status line and
    returns the final reply (it returned the first 110 as the reply, and the real one
    was then read as the answer to the next command)."""
    import trio.testing

    from tui.link import Link

    async def main() -> None:
        ours, daemons = trio.testing.memory_stream_pair()
        link, shown = Link(ours), []

        async def daemon() -> None:
            assert await daemons.receive_some() == b"migrate 1.4 b\n"
            await daemons.send_all(b"110 job 1.4: checking\r\n110 job 1.4: done\r\n"
                                   b"200 job 1.4 migrated to b: frozen 0.1s\r\n")
            assert await daemons.receive_some() == b"jobs\n"
            await daemons.send_all(b"200 no jobs\r\n")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(daemon)
            reply = await link.command("migrate 1.4 b", shown.append)
            assert (reply.code, reply.text) == (200, "job 1.4 migrated to b: frozen 0.1s")
            assert shown == ["job 1.4: checking", "job 1.4: done"]
            assert (await link.command("jobs")).text == "no jobs"

    trio.run(main)
