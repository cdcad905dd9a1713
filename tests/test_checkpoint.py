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
    Reference,
    as_user,
    criu_problem,
    namespace_cluster,
    ordinary_user,
    run_job,
    start_daemon,
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


def extra(i: int) -> list[str]:
    """Node a has no CRIU (a login node): its jobs are checkpointed where they run and
    kept at a, and restored elsewhere; b and c have CRIU."""
    return ["--no-balancing", *(["--criu", "/nonexistent/criu"] if i == 0 else [])]


@pytest.fixture(scope="module")
def cluster():
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
        ref = Reference([*argv, str(ref_file), lines, f"{tag}-plain"], ends=b"done\n")
        p = run_job(n[home], ["--node", "b", "--checkpoint-every", "5s"], *argv, str(file),
                    lines, tag)
    else:
        ref = Reference([*argv, str(ref_file), lines, f"{tag}-plain"], user=user,
                        ends=b"done\n")
        p = user.popen(user.run_argv(n[home].socket, "--node", "b", "--checkpoint-every", "5s",
                                     "--", *argv, str(file), lines, tag))
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
    assert not (n[home].state_dir / "spool" / view["id"] / "checkpoints").exists()
    return str(view["node_name"])


def restart(cluster, names: str = "b", switches=extra) -> None:
    """Start the daemons ``names`` again (after a crash or a stop), as they were
    (``switches``: the cluster's ``extra``)."""
    lan, work, key, n = cluster
    for name in names:
        i = "abc".index(name)
        n[name] = start_daemon(name, ["--key-file", str(key), *switches(i)], work,
                               netns=lan.ns(i))
        os.chmod(n[name].state_dir, 0o755)
    for d in n.values():
        wait_for(lambda d=d: len(d.nodes()) == 2 and
                 all(x["state"] == "alive" for x in d.nodes().values()), 20,
                 f"{names} to be back")


def test_a_roots_job_survives_the_death_of_its_node(cluster, tmp_path):
    """Homed on a (no CRIU there): restored on c, the one node that can take it."""
    try:
        assert survives(cluster, tmp_path, "omuscd-ckpt-test-root", "a") == "c"
    finally:
        restart(cluster)


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
            restart(cluster)


def ctl(node, *words: str, user=None) -> subprocess.CompletedProcess[bytes]:
    argv = ["-m", "omuscd", "ctl", "--connect", node.socket, *words]
    if user is None:
        return subprocess.run([PY, *argv], capture_output=True, timeout=120)
    return user.run([user.python, *argv])


def test_checkpoint_on_demand_for_its_owner_only_the_last_two_kept(cluster):
    _, _, _, n = cluster
    tag = "omuscd-ckpt-test-demand"
    r = subprocess.run([PY, "-m", "omuscd", "run", "--connect", n["c"].socket, "--node", "b",
                        "--detach", "--", "sh", "-c",
                        f"while :; do echo tick; sleep 0.2; done; : {tag}"],
                       capture_output=True, cwd="/tmp", timeout=60)
    job = r.stdout.decode().strip()
    store = n["c"].state_dir / "spool" / job / "checkpoints"
    try:
        wait_for(lambda: job_view(n["c"], tag).get("state") == "running", 10, "the job")
        time.sleep(1)  # started: its init leads its session
        with ordinary_user("ckd") as user:
            other = ctl(n["c"], "checkpoint", job, user=user)
            assert other.returncode != 0 and b"belongs to root" in other.stderr, other
            other = ctl(n["c"], "checkpoint", "--stop", job, user=user)
            assert other.returncode != 0 and b"belongs to root" in other.stderr, other
            assert not store.exists()
            assert job_view(n["c"], tag)["state"] == "running"
        for bad in ("../" + job, f"{job}/..", "1.1/../../x"):
            r = n["c"].ctl(f"checkpoint {bad}")
            assert r.code == 401, (bad, r)
        assert n["c"].ctl("checkpoint --stop --exit " + job).code == 401
        assert n["c"].ctl("checkpoint").code == 401  # a job, or --all
        for _ in range(3):
            r = n["c"].ctl(f"checkpoint {job}")
            assert r.code == 200 and f"job {job} checkpointed on b" in r.text, r
        assert sorted(os.listdir(store)) == ["2", "3"]
        assert oct(store.stat().st_mode & 0o777) == "0o700" and store.stat().st_uid == 0
        view = n["c"].json(f"job {job}")
        assert view["checkpoint"]["seq"] == 3 and view["state"] == "running", view
        listing = n["a"].ctl("jobs").text  # the same from any node
        row = next(ln for ln in listing.splitlines() if ln.startswith(job))
        assert "CKPT" in listing and "/" in row.split()[9], listing
        # a node without CRIU cannot checkpoint the jobs it runs: refused, with why
        r = subprocess.run([PY, "-m", "omuscd", "run", "--connect", n["a"].socket, "--home",
                            "--detach", "--", "sleep", "30"], capture_output=True,
                           cwd="/tmp", timeout=60)
        here = r.stdout.decode().strip()
        time.sleep(0.5)
        r = n["a"].ctl(f"checkpoint {here}")
        assert r.code == 500 and "migration is off" in r.text, r
        n["a"].ctl(f"kill {here} KILL")
        bad = subprocess.run([PY, "-m", "omuscd", "run", "--connect", n["c"].socket,
                              "--checkpoint-every", "0", "--", "true"], capture_output=True)
        assert bad.returncode == 2 and b"between 1s and 30 days" in bad.stderr, bad
        r = n["c"].ctl("run --checkpoint-every 1x --cwd /tmp -- true")
        assert r.code == 401 and "not a duration" in r.text, r
    finally:
        n["c"].ctl(f"kill {job} KILL")


def test_stop_and_resume_across_a_restart_of_every_daemon(cluster, tmp_path):
    """checkpoint --all --stop, every daemon stopped and started again, resume --all:
    a root's and a user's job carry on, the output and appended files as uninterrupted."""
    _, _, _, n = cluster
    lines = "120"
    argv = ["/usr/bin/python3", "-c", APPENDER]
    with ordinary_user("ckr") as user:
        work = user.home / "w"
        as_user(user.uid, lambda: work.mkdir())
        ref = Reference([*argv, str(tmp_path / "ref"), lines, "omuscd-ckpt-test-maint-p"],
                        ends=b"done\n")
        root_file, user_file = tmp_path / "root-out", work / "user-out"
        p_root = run_job(n["c"], ["--node", "b"], *argv, str(root_file), lines,
                         "omuscd-ckpt-test-maint-r")
        p_user = user.popen(user.run_argv(n["c"].socket, "--node", "b", "--", *argv,
                                          str(user_file), lines, "omuscd-ckpt-test-maint-u"))
        for tag in ("omuscd-ckpt-test-maint-r", "omuscd-ckpt-test-maint-u"):
            wait_for(lambda tag=tag: job_view(n["c"], tag).get("state") == "running", 10,
                     "the jobs")
        time.sleep(2)
        jobs = {tag: job_view(n["c"], tag)["id"]
                for tag in ("omuscd-ckpt-test-maint-r", "omuscd-ckpt-test-maint-u")}
        # a user's --all stops only their own job
        mine = ctl(n["c"], "checkpoint", "--all", "--stop", user=user)
        assert mine.returncode == 0 and jobs["omuscd-ckpt-test-maint-u"].encode() in mine.stdout
        assert jobs["omuscd-ckpt-test-maint-r"].encode() not in mine.stdout, mine
        assert job_view(n["c"], "omuscd-ckpt-test-maint-r")["state"] == "running"
        assert ctl(n["c"], "checkpoint", "--all", "--stop").returncode == 0
        for tag in jobs:
            view = job_view(n["c"], tag)
            assert view["state"] == "checkpointed" and view["node_name"] == "c", view
        assert p_root.poll() is None and p_user.poll() is None  # they wait
        for d in (n["b"], n["c"]):  # they run nowhere: no node counts them
            wait_for(lambda d=d: d.json("nodes")["nodes"][0]["jobs"] == 0, 10,
                     f"{d.name} to count no job")
        sizes = (root_file.stat().st_size, user_file.stat().st_size)
        time.sleep(1)
        assert (root_file.stat().st_size, user_file.stat().st_size) == sizes  # stopped
        for d in n.values():
            d.stop()
        assert p_root.wait(10) == 123 and p_user.wait(10) == 123  # lost their daemon
        restart(cluster, "abc")
        for tag in jobs:
            assert job_view(n["c"], tag)["state"] == "checkpointed"
        other = ctl(n["c"], "resume", jobs["omuscd-ckpt-test-maint-r"], user=user)
        assert other.returncode != 0 and b"belongs to root" in other.stderr
        assert job_view(n["c"], "omuscd-ckpt-test-maint-r")["state"] == "checkpointed"
        r = ctl(n["c"], "resume", "--all")
        assert r.returncode == 0 and r.stdout.count(b"resumed on") == 2, r
        out = subprocess.run([PY, "-m", "omuscd", "attach", "--connect", n["c"].socket,
                              jobs["omuscd-ckpt-test-maint-r"]], capture_output=True, timeout=90)
        assert out.returncode == 0 and out.stdout == ref.stdout, out.stderr
        out = user.run([user.python, "-m", "omuscd", "attach", "--connect", n["c"].socket,
                        jobs["omuscd-ckpt-test-maint-u"]])
        assert out.returncode == 0 and out.stdout == ref.stdout, out.stderr
        assert root_file.read_bytes() == user_file.read_bytes() == (tmp_path / "ref").read_bytes()


def test_a_job_at_its_home_goes_back_to_its_checkpoint_when_the_home_starts_again(cluster,
                                                                                  tmp_path):
    """The home is the machine that lost power, with the job on it: when its daemon
    starts again, the job goes on from its last checkpoint; attach shows every byte once."""
    lan, _, _, n = cluster
    tag, lines = "omuscd-ckpt-test-homedies", "120"
    argv = ["/usr/bin/python3", "-c", APPENDER]
    ref = Reference([*argv, str(tmp_path / "ref"), lines, f"{tag}-plain"], ends=b"done\n")
    file = tmp_path / "out"
    p = run_job(n["c"], ["--home", "--checkpoint-every", "3s"], *argv, str(file), lines, tag)
    wait_for(lambda: checkpoint_taken(n["c"], tag), 20, "a checkpoint of the job")
    job = job_view(n["c"], tag)["id"]
    time.sleep(1)
    power_off(lan, n, "c")
    assert p.wait(10) == 123
    restart(cluster, "c")
    out = subprocess.run([PY, "-m", "omuscd", "attach", "--connect", n["c"].socket, job],
                         capture_output=True, timeout=90)
    assert out.returncode == 0 and out.stdout == ref.stdout, out.stderr
    assert file.read_bytes() == (tmp_path / "ref").read_bytes()
    view = n["c"].json(f"job {job}")
    assert view["revived"] == 1 and view["state"] == "exited", view


def resumed_exactly(home, job: str, where: str, out: bytes, file: Path, ref: Path) -> None:
    """``resume JOB WHERE`` at its home, then ``attach``: the output (``out``) and the file
    it appends to (``ref``) are those of an uninterrupted run."""
    r = home.ctl(f"resume {job} {where}")
    assert r.code == 200 and f"resumed on {where}" in r.text, r
    got = subprocess.run([PY, "-m", "omuscd", "attach", "--connect", home.socket, job],
                         capture_output=True, timeout=90)
    assert got.returncode == 0 and got.stdout == out, got.stderr
    assert file.read_bytes() == ref.read_bytes()


def test_exit_then_resume_on_a_named_node_and_a_signal_for_a_checkpointed_job(cluster,
                                                                             tmp_path):
    _, _, _, n = cluster
    tag, lines = "omuscd-ckpt-test-exit", "100"
    argv = ["/usr/bin/python3", "-c", APPENDER]
    ref = Reference([*argv, str(tmp_path / "ref"), lines, f"{tag}-plain"], ends=b"done\n")
    file = tmp_path / "out"
    p = run_job(n["c"], ["--node", "b"], *argv, str(file), lines, tag)
    wait_for(lambda: job_view(n["c"], tag).get("state") == "running", 10, "the job")
    job = job_view(n["c"], tag)["id"]
    time.sleep(1.5)
    assert "not checkpointed" in n["c"].ctl(f"resume {job}").text
    r = n["c"].ctl(f"checkpoint --exit {job}")
    assert r.code == 200 and "ended: 'resume" in r.text, r
    _, err = p.communicate(timeout=20)
    assert p.returncode == 123 and b"checkpointed and ended" in err, err
    assert job_view(n["c"], tag)["state"] == "checkpointed"
    resumed_exactly(n["c"], job, "b", ref.stdout, file, tmp_path / "ref")
    # a job with its input from omuscd run cannot be checkpointed; a stopped one killed
    r = n["c"].ctl("run --node b --stdin --cwd /tmp --json -- sleep 30")
    stdin_job = r.json()["job"]
    time.sleep(1)
    r = n["c"].ctl(f"checkpoint {stdin_job}")
    assert r.code == 500 and "standard input" in r.text, r
    n["c"].ctl(f"kill {stdin_job} KILL")
    r = subprocess.run([PY, "-m", "omuscd", "run", "--connect", n["c"].socket, "--node", "b",
                        "--detach", "--", "sleep", "60"], capture_output=True, cwd="/tmp")
    sleeper = r.stdout.decode().strip()
    time.sleep(1)
    assert n["c"].ctl(f"checkpoint --stop {sleeper}").code == 200
    store = n["c"].state_dir / "spool" / sleeper / "checkpoints"
    assert store.exists()
    r = n["c"].ctl(f"kill {sleeper} TERM")
    assert r.code == 200 and "ended with signal 15" in r.text, r
    view = n["c"].json(f"job {sleeper}")
    assert view["state"] == "exited" and view["status"] == "killed by signal 15", view
    assert not store.exists()


def test_the_tunable_checkpoints_jobs_started_afterwards(cluster):
    _, _, _, n = cluster
    tag = "omuscd-ckpt-test-tunable"
    assert n["c"].ctl("set checkpoint_every 2").ok
    try:
        r = subprocess.run([PY, "-m", "omuscd", "run", "--connect", n["c"].socket, "--node",
                            "b", "--detach", "--", "sh", "-c", f"sleep 60; : {tag}"],
                           capture_output=True, cwd="/tmp", timeout=60)
    finally:
        assert n["c"].ctl("set checkpoint_every 0").ok
    job = r.stdout.decode().strip()
    try:
        wait_for(lambda: checkpoint_taken(n["c"], tag), 20, "a checkpoint by the tunable")
        assert n["c"].json(f"job {job}")["checkpoint_every"] == 2
    finally:
        said = n["c"].ctl(f"kill {job} KILL")
    # killed (held while a checkpoint runs: delivered when it ends), never lost
    try:
        wait_for(lambda: n["c"].json(f"job {job}")["state"] == "exited", 20,
                 f"the job to end on its SIGKILL ({said.text!r})")
    except AssertionError:
        for name in "cb":
            print(f"--- {name}\n" + "\n".join(
                ln for ln in n[name].log().splitlines() if f"job {job}" in ln)[-3000:])
        raise
    assert n["c"].ctl("set checkpoint_every -1").code != 200  # bounded
