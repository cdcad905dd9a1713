"""The processes of jobs running on this node: checks before a start, the launch through
``unshare`` and the job's init (:mod:`omuscd.jobs.jobinit`), and the watch that notices
output and the end.

Readers of output never get data pushed at them: they hold their own offsets and are woken
when a job's files grew, so a slow reader costs nothing and misses nothing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import psutil
import trio

from omuscd import proctab, rootexec
from omuscd.jobs.record import EXITED, MOVED, RUNNING, STREAM_FILES, Job, JobError, Owner
from omuscd.jobs.spool import Spool

log = logging.getLogger("omuscd.jobs")

JOBINIT = str(Path(__file__).with_name("jobinit.py"))
TAIL_MIN, TAIL_MAX = 0.01, 0.25  # seconds between looks at a job's output files
#: Free bytes below which the filesystem of a job's spool counts as full.  The job writes
#: its output itself, through descriptors it inherited, so only it sees ENOSPC; a write
#: that did not fit fails after filling what was left, so a filesystem it cut short has
#: less than one write's worth free afterwards (128 KiB: the largest buffer of cat and
#: of most stdio).  Looked at when a burst of output stops and when the job ends.
SPOOL_FULL_BELOW = 128 * 1024


def check_env(argv: list[str], env: dict[str, str]) -> None:
    """Refuse, with the reason, what exec cannot carry: a variable name that is empty or
    holds '=', a NUL anywhere, text that has no bytes (found here, not as an odd failure
    in the job's init)."""
    for name, value in env.items():
        if not name or "=" in name or not _exec_text(name):
            raise JobError(f"environment variable name {name[:40]!r} is not valid")
        if not _exec_text(value):
            raise JobError(f"environment variable {name[:40]!r} has a value exec cannot "
                           "carry (a NUL character or unencodable text)")
    if not all(_exec_text(word) for word in argv):
        raise JobError("the command has a word exec cannot carry (a NUL character or "
                       "unencodable text)")


def _exec_text(text: str) -> bool:
    try:
        return b"\0" not in os.fsencode(text)
    except UnicodeEncodeError:
        return False


def check_runnable(argv: list[str], cwd: str, env: dict[str, str], node: str,
                   owner: Owner | None = None) -> None:
    """Fail early, naming the node and the path, when the job cannot start here (omuscd
    assumes the same paths on every node: a shared home or NFS).

    This runs as root on the caller's paths and PATH, but only looks (stat, access): it
    opens and runs nothing.  The job's init runs the command as the caller, through the
    caller's PATH, and reports what that finds (see jobinit.start).  For another user's
    job it looks only where ``owner`` could look: root's answer about a path behind a
    directory that user may not search (does /root/x exist?) is left to the init, which
    answers as the user (else it would tell them what only root may know)."""
    check_env(argv, env)

    def hidden(path: str) -> bool:
        return owner is not None and owner.uid != 0 and not may_reach(path, owner)

    if not hidden(cwd) and not os.path.isdir(cwd):
        raise JobError(f"node {node}: working directory {cwd} does not exist")
    prog = argv[0]
    if "/" in prog:
        path = prog if os.path.isabs(prog) else os.path.join(cwd, prog)
        if hidden(path):
            return
        if not os.path.exists(path):
            raise JobError(f"node {node}: no such program {path}")
        if not os.access(path, os.X_OK) or os.path.isdir(path):
            raise JobError(f"node {node}: {path} is not executable")
        return
    search = env.get("PATH", os.defpath)
    if any(hidden(os.path.join(d or cwd, prog)) for d in search.split(os.pathsep)):
        return
    if shutil.which(prog, path=search) is None:
        raise JobError(f"node {node}: program {prog!r} not found in PATH {search}")


def may_reach(path: str, owner: Owner) -> bool:
    """Whether ``owner`` may search every directory on the way to ``path`` (after its
    links), by the permission bits (an ACL that grants more is not seen: that only
    leaves a check to the job's init)."""
    d = os.path.dirname(os.path.realpath(path))
    groups = {owner.gid, *owner.groups}
    while True:
        try:
            st = os.stat(d)
        except OSError:
            return True  # a missing directory: nothing behind it to tell
        if st.st_uid == owner.uid:
            bit = st.st_mode & 0o100
        elif st.st_gid in groups:
            bit = st.st_mode & 0o010
        else:
            bit = st.st_mode & 0o001
        if not bit:
            return False
        if d == "/":
            return True
        d = os.path.dirname(d)


def launch_argv(job: Job, cpus: list[int], status_fd: int, env_fd: int) -> list[str]:
    """``unshare --pid --fork`` then our init: the job gets its own PID namespace with its
    session leader inside it (setsid happens in the init, never outside).  Both run as
    root: absolute paths found at start (omuscd.rootexec), and the caller's environment
    only on ``env_fd``, for the command the init starts as the caller.

    Not ``--kill-child``: it gives the init a parent-death signal, which CRIU restores,
    and a restored init's parent is the daemon thread that ran criu; when trio retired
    that idle worker thread, the kernel killed the migrated job (found in the console's
    first session: jobs died ten seconds after a move)."""
    unshare = rootexec.need(rootexec.UNSHARE, "unshare")
    python = rootexec.need(rootexec.PYTHON, "python3")
    if os.geteuid() == 0:
        ns = [unshare, "--pid", "--fork"]
        uid, gid = str(job.owner.uid), str(job.owner.gid)
        groups = ",".join(str(g) for g in job.owner.groups)
    else:  # an unprivileged daemon: a user namespace makes the PID namespace possible
        ns = [unshare, "--user", "--map-current-user", "--pid", "--fork"]
        uid = gid = "-"
        groups = ""
    return [*ns, python, "-I", "-S", JOBINIT, str(status_fd), str(env_fd),
            ",".join(str(c) for c in cpus), uid, gid, groups, job.cwd, "--", *job.argv]


def init_pid(pid: int) -> int | None:
    """The first child of ``pid`` (the job's init is unshare's child; the command is the
    init's)."""
    try:
        children = psutil.Process(pid).children()
    except psutil.Error:
        return None
    return children[0].pid if children else None


def starting(job: Job) -> bool:
    """Whether a job started here is still starting: its init has not yet made itself
    the session leader and started the command.  CRIU cannot dump it then (the session
    leader is outside the job's PID namespace): the balancer, which may pick a job a
    tenth of a second old when eight share one CPU, froze such a job, failed and resumed
    it, and the room the other node held for it kept that node from offering more.
    A job restored or adopted here (no launcher) has started."""
    if job.launcher is None:
        return False
    pid = job.pid if job.pid is not None else init_pid(job.launcher)
    if pid is None:  # unshare has not forked the init yet
        return True
    try:
        if os.getsid(pid) != pid:
            return True
    except OSError:  # gone: it is ending, not starting
        return False
    return len(proctab.tree(pid)) < 2


def catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (its SigCgt mask); True when that
    cannot be read, so that the caller's kill says what is wrong."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return True


def refresh_usage(jobs: list[Job]) -> None:
    """CPU seconds and resident memory of the running jobs here, in one pass over the
    process table (done when someone asks for the job list, not on a timer)."""
    running = {j.pid: j for j in jobs if j.pid is not None and j.state == RUNNING}
    if not running:
        return
    for pid, below in proctab.descendants(proctab.scan(), set(running)).items():
        job = running[pid]
        cpu, job.rss_mb = _usage(below)
        job.cpu = job.cpu_moved + cpu


def measure(job: Job) -> None:
    """Bring a job running here up to date: CPU seconds of all its stays, resident MB."""
    if job.pid is not None:
        cpu, job.rss_mb = tree_usage(job.pid)
        job.cpu = job.cpu_moved + cpu


def tree_usage(pid: int) -> tuple[float, float]:
    """CPU seconds and resident MB of a job's processes below its init (``pid``): only
    theirs read (proctab.tree), not the whole process table, since it is measured while
    the job is frozen for a move."""
    procs = [p for q in proctab.tree(pid)[1:] if (p := proctab.read(q)) is not None]
    return _usage(procs)


def _usage(procs: list[proctab.Proc]) -> tuple[float, float]:
    return sum(p.cpu_seconds for p in procs), sum(p.rss for p in procs) / (1024 * 1024)


def env_file(env: dict[str, str]) -> int:
    """A descriptor of an anonymous in-memory file holding ``env`` (JSON), read from the
    start: how the caller's environment reaches the job's init, never through the
    environment (the init's interpreter and unshare run as root) nor its arguments (seen
    by every user in ps, and limited in size)."""
    fd = os.memfd_create("omuscd-env", os.MFD_CLOEXEC)
    try:
        data = json.dumps(env).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


async def supervise(job: Job, spool: Spool, env: dict[str, str], cpus: list[int],
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> bool:
    """Start ``job`` on this node and watch it until it ends (see :func:`watch`)."""
    job.run += 1
    run = job.run
    spool.create(job)
    try:  # the job writes through these: it has no access to the spool by path
        out, err, status = spool.job_files(job.id)
    except (OSError, ValueError) as e:
        raise JobError(f"cannot start the job: its spool: {e}") from None
    if job.stdin:  # fed by the daemon from the omuscd run client's standard input
        null, feed = os.pipe()
        os.set_blocking(feed, False)
        job.stdin_pipe = trio.lowlevel.FdStream(feed)
    else:
        null = os.open(os.devnull, os.O_RDONLY)
    env_fd = env_file(env)
    try:
        proc = await trio.lowlevel.open_process(
            launch_argv(job, cpus, status, env_fd), stdin=null, stdout=out, stderr=err,
            env=rootexec.HELPER_ENV, cwd="/", pass_fds=(status, env_fd))
    except OSError as e:
        raise JobError(f"cannot start the job: {e.strerror or e}") from None
    finally:
        os.close(out)
        os.close(err)
        os.close(null)
        os.close(status)
        os.close(env_fd)
    job.launcher = proc.pid
    for _ in range(200):  # unshare forks the init at once; give it a moment
        job.pid = init_pid(proc.pid)
        if job.pid is not None or proc.poll() is not None:
            break
        await trio.sleep(0.002)
    task_status.started()
    return await watch(job, spool, proc.poll, proc.wait, run)


async def adopt(job: Job, spool: Spool, pid: int, run: int) -> bool:
    """Watch stay ``run`` (see Job.new_stay) of a job restored here (CRIU made its init
    our child)."""
    job.pid = pid
    state: dict[str, int] = {}

    def poll() -> int | None:
        if "code" not in state:
            try:
                done, st = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, st = pid, 0
            if done:
                state["code"] = os.waitstatus_to_exitcode(st)
        return state.get("code")

    async def wait() -> None:
        while poll() is None:
            await trio.sleep(TAIL_MAX)

    return await watch(job, spool, poll, wait, run)


async def watch(job: Job, spool: Spool, poll: Any, wait: Any, run: int) -> bool:
    """Notice output as the job's files grow; at its end, record how it ended and return
    True.  A job that migrated away ends here without an exit (False): its record moved
    with it, and if it has come back since, that is another run, whose watcher reports.
    Cancellation (the daemon stopping) leaves the job running: it is not ours to kill."""
    generation = job.generation  # a rerun elsewhere makes this run history
    delay = TAIL_MIN
    burst = False  # output grew since the last look at the free space
    while True:
        if job.pid is None and job.launcher is not None:  # a slow fork of unshare
            job.pid = init_pid(job.launcher)
        if _poll_sizes(job, spool):
            job.notify()
            delay = TAIL_MIN
            burst = True
        else:
            delay = min(TAIL_MAX, delay * 2)
            if burst:  # output stopped: because the filesystem is full?
                burst = False
                job.cut = job.cut or spool_full(spool, job)
        if poll() is not None:
            break
        with trio.move_on_after(delay):
            await wait()
    if job.stdin_pipe is not None:
        await job.stdin_pipe.aclose()
        job.stdin_pipe = None
    # a process that dies while being dumped has ended (the move will fail); only a
    # completed hand-over (node_changed) or a newer stay makes its end not ours to record
    if job.state == MOVED or job.node_changed or job.run != run or job.generation != generation:
        return False
    _poll_sizes(job, spool)
    try:
        job.exit = json.loads(spool.status(job.id) or "null")
    except ValueError:
        job.exit = None
    if not isinstance(job.exit, dict):
        job.exit = None
    if job.exit and "cpu" in job.exit:
        job.cpu = job.cpu_moved + float(job.exit.pop("cpu"))
    if not job.exit:
        code = poll() or 0
        job.exit = {"signal": -code} if code < 0 else {"code": code}
    job.cut = job.cut or spool_full(spool, job)
    if job.cut and isinstance(job.exit, dict):  # travels home with the exit, and ends
        job.exit["cut"] = job.cut  # 'omuscd run' with a status of its own
    job.transition(EXITED, ended=time.time())
    return True


def spool_full(spool: Spool, job: Job) -> str:
    """Why the job's output may be incomplete, or '': the filesystem of its spool has
    less than :data:`SPOOL_FULL_BELOW` free for the job's user (root may use the blocks
    a filesystem reserves).  One statvfs: cheap enough for every burst of output."""
    try:
        st = os.statvfs(spool.dir(job.id))
    except OSError:
        return ""
    free = (st.f_bfree if job.owner.uid == 0 else st.f_bavail) * st.f_frsize
    if free >= SPOOL_FULL_BELOW:
        return ""
    log.warning("job %s: the filesystem of %s is full (%d KiB free): its output may be "
                "cut short", job.id, spool.root, free // 1024)
    return (f"the state filesystem of node {job.node_name} ({spool.root}) is full "
            f"({free // 1024} KiB free)")


def _poll_sizes(job: Job, spool: Spool) -> bool:
    grew = False
    for stream in STREAM_FILES:
        size = spool.size(job.id, stream)
        if size is not None and size > job.offsets[stream]:
            job.offsets[stream] = size
            grew = True
    return grew
