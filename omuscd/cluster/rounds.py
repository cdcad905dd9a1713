"""The timer loop: SWIM's deadlines (probes, timeouts, changes to pass on, push-pull)
and load samples, in one task that sleeps exactly until the next of them is due, so an
idle daemon wakes only for those.

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
        self.figures_due = False  # jobs changed: send the figure of Sampler.at_once now
        self._retime: trio.Event | None = None  # set by the loop: wake it up early

    def wake(self) -> None:
        """Look again now: a deadline or an interval may have moved."""
        if self._retime is not None:
            self._retime.set()

    def jobs_changed(self) -> None:
        """A job started, ended, arrived or left here: gossip the load at once, as the
        tasks runnable now (Sampler.at_once), and sample it again once the change shows
        in the CPU figures (LOAD_SETTLE), rather than up to a load interval later; the
        figures go out with the next probe or ack.
        Balancing reacts within milliseconds to a node that has just gone idle or busy."""
        # the extra sample measures the time after the last change only, and at least
        # LOAD_SETTLE of it (a burst of changes postpones it; regular samples go on)
        self.sampler.new_window()
        # counted here, at the change itself: counted later in the timer loop (once for
        # a burst) the makespan of bench_balance rose from 1.16x to 1.20x, twice
        self.sampler.at_once()  # told at once; the settled sample follows
        self.figures_due = True
        self.sample_due = trio.current_time() + LOAD_SETTLE
        self.wake()

    def _figures(self) -> None:
        s = self.sampler.last
        self.gossip.set_figures(load=s.load, util=s.util, runq=s.runq, mem=s.mem_free_mb,
                                **self.figures())

    async def run(self) -> None:
        now = trio.current_time()
        next_sample = now
        self.gossip.start(now)
        swim = self.gossip.swim
        while True:
            now = trio.current_time()
            if self.sample_due is not None and now >= self.sample_due:
                # jobs came or went here: measure, tell the others, and look now
                self.sample_due = None
                self.sampler.sample()
                next_sample = now + self.cfg.load_interval
                self._figures()
                self.on_look()
            if self.figures_due:  # jobs came or went: the figure at once, and look now
                self.figures_due = False
                self._figures()
                self.on_look()
            if now >= next_sample:
                self.sampler.sample()
                next_sample = now + self.cfg.load_interval
                self._figures()
            if now >= swim.next_due():
                self.gossip.tick(now)
            self._retime = trio.Event()
            due = self.sample_due if self.sample_due is not None else next_sample
            wake = min(swim.next_due(), next_sample, due)
            self.gossip.due_hint = wake
            with trio.move_on_at(wake):
                await self._retime.wait()
