"""The source of a move: the node running the job freezes it, dumps it, sends its images
and spool to the target, and kills its frozen copy only once the target runs the job; on
any failure before that it resumes the job here (see :mod:`omuscd.migrate.node` for the
protocol)."""

from __future__ import annotations

import logging
import os
import shutil
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from omuscd import proctab
from omuscd.channel import Channel, ChannelError
from omuscd.cluster.rpc import error_text
from omuscd.events import DUMPING, FOLLOWING, RESTORING, SENDING
from omuscd.jobs.process import init_pid, starting, tree_usage
from omuscd.jobs.record import (
    MIGRATING,
    RUNNING,
    STDERR,
    STDOUT,
    Job,
    JobError,
)
from omuscd.migrate import MoveError, cutback, postcopy, precheck
from omuscd.migrate.copies import Copies
from omuscd.migrate.lazy import PAGE, PageServer
from omuscd.migrate.page_relay import IDLE_TIMEOUT, send_pages, socket_pair
from omuscd.migrate.transfer import (
    RESTORE_TIMEOUT,
    STEP_TIMEOUT,
    eager_runs,
    send_fd,
    send_file,
    send_sparse,
)
from omuscd.migrate.tree import nice_of, renice_tree
from omuscd.priority import urgent
from omuscd.proctab import tree

if TYPE_CHECKING:
    pass

log = logging.getLogger("omuscd.migrate")

DUMP_NICE = -20  # the nice of a job while CRIU dumps it (see _emigrate)
#: beyond IDLE_TIMEOUT after the last word with a post-copy target that went silent, by
#: when its copy is surely killed (its relay looks every 0.25 s; what the socket's buffer
#: held may still reach it after the last send here returned)
GONE_GRACE = 5.0


def _close_pair(pair: tuple[Any, socket.socket] | None) -> None:
    if pair is not None:
        pair[0].socket.close()
        pair[1].close()


def _lazy_first(name: str) -> bool:
    """Whether the image ``name`` is one ``criu lazy-pages`` reads as it starts, before
    it says it is ready (criu/pstree.c, prepare_dummy_pstree): the inventory, the
    process tree and each process's namespace ids."""
    return name in ("inventory.img", "pstree.img") or (
        name.startswith("ids-") and name.endswith(".img"))


class Steps:
    """Where a move's freeze goes: how long each step took, in order (logged with the
    move, and read by tests/bench/bench_migrate.py).  The target times its own steps and
    sends them with ``restored``; they are logged in their place, named ``target ...``."""

    def __init__(self, start: float):
        self.last = start
        self.took: dict[str, float] = {}

    def mark(self, name: str) -> None:
        """The step ``name`` ends now (a step marked again adds up)."""
        now = trio.current_time()
        self.took[name] = self.took.get(name, 0.0) + now - self.last
        self.last = now

    def target(self, reply: dict[str, Any], name: str) -> None:
        """Mark ``name``, the time until the target's reply, split into the steps it
        timed (``steps`` in its reply) and what is left (the channel, and waits)."""
        theirs = reply.get("steps")
        spent = 0.0
        if isinstance(theirs, dict):
            for step, took in list(theirs.items())[:16]:
                if isinstance(step, str) and isinstance(took, float) and 0 <= took < 1e6:
                    self.took[f"target {step[:40]}"] = took
                    spent += took
        now = trio.current_time()
        self.took[name] = max(0.0, now - self.last - spent)
        self.last = now

    def resumed(self, ago: Any) -> float:
        """The target says the job has run ``ago`` seconds already (it resumed the job,
        then took it into its books, then answered): the last step, and so the freeze,
        ended then.  Returns how long that was (0 if not said)."""
        if not isinstance(ago, float) or not ago > 0 or not self.took:
            return 0.0
        last = next(reversed(self.took))
        ago = min(ago, self.took[last])
        self.took[last] -= ago
        self.last -= ago
        return ago

    def text(self) -> str:
        return ", ".join(f"{name} {took:.3f}s" for name, took in self.took.items())


class Source(Copies):
    """The source side of moves: freeze, dump, send; what becomes of the copy here once
    the move is over (resumed, rolled back, dropped) is :class:`Copies`'."""

    async def emigrate(self, job: Job, target: int) -> dict[str, Any]:
        """Move a job running here to ``target``; resume it here on any failure."""
        key = f"out:{job.id}"
        if key in self.books.moving or job.state != RUNNING:
            raise JobError(f"job {job.id} is moving already")
        self.books.moving.add(key)
        try:
            return await self._emigrate_checked(job, target)
        finally:
            self.books.moving.discard(key)

    async def _emigrate_checked(self, job: Job, target: int) -> dict[str, Any]:
        mover = self.host.mover
        if not mover.available:
            raise JobError(f"cannot move: migration is {mover.describe()} on "
                           f"{self.host.name}")
        if job.pid is None and job.launcher is not None:
            job.pid = init_pid(job.launcher)
        if job.pid is None:
            raise JobError(f"job {job.id} has no process here")
        if starting(job):
            raise JobError(f"job {job.id} is still starting; it can move in a moment")
        why = mover.cannot_move(job.pid)
        if why:
            job.cannot_move = why
            raise JobError(f"job {job.id} cannot move: {why}")
        why = await self.ask_fit(job, target)
        if why:
            raise JobError(f"job {job.id} cannot move: {why}")
        try:
            ch = await self.jc.connect(target)
        except ChannelError as e:
            raise JobError(f"cannot reach the target: {e}") from None
        try:
            images = self.books.images_dir(f"{job.id}.out")
        except JobError:
            await ch.aclose()
            raise
        try:
            with urgent():  # the job is frozen meanwhile: see omuscd.priority
                return await self._emigrate(job, target, ch, images)
        finally:
            await ch.aclose()
            shutil.rmtree(images, ignore_errors=True)

    async def ask_fit(self, job: Job, target: int) -> str | None:
        """Before the freeze: could the target restore the job?  Why not (naming what it
        lacks), or None.  A target older than ``precheck`` cannot say: the move goes on,
        and its restore says what is missing (see omuscd.migrate.precheck)."""
        spool = self.jc.spool
        ours = {os.path.realpath(p) for p in (spool.path(job.id, STDOUT),
                                              spool.path(job.id, STDERR),
                                              spool.dir(job.id) / "status")}
        # a few ms of /proc; in a thread, as the executable may be on a slow file system
        facts = await trio.to_thread.run_sync(precheck.gather, job.pid, ours)
        try:
            reply = await self.jc.request(target, {"op": "precheck", "job": job.id,
                                                   "facts": facts}, STEP_TIMEOUT)
        except ChannelError as e:
            raise JobError(f"cannot reach the target: {e}") from None
        if reply.get("op") == "fit":
            return None
        why = error_text(reply, "the target refused")
        if why.startswith("unknown operation"):  # an older target
            log.info("job %s: %s cannot check a move before the freeze", job.id,
                     self.jc.node_name(target))
            return None
        return why

    async def _emigrate(self, job: Job, target: int, ch: Channel,
                        images: Path) -> dict[str, Any]:
        mover = self.host.mover
        # the memory goes while it is dumped (see omuscd.migrate.page_relay), else it is
        # copied after; a big job's follows it once it runs on the target (see
        # omuscd.migrate.postcopy)
        streaming = mover.streams and self.host.cfg.stream_pages
        lazy = self._post_copy(job, target)
        # the CRIU that will dump it starts now, while the target gets ready: its start
        # is no part of the freeze (see omuscd.migrate.swrk)
        # (the page stream's socket too, should the target stream it: one that cannot
        # move it post-copy does)
        pair = socket_pair() if streaming else None
        try:
            worker = await mover.prepare_dump(job.pid, images,  # type: ignore[arg-type]
                                              pair[1].fileno() if pair else None)
        except (MoveError, OSError) as e:
            _close_pair(pair)
            raise JobError(f"cannot move: {e}") from None
        try:
            return await self._emigrate_ready(job, target, ch, images, streaming, lazy,
                                              worker, pair)
        finally:
            await worker.close()
            _close_pair(pair)

    async def _emigrate_ready(self, job: Job, target: int, ch: Channel, images: Path,
                              streaming: bool, lazy: bool, worker: Any,
                              pair: tuple[Any, Any] | None) -> dict[str, Any]:
        """The move once the CRIU that dumps the job is started: the target gets ready,
        then the job is frozen."""
        try:
            await ch.send({"op": "immigrate", "job": job.wire(),
                           **({"pages": True} if streaming else {}),
                           **({"lazy": True} if lazy else {})})
            with trio.fail_after(STEP_TIMEOUT):
                reply = await ch.receive_msg()
        except (ChannelError, trio.TooSlowError) as e:
            raise JobError(f"the target did not answer: {e}") from None
        if reply.get("op") != "ready":
            raise JobError(error_text(reply, "the target refused"))
        lazy = lazy and reply.get("lazy") is True  # an older target: not post-copy
        early = lazy and reply.get("lazy_start") is True  # else it starts lazy-pages later
        streaming = streaming and not lazy and reply.get("pages") is True  # older: copied
        if job.state != RUNNING:  # it ended while the target got ready: nothing to move
            raise JobError(f"job {job.id} ended before it could move ({job.state})")
        job.transition(MIGRATING)
        # CRIU's parasite runs in the job's own threads, on its CPUs, among the jobs that
        # made this node busy: at its own nice it would get a fraction of a CPU there.
        # The freeze is shorter at DUMP_NICE; CRIU restores the nice value, so the target
        # puts the job's own back (and so does a resume here).
        nice = nice_of(job.pid)  # type: ignore[arg-type]
        self.books.mark(job, target, nice)
        if nice is not None:
            renice_tree(job.pid, DUMP_NICE)  # type: ignore[arg-type]
        frozen = trio.current_time()
        committed: list[float] = []  # when the target was told to run it
        written: list[list[Any]] = []  # the files it writes, noted after the dump
        try:
            return await self._move_frozen(job, target, ch, images, nice, frozen,
                                           streaming, lazy, committed, written, early,
                                           lambda fd: self.host.mover.dump(
                                               job.pid, images, fd, worker),
                                           pair)
        except trio.Cancelled:  # this daemon stops: settle it first, where it can
            with trio.CancelScope(shield=True):
                await self._cut_short(job, target, ch, nice, bool(committed), written)
            raise

    async def _move_frozen(self, job: Job, target: int, ch: Channel, images: Path,
                           nice: int | None, frozen: float, streaming: bool, lazy: bool,
                           committed: list[float], written: list[list[Any]], early: bool,
                           dump: Callable[[int | None], Awaitable[None]],
                           pair: tuple[Any, Any] | None) -> dict[str, Any]:
        """The move from the freeze on (see _emigrate); ``committed`` gets the time the
        target was told to run the job, ``written`` the files the job writes and their sizes
        after the dump (see roll_back); ``early``: the target starts lazy-pages when told
        'lazy-start', once it has the images lazy-pages reads first (see _lazy_first);
        ``dump(fd)``: the dump (to the page server at ``fd``, through ``pair``, if
        streaming)."""
        jc = self.jc
        paged = 0
        steps = Steps(frozen)
        try:
            if streaming and pair is not None:
                paged = await send_pages(ch, dump, pair,
                                         lambda n: self.books.report(job.id, DUMPING, n))
            else:
                await dump(None)
        except MoveError as e:
            await self.resume(job, nice)  # CRIU resumes the tasks when a dump fails; make sure
            raise JobError(f"move failed, job resumed here: {e}") from None
        steps.mark("dump")
        used, _ = tree_usage(job.pid)  # type: ignore[arg-type]  # frozen, still here
        # what a failed move cuts back to, should the target's copy have run meanwhile
        written[:] = cutback.written(self.jc.spool, job)
        sent = paged
        try:
            # post-copy: of the memory, only the pages the restore reads itself go now
            files = sorted(f for f in images.iterdir() if f.suffix != ".log")
            total = sent + self.books.to_send(job.id, images, lazy)
            if early:  # what lazy-pages reads first goes first; it starts meanwhile
                first = [f for f in files if _lazy_first(f.name)]
                for f in first:
                    sent += await send_file(ch, "file", f.name, f)
                await ch.send({"op": "lazy-start"})
                files = [f for f in files if f not in first]
            eager = eager_runs(images) if lazy else {}
            for f in files:
                if f.name in eager:
                    sent += await send_sparse(ch, f, eager[f.name])
                else:
                    sent += await send_file(ch, "file", f.name, f)
                self.books.report(job.id, SENDING, sent, total)
            steps.mark("images")
            for out in (STDOUT, STDERR):
                sent += await self._send_spool(ch, job, out)
            steps.mark("spool")
            await ch.send({"op": "restore", "cpu": job.cpu_moved + used, "nice": nice, "paths": {
                "stdout": str(jc.spool.path(job.id, STDOUT)),
                "stderr": str(jc.spool.path(job.id, STDERR)),
                "status": str(jc.spool.dir(job.id) / "status")},
                **({"lazy": True} if lazy else {})})
            self.books.report(job.id, RESTORING)
            if lazy:
                return await self._serve_memory(job, target, ch, images, nice, frozen,
                                                steps, sent, committed, written)
            with trio.fail_after(RESTORE_TIMEOUT):
                reply = await ch.receive_msg()
            if reply.get("op") != "restored":
                raise MoveError(error_text(reply, "restore failed"))
            steps.target(reply, "restore wait")
        except (ChannelError, MoveError, trio.TooSlowError, OSError) as e:
            await self.resume(job, nice)
            raise JobError(f"move failed, job resumed here: {e or 'timeout'}") from None
        # the point of no return is the target's 'running'
        try:
            committed.append(trio.current_time())
            await ch.send({"op": "commit"})
            with trio.fail_after(STEP_TIMEOUT):
                reply = await ch.receive_msg()
            running = reply.get("op") == "running"
        except (ChannelError, trio.TooSlowError):
            running = await self.ask_target(job, target)
        if not running:
            await self.roll_back(job, nice, written)
            raise JobError("the target did not take the job; it resumed here")
        steps.mark("commit")
        ran = steps.resumed(reply.get("resumed") if reply.get("op") == "running" else None)
        freeze = steps.last - frozen
        log.info("job %s frozen %.3fs: %s; %.1f MB%s; it ran %.3fs before the target said so",
                 job.id, freeze, steps.text(), sent / 1e6, " (memory streamed to the target)"
                 if streaming else "", ran)
        self.drop_copy(job, target)
        return {"freeze": freeze, "bytes": sent}

    async def _cut_short(self, job: Job, target: int, ch: Channel, nice: int | None,
                         committed: bool, written: list[list[Any]]) -> None:
        """This daemon stops (SIGTERM) while ``job`` is frozen for a move.  Closing the
        channel makes the target drop a copy it has not been told to run, or is still
        feeding its memory (post-copy); one it was told to run may be running there, so
        it is asked.  Without an answer in time the job stays frozen, and the move is
        settled when this daemon starts again (see settle)."""
        await ch.aclose()
        if job.state != MIGRATING:  # settled already
            return
        with trio.move_on_after(STEP_TIMEOUT):
            if committed and await self.ask_target(job, target):
                self.drop_copy(job, target)
            else:
                log.warning("job %s: its move was cut short by this daemon stopping",
                            job.id)
                if committed:  # the target's copy may have run (and written) meanwhile
                    await self.roll_back(job, nice, written)
                else:
                    await self.resume(job, nice)
            return
        log.warning("job %s stays frozen: %s did not say whether it runs it; settled when "
                    "this daemon starts again", job.id, self.jc.node_name(target))

    def _post_copy(self, job: Job, target: int) -> bool:
        """Whether this move is post-copy (see omuscd.migrate.postcopy): a big job, not going
        home (there the output is read as it is written, and a failed post-copy move
        does again what the target's copy did)."""
        least = self.host.cfg.post_copy_mb
        if not least or not self.host.mover.lazy or target == job.home or job.pid is None:
            return False
        resident = sum(p.rss for q in tree(job.pid) if (p := proctab.read(q)) is not None)
        return resident >= least * (1 << 20)

    async def _serve_memory(self, job: Job, target: int, ch: Channel, images: Path,
                            nice: int | None, frozen: float, steps: Steps, sent: int,
                            committed: list[float], written: list[list[Any]]
                            ) -> dict[str, Any]:
        """Post-copy, once the target has everything but the memory: commit when it has
        restored the job, then answer its page requests until it runs the job with all
        of its memory (see omuscd.migrate.postcopy).  On a failure once it was told to run
        the job, the copy here resumes only once the target's copy is surely gone, its
        files cut back to ``written`` (see roll_back)."""
        server = PageServer(images)
        memory = self.books.image_bytes(images, True)
        last = [trio.current_time()]  # the last word with the target

        def heard() -> None:
            last[0] = trio.current_time()

        async def on_message(m: dict[str, Any]) -> bool:
            op = m.get("op")
            if op == "restored" and not committed:
                steps.target(m, "restore wait")
                committed.append(trio.current_time())
                await ch.send({"op": "commit"})  # it runs there from now
                return False
            if op == "running" and committed:
                return True
            raise MoveError(error_text(m, f"unexpected {op!r}"))

        try:
            await postcopy.serve(ch, server, RESTORE_TIMEOUT, on_message,
                                 lambda n: self.books.report(job.id, FOLLOWING, n, memory),
                                 heard)
        except (MoveError, ChannelError, trio.TooSlowError) as e:
            # the target failed (its copy is gone), the channel broke, or it asked for
            # what is not there: a copy it still has is killed when the channel closes
            if not committed:
                await self.resume(job, nice)
                raise JobError(f"move failed, job resumed here: {e or 'timeout'}") from None
            await ch.aclose()
            runs = await self.target_runs(job, target)
            if not runs:
                if runs is None:  # not heard: cut off, it kills its copy when idle
                    await trio.sleep_until(last[0] + IDLE_TIMEOUT + GONE_GRACE)
                await self.roll_back(job, nice, written)
                raise JobError(f"move failed, job resumed here: {e or 'timeout'}") from None
        finally:
            server.close()
        now = trio.current_time()
        freeze = (committed[0] if committed else now) - frozen
        moved = sent + server.served * PAGE
        log.info("job %s frozen %.3fs: %s; its memory followed in %.3fs (post-copy); %.1f MB",
                 job.id, freeze, steps.text(), now - frozen - freeze, moved / 1e6)
        self.drop_copy(job, target)
        return {"freeze": freeze, "bytes": moved, "followed": now - frozen - freeze}

    async def _send_spool(self, ch: Channel, job: Job, stream: int) -> int:
        return await send_fd(ch, "spool", str(stream),
                                   self.jc.spool.open_stream(job.id, stream))
