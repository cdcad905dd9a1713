"""A node cut off (not dead) while it runs a checkpointed job: its home declares it dead
and restores the job elsewhere from its checkpoint; the cut-off node's copy must not run
on beside it.  Real daemons in network namespaces, real CRIU; the cable is pulled by
setting the node's bridge port down, and plugged back in."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster import criu_problem, namespace_cluster, sh, wait_for
from tests.test_checkpoint import APPENDER, checkpoint_taken, extra, job_view

REASON = criu_problem()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

TAG = "omuscd-fence-test"


def copies(tag: str) -> list[int]:
    """The job's running processes, wherever (the command: /usr/bin/python3 with ``tag``;
    not the client, the job's init nor its launcher).  Jobs run in namespaces of their
    own: on which node is not seen here, only how many copies run."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _is_job(int(p), tag)]


def _is_job(pid: int, tag: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return argv[0] == b"/usr/bin/python3" and tag.encode() in argv


def _seen(tag: str) -> list[bytes]:
    found = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                line = f.read()
        except OSError:
            continue
        if tag.encode() in line or b"9973" in line:
            found.append(line[:60] + line[-200:])
    return found


def cable(lan, name: str, up: bool) -> None:
    """Plug node ``name``'s cable out (its bridge port down) or back in."""
    sh("ip", "-n", lan.bridge, "link", "set", f"v{'abc'.index(name)}",
       "up" if up else "down")


@pytest.fixture
def cluster():
    with namespace_cluster("abc", extra=extra, prefix=f"omf{os.getpid() % 10000}x",
                           leftovers=TAG) as c:
        yield c


def test_a_cut_off_node_does_not_run_a_revived_job_beside_its_new_copy(cluster, tmp_path: Path):
    """Homed on a (no CRIU), run on b with checkpoints; b's cable pulled until a declares
    b dead and restores the job on c; b plugged back in: b's copy is gone within seconds,
    only c's runs, and the output and the appended file are those of a plain run."""
    lan, _, _, n = cluster
    try:
        _scenario(lan, n, tmp_path)
    except BaseException:
        for name in "abc":  # what each daemon did with the job
            print(f"--- {name}\n" + "\n".join(
                line for line in n[name].log().splitlines()
                if "job" in line or "dead" in line or "alive" in line)[-4000:])
        raise


def _scenario(lan, n, tmp_path: Path) -> None:
    lines = "800"  # 40 s: b's copy, unfenced, would outlast the checks below
    ref_file, file = tmp_path / "ref.txt", tmp_path / "appended.txt"
    argv = ["/usr/bin/python3", "-c", APPENDER]
    ref = subprocess.run([*argv, str(ref_file), lines, TAG], capture_output=True, timeout=90)
    assert ref.returncode == 0 and ref.stdout.endswith(b"done\n")
    p = subprocess.Popen([sys.executable, "-m", "omuscd", "run", "--connect", n["a"].socket,
                          "--node", "b", "--checkpoint-every", "5s", "--", *argv, str(file),
                          lines, TAG], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd="/tmp")
    try:
        wait_for(lambda: checkpoint_taken(n["a"], TAG), 20, "a checkpoint of the job")
        assert job_view(n["a"], TAG)["node_name"] == "b"
        assert len(copies(TAG)) == 1, _seen(TAG)
        time.sleep(1.5)  # output and appended lines after the checkpoint
        cable(lan, "b", up=False)
        try:
            wait_for(lambda: job_view(n["a"], TAG).get("node_name") == "c", 40,
                     "the job to be revived on c")
            time.sleep(2)  # both would run meanwhile, without the fence
        finally:
            cable(lan, "b", up=True)
        plugged = time.monotonic()
        wait_for(lambda: len(copies(TAG)) <= 1, 8, "one copy of the job only")
        print(f"one copy {time.monotonic() - plugged:.1f}s after b was plugged back in")
        out, err = p.communicate(timeout=90)
    finally:
        p.kill()
        cable(lan, "b", up=True)
    assert p.returncode == 0, err
    assert out == ref.stdout
    # The file: every line of a plain run, in order, none cut.  Lines b's copy appended
    # between a's restore on c and b's fence (b may declare a dead a little after a
    # declares b dead) are not undone: see omuscd(8), CHECKPOINTS.
    got, want = file.read_bytes().splitlines(True), ref_file.read_bytes().splitlines(True)
    rest = iter(got)
    assert all(line in rest for line in want), (len(got), len(want))
    assert got[-1] == want[-1]
    print(f"stale lines in the file: {len(got) - len(want)}")
    assert b"went back to its checkpoint of" in err, err
    view = job_view(n["a"], TAG)
    # revived once (on c); or twice: b, heard again, may spread its stale word that c
    # is dead, and a believes it until c refutes it (SWIM): the job then went back to
    # its checkpoint once more, and c's copy was dropped as b's was
    assert view["state"] == "exited" and view["revived"] >= 1, view
    assert not copies(TAG)
    # b's record says why it stopped; a asks b to drop it once b is heard (nothing left)
    assert "stale copy" in n["b"].log() or "fenced" in n["b"].log(), n["b"].log()[-3000:]
