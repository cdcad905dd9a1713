"""Configuration: every parameter in one table, merged from defaults, autodetection, the
TOML file and the command line (later wins), so that ``--help``, the config file, ``set``/
``get`` and the man page can never disagree about what exists.

Plug'n'pray: anything not given is detected at start (:func:`autodetect`) and every choice
is logged and shown by ``status``.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
import socket
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omuscd import ids
from omuscd.paths import (
    DEFAULT_CONFIG_FILE,
    DEFAULT_CONTROL_PORT,
    DEFAULT_KEY_FILE,
    DEFAULT_PORT,
    default_state_dir,
    open_root_dir,
)

log = logging.getLogger("omuscd.config")

#: The highest CPU number a CPU list may name: Linux's largest NR_CPUS (CONFIG_MAXSMP) is
#: 8192.  Checked on each range before it is expanded, so that ``0-99999999999`` is an
#: error rather than a list of 10^11 numbers (it once took 23 GB before the kernel's OOM
#: killer ended the daemon).
MAX_CPU = 8191
#: A config file larger than this is not one (a mistaken --config /dev/zero must not
#: fill the daemon's memory, at start or on SIGHUP).
MAX_CONFIG_BYTES = 1 << 20
#: Entries of a list parameter (``peer``).
MAX_LIST = 1024
_CPU_PART = re.compile(r"([0-9]+)(?:-([0-9]+))?")


class ConfigError(Exception):
    """A parameter is invalid or contradicts another; the message names it and the fix."""


# --------------------------------------------------------------------------- parsers
def parse_cpu_list(text: str) -> list[int]:
    """Parse a Linux CPU list (``0,2-3``) into sorted unique CPU numbers.

    Every number is checked against :data:`MAX_CPU` before a range is expanded, so the
    work and memory spent are bounded by the machine's possible CPUs, not by the text."""
    cpus: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        m = _CPU_PART.fullmatch(part)
        if m is None:
            raise ValueError(f"bad CPU list item {part[:40]!r} (want N or N-M)")
        lo_s, hi_s = m.group(1), m.group(2) or m.group(1)
        if max(len(lo_s), len(hi_s)) > 5 or int(hi_s) > MAX_CPU or int(lo_s) > MAX_CPU:
            raise ValueError(f"CPU number in {part[:40]!r} is above the maximum {MAX_CPU}")
        lo, hi = int(lo_s), int(hi_s)
        if lo > hi:
            raise ValueError(f"bad CPU range {part!r}")
        cpus.update(range(lo, hi + 1))
    if not cpus:
        raise ValueError(f"bad CPU list {str(text)[:40]!r}")
    return sorted(cpus)


def format_cpu_list(cpus: Iterable[int]) -> str:
    """The inverse of :func:`parse_cpu_list`: ``[0, 2, 3]`` becomes ``0,2-3``."""
    out: list[str] = []
    run: list[int] = []
    for c in sorted(cpus):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
        run = [c]
    if run:
        out.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ",".join(out)


def parse_peer(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``HOST[:PORT]`` to ``(address, port)``; host names are resolved once, at start."""
    host, sep, port_s = str(text).rpartition(":")
    if not sep:
        host, port = str(text), default_port
    else:
        port = int(port_s)
    if not 1 <= port <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    try:
        addr = socket.gethostbyname(host)
    except OSError as e:
        raise ValueError(f"cannot resolve peer {host!r}: {e}") from e
    return addr, port


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "yes", "true", "on"):
        return True
    if text in ("0", "no", "false", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r}")


# --------------------------------------------------------------------------- the table
@dataclass(frozen=True)
class Param:
    """One configuration parameter.

    ``runtime`` parameters are the tunables: ``set``/``get`` change them in a running
    daemon and SIGHUP rereads them from the file.  The others take effect at start.
    """

    name: str
    kind: str  # "str" "int" "float" "bool" "list" "cpus"
    default: Any
    help: str
    short: str | None = None
    metavar: str | None = None
    lo: float | None = None
    hi: float | None = None
    runtime: bool = False
    choices: tuple[str, ...] | None = None
    in_file: bool = True  # settable in the TOML file

    @property
    def switch(self) -> str:
        return "--" + self.name.replace("_", "-")

    def convert(self, value: Any) -> Any:
        """Convert and bound-check ``value`` (from a switch, the file or ``set``).

        A number must be finite (NaN passes every ``<`` test, so it would slip through
        the bounds below and crash the daemon later) and within ``lo..hi``; the error
        names the parameter, the value and the allowed range."""
        if value is None or (self.default is None and self.kind in ("int", "float")
                             and str(value).lower() in ("off", "none")):
            if self.default is None:
                return None  # an optional value, switched off
        try:
            if self.kind == "int":
                v: Any = _int(value)
            elif self.kind == "float":
                v = _float(value)
            elif self.kind == "bool":
                v = _bool(value)
            elif self.kind == "list":
                v = [str(x) for x in value] if isinstance(value, list) else [str(value)]
                if len(v) > MAX_LIST:
                    raise ValueError(f"more than {MAX_LIST} entries")
            elif self.kind == "cpus":
                v = parse_cpu_list(value) if value is not None else None
            else:
                v = None if value is None else str(value)
        except (TypeError, ValueError, OverflowError) as e:
            raise ConfigError(f"{self.name}: {e}{self._allowed()}") from None
        if self.kind in ("int", "float"):
            if self.lo is not None and v < self.lo:
                raise ConfigError(f"{self.name}: {v} is below the minimum "
                                  f"{format_number(self.lo)}{self._allowed()}")
            if self.hi is not None and v > self.hi:
                raise ConfigError(f"{self.name}: {v} is above the maximum "
                                  f"{format_number(self.hi)}{self._allowed()}")
        if self.choices and v not in self.choices:
            raise ConfigError(f"{self.name}: {v!r} is not one of {', '.join(self.choices)}")
        return v

    def _allowed(self) -> str:
        text = self.bounds_text()
        return f" (allowed: {text})" if text else ""

    def bounds_text(self) -> str:
        if self.choices:
            return "|".join(self.choices)
        if self.kind == "cpus":
            return f"a CPU list such as 0,2-3 with CPUs 0..{MAX_CPU}"
        if self.lo is not None or self.hi is not None:
            off = " or off" if self.default is None else ""
            return f"{format_number(self.lo)}..{format_number(self.hi)}{off}"
        return ""


def format_number(x: float | None) -> str:
    """A bound as people write it: 4294967294, not 4.29497e+09."""
    if x is None:
        return "unbounded"
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _int(value: Any) -> int:
    """An integer from a switch, the file or ``set``: no booleans, no fractions, no
    digits beyond what any parameter could need."""
    if isinstance(value, bool):
        raise ValueError("not an integer")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{str(value)!r} is not an integer")
        return int(value)
    if isinstance(value, str) and len(value.strip()) > 40:
        raise ValueError(f"{value[:20]!r}... is not an integer")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{str(value)[:40]!r} is not an integer") from None


def _float(value: Any) -> float:
    """A finite number: 'nan', 'inf' and '1e400' (infinite once parsed) are refused."""
    if isinstance(value, bool):
        raise ValueError("not a number")
    if isinstance(value, str) and len(value.strip()) > 40:
        raise ValueError(f"{value[:20]!r}... is not a number")
    try:
        v = float(value)
    except ValueError:
        raise ValueError(f"{str(value)[:40]!r} is not a number") from None
    if not math.isfinite(v):
        raise ValueError(f"{str(value)[:40]!r} is not a finite number")
    return v


AUTO = "auto"

PARAMS: tuple[Param, ...] = (
    # identity and network
    Param("interface", "str", None, "network interface for cluster traffic "
          "(default: the interface of the default route, else the first up non-loopback one)",
          short="-i", metavar="IFACE"),
    Param("address", "str", None, "IPv4 address to use (default: the interface's first address)",
          metavar="ADDR"),
    Param("broadcast", "str", None, "broadcast address for discovery "
          "(default: the interface's; 'off' disables broadcast)", metavar="ADDR|off"),
    Param("port", "int", DEFAULT_PORT, "cluster port: UDP gossip and the TCP cluster "
          "channel (jobs)",
          short="-p", lo=1, hi=65535),
    Param("peer", "list", [], "a peer to contact by unicast (repeatable): for routed or VPN "
          "links and loopback test clusters", metavar="HOST[:PORT]"),
    Param("node_name", "str", None, "this node's name (default: the host name)",
          metavar="NAME"),
    Param("node_id", "int", None, "numeric node id (default: from the address's last two "
          "octets, moved automatically on a clash; a clash with an id given here is fatal)",
          lo=1, hi=2**32 - 2),
    Param("topology", "str", "peer", "balancing topology of this node",
          choices=("peer", "controller", "drone")),
    Param("cpus", "cpus", None, "CPUs this node lends to the cluster; load is measured over "
          "them (default: all)", metavar="LIST"),
    Param("criu", "str", None, "the criu command for migration (default: criu in PATH if it "
          "is >= 4, else /var/cache/omuscd-criu/bin/criu from tests/install-criu)",
          metavar="PATH"),
    # security
    Param("key_file", "str", DEFAULT_KEY_FILE, "cluster key file (write one with "
          "'omuscd keygen FILE'); without a key the node is read-only", metavar="FILE"),
    Param("insecure", "bool", False, "run without a key and trust every packet "
          "(the original trusted-LAN behaviour)"),
    # control
    Param("control_port", "int", DEFAULT_CONTROL_PORT, "TCP control port (telnet)",
          lo=1, hi=65535),
    Param("control_bind", "str", "127.0.0.1", "address the control port binds to; beyond "
          "loopback a --control-secret is required", metavar="ADDR"),
    Param("control_secret", "str", None, "file holding the control password "
          "(challenge-response); required when the control port is not on loopback",
          metavar="FILE"),
    Param("control_socket", "str", None, "Unix control socket for local clients "
          "(default: STATE_DIR/control.sock)", metavar="PATH"),
    Param("control_sessions", "int", 256, "control sessions open at once, both doors together; "
          "root and the daemon's user on the Unix socket have as many again of their own",
          lo=1, hi=10000, runtime=True),
    Param("control_user_sessions", "int", 64, "control sessions one user may hold at once "
          "(each 'omuscd run' holds one while its job runs; clients the daemon cannot "
          "identify share one allowance per address)",
          lo=1, hi=10000, runtime=True),
    Param("control_idle_timeout", "float", 300.0, "seconds a control session may send no line "
          "before it is closed (not while it attaches to a job or watches; an unanswered "
          "password challenge gets 10 s at most)", lo=1, hi=86400, runtime=True),
    # process
    Param("state_dir", "str", None, "state directory (default: /var/lib/omuscd as root, "
          "else $XDG_STATE_HOME/omuscd)", metavar="DIR"),
    Param("daemon", "bool", False, "detach into the background (logs go to syslog unless "
          "--log-file)", in_file=False),
    Param("tui", "bool", False, "run the urwid console on this terminal along with the "
          "daemon (logs go to STATE_DIR/omuscd.log unless --log-file)", in_file=False),
    Param("mono", "bool", False, "console without colours (also when NO_COLOR is set)",
          in_file=False),
    Param("pidfile", "str", None, "pid file written with --daemon (default: /run/omuscd.pid "
          "as root, else STATE_DIR/omuscd.pid)", metavar="FILE"),
    Param("log_file", "str", None, "append log lines to FILE instead of stderr/syslog",
          metavar="FILE"),
    Param("debug", "bool", False, "log at debug level"),
    Param("wire_version", "int", None, "speak this wire protocol version instead of our own "
          "(for interoperability tests only)", lo=0, hi=65535),
    # tunables
    # membership: SWIM with Lifeguard (omuscd(8), MEMBERSHIP)
    Param("probe_interval", "float", 0.5, "seconds between probes of one member (the "
          "protocol period; stretched while this node misses acks)", lo=0.05, hi=60,
          runtime=True),
    Param("probe_timeout", "float", 0.25, "seconds to wait for a probe's ack before asking "
          "others to probe the member (less than probe_interval)", lo=0.01, hi=30,
          runtime=True),
    Param("indirect_checks", "int", 3, "members asked to probe a member that did not answer",
          lo=0, hi=16, runtime=True),
    Param("suspicion_mult", "float", 4.0, "shortest suspicion before death, in probe "
          "intervals times log10 of the cluster size; confirmations wanted: this less 2",
          lo=1, hi=100, runtime=True),
    Param("suspicion_max_mult", "float", 6.0, "longest suspicion before death, as a "
          "multiple of the shortest (an unconfirmed suspicion waits this long)", lo=1,
          hi=100, runtime=True),
    Param("dead_timeout", "float", 10.0, "seconds a suspicion lasts at most before the "
          "node is declared dead (caps the two above)", lo=0.3, hi=7200, runtime=True),
    Param("retransmit_mult", "int", 4, "each membership change is passed on this many "
          "times log10 of the cluster size", lo=1, hi=64, runtime=True),
    Param("gossip_interval", "float", 0.2, "seconds between sends of pending membership "
          "changes to gossip_nodes members (nothing is sent when none are pending)",
          lo=0.05, hi=10, runtime=True),
    Param("gossip_nodes", "int", 3, "members each pending change is sent to per "
          "gossip_interval", lo=1, hi=16, runtime=True),
    Param("push_pull_interval", "float", 10.0, "seconds between exchanges of a slice of "
          "the node table with a random member (anti-entropy; one datagram each way)",
          lo=0.5, hi=3600, runtime=True),
    Param("rejoin_interval", "float", 20.0, "seconds between tries to reach dead members "
          "and unknown peers (an isolated node retries after 1, 2, 4... s up to this)",
          lo=1, hi=3600, runtime=True),
    Param("awareness_max", "int", 8, "the most this node stretches its own probe timeouts "
          "and interval (as a multiple) while it misses acks and nacks", lo=1, hi=64,
          runtime=True),
    Param("figures_per_message", "int", 1, "other nodes' entries (load, free memory, with "
          "their age) carried by each probe and ack beside this node's own", lo=0, hi=4,
          runtime=True),
    Param("forget_after", "float", 3600.0, "seconds a dead node stays listed", lo=1,
          hi=10**7, runtime=True),
    Param("load_interval", "float", 1.0, "seconds between load samples", lo=0.1, hi=60,
          runtime=True),
    Param("max_clock_skew", "float", 300.0, "seconds a packet's timestamp may differ from "
          "our clock (replay protection)", lo=1, hi=86400, runtime=True),
    # balancing
    Param("stream_pages", "bool", True, "send a migrating job's memory while it is dumped "
          "(to a CRIU page server on the target, relayed over the cluster channel); off: "
          "copy it after the dump", runtime=True),
    Param("post_copy_mb", "int", 16, "move a job with at least this many MB resident "
          "post-copy: frozen only while it is dumped here and its small images travel, its "
          "memory follows while it already runs on the target (not for a move to its "
          "home node); 0: never", lo=0, hi=10**7, runtime=True, metavar="MB"),
    Param("checkpoint_every", "float", 0.0, "seconds between checkpoints of every job started "
          "here that did not choose its own (omuscd run --checkpoint-every); 0: none",
          lo=0, hi=10**7, runtime=True, metavar="SECONDS"),
    Param("checkpoint_dir", "str", None, "directory (a shared filesystem, say) where the "
          "node running a job writes its checkpoints' images (DIR/JOB/N), its home getting "
          "only their record; root's, not writable by group or others (default: none, the "
          "images go to the job's home over the cluster channel)", metavar="DIR"),
    Param("balancing", "bool", True, "move jobs automatically from busy nodes to idle ones "
          "(off: only when told)", runtime=True),
    Param("balance_interval", "float", 1.0, "seconds between balancing decisions",
          lo=0.2, hi=600, runtime=True),
    Param("balance_threshold", "float", 0.6, "difference in load per CPU below which "
          "nodes count as balanced (hysteresis against ping-pong)", lo=0.1, hi=100,
          runtime=True, metavar="LOAD"),
    Param("min_job_age", "float", 0.5, "seconds a job runs before it is worth moving to a "
          "node with one job per CPU less; a fraction of it where the difference is bigger "
          "(an eighth for eight)",
          lo=0, hi=86400, runtime=True),
    Param("min_stay", "float", 5.0, "seconds a job stays where it landed before it may "
          "move again", lo=0, hi=86400, runtime=True),
    Param("transfer_rate", "float", 300.0, "MB/s assumed for moving a job's memory (the "
          "cost of a move)", lo=1, hi=100000, runtime=True, metavar="MB/S"),
    Param("offer_hold", "float", 5.0, "seconds a node holds the room it offered to a busy "
          "node (peer topology)", lo=0.5, hi=600, runtime=True),
    Param("reclaim_above", "float", None, "owner reclaim: when the load that is not cluster "
          "jobs stays above this, block and send the guests away ('off' by default)",
          metavar="LOAD", lo=0.05, hi=1000, runtime=True),
    Param("reclaim_for", "float", 3.0, "seconds the owner's load must stay above (or below) "
          "reclaim_above before the node closes (or opens)", lo=0.5, hi=3600, runtime=True),
)

PARAM_BY_NAME: dict[str, Param] = {p.name: p for p in PARAMS}
TUNABLES: dict[str, Param] = {p.name: p for p in PARAMS if p.runtime}


@dataclass
class Config:
    """The merged configuration of one daemon.  Fields mirror :data:`PARAMS`, plus what
    autodetection derived (``detected`` says which values were chosen automatically)."""

    values: dict[str, Any] = field(default_factory=dict)
    detected: dict[str, str] = field(default_factory=dict)  # name -> how it was chosen
    config_file: str | None = None
    # derived at autodetect
    peers: list[tuple[str, int]] = field(default_factory=list)
    node_id_explicit: bool = False
    cpu_speed_mhz: float = 0.0
    cpu_count: int = 1

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(name)

    def set(self, name: str, value: Any) -> Any:
        """Set a parameter with conversion and checks; returns the converted value."""
        param = PARAM_BY_NAME.get(name)
        if param is None:
            raise ConfigError(f"no such parameter: {name}")
        return self.set_many({name: value})[name]

    def set_many(self, changes: dict[str, Any]) -> dict[str, Any]:
        """Set several parameters at once (a reread file): all are converted and the result
        checked as a whole before any takes effect, so a bad value changes nothing and
        values that must move together (probe_interval and probe_timeout) can."""
        converted = {}
        for name, value in changes.items():
            param = PARAM_BY_NAME.get(name)
            if param is None:
                raise ConfigError(f"no such parameter: {name}")
            converted[name] = param.convert(value)
        check_consistency(Config(values={**self.values, **converted}))
        self.values.update(converted)
        return converted

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.values)
        if d.get("cpus") is not None:
            d["cpus"] = format_cpu_list(d["cpus"])
        return d


def check_consistency(cfg: Config) -> None:
    """Checks that involve more than one parameter."""
    v = cfg.values
    pi, pt, dt = v.get("probe_interval"), v.get("probe_timeout"), v.get("dead_timeout")
    if None not in (pi, pt) and pt >= pi:
        raise ConfigError(f"probe_timeout ({pt:g}) must be less than "
                          f"probe_interval ({pi:g})")
    if None not in (pi, dt) and dt < 2 * pi:
        raise ConfigError(f"dead_timeout ({dt:g}) must be at least twice "
                          f"probe_interval ({pi:g})")


def defaults() -> dict[str, Any]:
    return {p.name: (list(p.default) if isinstance(p.default, list) else p.default)
            for p in PARAMS}


def read_toml(path: str) -> dict[str, Any]:
    """Read a config file into ``{name: converted value}``; unknown keys are an error, so a
    typo never silently leaves a default in place."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path}: larger than {MAX_CONFIG_BYTES} bytes; "
                          "not a configuration file")
    try:
        raw = tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"config file {path}: not UTF-8 text (byte 0x{data[e.start]:02x} "
                          f"on line {line}); TOML files are UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: {e}") from None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        param = PARAM_BY_NAME.get(name)
        if param is None or not param.in_file:
            raise ConfigError(f"config file {path}: unknown key {key[:40]!r}")
        try:
            out[name] = param.convert(value)
        except ConfigError as e:
            raise ConfigError(f"config file {path}: {e}") from None
    return out


def merge(cli: dict[str, Any], config_path: str | None) -> Config:
    """Defaults < config file < switches.  ``cli`` holds only switches actually given."""
    values = defaults()
    path = config_path
    if path is None and os.path.exists(DEFAULT_CONFIG_FILE):
        path = DEFAULT_CONFIG_FILE
    if path is not None:
        values.update(read_toml(path))
    for name, value in cli.items():
        values[name] = PARAM_BY_NAME[name].convert(value)
    cfg = Config(values=values, config_file=path)
    check_consistency(cfg)
    cfg.node_id_explicit = values.get("node_id") is not None
    return cfg


# --------------------------------------------------------------------------- autodetect
@dataclass
class Interface:
    name: str
    address: str
    broadcast: str | None
    up: bool


def list_interfaces() -> list[Interface]:
    """IPv4 interfaces with their first address and broadcast, from netifaces + psutil."""
    import netifaces
    import psutil

    stats = psutil.net_if_stats()
    out = []
    for name in netifaces.interfaces():
        for a in netifaces.ifaddresses(name).get(netifaces.AF_INET, []):
            if "addr" in a:
                st = stats.get(name)
                out.append(Interface(name, a["addr"], a.get("broadcast"),
                                     bool(st and st.isup)))
                break
    return out


def default_route_interface() -> str | None:
    import netifaces

    gw = netifaces.gateways().get("default", {}).get(netifaces.AF_INET)
    return gw[1] if gw else None


def cpu_speed_mhz() -> float:
    """Nominal CPU speed in MHz: cpufreq's maximum, else /proc/cpuinfo, else 0 (unknown)."""
    import psutil

    try:
        freq = psutil.cpu_freq()
        if freq and (freq.max or freq.current):
            return float(freq.max or freq.current)
    except (OSError, NotImplementedError):
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("cpu mhz"):
                    return float(line.split(":", 1)[1])
    except (OSError, ValueError):
        pass
    return 0.0


def node_id_from_address(address: str) -> int:
    """openMosix took the id from address octets; we take the last two (1..65535) and
    resolve clashes at run time (see membership)."""
    packed = ipaddress.IPv4Address(address).packed
    return (packed[2] << 8 | packed[3]) or 1


def autodetect(cfg: Config,
               interfaces: Callable[[], list[Interface]] = list_interfaces,
               default_iface: Callable[[], str | None] = default_route_interface) -> Config:
    """Fill in whatever was not given; record in ``cfg.detected`` how each was chosen."""
    import psutil

    v = cfg.values
    ifaces = interfaces()
    chosen: Interface | None = None
    if v["interface"]:
        chosen = next((i for i in ifaces if i.name == v["interface"]), None)
        if chosen is None:
            raise ConfigError(f"interface {v['interface']!r} has no IPv4 address "
                              f"(have: {', '.join(i.name for i in ifaces) or 'none'})")
        cfg.detected["interface"] = "given"
    elif v["address"]:
        chosen = next((i for i in ifaces if i.address == v["address"]), None)
        if chosen is None:
            # an address on lo's 127/8 range works without being configured on lo
            if ipaddress.IPv4Address(v["address"]).is_loopback:
                chosen = Interface("lo", v["address"], None, True)
            else:
                raise ConfigError(f"address {v['address']} is not on any interface")
        cfg.detected["interface"] = "owner of the given address"
    else:
        route = default_iface()
        chosen = next((i for i in ifaces if i.name == route and i.up), None)
        if chosen is not None:
            cfg.detected["interface"] = "default route"
        else:
            chosen = next((i for i in ifaces if i.up and not
                           ipaddress.IPv4Address(i.address).is_loopback), None)
            if chosen is not None:
                cfg.detected["interface"] = "first up non-loopback (no default route)"
            else:
                chosen = next((i for i in ifaces if i.name == "lo"),
                              Interface("lo", "127.0.0.1", None, True))
                cfg.detected["interface"] = "loopback (no other interface is up)"
    v["interface"] = chosen.name
    if not v["address"]:
        v["address"] = chosen.address
        cfg.detected["address"] = f"first address of {chosen.name}"
    try:
        ipaddress.IPv4Address(v["address"])
    except ValueError:
        raise ConfigError(f"address {v['address']!r} is not an IPv4 address") from None
    if v["broadcast"] is None:
        v["broadcast"] = chosen.broadcast if chosen.address == v["address"] else None
        if ipaddress.IPv4Address(v["address"]).is_loopback:
            v["broadcast"] = None
        cfg.detected["broadcast"] = f"of {chosen.name}" if v["broadcast"] else "none available"
    elif v["broadcast"] == "off":
        v["broadcast"] = None
    if v["node_name"] is not None:
        try:  # the one rule for names: commands and peers must be able to name it
            ids.node_name(v["node_name"])
        except ids.BadId as e:
            raise ConfigError(f"node_name: {e}") from None
    else:
        host = socket.gethostname().split(".")[0] or "node"
        loop = ipaddress.IPv4Address(v["address"]).is_loopback
        v["node_name"] = f"{host}-{v['address']}" if loop else host
        cfg.detected["node_name"] = "host name"
    if v["node_id"] is None:
        v["node_id"] = node_id_from_address(v["address"])
        cfg.detected["node_id"] = "from the address"
    available = sorted(psutil.Process().cpu_affinity() or range(psutil.cpu_count() or 1))
    if v["cpus"] is None:
        v["cpus"] = available
        cfg.detected["cpus"] = "all"
    else:
        missing = sorted(set(v["cpus"]) - set(available))
        if missing:
            raise ConfigError(f"cpus: {format_cpu_list(missing)} not available here "
                              f"(have {format_cpu_list(available)})")
    cfg.cpu_count = psutil.cpu_count() or len(available)
    cfg.cpu_speed_mhz = cpu_speed_mhz()
    if v["state_dir"] is None:
        v["state_dir"] = default_state_dir()
        cfg.detected["state_dir"] = "default"
    if v["control_socket"] is None:
        v["control_socket"] = os.path.join(v["state_dir"], "control.sock")
    if v["pidfile"] is None:
        v["pidfile"] = ("/run/omuscd.pid" if os.geteuid() == 0
                        else os.path.join(v["state_dir"], "omuscd.pid"))
    if v["checkpoint_dir"]:
        try:
            os.close(open_root_dir(v["checkpoint_dir"]))
        except OSError as e:
            raise ConfigError(f"checkpoint_dir refused: {e}") from None
    try:
        peers = [parse_peer(p, v["port"]) for p in v["peer"]]
        cfg.peers = [p for p in dict.fromkeys(peers) if p != (v["address"], v["port"])]
    except ValueError as e:
        raise ConfigError(f"peer: {e}") from None
    bind = v["control_bind"]
    try:
        loop = ipaddress.ip_address(bind).is_loopback
    except ValueError:
        raise ConfigError(f"control_bind: {bind!r} is not an IP address") from None
    if not loop and not v["control_secret"]:
        raise ConfigError(f"control_bind {bind} is beyond loopback: give --control-secret "
                          "FILE (write one with 'omuscd keygen FILE')")
    return cfg


def read_secret(path: str) -> bytes:
    """Read a key or password file; refuse one others can read (it would not be secret)."""
    p = Path(path)
    try:
        st = p.stat()
        data = p.read_bytes().strip()
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    if st.st_mode & 0o077:
        raise ConfigError(f"{path} is readable by others (mode {st.st_mode & 0o777:o}); "
                          f"run 'chmod 600 {path}'")
    if len(data) < 16:
        raise ConfigError(f"{path} holds fewer than 16 bytes; write a new one with "
                          "'omuscd keygen FILE'")
    return data


def write_key(path: str) -> None:
    """``omuscd keygen``: 32 random bytes, hex, mode 0600, never overwriting a file."""
    data = os.urandom(32).hex() + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(data)
