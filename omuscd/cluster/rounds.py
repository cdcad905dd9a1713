"""The timer loop: gossip rounds, load samples and membership timeouts, in one task that
sleeps exactly until the next of them is due, so an idle daemon wakes only for those.

It asks the layers above for this node's figures (``figures()``: jobs, moves, role...)
and tells them when the loads may have changed (``on_look()``: the balancer looks now).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from omuscd.cluster.gossip import Gossip
from omuscd.config import Config
from omuscd.load import Sampler

STARTUP_BURST = 2.0  # seconds during which a new node announces every gossip round
LOAD_SETTLE = 0.25  # seconds after jobs came or went before the load is sampled again


class Rounds:
    """The timer loop of one node; ``wake()`` brings its next look forward."""

    def __init__(self, cfg: Config, gossip: Gossip, sampler: Sampler,
                 figures: Callable[[], dict[str, Any]], on_look: Callable[[], None]):
        self.cfg = cfg
        self.gossip = gossip
        self.sampler = sampler
        self.figures = figures
        self.on_look = on_look
        self.started = 0.0
        self.sample_due: float | None = None  # an extra load sample, after jobs changed
        self.gossip_due = False  # jobs changed: gossip the figure of Sampler.at_once now
        self._retime: trio.Event | None = None  # set by the loop: wake it up early

    def wake(self) -> None:
        """Look again now: a deadline or an interval may have moved."""
        if self._retime is not None:
            self._retime.set()

    def jobs_changed(self) -> None:
        """A job started, ended, arrived or left here: gossip the load at once, as the
        tasks runnable now (Sampler.at_once), and sample it again once the change shows
        in the CPU figures (LOAD_SETTLE), rather than up to a load interval later.
        Balancing reacts within milliseconds to a node that has just gone idle or busy."""
        # the extra sample measures the time after the last change only, and at least
        # LOAD_SETTLE of it (a burst of changes postpones it; regular samples go on)
        self.sampler.new_window()
        # counted here, at the change itself: counted later in the timer loop (once for
        # a burst) the makespan of bench_balance rose from 1.16x to 1.20x, twice
        self.sampler.at_once()  # told at once; the settled sample follows
        self.gossip_due = True
        self.sample_due = trio.current_time() + LOAD_SETTLE
        self.wake()

    def _round(self, now: float, announce: bool) -> None:
        s = self.sampler.last
        self.gossip.gossip_round(now, announce, load=s.load, util=s.util, runq=s.runq,
                                 mem=s.mem_free_mb, **self.figures())

    async def run(self) -> None:
        next_round = next_sample = next_announce = trio.current_time()
        while True:
            now = trio.current_time()
            if self.sample_due is not None and now >= self.sample_due:
                # jobs came or went here: measure, tell the others, and look now
                self.sample_due = None
                self.sampler.sample()
                next_sample = now + self.cfg.load_interval
                next_round = now
                self.on_look()
            if self.gossip_due:  # jobs came or went: the figure at once, and look now
                self.gossip_due = False
                next_round = now
                self.on_look()
            if now >= next_sample:
                self.sampler.sample()
                next_sample = now + self.cfg.load_interval
            if now >= next_round:
                self._round(now, now >= next_announce)
                if now >= next_announce:
                    burst = now - self.started < STARTUP_BURST
                    next_announce = now + (self.cfg.gossip_interval if burst
                                           else self.cfg.announce_interval)
                next_round = max(next_round + self.cfg.gossip_interval, now)
            events, deadline = self.gossip.members.sweep(now)
            self.gossip.on_events(events)
            self._retime = trio.Event()
            due = self.sample_due if self.sample_due is not None else next_sample
            with trio.move_on_at(min(next_round, next_sample, deadline, due)):
                await self._retime.wait()
