"""Every example in examples/ runs, against a real namespace cluster."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from omuscd import config
from tests.cluster import (
    can_netns,
    criu_problem,
    examples_lan,  # noqa: F401 (the "cluster" fixture)
    start_daemon,
    wait_for,
)

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
PY = sys.executable
NETNS = can_netns()
CRIU = criu_problem()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A copy of examples/ with timewaster built (the tree is not written to)."""
    d = tmp_path_factory.mktemp("examples")
    shutil.copytree(EXAMPLES, d, dirs_exist_ok=True)
    os.chmod(d, 0o755)
    subprocess.run(["make", "-s", "-C", str(d), "timewaster"], check=True)
    return d


def test_timewaster_c_and_python_agree(built):
    c = subprocess.run([str(built / "timewaster"), "-n", "300000", "-m", "2", "-p", "100000"],
                       capture_output=True, text=True, check=True).stdout
    py = subprocess.run([PY, str(built / "timewaster.py"), "-n", "300000", "-m", "2", "-p",
                         "100000"], capture_output=True, text=True, check=True).stdout
    assert c == py and c.count("\n") == 4 and c.splitlines()[-1].startswith("checksum ")
    timed = subprocess.run([str(built / "timewaster"), "-n", "10000000000", "-s", "0.3"],
                           capture_output=True, text=True, check=True, timeout=10)
    assert timed.stdout.startswith("checksum ")


def test_example_config_is_valid():
    cfg = config.merge({}, str(EXAMPLES / "omuscd.toml"))
    assert cfg.key_file == "/etc/omuscd.key"


def test_sd_notify_reports_ready_and_stopping(workdir, reaper):
    path = str(workdir / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        s.settimeout(15)
        d = start_daemon("n", ["--address", "127.0.0.40", "--control-bind", "127.0.0.40",
                               "--insecure"], workdir, env={"NOTIFY_SOCKET": path})
        reaper.append(d)
        assert s.recv(100) == b"READY=1"
        d.popen.send_signal(signal.SIGHUP)
        d.stop()
        got = [s.recv(100) for _ in range(1)]
        assert b"STOPPING=1" in got


def env_for(node) -> dict[str, str]:
    return {**os.environ, "OMUSCD_SOCKET": node.socket,
            "PYTHONPATH": str(EXAMPLES.parent)}


def in_ns(lan, i: int, *cmd: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", f"--net=/run/netns/{lan.ns(i)}", *cmd],
                          capture_output=True, text=True, timeout=90, **kw)


def test_overloaded_scripts(cluster, built):
    lan, n = cluster
    r = subprocess.run([PY, str(built / "overloaded.py"), "--threshold", "-1"],
                       capture_output=True, text=True, env=env_for(n["a"]))
    assert r.returncode == 0 and {ln.split()[0] for ln in r.stdout.splitlines()} == {"a", "b"}
    r = subprocess.run([PY, str(built / "overloaded.py"), "--threshold", "1000"],
                       capture_output=True, text=True, env=env_for(n["a"]))
    assert r.returncode == 1 and r.stdout == ""
    r = in_ns(lan, 0, "sh", str(built / "overloaded.sh"), "127.0.0.1", "4271", "-1")
    assert r.returncode == 0 and {ln.split()[0] for ln in r.stdout.splitlines()} == {"a", "b"}


def test_parallel_makefile(cluster, built):
    _, n = cluster
    omuscd = f"{PY} -m omuscd"
    r = subprocess.run(["make", "-s", "-C", str(built), "-f", "parallel.mk", "-j4", "TASKS=6",
                        "ITERATIONS=2000000", f"OMUSCD={omuscd}"], capture_output=True,
                       text=True, env=env_for(n["a"]), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "tasks done: 6" in r.stdout
    for i in range(1, 7):
        want = subprocess.run([str(built / "timewaster"), "-n", str(2000000 + i)],
                              capture_output=True, text=True).stdout
        assert (built / "out" / f"task{i}.txt").read_text() == want
    homes = {j["node_name"] for j in n["a"].json("jobs --all")["jobs"]
             if "timewaster" in j["command"]}
    assert homes == {"a", "b"}  # the cluster spread them


def test_pipeline_makefile(cluster, built):
    _, n = cluster
    r = subprocess.run(["make", "-s", "-C", str(built), "-f", "pipeline.mk", "N=1000",
                        f"OMUSCD={PY} -m omuscd"], capture_output=True, text=True,
                       env=env_for(n["a"]), timeout=120)
    assert r.returncode == 0, r.stderr
    assert (built / "stage" / "sum.txt").read_text() == f"{sum(i * i for i in range(1, 1001))}\n"


@pytest.mark.skipif(CRIU is not None, reason=CRIU or "")
def test_migration_scripts(cluster, built):
    lan, n = cluster
    follow = subprocess.Popen([PY, str(built / "follow_migrations.py"), "--count", "4"],
                              stdout=subprocess.PIPE, text=True, env=env_for(n["a"]))
    follow_sh = subprocess.Popen(["nsenter", f"--net=/run/netns/{lan.ns(0)}", "sh",
                                  str(built / "follow-migrations.sh")],
                                 stdout=subprocess.PIPE, text=True, start_new_session=True)
    time.sleep(0.5)
    job = subprocess.run([PY, "-m", "omuscd", "run", "--node", "b", "--detach", "--",
                          "sleep", "60"], capture_output=True, text=True,
                         env=env_for(n["a"]), cwd="/tmp").stdout.strip()
    try:
        # drain b: its guest goes home
        r = subprocess.run([PY, str(built / "drain.py")], capture_output=True, text=True,
                           env=env_for(n["b"]))
        assert r.returncode == 0 and f"job {job} migrated to a" in r.stdout, r
        assert "blocked" in n["a"].nodes()["b"]["flags"] or wait_for(
            lambda: "blocked" in n["a"].nodes()["b"]["flags"], 3, "b blocked")
        subprocess.run([PY, str(built / "drain.py"), "--undo"], env=env_for(n["b"]),
                       check=True, capture_output=True)
        wait_for(lambda: "blocked" not in n["a"].nodes()["b"]["flags"], 3, "b open again")
        # away again, and home with send_home.py
        assert n["a"].ctl(f"migrate {job} b").ok
        r = subprocess.run([PY, str(built / "send_home.py"), "root"], capture_output=True,
                           text=True, env=env_for(n["b"]))
        assert r.returncode == 0 and f"job {job} migrated to a" in r.stdout, r
        out, _ = follow.communicate(timeout=30)
        lines = out.splitlines()
        assert len(lines) == 4 and "migrated:" in lines[1] and "frozen" in lines[1]
        # drain.sh with nc: block and expel, nothing to move now
        assert n["a"].ctl(f"migrate {job} b").ok
        r = in_ns(lan, 1, "sh", str(built / "drain.sh"), "127.0.0.1", "4271")
        assert f"job {job} migrated to a" in r.stdout, r
        assert n["b"].ctl("noblock").ok
    finally:
        n["a"].ctl(f"kill {job} KILL")
        os.killpg(follow_sh.pid, signal.SIGTERM)  # the whole pipeline, nc included
        sh_out, _ = follow_sh.communicate(timeout=10)
    assert f" migrated job {job} migrated to a: frozen" in sh_out
    assert f" migrating job {job} moving from a to b" in sh_out
