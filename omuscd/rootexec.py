"""The programs the daemon runs as itself (root, usually) and the environment they get.

Why: a helper found through a PATH, or started with an environment, that a user chose runs
that user's code as root (their own ``unshare`` first in PATH, an ``LD_PRELOAD``, an
``LD_LIBRARY_PATH``).  So every helper is looked up once, by name, in fixed system
directories only, and runs with :data:`HELPER_ENV`: neither the caller's environment nor
the daemon's own (which may be whatever the admin's shell or ``sudo`` left) reaches it.
The caller's environment goes only to the job's command, after the job's init has become
the caller (see :mod:`omuscd.jobs.jobinit`).
"""

from __future__ import annotations

import os
import sys

#: Where helpers are looked for: system directories that only root can change.
TRUSTED_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
#: The whole environment of every helper the daemon starts.
HELPER_ENV = {"PATH": TRUSTED_PATH, "LANG": "C.UTF-8"}


def _root_only(path: str) -> bool:
    """Whether ``path`` (after its links) and its directory are root's and writable by
    root alone: anything else could be swapped for another program under us."""
    real = os.path.realpath(path)
    for p in (real, os.path.dirname(real)):
        try:
            st = os.stat(p)
        except OSError:
            return False
        if st.st_uid != 0 or st.st_mode & 0o022:
            return False
    return True


def find(name: str) -> str | None:
    """The absolute path of the system program ``name`` from :data:`TRUSTED_PATH`, or
    None (a file there that is not root's alone is passed over)."""
    for d in TRUSTED_PATH.split(":"):
        path = os.path.join(d, name)
        if os.path.isfile(path) and os.access(path, os.X_OK) and _root_only(path):
            return path
    return None


def interpreter() -> str | None:
    """The Python that runs the job's init: the daemon's own (an absolute path fixed when
    the daemon started, never looked up in a caller's PATH), else the system's."""
    return sys.executable if os.path.isabs(sys.executable) else find("python3")


def need(path: str | None, name: str) -> str:
    """``path`` if it was found at start, else an error that says where it was sought."""
    if path is None:
        raise FileNotFoundError(f"{name} not found in {TRUSTED_PATH}")
    return path


#: Found once, as the daemon starts (importing this module).
UNSHARE = find("unshare")
SH = find("sh")
PYTHON = interpreter()
