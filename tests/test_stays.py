"""A job's stays on one node: the watcher of an earlier stay must not end a later one.

A job moved away and brought back within one poll interval: the watcher of its first stay
here woke after the second had begun, saw the first stay's frozen copy killed (signal 9)
and recorded that as the job's end; the user's `omuscd run` exited 137 (seen in CI)."""

from __future__ import annotations

import os

import trio
import trio.testing

from omuscd.jobs.process import watch
from omuscd.jobs.record import RUNNING, Job, Owner
from omuscd.jobs.spool import Spool


def test_the_watcher_of_an_earlier_stay_does_not_end_a_job_brought_back(tmp_path):
    job = Job("10.8", Owner.of_uid(os.getuid()), 10, 10, "a", ["sleep", "30"], "/")
    job.state = RUNNING
    old_copy_dead = trio.Event()
    ended: list[bool] = []

    def poll() -> int | None:
        return -9 if old_copy_dead.is_set() else None

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            async def first_stay() -> None:
                ended.append(await watch(job, Spool(str(tmp_path)), poll,
                                         old_copy_dead.wait, first))

            first = job.new_stay()
            nursery.start_soon(first_stay)
            await trio.sleep(1)
            job.node_changed = True  # moved away: the frozen copy here is killed quietly
            job.new_stay()  # and brought back before the first stay's watcher woke
            job.state = RUNNING
            old_copy_dead.set()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0.01))
    assert ended == [False]
    assert job.state == RUNNING and job.exit is None
