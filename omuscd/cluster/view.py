"""The cluster as the jobs, the moves and the balancer see it: a node found by id or name,
and the one rule for which nodes may take a job.

The rule was once written three times (placement of a new job, the balancer's moves,
``migrate JOB best``), each a little different: ``migrate JOB best`` could choose a node
without CRIU and then refuse the move.  It is :meth:`ClusterView.why_not` now, and each of
them asks it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from omuscd.cluster.membership import ALIVE

if TYPE_CHECKING:
    from omuscd.cluster.membership import Membership, Node


class Mover(Protocol):
    """What the rule needs of this node's mechanism of moving jobs (migrate/criu.py's
    Criu, declared here so that this layer imports nothing above it): whether it works."""

    @property
    def available(self) -> bool: ...

#: Node flags that keep jobs away: ``blocked`` takes no guest jobs, ``quiet`` takes none
#: and is not chosen (see the ``block`` and ``quiet`` commands).
KEEP_AWAY = ("blocked", "quiet")


class ClusterView:
    """The nodes as this node knows them (its membership table and its own entry)."""

    def __init__(self, members: Membership, mover: Mover):
        self.members = members
        self.mover = mover

    @property
    def me(self) -> int:
        return self.members.my_id

    def find(self, key: str) -> Node | None:
        """A node by id or by name (not this one); ValueError if a name is ambiguous."""
        return self.members.find(key)

    def name_of(self, node_id: int) -> str:
        if node_id == self.me:
            return str(self.members.me["name"])
        node = self.members.nodes.get(node_id)
        return node.name if node else str(node_id)

    def stale_after(self) -> float:
        """Seconds after which a node's figures are too old to balance on (Timing)."""
        return float(self.members.timing.stale_after(self.members.live_count() + 1))

    def why_not(self, node_id: int, *, moved: bool, home: int | None = None,
                restartable: bool = False, rss_mb: float = 0.0,
                now: float | None = None) -> str:
        """Why node ``node_id`` may not take a job now, or "" if it may: the one rule.

        A node takes jobs when it is alive, speaks to us with the cluster key (not
        "unverified"), and is neither blocked nor quiet; a job comes home whatever its
        home's flags say.  A job ``moved`` there (not started) needs a mover (CRIU)
        there, unless it is ``restartable`` (run again from the start instead), and
        fits in the free memory the node tells (``rss_mb``; 0: not known).  Given ``now``
        (trio's clock, as membership's), a node whose figures are older than
        :meth:`stale_after` may not take one either: its load and free memory may be
        anything by now (its home or a node it comes back to still may)."""
        if node_id == self.me:
            flags: list[Any] = list(self.members.me["flags"])
            has_mover = self.mover.available
            mem = 0.0
        else:
            node = self.members.nodes.get(node_id)
            if node is None:
                return "not a node of the cluster"
            if node.state != ALIVE:
                return str(node.state)
            if node.auth == "unverified":
                return "not authenticated (no cluster key)"
            if now is not None and node_id != home and node.age(now) > self.stale_after():
                return f"figures {node.age(now):.0f} s old"
            flags = list(node.entry.get("flags", []))
            has_mover = "criu" in flags
            mem = float(node.entry.get("mem") or 0)
        if node_id != home:
            for flag in KEEP_AWAY:
                if flag in flags:
                    return flag
        if moved and not has_mover and not restartable:
            return "no CRIU"
        if moved and rss_mb and mem and rss_mb > mem:
            return f"{mem:.0f} MB free, the job has {rss_mb:.0f} MB"
        return ""

    def takers(self, *, moved: bool, restartable: bool = False,
               rss_mb: float = 0.0) -> list[Node]:
        """The other nodes that may take a job (see :meth:`why_not`)."""
        return [n for n in self.members.live_nodes()
                if not self.why_not(n.id, moved=moved, restartable=restartable,
                                    rss_mb=rss_mb)]
