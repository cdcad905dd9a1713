"""Control round trip of ``nodes --json`` with 64 nodes known, on loopback.

Target (issue 2): median <= 2 ms.  The baseline, measured in the same run and session, is
``version`` (the cheapest command): the difference is the cost of the table itself.

    python tests/bench/bench_control.py [ROUND_TRIPS]
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import time

from common import loopback_daemon, workdir

from omuscd import config, wire
from omuscd.client import ControlClient


def fake_nodes(key: bytes, count: int, dest: tuple[str, int]) -> None:
    """Announce ``count`` authentic nodes (signed HELLOs from 127.0.0.x sources)."""
    now = time.time()
    for i in range(count):
        nid = 1000 + i
        addr = f"127.0.1.{i + 1}"
        entry = {"id": nid, "boot": nid, "inc": 1, "hb": 1, "age": 0, "name": f"fake{i}",
                 "addr": addr, "port": 34270, "role": "peer", "rel": "1a0", "st": "up",
                 "cpus": 8, "speed": 3000, "mem": 16000, "load": 0.5, "util": 50.0,
                 "runq": 4, "jobs": 2, "flags": []}
        codec = wire.Codec(key, nid, nid, 1)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((addr, 0))
            s.sendto(codec.encode(wire.HELLO, {"entry": entry, "reply": False}, now), dest)


def timed(client: ControlClient, line: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        reply = client.command(line)
        out.append((time.perf_counter() - t) * 1000)
        assert reply.ok, reply
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    work = workdir()
    keyfile = work / "k"
    subprocess.run([sys.executable, "-m", "omuscd", "keygen", str(keyfile)], check=True,
                   capture_output=True)
    d = loopback_daemon("a", "127.0.0.63", work, "--key-file", str(keyfile),
                        "--probe-interval", "60", "--probe-timeout", "30",
                        "--dead-timeout", "6000")  # the fakes never answer a probe
    try:
        fake_nodes(config.read_secret(str(keyfile)), 63, ("127.0.0.63", 34270))
        deadline = time.time() + 5
        while len(d.json("nodes")["nodes"]) < 64 and time.time() < deadline:
            time.sleep(0.1)
        known = len(d.json("nodes")["nodes"])
        with ControlClient.tcp("127.0.0.63", 34271) as c:
            timed(c, "nodes --json", 100)  # warm up
            base = timed(c, "version", n)
            nodes = timed(c, "nodes --json", n)
            size = len(c.command("nodes --json").lines[0])
        med_b, med_n = statistics.median(base), statistics.median(nodes)
        p99 = sorted(nodes)[int(len(nodes) * 0.99)]
        print(f"control round trips on loopback TCP, {n} each, {known} nodes known")
        print(f"  version (baseline):  median {med_b:.3f} ms")
        print(f"  nodes --json:        median {med_n:.3f} ms, p99 {p99:.3f} ms, {size} bytes")
        print(f"  ratio nodes/version: {med_n / med_b:.2f}")
        print(f"  target: median <= 2 ms -> {'met' if med_n <= 2 else 'MISSED'}")
    finally:
        d.stop()


if __name__ == "__main__":
    main()
