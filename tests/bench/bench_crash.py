"""The work a crash costs a checkpointed job, beside the bound issue 20 gives for it: "the work
lost by a crash is at most the interval plus the dead timeout plus the restore".

A namespace cluster as tests/test_checkpoint.py builds one (a: the home, no CRIU; b and c
with CRIU).  A job homed on a runs on b with ``--checkpoint-every`` I and counts work units
of a tenth of a second; b loses power (every process in its namespace SIGKILLed, as
test_checkpoint.power_off does) at a random moment after its first checkpoint; a restores
it on c from its last checkpoint.  Measured from the job's own record of each unit (a side
file it opens, appends one line to and closes per unit, so that the restore's cut-back of
the files it has open leaves it alone):

- re-done: the work done before the crash that is done again after the restore, in
  seconds of the first run (the crash less the first writing of the first unit re-done);
- back: from the crash until the job's units pass the last one done before the crash;

beside the home's own figures from its log: the verdict (crash to "node b is dead") and the
restore ("restoring it from its checkpoint" to "went back to its checkpoint", the wait for
the lease of the dead node to run out included).  The bound is I + verdict + restore; the
one with the configured dead_timeout in place of the measured verdict is printed too.
Needs root and a working CRIU (tests/install-criu).

    unshare --net -- sh -c 'ip link set lo up &&
        exec .venv/bin/python tests/bench/bench_crash.py [--every 5] [--repeat 3]'
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from omuscd import config
from tests.cluster import namespace_cluster, run_job, wait_for
from tests.test_checkpoint import (
    checkpoint_taken,
    extra,
    job_view,
    power_off,
    restart,
)

UNIT = 0.1  # seconds of work per unit
VERBOSE = False  # -v: the home's log from each crash on
PHASE: float | None = None  # --phase: the crash this long after the first checkpoint
# Counts units of argv[2] seconds forever: each one appended to argv[1] (opened and closed
# per unit) with the wall clock (one machine: the same clock on every node), and printed
COUNTER = """
import sys, time
i = 0
while True:
    time.sleep(float(sys.argv[2]))
    with open(sys.argv[1], "a") as f:
        f.write(f"{i} {time.time():.4f}\\n")
    print(i, flush=True)
    i += 1
"""


def units(path: Path) -> list[tuple[int, float]]:
    """Each unit the job recorded, in the order written (a unit re-done appears twice)."""
    out = []
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            out.append((int(parts[0]), float(parts[1])))
    return out


def once_each(out: bytes) -> bool:
    """The client's output holds each unit once, in order: what the restore re-did was cut
    back from it (the last line may be cut short by the kill)."""
    lines = out.decode().split("\n")[:-1]
    return [int(x) for x in lines] == list(range(len(lines))) and len(lines) > 0


def stamp(line: str) -> float:
    """The time a daemon's log line was logged (asctime, local time, in milliseconds)."""
    return datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def logged(log: str, needle: str, after: float) -> tuple[float, str]:
    """The first line of a daemon's ``log`` holding ``needle`` logged at or after ``after``
    and its time; (nan, "") when none."""
    for line in log.splitlines():
        if needle in line and stamp(line) >= after - 0.001:
            return stamp(line), line
    return float("nan"), ""


def lease_wait(log: str, after: float) -> float:
    """How long the home waited for the dead node's lease to run out before restoring (its
    "its lease on b runs out in Ns" line logged after ``after``), 0 if it did not."""
    _, line = logged(log, "its lease on b runs out in", after)
    return float(line.rsplit(" in ", 1)[1].split("s;")[0]) if line else 0.0


def one_crash(cluster, every: float, tag: str, tmp: Path) -> dict[str, float]:
    """Run the counter on b homed on a, power b off at a random moment after the first
    checkpoint, wait for the job to pass the crash point on another node; the figures."""
    lan, _, _, n = cluster
    side = tmp / f"{tag}.units"
    p = run_job(n["a"], ["--node", "b", "--checkpoint-every", f"{every}s"],
                "/usr/bin/python3", "-c", COUNTER, str(side), str(UNIT), tag)
    try:
        wait_for(lambda: job_view(n["a"], tag) or p.poll() is not None, 10, "the job")
        assert p.poll() is None, p.communicate()
        wait_for(lambda: checkpoint_taken(n["a"], tag), 4 * every + 20, "a first checkpoint")
        time.sleep(random.uniform(0, every) if PHASE is None else PHASE)  # a random phase
        crash = time.time()
        power_off(lan, n, "b")
        before = units(side)
        last = max(u for u, _ in before)
        wait_for(lambda: max(u for u, _ in units(side)) > last + 1, 120,
                 "the job to pass the crash point again")
        view = job_view(n["a"], tag)
        assert n["a"].ctl(f"kill {view['id']} KILL").ok
        out, _ = p.communicate(timeout=30)
    finally:
        p.kill()
    seen = units(side)
    after = seen[len(before):]
    first_redo = after[0][0]  # the restored job's first unit: the checkpoint's next one
    first_time = {u: t for u, t in reversed(before)}
    passed = next(t for u, t in after if u > last)
    log = n["a"].log()
    if VERBOSE:
        print(f"-- {tag}: crash at {datetime.fromtimestamp(crash).time()}, the home's log:")
        since = datetime.fromtimestamp(crash - 0.5).isoformat(" ")[:23].replace(".", ",")
        for line in log.splitlines():
            if line[:2] == since[:2] and line[:23] >= since:
                print("  ", line)
    dead = logged(log, "(b) is dead", crash)[0]
    restoring = logged(log, "restoring it from its checkpoint", crash)[0]
    back_at = logged(log, "went back to its checkpoint", crash)[0]
    lease = lease_wait(log, crash)
    return {"node": view["node_name"], "redo": crash - first_time.get(first_redo, crash),
            "output": "ok" if once_each(out) else "BAD",
            "units": last - first_redo + 1, "back": passed - crash, "verdict": dead - crash,
            "restore": back_at - restoring, "lease": lease}


def load() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--every", type=float, default=5.0, help="checkpoint interval, seconds")
    ap.add_argument("--repeat", type=int, default=3, help="crashes measured")
    ap.add_argument("-v", action="store_true", help="the home's log from each crash on")
    ap.add_argument("--phase", type=float, default=None,
                    help="crash this long after the first checkpoint (default: at random "
                    "within the interval)")
    args = ap.parse_args()
    global VERBOSE, PHASE
    VERBOSE, PHASE = args.v, args.phase
    dead_timeout = float(config.defaults()["dead_timeout"])
    tmp = Path(tempfile.mkdtemp(prefix="omb-crash-"))
    os.chmod(tmp, 0o755)
    rows = []
    try:
        with namespace_cluster("abc", extra=extra, prefix=f"omc{os.getpid() % 10000}x",
                               leftovers="omuscd-crash-bench") as cluster:
            for r in range(args.repeat):
                tag = f"omuscd-crash-bench-{r}"
                try:
                    rows.append((one_crash(cluster, args.every, tag, tmp), load()))
                finally:
                    restart(cluster)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"work lost by a crash of the job's node (checkpoint every {args.every:g}s, "
          f"dead_timeout {dead_timeout:g}s; one machine, 2 cores)")
    print(f"{'run':>3} {'re-done':>8} {'<= I':>4} {'units':>5} {'verdict':>8} {'lease':>6} "
          f"{'restore':>8} {'back':>7} {'bound':>7} {'holds':>5} {'bound(cfg)':>10} {'on':>3} "
          f"{'output':>6}  load")
    for i, (f, up) in enumerate(rows):
        bound = args.every + f["verdict"] + f["restore"]
        cfg_bound = args.every + dead_timeout + f["restore"]
        holds = "yes" if f["back"] <= bound else "NO"
        print(f"{i + 1:>3} {f['redo']:>7.2f}s {'yes' if f['redo'] <= args.every else 'NO':>4} "
              f"{f['units']:>5} {f['verdict']:>7.2f}s {f['lease']:>5.2f}s {f['restore']:>7.2f}s "
              f"{f['back']:>6.2f}s {bound:>6.2f}s {holds:>5} {cfg_bound:>9.2f}s {f['node']:>3} "
              f"{f['output']:>6}  {up.split('load average:')[-1].strip()}")
    print("re-done: work done before the crash and done again (seconds of the first run; "
          "units of 0.1s), <= I: within the interval; verdict: crash until the home declares "
          "b dead; lease: of restore, the wait for the dead node's lease to run out (so that "
          "the job never runs twice); back: crash until the job passes its crash point; "
          "bound: interval + verdict + restore; bound(cfg): with dead_timeout for the "
          "verdict; output: the client's output holds each unit once")


if __name__ == "__main__":
    main()
