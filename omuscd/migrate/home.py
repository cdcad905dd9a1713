"""The home side of a move: the job's home node chooses the target, checks the job may go,
has the source move it (or, for a --restartable job without CRIU, stops it and runs it again
from the start there), and keeps the books of where it runs."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from omuscd.balance import policy as balance
from omuscd.channel import ChannelError
from omuscd.cluster.rpc import error_text
from omuscd.events import CHECKING, DONE, Event, Progress
from omuscd.jobs.record import (
    RUNNING,
    STDERR,
    STDOUT,
    Job,
    JobError,
)
from omuscd.migrate.books import MoveBooks, MoveHost
from omuscd.migrate.source import Source
from omuscd.migrate.transfer import (
    RESTORE_TIMEOUT,
    STEP_TIMEOUT,
)

if TYPE_CHECKING:
    from omuscd.jobs.node import JobControl

log = logging.getLogger("omuscd.migrate")


class MoveHome:
    """Moves decided at the job's home: choose the target, ask the source, book the result."""

    def __init__(self, jc: JobControl, host: MoveHost, books: MoveBooks, source: Source):
        self.jc = jc
        self.host = host
        self.books = books
        self.source = source

    def choose_target(self, job: Job, where: str) -> int:
        jc = self.jc
        if where == "home":
            return job.home
        if where == "best":
            # the one rule (ClusterView.why_not): a node without CRIU is no candidate
            # for a job that cannot be rerun from the start there
            cands = [c for c in jc.candidates(job) if c.id != job.node]
            if not cands:
                raise JobError("no other node can take the job now")
            return balance.choose_node(cands).id
        if where in (str(jc.me), self.host.name):
            return jc.me
        try:
            node = self.host.members.find(where)
        except ValueError as e:  # a name two nodes share: the id says which
            raise JobError(str(e)) from None
        if node is None:
            raise JobError(f"no node {where!r}")
        return node.id

    async def migrate(self, job: Job, where: str, progress: Progress | None = None) -> str:
        """Move a job whose home is here; returns what happened, for the user.  How far
        it has got goes to ``progress`` (from the source, wherever it is)."""
        if job.id in self.books.moving:
            raise JobError(f"job {job.id} is moving already")
        if job.state != RUNNING:
            raise JobError(f"job {job.id} is {job.state}")
        self.books.moving.add(job.id)
        try:
            return await self._migrate(job, where, progress)
        finally:
            # the one place a move ends at the job's home, either way: the signals held
            # meanwhile go to the job wherever it runs now (see HomeJobs.act)
            self.books.moving.discard(job.id)
            self.jc.release_held(job)

    async def _migrate(self, job: Job, where: str, progress: Progress | None) -> str:
        if job.stay:
            raise JobError(f"job {job.id} cannot move: it was told to stay ('nostay' lets it)")
        if job.stdin:
            raise JobError(f"job {job.id} cannot move: its standard input is a pipe from "
                           "omuscd run (--stdin)")
        target = self.choose_target(job, where)
        if target == job.node:
            raise JobError(f"job {job.id} already runs on {job.node_name}")
        name = self.jc.node_name(target)
        source = job.node
        without = [n for n in (job.node, target) if not self.has_mover(n)]
        if without and not job.restartable:
            names = " and ".join(self.jc.node_name(n) for n in without)
            raise JobError(f"job {job.id} cannot move: no CRIU on {names} (a job started "
                           "with --restartable could be rerun there from the start)")
        self.host.publish([Event("migrating", f"job {job.id} moving from {job.node_name} to "
                              f"{name}", {"job": job.id, "from": job.node, "to": target})])
        if progress is not None:
            progress.update(job.id, CHECKING)
        try:
            if without:
                return await self.restart(job, target)
            if job.node == self.jc.me:
                with self.books.reporting(job.id, progress):
                    stats = await self.source.emigrate(job, target)
            else:
                stats = await self._ask_source(job, target, progress)
        except JobError as e:
            self._remember(job, {"from": source, "to": target, "failed": str(e)})
            self.host.publish([Event("migration-failed", f"job {job.id} stays on "
                                  f"{job.node_name}: {e}", {"job": job.id, "reason": str(e)})])
            raise
        self.moved(job, target)
        if progress is not None:
            progress.update(job.id, DONE)
        # post-copy: how long its memory took to follow, once it ran on the target
        followed = {"followed": round(stats["followed"], 4)} if stats.get("followed") else {}
        self._remember(job, {"from": source, "to": target, "freeze": round(stats["freeze"], 4),
                             "bytes": stats["bytes"], **followed})
        text = (f"job {job.id} migrated to {name}: frozen {stats['freeze']:.3f}s, "
                f"{stats['bytes'] / 1e6:.1f} MB moved" +
                (f" (its memory followed in {stats['followed']:.3f}s)" if followed else ""))
        self.host.publish([Event("migrated", text, {"job": job.id, "to": target,
                                                 "freeze": stats["freeze"],
                                                 "bytes": stats["bytes"], **followed})])
        return text

    def has_mover(self, node_id: int) -> bool:
        if node_id == self.jc.me:
            return self.host.mover.available
        node = self.host.members.nodes.get(node_id)
        return node is not None and "criu" in node.entry["flags"]

    @staticmethod
    def _remember(job: Job, move: dict[str, Any]) -> None:
        job.moves = [*job.moves, {"time": round(time.time(), 3), **move}][-10:]

    async def restart(self, job: Job, target: int) -> str:
        """Move a --restartable job without CRIU: stop it, then run it again from the
        start on the target.  The old copy is gone before the new one starts."""
        jc = self.jc
        env = jc.envs.get(job.id)
        if env is None:
            raise JobError(f"job {job.id}: its environment is not known here any more")
        source, source_name = job.node, job.node_name
        jc.stop_following(job.id)  # the old copy
        if source == jc.me:
            self.source.drop_copy(job, target)
        else:
            try:
                reply = await jc.request(source, {"op": "drop", "job": job.id, "to": target},
                                         STEP_TIMEOUT)
            except ChannelError as e:
                raise JobError(f"cannot stop the job on {source_name}: {e}") from None
            if reply.get("op") != "dropped":
                raise JobError(error_text(reply, "the source refused"))
        for stream in (STDOUT, STDERR):  # its output starts again
            try:
                jc.spool.truncate(job.id, stream)
            except (OSError, ValueError) as e:
                log.warning("job %s: cannot empty its output: %s", job.id, e)
            job.offsets[stream] = 0
        job.generation += 1
        job.transition(RUNNING, node=target, node_name=jc.node_name(target),
                       node_changed=False, pid=None, launcher=None,
                       migrations=job.migrations + 1)
        try:
            if target == jc.me:
                await jc.run_here(job, env)
            else:
                await jc.start_remote(job, env)
        except JobError as e:
            jc.mark_lost(job, f"stopped on {source_name} to rerun on {job.node_name}, "
                         f"which failed: {e}")
            raise
        self._remember(job, {"from": source, "to": target, "restarted": True})
        text = f"job {job.id} restarted from the beginning on {job.node_name} (no CRIU)"
        self.host.publish([Event("migrated", text, {"job": job.id, "to": target,
                                                 "restarted": True})])
        return text

    def moved(self, job: Job, target: int) -> None:
        """The home's books after a move (idempotent: the source's word may come first)."""
        if job.node == target:
            return
        job.transition(RUNNING, node=target, node_name=self.jc.node_name(target),
                       migrations=job.migrations + 1)
        if target == self.jc.me:
            self.jc.stop_following(job.id)
        else:
            self.jc.follow(job)

    async def _ask_source(self, job: Job, target: int,
                          progress: Progress | None = None) -> dict[str, Any]:
        try:
            reply = await self.jc.request(job.node, {"op": "emigrate", "job": job.id,
                                                     "to": target},
                                          RESTORE_TIMEOUT + 2 * STEP_TIMEOUT, progress)
        except ChannelError as e:
            raise JobError(f"node {job.node_name} did not finish the move: {e}") from None
        if reply.get("op") != "migrated":
            raise JobError(error_text(reply))
        return {"freeze": float(reply["freeze"]), "bytes": int(reply["bytes"]),
                "followed": float(reply.get("followed", 0.0))}
