"""The home side of nodes lost: what becomes of this home's jobs when the node running one
is declared dead, leaves, restarts, or is not heard from after this daemon restarted
(lost, or revived from a checkpoint: see omuscd.migrate.revive, whose lease makes sure
the node it ran on has stopped it first, omuscd.migrate.lease); and the fencing of this
node's guests when it declares their home dead.  A part of HomeJobs, apart so that the
revival's side of membership news reads in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from omuscd.cluster.membership import ALIVE
from omuscd.events import Event
from omuscd.jobs.held import JobSignals
from omuscd.jobs.record import FINAL, Job

if TYPE_CHECKING:
    from omuscd.channel import Channel


class NodeLoss(JobSignals):
    """Membership news, as it touches the jobs of this home (a part of HomeJobs)."""

    if TYPE_CHECKING:  # given by GuestJobs and HomeJobs
        def fence_guests(self, home: int) -> None: ...

        async def _follow(self, job: Job, ch: Channel | None) -> None: ...

    def on_events(self, events: list[Event]) -> None:
        """Membership news: jobs on a dead or departed node are lost (or revived); a
        node heard again drops its stale copies of jobs revived meanwhile; guests of a
        dead home with checkpoints are fenced (GuestJobs.fence_guests)."""
        for ev in events:
            if ev.kind in ("alive", "restart", "join"):
                self.moves.healed(int(ev.data.get("node", -1)))
            if ev.kind == "dead":
                self.fence_guests(int(ev.data.get("node", -1)))
            if ev.kind in ("dead", "leave", "restart"):
                nid = ev.data.get("node")
                what = {"dead": "died", "leave": "left the cluster",
                        "restart": "restarted"}[ev.kind]
                for job in list(self.home.values()):
                    if job.node != nid or job.state in FINAL:
                        continue
                    if ev.kind == "dead":
                        self.lost_unless_revived(job, f"node {job.node_name} {what}")
                    else:  # its daemon stopped or restarted: the job may well run on
                        self._nursery().start_soon(self._lost_unless_back, job, nid, what)

    async def _lost_unless_back(self, job: Job, nid: int, what: str) -> None:
        """A job whose node's daemon left or restarted is lost only if that daemon does
        not take it up again in time (it keeps its guests' records too)."""
        await trio.sleep(2 * self.host.cfg.dead_timeout)
        if job.state not in FINAL and job.node == nid and job.id not in self.links:
            self.lost_unless_revived(job, f"node {job.node_name} {what} and did not take "
                                     "the job up again")

    async def _follow_again(self, job: Job) -> None:
        """After this daemon restarted: follow a job of this home running elsewhere once
        its node is heard from, or revive it (lose it) if that node is not heard in time."""
        grace = self.host.cfg.dead_timeout + 2 * self.host.cfg.gossip_interval + 1
        with trio.move_on_after(grace):
            while True:
                node = self.host.members.nodes.get(job.node)
                if node is not None and node.state == ALIVE:
                    break
                await trio.sleep(0.2)
        node = self.host.members.nodes.get(job.node)
        if node is None or node.state != ALIVE:
            self.lost_unless_revived(job, f"node {job.node_name} was not heard from after "
                                     "this daemon restarted")
            return
        await self._follow(job, None)
