"""Wall time of ``omuscd run -- true`` on the home node and on another node of a two-node
namespace cluster, beside a plain fork and exec of ``true`` measured in the same run.

Targets (issue 3): median <= 100 ms on the home node, <= 150 ms on another node.
Needs root (network namespaces).

    python tests/bench/bench_run.py [RUNS]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time

from common import workdir

from omuscd import config
from tests.cluster import NetnsLan, start_daemon, wait_for


def timed(cmd: list[str], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, cwd="/tmp")
        out.append((time.perf_counter() - t) * 1000)
        assert r.returncode == 0, r.stderr
    return out


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    work = workdir()
    key = work / "k"
    config.write_key(str(key))
    with NetnsLan(2, prefix="omb") as lan:
        nodes = [start_daemon(name, ["--key-file", str(key)], work, netns=lan.ns(i))
                 for i, name in enumerate("ab")]
        try:
            wait_for(lambda: "b" in nodes[0].nodes(), 10, "a to see b")
            run = [sys.executable, "-m", "omuscd", "run", "--connect", nodes[0].socket]
            timed([*run, "--home", "--", "true"], 5)  # warm caches
            plain = timed(["true"], n)
            client = timed([sys.executable, "-c", "import omuscd.runclient"], n)
            home = timed([*run, "--home", "--", "true"], n)
            other = timed([*run, "--node", "b", "--", "true"], n)
        finally:
            for d in nodes:
                d.stop()
    med = {k: statistics.median(v) for k, v in
           {"plain": plain, "client": client, "home": home, "other": other}.items()}
    print(f"omuscd run -- true, {n} runs each, median wall time (namespace cluster of 2)")
    print(f"  plain fork+exec of true:            {med['plain']:7.2f} ms")
    print(f"  python starting the run client:     {med['client']:7.2f} ms")
    print(f"  omuscd run --home -- true:          {med['home']:7.2f} ms "
          f"({med['home'] / med['plain']:.0f}x plain)  target <= 100 ms -> "
          f"{'met' if med['home'] <= 100 else 'MISSED'}")
    print(f"  omuscd run --node b -- true:        {med['other']:7.2f} ms "
          f"({med['other'] / med['plain']:.0f}x plain)  target <= 150 ms -> "
          f"{'met' if med['other'] <= 150 else 'MISSED'}")


if __name__ == "__main__":
    main()
