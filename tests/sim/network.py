"""The in-memory network: loss, delay with jitter, partitions, and what each node sent."""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class NetConfig:
    """``loss``: probability that one datagram is lost (independently of all others).
    ``delay`` + uniform(0, ``jitter``): one-way latency in seconds (a LAN by default)."""

    loss: float = 0.0
    delay: float = 0.0002
    jitter: float = 0.0003

    def __post_init__(self) -> None:
        if not 0.0 <= self.loss < 1.0 or self.delay < 0 or self.jitter < 0:
            raise ValueError(f"bad network figures: {self}")


class Network:
    """Decides the fate of each datagram.  A partition gives each node a side (0 unless it
    is in one of the cut groups); a datagram between two sides is dropped when it would
    arrive, so one in flight when the cut happens is lost as on a real link."""

    def __init__(self, cfg: NetConfig, rng: random.Random):
        self.cfg = cfg
        self.rng = rng
        self.sides: dict[int, int] = {}
        self.sent = 0
        self.lost = 0
        self.cut = 0
        self.unroutable = 0
        self.delivered = 0
        self.bytes = 0
        self.largest = 0

    def partition(self, groups: list[set[int]]) -> None:
        """Cut each group (of node indexes) from every other node; replaces any cut."""
        self.sides = {i: side for side, group in enumerate(groups, 1) for i in group}

    def heal(self) -> None:
        self.sides = {}

    def across(self, a: int, b: int) -> bool:
        """Whether a partition separates node indexes ``a`` and ``b`` now."""
        sides = self.sides
        return bool(sides) and sides.get(a, 0) != sides.get(b, 0)

    def send(self, size: int) -> float | None:
        """Account one datagram; its latency, or None if it is lost."""
        self.sent += 1
        self.bytes += size
        if size > self.largest:
            self.largest = size
        cfg = self.cfg
        if cfg.loss and self.rng.random() < cfg.loss:
            self.lost += 1
            return None
        return cfg.delay + self.rng.random() * cfg.jitter if cfg.jitter else cfg.delay
