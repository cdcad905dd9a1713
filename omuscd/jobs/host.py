"""What the jobs of a node need from the rest of the daemon, declared here so that jobs/
imports nothing above it: the node it runs on (:class:`Host`, which the daemon is) and the
moves of jobs (:class:`Moves`, which :class:`omuscd.migrate.node.Migrations` implements and
the daemon wires in)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from omuscd.channel import Channel
    from omuscd.cluster.membership import Membership
    from omuscd.config import Config
    from omuscd.events import Event, Progress
    from omuscd.jobs.record import Job


class Mover(Protocol):
    """What the jobs ask of this node's mechanism of moving jobs (migrate/criu.py's Criu,
    declared here so that this layer imports nothing above it)."""

    @property
    def available(self) -> bool: ...

    def describe(self) -> str: ...

    def reasons(self, init_pids: list[int]) -> dict[int, str | None]: ...

    def cannot_adopt(self, pid: int) -> str | None: ...


class Host(Protocol):
    """The node the jobs run on."""

    cfg: Config
    security: str  # "key", "read-only" or "insecure"
    boot: int
    protocol: int
    channel_key: bytes | None
    members: Membership
    mover: Mover
    counters: dict[str, int]

    @property
    def name(self) -> str: ...

    @property
    def node_id(self) -> int: ...

    def publish(self, events: list[Event]) -> None:
        """Tell the cluster's users (events, the log) what happened."""

    def jobs_changed(self) -> None:
        """A job started, ended, arrived or left here: the load is looked at again."""


class Moves(Protocol):
    """What the jobs ask of the moves of this node."""

    async def migrate(self, job: Job, where: str, progress: Progress | None = None) -> str:
        """Move a job of this home (``where``: best, home, or a node); the outcome, for
        the user; JobError if it cannot move.  How far it has got goes to ``progress``,
        updated as it goes (see omuscd.events.Progress)."""

    def moved(self, job: Job, target: int) -> None:
        """The node running a job of this home says it moved on to ``target``."""

    def moving(self, job_id: str) -> bool:
        """Whether a move of this job, asked at its home (here), is under way: signals
        for it are held until it ends (see HomeJobs.act)."""

    def interrupted(self) -> dict[str, dict[str, Any]]:
        """The moves a restart cut short: job id -> where it was going."""

    async def settle(self, job: Job, mark: dict[str, Any]) -> None:
        """A job frozen by a move a restart cut short: resume it, or let it go there."""

    def unmark(self, job_id: str) -> None:
        """Forget the note of a cut-short move of a job that is no longer here."""

    async def immigrate(self, ch: Channel, msg: dict[str, Any]) -> None:
        """Serve ``immigrate``: take a job moving here."""

    async def precheck(self, ch: Channel, msg: dict[str, Any]) -> None:
        """Serve ``precheck``: could a job be restored here (asked before its freeze)."""

    async def emigrate(self, job: Job, target: int,
                       progress: Progress | None = None) -> dict[str, Any]:
        """Move a job running here to ``target`` (asked by its home), telling
        ``progress`` how far it has got."""

    async def has(self, ch: Channel, msg: dict[str, Any]) -> None:
        """Serve ``has``: whether a job runs here."""

    async def drop(self, ch: Channel, msg: dict[str, Any]) -> None:
        """Serve ``drop``: stop a restartable guest its home reruns elsewhere, or a stale
        copy of a job its home revived elsewhere."""

    async def checkpoint(self, job: Job, action: str, to: str = "", sig: int = 15) -> str:
        """``checkpoint`` (take one now), ``checkpoint-stop`` / ``checkpoint-exit``
        (then stop the job, or end it: it waits as checkpointed) or ``resume`` (on
        ``to``: a node, home or best) a job of this home, or any action on a checkpointed
        job (``kill`` ends it with ``sig``); what happened, for the user."""

    def checkpointed(self, job: Job) -> bool:
        """Whether the job waits as checkpointed (its actions go to :meth:`checkpoint`)."""

    def keep_checkpointed(self, job: Job) -> None:
        """Take checkpoints of a job of this home every ``job.checkpoint_every`` s."""

    def revive(self, job: Job, why: str) -> bool:
        """Restore a job of this home whose node is gone from its latest checkpoint (in
        a task); False if it has none (it is lost)."""

    def healed(self, node_id: int) -> None:
        """A node is heard again: drop the stale copies of jobs revived away from it."""

    def fence(self, job: Job, why: str) -> None:
        """Kill a checkpointed guest whose home this node declared dead (``why``)."""

    async def serve_checkpoint(self, ch: Channel, msg: dict[str, Any]) -> None:
        """Serve ``checkpoint``: dump a job running here, leaving it running."""

    async def serve_lease(self, ch: Channel, msg: dict[str, Any]) -> None:
        """Serve ``lease``: a home's renewals of the leases of its checkpointed jobs
        running here (omuscd.migrate.lease)."""


class Unwired:
    """Stands for the moves until the daemon wires them in: any use is a bug."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"the moves of jobs are not wired in (asked for {name})")
