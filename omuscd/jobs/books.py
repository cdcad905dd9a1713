"""The books of this node's jobs, shared by its home side (:mod:`omuscd.jobs.home`) and its
guest side (:mod:`omuscd.jobs.guest`): the two tables, job ids, the cluster channel to a
node, keeping records on disk, launching a job here, and taking the jobs up again after a
restart.

``home`` holds the jobs started here (wherever they run); ``guests`` the jobs run here for
another home.  A job both started and run here is in ``home`` only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import trio

from omuscd import channel, ids
from omuscd.channel import Channel, ChannelError, NotSent
from omuscd.cluster.membership import ALIVE, SUSPECT
from omuscd.cluster.view import ClusterView
from omuscd.events import Event, Progress
from omuscd.jobs.checkpoints import CheckpointStore
from omuscd.jobs.host import Unwired
from omuscd.jobs.process import adopt, starting, watch
from omuscd.jobs.record import (
    CHECKPOINTED,
    FENCED,
    FINAL,
    KEEP_EXITED,
    LOST,
    MIGRATING,
    RUNNING,
    Job,
    JobError,
    Owner,
)
from omuscd.jobs.spool import Spool

if TYPE_CHECKING:
    from omuscd.jobs.host import Host, Moves

log = logging.getLogger("omuscd.jobs")

QUERY_TIMEOUT = 3.0
NODE_FLAGS = ("blocked", "lstay", "quiet")
#: How old the reasons jobs here cannot move may be when the jobs are listed (seconds).
REASONS_EVERY = 1.0
#: a node relaying a move's progress to the node that asked sends at most this often
RELAY_EVERY = 0.25


async def serve_with_progress(ch: Channel, msg: dict[str, Any],
                              work: Callable[[Progress | None], Awaitable[Any]]) -> Any:
    """Do ``work`` for a request on ``ch``.  If the request asked for it (``progress``:
    an asker that understands them), ``progress`` messages say how far the work has got
    until it ends; the asker's reply comes after them, as before.  An asker that left
    stops the messages, never the work."""
    if msg.get("progress") is not True:
        return await work(None)
    progress = Progress()
    sent = [0]  # the version last sent
    failed: Exception | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_relay_progress, ch, progress, sent)
        try:
            result = await work(progress)
        except Exception as e:  # raised as it is, below: not in an exception group
            failed = e
        nursery.cancel_scope.cancel()
    if progress.version != sent[0]:  # the last state (done), which the relay had no time for
        await _send_progress(ch, progress)
    if failed is not None:
        raise failed
    return result


async def _relay_progress(ch: Channel, progress: Progress, sent: list[int]) -> None:
    while True:
        sent[0] = await progress.changed_since(sent[0])  # the state the message carries
        with trio.CancelScope(shield=True):  # a message goes out whole or not at all
            if not await _send_progress(ch, progress):
                return
        await trio.sleep(RELAY_EVERY)


async def _send_progress(ch: Channel, progress: Progress) -> bool:
    """One ``progress`` message; False if the asker is gone (the work goes on)."""
    try:
        with trio.move_on_after(QUERY_TIMEOUT):
            await ch.send(progress.to_wire())
        return True
    except (ChannelError, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
        log.debug("progress relay stopped: %s", e)
        return False


class JobBooks:
    """What both sides of a node's jobs share (see the module's docstring)."""

    def __init__(self, host: Host):
        self.host = host
        self.spool = Spool(host.cfg.state_dir)
        self.checkpoints = CheckpointStore(self.spool)  # of the jobs of this home
        self.view = ClusterView(host.members, host.mover)
        self.home: dict[str, Job] = {}
        self.guests: dict[str, Job] = {}
        self.links: dict[str, Channel] = {}  # home side: job id -> channel to its node
        self.scopes: dict[str, trio.CancelScope] = {}
        self.flags: set[str] = set()
        # (node id, when, job id): jobs placed recently, not yet visible in the node's load
        self.placed: list[tuple[int, float, str]] = []
        self.envs: dict[str, dict[str, str]] = {}  # home jobs' environments (for reruns)
        # incoming channel connections not yet authenticated, per source (see GuestJobs)
        self.handshaking: dict[str, int] = {}
        #: guests killed here because their home was declared dead (GuestJobs.fence): the
        #: home, heard again, is told so and restores them from their checkpoint
        self.fenced: set[str] = set()
        self.nursery: trio.Nursery | None = None
        self._seq_path = Path(host.cfg.state_dir) / "jobseq"
        self._reasons_at = -REASONS_EVERY  # when refresh_reasons last looked
        self.moves: Moves = Unwired()  # the daemon wires the moves in (see jobs.host)

    @property
    def me(self) -> int:
        return self.host.node_id

    def _next_id(self) -> str:
        try:
            n = int(self._seq_path.read_text().strip() or 0) + 1
        except (OSError, ValueError):
            n = 1
        self._seq_path.write_text(f"{n}\n")
        return f"{self.me}.{n}"

    def hello(self) -> dict[str, Any]:
        return {"node": self.me, "boot": self.host.boot, "proto": self.host.protocol,
                "name": self.host.name}

    async def connect(self, node_id: int) -> Channel:
        node = self.host.members.nodes.get(node_id)
        if node is None or node.state not in (ALIVE, SUSPECT):
            raise ChannelError(f"node {node_id} is not alive")
        if node.auth == "unverified":
            raise ChannelError(f"node {node.name} is not authenticated (no cluster key)")
        addr = (node.entry["addr"], node.entry["port"])
        return await channel.connect(addr, self.host.channel_key, self.hello())

    async def request(self, node_id: int, msg: dict[str, Any],
                      timeout: float = QUERY_TIMEOUT,
                      progress: Progress | None = None) -> dict[str, Any]:
        """One request and its reply, on a connection of its own.  ChannelError when the
        node cannot be reached or does not answer within ``timeout``.  With ``progress``
        the node is asked to say how far it has got (see serve_with_progress): each word
        updates ``progress`` and gives the node ``timeout`` again.  NotSent (a
        ChannelError) when no connection could be made: the node got nothing."""
        try:
            ch = await self.connect(node_id)
        except NotSent:
            raise
        except ChannelError as e:
            raise NotSent(str(e)) from None
        try:
            await ch.send({**msg, "progress": True} if progress is not None else msg)
            while True:
                with trio.fail_after(timeout):
                    reply = await ch.receive_msg()
                if progress is None or reply.get("op") != "progress":
                    return reply
                if not progress.take(reply):
                    log.debug("node %d sent a malformed progress message", node_id)
        except trio.TooSlowError:
            raise ChannelError(f"no answer within {timeout:g}s") from None
        finally:
            await ch.aclose()

    def all_jobs(self) -> list[Job]:
        return [*self.home.values(), *self.guests.values()]

    def find(self, job_id: str) -> Job | None:
        return self.home.get(job_id) or self.guests.get(job_id)

    def counts(self) -> int:
        """Cluster processes running on this node (gossiped as ``jobs``); a checkpointed
        job (booked at its home) runs nowhere."""
        return sum(1 for j in self.all_jobs() if j.node == self.me and j.state not in FINAL
                   and j.state != CHECKPOINTED)

    def node_name(self, node_id: int) -> str:
        if node_id == self.me:
            return self.host.name
        node = self.host.members.nodes.get(node_id)
        return node.name if node else str(node_id)

    def _prune(self) -> None:
        """Forget the oldest finished jobs (and their spools) beyond KEEP_EXITED."""
        for table in (self.home, self.guests):
            done = sorted((j for j in table.values() if j.state in FINAL),
                          key=lambda j: j.ended or 0)
            for j in done[:max(0, len(done) - KEEP_EXITED)]:
                del table[j.id]
                self.spool.remove(j.id)

    def save(self, job: Job) -> None:
        """The home, and the node running a guest, keep its record on disk at every change
        of state or node (read back by :meth:`recover` after a restart)."""
        if job.home == self.me or job.id in self.guests:
            self.spool.save(job)

    def book(self, table: dict[str, Job], job: Job) -> None:
        """Enter ``job`` in ``table`` (``home`` or ``guests``): from now on every change
        of its state is kept on disk (see Job.transition)."""
        job.keep = self.save
        table[job.id] = job

    def finished(self, job: Job) -> None:
        """Tell that a job of this home ended (its record was kept by its transition);
        its checkpoints go (they are of no use now, and may be big)."""
        self.checkpoints.remove(job.id)
        self.host.publish([Event("job-exit", f"job {job.id} {job.exit_text()} on "
                              f"{job.node_name}", {"job": job.id,
                                                   "status": job.status_code()})])

    def static_cannot_move(self, job: Job) -> str:
        """What keeps a job from moving whatever it does: no mechanism on this node, or
        standard input fed by the daemon (a pipe CRIU cannot take along)."""
        if job.stdin:
            return "its standard input is a pipe from omuscd run (--stdin)"
        if self.host.mover.available or job.restartable:
            return ""
        return f"no CRIU on node {self.host.name} ({self.host.mover.describe()})"

    def refresh_reasons(self, jobs: list[Job]) -> None:
        """Why each job running here cannot move, known before anyone tries (the
        mechanism's checks of its processes, their files and locks): looked at when the
        jobs are listed, at most every REASONS_EVERY seconds (measured: 1.5 ms for a job
        of four processes; the machine's locks are read once for all, 0.06 ms)."""
        now = time.monotonic()
        if now - self._reasons_at < REASONS_EVERY or not self.host.mover.available:
            return
        self._reasons_at = now
        here = {j.pid: j for j in jobs if j.node == self.me and j.state == RUNNING
                and j.pid is not None and not starting(j)}
        for pid, why in self.host.mover.reasons(list(here)).items():
            here[pid].cannot_move = self.static_cannot_move(here[pid]) or why or ""

    async def _launch(self, table: dict[str, Job], runner: Any, job: Job,
                      env: dict[str, str]) -> None:
        """Book the job in ``table`` and start it; unbook it if it cannot start."""
        self.book(table, job)
        try:
            await self._nursery().start(self._counted, runner, job, env)
        except JobError:
            table.pop(job.id, None)
            raise
        self.host.jobs_changed()  # it runs here now: the load is looked at again

    async def _counted(self, runner: Any, job: Job, env: dict[str, str],
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run a job here; the load is looked at again when it ends (or leaves)."""
        try:
            await runner(job, env, task_status=task_status)
        finally:
            self.host.jobs_changed()

    def _nursery(self) -> trio.Nursery:
        assert self.nursery is not None, "the daemon is not running"
        return self.nursery

    def watch_again(self, job: Job) -> None:
        """Watch a job running here whose init is no child of ours (see _watched_again)."""
        self._nursery().start_soon(self._watched_again, job)

    def watch_restored(self, job: Job, pid: int, run: int) -> None:
        """Watch stay ``run`` of a job restored here (CRIU made its init our child); it
        counts in the load from this instant (the caller counted its move in the same
        one: a node that gossiped the one without the other would have its move taken as
        shown in a load that lacks it)."""
        self.host.jobs_changed()  # it arrived
        self._nursery().start_soon(self._watch_restored, job, pid, run)

    async def _watch_restored(self, job: Job, pid: int, run: int) -> None:
        try:
            if await adopt(job, self.spool, pid, run) and job.home == self.me:
                self.finished(job)
        finally:
            self.host.jobs_changed()  # it ended or left

    def check_guest_ok(self, owner: Owner, local: bool) -> None:
        if not local and "blocked" in self.flags:
            raise JobError(f"node {self.host.name} is blocked: it accepts no guest jobs")
        if not local and self.host.security == "read-only":
            raise JobError(f"node {self.host.name} has no cluster key: it runs no guest jobs")
        try:
            Owner.of_uid(owner.uid)
        except JobError as e:
            raise JobError(f"node {self.host.name}: {e}") from None

    def _may(self, job: Job, uid: int) -> None:
        if uid != 0 and uid != job.owner.uid:
            raise JobError(f"job {job.id} belongs to {job.owner.user}")

    def recover(self) -> None:
        """At start: the jobs this node is home to, from their records (``job.json``).
        A job that ran here and still runs is watched again; one that ended meanwhile gets
        the end its init wrote; one that runs elsewhere is followed again once its node is
        heard from, or lost if it is not heard from in time.  Finished ones are history."""
        marks = self.moves.interrupted()
        for rec in self.spool.saved():
            try:
                job = Job.from_wire(rec)
            except (KeyError, TypeError, ValueError) as e:
                log.warning("job record %s unusable (%s); skipped", rec.get("id"), e)
                continue
            if job.id in self.home or job.id in self.guests:
                continue
            if job.home != self.me:  # a guest: only one that ran here and may run still
                if job.reason.startswith(FENCED):  # its home is told (GuestJobs.fence_guests)
                    self.fenced.add(job.id)
                if job.node != self.me or job.state in FINAL:
                    continue
                self.book(self.guests, job)
            else:
                self.book(self.home, job)
            if job.state in FINAL:
                continue
            if job.state == CHECKPOINTED:  # stopped: it waits for 'resume'
                continue
            if job.home == self.me:  # its checkpoints go on
                self.moves.keep_checkpointed(job)
            if job.state == MIGRATING:  # cut short by the restart: it stayed at the source
                job.transition(RUNNING)
            # what arrived before the restart is in the spool files, whatever the record
            # says: following again starts from there (no line twice)
            job.offsets.update(self.spool.ends(job.id))
            if job.node == self.me and job.id in marks:  # frozen by a move cut short
                self._nursery().start_soon(self.moves.settle, job, marks.pop(job.id))
            elif job.node == self.me and job.home != self.me and job.checkpoint:
                # leased: stopped by the lease guard when this daemon died; its home is
                # asked what it is now (Recovery.settle_checkpoint)
                self._nursery().start_soon(self.moves.settle, job, {"checkpoint": job.home})
            elif job.node == self.me and job.home == self.me and job.checkpoint and not (
                    job.pid is not None and is_job_init(job.pid)) and self.moves.revive(
                    job, "it ran here and did not outlive this node's restart"):
                pass  # the machine went down with it: back to its checkpoint
            elif job.node == self.me:
                self.watch_again(job)
            else:
                self._nursery().start_soon(self._follow_again, job)
        for stale in marks:  # of jobs that are history, or not booked here
            self.moves.unmark(stale)
        recovered = [j.id for j in self.all_jobs() if j.state not in FINAL]
        if recovered:
            log.info("jobs of this node from before the restart: %s", ", ".join(recovered))

    async def _watched_again(self, job: Job) -> None:
        """A job started here by an earlier run of this daemon: its init is no child of
        ours now, so it is watched by its pid, and its end read from its status file."""
        pid = job.pid

        def poll() -> int | None:
            return None if pid is not None and is_job_init(pid) else 0

        async def wait() -> None:
            while poll() is None:
                await trio.sleep(0.25)

        job.run += 1
        if not await watch(job, self.spool, poll, wait, job.run):
            return
        if not self.spool.status(job.id).strip():
            why = "it ended while this daemon was down and left no status"
            job.exit = None  # watch guessed one; it is not known
            if job.home == self.me:
                self.mark_lost(job, why, ended=True)
            else:  # a guest: its home hears of it when it follows the job again
                job.transition(LOST, reason=why, ended=time.time())
            return
        if job.home == self.me:
            self.finished(job)

    def mark_lost(self, job: Job, reason: str, ended: bool = False) -> None:
        """Book a job of this home as lost and say so; a job already finished stays as it
        is, unless ``ended``: its watcher saw it end here and could not tell how."""
        if job.state in FINAL and not ended:
            return
        job.transition(LOST, ended=time.time(),
                       reason=f"{reason} at {time.strftime('%H:%M:%S')}")
        self.stop_following(job.id)
        self.checkpoints.remove(job.id)
        self.host.publish([Event("job-lost", f"job {job.id} lost: {job.reason}",
                              {"job": job.id, "reason": job.reason})])

    def lost_unless_revived(self, job: Job, reason: str) -> None:
        """A job of this home whose node is gone: back to its latest checkpoint (see
        omuscd.migrate.revive), or lost if it has none."""
        if not self.moves.revive(job, reason):
            self.mark_lost(job, reason)

    def stop_following(self, job_id: str) -> None:
        """Stop taking in a job's output from the node it ran on (it is lost, comes
        here, or is rerun elsewhere); a frame already on its way is dropped."""
        scope = self.scopes.get(job_id)
        if scope is not None:
            scope.cancel()

    async def _follow_again(self, job: Job) -> None:
        """Follow a job of this home again after a restart (the home side's)."""
        raise NotImplementedError

    def set_flag(self, flag: str, on: bool) -> str:
        if on:
            self.flags.add(flag)
        else:
            self.flags.discard(flag)
        keep = set(self.host.members.me["flags"]) - set(NODE_FLAGS)
        self.host.members.me["flags"] = sorted(keep | self.flags)
        self.host.publish([Event("config", f"node {'now' if on else 'no longer'} {flag}",
                              {"key": flag, "value": on})])
        return f"{flag}: {'on' if on else 'off'}"


def home_of(job_id: str) -> int | None:
    """The home node of a job id, None for a bad id."""
    try:
        return ids.home_of(job_id)
    except ids.BadId:
        return None


def is_job_init(pid: int) -> bool:
    """Whether ``pid`` is a live job init (the pid may have been reused since)."""
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE and any("jobinit" in a for a in p.cmdline())
    except psutil.Error:
        return False
