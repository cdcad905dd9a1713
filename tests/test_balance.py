"""Automatic balancing between real daemons (two namespaces, each lending one CPU), with
real CRIU moves, in both topologies; and the policy on its own."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from omuscd.balance import JobLoad, NodeLoad, Policy, decide
from omuscd.balance.core import Core
from omuscd.events import Event
from tests.cluster import (
    balance_lan,  # noqa: F401 (the "cluster" fixture)
    ordinary_user,
    wait_for,
)
from tests.fakes import balance_services

PY = sys.executable
HOG = "import sys\nwhile True: pass\n"


def node(i: int, load: float, cpus: int = 1, **kw) -> NodeLoad:
    return NodeLoad(i, f"n{i}", cpus, 1000, load, **kw)


def job(i: int, **kw) -> JobLoad:
    base = {"id": f"1.{i}", "home": 1, "rss_mb": 10.0, "age": 60.0,
            "since_move": float("inf"),
            "stay": False, "cannot_move": ""}
    return JobLoad(**{**base, **kw})


def test_policy_moves_only_what_helps():
    p = Policy(min_age=1.0)
    d = decide(node(1, 4.0), [node(2, 0.0)], [job(1), job(2)], p)
    assert d.target == 2 and d.job is not None
    assert decide(node(1, 2.0), [node(2, 2.0)], [job(1)], p).job is None  # balanced
    # 2 against 1 on one CPU each: moving one would only reverse it
    assert "reverse" in decide(node(1, 2.0), [node(2, 1.0)], [job(1)], p).reason
    assert "reverse" in decide(node(1, 1.0), [node(2, 0.07)], [job(1)], p).reason
    # 2 against an idle node showing some noise (0.3): the gap narrows, so move
    assert decide(node(1, 2.0), [node(2, 0.3)], [job(1)], p).target == 2
    # of equal jobs, an even serial number first (consecutive jobs are split between
    # nodes), the first given of them; an odd one when no even one can move
    assert decide(node(1, 4.0), [node(2, 0.0)], [job(12), job(9), job(10)], p).job == "1.10"
    assert decide(node(1, 4.0), [node(2, 0.0)], [job(9), job(11)], p).job == "1.9"
    # an even one that is nearly old enough is waited for (2 against 0: min_age / 2)
    wait = decide(node(1, 2.0), [node(2, 0.0)], [job(9), job(10, age=0.3)], p)
    assert wait.job is None and wait.retry_in == pytest.approx(0.2)
    # memory within one step counts as equal; a cheaper step goes first
    assert decide(node(1, 4.0), [node(2, 0.0)], [job(1, rss_mb=3.0), job(2, rss_mb=9.0)],
                  p).job == "1.2"
    assert decide(node(1, 4.0), [node(2, 0.0)], [job(2, rss_mb=90.0), job(1, rss_mb=3.0)],
                  p).job == "1.1"
    # too young only: the balancer is told when to look again
    soon = decide(node(1, 2.0), [node(2, 0.0)], [job(1, age=0.1), job(2, age=0.25)], p)
    assert soon.job is None and soon.retry_in == pytest.approx(0.25)
    assert decide(node(1, 4.0), [node(2, 0.0, can_take=False)], [job(1)], p).job is None
    young = decide(node(1, 2.0), [node(2, 0.0)], [job(1, age=0.25)], p)
    assert young.job is None and "younger than 0.5s" in young.reason
    landed = decide(node(1, 4.0), [node(2, 0.0)], [job(1, since_move=2.0)], p)
    assert landed.job is None and "landed" in landed.reason
    big = decide(node(1, 4.0), [node(2, 0.0)], [job(1, rss_mb=9000.0, age=10.0)], p)
    assert big.job is None and "cost more" in big.reason
    home = decide(node(1, 4.0), [node(2, 0.0), node(3, 0.0)],
                  [job(1), job(2, home=2, rss_mb=50.0)], p)
    assert (home.job, home.target) == ("1.2", 2)  # a guest goes home first
    faster = decide(node(1, 3.0), [NodeLoad(2, "slow", 1, 500, 0.4),
                                   NodeLoad(3, "fast", 1, 2000, 0.4)], [job(1)], p)
    assert faster.target == 3


def test_the_busier_the_source_the_younger_a_job_may_move():
    """Harchol-Balter and Downey's criterion: worth moving when age > cost / (n - m).  A
    job behind seven others goes after an eighth of min_age; one job too many waits the
    whole of it; a job's memory raises its cost the same way."""
    p = Policy(min_age=1.0, transfer_mb_s=100.0, cost_share=0.5)
    young = [job(2, age=0.15)]
    assert decide(node(1, 8.0), [node(2, 0.0)], young, p).job == "1.2"
    refused = decide(node(1, 4.0), [node(2, 0.0)], young, p)
    assert refused.job is None and "younger than 0.25s" in refused.reason
    assert refused.retry_in == pytest.approx(0.1)
    assert decide(node(1, 2.0), [node(2, 0.0)], [job(2, age=0.45)], p).job is None
    assert decide(node(1, 2.0), [node(2, 0.0)], [job(2, age=0.5)], p).job == "1.2"
    # 100 MB at 100 MB/s, paid at half its age: 2 s of age, 1 s with a gap of 2
    big = [job(2, rss_mb=100.0, age=0.8)]
    costly = decide(node(1, 2.0), [node(2, 0.0)], big, p)
    assert costly.job is None and "cost more" in costly.reason
    assert costly.retry_in == pytest.approx(0.2)
    assert decide(node(1, 4.0), [node(2, 0.0)], big, p).job == "1.2"


def test_a_move_is_counted_once_when_the_source_tells_its_load_at_once():
    """The source counts its jobs the moment one has left (often before the move is over
    where it was decided); the move made there must not then be taken off that figure a
    second time.  Nor may the target's figure count the job twice."""
    import trio

    from omuscd.balance import Decision
    from omuscd.balance.core import Core

    async def act(job: str, what: str, sig: int, to: str) -> str:
        d.sampler.last.load = 6.0  # the source's own count, at once
        await trio.sleep(0.1)
        d.members.nodes[2].entry["load"] = 1.0  # the target's, gossiped once it runs there
        return "moved"

    d = balance_services(7.0, 0.0, act)

    async def main() -> dict[int, float]:
        bal = Core(d)
        await bal.move(Decision("1.1", 2, "test"), 1)
        return {n: x.demand for n, x in bal.loads(trio.current_time()).items()}

    assert trio.run(main) == {1: 6.0, 2: 1.0}


def test_moves_made_while_jobs_still_start_are_not_taken_off_twice():
    """Eight jobs started at once: the first move is decided while this node counts 5 of
    them, and three moves later it has 5 and the target 3.  Its own count shows that;
    the moves corrected against the figure of 5 made it 2 (and then 4 against 4, for
    PENDING_FOR: the fourth move waited 3 s while the target could have run it)."""
    import trio

    from omuscd.balance import Decision
    from omuscd.balance.core import Core

    own = iter([7.0, 6.0, 5.0])  # after each move (the other jobs have started by then)

    async def act(job: str, what: str, sig: int, to: str) -> str:
        d.sampler.last.load = next(own)
        await trio.sleep(0.05)
        d.members.nodes[2].entry["load"] += 1.0
        return "moved"

    d = balance_services(5.0, 0.0, act)

    async def main() -> dict[int, float]:
        bal = Core(d)
        for i in range(3):
            await bal.move(Decision(f"1.{i}", 2, "test"), 1)
        return {n: x.demand for n, x in bal.loads(trio.current_time()).items()}

    assert trio.run(main) == {1: 5.0, 2: 3.0}


def test_a_move_the_target_has_counted_is_not_added_again_after_a_job_ends_there():
    """The target counts the jobs moved in and gossips the count with its load.  When it
    has counted the move, its figure is believed: here its other job ends just after,
    and it is idle with one job; judged by how far its figure had moved (what a node
    that gossips no count still gets), it looked busy with two for PENDING_FOR."""
    import trio

    from omuscd.balance import Decision
    from omuscd.balance.core import Core

    async def act(job: str, what: str, sig: int, to: str) -> str:
        d.sampler.last.load = 2.0
        b = d.members.nodes[2].entry
        b["load"] = 2.0
        if "moves" in b:
            b["moves"] = [b["moves"][0] + 1, b["moves"][1]]  # counted as the job landed
        await trio.sleep(0.05)
        b["load"] = 1.0  # and its other job ended
        return "moved"

    async def main() -> float:
        bal = Core(d)
        await bal.move(Decision("1.1", 2, "test"), 1)
        return bal.loads(trio.current_time())[2].demand

    d = balance_services(3.0, 1.0, act, b_moves=[4, 2])
    assert trio.run(main) == 1.0
    d = balance_services(3.0, 1.0, act)  # an older node, no counts: the old way
    assert trio.run(main) == 2.0


def test_moves_made_faster_than_the_target_gossips_stay_pending_each():
    """Three moves to a node whose gossip has shown only the first of them: the other
    two are still counted on its figure (each waits for its own count; all three had
    waited for the first, and the next look sent a fifth job to a node that had four)."""
    import trio

    from omuscd.balance import Decision
    from omuscd.balance.core import Core

    async def act(job: str, what: str, sig: int, to: str) -> str:
        d.sampler.last.load -= 1.0
        await trio.sleep(0.05)
        return "moved"

    d = balance_services(8.0, 0.0, act, b_moves=[0, 0])

    async def main() -> float:
        bal = Core(d)
        for i in range(3):
            await bal.move(Decision(f"1.{i}", 2, "test"), 1)
        b = d.members.nodes[2].entry
        b["load"], b["moves"] = 1.0, [1, 0]  # its gossip, sent when the first landed
        return bal.loads(trio.current_time())[2].demand

    assert trio.run(main) == 3.0


def test_the_source_counts_a_move_out_with_its_load_while_the_frozen_copy_is_stopped():
    """The balancer looks again the moment a move is over: the source must by then have
    counted the job out, with its load, as the target counts it in.  Counted once the
    copy's processes were reaped, it came too late (a fifth job went to a node with
    four); counted after the kill, the dying copy showed as runnable."""
    import signal
    from types import SimpleNamespace

    from omuscd import proctab
    from omuscd.daemon import Daemon
    from omuscd.migrate.node import Migrations

    copy = subprocess.Popen(["sleep", "30"])
    os.kill(copy.pid, signal.SIGSTOP)
    wait_for(lambda: proctab.scan()[copy.pid].state == b"T", 5, "the copy to stop")
    seen: list[tuple[list[int], bytes]] = []
    d = SimpleNamespace(moves=[3, 1], cfg=SimpleNamespace(state_dir="/nonexistent"))
    d.jobs_changed = lambda: seen.append((list(d.moves), proctab.scan()[copy.pid].state))
    jc = SimpleNamespace(guests={}, node_name=lambda n: "b")
    job = SimpleNamespace(id="1.1", pid=copy.pid, launcher=None, node_changed=False)
    m = Migrations(jc, d)
    m.listen(lambda what: Daemon._on_move(d, what))  # as the daemon wires it
    try:
        m.source.drop_copy(job, 2)
    finally:
        copy.kill()
    assert copy.wait(5) == -signal.SIGKILL
    assert seen == [([3, 2], b"T")]



def test_news_of_room_ends_the_backoff_of_a_request_nobody_answered():
    """No node volunteered (the other had 3 jobs and room held for one more), so this
    node waits before asking again, 4 s at the third try.  Jobs ending there meanwhile
    ended the wait only when it ran out; the news that the node has room ends it now.
    Less than a job's worth of change does not."""

    import trio

    from omuscd.balance.core import Core
    from omuscd.balance.peer import Peer

    d = balance_services(4.0, 3.0, None)

    async def main() -> list[bool]:
        bal = Peer(Core(d))
        far = trio.current_time() + 4.0
        bal.backoff_until, bal.backoff_demand = far, {2: 3.0}
        seen = []
        for b_load in (3.0, 2.5):  # no news, then less than a job's worth
            d.members.nodes[2].entry["load"] = b_load
            await bal.tick(trio.current_time())
            seen.append(bal.backoff_until == far)
        d.members.nodes[2].entry["load"] = 1.0  # two of its jobs ended
        d.sampler.last.load = 1.0  # (and so did ours: nothing to move, the wait is over)
        await bal.tick(trio.current_time())
        return [*seen, bal.backoff_until == far]

    assert trio.run(main) == [True, True, False]


def test_room_held_for_a_move_that_does_not_come_is_free_again():
    """A node that offered room holds it for offer_hold (5 s): counted as a job more.  A
    move that then failed (a job frozen before its init had started, refused by CRIU)
    left it looking a job busier for those 5 s: it volunteered for nothing while the busy
    node backed off.  A refused or abandoned incoming move frees the room."""
    from types import SimpleNamespace

    import trio

    from omuscd.balance.balancer import Balancer
    from omuscd.daemon import Daemon
    from omuscd.migrate.node import Migrations

    s = balance_services(3.0, 5.0, None)
    d = SimpleNamespace(cfg=SimpleNamespace(state_dir="/nonexistent"), balancer=Balancer(s),
                        mover=SimpleNamespace(available=True), name="a", moves=[0, 0])
    said = []

    async def send(msg):
        said.append(msg["op"])

    async def main() -> tuple[int, int]:
        d.balancer.core.held = [trio.current_time() + 5.0]
        before = d.balancer.core.loads(trio.current_time())[1].pending
        m = Migrations(SimpleNamespace(), d)
        m.listen(lambda what: Daemon._on_move(d, what))  # as the daemon wires it
        await m.target.immigrate(SimpleNamespace(send=send), {})
        return before, d.balancer.core.loads(trio.current_time())[1].pending

    assert trio.run(main) == (1, 0)
    assert said == ["refused"]


def test_a_job_still_starting_is_not_picked_to_move():
    """A job whose init has not yet made itself the session leader and started the command
    cannot be dumped (CRIU: the session leader is outside the PID namespace); the balancer
    picked such jobs a tenth of a second old, froze them, failed and resumed them."""
    from types import SimpleNamespace

    from omuscd import proctab
    from omuscd.jobs.process import starting

    loose = subprocess.Popen([PY, "-c", "import time; time.sleep(30)"])  # no session yet
    ready = subprocess.Popen(["setsid", "sh", "-c", "sleep 30 & wait"])
    try:
        wait_for(lambda: len(proctab.tree(ready.pid)) == 2, 10, "the command to start")
        # started here: launched by unshare (any process stands in for it here)
        assert starting(SimpleNamespace(pid=loose.pid, launcher=os.getpid()))
        assert not starting(SimpleNamespace(pid=ready.pid, launcher=os.getpid()))
        assert starting(SimpleNamespace(pid=None, launcher=loose.pid))  # init not forked
        # restored or adopted here: it has started, whatever its shape
        assert not starting(SimpleNamespace(pid=loose.pid, launcher=None))
    finally:
        for p in (loose, ready):
            os.killpg(p.pid, 9) if p is ready else p.kill()
            p.wait()


def hogs(n, count: int, tag: str) -> list[str]:
    jobs = []
    for _ in range(count):
        r = subprocess.run([PY, "-m", "omuscd", "run", "--connect", n["a"].socket, "--home",
                            "--detach", "--", PY, "-c", HOG, f"omuscd-balance-test-{tag}"],
                           capture_output=True, text=True, cwd="/tmp")
        assert r.returncode == 0, r.stderr
        jobs.append(r.stdout.strip())
    return jobs


def spread(n, jobs: list[str]) -> list[str]:
    listing = {j["id"]: j for j in n["a"].json("jobs")["jobs"]}
    return sorted(listing[j]["node_name"] for j in jobs)


def decisions(n) -> str:
    """Both nodes' balancing lines: what a failed assertion should show."""
    return "\n".join(f"{name}: {ln}" for name in "ab" for ln in n[name].log().splitlines()
                     if "balancing" in ln or "migrated" in ln)


def kill_all(n, jobs: list[str]) -> None:
    for j in jobs:
        n["a"].ctl(f"kill {j} KILL")
    try:
        wait_for(lambda: n["a"].json("nodes")["nodes"][0]["jobs"] == 0 and
                 all(v["jobs"] == 0 for v in n["a"].nodes().values()), 10, "the jobs to end")
    except AssertionError as e:  # say what is left, and why, and what runs
        busy = subprocess.run(["ps", "-eo", "pid,ppid,stat,pcpu,psr,etime,args",
                               "--sort=-pcpu"], capture_output=True, text=True).stdout
        raise AssertionError(f"{e}\n{n['a'].ctl('jobs --all').text}\n{counts(n)}\n"
                             f"{decisions(n)}\n{busy[:1500]}") from None


def counts(n) -> str:
    """Each node's cluster processes, as it gossips them and as each sees the others."""
    return "\n".join(f"{name}: " + ", ".join(f"{k} {v['jobs']}" for k, v in d.nodes().items())
                     for name, d in n.items())


def test_peer_to_peer_spreads_four_jobs_two_and_two_without_ping_pong(cluster):
    n = cluster
    jobs = hogs(n, 4, "peer")
    try:
        took = wait_for(lambda: spread(n, jobs) == ["a", "a", "b", "b"], 40, "2 and 2")
        print(f"\npeer: four jobs spread two and two in {took:.1f}s")
        moves = {j: n["a"].json(f"job {j}")["migrations"] for j in jobs}
        time.sleep(8)  # steady state: nothing should keep moving
        assert spread(n, jobs) == ["a", "a", "b", "b"], decisions(n)
        for j in jobs:
            assert n["a"].json(f"job {j}")["migrations"] <= moves[j] + 1, decisions(n)
        assert "balancing: a" in n["a"].log() or "balancing: " in n["a"].log()
    finally:
        kill_all(n, jobs)


def test_a_blocked_node_receives_nothing(cluster):
    n = cluster
    # blocked from the other node (block NODE travels over the cluster channel)
    r = n["a"].ctl("block b")
    assert r.ok and r.text == "b: blocked: on", r.text
    assert n["a"].ctl("block nosuchnode").code == 500
    jobs = hogs(n, 4, "blocked")
    try:
        wait_for(lambda: "blocked" in n["a"].nodes()["b"]["flags"], 5, "b blocked")
        time.sleep(6)
        assert spread(n, jobs) == ["a", "a", "a", "a"]
        assert "no node can take a job" in n["a"].log()
    finally:
        assert n["a"].ctl("noblock b").ok
        wait_for(lambda: "blocked" not in n["a"].nodes()["b"]["flags"], 5, "b open again")
        kill_all(n, jobs)


def test_controller_drone_and_losing_the_controller(cluster):
    n = cluster
    assert n["a"].ctl("topology drone").ok and n["b"].ctl("topology drone").ok
    jobs = hogs(n, 4, "drone")
    try:
        wait_for(lambda: "balancing stopped: no controller" in n["a"].log(), 10,
                 "a to say balancing stopped")
        time.sleep(4)
        assert spread(n, jobs) == ["a", "a", "a", "a"]  # without a controller: no moves
        assert n["b"].ctl("topology controller").ok  # the controller returns
        took = wait_for(lambda: spread(n, jobs) == ["a", "a", "b", "b"], 40, "2 and 2")
        print(f"\ncontroller: four jobs spread two and two in {took:.1f}s")
        wait_for(lambda: "balancing resumed" in n["a"].log(), 5, "a to say it resumed")
        assert "balancing: " in n["b"].log()  # the controller decided the moves
    finally:
        n["a"].ctl("topology peer")
        n["b"].ctl("topology peer")
        kill_all(n, jobs)


def test_reclaim_empties_a_node_whose_owner_load_rises(cluster):
    n = cluster
    jobs = hogs(n, 4, "reclaim")
    owner: list[subprocess.Popen[bytes]] = []
    try:
        wait_for(lambda: spread(n, jobs) == ["a", "a", "b", "b"], 40, "2 and 2")
        assert n["b"].ctl("set reclaim_above 0.8").ok
        # the owner of b starts work of their own on the CPU b lends (CPU 1)
        owner = [subprocess.Popen([PY, "-c", HOG, "omuscd-balance-test-owner"],
                                  preexec_fn=lambda: os.sched_setaffinity(0, {1}))
                 for _ in range(2)]
        wait_for(lambda: spread(n, jobs) == ["a", "a", "a", "a"], 30,
                 "b to send its guests home")
        # b's own balancer may send them before reclaim's hold has passed; either way
        # reclaim then closes the node
        wait_for(lambda: "blocked" in n["a"].nodes()["b"]["flags"], 10, "b to be blocked")
        assert "reclaim: the owner's load" in n["b"].log()
        for p in owner:
            p.kill()
            p.wait()
        wait_for(lambda: "blocked" not in n["a"].nodes()["b"]["flags"], 20, "b to open again")
        assert "open again" in n["b"].log()
    finally:
        for p in owner:
            p.kill()
        n["b"].ctl("set reclaim_above off")
        kill_all(n, jobs)


def test_an_ordinary_users_jobs_are_balanced_too(cluster):
    """Two busy jobs of an ordinary user on one CPU of a, none on b: one of them moves
    (the dump of a user's job failed before, "Can't get rlimit", so the balancer moved
    only root's)."""
    n = cluster
    # open, whatever an earlier test left (reclaim closes b for a while)
    wait_for(lambda: "blocked" not in n["a"].nodes()["b"]["flags"], 30, "b to be open")
    with ordinary_user("bal") as user:
        jobs = []
        for _ in range(2):
            r = user.run(user.run_argv(n["a"].socket, "--home", "--detach", "--",
                                       "/usr/bin/python3", "-c", HOG,
                                       "omuscd-balance-test-user"))
            assert r.returncode == 0, r.stderr
            jobs.append(r.stdout.decode().strip())
        try:
            assert {n["a"].json(f"job {j}")["owner"] for j in jobs} == {user.name}
            try:
                wait_for(lambda: spread(n, jobs) == ["a", "b"], 30, "one job to move to b")
            except AssertionError as e:
                raise AssertionError(f"{e}\n{decisions(n)}") from None
            failed = [ln for ln in n["a"].log().splitlines()
                      if "failed" in ln and any(f"job {j} " in ln for j in jobs)]
            assert not failed, failed
        finally:
            kill_all(n, jobs)


def test_a_steady_refusal_is_said_once_whatever_its_figures_a_new_one_and_moves_each_time():
    """The balancer looks every interval; a refusal that stands ("a is loaded (...) but
    no job can move: ...") is logged once, not again each time the loads in it change (at
    60 nodes they changed at every look: a log line a second).  A different refusal, and
    every move, are said."""
    events: list[Event] = []
    s = balance_services(3.0, 0.0)
    s.publish = events.extend
    core = Core(s)
    for load in ("3.00", "2.97", "3.12"):
        core.say(f"balancing: a is loaded (a {load}, b 0.00) but no job can move: 1.4: "
                 "told to stay", steady=True)
    for age in (12, 13):  # seconds change too
        core.say(f"balancing: n12's figures are {age} s old", steady=True)
    core.say("balancing: n5's figures are 13 s old", steady=True)  # another node: news
    core.say("balancing: a is loaded (a 3.01, b 0.00) but no job can move: 1.5: told to "
             "stay", steady=True)  # another job: news
    core.say("balancing: no node can take a job", steady=True)
    for load in ("3.00", "2.00"):
        core.say(f"balancing: a {load} -> b 0.00: job 1.4 moved")
    assert [e.text for e in events] == [
        "balancing: a is loaded (a 3.00, b 0.00) but no job can move: 1.4: told to stay",
        "balancing: n12's figures are 12 s old", "balancing: n5's figures are 13 s old",
        "balancing: a is loaded (a 3.01, b 0.00) but no job can move: 1.5: told to stay",
        "balancing: no node can take a job",
        "balancing: a 3.00 -> b 0.00: job 1.4 moved", "balancing: a 2.00 -> b 0.00: job 1.4 moved"]
