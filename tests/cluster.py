"""Real daemons for tests: subprocesses on loopback addresses or in network namespaces.

:class:`NetnsLan` builds one namespace per node plus one holding the bridge, with test
addresses from 198.18.0.0/24, and removes all of it afterwards; nothing is added to the
root namespace (veth pairs are created inside the namespaces).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from omuscd.client import ControlClient, Reply

PYTHON = sys.executable
NETNS_PREFIX = "198.18.0."
#: the directories this test run makes in /tmp start so: its pid tells them from those of
#: runs beside it (see leftovers)
RUN_PREFIX = f"omt-{os.getpid()}-"
#: network namespaces and users this run made and has not removed (see leftovers)
MADE_NETNS: set[str] = set()
MADE_USERS: set[str] = set()


def wait_for(cond: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> float:
    """Poll ``cond`` until true; return the seconds it took, or fail saying ``what``."""
    start = time.monotonic()
    last_exc: Exception | None = None
    while True:
        try:
            if cond():
                return time.monotonic() - start
        except (OSError, ConnectionError, ValueError, KeyError) as e:
            last_exc = e
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                                 + (f" (last error: {last_exc})" if last_exc else ""))
        time.sleep(interval)


@dataclass
class Daemon:
    """One running ``omuscd`` subprocess."""

    name: str
    popen: subprocess.Popen[bytes]
    state_dir: Path
    log_path: Path
    netns: str | None = None
    args: list[str] = field(default_factory=list)

    @property
    def socket(self) -> str:
        return str(self.state_dir / "control.sock")

    def client(self) -> ControlClient:
        return ControlClient.unix(self.socket, timeout=10)

    def ctl(self, line: str) -> Reply:
        with self.client() as c:
            return c.command(line)

    def json(self, line: str) -> Any:
        reply = self.ctl(line + " --json")
        assert reply.code == 200, reply
        return reply.json()

    def nodes(self) -> dict[str, dict[str, Any]]:
        """Other nodes by name (this node left out)."""
        return {n["name"]: n for n in self.json("nodes")["nodes"] if not n.get("self")}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
            raise AssertionError(f"{self.name} did not stop on signal {sig}") from None


def omuscd_command(args: list[str], netns: str | None = None) -> list[str]:
    cmd = [PYTHON, "-m", "omuscd", *args]
    if netns is not None:
        # nsenter, not 'ip netns exec': the latter also unshares the mount namespace,
        # which CRIU refuses to dump.
        cmd = ["nsenter", f"--net=/run/netns/{netns}", *cmd]
    return cmd


def start_daemon(name: str, args: list[str], workdir: Path, netns: str | None = None,
                 wait: bool = True, env: dict[str, str] | None = None,
                 wrap: Callable[[list[str]], list[str]] | None = None) -> Daemon:
    """``wrap``: the command that runs the daemon's (which it execs), e.g. in a mount
    namespace of its own."""
    state = workdir / name
    state.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    full = [*args, "--state-dir", str(state), "--node-name", name]
    logf = open(log_path, "ab")
    command = omuscd_command(full, netns)
    popen = subprocess.Popen(wrap(command) if wrap else command, stdout=logf,
                             stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    logf.close()
    d = Daemon(name, popen, state, log_path, netns, full)
    if wait:
        def ready() -> bool:
            if popen.poll() is not None:
                raise AssertionError(f"{name} exited with {popen.returncode}:\n{d.log()}")
            return os.path.exists(d.socket) and d.ctl("version").code == 200
        wait_for(ready, 15, f"{name} to start")
    return d


def short_tmpdir() -> Path:
    """A short directory: Unix socket paths must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=RUN_PREFIX))


def can_netns() -> str | None:
    """None if this machine can build namespace clusters, else the reason it cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "nsenter"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            return f"{tool} is not installed"
    return None


def sh(*cmd: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")


class NetnsLan:
    """A LAN of namespaces: ``<p>br`` holds bridge br0; ``<p>n<i>`` has eth0 with
    198.18.0.<10+i>/24, veth to the bridge, and lo up (CRIU's checks need lo)."""

    def __init__(self, nodes: int, prefix: str | None = None):
        self.prefix = prefix or f"omt{os.getpid() % 100000}x"
        self.bridge = f"{self.prefix}br"
        self.names: list[str] = []
        self.nodes = nodes

    def address(self, i: int) -> str:
        return f"{NETNS_PREFIX}{10 + i}"

    def ns(self, i: int) -> str:
        return f"{self.prefix}n{i}"

    def __enter__(self) -> NetnsLan:
        try:
            sh("ip", "netns", "add", self.bridge)
            self.names.append(self.bridge)
            MADE_NETNS.add(self.bridge)
            sh("ip", "-n", self.bridge, "link", "set", "lo", "up")
            sh("ip", "-n", self.bridge, "link", "add", "br0", "type", "bridge")
            sh("ip", "-n", self.bridge, "link", "set", "br0", "up")
            for i in range(self.nodes):
                self.add_node(i)
        except BaseException:
            self.__exit__()
            raise
        return self

    def add_node(self, i: int) -> str:
        ns = self.ns(i)
        sh("ip", "netns", "add", ns)
        self.names.append(ns)
        MADE_NETNS.add(ns)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"v{i}",
           "netns", self.bridge)
        sh("ip", "-n", ns, "addr", "add", f"{self.address(i)}/24", "brd", "+", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", self.bridge, "link", "set", f"v{i}", "master", "br0", "up")
        return ns

    def split(self, i: int, j: int, apart: bool) -> None:
        """Cut (``apart``) or mend the link between nodes ``i`` and ``j`` only: each drops
        what it sends the other (a blackhole route), while both still reach the rest (so
        SWIM's indirect probes go round and neither is declared dead)."""
        for a, b in ((i, j), (j, i)):
            sh("ip", "-n", self.ns(a), "route", "add" if apart else "del", "blackhole",
               f"{self.address(b)}/32")

    def __exit__(self, *exc: object) -> None:
        for ns in reversed(self.names):
            if subprocess.run(["ip", "netns", "del", ns], capture_output=True).returncode == 0:
                MADE_NETNS.discard(ns)
        self.names.clear()


def tbf(rate: str) -> list[str]:
    """A token bucket (``tc qdisc ... tbf``) holding a link to ``rate``, smoothly."""
    return ["tbf", "rate", rate, "burst", "32kbit", "latency", "400ms"]


@contextmanager
def slow_links(lan: NetnsLan, nodes: Iterable[int], rate: str = "100mbit") -> Iterator[None]:
    """What ``lan``'s nodes ``nodes`` (indices) send slowed to ``rate`` for real (a tbf on
    each one's eth0: slow every node of a move for both ways), then fast again: moves
    then last seconds, long enough to act in the middle of one."""
    slowed: list[int] = []
    try:
        for i in nodes:
            sh("tc", "-n", lan.ns(i), "qdisc", "add", "dev", "eth0", "root", *tbf(rate))
            slowed.append(i)
        yield
    finally:
        for i in slowed:
            subprocess.run(["tc", "-n", lan.ns(i), "qdisc", "del", "dev", "eth0", "root"],
                           capture_output=True)


def telnet(addr: str, port: int, script: list[tuple[str, float]],
           netns: str | None = None, user: User | None = None) -> str:
    """Drive the real telnet client, pausing after each piece of input as a person would
    (it gives up at the end of its input); bytes go through its own line mode and escapes.
    ``user``: run by that account (see :func:`ordinary_user`), not by root."""
    pre = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
    argv = [*pre, "telnet", addr, str(port)]
    if user is not None:
        p = user.popen(argv, stdin=subprocess.PIPE, stderr=subprocess.STDOUT)
    else:
        p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT)
    assert p.stdin is not None
    time.sleep(0.5)
    for text, pause in script:
        p.stdin.write(text.encode())
        p.stdin.flush()
        time.sleep(pause)
    out, _ = p.communicate(timeout=10)
    return out.decode(errors="replace")


def processes_naming(text: str) -> dict[int, str]:
    """The processes whose command line has ``text`` (a path, say): pid -> command line
    (its words joined by spaces)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                words = f.read().decode(errors="replace").rstrip("\0").split("\0")
        except OSError:
            continue
        line = " ".join(words)
        if text in line:
            found[int(entry)] = line
    return found


def as_user(uid: int, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` in a forked child that has dropped to ``uid`` (and that gid, no groups);
    return its result.  A fork, not an exec: the interpreter's files may be unreadable to
    that user (a Python under /root), the sockets are not."""
    import pickle

    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            result: Any = ("ok", fn())
        except BaseException as e:
            result = ("error", repr(e))
        with os.fdopen(w, "wb") as f:
            pickle.dump(result, f)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    status, value = pickle.loads(data)
    if status != "ok":
        raise AssertionError(f"as uid {uid}: {value}")
    return value


@contextmanager
def namespace_cluster(names: str | list[str], extra: Callable[[int], list[str]] = lambda i: [],
                      size: int | None = None, prefix: str | None = None,
                      open_to_all: bool = False, leftovers: str | None = None
                      ) -> Iterator[tuple[NetnsLan, Path, Path, dict[str, Daemon]]]:
    """A LAN of ``size`` namespaces (default: one per name), a cluster key, and a daemon
    per name (node i in namespace i, with ``extra(i)`` switches), each seeing the others.
    Everything is removed afterwards; ``leftovers`` names (pkill -f) job processes a test
    may leave behind.  ``open_to_all`` lets other users reach the control sockets."""
    from omuscd import config

    with NetnsLan(size or len(names), prefix) as lan:
        work = short_tmpdir()
        if open_to_all:
            os.chmod(work, 0o755)
        key = work / "cluster.key"
        config.write_key(str(key))
        nodes: dict[str, Daemon] = {}
        try:
            for i, name in enumerate(names):
                nodes[name] = start_daemon(name, ["--key-file", str(key), *extra(i)], work,
                                           netns=lan.ns(i))
                if open_to_all:
                    os.chmod(nodes[name].state_dir, 0o755)
            for d in nodes.values():
                wait_for(lambda d=d: len(d.nodes()) == len(names) - 1, 10,
                         f"{d.name} to see the others")
            yield lan, work, key, nodes
        finally:
            for d in nodes.values():
                if d.alive():
                    d.popen.kill()
                    d.popen.wait()
            if leftovers:
                subprocess.run(["pkill", "-f", leftovers], capture_output=True)


@dataclass
class User:
    """An ordinary account made for a test, with an interpreter it can execute (the
    default ``python3`` here lives under /root, mode 0700) that imports this tree's
    ``omuscd`` (a copy readable by everyone): ``omuscd run`` and scripts as that user."""

    name: str
    uid: int
    gid: int
    home: Path
    python: str

    def run_argv(self, socket: str, *args: str) -> list[str]:
        """``omuscd run --connect SOCKET ARGS`` as this user would type it."""
        return [self.python, "-m", "omuscd", "run", "--connect", socket, *args]

    def popen(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` as this user (own uid, gid, no other groups), in its home,
        with a plain environment of its own."""
        env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(self.home),
               "USER": self.name, "LOGNAME": self.name, **kw.pop("env", {})}
        return subprocess.Popen(argv, user=self.uid, group=self.gid, extra_groups=[],
                                cwd=kw.pop("cwd", str(self.home)), env=env,
                                stdin=kw.pop("stdin", subprocess.DEVNULL),
                                stdout=kw.pop("stdout", subprocess.PIPE),
                                stderr=kw.pop("stderr", subprocess.PIPE), **kw)

    def run(self, argv: list[str], timeout: float = 120, **kw: Any
            ) -> subprocess.CompletedProcess[bytes]:
        p = self.popen(argv, **kw)
        out, err = p.communicate(timeout=timeout)
        return subprocess.CompletedProcess(argv, p.returncode, out, err)


@contextmanager
def ordinary_user(tag: str = "u") -> Iterator[User]:
    """Create an ordinary user (and its group) for one test, remove it and all it left
    (its processes, its home) afterwards.  Its home is under a 0755 directory of /tmp,
    the same path on every node of a namespace cluster (they share the filesystem)."""
    import pwd
    import shutil

    name = f"omt{os.getpid() % 100000}{tag}"[:31]
    base = Path(tempfile.mkdtemp(prefix=f"omtu-{RUN_PREFIX[4:]}"))
    os.chmod(base, 0o755)
    home = base / name
    subprocess.run(["userdel", "-f", name], capture_output=True)  # a leftover of a crash
    sh("useradd", "--no-create-home", "--home-dir", str(home), "--shell", "/bin/sh",
       "--user-group", name)
    MADE_USERS.add(name)
    try:
        pw = pwd.getpwnam(name)
        home.mkdir(mode=0o700)
        os.chown(home, pw.pw_uid, pw.pw_gid)
        # an interpreter this user can run, importing a readable copy of this tree
        lib = base / "lib"
        root = Path(__file__).resolve().parent.parent
        for pkg in ("omuscd", "tui"):
            shutil.copytree(root / pkg, lib / pkg,
                            ignore=shutil.ignore_patterns("__pycache__"))
        venv = base / "venv"
        sh("/usr/bin/python3", "-m", "venv", "--without-pip", str(venv))
        site = next(venv.glob("lib/python3*/site-packages"))
        (site / "omuscd-tests.pth").write_text(f"{lib}\n")
        for d, _dirs, files in os.walk(base):
            if Path(d) == home or Path(d).is_relative_to(home):
                continue
            os.chmod(d, 0o755)
            for f in files:
                p = Path(d) / f
                if not p.is_symlink():
                    os.chmod(p, 0o755 if os.access(p, os.X_OK) else 0o644)
        yield User(name, pw.pw_uid, pw.pw_gid, home, str(venv / "bin" / "python"))
    finally:
        subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True)
        time.sleep(0.1)
        if subprocess.run(["userdel", "-f", name], capture_output=True).returncode == 0:
            MADE_USERS.discard(name)
        shutil.rmtree(base, ignore_errors=True)


# ---------------------------------------------------------------------- jobs and moves

class Reference:
    """A plain run of a program (unmoved, unmanaged), started beside the run under test
    rather than before it (the suite waited for both in turn: half of the checkpoint
    tests' time).  ``stdout`` and ``returncode`` wait for its end.  Give it arguments
    that tell it from the run under test (the tests count a job's copies by them)."""

    def __init__(self, argv: list[str], user: User | None = None, timeout: float = 120,
                 ends: bytes = b""):
        self.timeout = timeout
        self.ends = ends  # what its output must end with, and it must exit 0
        self.p = user.popen(argv) if user is not None else subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            cwd="/tmp")
        self._done: tuple[bytes, bytes] | None = None

    def _wait(self) -> tuple[bytes, bytes]:
        if self._done is None:
            try:
                self._done = self.p.communicate(timeout=self.timeout)
            finally:
                self.p.kill()
            assert not self.ends or (self.p.returncode == 0 and self._done[0].endswith(
                self.ends)), (self.p.returncode, self._done[0][-200:], self._done[1][-500:])
        return self._done

    @property
    def stdout(self) -> bytes:
        return self._wait()[0]

    @property
    def returncode(self) -> int:
        self._wait()
        return self.p.returncode


def job_processes(tag: str) -> list[int]:
    """The job's own processes (not its init, not the omuscd run that started it): those
    whose command line has ``tag``, of this run's daemons (writing to a spool under
    RUN_MARKS: another run beside this one may run the same test's job)."""
    procs = subprocess.run(["pgrep", "-f", tag], capture_output=True, text=True).stdout.split()
    mine = []
    for pid in procs:
        try:
            cmd = open(f"/proc/{pid}/cmdline").read()
        except OSError:
            continue
        if "jobinit" not in cmd and "omuscd run" not in cmd.replace("\0", " ") and \
                "-m\0omuscd" not in cmd and _naming(int(pid), RUN_MARKS) is not None:
            mine.append(int(pid))
    return mine


def job_of(node: Daemon, marker: str) -> str:
    """The id of the running job whose command has ``marker``, once its command runs (a
    job still starting is not moved: see jobs.starting)."""
    def find() -> str | None:
        for j in node.json("jobs")["jobs"]:
            if marker in j["command"] and j["state"] == "running":
                return j["id"]
        return None
    wait_for(find, 10, f"the job {marker} to be listed")
    wait_for(lambda: job_processes(marker), 10, f"the command of the job {marker} to run")
    return find() or ""


def run_job(node: Daemon, where: Iterable[str], *argv: str) -> subprocess.Popen[bytes]:
    """``omuscd run`` of ``argv`` on ``node``, attached (``where``: --home, --node b...),
    from /tmp: its output and exit status are the job's."""
    return subprocess.Popen([PYTHON, "-m", "omuscd", "run", "--connect", node.socket, *where,
                             "--", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd="/tmp")


def start_job(node: Daemon, where: Iterable[str], argv: list[str], tag: str
              ) -> tuple[subprocess.Popen[bytes], str]:
    """:func:`run_job` of a job that prints ``ready`` first and has ``tag`` in its command
    line: the client and the job id, once it is ready, listed, and past 'still starting'
    (see jobs.starting)."""
    p = run_job(node, where, *argv)
    assert p.stdout is not None and p.stdout.readline() == b"ready\n"
    job = job_of(node, tag)
    time.sleep(0.5)
    return p, job


def migrating(node: Daemon, job: str, where: str, timeout: float = 300
              ) -> tuple[threading.Thread, dict[str, Any]]:
    """``migrate JOB WHERE`` sent to ``node`` in a thread (joined by the caller); its reply
    lands in the dict, unless the daemon stops under it."""
    result: dict[str, Any] = {}

    def migrate() -> None:
        try:
            with ControlClient.unix(node.socket, timeout=timeout) as c:
                result["reply"] = c.command(f"migrate {job} {where}")
        except (OSError, ConnectionError, ValueError):
            pass

    t = threading.Thread(target=migrate)
    t.start()
    return t, result


# ---------------------------------------------------------------------- shared checks

#: The start of a script run as an ordinary user: ``users_dump()`` waits for the first CRIU
#: dump started after the script that runs with this user's real uid (the dump of their own
#: job: see omuscd.migrate.criu) and returns its pid.  Only processes started since the
#: script are looked at: a dump lasts a fraction of a second and must be caught at its start.
USERS_DUMP = r"""
import os, sys, time
def started(pid):  # in clock ticks since boot (pids wrap around: 32768 here)
    with open(f"/proc/{pid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[19])
LOADER = b"/var/cache/omuscd-criu/root/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
def users_dump(watching=lambda: None):
    me, first, passes = str(os.getuid()), started("self"), 0
    while True:
        passes += 1
        if passes == 2:
            watching()  # the first whole look at /proc is done
        for pid in os.listdir("/proc"):
            try:
                if not pid.isdigit() or started(pid) < first:
                    continue
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().split(b"\0")
                with open(f"/proc/{pid}/status") as f:
                    uid = next(ln.split()[1] for ln in f if ln.startswith("Uid:"))
            except (OSError, StopIteration):
                continue
            # the CRIU that dumps a job: a service worker (swrk) started for the dump,
            # whose title, once it dumps, is the loader's path alone where CRIU runs
            # through it (tests/install-criu)
            criu = (b"dump" in cmd or b"swrk" in cmd) and any(a.endswith(b"/criu")
                                                                for a in cmd)
            if uid == me and (criu or cmd[:2] == [LOADER, b""]):
                return int(pid)
"""


def criu_problem() -> str | None:
    """Why real CRIU moves cannot be tested here (no namespaces, no CRIU, a failing
    ``criu check``), or None."""
    from omuscd.migrate.criu import PRIVATE_CRIU, find_criu

    reason = can_netns()
    if reason:
        return reason
    criu = find_criu(None)
    if criu is None:
        return f"no CRIU (neither criu in PATH nor {PRIVATE_CRIU}; tests/install-criu makes one)"
    r = subprocess.run([criu, "check"], capture_output=True, text=True)
    if r.returncode != 0:
        return f"'criu check' fails on this machine: {(r.stderr or r.stdout).strip()[-200:]}"
    return None


def inprocess_daemon(workdir: Path, addr: str, port: int, peers: tuple[str, ...] = (),
                     **kw: Any) -> Any:
    """A daemon object in this process (not started): for trio runs under a MockClock
    and for the command table on a real node's services.  --insecure, on loopback."""
    from omuscd import config
    from omuscd.daemon import Daemon as Node

    cfg = config.merge({"address": addr, "port": port, "control_port": port + 1,
                        "peer": list(peers), "control_bind": addr,
                        "state_dir": str(workdir / addr), "node_name": addr,
                        "insecure": True, **kw}, None)
    config.autodetect(cfg)
    return Node(cfg, None, "insecure")


# ---------------------------------------------------------------------- cluster fixtures
# Every cluster a test module starts, one fixture each, all named "cluster" for the tests
# that use them: a module imports the one it needs (``from tests.cluster import jobs_lan``)
# and its tests take ``cluster``.

#: balancing tests look every second and let jobs move after a second, stay three
FAST_BALANCE = ["--balance-interval", "1", "--min-job-age", "1", "--min-stay", "3"]
LAN_SIZE = 8  # the broadcast LAN: seven daemons and one free address


@pytest.fixture(scope="module", name="cluster")
def balance_lan() -> Iterator[dict[str, Daemon]]:
    """Nodes a and b in namespaces, lending CPU 0 and CPU 1, balancing fast; open to
    every user; real CRIU."""
    reason = criu_problem()
    if reason:
        pytest.skip(reason)
    with namespace_cluster("ab", lambda i: ["--cpus", str(i), *FAST_BALANCE],
                           prefix=f"omb{os.getpid() % 10000}x", open_to_all=True,
                           leftovers="omuscd-balance-test") as (_, _, _, nodes):
        yield nodes


@pytest.fixture(scope="module", name="cluster")
def jobs_lan() -> Iterator[tuple[Any, ...]]:
    """Nodes a, b, c; each lends one CPU (--cpus 0), like small idle boxes."""
    with namespace_cluster("abc", lambda i: ["--cpus", "0"], open_to_all=True,
                           leftovers="omuscd-test-job") as c:
        yield c


@pytest.fixture(scope="module", name="cluster")
def broadcast_lan() -> Iterator[tuple[Any, ...]]:
    """Seven nodes of an eight-node LAN, started with nothing but a key: they configure
    themselves and find each other by broadcast."""
    names = [f"node{i}" for i in range(LAN_SIZE - 1)]
    with namespace_cluster(names, size=LAN_SIZE) as (lan, work, key, nodes):
        yield lan, work, key, list(nodes.values())


@pytest.fixture(scope="module", name="cluster")
def examples_lan() -> Iterator[tuple[Any, dict[str, Daemon]]]:
    """Nodes a and b in namespaces, for the examples' scripts."""
    reason = can_netns()
    if reason:
        pytest.skip(reason)
    with namespace_cluster("ab", prefix=f"omx{os.getpid() % 10000}x") as (lan, _, _, nodes):
        yield lan, nodes


# ---------------------------------------------------------------------- leftovers

def _naming(pid: int, marks: tuple[str, ...]) -> str | None:
    """Process ``pid``'s command line if it, its working directory or a file it has open
    is under one of ``marks`` (paths), else None."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            line = f.read().decode(errors="replace").rstrip("\0").replace("\0", " ")
        places = [line, os.readlink(f"/proc/{pid}/cwd")]
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                places.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
            except OSError:
                continue
    except OSError:  # gone, or a kernel thread
        return None
    return line if any(m in p for p in places for m in marks) else None


def run_marks(basetemp: Path | None) -> tuple[str, ...]:
    """The paths under which only this run makes things: its directories in /tmp (see
    RUN_PREFIX, ordinary_user) and pytest's ``basetemp`` (tmp_path's root)."""
    tmp = tempfile.gettempdir()
    return (f"{tmp}/{RUN_PREFIX}", f"{tmp}/omtu-{RUN_PREFIX[4:]}",
            *([f"{basetemp}/"] if basetemp is not None else []))


#: run_marks, pytest's basetemp added once known (tests/conftest.py)
RUN_MARKS = run_marks(None)


def left_processes(marks: tuple[str, ...]) -> dict[int, str]:
    """The processes (not this one) holding something under ``marks``: what a test of this
    run started (a daemon, CRIU, a job's init and its command all hold their state
    directory's files or name it) and did not end.  pid -> command line."""
    found = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            line = _naming(int(entry), marks)
            if line is not None:
                found[int(entry)] = line
    return found


#: seconds more a leftover check waits for post-copy lazy-pages (its page answers time
#: out after 30 s: omuscd.migrate.page_relay.IDLE_TIMEOUT)
LAZY_GRACE = 40.0


def leftovers(marks: tuple[str, ...], wait: float = 5.0) -> list[str]:
    """What this run left behind, once ``wait`` seconds did not end it: processes under
    ``marks`` (see left_processes), network namespaces and users it made.  All of it is
    removed (killed, deleted) so that one leak fails one module, not every one after;
    returns what it was, one line each."""
    deadline = time.monotonic() + wait
    procs = left_processes(marks)
    while procs and time.monotonic() < deadline:
        time.sleep(0.1)
        procs = left_processes(marks)
    if procs and all(" lazy-pages " in line for line in procs.values()):
        # a post-copy target's lazy-pages ends once its page answers time out: bounded,
        # not leaked; one still there after LAZY_GRACE is
        print(f"leftovers: waiting up to {LAZY_GRACE:g}s more for {sorted(procs)} (criu "
              "lazy-pages)", file=sys.stderr)
        deadline = time.monotonic() + LAZY_GRACE
        while procs and time.monotonic() < deadline:
            time.sleep(0.2)
            procs = left_processes(marks)
    found = [f"process {pid}: {line[:300]}" for pid, line in sorted(procs.items())]
    for pid in procs:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    live = set(subprocess.run(["ip", "netns", "list"], capture_output=True,
                              text=True).stdout.split())
    for ns in sorted(MADE_NETNS & live):
        found.append(f"network namespace {ns}")
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    MADE_NETNS.clear()
    import pwd

    for name in sorted(MADE_USERS):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        found.append(f"user {name}")
        subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True)
        subprocess.run(["userdel", "-f", name], capture_output=True)
    MADE_USERS.clear()
    return found
