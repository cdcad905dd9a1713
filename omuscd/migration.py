"""Moving a running job between nodes: the hand-over and the books, whatever the mechanism.

The protocol, on one cluster-channel connection from the source S to the target T:

1. S -> T ``immigrate`` (the job's record); T checks it may take it and answers ``ready``.
2. S freezes and dumps the job, which stays stopped on S (never killed yet).
3. S -> T the images (``file`` + data) and the job's output so far (``spool`` + data).
4. S -> T ``restore``; T restores the job *stopped*, handing CRIU its own spool files, sets
   the CPU affinity to its lent CPUs, and answers ``restored``.
5. S -> T ``commit``; T lets the job run and answers ``running``; only then does S kill its
   frozen copy.

Any failure before ``commit`` (link cut, target dead, restore failed, timeout) resumes the
job on S and T discards its copy: never two running copies, never none.  If S sent
``commit`` but heard no ``running``, it cannot know whether T resumed: it keeps its copy
frozen and asks T (``has``) until T answers or is declared dead.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from omuscd import balance, postcopy, proctab, rootexec
from omuscd.channel import Channel, ChannelError
from omuscd.cluster.membership import DEAD
from omuscd.events import Event
from omuscd.ids import is_job_id
from omuscd.jobs.books import is_job_init
from omuscd.jobs.process import adopt, init_pid, starting, tree_usage
from omuscd.jobs.record import (
    FINAL,
    MIGRATING,
    MOVED,
    RUNNING,
    STDERR,
    STDOUT,
    STREAM_FILES,
    Job,
    JobError,
)
from omuscd.jobs.spool import open_private, private_dir
from omuscd.migrate import Inherit, MoveError
from omuscd.migrate.lazy import PAGE, PageMap, PageServer
from omuscd.pages import receive_pages, send_pages, socket_pair
from omuscd.priority import urgent
from omuscd.proctab import tree

if TYPE_CHECKING:
    from omuscd.jobs.node import JobControl

log = logging.getLogger("omuscd.migrate")

CHUNK = 1 << 20
IMAGE_STREAM = 9  # data frames carrying image and spool bytes
STEP_TIMEOUT = 30.0
DUMP_NICE = -20  # the nice of a job while CRIU dumps it (see _emigrate)
RESTORE_TIMEOUT = 120.0


def nice_of(pid: int) -> int | None:
    """The one nice value of a job's processes, or None if they differ."""
    try:
        nices = {os.getpriority(os.PRIO_PROCESS, p) for p in tree(pid)}
    except OSError:
        return None
    return nices.pop() if len(nices) == 1 else None


def each_in_tree(pid: int, act: Callable[[int], object]) -> None:
    """``act`` on every process of a job; one that is gone (or refuses) is passed over."""
    for p in tree(pid):
        try:
            act(p)
        except OSError:
            pass


def renice_tree(pid: int, nice: int) -> None:
    each_in_tree(pid, lambda p: os.setpriority(os.PRIO_PROCESS, p, nice))


def pin_tree(pid: int, cpus: Any) -> None:
    each_in_tree(pid, lambda p: os.sched_setaffinity(p, cpus))


def signal_tree(pid: int, sig: int) -> None:
    each_in_tree(pid, lambda p: os.kill(p, sig))


class Migrations:
    """The migration side of :class:`omuscd.jobs.node.JobControl`."""

    def __init__(self, jc: JobControl):
        self.jc = jc
        self.d = jc.d
        self.images = Path(self.d.cfg.state_dir) / "images"
        # a job frozen for a move, until the move ends either way: where it was going
        # (read back after a restart that cut the move short; see settle)
        self.marks = Path(self.d.cfg.state_dir) / "moving"
        self.moving: set[str] = set()  # jobs being moved: one move of a job at a time

    def clean_images(self) -> None:
        """Image directories left by a crash are removed at start (a link there, never
        made by this daemon, is removed, not followed)."""
        if self.images.is_symlink():
            self.images.unlink()
        shutil.rmtree(self.images, ignore_errors=True)

    def _images_dir(self, name: str) -> Path:
        """A fresh directory for one move's images, ``STATE_DIR/images/NAME``: the
        daemon's own, 0700, in ``images`` (0700 too), made without following a link.
        CRIU writes there with its own umask; no other user can reach what it writes (a
        job's memory).  JobError if it cannot be made."""
        try:
            top = private_dir(self.images)
            try:
                shutil.rmtree(name, dir_fd=top, ignore_errors=True)
                os.close(private_dir(name, dir_fd=top))
            finally:
                os.close(top)
        except OSError as e:
            log.warning("cannot make %s/%s for a move: %s", self.images, name, e)
            raise JobError(f"cannot make a directory for the images: {e}") from None
        return self.images / name

    # ------------------------------------------------------------------ on the home node
    def choose_target(self, job: Job, where: str) -> int:
        jc = self.jc
        if where == "home":
            return job.home
        if where == "best":
            cands = [c for c in jc.candidates(None) if c.id != job.node]
            if not cands:
                raise JobError("no other node can take the job now")
            return balance.choose_node(cands).id
        if where in (str(jc.me), self.d.name):
            return jc.me
        try:
            node = self.d.members.find(where)
        except ValueError as e:  # a name two nodes share: the id says which
            raise JobError(str(e)) from None
        if node is None:
            raise JobError(f"no node {where!r}")
        return node.id

    async def migrate(self, job: Job, where: str) -> str:
        """Move a job whose home is here; returns what happened, for the user."""
        if job.id in self.moving:
            raise JobError(f"job {job.id} is moving already")
        if job.state != RUNNING:
            raise JobError(f"job {job.id} is {job.state}")
        self.moving.add(job.id)
        try:
            return await self._migrate(job, where)
        finally:
            self.moving.discard(job.id)

    async def _migrate(self, job: Job, where: str) -> str:
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
        self.d.publish([Event("migrating", f"job {job.id} moving from {job.node_name} to "
                              f"{name}", {"job": job.id, "from": job.node, "to": target})])
        try:
            if without:
                return await self.restart(job, target)
            if job.node == self.jc.me:
                stats = await self.emigrate(job, target)
            else:
                stats = await self._ask_source(job, target)
        except JobError as e:
            self._remember(job, {"from": source, "to": target, "failed": str(e)})
            self.d.publish([Event("migration-failed", f"job {job.id} stays on "
                                  f"{job.node_name}: {e}", {"job": job.id, "reason": str(e)})])
            raise
        self.moved(job, target)
        # post-copy: how long its memory took to follow, once it ran on the target
        followed = {"followed": round(stats["followed"], 4)} if stats.get("followed") else {}
        self._remember(job, {"from": source, "to": target, "freeze": round(stats["freeze"], 4),
                             "bytes": stats["bytes"], **followed})
        text = (f"job {job.id} migrated to {name}: frozen {stats['freeze']:.3f}s, "
                f"{stats['bytes'] / 1e6:.1f} MB moved" +
                (f" (its memory followed in {stats['followed']:.3f}s)" if followed else ""))
        self.d.publish([Event("migrated", text, {"job": job.id, "to": target,
                                                 "freeze": stats["freeze"],
                                                 "bytes": stats["bytes"], **followed})])
        return text

    def has_mover(self, node_id: int) -> bool:
        if node_id == self.jc.me:
            return self.d.mover.available
        node = self.d.members.nodes.get(node_id)
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
            self._drop(job, target)
        else:
            try:
                reply = await jc.request(source, {"op": "drop", "job": job.id, "to": target},
                                         STEP_TIMEOUT)
            except ChannelError as e:
                raise JobError(f"cannot stop the job on {source_name}: {e}") from None
            if reply.get("op") != "dropped":
                raise JobError(str(reply.get("reason", "the source refused")))
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
                await jc._nursery().start(jc._run_local, job, env)
            else:
                await jc._start_remote(job, env)
        except JobError as e:
            jc.mark_lost(job, f"stopped on {source_name} to rerun on {job.node_name}, "
                         f"which failed: {e}")
            raise
        self._remember(job, {"from": source, "to": target, "restarted": True})
        text = f"job {job.id} restarted from the beginning on {job.node_name} (no CRIU)"
        self.d.publish([Event("migrated", text, {"job": job.id, "to": target,
                                                 "restarted": True})])
        return text

    async def drop(self, ch: Channel, msg: dict[str, Any]) -> None:
        """The home asks us to stop a restartable guest it will rerun elsewhere."""
        job = self.jc.guests.get(str(msg.get("job")))
        if job is None or not job.restartable:
            await ch.send({"op": "refused", "reason": "no such restartable job here"})
            return
        self._drop(job, int(msg.get("to", 0)))
        await ch.send({"op": "dropped"})

    def moved(self, job: Job, target: int) -> None:
        """The home's books after a move (idempotent: the source's word may come first)."""
        if job.node == target:
            return
        job.transition(RUNNING, node=target, node_name=self.jc.node_name(target),
                       migrations=job.migrations + 1)
        if target == self.jc.me:
            self.jc.stop_following(job.id)
        elif job.id not in self.jc.scopes:
            self.jc._nursery().start_soon(self.jc._follow, job, None)

    async def _ask_source(self, job: Job, target: int) -> dict[str, Any]:
        try:
            reply = await self.jc.request(job.node, {"op": "emigrate", "job": job.id,
                                                     "to": target},
                                          RESTORE_TIMEOUT + 2 * STEP_TIMEOUT)
        except ChannelError as e:
            raise JobError(f"node {job.node_name} did not finish the move: {e}") from None
        if reply.get("op") != "migrated":
            raise JobError(str(reply.get("reason", "refused")))
        return {"freeze": float(reply["freeze"]), "bytes": int(reply["bytes"]),
                "followed": float(reply.get("followed", 0.0))}

    # ------------------------------------------------------------------ on the source
    async def emigrate(self, job: Job, target: int) -> dict[str, Any]:
        """Move a job running here to ``target``; resume it here on any failure."""
        key = f"out:{job.id}"
        if key in self.moving or job.state != RUNNING:
            raise JobError(f"job {job.id} is moving already")
        self.moving.add(key)
        try:
            return await self._emigrate_checked(job, target)
        finally:
            self.moving.discard(key)

    async def _emigrate_checked(self, job: Job, target: int) -> dict[str, Any]:
        mover = self.d.mover
        if not mover.available:
            raise JobError(f"cannot move: migration is {mover.describe()} on "
                           f"{self.d.name}")
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
        try:
            ch = await self.jc.connect(target)
        except ChannelError as e:
            raise JobError(f"cannot reach the target: {e}") from None
        try:
            images = self._images_dir(f"{job.id}.out")
        except JobError:
            await ch.aclose()
            raise
        try:
            with urgent():  # the job is frozen meanwhile: see omuscd.priority
                return await self._emigrate(job, target, ch, images)
        finally:
            await ch.aclose()
            shutil.rmtree(images, ignore_errors=True)

    async def _emigrate(self, job: Job, target: int, ch: Channel,
                        images: Path) -> dict[str, Any]:
        mover = self.d.mover
        # the memory goes while it is dumped (see omuscd.pages), else it is copied after;
        # a big job's follows it once it runs on the target (see omuscd.postcopy)
        streaming = mover.streams and self.d.cfg.stream_pages
        lazy = self._post_copy(job, target)
        try:
            await ch.send({"op": "immigrate", "job": job.wire(),
                           **({"pages": True} if streaming else {}),
                           **({"lazy": True} if lazy else {})})
            with trio.fail_after(STEP_TIMEOUT):
                reply = await ch.receive_msg()
        except (ChannelError, trio.TooSlowError) as e:
            raise JobError(f"the target did not answer: {e}") from None
        if reply.get("op") != "ready":
            raise JobError(str(reply.get("reason", "the target refused")))
        lazy = lazy and reply.get("lazy") is True  # an older target: not post-copy
        streaming = streaming and not lazy and reply.get("pages") is True  # older: copied
        if job.state != RUNNING:  # it ended while the target got ready: nothing to move
            raise JobError(f"job {job.id} ended before it could move ({job.state})")
        job.transition(MIGRATING)
        # CRIU's parasite runs in the job's own threads, on its CPUs, among the jobs that
        # made this node busy: at its own nice it would get a fraction of a CPU there.
        # The freeze is shorter at DUMP_NICE; CRIU restores the nice value, so the target
        # puts the job's own back (and so does a resume here).
        nice = nice_of(job.pid)  # type: ignore[arg-type]
        self._mark(job, target, nice)
        if nice is not None:
            renice_tree(job.pid, DUMP_NICE)  # type: ignore[arg-type]
        frozen = trio.current_time()
        committed: list[float] = []  # when the target was told to run it
        try:
            return await self._move_frozen(job, target, ch, images, nice, frozen,
                                           streaming, lazy, committed)
        except trio.Cancelled:  # this daemon stops: settle it first, where it can
            with trio.CancelScope(shield=True):
                await self._cut_short(job, target, ch, nice, bool(committed))
            raise

    async def _move_frozen(self, job: Job, target: int, ch: Channel, images: Path,
                           nice: int | None, frozen: float, streaming: bool, lazy: bool,
                           committed: list[float]) -> dict[str, Any]:
        """The move from the freeze on (see _emigrate); ``committed`` gets the time the
        target was told to run the job."""
        jc = self.jc
        mover = self.d.mover
        paged = 0
        try:
            if streaming:
                paged = await send_pages(ch, lambda fd: mover.dump(job.pid, images, fd))
            else:
                await mover.dump(job.pid, images)  # type: ignore[arg-type]
        except MoveError as e:
            self._resume(job, nice)  # CRIU resumes the tasks when a dump fails; make sure
            raise JobError(f"move failed, job resumed here: {e}") from None
        dumped = trio.current_time()
        used, _ = tree_usage(job.pid)  # type: ignore[arg-type]  # frozen, still here
        sent = paged
        try:
            # post-copy: of the memory, only the pages the restore reads itself go now
            eager = self._eager_runs(images) if lazy else {}
            for f in sorted(images.iterdir()):
                if f.suffix == ".log":
                    continue
                if f.name in eager:
                    sent += await self._send_sparse(ch, f, eager[f.name])
                else:
                    sent += await self._send_file(ch, "file", f.name, f)
            for out in (STDOUT, STDERR):
                sent += await self._send_spool(ch, job, out)
            transferred = trio.current_time()
            await ch.send({"op": "restore", "cpu": job.cpu_moved + used, "nice": nice, "paths": {
                "stdout": str(jc.spool.path(job.id, STDOUT)),
                "stderr": str(jc.spool.path(job.id, STDERR)),
                "status": str(jc.spool.dir(job.id) / "status")},
                **({"lazy": True} if lazy else {})})
            if lazy:
                return await self._serve_memory(job, target, ch, images, nice, frozen,
                                                dumped, transferred, sent, committed)
            with trio.fail_after(RESTORE_TIMEOUT):
                reply = await ch.receive_msg()
            if reply.get("op") != "restored":
                raise MoveError(str(reply.get("reason", "restore failed")))
        except (ChannelError, MoveError, trio.TooSlowError, OSError) as e:
            self._resume(job, nice)
            raise JobError(f"move failed, job resumed here: {e or 'timeout'}") from None
        # the point of no return is the target's 'running'
        try:
            committed.append(trio.current_time())
            await ch.send({"op": "commit"})
            with trio.fail_after(STEP_TIMEOUT):
                reply = await ch.receive_msg()
            running = reply.get("op") == "running"
        except (ChannelError, trio.TooSlowError):
            running = await self._ask_target(job, target)
        if not running:
            self._resume(job, nice)
            raise JobError("the target did not take the job; it resumed here")
        now = trio.current_time()
        freeze = now - frozen
        log.info("job %s frozen %.3fs: dump %.3fs%s, transfer %.3fs, restore and commit "
                 "%.3fs; %.1f MB", job.id, freeze, dumped - frozen,
                 " (memory streamed to the target)" if streaming else "",
                 transferred - dumped, now - transferred, sent / 1e6)
        self._drop(job, target)
        return {"freeze": freeze, "bytes": sent}

    async def _cut_short(self, job: Job, target: int, ch: Channel, nice: int | None,
                         committed: bool) -> None:
        """This daemon stops (SIGTERM) while ``job`` is frozen for a move.  Closing the
        channel makes the target drop a copy it has not been told to run, or is still
        feeding its memory (post-copy); one it was told to run may be running there, so
        it is asked.  Without an answer in time the job stays frozen, and the move is
        settled when this daemon starts again (see settle)."""
        await ch.aclose()
        if job.state != MIGRATING:  # settled already
            return
        with trio.move_on_after(STEP_TIMEOUT):
            if committed and await self._ask_target(job, target):
                self._drop(job, target)
            else:
                log.warning("job %s: its move was cut short by this daemon stopping",
                            job.id)
                self._resume(job, nice)
            return
        log.warning("job %s stays frozen: %s did not say whether it runs it; settled when "
                    "this daemon starts again", job.id, self.jc.node_name(target))

    def _post_copy(self, job: Job, target: int) -> bool:
        """Whether this move is post-copy (see omuscd.postcopy): a big job, not going
        home (there the output is read as it is written, and a failed post-copy move
        does again what the target's copy did)."""
        least = self.d.cfg.post_copy_mb
        if not least or not self.d.mover.lazy or target == job.home or job.pid is None:
            return False
        resident = sum(p.rss for q in tree(job.pid) if (p := proctab.read(q)) is not None)
        return resident >= least * (1 << 20)

    @staticmethod
    def _eager_runs(images: Path) -> dict[str, list[tuple[int, int]]]:
        """For each process's pages image: where the pages are that its restore reads
        itself (offset, length); the others come on demand.  Images of other memory
        (shared memory) are not named: they go whole."""
        runs: dict[str, list[tuple[int, int]]] = {}
        for f in images.glob("pagemap-*.img"):
            pid = f.stem.split("-", 1)[1]
            if pid.isdigit():
                pm = PageMap.read(images, int(pid))
                runs[f"pages-{pm.pages_id}.img"] = [(r.offset, r.pages * PAGE)
                                                    for r in pm.eager()]
        return runs

    async def _send_sparse(self, ch: Channel, path: Path, runs: list[tuple[int, int]]) -> int:
        """Send these parts of ``path`` (the target leaves the rest a hole)."""
        size = path.stat().st_size
        await ch.send({"op": "sparse", "name": path.name, "size": size,
                       "runs": [[offset, length] for offset, length in runs]})
        with open(path, "rb") as f:
            for offset, length in runs:
                done = 0
                while done < length:
                    chunk = os.pread(f.fileno(), min(CHUNK, length - done), offset + done)
                    if not chunk:
                        raise OSError(f"{path.name} is shorter than its pagemap")
                    await ch.send_data(IMAGE_STREAM, chunk)
                    done += len(chunk)
        return sum(length for _, length in runs)

    async def _serve_memory(self, job: Job, target: int, ch: Channel, images: Path,
                            nice: int | None, frozen: float, dumped: float,
                            transferred: float, sent: int,
                            committed: list[float]) -> dict[str, Any]:
        """Post-copy, once the target has everything but the memory: commit when it has
        restored the job, then answer its page requests until it runs the job with all
        of its memory (see omuscd.postcopy)."""
        server = PageServer(images)

        async def on_message(m: dict[str, Any]) -> bool:
            op = m.get("op")
            if op == "restored" and not committed:
                committed.append(trio.current_time())
                await ch.send({"op": "commit"})  # it runs there from now
                return False
            if op == "running" and committed:
                return True
            raise MoveError(str(m.get("reason") or f"unexpected {op!r}"))

        try:
            await postcopy.serve(ch, server, RESTORE_TIMEOUT, on_message)
        except (MoveError, ChannelError, trio.TooSlowError) as e:
            # the target failed (its copy is gone), the channel broke, or it asked for
            # what is not there: a copy it still has is killed when the channel closes
            if committed:
                await ch.aclose()
            if not committed or not await self._ask_target(job, target):
                self._resume(job, nice)
                raise JobError(f"move failed, job resumed here: {e or 'timeout'}") from None
        finally:
            server.close()
        now = trio.current_time()
        freeze = (committed[0] if committed else now) - frozen
        moved = sent + server.served * PAGE
        log.info("job %s frozen %.3fs: dump %.3fs, transfer %.3fs, restore %.3fs; its "
                 "memory followed in %.3fs (post-copy); %.1f MB", job.id, freeze,
                 dumped - frozen, transferred - dumped, frozen + freeze - transferred,
                 now - frozen - freeze, moved / 1e6)
        self._drop(job, target)
        return {"freeze": freeze, "bytes": moved, "followed": now - frozen - freeze}

    async def _send_file(self, ch: Channel, op: str, name: str, path: Path) -> int:
        return await self._send_fd(ch, op, name, open_private(str(path), os.O_RDONLY))

    async def _send_spool(self, ch: Channel, job: Job, stream: int) -> int:
        return await self._send_fd(ch, "spool", str(stream),
                                   self.jc.spool.open_stream(job.id, stream))

    @staticmethod
    async def _send_fd(ch: Channel, op: str, name: str, fd: int) -> int:
        """Send the file open on ``fd`` (closed here), as it is now."""
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(fd).st_size
            await ch.send({"op": op, "name": name, "size": size})
            sent = 0
            while sent < size and (chunk := f.read(min(CHUNK, size - sent))):
                await ch.send_data(IMAGE_STREAM, chunk)
                sent += len(chunk)
        if sent != size:
            raise OSError(f"{name} became shorter while it was sent")
        return size

    def _resume(self, job: Job, nice: int | None) -> None:
        self.unmark(job.id)
        if job.state != MIGRATING:  # it ended meanwhile: its end is on the books
            return
        if job.pid is not None:
            if nice is not None:  # its own priority back (see _emigrate)
                renice_tree(job.pid, nice)
            signal_tree(job.pid, signal.SIGCONT)
            self.d.sampler.resumed(tree(job.pid))
        job.transition(RUNNING)
        log.warning("job %s resumed on this node after a failed move", job.id)

    def _drop(self, job: Job, target: int) -> None:
        """The target runs the job: kill the frozen copy here, without reporting an end."""
        self.unmark(job.id)
        job.node_changed = True
        # Counted out now, with the load counted in the same instant, while the frozen
        # copy is stopped (not load): the balancer looks again as soon as the move is
        # over, and counted only once the copy's processes were reaped, the node still
        # had it (it sent a fifth job to a node with four).  Counted after the kill, the
        # dying copy showed as runnable.
        self.d.moves[1] += 1
        self.d.jobs_changed()
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
            self._guest_gone(job, target)
        log.info("job %s moved to %s", job.id, jc.node_name(target))

    def _guest_gone(self, job: Job, target: int) -> None:
        """A guest's record here once ``target`` runs it: finished, as moved there."""
        job.transition(MOVED, node=target, reason=f"moved to {self.jc.node_name(target)}")
        self.jc.guests.pop(job.id, None)

    async def _ask_target(self, job: Job, target: int) -> bool:
        """After an unanswered commit: does the target run the job?  Ask until it answers
        or is declared dead (then it does not); the copy here stays frozen meanwhile."""
        while True:
            node = self.d.members.nodes.get(target)
            if node is None or node.state == DEAD:
                return False
            try:
                reply = await self.jc.request(target, {"op": "has", "job": job.id},
                                              STEP_TIMEOUT)
                return bool(reply.get("running"))
            except ChannelError:
                await trio.sleep(1)

    # ------------------------------------------------------------------ on the target
    async def immigrate(self, ch: Channel, msg: dict[str, Any]) -> None:
        jc = self.jc
        mover = self.d.mover
        try:
            job = Job.from_wire(msg["job"])
            if not mover.available:
                raise JobError(f"migration is {mover.describe()} on {self.d.name}")
            jc._check_guest_ok(job.owner, local=job.home == jc.me)
            if not os.path.isdir(job.cwd):
                raise JobError(f"node {self.d.name}: working directory {job.cwd} does not "
                               "exist")
            images = self._images_dir(f"{job.id}.in")
        except (JobError, KeyError, TypeError, ValueError) as e:
            self.d.balancer.release_hold()  # the room held for this move is free again
            await ch.send({"op": "refused", "reason": str(e)})
            return
        home = jc.home.get(job.id) if job.home == jc.me else None
        if home is not None:
            # It comes home: its output is no longer taken in from the node it leaves.
            # That node's spool comes with the move and holds all of it, also what it had
            # not yet sent (it looks at a quiet job's files every quarter of a second):
            # taken in as well, after the spool, the user saw it twice.
            jc.stop_following(job.id)
        with urgent():  # the job is frozen at its source meanwhile: see omuscd.priority
            pid = None
            pager = None
            pages = None
            try:
                ready: dict[str, Any] = {"op": "ready"}
                lazy = msg.get("lazy") is True and mover.lazy
                if lazy:
                    ready["lazy"] = True
                elif msg.get("pages") is True and mover.streams and self.d.cfg.stream_pages:
                    pages, theirs = socket_pair()
                    try:
                        pager = await mover.page_server(images, theirs.fileno())
                    finally:
                        theirs.close()
                    ready["pages"] = True
                await ch.send(ready)
                spool_dir = jc.spool.create(job)
                paged = 0
                if pager is not None and pages is not None:
                    proc = pager
                    paged = await receive_pages(ch, pages, RESTORE_TIMEOUT,
                                                lambda: mover.page_server_done(proc, images))
                    pager = None
                while True:
                    with trio.fail_after(STEP_TIMEOUT):
                        m = await ch.receive_msg()
                    op = m.get("op")
                    if op == "file":
                        name = _image_name(m["name"])
                        fd = open_private(str(images / name),
                                          os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                        with os.fdopen(fd, "wb") as f:
                            await self._receive_file(ch, f, name, int(m["size"]))
                    elif op == "sparse" and lazy:
                        name = _image_name(m["name"])
                        await self._receive_sparse(ch, images / name, m["size"], m["runs"])
                    elif op == "spool":
                        stream = int(m["name"])
                        if stream not in (STDOUT, STDERR):
                            raise ChannelError("bad spool stream")
                        # put in place whole: at the home, readers of the output read the
                        # spool meanwhile (the same bytes, and more)
                        with jc.spool.replacing(job.id, stream) as fd, \
                                os.fdopen(os.dup(fd), "wb") as f:
                            await self._receive_file(ch, f, STREAM_FILES[stream],
                                                     int(m["size"]))
                    elif op == "restore" and lazy and m.get("lazy") is True:
                        job.cpu_moved = float(m.get("cpu", job.cpu_moved))
                        await self._restore_lazy(job, ch, images, spool_dir, dict(m["paths"]),
                                                 m.get("nice"))
                        return
                    elif op == "restore":
                        paths = dict(m["paths"])
                        job.cpu_moved = float(m.get("cpu", job.cpu_moved))
                        pid = await self._restore(job, images, spool_dir, paths)
                        if isinstance(m.get("nice"), int):
                            renice_tree(pid, max(-20, min(19, m["nice"])))
                        await ch.send({"op": "restored", "pid": pid, "paged": paged})
                        break
                    else:
                        raise ChannelError(f"unexpected {op!r}")
                with trio.fail_after(STEP_TIMEOUT):
                    m = await ch.receive_msg()
                if m.get("op") != "commit":
                    raise ChannelError("no commit")
                signal_tree(pid, signal.SIGCONT)
                self.d.sampler.resumed(tree(pid))  # its load counts from now
                self._adopted(job, pid)
                pid = None
                await ch.send({"op": "running"})
            except (ChannelError, MoveError, JobError, trio.TooSlowError, OSError, KeyError,
                    ValueError) as e:
                if pid is not None:  # restored but not committed: this copy must not run
                    signal_tree(pid, signal.SIGKILL)
                    _reap(pid)
                if pager is not None and pager.returncode is None:
                    pager.kill()
                self.d.mover.keep_log(images / "page-server.log", "page-server")
                self.d.balancer.release_hold()  # the room held for this move is free again
                if home is not None:
                    self._follow_again(home)
                log.warning("job %s: incoming move abandoned: %s", msg.get("job", {}).get("id"),
                            e)
                try:
                    await ch.send({"op": "failed", "reason": f"{self.d.name}: {e}"})
                except ChannelError:
                    pass
            finally:
                if pager is not None and pager.returncode is None:
                    pager.kill()
                if pages is not None:
                    pages.socket.close()
                shutil.rmtree(images, ignore_errors=True)

    def _follow_again(self, job: Job) -> None:
        """The move home failed: the job runs on where it was; follow it again, from
        the end of the spool here (which may be that node's, received for the move)."""
        if job.state in FINAL or job.node == self.jc.me:
            return
        job.offsets.update(self.jc.spool.ends(job.id))
        self.jc._nursery().start_soon(self.jc._follow, job, None)

    async def _receive_file(self, ch: Channel, f: Any, name: str, size: int) -> None:
        """``size`` bytes from the channel into the open file ``f``."""
        got = 0
        while got < size:
            with trio.fail_after(STEP_TIMEOUT):
                item = await ch.receive(borrow=True)
            if not isinstance(item, tuple) or item[0] != IMAGE_STREAM:
                raise ChannelError("expected image data")
            f.write(item[1])
            got += len(item[1])
        if got != size:
            raise ChannelError(f"{name}: got {got} bytes of {size}")
        f.flush()

    async def _receive_sparse(self, ch: Channel, path: Path, size: Any, runs: Any) -> None:
        """A file of ``size`` bytes of which only ``runs`` (offset, length) come."""
        try:
            parts = [(int(offset), int(length)) for offset, length in runs]
            size = int(size)
        except (TypeError, ValueError):
            raise ChannelError("bad sparse file") from None
        end = 0
        for offset, length in parts:
            if offset < end or length < 0 or offset + length > size:
                raise ChannelError(f"{path.name}: parts out of order or past its end")
            end = offset + length
        with os.fdopen(open_private(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                       "wb") as f:
            f.truncate(size)
            for offset, length in parts:
                got = 0
                while got < length:
                    with trio.fail_after(STEP_TIMEOUT):
                        item = await ch.receive(borrow=True)
                    if not isinstance(item, tuple) or item[0] != IMAGE_STREAM:
                        raise ChannelError("expected image data")
                    if got + len(item[1]) > length:
                        raise ChannelError(f"{path.name}: a part longer than announced")
                    os.pwrite(f.fileno(), item[1], offset + got)
                    got += len(item[1])

    async def _restore_lazy(self, job: Job, ch: Channel, images: Path, spool_dir: Path,
                            paths: dict[str, str], nice: Any) -> None:
        """Post-copy (see omuscd.postcopy): restore the job without the memory that can
        come later, resume it on the commit, relay its page requests to the source, and
        take it into the books once it has every page.  Any failure kills this copy
        before its page source goes, then raises (the source resumes its own)."""
        key = f"in:{job.id}"
        self.moving.add(key)  # 'has' waits for the outcome
        mine, theirs = socket_pair()
        lazyd = None
        guard = None
        pid = None
        try:
            try:
                lazyd = await self.d.mover.lazy_pages(images, theirs.fileno())
            finally:
                theirs.close()
            relay = postcopy.Relay(ch, mine)
            failed: Exception | None = None
            async with trio.open_nursery() as nursery:  # errors leave it by hand: no groups
                await nursery.start(relay.run)
                try:
                    pid = await self._restore(job, images, spool_dir, paths, lazy=True)
                    guard = await _guard(pid, mine.socket.fileno())
                    if isinstance(nice, int):
                        renice_tree(pid, max(-20, min(19, nice)))
                    await ch.send({"op": "restored", "pid": pid, "paged": 0})
                    if (await relay.message(STEP_TIMEOUT)).get("op") != "commit":
                        raise ChannelError("no commit")
                    signal_tree(pid, signal.SIGCONT)  # it runs; its memory follows
                    log.info("job %s runs here; its memory follows from %s (post-copy)",
                             job.id, self.jc.node_name(ch.peer_id))
                    while lazyd.returncode is None:
                        relay.check()
                        with trio.move_on_after(0.25):
                            await lazyd.wait()
                    if lazyd.returncode != 0:
                        kept = self.d.mover.keep_log(images / "lazy-pages.log", "lazy-pages")
                        raise MoveError(f"criu lazy-pages failed (exit {lazyd.returncode})"
                                        f"{kept}")
                except (ChannelError, MoveError, OSError, trio.TooSlowError) as e:
                    failed = e
                nursery.cancel_scope.cancel()
            if failed is not None:
                raise failed
            self.d.sampler.resumed(tree(pid))  # its load counts from now
            self._adopted(job, pid)
            pid = None
            await ch.send({"op": "running"})
        finally:
            if pid is not None:  # not taken: this copy must not run, and goes first
                signal_tree(pid, signal.SIGKILL)
            if guard is not None:  # the job is ours or dead: the guard has nothing to do
                await _guard_done(guard)
            if pid is not None:
                _reap(pid)
            if lazyd is not None and lazyd.returncode is None:
                lazyd.kill()
                with trio.CancelScope(shield=True):
                    await lazyd.wait()
            mine.socket.close()
            self.moving.discard(key)

    async def _restore(self, job: Job, images: Path, spool_dir: Path,
                       paths: dict[str, str], lazy: bool = False) -> int:
        fds = self.jc.spool.job_files(job.id)  # the restored job writes through these
        try:
            inherit = [Inherit(paths["stdout"], fds[0]), Inherit(paths["stderr"], fds[1]),
                       Inherit(paths["status"], fds[2])]
            pid = await self.d.mover.restore(images, inherit, images / "restored.pid", lazy)
        finally:
            for fd in fds:
                os.close(fd)
        pin_tree(pid, self.d.cfg.cpus)  # CRIU restores the source's; ours is what we lend
        return pid

    def _adopted(self, job: Job, pid: int) -> None:
        """The restored job runs here now: keep its books and watch it."""
        jc = self.jc
        record = jc.home.get(job.id) if job.home == jc.me else None
        if record is None:
            record = job
            record.changed = trio.Event()
            jc.book(jc.guests, record)
        else:  # it comes home: the books are here (moved() will find them up to date);
            record.migrations += 1  # following it from elsewhere stopped as the move began
        run = record.new_stay()
        record.offsets.update(jc.spool.ends(job.id))
        # a guest's record came before its move was booked (at the home): min_stay counts
        # from here, or balancing here would send it straight on
        record.transition(RUNNING, node=jc.me, node_name=self.d.name, landed_at=time.time(),
                          pid=pid, cpu_moved=job.cpu_moved)
        self.d.balancer.release_hold()  # the job takes the room held for it
        jc._nursery().start_soon(self._watch_adopted, record, pid, run)

    async def _watch_adopted(self, job: Job, pid: int, run: int) -> None:
        # counted with the load, at the same instant: a node that gossiped the one
        # without the other would have its move taken as shown in a load that lacks it
        self.d.moves[0] += 1
        self.d.jobs_changed()  # it arrived
        try:
            if await adopt(job, self.jc.spool, pid, run) and job.home == self.jc.me:
                self.jc._finished(job)
        finally:
            self.d.jobs_changed()  # it ended or left

    def _mark(self, job: Job, target: int, nice: int | None) -> None:
        data = json.dumps({"target": target, "nice": nice}).encode()
        try:
            top = private_dir(self.marks)
            try:
                fd = open_private(job.id, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, top)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            finally:
                os.close(top)
        except OSError as e:  # the move goes on; only a restart in its middle would miss it
            log.warning("job %s: cannot note its move in %s: %s", job.id, self.marks,
                        e.strerror)

    def unmark(self, job_id: str) -> None:
        try:
            (self.marks / job_id).unlink(missing_ok=True)
        except OSError:
            pass

    def interrupted(self) -> dict[str, dict[str, Any]]:
        """The moves a restart cut short: job id, where it was going and its nice."""
        found: dict[str, dict[str, Any]] = {}
        try:
            entries = list(self.marks.iterdir())
        except OSError:
            return found
        for f in entries:
            if not is_job_id(f.name):
                log.warning("%s: not a move note of this daemon; left alone", f)
                continue
            try:
                fd = open_private(str(f), os.O_RDONLY)
                with os.fdopen(fd, "rb") as r:
                    mark = json.loads(r.read(4096))
                found[f.name] = {"target": int(mark["target"]), "nice": mark.get("nice")}
            except (OSError, ValueError, TypeError, KeyError):
                log.warning("unreadable move note %s; removed", f)
                self.unmark(f.name)
        return found

    async def settle(self, job: Job, mark: dict[str, Any]) -> None:
        """This daemon stopped while it moved ``job``, which it had frozen: the job is
        still stopped here.  If the target took it before the move was cut short, this
        copy goes and the job is followed there; else it resumes here.  Never two
        copies: the target runs it only once it has confirmed it to us or, asked now,
        says so; and a target that never got it has killed its copy (post-copy)."""
        target, nice = mark["target"], mark.get("nice")
        grace = self.d.cfg.dead_timeout + 2 * self.d.cfg.gossip_interval + 1
        with trio.move_on_after(grace):  # until the cluster is heard from
            while self.d.members.nodes.get(target) is None:
                await trio.sleep(0.1)
        there = (target != self.jc.me and self.d.members.nodes.get(target) is not None
                 and await self._ask_target(job, target))
        pid = job.pid if job.pid is not None and is_job_init(job.pid) else None
        name = self.jc.node_name(target)
        if there:
            log.warning("job %s: its move to %s was cut short when this daemon stopped, "
                        "and %s runs it: the copy left here goes", job.id, name, name)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)  # the init of its PID namespace: all of it
            if job.home == self.jc.me:
                self.moved(job, target)
            else:
                self._guest_gone(job, target)
        else:
            log.warning("job %s: its move to %s was cut short when this daemon stopped; "
                        "it resumes here", job.id, name)
            if pid is not None:
                if isinstance(nice, int):
                    renice_tree(pid, nice)
                signal_tree(pid, signal.SIGCONT)
                self.d.sampler.resumed(tree(pid))
            self.jc._nursery().start_soon(self.jc._watch_again, job)
        self.unmark(job.id)

    async def has(self, ch: Channel, msg: dict[str, Any]) -> None:
        # a post-copy move of it in progress here ends either way first
        with trio.move_on_after(STEP_TIMEOUT / 2):
            while f"in:{msg.get('job')}" in self.moving:
                await trio.sleep(0.05)
        job = self.jc.find(str(msg.get("job")))
        running = job is not None and job.node == self.jc.me and job.state == RUNNING
        await ch.send({"op": "has", "running": running, "time": time.time()})


#: Kills a lazily restored job ("$0") if this daemon dies before the job has all of its
#: memory.  It holds the daemon's end of the lazy-pages socket too: that end closing with
#: the daemon would end lazy-pages, and the job would then read zeros for pages not yet
#: there.  Told "done" when the job is taken or already killed.
GUARD = 'read -r word; [ "$word" = done ] || kill -KILL "$0"'


def _image_name(name: Any) -> str:
    """The name of an image file a peer sends: a plain name in the images directory,
    never a path, nothing hidden, nothing of the daemon's own (ChannelError otherwise)."""
    if not isinstance(name, str) or not _IMAGE_NAME.fullmatch(name):
        raise ChannelError(f"bad image file name {str(name)[:40]!r}")
    return name


_IMAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", re.ASCII)


def _reap(pid: int) -> None:
    """Collect a killed restored job (CRIU made it this daemon's child)."""
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


async def _guard(pid: int, fd: int) -> trio.Process:
    return await trio.lowlevel.open_process(
        [rootexec.need(rootexec.SH, "sh"), "-c", GUARD, str(pid)], stdin=subprocess.PIPE,
        pass_fds=(fd,), env=rootexec.HELPER_ENV)


async def _guard_done(guard: trio.Process) -> None:
    with trio.CancelScope(shield=True):
        try:
            assert guard.stdin is not None
            await guard.stdin.send_all(b"done\n")
            await guard.stdin.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        await guard.wait()
