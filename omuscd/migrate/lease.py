"""Leases: a node runs a checkpointed job of another home only while that home says so.

Why: when a home declares the node running its job dead, it restores the job from its
latest checkpoint elsewhere (:mod:`omuscd.migrate.revive`).  That node may only be cut
off, its copy still running; under SWIM it declares the home dead (and fences the job,
GuestJobs.fence_guests) only after its own turn to probe the home, which can come much
later than the home's verdict.  Meanwhile two copies ran: test_fence saw 2-7 lines
appended twice to the job's file.  A job must never run twice.

How, for each pair (home, node running checkpointed jobs of it): one lease, covering all
of that home's jobs there.

- The home (:class:`Grants`) renews it every ``length / 3`` s (the next renewal once the
  node acknowledged the last: a node cut off is sent one more at most) on a ``lease``
  connection of the cluster channel (authenticated and encrypted, every frame numbered:
  one forged, replayed, reordered or sent with another key is refused by the channel),
  each ``renew`` naming the jobs it holds there, the lease's length and the home's own
  monotonic time of sending.  The node accepts renewals only for jobs whose home is the
  authenticated peer (a node cannot renew another home's job).  Until a renewal first
  names a job (just checkpointed, or just moved there) the node holds it by a first
  lease of its own (Holder.run); after its daemon restarted, by none.
- The node (:class:`Holder`) holds each job until ``length`` after it RECEIVED the last
  renewal naming it, on its own monotonic clock, and freezes it (SIGSTOP to every
  process, as a checkpoint's freeze; nothing is lost) once that has passed, EARLY s
  before the end.  A renewal naming it again thaws it: a network blip costs a pause,
  never the job.  A renewal that was held up on its way (TCP resending it after the cable
  is back in, a daemon too busy to read it) counts from when it would have arrived had it
  been as quick as the quickest of the last WINDOW renewals from that home: from the
  home's stamp plus that least delay, never later than its receipt.
- The home revives such a job no sooner than ``length + MARGIN`` after it SENT the last
  renewal naming it there, on its own monotonic clock, however soon SWIM declared the
  node dead; and from the moment it decides to revive a job it names it no more.

The ordering that makes it safe: a renewal is received after it is sent, and counted on
the node from no later than its send plus the least delay seen, so the node has frozen
the job (at ``length - EARLY`` after that) before the home's ``length + MARGIN`` after
the send have passed, as long as the least delay of a renewal, the clocks' difference in
rate over one lease (monotonic clocks: parts per million) and the node's own reaction
(its check every CHECK s, the SIGSTOPs) stay within ``MARGIN + EARLY``.  Only then does
the revived copy start.  A copy whose job was revived meanwhile is never named again, so
it stays frozen until the home, hearing its node again, has it dropped (Revival.healed).
Should the node's daemon die while its jobs run on, its lease guard freezes them at once
(:mod:`omuscd.migrate.leaseguard`): the daemon, started again, holds them as above.
The length comes from the membership's timings (:func:`lease_length`), so that the home
rarely waits at all past SWIM's verdict; see omuscd(8), CHECKPOINTS.
"""

from __future__ import annotations

import functools
import logging
import math
import signal
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import trio

from omuscd.channel import Channel, ChannelError
from omuscd.cluster.membership import DEAD
from omuscd.config import Config, defaults
from omuscd.jobs.record import FINAL, RUNNING, Job
from omuscd.migrate.books import MoveBooks, MoveHost
from omuscd.migrate.leaseguard import Guard
from omuscd.migrate.tree import signal_tree, stop_all

if TYPE_CHECKING:
    from omuscd.jobs.node import JobControl

log = logging.getLogger("omuscd.migrate")

#: seconds the home waits past the lease (the least delay of a renewal, clock-rate skew,
#: the node's reaction), with EARLY: see the module's docstring
MARGIN = 0.25
EARLY = 0.1  # the node freezes a job this long before its lease ends
CHECK = 0.05  # seconds at least between the node's looks at its leases
IDLE = 1.0  # seconds at most between them (a job may become leased meanwhile)
WINDOW = 64  # renewals whose least delay counts (a minute at the default length)
MAX_JOBS = 100_000  # job ids one renewal may name
FREEZE_WAIT = 1.0  # seconds the node keeps stopping processes forked meanwhile
ACK_WAIT = 2  # leases the home waits for a renewal's acknowledgement before reconnecting


def lease_length(cfg: Config) -> float:
    """The lease, from the membership's timings: the soonest SWIM declares a silent node
    dead (a probe's timeout, then the shortest suspicion: ``suspicion_mult`` probe
    intervals with up to ten members, more in bigger clusters, capped by
    ``dead_timeout``), less MARGIN.  With the defaults: 0.25 + 2.0 - 0.25 = 2.0 s,
    renewed every 0.67 s; a home then revives a job at most 2.25 s after its last
    renewal, which went at most 0.67 s after the cut (the next waits for its
    acknowledgement): at most 2.92 s after the cut, where SWIM declares the node dead
    2.25 s after it at the soonest (2.7 and 2.9 s measured with three nodes)."""
    soonest = cfg.probe_timeout + min(cfg.suspicion_mult * cfg.probe_interval,
                                      cfg.dead_timeout)
    return max(3 * CHECK + EARLY, soonest - MARGIN)


@functools.cache
def default_length() -> float:
    """The lease with the default membership timings (what a node holds a job by before
    its home first names it: see Holder.run)."""
    return lease_length(Config(defaults()))


def frozen_key(job_id: str) -> str:
    """The mark a frozen job has in MoveBooks.moving: a move or checkpoint of it waits
    (they stop and resume the job themselves: it would run again without its lease)."""
    return f"out:{job_id}"


class Grants:
    """The home's side: renew the leases of the nodes running its checkpointed jobs, and
    say when a job may be revived (see the module's docstring)."""

    def __init__(self, jc: JobControl, host: MoveHost):
        self.jc = jc
        self.host = host
        #: (job id, node) -> (monotonic time the last renewal naming it was sent, length)
        self.named: dict[tuple[str, int], tuple[float, float]] = {}
        self.renewing: set[int] = set()  # nodes with a renewal task
        self.revoked: set[str] = set()  # jobs being revived: named no more

    @property
    def length(self) -> float:
        return lease_length(self.host.cfg)

    def held_on(self, node: int) -> list[str]:
        """The jobs of this home the node ``node`` holds a lease for: running there (or
        moving away), with a checkpoint here, not being revived."""
        return sorted(j.id for j in self.jc.home.values()
                      if j.node == node and node != self.jc.me and j.state not in FINAL
                      and j.checkpoint and j.id not in self.revoked)

    async def run(self) -> None:
        """Start a renewal task for each node running checkpointed jobs of this home."""
        while True:
            nodes = {j.node for j in self.jc.home.values()
                     if j.node != self.jc.me and j.state not in FINAL and j.checkpoint}
            for node in nodes - self.renewing:
                peer = self.host.members.nodes.get(node)
                if peer is not None and peer.state != DEAD and self.held_on(node):
                    self.renewing.add(node)
                    self.jc.nursery.start_soon(self._renew, node)  # type: ignore[union-attr]
            await trio.sleep(self.length / 3)

    async def _renew(self, node: int) -> None:
        """Renew ``node``'s lease every length / 3 s on one connection, until it holds no
        job of this home or is declared dead.  The next renewal goes only once the node
        acknowledged the last: cut off, a node is sent one renewal more at most (each
        sent counts: it may yet arrive), so a revival waits a third of a lease past
        SWIM's soonest verdict at most.  No acknowledgement within ACK_WAIT leases (or
        the connection broken): it is opened again."""
        ch: Channel | None = None
        try:
            while jobs := self.held_on(node):
                peer = self.host.members.nodes.get(node)
                if peer is None or peer.state == DEAD:
                    break
                length = self.length
                sent = time.monotonic()
                try:
                    if ch is None:
                        with trio.fail_after(length / 3):
                            ch = await self.jc.connect(node)
                            await ch.send({"op": "lease"})
                    # named as it is now, with no wait before the stamp: a job revoked
                    # while this connected is not named (its revival counts without it)
                    jobs = self.held_on(node)
                    sent = time.monotonic()
                    for job_id in jobs:  # counted as sent even if it never arrives
                        self.named[(job_id, node)] = (sent, length)
                    with trio.fail_after(ACK_WAIT * length):
                        await ch.send({"op": "renew", "t": sent, "lease": length,
                                       "jobs": jobs})
                        while (await ch.receive_msg()).get("t") != sent:
                            pass  # an acknowledgement of an earlier one
                except (ChannelError, trio.TooSlowError, OSError) as e:
                    log.debug("lease of node %s: %s", self.jc.node_name(node), e)
                    if ch is not None:
                        await ch.aclose()
                    ch = None
                await trio.sleep(max(0.0, sent + length / 3 - time.monotonic()))
        finally:
            self.renewing.discard(node)
            if ch is not None:
                with trio.CancelScope(shield=True):
                    await ch.aclose()

    def revoke(self, job: Job) -> float:
        """The home revives ``job``: it is named in no renewal any more; the monotonic
        time after which it may run elsewhere (the last renewal naming it on its node
        sent, plus its length and MARGIN; now plus a lease if none was sent by this
        daemon: it may have been granted before a restart, or the job checkpointed since
        the last renewal and held by its node on its own first lease)."""
        self.revoked.add(job.id)
        now = time.monotonic()
        sent, length = self.named.get((job.id, job.node),
                                      (now, max(self.length, default_length())))
        return sent + max(length, self.length) + MARGIN

    async def wait_out(self, job: Job, until: float) -> None:
        """Until ``until`` (from :meth:`revoke`): the node that ran ``job`` has frozen it."""
        left = until - time.monotonic()
        if left > 0:
            log.info("job %s: its lease on %s runs out in %.2fs; revived then", job.id,
                     job.node_name, left)
            await trio.sleep(left)

    def revived(self, job_id: str) -> None:
        """The revival is over (the job runs elsewhere, or is lost): its id may be named
        again where it runs now."""
        self.revoked.discard(job_id)
        for key in [k for k in self.named if k[0] == job_id]:
            del self.named[key]


class Holder:
    """The side of the node running other homes' checkpointed jobs: hold each only while
    its lease is valid, freeze it when it runs out, thaw it when renewed."""

    def __init__(self, jc: JobControl, host: MoveHost, books: MoveBooks):
        self.jc = jc
        self.host = host
        self.books = books
        self.until: dict[str, float] = {}  # job id -> monotonic end of its lease here
        self.frozen: dict[str, float] = {}  # job id -> when it was frozen
        #: (home, boot) -> the last WINDOW differences receipt - home's stamp
        self.delays: dict[tuple[int, int], deque[float]] = {}
        self.lengths: dict[int, float] = {}  # home -> the length it grants
        self.named: set[str] = set()  # jobs some renewal named (their first lease is over)
        #: freezes the leased jobs if this daemon dies (omuscd.migrate.leaseguard)
        self.guard = Guard()
        self.early: set[str] = set()  # jobs being checkpointed: guarded already
        #: jobs found at this daemon's start, their home being asked what they are
        #: (Recovery.settle_checkpoint): left stopped, not looked at here meanwhile
        self.settling: set[str] = set()

    def leased(self, job: Job) -> bool:
        """Whether ``job`` runs here only while its lease is valid: another home's,
        running here, with a checkpoint taken (that home can revive it)."""
        return (job.home != self.jc.me and job.node == self.jc.me and job.state == RUNNING
                and bool(job.checkpoint))

    async def serve(self, ch: Channel, msg: dict[str, Any]) -> None:
        """Serve ``lease``: renewals from the job's home, until it closes the connection."""
        home, boot = ch.peer_id, int(ch.peer.get("boot", 0))
        while True:
            renewal = await ch.receive_msg()
            if renewal.get("op") != "renew":
                continue
            try:
                self.renewed(home, boot, renewal)
            except (TypeError, ValueError) as e:
                log.warning("lease: a bad renewal from node %s (%s); ignored",
                            self.jc.node_name(home), e)
                continue
            await ch.send({"op": "ack", "t": renewal["t"]})

    def renewed(self, home: int, boot: int, msg: dict[str, Any]) -> None:
        """One renewal from ``home`` (authenticated as such by the channel): extend the
        leases of the jobs it names that are its own and run here; thaw those frozen."""
        received = time.monotonic()
        stamp, length = float(msg["t"]), float(msg["lease"])
        names = msg["jobs"]
        if not (math.isfinite(stamp) and math.isfinite(length) and 0 < length <= 3600):
            raise ValueError(f"stamp {stamp!r}, lease {length!r}")
        if not isinstance(names, list) or len(names) > MAX_JOBS:
            raise ValueError("jobs is not a list of job ids")
        delays = self.delays.setdefault((home, boot), deque(maxlen=WINDOW))
        delays.append(received - stamp)
        start = min(received, stamp + min(delays))  # held up on its way: counted less
        until = start + length
        self.lengths[home] = length
        log.debug("lease: renewal from node %s for %s (receipt less stamp %.3fs, the least "
                  "%.3fs)", self.jc.node_name(home), names[:8], received - stamp, min(delays))
        for name in names:
            job = self.jc.guests.get(str(name))
            if job is None or job.home != home or not self.leased(job):
                continue  # not its job, or not here: nothing extended
            if job.id in self.named:  # renewals only, never the first lease, extend
                until = max(self.until.get(job.id, 0.0), until)
            self.until[job.id] = until
            self.named.add(job.id)
            if job.id in self.frozen and until - EARLY > time.monotonic():
                self.thaw(job)

    async def run(self) -> None:
        """Look at the leases when the next one is due (and every IDLE s at least): a
        job whose lease ran out is frozen.  One seen leased for the first time (its first
        checkpoint taken, or moved here) holds a first lease from the look before (it
        became leased since: counted from then, it ends no later than counted from the
        moment itself), until a renewal names it: no longer than the home's (as last
        granted), this node's own, nor the default timings' (the home, reviving a job it
        never named, waits at least that long from then); those found at this daemon's
        start have none: frozen until their home renews (the daemon was down, their home
        may have revived them)."""
        before: float | None = None  # the look before; None: this daemon's first
        while True:
            now = time.monotonic()
            due = now + IDLE
            for job in list(self.jc.guests.values()):
                if not self.leased(job) or job.id in self.settling:
                    continue
                if job.id not in self.until:
                    length = min(self.lengths.get(job.home, math.inf),
                                 lease_length(self.host.cfg), default_length())
                    self.until[job.id] = now if before is None else before + length
                    log.debug("job %s: held by a lease from node %s, until %.2fs from now",
                              job.id, self.jc.node_name(job.home), self.until[job.id] - now)
                if job.id in self.frozen:
                    continue
                if now >= self.until[job.id] - EARLY:
                    await self.freeze(job, now)
                    if job.id not in self.frozen:  # a move or checkpoint holds it
                        due = now
                else:
                    due = min(due, self.until[job.id] - EARLY)
            self._forget()
            await self.sync_guard()
            before = now
            # a renewal meanwhile only pushes a lease's end further: looked at too soon
            await trio.sleep(max(CHECK, due - time.monotonic()))

    async def sync_guard(self) -> None:
        """Have the guard watch the jobs leased here, and those being checkpointed (the
        home may count a first checkpoint before this node's next look)."""
        await self.guard.sync({
            j.id: j.pid for j in list(self.jc.guests.values())
            if j.pid is not None and (self.leased(j) or (
                j.id in self.early and j.home != self.jc.me and j.node == self.jc.me))})

    async def checkpointing(self, job_id: str, home: int) -> bool:
        """A checkpoint of ``job_id`` asked by ``home`` begins here: if it is that home's
        job, running here, neither moving nor being checkpointed already, it is guarded
        from now on, and noted on disk first (the guard stops it should this daemon die
        now; started again, the daemon asks its home whether to thaw it:
        Recovery.settle_checkpoint).  Whether it is (then :meth:`checkpointed` follows)."""
        job = self.jc.guests.get(job_id)
        if (job is None or job.home != home or home == self.jc.me or job.node != self.jc.me
                or job_id in self.early or job_id in self.settling
                or {f"out:{job_id}", f"in:{job_id}"} & self.books.moving):
            return False  # refused by the checkpoint itself, or guarded already
        self.books.mark_checkpoint(job)
        self.early.add(job_id)
        await self.sync_guard()
        return True

    async def checkpointed(self, job_id: str) -> None:
        """The checkpoint of ``job_id`` is over: guarded if it is leased now (which its
        record, kept on disk, says after a restart), its note gone."""
        self.early.discard(job_id)
        await self.sync_guard()
        self.books.unmark_checkpoint(job_id)

    async def hold(self, job: Job) -> None:
        """``job``, found here at this daemon's start, stopped by the guard, is held by
        its lease from now on: frozen (again) until its home renews it, unless a renewal
        named it since (then its lease is live: :meth:`run` governs it)."""
        if job.id in self.named or job.pid is None:
            return
        now = time.monotonic()
        self.until[job.id] = now
        if job.id not in self.frozen:
            self.books.moving.add(frozen_key(job.id))
            self.frozen[job.id] = now
            await stop_all(job.pid, FREEZE_WAIT)

    def _forget(self) -> None:
        """Leases and marks of jobs no longer here (dropped, moved, ended)."""
        for job_id in list(self.until):
            job = self.jc.guests.get(job_id)
            if job is None or not self.leased(job):
                self.until.pop(job_id, None)
                self.named.discard(job_id)
                if self.frozen.pop(job_id, None) is not None:
                    self.books.moving.discard(frozen_key(job_id))

    async def freeze(self, job: Job, now: float) -> None:
        """Stop every process of ``job`` (each once; those forked meanwhile too), unless
        a move or checkpoint of it holds it now (then at the next look)."""
        key = frozen_key(job.id)
        if key in self.books.moving or f"in:{job.id}" in self.books.moving or job.pid is None:
            log.debug("job %s: lease ran out, not frozen yet: %s, pid %s", job.id,
                      sorted(self.books.moving), job.pid)
            return
        self.books.moving.add(key)
        self.frozen[job.id] = now
        await stop_all(job.pid, FREEZE_WAIT)
        log.warning("job %s: its lease from its home, node %s, runs out in %.2fs: frozen "
                    "until the home renews it", job.id, self.jc.node_name(job.home),
                    self.until[job.id] - now)

    def thaw(self, job: Job) -> None:
        """The home renewed the lease of a frozen job: it runs on."""
        since = self.frozen.pop(job.id, None)
        self.books.moving.discard(frozen_key(job.id))
        if job.pid is not None:
            signal_tree(job.pid, signal.SIGCONT)
        log.warning("job %s: its home renewed its lease: thawed after %.1fs frozen", job.id,
                    time.monotonic() - (since or time.monotonic()))
