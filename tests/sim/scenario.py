"""The runs the tests and the benchmark make, each a function of a simulator.

A cluster is formed the way daemons form one (``--peer`` to the first node): node 0 starts
alone and the others start ``spacing`` apart with node 0 as their seed; formation ends when
every node sees every other alive.  Then the figures:

- join_time: a new node starts; time until ``fraction`` of the nodes see it alive;
- crash_time: a random node stops for good; time until every live node sees it dead;
- false_alarms: run with loss and stalled nodes; dead/suspect events about live nodes;
- byte_rates: bytes sent per node per second over a window.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tests.sim.metrics import ByteMeter, Metrics
from tests.sim.network import NetConfig
from tests.sim.protocol import Factory
from tests.sim.simulator import Simulator


def alive(state: str | None) -> bool:
    return state == "alive"


def dead(state: str | None) -> bool:
    return state == "dead"


class NotFormed(AssertionError):
    """The cluster did not converge: every node seeing every other alive."""


def form(factory: Factory, n: int, net: NetConfig | None = None, seed: int = 1,
         spacing: float = 0.01, timeout: float = 300.0) -> Simulator:
    """``n`` nodes that all see each other alive (NotFormed after ``timeout`` simulated
    seconds past the last start)."""
    sim = Simulator(factory, net, seed=seed)
    first = sim.add_node(0.0)
    sim.add_nodes(n - 1, [first.address], start=spacing, spacing=spacing)
    sim.run_until(n * spacing)
    if sim.run_until_true(sim.converged, timeout, check_every=1.0) is None:
        raise NotFormed(f"{n} nodes not all alive to each other after {timeout}s: "
                        f"{describe_views(sim)}")
    return sim


def form_preloaded(factory: Factory, n: int, net: NetConfig | None = None, seed: int = 1,
                   settle: float = 10.0) -> Simulator:
    """``n`` nodes whose tables are filled before they start, each entry taken through the
    core's own Swim.learn (the path of an entry heard beside a probe), then started
    together (no seeds) and run ``settle`` seconds.  For the large runs: forming 1000
    nodes by joins costs minutes of CPU and is not what they measure (join_time measures
    a join).  Checked: every node sees every other alive afterwards (NotFormed if not)."""
    sim = Simulator(factory, net, seed=seed)
    nodes = [sim.add_node(0.0) for _ in range(n)]
    entries = [(node.proto.members.own_entry(), node.address) for node in nodes]
    shared: dict[int, dict[str, Any]] = {}
    for node in nodes:
        learn = node.proto.learn
        for entry, address in entries:
            if entry["id"] != node.id:
                learn(dict(entry), 0.0, address)
        node.proto.take_events()  # n - 1 joins each: not news to measure
        # every table holds the same first entry of a node: one dict for all (the core
        # replaces an entry, never changes one), so 5000 tables of 5000 fit in memory
        for nid, held in node.proto.members.nodes.items():
            held.entry = shared.setdefault(nid, held.entry)
    sim.run_until(0.0)  # started
    for node in nodes:
        # a preloaded table has nothing to pull: the second pull of a newcomer (for nodes
        # that joined together) would have each node pull every entry again, a page at a
        # time: 1000 pages each at 5000 nodes, into the bytes window
        node.proto.sync.repull_at = float("inf")
    sim.run_until(settle)
    if not sim.converged():
        raise NotFormed(f"{n} preloaded nodes not all alive to each other after {settle}s: "
                        f"{describe_views(sim)}")
    return sim


def describe_views(sim: Simulator) -> str:
    """The worst view of the cluster, for a failure message."""
    live = sim.live()
    worst = min(live, key=lambda o: sum(1 for n in live if o.state_of(n.id) == "alive"))
    states: dict[str, int] = {}
    for n in live:
        if n is not worst:
            s = str(worst.state_of(n.id))
            states[s] = states.get(s, 0) + 1
    return f"worst view ({worst}): {states}"


def join_time(sim: Simulator, fraction: float = 0.999, timeout: float = 60.0) -> float | None:
    """A node starts with node 0 as its seed: seconds until ``fraction`` of the nodes
    see it alive (None if not within ``timeout``)."""
    node = sim.add_node(None, [sim.nodes[0].address])
    w = sim.watch(node, alive, fraction)
    sim.run_until_true(lambda: w.reached_at is not None, timeout, check_every=0.01)
    sim.watches.remove(w)
    return w.took


def crash_time(sim: Simulator, timeout: float = 60.0) -> float | None:
    """A random live node (not node 0) stops for good: seconds until every live node sees
    it dead (None if not within ``timeout``)."""
    victim = sim.rng.choice([n for n in sim.live()[1:]])
    sim.crash(victim)
    sim.run_until(sim.now)
    w = sim.watch(victim, dead, 1.0)
    sim.run_until_true(lambda: w.reached_at is not None, timeout, check_every=0.01)
    sim.watches.remove(w)
    return w.took


@dataclass
class Alarms:
    """What false_alarms() counted."""

    seconds: float
    loss: float
    stalls: int
    false_deaths: int  # (observer, node) pairs: one node dead at 999 observers counts 999
    false_deaths_of_stalled: int
    nodes_falsely_dead: int  # distinct live nodes declared dead anywhere
    false_suspicions: int
    suspicions_of_stalled: int
    dead_in_tables: int
    byte_rates: list[float] = field(default_factory=list)
    events: dict[str, int] = field(default_factory=dict)


def false_alarms(sim: Simulator, seconds: float, loss: float, stalled_fraction: float = 0.01,
                 stall: float = 2.0, stalls_per_minute: float = 1.0,
                 progress: Callable[[float, Metrics], None] | None = None) -> Alarms:
    """Run ``seconds`` with ``loss`` while ``stalled_fraction`` of the nodes (at least one)
    each stall for ``stall`` seconds at random times (a Poisson process of
    ``stalls_per_minute``); count dead and suspect events about nodes that are live.
    ``progress(elapsed, metrics)`` is called every simulated minute."""
    sim.net.cfg.loss = loss
    live = sim.live()
    chosen = sim.rng.sample(live, max(1, round(stalled_fraction * len(live)))) \
        if stalled_fraction > 0 and stalls_per_minute > 0 and stall > 0 else []
    stalls = 0
    for node in chosen:
        t = sim.now + sim.rng.expovariate(stalls_per_minute / 60.0)
        while t + stall < sim.now + seconds:
            sim.stall(node, stall, at=t)
            stalls += 1
            t += stall + sim.rng.expovariate(stalls_per_minute / 60.0)
    metrics = Metrics(sim)
    meter = ByteMeter(sim)
    end = sim.now + seconds
    while sim.now < end:
        sim.run_until(min(end, sim.now + 60.0))
        if progress is not None:
            progress(seconds - (end - sim.now), metrics)
    sim.observers.remove(metrics.on_events)
    fd = metrics.false_deaths
    fs = metrics.false_suspicions
    return Alarms(seconds, loss, stalls, len(fd), sum(a.stalled for a in fd),
                  len({a.subject for a in fd}), len(fs),
                  sum(a.stalled for a in fs), metrics.table_false_deaths(), meter.rates(),
                  dict(metrics.events))


def byte_rates(sim: Simulator, seconds: float) -> list[float]:
    """Bytes per second sent by each node live throughout the next ``seconds``."""
    meter = ByteMeter(sim)
    sim.run_for(seconds)
    return meter.rates()


def summary(rates: list[float]) -> dict[str, Any]:
    """Mean, median and largest of per-node byte rates."""
    return {"mean": statistics.fmean(rates), "median": statistics.median(rates),
            "max": max(rates), "nodes": len(rates)}


def memberlist_suspicion(n: int, probe_interval: float = 1.0, mult: float = 4.0) -> float:
    """memberlist's suspicion timeout (the issue's anchor): mult * log10(N+1) periods."""
    return mult * max(1.0, math.log10(n + 1)) * probe_interval
