"""The one parser of job ids and node names, for every door: control commands, the
cluster channel, and the spool (a job id names a directory there).

A job id is ``HOME.N``: the id of the node that started it and that node's count, both
plain decimal numbers without leading zeros.  A node is named by its id or its name: a
letter or digit, then letters, digits, ``.``, ``_`` or ``-``, at most 64 in all (the
length the daemon gossips).  Anything else (``..``, ``/``, an empty word, a very long
one, non-ASCII) is refused here, before it reaches a path, a table or a peer.
"""

from __future__ import annotations

import re
from typing import Any

MAX_NODE_ID = 2**32 - 2  # as the node_id parameter allows
MAX_NAME = 64
_JOB = re.compile(r"([1-9][0-9]{0,9})\.([1-9][0-9]{0,17})", re.ASCII)
_NUMBER = re.compile(r"[1-9][0-9]{0,9}", re.ASCII)
_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_NAME - 1}}}", re.ASCII)


class BadId(ValueError):
    """Not a job id or node name; the message says why, for the user or the log."""


def _shown(value: Any) -> str:
    return repr(str(value)[:40])


def job_id(value: Any) -> str:
    """``value`` if it is a job id, else BadId."""
    if not isinstance(value, str) or _JOB.fullmatch(value) is None \
            or int(value.split(".", 1)[0]) > MAX_NODE_ID:
        raise BadId(f"{_shown(value)} is not a job id (HOME.N, e.g. 12.3)")
    return value


def is_job_id(value: Any) -> bool:
    try:
        job_id(value)
    except BadId:
        return False
    return True


def home_of(value: str) -> int:
    """The id of a job's home node (BadId for anything not a job id)."""
    return int(job_id(value).split(".", 1)[0])


def node_id(value: Any) -> int:
    """A node id, from a peer's message or a word: an int in range, else BadId."""
    if isinstance(value, bool):
        raise BadId(f"{_shown(value)} is not a node id")
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        value = int(value)
    if not isinstance(value, int) or not 1 <= value <= MAX_NODE_ID:
        raise BadId(f"{_shown(value)} is not a node id (1 to {MAX_NODE_ID})")
    return value


def node_name(value: Any) -> str:
    """A node's name (or its id, as a word), else BadId."""
    if not isinstance(value, str) or _NAME.fullmatch(value) is None:
        raise BadId(f"{_shown(value)} is not a node name (letters, digits, '.', '_', '-'; "
                    f"at most {MAX_NAME})")
    return value
