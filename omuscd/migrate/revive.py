"""A job whose node died goes back to its latest checkpoint, restored by its home on the
best node that can take it (ClusterView.why_not, through HomeJobs.candidates: the home
included), instead of being lost.

Not before the node it ran on has frozen it: a node declared dead may only be cut off,
its copy running on; the home waits until the lease it granted that node for the job has
run out (:mod:`omuscd.migrate.lease`, Grants.revoke), however soon SWIM's verdict came.

The home plays the source of a move whose images are the checkpoint's (the ``immigrate``
protocol, see :mod:`omuscd.migrate.node`), or restores it itself.  Before that, the files
the job had open for writing are cut back to their sizes at the checkpoint, with the
rights of the job's user and without following a link (see
:mod:`omuscd.migrate.cutback`): CRIU refuses a file
whose size changed, and a file the job appends to would otherwise hold what it wrote after
the checkpoint twice.

Output, exactly once: the node that restores the job gets the output the job had written
at the checkpoint (its spool, cut there); the job writes again what it wrote after it.
The home has more than that (all that came in before the node died) and follows the
restored job from the end of what it has, so the part written again is not delivered
twice (for a job that writes the same bytes again: see omuscd(8), CHECKPOINTS).  Restored
at the home, the home's spool is cut back to the checkpoint's instead, while the restored
job still stands still.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from typing import TYPE_CHECKING, Any

import trio

from omuscd.balance import policy as balance
from omuscd.channel import Channel, ChannelError
from omuscd.cluster.membership import DEAD
from omuscd.cluster.rpc import error_text
from omuscd.events import Event
from omuscd.jobs.checkpoints import CheckpointStore
from omuscd.jobs.record import (
    CHECKPOINTED,
    FINAL,
    RUNNING,
    STDERR,
    STDOUT,
    STREAM_FILES,
    Job,
    JobError,
)
from omuscd.migrate import MoveError, cutback
from omuscd.migrate.books import MoveBooks, MoveHost
from omuscd.migrate.checkpoint import Checkpoints
from omuscd.migrate.lease import Grants
from omuscd.migrate.source import Source
from omuscd.migrate.target import Target
from omuscd.migrate.transfer import CHUNK, IMAGE_STREAM, RESTORE_TIMEOUT, STEP_TIMEOUT
from omuscd.migrate.tree import signal_tree
from omuscd.proctab import tree

if TYPE_CHECKING:
    from omuscd.jobs.node import JobControl

log = logging.getLogger("omuscd.migrate")

MAX_LEFT = 8  # nodes a job's record remembers it was revived away from
DROP_TRIES = 30  # asks (a second apart) to drop a stale copy, while its node is alive

class Revival:
    """Restoring jobs of this home from their checkpoints (see the module's docstring)."""

    def __init__(self, jc: JobControl, host: MoveHost, books: MoveBooks, source: Source,
                 target: Target, checkpoints: Checkpoints, leases: Grants):
        self.jc = jc
        self.leases = leases
        self.host = host
        self.books = books
        self.source = source
        self.target = target
        self.checkpoints = checkpoints

    @property
    def store(self) -> CheckpointStore:
        return self.checkpoints.store

    def revive(self, job: Job, why: str) -> bool:
        """Restore ``job`` (of this home, its node gone: ``why``) from its latest
        checkpoint, in a task; False (nothing done) if it has none."""
        if job.home != self.jc.me or not job.checkpoint or job.state in FINAL:
            return False
        if self.store.latest(job.id) is None:
            return False
        self.jc.nursery.start_soon(self._revive, job, why)  # type: ignore[union-attr]
        return True

    async def _revive(self, job: Job, why: str) -> None:
        """Restore ``job`` elsewhere, but only once the node it ran on has frozen it: its
        lease from this home has run out (omuscd.migrate.lease; SWIM may declare a node
        dead sooner than that), so that it never runs twice."""
        self.checkpoints.cancel(job.id)  # one from the node that died goes no further
        self._left(job)
        gone = job.node
        until = self.leases.revoke(job) if gone != self.jc.me else 0.0
        with trio.move_on_after(RESTORE_TIMEOUT):  # a move under way fails
            while job.id in self.books.moving:
                await trio.sleep(0.1)
        self.books.moving.add(job.id)  # signals for it are held until it runs again
        try:
            self.jc.stop_following(job.id)
            log.warning("job %s: %s; restoring it from its checkpoint", job.id, why)
            # no node may take it yet (this daemon has just started, say): the others
            # are heard from within a dead timeout
            grace = self.host.cfg.dead_timeout + 2 * self.host.cfg.gossip_interval + 1
            with trio.move_on_after(grace):
                while not self._targets(job):
                    await trio.sleep(0.5)
            await self.leases.wait_out(job, until)
            failed = await self._each_checkpoint(job)
            if failed is not None:
                self.jc.mark_lost(job, f"{why}; no checkpoint of it could be restored "
                                  f"({failed})")
            elif gone != self.jc.me:  # heard still (it left, or restarted): drop its copy
                self.jc.nursery.start_soon(self._drop_stale, job, gone)  # type: ignore[union-attr]
        finally:
            self.leases.revived(job.id)
            self.books.moving.discard(job.id)
            self.jc.release_held(job)

    async def _each_checkpoint(self, job: Job, targets: list[int] | None = None) -> str | None:
        """Try the latest checkpoint on each candidate (``targets``, else the best
        first), then the one before; None once the job runs again, else what went
        wrong."""
        tried: list[str] = []
        found = self.store.latest(job.id)
        while found is not None:
            seq, meta = found
            for node in targets if targets is not None else self._targets(job):
                name = self.jc.node_name(node)
                try:
                    await self.restore(job, node, seq, meta)
                    return None
                except (JobError, MoveError, ChannelError, OSError, KeyError, ValueError,
                        trio.TooSlowError) as e:
                    log.warning("job %s: checkpoint %d not restored on %s: %s", job.id, seq,
                                name, e)
                    tried.append(f"{name}: {e}")
            found = self.store.latest(job.id, before=seq)
        return "; ".join(tried)[:600] or "no node can take it"

    # ------------------------------------------------------------------ fencing
    def _left(self, job: Job) -> None:
        """Note the node (and its boot) the revival takes the job from: it may only have
        been cut off, its copy still running (see :meth:`healed`).  Kept on the record,
        so that it outlives a restart of this home."""
        node = self.host.members.nodes.get(job.node)
        if job.node == self.jc.me or node is None:
            return
        gone = [job.node, node.boot]
        if gone not in job.revived_from:
            job.revived_from = [*job.revived_from, gone][-MAX_LEFT:]
            if job.keep is not None:
                job.keep(job)

    def healed(self, nid: int) -> None:
        """Node ``nid`` is heard again (alive again, restarted, or joined as this home
        started): each job of this home revived away from it while it was cut off may
        still run there; it is asked to drop that copy (SIGKILL, no end reported), so the
        job never runs twice.  Its output is not taken: this home follows the job only
        where it runs now."""
        for job in list(self.jc.home.values()):
            if any(gone[0] == nid for gone in job.revived_from):
                self.jc.nursery.start_soon(self._drop_stale, job, nid)  # type: ignore[union-attr]

    async def _drop_stale(self, job: Job, nid: int) -> None:
        """Ask ``nid`` to drop its stale copy of ``job``, until it answers or is dead again
        (then the next time it is heard again)."""
        for _ in range(DROP_TRIES):
            node = self.host.members.nodes.get(nid)
            if node is None or node.state == DEAD:
                return
            if job.node == nid and job.state not in FINAL:
                break  # it runs there now, rightly (moved there since): nothing stale
            try:
                reply = await self.jc.request(nid, {"op": "drop", "job": job.id,
                                                    "to": job.node, "revived": True},
                                              STEP_TIMEOUT)
            except ChannelError as e:
                log.debug("job %s: cannot reach %s to drop its stale copy: %s", job.id,
                          self.jc.node_name(nid), e)
                await trio.sleep(1)
                continue
            if reply.get("op") == "dropped":
                log.warning("job %s: its stale copy on %s, cut off when the job was revived, "
                            "was killed", job.id, self.jc.node_name(nid))
            elif reply.get("op") != "unknown":
                log.warning("job %s: %s refused to drop its stale copy: %s", job.id,
                            self.jc.node_name(nid), error_text(reply))
                await trio.sleep(1)
                continue
            break
        else:
            return
        job.revived_from = [gone for gone in job.revived_from if gone[0] != nid]
        if job.keep is not None:
            job.keep(job)

    async def resume(self, job: Job, where: str) -> str:
        """``resume JOB [NODE|home|best]``: a checkpointed job of this home runs again from
        its latest checkpoint, there (best: the best node that can take it, the one rule;
        home included)."""
        if job.state != CHECKPOINTED:
            raise JobError(f"job {job.id} is {job.state}, not checkpointed")
        if job.id in self.books.moving:
            raise JobError(f"job {job.id} is being resumed already")
        targets = self._where(job, where)
        self.books.moving.add(job.id)
        try:
            failed = await self._each_checkpoint(job, targets)
        finally:
            self.books.moving.discard(job.id)
            self.jc.release_held(job)
        if failed is not None:
            raise JobError(f"job {job.id} stays checkpointed: {failed}")
        return f"job {job.id} resumed on {job.node_name}"

    def _where(self, job: Job, where: str) -> list[int]:
        """The nodes ``where`` names for a resume, best first; JobError if none may."""
        if where == "best":
            targets = self._targets(job)
            if not targets:
                raise JobError("no node can take the job now")
            return targets
        if where in ("home", str(self.jc.me), self.host.name):
            node = self.jc.me
        else:
            try:
                found = self.host.members.find(where)
            except ValueError as e:
                raise JobError(str(e)) from None
            if found is None:
                raise JobError(f"no node {where[:40]!r}")
            node = found.id
        why = self.jc.view.why_not(node, moved=True, home=job.home, rss_mb=job.rss_mb)
        if why:
            raise JobError(f"node {self.jc.node_name(node)} cannot take the job: {why}")
        return [node]

    def _targets(self, job: Job) -> list[int]:
        """The nodes that may take the job, best first (the one rule, the home included)."""
        cands = self.jc.candidates(job)
        order = []
        while cands:
            best = balance.choose_node(cands)
            order.append(best.id)
            cands = [c for c in cands if c.id != best.id]
        return order

    async def restore(self, job: Job, node: int, seq: int, meta: dict[str, Any]) -> None:
        """Restore checkpoint ``seq`` of ``job`` on ``node`` and book it running there."""
        await self.cut_back(job, meta["files"])
        if node == self.jc.me:
            await self._restore_here(job, seq, meta)
        else:
            await self._restore_there(job, node, seq, meta)
            job.revived += 1
            job.revived_to = float(meta["time"])
            job.transition(RUNNING, node=node, node_name=self.jc.node_name(node),
                           cpu_moved=float(meta.get("cpu", job.cpu_moved)), ended=None)
            self.jc.follow(job, anew=True)  # from the end of what this home has
        self._said(job, node, meta)

    def _said(self, job: Job, node: int, meta: dict[str, Any]) -> None:
        at = time.strftime("%H:%M:%S", time.localtime(float(meta["time"])))
        text = (f"job {job.id} went back to its checkpoint of {at} and runs on "
                f"{self.jc.node_name(node)}")
        log.warning("%s", text)
        self.host.publish([Event("revived", text, {"job": job.id, "node": node,
                                                   "checkpoint": meta["time"]})])

    async def cut_back(self, job: Job, files: list[list[Any]]) -> None:
        """Cut the files the job had open for writing back to their checkpoint sizes (see
        omuscd.migrate.cutback)."""
        await cutback.cut_back(job, files)

    async def _restore_here(self, job: Job, seq: int, meta: dict[str, Any]) -> None:
        images = self.books.images_dir(f"{job.id}.revive")
        try:
            d = os.open(images, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:  # in a thread: a big job's images take a while to copy
                await trio.to_thread.run_sync(self.store.copy_to, job.id, seq, d)
            finally:
                os.close(d)
            spool_dir = self.jc.spool.create(job)
            job.cpu_moved = float(meta.get("cpu", job.cpu_moved))
            pid = await self.target._restore(job, images, spool_dir, dict(meta["paths"]))
            # it stands still: the output here goes back to the checkpoint's
            try:
                for stream in (STDOUT, STDERR):
                    self._cut_spool(job, stream, int(meta["out"][str(stream)]))
            except OSError:
                signal_tree(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise
            job.revived += 1
            job.revived_to = float(meta["time"])
            job.ended = None
            signal_tree(pid, signal.SIGCONT)
            self.host.sampler.resumed(tree(pid))
            self.target._adopted(job, pid)
        finally:
            shutil.rmtree(images, ignore_errors=True)

    def _cut_spool(self, job: Job, stream: int, size: int) -> None:
        fd = self.jc.spool._open(job.id, STREAM_FILES[stream], os.O_WRONLY)
        try:
            if os.fstat(fd).st_size > size:
                os.ftruncate(fd, size)
        finally:
            os.close(fd)

    async def _restore_there(self, job: Job, node: int, seq: int, meta: dict[str, Any]) -> None:
        """The home as the source of a move whose images are the checkpoint's."""
        ch = await self.jc.connect(node)
        try:
            await ch.send({"op": "immigrate", "job": job.wire()})
            with trio.fail_after(STEP_TIMEOUT):
                reply = await ch.receive_msg()
            if reply.get("op") != "ready":
                raise JobError(error_text(reply, "refused"))
            await self.checkpoints.send_images(ch, job, seq, meta)
            for stream in (STDOUT, STDERR):
                await self._send_spool(ch, job, stream, int(meta["out"][str(stream)]))
            await ch.send({"op": "restore", "cpu": float(meta.get("cpu", job.cpu_moved)),
                           "nice": None, "paths": dict(meta["paths"])})
            with trio.fail_after(RESTORE_TIMEOUT):
                reply = await ch.receive_msg()
            if reply.get("op") != "restored":
                raise MoveError(error_text(reply, "restore failed"))
            await ch.send({"op": "commit"})
            try:
                with trio.fail_after(STEP_TIMEOUT):
                    running = (await ch.receive_msg()).get("op") == "running"
            except (ChannelError, trio.TooSlowError):
                running = await self.source.ask_target(job, node)
            if not running:
                raise MoveError("it did not take the job")
        finally:
            await ch.aclose()

    async def _send_spool(self, ch: Channel, job: Job, stream: int, size: int) -> None:
        """The first ``size`` bytes of the job's output here (what it had written at the
        checkpoint), as the ``spool`` step of a move."""
        fd = self.jc.spool.open_stream(job.id, stream)
        try:
            if os.fstat(fd).st_size < size:
                raise JobError("this home lacks output from before the checkpoint")
            await ch.send({"op": "spool", "name": str(stream), "size": size})
            sent = 0
            while sent < size:
                chunk = os.pread(fd, min(CHUNK, size - sent), sent)
                if not chunk:
                    raise OSError("the output became shorter while it was sent")
                await ch.send_data(IMAGE_STREAM, chunk)
                sent += len(chunk)
        finally:
            os.close(fd)
