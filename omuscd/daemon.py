"""The daemon: wiring only.  It builds the layers, owns the one nursery and passes it in,
handles signals and tells systemd how it is.

Layers, dependencies pointing down (see the README's design notes):
cluster/ (gossip, rounds, settings) -> jobs and migrations -> balance/ -> control/.
Each layer hears of the ones below through hooks or protocols they declare; this module
connects them.  Tasks in the nursery: the UDP receivers, the timer loop (cluster.rounds),
the cluster channel server, the control servers, the balancer, the signal handler, and
what the job layer starts.  SIGTERM or SIGINT announces our departure and cancels the
nursery; SIGHUP rereads the config file.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from omuscd import channel, exitcodes, wire
from omuscd.balance.balancer import Balancer
from omuscd.balance.core import Services as BalanceServices
from omuscd.cluster.gossip import Gossip
from omuscd.cluster.membership import Membership
from omuscd.cluster.rounds import Rounds
from omuscd.cluster.settings import Settings, timing_of
from omuscd.cluster.view import ClusterView
from omuscd.config import TUNABLES, Config, ConfigError, read_toml
from omuscd.control.server import ControlServer
from omuscd.control.services import Services as ControlServices
from omuscd.control.status import Status
from omuscd.events import Event, EventBus
from omuscd.jobs.node import JobControl
from omuscd.load import Sampler
from omuscd.migrate.books import ARRIVED, GIVEN_UP, LEFT
from omuscd.migrate.criu import Criu, find_criu
from omuscd.migrate.node import Migrations
from omuscd.version import PROTOCOL_VERSION, RELEASE, VERSION_STRING

log = logging.getLogger("omuscd")


class Daemon:
    """One node, wired.  The job and migration layers still receive it and read the
    members below (cfg, name, node_id, members, counters, boot, protocol, security,
    channel_key, mover, sampler, moves, balancer, publish, jobs_changed) until they take
    services of their own; nothing else may."""

    def __init__(self, cfg: Config, key: bytes | None, security: str,
                 control_secret: bytes | None = None):
        self.cfg = cfg
        self.security = security  # "key", "read-only" or "insecure"
        self.boot = random.getrandbits(63) or 1
        self.inc = time.time_ns() // 1000
        self.protocol = cfg.wire_version if cfg.wire_version is not None else PROTOCOL_VERSION
        self.codec = wire.Codec(key, cfg.node_id, self.boot, self.inc, self.protocol,
                                cfg.max_clock_skew)
        self.bus = EventBus()
        # The cluster channel: keyed, or trusting under --insecure; a read-only node
        # (no key) opens none and runs no guest jobs.
        self.channel_key = key if key is not None else (
            channel.INSECURE_KEY if security == "insecure" else None)
        # jobs that moved in and out of this node since it started, gossiped: a node that
        # moved a job here or away knows when this node's figures show that move
        self.moves = [0, 0]
        self.shutdown_reason: str | None = None
        self._shutdown = trio.Event()
        self.exit_code = exitcodes.OK
        self.on_ready: Callable[[], None] | None = None
        self.hangup_stops = False  # under --tui, SIGHUP means the terminal is gone
        self._build_cluster()
        self.mover = Criu(find_criu(cfg.criu), Path(cfg.state_dir))
        self.view = ClusterView(self.members, self.mover)
        self.jobs = JobControl(self)
        self.migrations = Migrations(self.jobs, self)
        self.jobs.moves = self.migrations
        self.migrations.listen(self._on_move)
        self._build_balancer()
        self._build_control(control_secret)

    # ------------------------------------------------------------------ wiring
    def _build_cluster(self) -> None:
        cfg = self.cfg
        self.sampler = Sampler(cfg.cpus, self._job_inits)
        members = Membership(self._initial_entry(), timing_of(cfg),
                             id_explicit=cfg.node_id_explicit)
        self.gossip = Gossip(cfg, self.codec, members, self.security)
        self.rounds = Rounds(cfg, self.gossip, self.sampler, self._figures,
                             lambda: self.balancer.poke())
        self.settings = Settings(cfg, self.gossip, self.rounds)
        self.gossip.on_events = self.publish
        self.gossip.on_change = self.rounds.retime
        self.gossip.on_id_clash = self._id_clash

    def _build_balancer(self) -> None:
        self.balancer = Balancer(BalanceServices(
            self.cfg, self.members, self.sampler, self.jobs, lambda: self.mover.available,
            self.view, self.publish, self.gossip.send_message))
        g = self.gossip
        g.on_load_jump = self.balancer.poke
        g.handlers[wire.REQUEST] = self.balancer.on_request
        g.handlers[wire.OFFER] = self.balancer.on_offer

    def _build_control(self, secret: bytes | None) -> None:
        self.status = Status(
            self.cfg, self.security, self.protocol, self.gossip, self.sampler, self.bus,
            self.moves, self.channel_key is not None, lambda: self.mover.describe(),
            lambda: self.jobs.counts(), lambda: self.control.sessions,
            lambda: self.rounds.started)
        self.control = ControlServer(ControlServices(
            self.cfg, self.jobs, self.status, self.settings, self.bus, self.request_shutdown),
            secret)

    def _initial_entry(self) -> dict[str, Any]:
        c = self.cfg
        s = self.sampler.last
        return {"id": c.node_id, "boot": self.boot, "inc": self.inc, "hb": 0,
                "name": c.node_name[:64], "addr": c.address, "port": c.port,
                "role": c.topology, "rel": RELEASE, "st": "up", "cpus": len(c.cpus),
                "speed": int(c.cpu_speed_mhz), "mem": s.mem_free_mb, "load": s.load,
                "util": s.util, "runq": s.runq, "jobs": 0, "flags": [], "moves": [0, 0]}

    def _figures(self) -> dict[str, Any]:
        """What this node gossips beside its load: its role, jobs and moves."""
        return {"role": self.cfg.topology, "jobs": self.jobs.counts(),
                "moves": list(self.moves)}

    def _job_inits(self) -> set[int]:
        """The init of each job running here: a helper of ours, not load."""
        return {j.pid for j in self.jobs.all_jobs() if j.pid is not None and j.node == self.node_id}

    def _id_clash(self, text: str) -> None:
        self.exit_code = exitcodes.ID_CLASH
        self.request_shutdown("node id clash")

    # ------------------------------------------------------------------ for the lower layers
    @property
    def members(self) -> Membership:
        return self.gossip.members

    @property
    def counters(self) -> dict[str, int]:
        return self.gossip.counters

    @property
    def name(self) -> str:
        return str(self.members.me["name"])

    @property
    def node_id(self) -> int:
        return self.members.my_id

    def publish(self, events: list[Event]) -> None:
        """Every event of every layer: logged, to the watchers, and to the job layer."""
        for ev in events:
            log.info("%s", ev.text)
            self.bus.publish(ev)
        if events:
            self.jobs.on_events(events)

    def _on_move(self, what: str) -> None:
        """A move in or out of this node: counted (gossiped with the load), and the room
        the balancer held for an incoming one is taken, or free again."""
        if what == ARRIVED:
            self.moves[0] += 1
        elif what == LEFT:
            self.moves[1] += 1
        if what in (ARRIVED, GIVEN_UP):
            self.balancer.release_hold()

    def jobs_changed(self) -> None:
        """A job started, ended, arrived or left here: see Rounds.jobs_changed."""
        self.rounds.jobs_changed()

    def set_tunable(self, name: str, value: Any) -> Any:
        return self.settings.set_tunable(name, value)

    def tunables(self) -> dict[str, Any]:
        return self.settings.tunables()

    # ------------------------------------------------------------------ lifetime
    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> int:
        """Run until shutdown; returns the exit code."""
        self.rounds.started = trio.current_time()
        self.gossip.open_sockets()
        self.migrations.clean_images()
        await self.mover.check()
        try:
            if self.mover.available:
                self.members.set_flag("criu", True)
            c = self.cfg
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._signals)
                assert self.gossip.sock is not None
                nursery.start_soon(self.gossip.receive, self.gossip.sock)
                if self.gossip.bsock is not None:
                    nursery.start_soon(self.gossip.receive, self.gossip.bsock)
                self.jobs.nursery = nursery
                self.jobs.recover()
                nursery.start_soon(self.migrations.run_leases)
                if self.channel_key is not None:
                    try:
                        listeners = await trio.open_tcp_listeners(c.port, host=c.address)
                    except OSError as e:
                        raise OSError(f"cannot bind TCP {c.address}:{c.port} for the cluster "
                                      f"channel: {e.strerror}") from None
                    await nursery.start(trio.serve_listeners, self.jobs.serve, listeners)
                await nursery.start(self.control.serve_tcp, c.control_bind, c.control_port)
                await nursery.start(self.control.serve_unix, c.control_socket)
                self.log_start()
                nursery.start_soon(self.rounds.run)
                nursery.start_soon(self.balancer.run, nursery)
                sd_notify("READY=1")
                if self.on_ready is not None:
                    self.on_ready()
                task_status.started()
                await self._shutdown.wait()
                sd_notify("STOPPING=1")
                self.gossip.depart()
                nursery.cancel_scope.cancel()
            self.gossip.close()
        finally:
            self.mover.close()  # however the daemon ends
        log.info("stopped (%s)", self.shutdown_reason)
        return self.exit_code

    def request_shutdown(self, reason: str) -> None:
        if self.shutdown_reason is None:
            self.shutdown_reason = reason
            log.info("shutting down: %s", reason)
        self._shutdown.set()

    async def _signals(self) -> None:
        import signal

        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            async for signum in sigs:
                if signum == signal.SIGHUP and self.hangup_stops:
                    self.request_shutdown("hangup: the console's terminal went away")
                elif signum == signal.SIGHUP:
                    self.reload()
                else:
                    self.request_shutdown(f"signal {signal.Signals(signum).name}")

    def reload(self) -> None:
        """SIGHUP: reread the config file and apply its tunables; the rest needs a
        restart, which is said rather than done half-way."""
        path = self.cfg.config_file
        if path is None:
            log.info("SIGHUP: no config file to reread")
            return
        sd_notify("RELOADING=1")
        try:
            values = read_toml(path)
            changed = {name: value for name, value in values.items()
                       if name in TUNABLES and self.cfg.values.get(name) != value}
            self.settings.set_tunables(changed)  # all or nothing
            for name, value in values.items():
                if name not in TUNABLES and self.cfg.values.get(name) != value:
                    log.warning("SIGHUP: %s changed in %s; it takes effect at restart",
                                name, path)
        except ConfigError as e:
            log.error("SIGHUP: %s; configuration left as it was", e)
        sd_notify("READY=1")

    def log_start(self) -> None:
        c = self.cfg
        log.info("%s starting as node %s (id %d, %s)", VERSION_STRING, c.node_name,
                 c.node_id, c.detected.get("node_id", "given"))
        for line in self.status.status_lines(self.status.status())[2:9]:
            log.info("%s", line)
        if self.security == "read-only":
            log.warning("no cluster key (%s): read-only, no processes will be exchanged; "
                        "create one with 'omuscd keygen %s' and copy it to every node, "
                        "or pass --insecure on a trusted LAN", c.key_file, c.key_file)



def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) how we are, if it asked: a datagram to NOTIFY_SOCKET."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(state.encode(), path)
    except OSError as e:
        log.debug("sd_notify: %s", e)
