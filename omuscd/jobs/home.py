"""The home side of jobs: where a new job runs, its start, its output and end brought home
from the node running it, jobs lost with their node, the cluster-wide listing, and acting
on a job for a user (who may).

Requests it sends on the cluster channel (see :mod:`omuscd.jobs.guest` for the answers):
``exec``, ``attach``, ``jobs``, ``act`` and ``flag``.
"""

from __future__ import annotations

import logging
import signal
import time
from dataclasses import dataclass
from typing import Any

import psutil
import trio

from omuscd.balance import policy as balance
from omuscd.channel import Channel, ChannelError, NotSent
from omuscd.cluster.membership import ALIVE
from omuscd.cluster.rpc import error_text
from omuscd.events import Event, Progress
from omuscd.jobs.books import QUERY_TIMEOUT, home_of
from omuscd.jobs.loss import NodeLoss
from omuscd.jobs.process import check_runnable, refresh_usage, supervise
from omuscd.jobs.record import (
    EXITED,
    FINAL,
    RUNNING,
    STDERR,
    STDOUT,
    Job,
    JobError,
    NodeUnreachable,
    Owner,
    job_order,
)

log = logging.getLogger("omuscd.jobs")


@dataclass
class Placement:
    how: str = "best"  # best | home | node | among
    node: str | None = None
    among: list[str] | None = None


class HomeJobs(NodeLoss):
    """The jobs started here, wherever they run."""

    def candidates(self, job: Job | None = None) -> list[balance.Candidate]:
        """The nodes that may take a new job (``job`` None), or ``job`` moved there: the
        one rule of the cluster view (ClusterView.why_not), with each node's figures and
        the jobs placed there lately, not yet in those figures."""
        now = trio.current_time()
        self.placed = [(n, t, j) for n, t, j in self.placed if now - t < balance.PENDING_FOR
                       and (j not in self.home or self.home[j].state not in FINAL)]
        pending: dict[int, int] = {}
        for n, _, _ in self.placed:
            pending[n] = pending.get(n, 0) + 1
        home = job.home if job is not None else self.me
        nodes = [(self.me, self.host.name, self.host.members.me, 0.0),
                 *((n.id, n.name, n.entry, n.age(now))
                   for n in self.host.members.live_nodes())]
        return [balance.Candidate(nid, name, e["cpus"], e["speed"], float(e["load"]),
                                  pending.get(nid, 0), nid == self.me, age)
                for nid, name, e, age in nodes
                if not self.view.why_not(nid, moved=job is not None, home=home,
                                         restartable=bool(job and job.restartable),
                                         rss_mb=job.rss_mb if job else 0.0, now=now)]

    def choose(self, placement: Placement) -> tuple[int, str]:
        """The node to run a new job: ``(id, name)``, or JobError saying why none."""
        if placement.how == "home" or "lstay" in self.flags:
            return self.me, self.host.name
        cands = self.candidates()
        if placement.how == "node":
            key = str(placement.node)
            if key in (str(self.me), self.host.name):
                return self.me, self.host.name
            try:
                node = self.host.members.find(key)
            except ValueError as e:
                raise JobError(str(e)) from None
            if node is None:
                raise JobError(unknown_node(self.host.members, key))
            match = next((c for c in cands if c.id == node.id), None)
            if match is None:
                why = self.view.why_not(node.id, moved=False) or node.state
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

    async def start(self, owner: Owner, argv: list[str], cwd: str, env: dict[str, str],
                    placement: Placement, stay: bool = False,
                    restartable: bool = False, stdin: bool = False,
                    checkpoint_every: float = 0.0) -> Job:
        if self.host.security == "read-only" and placement.how != "home":
            placement = Placement("home")  # no key: no remote execution
        target, name = self.choose(placement)
        job = Job(self._next_id(), owner, self.me, target, name, list(argv), cwd, stay=stay,
                  restartable=restartable, stdin=stdin, checkpoint_every=checkpoint_every)
        self.envs[job.id] = env
        # counted at once: runs started concurrently must see each other's placements
        placed = (target, trio.current_time(), job.id)
        self.placed.append(placed)
        try:
            if target == self.me:
                check_runnable(argv, cwd, env, self.host.name, owner)
                self.check_guest_ok(owner, local=True)
                job.cannot_move = self.static_cannot_move(job)
                await self._launch(self.home, self._run_local, job, env)
            else:
                await self.start_remote(job, env)
        except JobError:
            self.placed.remove(placed)
            self.envs.pop(job.id, None)
            raise
        self.host.publish([Event("job-start", f"job {job.id} ({' '.join(argv)[:60]}) of "
                              f"{owner.user} started on {name}",
                              {"job": job.id, "node": target})])
        self.save(job)
        self._prune()
        self.moves.keep_checkpointed(job)
        return job

    async def take_over(self, pid: int, where: str, progress: Progress | None = None) -> str:
        """``migrate PID NODE`` (root): make a process of this node a cluster job homed
        here and move it.  Nothing is booked unless the move succeeds: on any failure the
        process resumes as it was, owned by nobody but itself."""
        mover = self.host.mover
        if self.host.security == "read-only":
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
        job = Job(self._next_id(), owner, self.me, self.me, self.host.name, argv, cwd)
        job.pid = pid
        self.spool.create(job)
        self.book(self.home, job)
        try:
            text = await self.moves.migrate(job, where, progress)
        except JobError:
            self.home.pop(job.id, None)
            self.spool.remove(job.id)
            raise
        self.save(job)
        self.host.publish([Event("job-start", f"process {pid} ({' '.join(argv)[:60]}) of "
                              f"{owner.user} taken over as job {job.id}",
                              {"job": job.id, "node": job.node, "pid": pid})])
        return f"process {pid} is now job {job.id}; {text}"

    async def run_here(self, job: Job, env: dict[str, str]) -> None:
        """Run a job of this home here (a --restartable job rerun here)."""
        await self._nursery().start(self._run_local, job, env)

    def follow(self, job: Job, anew: bool = False) -> None:
        """Follow a job of this home that runs elsewhere: its output and end come home.
        Not if it is followed already, unless ``anew`` (following it was stopped, and
        the stopped follower may not have left yet)."""
        if anew or job.id not in self.scopes:
            self._nursery().start_soon(self._follow, job, None)

    async def _run_local(self, job: Job, env: dict[str, str],
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if await supervise(job, self.spool, env, self.host.cfg.cpus, task_status=task_status):
            self.finished(job)  # it ended here (it did not move away)

    async def start_remote(self, job: Job, env: dict[str, str]) -> None:
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
            raise JobError(error_text(reply))
        job.cannot_move = str(reply.get("cannot_move", ""))
        self.spool.create(job)
        self.book(self.home, job)
        self.links[job.id] = ch
        self._nursery().start_soon(self._follow, job, ch)

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
                            why = f"node {job.node_name} no longer has it"
                            if reply.get("fenced") is True:  # it thought this home dead
                                self.lost_unless_revived(job, f"{why} (it lost its home)")
                            else:
                                self.mark_lost(job, why)
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
                self.moves.moved(job, int(msg["node"]))
                return
            elif op == "exit":
                job.cpu = float(msg.get("cpu", job.cpu))
                job.exit = msg.get("exit") or {"code": 0}
                if job.cut and isinstance(job.exit, dict):  # cut here, at home
                    job.exit.setdefault("cut", job.cut)
                job.transition(EXITED, ended=time.time())
                self.finished(job)
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
                job.cut = (f"cannot keep the job's output on node {self.host.name}: "
                           f"{e.strerror or e}")

    async def act(self, job_id: str, action: str, uid: int, sig: int = signal.SIGTERM,
                  forwarded: bool = False, to: str = "",
                  progress: Progress | None = None) -> str:
        """kill, stay, nostay or migrate a job for the user ``uid``; routed to its home
        node, which keeps the books.  A move tells ``progress`` how far it has got."""
        job = self.home.get(job_id)
        if job is None:
            home = home_of(job_id)
            guest = self.guests.get(job_id)
            home_alive = home is not None and home in {n.id for n in
                                                        self.host.members.live_nodes()}
            if forwarded or not home_alive:
                if guest is None:
                    raise JobError(f"no job {job_id}")
                job = guest  # its home is gone: the node running it answers
            else:
                return await self._forward_act(home, job_id, action, uid, sig, to, progress)
        self._may(job, uid)
        if action.startswith(("checkpoint", "resume")) or self.moves.checkpointed(job):
            return await self.moves.checkpoint(job, action, to, sig)
        if action == "migrate":
            if job.home != self.me:
                raise JobError(f"job {job.id}: its home node is unreachable; it cannot be "
                               "moved now")
            return await self.moves.migrate(job, to or "best", progress)
        if action == "kill":
            if job.state in FINAL:
                raise JobError(f"job {job.id} has already ended ({job.state})")
            if not 1 <= sig <= 64:
                raise JobError(f"no signal {sig}")
            if self.must_hold(job):
                return self.hold(job, sig)
            await self._send_signal(job, uid, sig)
            return f"signal {sig} sent to job {job.id} on {job.node_name}"
        if action in ("stay", "nostay"):
            job.stay = action == "stay"
            return f"job {job.id} {'stays where it is' if job.stay else 'may migrate'}"
        raise JobError(f"unknown action {action!r}")

    async def _forward_act(self, node: int, job_id: str, action: str, uid: int,
                           sig: int, to: str = "", progress: Progress | None = None) -> str:
        """Have ``node`` (the job's home, or the node running it) act on the job."""
        try:
            reply = await self.request(node, {"op": "act", "job": job_id, "action": action,
                                              "uid": uid, "sig": sig, "to": to},
                                       *((300, progress) if action == "migrate" else
                                         (QUERY_TIMEOUT,) if action in ("kill", "stay", "nostay")
                                         else (300,)))
        except ChannelError as e:
            what = "the job's home node" if node == home_of(job_id) else \
                f"node {self.node_name(node)}"
            # not reached at all: asking again cannot have it act twice
            kind = NodeUnreachable if isinstance(e, NotSent) else JobError
            raise kind(f"{what} did not answer: {e}") from None
        if reply.get("op") != "done":
            raise JobError(error_text(reply))
        return str(reply.get("text", ""))

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
            for node in self.host.members.live_nodes():
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

    async def expel(self, progress: Progress | None = None) -> list[str]:
        """Send every guest job away: home when its home can take it, else elsewhere."""
        out = []
        for job in list(self.guests.values()):
            if job.state != RUNNING:
                continue
            where = "home"
            home = self.host.members.nodes.get(job.home)
            if home is None or home.state != ALIVE or "blocked" in home.entry["flags"]:
                where = "best"
            try:
                out.append(await self._forward_act(job.home, job.id, "migrate", 0,
                                                   signal.SIGTERM, where, progress))
            except JobError as e:
                out.append(f"job {job.id}: {e}")
        return out or ["no guest jobs here"]

    async def bring(self, progress: Progress | None = None) -> list[str]:
        """Call every job started here back home."""
        out = []
        for job in list(self.home.values()):
            if job.state == RUNNING and job.node != self.me:
                try:
                    out.append(await self.moves.migrate(job, "home", progress))
                except JobError as e:
                    out.append(f"job {job.id}: {e}")
        return out or ["no job of this node runs elsewhere"]

    async def set_flag_at(self, node: str | None, flag: str, on: bool) -> str:
        """``block NODE`` and its kin: here, or on another node over the cluster channel
        (its daemon trusts the cluster key, as it does for migrations)."""
        if node is None or node in (str(self.me), self.host.name):
            return self.set_flag(flag, on)
        try:
            target = self.host.members.find(node)
        except ValueError as e:
            raise JobError(str(e)) from None
        if target is None or target.state == "dead":
            raise JobError(f"no live node {node[:40]!r}; 'nodes' lists them")
        try:
            reply = await self.request(target.id, {"op": "flag", "flag": flag, "on": on})
        except ChannelError as e:
            raise JobError(f"node {target.name} did not answer: {e}") from None
        if reply.get("op") != "done":
            raise JobError(f"node {target.name}: {error_text(reply)}")
        return f"{target.name}: {reply.get('text')}"


def _job_order(job: Job) -> tuple[int, int]:
    return job_order(job.id)


def _peer_record(rec: Any) -> Job | None:
    """A job record from a peer's listing; None (and a log line) for one that is not."""
    try:
        return Job.from_wire(rec)
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        log.warning("a peer listed a bad job record (%s); left out", e)
        return None


def unknown_node(members: Any, key: str) -> str:
    """Why there is no node ``key`` to run on: none, or one of another version."""
    other = members.find_incompatible(key)
    if other is None:
        return f"no node {key!r}"
    return (f"node {other.name} runs omuscd-{other.entry['rel']} (protocol version "
            f"{other.entry['proto']}): listed, never used; run one version everywhere")
