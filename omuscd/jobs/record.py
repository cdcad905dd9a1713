"""A job's record: who owns it, where it is homed and runs, and its state.

A job is started on its *home node* (where ``omuscd run`` was typed) and runs on any node.
The home node keeps the authoritative record; the node running the job keeps a guest record.
Every change of state goes through :meth:`Job.transition`, which wakes the job's waiters
and has the record kept (its ``keep`` hook, set by whoever books the job): a change
somebody forgot to save came back wrong after a restart.
"""

from __future__ import annotations

import os
import pwd
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import trio

from omuscd import ids

RUNNING, MIGRATING, EXITED, LOST = "running", "migrating", "exited", "lost"
MOVED = "moved"  # on the node a job left: its record there is finished
#: at its home: stopped after a checkpoint (checkpoint --stop/--exit), waiting for 'resume'
CHECKPOINTED = "checkpointed"
JOB_STATES = (RUNNING, MIGRATING, EXITED, LOST, CHECKPOINTED)
FINAL = (EXITED, LOST, MOVED)
#: the reason on a guest's record killed because its home was declared dead (fenced)
FENCED = "fenced:"
STDOUT, STDERR = 1, 2
STREAM_FILES = {STDOUT: "stdout", STDERR: "stderr"}
KEEP_EXITED = 1000  # finished records kept per node



class JobError(Exception):
    """A job cannot be started or acted on; the message says why, for the user."""


class NodeUnreachable(JobError):
    """The node asked to act on a job could not be reached: nothing was asked of it (it
    may be cut off for a while), so the job may well run on, and asking again is safe."""


@dataclass
class Owner:
    uid: int
    gid: int
    groups: list[int]
    user: str

    @classmethod
    def of_uid(cls, uid: int) -> Owner:
        try:
            pw = pwd.getpwuid(uid)
        except KeyError:
            raise JobError(f"uid {uid} has no user on this node") from None
        groups = os.getgrouplist(pw.pw_name, pw.pw_gid)
        return cls(uid, pw.pw_gid, groups, pw.pw_name)


@dataclass
class Job:
    """One job's record (on its home node, or as a guest on the node running it)."""

    id: str
    owner: Owner
    home: int
    node: int
    node_name: str
    argv: list[str]
    cwd: str
    started: float = field(default_factory=time.time)
    state: str = RUNNING
    stay: bool = False
    restartable: bool = False
    stdin: bool = False
    cpu: float = 0.0
    rss_mb: float = 0.0
    migrations: int = 0
    cpu_moved: float = 0.0  # CPU seconds of its earlier stays (a restore restarts the count)
    exit: dict[str, Any] | None = None
    ended: float | None = None
    reason: str = ""  # why it was lost
    cannot_move: str = ""  # why it cannot move (filled in by the migration backend)
    offsets: dict[int, int] = field(default_factory=lambda: {STDOUT: 0, STDERR: 0})
    node_changed: bool = False  # set on the node a job left, so its end is not reported
    launcher: int | None = None  # the unshare process of a job started here (not restored)
    generation: int = 0  # bumped when a restartable job is rerun from the start elsewhere
    moves: list[dict[str, Any]] = field(default_factory=list)  # the last moves, and failures
    stdin_pipe: Any = field(default=None, repr=False)  # --stdin: where its input goes here
    run: int = 0  # this node's count of the job's stays here: only the current one ends it
    pid: int | None = None  # on the node running it: the job's init, seen from outside
    landed_at: float = field(default=0.0, repr=False)  # wall time it last arrived here
    cut: str = ""  # why its output may be incomplete (a full state filesystem), else ""
    checkpoint_every: float = 0.0  # seconds between its checkpoints (0: the tunable's)
    #: at its home, its last complete checkpoint: seq, time, size (omuscd.jobs.checkpoints)
    checkpoint: dict[str, Any] = field(default_factory=dict)
    revived: int = 0  # times it went back to a checkpoint (its node died)
    revived_to: float = 0.0  # the time of the checkpoint it last went back to
    #: at its home: [node, boot] of each node a revival took it from, that may still run a
    #: stale copy (cut off, not dead); asked to drop it once heard again (migrate.revive)
    revived_from: list[list[int]] = field(default_factory=list)
    #: at its home, signals sent while it moves, in order: delivered wherever it runs once
    #: the move ends (see HomeJobs.release_held); not on the wire, not on disk
    held: list[int] = field(default_factory=list, repr=False)
    changed: trio.Event = field(default_factory=trio.Event, repr=False)
    #: keeps the record (on disk) after each transition; set by the table that books it
    keep: Callable[[Job], None] | None = field(default=None, repr=False, compare=False)

    def new_stay(self) -> int:
        """The job runs here again (restored here): a new run, counted before the hand-over
        flag is cleared, so that the watcher of an earlier stay here, not yet woken, does
        not take the death of that stay's frozen copy for this one's end (a job brought
        back within a poll interval was reported killed by signal 9)."""
        self.run += 1
        self.node_changed = False
        return self.run

    def notify(self) -> None:
        """Wake everyone waiting for this job (output grew, state changed)."""
        self.changed.set()
        self.changed = trio.Event()

    def transition(self, state: str, **changes: Any) -> None:
        """The one way a job changes state: set ``state`` and the fields that change with
        it (``ended``, ``reason``, ``node``...), wake everyone waiting for the job, and
        keep the record (a restarted daemon reads it back)."""
        for name, value in changes.items():
            if name not in self.__dataclass_fields__:
                raise AttributeError(f"a job has no field {name!r}")
            setattr(self, name, value)
        self.state = state
        self.notify()
        if self.keep is not None:
            self.keep(self)

    def status_code(self) -> int:
        """The exit status a shell would show: the code, or 128+N for signal N."""
        if self.exit is None:
            return 0
        if "signal" in self.exit:
            return 128 + int(self.exit["signal"])
        return int(self.exit.get("code", 127))

    def exit_text(self) -> str:
        if self.exit is None:
            return ""
        if "signal" in self.exit:
            return f"killed by signal {self.exit['signal']}"
        if "error" in self.exit:
            return f"failed to start: {self.exit['error']}"
        return f"exit {self.exit['code']}"

    def _record(self) -> dict[str, Any]:
        """The plain fields (not ``asdict``: it would deep-copy the trio Event)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)
             if f.name not in ("changed", "stdin_pipe", "run", "landed_at", "keep", "held")}
        d["owner"] = asdict(self.owner)
        d["argv"] = list(self.argv)
        d["exit"] = dict(self.exit) if self.exit else None
        return d

    def view(self) -> dict[str, Any]:
        d = {k: v for k, v in self._record().items() if k not in ("offsets", "pid")}
        d["owner"] = self.owner.user
        d["uid"] = self.owner.uid
        d["command"] = " ".join(self.argv)
        d["status"] = self.exit_text()
        d["cpu"] = round(self.cpu, 2)
        d["rss_mb"] = round(self.rss_mb, 1)
        if self.held:
            d["held"] = list(self.held)
        return d

    def wire(self) -> dict[str, Any]:
        """The record as sent between daemons."""
        d = self._record()
        d["offsets"] = {str(k): v for k, v in self.offsets.items()}
        return d

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Job:
        """A record from a peer or from disk; ValueError (ids.BadId for an id) if its id,
        nodes or owner are not what they must be: a job id names a spool directory."""
        d = dict(d)
        ids.job_id(d.get("id"))
        ids.node_id(d.get("home"))
        ids.node_id(d.get("node"))
        owner = d.get("owner")
        if not isinstance(owner, dict) or not all(
                type(owner.get(k)) is int and owner[k] >= 0 for k in ("uid", "gid")):
            raise ValueError("a job record without a valid owner")
        d["owner"] = Owner(**d["owner"])
        d["offsets"] = {int(k): int(v) for k, v in d.get("offsets", {}).items()}
        d.pop("changed", None)
        d.pop("launcher", None)  # a pid means nothing on another node
        d.pop("stdin_pipe", None)
        d.pop("run", None)
        d.pop("keep", None)
        d.pop("held", None)  # a peer's word cannot queue signals here
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


def job_order(job_id: str) -> tuple[int, int]:
    """Jobs in the order they were started (by home node, then number)."""
    home, _, n = job_id.partition(".")
    return (int(home) if home.isdigit() else 0, int(n) if n.isdigit() else 0)


