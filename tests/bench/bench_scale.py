"""Real daemons at scale: N idle daemons on loopback (127.0.2.x, ``--insecure --peer`` to
the first, default timings), as issue 19 measured them, for a few minutes.

Target (issue 19): every node sees all N alive all the time, 0 suspicions ('is suspect'
log lines); 5 SIGKILLed nodes are dead at every remaining node within 10 s.  Baseline
(the heartbeat gossip before SWIM): collapses at 32 nodes.  Run it alone, as root, in a
network namespace of its own (it uses fixed loopback addresses):

    unshare --net -- sh -c 'ip link set lo up &&
        exec .venv/bin/python tests/bench/bench_scale.py [N] [SECONDS]'
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from common import cpu_seconds, rss_mb, workdir

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.test_scale import (
    KILLED,
    check_all_alive,
    kill_and_time,
    start_many,
    suspect_lines,
    watch_idle,
)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 300.0
    daemons: list = []
    try:
        t0 = time.monotonic()
        start_many(workdir(), n, daemons, timeout=6.0 * n, one_by_one=True)
        started = time.monotonic() - t0
        formed = check_all_alive(daemons, 120.0)
        forming = suspect_lines(daemons)
        c0 = {d.name: cpu_seconds(d.popen.pid) for d in daemons}
        t1 = time.monotonic()
        problems = watch_idle(daemons, seconds)
        wall = time.monotonic() - t1
        cpu = sorted((cpu_seconds(d.popen.pid) - c0[d.name]) / wall * 100 for d in daemons)
        rss = sorted(rss_mb(d.popen.pid) for d in daemons)
        idle = suspect_lines(daemons) - forming
        took = kill_and_time(daemons, daemons[-KILLED:], 10.0)
        late = n - KILLED - sum(1 for t in took.values() if t <= 10.0)
        worst = max(took.values()) if took else float("nan")
        print(f"{n} daemons started one by one in {started:.0f} s, all saw all alive"
              f" {formed:.1f} s later ({forming} 'is suspect' lines while forming);"
              f" load average then {os.getloadavg()[0]:.2f}")
        print(f"idle {wall:.0f} s: {len(problems)} samples of a view not all alive"
              f" (target 0), {idle} 'is suspect' lines (target 0)")
        for p in problems[:5]:
            print(f"    {p}")
        print(f"  CPU per daemon: median {cpu[len(cpu) // 2]:.2f} %, max {cpu[-1]:.2f} %;"
              f" RSS median {rss[len(rss) // 2]:.1f} MB, max {rss[-1]:.1f} MB")
        print(f"{KILLED} SIGKILLed: dead at every survivor within {worst:.1f} s "
              f"(target 10 s; {late} survivors late or never); load average"
              f" {os.getloadavg()[0]:.2f} (the machine's: other work on it counts)")
    finally:
        for d in daemons:
            if d.alive():
                d.popen.kill()
                d.popen.wait()


if __name__ == "__main__":
    main()
