"""The policy: which node should run a job.

One module decides for every caller: placement of new jobs now; migration decisions for
both topologies (peer-to-peer and controller/drone) will live here too, so that the same
notion of "room" governs where work starts and where it moves.

Room is measured in spare capacity: idle lent CPUs times their speed.  A node's demand is
its load (busy share of its lent CPUs, plus waiting work) times its CPUs, plus the jobs
placed on it in the last few seconds, which its gossiped load does not show yet; without
that, several jobs started at once would all land on the same idle node.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Seconds a placement counts as pending demand on its node (until its load shows it).
PENDING_FOR = 3.0


@dataclass
class Candidate:
    id: int
    name: str
    cpus: int
    speed: float  # MHz; 0 when unknown
    load: float  # demand per lent CPU, as gossiped
    pending: int  # jobs placed recently
    home: bool  # the node where the job was started

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
    would burden least.  Ties go to the home node (no transfer), then to the lowest id."""
    if not cands:
        raise ValueError("no candidates")
    if any(c.spare >= (c.speed or 1000.0) * 0.5 for c in cands):
        return max(cands, key=lambda c: (round(c.spare, 3), c.home, -c.id))
    return min(cands, key=lambda c: (round(c.pressure(), 6), not c.home, c.id))
