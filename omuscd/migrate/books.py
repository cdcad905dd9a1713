"""What every phase of a move shares on this node: the moves in progress (one per job at a
time), a directory for each move's images, the notes of jobs frozen for a move, kept
across a restart (see :mod:`omuscd.migrate.recovery`); what the moves need of the node
(:class:`MoveHost`) and what they tell the layers above (:meth:`MoveBooks.tell`)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from omuscd.events import DUMPING, Progress
from omuscd.ids import is_job_id
from omuscd.jobs.record import Job, JobError
from omuscd.jobs.spool import open_private, private_dir

if TYPE_CHECKING:
    from omuscd.cluster.membership import Membership
    from omuscd.config import Config
    from omuscd.events import Event
    from omuscd.load import Sampler
    from omuscd.migrate import Mover

log = logging.getLogger("omuscd.migrate")

#: What moves tell their listeners (the daemon wires them: the balancer frees the room it
#: held for a move, the gossip counts the moves in and out)
ARRIVED = "arrived"  # a job moved in here: it takes the room held for it
LEFT = "left"  # a job moved away from here: its frozen copy is gone
GIVEN_UP = "given-up"  # a move here was refused or abandoned: the room held is free


class MoveHost(Protocol):
    """The node the moves run on (the daemon is one)."""

    cfg: Config
    members: Membership
    mover: Mover
    sampler: Sampler  # a resumed job's load counts from the moment it runs

    @property
    def name(self) -> str: ...

    def publish(self, events: list[Event]) -> None: ...

    def jobs_changed(self) -> None: ...


class MoveBooks:
    """The moves of this node, whichever side it is on."""

    def __init__(self, state_dir: str):
        self.images = Path(state_dir) / "images"
        # a job frozen for a move, until the move ends either way: where it was going
        # (read back after a restart that cut the move short; see Recovery.settle)
        self.marks = Path(state_dir) / "moving"
        # jobs being moved: one move of a job at a time ("out:ID" at a source, "in:ID"
        # at a target, ID at the home)
        self.moving: set[str] = set()
        self.listeners: list[Callable[[str], None]] = []
        # how far the moves someone waits for have got: job id -> what they read
        self.progress: dict[str, Progress] = {}

    @contextmanager
    def reporting(self, job_id: str, progress: Progress | None) -> Iterator[None]:
        """While a move of ``job_id`` runs here, its phases go to ``progress`` (None:
        nobody waits to hear)."""
        if progress is None:
            yield
            return
        self.progress[job_id] = progress
        try:
            yield
        finally:
            if self.progress.get(job_id) is progress:
                del self.progress[job_id]

    def report(self, job_id: str, phase: str, done: int = 0, total: int = 0) -> None:
        """A move of ``job_id`` got this far (see omuscd.events.PHASES): no I/O, so the
        frozen window may call it as often as it likes."""
        progress = self.progress.get(job_id)
        if progress is not None:
            progress.update(job_id, phase, done, total)

    @staticmethod
    def image_bytes(images: Path, pages: bool) -> int:
        """The bytes of a dump's memory (``pages``: its pages images), or of its other
        images (what a post-copy move sends before the job runs on the target)."""
        total = 0
        for f in images.iterdir():
            if f.suffix != ".log" and f.name.startswith("pages-") == pages:
                try:
                    total += f.stat().st_size
                except OSError:
                    pass
        return total

    def to_send(self, job_id: str, images: Path, lazy: bool) -> int:
        """The bytes of images a move of ``job_id`` sends after the dump (a post-copy
        move leaves the memory to follow; a streamed dump's went already and is not
        among them); 0 when nobody waits to hear (no stat in the frozen window)."""
        if job_id not in self.progress:
            return 0
        return self.image_bytes(images, False) + (0 if lazy else self.image_bytes(images, True))

    def tell(self, what: str) -> None:
        """Tell the listeners ARRIVED, LEFT or GIVEN_UP, at the instant it happens."""
        for listener in self.listeners:
            listener(what)

    def clean_images(self) -> None:
        """Image directories left by a crash are removed at start (a link there, never
        made by this daemon, is removed, not followed)."""
        if self.images.is_symlink():
            self.images.unlink()
        shutil.rmtree(self.images, ignore_errors=True)

    def images_dir(self, name: str) -> Path:
        """A fresh directory for one move's images, ``STATE_DIR/images/NAME``: the
        daemon's own, 0700, in ``images`` (0700 too), made without following a link.
        CRIU writes there with its own umask; no other user can reach what it writes (a
        job's memory).  JobError if it cannot be made."""
        try:
            top = private_dir(self.images)
            try:
                shutil.rmtree(name, dir_fd=top, ignore_errors=True)
                os.close(private_dir(name, dir_fd=top))
            finally:
                os.close(top)
        except OSError as e:
            log.warning("cannot make %s/%s for a move: %s", self.images, name, e)
            raise JobError(f"cannot make a directory for the images: {e}") from None
        return self.images / name

    def mark(self, job: Job, target: int, nice: int | None) -> None:
        """Note that ``job`` is frozen for a move to ``target`` (its nice before)."""
        self.report(job.id, DUMPING)
        self._note(job.id, {"target": target, "nice": nice})

    def mark_checkpoint(self, job: Job) -> None:
        """Note that a checkpoint of ``job``, another home's, is being taken here: from
        now on the lease guard stops it should this daemon die (omuscd.migrate.leaseguard),
        and the daemon started again must learn from the home whether to thaw it
        (Recovery.settle_checkpoint)."""
        self._note(job.id, {"checkpoint": job.home})

    def _note(self, job_id: str, mark: dict[str, Any]) -> None:
        """Keep ``mark`` as ``MARKS/JOB`` (0600 in a 0700 directory of the daemon's,
        made without following a link)."""
        data = json.dumps(mark).encode()
        try:
            top = private_dir(self.marks)
            try:
                fd = open_private(job_id, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, top)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            finally:
                os.close(top)
        except OSError as e:  # it goes on; only a restart in its middle would miss it
            log.warning("job %s: cannot note its move or checkpoint in %s: %s", job_id,
                        self.marks, e.strerror)

    def unmark(self, job_id: str) -> None:
        try:
            (self.marks / job_id).unlink(missing_ok=True)
        except OSError:
            pass

    def unmark_checkpoint(self, job_id: str) -> None:
        """Remove the note of :meth:`mark_checkpoint` (not a move's noted since)."""
        if is_job_id(job_id) and "checkpoint" in (self._read(job_id) or {}):
            self.unmark(job_id)

    def _read(self, job_id: str) -> dict[str, Any] | None:
        """The note ``MARKS/JOB`` ({} if there is none, None if it is unreadable or a
        link)."""
        try:
            fd = open_private(str(self.marks / job_id), os.O_RDONLY)
            with os.fdopen(fd, "rb") as r:
                mark = json.loads(r.read(4096))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return None
        return mark if isinstance(mark, dict) else None

    def interrupted(self) -> dict[str, dict[str, Any]]:
        """The moves a restart cut short: job id, where it was going and its nice; and
        the checkpoints of guests it cut short: job id, its home (``checkpoint``)."""
        found: dict[str, dict[str, Any]] = {}
        try:
            entries = list(self.marks.iterdir())
        except OSError:
            return found
        for f in entries:
            if not is_job_id(f.name):
                log.warning("%s: not a move note of this daemon; left alone", f)
                continue
            mark = self._read(f.name) or {}
            try:
                found[f.name] = ({"checkpoint": int(mark["checkpoint"])}
                                 if "checkpoint" in mark else
                                 {"target": int(mark["target"]), "nice": mark.get("nice")})
            except (ValueError, TypeError, KeyError, OverflowError):
                log.warning("unreadable move note %s; removed", f)
                self.unmark(f.name)
        return found
