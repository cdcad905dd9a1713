#!/usr/bin/env python3
"""timewaster in Python: the same deterministic work and checksum as timewaster.c, so a
migrated run can be compared with an unmigrated one.

    timewaster.py [-n ITERATIONS] [-s SECONDS] [-m MEGABYTES] [-p EVERY]
"""

import argparse
import time

MASK = (1 << 64) - 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=10_000_000, help="iterations (default 10^7)")
    ap.add_argument("-s", type=float, default=0, help="stop after about this many seconds")
    ap.add_argument("-m", type=int, default=0, help="megabytes of resident memory to walk")
    ap.add_argument("-p", type=int, default=0, help="print the checksum every P iterations")
    a = ap.parse_args()
    words = a.m * (1 << 20) // 8
    mem = [(i * 2654435761) & MASK for i in range(words)]  # resident
    total = 0
    start = time.monotonic()
    i = 0
    for i in range(a.n):
        total = (total * 6364136223846793005 + i + 1442695040888963407) & MASK
        if words:
            k = total % words
            mem[k] ^= total
            total = (total + mem[k]) & MASK
        if a.p and (i + 1) % a.p == 0:
            print(f"{i + 1} {total:016x}", flush=True)
        if a.s and i % 65536 == 0 and time.monotonic() - start >= a.s:
            break
    else:
        i = a.n
    print(f"checksum {total:016x} after {i} iterations", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
