"""The target of a move: check it may take the job, receive its images and spool, restore it
stopped, and let it run on the commit (post-copy: run it, relay its page requests, keep it
once it has all of its memory)."""

from __future__ import annotations

import io
import logging
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from omuscd import rootexec
from omuscd.channel import Channel, ChannelError
from omuscd.cluster.rpc import refusal
from omuscd.jobs.checkpoints import copy_shared
from omuscd.jobs.record import (
    FINAL,
    RUNNING,
    STDERR,
    STDOUT,
    STREAM_FILES,
    Job,
    JobError,
)
from omuscd.jobs.spool import open_private
from omuscd.migrate import Inherit, MoveError, postcopy, precheck
from omuscd.migrate.books import ARRIVED, GIVEN_UP, MoveBooks, MoveHost
from omuscd.migrate.gate import INVENTORY, InventoryGate
from omuscd.migrate.page_relay import receive_pages, socket_pair
from omuscd.migrate.reopened import beyond_user
from omuscd.migrate.transfer import (
    RESTORE_TIMEOUT,
    STEP_TIMEOUT,
    image_name,
    receive_file,
    receive_sparse,
)
from omuscd.migrate.tree import pin_tree, renice_tree, signal_tree
from omuscd.priority import urgent
from omuscd.proctab import tree

if TYPE_CHECKING:
    from omuscd.jobs.node import JobControl

log = logging.getLogger("omuscd.migrate")


class Target:
    """The target side of moves: check, receive, restore, commit."""

    def __init__(self, jc: JobControl, host: MoveHost, books: MoveBooks):
        self.jc = jc
        self.host = host
        self.books = books

    async def precheck(self, ch: Channel, msg: dict[str, Any]) -> None:
        """Serve ``precheck``: could a job holding ``facts`` (see omuscd.migrate.precheck)
        be restored here?  Asked before the job is frozen; answered ``fit``, or refused
        naming what is missing.  In a thread: a path may be on a slow file system."""
        mover = self.host.mover
        if not mover.available:
            why: str | None = f"migration is {mover.describe()} on {self.host.name}"
        else:
            why = await trio.to_thread.run_sync(precheck.check, msg.get("facts"),
                                                 self.host.name)
        await ch.send(refusal(why) if why else {"op": "fit"})

    async def immigrate(self, ch: Channel, msg: dict[str, Any]) -> None:
        jc = self.jc
        mover = self.host.mover
        try:
            job = Job.from_wire(msg["job"])
            if not mover.available:
                raise JobError(f"migration is {mover.describe()} on {self.host.name}")
            jc.check_guest_ok(job.owner, local=job.home == jc.me)
            if not os.path.isdir(job.cwd):
                raise JobError(f"node {self.host.name}: working directory {job.cwd} does not "
                               "exist")
            images = self.books.images_dir(f"{job.id}.in")
        except (JobError, KeyError, TypeError, ValueError) as e:
            self.books.tell(GIVEN_UP)  # the room held for this move is free again
            await ch.send(refusal(str(e)))
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
            early: _Lazy | None = None  # lazy-pages and the guard, started ahead
            gate: InventoryGate | None = None  # what lazy-pages reads first, held
            prepared: _Prepared | None = None  # the restore's CRIU and files, ahead
            try:
                spool_dir = jc.spool.create(job)
                prepared = await _Prepared.start(mover, jc.spool.job_files(job.id), images)
                ready: dict[str, Any] = {"op": "ready"}
                lazy = msg.get("lazy") is True and mover.lazy
                if lazy:
                    ready["lazy"] = True
                    # lazy-pages and its guard made now, and lazy-pages started: it
                    # reads its first image through a gate opened when told 'lazy-start'
                    # (once the images it reads first are here; see omuscd.migrate.gate)
                    early = await _Lazy.start(mover, images, gated=True)
                    gate = early.gate
                    ready["lazy_start"] = True
                elif msg.get("pages") is True and mover.streams and self.host.cfg.stream_pages:
                    pages, theirs = socket_pair()
                    try:
                        pager = await mover.page_server(images, theirs.fileno())
                    finally:
                        theirs.close()
                    ready["pages"] = True
                await ch.send(ready)
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
                    if op == "file" and gate is not None and not gate.released and \
                            m.get("name") == INVENTORY:
                        size = gate.room(m.get("size"))
                        buf = io.BytesIO()
                        await receive_file(ch, buf, INVENTORY, size)
                        gate.hold(buf.getvalue())
                    elif op == "file":
                        name = image_name(m["name"])
                        fd = open_private(str(images / name),
                                          os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                        with os.fdopen(fd, "wb") as f:
                            await receive_file(ch, f, name, int(m["size"]))
                    elif op == "images-at":  # a checkpoint's, in a checkpoint_dir
                        await ch.send(await _images_at(job, str(m.get("dir")), images))
                    elif op == "sparse" and lazy:
                        name = image_name(m["name"])
                        await receive_sparse(ch, images / name, m["size"], m["runs"])
                    elif op == "spool":
                        stream = int(m["name"])
                        if stream not in (STDOUT, STDERR):
                            raise ChannelError("bad spool stream")
                        await _receive_spool(ch, prepared.fds[stream - STDOUT],
                                             STREAM_FILES[stream], int(m["size"]))
                    elif op == "lazy-start" and lazy and early is not None:
                        if gate is not None:
                            gate.release()
                    elif op == "restore" and lazy and m.get("lazy") is True:
                        if gate is not None:  # a source that did not say 'lazy-start'
                            gate.release()
                        job.cpu_moved = float(m.get("cpu", job.cpu_moved))
                        parts, early = early, None  # taken over
                        await self._restore_lazy(job, ch, images, spool_dir, dict(m["paths"]),
                                                 m.get("nice"), parts, prepared)
                        return
                    elif op == "restore":
                        paths = dict(m["paths"])
                        job.cpu_moved = float(m.get("cpu", job.cpu_moved))
                        steps: dict[str, float] = {}
                        if gate is not None:  # lazy-pages must not wait: its inventory
                            gate.release()
                        made: list[int] = []
                        try:
                            pid = await self._restore(job, images, spool_dir, paths,
                                                      steps=steps, prepared=prepared,
                                                      made=made)
                        except BaseException:
                            pid = made[0] if made else None  # killed and collected below
                            raise
                        if isinstance(m.get("nice"), int):
                            renice_tree(pid, max(-20, min(19, m["nice"])))
                        await ch.send({"op": "restored", "pid": pid, "paged": paged,
                                       "steps": steps})
                        break
                    else:
                        raise ChannelError(f"unexpected {op!r}")
                    if gate is not None:  # our end closed once lazy-pages read it
                        gate.settle()
                with trio.fail_after(STEP_TIMEOUT):
                    m = await ch.receive_msg()
                if m.get("op") != "commit":
                    raise ChannelError("no commit")
                resumed = trio.current_time()
                signal_tree(pid, signal.SIGCONT)
                self.host.sampler.resumed(tree(pid))  # its load counts from now
                self._adopted(job, pid)
                pid = None
                # how long it has run already: the source's measure of the freeze ends
                # when the job runs, not when it hears so (see source.Steps.resumed)
                await ch.send({"op": "running", "resumed": trio.current_time() - resumed})
            except (ChannelError, MoveError, JobError, trio.TooSlowError, OSError, KeyError,
                    ValueError) as e:
                _kill_restored(pid)  # restored but not committed: this copy must not run
                pid = None
                if pager is not None and pager.returncode is None:
                    pager.kill()
                self.host.mover.keep_log(images / "page-server.log", "page-server")
                self.books.tell(GIVEN_UP)  # the room held for this move is free again
                if home is not None:
                    self._follow_again(home)
                log.warning("job %s: incoming move abandoned: %s", msg.get("job", {}).get("id"),
                            e)
                try:
                    await ch.send(refusal(f"{self.host.name}: {e}", "failed"))
                except ChannelError:
                    pass
            finally:  # every way out (this daemon stopping too): what it started ends
                with trio.CancelScope(shield=True):
                    _kill_restored(pid)
                    if pager is not None and pager.returncode is None:
                        pager.kill()
                        await pager.wait()
                    if pages is not None:
                        pages.socket.close()
                    if early is not None:  # the move failed before its restore
                        await early.abandon()
                    if prepared is not None:
                        await prepared.close()
                    shutil.rmtree(images, ignore_errors=True)

    def _follow_again(self, job: Job) -> None:
        """The move home failed: the job runs on where it was; follow it again, from
        the end of the spool here (which may be that node's, received for the move)."""
        if job.state in FINAL or job.node == self.jc.me:
            return
        job.offsets.update(self.jc.spool.ends(job.id))
        self.jc.follow(job, anew=True)

    async def _restore_lazy(self, job: Job, ch: Channel, images: Path, spool_dir: Path,
                            paths: dict[str, str], nice: Any, parts: _Lazy | None,
                            prepared: _Prepared | None = None) -> None:
        """Post-copy (see omuscd.migrate.postcopy): restore the job without the memory that can
        come later, resume it on the commit, relay its page requests to the source, and
        take it into the books once it has every page.  Any failure kills this copy
        before its page source goes, then raises (the source resumes its own).  ``parts``:
        lazy-pages and the guard, started when the move began."""
        if parts is None:  # (a move that did not ask for post-copy when it began)
            raise ChannelError("a post-copy restore of a move that is not post-copy")
        key = f"in:{job.id}"
        self.books.moving.add(key)  # 'has' waits for the outcome
        pid = None
        mine = parts.mine
        lazyd = None
        steps: dict[str, float] = {}
        try:
            waited = trio.current_time()
            lazyd = await parts.ready()
            steps["lazy-pages ready"] = trio.current_time() - waited
            relay = postcopy.Relay(ch, mine)
            failed: Exception | None = None
            async with trio.open_nursery() as nursery:  # errors leave it by hand: no groups
                await nursery.start(relay.run)
                try:
                    # the guard knows the job as soon as CRIU made it, before CRIU
                    # restores its files, locks or memory: a daemon dying in the middle
                    # of the restore leaves no stopped copy holding the job's locks
                    guard = parts.guard
                    made: list[int] = []
                    try:
                        pid = await self._restore(job, images, spool_dir, paths, lazy=True,
                                                  steps=steps, prepared=prepared,
                                                  rooted=lambda p: _guard_watch(guard, p),
                                                  made=made)
                    except BaseException:
                        # killed; collected below, once the guard let go of its pid
                        pid = made[0] if made else None
                        raise
                    if isinstance(nice, int):
                        renice_tree(pid, max(-20, min(19, nice)))
                    await ch.send({"op": "restored", "pid": pid, "paged": 0, "steps": steps})
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
                        kept = self.host.mover.keep_log(images / "lazy-pages.log", "lazy-pages")
                        raise MoveError(f"criu lazy-pages failed (exit {lazyd.returncode})"
                                        f"{kept}")
                    # every page is there: the guard has nothing more to do (and must not
                    # keep the pid of lazy-pages, collected now)
                    await _guard_done(parts.guard)
                except (ChannelError, MoveError, OSError, trio.TooSlowError) as e:
                    failed = e
                nursery.cancel_scope.cancel()
            if failed is not None:
                raise failed
            self.host.sampler.resumed(tree(pid))  # its load counts from now
            self._adopted(job, pid)
            pid = None
            await ch.send({"op": "running"})
        finally:  # every way out (this daemon stopping too)
            with trio.CancelScope(shield=True):
                if pid is not None:  # not taken: this copy must not run, and goes first
                    signal_tree(pid, signal.SIGKILL)
                # lazy-pages killed before the guard is told it has nothing to do (see
                # GUARD), and collected after: a daemon dying between cannot leave it
                parts.kill()
                await parts.done()
                _kill_restored(pid)
                pid = None
                mine.socket.close()
                self.books.moving.discard(key)

    async def _restore(self, job: Job, images: Path, spool_dir: Path,
                       paths: dict[str, str], lazy: bool = False,
                       steps: dict[str, float] | None = None,
                       prepared: _Prepared | None = None,
                       rooted: Callable[[int], Awaitable[None]] | None = None,
                       made: list[int] | None = None) -> int:
        """Restore the job stopped; ``steps`` gets how long its parts took (see
        omuscd.migrate.source.Steps); ``prepared``: its CRIU and files, made ready before
        (else made now); ``rooted``: see Mover.restore.  ``made`` gets the init's pid as
        soon as CRIU made it: a restore that fails after that (or is cancelled, CRIU
        killed) may leave it, killed here; the caller collects it (after telling its
        guard), or, without ``made``, it is collected here."""
        own = made is None
        made = [] if made is None else made

        async def note(p: int) -> None:
            made.append(p)
            if rooted is not None:
                await rooted(p)

        took = {} if steps is None else steps
        start = trio.current_time()
        if prepared is None:
            prepared = await _Prepared.start(self.host.mover, self.jc.spool.job_files(job.id),
                                             images)
        fds = prepared.fds  # the restored job writes through these
        try:
            inherit = [Inherit(paths["stdout"], fds[0]), Inherit(paths["stderr"], fds[1]),
                       Inherit(paths["status"], fds[2])]
            ours = {(st.st_dev, st.st_ino) for st in map(os.fstat, fds)}
            pid = await self.host.mover.restore(images, inherit, images / "restored.pid", lazy,
                                                prepared.worker, note)
        except BaseException:
            if made:  # a tree CRIU made and did not take down (it was killed)
                signal_tree(made[0], signal.SIGKILL)
                if own:
                    _reap(made[0])
            raise
        finally:
            await prepared.close()
        restored = trio.current_time()
        took["restore"] = restored - start
        # CRIU reopened its files by path, as root: nothing the user could not open
        why = beyond_user(tree(pid)[1:], job.owner, ours)
        took["check"] = trio.current_time() - restored
        if why is not None:
            signal_tree(pid, signal.SIGKILL)
            if own:
                _reap(pid)
            log.warning("job %s of %s: restored holding what its user may not: %s", job.id,
                        job.owner.user, why)
            raise MoveError(f"the restored job holds what {job.owner.user} may not open "
                            f"({why})")
        pin_tree(pid, self.host.cfg.cpus)  # CRIU restores the source's; ours is what we lend
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
        record.transition(RUNNING, node=jc.me, node_name=self.host.name, landed_at=time.time(),
                          pid=pid, cpu_moved=job.cpu_moved)
        # the job takes the room held for it; its move is counted with the load, at the
        # same instant (see JobBooks.watch_restored)
        self.books.tell(ARRIVED)
        jc.watch_restored(record, pid, run)

    async def has(self, ch: Channel, msg: dict[str, Any]) -> None:
        # a post-copy move of it in progress here ends either way first
        with trio.move_on_after(STEP_TIMEOUT / 2):
            while f"in:{msg.get('job')}" in self.books.moving:
                await trio.sleep(0.05)
        job = self.jc.find(str(msg.get("job")))
        running = job is not None and job.node == self.jc.me and job.state == RUNNING
        # asked by a node running a job of this home (Recovery.settle_checkpoint): does
        # this home count it there, and does it hold a checkpoint of it?
        # (busy: a checkpoint of it is being kept here; ask again)
        yours = (job is not None and job.home == self.jc.me and job.node == ch.peer_id
                 and job.state not in FINAL)
        await ch.send({"op": "has", "running": running, "time": time.time(),
                       "yours": yours, "checkpoint": yours and bool(job and job.checkpoint),
                       "busy": job is not None and job.id in self.books.moving})


class _Prepared:
    """What a restore needs beside its images, made ready before the job is frozen: the
    files the restored job inherits (its stdout, stderr and status in this node's
    spool: see JobSpool.job_files) and the CRIU that will restore it, holding them (see
    omuscd.migrate.swrk)."""

    def __init__(self, fds: tuple[int, int, int], worker: Any):
        self.fds = fds
        self.worker = worker

    @classmethod
    async def start(cls, mover: Any, fds: tuple[int, int, int], images: Path) -> _Prepared:
        """Takes ``fds`` (closes them, should the worker not start)."""
        try:
            return cls(fds, await mover.prepare_restore(images, fds))
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise

    async def close(self) -> None:
        """Done with (restored, or given up): the files closed, the worker collected."""
        fds, self.fds = self.fds, (-1, -1, -1)
        for fd in fds:
            if fd >= 0:
                os.close(fd)
        await self.worker.close()


async def _receive_spool(ch: Channel, fd: int, name: str, size: int) -> None:
    """The source's whole output file (``size`` bytes) written over this node's, the
    file open on ``fd``: the restored job appends to it through its own descriptor of
    it, given to CRIU before the file came (see _Prepared).  A descriptor of our own
    (through /proc: the same file whatever its path leads to now) writes from its start.
    At the home, where readers of the output read the spool meanwhile, it held a part
    of what comes (followed from the node the job leaves): the same bytes again, and
    more; nothing else is ever seen there."""
    out = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_CLOEXEC)
    with os.fdopen(out, "wb") as f:
        await receive_file(ch, f, name, size)
        f.truncate(size)


#: Kills a lazily restored job (its pid, the first line it is told) if this daemon dies
#: before the job has all of its memory. It holds the daemon's end of the lazy-pages socket
#: too: that end closing with the daemon would end lazy-pages, and the job would then read
#: zeros for pages not yet there. Started with lazy-pages, before the job's restore (a
#: process start less in its freeze), it is told the pid as soon as CRIU has made the job's
#: init (CRIU's setup-namespaces notification, before it restores the job's files, locks and
#: memory, and before it goes on), and "done" once the job has all of its memory, is killed,
#: or was never restored. Ended otherwise (the daemon died), it kills lazy-pages too (its
#: process group, ``$1``: what it forked goes with it), after the job: before the restore,
#: lazy-pages waits for one to connect (criu/uffd.c prepare_uffds) and would wait for ever,
#: its parent init. The daemon says "done" before it collects lazy-pages, so that pid is
#: never another process's here.
GUARD = ('lazy=$1; case $lazy in ""|*[!0-9]*|0|1) lazy=;; esac; read -r pid || pid=; '
         '[ "$pid" = done ] && exit 0; case $pid in ""|*[!0-9]*|0|1) pid=;; '
         '*) read -r word; [ "$word" = done ] && exit 0;; esac; '
         '[ -n "$pid" ] && kill -KILL "$pid"; [ -n "$lazy" ] && kill -9 "-$lazy"; exit 0')


class _Lazy:
    """What a post-copy restore needs beside its images, started ahead of it: the
    daemon's end of the lazy-pages socket (``mine``), ``criu lazy-pages`` starting, and
    the guard."""

    def __init__(self, mine: trio.SocketStream, starting: Any, guard: trio.Process,
                 gate: InventoryGate | None):
        self.mine = mine
        self.starting = starting
        self.guard = guard
        self.gate = gate

    @classmethod
    async def start(cls, mover: Any, images: Path, gated: bool = False) -> _Lazy:
        """Start lazy-pages for ``images`` (which holds what it reads first, or, if
        ``gated``, will: lazy-pages waits at the gate, see omuscd.migrate.gate) and the
        guard, which kills lazy-pages should this daemon die before the restore (see
        GUARD); neither waited for."""
        gate = InventoryGate(images) if gated else None
        mine, theirs = socket_pair()
        starting = None
        try:
            starting = await mover.start_lazy_pages(images, theirs.fileno())
            guard = await _guard(mine.socket.fileno(), starting.proc.pid)
        except BaseException:
            with trio.CancelScope(shield=True):
                if starting is not None:
                    await starting.abandon()
            mine.socket.close()
            if gate is not None:
                gate.close()
            raise
        finally:
            theirs.close()
        return cls(mine, starting, guard, gate)

    async def ready(self) -> trio.Process:
        """lazy-pages, once it is ready (its gate released before: see immigrate)."""
        gate = self.gate
        if gate is None:
            return await self.starting.ready()
        try:
            return await self.starting.ready(meanwhile=gate.settle)
        finally:
            gate.close()

    def kill(self) -> None:
        """Kill lazy-pages, not yet collected: its pid stays its own until :meth:`done`."""
        self.starting.kill()

    async def done(self) -> None:
        """After :meth:`kill` (or its own end): the guard told it has nothing to do, then
        lazy-pages collected.  Shielded: a stopping daemon collects them too."""
        with trio.CancelScope(shield=True):
            await _guard_done(self.guard)
            await self.starting.abandon()
        if self.gate is not None:
            self.gate.close()

    async def abandon(self) -> None:
        """The move failed before the restore: stop both, close our end."""
        self.kill()
        await self.done()
        self.mine.socket.close()


def _reap(pid: int) -> None:
    """Collect a killed restored job (CRIU made it this daemon's child)."""
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass


def _kill_restored(pid: int | None) -> None:
    """A restored job not taken (``pid``; None: none restored): killed, collected."""
    if pid is not None:
        signal_tree(pid, signal.SIGKILL)
        _reap(pid)


async def _guard(fd: int, lazy: int) -> trio.Process:
    """Start the guard (see GUARD) of the lazy-pages whose pid is ``lazy``, holding
    ``fd`` open for as long as it runs."""
    return await trio.lowlevel.open_process(
        [rootexec.need(rootexec.SH, "sh"), "-c", GUARD, "guard", str(lazy)], stdin=subprocess.PIPE,
        pass_fds=(fd,), env=rootexec.HELPER_ENV)


async def _guard_watch(guard: trio.Process, pid: int) -> None:
    """Tell the guard the restored job's pid: from now on it kills it if we die."""
    assert guard.stdin is not None
    try:
        await guard.stdin.send_all(f"{pid}\n".encode())
    except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
        raise MoveError(f"the guard of the restored job is gone: {e}") from None


async def _guard_done(guard: trio.Process) -> None:
    with trio.CancelScope(shield=True):
        try:
            assert guard.stdin is not None
            await guard.stdin.send_all(b"done\n")
            await guard.stdin.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        await guard.wait()


async def _images_at(job: Job, where: str, images: Path) -> dict[str, Any]:
    """Read the images of a checkpoint from the checkpoint_dir directory its record names
    (a shared filesystem), rather than have its home send them: answered ``images`` with
    ``ok``, or why not (then the home sends them).  In a thread, given up after
    STEP_TIMEOUT (a file server that does not answer)."""
    try:
        with trio.fail_after(STEP_TIMEOUT):
            size = await trio.to_thread.run_sync(copy_shared, where, str(images),
                                                 abandon_on_cancel=True)
    except (OSError, trio.TooSlowError) as e:
        log.info("job %s: its checkpoint's images not read from %s: %s", job.id, where, e)
        return {"op": "images", "ok": False, "error": str(e) or "no answer"}
    log.info("job %s: its checkpoint's images read from %s (%d bytes)", job.id, where, size)
    return {"op": "images", "ok": True}
