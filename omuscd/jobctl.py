"""Job control across the cluster: where a job starts, how its output reaches its home
node, what happens when a node dies, and who may touch a job.

Messages on the cluster channel (JSON, see :mod:`omuscd.channel`), each on a connection of
its own:

- ``exec``: the home node asks a node to run a job; answered ``started`` or ``refused``,
  after which the connection carries the job's output home (data frames), ``info``
  (CPU, RSS) and finally ``exit``; the home node may send ``signal`` on it.
- ``attach``: the home node reconnects to a running job from the offsets it already has.
- ``jobs``: a node's records, for the cluster-wide ``jobs`` listing.
- ``act``: kill/stay/nostay on behalf of a user, sent to the job's home node.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import trio

from omuscd import balance, channel, ids, jobinit
from omuscd.channel import Channel, ChannelError
from omuscd.cluster.membership import ALIVE, SUSPECT
from omuscd.events import Event
from omuscd.jobs import (
    EXITED,
    FINAL,
    KEEP_EXITED,
    LOST,
    MIGRATING,
    MOVED,
    RUNNING,
    STDERR,
    STDOUT,
    Job,
    JobError,
    Owner,
    Spool,
    catches,
    check_runnable,
    init_pid,
    job_order,
    measure,
    refresh_usage,
    starting,
    supervise,
    watch,
)

if TYPE_CHECKING:
    from omuscd.daemon import Daemon

log = logging.getLogger("omuscd.jobs")

QUERY_TIMEOUT = 3.0
INIT_READY_WAIT = 2.0  # seconds a signal waits for a starting job's init to catch it
INFO_EVERY = 2.0
CHUNK = 256 * 1024
NODE_FLAGS = ("blocked", "lstay", "quiet")
#: How old the reasons jobs here cannot move may be when the jobs are listed (seconds).
REASONS_EVERY = 1.0


@dataclass
class Placement:
    how: str = "best"  # best | home | node | among
    node: str | None = None
    among: list[str] | None = None


class JobControl:
    """The jobs of one daemon: ``home`` (started here) and ``guests`` (run here for
    another home).  A job both started and run here is in ``home`` only."""

    def __init__(self, daemon: Daemon):
        self.d = daemon
        self.spool = Spool(daemon.cfg.state_dir)
        self.home: dict[str, Job] = {}
        self.guests: dict[str, Job] = {}
        self.links: dict[str, Channel] = {}  # home side: job id -> channel to its node
        self.scopes: dict[str, trio.CancelScope] = {}
        self.flags: set[str] = set()
        # (node id, when, job id): jobs placed recently, not yet visible in the node's load
        self.placed: list[tuple[int, float, str]] = []
        self.envs: dict[str, dict[str, str]] = {}  # home jobs' environments (for reruns)
        # incoming channel connections not yet authenticated, per source (see _serve)
        self.handshaking: dict[str, int] = {}
        self.nursery: trio.Nursery | None = None
        self._seq_path = Path(daemon.cfg.state_dir) / "jobseq"
        self._reasons_at = -REASONS_EVERY  # when refresh_reasons last looked
        from omuscd.migration import Migrations

        self.migrations = Migrations(self)

    # ------------------------------------------------------------------ helpers
    @property
    def me(self) -> int:
        return self.d.node_id

    def _next_id(self) -> str:
        try:
            n = int(self._seq_path.read_text().strip() or 0) + 1
        except (OSError, ValueError):
            n = 1
        self._seq_path.write_text(f"{n}\n")
        return f"{self.me}.{n}"

    def hello(self) -> dict[str, Any]:
        return {"node": self.me, "boot": self.d.boot, "proto": self.d.protocol,
                "name": self.d.name}

    async def connect(self, node_id: int) -> Channel:
        node = self.d.members.nodes.get(node_id)
        if node is None or node.state not in (ALIVE, SUSPECT):
            raise ChannelError(f"node {node_id} is not alive")
        if node.auth == "unverified":
            raise ChannelError(f"node {node.name} is not authenticated (no cluster key)")
        addr = (node.entry["addr"], node.entry["port"])
        return await channel.connect(addr, self.d.channel_key, self.hello())

    async def request(self, node_id: int, msg: dict[str, Any],
                      timeout: float = QUERY_TIMEOUT) -> dict[str, Any]:
        """One request and its reply, on a connection of its own.  ChannelError when the
        node cannot be reached or does not answer within ``timeout``."""
        ch = await self.connect(node_id)
        try:
            await ch.send(msg)
            with trio.fail_after(timeout):
                return await ch.receive_msg()
        except trio.TooSlowError:
            raise ChannelError(f"no answer within {timeout:g}s") from None
        finally:
            await ch.aclose()

    def all_jobs(self) -> list[Job]:
        return [*self.home.values(), *self.guests.values()]

    def find(self, job_id: str) -> Job | None:
        return self.home.get(job_id) or self.guests.get(job_id)

    def counts(self) -> int:
        """Cluster processes running on this node (gossiped as ``jobs``)."""
        return sum(1 for j in self.all_jobs() if j.node == self.me and j.state not in FINAL)

    def node_name(self, node_id: int) -> str:
        if node_id == self.me:
            return self.d.name
        node = self.d.members.nodes.get(node_id)
        return node.name if node else str(node_id)

    def _prune(self) -> None:
        """Forget the oldest finished jobs (and their spools) beyond KEEP_EXITED."""
        for table in (self.home, self.guests):
            done = sorted((j for j in table.values() if j.state in FINAL),
                          key=lambda j: j.ended or 0)
            for j in done[:max(0, len(done) - KEEP_EXITED)]:
                del table[j.id]
                self.spool.remove(j.id)

    # ------------------------------------------------------------------ placement
    def candidates(self, placement: Placement) -> list[balance.Candidate]:
        now = trio.current_time()
        self.placed = [(n, t, j) for n, t, j in self.placed if now - t < balance.PENDING_FOR
                       and (j not in self.home or self.home[j].state not in FINAL)]
        pending: dict[int, int] = {}
        for n, _, _ in self.placed:
            pending[n] = pending.get(n, 0) + 1
        me = self.d.members.me
        out = [balance.Candidate(self.me, self.d.name, me["cpus"], me["speed"],
                                 float(me["load"]), pending.get(self.me, 0), True)]
        for node in self.d.members.live_nodes():
            e = node.entry
            if node.state != ALIVE or node.auth == "unverified":
                continue
            if set(e["flags"]) & {"blocked", "quiet"}:
                continue
            out.append(balance.Candidate(node.id, node.name, e["cpus"], e["speed"],
                                         float(e["load"]), pending.get(node.id, 0), False))
        return out

    def choose(self, placement: Placement) -> tuple[int, str]:
        """The node to run a new job: ``(id, name)``, or JobError saying why none."""
        if placement.how == "home" or "lstay" in self.flags:
            return self.me, self.d.name
        cands = self.candidates(placement)
        if placement.how == "node":
            key = str(placement.node)
            if key in (str(self.me), self.d.name):
                return self.me, self.d.name
            try:
                node = self.d.members.find(key)
            except ValueError as e:
                raise JobError(str(e)) from None
            if node is None:
                raise JobError(f"no node {key!r}")
            match = next((c for c in cands if c.id == node.id), None)
            if match is None:
                why = ("blocked" if "blocked" in node.entry["flags"] else
                       "quiet" if "quiet" in node.entry["flags"] else
                       "not authenticated (no cluster key)" if node.auth == "unverified"
                       else node.state)
                raise JobError(f"node {node.name} cannot take jobs: {why}")
            return match.id, match.name
        if placement.how == "among":
            wanted = set(placement.among or [])
            cands = [c for c in cands if str(c.id) in wanted or c.name in wanted]
            if not cands:
                raise JobError(f"none of {', '.join(sorted(wanted))} can take jobs now")
        best = balance.choose_node(cands)
        log.info("placement: %s chosen from %s", best.name, balance.explain(cands))
        return best.id, best.name

    # ------------------------------------------------------------------ starting
    async def start(self, owner: Owner, argv: list[str], cwd: str, env: dict[str, str],
                    placement: Placement, stay: bool = False,
                    restartable: bool = False, stdin: bool = False) -> Job:
        if self.d.security == "read-only" and placement.how != "home":
            placement = Placement("home")  # no key: no remote execution
        target, name = self.choose(placement)
        job = Job(self._next_id(), owner, self.me, target, name, list(argv), cwd, stay=stay,
                  restartable=restartable, stdin=stdin)
        self.envs[job.id] = env
        # counted at once: runs started concurrently must see each other's placements
        placed = (target, trio.current_time(), job.id)
        self.placed.append(placed)
        try:
            if target == self.me:
                check_runnable(argv, cwd, env, self.d.name, owner)
                self._check_guest_ok(owner, local=True)
                job.cannot_move = self.static_cannot_move(job)
                await self._launch(self.home, self._run_local, job, env)
            else:
                await self._start_remote(job, env)
        except JobError:
            self.placed.remove(placed)
            self.envs.pop(job.id, None)
            raise
        self.d.publish([Event("job-start", f"job {job.id} ({' '.join(argv)[:60]}) of "
                              f"{owner.user} started on {name}",
                              {"job": job.id, "node": target})])
        self.save(job)
        self._prune()
        return job

    async def take_over(self, pid: int, where: str) -> str:
        """``migrate PID NODE`` (root): make a process of this node a cluster job homed
        here and move it.  Nothing is booked unless the move succeeds: on any failure the
        process resumes as it was, owned by nobody but itself."""
        mover = self.d.mover
        if self.d.security == "read-only":
            raise JobError("this node has no cluster key (read-only): it exchanges no "
                           "processes; see 'status'")
        why = mover.cannot_adopt(pid) if mover.available else mover.describe()
        if why:
            raise JobError(f"process {pid} cannot move: {why}")
        try:
            p = psutil.Process(pid)
            owner = Owner.of_uid(p.uids().real)
            argv, cwd = p.cmdline() or [p.name()], p.cwd()
        except psutil.Error as e:
            raise JobError(f"process {pid}: {e}") from None
        job = Job(self._next_id(), owner, self.me, self.me, self.d.name, argv, cwd)
        job.pid = pid
        self.spool.create(job)
        self.home[job.id] = job
        try:
            text = await self.migrations.migrate(job, where)
        except JobError:
            self.home.pop(job.id, None)
            self.spool.remove(job.id)
            raise
        self.save(job)
        self.d.publish([Event("job-start", f"process {pid} ({' '.join(argv)[:60]}) of "
                              f"{owner.user} taken over as job {job.id}",
                              {"job": job.id, "node": job.node, "pid": pid})])
        return f"process {pid} is now job {job.id}; {text}"

    def recover(self) -> None:
        """At start: the jobs this node is home to, from their records (``job.json``).
        A job that ran here and still runs is watched again; one that ended meanwhile gets
        the end its init wrote; one that runs elsewhere is followed again once its node is
        heard from, or lost if it is not heard from in time.  Finished ones are history."""
        marks = self.migrations.interrupted()
        for rec in self.spool.saved():
            try:
                job = Job.from_wire(rec)
            except (KeyError, TypeError, ValueError) as e:
                log.warning("job record %s unusable (%s); skipped", rec.get("id"), e)
                continue
            if job.id in self.home or job.id in self.guests:
                continue
            if job.home != self.me:  # a guest: only one that ran here and may run still
                if job.node != self.me or job.state in FINAL:
                    continue
                self.guests[job.id] = job
            else:
                self.home[job.id] = job
            if job.state in FINAL:
                continue
            if job.state == MIGRATING:  # cut short by the restart: it stayed at the source
                job.state = RUNNING
            # what arrived before the restart is in the spool files, whatever the record
            # says: following again starts from there (no line twice)
            job.offsets.update(self.spool.ends(job.id))
            if job.node == self.me and job.id in marks:  # frozen by a move cut short
                self._nursery().start_soon(self.migrations.settle, job, marks.pop(job.id))
            elif job.node == self.me:
                self._nursery().start_soon(self._watch_again, job)
            else:
                self._nursery().start_soon(self._follow_again, job)
        for stale in marks:  # of jobs that are history, or not booked here
            self.migrations.unmark(stale)
        recovered = [j.id for j in self.all_jobs() if j.state not in FINAL]
        if recovered:
            log.info("jobs of this node from before the restart: %s", ", ".join(recovered))

    async def _watch_again(self, job: Job) -> None:
        """A job started here by an earlier run of this daemon: its init is no child of
        ours now, so it is watched by its pid, and its end read from its status file."""
        pid = job.pid

        def poll() -> int | None:
            return None if pid is not None and _is_job_init(pid) else 0

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
                job.state = RUNNING  # so that mark_lost books and announces it
                self.mark_lost(job, why)
            else:  # a guest: its home hears of it when it follows the job again
                job.state, job.reason, job.ended = LOST, why, time.time()
                job.notify()
            return
        if job.home == self.me:
            self._finished(job)

    async def _follow_again(self, job: Job) -> None:
        grace = self.d.cfg.dead_timeout + 2 * self.d.cfg.gossip_interval + 1
        with trio.move_on_after(grace):
            while True:
                node = self.d.members.nodes.get(job.node)
                if node is not None and node.state == ALIVE:
                    break
                await trio.sleep(0.2)
        node = self.d.members.nodes.get(job.node)
        if node is None or node.state != ALIVE:
            self.mark_lost(job, f"node {job.node_name} was not heard from after this daemon "
                           "restarted")
            return
        await self._follow(job, None)

    def static_cannot_move(self, job: Job) -> str:
        """What keeps a job from moving whatever it does: no mechanism on this node, or
        standard input fed by the daemon (a pipe CRIU cannot take along)."""
        if job.stdin:
            return "its standard input is a pipe from omuscd run (--stdin)"
        if self.d.mover.available or job.restartable:
            return ""
        return f"no CRIU on node {self.d.name} ({self.d.mover.describe()})"

    def refresh_reasons(self, jobs: list[Job]) -> None:
        """Why each job running here cannot move, known before anyone tries (the
        mechanism's checks of its processes, their files and locks): looked at when the
        jobs are listed, at most every REASONS_EVERY seconds (measured: 1.5 ms for a job
        of four processes; the machine's locks are read once for all, 0.06 ms)."""
        now = time.monotonic()
        if now - self._reasons_at < REASONS_EVERY or not self.d.mover.available:
            return
        self._reasons_at = now
        here = {j.pid: j for j in jobs if j.node == self.me and j.state == RUNNING
                and j.pid is not None and not starting(j)}
        for pid, why in self.d.mover.reasons(list(here)).items():
            here[pid].cannot_move = self.static_cannot_move(here[pid]) or why or ""

    async def _launch(self, table: dict[str, Job], runner: Any, job: Job,
                      env: dict[str, str]) -> None:
        """Book the job in ``table`` and start it; unbook it if it cannot start."""
        table[job.id] = job
        try:
            await self._nursery().start(self._counted, runner, job, env)
        except JobError:
            table.pop(job.id, None)
            raise
        self.d.jobs_changed()  # it runs here now: the load is looked at again

    async def _counted(self, runner: Any, job: Job, env: dict[str, str],
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run a job here; the load is looked at again when it ends (or leaves)."""
        try:
            await runner(job, env, task_status=task_status)
        finally:
            self.d.jobs_changed()

    def _nursery(self) -> trio.Nursery:
        assert self.nursery is not None, "the daemon is not running"
        return self.nursery

    def _check_guest_ok(self, owner: Owner, local: bool) -> None:
        if not local and "blocked" in self.flags:
            raise JobError(f"node {self.d.name} is blocked: it accepts no guest jobs")
        if not local and self.d.security == "read-only":
            raise JobError(f"node {self.d.name} has no cluster key: it runs no guest jobs")
        try:
            Owner.of_uid(owner.uid)
        except JobError as e:
            raise JobError(f"node {self.d.name}: {e}") from None

    async def _run_local(self, job: Job, env: dict[str, str],
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if await supervise(job, self.spool, env, self.d.cfg.cpus, task_status=task_status):
            self._finished(job)  # it ended here (it did not move away)

    def save(self, job: Job) -> None:
        """The home, and the node running a guest, keep its record on disk at every change
        of state or node (read back by :meth:`recover` after a restart)."""
        if job.home == self.me or job.id in self.guests:
            self.spool.save(job)

    def _finished(self, job: Job) -> None:
        self.save(job)
        self.d.publish([Event("job-exit", f"job {job.id} {job.exit_text()} on "
                              f"{job.node_name}", {"job": job.id,
                                                   "status": job.status_code()})])

    async def _start_remote(self, job: Job, env: dict[str, str]) -> None:
        try:
            ch = await self.connect(job.node)
        except ChannelError as e:
            raise JobError(f"cannot reach node {job.node_name}: {e}") from None
        try:
            await ch.send({"op": "exec", "job": job.wire(), "env": env})
            with trio.fail_after(QUERY_TIMEOUT * 3):
                reply = await ch.receive_msg()
        except (ChannelError, trio.TooSlowError) as e:
            await ch.aclose()
            raise JobError(f"node {job.node_name} did not answer: {e}") from None
        if reply.get("op") != "started":
            await ch.aclose()
            raise JobError(str(reply.get("reason", "refused")))
        job.cannot_move = str(reply.get("cannot_move", ""))
        self.spool.create(job)
        self.home[job.id] = job
        self.links[job.id] = ch
        self._nursery().start_soon(self._follow, job, ch)

    # ------------------------------------------------------------------ home side
    async def _follow(self, job: Job, ch: Channel | None) -> None:
        """Bring a remote job's output and end home; reconnect while its node lives."""
        scope = self.scopes[job.id] = trio.CancelScope()
        with scope:
            delay = 0.2
            while job.state not in FINAL and job.node != self.me:
                try:
                    if ch is None:
                        ch = await self.connect(job.node)
                        await ch.send({"op": "attach", "job": job.id,
                                       "offsets": {str(k): v for k, v in job.offsets.items()}})
                        reply = await ch.receive_msg()
                        if reply.get("op") != "attached":
                            self.mark_lost(job, f"node {job.node_name} no longer has it")
                            break
                        self.links[job.id] = ch
                    delay = 0.2
                    await self._receive_remote(job, ch)
                except ChannelError as e:
                    log.debug("job %s: link to %s: %s", job.id, job.node_name, e)
                    self.links.pop(job.id, None)
                    if ch is not None:
                        await ch.aclose()
                    ch = None
                    await trio.sleep(delay)
                    delay = min(delay * 2, 2.0)
        if self.links.get(job.id) is ch:
            self.links.pop(job.id, None)
        if self.scopes.get(job.id) is scope:  # a follower started since keeps its own
            self.scopes.pop(job.id, None)
        if ch is not None:
            await ch.aclose()

    def stop_following(self, job_id: str) -> None:
        """Stop taking in a job's output from the node it ran on (it is lost, comes
        here, or is rerun elsewhere); a frame already on its way is dropped."""
        scope = self.scopes.get(job_id)
        if scope is not None:
            scope.cancel()

    async def _receive_remote(self, job: Job, ch: Channel) -> None:
        scope = self.scopes.get(job.id)
        while True:
            msg = await ch.receive()
            if scope is not None and scope.cancel_called:
                # following stopped (the job is coming here, with its whole spool) while
                # this was on its way: appended, it would be there twice
                return
            if isinstance(msg, tuple):
                stream, data = msg
                if stream in (STDOUT, STDERR):
                    self._append(job, stream, data)
                    job.offsets[stream] += len(data)
                    job.notify()
                continue
            op = msg.get("op")
            if op == "info":
                job.cpu = float(msg.get("cpu", job.cpu))
                job.rss_mb = float(msg.get("rss_mb", job.rss_mb))
            elif op == "moved":  # it left that node; follow it to the next
                self.migrations.moved(job, int(msg["node"]))
                return
            elif op == "exit":
                job.cpu = float(msg.get("cpu", job.cpu))
                job.exit = msg.get("exit") or {"code": 0}
                if job.cut and isinstance(job.exit, dict):  # cut here, at home
                    job.exit.setdefault("cut", job.cut)
                job.state, job.ended = EXITED, time.time()
                job.notify()
                self._finished(job)
                return

    def _append(self, job: Job, stream: int, data: bytes) -> None:
        """Keep a remote job's output here.  A write that fails (a full state filesystem)
        must not end the daemon: the job runs on, and its end tells the user that the
        output is incomplete (Job.cut)."""
        try:
            self.spool.append(job.id, stream, data)
        except OSError as e:
            if not job.cut:
                log.warning("job %s: cannot keep its output: %s", job.id, e.strerror or e)
                job.cut = (f"cannot keep the job's output on node {self.d.name}: "
                           f"{e.strerror or e}")

    def mark_lost(self, job: Job, reason: str) -> None:
        if job.state in FINAL:
            return
        job.state, job.ended = LOST, time.time()
        job.reason = f"{reason} at {time.strftime('%H:%M:%S')}"
        job.notify()
        self.save(job)
        self.stop_following(job.id)
        self.d.publish([Event("job-lost", f"job {job.id} lost: {job.reason}",
                              {"job": job.id, "reason": job.reason})])

    def on_events(self, events: list[Event]) -> None:
        """Membership news: jobs on a dead or departed node are lost."""
        for ev in events:
            if ev.kind in ("dead", "leave", "restart"):
                nid = ev.data.get("node")
                what = {"dead": "died", "leave": "left the cluster",
                        "restart": "restarted"}[ev.kind]
                for job in list(self.home.values()):
                    if job.node != nid or job.state in FINAL:
                        continue
                    if ev.kind == "dead":
                        self.mark_lost(job, f"node {job.node_name} {what}")
                    else:  # its daemon stopped or restarted: the job may well run on
                        self._nursery().start_soon(self._lost_unless_back, job, nid, what)

    async def _lost_unless_back(self, job: Job, nid: int, what: str) -> None:
        """A job whose node's daemon left or restarted is lost only if that daemon does
        not take it up again in time (it keeps its guests' records too)."""
        await trio.sleep(2 * self.d.cfg.dead_timeout)
        if job.state not in FINAL and job.node == nid and job.id not in self.links:
            self.mark_lost(job, f"node {job.node_name} {what} and did not take the job up "
                           "again")

    # ------------------------------------------------------------------ running side
    async def serve(self, stream: trio.SocketStream) -> None:
        """One incoming cluster-channel connection.  A bug met here costs this connection,
        never the daemon."""
        try:
            await self._serve(stream)
        except Exception:
            log.exception("cluster channel: internal error (connection dropped)")
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.SocketStream) -> None:
        # Anyone may connect; until the challenge is answered a connection is held for up
        # to channel.HANDSHAKE_TIMEOUT.  Bounded per source address (every loopback
        # address counting as one), or a local user holding thousands ran the daemon out
        # of descriptors: no job could start, no control session open.
        source = _source_of(stream)
        if self.handshaking.get(source, 0) >= MAX_HANDSHAKES:
            self.d.counters["channel-refused"] += 1
            await trio.aclose_forcefully(stream)
            return
        self.handshaking[source] = self.handshaking.get(source, 0) + 1
        try:
            ch = await channel.accept(stream, self.d.channel_key, self.hello())
        except ChannelError as e:
            self.d.counters["channel-refused"] += 1
            log.warning("cluster channel: refused a connection: %s", e)
            await trio.aclose_forcefully(stream)
            return
        finally:
            self.handshaking[source] -= 1
            if not self.handshaking[source]:
                del self.handshaking[source]
        try:
            if ch.peer.get("proto") != self.d.protocol:
                await ch.send({"op": "refused", "reason": "incompatible protocol version"})
                return
            msg = await ch.receive_msg()
            op = msg.get("op")
            bad = _bad_ids(op, msg)
            if bad:
                log.warning("cluster channel: node %s sent %s with %s; refused",
                            ch.peer.get("node"), str(op)[:20], bad)
                await ch.send({"op": "refused", "reason": bad, "text": bad})
                return
            if op == "exec":
                await self._serve_exec(ch, msg)
            elif op == "attach":
                job = self.guests.get(str(msg.get("job")))
                if job is None:
                    await ch.send({"op": "unknown"})
                    return
                await ch.send({"op": "attached"})
                offsets = {int(k): int(v) for k, v in dict(msg.get("offsets", {})).items()}
                await self._pump(ch, job, offsets)
            elif op == "immigrate":
                await self.migrations.immigrate(ch, msg)
            elif op == "has":
                await self.migrations.has(ch, msg)
            elif op == "drop":
                await self.migrations.drop(ch, msg)
            elif op == "emigrate":
                job = self.find(str(msg.get("job")))
                try:
                    if job is None or job.node != self.me:
                        raise JobError(f"job {msg.get('job')} does not run on {self.d.name}")
                    stats = await self.migrations.emigrate(job, ids.node_id(msg["to"]))
                    await ch.send({"op": "migrated", **stats})
                except JobError as e:
                    await ch.send({"op": "failed", "reason": str(e)})
            elif op == "flag":
                flag = str(msg.get("flag"))
                if flag not in NODE_FLAGS:
                    await ch.send({"op": "refused", "reason": f"no node flag {flag!r}"})
                else:
                    log.info("node flag %s %s, asked by node %s", flag,
                             "on" if msg.get("on") else "off", ch.peer.get("node"))
                    await ch.send({"op": "done",
                                   "text": self.set_flag(flag, bool(msg.get("on")))})
            elif op == "jobs":
                refresh_usage([j for j in self.all_jobs() if j.node == self.me])
                self.refresh_reasons(self.all_jobs())
                await ch.send({"op": "jobs", "home": [j.wire() for j in self.home.values()],
                               "guests": [j.wire() for j in self.guests.values()]})
            elif op == "act":
                try:
                    text = await self.act(str(msg.get("job")), str(msg.get("action")),
                                          int(msg.get("uid", -1)), int(msg.get("sig", 15)),
                                          forwarded=True, to=str(msg.get("to", "")))
                    await ch.send({"op": "done", "text": text})
                except JobError as e:
                    await ch.send({"op": "error", "text": str(e)})
            else:
                await ch.send({"op": "refused", "reason": f"unknown operation {op!r}"})
        except (ChannelError, KeyError, TypeError, ValueError) as e:
            log.debug("cluster channel from node %s: %s", ch.peer.get("node"), e)
        finally:
            await ch.aclose()

    async def _serve_exec(self, ch: Channel, msg: dict[str, Any]) -> None:
        try:
            try:
                job = Job.from_wire(msg["job"])
            except (KeyError, TypeError, ValueError) as e:
                raise JobError(f"bad job record: {e}") from None
            env = {str(k): str(v) for k, v in dict(msg.get("env", {})).items()}
            if job.node != self.me:
                raise JobError(f"job {job.id} was meant for node {job.node}, not {self.me}")
            if job.id in self.guests:
                raise JobError(f"job {job.id} already runs here")
            self._check_guest_ok(job.owner, local=False)
            check_runnable(job.argv, job.cwd, env, self.d.name, job.owner)
            job.offsets = {STDOUT: 0, STDERR: 0}
            job.changed = trio.Event()
            await self._launch(self.guests, self._run_guest, job, env)
        except JobError as e:
            await ch.send({"op": "refused", "reason": str(e)})
            return
        self.save(job)
        log.info("job %s of %s from node %d started: %s", job.id, job.owner.user, job.home,
                 " ".join(job.argv)[:80])
        job.cannot_move = self.static_cannot_move(job)
        await ch.send({"op": "started", "pid": job.pid, "cannot_move": job.cannot_move})
        await self._pump(ch, job, {STDOUT: 0, STDERR: 0})

    async def _run_guest(self, job: Job, env: dict[str, str],
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await supervise(job, self.spool, env, self.d.cfg.cpus, task_status=task_status)
        self._prune()

    async def _pump(self, ch: Channel, job: Job, offsets: dict[int, int]) -> None:
        """Send a guest job's output from ``offsets`` on, then its end; take signals."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._take_signals, ch, job, nursery.cancel_scope)
            last_info = 0.0
            while True:
                changed = job.changed
                for stream in (STDOUT, STDERR):
                    while offsets.get(stream, 0) < job.offsets[stream]:
                        start = offsets.get(stream, 0)
                        data = self.spool.read(job.id, stream, start,
                                               min(job.offsets[stream], start + CHUNK))
                        if not data:
                            break
                        await ch.send_data(stream, data)
                        offsets[stream] = start + len(data)
                if job.state == MOVED:
                    await ch.send({"op": "moved", "node": job.node})
                    break
                if job.state in FINAL:
                    await ch.send({"op": "exit", "exit": job.exit, "cpu": job.cpu})
                    break
                now = trio.current_time()
                if now - last_info >= INFO_EVERY and job.pid is not None:
                    measure(job)
                    await ch.send({"op": "info", "cpu": job.cpu, "rss_mb": job.rss_mb})
                    last_info = now
                with trio.move_on_after(INFO_EVERY):
                    await changed.wait()
            nursery.cancel_scope.cancel()

    async def _take_signals(self, ch: Channel, job: Job, scope: trio.CancelScope) -> None:
        """What the home sends about a running job: signals, and --stdin input."""
        try:
            while True:
                msg = await ch.receive()
                if isinstance(msg, tuple):
                    await self.feed_stdin(job, msg[1])
                elif msg.get("op") == "stdin-eof":
                    await self.feed_stdin(job, b"")
                elif msg.get("op") == "signal":
                    await self.signal_local(job, int(msg.get("sig", signal.SIGTERM)))
        except ChannelError:
            scope.cancel()  # the home went away; the job runs on, and it may reattach

    async def feed_stdin(self, job: Job, data: bytes) -> None:
        """Give a --stdin job its input (``b""``: the end of it), wherever it runs."""
        if not job.stdin:
            raise JobError(f"job {job.id} was not started with --stdin")
        if job.node != self.me:
            link = self.links.get(job.id)
            if link is None:
                raise JobError(f"cannot reach node {job.node_name} right now")
            if data:
                await link.send_data(0, data)
            else:
                await link.send({"op": "stdin-eof"})
            return
        pipe = job.stdin_pipe
        if pipe is None:
            return  # it ended, or its input was closed already
        try:
            if data:
                await pipe.send_all(data)
            else:
                job.stdin_pipe = None
                await pipe.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            job.stdin_pipe = None  # the job closed its input: drop the rest, as a pipe would

    async def signal_local(self, job: Job, sig: int) -> None:
        """Signals go to the job's init, which forwards them; SIGKILL and SIGSTOP cannot be
        caught, so they go straight to the command (the init then reports its end).  The
        init, PID 1 of the job's namespace, ignores a signal it has no handler for yet, so
        one sent as the job starts (Ctrl-C right after ``omuscd run``) waits until the
        init catches it (it was lost, and the job ran on)."""
        if not 1 <= sig <= 64:
            raise JobError(f"no signal {sig}")
        if job.pid is None and job.launcher is not None:  # unshare had not forked yet
            with trio.move_on_after(INIT_READY_WAIT):
                while (found := init_pid(job.launcher)) is None:
                    await trio.sleep(0.01)
                job.pid = found
        pid = job.pid
        if pid is not None and sig in (signal.SIGKILL, signal.SIGSTOP):
            pid = init_pid(pid) or pid
        elif pid is not None:
            # its handlers are all set once the last is (Python itself catches SIGINT from
            # its first moment, turning it into KeyboardInterrupt: that one tells nothing)
            with trio.move_on_after(INIT_READY_WAIT):
                while not catches(pid, jobinit.FORWARDED[-1]):
                    await trio.sleep(0.01)
        if pid is None:
            raise JobError(f"job {job.id} has no process here")
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            raise JobError(f"job {job.id} has already ended") from None

    # ------------------------------------------------------------------ actions
    def _may(self, job: Job, uid: int) -> None:
        if uid != 0 and uid != job.owner.uid:
            raise JobError(f"job {job.id} belongs to {job.owner.user}")

    async def act(self, job_id: str, action: str, uid: int, sig: int = signal.SIGTERM,
                  forwarded: bool = False, to: str = "") -> str:
        """kill, stay, nostay or migrate a job for the user ``uid``; routed to its home
        node, which keeps the books."""
        job = self.home.get(job_id)
        if job is None:
            home = _home_of(job_id)
            guest = self.guests.get(job_id)
            home_alive = home is not None and home in {n.id for n in
                                                        self.d.members.live_nodes()}
            if forwarded or not home_alive:
                if guest is None:
                    raise JobError(f"no job {job_id}")
                job = guest  # its home is gone: the node running it answers
            else:
                return await self._forward_act(home, job_id, action, uid, sig, to)
        self._may(job, uid)
        if action == "migrate":
            if job.home != self.me:
                raise JobError(f"job {job.id}: its home node is unreachable; it cannot be "
                               "moved now")
            return await self.migrations.migrate(job, to or "best")
        if action == "kill":
            if job.state in FINAL:
                raise JobError(f"job {job.id} has already ended ({job.state})")
            if job.node == self.me:
                await self.signal_local(job, sig)
            else:
                link = self.links.get(job.id)
                if link is not None:
                    await link.send({"op": "signal", "sig": sig})
                else:  # not followed yet (it has just moved): ask the node running it
                    await self._forward_act(job.node, job.id, "kill", uid, sig)
            return f"signal {sig} sent to job {job.id} on {job.node_name}"
        if action in ("stay", "nostay"):
            job.stay = action == "stay"
            return f"job {job.id} {'stays where it is' if job.stay else 'may migrate'}"
        raise JobError(f"unknown action {action!r}")

    async def _forward_act(self, node: int, job_id: str, action: str, uid: int,
                           sig: int, to: str = "") -> str:
        """Have ``node`` (the job's home, or the node running it) act on the job."""
        try:
            reply = await self.request(node, {"op": "act", "job": job_id, "action": action,
                                              "uid": uid, "sig": sig, "to": to},
                                       QUERY_TIMEOUT if action != "migrate" else 300)
        except ChannelError as e:
            what = "the job's home node" if node == _home_of(job_id) else \
                f"node {self.node_name(node)}"
            raise JobError(f"{what} did not answer: {e}") from None
        if reply.get("op") != "done":
            raise JobError(str(reply.get("text", "refused")))
        return str(reply.get("text", ""))

    # ------------------------------------------------------------------ listing
    async def cluster_jobs(self) -> list[Job]:
        """Every job the cluster knows, the same on every node: each home node answers for
        its own jobs; a job whose home is unreachable is reported by the node running it."""
        answers: dict[int, dict[str, Any]] = {}

        async def ask(node_id: int) -> None:
            try:
                answers[node_id] = await self.request(node_id, {"op": "jobs"})
            except ChannelError as e:
                log.debug("jobs: node %d did not answer: %s", node_id, e)

        async with trio.open_nursery() as nursery:
            for node in self.d.members.live_nodes():
                if node.auth != "unverified":
                    nursery.start_soon(ask, node.id)
        refresh_usage([j for j in self.all_jobs() if j.node == self.me])
        self.refresh_reasons(self.all_jobs())
        homes = {self.me: [j.wire() for j in self.home.values()]}
        guests = [j.wire() for j in self.guests.values()]
        for nid, a in answers.items():
            homes[nid] = list(a.get("home", []))
            guests += list(a.get("guests", []))
        out: dict[str, Job] = {}
        for records in homes.values():
            for rec in records:
                if (job := _peer_record(rec)) is not None:
                    out[job.id] = job
        for rec in guests:
            job = _peer_record(rec)
            if job is not None and job.home not in homes and job.id not in out:
                job.reason = job.reason or "home node unreachable"
                out[job.id] = job
            elif job is not None and job.id in out and out[job.id].node == job.node:
                out[job.id].cannot_move = job.cannot_move  # as the node running it knows
        return sorted(out.values(), key=_job_order)

    async def expel(self) -> list[str]:
        """Send every guest job away: home when its home can take it, else elsewhere."""
        out = []
        for job in list(self.guests.values()):
            if job.state != RUNNING:
                continue
            where = "home"
            home = self.d.members.nodes.get(job.home)
            if home is None or home.state != ALIVE or "blocked" in home.entry["flags"]:
                where = "best"
            try:
                out.append(await self._forward_act(job.home, job.id, "migrate", 0,
                                                   signal.SIGTERM, where))
            except JobError as e:
                out.append(f"job {job.id}: {e}")
        return out or ["no guest jobs here"]

    async def bring(self) -> list[str]:
        """Call every job started here back home."""
        out = []
        for job in list(self.home.values()):
            if job.state == RUNNING and job.node != self.me:
                try:
                    out.append(await self.migrations.migrate(job, "home"))
                except JobError as e:
                    out.append(f"job {job.id}: {e}")
        return out or ["no job of this node runs elsewhere"]

    async def set_flag_at(self, node: str | None, flag: str, on: bool) -> str:
        """``block NODE`` and its kin: here, or on another node over the cluster channel
        (its daemon trusts the cluster key, as it does for migrations)."""
        if node is None or node in (str(self.me), self.d.name):
            return self.set_flag(flag, on)
        try:
            target = self.d.members.find(node)
        except ValueError as e:
            raise JobError(str(e)) from None
        if target is None or target.state == "dead":
            raise JobError(f"no live node {node[:40]!r}; 'nodes' lists them")
        try:
            reply = await self.request(target.id, {"op": "flag", "flag": flag, "on": on})
        except ChannelError as e:
            raise JobError(f"node {target.name} did not answer: {e}") from None
        if reply.get("op") != "done":
            raise JobError(f"node {target.name}: {reply.get('reason') or reply.get('text')}")
        return f"{target.name}: {reply.get('text')}"

    def set_flag(self, flag: str, on: bool) -> str:
        if on:
            self.flags.add(flag)
        else:
            self.flags.discard(flag)
        keep = set(self.d.members.me["flags"]) - set(NODE_FLAGS)
        self.d.members.me["flags"] = sorted(keep | self.flags)
        self.d.publish([Event("config", f"node {'now' if on else 'no longer'} {flag}",
                              {"key": flag, "value": on})])
        return f"{flag}: {'on' if on else 'off'}"


#: Cluster-channel connections from one source address (all of loopback being one) that
#: may be waiting to authenticate at once.
MAX_HANDSHAKES = 64


def _source_of(stream: trio.SocketStream) -> str:
    """The address a connection is counted by (see JobControl._serve)."""
    try:
        host = str(stream.socket.getpeername()[0]).split("%")[0]
        addr = ipaddress.ip_address(host)
    except (OSError, ValueError, IndexError):
        return "?"
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return "loopback" if addr.is_loopback else str(addr)


def _home_of(job_id: str) -> int | None:
    try:
        return ids.home_of(job_id)
    except ids.BadId:
        return None


def _job_order(job: Job) -> tuple[int, int]:
    return job_order(job.id)


def _is_job_init(pid: int) -> bool:
    """Whether ``pid`` is a live job init (the pid may have been reused since)."""
    try:
        p = psutil.Process(pid)
        return p.status() != psutil.STATUS_ZOMBIE and any("jobinit" in a for a in p.cmdline())
    except psutil.Error:
        return False


#: The cluster-channel requests that name a job, and those that name a node ("to").
_JOB_OPS = ("attach", "emigrate", "drop", "has", "act")
_TO_OPS = ("emigrate", "drop")


def _bad_ids(op: Any, msg: dict[str, Any]) -> str:
    """Why a peer's request names no valid job or node ("" when it does): refused before
    it is looked at, so that a bad id never reaches a path or a table."""
    try:
        if op in _JOB_OPS:
            ids.job_id(msg.get("job"))
        if op in _TO_OPS:
            ids.node_id(msg.get("to"))
        if op == "act" and msg.get("to"):
            ids.node_name(msg.get("to"))
    except ids.BadId as e:
        return str(e)
    return ""


def _peer_record(rec: Any) -> Job | None:
    """A job record from a peer's listing; None (and a log line) for one that is not."""
    try:
        return Job.from_wire(rec)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        log.warning("a peer listed a bad job record (%s); left out", e)
        return None
