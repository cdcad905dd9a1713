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
from omuscd.cluster.membership import IdClash, Membership, Timing
from omuscd.config import TUNABLES, Config, ConfigError, format_cpu_list, read_toml
from omuscd.control import ControlServer
from omuscd.events import Event, EventBus
from omuscd.jobctl import JobControl
from omuscd.load import Sampler
from omuscd.migrate.criu import Criu, find_criu
from omuscd.version import PROTOCOL_VERSION, RELEASE, VERSION_STRING, __version__

log = logging.getLogger("omuscd")

STARTUP_BURST = 2.0  # seconds during which a new node announces every gossip round
SYNC_REPLIERS = 4  # expected number of nodes answering a broadcast HELLO with the table
LOAD_SETTLE = 0.25  # seconds after jobs came or went before the load is sampled again


class Daemon:
    """State and I/O of one node.  Handlers in :mod:`omuscd.commands` read it through the
    methods below; only these methods change it."""

    def __init__(self, cfg: Config, key: bytes | None, security: str,
                 control_secret: bytes | None = None):
        self.cfg = cfg
        self.security = security  # "key", "read-only" or "insecure"
        self.auth_label = {"key": "key", "insecure": "insecure"}.get(security, "unverified")
        self.boot = random.getrandbits(63) or 1
        self.inc = time.time_ns() // 1000
        self.protocol = cfg.wire_version if cfg.wire_version is not None else PROTOCOL_VERSION
        self.codec = wire.Codec(key, cfg.node_id, self.boot, self.inc, self.protocol,
                                cfg.max_clock_skew)
        self.sampler = Sampler(cfg.cpus, self._job_inits)
        self.members = Membership(self._initial_entry(), self._timing(),
                                  id_explicit=cfg.node_id_explicit)
        self.bus = EventBus()
        self.control = ControlServer(self, control_secret)
        # The cluster channel: keyed, or trusting under --insecure; a read-only node
        # (no key) opens none and runs no guest jobs.
        self.channel_key = key if key is not None else (
            channel.INSECURE_KEY if security == "insecure" else None)
        self.mover = Criu(find_criu(cfg.criu), Path(cfg.state_dir))
        self.jobs = JobControl(self)
        self.balancer = Balancer(self)
        self.counters: dict[str, int] = {"in": 0, "out": 0, "send-errors": 0,
                                         "channel-refused": 0,
                                         **{r: 0 for r in wire.DROP_REASONS}}
        self.started_wall = time.time()
        self.started = 0.0
        self.raw: socket.socket | None = None
        self.sock: trio.socket.SocketType | None = None
        self.bsock: trio.socket.SocketType | None = None
        self.shutdown_reason: str | None = None
        self._shutdown = trio.Event()
        self._retime = None  # set to a trio.Event by the timer loop: wake it up early
        # jobs that moved in and out of this node since it started, gossiped: a node that
        # moved a job here or away knows when this node's figures show that move
        self.moves = [0, 0]
        self.sample_due: float | None = None  # an extra load sample, after jobs changed
        self.gossip_due = False  # jobs changed: gossip the figure of Sampler.at_once now
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

    # ------------------------------------------------------------------ sockets
    def open_sockets(self) -> None:
        """Bind the cluster UDP sockets.  We keep the stdlib socket for sending, which is
        synchronous and non-blocking (a full buffer drops the datagram, as a busy LAN
        would), and hand trio a wrapper of the same socket for receiving."""
        c = self.cfg
        self.raw = _udp_socket((c.address, c.port), "", reuse=False)
        self.sock = trio.socket.from_stdlib_socket(self.raw)
        if c.broadcast:
            # A socket bound to a unicast address never sees broadcasts: a second one,
            # bound to the broadcast address, receives them.
            self.bsock = trio.socket.from_stdlib_socket(
                _udp_socket((c.broadcast, c.port), " for broadcast discovery "
                            "(use --broadcast off)", reuse=True))

    def _send(self, data: bytes, dest: tuple[str, int]) -> None:
        assert self.raw is not None
        try:
            self.raw.sendto(data, dest)  # non-blocking; a full buffer drops, like the LAN
            self.counters["out"] += 1
        except (BlockingIOError, OSError) as e:
            self.counters["send-errors"] += 1
            log.debug("send to %s:%d failed: %s", dest[0], dest[1], e)

    def _send_entries(self, mtype: int, entries: list[dict[str, Any]],
                      dest: tuple[str, int], **extra: Any) -> None:
        for data in wire.pack_entries(self.codec, mtype, entries, time.time(), extra):
            self._send(data, dest)

    def send_message(self, mtype: int, body: dict[str, Any], dest: tuple[str, int]) -> None:
        self._send(self.codec.encode(mtype, body, time.time()), dest)


    # ------------------------------------------------------------------ receiving
    async def _receive(self, sock: trio.socket.SocketType) -> None:
        while True:
            try:
                data, src = await sock.recvfrom(65535)
            except OSError as e:  # ICMP errors surface here on Linux; keep going
                log.debug("receive: %s", e)
                continue
            self.handle_datagram(data, src[:2])

    def handle_datagram(self, data: bytes, src: tuple[str, int]) -> None:
        """Decode, authenticate and apply one datagram.  Anything wrong drops it and is
        counted; nothing a peer sends can raise out of here."""
        now = trio.current_time()
        try:
            pkt = self.codec.decode(data, time.time())
        except wire.Incompatible as e:
            self.counters["incompatible"] += 1
            if (e.header.node_id, e.header.boot) != (self.node_id, self.boot):
                self.publish(self.members.note_incompatible(
                    src, e.header.node_id, e.header.version, e.body, now, self.auth_label))
                self._answer()
            return
        except wire.WireError as e:
            self.counters[e.reason] += 1
            log.debug("dropped datagram from %s:%d: %s", src[0], src[1], e)
            return
        hdr = pkt.header
        if hdr.node_id == self.codec.node_id and hdr.boot == self.boot:
            return  # our own broadcast, looped back
        self.counters["in"] += 1
        try:
            events = self._apply(pkt, src, now)
        except wire.WireError as e:
            self.counters[e.reason] += 1
            log.debug("dropped datagram from %s:%d: %s", src[0], src[1], e)
            return
        except IdClash as e:
            log.error("%s", e)
            self.exit_code = exitcodes.ID_CLASH
            self.request_shutdown("node id clash")
            return
        self.publish(events)
        self._answer()
        if self.members.my_id != self.codec.node_id:
            self._moved_id()
        if events and self._retime is not None:
            self._retime.set()

    def _apply(self, pkt: wire.Packet, src: tuple[str, int], now: float) -> list[Event]:
        hdr, body = pkt.header, pkt.body
        auth = self.auth_label
        if hdr.mtype in (wire.REQUEST, wire.OFFER):
            if self.security == "read-only" or hdr.node_id not in self.members.nodes:
                return []  # balancing only between authenticated, known peers
            if hdr.mtype == wire.REQUEST:
                self.balancer.on_request(body, src, hdr.node_id)
            else:
                self.balancer.on_offer(body, hdr.node_id)
            return []
        if hdr.mtype in (wire.HELLO, wire.LEAVE):
            entry = wire.check_entry(body.get("entry"))
            if entry["id"] != hdr.node_id or entry["boot"] != hdr.boot:
                raise wire.WireError("malformed", "entry does not match the header")
            if hdr.mtype == wire.LEAVE:
                return self.members.merge({**entry, "st": "left"}, now, auth, src)
            new = self.members.is_new_or_back(entry["id"], entry["boot"])
            events = self.members.merge(entry, now, auth, src)
            live = max(1, len(self.members.live_nodes()))
            if body.get("reply") is True or (new and random.random() < SYNC_REPLIERS / live):
                self._send_entries(wire.SYNC, self.members.sync_entries(now), src)
            return events
        events = []
        for entry in wire.check_entries(body):
            mine = entry["id"] == hdr.node_id and entry["boot"] == hdr.boot
            node = self.members.nodes.get(entry["id"])
            before = float(node.entry["load"]) if node is not None else None
            events += self.members.merge(entry, now, auth, src if mine else None)
            node = self.members.nodes.get(entry["id"])
            if before is not None and node is not None and \
                    abs(float(node.entry["load"]) - before) >= self.cfg.balance_threshold:
                self.balancer.poke()  # a node's load jumped: look now, not next interval
        return events

    def _answer(self) -> None:
        """Send our own entry to whoever membership says must hear it directly."""
        while self.members.to_answer:
            dest = self.members.to_answer.pop()
            self.send_message(wire.HELLO, {"entry": self.members.own_entry(), "reply": False},
                           dest)

    def _moved_id(self) -> None:
        """After an id clash moved us: tell everyone the old identity is gone."""
        old_id = self.codec.node_id
        old = {**self.members.own_entry(), "id": old_id, "st": "left"}
        targets = {n.address for n in self.members.live_nodes()} | set(self.cfg.peers)
        if self.cfg.broadcast:
            targets.add((self.cfg.broadcast, self.cfg.port))
        for dest in targets:
            self.send_message(wire.LEAVE, {"entry": old}, dest)
        self.codec.node_id = self.members.my_id

    def _job_inits(self) -> set[int]:
        """The init of each job running here: a helper of ours, not load."""
        return {j.pid for j in self.jobs.all_jobs() if j.pid is not None and j.node == self.node_id}

    def jobs_changed(self) -> None:
        """A job started, ended, arrived or left here: gossip the load at once, as the
        tasks runnable now (Sampler.at_once), and sample it again once the change shows
        in the CPU figures (LOAD_SETTLE), rather than up to a load interval later.
        Balancing reacts within milliseconds to a node that has just gone idle or busy."""
        # the extra sample measures the time after the last change only, and at least
        # LOAD_SETTLE of it (a burst of changes postpones it; regular samples go on)
        self.sampler.new_window()
        # counted here, at the change itself: counted later in the timer loop (once for
        # a burst) the makespan of bench_balance rose from 1.16x to 1.20x, twice
        self.sampler.at_once()  # told at once; the settled sample follows
        self.gossip_due = True
        self.sample_due = trio.current_time() + LOAD_SETTLE
        if self._retime is not None:
            self._retime.set()

    # ------------------------------------------------------------------ the timer loop
    async def _timer_loop(self) -> None:
        """Gossip rounds, load samples and membership timeouts, in one task that sleeps
        exactly until the next of them is due."""
        next_round = next_sample = next_announce = trio.current_time()
        while True:
            now = trio.current_time()
            if self.sample_due is not None and now >= self.sample_due:
                # jobs came or went here: measure, tell the others, and look now
                self.sample_due = None
                self.sampler.sample()
                next_sample = now + self.cfg.load_interval
                next_round = now
                self.balancer.poke()
            if self.gossip_due:  # jobs came or went: the figure at once, and look now
                self.gossip_due = False
                next_round = now
                self.balancer.poke()
            if now >= next_sample:
                self.sampler.sample()
                next_sample = now + self.cfg.load_interval
            if now >= next_round:
                self._gossip_round(now, now >= next_announce)
                if now >= next_announce:
                    burst = now - self.started < STARTUP_BURST
                    next_announce = now + (self.cfg.gossip_interval if burst
                                           else self.cfg.announce_interval)
                next_round = max(next_round + self.cfg.gossip_interval, now)
            events, deadline = self.members.sweep(now)
            self.publish(events)
            self._retime = trio.Event()
            due = self.sample_due if self.sample_due is not None else next_sample
            with trio.move_on_at(min(next_round, next_sample, deadline, due)):
                await self._retime.wait()

    def _gossip_round(self, now: float, announce: bool) -> None:
        s = self.sampler.last
        self.members.beat(load=s.load, util=s.util, runq=s.runq, mem=s.mem_free_mb,
                          role=self.cfg.topology, jobs=self.jobs.counts(),
                          moves=list(self.moves))
        target = self.members.gossip_target()
        if target is not None:
            self._send_entries(wire.GOSSIP, self.members.gossip_entries(
                now, self.cfg.gossip_window), target)
        if announce:
            me = self.members.own_entry()
            if self.cfg.broadcast and "quiet" not in self.jobs.flags:
                self.send_message(wire.HELLO, {"entry": me, "reply": False},
                               (self.cfg.broadcast, self.cfg.port))
            known = {n.address for n in self.members.live_nodes()}
            for peer in self.cfg.peers:
                if peer not in known:
                    self.send_message(wire.HELLO, {"entry": me, "reply": True}, peer)
            probe = self.members.probe_target()  # now and then, try a dead node again
            if probe is not None:
                self._send_entries(wire.GOSSIP, self.members.gossip_entries(
                    now, self.cfg.gossip_window), probe)

    # ------------------------------------------------------------------ lifetime
    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> int:
        """Run until shutdown; returns the exit code."""
        self.started = trio.current_time()
        self.open_sockets()
        self.jobs.migrations.clean_images()
        await self.mover.check()
        try:
            if self.mover.available:
                self.members.me["flags"] = sorted({*self.members.me["flags"], "criu"})
            c = self.cfg
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._signals)
                assert self.sock is not None
                nursery.start_soon(self._receive, self.sock)
                if self.bsock is not None:
                    nursery.start_soon(self._receive, self.bsock)
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
                nursery.start_soon(self._timer_loop)
                nursery.start_soon(self.balancer.run)
                sd_notify("READY=1")
                if self.on_ready is not None:
                    self.on_ready()
                task_status.started()
                await self._shutdown.wait()
                sd_notify("STOPPING=1")
                self._depart()
                nursery.cancel_scope.cancel()
            for s in (self.sock, self.bsock):
                if s is not None:
                    s.close()
        finally:
            self.mover.close()  # however the daemon ends
        log.info("stopped (%s)", self.shutdown_reason)
        return self.exit_code

    def request_shutdown(self, reason: str) -> None:
        if self.shutdown_reason is None:
            self.shutdown_reason = reason
            log.info("shutting down: %s", reason)
        self._shutdown.set()

    def _depart(self) -> None:
        """Announce our departure so that others drop us at once instead of timing out."""
        self.members.beat()
        bye = {**self.members.own_entry(), "st": "left"}
        targets = {n.address for n in self.members.live_nodes()} | set(self.cfg.peers)
        if self.cfg.broadcast:
            targets.add((self.cfg.broadcast, self.cfg.port))
        for dest in targets:
            self.send_message(wire.LEAVE, {"entry": bye}, dest)

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
        if values and self._retime is not None:
            self._retime.set()
        return values

    def set_topology(self, role: str) -> str:
        self.cfg.values["topology"] = role
        self.members.me["role"] = role
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
            "channels": dict(sorted(channel.ciphers.items())),
        }

    def status_lines(self, st: dict[str, Any]) -> list[str]:
        c = self.cfg
        sec = {
            "key": f"key {c.key_file} (HMAC-SHA256): authenticated cluster, encrypted "
                   "channel",
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
            f"channels: {channel.describe(st['channels'])}",
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


def _udp_socket(addr: tuple[str, int], hint: str, reuse: bool) -> socket.socket:
    """A non-blocking UDP socket.  Only the broadcast receiver may share its address
    (several nodes on one host listen on one broadcast address); a unicast socket must
    not, or a second daemon on the same address would silently steal half the traffic."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    if reuse:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setblocking(False)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise OSError(f"cannot bind UDP {addr[0]}:{addr[1]}{hint}: {e.strerror}") from None
    return sock


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
