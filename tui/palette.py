"""The console's colours, in one place.

Each entry names a role (``bar-high``, ``feed-dead``), never a colour, so a view says what a
thing is and this table says how it looks.  Every entry has a monochrome form (bold,
underline, standout) so the console is readable on a terminal without colour, with
``NO_COLOR`` set, or with ``--mono``; the colours are the 16 a plain Linux console has.
"""

from __future__ import annotations

import os

# name, foreground, background, monochrome
_ENTRIES: list[tuple[str, str, str, str]] = [
    ("body", "default", "default", ""),
    ("header", "white,bold", "dark blue", "standout"),
    ("footer", "light gray", "dark blue", "standout"),
    ("title", "white,bold", "default", "bold"),
    ("colhead", "light cyan,bold", "default", "underline"),
    ("focus", "black", "light gray", "standout"),
    ("self", "light cyan", "default", "bold"),
    ("dim", "dark gray", "default", ""),
    ("bar-low", "light green,bold", "default", "bold"),
    ("bar-mid", "yellow,bold", "default", "bold"),
    ("bar-high", "light red,bold", "default", "bold,standout"),
    ("bar-info", "light cyan,bold", "default", "bold"),
    ("state-alive", "light green", "default", ""),
    ("state-suspect", "yellow", "default", "bold"),
    ("state-dead", "light red", "default", "bold"),
    ("state-incompatible", "light magenta", "default", "bold"),
    ("job-running", "light green", "default", ""),
    ("job-migrating", "yellow", "default", "bold"),
    ("job-exited", "dark gray", "default", ""),
    ("job-lost", "light red", "default", "bold"),
    ("job-checkpointed", "light cyan", "default", ""),
    ("flag", "yellow,bold", "default", "bold"),
    ("feed-good", "light green", "default", ""),
    ("feed-move", "light cyan", "default", "bold"),
    ("feed-bad", "light red", "default", "bold"),
    ("feed-warn", "yellow", "default", "bold"),
    ("feed", "default", "default", ""),
    ("reply-ok", "default", "default", ""),
    ("reply-err", "light red", "default", "bold"),
    ("prompt", "yellow,bold", "default", "bold"),
    ("dialog", "black", "light gray", "standout"),
    ("dialog-focus", "white,bold", "dark blue", "bold,underline"),
]

PALETTE: list[tuple[str, str, str, str]] = [
    (name, fg, bg, mono) for name, fg, bg, mono in _ENTRIES]

FEED_ATTR: dict[str, str] = {
    "join": "feed-good", "alive": "feed-good", "job-start": "feed",
    "leave": "feed-warn", "suspect": "feed-warn", "forget": "dim", "restart": "feed-warn",
    "dead": "feed-bad", "clash": "feed-bad", "incompatible": "feed-bad", "job-lost": "feed-bad",
    "migration-failed": "feed-bad", "warning": "feed-warn",
    "migrating": "feed-move", "migrated": "feed-move", "balance": "feed-move",
    "reclaim": "feed-warn", "job-exit": "feed", "config": "dim",
    "checkpoint": "feed-move", "revived": "feed-warn",
}

# load thresholds of the bars (demand per lent CPU; 1.0 = every lent CPU busy)
LOAD_MID = 0.5
LOAD_HIGH = 0.9


def want_mono(forced: bool = False) -> bool:
    """Monochrome when asked, when NO_COLOR is set (no-color.org), or on a dumb terminal."""
    return forced or bool(os.environ.get("NO_COLOR")) or os.environ.get("TERM") in (
        None, "", "dumb", "vt100", "vt220")
