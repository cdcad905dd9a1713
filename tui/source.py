"""The console's data source: what the daemon says, kept up to date; no widgets here.

A :class:`ClusterSource` polls ``nodes --json`` (local to the daemon, cheap) every
``refresh`` seconds and ``jobs --json`` (which asks every home node) less often, or at once
when an event says a job changed; it follows ``watch --json`` for the feed.  Views read
:class:`Model` and redraw on their own alarm; the source only bumps ``Model.version``.
If the daemon goes away the model says so and the source reconnects.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from omuscd.client import Reply
from tui.link import Connector, Link, LinkError

log = logging.getLogger("omuscd.console")

FEED_LENGTH = 1000
RETRY = 2.0
RECENT = 100  # events replayed on the first connection
JOB_EVENTS = frozenset({"job-start", "job-exit", "job-lost", "migrating", "migrated",
                        "migration-failed", "dead", "leave", "balance"})

# Shown from the job table's move records, which cover the whole cluster (the daemon's
# own events cover only the moves it made): these events would be shown twice.
DERIVED = frozenset({"migrated", "migration-failed"})


@dataclass
class Model:
    """What the views show.  Only :class:`ClusterSource` (and tests) change it."""

    nodes: list[dict[str, Any]] = field(default_factory=list)
    jobs: list[dict[str, Any]] = field(default_factory=list)
    feed: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=FEED_LENGTH))
    connected: bool = False
    problem: str = ""  # why we are not connected
    version: int = 0  # bumped on every change, so a view redraws only when needed
    feed_version: int = 0

    @property
    def me(self) -> dict[str, Any]:
        return next((n for n in self.nodes if n.get("self")), {})

    def node_name(self, node_id: int) -> str:
        for n in self.nodes:
            if n["id"] == node_id:
                return str(n["name"])
        return str(node_id)

    seen_moves: set[tuple[str, float]] = field(default_factory=set)

    def note_moves(self, jobs: list[dict[str, Any]], history: bool) -> None:
        """Feed lines for moves the job table shows and the feed has not: every move in the
        cluster, not only those this daemon made (its events cover its own).  With
        ``history`` (the first look) the moves already made are only remembered."""
        for j in jobs:
            for mv in j.get("moves") or []:
                key = (str(j["id"]), float(mv.get("time", 0)))
                if key in self.seen_moves:
                    continue
                self.seen_moves.add(key)
                if history:
                    continue
                src, dst = self.node_name(mv.get("from", -1)), self.node_name(mv.get("to", -1))
                if "failed" in mv:
                    kind, text = "migration-failed", (f"job {j['id']} stays on {src} (not to "
                                                      f"{dst}): {mv['failed']}")
                elif mv.get("restarted"):
                    kind, text = "migrated", (f"job {j['id']} {src} -> {dst}: restarted from "
                                              "the beginning (no CRIU)")
                else:
                    kind, text = "migrated", (
                        f"job {j['id']} {src} -> {dst}: frozen {mv.get('freeze', 0):.3f}s, "
                        f"{mv.get('bytes', 0) / 1e6:.1f} MB")
                self.add_event({"event": kind, "time": mv.get("time", time.time()),
                                "text": text})

    def add_event(self, ev: dict[str, Any]) -> None:
        self.feed.append(ev)
        self.feed_version += 1
        self.version += 1

    def note(self, kind: str, text: str) -> None:
        """A line of the console's own in the feed (connection lost, command failed)."""
        self.add_event({"event": kind, "time": time.time(), "text": text})


class ClusterSource:
    """Keeps a :class:`Model` current through control sessions made by ``connect``."""

    def __init__(self, connect: Connector, refresh: float = 1.0, jobs_refresh: float = 3.0,
                 model: Model | None = None):
        self.connect = connect
        self.refresh = refresh
        self.jobs_refresh = jobs_refresh
        self.model = model or Model()
        self.link: Link | None = None
        self._jobs_due = trio.Event()
        self._replayed = False

    def changed(self) -> None:
        self.model.version += 1

    async def run(self) -> None:
        """Forever: connect, poll and follow events; on failure say why and retry."""
        while True:
            try:
                self.link = await self.connect()
                watch = await self.connect()
            except LinkError as e:
                self._lost(str(e))
                await trio.sleep(RETRY)
                continue
            if not self.model.connected:
                self.model.connected, self.model.problem = True, ""
                self.model.note("console", "connected: " + (
                    self.link.greeting.text if self.link.greeting else ""))
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._poll_nodes)
                    nursery.start_soon(self._poll_jobs)
                    nursery.start_soon(self._follow, watch)
            except* LinkError as eg:
                self._lost(str(eg.exceptions[0]))
            finally:
                await watch.aclose()
                await self.link.aclose()
                self.link = None
            await trio.sleep(RETRY)

    def _lost(self, why: str) -> None:
        if self.model.connected or self.model.problem != why:
            self.model.note("console", f"not connected: {why}")
        self.model.connected, self.model.problem = False, why
        self.changed()

    async def _poll_nodes(self) -> None:
        assert self.link is not None
        while True:
            doc = await self.link.json("nodes")
            nodes = list(doc.get("nodes", []))
            if nodes != self.model.nodes:
                self.model.nodes = nodes
                self.changed()
            await trio.sleep(self.refresh)

    async def _poll_jobs(self) -> None:
        assert self.link is not None
        first = not self.model.seen_moves
        while True:
            self._jobs_due = trio.Event()
            doc = await self.link.json("jobs --all")
            jobs = _recent(list(doc.get("jobs", [])))
            self.model.note_moves(jobs, history=first)
            first = False
            if jobs != self.model.jobs:
                self.model.jobs = jobs
                self.changed()
            with trio.move_on_after(self.jobs_refresh):
                await self._jobs_due.wait()
                await trio.sleep(0.2)  # let a burst of events settle

    async def _follow(self, watch: Link) -> None:
        # the first time, what happened before we looked (a --tui daemon's first joins)
        recent, self._replayed = (0 if self._replayed else RECENT), True
        async for ev in watch.watch(recent, fallback=True):
            if ev.get("event") not in DERIVED:
                self.model.add_event(ev)
            if ev.get("event") in JOB_EVENTS:
                self._jobs_due.set()
        raise LinkError("the daemon ended the event stream")

    async def command(self, line: str,
                      progress: Callable[[str], None] | None = None) -> Reply:
        """Run one command of the control language for the console's command line;
        ``progress`` hears how far a long one (a move) has got."""
        if self.link is None:
            return Reply(503, [f"not connected: {self.model.problem or 'connecting'}"])
        try:
            reply = await self.link.command(line, progress)
        except LinkError as e:
            return Reply(503, [f"not connected: {e}"])
        self._jobs_due.set()  # a command may have changed a job: look again soon
        return reply


KEEP_ENDED = 50


def _recent(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every live job first, then the last ended ones (``jobs --all`` keeps a history)."""
    live = [j for j in jobs if j.get("state") not in ("exited", "lost")]
    ended = [j for j in jobs if j.get("state") in ("exited", "lost")]
    return live + ended[-KEEP_ENDED:]
