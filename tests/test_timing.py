"""The daemon's timer loop under trio's MockClock: two real daemons in one trio run,
talking over loopback UDP, with virtual time, so timeouts are checked exactly."""

import itertools

import pytest
import trio
import trio.testing

from omuscd import config
from tests.cluster import inprocess_daemon as make


def run_virtual(fn):
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0.02))


def test_join_suspect_dead_on_virtual_time(workdir):
    a = make(workdir, "127.0.0.21", 14270)
    b = make(workdir, "127.0.0.22", 14270, peers=["127.0.0.21:14270"])
    seen: dict[str, float] = {}

    async def main():
        events = a.bus.subscribe()
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            b_scope = trio.CancelScope()

            async def run_b(task_status=trio.TASK_STATUS_IGNORED):
                with b_scope:
                    await b.run(task_status=task_status)

            await nursery.start(run_b)
            t_start = trio.current_time()  # b is ready (its start-up ran real subprocesses)
            async for ev in events:
                seen[ev.kind] = trio.current_time()
                if ev.kind == "join":
                    seen["join"] -= t_start
                    await trio.sleep(4)  # steady state: stays alive, no false suspicion
                    assert a.members.nodes[b.node_id].state == "alive"
                    b_scope.cancel()  # b crashes: no departure message
                    seen["crash"] = trio.current_time()
                if ev.kind == "dead":
                    break
            nursery.cancel_scope.cancel()

    run_virtual(main)
    assert seen["join"] < 0.6  # the unicast HELLO to the seed arrives at once
    suspect, dead = seen["suspect"] - seen["crash"], seen["dead"] - seen["crash"]
    # SWIM: a's next probe of b leaves within a probe interval (0.5 s) of the crash and
    # b is suspect when that period ends without an ack (nobody else to ask); with two
    # nodes nobody can confirm, so the suspicion lasts its minimum, suspicion_mult (4)
    # times max(1, log10 2) probe intervals: 2 s
    assert 0.5 - 0.05 <= suspect <= 1.0 + 0.05, suspect
    assert dead - suspect == pytest.approx(2.0, abs=0.05), (suspect, dead)


def test_tunables_apply_at_once(workdir):
    a = make(workdir, "127.0.0.23", 14272)
    b = make(workdir, "127.0.0.24", 14272, peers=["127.0.0.23:14272"])
    seen: dict[str, float] = {}

    async def main():
        events = a.bus.subscribe()
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            scope = trio.CancelScope()

            async def run_b(task_status=trio.TASK_STATUS_IGNORED):
                with scope:
                    await b.run(task_status=task_status)

            await nursery.start(run_b)
            async for ev in events:
                if ev.kind == "join":
                    a.set_tunable("dead_timeout", 60)
                    a.set_tunable("suspicion_mult", 40)  # 40 * 0.5 s: 20 s
                    scope.cancel()
                    seen["crash"] = trio.current_time()
                if ev.kind == "dead":
                    seen["dead"] = trio.current_time()
                    break
            nursery.cancel_scope.cancel()

    run_virtual(main)
    # suspect within 0.5 to 1 s of the crash (see above), dead 20 s later
    assert 20.45 <= seen["dead"] - seen["crash"] <= 21.05


def test_departure_is_seen_at_once(workdir):
    a = make(workdir, "127.0.0.25", 14274)
    b = make(workdir, "127.0.0.26", 14274, peers=["127.0.0.25:14274"])
    seen: dict[str, float] = {}

    async def main():
        events = a.bus.subscribe()
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await nursery.start(b.run)
            async for ev in events:
                if ev.kind == "join":
                    b.request_shutdown("test")
                    seen["stop"] = trio.current_time()
                if ev.kind in ("leave", "dead", "suspect"):
                    seen[ev.kind] = trio.current_time()
                    break
            nursery.cancel_scope.cancel()

    run_virtual(main)
    assert "leave" in seen and seen["leave"] - seen["stop"] < 0.1


@pytest.mark.parametrize("key", ["gossip_interval", "dead_timeout"])
def test_bad_tunable_changes_nothing(workdir, key):
    a = make(workdir, "127.0.0.27", 14276)
    before = a.tunables()
    with pytest.raises(config.ConfigError):
        a.set_tunable(key, "0.001")
    assert a.tunables() == before


def test_an_idle_daemon_wakes_only_for_its_probes(workdir):
    """Idle, the timer loop runs about once per probe period: load samples ride along
    with the probes' ticks, an ack that ends the wait for a probe timeout moves the
    alarm instead of leaving a wake-up for nothing, and a change that can go to nobody
    does not wake it every gossip_interval (it ran 7 times a second: bench_idle)."""
    a = make(workdir, "127.0.0.27", 14276)
    b = make(workdir, "127.0.0.28", 14276, peers=["127.0.0.27:14276"])
    seen: dict[str, float] = {}
    samples = []

    async def main():
        events = a.bus.subscribe()
        sample = a.sampler.sample
        a.sampler.sample = lambda: samples.append(trio.current_time()) or sample()
        async with trio.open_nursery() as nursery:
            await nursery.start(a.run)
            await nursery.start(b.run)
            async for ev in events:
                if ev.kind == "join":
                    break
            await trio.sleep(5)  # past the start-up (pulls, the first push-pull)
            seen["wakeups"], seen["t"] = a.rounds.wakeups, trio.current_time()
            samples.clear()
            await trio.sleep(60)
            seen["wakeups"] = a.rounds.wakeups - seen["wakeups"]
            assert a.members.nodes[b.node_id].state == "alive"
            nursery.cancel_scope.cancel()

    run_virtual(main)
    period = a.cfg.probe_interval
    assert seen["wakeups"] / 60 <= 1.25 / period, seen["wakeups"] / 60
    # load samples keep their rate, on average, within SAMPLE_SLACK of their times
    assert 57 <= len(samples) <= 61, len(samples)
    gaps = [y - x for x, y in itertools.pairwise(samples)]
    assert max(gaps) <= 1.5 and min(gaps) >= 0.5, (min(gaps), max(gaps))
