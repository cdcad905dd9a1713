"""Version numbering after the original omuscd: version number, release letter, revision.

``omuscd-1a0`` is version 1, alpha release, revision 0.  Daemons with the same version
number interoperate on the wire; the version number *is* the wire protocol version, so
there is exactly one number to compare.  Python packaging needs a PEP 440 string, which
:func:`pep440` derives from the release string (one source of truth, mapped one way):

======  ==================  =================
letter  meaning             PEP 440 version
======  ==================  =================
a       alpha               ``N.0aR``
b       beta                ``N.0bR``
d       development/debug   ``N.0.devR``
r       release             ``N.R``
v       release, optimised  ``N.R.post0``
======  ==================  =================
"""

from __future__ import annotations

import re

#: The one place the version is written.
#: 2: the wire protocol of SWIM membership (issue 19): daemons of version 1 speak another
#: protocol, so each lists the other as incompatible (the version rule).
RELEASE = "2a1"

_RELEASE_RE = re.compile(r"^(\d+)([abdrv])(\d+)$")


def parse_release(release: str) -> tuple[int, str, int]:
    """Split ``"1a0"`` into ``(1, "a", 0)``; raise ValueError for anything else."""
    m = _RELEASE_RE.match(release)
    if not m:
        raise ValueError(f"not an omuscd release string: {release!r}")
    return int(m.group(1)), m.group(2), int(m.group(3))


def pep440(release: str) -> str:
    """Map an omuscd release string to the Python package version (see module doc)."""
    number, letter, revision = parse_release(release)
    return {
        "a": f"{number}.0a{revision}",
        "b": f"{number}.0b{revision}",
        "d": f"{number}.0.dev{revision}",
        "r": f"{number}.{revision}",
        "v": f"{number}.{revision}.post0",
    }[letter]


VERSION_NUMBER, RELEASE_LETTER, REVISION = parse_release(RELEASE)
#: What users see: ``omuscd-1a0``.
VERSION_STRING = f"omuscd-{RELEASE}"
#: The wire protocol version: the version number.
PROTOCOL_VERSION = VERSION_NUMBER
#: What was added to the wire within one protocol version, where a daemon of the same
#: version but older still reads the datagrams: each node announces its revision in its
#: entry (``pr``, absent means 0) and sends a newer form only to nodes that read it.
#: 1 (omuscd-2a1): SWIM's compact refutation record (cluster/swim.py), sent as a whole
#: entry to others.
PROTOCOL_REVISION = 1
__version__ = pep440(RELEASE)
