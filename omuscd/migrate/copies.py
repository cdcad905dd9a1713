"""What becomes of the copy of a job on the node it ran on, once a move of it is over
or its home says so: resumed (the move failed), rolled back first (the target's copy may
have run: the files it wrote are cut back), dropped (the target runs it, or the home
revived it elsewhere), fenced (its home was declared dead here).  The last phase of
:class:`omuscd.migrate.source.Source`, kept apart so that each reads in one place."""

from __future__ import annotations

import logging
import os
import signal
from typing import TYPE_CHECKING, Any

import trio

from omuscd.channel import Channel, ChannelError
from omuscd.cluster.membership import DEAD
from omuscd.cluster.rpc import refusal
from omuscd.jobs.process import init_pid
from omuscd.jobs.record import FENCED, MIGRATING, MOVED, RUNNING, Job, JobError
from omuscd.migrate import cutback
from omuscd.migrate.books import LEFT, MoveBooks, MoveHost
from omuscd.migrate.transfer import STEP_TIMEOUT
from omuscd.migrate.tree import renice_tree, signal_tree
from omuscd.proctab import tree

if TYPE_CHECKING:
    from omuscd.jobs.node import JobControl

log = logging.getLogger("omuscd.migrate")


class Copies:
    """The copy here after a move: resume, roll back, drop, fence; and the questions to
    the target that decide which."""

    def __init__(self, jc: JobControl, host: MoveHost, books: MoveBooks):
        self.jc = jc
        self.host = host
        self.books = books

    async def roll_back(self, job: Job, nice: int | None, written: list[list[Any]]) -> None:
        """Resume the frozen copy here after a move whose target's copy may have run, and
        is gone now: the files the job writes go back to their sizes at the freeze first
        (as the job's user, never through a link: see omuscd.migrate.cutback), so that what
        the copy here writes again is there once.  A file that cannot be cut back (made a
        link, or shorter, since) is logged and left: the job resumes all the same, as its
        only copy."""
        if job.state == MIGRATING and written:
            try:
                await cutback.cut_back(job, written, "the freeze", every=True)
            except (JobError, OSError) as e:
                log.warning("job %s: %s", job.id, e)
        await self.resume(job, nice)

    async def resume(self, job: Job, nice: int | None) -> None:
        """The move failed: the frozen copy here runs on, its locks given back first.  Its
        move's note goes last: a daemon that dies before it resumed the job finds the
        note at its start and settles the move then (see omuscd.migrate.recovery)."""
        try:
            if job.state != MIGRATING:  # it ended meanwhile: its end is on the books
                return
            if job.pid is not None:
                if nice is not None:  # its own priority back (see _emigrate)
                    renice_tree(job.pid, nice)
                await self.host.mover.relock(job.pid)  # its file locks, lent for the move
                if job.state != MIGRATING:  # it ended while they were given back
                    return
                signal_tree(job.pid, signal.SIGCONT)
                self.host.sampler.resumed(tree(job.pid))
            job.transition(RUNNING)
            log.warning("job %s resumed on this node after a failed move", job.id)
        finally:
            self.books.unmark(job.id)

    def drop_copy(self, job: Job, target: int, why: str = "") -> None:
        """The target runs the job: kill the frozen copy here, without reporting an end
        (``why``: a stale copy of a job revived on ``target``, or fenced, not moved)."""
        self.books.unmark(job.id)
        job.node_changed = True
        # Counted out now, with the load counted in the same instant, while the frozen
        # copy is stopped (not load): the balancer looks again as soon as the move is
        # over, and counted only once the copy's processes were reaped, the node still
        # had it (it sent a fifth job to a node with four).  Counted after the kill, the
        # dying copy showed as runnable.
        self.books.tell(LEFT)
        self.host.jobs_changed()
        # The launcher (unshare, if the job started here) goes first: seeing its child
        # killed it would say so on the job's stderr.  Killing the init (PID 1 of the
        # job's namespace) then ends the namespace.  node_changed keeps both quiet here.
        init = job.pid
        if init is None and job.launcher is not None:
            init = init_pid(job.launcher)
        for victim in (job.launcher, init):
            if victim is not None:
                try:
                    os.kill(victim, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        jc = self.jc
        if job.id in jc.guests:
            self.guest_gone(job, target, why)
        if why:
            log.warning("job %s killed here: %s", job.id, why)
        else:
            log.info("job %s moved to %s", job.id, jc.node_name(target))

    def guest_gone(self, job: Job, target: int, why: str = "") -> None:
        """A guest's record here once ``target`` runs it: finished, as moved there."""
        job.transition(MOVED, node=target,
                       reason=why or f"moved to {self.jc.node_name(target)}")
        self.jc.guests.pop(job.id, None)

    async def ask_target(self, job: Job, target: int) -> bool:
        """After an unanswered commit: does the target run the job?  Ask until it answers
        or is declared dead (then it does not); the copy here stays frozen meanwhile."""
        return bool(await self.target_runs(job, target))

    async def target_runs(self, job: Job, target: int) -> bool | None:
        """As ask_target, but None when the target was declared dead without answering
        (cut off, its copy may still run until it finds itself alone)."""
        while True:
            node = self.host.members.nodes.get(target)
            if node is None or node.state == DEAD:
                return None
            try:
                reply = await self.jc.request(target, {"op": "has", "job": job.id},
                                              STEP_TIMEOUT)
                return bool(reply.get("running"))
            except ChannelError:
                await trio.sleep(1)

    async def serve_drop(self, ch: Channel, msg: dict[str, Any]) -> None:
        """The home asks us to stop a guest: a restartable one it will rerun elsewhere, or
        (``revived``) a stale copy of one it restored elsewhere from its checkpoint while
        this node was cut off.  Only the job's home may ask (``unknown`` if there is no
        such guest here: nothing to drop)."""
        job = self.jc.guests.get(str(msg.get("job")))
        revived = msg.get("revived") is True
        if job is None or job.home != ch.peer_id:
            await ch.send({"op": "unknown"} if job is None and revived else
                          refusal("no such restartable job here" if job is None else
                                  f"job {msg.get('job')} does not run here for that home"))
            return
        if not (job.restartable or revived):
            await ch.send(refusal("no such restartable job here"))
            return
        to = int(msg.get("to", 0))
        self.drop_copy(job, to, f"a stale copy: its home restored it on "
                       f"{self.jc.node_name(to)} while this node was cut off" if revived else "")
        await ch.send({"op": "dropped"})

    def fence(self, job: Job, why: str) -> None:
        """Kill a checkpointed guest whose home this node declared dead (``why``): its
        home, which declares this node dead too, restores it from its checkpoint; two
        copies must never run.  The home, heard again, is told (``attach`` answers
        ``unknown`` with ``fenced``)."""
        self.jc.fenced.add(job.id)
        self.drop_copy(job, job.home, f"{FENCED} {why}")
