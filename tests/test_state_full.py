"""A full state filesystem: the job's output is cut, and 'omuscd run' must say so.

The daemon runs on a 512 KiB tmpfs mounted as its state directory in a mount namespace
of its own (gone with the daemon, nothing left mounted); its control socket lives outside,
where the client reaches it.  The job writes 3 MB and, like many programs, ignores the
failed writes: before, 'omuscd run' exited 0 with a sixth of the output and no word.
"""

from __future__ import annotations

import os
import shlex
import subprocess

import pytest

from omuscd import runclient
from tests.cluster import PYTHON, wait_for

ADDR, PORT, CTL = "127.0.0.61", 24670, 24671


def _can_mount() -> str | None:
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root"
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "true"],
                       capture_output=True)
    return None if r.returncode == 0 else "no mount namespaces here"


pytestmark = pytest.mark.skipif(_can_mount() is not None, reason=str(_can_mount()))


@pytest.fixture
def full_node(workdir):
    """A daemon whose state directory is a 512 KiB tmpfs; yields its socket path."""
    state, sock = workdir / "state", workdir / "ctl.sock"
    state.mkdir()
    daemon = [PYTHON, "-m", "omuscd", "--address", ADDR, "--port", str(PORT),
              "--control-bind", ADDR, "--control-port", str(CTL), "--state-dir", str(state),
              "--control-socket", str(sock), "--node-name", "full"]
    script = (f"mount -t tmpfs -o size=512k,mode=0755 omuscd-test {shlex.quote(str(state))} && "
              f"exec {shlex.join(daemon)}")
    log = open(workdir / "full.log", "wb")
    p = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
                          script], stdout=log, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL)
    log.close()
    try:
        wait_for(lambda: p.poll() is None and sock.exists(), 15, "the daemon on a tmpfs")
        yield str(sock), p
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def run_job(sock: str, command: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([PYTHON, "-m", "omuscd", "run", "--home", "--connect", sock, "--",
                           "sh", "-c", command], capture_output=True, timeout=60)


def test_full_state_filesystem_is_told_with_its_own_exit_status(full_node, workdir):
    sock, daemon = full_node
    # 3 MB into 512 KiB; 'true': the job itself ends well, as one ignoring errors would
    r = run_job(sock, "head -c 3000000 /dev/zero | tr '\\0' x; true")
    err = r.stderr.decode()
    assert r.returncode == runclient.EXIT_OUTPUT_CUT == 122, err
    assert len(r.stdout) < 3000000  # it was cut...
    assert "output incomplete" in err and "state filesystem of node full" in err  # ...and said
    assert "is full" in err and "the job itself: exit 0" in err
    assert "its output may be cut short" in (workdir / "full.log").read_text()
    assert daemon.poll() is None  # the daemon runs on


def test_a_job_that_fits_exits_with_its_own_status(full_node):
    sock, _ = full_node
    r = run_job(sock, "echo hello; exit 3")
    assert (r.returncode, r.stdout, r.stderr) == (3, b"hello\n", b"")
