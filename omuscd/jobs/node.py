"""All the jobs of this node: its home side and its guest side in one object, which the
daemon builds and passes on; and the cluster channel's requests it serves (the op table,
see :mod:`omuscd.cluster.rpc`)."""

from __future__ import annotations

from typing import Any

from omuscd.channel import Channel
from omuscd.cluster.rpc import OpTable, refusal
from omuscd.jobs.books import serve_with_progress
from omuscd.jobs.guest import GuestJobs
from omuscd.jobs.home import HomeJobs
from omuscd.jobs.host import Host
from omuscd.jobs.process import refresh_usage
from omuscd.jobs.record import JobError


class JobControl(HomeJobs, GuestJobs):
    """The jobs of one daemon: ``home`` (started here) and ``guests`` (run here for
    another home).  A job both started and run here is in ``home`` only."""

    def __init__(self, host: Host):
        super().__init__(host)
        self.ops = self.channel_ops()

    def channel_ops(self) -> OpTable:
        """Every request of the cluster channel this node serves (see omuscd.cluster.rpc
        for what each carries and answers); the moves' go to the moves wired in."""
        ops = OpTable()
        ops.add("exec", self._serve_exec)
        ops.add("attach", self._serve_attach, names_job=True)
        ops.add("jobs", self._serve_jobs)
        ops.add("act", self._serve_act, names_job=True, may_name_node=True)
        ops.add("flag", self._serve_flag)
        ops.add("emigrate", self._serve_emigrate, names_job=True, names_node=True)
        ops.add("precheck", self._serve_precheck, names_job=True)
        ops.add("immigrate", self._serve_immigrate)
        ops.add("has", self._serve_has, names_job=True)
        ops.add("drop", self._serve_drop, names_job=True, names_node=True)
        ops.add("checkpoint", self._serve_checkpoint, names_job=True)
        ops.add("lease", self._serve_lease)
        return ops

    async def _serve_act(self, ch: Channel, msg: dict[str, Any]) -> None:
        """``act`` for a user of another node, at the job's home (or where it runs)."""
        try:
            text = await serve_with_progress(ch, msg, lambda progress: self.act(
                str(msg.get("job")), str(msg.get("action")), int(msg.get("uid", -1)),
                int(msg.get("sig", 15)), forwarded=True, to=str(msg.get("to", "")),
                progress=progress))
            await ch.send({"op": "done", "text": text})
        except JobError as e:
            await ch.send(refusal(str(e), "error"))

    async def _serve_jobs(self, ch: Channel, msg: dict[str, Any]) -> None:
        refresh_usage([j for j in self.all_jobs() if j.node == self.me])
        self.refresh_reasons(self.all_jobs())
        await ch.send({"op": "jobs", "home": [j.wire() for j in self.home.values()],
                       "guests": [j.wire() for j in self.guests.values()]})

    async def _serve_immigrate(self, ch: Channel, msg: dict[str, Any]) -> None:
        await self.moves.immigrate(ch, msg)

    async def _serve_precheck(self, ch: Channel, msg: dict[str, Any]) -> None:
        await self.moves.precheck(ch, msg)

    async def _serve_has(self, ch: Channel, msg: dict[str, Any]) -> None:
        await self.moves.has(ch, msg)

    async def _serve_drop(self, ch: Channel, msg: dict[str, Any]) -> None:
        await self.moves.drop(ch, msg)

    async def _serve_checkpoint(self, ch: Channel, msg: dict[str, Any]) -> None:
        await self.moves.serve_checkpoint(ch, msg)

    async def _serve_lease(self, ch: Channel, msg: dict[str, Any]) -> None:
        await self.moves.serve_lease(ch, msg)
