"""All the moves of this node, on whichever side it is, put together for its jobs.

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

The phases, like p.haul's: :mod:`.home` (choose the target, ask the source, book the
result), :mod:`.source` (freeze, dump, send, resume on failure), :mod:`.target` (check,
receive, restore, commit), :mod:`.recovery` (moves cut short by a restart); what they
share is in :mod:`.books`, the bytes on the channel in :mod:`.transfer`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from omuscd.jobs.record import CHECKPOINTED
from omuscd.migrate.books import MoveBooks, MoveHost
from omuscd.migrate.checkpoint import Checkpoints
from omuscd.migrate.home import MoveHome
from omuscd.migrate.lease import Grants, Holder
from omuscd.migrate.recovery import Recovery
from omuscd.migrate.revive import Revival
from omuscd.migrate.source import Source
from omuscd.migrate.target import Target

if TYPE_CHECKING:
    from omuscd.channel import Channel
    from omuscd.events import Progress
    from omuscd.jobs.node import JobControl
    from omuscd.jobs.record import Job


class Migrations:
    """The phases of this node's moves, built once and wired to each other; what the jobs
    ask of them (:class:`omuscd.jobs.host.Moves`) goes to the phase that does it."""

    def __init__(self, jc: JobControl, host: MoveHost):
        self.books = MoveBooks(host.cfg.state_dir)
        self.source = Source(jc, host, self.books)
        self.target = Target(jc, host, self.books)
        self.home = MoveHome(jc, host, self.books, self.source)
        self.checkpoints = Checkpoints(jc, host, self.books)
        self.grants = Grants(jc, host)
        self.holder = Holder(jc, host, self.books)
        self.recovery = Recovery(jc, host, self.books, self.source, self.home, self.holder)
        self.revival = Revival(jc, host, self.books, self.source, self.target,
                               self.checkpoints, self.grants)

    async def run_leases(self) -> None:
        """The leases of checkpointed jobs, both ways (omuscd.migrate.lease): granted by
        this home, held here for other homes."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.grants.run)
            nursery.start_soon(self.holder.run)

    def listen(self, listener: Callable[[str], None]) -> None:
        """Hear of moves in and out (see omuscd.migrate.books: ARRIVED, LEFT, GIVEN_UP)."""
        self.books.listeners.append(listener)

    def clean_images(self) -> None:
        self.books.clean_images()

    # what the jobs ask (omuscd.jobs.host.Moves)
    async def migrate(self, job: Job, where: str, progress: Progress | None = None) -> str:
        return await self.home.migrate(job, where, progress)

    def moved(self, job: Job, target: int) -> None:
        self.home.moved(job, target)

    def moving(self, job_id: str) -> bool:
        return job_id in self.books.moving

    def interrupted(self) -> dict[str, dict[str, Any]]:
        return self.books.interrupted()

    async def settle(self, job: Job, mark: dict[str, Any]) -> None:
        await self.recovery.settle(job, mark)

    def unmark(self, job_id: str) -> None:
        self.books.unmark(job_id)

    async def immigrate(self, ch: Channel, msg: dict[str, Any]) -> None:
        await self.target.immigrate(ch, msg)

    async def precheck(self, ch: Channel, msg: dict[str, Any]) -> None:
        await self.target.precheck(ch, msg)

    async def emigrate(self, job: Job, target: int,
                       progress: Progress | None = None) -> dict[str, Any]:
        with self.books.reporting(job.id, progress):
            return await self.source.emigrate(job, target)

    async def has(self, ch: Channel, msg: dict[str, Any]) -> None:
        await self.target.has(ch, msg)

    async def drop(self, ch: Channel, msg: dict[str, Any]) -> None:
        await self.source.serve_drop(ch, msg)

    # checkpoints (omuscd.migrate.checkpoint, omuscd.migrate.revive)
    async def checkpoint(self, job: Job, action: str, to: str = "", sig: int = 15) -> str:
        if action == "resume":
            return await self.revival.resume(job, to or "best")
        if action == "kill" and self.checkpointed(job):
            return self.checkpoints.end_checkpointed(job, sig)
        if action in ("stay", "nostay") and self.checkpointed(job):
            job.stay = action == "stay"
            return f"job {job.id} {'stays where it is' if job.stay else 'may migrate'}"
        return await self.checkpoints.checkpoint(job, action)

    def checkpointed(self, job: Job) -> bool:
        return job.state == CHECKPOINTED

    def keep_checkpointed(self, job: Job) -> None:
        self.checkpoints.keep_checkpointed(job)

    def revive(self, job: Job, why: str) -> bool:
        return self.revival.revive(job, why)

    def healed(self, node_id: int) -> None:
        self.revival.healed(node_id)

    def fence(self, job: Job, why: str) -> None:
        self.source.fence(job, why)

    async def serve_checkpoint(self, ch: Channel, msg: dict[str, Any]) -> None:
        """Guarded from the checkpoint's start (omuscd.migrate.leaseguard): once the home
        has it, it may revive the job should this daemon die."""
        job_id = str(msg.get("job"))
        guarded = await self.holder.checkpointing(job_id, ch.peer_id)
        try:
            await self.checkpoints.serve(ch, msg)
        finally:
            if guarded:
                with trio.CancelScope(shield=True):
                    await self.holder.checkpointed(job_id)

    async def serve_lease(self, ch: Channel, msg: dict[str, Any]) -> None:
        await self.holder.serve(ch, msg)
