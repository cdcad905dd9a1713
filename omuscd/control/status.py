"""The node's views for ``status``, ``version``, ``nodes`` and ``node``: one place that
puts the layers' figures into the shapes the control language shows (and the start-up
log repeats).  It reads; it changes nothing.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import trio

from omuscd import channel, wire
from omuscd.cluster.gossip import Gossip
from omuscd.config import Config, format_cpu_list
from omuscd.events import EventBus
from omuscd.load import Sampler
from omuscd.version import RELEASE, VERSION_STRING, __version__


class Status:
    """Views of one node, built from the parts the daemon wires in."""

    def __init__(self, cfg: Config, security: str, protocol: int, gossip: Gossip,
                 sampler: Sampler, events: EventBus, moves: list[int], channel_open: bool,
                 migration: Callable[[], str], jobs_here: Callable[[], int],
                 sessions: Callable[[], int], started: Callable[[], float]):
        self.cfg = cfg
        self.security = security
        self.protocol = protocol
        self.gossip = gossip
        self.sampler = sampler
        self.bus = events
        self.moves = moves  # [moved in, moved out], the list the move layer counts in
        self.channel_open = channel_open  # the cluster channel is open (key or --insecure)
        self.migration = migration  # how this node migrates, in words
        self.jobs_here = jobs_here
        self.sessions = sessions  # open control sessions
        self.started = started  # on trio's clock
        self.started_wall = time.time()

    @property
    def name(self) -> str:
        return str(self.gossip.members.me["name"])

    @property
    def node_id(self) -> int:
        return self.gossip.members.my_id

    def node_counts(self) -> dict[str, int]:
        return self.gossip.members.counts()

    def version_info(self) -> dict[str, Any]:
        return {"version": VERSION_STRING, "release": RELEASE, "protocol": self.protocol,
                "package": __version__}

    def node_views(self) -> list[dict[str, Any]]:
        now = trio.current_time()
        me = {**self.gossip.members.own_entry()}
        mine = {"id": me["id"], "name": me["name"], "address": me["addr"], "port": me["port"],
                "role": me["role"], "state": "alive", "load": round(float(me["load"]), 2),
                "util": round(float(me["util"]), 1), "runq": me["runq"], "cpus": me["cpus"],
                "speed": me["speed"], "mem_free_mb": me["mem"], "jobs": self.jobs_here(),
                "release": me["rel"], "flags": sorted(self.gossip.members.me["flags"]),
                "auth": self.gossip.auth_label, "moved_in": self.moves[0],
                "moved_out": self.moves[1], "last_heard": 0.0, "age": 0.0,
                "incarnation": int(me.get("n", 0)), "state_since":
                round(now - self.started(), 1), "self": True}
        others = sorted(self.gossip.members.nodes.values(), key=lambda n: n.id)
        inc = sorted(self.gossip.members.incompatible.values(), key=lambda n: n.id)
        return [mine] + [n.view(now) for n in others] + [n.view(now) for n in inc]

    def node_view(self, key: str) -> dict[str, Any] | None:
        if key in (str(self.node_id), self.name):
            return self.node_views()[0]
        node = self.gossip.members.find(key)
        if node is None:
            node = next((n for n in self.gossip.members.incompatible.values()
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
            "migration": self.migration(),
            "speed_mhz": int(c.cpu_speed_mhz), "security": self.security,
            "key_file": c.key_file if self.security == "key" else None,
            "load": s.load, "util": s.util, "runq": s.runq, "mem_free_mb": s.mem_free_mb,
            "nodes": self.gossip.members.counts(), "packets": dict(self.gossip.counters),
            "uptime": round(time.time() - self.started_wall, 1),
            "watchers": self.bus.subscribers,
            "watchers_dropped": self.bus.dropped_subscribers,
            "control_sessions": self.sessions(),
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
            f"ports: cluster {c.port}/udp{'+tcp' if self.channel_open else ''}, "
            f"control {st['control']}, "
            f"socket {c.control_socket}",
            f"peers: {' '.join(st['peers']) or 'none (broadcast discovery only)'}",
            f"topology: {c.topology}",
            f"migration: {self.migration()}",
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
