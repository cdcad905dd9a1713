"""Lifeguard's two local refinements of SWIM (Dadgar et al., 2018), as memberlist has them.

- :class:`Awareness`: a node that misses acks and nacks is more likely slow itself than
  surrounded by dead peers, so its own probe timeouts and intervals stretch with a score
  (0 = healthy) instead of it accusing others.
- :class:`Suspicion`: a suspicion timeout starts at its maximum and shrinks towards its
  minimum as independent members confirm it, so a lone false accusation has a long time to
  be refuted and a real failure is declared quickly once several members agree.

Pure logic: time is passed in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


class Awareness:
    """Our local health score in ``[0, max_multiplier - 1]``; timeouts scale by score + 1."""

    def __init__(self, max_multiplier: int):
        self.max = max(1, max_multiplier)
        self.score = 0

    def apply(self, delta: int) -> None:
        self.score = min(self.max - 1, max(0, self.score + delta))

    def missed(self, helpers: int, nacks: int) -> bool:
        """A probe got no ack, and ``nacks`` of its ``helpers`` said they got none either:
        count the missing nacks against ourselves (Lifeguard: they say we are the slow
        one), and say whether the silence accuses the target.  It does not when no helper
        answered at all: what is silent is then our host (stalled, its sockets unread),
        and the target is probed again with the stretched timeouts (100 daemons on one
        loaded machine accused each other after every stall); once they are stretched all
        they can be, it does again (a node cut off from every other must see them go)."""
        self.apply(helpers - nacks if helpers else 1)
        return bool(nacks or not helpers or self.at_max)

    @property
    def at_max(self) -> bool:
        """Whether our timeouts are stretched as far as they go."""
        return self.score >= self.max - 1

    def scale(self, seconds: float) -> float:
        return seconds * (self.score + 1)


def suspicion_bounds(n: int, mult: float, max_mult: float,
                     interval: float) -> tuple[float, float]:
    """memberlist's suspicion timeout range for ``n`` members: min = mult * max(1,
    log10(n)) * probe interval (a crash must outlast the spread of its suspicion, which
    takes O(log n) periods), max = max_mult * min."""
    scale = max(1.0, math.log10(max(1.0, float(n))))
    lo = mult * scale * interval
    return lo, max_mult * lo


def confirmations_wanted(n: int, mult: float) -> int:
    """Lifeguard's k: independent confirmations that bring the timeout down to its
    minimum; none where there are too few members to give them."""
    k = int(mult) - 2
    return 0 if n - 2 < k else max(0, k)


@dataclass
class Suspicion:
    """One suspected member: the timeout shrinks from ``hi`` to ``lo`` as the first
    ``k`` confirmations from distinct accusers arrive."""

    start: float
    lo: float
    hi: float
    k: int
    accusers: set[int] = field(default_factory=set)

    def timeout(self) -> float:
        """Seconds from ``start`` to the declaration of death."""
        if self.k < 1:
            return self.lo
        c = max(0, len(self.accusers) - 1)  # the first accuser is not a confirmation
        frac = math.log(c + 1) / math.log(self.k + 1)
        return max(self.lo, self.hi - frac * (self.hi - self.lo))

    @property
    def deadline(self) -> float:
        return self.start + self.timeout()

    def confirm(self, by: int) -> bool:
        """Count ``by``'s accusation; True when it is new and still shortens the timeout
        (worth passing on, so that others count it too)."""
        if by in self.accusers or len(self.accusers) - 1 >= self.k:
            return False
        self.accusers.add(by)
        return True
