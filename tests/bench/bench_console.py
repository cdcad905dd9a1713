"""The console's cost: one redraw of a big cluster, and an idle console.

Targets (issue 6): a redraw with 128 nodes and 500 jobs <= 20 ms; an idle console
<= 1 % of one core.  A redraw here is what a refresh tick does when every record changed:
the new records into the widgets, the whole screen rendered, and its content walked as the
terminal writer walks it.  Baselines measured in the same run: the same redraw of a
one-node cluster, and the idle daemon the console watches.

    python tests/bench/bench_console.py [IDLE_SECONDS]
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import cpu_seconds, loopback_pair, workdir

from tests.consoledata import cluster
from tui.app import Console
from tui.source import ClusterSource, Model

REPO = str(Path(__file__).resolve().parents[2])


async def _never() -> None:
    raise AssertionError("the benchmark fills the model itself")


def redraw_ms(nodes: int, jobs: int, size: tuple[int, int], rounds: int = 60) -> list[float]:
    ns, js = cluster(nodes, jobs)
    model = Model(nodes=ns, jobs=js, connected=True)
    con = Console(ClusterSource(_never, model=model), "bench")
    times = []
    for r in range(rounds):
        # every record changes, as when loads and CPU times move between two refreshes
        model.nodes = [{**n, "load": (n["id"] * 7 + r) % 13 / 10} for n in ns]
        model.jobs = [{**j, "cpu": j["cpu"] + r} for j in js]
        model.version += 1
        t0 = time.perf_counter()
        con.update()
        canvas = con.top.render(size, focus=True)
        for row in canvas.content():
            for _ in row:
                pass
        times.append((time.perf_counter() - t0) * 1000)
    return times[5:]  # the first rounds build the widgets


def idle_console(seconds: float) -> tuple[float, float, float]:
    work = workdir()
    key = work / "k"
    a, b = loopback_pair(work)
    sock = f"omb{a.popen.pid}"
    try:
        subprocess.run(["tmux", "-L", sock, "new-session", "-d", "-x", "120", "-y", "40",
                        f"{sys.executable} -m omuscd console 127.0.0.61:34271"], check=True,
                       cwd=REPO)
        tui = (f"{sys.executable} -m omuscd --tui --address 127.0.0.63 --control-bind "
               f"127.0.0.63 --port 34270 --control-port 34271 --key-file {key} --peer "
               f"127.0.0.61:34270 --state-dir {work / 'c'} --node-name c")
        subprocess.run(["tmux", "-L", sock, "new-session", "-d", "-s", "tui", "-x", "120",
                        "-y", "40", tui], check=True, cwd=REPO)
        time.sleep(3)
        found = subprocess.run(["pgrep", "-f", "omuscd console 127.0.0.61"],
                               capture_output=True, text=True).stdout.split()
        # the console itself, not the tmux server whose command line names it
        pid = next(int(p) for p in found
                   if Path(f"/proc/{p}/comm").read_text().startswith("python"))
        found = subprocess.run(["pgrep", "-f", "omuscd --tui --address 127.0.0.63"],
                               capture_output=True, text=True).stdout.split()
        tui_pid = next(int(p) for p in found
                       if Path(f"/proc/{p}/comm").read_text().startswith("python"))
        pids = {"console": pid, "daemon": a.popen.pid, "tui": tui_pid}
        c0 = {k: cpu_seconds(p) for k, p in pids.items()}
        t0 = time.monotonic()
        time.sleep(seconds)
        wall = time.monotonic() - t0
        cpu = {k: (cpu_seconds(p) - c0[k]) / wall * 100 for k, p in pids.items()}
        return cpu["console"], cpu["daemon"], cpu["tui"]
    finally:
        subprocess.run(["tmux", "-L", sock, "kill-server"], capture_output=True)
        for d in (a, b):
            d.stop()
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 30.0
    print("console redraw (update + render + walk), median / p95 of 55 rounds:")
    for size in ((200, 60), (80, 24)):
        big = redraw_ms(128, 500, size)
        small = redraw_ms(1, 0, size)
        mb, ms = statistics.median(big), statistics.median(small)
        p95 = sorted(big)[int(len(big) * 0.95)]
        print(f"  {size[0]}x{size[1]}: 128 nodes + 500 jobs {mb:6.2f} ms (p95 {p95:.2f}); "
              f"1 node {ms:.2f} ms (ratio {mb / ms:.1f}); target <= 20 ms: "
              f"{'met' if p95 <= 20 else 'MISSED'}")
    con, daemon, tui = idle_console(seconds)
    print(f"idle console over {seconds:.0f}s: {con:.3f} % of one core "
          f"(the daemon it watches: {daemon:.3f} %); target <= 1 %: "
          f"{'met' if con <= 1 else 'MISSED'}")
    print(f"idle omuscd --tui (daemon and console in one process): {tui:.3f} % "
          f"(ratio {tui / daemon:.1f} to the headless daemon)")


if __name__ == "__main__":
    main()
