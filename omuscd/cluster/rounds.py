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
#: A regular load sample is taken at any wake-up within this fraction of load_interval
#: of its time (before or after), so that it rides along with SWIM's ticks instead of
#: waking the daemon on its own: the intervals between samples vary by as much, their
#: average does not (an idle daemon woke 3 times a second instead of 2: bench_idle).
SAMPLE_SLACK = 0.25


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
        self.next_sample = 0.0  # the nominal time of the next regular load sample
        self._sleep: trio.CancelScope | None = None  # the loop's sleep, while it sleeps
        self.wakeups = 0  # times the loop ran (an idle daemon's cost is mostly these)

    def wake(self) -> None:
        """Look again now: a deadline or an interval may have moved."""
        if self._sleep is not None:
            self._sleep.cancel()

    def retime(self) -> None:
        """SWIM's next deadline moved (news to pass on brought it forward; an ack came
        before the probe timeout, which need no longer wake us): move the alarm without
        waking the loop, which a wake-up to sleep again would cost."""
        if self._sleep is not None:
            self._sleep.deadline = self._deadline()

    def _slack(self) -> float:
        return SAMPLE_SLACK * self.cfg.load_interval

    def _deadline(self) -> float:
        """When the loop must next wake: SWIM's next deadline, a pending settled sample,
        or the latest time of the next regular sample (it rides along with an earlier
        wake-up if one comes within its slack)."""
        due = self.gossip.due_hint = self.gossip.swim.next_due()
        if self.sample_due is not None:
            due = min(due, self.sample_due)
        return min(due, self.next_sample + self._slack())

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
        self.next_sample = trio.current_time()
        self.gossip.start(self.next_sample)
        swim = self.gossip.swim
        while True:
            self.wakeups += 1
            now = trio.current_time()
            interval = self.cfg.load_interval
            if self.sample_due is not None and now >= self.sample_due:
                # jobs came or went here: measure, tell the others, and look now
                self.sample_due = None
                self.sampler.sample()
                self.next_sample = now + interval
                self._figures()
                self.on_look()
            if self.figures_due:  # jobs came or went: the figure at once, and look now
                self.figures_due = False
                self._figures()
                self.on_look()
            if now >= self.next_sample - self._slack():
                self.sampler.sample()
                # on the regular schedule (a sample taken early or late does not shift
                # it), unless we fell behind it (stopped, or the interval changed)
                self.next_sample += interval
                if not now + self._slack() <= self.next_sample <= now + interval \
                        + self._slack():
                    self.next_sample = now + interval
                self._figures()
            if now >= swim.next_due():
                self.gossip.tick(now)
            with trio.CancelScope(deadline=self._deadline()) as self._sleep:
                await trio.sleep_forever()
            self._sleep = None
