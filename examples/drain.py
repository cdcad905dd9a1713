#!/usr/bin/env python3
"""Drain a node before maintenance: accept no more guests, send the guests away (home, or
elsewhere), and report what could not leave.  Exit 0 when the node runs no guest jobs.

    drain.py [--connect SOCKET|HOST[:PORT]]       (run on the node to drain)
    drain.py --undo                                (accept guests again)
"""

import argparse
import sys

from omuscd.client import connect


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connect", help="the daemon of the node (default: the local one)")
    ap.add_argument("--undo", action="store_true", help="unblock the node")
    a = ap.parse_args()
    with connect(a.connect) as c:
        if a.undo:
            print(c.command("noblock").text)
            return 0
        me = c.command("status --json").json()["id"]
        print(c.command("block").text)
        reply = c.command("expel")
        print(reply.text)
        left = [j for j in c.command("jobs --json").json()["jobs"]
                if j["node"] == me and j["home"] != me and j["state"] == "running"]
    for j in left:
        print(f"still here: job {j['id']} of {j['owner']}: {j['cannot_move'] or 'see above'}",
              file=sys.stderr)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
