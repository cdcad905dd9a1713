"""The daemon: one trio run, one nursery, one owner of the node's state.

Tasks: the UDP receivers (unicast and broadcast), the timer loop (gossip rounds, load
samples and membership timeouts, sleeping exactly until the next one is due, so an idle
daemon wakes only for those), the control servers and the signal handler.  SIGTERM or
SIGINT announces our departure and cancels the nursery; SIGHUP rereads the config file.
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
from omuscd.balancer import Balancer
from omuscd.cluster.gossip import Gossip
from omuscd.cluster.membership import Membership, Timing
from omuscd.cluster.rounds import Rounds
from omuscd.config import TUNABLES, Config, ConfigError, format_cpu_list, read_toml
from omuscd.control import ControlServer
from omuscd.events import Event, EventBus
from omuscd.jobctl import JobControl
from omuscd.load import Sampler
from omuscd.migrate.criu import Criu, find_criu
from omuscd.version import PROTOCOL_VERSION, RELEASE, VERSION_STRING, __version__

log = logging.getLogger("omuscd")



class Daemon:
    """State and I/O of one node.  Handlers in :mod:`omuscd.commands` read it through the
    methods below; only these methods change it."""

    def __init__(self, cfg: Config, key: bytes | None, security: str,
                 control_secret: bytes | None = None):
        self.cfg = cfg
        self.security = security  # "key", "read-only" or "insecure"
        self.boot = random.getrandbits(63) or 1
        self.inc = time.time_ns() // 1000
        self.protocol = cfg.wire_version if cfg.wire_version is not None else PROTOCOL_VERSION
        self.codec = wire.Codec(key, cfg.node_id, self.boot, self.inc, self.protocol,
                                cfg.max_clock_skew)
        self.sampler = Sampler(cfg.cpus, self._job_inits)
        members = Membership(self._initial_entry(), self._timing(),
                             id_explicit=cfg.node_id_explicit)
        self.gossip = Gossip(cfg, self.codec, members, security)
        self.rounds = Rounds(cfg, self.gossip, self.sampler, self._figures,
                             lambda: self.balancer.poke())
        self.bus = EventBus()
        self.control = ControlServer(self, control_secret)
        # The cluster channel: keyed, or trusting under --insecure; a read-only node
        # (no key) opens none and runs no guest jobs.
        self.channel_key = key if key is not None else (
            channel.INSECURE_KEY if security == "insecure" else None)
        self.mover = Criu(find_criu(cfg.criu), Path(cfg.state_dir))
        self.jobs = JobControl(self)
        self.balancer = Balancer(self)
        g = self.gossip
        g.on_events = self.publish
        g.on_change = self.rounds.wake
        g.on_load_jump = self.balancer.poke
        g.on_id_clash = self._id_clash
        g.handlers[wire.REQUEST] = self.balancer.on_request
        g.handlers[wire.OFFER] = lambda body, src, sender: self.balancer.on_offer(body, sender)
        self.started_wall = time.time()
        self.shutdown_reason: str | None = None
        self._shutdown = trio.Event()
        # jobs that moved in and out of this node since it started, gossiped: a node that
        # moved a job here or away knows when this node's figures show that move
        self.moves = [0, 0]
        self.exit_code = exitcodes.OK
        self.on_ready: Callable[[], None] | None = None
        self.hangup_stops = False  # under --tui, SIGHUP means the terminal is gone

    # ------------------------------------------------------------------ identity
    def _initial_entry(self) -> dict[str, Any]:
        c = self.cfg
        s = self.sampler.last
        return {"id": c.node_id, "boot": self.boot, "inc": self.inc, "hb": 0,
                "name": c.node_name[:64], "addr": c.address, "port": c.port,
                "role": c.topology, "rel": RELEASE, "st": "up", "cpus": len(c.cpus),
                "speed": int(c.cpu_speed_mhz), "mem": s.mem_free_mb, "load": s.load,
                "util": s.util, "runq": s.runq, "jobs": 0, "flags": [], "moves": [0, 0]}

    def _timing(self) -> Timing:
        c = self.cfg
        return Timing(c.suspect_timeout, c.dead_timeout, c.forget_after)

    def _figures(self) -> dict[str, Any]:
        """What this node gossips beside its load: its role, jobs and moves."""
        return {"role": self.cfg.topology, "jobs": self.jobs.counts(),
                "moves": list(self.moves)}

    @property
    def members(self) -> Membership:
        return self.gossip.members

    @property
    def counters(self) -> dict[str, int]:
        return self.gossip.counters

    @property
    def auth_label(self) -> str:
        return self.gossip.auth_label

    @property
    def started(self) -> float:
        return self.rounds.started

    @property
    def name(self) -> str:
        return str(self.members.me["name"])

    @property
    def node_id(self) -> int:
        return self.members.my_id

    def publish(self, events: list[Event]) -> None:
        for ev in events:
            log.info("%s", ev.text)
            self.bus.publish(ev)
        if events:
            self.jobs.on_events(events)

    def send_message(self, mtype: int, body: dict[str, Any], dest: tuple[str, int]) -> None:
        self.gossip.send_message(mtype, body, dest)

    def _id_clash(self, text: str) -> None:
        self.exit_code = exitcodes.ID_CLASH
        self.request_shutdown("node id clash")

    def _job_inits(self) -> set[int]:
        """The init of each job running here: a helper of ours, not load."""
        return {j.pid for j in self.jobs.all_jobs() if j.pid is not None and j.node == self.node_id}

    def jobs_changed(self) -> None:
        """A job started, ended, arrived or left here: see Rounds.jobs_changed."""
        self.rounds.jobs_changed()

    # ------------------------------------------------------------------ lifetime
    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> int:
        """Run until shutdown; returns the exit code."""
        self.rounds.started = trio.current_time()
        self.gossip.open_sockets()
        self.jobs.migrations.clean_images()
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
                nursery.start_soon(self.balancer.run)
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
            self.set_tunables(changed)  # all or nothing
            for name, value in values.items():
                if name not in TUNABLES and self.cfg.values.get(name) != value:
                    log.warning("SIGHUP: %s changed in %s; it takes effect at restart",
                                name, path)
        except ConfigError as e:
            log.error("SIGHUP: %s; configuration left as it was", e)
        sd_notify("READY=1")

    # ------------------------------------------------------------------ for commands
    def version_info(self) -> dict[str, Any]:
        return {"version": VERSION_STRING, "release": RELEASE, "protocol": self.protocol,
                "package": __version__}

    def set_tunable(self, name: str, value: Any) -> Any:
        return self.set_tunables({name: value})[name]

    def set_tunables(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Change tunables together; ConfigError (and nothing changed) if any is bad."""
        values = self.cfg.set_many(changes)
        self.members.timing = self._timing()
        self.codec.max_skew = self.cfg.max_clock_skew
        self.publish([Event("config", f"{name} set to {v}", {"key": name, "value": v})
                      for name, v in values.items()])
        if values:
            self.rounds.wake()
        return values

    def set_topology(self, role: str) -> str:
        self.cfg.values["topology"] = role
        self.members.set_role(role)
        self.publish([Event("config", f"topology set to {role}", {"key": "topology",
                                                                  "value": role})])
        return f"topology {role}"

    def tunables(self) -> dict[str, Any]:
        return {name: self.cfg.values[name] for name in TUNABLES}

    def set_log_level(self, level: str) -> None:
        logging.getLogger("omuscd").setLevel(level.upper())
        log.info("log level set to %s", level)

    def node_views(self) -> list[dict[str, Any]]:
        now = trio.current_time()
        me = {**self.members.own_entry()}
        mine = {"id": me["id"], "name": me["name"], "address": me["addr"], "port": me["port"],
                "role": me["role"], "state": "alive", "load": round(float(me["load"]), 2),
                "util": round(float(me["util"]), 1), "runq": me["runq"], "cpus": me["cpus"],
                "speed": me["speed"], "mem_free_mb": me["mem"], "jobs": self.jobs.counts(),
                "release": me["rel"], "flags": sorted(self.members.me["flags"]),
                "auth": self.auth_label, "moved_in": self.moves[0],
                "moved_out": self.moves[1], "last_heard": 0.0, "state_since":
                round(now - self.started, 1), "self": True}
        others = sorted(self.members.nodes.values(), key=lambda n: n.id)
        inc = sorted(self.members.incompatible.values(), key=lambda n: n.id)
        return [mine] + [n.view(now) for n in others] + [n.view(now) for n in inc]

    def node_view(self, key: str) -> dict[str, Any] | None:
        if key in (str(self.node_id), self.name):
            return self.node_views()[0]
        node = self.members.find(key)
        if node is None:
            node = next((n for n in self.members.incompatible.values()
                         if str(n.id) == key or n.name == key), None)
        return node.view(trio.current_time()) if node else None

    def status(self) -> dict[str, Any]:
        c = self.cfg
        s = self.sampler.last
        return {
            "version": VERSION_STRING, "protocol": self.protocol, "node": self.name,
            "id": self.node_id, "id_source": c.detected.get("node_id", "given"),
            "interface": c.interface, "interface_source": c.detected.get("interface", "given"),
            "address": c.address, "broadcast": c.broadcast, "port": c.port,
            "peers": [f"{h}:{p}" for h, p in c.peers],
            "control": f"{c.control_bind}:{c.control_port}",
            "control_socket": c.control_socket, "topology": c.topology,
            "cpus": format_cpu_list(c.cpus), "cpu_count": c.cpu_count,
            "migration": self.mover.describe(),
            "speed_mhz": int(c.cpu_speed_mhz), "security": self.security,
            "key_file": c.key_file if self.security == "key" else None,
            "load": s.load, "util": s.util, "runq": s.runq, "mem_free_mb": s.mem_free_mb,
            "nodes": self.members.counts(), "packets": dict(self.counters),
            "uptime": round(time.time() - self.started_wall, 1),
            "watchers": self.bus.subscribers,
            "watchers_dropped": self.bus.dropped_subscribers,
            "control_sessions": self.control.sessions,
            "log_level": logging.getLevelName(logging.getLogger("omuscd").getEffectiveLevel())
            .lower(), "config_file": c.config_file, "state_dir": c.state_dir,
            "pid": os.getpid(),
        }

    def status_lines(self, st: dict[str, Any]) -> list[str]:
        c = self.cfg
        sec = {
            "key": f"key {c.key_file} (HMAC-SHA256): authenticated cluster",
            "read-only": "read-only: no cluster key, so this node shows the cluster but "
                         "exchanges no processes; fix: 'omuscd keygen /etc/omuscd.key', "
                         "copy it to every node, restart (or --insecure on a trusted LAN)",
            "insecure": "insecure: no key, every packet trusted (--insecure)",
        }[self.security]
        counts = ", ".join(f"{n} {k}" for k, n in st["nodes"].items())
        p = st["packets"]
        drops = ", ".join(f"{r} {p[r]}" for r in wire.DROP_REASONS)
        return [
            f"node: {st['node']} (id {st['id']}, {st['id_source']})",
            f"version: {st['version']} (wire protocol {st['protocol']})",
            f"interface: {c.interface} ({st['interface_source']}), address {c.address}, "
            f"broadcast {c.broadcast or 'off'}",
            f"ports: cluster {c.port}/udp{'+tcp' if self.channel_key else ''}, "
            f"control {st['control']}, "
            f"socket {c.control_socket}",
            f"peers: {' '.join(st['peers']) or 'none (broadcast discovery only)'}",
            f"topology: {c.topology}",
            f"migration: {self.mover.describe()}",
            f"cpus: {st['cpus']} lent of {c.cpu_count}, {st['speed_mhz']} MHz"
            f" ({c.detected.get('cpus', 'given')})",
            f"security: {sec}",
            f"load: {st['load']:.2f} (util {st['util']:.1f}%, runq {st['runq']}), "
            f"memory free {st['mem_free_mb']} MB",
            f"cluster: {counts} (besides this node)",
            f"packets: in {p['in']}, out {p['out']}, send errors {p['send-errors']}",
            f"dropped: {drops}",
            f"uptime: {st['uptime']:.0f}s, pid {st['pid']}, watchers {st['watchers']} "
            f"({st['watchers_dropped']} dropped for falling behind), "
            f"control sessions {st['control_sessions']}, log level {st['log_level']}",
            f"files: config {st['config_file'] or 'none'}, state {st['state_dir']}",
        ]

    def log_start(self) -> None:
        c = self.cfg
        log.info("%s starting as node %s (id %d, %s)", VERSION_STRING, c.node_name,
                 c.node_id, c.detected.get("node_id", "given"))
        for line in self.status_lines(self.status())[2:9]:
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
