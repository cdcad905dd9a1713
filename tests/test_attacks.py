"""Attacks by an ordinary local user on real daemons: each test is what that user would do,
and checks they gain nothing (see omuscd(8), SECURITY)."""

from __future__ import annotations

import os
import re
import socket
import subprocess

import pytest

from omuscd import config
from tests.cluster import (
    USERS_DUMP,
    namespace_cluster,
    omuscd_command,
    ordinary_user,
    start_daemon,
)
from tests.test_migration import REASON, job_of

CTL = 24271


def loopback_daemon(name: str, addr: str, workdir, reaper):
    key = workdir / "cluster.key"
    config.write_key(str(key))
    d = start_daemon(name, ["--address", addr, "--port", "24270", "--control-bind", addr,
                            "--control-port", str(CTL), "--key-file", str(key)], workdir)
    reaper.append(d)
    os.chmod(workdir, 0o755)  # other users may reach its control socket
    os.chmod(d.state_dir, 0o755)
    return d


# As the user: connect the TCP socket on fd ARGV[3] (made by someone else) to the control port
# and send an admin command through it.
CONNECT_GIVEN_SOCKET = r"""
import socket, sys
s = socket.socket(fileno=int(sys.argv[3]))
sys.stdin.readline()  # once the giver let go of it
s.connect((sys.argv[1], int(sys.argv[2])))
s.sendall(b"set gossip_interval 1.25\nquit\n")
got = b""
while chunk := s.recv(4096):
    got += chunk
print(got.decode().replace("\n", " | "), flush=True)
"""


def test_a_socket_made_by_root_and_held_by_a_user_has_the_users_rights(workdir, reaper):
    """The kernel's uid of a socket is its creator's: a socket root made and handed to a
    user (CRIU restores a moved job's sockets as root; a root program may open one, then
    become the user) must not give that user root's rights on the loopback control
    port.  Who holds the socket is who is asking."""
    d = loopback_daemon("sk", "127.0.0.61", workdir, reaper)
    with ordinary_user("sk") as user:
        made_by_root = socket.socket()
        fd = made_by_root.fileno()
        p = user.popen(["/usr/bin/python3", "-c", CONNECT_GIVEN_SOCKET, "127.0.0.61",
                        str(CTL), str(fd)], pass_fds=(fd,), stdin=subprocess.PIPE)
        made_by_root.close()  # the user's process alone holds it, as after a restore
        out, err = p.communicate(b"go\n", timeout=20)
    assert b"501 'set' is for root or the daemon's user" in out, (out, err)
    assert d.json("get gossip_interval") != {"gossip_interval": 1.25}


# As the user, in a job: a TCP socket made before the move, connected to the control port
# of whatever node the job is on once the flag exists; an admin command through it.
SOCKET_KEPT_OVER_A_MOVE = r"""
import os, socket, sys, time
s = socket.socket()
print("ready", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
s.connect(("127.0.0.1", 4271))
s.sendall(b"set gossip_interval 1.25\nquit\n")
got = b""
while chunk := s.recv(4096):
    got += chunk
print(got.decode().replace("\n", " | "), flush=True)
"""


@pytest.mark.netns
@pytest.mark.skipif(REASON is not None, reason=REASON or "")
def test_a_socket_restored_by_criu_does_not_lend_root_its_rights():
    """CRIU restores a job's sockets as root: a TCP socket the job made before it moved is
    root's for the kernel on the target.  Connected to the loopback control port there,
    it must still have only the job user's rights."""
    with namespace_cluster("ab", prefix=f"oma{os.getpid() % 10000}x", open_to_all=True,
                           extra=lambda i: ["--no-balancing"],  # only the user moves it
                           leftovers="omuscd-attack-test") as (_, _, _, n), \
            ordinary_user("as") as user:
        tag = "omuscd-attack-test-sock"
        flag = user.home / "go"
        p = user.popen(user.run_argv(n["a"].socket, "--home", "--", "/usr/bin/python3",
                                     "-c", SOCKET_KEPT_OVER_A_MOVE, str(flag), tag))
        assert p.stdout is not None
        assert p.stdout.readline().split() == [b"ready"]
        job = job_of(n["a"], tag)
        moved = user.run([user.python, "-m", "omuscd", "ctl", "--connect", n["a"].socket,
                          "migrate", job, "b"])  # its owner moves it
        if b"Can't get 1:16 opt" in moved.stdout + moved.stderr:
            pytest.skip("this CRIU cannot dump a TCP socket on this kernel (SO_PASSCRED is "
                        "refused for TCP since Linux 6.16; CRIU after 4.1 asks only Unix "
                        "sockets)")
        assert moved.returncode == 0 and b"migrated to b" in moved.stdout, moved
        before = n["b"].ctl("get gossip_interval").text
        flag.touch()
        out, err = p.communicate(timeout=60)
        assert b"501 'set' is for root or the daemon's user" in out, (out, err)
        assert n["b"].ctl("get gossip_interval").text == before


def test_what_root_sees_behind_a_closed_directory_is_not_told(workdir, reaper):
    """'omuscd run' checks the program and working directory before it starts a job; as
    root, that check sees through directories the user may not search.  Whether a file or
    a directory exists there must not show in the answers (the job's init, as the user,
    answers instead)."""
    d = loopback_daemon("cl", "127.0.0.62", workdir, reaper)
    closed = workdir / "closed"
    closed.mkdir(mode=0o700)
    (closed / "there").write_text("#!/bin/sh\n")
    os.chmod(closed / "there", 0o755)
    (closed / "dir").mkdir()
    with ordinary_user("cl") as user:
        def answer(*args: str, path: str = "/usr/bin:/bin") -> tuple[int, str]:
            r = user.run([user.python, "-m", "omuscd", *args], env={"PATH": path})
            said = (r.stdout + r.stderr).decode()
            return r.returncode, re.sub(r"job \S+", "job J", said).replace(
                "nothing", "X").replace("there", "X").replace("dir", "X")

        run = ["run", "--connect", d.socket, "--"]
        ctl = ["ctl", "--connect", d.socket, "run", "--cwd"]
        first = answer(*run, str(closed / "there"))
        assert "Permission denied" in first[1], first  # from the init, as the user
        assert first == answer(*run, str(closed / "nothing"))
        assert answer(*ctl, str(closed / "dir"), "--", "true") == \
            answer(*ctl, str(closed / "nothing"), "--", "true")
        assert answer(*run, "there", path=str(closed)) == \
            answer(*run, "nothing", path=str(closed))


# As the user, in a job: a file of theirs open for appending; written to once the flag
# exists (after the move).
APPENDER = r"""
import os, sys, time
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)
print("ready", flush=True)
while not os.path.exists(sys.argv[2]):
    time.sleep(0.05)
os.write(fd, b"written by the job\n")
print("written", flush=True)
"""
# As the user: once the first CRIU dump of their job from now on has ended, put a link to
# ARGV[2] where the directory ARGV[1] was.
SWAP_AFTER_DUMP = USERS_DUMP + r"""
dump = users_dump(lambda: print("watching", flush=True))
while os.path.exists(f"/proc/{dump}"):
    time.sleep(0.0005)
os.rename(sys.argv[1], sys.argv[1] + ".old")
os.symlink(sys.argv[2], sys.argv[1])
print("swapped", flush=True)
"""


@pytest.mark.netns
@pytest.mark.skipif(REASON is not None, reason=REASON or "")
def test_a_moved_job_reopens_only_what_its_user_could_open():
    """CRIU restores a moved job's open files by their path, as root.  The user may change
    what that path leads to between the dump and the restore (a directory of theirs made a
    link to a directory of root's): the restored job must not get a root file open for
    writing, which the user could not open.  The move fails (the restored copy is killed
    on the target) and the job resumes, intact, at the source."""
    with namespace_cluster("ab", prefix=f"omf{os.getpid() % 10000}x", open_to_all=True,
                           extra=lambda i: ["--no-balancing"],  # only the user moves it
                           leftovers="omuscd-attack-test") as (_, work, _, n), \
            ordinary_user("fs") as user:
        roots = work / "roots"
        roots.mkdir(mode=0o755)
        target = roots / "f"
        target.write_bytes(b"root's own file\n")
        os.chmod(target, 0o644)
        mine = user.home / "d"
        user.run(["/bin/sh", "-c", f"mkdir {mine} && printf 'a user file....\\n' > {mine}/f"])
        assert (mine / "f").stat().st_size == target.stat().st_size
        flag = user.home / "go"
        tag = "omuscd-attack-test-file"
        p = user.popen(user.run_argv(n["a"].socket, "--home", "--", "/usr/bin/python3",
                                     "-c", APPENDER, str(mine / "f"), str(flag), tag))
        assert p.stdout is not None and p.stdout.readline().split() == [b"ready"]
        job = job_of(n["a"], tag)
        swapper = user.popen(["/usr/bin/python3", "-c", SWAP_AFTER_DUMP, str(mine),
                              str(roots)])
        assert swapper.stdout is not None
        assert swapper.stdout.readline() == b"watching\n"  # it scans /proc already
        moved = user.run([user.python, "-m", "omuscd", "ctl", "--connect", n["a"].socket,
                          "migrate", job, "b"])
        assert swapper.communicate(timeout=10)[0] == b"swapped\n"
        assert moved.returncode == 5, moved
        assert b"the restored job holds what" in moved.stderr, moved
        assert f"{target} is not {user.name}'s to open (w)".encode() in moved.stderr, moved
        assert n["a"].json(f"job {job}")["node_name"] == "a"  # resumed at the source
        flag.touch()
        out, err = p.communicate(timeout=30)
        assert (p.returncode, out, err) == (0, b"written\n", b"")
        assert target.read_bytes() == b"root's own file\n"
        assert (mine.parent / "d.old" / "f").read_bytes().endswith(b"written by the job\n")


def test_a_state_directory_a_user_made_is_refused(workdir):
    """Root following the README (``--state-dir /tmp/n2``) where a user made /tmp/n2 first,
    or one inside a directory others may write: the user would own what the daemon keeps
    (they could put images of their making where CRIU restores from).  The daemon exits 1,
    naming the directory, and creates nothing there."""
    os.chmod(workdir, 0o1777)  # as /tmp
    with ordinary_user("sd") as user:
        theirs = workdir / "n2"
        assert user.run(["/bin/mkdir", "-m", "0755", str(theirs)]).returncode == 0
        shared = workdir / "shared"
        shared.mkdir()
        os.chmod(shared, 0o777)  # writable by all, not sticky
        for state, named in ((theirs, f"{theirs} belongs to uid {user.uid}"),
                             (shared / "n3", f"{shared}, above it, belongs to uid 0 "
                                             "(mode 777)")):
            r = subprocess.run(omuscd_command(["--insecure", "--address", "127.0.0.63",
                                               "--control-bind", "127.0.0.63",
                                               "--state-dir", str(state)]),
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 1 and named in r.stderr, r
            assert list(state.iterdir()) == []


# As the user: hold NUM sessions on HOST:PORT from each of the source addresses given,
# until stdin closes; say how many the daemon let in.
HOLD_SESSIONS = r"""
import socket, sys
host, port, num, *sources = sys.argv[1:]
held = []
for src in sources:
    for _ in range(int(num)):
        s = socket.socket()
        s.bind((src, 0))
        s.connect((host, int(port)))
        if s.recv(4096).startswith(b"220"):
            held.append(s)
print(len(held), flush=True)
sys.stdin.read()
"""


def test_unidentified_loopback_sessions_share_one_allowance(workdir, reaper):
    """Unidentified TCP sessions are counted by address; on loopback every 127.x.y.z is a
    source a local user may bind.  With a control password (every TCP session starts
    unidentified) one user connecting from four of them filled every shared session, and
    another user's 'omuscd ctl' on the Unix socket was refused."""
    key = workdir / "cluster.key"
    secret = workdir / "pw.secret"
    config.write_key(str(key))
    config.write_key(str(secret))
    d = start_daemon("lo", ["--address", "127.0.0.64", "--port", "24270", "--control-bind",
                            "127.0.0.64", "--control-port", str(CTL), "--key-file", str(key),
                            "--control-secret", str(secret)], workdir)
    reaper.append(d)
    os.chmod(workdir, 0o755)
    os.chmod(d.state_dir, 0o755)
    with ordinary_user("ho") as hog, ordinary_user("ot") as other:
        holder = hog.popen(["/usr/bin/python3", "-c", HOLD_SESSIONS, "127.0.0.64", str(CTL),
                            "64", "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"],
                           stdin=subprocess.PIPE)
        assert holder.stdout is not None
        assert int(holder.stdout.readline()) == 64  # one allowance for them all
        r = other.run([other.python, "-m", "omuscd", "ctl", "--connect", d.socket, "nodes"])
        holder.communicate(b"", timeout=20)
    assert r.returncode == 0, r


# As the user: hold NUM connections to HOST:PORT for a while; say how many were accepted
# and then still open (not closed at once by the daemon).
HOLD_CONNECTIONS = r"""
import socket, sys, time
host, port, num = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = [socket.create_connection((host, port)) for _ in range(num)]
time.sleep(1)
open_ = 0
for s in held:
    s.setblocking(False)
    try:
        open_ += s.recv(1) != b""
    except BlockingIOError:
        open_ += 1
print(open_, flush=True)
sys.stdin.read()
"""


def test_unauthenticated_cluster_connections_are_bounded(workdir, reaper):
    """Anyone may connect to the cluster port; a connection is held until it answers the
    key's challenge or a timeout.  A local user holding thousands ran the daemon out of
    descriptors (it then could start no job and open no control session); now only a
    few may wait at once from one address, all of loopback counting as one."""
    d = loopback_daemon("cc", "127.0.0.65", workdir, reaper)
    with ordinary_user("cc") as user:
        holder = user.popen(["/usr/bin/python3", "-c", HOLD_CONNECTIONS, "127.0.0.65",
                             "24270", "900"], stdin=subprocess.PIPE)
        assert holder.stdout is not None
        held = int(holder.stdout.readline())
        fds = len(os.listdir(f"/proc/{d.popen.pid}/fd"))
        holder.communicate(b"", timeout=20)
    assert held <= 64, held
    assert fds < 200, fds
    assert d.ctl("status").ok


# As the user, in a job: a Unix socket bound at ARGV[1], listening until killed.
BINDER = r"""
import socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1])
s.listen(1)
print("bound", flush=True)
time.sleep(600)
"""


@pytest.mark.netns
@pytest.mark.skipif(REASON is not None, reason=REASON or "")
def test_a_socket_bound_where_its_user_could_redirect_is_refused_before_the_freeze():
    """CRIU binds a restored Unix socket again at its path, as root.  A socket in a
    directory of the user's could be sent anywhere by making that directory a link
    between the dump and the restore (root would create the socket file in, say, /etc):
    such a job is refused before it is frozen, with the reason shown beforehand."""
    with namespace_cluster("ab", prefix=f"omu{os.getpid() % 10000}x", open_to_all=True,
                           extra=lambda i: ["--no-balancing"],
                           leftovers="omuscd-attack-test") as (_, _, _, n), \
            ordinary_user("ub") as user:
        sock = user.home / "d" / "sock"
        user.run(["/bin/mkdir", str(sock.parent)])
        tag = "omuscd-attack-test-bind"
        p = user.popen(user.run_argv(n["a"].socket, "--home", "--", "/usr/bin/python3",
                                     "-c", BINDER, str(sock), tag))
        try:
            assert p.stdout is not None and p.stdout.readline() == b"bound\n"
            job = job_of(n["a"], tag)
            shown = n["a"].json(f"job {job}")["cannot_move"]
            assert f"Unix socket bound at {sock}" in shown, shown
            moved = n["a"].ctl(f"migrate {job} b")
            assert moved.code == 500 and f"bound at {sock}" in moved.text, moved
            assert "resumed" not in moved.text  # refused before anything was frozen
            assert "frozen" not in n["a"].log().split(f"job {job}", 1)[-1]
            view = n["a"].json(f"job {job}")
            assert view["state"] == "running" and view["node_name"] == "a"
        finally:
            p.kill()
            p.wait()
