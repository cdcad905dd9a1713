"""How a running job is moved from one node to another, behind one small interface.

A :class:`Mover` freezes a job into a directory of images, and brings it back to life from
such a directory on another node.  Everything around that (choosing the target, moving the
images over the cluster channel, the atomic hand-over, the books) is the same whatever the
mechanism, and lives in :mod:`omuscd.migrate.node`.  CRIU is the mechanism now
(:mod:`omuscd.migrate.criu`); a job marked ``--restartable`` can also be moved by killing it
and running it again from the start (:data:`RESTART`), which needs no mechanism at all.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

RESTART = "restart"


class MoveError(Exception):
    """Dump, restore or the stream between them failed; the message says why (from
    CRIU's log when it can)."""


@dataclass
class Inherit:
    """A file the restored job had open at ``path`` on the source: open ``fd`` here."""

    path: str
    fd: int


class Mover(Protocol):
    name: str

    @property
    def available(self) -> bool: ...

    def describe(self) -> str:
        """``criu 4.1.1``, or why migration is off on this node."""
        ...

    def close(self) -> None:
        """Undo what starting the mechanism set up on this machine (the daemon stops)."""
        ...

    def cannot_move(self, init_pid: int) -> str | None:
        """Why this job cannot be moved (checked before freezing), or None."""
        ...

    def reasons(self, init_pids: list[int]) -> dict[int, str | None]:
        """:meth:`cannot_move` for several jobs at once (what they share read once)."""
        ...

    async def relock(self, init_pid: int) -> None:
        """A move failed after the dump: give the frozen job back what the dump lent
        (its file locks) before it resumes."""
        ...

    def cannot_adopt(self, pid: int) -> str | None:
        """Why a process that is not a cluster job cannot be taken over and moved (its
        session, its terminal, what :meth:`cannot_move` finds), or None."""
        ...

    @property
    def streams(self) -> bool:
        """Whether a dump can send its memory to the target as it goes."""
        ...

    async def prepare_dump(self, init_pid: int, images: Path,
                           pages: int | None = None) -> Any:
        """Before the freeze: start what will dump the job (holding ``pages``); given to
        :meth:`dump`, and closed (``await worker.close()``) if it was not."""
        ...

    async def dump(self, init_pid: int, images: Path, pages: int | None = None,
                   worker: Any = None, running: bool = False) -> None:
        """Freeze the job and write its images (its memory to the connected socket
        ``pages`` if given, a page server at the other end); leave it stopped, not
        killed.  ``worker``: from :meth:`prepare_dump`; ``running``: leave it running
        (a checkpoint)."""
        ...

    async def page_server(self, images: Path, pages: int) -> Any:
        """On the target: receive one dump's memory from the connected socket ``pages``
        into ``images``; returns once ready."""
        ...

    def keep_log(self, logfile: Path, what: str) -> str:
        """Keep the log of a failed step for the admin; returns a note saying where."""
        ...

    async def page_server_done(self, proc: Any, images: Path) -> int:
        """Wait until the page server has everything; returns the bytes it received."""
        ...

    @property
    def lazy(self) -> bool:
        """Whether a restore can leave the job's memory to come later (post-copy)."""
        ...

    async def lazy_pages(self, images: Path, pages: int) -> Any:
        """On the target: start what fills a lazily restored job's memory on demand from
        a page server (omuscd.migrate.lazy) at the other end of the connected socket
        ``pages``; returns once ready; the process ends when the job has every page."""
        ...

    async def start_lazy_pages(self, images: Path, pages: int) -> Any:
        """:meth:`lazy_pages` started without waiting (what it reads first may come later,
        through a gate: see omuscd.migrate.gate): the result's ``ready()`` returns the
        process once it is ready, ``abandon()`` kills it."""
        ...

    async def prepare_restore(self, images: Path, fds: tuple[int, ...]) -> Any:
        """Before the images are all there: start what will restore them, holding
        ``fds`` (those :meth:`restore` is to hand the job); closed as prepare_dump's."""
        ...

    async def restore(self, images: Path, inherit: list[Inherit], pidfile: Path,
                      lazy: bool = False, worker: Any = None,
                      rooted: Callable[[int], Awaitable[None]] | None = None) -> int:
        """Restore the job stopped, as a child of this daemon; return its init's pid.
        ``lazy``: the memory that can come later is left to :meth:`lazy_pages`;
        ``worker``: from :meth:`prepare_restore`; ``rooted(pid)``: told the init's pid
        as soon as it exists, before anything of the job is restored."""
        ...
