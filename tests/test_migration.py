"""Live migration with real CRIU between real daemons in network namespaces."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import trio

from omuscd.client import ControlClient
from omuscd.migrate.criu import (
    KDAT_DIR,
    KDAT_NAME,
    RESOURCE_CAP,
    Criu,
    find_criu,
    fs_type,
)
from tests.cluster import (
    USERS_DUMP,
    User,
    criu_problem,
    job_of,
    job_processes,
    migrating,
    namespace_cluster,
    ordinary_user,
    processes_naming,
    run_job,
    slow_links,
    start_daemon,
    wait_for,
)

REASON = criu_problem()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

PY = sys.executable
# CPU-bound, deterministic: a running checksum, printed as it goes
CHECKSUM = """
import sys
s, n = 0, int(sys.argv[1])
for i in range(n):
    s = (s * 1000003 + i) % 2305843009213693951
    if i % 200000 == 0:
        print(i, s, flush=True)
print("done", s, flush=True)
"""
# 256 MB of known contents, checked after the moves
MEMORY = """
import hashlib, os, sys, time
block = hashlib.sha256(b"omuscd").digest() * 32768      # 1 MiB
data = bytearray(block * 256)                            # 256 MiB, resident
before = hashlib.sha256(data).hexdigest()
print("ready", before, flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
print("after", hashlib.sha256(data).hexdigest(), flush=True)
"""


#: the tests make the moves: the balancer's own, on a machine busy with other work, moved
#: their jobs before them ("job ... already runs on b", "is moving already")
QUIET = ["--no-balancing"]


@pytest.fixture(scope="module")
def cluster():
    with namespace_cluster("ab", lambda i: QUIET, prefix=f"omm{os.getpid() % 10000}x",
                           open_to_all=True, leftovers="omuscd-migration-test") as c:
        for d in c[3].values():
            assert d.json("status")["migration"].startswith("criu 4"), d.json("status")
        yield c


def start_again(cluster, name: str, *args: str) -> None:
    """Start node ``name`` (a or b) of the module's cluster again, stopped by a test, as it
    was (``args`` added), once the other one holds it alive (a move to a node it holds
    dead is refused: "cannot reach the target")."""
    lan, work, key, n = cluster
    i = "ab".index(name)
    n[name] = start_daemon(name, ["--key-file", str(key), *QUIET, *args], work,
                           netns=lan.ns(i))
    other = n["ba"[i]]
    wait_for(lambda: other.nodes().get(name, {}).get("state") == "alive", 20,
             f"{other.name} to hold {name} alive again")

def start(node, *argv: str) -> subprocess.Popen[bytes]:
    """``omuscd run --home`` of ``argv`` on ``node``, attached."""
    return run_job(node, ["--home"], *argv)


def memory_job(node, flag, tag: str) -> tuple[subprocess.Popen[bytes], list[bytes], str]:
    """The 256 MB job, started and ready: its process, its 'ready DIGEST' line, its id."""
    p = start(node, PY, "-c", MEMORY, str(flag), tag)
    assert p.stdout is not None
    ready = p.stdout.readline().split()
    assert ready[0] == b"ready"
    return p, ready, job_of(node, tag)


def frozen_line(node, job: str) -> str:
    """The source's log line that times a move of ``job`` (the last one)."""
    return [ln for ln in node.log().splitlines() if f"job {job} frozen" in ln][-1]


def test_checksum_job_moves_there_and_back_byte_for_byte(cluster):
    _, _, _, n = cluster
    count = "20000000"  # several seconds of CPU: it must not end during the moves
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    ref = subprocess.run([PY, "-c", CHECKSUM, count], capture_output=True, cwd="/tmp")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    ref_cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    p = start(n["a"], PY, "-c", CHECKSUM, count, "omuscd-migration-test-1")
    job = job_of(n["a"], "omuscd-migration-test-1")
    def counted() -> dict[str, tuple[int, int]]:  # as node a sees itself and b
        return {v["name"]: (v["moved_in"], v["moved_out"]) for v in n["a"].json("nodes")["nodes"]}

    moves = counted()
    time.sleep(1)  # each stay a good share of the CPU time, so that a lost one shows
    # out post-copy (small as it is): it computes on b while its memory follows
    assert n["a"].ctl("set post_copy_mb 1").ok
    try:
        there = n["a"].ctl(f"migrate {job} b")
    finally:
        n["a"].ctl("set post_copy_mb 16")  # the default
    assert there.code == 200 and "migrated to b" in there.text, there
    assert "(post-copy)" in frozen_line(n["a"], job)
    assert n["a"].json(f"job {job}")["node_name"] == "b"
    time.sleep(1)
    # each node counts what moved in and out, and gossips it (the balancers of the other
    # nodes see from it that a move of theirs shows in its load)
    wait_for(lambda: counted() == {"a": (moves["a"][0], moves["a"][1] + 1),
                                   "b": (moves["b"][0] + 1, moves["b"][1])}, 5, "the counts")
    back = n["b"].ctl(f"migrate {job} home")  # from another node: routed to the home
    assert back.code == 200 and "migrated to a" in back.text, back
    # home: its memory went while it was dumped, relayed over the cluster channel
    assert "(memory streamed to the target)" in frozen_line(n["b"], job)
    out, err = p.communicate(timeout=120)
    assert p.returncode == ref.returncode == 0, err
    assert out == ref.stdout and err == ref.stderr == b""
    view = n["a"].json(f"job {job}")
    assert view["migrations"] == 2 and view["state"] == "exited" and view["node_name"] == "a"
    # CPU time counts every stay (a restore starts the kernel's count again); each stay
    # is about a third of it, the margin is for a machine shared with the daemons
    assert view["cpu"] >= 0.75 * ref_cpu, (view["cpu"], ref_cpu)
    feed = n["a"].log()
    assert f"job {job} migrated to b: frozen" in feed and f"job {job} migrated to a" in feed


def ids_and_caps(pid: int) -> tuple[set[int], set[int], int]:
    """The uids and gids (real, effective, saved, fs) and effective capabilities of
    ``pid``."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.split()
    return ({int(x) for x in fields["Uid"]}, {int(x) for x in fields["Gid"]},
            int(fields["CapEff"][0], 16))


INIT_CAPS = (1 << 1) | (1 << 21)  # CAP_DAC_OVERRIDE, CAP_SYS_ADMIN


def user_job_runs_as_its_user(user: User, tag: str) -> None:
    """Every process of the job has only the user's ids; the command has no capability,
    its init only the two CRIU's parasite needs in it (see omuscd.jobs.jobinit.drop_init)."""
    command = job_processes(tag)
    assert len(command) == 1, command
    init = psutil.Process(command[0]).ppid()
    assert "jobinit" in open(f"/proc/{init}/cmdline").read()
    for pid, caps in ((init, INIT_CAPS), (command[0], 0)):
        assert ids_and_caps(pid) == ({user.uid}, {user.gid}, caps), (pid, ids_and_caps(pid))
    # the user cannot look into the init, nor write to its memory: it holds capabilities
    # they do not have (and changing uid made it non-dumpable)
    for what, mode in (("environ", "rb"), ("mem", "r+b")):
        tried = user.run(["/usr/bin/python3", "-c", f"open('/proc/{init}/{what}', '{mode}')"])
        assert tried.returncode == 1 and b"PermissionError" in tried.stderr, tried


def test_an_ordinary_users_job_moves_there_and_back_byte_for_byte(cluster):
    """An ordinary user's job moves post-copy and back pre-copy like root's: CRIU reads
    every task's limits, which a root without CAP_SYS_RESOURCE (this machine's) may do
    only with the task's real ids; a job whose init was root and whose command was the
    user's could be dumped by no one ("Can't get rlimit 0: Operation not permitted")."""
    _, _, _, n = cluster
    count = "20000000"  # several seconds of CPU: it must not end during the moves
    tag = "omuscd-migration-test-user"
    argv = ["/usr/bin/python3", "-c", CHECKSUM, count]
    with ordinary_user("mv") as user:
        ref = user.run(argv)
        p = user.popen(user.run_argv(n["a"].socket, "--home", "--", *argv, tag))
        job = job_of(n["a"], tag)
        assert n["a"].json(f"job {job}")["owner"] == user.name
        user_job_runs_as_its_user(user, tag)
        time.sleep(1)
        assert n["a"].ctl("set post_copy_mb 1").ok  # out post-copy
        try:
            there = n["a"].ctl(f"migrate {job} b")  # root moves it
        finally:
            n["a"].ctl("set post_copy_mb 16")  # the default
        assert there.code == 200 and "migrated to b" in there.text, there
        assert "(post-copy)" in frozen_line(n["a"], job)
        assert n["a"].json(f"job {job}")["node_name"] == "b"
        user_job_runs_as_its_user(user, tag)  # restored with its ids and capabilities
        time.sleep(1)
        back = user.run([user.python, "-m", "omuscd", "ctl", "--connect", n["b"].socket,
                         "migrate", job, "home"])  # its owner brings it home
        assert back.returncode == 0 and b"migrated to a" in back.stdout, back
        assert "(memory streamed to the target)" in frozen_line(n["b"], job)
        out, err = p.communicate(timeout=120)
        assert p.returncode == ref.returncode == 0, err
        assert out == ref.stdout and err == ref.stderr == b""
        view = n["a"].json(f"job {job}")
        assert view["migrations"] == 2 and view["state"] == "exited", view


# As a user: send a signal to the first CRIU dump of their job from now on.
USER_SIGNALS_CRIU = USERS_DUMP + "os.kill(users_dump(), int(sys.argv[1]))\n"


def test_an_ordinary_user_can_only_spoil_the_move_of_their_own_job(cluster):
    """The CRIU that dumps a user's job runs with that user's real uid (see
    omuscd.migrate.criu), so the user may signal it: that fails this move only, and the
    job runs on, intact, here; it moves after (and 'expel' sends it home)."""
    _, _, _, n = cluster
    tag = "omuscd-migration-test-spoil"
    with ordinary_user("sp") as user:
        flag = user.home / "go"
        p = user.popen(user.run_argv(n["a"].socket, "--home", "--", "/usr/bin/python3",
                                     "-c", MEMORY, str(flag), tag))
        assert p.stdout is not None
        ready = p.stdout.readline().split()
        job = job_of(n["a"], tag)
        spoiler = user.popen(["/usr/bin/python3", "-c", USER_SIGNALS_CRIU,
                              str(int(signal.SIGKILL))])
        time.sleep(0.5)  # it scans /proc already
        spoilt = n["a"].ctl(f"migrate {job} b")
        assert spoiler.wait(5) == 0  # it found, and could kill, a dump with its real uid
        assert spoilt.code == 500 and "job resumed here" in spoilt.text, spoilt
        assert n["a"].json(f"job {job}")["state"] == "running"
        moved = n["a"].ctl(f"migrate {job} b")
        assert moved.code == 200 and "migrated to b" in moved.text, moved
        expel = n["b"].ctl("expel")
        assert expel.ok and f"job {job} migrated to a" in expel.text, expel
        flag.touch()
        out, err = p.communicate(timeout=60)
        assert (p.returncode, err) == (0, b"")
        assert out.split() == [b"after", ready[1]]
        assert n["a"].json(f"job {job}")["migrations"] == 2


def test_a_set_user_id_program_in_a_users_job_is_refused_before_the_freeze(cluster):
    """Root here lacks CAP_SYS_RESOURCE: a process whose ids differ from the job's (a
    set-user-ID program) cannot be dumped by anyone.  Said before anything is frozen."""
    _, _, _, n = cluster
    with ordinary_user("su") as user:
        setuid_sleep = user.home.parent / "omuscd-migration-test-suid"  # root's, 0755
        setuid_sleep.write_bytes(Path("/usr/bin/sleep").read_bytes())
        os.chmod(setuid_sleep, 0o4755)
        p = user.popen(user.run_argv(n["a"].socket, "--home", "--", str(setuid_sleep), "30"))
        job = job_of(n["a"], "omuscd-migration-test-suid")
        r = n["a"].ctl(f"migrate {job} b")
        if RESOURCE_CAP:  # root may read anyone's limits: it moves
            assert r.code == 200, r
        else:
            assert r.code == 500 and "cannot move" in r.text and "set-user-ID" in r.text, r
            assert f"job {job} resumed" not in n["a"].log()  # never frozen
        assert n["a"].ctl(f"kill {job} KILL").ok
        p.communicate(timeout=10)


def test_a_job_coming_home_right_after_a_line_repeats_no_output(cluster):
    """The job writes a line and is frozen to come home before its node has seen the
    line (it looks at a quiet job's files every quarter of a second).  The node's spool,
    sent with the move, holds the line, and the home was still taking in what that node
    sends of the output as it sees it: the line came again that way, after the spool,
    and the user saw it twice."""
    _, _, _, n = cluster
    bursts = ("import time\n"
              "for k in range(5):\n"
              "    end = time.time() + 0.8\n"
              "    while time.time() < end: pass\n"
              "    print('line', k, flush=True)\n")
    p = start(n["a"], PY, "-c", bursts, "omuscd-migration-test-home")
    job = job_of(n["a"], "omuscd-migration-test-home")
    assert n["a"].ctl(f"migrate {job} b").code == 200
    out_there = n["b"].state_dir / "spool" / job / "stdout"
    for k in range(2):  # come home the moment a line is written, then go again
        size = out_there.stat().st_size
        wait_for(lambda size=size: out_there.stat().st_size > size, 10, f"line {k} there")
        back = n["a"].ctl(f"migrate {job} home")
        assert back.code == 200, back
        if k == 0:
            assert n["a"].ctl(f"migrate {job} b").code == 200
    out, err = p.communicate(timeout=60)
    assert (p.returncode, err) == (0, b"")
    assert out == b"".join(b"line %d\n" % k for k in range(5))


def test_a_failed_move_home_follows_the_job_again_from_the_spool_it_received(tmp_path):
    """Coming home, the job's output stops being followed from the node it leaves (see
    above).  If the move then fails, the job runs on there: the home follows it again,
    from the end of its spool (which may by then be that node's, received for the
    move), so that nothing comes twice and nothing is missed."""
    from types import SimpleNamespace

    import trio

    from omuscd.jobs.node import JobControl
    from omuscd.jobs.record import Job, Owner
    from omuscd.jobs.spool import Spool
    from omuscd.migrate.node import Migrations

    record = Job("10.7", Owner(os.getuid(), os.getgid(), [], "root"), home=10, node=20,
                 node_name="b", argv=["x"], cwd="/tmp")
    spool = Spool(str(tmp_path))
    spool.create(record)
    spool.append(record.id, 1, b"line 0\nline 1\n")  # the source's, received for the move
    record.offsets = {1: 7, 2: 0}  # what had been followed before
    followed: list[tuple[str, dict[int, int]]] = []
    said: list[str] = []

    def follow(job, anew=False):
        followed.append((job.id, dict(job.offsets)))

    async def main() -> bool:
        async with trio.open_nursery():
            following = trio.CancelScope()
            async def prepare_restore(images, fds):  # its CRIU, started ahead
                async def close():
                    pass
                return SimpleNamespace(close=close)

            mover = SimpleNamespace(available=True, streams=False, describe=lambda: "criu",
                                    keep_log=lambda *a: "", prepare_restore=prepare_restore)
            d = SimpleNamespace(name="a", mover=mover, cfg=SimpleNamespace(
                state_dir=str(tmp_path), stream_pages=False))
            jc = SimpleNamespace(me=10, home={record.id: record},
                                 scopes={record.id: following}, spool=spool,
                                 check_guest_ok=lambda owner, local: None, follow=follow)
            jc.stop_following = lambda job_id: JobControl.stop_following(jc, job_id)
            replies = iter([{"op": "bogus"}])

            async def send(msg):
                said.append(msg["op"])

            async def receive_msg():
                return next(replies)

            ch = SimpleNamespace(send=send, receive_msg=receive_msg)
            await Migrations(jc, d).target.immigrate(ch, {"job": record.wire()})
            return following.cancel_called

    assert trio.run(main) is True  # following stopped when the move began
    assert said == ["ready", "failed"]
    assert followed == [("10.7", {1: 14, 2: 0})]  # again, from the end of the spool


# holds N MB (argv[1]) resident until killed
HOLD = """
import sys, time
data = bytearray(b"x" * (int(sys.argv[1]) << 20))
print("ready", flush=True)
time.sleep(600)
"""


def test_by_default_a_job_of_16_mb_moves_post_copy_a_smaller_one_pre_copy(cluster):
    """post_copy_mb is 16 by default: a job of 16 MB or more (its whole tree, its init
    too) moves post-copy, frozen about as long as a bare criu dump plus restore of it
    (tests/bench/bench_migrate.py); a smaller one with its memory inside the freeze,
    streamed while it is dumped."""
    _, _, _, n = cluster
    started = {}
    assert n["a"].ctl("set balancing off").ok  # only the moves made here (a busy machine)
    for tag, argv in (("omuscd-migration-test-way-big", [PY, "-c", HOLD, "24"]),
                      ("omuscd-migration-test-way-small", ["/bin/sh", "-c",
                                                       "echo ready; sleep 600"])):
        p = start(n["a"], *argv, tag)
        assert p.stdout is not None and p.stdout.readline() == b"ready\n"
        started[tag] = (p, job_of(n["a"], tag))
    try:
        for tag, way in (("omuscd-migration-test-way-big", "(post-copy)"),
                         ("omuscd-migration-test-way-small", "(memory streamed to the target)")):
            job = started[tag][1]
            moved = n["a"].ctl(f"migrate {job} b")
            assert moved.code == 200 and "migrated to b" in moved.text, moved
            line = frozen_line(n["a"], job)
            assert way in line, line
            assert n["a"].json(f"job {job}")["node_name"] == "b"
    finally:
        n["a"].ctl("set balancing on")
        for p, job in started.values():
            n["a"].ctl(f"kill {job} KILL")
            p.wait(60)


def test_256_mb_moves_with_its_contents(cluster, tmp_path):
    _, _, _, n = cluster
    flag = tmp_path / "go"
    p, ready, job = memory_job(n["a"], flag, "omuscd-migration-test-2")
    moved = n["a"].ctl(f"migrate {job} b")
    assert moved.code == 200, moved
    mb = float(moved.text.split("frozen")[1].split(",")[1].split()[0])
    assert mb >= 256
    # big, and not going home: post-copy (its memory followed once it ran on b)
    assert "(post-copy)" in frozen_line(n["a"], job)
    assert "(its memory followed in " in moved.text, moved
    record = n["a"].json(f"job {job}")["moves"][-1]
    assert record["followed"] > 0 and record["freeze"] > 0, record
    # it was dumped at a high priority; it runs at its own again
    # (the frozen copy at the source, killed on the target's word, may take a moment)
    wait_for(lambda: len(job_processes("omuscd-migration-test-2")) == 1, 10,
             "one copy of the job")
    pids = job_processes("omuscd-migration-test-2")
    assert pids and {os.getpriority(os.PRIO_PROCESS, p) for p in pids} == {0}, pids
    # CRIU ran real-time (omuscd.priority): the job has its own policy back, and neither
    # daemon stays real-time after the move
    assert {os.sched_getscheduler(p) for p in pids} == {os.SCHED_OTHER}, pids
    wait_for(lambda: {os.sched_getscheduler(d.popen.pid) for d in n.values()} ==
             {os.SCHED_OTHER}, 5, "both daemons to be normal tasks again")
    # It must outlive the daemon thread that ran criu: trio retires idle worker threads
    # after 10 s, and a parent-death signal restored into the job once killed it then.
    time.sleep(12)
    assert n["a"].json(f"job {job}")["state"] == "running"
    # home again: never post-copy there, its memory streamed while it is dumped
    back = n["b"].ctl(f"migrate {job} home")
    assert back.code == 200 and "migrated to a" in back.text, back
    assert "(memory streamed to the target)" in frozen_line(n["b"], job)
    # and out once more, its memory copied after the dump this time
    assert n["a"].ctl("set stream_pages off").ok and n["a"].ctl("set post_copy_mb 0").ok
    try:
        out_again = n["a"].ctl(f"migrate {job} b")
    finally:
        n["a"].ctl("set stream_pages on")
        n["a"].ctl("set post_copy_mb 16")  # the default
    assert out_again.code == 200 and "migrated to b" in out_again.text, out_again
    line = frozen_line(n["a"], job)
    assert "streamed" not in line and "post-copy" not in line, line
    flag.touch()
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert out.split() == [b"after", ready[1]]


def test_one_move_of_a_job_at_a_time(cluster, tmp_path):
    _, _, _, n = cluster
    flag = tmp_path / "go"
    p, ready, job = memory_job(n["a"], flag, "omuscd-migration-test-5")
    replies: list[object] = []

    def migrate() -> None:
        with ControlClient.unix(n["a"].socket, timeout=120) as c:
            replies.append(c.command(f"migrate {job} b"))

    threads = [threading.Thread(target=migrate) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    codes = sorted(r.code for r in replies)  # type: ignore[attr-defined]
    texts = " | ".join(r.text for r in replies)  # type: ignore[attr-defined]
    assert codes == [200, 500] and "moving already" in texts, texts
    flag.touch()
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and out.split() == [b"after", ready[1]], err


def test_established_tcp_connection_is_refused_with_its_reason(cluster):
    _, _, _, n = cluster
    code = ("import socket, time\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
            "c = socket.create_connection(s.getsockname()); a, _ = s.accept()\n"
            "print('connected', flush=True); time.sleep(30)\n")
    p = start(n["a"], PY, "-c", code, "omuscd-migration-test-3")
    try:
        assert p.stdout is not None and p.stdout.readline() == b"connected\n"
        job = job_of(n["a"], "omuscd-migration-test-3")
        r = n["a"].ctl(f"migrate {job} b")
        assert r.code == 500 and "established TCP connection to 127.0.0.1:" in r.text
        view = n["a"].json(f"job {job}")
        assert view["state"] == "running" and view["node_name"] == "a"
        assert "established TCP connection" in view["cannot_move"]
        assert "migration-failed" not in n["a"].ctl("jobs").text  # a listing, not an event
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=10)


def test_restartable_job_is_rerun_where_there_is_no_criu(cluster, tmp_path):
    lan, work, key, n = cluster
    # a third node whose daemon has no usable CRIU
    lan.add_node(2)
    c = start_daemon("c", ["--key-file", str(key), "--criu", "/bin/false"], work,
                     netns=lan.ns(2))
    try:
        wait_for(lambda: "c" in n["a"].nodes(), 10, "a to see c")
        assert c.json("status")["migration"].startswith("off (")
        assert "criu" not in n["a"].nodes()["c"]["flags"]
        script = "echo start $(hostname); sleep 2; echo end"
        plain = start(n["a"], "sh", "-c", script)
        job = job_of(n["a"], "echo start")
        r = n["a"].ctl(f"migrate {job} c")
        assert r.code == 500 and "no CRIU on c" in r.text and "--restartable" in r.text
        plain.send_signal(signal.SIGINT)
        plain.communicate(timeout=10)
        p = subprocess.Popen([PY, "-m", "omuscd", "run", "--connect", n["a"].socket, "--home",
                              "--restartable", "--", "sh", "-c", script],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/tmp")
        job = job_of(n["a"], "echo start")
        time.sleep(0.5)
        r = n["a"].ctl(f"migrate {job} c")
        assert r.code == 200 and "restarted from the beginning on c" in r.text, r
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        assert out.decode().endswith("end\n")  # the rerun finished, attached throughout
        view = n["a"].json(f"job {job}")
        assert view["node_name"] == "c" and view["migrations"] == 1
        assert view["moves"][-1]["restarted"] is True
        assert len([ln for ln in n["a"].ctl(f"output {job}").lines if "end" in ln]) == 1
    finally:
        c.stop()


def test_migrate_best_chooses_a_node_that_can_take_the_job(cluster):
    """``migrate JOB best`` chose among the nodes that may take a *new* job, without
    asking whether they can restore one: the node with the most room had no CRIU, and
    the move was refused there ("no CRIU on d").  One rule (ClusterView.why_not) now
    decides for placement, balancing and ``migrate``: d is no candidate for this job."""
    lan, work, key, n = cluster
    lan.add_node(3)  # (2 is the no-CRIU node of the test above)
    d = start_daemon("d", ["--key-file", str(key), "--criu", "/bin/false"], work,
                     netns=lan.ns(3))
    p = start(n["a"], "sleep", "60")
    placed = None
    try:
        wait_for(lambda: "d" in n["a"].nodes() and "d" in n["b"].nodes(), 10, "d to be seen")
        assert "criu" not in n["a"].nodes()["d"]["flags"]
        job = job_of(n["a"], "sleep 60")
        # a job placed on b just now counts there until b's figures show it: d (idle,
        # as many CPUs) has the most room of the nodes the job could go to
        r = subprocess.run([PY, "-m", "omuscd", "run", "--connect", n["a"].socket, "--node",
                            "b", "--detach", "--", "sleep", "60"], capture_output=True,
                           text=True, cwd="/tmp")
        assert r.returncode == 0, r.stderr
        placed = r.stdout.strip()
        moved = n["a"].ctl(f"migrate {job} best")
        assert moved.code == 200 and f"job {job} migrated to b" in moved.text, moved
        assert n["a"].json(f"job {job}")["node_name"] == "b"
    finally:
        if placed:
            n["a"].ctl(f"kill {placed} KILL")
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=10)
        d.stop()


def test_stay_is_respected(cluster):
    _, _, _, n = cluster
    p = start(n["a"], "sleep", "30")
    try:
        job = job_of(n["a"], "sleep 30")
        assert n["a"].ctl(f"stay {job}").ok
        r = n["a"].ctl(f"migrate {job} b")
        assert r.code == 500 and "told to stay" in r.text
        assert n["a"].ctl(f"nostay {job}").ok
    finally:
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=10)


def test_expel_sends_guests_home_and_bring_calls_them_back(cluster):
    _, _, _, n = cluster
    p = start(n["a"], "sleep", "30")
    try:
        job = job_of(n["a"], "sleep 30")
        assert n["a"].ctl(f"migrate {job} b").ok
        expel = n["b"].ctl("expel")
        assert expel.ok and f"job {job} migrated to a" in expel.text, expel
        assert n["a"].json(f"job {job}")["node_name"] == "a"
        assert n["a"].ctl(f"migrate {job} b").ok
        bring = n["a"].ctl("bring")
        assert bring.ok and f"job {job} migrated to a" in bring.text, bring
        view = n["a"].json(f"job {job}")
        assert view["node_name"] == "a" and view["migrations"] == 4
        assert n["b"].ctl("expel").text == "no guest jobs here"
    finally:
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=10)
    assert p.returncode == 128 + signal.SIGINT


COUNTER = """
import time
n = 0
while True:
    n += 1
    print(n, flush=True)
    time.sleep(0.02)
"""


def test_root_takes_over_a_process_by_pid(cluster, tmp_path):
    lan, _, _, n = cluster
    # refused, with the reason, before anything is frozen: its session is pytest's
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        r = n["a"].ctl(f"migrate {sleeper.pid} b")
        assert r.code == 500 and "session leader" in r.text and "setsid" in r.text, r
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()
    assert n["a"].ctl("migrate 1 b").code == 500
    # a process omuscd did not start: its own PID namespace and session, no terminal
    out = tmp_path / "counter.out"
    with open(out, "wb") as f:
        outsider = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{lan.ns(0)}", "unshare", "--pid", "--fork",
             "setsid", PY, "-c", COUNTER, "omuscd-migration-test-5"],
            stdout=f, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: psutil.Process(outsider.pid).children(), 5, "the counter")
        pid = psutil.Process(outsider.pid).children()[0].pid
        wait_for(lambda: out.stat().st_size > 20, 5, "the counter to count")
        r = n["a"].ctl(f"migrate {pid} b")
        assert r.code == 200 and "migrated to b" in r.text, r
        job = r.text.split("is now job ")[1].split(";")[0]
        view = n["a"].json(f"job {job}")
        assert view["node_name"] == "b" and view["state"] == "running", view
        assert view["owner"] == "root" and "omuscd-migration-test-5" in view["command"]
        assert outsider.wait(10) is not None  # the frozen original is gone
        size = out.stat().st_size
        wait_for(lambda: out.stat().st_size > size + 20, 10, "the counter to go on, on b")
        assert n["a"].ctl(f"kill {job} KILL").ok
        wait_for(lambda: n["a"].json(f"job {job}")["state"] == "exited", 10, "its end")
        numbers = [int(x) for x in out.read_text().split()]
        assert numbers == list(range(1, len(numbers) + 1))  # carried on, nothing twice
    finally:
        subprocess.run(["pkill", "-9", "-f", "omuscd-migration-test-5"], capture_output=True)
        outsider.kill()
        outsider.wait()


def test_a_big_job_to_a_target_without_post_copy_streams_its_memory(cluster, tmp_path):
    """A 256 MB job (post-copy by size) moving to a node whose kernel cannot restore
    lazily: that node answers without post-copy and takes the memory streamed while it
    is dumped; the source, which started its dump's CRIU before it knew (holding the page
    stream's socket whatever the answer), streams it; the job moves intact."""
    n = cluster[3]
    fake = tmp_path / "criu"
    fake.write_text('#!/bin/sh -p\n'
                    'if [ "$*" = "check --feature uffd-noncoop" ]; then exit 1; fi\n'
                    f'exec {find_criu(None)} "$@"\n')
    fake.chmod(0o755)
    n["b"].stop()
    start_again(cluster, "b", "--criu", str(fake))
    try:
        flag = tmp_path / "go"
        p, ready, job = memory_job(n["a"], flag, "omuscd-migration-test-nolazy")
        moved = n["a"].ctl(f"migrate {job} b")
        assert moved.code == 200 and "migrated to b" in moved.text, moved
        line = frozen_line(n["a"], job)
        assert "(memory streamed to the target)" in line and "post-copy" not in line, line
        flag.touch()
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0 and out.split() == [b"after", ready[1]], err
    finally:
        n["b"].stop()
        start_again(cluster, "b")


@pytest.mark.parametrize("when", ["transfer", "post-copy"])
def test_target_killed_mid_move_leaves_one_copy_running_at_the_source(cluster, when):
    """The target daemon dies while the 256 MB job's images are on their way
    ("transfer"), or once the job runs there and its memory follows ("post-copy"): then
    the guard kills the target's copy, which would read zeros where its memory was not
    yet.  Either way the source resumes its own copy, intact: exactly one runs."""
    _, work, _, n = cluster
    flag = work / f"go-4-{when}"
    tag = f"omuscd-migration-test-4-{when}"
    p, ready, job = memory_job(n["a"], flag, tag)
    t, result = migrating(n["a"], job, "b")

    def arriving() -> bool:
        return any(f.stat().st_size > 16 << 20
                   for f in (n["b"].state_dir / "images").glob("*/pages-*.img"))

    if when == "transfer":
        wait_for(arriving, 30, "the transfer to begin", interval=0.005)
    else:
        wait_for(lambda: f"job {job} runs here; its memory follows" in n["b"].log(), 30,
                 "the job to run on b while its memory follows", interval=0.002)
    n["b"].stop(signal.SIGKILL)
    t.join(60)
    reply = result["reply"]
    assert reply.code == 500 and "resumed here" in reply.text, reply  # type: ignore[union-attr]
    view = n["a"].json(f"job {job}")
    assert view["state"] == "running" and view["node_name"] == "a"
    # exactly one copy, and it runs (not left frozen)
    wait_for(lambda: len(job_processes(tag)) == 1, 10, "one copy")
    commands = job_processes(tag)
    assert os.getpriority(os.PRIO_PROCESS, commands[0]) == 0  # its own priority again
    state = open(f"/proc/{commands[0]}/stat").read().rsplit(")", 1)[1].split()[0]
    assert state in ("S", "R"), state
    flag.touch()
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0 and out.split() == [b"after", ready[1]], err
    start_again(cluster, "b")


#: 256 MB (moved post-copy) and 8 MB of output in its spool (sent after the images, before
#: the restore); the file given is made once all of it is written
TALKER = """
import sys, time
data = bytearray(b"x" * (256 << 20))
for _ in range(8 << 10):
    sys.stdout.write("y" * 1023 + "\\n")
sys.stdout.flush()
open(sys.argv[1], "w").close()
while True:
    time.sleep(0.05)
"""


#: accept(2) and accept4(2) on x86_64: /proc/PID/syscall's first field while blocked in one
ACCEPT = ("43", "288")


def lazy_pages_waiting(images: Path) -> bool:
    """Whether a ``criu lazy-pages`` for a restore from under ``images`` (not the shell
    holding it before it is told to start) is ready, waiting for the restore to connect."""
    for pid, line in processes_naming(str(images)).items():
        if " lazy-pages " in line and " exec " not in line:
            try:
                with open(f"/proc/{pid}/syscall") as f:
                    if f.read().split()[0] in ACCEPT:
                        return True
            except (OSError, IndexError):
                continue
    return False


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
def test_a_target_killed_once_lazy_pages_started_leaves_no_criu_behind(cluster, tmp_path,
                                                                       sig):
    """The target daemon dies (SIGKILL), or is stopped (SIGTERM), after it started ``criu
    lazy-pages`` for a post-copy move (told 'lazy-start' once the first images came) and
    before the restore: the rest (8 MB of output) is still on its way over a slow link.
    The source resumes its job, and lazy-pages, waiting for a restore that never comes,
    goes with the daemon.  Killed, it was left running for ever, its parent init (one per
    full test run)."""
    lan, _, _, n = cluster
    tag, ready = f"omuscd-migration-test-12-{sig}", tmp_path / "ready"
    r = subprocess.run([PY, "-m", "omuscd", "run", "--connect", n["a"].socket, "--home",
                        "--detach", "--", PY, "-c", TALKER, str(ready), tag],
                       capture_output=True, text=True, cwd="/tmp")
    assert r.returncode == 0, r.stderr
    wait_for(ready.exists, 30, "the job's output")
    job = job_of(n["a"], tag)
    images = n["b"].state_dir / "images"
    try:
        with slow_links(lan, (0, 1), "10mbit"):
            t, result = migrating(n["a"], job, "b")
            wait_for(lambda: lazy_pages_waiting(images), 30, "lazy-pages to be ready on b",
                     interval=0.005)
            n["b"].stop(sig)
            t.join(60)
        reply = result["reply"]
        assert reply.code == 500 and "resumed here" in reply.text, reply  # type: ignore[union-attr]
        if sig == signal.SIGTERM:  # stopped, it removed what it had received
            assert not list(images.iterdir()), list(images.iterdir())
        try:
            wait_for(lambda: not processes_naming(str(images)), 5,
                     "what b started for the move to end with it")
        except AssertionError:
            raise AssertionError(f"left behind: {processes_naming(str(images))}") from None
        assert n["a"].json(f"job {job}")["state"] == "running"
    finally:
        for pid in processes_naming(str(images)):
            os.kill(pid, signal.SIGKILL)
        subprocess.run(["pkill", "-9", "-f", tag], capture_output=True)
        if not n["b"].alive():
            start_again(cluster, "b")


BIG_COUNTER = """
import sys, time
data = bytearray(b"x" * (256 << 20))                     # resident: moved post-copy
n = 0
while True:
    n += 1
    with open(sys.argv[1], "a") as f:
        f.write(f"{n}\\n")
    time.sleep(0.05)
"""


def moving_post_copy(n, out: Path, tag: str) -> tuple[str, threading.Thread]:
    """A 256 MB counting job started on a and being moved to b: returns once it runs on
    b while its memory still follows (the move's thread still waiting)."""
    r = subprocess.run([PY, "-m", "omuscd", "run", "--connect", n["a"].socket, "--home",
                        "--detach", "--", PY, "-c", BIG_COUNTER, str(out), tag],
                       capture_output=True, text=True, cwd="/tmp")
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip()
    wait_for(lambda: out.exists() and len(out.read_text().split()) > 3, 30, "the counter")

    t, _ = migrating(n["a"], job, "b")
    wait_for(lambda: f"job {job} runs here; its memory follows" in n["b"].log(), 30,
             "the job to run on b while its memory follows", interval=0.002)
    return job, t


def test_a_move_cut_short_by_the_source_dying_is_settled_when_it_restarts(cluster, tmp_path):
    """The source daemon dies while the job runs on the target and its memory follows:
    the target kills its copy (its page source gone), and the source, started again,
    finds the job it had frozen for the move, asks the target, and resumes it."""
    n = cluster[3]
    out = tmp_path / "count"
    job, t = moving_post_copy(n, out, "omuscd-migration-test-8")
    n["a"].stop(signal.SIGKILL)
    t.join(30)
    wait_for(lambda: "incoming move abandoned" in n["b"].log(), 30, "b to give it up")
    wait_for(lambda: len(job_processes("omuscd-migration-test-8")) == 1, 10,
             "b's copy to be killed")
    stopped = job_processes("omuscd-migration-test-8")[0]
    state = open(f"/proc/{stopped}/stat").read().rsplit(")", 1)[1].split()[0]
    assert state == "T", state  # a's copy, frozen for the move
    start_again(cluster, "a")
    wait_for(lambda: f"job {job}: its move to b was cut short when this daemon stopped; "
             "it resumes here" in n["a"].log(), 30, "a to settle the move")
    seen = len(out.read_text().split())
    wait_for(lambda: len(out.read_text().split()) > seen + 3, 10, "the counter to go on")
    assert job_processes("omuscd-migration-test-8") == [stopped]  # one copy, a's
    view = n["a"].json(f"job {job}")
    assert view["state"] == "running" and view["node_name"] == "a"
    assert not list((n["a"].state_dir / "moving").iterdir())
    assert n["a"].ctl(f"kill {job} KILL").ok
    wait_for(lambda: n["a"].json(f"job {job}")["state"] == "exited", 10, "its end")


def test_a_source_stopped_by_sigterm_while_the_memory_follows_resumes_the_job(cluster,
                                                                              tmp_path):
    """SIGTERM on the source while a post-copy move's memory follows: before it exits, it
    closes the move (the target kills its copy), learns from the target that it does not
    run the job, and resumes it: one copy, running, no restart needed."""
    n = cluster[3]
    out = tmp_path / "count"
    job, t = moving_post_copy(n, out, "omuscd-migration-test-9")
    try:
        assert n["a"].stop(signal.SIGTERM, timeout=60) == 0
        t.join(30)
        assert f"job {job}: its move was cut short by this daemon stopping" in n["a"].log()
        wait_for(lambda: len(job_processes("omuscd-migration-test-9")) == 1, 10,
                 "b's copy to be killed")
        (left,) = job_processes("omuscd-migration-test-9")
        state = open(f"/proc/{left}/stat").read().rsplit(")", 1)[1].split()[0]
        assert state in ("S", "R"), state  # a's copy, running again
        seen = len(out.read_text().split())
        wait_for(lambda: len(out.read_text().split()) > seen + 3, 10, "the counter to go on")
    finally:
        subprocess.run(["pkill", "-9", "-f", "omuscd-migration-test-9"], capture_output=True)
        start_again(cluster, "a")


FORKED = """
import hashlib, os, sys, time
block = hashlib.sha256(b"omuscd").digest() * 32768      # 1 MiB
data = bytearray(block * 160)                            # 160 MiB, then shared copy-on-write
child = os.fork()
if child == 0:
    data[0:1] = b"c"                                     # one page of its own
who = "child" if child == 0 else "parent"
print(who, "ready", hashlib.sha256(data).hexdigest(), flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
print(who, "after", hashlib.sha256(data).hexdigest(), flush=True)
if child:
    os.waitpid(child, 0)
"""


def test_a_forked_job_sharing_its_memory_moves_post_copy_intact(cluster, tmp_path):
    """Two processes sharing 160 MB copy-on-write (one page changed in the child):
    post-copy gives each its own memory back, every page right."""
    _, _, _, n = cluster
    flag = tmp_path / "go"
    p = start(n["a"], PY, "-c", FORKED, str(flag), "omuscd-migration-test-10")
    assert p.stdout is not None
    ready = sorted(p.stdout.readline().split() + p.stdout.readline().split())
    job = job_of(n["a"], "omuscd-migration-test-10")
    moved = n["a"].ctl(f"migrate {job} b")
    assert moved.code == 200 and "its memory followed in" in moved.text, moved
    flag.touch()
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    after = sorted(out.split())
    assert len(after) == 6 and [w for w in after if w not in (b"after",)] == [
        w for w in ready if w not in (b"ready",)], (ready, after)


QUICK_END = """
import os, sys, time
data = bytearray(b"x" * (256 << 20))
print("ready", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.01)
print("bye", flush=True)
sys.exit(7)
"""


def test_a_job_that_ends_while_its_memory_follows_ends_once_on_the_target(cluster, tmp_path):
    """Post-copy: the job ends on the target before the rest of its memory is there.
    The move completes (lazy-pages has nothing more to fetch for it), the source's
    frozen copy goes, and the end is booked once, with its status and output."""
    _, _, _, n = cluster
    flag = tmp_path / "go"
    p = start(n["a"], PY, "-c", QUICK_END, str(flag), "omuscd-migration-test-11")
    assert p.stdout is not None and p.stdout.readline() == b"ready\n"
    job = job_of(n["a"], "omuscd-migration-test-11")
    t, result = migrating(n["a"], job, "b")
    wait_for(lambda: f"job {job} runs here; its memory follows" in n["b"].log(), 30,
             "the job to run on b while its memory follows", interval=0.002)
    flag.touch()
    t.join(60)
    assert result["reply"].code == 200, result  # type: ignore[attr-defined]
    out, err = p.communicate(timeout=30)
    assert p.returncode == 7 and out == b"bye\n", (p.returncode, out, err)
    view = n["a"].json(f"job {job}")
    assert view["state"] == "exited" and view["node_name"] == "b", view
    assert job_processes("omuscd-migration-test-11") == []


def test_a_job_that_ends_while_its_target_gets_ready_stays_ended(cluster):
    """The source checks the job again once the target is ready: a job that ended in
    between was marked migrating over its end, its dump failed, and the 'resume' put it
    back to running for ever (a balancing test's cleanup waited in vain for it)."""
    _, _, _, n = cluster
    p = start(n["a"], "sh", "-c", "sleep 60 # omuscd-migration-test-6")
    job = job_of(n["a"], "omuscd-migration-test-6")
    result: dict[str, object] = {}
    n["b"].popen.send_signal(signal.SIGSTOP)  # b answers nothing for a moment
    try:
        mover = threading.Thread(target=lambda: result.update(
            reply=n["a"].ctl(f"migrate {job} b")))
        mover.start()
        time.sleep(0.5)  # a is waiting for b
        assert n["a"].ctl(f"kill {job} KILL").ok
        p.wait(3)  # its client has the end: it is booked (asking a would ask b too)
    finally:
        n["b"].popen.send_signal(signal.SIGCONT)
    mover.join(30)
    reply = result["reply"]
    assert not reply.ok and "ended before it could move" in reply.text, reply  # type: ignore[attr-defined]
    time.sleep(0.5)
    view = n["a"].json(f"job {job}")
    assert view["state"] == "exited" and view["status"] == "killed by signal 9", view


def test_criu_learns_the_kernel_once_per_daemon_not_at_every_move(workdir, reaper):
    """CRIU keeps what it found out about the kernel in /run only if /run is a tmpfs; on
    other machines it probed at every dump, page server and restore (25 ms of frozen
    time each here).  While a daemon runs, CRIU finds a cache either way; when it stops,
    a cache it wrote is gone and CRIU's own (on a tmpfs) is left alone."""
    cache = KDAT_DIR / KDAT_NAME
    ours = fs_type(KDAT_DIR) != "tmpfs"
    d = start_daemon("kd", ["--address", "127.0.0.41", "--control-bind", "127.0.0.41",
                            "--insecure"], workdir)
    reaper.append(d)
    assert d.json("status")["migration"].startswith("criu 4")
    assert ("probed once, kept in" in d.log()) == ours, d.log()
    log = workdir / "check.log"
    subprocess.run([find_criu(None), "check", "-v4", "-o", str(log)], capture_output=True)
    assert f"Loaded kdat cache from {cache}" in log.read_text()
    assert d.stop() == 0
    assert cache.exists() != ours


def test_the_feature_cache_is_removed_only_by_whoever_wrote_it():
    where = Path(__file__).resolve().parent  # the checkout: on a disk, not a tmpfs
    for replaced in (False, True):
        d = where / f"omuscd-kdat-test-{os.getpid()}"
        d.mkdir()
        try:
            criu = Criu(find_criu(None))
            trio.run(criu.keep_features, d)
            cache = d / KDAT_NAME
            if fs_type(where) == "tmpfs":  # CRIU would keep its own here
                assert not cache.exists()
                continue
            assert cache.stat().st_size > 16 and cache.stat().st_mode & 0o777 == 0o600
            if replaced:  # another daemon on this machine wrote its own meanwhile
                other = d / "other"
                other.write_bytes(cache.read_bytes())
                os.replace(other, cache)
            criu.close()
            assert cache.exists() == replaced
            assert [p.name for p in d.iterdir()] == ([KDAT_NAME] if replaced else [])
        finally:
            subprocess.run(["rm", "-rf", str(d)])


def test_post_copy_is_offered_only_where_the_kernel_lets_criu_restore_lazily(tmp_path):
    """A node whose kernel lacks non-cooperative userfaultfd (criu check --feature
    uffd-noncoop) still moves jobs, with their memory inside the freeze; it offers no
    post-copy, which its restores would fail."""
    real = find_criu(None)
    fake = tmp_path / "criu"
    fake.write_text('#!/bin/sh\n'
                    'if [ "$*" = "check --feature uffd-noncoop" ]; then\n'
                    '  echo "uffd-noncoop is NOT supported" >&2; exit 1\n'
                    f'fi\nexec {real} "$@"\n')
    fake.chmod(0o755)
    for path, lazy in ((real, True), (str(fake), False)):
        criu = Criu(path)
        try:
            trio.run(criu.check)
            assert criu.available and criu.describe().startswith("criu 4"), criu.reason
            assert criu.lazy is lazy, path
        finally:
            criu.close()


@pytest.mark.parametrize("target_runs_it", [True, False])
def test_a_move_cut_short_is_settled_by_asking_the_target(tmp_path, target_runs_it):
    """(Stand-ins for the cluster, a real stopped process for the job.)  After a restart,
    a job frozen for a move that was cut short goes if its target says it runs it, and
    is followed there; else it resumes here, at its own nice again."""
    from types import SimpleNamespace

    from omuscd.cluster.membership import ALIVE
    from omuscd.jobs.record import MIGRATING, Job, Owner
    from omuscd.migrate.node import Migrations

    frozen = subprocess.Popen([PY, "-c", "import time; time.sleep(60)", "jobinit"])
    try:
        os.kill(frozen.pid, signal.SIGSTOP)
        wait_for(lambda: psutil.Process(frozen.pid).status() == psutil.STATUS_STOPPED, 5,
                 "the stand-in job to stop")
        os.setpriority(os.PRIO_PROCESS, frozen.pid, -20)  # as frozen for a dump
        record = Job("10.9", Owner(os.getuid(), os.getgid(), [], "root"), home=10, node=10,
                     node_name="a", argv=["x"], cwd="/tmp", pid=frozen.pid)
        record.state = MIGRATING
        asked: list[dict] = []
        followed: list[str] = []
        watched: list[str] = []
        resumed: list[list[int]] = []

        async def request(node, msg, timeout):
            asked.append({"node": node, **msg})
            return {"op": "has", "running": target_runs_it}

        async def main() -> None:
            async with trio.open_nursery():
                def follow(job, anew=False):
                    followed.append(job.id)

                def watch_again(job):
                    watched.append(job.id)

                d = SimpleNamespace(
                    name="a", cfg=SimpleNamespace(state_dir=str(tmp_path), dead_timeout=6.0,
                                                  gossip_interval=0.5),
                    members=SimpleNamespace(nodes={20: SimpleNamespace(state=ALIVE)}),
                    sampler=SimpleNamespace(resumed=resumed.append),
                    mover=Criu(None, tmp_path))  # gives back locks lent for the move
                jc = SimpleNamespace(me=10, home={record.id: record}, guests={},
                                     request=request, save=lambda job: None,
                                     node_name=lambda n: {10: "a", 20: "b"}[n],
                                     follow=follow, watch_again=watch_again,
                                     stop_following=lambda job_id: None)
                m = Migrations(jc, d)
                m.books.mark(record, 20, 0)
                mark = m.books.interrupted()[record.id]
                assert mark == {"target": 20, "nice": 0}
                await m.recovery.settle(record, mark)
                assert m.books.interrupted() == {}

        trio.run(main)
        assert asked == [{"node": 20, "op": "has", "job": "10.9"}]
        if target_runs_it:
            assert frozen.wait(5) == -signal.SIGKILL
            assert (record.node, record.node_name, record.migrations) == (20, "b", 1)
            assert followed == ["10.9"] and watched == [] and resumed == []
        else:
            assert psutil.Process(frozen.pid).status() != psutil.STATUS_STOPPED
            assert os.getpriority(os.PRIO_PROCESS, frozen.pid) == 0
            assert record.node == 10 and watched == ["10.9"] and followed == []
            assert resumed == [[frozen.pid]]
    finally:
        frozen.kill()
        frozen.wait()
