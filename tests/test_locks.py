"""File locks move with their job (CRIU --file-locks, lent by the source while the target
restores); a lock shared with a process outside the job is refused before the freeze; the
reasons a job cannot move are known before anyone tries (#18)."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import signal
import struct
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.cluster import namespace_cluster, start_daemon, wait_for
from tests.test_migration import REASON, job_of, job_processes, migrating, start

pytestmark = [pytest.mark.netns, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

PY = sys.executable
TAG = "omuscd-locks-test"

# Rows written in a transaction held open (its locks with it) until a flag file appears;
# then committed, and a digest of the table printed.
SQLITE = """
import hashlib, os, sqlite3, sys, time
db, flag = sys.argv[1], sys.argv[2]
c = sqlite3.connect(db, isolation_level=None)
c.execute("create table t (i integer primary key, v text)")
c.execute("begin immediate")
for i in range(5000):
    c.execute("insert into t values (?, ?)", (i, hashlib.sha256(str(i).encode()).hexdigest()))
print("in transaction", flush=True)
while not os.path.exists(flag):
    time.sleep(0.05)
for i in range(5000, 6000):
    c.execute("insert into t values (?, ?)", (i, str(i * i)))
c.execute("commit")
rows = c.execute("select i, v from t order by i").fetchall()
print("digest", hashlib.sha256(repr(rows).encode()).hexdigest(), len(rows), flush=True)
"""

# Holds a lock of kind argv[2] ("flock", "posix", "ofd", "posix-read" or "ofd-read") on
# argv[1] until a flag file appears.
HOLD = """
import fcntl, os, struct, sys, time
path, kind, flag = sys.argv[1], sys.argv[2], sys.argv[3]
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
if kind == "flock":
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
elif kind == "posix":
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
elif kind == "ofd":  # a write lock on the whole file, owned by the open file description
    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hh4xqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
elif kind == "ofd-read":
    fcntl.fcntl(os.open(path, os.O_RDONLY), fcntl.F_OFD_SETLK,
                struct.pack("hh4xqqi4x", fcntl.F_RDLCK, 0, 0, 0, 0))
else:
    fcntl.lockf(os.open(path, os.O_RDONLY), fcntl.LOCK_SH | fcntl.LOCK_NB)
if sys.argv[4:5] and sys.argv[4].isdigit():  # memory enough for a move to take a while
    data = bytearray(b"x" * (int(sys.argv[4]) << 20))
print("locked", flush=True)
n = 0
while not os.path.exists(flag):
    n += 1
    time.sleep(0.05)
print("done", n > 0, flush=True)
"""

# Shared memory: a /dev/shm file mapped by the job.
SHM = """
import mmap, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
os.ftruncate(fd, 1 << 16)
m = mmap.mmap(fd, 1 << 16)
m[:5] = b"hello"
print("mapped", flush=True)
time.sleep(60)
"""


@pytest.fixture(scope="module")
def cluster():
    with namespace_cluster("ab", prefix=f"oml{os.getpid() % 10000}x", open_to_all=True,
                           leftovers=TAG) as c:
        for d in c[3].values():
            assert d.json("status")["migration"].startswith("criu 4"), d.json("status")
        yield c


def lock_taken(path: Path, kind: str) -> int:
    """Try, from this process (outside any job), to take ``kind`` of lock on ``path``:
    0 if it could (released at once), else the errno."""
    fd = os.open(path, os.O_RDWR)
    try:
        if kind == "flock":
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return 0
    except OSError as e:
        return e.errno
    finally:
        os.close(fd)


def move(node, job: str, where: str) -> str:
    r = node.ctl(f"migrate {job} {where}")
    assert r.code == 200, r
    return r.text


def test_sqlite_mid_transaction_moves_twice_and_its_database_is_whole(cluster, tmp_path):
    _, _, _, n = cluster
    os.chmod(tmp_path, 0o755)
    # the same program, run plainly
    plain_flag = tmp_path / "plain-go"
    plain_flag.touch()
    plain = subprocess.run([PY, "-c", SQLITE, str(tmp_path / "plain.db"), str(plain_flag)],
                           capture_output=True, check=True, timeout=60)
    expected = plain.stdout.splitlines()[-1]
    assert expected.startswith(b"digest ") and expected.endswith(b" 6000")

    db, flag = tmp_path / "moved.db", tmp_path / "go"
    p = start(n["a"], PY, "-c", SQLITE, str(db), str(flag), f"{TAG}-sqlite")
    try:
        assert p.stdout is not None and p.stdout.readline() == b"in transaction\n"
        job = job_of(n["a"], f"{TAG}-sqlite")
        # sqlite holds POSIX locks on the database: the job's
        assert lock_taken(db, "posix") in (errno.EAGAIN, errno.EACCES)
        assert n["a"].json(f"job {job}")["cannot_move"] == ""
        assert "migrated to b" in move(n["a"], job, "b")
        assert lock_taken(db, "posix") in (errno.EAGAIN, errno.EACCES)
        assert "migrated to a" in move(n["b"], job, "home")
        assert lock_taken(db, "posix") in (errno.EAGAIN, errno.EACCES)
        flag.touch()
        out, err = p.communicate(timeout=60)
    finally:
        if p.returncode is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, err
    assert out.splitlines()[-1] == expected
    check = subprocess.run(["python3", "-c", "import sqlite3, sys; c = sqlite3.connect("
                            "sys.argv[1]); print(c.execute('pragma integrity_check')"
                            ".fetchone()[0])", str(db)], capture_output=True, text=True)
    assert check.stdout.strip() == "ok", check


@pytest.mark.parametrize("kind", ["flock", "posix", "ofd"])
def test_a_lock_held_across_moves_is_held_after_each(cluster, tmp_path, kind):
    _, _, _, n = cluster
    os.chmod(tmp_path, 0o755)
    path, flag = tmp_path / "locked", tmp_path / "go"
    p = start(n["a"], PY, "-c", HOLD, str(path), kind, str(flag), f"{TAG}-{kind}")
    try:
        assert p.stdout is not None and p.stdout.readline() == b"locked\n"
        job = job_of(n["a"], f"{TAG}-{kind}")
        assert lock_taken(path, kind) == errno.EWOULDBLOCK
        assert n["a"].json(f"job {job}")["cannot_move"] == ""
        assert "migrated to b" in move(n["a"], job, "b")
        assert n["a"].json(f"job {job}")["node_name"] == "b"
        assert lock_taken(path, kind) == errno.EWOULDBLOCK  # the restored job's
        assert "migrated to a" in move(n["b"], job, "home")
        assert lock_taken(path, kind) == errno.EWOULDBLOCK
        flag.touch()
        out, err = p.communicate(timeout=30)
    finally:
        if p.returncode is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0 and out == b"done True\n", err
    assert lock_taken(path, kind) == 0  # the job's end released it, nothing else holds it


@pytest.mark.parametrize("kind", ["posix", "ofd"])
def test_a_lock_shared_with_a_process_outside_the_job_is_refused_before_the_freeze(
        cluster, tmp_path, kind):
    _, _, _, n = cluster
    os.chmod(tmp_path, 0o755)
    path, flag = tmp_path / "shared", tmp_path / "go"
    path.write_bytes(b"x")
    outside = os.open(path, os.O_RDONLY)
    if kind == "posix":  # a read lock held here, which the job's read lock does not exclude
        fcntl.lockf(outside, fcntl.LOCK_SH | fcntl.LOCK_NB)
        who = f"process {os.getpid()}, outside the job,"
    else:  # an OFD lock: /proc/locks does not say whose (pid -1)
        fcntl.fcntl(outside, fcntl.F_OFD_SETLK,
                    struct.pack("hh4xqqi4x", fcntl.F_RDLCK, 0, 0, 0, 0))
        who = "a process outside the job"
    tag = f"{TAG}-shared-{kind}"
    p = start(n["a"], PY, "-c", HOLD, str(path), f"{kind}-read", str(flag), tag)
    try:
        assert p.stdout is not None and p.stdout.readline() == b"locked\n"
        job = job_of(n["a"], tag)
        r = n["a"].ctl(f"migrate {job} b")
        assert r.code == 500, r
        assert f"cannot move: {who} also holds a lock on {path}" in r.text, r
        assert "resumed" not in r.text  # refused before the freeze, not after a dump
        assert f"job {job} frozen" not in n["a"].log()
        assert not (n["a"].state_dir / "criu-dump-failed.log").exists()
        view = n["a"].json(f"job {job}")
        assert view["state"] == "running" and view["node_name"] == "a"
        assert str(path) in view["cannot_move"]
        # once the outside lock goes, the reason goes and the job moves with its lock
        os.close(outside)
        wait_for(lambda: n["a"].json(f"job {job}")["cannot_move"] == "", 5,
                 "the reason to go")
        assert "migrated to b" in move(n["a"], job, "b")
        assert lock_taken(path, "posix") == errno.EAGAIN  # the job's read lock, on b
        flag.touch()
        out, err = p.communicate(timeout=30)
    finally:
        if p.returncode is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0 and out == b"done True\n", err


def test_a_job_mapping_shared_memory_shows_why_before_any_move(cluster):
    _, _, _, n = cluster
    shm = f"/dev/shm/{TAG}-{os.getpid()}"
    p = start(n["a"], PY, "-c", SHM, shm, f"{TAG}-shm")
    try:
        assert p.stdout is not None and p.stdout.readline() == b"mapped\n"
        job = job_of(n["a"], f"{TAG}-shm")

        def reason() -> str:
            return str(n["a"].json(f"job {job}")["cannot_move"])

        wait_for(lambda: "maps shared memory" in reason(), 5, "the reason to show")
        assert shm in reason()
        listed = {j["id"]: j for j in n["b"].json("jobs")["jobs"]}  # and on any node
        assert shm in listed[job]["cannot_move"]
        assert n["a"].json(f"job {job}")["moves"] == []  # no move was tried
    finally:
        p.kill()
        p.communicate(timeout=10)
        Path(shm).unlink(missing_ok=True)


def test_a_move_failing_after_the_dump_gives_the_job_its_locks_back(cluster, tmp_path):
    """The target dies while the images of a 256 MB job holding a POSIX lock are on their
    way: the source had lent the lock (the dump is done); the job resumes there with it."""
    lan, work, key, n = cluster
    os.chmod(tmp_path, 0o755)
    path, flag, tag = tmp_path / "locked", tmp_path / "go", f"{TAG}-failed"
    p = start(n["a"], PY, "-c", HOLD, str(path), "posix", str(flag), "256", tag)
    try:
        assert p.stdout is not None and p.stdout.readline() == b"locked\n"
        job = job_of(n["a"], tag)
        t, result = migrating(n["a"], job, "b")

        def arriving() -> bool:
            return any(f.stat().st_size > 16 << 20
                       for f in (n["b"].state_dir / "images").glob("*/pages-*.img"))

        wait_for(arriving, 30, "the transfer to begin", interval=0.005)
        assert lock_taken(path, "posix") == 0  # lent: the frozen job does not hold it now
        n["b"].stop(signal.SIGKILL)
        t.join(60)
        reply = result["reply"]
        assert reply.code == 500 and "resumed here" in reply.text, reply  # type: ignore
        wait_for(lambda: len(job_processes(tag)) == 1, 10, "one copy")
        assert lock_taken(path, "posix") == errno.EAGAIN  # given back before it resumed
        flag.touch()
        out, err = p.communicate(timeout=30)
    finally:
        if p.returncode is None:
            p.kill()
            p.communicate()
        n["b"] = start_daemon("b", ["--key-file", str(key)], work, netns=lan.ns(1))
    assert p.returncode == 0 and out == b"done True\n", err


BIG_HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
data = bytearray(b"x" * (256 << 20))                     # resident: moved post-copy
n = 0
while True:
    n += 1
    with open(sys.argv[2], "a") as f:
        f.write(f"{n}\\n")
    time.sleep(0.05)
"""


def test_a_move_cut_short_by_the_source_dying_gives_the_locks_back_when_it_restarts(
        cluster, tmp_path):
    """The source daemon dies while the job runs on the target and its memory follows:
    the target kills its copy (and so its locks); the source, started again, resumes
    its frozen copy with the locks it had lent (noted in its state directory)."""
    lan, work, key, n = cluster
    os.chmod(tmp_path, 0o755)
    path, out, tag = tmp_path / "locked", tmp_path / "count", f"{TAG}-settle"
    r = subprocess.run([PY, "-m", "omuscd", "run", "--connect", n["a"].socket, "--home",
                        "--detach", "--", PY, "-c", BIG_HOLD, str(path), str(out), tag],
                       capture_output=True, text=True, cwd="/tmp")
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip()
    wait_for(lambda: out.exists() and len(out.read_text().split()) > 3, 30, "the counter")
    t, _ = migrating(n["a"], job, "b")
    wait_for(lambda: f"job {job} runs here; its memory follows" in n["b"].log(), 30,
             "the job to run on b while its memory follows", interval=0.002)
    n["a"].stop(signal.SIGKILL)
    t.join(30)
    wait_for(lambda: "incoming move abandoned" in n["b"].log(), 30, "b to give it up")
    wait_for(lambda: len(job_processes(tag)) == 1, 10, "b's copy to be killed")
    assert lock_taken(path, "posix") == 0  # a's frozen copy lent it, b's copy is gone
    n["a"] = start_daemon("a", ["--key-file", str(key)], work, netns=lan.ns(0))
    wait_for(lambda: f"job {job}: its move to b was cut short when this daemon stopped; "
             "it resumes here" in n["a"].log(), 30, "a to settle the move")
    seen = len(out.read_text().split())
    wait_for(lambda: len(out.read_text().split()) > seen + 3, 10, "the counter to go on")
    assert lock_taken(path, "posix") == errno.EAGAIN  # held again
    assert not list(n["a"].state_dir.glob("lent-locks-*"))
    assert n["a"].ctl(f"kill {job} KILL").ok
    wait_for(lambda: n["a"].json(f"job {job}")["state"] == "exited", 10, "its end")


# An unlinked temporary file of argv[1] MB, still open (sqlite3 and sort make such files):
# written, then read back after the flag file appears.
GHOST = """
import hashlib, os, sys, tempfile, time
mb, flag = int(sys.argv[1]), sys.argv[2]
f = tempfile.TemporaryFile(dir=sys.argv[3])  # unlinked at once
block = hashlib.sha256(b"ghost").digest() * 32768  # 1 MB
for i in range(mb):
    f.write(block)
f.flush()
print("written", flush=True)
while not os.path.exists(flag):
    time.sleep(0.05)
f.seek(0)
print("read", hashlib.sha256(f.read()).hexdigest(), flush=True)
"""


def test_a_job_holding_a_deleted_temporary_file_of_tens_of_mb_moves_with_it(cluster, tmp_path):
    """sqlite3 building an index keeps a deleted temporary file of 5-22 MB open: every
    move of it failed ("Can't dump ghost file ... increase limit": CRIU carries a deleted
    file of at most 1 MB unless told otherwise)."""
    _, _, _, n = cluster
    os.chmod(tmp_path, 0o755)
    flag = tmp_path / "go"
    p = start(n["a"], PY, "-c", GHOST, "24", str(flag), str(tmp_path), f"{TAG}-ghost")
    try:
        assert p.stdout is not None and p.stdout.readline() == b"written\n"
        job = job_of(n["a"], f"{TAG}-ghost")
        assert "migrated to b" in move(n["a"], job, "b")
        assert "migrated to a" in move(n["b"], job, "home")
        flag.touch()
        out, err = p.communicate(timeout=60)
    finally:
        if p.returncode is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, err
    want = hashlib.sha256(hashlib.sha256(b"ghost").digest() * 32768 * 24).hexdigest()
    assert out.splitlines()[-1] == f"read {want}".encode()


def test_two_jobs_moved_at_the_same_time_both_move(cluster, tmp_path):
    """CRIU's parasite mounts the job's /proc at proc.crtools in the working directory of
    the job's init, "/" for every job: two dumps at once (two moves, a move and a
    checkpoint) raced for that name and one failed with "Can't create a directory"."""
    _, _, _, n = cluster
    os.chmod(tmp_path, 0o755)
    jobs, procs = [], []
    try:
        for i in range(2):
            # 48 MB each: dumps long enough (~0.1 s) to overlap when asked together
            p = start(n["a"], PY, "-c", GHOST, "48", str(tmp_path / f"go{i}"), str(tmp_path),
                      f"{TAG}-twice{i}")
            procs.append(p)
            assert p.stdout is not None and p.stdout.readline() == b"written\n"
            jobs.append(job_of(n["a"], f"{TAG}-twice{i}"))
        for where, there in (("b", n["a"]), ("home", n["b"]), ("b", n["a"]), ("home", n["b"])):
            replies: list[object] = []

            def migrate(job: str, where: str = where, there=there,
                        replies: list[object] = replies) -> None:
                replies.append(there.ctl(f"migrate {job} {where}"))

            threads = [threading.Thread(target=migrate, args=(j,)) for j in jobs]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
            assert [r.code for r in replies] == [200, 200], replies  # type: ignore[attr-defined]
        for i in range(2):
            (tmp_path / f"go{i}").touch()
        outs = [p.communicate(timeout=60) for p in procs]
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                p.communicate()
    want = hashlib.sha256(hashlib.sha256(b"ghost").digest() * 32768 * 48).hexdigest()
    for p, (out, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err
        assert out.splitlines()[-1] == f"read {want}".encode()


@pytest.mark.parametrize("freed_after", [3, None])
def test_a_lock_taken_meanwhile_is_waited_for_before_the_job_resumes(monkeypatch, caplog,
                                                                     freed_after):
    """LockLender.relock: a lock the target's dying copy still holds when the move fails
    is tried again (every RELOCK_STEP) until it is free, up to RELOCK_WAIT; then the job
    resumes without it, said as an error.  Explicit time (MockClock); the system call run
    in the frozen process is stood in for."""
    import trio.testing

    from omuscd.migrate import locks

    held = locks.HeldLock(locks.FileLock("POSIX", "WRITE", 42, "0:1:2", 0, "EOF"), 42, 3,
                          "/srv/db")
    tries: list[float] = []

    def move_locks(which, take):
        assert take and which == [held]
        tries.append(trio.current_time())
        if freed_after is not None and len(tries) > freed_after:
            return []
        return [(held, os.strerror(errno.EAGAIN))]

    monkeypatch.setattr(locks, "move_locks", move_locks)
    lender = locks.LockLender(None)

    async def main() -> None:
        lender.lent[7] = [held]
        await lender.relock(7)

    caplog.set_level("INFO", "omuscd.migrate")
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    if freed_after is not None:
        assert len(tries) == freed_after + 1 and not errors
        assert "given back after" in caplog.text
    else:  # never freed: given up after RELOCK_WAIT
        assert tries[-1] - tries[0] >= locks.RELOCK_WAIT - locks.RELOCK_STEP
        assert len(errors) == 1 and "runs without it" in errors[0].getMessage()
    assert 7 not in lender.lent
