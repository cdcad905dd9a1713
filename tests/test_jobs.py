"""Cluster jobs on a namespace LAN of real daemons: ``omuscd run`` where there is room,
output and exit status as if local, signals, lost nodes, permissions, placement."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from omuscd.client import ControlClient
from omuscd.migrate.criu import PRIVATE_CRIU
from tests.cluster import (
    User,
    as_user,
    can_netns,
    jobs_lan,  # noqa: F401 (the "cluster" fixture)
    ordinary_user,
    start_daemon,
    wait_for,
)

REASON = can_netns()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

SCRIPT = ('for i in 1 2 3; do echo "out $i"; echo "err $i" >&2; done; '
          'printf "no newline"; exit 7')


def run(node, *args: str, cwd: str | None = None, user: int | None = None,
        **kw) -> subprocess.CompletedProcess[bytes]:
    cmd = [sys.executable, "-m", "omuscd", "run", "--connect", node.socket, *args]
    return subprocess.run(cmd, capture_output=True, cwd=cwd or "/tmp", timeout=60,
                          user=user, group=user, extra_groups=[] if user else None, **kw)


def popen(node, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "omuscd", "run", "--connect", node.socket,
                             *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd="/tmp")


def test_remote_run_looks_local(cluster):
    _, _, _, n = cluster
    local = subprocess.run(["sh", "-c", SCRIPT], capture_output=True, cwd="/tmp")
    remote = run(n["a"], "--node", "b", "--", "sh", "-c", SCRIPT)
    assert (remote.stdout, remote.returncode) == (local.stdout, local.returncode) == (
        b"out 1\nout 2\nout 3\nno newline", 7)
    assert remote.stderr == local.stderr == b"err 1\nerr 2\nerr 3\n"
    home = run(n["a"], "--home", "--", "sh", "-c", SCRIPT)
    assert (home.stdout, home.stderr, home.returncode) == (local.stdout, local.stderr, 7)


def test_arguments_with_newlines_and_quotes_arrive_intact(cluster):
    _, _, _, n = cluster
    code = 'import sys\nprint(sys.argv[1:])\n'
    r = run(n["a"], "--node", "b", "--", "python3", "-c", code, "a b", "it's", "x\ny", "")
    assert r.stdout == b"['a b', \"it's\", 'x\\ny', '']\n", r.stderr


def test_job_has_callers_cwd_env_and_own_pid_namespace(cluster, tmp_path):
    _, _, _, n = cluster
    os.chmod(tmp_path, 0o755)
    marker = uuid.uuid4().hex
    r = run(n["a"], "--node", "c", "--", "sh", "-c",
            'echo "$PWD $OMUSCD_T $$"; cat /proc/self/status | grep Cpus_allowed_list',
            cwd=str(tmp_path), env={**os.environ, "OMUSCD_T": marker})
    assert r.returncode == 0, r.stderr
    pwd, got, pid = r.stdout.decode().splitlines()[0].split()
    assert (pwd, got) == (str(tmp_path), marker)
    assert pid == "2"  # PID 1 is the job's init, inside the job's own namespace
    assert r.stdout.decode().split()[-1] == "0"  # the CPUs node c lends


def test_stdin_only_with_stdin(cluster):
    _, _, _, n = cluster
    data = b"".join(b"line %d\n" % i for i in range(20000))  # more than a pipe buffer
    r = run(n["a"], "--node", "b", "--stdin", "--", "sha256sum", input=data)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    quiet = run(n["a"], "--node", "b", "--", "cat", input=b"not for the job")
    assert (quiet.returncode, quiet.stdout) == (0, b"")  # /dev/null without --stdin
    r = run(n["a"], "--node", "b", "--stdin", "--detach", "--", "cat")
    assert r.returncode == 2 and b"--stdin needs an attached client" in r.stderr


def test_signal_reaches_remote_job(cluster):
    _, _, _, n = cluster
    p = popen(n["a"], "--node", "b", "--", "sh", "-c",
              'trap "echo got INT; exit 9" INT; echo ready; '
              'while :; do sleep 0.1; done # omuscd-test-job')
    assert p.stdout is not None
    assert p.stdout.readline() == b"ready\n"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=10)
    assert out == b"got INT\n" and p.returncode == 9, err


def test_ctrl_c_while_the_job_starts_reaches_the_job(cluster, tmp_path):
    """A signal that comes after the job started but before the client attached to it:
    the control connection goes through a relay here that holds back the daemon's answer
    to ``run``, so that the signal falls into that gap every time.  (It killed the client
    alone, and the job ran on.)"""
    _, _, _, n = cluster
    relay = tmp_path / "relay.sock"
    held, release = threading.Event(), threading.Event()
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(relay))
    server.listen()

    def pump(src: socket.socket, dst: socket.socket, gate: bool) -> None:
        seen = b""
        while data := src.recv(65536):
            seen += data
            if gate and held.is_set():
                release.wait(30)
            dst.sendall(data)
            if not gate and b"\nrun " in b"\n" + seen:
                held.set()
        dst.shutdown(socket.SHUT_WR)

    def serve() -> None:
        client, _ = server.accept()
        daemon = socket.socket(socket.AF_UNIX)
        daemon.connect(n["a"].socket)
        threading.Thread(target=pump, args=(daemon, client, True), daemon=True).start()
        pump(client, daemon, False)

    threading.Thread(target=serve, daemon=True).start()
    tag = "omuscd-test-job-early-int"
    p = subprocess.Popen([sys.executable, "-m", "omuscd", "run", "--connect", str(relay),
                          "--home", "--", "sh", "-c",
                          f'trap "echo got INT; exit 9" INT; while :; do sleep 0.1; done # {tag}'],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/tmp")
    try:
        assert held.wait(10), "the client never asked to run"
        wait_for(lambda: any(tag in j["command"] and j["state"] == "running"
                             for j in n["a"].json("jobs")["jobs"]), 10, "the job to start")
        time.sleep(0.3)  # its trap is set
        p.send_signal(signal.SIGINT)
        time.sleep(0.3)  # and the client has taken the signal, not yet attached
        release.set()
        out, err = p.communicate(timeout=10)
    finally:
        release.set()
        p.kill()
        server.close()
    assert out == b"got INT\n" and p.returncode == 9, (p.returncode, err)


def test_a_signal_sent_as_the_job_starts_is_not_lost(cluster):
    """``kill`` in the same breath as ``run``: the job's init (PID 1 of its namespace)
    ignores signals until it has its handlers, and then until its command exists; the
    signal waits for it rather than vanish (the job ran its full 30 s)."""
    _, _, _, n = cluster
    c = n["a"].client()
    try:
        for _ in range(3):
            r = c.command("run --home --json -- sleep 30")
            assert r.ok, r
            job = r.json()["job"]
            assert c.command(f"kill {job} INT").ok
            wait_for(lambda j=job: n["a"].json(f"job {j}")["state"] == "exited", 10,
                     f"job {job} to end on its SIGINT")
            assert n["a"].json(f"job {job}")["status"] == "killed by signal 2"
    finally:
        c.close()


def test_signal_death_gives_128_plus_n(cluster):
    _, _, _, n = cluster
    r = run(n["a"], "--node", "b", "--", "sh", "-c", "kill -TERM $$")
    assert r.returncode == 128 + signal.SIGTERM


def test_missing_program_or_cwd_names_node_and_path(cluster, tmp_path):
    _, _, _, n = cluster
    r = run(n["a"], "--node", "b", "--", "/nonexistent/prog")
    assert r.returncode == 125
    assert b"node b: no such program /nonexistent/prog" in r.stderr
    r = run(n["a"], "--node", "b", "--", "no-such-program-xyz")
    assert r.returncode == 125 and b"node b: program 'no-such-program-xyz' not found" in r.stderr
    ctl = [sys.executable, "-m", "omuscd", "ctl", "--connect", n["a"].socket]
    r = subprocess.run([*ctl, "run", "--node", "b", "--cwd", str(tmp_path / "gone"), "--",
                        "true"], capture_output=True, text=True)
    assert r.returncode == 5
    assert f"node b: working directory {tmp_path / 'gone'} does not exist" in r.stderr


def test_jobs_is_the_same_on_every_node(cluster):
    _, _, _, n = cluster
    r = run(n["a"], "--node", "c", "--detach", "--", "sleep", "30")
    job = r.stdout.decode().strip()
    assert r.returncode == 0 and job.startswith(f"{n['a'].json('status')['id']}.")
    try:
        listings = [d.json("jobs")["jobs"] for d in n.values()]
        for listing in listings:
            mine = [j for j in listing if j["id"] == job]
            assert len(mine) == 1
            assert mine[0]["node_name"] == "c" and mine[0]["state"] == "running"
        assert listings[0] == listings[1] == listings[2]
        text = n["b"].ctl("jobs").text
        assert job in text and "sleep 30" in text
        assert n["c"].json("nodes")["nodes"][0]["jobs"] == 1
    finally:
        assert n["b"].ctl(f"kill {job} KILL").ok  # from a third node, through the home
    wait_for(lambda: n["a"].json(f"job {job}")["state"] == "exited", 5, "the job to end")
    assert n["a"].json(f"job {job}")["status"] == "killed by signal 9"


def test_a_user_cannot_kill_another_users_job(cluster):
    _, _, _, n = cluster
    r = run(n["a"], "--node", "b", "--detach", "--", "sleep", "30")
    job = r.stdout.decode().strip()
    nobody = 65534
    sock = n["a"].socket

    def as_nobody():
        with ControlClient.unix(sock) as c:
            kill = c.command(f"kill {job}")
            mine = c.command("run --node b --cwd /tmp --json -- id -u")
            other = c.command("run --user root --cwd /tmp -- true")
            return kill.code, kill.text, mine.code, mine.text, other.code, other.text

    try:
        kill_code, kill_text, mine_code, mine_text, other_code, other_text = as_user(
            nobody, as_nobody)
        assert kill_code == 500 and "belongs to root" in kill_text
        assert n["a"].json(f"job {job}")["state"] == "running"
        assert other_code == 501 and "only root" in other_text
        # nobody's own job runs as nobody, on b
        assert mine_code == 200, mine_text
        own = json.loads(mine_text)["job"]
        wait_for(lambda: n["a"].json(f"job {own}")["state"] == "exited", 5, "id -u to end")
        view = n["a"].json(f"job {own}")
        assert view["owner"] == "nobody" and view["node_name"] == "b"
        assert n["a"].ctl(f"output {own}").lines[0] == "stdout: 65534"
    finally:
        n["a"].ctl(f"kill {job} KILL")


def test_best_spreads_jobs_started_at_once(cluster):
    _, _, _, n = cluster
    n["c"].ctl("block")  # a two-node cluster for this test: c takes no guests
    try:
        wait_for(lambda: "blocked" in n["a"].nodes()["c"]["flags"], 3, "c to be blocked")
        # the premise: two idle nodes (these namespaces share the machine's CPUs)
        wait_for(lambda: all(v["load"] < 0.5 for v in n["a"].json("nodes")["nodes"][:2]), 10,
                 "a and b to be idle")
        # four sessions send their 'run' before any is answered: started at once, and
        # without four client interpreters loading the CPUs these namespaces share
        clients = [ControlClient.unix(n["a"].socket) for _ in range(4)]
        for c in clients:
            c.sock.sendall(b"run --json --cwd /tmp -- sleep 20\n")
        jobs = [c.read_reply().json()["job"] for c in clients]
        for c in clients:
            c.close()
        nodes = [n["a"].json(f"job {j}")["node_name"] for j in jobs]
        assert sorted(nodes) == ["a", "a", "b", "b"], nodes
        r = run(n["a"], "--node", "c", "--", "true")
        assert r.returncode == 125 and b"node c cannot take jobs: blocked" in r.stderr
        for j in jobs:
            n["a"].ctl(f"kill {j} KILL")
    finally:
        n["c"].ctl("noblock")


def test_a_job_starting_or_ending_shows_in_the_load_at_once(cluster):
    """Not at the next load interval (30 s here): balancing hears of it in a moment."""
    _, _, _, n = cluster
    a = n["a"]

    def load() -> float:
        return next(v["load"] for v in a.json("nodes")["nodes"] if v["name"] == "a")

    assert a.ctl("set load_interval 30").ok
    job = None
    try:
        wait_for(lambda: load() < 0.5, 10, "a to be idle")
        time.sleep(1.5)  # the sample due at the old interval is taken; the next in 30 s
        r = run(a, "--node", "a", "--detach", "--", "sh", "-c",
                "while :; do :; done # omuscd-test-job")
        job = r.stdout.decode().strip()
        wait_for(lambda: load() >= 0.8, 3, "the load to show the job")
        assert a.ctl(f"kill {job} KILL").ok
        job = None
        wait_for(lambda: load() < 0.5, 3, "the load to show the job gone")
    finally:
        if job:
            a.ctl(f"kill {job} KILL")
        a.ctl("set load_interval 1")


def test_detach_then_attach_from_start_or_follow(cluster):
    _, _, _, n = cluster
    script = "echo one; sleep 1; echo two; sleep 1; echo three; exit 5"
    r = run(n["a"], "--node", "b", "--detach", "--", "sh", "-c", script)
    job = r.stdout.decode().strip()
    assert r.returncode == 0 and job
    time.sleep(1.5)  # 'one' and 'two' are out
    follow = subprocess.run([sys.executable, "-m", "omuscd", "attach", "--connect",
                             n["a"].socket, "--follow", job], capture_output=True, timeout=20)
    assert (follow.stdout, follow.returncode) == (b"three\n", 5)
    again = subprocess.run([sys.executable, "-m", "omuscd", "attach", "--connect",
                            n["a"].socket, job], capture_output=True, timeout=20)
    assert (again.stdout, again.returncode) == (b"one\ntwo\nthree\n", 5)
    out = n["a"].ctl(f"output {job}")
    assert out.lines == ["stdout: one", "stdout: two", "stdout: three", f"job {job} exited: exit 5"]


def test_text_attach_for_telnet_users(cluster):
    _, _, _, n = cluster
    with ControlClient.unix(n["a"].socket) as c:
        job = c.command("run --json --node b --cwd /tmp -- sh -c 'echo hi; echo oops >&2'")
        job_id = job.json()["job"]
        reply = c.command(f"attach {job_id}")
    assert reply.code == 230
    # stdout and stderr are two files: their relative order is not defined
    assert sorted(reply.lines[1:3]) == ["hi", "stderr: oops"]
    assert reply.lines[3:] == ["exit 0"]


#: Where a planted helper looks for the real one (the test's own trusted places).
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
#: Programs a root daemon might look up by name: each planted in the user's PATH.
PLANTED = ("unshare", "python3", "sh", "env", "nsenter", "criu", "setpriv")
PLACES = {"home": ("--home",), "remote": ("--node", "b")}


def _record_file(user: User, name: str) -> str:
    """A file the user owns (so the user's own processes can append to it too)."""
    rec = user.home / name
    rec.touch(mode=0o600)
    os.chown(rec, user.uid, user.gid)
    return str(rec)


def _plant(user: User, rec: str) -> str:
    """A directory in the user's home with a program for each of PLANTED that notes its
    name and ``id -u`` then runs the real one: the directory to put first in PATH."""
    bin_dir = user.home / "bin"
    bin_dir.mkdir()
    for name in PLANTED:
        real = shutil.which(name, path=SYSTEM_PATH)
        then = f'exec {real} "$@"' if real else "exit 1"
        (bin_dir / name).write_text(
            f'#!/bin/sh\necho "{name} $(/usr/bin/id -u)" >> {rec}\n{then}\n')
        (bin_dir / name).chmod(0o755)
    shutil.chown(bin_dir, user.uid, user.gid)
    for f in bin_dir.iterdir():
        shutil.chown(f, user.uid, user.gid)
    return str(bin_dir)


@pytest.mark.parametrize("place", sorted(PLACES))
def test_a_planted_path_never_runs_as_root(cluster, place):
    """A user's PATH naming the user's own ``unshare`` (or any helper the daemon runs)
    must not run it as root: the job starts as usual, the planted programs run only as
    the user (the job's own ``sh`` through the user's PATH, which must still reach it)."""
    _, _, _, n = cluster
    with ordinary_user(f"p{place[0]}") as user:
        rec = _record_file(user, "planted.rec")
        bin_dir = _plant(user, rec)
        r = user.run(user.run_argv(n["a"].socket, *PLACES[place], "--", "sh", "-c",
                                   'echo "job ran"; /usr/bin/id -u'),
                     env={"PATH": f"{bin_dir}:/usr/bin:/bin"}, timeout=60)
        assert (r.returncode, r.stdout) == (0, f"job ran\n{user.uid}\n".encode()), r.stderr
        ran = [line.split() for line in open(rec).read().splitlines()]
        assert not [who for who in ran if who[1] == "0"], ran  # nothing of it ran as root
        assert ["sh", str(user.uid)] in ran  # the job's command: the user's PATH, as the user


def _preload_library(user: User, rec: str) -> str:
    """A library whose constructor appends its process's uid and PID namespace to
    ``rec``: whoever loads it says so."""
    src = user.home / "rec.c"
    src.write_text(
        "#include <fcntl.h>\n#include <stdio.h>\n#include <unistd.h>\n"
        "__attribute__((constructor)) static void note(void) {\n"
        "  char ns[64] = \"?\", line[128];\n"
        "  ssize_t n = readlink(\"/proc/self/ns/pid\", ns, sizeof ns - 1);\n"
        "  if (n > 0) ns[n] = 0;\n"
        f"  int fd = open(\"{rec}\", O_WRONLY | O_APPEND);\n"
        "  if (fd < 0) return;\n"
        "  int len = snprintf(line, sizeof line, \"%u %s\\n\", (unsigned)getuid(), ns);\n"
        "  if (write(fd, line, len) < 0) {}\n"
        "  close(fd);\n}\n")
    lib = user.home / "rec.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    shutil.chown(lib, user.uid, user.gid)
    return str(lib)


@pytest.mark.parametrize("place", sorted(PLACES))
def test_ld_preload_never_loads_as_root(cluster, place):
    """An LD_PRELOAD in the caller's environment is loaded by nothing that runs as root;
    the user's own job does load it, as the user, inside the job's PID namespace (the
    environment still reaches the job)."""
    _, _, _, n = cluster
    with ordinary_user(f"l{place[0]}") as user:
        rec = _record_file(user, "preload.rec")
        lib = _preload_library(user, rec)
        r = user.run(user.run_argv(n["a"].socket, *PLACES[place], "--", "sh", "-c",
                                   'echo "job ran"'),
                     env={"LD_PRELOAD": lib}, timeout=60)
        assert (r.returncode, r.stdout) == (0, b"job ran\n"), r.stderr
        loads = [line.split() for line in open(rec).read().splitlines()]
        assert not [who for who in loads if who[0] == "0"], loads
        ours = os.readlink("/proc/self/ns/pid")  # the client's too
        in_job = [ns for uid, ns in loads if uid == str(user.uid) and ns != ours]
        assert in_job, loads  # the job's sh loaded it, as the user, in its own namespace


@pytest.mark.parametrize("place", sorted(PLACES))
def test_an_ordinary_users_job_has_callers_env_cwd_and_groups(cluster, place):
    """What the caller had reaches the job that has become the caller: variables (the
    user's PATH among them), working directory, supplementary groups."""
    _, _, _, n = cluster
    with ordinary_user(f"e{place[0]}") as user:
        group = f"{user.name}x"[:31]
        subprocess.run(["groupadd", group], check=True)
        try:
            gid = subprocess.run(["getent", "group", group], capture_output=True, text=True,
                                 check=True).stdout.split(":")[2]
            work = user.home / "work dir"
            work.mkdir()
            shutil.chown(work, user.uid, user.gid)
            marker = uuid.uuid4().hex
            env = {"PATH": "/usr/bin:/bin", "HOME": str(user.home), "OMT_VAR": marker,
                   "OMT_SPACE": "a b\nc"}
            p = subprocess.Popen(
                user.run_argv(n["a"].socket, *PLACES[place], "--", "sh", "-c",
                              'echo "$PWD|$OMT_VAR|$OMT_SPACE|$PATH|$(id -u)|$(id -G)"'),
                user=user.uid, group=user.gid, extra_groups=[int(gid)], cwd=str(work),
                env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE)
            out, err = p.communicate(timeout=60)
        finally:
            subprocess.run(["groupdel", group], capture_output=True)
        assert p.returncode == 0, err
        pwd, var, space, path, uid, groups = out.decode().rstrip("\n").split("|")
        assert (pwd, var, space, path, uid) == (str(work), marker, "a b\nc", "/usr/bin:/bin",
                                                str(user.uid))
        assert sorted(groups.split()) == sorted({str(user.gid), gid})


@pytest.mark.parametrize("env", [{"A=B": "x"}, {"": "x"}, {"A\u0000B": "x"},
                                 {"A": "x\u0000y"}])
def test_a_bad_environment_is_refused_clearly(cluster, env):
    """Names the kernel cannot carry are refused with a reason before anything starts."""
    _, _, _, n = cluster
    coded = base64.b64encode(json.dumps(env).encode()).decode()
    argv = base64.b64encode(json.dumps(["true"]).encode()).decode()
    before = len(n["a"].json("jobs")["jobs"])
    for place in PLACES.values():
        with ControlClient.unix(n["a"].socket) as c:
            reply = c.command(f"run {' '.join(place)} --cwd /tmp --env {coded} --argv {argv}")
        assert reply.code == 500 and "environment" in reply.text, reply
    assert n["a"].ctl("version").code == 200
    assert len(n["a"].json("jobs")["jobs"]) == before


def test_the_daemons_own_path_does_not_choose_its_helpers(workdir, reaper):
    """Whatever PATH the daemon was started with (an admin's shell, sudo) does not pick
    the programs it runs as root: they come from the system directories only."""
    rec = workdir / "planted.rec"
    bin_dir = workdir / "bin"
    bin_dir.mkdir()
    for name in (*PLANTED, "criu"):
        real = shutil.which(name, path=SYSTEM_PATH) or (
            PRIVATE_CRIU if name == "criu" else None)
        (bin_dir / name).write_text(
            f'#!/bin/sh\necho "{name} $(/usr/bin/id -u)" >> {rec}\nexec {real} "$@"\n')
        (bin_dir / name).chmod(0o755)
    d = start_daemon("path", ["--address", "127.0.0.42", "--control-bind", "127.0.0.42",
                              "--insecure"], workdir,
                     env={"PATH": f"{bin_dir}:{os.environ.get('PATH', SYSTEM_PATH)}"})
    reaper.append(d)
    r = subprocess.run([sys.executable, "-m", "omuscd", "run", "--connect", d.socket, "--",
                        "/bin/echo", "ran"], capture_output=True, timeout=60, cwd="/tmp")
    assert (r.returncode, r.stdout) == (0, b"ran\n"), r.stderr
    assert d.json("status")["migration"].startswith("criu 4")  # found where it belongs
    assert not rec.exists(), rec.read_text()


def test_dead_node_loses_its_jobs_and_run_exits_124(cluster):
    lan, work, key, n = cluster
    p = popen(n["a"], "--node", "b", "--", "sh", "-c",
              "echo started; sleep 60 # omuscd-test-job")
    assert p.stdout is not None and p.stdout.readline() == b"started\n"
    n["b"].stop(signal.SIGKILL)
    killed = time.monotonic()
    _, err = p.communicate(timeout=15)
    took = time.monotonic() - killed
    assert p.returncode == 124, err
    assert b"lost: node b died" in err
    assert took <= 6.0 + 1.0
    lost = [j for j in n["a"].json("jobs")["jobs"] if j["state"] == "lost"]
    assert lost and "node b died" in lost[0]["reason"]
    subprocess.run(["pkill", "-f", "omuscd-test-job"], capture_output=True)
    n["b"] = start_daemon("b", ["--key-file", str(key), "--cpus", "0"], work, netns=lan.ns(1))
