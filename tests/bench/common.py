"""Shared by the benchmarks: start real daemons on loopback and read their cost."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.cluster import Daemon, start_daemon


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="omb-"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def loopback_daemon(name: str, addr: str, work: Path, *extra: str) -> Daemon:
    return start_daemon(name, ["--address", addr, "--control-bind", addr, "--port", "34270",
                               "--control-port", "34271", *extra], work)


def loopback_pair(work: Path) -> tuple[Daemon, Daemon]:
    """Two keyed daemons on 127.0.0.61 and .62 that know each other."""
    import subprocess

    key = work / "k"
    subprocess.run([sys.executable, "-m", "omuscd", "keygen", str(key)], check=True,
                   capture_output=True)
    a = loopback_daemon("a", "127.0.0.61", work, "--key-file", str(key))
    b = loopback_daemon("b", "127.0.0.62", work, "--key-file", str(key),
                        "--peer", "127.0.0.61:34270")
    return a, b


def pin(pid: int, cpu: int) -> None:
    """Every thread of ``pid`` (and so what it starts later) on ``cpu``: one node of a
    two-node bench on one machine keeps to its own CPU, as on a machine of its own."""
    subprocess.run(["taskset", "-a", "-p", "-c", str(cpu), str(pid)], check=True,
                   capture_output=True)
