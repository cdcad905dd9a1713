"""Checkpoints with real CRIU between real daemons in network namespaces: taken while the
job runs, kept at its home, and a job whose node loses power (every process in its
namespace SIGKILLed) finishing elsewhere from its last one, its output and the file it
appends to byte for byte those of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cluster import (
    criu_problem,
    namespace_cluster,
    ordinary_user,
    wait_for,
)

REASON = criu_problem()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

PY = sys.executable
# Deterministic: each line printed and appended to a file (argv[1]), N lines (argv[2]),
# a twentieth of a second apart
APPENDER = """
import sys, time
with open(sys.argv[1], "a") as f:
    for i in range(int(sys.argv[2])):
        line = f"{i} {i * i % 9973}\\n"
        f.write(line)
        f.flush()
        print(line, end="", flush=True)
        time.sleep(0.05)
print("done", flush=True)
"""


@pytest.fixture(scope="module")
def cluster():
    """Node a has no CRIU (a login node): its jobs are checkpointed where they run and
    kept at a, and restored elsewhere; b and c have CRIU."""
    def extra(i: int) -> list[str]:
        return ["--no-balancing", *(["--criu", "/nonexistent/criu"] if i == 0 else [])]

    with namespace_cluster("abc", extra=extra, prefix=f"omk{os.getpid() % 10000}x",
                           open_to_all=True, leftovers="omuscd-ckpt-test") as c:
        n = c[3]
        assert not n["a"].json("status")["migration"].startswith("criu")
        for d in (n["b"], n["c"]):
            assert d.json("status")["migration"].startswith("criu 4"), d.json("status")
        yield c


def netns_pids(ns: str) -> list[int]:
    """Every process in the network namespace ``ns`` (its daemon, its jobs)."""
    want = os.stat(f"/run/netns/{ns}").st_ino
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}/ns/net").st_ino == want:
                found.append(int(pid))
        except OSError:
            continue
    return found


def power_off(lan, n, name: str) -> None:
    """The machine ``name`` loses power: every process in its namespace is SIGKILLed."""
    ns = lan.ns("abc".index(name))
    victims = netns_pids(ns)
    assert n[name].popen.pid in victims
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    n[name].popen.wait()


def job_view(node, marker: str) -> dict:
    for j in node.json("jobs --all")["jobs"]:
        if marker in j["command"]:
            return j
    return {}


def checkpoint_taken(node, marker: str) -> bool:
    return bool(job_view(node, marker).get("checkpoint"))


def survives(cluster, tmp: Path, tag: str, home: str, user=None) -> str:
    """The survival scenario: a job homed on ``home``, run on b, checkpointed every 5 s;
    b loses power after its first checkpoint; the job ends elsewhere exactly as a run
    alone.  Where it ended."""
    lan, _, _, n = cluster
    lines = "160"
    ref_file, file = tmp / "ref.txt", tmp / "appended.txt"
    argv = ["/usr/bin/python3", "-c", APPENDER]
    if user is None:
        ref = subprocess.run([*argv, str(ref_file), lines, tag], capture_output=True,
                             timeout=60)
        p = subprocess.Popen([PY, "-m", "omuscd", "run", "--connect", n[home].socket,
                              "--node", "b", "--checkpoint-every", "5s", "--", *argv,
                              str(file), lines, tag], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, cwd="/tmp")
    else:
        ref = user.run([*argv, str(ref_file), lines, tag])
        p = user.popen(user.run_argv(n[home].socket, "--node", "b", "--checkpoint-every", "5s",
                                     "--", *argv, str(file), lines, tag))
    assert ref.returncode == 0 and ref.stdout.endswith(b"done\n")
    wait_for(lambda: job_view(n[home], tag) or p.poll() is not None, 10, "the job to start")
    assert p.poll() is None, p.communicate()
    wait_for(lambda: checkpoint_taken(n[home], tag), 20, "a checkpoint of the job")
    view = job_view(n[home], tag)
    assert view["node_name"] == "b" and view["checkpoint"]["size"] > 0, view
    time.sleep(1.5)  # output and appended lines after the checkpoint, to be undone
    power_off(lan, n, "b")
    try:
        out, err = p.communicate(timeout=90)
    finally:
        p.kill()
    assert p.returncode == 0, err
    assert out == ref.stdout
    assert file.read_bytes() == ref_file.read_bytes()
    assert b"went back to its checkpoint of" in err, err
    view = job_view(n[home], tag)
    assert view["state"] == "exited" and view["node_name"] != "b" and view["revived"] == 1, \
        view
    return str(view["node_name"])


def restart_b(cluster) -> None:
    from tests.cluster import start_daemon

    lan, work, key, n = cluster
    n["b"] = start_daemon("b", ["--key-file", str(key), "--no-balancing"], work,
                          netns=lan.ns(1))
    os.chmod(n["b"].state_dir, 0o755)
    for d in (n["a"], n["c"]):
        wait_for(lambda d=d: all(x["state"] == "alive" for x in d.nodes().values()), 20,
                 "b to be back")


def test_a_roots_job_survives_the_death_of_its_node(cluster, tmp_path):
    """Homed on a (no CRIU there): restored on c, the one node that can take it."""
    try:
        assert survives(cluster, tmp_path, "omuscd-ckpt-test-root", "a") == "c"
    finally:
        restart_b(cluster)


def test_an_ordinary_users_job_survives_the_death_of_its_node(cluster):
    with ordinary_user("ck") as user:
        tmp = user.home / "work"
        tmp.mkdir()
        os.chown(tmp, user.uid, user.gid)
        n = cluster[3]
        assert n["c"].ctl("block a").ok
        try:  # homed on c, a blocked: restored at its home
            assert survives(cluster, tmp, "omuscd-ckpt-test-user", "c", user) == "c"
        finally:
            n["c"].ctl("noblock a")
            restart_b(cluster)
