"""Checkpoints: a job dumped while it goes on running, its images kept at its home.

On the node running the job (:meth:`Checkpoints.take`): the checks a move makes (the same
``cannot_move`` reasons; one move or checkpoint of a job at a time; a post-copy move of
it here settles first), then the job's processes are stopped (SIGSTOP, each of them,
until none runs), and while they stand still: the sizes of the files they hold open for
writing and of the job's output so far are noted, and ``criu dump --leave-running``
writes the images (:meth:`omuscd.migrate.criu.Criu.dump`: the user's real ids, a
fixed environment, file locks dumped and left in place).  Then SIGCONT: the job was
frozen only for the dump.  The stop makes the sizes those of the dumped instant; CRIU
keeps the stopped state, and a restore ends with the same SIGCONT a move's commit sends.

The images go to the job's home over the cluster channel (the ``checkpoint`` op), or are
taken straight into its store when it runs there; the home keeps them (see
:mod:`omuscd.jobs.checkpoints`) once its copy of the job's output has reached what the job
had written at the checkpoint, so that a restore never lacks output from before it.

With ``checkpoint_dir`` set on the node running the job (its setting decides, not the
home's), the images go there instead (``DIR/JOB/.part-N``, N the number the home gave),
and the home gets only the record naming the directory; when the home says the checkpoint
is good (``keep``) the node renames it to ``DIR/JOB/N`` (``kept``) and the home records it.
A directory that cannot be used (a file server down) fails that checkpoint, with the
reason, and the job runs on; the checkpoints before stay.

At the home (:class:`Checkpoints`): ``checkpoint JOB``, and a task per job taking one every
``checkpoint_every`` seconds.  Signals for the job are held during a checkpoint of a job
running elsewhere, as during a move (see omuscd.jobs.held).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from omuscd.channel import Channel, ChannelError
from omuscd.cluster.rpc import error_text, refusal
from omuscd.events import Event
from omuscd.jobs import record
from omuscd.jobs.checkpoints import META, CheckpointStore, Pending, SharedDir, SharedPart
from omuscd.jobs.process import starting, tree_usage
from omuscd.jobs.record import STDERR, STDOUT, Job, JobError
from omuscd.jobs.spool import open_private
from omuscd.migrate import MoveError
from omuscd.migrate.books import MoveBooks, MoveHost
from omuscd.migrate.cutback import spool_files, written_files
from omuscd.migrate.transfer import (
    RESTORE_TIMEOUT,
    STEP_TIMEOUT,
    image_name,
    receive_file,
    send_fd,
    send_file,
)
from omuscd.migrate.tree import signal_tree, stop_all
from omuscd.paths import open_root_dir
from omuscd.priority import urgent
from omuscd.proctab import tree

if TYPE_CHECKING:
    from omuscd.jobs.node import JobControl

log = logging.getLogger("omuscd.migrate")

#: How long the job's processes may take to stop before a checkpoint is given up.
STOP_TIMEOUT = 5.0
#: How long the home waits for its copy of the output to reach the checkpoint's.
OUTPUT_TIMEOUT = 15.0
#: A failed periodic checkpoint is tried again after this long at the latest.
RETRY = 30.0
#: How long a checkpoint waits for a move of its job (a post-copy one: its memory follows)
#: to end before it is refused.
SETTLE_TIMEOUT = 300.0


async def stop_tree(init: int) -> list[int]:
    """Stop every process of the job whose init is ``init`` (tree.stop_all); their
    pids.  MoveError if they do not stop within STOP_TIMEOUT; they are let go on then, and
    when this is cancelled before they all stood still."""
    try:
        pids, still = await stop_all(init, STOP_TIMEOUT)
    except BaseException:  # cancelled halfway (the daemon stopping): none left stopped
        signal_tree(init, signal.SIGCONT)
        raise
    if not pids:
        raise MoveError("the job has no process here")
    if not still:
        signal_tree(init, signal.SIGCONT)
        raise MoveError(f"the job's processes did not stop within {STOP_TIMEOUT:g}s")
    return pids


class Dumps:
    """Taking checkpoints on the node running a job (for its home, or for this node as
    its home: see Checkpoints)."""

    def __init__(self, jc: JobControl, host: MoveHost, books: MoveBooks):
        self.jc = jc
        self.host = host
        self.books = books

    @property
    def shared(self) -> SharedDir | None:
        """This node's checkpoint_dir, if it has one (read at start)."""
        path = self.host.cfg.checkpoint_dir
        return SharedDir(path) if path else None

    async def take(self, job: Job, hold: bool = False) -> tuple[Path, dict[str, Any]]:
        """Dump ``job`` (running here) leaving it running: its images directory (the
        caller removes it) and the checkpoint's meta.  JobError saying why not.
        ``hold``: the job stays stopped after the dump, until :meth:`release`."""
        mover = self.host.mover
        if not mover.available:
            raise JobError(f"cannot checkpoint: migration is {mover.describe()} on "
                           f"{self.host.name}")
        with trio.move_on_after(STEP_TIMEOUT):  # a post-copy move of it here settles first
            while f"in:{job.id}" in self.books.moving:
                await trio.sleep(0.05)
        key = f"out:{job.id}"
        if key in self.books.moving or f"in:{job.id}" in self.books.moving:
            raise JobError(f"job {job.id} is moving; a checkpoint waits for its end")
        if job.state != record.RUNNING or job.node != self.jc.me or job.pid is None:
            raise JobError(f"job {job.id} does not run on {self.host.name}")
        if starting(job):
            raise JobError(f"job {job.id} is still starting")
        why = mover.cannot_move(job.pid)
        if why:
            job.cannot_move = why
            raise JobError(f"job {job.id} cannot be checkpointed: {why}")
        self.books.moving.add(key)
        try:
            images = self.books.images_dir(f"{job.id}.ckpt")
            try:
                meta = await self._dump(job, images, hold)
            except BaseException:
                shutil.rmtree(images, ignore_errors=True)
                raise
            return images, meta
        finally:
            self.books.moving.discard(key)

    async def _dump(self, job: Job, images: Path, hold: bool) -> dict[str, Any]:
        spool = self.jc.spool
        ours = spool_files(spool, job)
        init = job.pid
        assert init is not None
        with urgent():  # the job is frozen meanwhile: see omuscd.priority
            frozen = trio.current_time()
            taken = time.time()
            try:
                pids = await stop_tree(init)
                stopped = trio.current_time()
                dumped = False
                try:
                    files = written_files(pids[1:], ours)
                    out = spool.ends(job.id)
                    used, _ = tree_usage(init)
                    noted = trio.current_time()
                    await self.host.mover.dump(init, images, running=True)
                    dumped = True
                finally:
                    if not (hold and dumped):
                        signal_tree(init, signal.SIGCONT)
            except MoveError as e:
                raise JobError(f"checkpoint of job {job.id} failed, it runs on: {e}") from None
            freeze = trio.current_time() - frozen
        if not hold:
            self.host.sampler.resumed(tree(init))
        log.info("job %s checkpointed: frozen %.3fs (stopped in %.3fs, sizes noted in %.3fs, "
                 "dump %.3fs); %d files open for writing", job.id, freeze, stopped - frozen,
                 noted - stopped, freeze - (noted - frozen), len(files))
        return {"time": taken, "freeze": round(freeze, 4), "node": self.jc.me,
                "out": {str(k): v for k, v in out.items()}, "files": files,
                "cpu": job.cpu_moved + used,
                "paths": {"stdout": str(spool.path(job.id, STDOUT)),
                          "stderr": str(spool.path(job.id, STDERR)),
                          "status": str(spool.dir(job.id) / "status")}}

    def release(self, job: Job, stop: bool) -> None:
        """After a checkpoint taken with ``hold``: the job goes on (SIGCONT), or ``stop``:
        it is killed here without an end of its own (it waits at its home as
        checkpointed; its record here, if a guest's, is finished)."""
        if job.pid is None:
            return
        if not stop:
            signal_tree(job.pid, signal.SIGCONT)
            self.host.sampler.resumed(tree(job.pid))
            return
        job.node_changed = True  # its watcher records no end
        for victim in (job.launcher, job.pid):
            if victim is not None:
                try:
                    os.kill(victim, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.host.jobs_changed()
        if job.id in self.jc.guests:
            job.transition(record.MOVED, node=job.home, reason="checkpointed and stopped")
            self.jc.guests.pop(job.id, None)
        log.info("job %s stopped after its checkpoint", job.id)

    async def serve(self, ch: Channel, msg: dict[str, Any]) -> None:
        """Serve ``checkpoint`` (the home asks the node running its job): ``checkpoint``
        with the meta, the images (``file`` + data), then ``done``; or a refusal.  With
        ``stop``, the job stays stopped until the home says ``stop`` (it is killed,
        answered ``stopped``) or anything else (it goes on)."""
        job = self.jc.find(str(msg.get("job")))
        if job is None or job.node != self.jc.me or job.home != ch.peer_id:
            await ch.send(refusal(f"job {msg.get('job')} does not run on {self.host.name} "
                                  "for that home"))
            return
        stop = msg.get("stop") is True
        seq = msg.get("seq")
        try:
            images, meta = await self.take(job, hold=stop)
        except JobError as e:
            await ch.send(refusal(str(e), "failed"))
            return
        stopped, part = False, None
        try:
            if self.shared is not None and type(seq) is int and 0 < seq < 10**9:
                try:
                    part, meta = await self._to_shared(job, images, seq, meta)
                except JobError as e:
                    await ch.send(refusal(str(e), "failed"))
                    return
            await ch.send({"op": "checkpoint", "meta": meta})
            for f in sorted(images.iterdir()) if part is None else []:
                if f.suffix != ".log":
                    await send_file(ch, "file", f.name, f)
            await ch.send({"op": "done"})
            if job.home != self.jc.me:  # a guest with a checkpoint: fenced if its home dies
                job.checkpoint = {"time": meta["time"], "size": 0}
                self.jc.save(job)  # leased, also after a restart of this daemon
            answer = None if part is None else await self._keep_shared(ch, part, seq)
            if stop:
                with trio.fail_after(RESTORE_TIMEOUT):
                    answer = answer or await ch.receive_msg()
                stopped = answer.get("op") == "stop"
                if stopped:
                    self.release(job, stop=True)
                    await ch.send({"op": "stopped"})
        except (ChannelError, trio.TooSlowError, OSError) as e:
            log.warning("job %s: checkpoint cut short: %s", job.id, e)
        finally:
            if part is not None:
                part.close()  # removed unless kept
            shutil.rmtree(images, ignore_errors=True)
            if stop and not stopped:
                self.release(job, stop=False)

    async def _to_shared(self, job: Job, images: Path, seq: int,
                         meta: dict[str, Any]) -> tuple[SharedPart, dict[str, Any]]:
        """The images of a checkpoint into this node's checkpoint_dir, as ``.part-SEQ``;
        the meta for the home, naming where they will be.  JobError (logged) if the
        directory cannot be used: in a thread, and given up after STEP_TIMEOUT (a file
        server that does not answer leaves that thread behind, not the daemon)."""
        shared = self.shared
        assert shared is not None
        try:
            with trio.fail_after(STEP_TIMEOUT):
                part = await trio.to_thread.run_sync(shared.prepare, job.id, seq, str(images),
                                                     abandon_on_cancel=True)
        except (OSError, ValueError, trio.TooSlowError) as e:
            why = str(e) or f"checkpoint_dir {shared.path} did not answer within " \
                f"{STEP_TIMEOUT:g}s"
            log.warning("job %s: checkpoint failed, it runs on: %s", job.id, why)
            raise JobError(f"checkpoint of job {job.id} failed, it runs on: {why}") from None
        return part, {**meta, "dir": part.where, "size": part.pending.size, "seq": seq}

    async def _keep_shared(self, ch: Channel, part: SharedPart,
                           seq: int) -> dict[str, Any] | None:
        """Wait for the home's word on a checkpoint written to the checkpoint_dir: ``keep``
        makes it checkpoint ``seq`` there (answered ``kept``, or why not); anything else
        drops it, and is returned (a job stopped for the checkpoint: its fate)."""
        with trio.fail_after(RESTORE_TIMEOUT):
            answer = await ch.receive_msg()
        if answer.get("op") != "keep":
            return answer
        try:
            with trio.fail_after(STEP_TIMEOUT):
                await trio.to_thread.run_sync(SharedDir.commit, part, seq,
                                              abandon_on_cancel=True)
        except (OSError, trio.TooSlowError) as e:
            why = str(e) or "no answer"
            log.warning("checkpoint %s not kept: %s", part.where, why)
            await ch.send(refusal(f"its images could not be kept in {part.where}: {why}",
                                  "failed"))
            return None
        await ch.send({"op": "kept"})
        return None


class Checkpoints(Dumps):
    """Checkpoints of the jobs of this home: on demand and periodic, wherever they run
    (the dump itself: Dumps, here or on the node running the job)."""

    def __init__(self, jc: JobControl, host: MoveHost, books: MoveBooks):
        super().__init__(jc, host, books)
        self.every: set[str] = set()  # jobs with a periodic task
        self.taking: dict[str, trio.CancelScope] = {}  # checkpoints under way, by job

    @property
    def store(self) -> CheckpointStore:
        """The checkpoints of this home's jobs (the job layer's, one store)."""
        return self.jc.checkpoints

    def cancel(self, job_id: str) -> None:
        """Cut short a checkpoint of this job under way (its node died: the channel to it
        might only time out)."""
        scope = self.taking.get(job_id)
        if scope is not None:
            scope.cancel()

    async def send_images(self, ch: Channel, job: Job, seq: int, meta: dict[str, Any]) -> None:
        """The images of checkpoint ``seq`` to the node restoring the job (the ``file``
        steps of an ``immigrate``).  In a checkpoint_dir: that node reads them there if it
        can (``images-at``: a shared filesystem, they do not cross the network), else they
        are read here and sent."""
        if "dir" in meta:
            await ch.send({"op": "images-at", "dir": meta["dir"]})
            with trio.fail_after(STEP_TIMEOUT + 5):
                reply = await ch.receive_msg()
            if reply.get("op") == "images" and reply.get("ok") is True:
                return
            log.info("job %s: %s cannot read checkpoint %d in %s (%s); sent from here",
                     job.id, self.jc.node_name(ch.peer_id), seq, meta["dir"],
                     error_text(reply, "refused"))
            try:  # not in this daemon's loop: a file server that does not answer
                with trio.fail_after(STEP_TIMEOUT):
                    await trio.to_thread.run_sync(_reachable, meta["dir"],
                                                  abandon_on_cancel=True)
            except trio.TooSlowError:
                raise JobError(f"{meta['dir']} does not answer") from None
        with self.store.opened(job.id, seq) as d:
            for name in sorted(os.listdir(d)):
                if name != META:
                    await send_fd(ch, "file", name, open_private(name, os.O_RDONLY, d))

    async def checkpoint(self, job: Job, action: str = "checkpoint") -> str:
        """Take a checkpoint of a job of this home, wherever it runs; what happened, for
        the user.  JobError if none could be taken (the job runs on).  ``action``
        checkpoint-stop / checkpoint-exit: then the job is stopped (killed where it ran,
        after its checkpoint is kept here) and waits as CHECKPOINTED for ``resume``;
        -exit also ends its attached clients."""
        if job.home != self.jc.me:
            raise JobError(f"job {job.id}: its home node is unreachable; no checkpoint now")
        if job.stdin:
            raise JobError(f"job {job.id} cannot be checkpointed: its standard input is a "
                           "pipe from omuscd run (--stdin)")
        await self._settled(job)
        if job.state != record.RUNNING:
            raise JobError(f"job {job.id} is {job.state}")
        stop = action in ("checkpoint-stop", "checkpoint-exit")
        node_name = job.node_name
        self.books.moving.add(job.id)  # one move or checkpoint at a time; signals held
        try:
            with trio.CancelScope() as scope:
                self.taking[job.id] = scope
                summary = await self._checkpoint(job, stop)
            if scope.cancelled_caught:
                raise JobError(f"the checkpoint of job {job.id} was cut short: "
                               f"{job.node_name} is gone")
            if stop:
                job.transition(record.CHECKPOINTED, node=self.jc.me, node_name=self.host.name,
                               pid=None, launcher=None, checkpoint=summary,
                               ended=time.time() if action == "checkpoint-exit" else None)
        finally:
            self.taking.pop(job.id, None)
            self.books.moving.discard(job.id)
            self.jc.release_held(job)
        job.checkpoint = summary
        self.jc.save(job)
        job.notify()
        text = (f"job {job.id} checkpointed on {node_name}: {summary['size'] / 1e6:.1f} "
                f"MB, frozen {summary['freeze']:.3f}s")
        if stop:
            text += (f"; {'ended' if action == 'checkpoint-exit' else 'stopped'}: "
                     f"'resume {job.id}' resumes it")
        self.host.publish([Event("checkpoint", text, {"job": job.id, **summary})])
        return text

    async def _settled(self, job: Job) -> None:
        """Wait for a move of the job to end, a post-copy one too (its memory follows it
        for as long as the link takes): a dump of a job whose memory has not all arrived
        would miss it.  JobError if the move lasts longer than SETTLE_TIMEOUT."""
        with trio.move_on_after(SETTLE_TIMEOUT):
            while job.id in self.books.moving:
                await trio.sleep(0.1)
        if job.id in self.books.moving:
            raise JobError(f"job {job.id} is moving; its move did not end within "
                           f"{SETTLE_TIMEOUT:g}s, so no checkpoint now")

    async def _checkpoint(self, job: Job, stop: bool) -> dict[str, Any]:
        with self.store.begin(job.id) as pending:
            seq = self.store.next_seq(job.id)
            if job.node == self.jc.me:
                meta, part = await self._take_here(job, pending, stop, seq)
                try:
                    return await self._keep(job, pending, meta, stop, None, part)
                finally:
                    if part is not None:
                        part.close()
            ch, meta = await self._fetch(job, pending, stop, seq)
            try:
                return await self._keep(job, pending, meta, stop, ch)
            finally:
                await ch.aclose()

    async def _keep(self, job: Job, pending: Pending, meta: dict[str, Any], stop: bool,
                    ch: Channel | None, part: SharedPart | None = None) -> dict[str, Any]:
        """Keep the checkpoint once the output here has reached it; a job stopped for
        it (``stop``) is then killed where it ran (``ch``: over the channel that brought
        the checkpoint), or let go on if it could not be kept.  Images in a
        checkpoint_dir (meta ``dir``) are made a checkpoint there first: by this node
        (``part``), else by the node running the job (see _keep_shared)."""
        kept = False
        try:
            await self._output_reached(job, meta)
            if stop:
                self.jc.stop_following(job.id)  # nothing more comes from where it ran
            if "dir" in meta:
                await self._images_kept(job, meta, ch, part)
            try:  # in a thread: syncing a big job's images takes seconds of the disk
                summary = await trio.to_thread.run_sync(self.store.commit, job.id, pending,
                                                        meta)
            except OSError as e:
                raise JobError(f"job {job.id}: cannot keep its checkpoint: {e}") from None
            kept = True
        finally:
            if stop and ch is None:
                self.release(job, stop=kept)
            elif stop and ch is not None:
                await self._stop_there(job, ch, kept)
        return {**summary, "freeze": meta.get("freeze", 0.0)}

    async def _images_kept(self, job: Job, meta: dict[str, Any], ch: Channel | None,
                           part: SharedPart | None) -> None:
        """Have the images written to a checkpoint_dir made checkpoint ``meta['seq']``
        there; JobError saying why not."""
        try:
            with trio.fail_after(STEP_TIMEOUT):
                if part is not None:
                    await trio.to_thread.run_sync(SharedDir.commit, part, int(meta["seq"]),
                                                  abandon_on_cancel=True)
                    return
                assert ch is not None
                await ch.send({"op": "keep"})
                reply = await ch.receive_msg()
        except (OSError, ChannelError, trio.TooSlowError) as e:
            reply = {"op": "error", "error": str(e) or "no answer"}
        if reply.get("op") != "kept":
            raise JobError(f"job {job.id}: its checkpoint could not be kept in "
                           f"{meta['dir']}: {error_text(reply, 'refused')}")

    async def _stop_there(self, job: Job, ch: Channel, kept: bool) -> None:
        """Tell the node running the job to kill it (kept) or let it go on."""
        try:
            await ch.send({"op": "stop" if kept else "go-on"})
            if kept:
                with trio.fail_after(STEP_TIMEOUT):
                    if (await ch.receive_msg()).get("op") == "stopped":
                        return
                raise JobError("no answer")
        except (ChannelError, trio.TooSlowError, JobError) as e:
            if kept:
                log.warning("job %s: %s did not confirm it stopped it (%s); it is "
                            "checkpointed here all the same", job.id, job.node_name, e)
        if not kept:
            self.jc.follow(job, anew=True)

    async def _take_here(self, job: Job, pending: Pending, stop: bool,
                         seq: int) -> tuple[dict[str, Any], SharedPart | None]:
        """A checkpoint of a job running here: its images into ``pending``, or into this
        node's checkpoint_dir (then the part written there is returned too)."""
        images, meta = await self.take(job, hold=stop)
        try:
            if self.shared is not None:
                part, meta = await self._to_shared(job, images, seq, meta)
                return meta, part
            pending.fill(str(images))
            return meta, None
        except BaseException as e:
            if stop:
                self.release(job, stop=False)
            if isinstance(e, OSError):
                raise JobError(f"job {job.id}: cannot keep its checkpoint: {e}") from None
            raise
        finally:
            shutil.rmtree(images, ignore_errors=True)

    async def _fetch(self, job: Job, pending: Pending, stop: bool,
                     seq: int) -> tuple[Channel, dict[str, Any]]:
        """Have the node running the job take a checkpoint; its images into ``pending``.
        The channel stays open (the caller closes it): a job stopped for the checkpoint
        (``stop``) waits on it for its fate."""
        try:
            ch = await self.jc.connect(job.node)
        except ChannelError as e:
            raise JobError(f"cannot reach node {job.node_name}: {e}") from None
        try:
            await ch.send({"op": "checkpoint", "job": job.id, "seq": seq,
                           **({"stop": True} if stop else {})})
            with trio.fail_after(RESTORE_TIMEOUT):
                reply = await ch.receive_msg()
            if reply.get("op") != "checkpoint" or not isinstance(reply.get("meta"), dict):
                raise JobError(error_text(reply, "the node running it refused"))
            meta = _checked_meta(reply["meta"])
            if "dir" in meta and meta["seq"] != seq:
                raise ValueError(f"checkpoint {meta['seq']} written for {seq}")
            while True:
                with trio.fail_after(STEP_TIMEOUT):
                    m = await ch.receive_msg()
                if m.get("op") == "done":
                    return ch, meta
                if m.get("op") != "file":
                    raise JobError(f"unexpected {str(m.get('op'))[:20]!r}")
                name = image_name(m.get("name"))
                with os.fdopen(pending.create(name), "wb") as f:
                    await receive_file(ch, f, name, int(m["size"]))
                    pending.size += int(m["size"])
        except (ChannelError, trio.TooSlowError, OSError, KeyError, ValueError) as e:
            await ch.aclose()
            raise JobError(f"checkpoint of job {job.id} failed: {e or 'timeout'}") from None
        except BaseException:
            await ch.aclose()
            raise

    async def _output_reached(self, job: Job, meta: dict[str, Any]) -> None:
        """Wait until this home has the output the job had written at the checkpoint (it
        streams in from the node running the job): a restore resumes output from there."""
        want = {STDOUT: int(meta["out"].get(str(STDOUT), 0)),
                STDERR: int(meta["out"].get(str(STDERR), 0))}
        with trio.move_on_after(OUTPUT_TIMEOUT):
            while any(job.offsets.get(s, 0) < n for s, n in want.items()):
                changed = job.changed
                if job.state in record.FINAL:
                    break
                with trio.move_on_after(0.25):
                    await changed.wait()
        if any(job.offsets.get(s, 0) < n for s, n in want.items()):
            raise JobError(f"job {job.id}: its output did not reach its home in time; "
                           "checkpoint dropped")

    def end_checkpointed(self, job: Job, sig: int) -> str:
        """A signal for a checkpointed job (it runs nowhere): it ends, killed by it, and
        its checkpoints go."""
        if not 1 <= sig <= 64:
            raise JobError(f"no signal {sig}")
        job.exit = {"signal": sig}
        job.transition(record.EXITED, ended=time.time())
        self.jc.finished(job)  # its checkpoints go
        return f"job {job.id} was checkpointed; it ended with signal {sig}"

    def keep_checkpointed(self, job: Job) -> None:
        """Take a checkpoint of ``job`` every ``job.checkpoint_every`` seconds while it
        runs (a task per job; none for a job without an interval)."""
        if not job.checkpoint_every and job.home == self.jc.me:  # the tunable's, at start
            job.checkpoint_every = self.host.cfg.checkpoint_every
        if job.checkpoint_every > 0 and job.id not in self.every:
            self.every.add(job.id)
            self.jc.nursery.start_soon(self._every, job)  # type: ignore[union-attr]

    async def _every(self, job: Job) -> None:
        every = job.checkpoint_every
        next_at = (job.checkpoint.get("time") or job.started) + every
        try:
            while True:
                await trio.sleep(max(0.2, next_at - time.time()))
                if job.state in record.FINAL:
                    return
                if job.state == record.CHECKPOINTED:  # stopped: the clock starts again on resume
                    await job.changed.wait()
                    next_at = time.time() + every
                    continue
                if job.state != record.RUNNING or job.id in self.books.moving:
                    next_at = time.time() + min(1.0, every)  # after the move
                    continue
                try:
                    await self.checkpoint(job)
                    next_at = job.checkpoint["time"] + every
                except JobError as e:
                    log.info("job %s: no checkpoint this time: %s", job.id, e)
                    next_at = time.time() + min(every, RETRY)
        finally:
            self.every.discard(job.id)


def _reachable(where: str) -> None:
    """Open and close the directory ``where`` as a restore would (OSError if it cannot)."""
    os.close(open_root_dir(where, inner=2))


def _checked_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's meta from a peer, in the shape a restore relies on (ValueError)."""
    files = [[str(p), int(n)] for p, n in meta["files"]]
    if any(not p.startswith("/") or n < 0 for p, n in files):
        raise ValueError("bad file list")
    paths = {k: str(meta["paths"][k]) for k in ("stdout", "stderr", "status")}
    out = {str(k): int(meta["out"][str(k)]) for k in (STDOUT, STDERR)}
    checked = {"time": float(meta["time"]), "freeze": float(meta.get("freeze", 0.0)),
               "node": int(meta.get("node", 0)), "out": out, "files": files,
               "cpu": float(meta.get("cpu", 0.0)), "paths": paths}
    if "dir" in meta:  # its images are in the checkpoint_dir of the node running the job
        where = str(meta["dir"])
        if not where.startswith("/") or os.path.normpath(where) != where or \
                not where.rpartition("/")[2].isdigit():
            raise ValueError("bad checkpoint directory")
        checked.update(dir=where, size=int(meta["size"]), seq=int(meta["seq"]))
    return checked
