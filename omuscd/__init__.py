"""omuscd: a user-space cluster daemon for Linux (the core; it never imports urwid)."""

from omuscd.version import RELEASE, VERSION_STRING, __version__

__all__ = ["RELEASE", "VERSION_STRING", "__version__"]
