"""Membership at scale: the real SWIM core (omuscd/cluster/swim.py) in the simulator
(tests/sim/: one process, an in-memory network, a simulated clock, every datagram encoded
and authenticated by the real wire.Codec).

Targets (issue 19), printed beside each figure:

    a join known to 99.9% of 1000 nodes                   <= 3 s   (Serf's model ~1.8 s)
    a crash known as dead by every node, 1000 nodes       <= 10 s  (memberlist 4*log(N+1))
    false deaths, 1000 nodes, 10 simulated minutes,
        1% and 5% loss, 1% of nodes stalled 2 s at random  0       (Lifeguard)
    bytes sent per node per second at 16, 1000, 5000      within 1.5x of each other,
                                                          <= 4 KB/s

A cluster of up to 200 nodes is formed through node 0 (as ``--peer`` to the first); a
larger one with its tables preloaded through the core's Swim.learn (forming 1000 nodes by
joins costs many minutes of CPU and is not a figure here; the join figure is a real join),
then started together; either is left 10 s to settle;
bytes are counted over the next 60 s on a loss-free LAN.  The join and crash figures and
the two false-death runs (one after the other, the second at 5 % loss) use the same
cluster of ``--nodes``.  Stalled nodes stop (SIGSTOP-like) for 2 s about once a minute each.

    python tests/bench/bench_membership.py [--nodes 1000] [--minutes 10]
        [--sizes 16,1000,5000] [--losses 0.01,0.05] [--spacing 0.05] [--seed 1]
        [--param NAME=VALUE ...]

(--losses 0.01 in one process and --losses 0.05 --sizes 1000 in another use two cores.)

A size whose node tables would not fit in memory (every node holds every entry; a
preloaded cluster's tables share each node's first entry, leaving ~0.5 KB per entry, so
N^2 * 0.52 KB: 13 GB at 5000 nodes) is reported as not run rather than swapping the machine.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.sim import scenario
from tests.sim.__main__ import parse_params
from tests.sim.protocol import swim_factory

#: memory of one table entry in a preloaded simulator (measured: 0.32 KB formed, 0.49 KB
#: after 70 simulated s at 500 nodes, as entries heard replace the shared first ones;
#: fewer at 5000, where a node replaces a tenth as large a share of its table)
ENTRY_BYTES = 520
SETTLE = 10.0
PRELOAD_ABOVE = 200  # larger clusters are formed with preloaded tables
BYTES_WINDOW = 60.0


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


class Table:
    """Rows of figure | measured | target | met, printed as they come and again at the end."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, figure: str, value: str, target: str, met: bool | None) -> None:
        row = (figure, value, target, "-" if met is None else "met" if met else "MISSED")
        self.rows.append(row)
        print(f"  {row[0]}: {row[1]} (target {row[2]}) {row[3]}", flush=True)

    def print(self) -> None:
        widths = [max(len(r[i]) for r in [("figure", "measured", "target", ""), *self.rows])
                  for i in range(4)]
        line = "  ".join(f"{{:{w}}}" for w in widths)
        print()
        print(line.format("figure", "measured", "target", ""))
        print(line.format(*("-" * w for w in widths)))
        for r in self.rows:
            print(line.format(*r))


def elapsed(t0: float, c0: float) -> str:
    """Real and CPU seconds since (t0, c0): on a shared machine the CPU time is the cost."""
    return f"{time.monotonic() - t0:.0f} s real, {time.process_time() - c0:.0f} s CPU"


def seconds(v: float | None) -> str:
    return "not reached" if v is None else f"{v:.2f} s"


def bytes_row(table: Table, n: int, rates: list[float]) -> float:
    s = scenario.summary(rates)
    table.add(f"bytes/node/s, {n} nodes", f"{s['mean']:.0f} B/s (max {s['max']:.0f})",
              "<= 4096 B/s", s["max"] <= 4096)
    return float(s["mean"])


def run_size(args: argparse.Namespace, n: int, table: Table, params: dict[str, Any]
             ) -> float | None:
    """Form ``n`` nodes and measure their bytes; at ``--nodes`` also the rest."""
    need = n * n * ENTRY_BYTES
    if need > 0.8 * mem_available():
        table.add(f"bytes/node/s, {n} nodes",
                  f"not run: needs ~{need / 2**30:.0f} GB", "<= 4096 B/s", None)
        return None
    t0, c0 = time.monotonic(), time.process_time()
    if n <= PRELOAD_ABOVE:
        sim = scenario.form(swim_factory(**params), n, seed=args.seed, spacing=args.spacing)
        how = "joined through node 0"
    else:
        sim = scenario.form_preloaded(swim_factory(**params), n, seed=args.seed)
        how = "preloaded"
    print(f"{n} nodes formed ({how}) in {sim.now:.1f} simulated s ({elapsed(t0, c0)})",
          flush=True)
    sim.run_for(SETTLE)
    t1, c1 = time.monotonic(), time.process_time()
    mean = bytes_row(table, n, scenario.byte_rates(sim, BYTES_WINDOW))
    print(f"    ({BYTES_WINDOW:.0f} simulated s of {n} nodes: {elapsed(t1, c1)}; largest "
          f"datagram {sim.net.largest} B)", flush=True)
    if n == args.nodes:
        full_runs(args, sim, table)
    del sim
    gc.collect()
    return mean


def full_runs(args: argparse.Namespace, sim: Any, table: Table) -> None:
    n = args.nodes
    took = scenario.join_time(sim, fraction=0.999, timeout=60.0)
    table.add(f"join known to 99.9% of {n}", seconds(took), "<= 3 s",
              took is not None and took <= 3.0)
    took = scenario.crash_time(sim, timeout=120.0)
    table.add(f"crash dead at every node, {n}", seconds(took), "<= 10 s",
              took is not None and took <= 10.0)
    for loss in args.losses:
        t0, c0 = time.monotonic(), time.process_time()

        def progress(done: float, m: Any, t0: float = t0, c0: float = c0,
                     loss: float = loss) -> None:
            print(f"    {done / 60:.0f} min at {loss:.0%} loss: {len(m.false_deaths)} false "
                  f"deaths ({len({a.subject for a in m.false_deaths})} nodes), "
                  f"{len(m.false_suspicions)} false suspicions so far "
                  f"({elapsed(t0, c0)})", flush=True)

        r = scenario.false_alarms(sim, args.minutes * 60.0, loss, stalled_fraction=0.01,
                                  stall=2.0, stalls_per_minute=1.0, progress=progress)
        took = elapsed(t0, c0)
        table.add(f"false deaths, {n} nodes, {args.minutes:g} min, {loss:.0%} loss",
                  f"{r.false_deaths} ({r.nodes_falsely_dead} nodes; "
                  f"{r.false_deaths_of_stalled} of stalled; "
                  f"{r.stalls} stalls; {r.false_suspicions} false suspicions, "
                  f"{r.suspicions_of_stalled} of stalled)", "0",
                  r.false_deaths == 0 and r.dead_in_tables == 0)
        s = scenario.summary(r.byte_rates)
        print(f"    ({args.minutes:g} simulated min: {took}; bytes/node/s "
              f"mean {s['mean']:.0f}, max {s['max']:.0f}; events {r.events})", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--sizes", default="16,1000,5000")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--losses", default="0.01,0.05", help="loss rates of the false-death runs")
    p.add_argument("--spacing", type=float, default=0.05,
                   help="seconds between two nodes' starts while forming")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a SwimParams field (repeatable): an A/B of a tunable")
    args = p.parse_args()
    params = parse_params(args.param)
    args.losses = [float(v) for v in args.losses.split(",") if v]
    sizes = sorted({int(s) for s in args.sizes.split(",")} | {args.nodes})
    table = Table()
    start, cpu = time.monotonic(), time.process_time()
    means = {n: m for n in sizes if (m := run_size(args, n, table, params)) is not None}
    if len(means) > 1:
        ratio = max(means.values()) / min(means.values())
        table.add("bytes/node/s, largest/smallest of " + ", ".join(map(str, means)),
                  f"{ratio:.2f}x", "<= 1.5x", ratio <= 1.5)
    table.print()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KB -> GB
    print(f"\n{elapsed(start, cpu)} in all, {peak:.1f} GB of memory at most; "
          f"SwimParams overrides: {params}")


if __name__ == "__main__":
    main()
