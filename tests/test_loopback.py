"""A loopback cluster of real daemons (127.0.0.x joined with --peer), real sockets."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time

import pytest

from omuscd import client, config, wire
from omuscd.version import RELEASE
from tests.cluster import (
    PYTHON,
    User,
    criu_problem,
    namespace_cluster,
    omuscd_command,
    ordinary_user,
    start_daemon,
    telnet,
    wait_for,
)

PORT = 24270
CTL = 24271


def base(addr: str, key: str | None, *extra: str) -> list[str]:
    args = ["--address", addr, "--port", str(PORT), "--control-bind", addr,
            "--control-port", str(CTL), "--gossip-interval", "0.2",
            "--dead-timeout", "3"]
    if key:
        args += ["--key-file", key]
    return [*args, *extra]


@pytest.fixture
def key(workdir):
    path = workdir / "cluster.key"
    config.write_key(str(path))
    return str(path)


@pytest.fixture
def trio_nodes(workdir, key, reaper):
    nodes = []
    for i in (2, 3, 4):
        d = start_daemon(f"n{i}", base(f"127.0.0.{i}", key, "--peer", f"127.0.0.2:{PORT}"),
                         workdir)
        reaper.append(d)
        nodes.append(d)
    for d in nodes:
        wait_for(lambda d=d: len(d.nodes()) == 2, 5, f"{d.name} to see two others")
    return nodes


def test_three_nodes_agree_on_the_table(trio_nodes):
    ids = {d.name: d.json("status")["id"] for d in trio_nodes}
    assert ids == {"n2": 2, "n3": 3, "n4": 4}
    for d in trio_nodes:
        views = d.json("nodes")["nodes"]
        assert {v["id"] for v in views} == {2, 3, 4}
        assert all(v["state"] == "alive" and v["auth"] == "key" for v in views)
        assert views[0]["self"] and views[0]["name"] == d.name
        # each figure's age travels with it (the probes carry them): a few seconds at most
        assert all(0 <= v["age"] == v["last_heard"] < 5 for v in views)
    node3 = trio_nodes[0].json("node n3")
    assert node3["address"] == "127.0.0.3" and node3["cpus"] >= 1 and node3["release"] == RELEASE


def test_clean_stop_announces_departure(trio_nodes):
    n2, n3, n4 = trio_nodes
    start = time.monotonic()
    assert n4.stop(signal.SIGTERM) == 0
    took = wait_for(lambda: "n4" not in n2.nodes() and "n4" not in n3.nodes(), 2,
                    "n4 to be gone")
    assert time.monotonic() - start < 2.5 and took < 1.0
    assert "left the cluster" in n2.log()
    assert "shutting down: signal SIGTERM" in n4.log()


def test_kill_is_detected_as_suspect_then_dead(trio_nodes):
    n2, n3, n4 = trio_nodes
    n4.stop(signal.SIGKILL)
    wait_for(lambda: n2.nodes()["n4"]["state"] == "dead", 3.5, "n4 dead at n2")
    wait_for(lambda: n3.nodes()["n4"]["state"] == "dead", 1, "n4 dead at n3")
    log = n2.log()
    assert log.index("n4) is suspect") < log.index("n4) is dead")


def send_datagrams(addr: str, datagrams: list[bytes]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.99", 0))
        for d in datagrams:
            s.sendto(d, (addr, PORT))


def fake_entry(nid: int) -> dict:
    return {"id": nid, "boot": 5, "inc": 1, "hb": 1, "age": 0, "name": f"fake{nid}",
            "addr": "127.0.0.99", "port": PORT, "role": "peer", "rel": "1a0", "st": "up",
            "cpus": 1, "speed": 1, "mem": 1, "load": 0.0, "util": 0.0, "runq": 0, "jobs": 0,
            "flags": []}


def test_forged_unsigned_and_junk_packets_are_counted_and_ignored(trio_nodes, key):
    n2 = trio_nodes[0]
    now = time.time()
    good_key = config.read_secret(key)
    forger = wire.Codec(b"not-the-key-at-all!", 99, 5, 1)
    unsigned = wire.Codec(None, 98, 5, 1)
    honest = wire.Codec(good_key, 97, 5, 1)
    replayed = honest.encode(wire.HELLO, {"entry": fake_entry(97)}, now)
    before = n2.json("status")["packets"]
    send_datagrams("127.0.0.2", [
        forger.encode(wire.HELLO, {"entry": fake_entry(99)}, now),
        unsigned.encode(wire.HELLO, {"entry": fake_entry(98)}, now),
        b"\x00" * 3, os.urandom(500),
        wire.MAGIC + b"\x00\x01\x01\x01" + os.urandom(100),  # claims to be signed
        honest.encode(wire.HELLO, {"entry": fake_entry(96)}, now),  # entry/header mismatch
        honest.encode(wire.HELLO, {"entry": fake_entry(97)}, now - 3600),
        replayed, replayed,
    ])

    def counted():
        p = n2.json("status")["packets"]
        return {r: p[r] - before[r] for r in wire.DROP_REASONS}

    # junk behind a valid magic fails authentication before anything reads it
    want = {"bad-signature": 2, "unsigned": 1, "malformed": 3, "stale": 1, "replayed": 1,
            "incompatible": 0}
    wait_for(lambda: counted() == want, 3, f"drop counters {want}")
    names = set(n2.nodes())
    assert "fake99" not in names and "fake98" not in names and "fake96" not in names
    assert "fake97" in names  # the one authentic datagram was taken, once
    assert {"n3", "n4"} <= names
    status = n2.ctl("status").text
    assert "bad-signature 2" in status and "replayed 1" in status


def test_other_protocol_version_is_listed_incompatible(trio_nodes, workdir, key, reaper):
    n2 = trio_nodes[0]
    # an old daemon (protocol 1: heartbeat gossip) beside SWIM nodes
    v1 = start_daemon("v1", base("127.0.0.5", key, "--peer", f"127.0.0.2:{PORT}",
                                 "--wire-version", "1"), workdir)
    reaper.append(v1)
    wait_for(lambda: n2.nodes().get("v1", {}).get("state") == "incompatible", 3,
             "v1 listed as incompatible")
    assert n2.json("status")["packets"]["incompatible"] > 0
    assert {"n3", "n4"} == {n for n, v in n2.nodes().items() if v["state"] == "alive"}
    assert "speaks protocol version 1" in n2.log()
    wait_for(lambda: {v["state"] for v in v1.nodes().values()} == {"incompatible"}, 3,
             "v1 to see the others as incompatible")


def test_keyless_node_is_read_only_and_refused_by_keyed_nodes(trio_nodes, workdir, reaper):
    assert not os.path.exists(config.DEFAULT_KEY_FILE), "this test needs no /etc/omuscd.key"
    n2 = trio_nodes[0]
    ro = start_daemon("ro", base("127.0.0.6", None, "--peer", f"127.0.0.2:{PORT}"), workdir)
    reaper.append(ro)
    st = ro.json("status")
    assert st["security"] == "read-only"
    assert "omuscd keygen" in ro.ctl("status").text and "omuscd keygen" in ro.log()
    wait_for(lambda: n2.json("status")["packets"]["unsigned"] > 0, 3, "unsigned counted")
    assert "ro" not in n2.nodes()
    # it learns the cluster from the table the seed sends back... which the seed never
    # does for an unsigned hello: a read-only node sees only what reaches it signed.
    time.sleep(0.5)
    assert all(v["auth"] == "unverified" for v in ro.nodes().values())


def test_automatic_id_clash_moves_the_later_node(trio_nodes, workdir, key, reaper):
    n2 = trio_nodes[0]
    # 127.1.0.2 derives id 2 from its last two octets, like 127.0.0.2
    late = start_daemon("late", base("127.1.0.2", key, "--peer", f"127.0.0.2:{PORT}"),
                        workdir)
    reaper.append(late)
    wait_for(lambda: "late" in n2.nodes() and n2.nodes()["late"]["id"] >= 65536, 4,
             "late to move to a fresh id")
    assert late.json("status")["id"] == n2.nodes()["late"]["id"]
    assert n2.json("status")["id"] == 2
    assert "already used by n2" in late.log()
    wait_for(lambda: late.nodes().get("n2", {}).get("state") == "alive", 10, "n2 seen by late")


def test_explicit_id_clash_refuses_with_exit_3(trio_nodes, workdir, key, reaper):
    n2, n3, _ = trio_nodes
    late = start_daemon("dup", base("127.0.0.7", key, "--peer", f"127.0.0.2:{PORT}",
                                    "--node-id", "3"), workdir, wait=False)
    reaper.append(late)
    assert late.popen.wait(10) == 3
    assert "node id 3 is already used by n3" in late.log()
    assert "node id 3 is also claimed by dup" in n3.log()
    # its departure under the clashing id lets third parties show the rightful owner
    wait_for(lambda: n2.nodes().get("n3", {}).get("state") == "alive", 3, "n3 back at n2")


def test_control_port_robustness(trio_nodes):
    n2 = trio_nodes[0]
    with socket.create_connection(("127.0.0.2", CTL), timeout=5) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220 omuscd-")
        s.sendall(bytes(range(11, 255)) + b"\n" + b"A" * 100000 + b"\r\n" + b"\x00junk\n")
        lines = [f.readline() for _ in range(3)]
        assert [ln[:4] for ln in lines] == [b"403 ", b"402 ", b"403 "]
        s.sendall(b"frobnicate\r\nversion\r\n")
        assert f.readline().startswith(b"400 ")
        assert f.readline().startswith(b"200 omuscd-")
    # the daemon is unharmed and answers a normal client
    assert n2.ctl("nodes").code == 200


def test_too_many_sessions_get_421(trio_nodes):
    socks = []
    try:
        for _ in range(64):  # control_user_sessions: root's on TCP count as anyone's
            s = socket.create_connection(("127.0.0.2", CTL), timeout=5)
            assert s.makefile("rb").readline().startswith(b"220 ")
            socks.append(s)
        with socket.create_connection(("127.0.0.2", CTL), timeout=5) as extra:
            assert extra.makefile("rb").readline().startswith(
                b"421 too many sessions for you (64 at once)")
        assert trio_nodes[0].ctl("version").code == 200  # the Unix socket has its own room
    finally:
        for s in socks:
            s.close()
    wait_for(lambda: trio_nodes[0].json("status")["control_sessions"] == 1, 3,
             "sessions to free up (the one asking is left)")


@pytest.mark.skipif(subprocess.run(["which", "telnet"], capture_output=True).returncode,
                    reason="the telnet client is not installed (the README's test command "
                           "installs it)")
def test_real_telnet_session(trio_nodes):
    out = telnet("127.0.0.2", CTL, [
        ("\x1d", 0.2), ("send do echo\n", 0.3),  # telnet sends IAC DO ECHO
        ("nodes\n", 0.4), ("watch\n", 0.4),
        ("\x1d", 0.2), ("send ip\n", 0.4),  # IAC IP (Ctrl-C) ends the watch
        ("node n3\n", 0.4), ("quit\n", 0.5),
    ])
    assert f"220 omuscd-{RELEASE} node n2" in out
    assert "200-*2" in out and "200 3 nodes" in out
    assert "210-watching" in out and "210 end of watch" in out
    assert "200-address: 127.0.0.3" in out
    assert "221 bye" in out


def test_password_challenge(workdir, key, reaper):
    secret = workdir / "pw.secret"
    config.write_key(str(secret))
    d = start_daemon("pw", base("127.0.0.8", key, "--control-secret", str(secret)), workdir)
    reaper.append(d)
    with socket.create_connection(("127.0.0.8", CTL), timeout=5) as s:
        f = s.makefile("rb")
        greet = [f.readline(), f.readline()]
        assert greet[0].startswith(b"220-") and b"challenge" in greet[1]
        s.sendall(b"status\n")
        assert f.readline().startswith(b"530 ")
        s.sendall(b"auth " + b"0" * 64 + b"\n")
        assert f.readline().startswith(b"531 ")
        assert f.readline() == b""  # closed after a failure
    with client.ControlClient.tcp("127.0.0.8", CTL, config.read_secret(str(secret))) as c:
        assert c.command("status").ok
        assert c.command("set gossip_interval 0.3").ok  # the password is root's
    # the Unix socket identifies its user by the kernel: no password
    assert d.ctl("status").ok


def test_control_beyond_loopback_without_secret_is_refused(workdir):
    r = subprocess.run(omuscd_command(["--control-bind", "0.0.0.0", "--insecure",
                                       "--state-dir", str(workdir)]),
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and "--control-secret" in r.stderr


@pytest.mark.parametrize("args,code,msg", [
    (["--port", "0"], 2, "below the minimum 1"),
    (["--port", "99999"], 2, "maximum"),
    (["--bogus"], 2, "unrecognized"),
    (["--key-file", "/nonexistent/k"], 2, "omuscd keygen"),
    (["--config", "/nonexistent.toml"], 2, "cannot read config"),
    (["--cpus", "4000"], 2, "not available"),
    (["--node-name", "my node"], 2, "node_name: 'my node' is not a node name"),
    (["--node-name", "../x"], 2, "is not a node name"),
])
def test_usage_errors_exit_2(workdir, args, code, msg):
    r = subprocess.run(omuscd_command([*args, "--state-dir", str(workdir)]),
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == code, r.stderr
    assert msg in r.stderr


def test_port_in_use_exits_1(trio_nodes, workdir, key):
    r = subprocess.run(omuscd_command(base("127.0.0.2", key, "--state-dir",
                                           str(workdir / "x"), "--control-port", "24299")),
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 1 and "cannot bind UDP 127.0.0.2:24270" in r.stderr


def test_sighup_rereads_tunables(workdir, key, reaper):
    conf = workdir / "omuscd.toml"
    conf.write_text("dead_timeout = 7.0\n")
    d = start_daemon("hup", base("127.0.0.9", key, "--config", str(conf)), workdir)
    reaper.append(d)
    # switches win over the file at start; the file then changes and SIGHUP rereads it
    assert d.json("get dead_timeout") == {"dead_timeout": 3.0}
    conf.write_text("dead_timeout = 8.5\nport = 1234\n")
    d.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: d.json("get dead_timeout") == {"dead_timeout": 8.5}, 3, "reload")
    assert "port changed" in d.log() and d.alive()
    conf.write_text("dead_timeout = oops\n")
    d.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration left as it was" in d.log(), 3, "bad reload refused")
    assert d.json("get dead_timeout") == {"dead_timeout": 8.5}


def test_daemon_mode_pidfile_and_shutdown(workdir, key):
    pidfile = workdir / "omuscd.pid"
    logf = workdir / "d.log"
    args = base("127.0.0.10", key, "--daemon", "--pidfile", str(pidfile), "--log-file",
                str(logf), "--state-dir", str(workdir / "d"))
    r = subprocess.run(omuscd_command(args), capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    pid = int(pidfile.read_text())
    os.kill(pid, 0)
    # a second one refuses: already running
    r2 = subprocess.run(omuscd_command(args), capture_output=True, text=True, timeout=20)
    assert r2.returncode == 1 and f"already running as pid {pid}" in r2.stderr
    sock = str(workdir / "d" / "control.sock")
    with client.ControlClient.unix(sock) as c:
        assert c.command("shutdown").ok
    wait_for(lambda: not pidfile.exists(), 5, "the pid file to go")
    wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 5, "the daemon to exit")
    assert "shutting down: 'shutdown' from" in logf.read_text()


def test_ctl_exit_codes(trio_nodes, workdir):
    sock = trio_nodes[0].socket
    run = [PYTHON, "-m", "omuscd", "ctl", "--connect", sock]
    assert subprocess.run([*run, "version"], capture_output=True).returncode == 0
    r = subprocess.run([*run, "frob"], capture_output=True, text=True)
    assert r.returncode == 4 and "unknown command" in r.stderr
    r = subprocess.run([*run, "--json", "nodes"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith('{"nodes":')
    r = subprocess.run([*run[:-1], str(workdir / "none.sock"), "status"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "cannot talk" in r.stderr


# --------------------------------------------------------------------------- who is telnet
NO_TELNET = subprocess.run(["which", "telnet"], capture_output=True).returncode != 0


def telnet_as(user: User, addr: str, port: int, script: list[tuple[str, float]]) -> str:
    """The real telnet client, run by ``user``."""
    return telnet(addr, port, script, user=user)


def started(out: str) -> str:
    m = re.search(r"^200 job (\S+) started", out, re.M)
    assert m, out
    return m.group(1)


def root_job(d, marker: str) -> str:
    """A job of root's, started through the Unix socket."""
    reply = d.ctl(f"run --json --home --cwd /tmp -- sh -c 'exec sleep 300' {marker}")
    assert reply.code == 200, reply
    return reply.json()["job"]


def running(d, job: str) -> bool:
    return d.json(f"job {job}")["state"] == "running"


@pytest.mark.skipif(NO_TELNET, reason="the telnet client is not installed")
def test_telnet_on_loopback_gives_an_ordinary_user_their_accounts_rights(workdir, key, reaper):
    d = start_daemon("tu", base("127.0.0.20", key), workdir)
    reaper.append(d)
    theirs = root_job(d, "r")
    with ordinary_user("tel") as user:
        out = telnet_as(user, "127.0.0.20", CTL, [("set gossip_interval 1\n", 0.3),
                                                   ("block\n", 0.3),
                                                   ("run --home -- sleep 301\n", 1),
                                                   ("run --user root -- id\n", 0.5),
                                                   ("quit\n", 0.3)])
        for cmd in ("set", "block"):
            assert f"501 '{cmd}' is for root or the daemon's user (you are {user.name})" in out
        mine = started(out)
        view = d.json(f"job {mine}")
        assert (view["owner"], view["uid"]) == (user.name, user.uid)  # run as the account
        assert "501 only root may run jobs as another user" in out
        wait_for(lambda: running(d, mine), 10, "the user's job to run")
        out = telnet_as(user, "127.0.0.20", CTL, [
            ("set gossip_interval 1\n", 0.3), ("shutdown\n", 0.3), ("block\n", 0.3),
            ("topology drone\n", 0.3), ("log debug\n", 0.3), ("expel\n", 0.3),
            (f"kill {theirs}\n", 0.5), (f"stay {theirs}\n", 0.5),
            (f"output {theirs}\n", 0.3), ("nodes\n", 0.3), ("jobs\n", 0.5),
            (f"kill {mine} KILL\n", 0.5), ("quit\n", 0.3)])
        for cmd in ("set", "shutdown", "block", "topology", "log", "expel"):
            assert f"501 '{cmd}' is for root or the daemon's user (you are {user.name})" in out
        assert out.count(f"500 job {theirs} belongs to root") == 3, out
        assert "200 1 nodes" in out and "200 2 jobs" in out
        assert f"200 signal 9 sent to job {mine}" in out
        wait_for(lambda: d.json(f"job {mine}")["state"] == "exited", 10, "the user's job end")
    # nothing of the daemon's changed, root's job runs on
    try:
        assert d.alive() and running(d, theirs)
        assert d.json("get gossip_interval") == {"gossip_interval": 0.2}
        assert d.json("status")["topology"] == "peer"
        assert "blocked" not in d.json("node tu")["flags"]
    finally:
        d.ctl(f"kill {theirs} KILL")  # a job outlives its daemon: not this one


@pytest.mark.skipif(NO_TELNET, reason="the telnet client is not installed")
def test_telnet_on_loopback_as_root_has_roots_rights(workdir, key, reaper):
    d = start_daemon("tr", base("127.0.0.21", key), workdir)
    reaper.append(d)
    with ordinary_user("tr") as user:
        out = telnet_as(user, "127.0.0.21", CTL, [("run --home -- sleep 303\n", 1)])
        theirs = started(out)
        wait_for(lambda: running(d, theirs), 10, "the user's job to run")
        out = telnet("127.0.0.21", CTL, [
            ("set gossip_interval 0.3\n", 0.3), ("block\n", 0.3), ("noblock\n", 0.3),
            ("run --home -- sleep 302\n", 1), (f"kill {theirs} KILL\n", 0.5),
            ("quit\n", 0.3)])
        assert "200 gossip_interval = 0.3" in out and "501" not in out, out
        mine = started(out)
        assert d.json(f"job {mine}")["owner"] == "root"
        assert f"200 signal 9 sent to job {theirs}" in out
        wait_for(lambda: d.json(f"job {theirs}")["state"] == "exited", 10, "their job's end")
    assert d.json("get gossip_interval") == {"gossip_interval": 0.3}
    out = telnet("127.0.0.21", CTL, [(f"kill {mine}\n", 0.5), ("shutdown\n", 1)])
    assert f"200 signal 15 sent to job {mine}" in out and "200 shutting down" in out
    assert d.popen.wait(10) == 0


IDLE = """
import socket, sys, time
socks, refused = [], []
for _ in range(int(sys.argv[3])):
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
    line = s.makefile("rb").readline()
    if line.startswith(b"220 "):
        socks.append(s)  # held open, silent
    else:
        refused.append(line)
print(len(socks), len(refused), refused[0].decode().strip() if refused else "", flush=True)
sys.stdin.readline()  # the test checks root gets through meanwhile
start, last = time.monotonic(), []
for s in socks:
    f = s.makefile("rb")
    last.append(b"".join(iter(f.readline, b"")))  # to the daemon's close
print(round(time.monotonic() - start, 1), len(set(last)), last[0].decode().strip(), flush=True)
"""


@pytest.mark.skipif(NO_TELNET, reason="the telnet client is not installed")
def test_idle_connections_of_one_user_do_not_lock_root_out(workdir, key, reaper):
    d = start_daemon("idle", base("127.0.0.22", key, "--control-idle-timeout", "6"), workdir)
    reaper.append(d)
    with ordinary_user("idl") as user:
        p = user.popen([user.python, "-c", IDLE, "127.0.0.22", str(CTL), "70"],
                       stdin=subprocess.PIPE)
        assert p.stdin is not None and p.stdout is not None
        opened = p.stdout.readline().decode().strip().split(maxsplit=2)
        assert opened == ["64", "6", "421 too many sessions for you (64 at once); close one "
                          "or try again later"]
        # root gets through both doors while the user holds all it may
        assert d.ctl("version").code == 200
        out = telnet("127.0.0.22", CTL, [("version\n", 0.3), ("quit\n", 0.3)])
        assert "200 omuscd-" in out and "221 bye" in out
        assert d.json("status")["control_sessions"] == 65  # the user's and the one asking
        p.stdin.write(b"\n")
        p.stdin.flush()
        closed = p.stdout.readline().decode().strip().split(maxsplit=2)
        p.wait(10)
    # each was told why, then closed, within the timeout of its last line
    assert float(closed[0]) < 6 + 3 and closed[1:] == ["1",
                                                       "421 idle for 6 s: closing this session"]
    assert d.json("status")["control_sessions"] == 1  # the one asking


def test_silent_session_is_closed_an_attached_or_watching_one_is_not(workdir, key, reaper):
    d = start_daemon("att", base("127.0.0.23", key, "--control-idle-timeout", "2"), workdir)
    reaper.append(d)
    with socket.create_connection(("127.0.0.23", CTL), timeout=10) as silent:
        start = time.monotonic()
        f = silent.makefile("rb")
        assert f.readline().startswith(b"220 ")
        assert f.readline() == b"421 idle for 2 s: closing this session\r\n"
        assert f.readline() == b""
        assert 1.5 < time.monotonic() - start < 5
    with socket.create_connection(("127.0.0.23", CTL), timeout=20) as s:
        f = s.makefile("rb")
        assert f.readline().startswith(b"220 ")
        s.sendall(b"run --home -- sh -c 'sleep 5; echo finished'\r\n")
        job = started(f.readline().decode())
        s.sendall(f"attach {job}\r\n".encode())
        start = time.monotonic()
        lines = [f.readline() for _ in range(3)]
        assert lines[0].startswith(b"230-attached to job") and lines[1] == b"230-finished\r\n"
        assert lines[2] == b"230 exit 0\r\n" and time.monotonic() - start > 3
        s.sendall(b"watch\r\n")
        assert f.readline().startswith(b"210-watching")
        time.sleep(4)  # twice the idle timeout, waiting for events
        s.sendall(b"\r\n")
        while (line := f.readline()) and not line.startswith(b"210 "):
            assert line.startswith(b"210-"), line
        assert line == b"210 end of watch\r\n"
        s.sendall(b"version\r\n")
        assert f.readline().startswith(b"200 omuscd-")


CRIU = criu_problem()  # namespaces, CRIU and 'criu check'


@pytest.mark.netns
@pytest.mark.skipif(NO_TELNET or CRIU is not None,
                    reason=str(CRIU) if not NO_TELNET else "no telnet client")
def test_telnet_on_loopback_as_root_migrates_a_job():
    with namespace_cluster("ab", prefix=f"omt{os.getpid() % 10000}t",
                           leftovers="omuscd-telnet-move") as (lan, _work, _key, n):
        job = root_job(n["a"], "omuscd-telnet-move")
        wait_for(lambda: running(n["a"], job), 10, "the job to run")
        time.sleep(1)  # past min_job_age: its command runs
        out = telnet("127.0.0.1", 4271, [(f"migrate {job} b\n", 8), ("quit\n", 0.3)],
                     netns=lan.ns(0))
        assert re.search(rf"^200 job {re.escape(job)} migrated to b", out, re.M), out
        view = n["a"].json(f"job {job}")
        assert view["node_name"] == "b" and view["migrations"] == 1 and view["state"] == \
            "running"
        assert n["b"].ctl(f"kill {job}").code == 200


# ------------------------------------------------------------------ bounds, the state lock
# Addresses 127.0.0.41.. belong to this block.  Every start here runs under a 1 GB address
# space limit: a CPU list expanded before it is checked must fail, not eat the machine.
def limited_run(args: list[str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    return subprocess.run(omuscd_command(args), capture_output=True, text=True,
                          timeout=timeout, preexec_fn=limit)


NON_FINITE = ["nan", "NaN", "inf", "-inf", "1e400"]


def test_set_refuses_non_finite_numbers_and_the_daemon_lives_on(workdir, key, reaper):
    d = start_daemon("setnan", base("127.0.0.41", key), workdir)
    reaper.append(d)
    before = d.json("get")
    for name in ("gossip_interval", "dead_timeout", "load_interval", "balance_interval",
                 "reclaim_above", "max_clock_skew"):
        for value in NON_FINITE:
            r = d.ctl(f"set {name} {value}")
            assert 400 <= r.code < 500, (name, value, r)
            assert name in r.text and value in r.text and "allowed" in r.text, r.text
    for name, value in (("indirect_checks", "1e400"), ("post_copy_mb", "9" * 39),
                        ("indirect_checks", "nan"), ("post_copy_mb", "-1")):
        r = d.ctl(f"set {name} {value}")
        assert 400 <= r.code < 500 and name in r.text and "allowed" in r.text, r
    time.sleep(2)  # ten gossip rounds: a NaN interval crashed the daemon within seconds
    assert d.alive() and d.json("get") == before
    assert d.ctl("nodes").code == 200


@pytest.mark.parametrize("args,msg", [
    (["--gossip-interval", "nan"], "gossip_interval: 'nan' is not a finite number"),
    (["--dead-timeout", "NaN"], "dead_timeout: 'NaN' is not a finite number"),
    (["--reclaim-above", "inf"], "reclaim_above: 'inf' is not a finite number"),
    (["--balance-threshold", "nan"], "allowed: 0.1..100"),
    (["--port", "1e400"], "port: '1e400' is not an integer"),
    (["--cpus", "0-99999999999"], "above the maximum 8191"),
])
def test_non_finite_switches_exit_2_naming_the_parameter(workdir, args, msg):
    r = limited_run(base("127.0.0.42", None, *args, "--state-dir", str(workdir)))
    assert r.returncode == 2, r.stderr[-2000:]
    assert msg in r.stderr and "allowed" in r.stderr


@pytest.mark.parametrize("text,msg", [
    ("gossip_interval = nan\n", "gossip_interval: 'nan' is not a finite number"),
    ("load_interval = inf\n", "load_interval: 'inf' is not a finite number"),
    ("dead_timeout = -inf\n", "dead_timeout: '-inf' is not a finite number"),
    ("port = 99999999999999999999999\n", "above the maximum 65535"),
    ("indirect_checks = 1e400\n", "indirect_checks: 'inf' is not an integer"),
    ('cpus = "0-99999999999"\n', "above the maximum 8191"),
    ('cpus = "0-4,7-99999999999999999999"\n', "above the maximum 8191"),
])
def test_non_finite_or_huge_file_values_exit_2(workdir, text, msg):
    conf = workdir / "bad.toml"
    conf.write_text(text)
    r = limited_run(base("127.0.0.43", None, "--config", str(conf), "--state-dir",
                         str(workdir / "s")))
    assert r.returncode == 2, r.stderr[-2000:]
    assert str(conf) in r.stderr and msg in r.stderr and "allowed" in r.stderr


def test_non_utf8_config_file_exits_2_naming_it(workdir):
    conf = workdir / "latin1.toml"
    conf.write_bytes(b"node_name = \"caf\xe9\"\n")
    r = limited_run(base("127.0.0.44", None, "--config", str(conf), "--state-dir",
                         str(workdir / "s")))
    assert r.returncode == 2, r.stderr[-2000:]
    assert f"config file {conf}: not UTF-8" in r.stderr and "Traceback" not in r.stderr


def test_sighup_with_a_bad_file_keeps_every_old_value(workdir, key, reaper):
    conf = workdir / "omuscd.toml"
    conf.write_text("indirect_checks = 2\n")
    d = start_daemon("hupbad", base("127.0.0.45", key, "--config", str(conf)), workdir)
    reaper.append(d)
    before = d.json("get")
    bad_files = [
        b"indirect_checks = 4\ngossip_interval = nan\n",
        b"indirect_checks = 4\nload_interval = inf\n",
        b"indirect_checks = 4\ncpus = \"0-99999999999\"\n",
        b"indirect_checks = 4\n# caf\xe9\n",
        b"indirect_checks = 4\nprobe_timeout = 5\n",  # not less than probe_interval 0.5
    ]
    for n, data in enumerate(bad_files, 1):
        conf.write_bytes(data)
        d.popen.send_signal(signal.SIGHUP)
        wait_for(lambda n=n: d.log().count("configuration left as it was") == n, 5,
                 f"bad reload {n} refused")
        assert d.alive() and d.json("get") == before, data
    log = d.log()
    assert "gossip_interval: 'nan' is not a finite number" in log and "not UTF-8" in log
    assert str(conf) in log
    time.sleep(1)
    assert d.alive() and d.ctl("nodes").code == 200
    # a good file still takes, several values at once
    conf.write_text("indirect_checks = 4\nprobe_interval = 0.2\nprobe_timeout = 0.1\n")
    d.popen.send_signal(signal.SIGHUP)
    wait_for(lambda: d.json("get")["indirect_checks"] == 4, 5, "good reload")
    assert (d.json("get")["probe_interval"], d.json("get")["probe_timeout"]) == (0.2, 0.1)


def test_nan_in_a_datagram_is_dropped_and_nodes_still_answers(workdir, reaper):
    d = start_daemon("nanins", base("127.0.0.46", None, "--insecure"), workdir)
    reaper.append(d)
    before = d.json("status")["packets"]["malformed"]
    forger = wire.Codec(None, 77, 5, 1)
    now = time.time()
    def change(**bad: object) -> dict:  # a membership change carrying a bad entry
        return {"b": [{"k": "a", "e": {**fake_entry(77), **bad}}]}

    bad = [
        forger.encode(wire.HELLO, {"entry": {**fake_entry(77), "load": float("nan")}}, now),
        forger.encode(wire.GOSSIP, change(mem=float("inf")), now),
        forger.encode(wire.GOSSIP, change(speed=1e308 * 10), now),
        forger.encode(wire.GOSSIP, change(util=-1.0), now),
        forger.encode(wire.GOSSIP, change(jobs=-5), now),
        forger.encode(wire.GOSSIP, change(age=10**400), now),
        forger.encode(wire.PING, {"seq": 1, "to": 46, "me": {**fake_entry(77), "runq": -1}},
                      now),
        forger.encode(wire.REQUEST, {"rid": 1, "pressure": float("nan"), "cpus": 1}, now),
    ]
    send_datagrams("127.0.0.46", bad)
    wait_for(lambda: d.json("status")["packets"]["malformed"] - before == len(bad), 3,
             f"{len(bad)} malformed datagrams counted")
    assert d.ctl("nodes").code == 200 and "fake77" not in d.nodes()
    assert d.ctl("node fake77").code != 500
    # the honest form of the same entry is taken: the drop was for the number alone
    send_datagrams("127.0.0.46", [forger.encode(wire.HELLO, {"entry": fake_entry(77)},
                                                time.time())])
    wait_for(lambda: "fake77" in d.nodes(), 3, "the honest entry")
    assert d.ctl("nodes").code == 200 and d.alive()


def test_second_daemon_on_a_state_dir_in_use_exits_4_touching_nothing(workdir, key, reaper):
    first = start_daemon("lockd", base("127.0.0.47", key), workdir)
    reaper.append(first)
    state = first.state_dir
    images = state / "images"
    images.mkdir(exist_ok=True)
    (images / "pages-1.img").write_bytes(b"a job's memory on its way")
    sock_inode = os.stat(first.socket).st_ino
    listing = sorted(p.name for p in state.iterdir())
    # another address and ports: only the directory is shared
    for extra in ([], ["--daemon", "--pidfile", str(workdir / "second.pid"),
                       "--log-file", str(workdir / "second.log")]):
        r = subprocess.run(omuscd_command([
            "--address", "127.0.0.48", "--port", str(PORT + 7), "--control-bind",
            "127.0.0.48", "--control-port", str(CTL + 7), "--key-file", key,
            "--state-dir", str(state), *extra]), capture_output=True, text=True, timeout=20)
        assert r.returncode == 4, r.stderr
        assert f"state directory {state} is in use by another daemon" in r.stderr
        assert f"pid {first.popen.pid}" in r.stderr
        assert (images / "pages-1.img").read_bytes() == b"a job's memory on its way"
        assert os.stat(first.socket).st_ino == sock_inode
        assert sorted(p.name for p in state.iterdir()) == listing
        assert first.alive() and first.ctl("version").code == 200
    assert not (workdir / "second.pid").exists()


def test_state_lock_survives_daemonizing(workdir, key):
    state = workdir / "dm"
    args = base("127.0.0.49", key, "--daemon", "--pidfile", str(workdir / "dm.pid"),
                "--log-file", str(workdir / "dm.log"), "--state-dir", str(state))
    r = subprocess.run(omuscd_command(args), capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    pid = int((workdir / "dm.pid").read_text())
    try:
        (state / "images").mkdir(exist_ok=True)
        (state / "images" / "keep").write_text("x")
        r = subprocess.run(omuscd_command(base("127.0.0.50", key, "--state-dir", str(state))),
                           capture_output=True, text=True, timeout=20)
        assert r.returncode == 4 and f"in use by another daemon (pid {pid})" in r.stderr
        assert (state / "images" / "keep").read_text() == "x"
    finally:
        with client.ControlClient.unix(str(state / "control.sock")) as c:
            assert c.command("shutdown").ok
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 5, "the daemon to exit")
    # the lock went with it: the directory can be used again
    d = subprocess.Popen(omuscd_command(base("127.0.0.50", key, "--state-dir", str(state))),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: client.ControlClient.unix(str(state / "control.sock")).command(
            "version").ok, 10, "a new daemon on the freed directory")
    finally:
        d.terminate()
        d.wait(10)
