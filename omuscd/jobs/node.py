"""All the jobs of this node: its home side and its guest side in one object, which the
daemon builds and passes on."""

from __future__ import annotations

from omuscd.jobs.guest import GuestJobs
from omuscd.jobs.home import HomeJobs


class JobControl(HomeJobs, GuestJobs):
    """The jobs of one daemon: ``home`` (started here) and ``guests`` (run here for
    another home).  A job both started and run here is in ``home`` only."""
