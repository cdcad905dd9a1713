"""Freeze time of a migration (job stopped on the source until running on the target) for
jobs of 64 MB, 256 MB and 1 GB of resident memory, beside a bare ``criu dump`` plus
``criu restore`` of the same kind of job on one node, measured in the same run.

Target (issue 4): <= 1.25x the bare pair at 256 MB and above.
Needs root and a working CRIU (tests/install-criu).

Each job moves twice: as the daemon moves it by default (post-copy from post_copy_mb,
128 MB: frozen while it is dumped and its small images travel, its memory following once
it runs on the target; the time that took is printed too), and with post_copy_mb 0 (its
memory streamed while it is dumped, inside the freeze).  The verdict is on the first.

Two nodes on one machine: each node (its daemon, and so its CRIU and its jobs) is pinned
to a CPU of its own, as two machines would be, and the bare pair runs on the source's CPU.
Two bare pairs: "kept" keeps the dumped job (stopped) until the restored copy exists, as a
migration must (the source's copy is killed only when the target runs the job); "killed"
is plain ``criu dump``, which kills the job before the restore.  The difference is the cost
of memory the machine has not just freed (on a VM with a balloon driver, much of it); the
verdict uses "kept", the like-for-like pair; both are printed.

    python tests/bench/bench_migrate.py [SIZES_MB...]
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from common import pin, workdir

from omuscd import config
from omuscd.migrate.criu import find_criu
from tests.cluster import NetnsLan, start_daemon, wait_for

HOLD = """
import sys, time
data = bytearray(b"x" * (int(sys.argv[1]) << 20))
for i in range(0, len(data), 4096):
    data[i] = i % 251
print("ready", flush=True)
time.sleep(600)
"""


def bare_pair(criu: str, mb: int, keep: bool) -> float:
    """criu dump + criu restore of the same kind of job, through a directory; ``keep``:
    the dumped job stays (stopped) until the restore is done."""
    images = Path(tempfile.mkdtemp(prefix="omb-img-"))
    out = images.parent / f"{images.name}.out"
    with open(out, "w") as f:  # a file, as for omuscd jobs (CRIU refuses outside pipes)
        p = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "setsid",
                              sys.executable, "-c", HOLD, str(mb)], stdout=f,
                             stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: out.read_text() == "ready\n", 60, "the bare job to fill its memory")
    init = int(subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True,
                              text=True).stdout.split()[0])
    t = time.perf_counter()
    subprocess.run([criu, "dump", "-t", str(init), "-D", str(images), "-o", "dump.log",
                    *(["--leave-stopped"] if keep else [])], check=True, capture_output=True)
    subprocess.run([criu, "restore", "-D", str(images), "--restore-detached",
                    "--pidfile", str(images / "pid"), "-o", "restore.log"], check=True,
                   capture_output=True)
    took = time.perf_counter() - t
    os.kill(int((images / "pid").read_text()), 9)
    if keep:
        os.kill(init, 9)
    p.wait()
    shutil.rmtree(images)
    out.unlink()
    return took


PINS = (("a", 0), ("b", 1)) if (os.cpu_count() or 1) > 1 else (("a", 0), ("b", 0))


@contextlib.contextmanager
def pinned(cpu: int) -> Iterator[None]:
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def main() -> None:
    sizes = [int(a) for a in sys.argv[1:]] or [64, 256, 1024]
    criu = find_criu(None)
    assert criu, "no CRIU: run tests/install-criu"
    work = workdir()
    key = work / "k"
    config.write_key(str(key))
    rows = []
    with NetnsLan(2, prefix="omb") as lan:
        nodes = [start_daemon(name, ["--key-file", str(key), "--cpus", str(cpu)], work,
                              netns=lan.ns(i)) for i, (name, cpu) in enumerate(PINS)]
        try:
            for d, (_, cpu) in zip(nodes, PINS, strict=True):
                pin(d.popen.pid, cpu)
            wait_for(lambda: "b" in nodes[0].nodes(), 10, "a to see b")
            for mb in sizes:
                with pinned(PINS[0][1]):
                    killed_pair = bare_pair(criu, mb, keep=False)
                    kept_pair = bare_pair(criu, mb, keep=True)
                p = subprocess.Popen([sys.executable, "-m", "omuscd", "run", "--connect",
                                      nodes[0].socket, "--home", "--", sys.executable, "-c",
                                      HOLD, str(mb)], stdout=subprocess.PIPE, cwd="/tmp")
                assert p.stdout is not None and p.stdout.readline() == b"ready\n"
                job = next(j["id"] for j in nodes[0].json("jobs")["jobs"]
                           if j["state"] == "running")
                reply = nodes[0].ctl(f"migrate {job} b")
                assert reply.ok, reply
                freeze = float(reply.text.split("frozen ")[1].split("s,")[0])
                line = [ln for ln in nodes[0].log().splitlines()
                        if f"job {job} frozen" in ln][-1]
                follow = (float(line.split("memory followed in ")[1].split("s")[0])
                          if "post-copy" in line else 0.0)
                back = nodes[1].ctl(f"migrate {job} home")  # never post-copy
                assert back.ok, back
                assert nodes[0].ctl("set post_copy_mb 0").ok
                try:
                    again = nodes[0].ctl(f"migrate {job} b")
                finally:
                    nodes[0].ctl(f"set post_copy_mb {config.PARAM_BY_NAME['post_copy_mb'].default}")
                assert again.ok, again
                streamed = float(again.text.split("frozen ")[1].split("s,")[0])
                killed = nodes[0].ctl(f"kill {job} KILL")
                assert killed.ok, killed
                p.wait(60)
                rows.append((mb, kept_pair, killed_pair, freeze, follow, streamed))
        finally:
            for d in nodes:
                d.stop()
    print("migration freeze time (stopped on the source until running on the target)")
    print(f"{'size':>8} {'bare pair kept':>15} {'killed':>8} {'omuscd migrate':>15} "
          f"{'ratio':>6} {'vs killed':>9} {'memory after':>13} {'streamed':>9} {'ratio':>6}")
    for mb, kept, killed, freeze, follow, streamed in rows:
        verdict = "" if mb < 256 else ("  target <= 1.25x: " +
                                      ("met" if freeze / kept <= 1.25 else "MISSED"))
        after = f"{follow:>12.3f}s" if follow else f"{'(pre-copy)':>13}"
        print(f"{mb:>6}MB {kept:>14.3f}s {killed:>7.3f}s {freeze:>14.3f}s "
              f"{freeze / kept:>6.2f} {freeze / killed:>9.2f} {after} {streamed:>8.3f}s "
              f"{streamed / kept:>6.2f}{verdict}")


if __name__ == "__main__":
    main()
