"""Signals for a job at its home: sent where it runs, or held while it moves.

A signal sent to a job during a move went to the frozen copy the move then killed (while
the job ran on at the target), and the sender was told it was sent.  At the job's home
(which asks for every move of its jobs) a signal for a moving job is held on its record,
in order, and delivered once the move ends, either way: where the job runs then (the
target, or the source it resumed on).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from omuscd.jobs.books import JobBooks
from omuscd.jobs.record import FINAL, MIGRATING, Job, JobError, NodeUnreachable

if TYPE_CHECKING:
    from omuscd.jobs.host import Host

log = logging.getLogger("omuscd.jobs")

RETRY = 1.0  # seconds between tries to deliver a held signal to a node not reached
#: tries before a held signal is dropped: a node unreachable that long has been declared
#: dead (the job is then lost or revived) unless it is reachable to SWIM but not to us
TRIES = 60


class JobSignals(JobBooks):
    """Signalling the jobs of this home (a part of HomeJobs)."""

    def __init__(self, host: Host):
        super().__init__(host)
        self.delivering: set[str] = set()  # jobs whose held signals are being delivered

    if TYPE_CHECKING:  # given by GuestJobs and HomeJobs
        async def signal_local(self, job: Job, sig: int) -> None: ...

        async def _forward_act(self, node: int, job_id: str, action: str, uid: int,
                               sig: int, to: str = "") -> str: ...

    async def _send_signal(self, job: Job, uid: int, sig: int, fresh: bool = False) -> None:
        """Signal the job where it runs: here, on the link following it, or (``fresh``: it
        has just moved, the link may still be the old node's) through the node running
        it."""
        if job.node == self.me:
            await self.signal_local(job, sig)
            return
        link = None if fresh else self.links.get(job.id)
        if link is not None:
            await link.send({"op": "signal", "sig": sig})
        else:  # not followed yet (it has just moved): ask the node running it
            await self._forward_act(job.node, job.id, "kill", uid, sig)

    def must_hold(self, job: Job) -> bool:
        """Whether a signal for this job of this home waits for its move to end: once a
        move here has frozen it (MIGRATING: before, it still runs here and takes the
        signal, which a job that ends then stops the move), for the whole move when it
        runs elsewhere (the home does not see when the source freezes it), and while
        signals held before are not all out (they go first)."""
        if job.home != self.me:
            return False
        if job.held:
            return True
        if job.node == self.me:
            return job.state == MIGRATING
        return self.moves.moving(job.id)

    def hold(self, job: Job, sig: int) -> str:
        """A signal for a job that is moving: sent now, it went to the frozen copy the
        move kills, and was lost.  Queued in order, it goes where the job runs once the
        move ends."""
        job.held.append(sig)
        log.info("job %s: signal %d held until its move ends", job.id, sig)
        return f"signal {sig} held for job {job.id} until its move ends"

    def release_held(self, job: Job) -> None:
        """A move of this job ended (either way): deliver the signals held meanwhile."""
        if job.held and job.id not in self.delivering:
            self.delivering.add(job.id)
            self._nursery().start_soon(self._deliver_held, job)

    async def _deliver_held(self, job: Job) -> None:
        """Each held signal once, in order, to the job wherever it runs now; those sent
        while this runs queue behind (see act).  A job that ended during the move takes
        them with it; one moving again keeps them for that move's end."""
        try:
            await self._deliver_each(job)
        finally:
            self.delivering.discard(job.id)

    async def _deliver_each(self, job: Job) -> None:
        tries = 0  # of the first held signal, to a node that could not be reached
        while job.held and not self.moves.moving(job.id):
            if job.state in FINAL:
                log.info("job %s ended (%s) during its move: held signal(s) %s dropped "
                         "with it", job.id, job.state, job.held)
                job.held = []
                return
            sig = job.held[0]
            try:
                await self._send_signal(job, job.owner.uid, sig, fresh=True)
                log.info("job %s: held signal %d delivered on %s", job.id, sig,
                         job.node_name)
                tries = 0
            except NodeUnreachable as e:  # nothing reached the node: sent again
                tries += 1
                if tries < TRIES:
                    log.warning("job %s: held signal %d not delivered yet: %s; again in "
                                "%gs", job.id, sig, e, RETRY)
                    await trio.sleep(RETRY)
                    continue
                log.warning("job %s: held signal %d dropped: %s, %d times", job.id, sig, e,
                            tries)
                tries = 0
            except JobError as e:  # it ended where it ran before its end came home
                log.info("job %s: held signal %d dropped: %s", job.id, sig, e)
            job.held.pop(0)
