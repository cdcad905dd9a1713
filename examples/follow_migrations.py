#!/usr/bin/env python3
"""Follow migrations live: one line per move, with its freeze time, or why it failed.

    follow_migrations.py [--connect SOCKET|HOST[:PORT]] [--count N]
"""

import argparse
import json
import sys
import time

from omuscd.client import connect

KINDS = ("migrating", "migrated", "migration-failed")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connect", help="the daemon (default: the local one)")
    ap.add_argument("--count", type=int, default=0, help="stop after N events")
    a = ap.parse_args()
    seen = 0
    with connect(a.connect, timeout=None) as c:
        for line in c.stream("watch --json"):
            if not line.startswith("{"):
                continue
            ev = json.loads(line)
            if ev["event"] in KINDS:
                stamp = time.strftime("%H:%M:%S", time.localtime(ev["time"]))
                print(f"{stamp} {ev['event']}: {ev['text']}", flush=True)
                seen += 1
                if a.count and seen >= a.count:
                    break
    return 0


if __name__ == "__main__":
    sys.exit(main())
