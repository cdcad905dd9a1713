"""What the control language may use of the node: the services handed to every session and
command handler, each typed by a protocol declared here, so that control/ depends on
interfaces and never on the daemon (which builds one :class:`Services` and passes it in).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from omuscd.config import Config
from omuscd.events import EventBus, Progress


class JobsService(Protocol):
    """The job layer as commands and sessions use it (JobControl today; the names are
    the job layer's own)."""

    spool: Any  # the output spool: tail_lines(job_id, stream, n), read(...)

    async def start(self, owner: Any, argv: list[str], cwd: str, env: dict[str, str],
                    placement: Any, stay: bool = ..., restartable: bool = ...,
                    stdin: bool = ..., checkpoint_every: float = ...) -> Any: ...

    async def cluster_jobs(self) -> list[Any]: ...

    def node_name(self, node_id: int) -> str: ...

    def find(self, job_id: str) -> Any: ...

    async def act(self, job_id: str, action: str, uid: int, sig: int = ...,
                  forwarded: bool = ..., to: str = ...,
                  progress: Progress | None = ...) -> str: ...

    async def take_over(self, pid: int, where: str,
                        progress: Progress | None = ...) -> str: ...

    async def set_flag_at(self, node: str | None, flag: str, on: bool) -> str: ...

    async def expel(self, progress: Progress | None = ...) -> list[str]: ...

    async def bring(self, progress: Progress | None = ...) -> list[str]: ...

    async def feed_stdin(self, job: Any, data: bytes) -> None: ...


class StatusService(Protocol):
    """The node's views for ``status``, ``version``, ``nodes`` and ``node``
    (:class:`omuscd.control.status.Status`)."""

    @property
    def name(self) -> str: ...

    @property
    def node_id(self) -> int: ...

    def version_info(self) -> dict[str, Any]: ...

    def status(self) -> dict[str, Any]: ...

    def status_lines(self, st: dict[str, Any]) -> list[str]: ...

    def node_views(self) -> list[dict[str, Any]]: ...

    def node_view(self, key: str) -> dict[str, Any] | None: ...

    def node_counts(self) -> dict[str, int]: ...


class SettingsService(Protocol):
    """Runtime settings: tunables, topology, log level
    (:class:`omuscd.cluster.settings.Settings`)."""

    def set_tunable(self, name: str, value: Any) -> Any: ...

    def tunables(self) -> dict[str, Any]: ...

    def set_topology(self, role: str) -> str: ...

    def set_log_level(self, level: str) -> None: ...


@dataclass
class Services:
    """Everything a control session or command handler may reach."""

    cfg: Config
    jobs: JobsService
    status: StatusService
    settings: SettingsService
    events: EventBus
    shutdown: Callable[[str], None]  # ask the daemon to stop, with the reason
