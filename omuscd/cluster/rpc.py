"""The cluster channel's requests: one table ``{op: handler}`` and one error reply.

Daemons talk over the cluster channel (:mod:`omuscd.channel`: authenticated, encrypted
TCP).  Each request opens a connection of its own and sends one JSON message whose
``op`` names it; the answers come on that connection.  Every request, who sends it, what
it carries, and its answers:

``exec`` (home -> the node chosen to run a job)
    ``job`` (the record), ``env``.  Answered ``started`` (``pid``, ``cannot_move``), then
    the job's output as data frames (1 stdout, 2 stderr), ``info`` (``cpu``,
    ``rss_mb``), and at the end ``exit`` (``exit``, ``cpu``) or ``moved`` (``node``).
    The home may send ``signal`` (``sig``), ``stdin-eof`` and input frames (stream 0).
``attach`` (home -> the node running its job)
    ``job``, ``offsets`` (what the home has of each stream).  ``attached``, then as
    ``exec``; ``unknown`` if the node does not run it.
``jobs`` (any node -> any node)
    The node's records: ``jobs`` with ``home`` and ``guests`` (lists of records).
``act`` (any node -> the job's home, or the node running it if the home is gone)
    ``job``, ``action`` (kill, stay, nostay, migrate), ``uid``, ``sig``, ``to``.
    ``done`` with ``text``.  A migrate asked with ``progress`` (true) gets ``progress``
    messages before it (see below).
``flag`` (any node -> a node)
    ``flag`` (blocked, lstay, quiet), ``on``.  ``done`` with ``text``.
``emigrate`` (home -> the node running its job)
    ``job``, ``to``: move it there.  ``migrated`` (``freeze``, ``bytes``, ``followed``);
    asked with ``progress`` (true), ``progress`` messages come before it.
``precheck`` (source -> target of a move, before the job is frozen)
    ``job``, ``facts`` (what the job holds by path: working directories, executables and
    mapped files with their size and digest, open files, CPU flags; see
    :mod:`omuscd.migrate.precheck`).  ``fit``, or ``refused`` naming what the target
    lacks.  An older target answers ``unknown operation``: the move goes on unchecked.
``immigrate`` (source -> target of a move)
    ``job`` (the record), ``pages`` / ``lazy`` if the source can stream or post-copy.
    ``ready``, then the move's own steps (see :mod:`omuscd.migrate.node`).  Restoring a
    checkpoint whose images are in a checkpoint_dir, the home may send ``images-at`` with
    ``dir`` instead of ``file`` steps: answered ``images`` with ``ok`` (read there) or
    ``ok`` false and ``error`` (then the ``file`` steps come).
``has`` (source -> target, after an unanswered commit or a restart)
    ``job``.  ``has`` with ``running`` (bool) and ``time``.
``drop`` (home -> the node running a --restartable job it reruns elsewhere, or a node
    heard again that was cut off while the home restored its job elsewhere)
    ``job``, ``to``, ``revived`` (true: kill that stale copy).  ``dropped``; ``unknown``
    (``revived``: no copy here).  Refused unless the job's home asks.
``attach`` answers ``unknown`` with ``fenced`` (true) for a job the node killed because
    it declared the job's home dead: the home restores it from its checkpoint.
``checkpoint`` (home -> the node running its job)
    ``job``: dump it, leaving it running; ``seq``: the checkpoint's number.  ``checkpoint``
    with ``meta`` (time, freeze, output sizes, files open for writing and their sizes,
    spool paths), then the images (``file`` + data frames), then ``done``; or ``failed``
    with the reason.  A node with a checkpoint_dir writes the images there instead: its
    ``meta`` has ``dir`` (where they go), ``size`` and ``seq``, no ``file`` comes, and
    after ``done`` the home says ``keep`` (answered ``kept``, or ``failed`` with why) or
    anything else (the images are dropped).
``lease`` (home -> a node running its checkpointed jobs; one connection per pair, kept)
    No answer: then ``renew`` messages, every lease/3 s, each with ``t`` (the home's
    monotonic time of sending), ``lease`` (its length, s) and ``jobs`` (the ids of the
    home's jobs the node holds; only jobs of that home are extended), each answered
    ``ack`` with its ``t`` (the next goes once acknowledged).  See
    :mod:`omuscd.migrate.lease`.

``progress`` (before the answer to ``act`` migrate or ``emigrate``, when asked for)
    ``job``, ``phase`` (one of omuscd.events.PHASES), ``done``, ``total`` (bytes): how far
    the move has got, at most four a second, each the latest state; a node that did not
    ask gets none (an older one would take the first for the answer).

A request that is refused, or fails, is answered in one shape, :func:`refusal`:
``{"op": "refused" | "failed" | "error", "reason": WHY, "text": WHY}``.  Both fields carry
the reason because daemons before this table read one or the other, depending on the
request; :func:`error_text` reads either, so that old and new daemons understand each
other both ways.  The op names and fields are the wire format: they do not change.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from omuscd import ids
from omuscd.channel import Channel

log = logging.getLogger("omuscd.rpc")

Handler = Callable[[Channel, dict[str, Any]], Awaitable[None]]


def refusal(why: str, op: str = "refused") -> dict[str, Any]:
    """The one error reply: ``op`` is ``refused`` (not taken up), ``failed`` (taken up,
    and it failed) or ``error`` (what ``act`` has always answered)."""
    return {"op": op, "reason": why, "text": why}


def error_text(reply: dict[str, Any], default: str = "refused") -> str:
    """Why a reply is not the answer hoped for, whichever shape it has (old daemons
    send ``reason`` or ``text``)."""
    return str(reply.get("reason") or reply.get("text") or default)


@dataclass(frozen=True)
class Op:
    """One request: its handler, and the ids it must carry (refused before the handler
    sees them, so that a bad id never reaches a path or a table)."""

    handler: Handler
    names_job: bool = False  # "job" is a job id
    names_node: bool = False  # "to" is a node id
    may_name_node: bool = False  # "to", if given, is a node name (or id)

    def bad_ids(self, msg: dict[str, Any]) -> str:
        """Why the message names no valid job or node ("" when it does)."""
        try:
            if self.names_job:
                ids.job_id(msg.get("job"))
            if self.names_node:
                ids.node_id(msg.get("to"))
            if self.may_name_node and msg.get("to"):
                ids.node_name(msg.get("to"))
        except ids.BadId as e:
            return str(e)
        return ""


class OpTable:
    """The requests a node serves, by name."""

    def __init__(self) -> None:
        self.ops: dict[str, Op] = {}

    def add(self, name: str, handler: Handler, **checks: bool) -> None:
        self.ops[name] = Op(handler, **checks)

    async def dispatch(self, ch: Channel, msg: dict[str, Any]) -> None:
        """Serve one request: refused if its op is unknown or its ids are bad."""
        name = msg.get("op")
        op = self.ops.get(name) if isinstance(name, str) else None
        if op is None:
            await ch.send(refusal(f"unknown operation {name!r}"))
            return
        bad = op.bad_ids(msg)
        if bad:
            log.warning("cluster channel: node %s sent %s with %s; refused",
                        ch.peer.get("node"), name[:20], bad)
            await ch.send(refusal(bad))
            return
        await op.handler(ch, msg)
