"""The controller/drone topology: the controller with the lowest id holds the cluster view
and orders every move; drones never start one.  Without a reachable controller, drones
say that balancing has stopped (no split brain); it resumes when a controller returns.
"""

from __future__ import annotations

import time

from omuscd.balance.core import Core
from omuscd.balance.policy import Decision, JobLoad, decide, imbalance
from omuscd.cluster.membership import ALIVE
from omuscd.jobs.record import RUNNING


class Controller:
    """The controller's moves and the drones' watch for a controller."""

    def __init__(self, core: Core):
        self.core = core
        self.no_controller = False

    def controllers(self) -> list[int]:
        s = self.core.s
        ids = [n.id for n in s.members.live_nodes()
               if n.state == ALIVE and n.entry["role"] == "controller"]
        if self.core.cfg.topology == "controller":
            ids.append(s.node_id)
        return sorted(ids)

    async def tick(self, now: float) -> None:
        core = self.core
        ctrl = self.controllers()
        if ctrl[0] != core.s.node_id:
            core.say(f"balancing: two controllers ({', '.join(map(str, ctrl))}); only node "
                     f"{ctrl[0]} acts", kind="warning")
            return
        loads = core.loads(now)
        policy = core.policy()
        fastest = max(n.speed for n in loads.values())
        busiest = sorted(loads.values(), key=lambda n: -n.pressure(fastest))
        verdicts = [imbalance(src, [n for n in loads.values() if n.id != src.id], policy)
                    for src in busiest]
        if not any(target for target, _ in verdicts):
            # the gossiped loads show no move could help: do not ask the nodes for jobs
            if not verdicts[0][1].startswith("balanced"):
                core.say(f"balancing: {verdicts[0][1]}", steady=True)
            return
        wall = time.time()
        by_node: dict[int, list[JobLoad]] = {}
        for job in await core.s.jobs.cluster_jobs():
            if job.state == RUNNING and job.node in loads:
                by_node.setdefault(job.node, []).append(core.job_load(job, wall))
        first: Decision | None = None
        for src in busiest:
            others = [n for n in loads.values() if n.id != src.id]
            decision = decide(src, others, by_node.get(src.id, []), policy)
            first = first or decision
            if decision.job is not None:
                await core.move(decision, src.id)
                return
        if first is not None and not first.reason.startswith("balanced"):
            core.say(f"balancing: {first.reason}", steady=True)

    def drone_tick(self) -> None:
        ctrl = self.controllers()
        if not ctrl:
            if not self.no_controller:
                self.no_controller = True
                self.core.say("balancing stopped: no controller is reachable (drones never "
                              "start a move)", kind="warning")
        elif self.no_controller:
            self.no_controller = False
            self.core.say(f"balancing resumed: node {ctrl[0]} controls")
