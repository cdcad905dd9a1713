"""Balancing prefers fresh figures (#19): each node's figures have an age; a node whose
figures are too old to trust takes no job (ClusterView.why_not says so), and among
otherwise equal nodes the one with the fresher figures is chosen.  Pure logic, time
passed in."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from omuscd.balance import Candidate, NodeLoad, Policy, choose_node, imbalance
from omuscd.balance.core import Core
from omuscd.cluster.membership import STALE_MULT, Membership, Timing
from omuscd.cluster.view import ClusterView
from tests.fakes import balance_services, wire_entry


def test_figures_are_stale_after_a_multiple_of_their_interval_which_grows_with_n():
    """Under SWIM's constant bytes per node a node's figures reach another about every
    n/4 probe periods (never faster than the load is sampled): the limit grows with n."""
    t = Timing(probe_interval=0.5, load_interval=1.0)
    assert t.figures_interval(2) == 1.0 and t.figures_interval(8) == 1.0
    assert t.figures_interval(100) == pytest.approx(12.5)
    assert t.stale_after(2) == STALE_MULT * 1.0
    assert t.stale_after(1000) == pytest.approx(STALE_MULT * 125)
    assert Timing(probe_interval=0.2).stale_after(100) < t.stale_after(100)


def table(n_others: int = 1) -> Membership:
    me = wire_entry(1, boot=1001, name="me", flags=["criu"])
    me.pop("age")
    m = Membership(me, rng=random.Random(1))
    for i in range(2, 2 + n_others):
        m.merge(wire_entry(i, boot=1000 + i, flags=["criu"]), 100.0, "key")
    return m


def view(m: Membership) -> ClusterView:
    return ClusterView(m, SimpleNamespace(available=True))  # type: ignore[arg-type]


def test_why_not_says_how_old_the_figures_are():
    m = table()
    v = view(m)
    limit = v.stale_after()
    assert limit == m.timing.stale_after(2)
    assert v.why_not(2, moved=True, now=100.0 + limit - 0.1) == ""
    assert v.why_not(2, moved=True, now=100.0 + limit + 7) == f"figures {limit + 7:.0f} s old"
    # a job comes home whatever its home's figures; without a time, no age is judged
    assert v.why_not(2, moved=True, home=2, now=100.0 + limit + 7) == ""
    assert v.why_not(2, moved=True) == ""
    # fresh figures make it a taker again; an entry that arrives old counts its age
    m.merge(wire_entry(2, boot=1002, hb=4, flags=["criu"]), 200.0, "key")
    assert v.why_not(2, moved=True, now=201.0) == ""
    m.merge(wire_entry(2, boot=1002, hb=5, flags=["criu"], age=int((limit + 3) * 1000)),
            300.0, "key")
    assert v.why_not(2, moved=True, now=300.0).startswith("figures ")


def test_the_limit_grows_with_the_cluster_so_a_large_one_is_not_all_stale():
    """30 s old figures are too old in a pair, normal in a cluster of 200."""
    small, large = table(1), table(199)
    assert view(small).why_not(2, moved=True, now=130.0) == "figures 30 s old"
    assert view(large).why_not(2, moved=True, now=130.0) == ""


def test_the_balancer_takes_no_node_whose_figures_are_stale():
    """Core.loads asks the rule with the time: node b, idle by its last figures but
    silent for long, is no target, so nothing moves to it."""
    d = balance_services(4.0, 0.0)
    core = Core(d)
    now = 1000.0
    d.members.nodes[2].heard = now - 1.0
    loads = core.loads(now)
    assert loads[2].can_take and loads[2].age == 1.0
    target, _ = imbalance(loads[1], [loads[2]], Policy())
    assert target is not None and target.id == 2
    d.members.nodes[2].heard = now - 60.0
    loads = core.loads(now)
    assert not loads[2].can_take
    assert imbalance(loads[1], [loads[2]], Policy()) == (None, "no node can take a job")


def test_of_equal_nodes_the_one_with_fresher_figures_is_chosen():
    src = NodeLoad(1, "a", 1, 1000, 4.0)
    old, fresh = NodeLoad(2, "b", 1, 1000, 0.0, age=20.0), NodeLoad(3, "c", 1, 1000, 0.0,
                                                                     age=1.0)
    assert imbalance(src, [old, fresh], Policy())[0] is fresh
    # freshness decides between equals only: a less loaded node is still preferred
    busier = NodeLoad(3, "c", 1, 1000, 1.0, age=0.0)
    assert imbalance(src, [old, busier], Policy())[0] is old
    # placement of a new job too, after the home node (no transfer)
    c_old = Candidate(2, "b", 2, 1000, 0.0, 0, False, age=20.0)
    c_fresh = Candidate(3, "c", 2, 1000, 0.0, 0, False, age=1.0)
    assert choose_node([c_old, c_fresh]).id == 3
    assert choose_node([c_old, Candidate(1, "a", 2, 1000, 0.0, 0, True)]).id == 1
    full_old = Candidate(2, "b", 1, 1000, 3.0, 0, False, age=20.0)
    full_fresh = Candidate(3, "c", 1, 1000, 3.0, 0, False, age=1.0)
    assert choose_node([full_old, full_fresh]).id == 3


def test_no_job_is_moved_off_a_node_by_its_stale_figures():
    """A controller judges every node as a source: one whose figures are stale (busy
    then, perhaps idle now) is not one, however busy they say it is."""
    d = balance_services(0.0, 4.0)
    d.members.nodes[2].heard = 940.0
    loads = Core(d).loads(1000.0)
    assert not loads[2].fresh and loads[1].fresh
    target, why = imbalance(loads[2], [loads[1]], Policy())
    assert target is None and why == "b's figures are 60 s old"
    d.members.nodes[2].heard = 999.0
    loads = Core(d).loads(1000.0)
    assert imbalance(loads[2], [loads[1]], Policy())[0] is loads[1]
