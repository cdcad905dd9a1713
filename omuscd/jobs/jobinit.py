"""The init process of one job: PID 1 of the job's own PID namespace.

Run by the daemon as ``unshare --pid --fork python3 -I -S jobinit.py STATUS_FD ENV_FD CPUS
UID GID GROUPS CWD -- ARGV...`` (a file run by path, importing only the standard library, so
that it starts in a few milliseconds).  It starts as root with a fixed environment: the
caller's environment is the JSON object on ENV_FD, and only the command, started once it
has become the caller, gets it (its PATH lookup happens then, as the caller).

Why it exists: a job must live in its own PID namespace so that it can be checkpointed and
restored elsewhere without PID clashes, and its session leader must be inside that
namespace.  But PID 1 of a namespace ignores every signal it has no handler for, so the
user's command cannot be PID 1 (Ctrl-C would do nothing).  This init is PID 1 instead: it
becomes the session leader, sets the CPU affinity, starts the command as the caller's user,
forwards signals to it, reaps orphans, and writes how the command ended to the file open
on STATUS_FD (a JSON object: ``{"code": N}``, ``{"signal": N}`` or ``{"error": TEXT}``).
A descriptor, not a path: after a migration the restored init writes to the new node's
spool, because the daemon there hands CRIU its own file for that descriptor.

For another user's job the init, too, becomes that user once the command is started (see
:func:`drop_init`): CRIU can then dump the whole tree with that user's real ids.
"""

import json
import os
import resource
import signal
import struct
import sys
import warnings  # noqa: F401 - os.execvpe imports it lazily; after setuid it may be unreadable

#: Handled in this order: the daemon takes the last one caught as the sign that all are.
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2, signal.SIGCONT, signal.SIGWINCH, signal.SIGALRM)


#: What the init keeps of root once it is the job's user (see drop_init): bit numbers of
#: CAP_DAC_OVERRIDE and CAP_SYS_ADMIN in <linux/capability.h>.
KEPT_CAPS = (1 << 1) | (1 << 21)
_PR_SET_KEEPCAPS = 8
_CAPABILITY_VERSION_3 = 0x20080522


def dropping(uid: str) -> bool:
    """Whether this init becomes the job's user: a root daemon's job of another user."""
    return uid not in ("-", "0") and os.geteuid() == 0


def drop_init(uid: str, gid: str, groups: str) -> None:
    """Become the job's user, keeping only CAP_SYS_ADMIN and CAP_DAC_OVERRIDE.

    Why: CRIU reads every task's limits (prlimit), which the kernel allows only to a caller
    whose real uid and gid are those of the task, or that has CAP_SYS_RESOURCE; where root
    lacks it (containers, some hosts), a tree of a root init and a user's command could be
    dumped by no one.  Made one user's, the tree is dumped by a root CRIU running with that
    user's real ids (omuscd.migrate.criu).  Why those two capabilities: CRIU's parasite, in
    this init (the root of the dump), makes "proc.crtools" in its working directory and
    mounts the job's /proc there.  That directory is "/", writable by root only, so that no
    user can plant a link there.  The user cannot trace or read this process (it holds
    capabilities they do not have, and changing uid made it non-dumpable); what they can do
    to it (signal it, set its limits) only harms their own job.  It never execs.

    Called right after the command is forked (which drops itself fully, then execs), so
    that the tree is one user's almost from its start.  Raises OSError if it cannot (the
    init then ends with that error: it must not run as the user with more than this)."""
    import ctypes  # imported by main() before the fork when needed: no delay here

    libc = ctypes.CDLL(None, use_errno=True)

    def check(ret: int, what: str) -> None:
        if ret != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"job init: {what}: {os.strerror(err)}")

    os.chdir("/")
    check(libc.prctl(_PR_SET_KEEPCAPS, 1, 0, 0, 0), "keep capabilities")
    os.setgroups([int(g) for g in groups.split(",") if g])
    os.setresgid(int(gid), int(gid), int(gid))
    os.setresuid(int(uid), int(uid), int(uid))
    header = ctypes.create_string_buffer(struct.pack("Ii", _CAPABILITY_VERSION_3, 0))
    # effective, permitted, inheritable (capabilities 0-31), then the same for 32-63
    data = ctypes.create_string_buffer(struct.pack("6I", KEPT_CAPS, KEPT_CAPS, 0, 0, 0, 0))
    check(libc.capset(header, data), "set capabilities")
    check(libc.prctl(_PR_SET_KEEPCAPS, 0, 0, 0, 0), "reset keep capabilities")


def write_status(fd: int, status: dict) -> None:
    """A status that cannot be written (a full filesystem) is left out: the daemon then
    takes this init's exit status, which carries the command's."""
    data = json.dumps(status).encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
    except OSError:
        pass


def read_env(fd: int) -> dict:
    """The caller's environment from ``fd``, which is closed: neither the command nor a
    checkpoint of the job keeps it."""
    with os.fdopen(fd, "rb") as f:
        env = json.loads(f.read())
    if not isinstance(env, dict):
        raise OSError("the environment given is not an object")
    return env


def start(argv: list, uid: str, gid: str, groups: str, cwd: str, env: dict) -> int:
    """Fork and exec the command as the caller, with the caller's environment (the PATH
    lookup too: as the caller); exec errors come back on a pipe."""
    r, w = os.pipe()
    os.set_inheritable(w, False)
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            for s in FORWARDED:
                signal.signal(s, signal.SIG_DFL)
            if gid != "-":
                os.setgroups([int(g) for g in groups.split(",") if g])
                os.setgid(int(gid))
            if uid != "-":
                os.setuid(int(uid))
            os.chdir(cwd)
            os.execvpe(argv[0], argv, env)
        except OSError as e:
            os.write(w, f"{e.filename or argv[0]}: {e.strerror}".encode())
        except BaseException as e:
            os.write(w, f"{argv[0]}: {e!r}".encode())
        os._exit(127)
    os.close(w)
    if dropping(uid):
        drop_init(uid, gid, groups)
    err = os.read(r, 4096)
    os.close(r)
    if err:
        raise OSError(err.decode(errors="replace"))
    return pid


def main() -> int:
    status_fd, env_fd, cpus, uid, gid, groups, cwd, sep, *argv = sys.argv[1:]
    if sep != "--" or not argv:
        print("usage: jobinit.py STATUS_FD ENV_FD CPUS UID GID GROUPS CWD -- ARGV...",
              file=sys.stderr)
        return 2
    status = int(status_fd)
    os.set_inheritable(status, False)  # the command must not inherit it
    try:
        env = read_env(int(env_fd))
    except (OSError, ValueError) as e:
        write_status(status, {"error": f"cannot read the job's environment: {e}"})
        return 127
    os.setsid()
    if cpus:
        os.sched_setaffinity(0, [int(c) for c in cpus.split(",")])
    child = 0
    early = []  # signals that came before the command existed: it gets them at once

    def forward(signum, frame):
        if not child:
            early.append(signum)
            return
        try:
            os.kill(child, signum)
        except ProcessLookupError:
            pass

    for s in FORWARDED:
        signal.signal(s, forward)
    if dropping(uid):
        import ctypes  # noqa: F401 - for drop_init, which must follow the fork at once
    try:
        child = start(argv, uid, gid, groups, cwd, env)
    except OSError as e:
        write_status(status, {"error": str(e)})
        return 127
    for signum in early:
        forward(signum, None)
    while True:
        pid, st = os.waitpid(-1, 0)  # PID 1 reaps every orphan in the namespace
        if pid == child:
            break
    code = os.waitstatus_to_exitcode(st)
    # CPU time of everything this init reaped: the job's work on this node (since its
    # start, or since its restore here: CRIU cannot carry the kernel's count)
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    doc = {"signal": -code} if code < 0 else {"code": code}
    write_status(status, {**doc, "cpu": round(ru.ru_utime + ru.ru_stime, 3)})
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main())
