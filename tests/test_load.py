import os
import subprocess
import sys
import time

from omuscd.load import compute_load, runnable_on


def test_load_is_busy_share_or_runnable_per_lent_cpu():
    assert compute_load([30.0, 0.0], [0], None) == (0.3, 30.0)
    assert compute_load([100.0, 5.0], [0], 4) == (4.0, 100.0)  # four want one CPU
    assert compute_load([100.0, 100.0], [0, 1], 1) == (1.0, 100.0)
    assert compute_load([50.0], [7], None) == (0.5, 50.0)  # a CPU we do not have: all


def test_runnable_tasks_are_counted_on_their_cpu():
    cpu = max(os.sched_getaffinity(0))
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"],
                             preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
            for _ in range(3)]
    try:
        time.sleep(0.5)
        counts = [runnable_on({cpu}) for _ in range(5)]
        assert max(counts) >= 3, counts
    finally:
        for h in hogs:
            h.kill()
            h.wait()
