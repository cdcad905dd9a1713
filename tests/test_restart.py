"""A home daemon that restarts knows its jobs again: the ones running on it and the ones
running elsewhere, from the records it keeps beside their output (namespace cluster)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.cluster import can_netns, namespace_cluster, start_daemon, wait_for

REASON = can_netns()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(REASON is not None, reason=REASON or "")]
PY = sys.executable
MARK = "omuscd-restart-test"


@pytest.fixture
def cluster():
    with namespace_cluster("ab", prefix=f"omr{os.getpid() % 10000}x", leftovers=MARK) as c:
        yield c


def detach(node, where: str, script: str) -> str:
    r = subprocess.run([PY, "-m", "omuscd", "run", "--connect", node.socket, where,
                        "--detach", "--", "sh", "-c", script, MARK],
                       capture_output=True, text=True, cwd="/tmp")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def restart(lan, work, nodes, name: str, index: int) -> None:
    old = nodes[name]
    assert old.stop() == 0
    nodes[name] = start_daemon(name, old.args[:-4], work, netns=lan.ns(index))


def ended(node, job: str) -> dict:
    wait_for(lambda: node.json(f"job {job}")["state"] in ("exited", "lost"), 30,
             f"job {job} to end")
    return node.json(f"job {job}")


def test_restarted_home_keeps_its_local_and_remote_jobs(cluster):
    lan, work, _, n = cluster
    here = detach(n["a"], "--home", "sleep 3; echo here-done")
    there = detach(n["a"], "--node=b", "echo before; sleep 4; echo there-done; exit 3")
    wait_for(lambda: "before" in n["a"].ctl(f"output {there}").text, 5, "its first line")
    restart(lan, work, n, "a", 0)
    # known again at once, as running, on the same nodes
    views = {j["id"]: j for j in n["a"].json("jobs")["jobs"]}
    assert views[here]["state"] == "running" and views[here]["node_name"] == "a"
    assert views[there]["state"] == "running" and views[there]["node"] == n["b"].json(
        "status")["id"]
    assert f"jobs of this node from before the restart: {here}, {there}" in n["a"].log()
    # and their ends, output included, come home as before
    assert ended(n["a"], here)["status"] == "exit 0"
    assert ended(n["a"], there)["status"] == "exit 3"
    assert "here-done" in n["a"].ctl(f"output {here}").text
    out = n["a"].ctl(f"output {there}").text.splitlines()
    assert out.count("stdout: before") == 1 and "stdout: there-done" in out, out


def test_a_job_that_ended_while_its_home_was_down(cluster):
    lan, work, _, n = cluster
    quick = detach(n["a"], "--home", "sleep 1; exit 5")
    old = n["a"]
    assert old.stop() == 0
    wait_for(lambda: subprocess.run(["pgrep", "-f", f"sleep 1; exit 5 {MARK}"],
                                    capture_output=True).returncode != 0, 10, "it to end")
    n["a"] = start_daemon("a", old.args[:-4], work, netns=lan.ns(0))
    view = ended(n["a"], quick)
    assert view["state"] == "exited" and view["status"] == "exit 5"


def test_a_restarted_node_takes_up_its_guest_again(cluster):
    lan, work, _, n = cluster
    job = detach(n["a"], "--node=b", "echo before; sleep 5; echo after; exit 4")
    wait_for(lambda: "before" in n["a"].ctl(f"output {job}").text, 5, "its first line")
    restart(lan, work, n, "b", 1)  # b says goodbye, its job runs on, b comes back
    assert job in n["b"].log().split("jobs of this node from before the restart: ")[1]
    view = ended(n["a"], job)
    assert view["state"] == "exited" and view["status"] == "exit 4", view
    out = n["a"].ctl(f"output {job}").text.splitlines()
    assert out.count("stdout: before") == 1 and "stdout: after" in out, out
