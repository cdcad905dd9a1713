import os
import subprocess
import sys
import time

from omuscd import proctab
from omuscd.load import compute_load, runnable_on


def test_load_is_busy_share_or_runnable_per_lent_cpu():
    assert compute_load([30.0, 0.0], [0], None) == (0.3, 30.0)
    assert compute_load([100.0, 5.0], [0], 4) == (4.0, 100.0)  # four want one CPU
    assert compute_load([100.0, 100.0], [0, 1], 1) == (1.0, 100.0)
    assert compute_load([50.0], [7], None) == (0.5, 50.0)  # a CPU we do not have: all


def test_runnable_tasks_are_counted_on_their_cpu(tmp_path):
    cpu = max(os.sched_getaffinity(0))
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"],
                             preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
            for _ in range(3)]
    # and one that looks like CRIU run by this process (the daemon), with a process it is
    # restoring under it: a move, not load
    (tmp_path / "criu").symlink_to("/bin/sh")
    spin = f"{sys.executable} -c 'while True: pass'"
    criu = subprocess.Popen([str(tmp_path / "criu"), "-c", f"{spin} & {spin} & wait"],
                            preexec_fn=lambda: (os.setsid(), os.sched_setaffinity(0, {cpu})))
    try:
        time.sleep(0.5)
        under = [p for p in proctab.scan().values() if p.ppid == criu.pid]
        assert len(under) == 2, under
        # the middle of five: a transient process of the machine's own may add one
        counts = [runnable_on({cpu}) for _ in range(5)]
        assert sorted(counts)[2] == 3, counts
    finally:
        os.killpg(criu.pid, 9)
        criu.wait()
        for h in hogs:
            h.kill()
            h.wait()



def test_the_extra_sample_measures_the_time_after_the_change_alone(monkeypatch):
    """Busy until a job ended, idle since: the sample after the change says idle (the
    window since the last regular sample would say 45 % busy)."""
    from collections import namedtuple

    from omuscd import load

    t = namedtuple("t", "user idle iowait")
    times = iter([[t(0.0, 0.0, 0.0)],    # the last sample
                  [t(9.0, 1.0, 0.0)],    # the change: 90 % busy until then
                  [t(9.0, 11.0, 0.0)]])  # the extra sample: idle since
    monkeypatch.setattr(load.psutil, "cpu_times", lambda percpu: next(times))
    monkeypatch.setattr(load, "runnable_on", lambda cpus, me=None: 0)
    s = load.Sampler([0])
    s.new_window()
    assert s.sample().util == 0.0
    assert load.busy_percent([t(0.0, 0.0, 0.0)], [t(9.0, 11.0, 0.0)]) == [45.0]


def test_a_fall_in_load_is_told_at_once_a_rise_waits_for_the_settled_sample(monkeypatch):
    """When jobs come or go the runnable tasks are counted there and then; a fall is
    believed (a node whose job ended is idle now), a rise is not (a snapshot at the end of
    a move catches the daemons and CRIU still running)."""
    from omuscd import load

    runnable = {"now": 4}
    monkeypatch.setattr(load, "runnable_on", lambda cpus, me=None: runnable["now"])
    s = load.Sampler([0])
    s.last = load.LoadSample(4.0, 100.0, 4, 1000)
    runnable["now"] = 3
    assert s.at_once().load == 3.0 and s.last.runq == 3
    runnable["now"] = 5
    assert s.at_once().load == 3.0  # a rise: the settled sample will say
    runnable["now"] = 0
    assert s.at_once().load == 0.0
