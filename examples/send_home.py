#!/usr/bin/env python3
"""Send every running job of a user back to its home node.

    send_home.py USER [--connect SOCKET|HOST[:PORT]]
"""

import argparse
import sys

from omuscd.client import connect


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("user")
    ap.add_argument("--connect", help="any daemon of the cluster (default: the local one)")
    a = ap.parse_args()
    failed = 0
    with connect(a.connect) as c:
        for j in c.command("jobs --json").json()["jobs"]:
            if j["owner"] != a.user or j["state"] != "running" or j["node"] == j["home"]:
                continue
            reply = c.command(f"migrate {j['id']} home")
            print(reply.text, file=sys.stdout if reply.ok else sys.stderr)
            failed += not reply.ok
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
