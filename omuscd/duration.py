"""Durations as people type them (``10m``, ``30s``, ``1h30m``, ``90``): the one parser, for
``omuscd run --checkpoint-every`` on the client and its ``run`` command at the daemon.
Standard library only: ``omuscd run`` imports it and must start fast."""

from __future__ import annotations

import re

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
#: Checkpoints closer than this would keep a job frozen much of the time; further apart
#: than this are a typo.
SHORTEST, LONGEST = 1.0, 30 * 86400.0
_PART = re.compile(r"(\d{1,7}(?:\.\d{1,3})?)([smhd]?)", re.ASCII)


def parse(text: str) -> float:
    """Seconds in ``text`` (a number with an optional unit s, m, h or d, or several such
    parts: ``1h30m``); ValueError saying what is wrong otherwise, and for less than
    SHORTEST or more than LONGEST."""
    word = text.strip().lower()
    if not word or len(word) > 32:
        raise ValueError(f"{text[:40]!r} is not a duration (e.g. 30s, 10m, 1h30m)")
    total, pos = 0.0, 0
    while pos < len(word):
        m = _PART.match(word, pos)
        if m is None or (not m.group(2) and (pos or m.end() != len(word))):
            raise ValueError(f"{text[:40]!r} is not a duration (e.g. 30s, 10m, 1h30m)")
        total += float(m.group(1)) * UNITS[m.group(2) or "s"]
        pos = m.end()
    if not SHORTEST <= total <= LONGEST:
        raise ValueError(f"{text[:40]!r}: a checkpoint interval must be between "
                         f"{SHORTEST:g}s and {LONGEST / 86400:g} days")
    return total
