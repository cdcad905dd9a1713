"""An 8-node LAN in network namespaces: discovery by broadcast alone, with the default
timings (a joiner known to all within 2 s, a silent node dead within 6 s)."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from omuscd.version import RELEASE
from tests.cluster import (
    LAN_SIZE,
    broadcast_lan,  # noqa: F401 (the "cluster" fixture)
    can_netns,
    start_daemon,
    telnet,
    wait_for,
)

REASON = can_netns()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

N = LAN_SIZE


def test_plug_and_pray_choices(cluster):
    lan, _, _, daemons = cluster
    st = daemons[3].json("status")
    assert st["interface"] == "eth0" and st["address"] == lan.address(3)
    assert "no default route" in st["interface_source"]
    assert st["broadcast"] == "198.18.0.255" and st["peers"] == []
    assert st["id"] == 13 and st["id_source"] == "from the address"
    assert st["control"] == "127.0.0.1:4271" and st["security"] == "key"


def test_broadcast_discovery_and_join_within_two_seconds(cluster):
    lan, work, key, daemons = cluster
    joiner = start_daemon(f"node{N - 1}", ["--key-file", str(key)], work, netns=lan.ns(N - 1))
    daemons.append(joiner)
    ready = time.monotonic()
    wait_for(lambda: all(f"node{N - 1}" in d.nodes() for d in daemons[:-1])
             and len(joiner.nodes()) == N - 1, 5, "everyone to know the joiner")
    took = time.monotonic() - ready
    print(f"\njoin known to all {N} nodes (both ways) {took:.2f}s after the joiner was ready")
    assert took <= 2.0
    for d in daemons:
        states = {v["state"] for v in d.nodes().values()}
        assert states == {"alive"}, (d.name, states)


def test_dead_within_ten_seconds_and_back_after_restart(cluster):
    """A SIGKILLed node is dead at every other within dead_timeout (10 s: SWIM's longest
    suspicion; confirmations from the others shorten it, 2.5-7 s measured), and alive
    again once its daemon is back (started again whatever the figure: the tests after
    this one need it)."""
    lan, work, key, daemons = cluster
    victim = daemons[-1]
    others = daemons[:-1]
    name = victim.name
    victim.stop(signal.SIGKILL)
    killed = time.monotonic()
    try:
        wait_for(lambda: all(d.nodes()[name]["state"] == "dead" for d in others), 12,
                 f"{name} dead everywhere", interval=0.02)
        took = time.monotonic() - killed
        print(f"\nkilled node dead at all {len(others)} others after {took:.2f}s")
        assert took <= 10.0 + 0.3  # dead_timeout, plus polling 7 control sockets
        assert all(d.nodes()[name]["state"] == "dead" for d in others)
    finally:
        daemons[-1] = start_daemon(name, ["--key-file", str(key)], work, netns=lan.ns(N - 1))
    wait_for(lambda: all(d.nodes()[name]["state"] == "alive" for d in others), 3,
             f"{name} alive again")
    assert "restarted" in others[0].log()


def test_graceful_stop_is_gone_at_once(cluster):
    _, _, _, daemons = cluster
    leaver = daemons[-1]
    assert leaver.stop(signal.SIGTERM) == 0
    took = wait_for(lambda: all(leaver.name not in d.nodes() for d in daemons[:-1]), 2,
                    "the leaver to be gone everywhere")
    assert took < 1.0


def test_telnet_inside_a_namespace(cluster):
    lan = cluster[0]
    if subprocess.run(["which", "telnet"], capture_output=True).returncode:
        pytest.skip("the telnet client is not installed (the README's test command installs it)")
    text = telnet("127.0.0.1", 4271, [("nodes\n", 0.5), ("quit\n", 0.5)], netns=lan.ns(0))
    assert f"220 omuscd-{RELEASE} node node0 (id 10)" in text
    for i in range(1, N - 1):
        assert f"198.18.0.{10 + i}:4270" in text
    assert "221 bye" in text
