import os
import signal
import subprocess
import sys
import time

import psutil

from omuscd import proctab
from omuscd.load import RunQueue, compute_load


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
        queue = RunQueue()
        counts = [queue.count({cpu}) for _ in range(5)]
        assert sorted(counts)[2] == 3, counts
        # and what the caller says is its own (the daemon: each job's init)
        counts = [queue.count({cpu}, leave_out={hogs[0].pid}) for _ in range(5)]
        assert sorted(counts)[2] == 2, counts
    finally:
        os.killpg(criu.pid, 9)
        criu.wait()
        for h in hogs:
            h.kill()
            h.wait()



def test_a_task_caught_running_is_not_load_until_it_keeps_running():
    """Counted are the tasks that stayed runnable, not whatever was running at the instant
    of the count: a process that slept most of its life and has just woken (a daemon, a
    shell, a client) is not load; if it goes on using the CPU it is, at the next count."""
    cpu = max(os.sched_getaffinity(0))
    pin = lambda: os.sched_setaffinity(0, {cpu})  # noqa: E731
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=pin)
            for _ in range(2)]
    waker = subprocess.Popen([sys.executable, "-c",
                              "import sys, time; time.sleep(1.5); print(flush=True)\n"
                              "while True: pass"], stdout=subprocess.PIPE, preexec_fn=pin)
    try:
        queue = RunQueue()
        time.sleep(0.5)
        assert queue.count({cpu}) == 2  # the hogs; the waker sleeps
        waker.stdout.readline()  # it has woken and spins from now on
        time.sleep(0.1)
        state = proctab.scan()[waker.pid].state
        first = queue.count({cpu})  # runnable now, but for a small part of its life
        time.sleep(0.6)
        second = queue.count({cpu})  # runnable all the time since the last count
        assert (state, first, second) == (b"R", 2, 3)
    finally:
        for h in [*hogs, waker]:
            h.kill()
            h.wait()


def test_a_job_let_go_after_being_stopped_counts_at_once():
    """A job restored stopped by CRIU and let go when its move commits (or one resumed
    after a failed move) was stopped for most of its life so far: judged on that life, it
    looked like a task caught running and a node with two jobs said one.  Told that the
    job has been let go, the count takes it from that moment."""
    cpu = max(os.sched_getaffinity(0))
    pin = lambda: os.sched_setaffinity(0, {cpu})  # noqa: E731
    steady, landed = (subprocess.Popen([sys.executable, "-c", "while True: pass"],
                                       preexec_fn=pin) for _ in range(2))
    try:
        os.kill(landed.pid, signal.SIGSTOP)  # as CRIU restores it: created, then stopped
        queue = RunQueue()
        time.sleep(0.5)
        # one count each time (a second one at once would judge it afresh anyway), of
        # these two alone: whatever else the machine runs is left out
        others = set(proctab.scan()) - {steady.pid, landed.pid}
        assert queue.count({cpu}, leave_out=others) == 1  # the steady one
        os.kill(landed.pid, signal.SIGCONT)
        queue.resumed([landed.pid])
        first = queue.count({cpu}, leave_out=others)  # as the daemon counts, at once
        time.sleep(0.3)
        later = queue.count({cpu}, leave_out=others)
        assert (first, later) == (2, 2)
    finally:
        for h in (steady, landed):
            h.kill()
            h.wait()


def test_each_computing_thread_of_a_job_is_counted():
    """A process's own state is its first thread's: one that waits for three threads
    computing (OpenMP, Java, Python's hashlib) is three tasks wanting the CPU, not none."""
    cpu = max(os.sched_getaffinity(0))
    code = ("import hashlib, threading\n"
            "data = bytes(32 << 20)\n"
            "def spin():\n"
            "    while True:\n"
            "        hashlib.sha256(data).digest()  # without the GIL\n"
            "ts = [threading.Thread(target=spin) for _ in range(3)]\n"
            "[t.start() for t in ts]\n"
            "print(flush=True)\n"
            "[t.join() for t in ts]\n")
    job = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                           preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    try:
        job.stdout.readline()
        queue = RunQueue()
        time.sleep(0.3)
        counts = []
        for _ in range(5):
            counts.append(queue.count({cpu}))
            time.sleep(0.2)
        assert proctab.scan()[job.pid].state == b"S"  # its first thread waits
        assert sorted(counts)[2] == 3, counts
    finally:
        job.kill()
        job.wait()


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
    monkeypatch.setattr(load.RunQueue, "count", lambda self, cpus, me=None, leave_out=(): 0)
    s = load.Sampler([0])
    s.new_window()
    assert s.sample().util == 0.0
    assert load.busy_percent([t(0.0, 0.0, 0.0)], [t(9.0, 11.0, 0.0)]) == [45.0]


def test_a_sample_too_short_to_measure_leaves_the_figure_counted_at_the_change(
        monkeypatch):
    """A regular sample a few milliseconds after jobs came or went spans no clock tick of
    CPU time: measured, it said idle, and a node running two jobs gossiped 0.00 (another
    job came to it).  The figure counted at the change stands until there is time enough
    to measure."""
    from collections import namedtuple

    from omuscd import load

    t = namedtuple("t", "user idle iowait")
    times = iter([[t(0.0, 0.0, 0.0)],      # the last sample
                  [t(9.0, 1.0, 0.0)],      # the change
                  [t(9.0, 1.0, 0.0)],      # a regular sample 5 ms later: no tick passed
                  [t(9.3, 1.0, 0.0)]])     # the extra sample, 0.3 s on: busy
    monkeypatch.setattr(load.psutil, "cpu_times", lambda percpu: next(times))
    monkeypatch.setattr(load.RunQueue, "count", lambda self, cpus, me=None, leave_out=(): 2)
    monkeypatch.setattr(load, "runnable_at_most", lambda: 2)
    s = load.Sampler([0])
    s.new_window()
    assert s.at_once().load == 2.0  # two jobs wanting the one lent CPU
    assert s.sample().load == 2.0  # not 0.00
    settled = s.sample()
    assert (settled.load, settled.util) == (2.0, 100.0)


def test_a_busy_machine_is_scanned_only_if_its_runnable_tasks_can_raise_the_load(
        monkeypatch):
    """Two CPUs kept busy by two tasks (another user's build beside an idle daemon) are
    load 1.0 whatever the scan of /proc finds, which cost the idle daemon half its CPU;
    a third runnable task may make it more, and is looked for if it is there at two
    samples running (not if many tasks were runnable for a moment)."""
    from collections import namedtuple

    from omuscd import load

    t = namedtuple("t", "user idle iowait")
    times = {"now": [t(0.0, 0.0, 0.0), t(0.0, 0.0, 0.0)]}
    monkeypatch.setattr(load.psutil, "cpu_times", lambda percpu: times["now"])
    s = load.Sampler([0, 1])
    times["now"] = [t(1.0, 0.0, 0.0), t(1.0, 0.0, 0.0)]  # both CPUs busy since
    scans = []

    def count(self, cpus, me=None, leave_out=()):
        scans.append(cpus)
        return 3

    monkeypatch.setattr(load.RunQueue, "count", count)
    monkeypatch.setattr(load, "runnable_at_most", lambda: 2, raising=False)
    assert (s.sample().load, scans) == (1.0, [])
    times["now"] = [t(2.0, 0.0, 0.0), t(2.0, 0.0, 0.0)]
    monkeypatch.setattr(load, "runnable_at_most", lambda: 9)
    assert (s.sample().load, scans) == (1.0, [])  # 9 runnable for a moment: not load
    times["now"] = [t(3.0, 0.0, 0.0), t(3.0, 0.0, 0.0)]
    monkeypatch.setattr(load, "runnable_at_most", lambda: 3)
    assert (s.sample().load, scans) == (1.5, [{0, 1}])  # 3 at two samples: looked for
    assert isinstance(load.runnable_at_most(), int)


def test_counting_runnable_tasks_takes_a_bounded_share_of_the_time(monkeypatch):
    """A scan of /proc that takes 10 ms (hundreds of processes: 70 daemons on one
    machine each scanned every second, and took the whole machine) is made again only
    after 10 ms / SCAN_SHARE; meanwhile the last count stands, but never above the tasks
    runnable on the machine now."""
    from collections import namedtuple

    from omuscd import load

    t = namedtuple("t", "user idle iowait")
    times = {"now": [t(0.0, 0.0, 0.0)]}
    monkeypatch.setattr(load.psutil, "cpu_times", lambda percpu: times["now"])
    s = load.Sampler([0])
    scans = []

    def count(self, cpus, me=None, leave_out=()):
        scans.append(cpus)
        end = time.thread_time() + 0.01
        while time.thread_time() < end:  # a scan of many processes
            pass
        return 4

    monkeypatch.setattr(load.RunQueue, "count", count)
    most = {"now": 6}
    monkeypatch.setattr(load, "runnable_at_most", lambda: most["now"])
    for k in range(1, 4):
        times["now"] = [t(float(k), 0.0, 0.0)]  # the one lent CPU busy
        assert s.sample().load == 4.0
    assert len(scans) == 1 and s.next_scan > time.monotonic() + 1.0
    most["now"] = 2  # two of the four have ended since
    times["now"] = [t(5.0, 0.0, 0.0)]
    assert (s.sample().load, len(scans)) == (2.0, 1)
    s.next_scan = time.monotonic()  # its time has come
    most["now"] = 6
    times["now"] = [t(6.0, 0.0, 0.0)]
    assert (s.sample().load, len(scans)) == (4.0, 2)


def test_a_change_in_load_is_told_at_once(monkeypatch):
    """When jobs come or go the tasks that keep the lent CPUs wanted are counted there and
    then, a fall (a node whose job ended is idle now) as well as a rise (a node that has
    just started eight jobs has eight, not what its last sample saw)."""
    from omuscd import load

    runnable = {"now": 4}
    monkeypatch.setattr(load.RunQueue, "count",
                        lambda self, cpus, me=None, leave_out=(): runnable["now"])
    s = load.Sampler([0])
    s.last = load.LoadSample(4.0, 100.0, 4, 1000)
    runnable["now"] = 3
    assert s.at_once().load == 3.0 and s.last.runq == 3
    runnable["now"] = 8
    assert s.at_once().load == 8.0 and s.last.runq == 8
    runnable["now"] = 0
    assert s.at_once().load == 0.0


def test_a_job_tree_is_read_from_the_kernels_lists_of_children():
    # a shell whose children are a sleeper, a thread-spawning process with a child of
    # its own (found through its second thread's list too), and a grandchild
    script = ("import os, threading, time\n"
              "def spawn():\n"
              "    os.spawnlp(os.P_NOWAIT, 'sleep', 'sleep', '30')\n"
              "t = threading.Thread(target=spawn); t.start(); t.join()\n"
              "time.sleep(30)\n")
    top = subprocess.Popen(["sh", "-c", f"sleep 30 & {sys.executable} -c \"$0\" & "
                            "sh -c 'sleep 30 & wait' & wait", script],
                           start_new_session=True)
    try:
        want: set[int] = set()
        for _ in range(100):
            want = {top.pid, *(c.pid for c in psutil.Process(top.pid).children(True))}
            if len(want) == 6:
                break
            time.sleep(0.05)
        assert len(want) == 6
        got = proctab.tree(top.pid)
        assert got[0] == top.pid and sorted(got) == sorted(want)
    finally:
        # the whole group at once: killed one by one, a shell whose child died first
        # could exit and be reaped before its own turn came (ESRCH)
        os.killpg(top.pid, 9)
        top.wait()
    assert proctab.tree(top.pid) == []
