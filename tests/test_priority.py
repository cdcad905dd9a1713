"""While a job is frozen, the daemon's main thread and its CRIU run first (omuscd.priority):
checked on real threads and a real spawned CRIU stand-in that reports how it was started."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import trio

from omuscd.migrate.criu import Criu
from omuscd.priority import is_realtime, urgent

pytestmark = pytest.mark.skipif(os.geteuid() != 0,
                                reason="real-time scheduling needs root (as CRIU does)")


def test_urgent_makes_the_main_thread_realtime_for_its_span_only():
    seen: list[bool] = []
    assert not is_realtime()
    with urgent():
        assert is_realtime()
        with urgent():  # two moves at once: the first to end must not end it
            pass
        assert is_realtime()
        # threads (trio's workers, which start processes) and processes started
        # meanwhile begin as normal tasks
        t = threading.Thread(target=lambda: seen.append(is_realtime()))
        t.start()
        t.join()
        child = subprocess.run([sys.executable, "-c", "import os; print(os.sched_getscheduler(0))"],
                               capture_output=True, text=True, check=True)
    assert seen == [False]
    assert int(child.stdout) == os.SCHED_OTHER
    assert not is_realtime()


def test_criu_dumps_realtime_on_the_cpus_of_the_job(tmp_path: Path):
    """The stand-in, a ``criu swrk`` started before the freeze, records the policy and
    CPUs it has once given its request, then answers that the dump worked."""
    report = tmp_path / "report"
    fake = tmp_path / "criu"
    fake.write_text(f"#!{sys.executable}\nimport os, socket, sys\n"
                    "s = socket.socket(fileno=int(sys.argv[2]))\ns.recv(65536)\n"
                    f"open({str(report)!r}, 'w').write('%d %s' % (os.sched_getscheduler(0), "
                    "sorted(os.sched_getaffinity(0))))\n"
                    "s.send(bytes([0x08, 1, 0x10, 1]))  # criu_resp: DUMP, success\n")
    fake.chmod(0o755)
    cpu = max(os.sched_getaffinity(0))
    job = subprocess.Popen(["sleep", "30"], preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    try:
        trio.run(Criu(str(fake)).dump, job.pid, tmp_path)
    finally:
        job.kill()
        job.wait()
    policy, cpus = report.read_text().split(" ", 1)
    assert int(policy) == os.SCHED_RR
    assert cpus == str([cpu])
    assert not is_realtime()  # the daemon itself was not changed by starting it
