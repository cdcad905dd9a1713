"""A move is refused before the freeze when the target lacks what the job holds by path
(omuscd.migrate.precheck), and the CRIU log kept after a failure starts with its cause."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from omuscd.migrate import precheck
from omuscd.migrate.criu import keep
from tests.cluster import namespace_cluster, start_daemon, wait_for
from tests.test_migration import REASON

PY = sys.executable
TAG = "omuscd-pre-test"
#: Hidden from the target: its daemon runs in a mount namespace of its own, with an empty
#: tmpfs over this directory (CRIU dumps only jobs in its own mount namespace: the source
#: keeps the machine's)
HIDDEN = Path(f"/tmp/{TAG}-{os.getpid()}")
TICK = 'while :; do echo tick; sleep 0.1; done'


def hidden_on_target(command: list[str]) -> list[str]:
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs omuscd-pre "$0" && exec "$@"', str(HIDDEN), *command]


@pytest.fixture(scope="module")
def cluster():
    if REASON is not None:
        pytest.skip(REASON)
    HIDDEN.mkdir()
    try:
        (HIDDEN / "work").mkdir()
        shutil.copy("/bin/sleep", HIDDEN / f"sleep-{TAG}")
        (HIDDEN / "data").write_text("data\n")
        with namespace_cluster("a", size=2, prefix=f"omp{os.getpid() % 10000}x",
                               leftovers=TAG) as c:
            lan, work, key, n = c
            n["b"] = start_daemon("b", ["--key-file", str(key)], work, netns=lan.ns(1),
                                  wrap=hidden_on_target)
            wait_for(lambda: "b" in n["a"].nodes() and "a" in n["b"].nodes(), 15,
                     "a and b to see each other")
            assert n["b"].json("status")["migration"].startswith("criu 4")
            yield n
    finally:
        shutil.rmtree(HIDDEN, ignore_errors=True)


def start(node, script: str) -> subprocess.Popen[bytes]:
    """``sh -c SCRIPT`` as a job of ``node`` (started in /tmp, which both nodes have)."""
    return subprocess.Popen([PY, "-m", "omuscd", "run", "--connect", node.socket, "--home",
                             "--", "sh", "-c", script, TAG], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd="/tmp")


def running_job(node, p: subprocess.Popen[bytes]) -> str:
    """The id of the job ``p`` started, once it prints (its command runs)."""
    assert p.stdout is not None
    assert p.stdout.readline() == b"tick\n"
    jobs = [j["id"] for j in node.json("jobs")["jobs"]
            if TAG in j["command"] and j["state"] == "running"]
    assert len(jobs) == 1, jobs
    return jobs[0]


@pytest.mark.netns
@pytest.mark.parametrize("script, missing", [
    (f"cd {HIDDEN}/work && {TICK}", f"working directory {HIDDEN}/work does not exist"),
    (f"{HIDDEN}/sleep-{TAG} 1000 & {TICK}", f"{HIDDEN}/sleep-{TAG}"),
    (f"exec 3<{HIDDEN}/data; {TICK}", f"{HIDDEN}/data, a file the job has open"),
], ids=["cwd", "executable", "open-file"])
def test_a_job_needing_what_the_target_lacks_is_refused_before_the_freeze(cluster, script,
                                                                          missing):
    n = cluster
    p = start(n["a"], script)
    try:
        job = running_job(n["a"], p)
        r = n["a"].ctl(f"migrate {job} b")
        assert r.code == 500 and missing in r.text and "node b" in r.text, r
        log = n["a"].log()
        assert f"job {job} frozen" not in log and f"job {job} resumed" not in log, log
        assert "incoming move abandoned" not in n["b"].log()  # nothing came
        assert p.stdout is not None  # it runs on here: its output goes on
        assert [p.stdout.readline() for _ in range(3)] == [b"tick\n"] * 3
        assert n["a"].json(f"job {job}")["node_name"] == "a"
    finally:
        p.kill()
        n["a"].ctl(f"kill {job} KILL")
        p.wait()


@pytest.mark.netns
def test_the_kept_log_of_a_failed_dump_starts_with_its_cause(cluster, tmp_path):
    """A job holding one end of a stream connection to a process outside it cannot be
    dumped; the kept log's first line is CRIU's reason, not the harmless error it logs
    first here, and so is the error the user sees."""
    n = cluster
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "outside.sock"))
    listener.listen(1)
    connect = (f"import socket,sys,time; s=socket.socket(socket.AF_UNIX); "
               f"s.connect({str(tmp_path / 'outside.sock')!r}); "
               f"[(print('tick', flush=True), time.sleep(0.1)) for _ in iter(int, 1)]")
    p = start(n["a"], f"exec {PY} -c \"{connect}\"")
    peer, _ = listener.accept()
    try:
        job = running_job(n["a"], p)
        r = n["a"].ctl(f"migrate {job} b")
        assert r.code == 500 and "resumed" in r.text, r
        kept = (n["a"].state_dir / "criu-dump-failed.log").read_text().splitlines()
        assert kept[0].startswith("omuscd: the cause: ") and "unix" in kept[0], kept[:3]
        assert "RLIMIT_NOFILE" not in kept[0] and "FAILED" not in kept[0], kept[0]
        cause = kept[0].removeprefix("omuscd: the cause: ")
        assert cause[:60] in r.text, (cause, r.text)
        for line in kept:
            if "RLIMIT_NOFILE" in line and "Error (" in line:
                assert line.startswith("harmless: "), line
        time.sleep(0.3)  # it runs on here
        assert p.stdout is not None and p.stdout.readline() == b"tick\n"
    finally:
        p.kill()
        n["a"].ctl(f"kill {job} KILL")
        p.wait()
        peer.close()
        listener.close()


def test_the_facts_of_a_running_process_and_the_check_of_them(tmp_path):
    """Gathered from /proc of a process that runs on (nothing stopped), checked against
    this machine: all there; then each kind of missing thing, named."""
    (tmp_path / "cwd").mkdir()
    (tmp_path / "open").write_text("x")
    prog = tmp_path / "prog"
    shutil.copy("/bin/sleep", prog)
    spool = tmp_path / "spool"
    with open(spool, "w") as out:
        p = subprocess.Popen(["sh", "-c", f'exec 3<"$0"; exec {prog} 30', tmp_path / "open"],
                             cwd=tmp_path / "cwd", stdout=out, stdin=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        # exec'd, and its libraries mapped (the loader maps libc just after the exec)
        wait_for(lambda: os.readlink(f"/proc/{p.pid}/exe") == str(prog) and
                 "libc" in open(f"/proc/{p.pid}/maps").read(), 5, "prog to run")
        started = time.perf_counter()
        facts = precheck.gather(p.pid, {str(spool)})
        assert time.perf_counter() - started < 0.1
        assert p.poll() is None and "T" not in open(f"/proc/{p.pid}/stat").read().split()[2]
        assert facts["cwd"] == [str(tmp_path / "cwd")]
        assert str(prog) in facts["builds"] and facts["builds"][str(prog)][0] > 0
        assert any("libc" in path for path in facts["builds"])
        assert str(tmp_path / "open") in facts["open"]
        assert not [f for f in facts["open"] if f == str(spool) or f.startswith("/dev/")]
        # files mapped without code (locale data, say): there, not compared by build
        assert not set(facts["open"]) & set(facts["builds"])
        assert precheck.check(facts, "b") is None
        shutil.copy("/bin/true", tmp_path / "other")  # another build at the same path
        os.rename(tmp_path / "other", prog)
        assert precheck.check(facts, "b") == (f"node b: {prog} is another build than the "
                                              "job's (size or contents)")
        prog.unlink()
        assert f"node b: {prog} (the job's program" in precheck.check(facts, "b")
        (tmp_path / "open").unlink()
        del facts["builds"][str(prog)]
        facts["open"] = [str(tmp_path / "open")]
        assert precheck.check(facts, "b") == (f"node b: {tmp_path / 'open'}, a file the job "
                                              "has open, does not exist")
        os.rmdir(tmp_path / "cwd")
        assert precheck.check(facts, "b") == (f"node b: working directory {tmp_path / 'cwd'} "
                                              "does not exist")
    finally:
        p.kill()
        p.wait()


def test_the_cpu_check_names_what_the_target_lacks():
    facts = {"cwd": [], "builds": {}, "open": [], "cpu": ["avx2", "sse4_2", "hypervisor"]}
    assert precheck.check(facts, "b", cpu=["avx2", "sse4_2"]) is None  # not an ISA flag
    assert precheck.check(facts, "b", cpu=["sse4_2"]) == \
        "node b: its CPU lacks avx2, which the job may use"


@pytest.mark.parametrize("facts", [
    None, [], "x", {"cwd": "/nonexistent"}, {"cwd": [1, None, "relative/x"]},
    {"builds": ["/x"]}, {"builds": {"/bin/sh": "x"}}, {"builds": {"/dev/zero": [0, "x"]}},
    {"open": [{"a": 1}]}, {"cpu": "avx2"}, {"cpu": [3]},
])
def test_facts_of_any_shape_are_checked_without_error(facts):
    """What a peer sends is checked as far as it makes sense, never raises."""
    why = precheck.check(facts, "b", cpu=[])
    assert why is None or why.startswith("node b: ")


def test_a_fifo_named_as_a_program_is_not_opened_for_good(tmp_path):
    """The target opens what a peer names: a FIFO would block a plain open forever."""
    os.mkfifo(tmp_path / "fifo")
    why = precheck.check({"builds": {str(tmp_path / "fifo"): [0, "x"]}}, "b", cpu=[])
    assert why is not None and "missing" in why


def test_the_kept_log_starts_with_the_cause_and_marks_the_harmless(tmp_path):
    log = tmp_path / "dump.log"
    log.write_text(
        "(00.000010) Version: 4.1.1\n"
        "(00.000100) Error (criu/util.c:1534): rlimit: Can't setup RLIMIT_NOFILE for self: "
        "Operation not permitted\n"
        "(00.000200) Warn  (criu/kerndat.c:9): Error reading something optional\n"
        "(00.003000) Error (criu/sk-unix.c:881): unix: Can't dump half of stream unix "
        "connection. name: /x; peer name: /y\n"
        "(00.004000) Error (criu/cr-dump.c:2100): Dumping FAILED.\n")
    dest = tmp_path / "kept.log"
    assert keep(log, dest)
    lines = dest.read_text().splitlines()
    assert lines[0] == ("omuscd: the cause: (00.003000) Error (criu/sk-unix.c:881): unix: "
                        "Can't dump half of stream unix connection. name: /x; peer name: /y")
    assert any(ln.startswith("harmless: (00.000100) Error") for ln in lines)
    assert "(00.004000) Error (criu/cr-dump.c:2100): Dumping FAILED." in lines
    assert dest.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("served, expected", [
    (False, None),  # an older target: it cannot check, the move goes on
    (True, "node b: working directory /nonexistent-omuscd-pre does not exist"),
])
def test_the_source_asks_the_target_and_an_older_one_is_no_check(tmp_path, served, expected):
    """The source's question goes through a real op table: one without ``precheck`` (an
    older daemon) answers "unknown operation", which is no refusal."""
    from types import SimpleNamespace

    import trio

    from omuscd.cluster.rpc import OpTable
    from omuscd.jobs.record import Job, Owner
    from omuscd.jobs.spool import Spool
    from omuscd.migrate.books import MoveBooks
    from omuscd.migrate.source import Source
    from omuscd.migrate.target import Target

    record = Job("10.7", Owner(os.getuid(), os.getgid(), [], "root"), home=10, node=10,
                 node_name="a", argv=["x"], cwd="/tmp", pid=os.getpid())
    host = SimpleNamespace(name="b", mover=SimpleNamespace(available=True))
    ops = OpTable()
    if served:
        target = Target(SimpleNamespace(), host, MoveBooks(str(tmp_path)))  # type: ignore
        ops.add("precheck", target.precheck, names_job=True)
    asked: list[dict] = []

    async def request(node, msg, timeout):
        asked.append(msg)
        msg["facts"]["cwd"].append("/nonexistent-omuscd-pre")
        replies: list[dict] = []

        async def send(reply):
            replies.append(reply)
        await ops.dispatch(SimpleNamespace(send=send, peer={"node": 10}), msg)  # type: ignore
        return replies[0]

    jc = SimpleNamespace(spool=Spool(str(tmp_path)), request=request, node_name=str)
    source = Source(jc, host, MoveBooks(str(tmp_path)))  # type: ignore[arg-type]
    assert trio.run(source.ask_fit, record, 20) == expected
    assert asked[0]["op"] == "precheck" and asked[0]["job"] == "10.7"
