#!/usr/bin/env python3
"""List the overloaded nodes of the cluster: load (demand per lent CPU) above a threshold.

    overloaded.py [--threshold 1.0] [--connect SOCKET|HOST[:PORT]]
"""

import argparse
import sys

from omuscd.client import connect


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threshold", type=float, default=1.0)
    ap.add_argument("--connect", help="the daemon (default: the local one)")
    a = ap.parse_args()
    with connect(a.connect) as c:
        nodes = c.command("nodes --json").json()["nodes"]
    busy = [n for n in nodes if n["state"] == "alive" and n["load"] > a.threshold]
    for n in sorted(busy, key=lambda n: -n["load"]):
        print(f"{n['name']}\t{n['address']}\tload {n['load']:.2f} on {n['cpus']} CPUs\t"
              f"{n['jobs']} jobs")
    return 0 if busy else 1  # like grep: 1 when none matched


if __name__ == "__main__":
    sys.exit(main())
