"""Attacks by an ordinary local user on real daemons: each test is what that user would do,
and checks they gain nothing (see omuscd(8), SECURITY)."""

from __future__ import annotations

import os
import re
import socket
import subprocess

import pytest

from omuscd import config
from tests.cluster import namespace_cluster, ordinary_user, start_daemon
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
