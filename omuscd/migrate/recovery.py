"""Moves cut short by a restart: a job the daemon had frozen for a move when it stopped is
still stopped here; the target is asked whether it runs the job, and the copy here goes or
resumes accordingly."""

from __future__ import annotations

import logging
import os
import signal
from typing import TYPE_CHECKING, Any

import trio

from omuscd.jobs.books import is_job_init
from omuscd.jobs.record import (
    Job,
)
from omuscd.migrate.books import MoveBooks, MoveHost
from omuscd.migrate.home import MoveHome
from omuscd.migrate.source import Source
from omuscd.migrate.tree import renice_tree, signal_tree
from omuscd.proctab import tree

if TYPE_CHECKING:
    from omuscd.jobs.node import JobControl

log = logging.getLogger("omuscd.migrate")


class Recovery:
    """Settling the moves a restart cut short."""

    def __init__(self, jc: JobControl, host: MoveHost, books: MoveBooks, source: Source,
                 home: MoveHome):
        self.jc = jc
        self.host = host
        self.books = books
        self.source = source
        self.home = home

    async def settle(self, job: Job, mark: dict[str, Any]) -> None:
        """This daemon stopped while it moved ``job``, which it had frozen: the job is
        still stopped here.  If the target took it before the move was cut short, this
        copy goes and the job is followed there; else it resumes here.  Never two
        copies: the target runs it only once it has confirmed it to us or, asked now,
        says so; and a target that never got it has killed its copy (post-copy)."""
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
                self.host.mover.relock(pid)  # its file locks, lent for the move
                signal_tree(pid, signal.SIGCONT)
                self.host.sampler.resumed(tree(pid))
            self.jc.watch_again(job)
        self.books.unmark(job.id)
