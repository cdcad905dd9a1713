"""Moves and checkpoints cut short by a restart.  A job the daemon had frozen for a move
when it stopped is still stopped here; the target is asked whether it runs the job, and
the copy here goes or resumes accordingly.  Another home's job whose checkpoint was being
taken here was stopped by the lease guard when the daemon died; its home is asked whether
it holds a checkpoint of it, and the copy here thaws, waits for a renewal of its lease,
or goes accordingly."""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import TYPE_CHECKING, Any

import trio

from omuscd.channel import ChannelError
from omuscd.jobs.books import is_job_init
from omuscd.jobs.record import FINAL, Job
from omuscd.migrate.books import MoveBooks, MoveHost
from omuscd.migrate.home import MoveHome
from omuscd.migrate.lease import Holder, frozen_key
from omuscd.migrate.source import Source
from omuscd.migrate.transfer import STEP_TIMEOUT
from omuscd.migrate.tree import renice_tree, signal_tree
from omuscd.proctab import tree

if TYPE_CHECKING:
    from omuscd.jobs.node import JobControl

log = logging.getLogger("omuscd.migrate")


class Recovery:
    """Settling the moves a restart cut short."""

    def __init__(self, jc: JobControl, host: MoveHost, books: MoveBooks, source: Source,
                 home: MoveHome, holder: Holder):
        self.jc = jc
        self.host = host
        self.books = books
        self.source = source
        self.home = home
        self.holder = holder

    async def settle(self, job: Job, mark: dict[str, Any]) -> None:
        """This daemon stopped while it moved ``job``, which it had frozen: the job is
        still stopped here.  If the target took it before the move was cut short, this
        copy goes and the job is followed there; else it resumes here.  Never two
        copies: the target runs it only once it has confirmed it to us or, asked now,
        says so; and a target that never got it has killed its copy (post-copy)."""
        if "checkpoint" in mark:
            await self.settle_checkpoint(job)
            return
        target, nice = mark["target"], mark.get("nice")
        grace = self.host.cfg.dead_timeout + 2 * self.host.cfg.gossip_interval + 1
        with trio.move_on_after(grace):  # until the cluster is heard from
            while self.host.members.nodes.get(target) is None:
                await trio.sleep(0.1)
        there = (target != self.jc.me and self.host.members.nodes.get(target) is not None
                 and await self.source.ask_target(job, target))
        pid = job.pid if job.pid is not None and is_job_init(job.pid) else None
        name = self.jc.node_name(target)
        if there:
            log.warning("job %s: its move to %s was cut short when this daemon stopped, "
                        "and %s runs it: the copy left here goes", job.id, name, name)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)  # the init of its PID namespace: all of it
            if job.home == self.jc.me:
                self.home.moved(job, target)
            else:
                self.source.guest_gone(job, target)
        else:
            log.warning("job %s: its move to %s was cut short when this daemon stopped; "
                        "it resumes here", job.id, name)
            if pid is not None:
                if isinstance(nice, int):
                    renice_tree(pid, nice)
                await self.host.mover.relock(pid)  # its file locks, lent for the move
                signal_tree(pid, signal.SIGCONT)
                self.host.sampler.resumed(tree(pid))
            self.jc.watch_again(job)
        self.books.unmark(job.id)

    async def settle_checkpoint(self, job: Job) -> None:
        """Another home's ``job`` found here at this daemon's start, stopped by the lease
        guard when the daemon died: a checkpoint of it was being taken (its home may have
        got it, and may revive the job elsewhere), or it was leased.  Left stopped (moves,
        checkpoints and the lease's own looks wait) until the home answers whether it
        counts the job here and holds a checkpoint of it: yes, it is held by its lease
        (thawed by the next renewal; never, if the home revives it meanwhile: then
        dropped when the home asks); counted here without a checkpoint, it is thawed now
        (no copy can start elsewhere); counted elsewhere or not at all (revived, lost),
        this copy goes.  A home that does not answer is asked again until it does: the
        job stays stopped, and never runs twice."""
        key = frozen_key(job.id)
        ours = key not in self.books.moving  # else frozen by its lease already
        self.books.moving.add(key)
        self.holder.settling.add(job.id)
        try:
            reply = await self._ask_home(job)
        finally:
            self.holder.settling.discard(job.id)
            if ours and job.id not in self.holder.frozen:
                self.books.moving.discard(key)
        self.books.unmark_checkpoint(job.id)
        if self.jc.guests.get(job.id) is not job or job.node != self.jc.me or (
                job.state in FINAL):
            return  # dropped, fenced or ended meanwhile: nothing of it here to settle
        pid = job.pid if job.pid is not None and is_job_init(job.pid) else None
        home = self.jc.node_name(job.home)
        if pid is None:
            self.jc.watch_again(job)  # it ended meanwhile: its end is read
        elif reply.get("checkpoint") and reply.get("yours"):
            log.warning("job %s: its home %s holds a checkpoint of it: held by its lease, "
                        "frozen until %s renews it", job.id, home, home)
            job.checkpoint = job.checkpoint or {"time": 0.0, "size": 0}
            self.jc.save(job)
            await self.holder.hold(job)
            self.jc.watch_again(job)
        elif reply.get("yours"):
            log.warning("job %s: its home %s holds no checkpoint of it (none reached it "
                        "before this daemon stopped): it runs on", job.id, home)
            if job.checkpoint:
                job.checkpoint = {}
                self.jc.save(job)
            signal_tree(pid, signal.SIGCONT)
            self.host.sampler.resumed(tree(pid))
            self.jc.watch_again(job)
        else:
            log.warning("job %s: its home %s no longer counts it here (revived elsewhere, "
                        "or lost): this copy goes", job.id, home)
            self.source.drop_copy(job, job.home, f"a stale copy: {home} no longer "
                                  "counts it here")

    async def _ask_home(self, job: Job) -> dict[str, Any]:
        """The home's answer to ``has`` for ``job`` (see Target.has), asked every second
        until it gives one, and is not busy with the job; a home too old to say
        (``yours`` missing) is taken as holding a checkpoint: the lease decides."""
        since = time.monotonic()
        told = False
        while True:
            try:
                reply = await self.jc.request(job.home, {"op": "has", "job": job.id},
                                              STEP_TIMEOUT)
                if reply.get("op") == "has" and "yours" not in reply:
                    log.warning("job %s: its home %s runs an older omuscd: held by its "
                                "lease", job.id, self.jc.node_name(job.home))
                    return {"yours": True, "checkpoint": True}
                if reply.get("op") == "has" and not reply.get("busy"):
                    return reply
                why = "busy with it" if reply.get("busy") else str(reply)[:200]
            except ChannelError as e:
                why = str(e)
            if not told and time.monotonic() - since > 30:
                told = True
                log.warning("job %s: stopped until its home %s answers whether it holds a "
                            "checkpoint of it (%s)", job.id, self.jc.node_name(job.home), why)
            await trio.sleep(1)
