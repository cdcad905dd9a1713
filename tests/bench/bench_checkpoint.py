"""Freeze time of a checkpoint (the job stopped while it is dumped, left running) for jobs of
64 MB, 256 MB and 1 GB of resident memory, beside a bare ``criu dump --leave-running`` of
the same kind of job on the same node, measured in the same run.

Target (issue 20): <= 1.25x the bare dump whose images are kept like a home keeps its
checkpoints (the last two, synced); the bare dump whose images are deleted at once is
printed too.  Needs root and a working CRIU
(tests/install-criu).  One daemon in a network namespace, pinned to a CPU, as is the bare
dump; each size is checkpointed ``ROUNDS`` times and the median taken (the first
checkpoint of a job and the later ones cost the same: every one is a full dump).

    python tests/bench/bench_checkpoint.py [-v] [SIZES_MB...]    (-v: each freeze, in parts)
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import pin, workdir

from omuscd import config
from omuscd.migrate.criu import find_criu
from tests.cluster import NetnsLan, start_daemon, wait_for

ROUNDS = 3
CPU = 0
HOLD = """
import sys, time
data = bytearray(b"x" * (int(sys.argv[1]) << 20))
for i in range(0, len(data), 4096):
    data[i] = i % 251
print("ready", flush=True)
time.sleep(600)
"""


def bare_dump(criu: str, mb: int, keep: bool) -> float:
    """``criu dump --leave-running`` of the same kind of job (median of ROUNDS); ``keep``:
    the images of the last two are kept, synced to disk, as a home keeps checkpoints (a
    dump then competes with the writing out of the one before: measured here, 1 GB dumps
    took 0.65, 1.5 and 5.7 s kept this way, 0.6 to 0.7 s when each was deleted at once)."""
    out = Path(tempfile.mkdtemp(prefix="omb-ck-")) / "out"
    with open(out, "w") as f:  # a file, as for omuscd jobs (CRIU refuses outside pipes)
        p = subprocess.Popen(["taskset", "-c", str(CPU), "unshare", "--pid", "--fork",
                              "--kill-child", "setsid", sys.executable, "-c", HOLD, str(mb)],
                             stdout=f, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: out.read_text() == "ready\n", 120, "the bare job to fill its memory")
    init = int(subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True,
                              text=True).stdout.split()[0])
    took, kept = [], []
    for _ in range(ROUNDS):
        images = Path(tempfile.mkdtemp(prefix="omb-img-"))
        t = time.perf_counter()
        subprocess.run(["taskset", "-c", str(CPU), criu, "dump", "-t", str(init), "-D",
                        str(images), "-o", "dump.log", "--leave-running", "--file-locks"],
                       check=True, capture_output=True)
        took.append(time.perf_counter() - t)
        if keep:
            for f in images.iterdir():
                fd = os.open(f, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            kept.append(images)
            if len(kept) > 2:
                shutil.rmtree(kept.pop(0))
        else:
            shutil.rmtree(images)
    for images in kept:
        shutil.rmtree(images)
    p.kill()
    p.wait()
    shutil.rmtree(out.parent)
    return statistics.median(took)


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:] if a.isdigit()] or [64, 256, 1024]
    criu = find_criu(None)
    assert criu, "no CRIU: run tests/install-criu"
    work = workdir()
    key = work / "k"
    config.write_key(str(key))
    rows = []
    with NetnsLan(1, prefix="ombc") as lan:
        d = start_daemon("a", ["--key-file", str(key), "--cpus", str(CPU), "--no-balancing"],
                         work, netns=lan.ns(0))
        try:
            pin(d.popen.pid, CPU)
            for mb in sizes:
                bare = bare_dump(criu, mb, keep=True)
                dropped = bare_dump(criu, mb, keep=False)
                p = subprocess.Popen([sys.executable, "-m", "omuscd", "run", "--connect",
                                      d.socket, "--home", "--", sys.executable, "-c", HOLD,
                                      str(mb)], stdout=subprocess.PIPE, cwd="/tmp")
                assert p.stdout is not None and p.stdout.readline() == b"ready\n"
                job = next(j["id"] for j in d.json("jobs")["jobs"] if j["state"] == "running")
                freezes, walls = [], []
                for _ in range(ROUNDS):
                    t = time.perf_counter()
                    reply = d.ctl(f"checkpoint {job}")
                    walls.append(time.perf_counter() - t)
                    assert reply.ok, reply
                    freezes.append(float(reply.text.split("frozen ")[1].rstrip("s")))
                assert d.ctl(f"kill {job} KILL").ok
                p.wait(60)
                rows.append((mb, bare, dropped, statistics.median(freezes),
                             statistics.median(walls)))
        finally:
            d.stop()
            for line in d.log().splitlines():
                if "checkpointed: frozen" in line and "-v" in sys.argv:
                    print(line.split(": ", 2)[-1])
            shutil.rmtree(work, ignore_errors=True)
    print("checkpoint freeze time (the job stopped while it is dumped; it runs on)")
    print(f"{'size':>8} {'bare, kept':>11} {'omuscd checkpoint':>18} {'ratio':>6} "
          f"{'bare, deleted':>14} {'ratio':>6} {'whole command':>14}")
    for mb, bare, dropped, freeze, wall in rows:
        verdict = "  target <= 1.25x: " + ("met" if freeze / bare <= 1.25 else "MISSED")
        print(f"{mb:>6}MB {bare:>10.3f}s {freeze:>17.3f}s {freeze / bare:>6.2f} "
              f"{dropped:>13.3f}s {freeze / dropped:>6.2f} {wall:>13.3f}s{verdict}")


if __name__ == "__main__":
    os.chdir(Path(__file__).resolve().parent)
    main()
