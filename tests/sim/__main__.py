"""Run one simulated cluster from the command line and print its figures.

    python -m tests.sim --nodes 200 --seconds 120 --loss 0.05 --stalled 0.01
    python -m tests.sim --nodes 1000 --param probe_interval=0.5 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import time
from typing import Any

from tests.sim import scenario
from tests.sim.network import NetConfig
from tests.sim.protocol import swim_factory


def parse_params(items: list[str]) -> dict[str, Any]:
    """``name=value`` pairs for SwimParams (values read as JSON: numbers stay numbers)."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--param wants name=value, not {item!r}")
        try:
            out[name] = json.loads(value)
        except json.JSONDecodeError:
            out[name] = value
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.sim", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=100)
    p.add_argument("--seconds", type=float, default=60.0, help="simulated run after forming")
    p.add_argument("--loss", type=float, default=0.0)
    p.add_argument("--delay", type=float, default=0.0002)
    p.add_argument("--jitter", type=float, default=0.0003)
    p.add_argument("--stalled", type=float, default=0.0,
                   help="fraction of nodes that stall at random times")
    p.add_argument("--stall", type=float, default=2.0, help="seconds of each stall")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a SwimParams field (repeatable)")
    p.add_argument("--profile", action="store_true", help="print the 25 costliest functions")
    a = p.parse_args(argv)
    prof = cProfile.Profile() if a.profile else None
    if prof:
        prof.enable()
    t0 = time.monotonic()
    sim = scenario.form(swim_factory(**parse_params(a.param)), a.nodes,
                        NetConfig(0.0, a.delay, a.jitter), seed=a.seed)
    formed = sim.now
    t1 = time.monotonic()
    print(f"{a.nodes} nodes formed at {formed:.1f} simulated s ({t1 - t0:.1f} s real)")
    r = scenario.false_alarms(sim, a.seconds, a.loss, a.stalled, a.stall)
    t2 = time.monotonic()
    s = scenario.summary(r.byte_rates)
    print(f"{a.seconds:.0f} simulated s at {a.loss:.0%} loss, {r.stalls} stalls: "
          f"{r.false_deaths} false deaths ({r.nodes_falsely_dead} nodes; "
          f"{r.false_deaths_of_stalled} of stalled nodes), "
          f"{r.false_suspicions} false suspicions ({r.suspicions_of_stalled} of stalled), "
          f"{r.dead_in_tables} live nodes dead in tables at the end")
    print(f"bytes/node/s: mean {s['mean']:.0f}, median {s['median']:.0f}, max {s['max']:.0f};"
          f" largest datagram {sim.net.largest} B; events {r.events}")
    print(f"real time {t2 - t1:.1f} s for {a.seconds:.0f} simulated s "
          f"({sim.steps} steps, {sim.net.sent} datagrams)")
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)


if __name__ == "__main__":
    main()
