"""Idle cost of a headless daemon in a two-node loopback cluster.

Target (issue 2): CPU <= 0.5 % of one core and RSS <= 40 MB over 60 s.  The baseline,
measured in the same run, is a bare Python interpreter that imports the same libraries
and sleeps in trio: what any trio daemon costs before doing anything.

    python tests/bench/bench_idle.py [SECONDS]
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from common import cpu_seconds, loopback_pair, rss_mb, workdir

BASELINE = ("import trio, psutil, netifaces, json, hmac, hashlib\n"
            "trio.run(trio.sleep, 3600)\n")


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 60.0
    work = workdir()
    a, b = loopback_pair(work)
    base = subprocess.Popen([sys.executable, "-c", BASELINE])
    try:
        time.sleep(2)  # past the start-up burst
        pids = {"daemon": a.popen.pid, "baseline": base.pid}
        c0 = {k: cpu_seconds(p) for k, p in pids.items()}
        t0 = time.monotonic()
        time.sleep(seconds)
        wall = time.monotonic() - t0
        cpu = {k: (cpu_seconds(p) - c0[k]) / wall * 100 for k, p in pids.items()}
        rss = {k: rss_mb(p) for k, p in pids.items()}
        packets = a.json("status")["packets"]
        print(f"idle over {wall:.0f}s, two-node loopback cluster, default timings; machine"
              f" load average {os.getloadavg()[0]:.2f} (others' work counts: a busy machine"
              " makes the load sampler count runnable tasks)")
        print(f"  daemon:   CPU {cpu['daemon']:.3f}% of one core, RSS {rss['daemon']:.1f} MB,"
              f" {packets['out'] / wall:.1f} datagrams/s out, {packets['in'] / wall:.1f} in")
        print(f"  baseline: CPU {cpu['baseline']:.3f}% of one core, RSS {rss['baseline']:.1f} MB"
              " (python + trio + psutil + netifaces, sleeping)")
        print(f"  RSS ratio daemon/baseline: {rss['daemon'] / rss['baseline']:.2f}")
        print(f"  targets: CPU <= 0.5% -> {'met' if cpu['daemon'] <= 0.5 else 'MISSED'}; "
              f"RSS <= 40 MB -> {'met' if rss['daemon'] <= 40 else 'MISSED'}")
    finally:
        for d in (a, b):
            d.stop()
        base.kill()


if __name__ == "__main__":
    main()
