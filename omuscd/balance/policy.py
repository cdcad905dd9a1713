"""The policy: which node should run a job, and which job moves where.

One module decides for every caller: placement of new jobs now; migration decisions for
both topologies (peer-to-peer and controller/drone) will live here too, so that the same
notion of "room" governs where work starts and where it moves.

Room is measured in spare capacity: idle lent CPUs times their speed.  A node's demand is
its load (busy share of its lent CPUs, plus waiting work) times its CPUs, plus the jobs
placed on it in the last few seconds, which its gossiped load does not show yet; without
that, several jobs started at once would all land on the same idle node.

Figures have an age (how long ago their node produced them; membership.py).  Nodes whose
figures are too old to trust are no candidates at all (ClusterView.why_not says "figures N
s old"); among candidates otherwise equal, the one with the fresher figures is chosen: its
room is more likely to be still there.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Seconds a placement counts as pending demand on its node (until its load shows it).
PENDING_FOR = 3.0  # at most; a pending move ends as soon as its node's figures show it
MEMORY_STEP = 32.0  # MB: jobs whose memory differs by less cost the same to move
EVEN_WAIT = 1.0  # seconds a move waits for a preferred job to become old enough


@dataclass
class Candidate:
    id: int
    name: str
    cpus: int
    speed: float  # MHz; 0 when unknown
    load: float  # demand per lent CPU, as gossiped
    pending: int  # jobs placed recently
    home: bool  # the node where the job was started
    age: float = 0.0  # seconds since the node produced these figures (0: this node)

    @property
    def demand(self) -> float:
        """Busy CPUs, counted whole (a CPU less than half busy is idle: daemons, cron and
        sampling noise must not steer placement), plus recent placements."""
        return float(round(self.load * self.cpus) + self.pending)

    @property
    def capacity(self) -> float:
        return max(1, self.cpus) * (self.speed or 1000.0)

    @property
    def spare(self) -> float:
        """Idle capacity in MHz."""
        return max(0.0, self.cpus - self.demand) * (self.speed or 1000.0)

    def pressure(self, extra: float = 1.0) -> float:
        """Demand per unit of capacity, counting the job about to be placed."""
        return (self.demand + extra) / self.capacity


def explain(cands: list[Candidate]) -> str:
    """The figures a placement was made from, for the log."""
    return ", ".join(f"{c.name}: load {c.load:.2f} on {c.cpus} CPU, {c.pending} pending"
                     for c in cands)


def choose_node(cands: list[Candidate]) -> Candidate:
    """The candidate with the most spare capacity; when none has any, the one the new job
    would burden least.  Ties go to the home node (no transfer), then to the fresher
    figures, then to the lowest id."""
    if not cands:
        raise ValueError("no candidates")
    if any(c.spare >= (c.speed or 1000.0) * 0.5 for c in cands):
        return max(cands, key=lambda c: (round(c.spare, 3), c.home, -c.age, -c.id))
    return min(cands, key=lambda c: (round(c.pressure(), 6), not c.home, c.age, c.id))


# --------------------------------------------------------------------------- migration
@dataclass
class NodeLoad:
    """A node as the balancing policy sees it."""

    id: int
    name: str
    cpus: int
    speed: float
    load: float  # demand per lent CPU
    pending: float = 0.0  # moves decided here but not yet visible in the gossiped load
    can_take: bool = True  # alive, not blocked or quiet, able to restore jobs, fresh
    age: float = 0.0  # seconds since the node produced its figures (0: this node)
    fresh: bool = True  # its figures are recent enough to act on (ClusterView.stale_after)

    @property
    def demand(self) -> float:
        return max(0.0, self.load * self.cpus + self.pending)

    def pressure(self, fastest: float, extra: float = 0.0) -> float:
        """Demand per lent CPU, CPUs of slower nodes counting for less."""
        factor = (self.speed / fastest) if fastest and self.speed else 1.0
        return (self.demand + extra) / (max(1, self.cpus) * max(factor, 0.05))


@dataclass
class JobLoad:
    """A movable job's facts, for choosing which job to move."""

    id: str
    home: int
    rss_mb: float
    age: float  # seconds since it started
    since_move: float  # seconds since it last landed (infinite if it never moved)
    stay: bool
    cannot_move: str


@dataclass
class Policy:
    """The tunables of balancing (config keys balance_*, min_*), with defaults for a LAN."""

    threshold: float = 0.6  # a difference in pressure below this is left alone (hysteresis)
    min_age: float = 0.5  # younger jobs are not worth moving one job per CPU (see old_enough_at)
    min_stay: float = 5.0  # a job stays at least this long where it landed
    transfer_mb_s: float = 300.0  # for the cost of a move: memory over the transfer rate
    cost_share: float = 0.5  # a move may cost at most this share of the job's age


@dataclass
class Decision:
    job: str | None
    target: int | None
    reason: str
    retry_in: float | None = None  # no job may move yet, but one may in this many seconds


def job_refusal(job: JobLoad, policy: Policy, gap: float = 1.0) -> str | None:
    """Why this job should not move now, or None.  ``gap`` is the difference in pressure
    the move would relieve (jobs per CPU): the more jobs a job waits behind, the sooner
    it is worth moving (see :func:`old_enough_at`)."""
    if job.stay:
        return "told to stay"
    if job.cannot_move:
        return job.cannot_move
    if job.since_move < policy.min_stay:
        return f"landed less than {policy.min_stay:g}s ago"
    need = old_enough_at(job, policy, gap)
    if job.age >= need:
        return None
    if need > policy.min_age / max(gap, 1.0) + 1e-9:
        return f"moving {job.rss_mb:.0f} MB would cost more than it gains"
    return f"younger than {need:.2g}s"


def old_enough_at(job: JobLoad, policy: Policy, gap: float) -> float:
    """The age from which ``job`` is worth moving to relieve ``gap`` jobs per CPU.

    The criterion of Harchol-Balter and Downey ("Exploiting process lifetime distributions
    for dynamic load balancing", 1997): a process that has run for t seconds is likely to
    run about as long again, and moving it is worth while when its age exceeds the cost
    of the move over the difference in load, age > cost / (n - m).  Here the cost is
    min_age (what a move costs a small job, in seconds of its time) and its memory over
    transfer_rate, paid off at cost_share of its age: a job that would share one CPU with
    seven others moves after an eighth of min_age, while one job too many between two
    nodes waits the whole of it."""
    gap = max(gap, 1.0)
    cost = job.rss_mb / policy.transfer_mb_s / policy.cost_share
    return max(policy.min_age, cost) / gap


def narrows(src: float, dst: float, src_after: float, dst_after: float) -> bool:
    """Whether moving a job from ``src`` to ``dst`` (pressures before and after) leaves a
    smaller gap between them, whichever way it points.  A move that merely turns the gap
    around (one job between an idle node and a node with one job) is how jobs ping-pong;
    one that narrows it is worth making even if the target ends up a little busier (2.0
    against 0.3 becomes 1.0 against 1.3)."""
    return abs(src_after - dst_after) < (src - dst) - 1e-9


def imbalance(src: NodeLoad, others: list[NodeLoad],
              policy: Policy) -> tuple[NodeLoad | None, str]:
    """The node a job of ``src`` should go to, judged on loads alone, or None and why.
    The target is the node with the least pressure that can take a job (of equal ones, the
    one with the fresher figures: its room is likelier to be still there); the move must help
    by more than the threshold and must not simply reverse the imbalance (that is how jobs
    ping-pong).  Cheap: callers ask it before looking at any job."""
    if not src.fresh:  # a controller would move jobs off a node by figures long gone
        return None, f"{src.name}'s figures are {src.age:.0f} s old"
    fastest = _fastest(src, others)
    p_src = src.pressure(fastest)
    targets = [o for o in others if o.can_take]
    if not targets:
        return None, "no node can take a job"
    best = min(targets, key=lambda o: (round(o.pressure(fastest), 6), o.age, o.id))
    p_dst = best.pressure(fastest)
    if p_src - p_dst <= policy.threshold:
        return None, (f"balanced: {src.name} {p_src:.2f}, {best.name} {p_dst:.2f} "
                      f"(threshold {policy.threshold:g})")
    if not narrows(p_src, p_dst, src.pressure(fastest, -1), best.pressure(fastest, +1)):
        return None, (f"moving one job would only reverse the imbalance ({src.name} "
                      f"{p_src:.2f}, {best.name} {p_dst:.2f})")
    return best, f"{src.name} {p_src:.2f} -> {best.name} {p_dst:.2f}"


def _fastest(src: NodeLoad, others: list[NodeLoad]) -> float:
    return max([src.speed, *(o.speed for o in others)] or [1.0])


def decide(src: NodeLoad, others: list[NodeLoad], jobs: list[JobLoad],
           policy: Policy) -> Decision:
    """Whether to move one job off ``src``, which, and where (see :func:`imbalance`)."""
    best, loads = imbalance(src, others, policy)
    if best is None:
        return Decision(None, None, loads)
    fastest = _fastest(src, others)
    gap = src.pressure(fastest) - best.pressure(fastest)
    refusals = []
    eligible = []
    for job in jobs:
        refusal = job_refusal(job, policy, gap)
        if refusal:
            refusals.append(f"{job.id}: {refusal}")
        else:
            eligible.append(job)
    if not eligible:
        why = "; ".join(refusals) if refusals else "it runs no cluster job"
        return Decision(None, None, f"{src.name} is loaded ({loads}) but no job can move: "
                        f"{why}", _soonest(jobs, policy, gap))
    # Send a guest home when its home is the target; else the cheapest to move (memory
    # in MEMORY_STEP steps); among equals, one with an even serial number, the first
    # started of them.  Consecutive jobs are split between nodes this way, so a batch
    # started in order of size (a sweep) is not cut into its first half and its second
    # half.  (Tried: the oldest first: 1.19-1.33x the bound, as a batch's first jobs are
    # often its longest.)  An odd one waits if an even one may move very soon.
    def key(j: JobLoad) -> tuple[bool, int, bool]:
        return j.home != best.id, int(j.rss_mb // MEMORY_STEP), _serial(j.id) % 2 == 1

    job = min(eligible, key=lambda j: (key(j), _id_order(j.id)))
    if key(job)[2]:
        wait = _soonest([j for j in jobs if key(j)[:2] == key(job)[:2] and not key(j)[2]],
                        policy, gap)
        if wait is not None and wait <= EVEN_WAIT:
            return Decision(None, None, f"waiting {wait:.1f}s for a job to be old enough "
                            f"to move ({loads})", wait)
    return Decision(job.id, best.id, f"{loads}: job {job.id} ({job.rss_mb:.0f} MB, running "
                    f"{job.age:.0f}s)")


def _soonest(jobs: list[JobLoad], policy: Policy, gap: float) -> float | None:
    """Seconds until a job refused for its age, its recent landing or its cost (which
    its age pays off) may move: the balancer looks again then, not at its next interval."""
    waits = [max(old_enough_at(j, policy, gap) - j.age, policy.min_stay - j.since_move, 0.0)
             for j in jobs if not j.stay and not j.cannot_move]
    return min(waits) if waits else None


def _serial(job_id: str) -> int:
    last = job_id.rsplit(".", 1)[-1]
    return int(last) if last.isdigit() else 0


def _id_order(job_id: str) -> tuple[int, ...]:
    """Job ids in the order they were given (10.9 before 10.10)."""
    return tuple(int(p) if p.isdigit() else 0 for p in job_id.split("."))
