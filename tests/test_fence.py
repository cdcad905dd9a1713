"""A node cut off (not dead) while it runs a checkpointed job: its home declares it dead
and restores the job elsewhere from its checkpoint; the cut-off node's copy must not run
on beside it, not even for a moment (its lease from the home runs out first: it freezes
the job, omuscd.migrate.lease).  A blip shorter than the lease costs nothing; a longer
one freezes the job and thaws it; renewals from anyone but the job's home extend
nothing.  Real daemons in network namespaces, real CRIU; the cable is pulled by setting
the node's bridge port down, and plugged back in (or only the home's link to the node is
cut, with blackhole routes)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from omuscd.migrate.lease import lease_length
from tests.cluster import (
    Reference,
    as_user,
    criu_problem,
    namespace_cluster,
    ordinary_user,
    sh,
    slow_links,
    start_daemon,
    wait_for,
)
from tests.test_checkpoint import APPENDER, checkpoint_taken, extra, job_view

REASON = criu_problem()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(REASON is not None, reason=REASON or "")]

TAG = f"omuscd-fencing-{os.getpid()}"  # unique: runs side by side pkill their own only


def copies(tag: str) -> list[int]:
    """The job's running processes, wherever (the command: /usr/bin/python3 with ``tag``;
    not the client, the job's init nor its launcher).  Jobs run in namespaces of their
    own: on which node is not seen here, only how many copies run."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _is_job(int(p), tag)]


def _is_job(pid: int, tag: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False
    return argv[0] == b"/usr/bin/python3" and tag.encode() in argv


def _seen(tag: str) -> list[bytes]:
    found = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/cmdline", "rb") as f:
                line = f.read()
        except OSError:
            continue
        if tag.encode() in line or b"9973" in line:
            found.append(line[:60] + line[-200:])
    return found


def cable(lan, name: str, up: bool) -> None:
    """Plug node ``name``'s cable out (its bridge port down) or back in."""
    sh("ip", "-n", lan.bridge, "link", "set", f"v{'abc'.index(name)}",
       "up" if up else "down")


#: b declares a node dead only after a suspicion of 15 s, where a and c take 2.5 s (a
#: big cluster's guest probes its home only now and then): cut off, b learns of its home's
#: death long after the home revived its job elsewhere
SLOW = ["--suspicion-mult", "30", "--dead-timeout", "30"]


def fence_extra(i: int) -> list[str]:
    return [*extra(i), *(SLOW if i == 1 else [])]


@pytest.fixture(scope="module")
def cluster():
    with namespace_cluster("abc", extra=fence_extra, prefix=f"omf{os.getpid() % 10000}x",
                           leftovers=TAG, open_to_all=True) as c:
        yield c


def states(tag: str) -> list[str]:
    """The state letter of each copy of the job (T: stopped)."""
    out = []
    for pid in copies(tag):
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                data = f.read()
            out.append(data[data.rindex(b")") + 2:][:1].decode())
        except OSError:
            pass
    return out


def _logged(daemon, words: str) -> float:
    """When the daemon first logged a line with ``words`` (its log's local time)."""
    import datetime
    line = next(ln for ln in daemon.log().splitlines() if words in ln)
    at = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    return at.timestamp()


def lease_lines(daemon, job: str) -> list[str]:
    """The node's log lines about the lease of ``job``."""
    return [ln for ln in daemon.log().splitlines() if f"job {job}:" in ln and "lease" in ln]


def start_on_b(n, tmp_path: Path, tag: str, lines: str):
    """A reference run of the appender, and the job homed on a, run on b, checkpointed
    every 5 s, once its first checkpoint is taken and its lease held: (client, reference
    output, reference file, the job's file, the job's id)."""
    ref_file, file = tmp_path / f"ref-{tag}.txt", tmp_path / f"appended-{tag}.txt"
    argv = ["/usr/bin/python3", "-c", APPENDER]
    ref = Reference([*argv, str(ref_file), lines, f"{tag}-plain"], ends=b"done\n")
    p = subprocess.Popen([sys.executable, "-m", "omuscd", "run", "--connect", n["a"].socket,
                          "--node", "b", "--checkpoint-every", "5s", "--", *argv, str(file),
                          lines, tag], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         cwd="/tmp")
    wait_for(lambda: checkpoint_taken(n["a"], tag), 20, "a checkpoint of the job")
    view = job_view(n["a"], tag)
    assert view["node_name"] == "b", view
    time.sleep(1.5)  # renewals name it; output and appended lines after the checkpoint
    return p, ref, ref_file, file, view["id"]


def finish(p, n, tag: str, ref: Reference, ref_file: Path, file: Path) -> dict:
    """The job ends well, its output and file exactly those of the reference run; its
    record at the home."""
    out, err = p.communicate(timeout=90)
    assert p.returncode == 0, err
    assert ref.returncode == 0 and ref.stdout.endswith(b"done\n")
    assert out == ref.stdout, (len(out), len(ref.stdout))
    assert file.read_bytes() == ref_file.read_bytes()
    return job_view(n["a"], tag)


def test_a_cut_off_node_does_not_run_a_revived_job_beside_its_new_copy(cluster, tmp_path: Path):
    """Homed on a (no CRIU), run on b with checkpoints; b's cable pulled until a declares
    b dead and restores the job on c; b plugged back in: b's copy is gone within seconds,
    only c's runs, and the output and the appended file are those of a plain run."""
    lan, _, _, n = cluster
    try:
        _scenario(lan, n, tmp_path)
    except BaseException:
        for name in "abc":  # what each daemon did with the job
            print(f"--- {name}\n" + "\n".join(
                line for line in n[name].log().splitlines()
                if "job" in line or "dead" in line or "alive" in line)[-4000:])
        raise


def _scenario(lan, n, tmp_path: Path) -> None:
    lines = "500"  # 25 s: b's copy, unfenced, would outlast the checks below
    p, ref, ref_file, file, job_id = start_on_b(n, tmp_path, TAG, lines)
    try:
        assert len(copies(TAG)) == 1, _seen(TAG)
        cable(lan, "b", up=False)
        cut = time.time()
        try:
            wait_for(lambda: job_view(n["a"], TAG).get("node_name") == "c", 40,
                     "the job to be revived on c")
            time.sleep(2)  # both would run meanwhile, without the fence
        finally:
            cable(lan, "b", up=True)
        plugged = time.monotonic()
        wait_for(lambda: len(copies(TAG)) <= 1, 8, "one copy of the job only")
        print(f"one copy {time.monotonic() - plugged:.1f}s after b was plugged back in")
        out, err = p.communicate(timeout=90)
    finally:
        p.kill()
        cable(lan, "b", up=True)
    assert p.returncode == 0, err
    assert ref.returncode == 0 and out == ref.stdout
    # The file: exactly that of a plain run.  b declares a dead only long after a
    # restored the job on c (SLOW): without its lease running out first, b's copy ran on
    # beside c's, its lines appended twice
    got, want = file.read_bytes().splitlines(True), ref_file.read_bytes().splitlines(True)
    print(f"stale lines in the file: {len(got) - len(want)}")
    assert got == want, (len(got), len(want))
    assert b"went back to its checkpoint of" in err, err
    print(f"a declared b dead {_logged(n['a'], '(b) is dead') - cut:.2f}s after the cut, "
          f"revived the job {_logged(n['a'], 'went back') - cut:.2f}s after it; b froze it "
          f"{_logged(n['b'], 'frozen until') - cut:.2f}s after it")
    frozen = [ln for ln in lease_lines(n["b"], job_id) if "frozen" in ln]
    assert frozen, n["b"].log()[-3000:]
    view = job_view(n["a"], TAG)
    # revived once (on c); or twice: b, heard again, may spread its stale word that c
    # is dead, and a believes it until c refutes it (SWIM): the job then went back to
    # its checkpoint once more, and c's copy was dropped as b's was
    assert view["state"] == "exited" and view["revived"] >= 1, view
    assert not copies(TAG)
    # b's record says why it stopped; a asks b to drop it once b is heard (nothing left)
    assert "stale copy" in n["b"].log() or "fenced" in n["b"].log(), n["b"].log()[-3000:]


def test_a_blip_shorter_than_the_lease_leaves_the_job_running(cluster, tmp_path: Path):
    """b's cable out for 0.4 of a lease (a renewal is at most a third of it old when the
    cable goes, so b's lease has a quarter of it to spare): the job is never frozen, nor
    moved, and ends as a plain run."""
    lan, _, _, n = cluster
    tag = f"{TAG}-blip"
    p, ref, ref_file, file, job_id = start_on_b(n, tmp_path, tag, "200")
    try:
        blip = 0.4 * lease_length(_defaults())
        cable(lan, "b", up=False)
        time.sleep(blip)
        cable(lan, "b", up=True)
        view = finish(p, n, tag, ref, ref_file, file)
    finally:
        p.kill()
        cable(lan, "b", up=True)
    assert view["state"] == "exited" and view["revived"] == 0 and view["node_name"] == "b"
    assert not [ln for ln in lease_lines(n["b"], job_id) if "frozen" in ln], \
        lease_lines(n["b"], job_id)


def test_a_cut_longer_than_the_lease_freezes_the_job_then_thaws_it(cluster, tmp_path: Path):
    """Only the link between a (the home) and b is cut, for three leases: SWIM's indirect
    probes through c keep b alive at a, so the job is not revived; b's lease runs out and
    it freezes the job (every process stopped); the link mended, the next renewal thaws
    it, and it ends as a plain run (output and file exact)."""
    lan, _, _, n = cluster
    tag = f"{TAG}-thaw"
    p, ref, ref_file, file, job_id = start_on_b(n, tmp_path, tag, "300")
    try:
        lan.split(0, 1, apart=True)
        try:
            wait_for(lambda: states(tag) == ["T"], 3 * lease_length(_defaults()),
                     "b to freeze the job")
            time.sleep(2 * lease_length(_defaults()))
            assert states(tag) == ["T"], states(tag)  # still frozen, not revived
            assert job_view(n["a"], tag)["node_name"] == "b"
        finally:
            lan.split(0, 1, apart=False)
        wait_for(lambda: states(tag) not in ([], ["T"]), 10, "b to thaw the job")
        view = finish(p, n, tag, ref, ref_file, file)
    finally:
        p.kill()
    assert view["state"] == "exited" and view["revived"] == 0, view
    said = lease_lines(n["b"], job_id)
    assert any("frozen" in ln for ln in said) and any("thawed" in ln for ln in said), said


#: A node of the cluster (or a stranger) renewing b's lease of a job homed on a, every
#: 0.1 s for argv[6] s: over a channel with the key of file argv[1], as node argv[4].
FORGER = """
import sys, time, trio
from omuscd import channel
from omuscd.version import PROTOCOL_VERSION

async def main():
    key = open(sys.argv[1], "rb").read().strip()
    me = {"node": int(sys.argv[4]), "boot": 1, "proto": PROTOCOL_VERSION, "name": "x"}
    try:
        ch = await channel.connect((sys.argv[2], int(sys.argv[3])), key, me)
    except channel.ChannelError as e:
        print("refused:", e, flush=True)
        return
    await ch.send({"op": "lease"})
    end = time.monotonic() + float(sys.argv[6])
    while time.monotonic() < end:
        await ch.send({"op": "renew", "t": time.monotonic(), "lease": 3600.0,
                       "jobs": [sys.argv[5]]})
        await trio.sleep(0.1)
    print("sent", flush=True)

trio.run(main)
"""


def test_renewals_from_anyone_but_the_home_extend_nothing(cluster, tmp_path: Path):
    """The link between a and b cut: c, a member with the cluster key, renews b's lease
    of a's job (a lease of an hour) as itself, and a stranger with another key tries to;
    b freezes the job all the same when a's lease runs out, and thaws it only when a's
    renewals come back."""
    lan, _, key, n = cluster
    tag = f"{TAG}-forged"
    p, ref, ref_file, file, job_id = start_on_b(n, tmp_path, tag, "300")
    wrong = tmp_path / "wrong.key"
    from omuscd import config
    config.write_key(str(wrong))
    b = n["a"].nodes()["b"]
    c_id = n["b"].nodes()["c"]["id"]
    forgers = []
    try:
        lan.split(0, 1, apart=True)
        try:
            for keyfile in (key, wrong):
                forgers.append(subprocess.Popen(
                    ["ip", "netns", "exec", lan.ns(2), sys.executable, "-c", FORGER,
                     str(keyfile), str(b["address"]), str(b["port"]), str(c_id), job_id, "8"],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=os.getcwd()))
            wait_for(lambda: states(tag) == ["T"], 3 * lease_length(_defaults()),
                     "b to freeze the job despite the forged renewals")
            said = [f.communicate(timeout=30)[0].decode() for f in forgers]
            assert said[0].startswith("sent"), said  # c's channel was open: it renewed
            assert said[1].startswith("refused"), said
            assert states(tag) == ["T"], states(tag)
        finally:
            lan.split(0, 1, apart=False)
        view = finish(p, n, tag, ref, ref_file, file)
    finally:
        p.kill()
        for f in forgers:
            f.kill()
    assert view["state"] == "exited" and view["revived"] == 0, view
    assert "refused a connection" in n["b"].log()


def _defaults():
    """The membership's default timings (the cluster's a and c run them)."""
    from omuscd.config import Config, defaults
    return Config(defaults())


def guards() -> list[int]:
    """The pids of the lease guards running (omuscd.migrate.leaseguard)."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and _has(int(p), b"lease-guard")]


def _has(pid: int, word: bytes) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return word in f.read()
    except OSError:
        return False


def _restart(n, name: str) -> None:
    """Start node ``name``'s daemon again, as it was started (same state directory)."""
    d = n[name]
    n[name] = start_daemon(name, d.args[:-4], d.state_dir.parent, netns=d.netns)


def _daemon_dies(n, tag: str, p, ref: Reference, ref_file: Path, file: Path,
                 uid: int | None = None) -> None:
    """b's daemon (only it, not its job) SIGKILLed while it runs a's checkpointed job:
    a revives the job on c; b's old copy is frozen (every process stopped) all the while,
    and dropped once b's daemon is back; the job ends as a plain run."""
    assert len(copies(tag)) == 1, _seen(tag)
    mine = guards()  # looked at after the scenario: without the guard, the stale copy fails it
    said = [_guard_facts(g, uid) for g in mine]
    os.kill(n["b"].popen.pid, 9)  # the daemon alone: its job lives on in its namespace
    n["b"].popen.wait()
    try:
        wait_for(lambda: job_view(n["a"], tag).get("node_name") == "c", 40,
                 "the job to be revived on c")
        wait_for(lambda: len(copies(tag)) == 2, 20, "c's copy to run")
        for _ in range(20):  # b's copy stays stopped beside c's
            assert "T" in states(tag), states(tag)
            time.sleep(0.1)
    finally:
        _restart(n, "b")
    wait_for(lambda: len(copies(tag)) <= 1, 20, "b's stale copy to be dropped")
    assert "T" not in states(tag)
    view = finish(p, n, tag, ref, ref_file, file)
    assert view["state"] == "exited" and view["revived"] >= 1, view
    assert mine, "no lease guard ran while b held a leased job"
    # root's; the job's owner could neither kill it, write to its stdin, nor read it
    assert all(s == ("0", "PermissionError,PermissionError,PermissionError")
               or (uid is None and s[0] == "0") for s in said), said


def _guard_facts(g: int, uid: int | None) -> tuple[str, str]:
    """The guard ``g``'s real uid, and what user ``uid`` got trying to kill it, to open
    its stdin for writing and to read its memory."""
    with open(f"/proc/{g}/status") as f:
        owner = next(ln.split()[1] for ln in f if ln.startswith("Uid:"))

    def attack() -> str:
        got = []
        for what in (lambda: os.kill(g, 9), lambda: open(f"/proc/{g}/fd/0", "wb"),
                     lambda: open(f"/proc/{g}/mem", "rb")):
            try:
                what()
                got.append("done")
            except OSError as e:
                got.append(type(e).__name__)
        return ",".join(got)
    return owner, "" if uid is None else as_user(uid, attack)


def test_a_dead_guest_daemon_freezes_an_ordinary_users_job(cluster):
    """b's daemon killed alone while it runs an ordinary user's job: its copy frozen by
    the lease guard, not run beside the copy a revived on c (before the guard: lines
    appended twice); the user can neither kill the guard, nor write to its stdin, nor
    read its memory.  (Root's jobs under the guard: the tests after this one.)"""
    _, _, _, n = cluster
    tag = f"{TAG}-user"
    with ordinary_user("gd") as u:
        ref_file, file = u.home / "ref.txt", u.home / "appended.txt"
        argv = ["/usr/bin/python3", "-c", APPENDER]
        ref = Reference([*argv, str(ref_file), "400", f"{tag}-plain"], user=u, ends=b"done\n")
        p = u.popen(u.run_argv(n["a"].socket, "--node", "b", "--checkpoint-every", "5s",
                               "--", *argv, str(file), "400", tag))
        try:
            wait_for(lambda: checkpoint_taken(n["a"], tag), 20, "a checkpoint of the job")
            assert job_view(n["a"], tag)["node_name"] == "b"
            time.sleep(1.5)
            _daemon_dies(n, tag, p, ref, ref_file, file, uid=u.uid)
        finally:
            p.kill()


@pytest.fixture
def slow_verdicts(cluster):
    """a and c declare b dead only after 30 s (b's daemon started again in time must
    find its job still its own), then their defaults again."""
    n = cluster[3]
    for d in (n["a"], n["c"]):
        assert d.ctl("set dead_timeout 30").ok and d.ctl("set suspicion_mult 30").ok
    yield
    for d in (n["a"], n["c"]):
        d.ctl("set dead_timeout 10")
        d.ctl("set suspicion_mult 4")


def test_a_guest_daemon_dead_in_a_first_checkpoint_thaws_its_job_when_back(
        cluster, slow_verdicts, tmp_path: Path):
    """b's daemon SIGKILLed in the middle of the job's first checkpoint (its images on
    their way to a over a slow link): the guard stopped the job, and a never got that
    checkpoint; b's daemon started again asks a, which holds none, and thaws the job
    (before: stopped for ever); it ends as a plain run."""
    import threading
    lan, _, _, n = cluster
    tag = f"{TAG}-first"
    ref_file, file = tmp_path / "ref.txt", tmp_path / "appended.txt"
    argv = ["/usr/bin/python3", "-c", APPENDER]
    ref = Reference([*argv, str(ref_file), "300", f"{tag}-plain"], ends=b"done\n")
    p = subprocess.Popen([sys.executable, "-m", "omuscd", "run", "--connect", n["a"].socket,
                          "--node", "b", "--", *argv, str(file), "300", tag],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/tmp")
    asked: list[object] = []
    try:
        wait_for(lambda: job_view(n["a"], tag).get("state") == "running", 20, "the job")
        job_id = job_view(n["a"], tag)["id"]
        with slow_links(lan, [1], "4mbit"):
            t = threading.Thread(target=lambda: asked.append(n["a"].ctl(
                f"checkpoint {job_id}")), daemon=True)
            t.start()
            images = n["b"].state_dir / "images" / f"{job_id}.ckpt"
            wait_for(lambda: images.exists() and guards(), 10, "b to begin the checkpoint")
            time.sleep(1.0)  # dumped; its images on their way
            _killed_and_back(n, tag, lambda: not checkpoint_taken(n["a"], tag))
            t.join(30)
        view = finish(p, n, tag, ref, ref_file, file)
    finally:
        p.kill()
    assert view["state"] == "exited" and view["revived"] == 0, view
    said = [ln for ln in n["b"].log().splitlines() if f"job {job_id}: its home" in ln]
    assert said and "holds no checkpoint of it" in said[-1], n["b"].log()[-3000:]


def test_a_guest_daemon_back_before_its_verdict_runs_its_leased_job_on(
        cluster, slow_verdicts, tmp_path: Path):
    """b's daemon SIGKILLed after the job's checkpoints began, and started again before
    a declares b dead: the guard stopped the job; the daemon back holds it by its lease
    (its record says it has a checkpoint) and the next renewal thaws it (before: stopped
    for ever); it ends as a plain run, never revived."""
    _, _, _, n = cluster
    tag = f"{TAG}-back"
    p, ref, ref_file, file, job_id = start_on_b(n, tmp_path, tag, "200")
    try:
        _killed_and_back(n, tag, lambda: True)
        view = finish(p, n, tag, ref, ref_file, file)
    finally:
        p.kill()
    assert view["state"] == "exited" and view["revived"] == 0, view
    assert any("thawed" in ln for ln in lease_lines(n["b"], job_id)), n["b"].log()[-3000:]


def _killed_and_back(n, tag: str, check) -> None:
    """b's daemon SIGKILLed (its job lives on): the guard stops the job, which stays
    stopped (``check()`` holds meanwhile) until b's daemon, started again, thaws it."""
    os.kill(n["b"].popen.pid, 9)
    n["b"].popen.wait()
    wait_for(lambda: states(tag) == ["T"], 5, "the guard to stop the job")
    time.sleep(1)
    assert states(tag) == ["T"] and check()
    _restart(n, "b")
    wait_for(lambda: states(tag) not in ([], ["T"]), 20, "b to thaw the job")


def _ns_job() -> tuple[subprocess.Popen, int]:
    """A job's shape: a PID namespace whose init has a child and an orphan (a child
    reparented to the init); (unshare, the init's pid)."""
    u = subprocess.Popen(["unshare", "--pid", "--fork", "sh", "-c",
                          "sleep 60 & (sleep 60 &); wait"])
    init: list[int] = []

    def born() -> bool:
        with open(f"/proc/{u.pid}/task/{u.pid}/children") as f:
            init[:] = [int(p) for p in f.read().split()]
        return bool(init) and len(_below(init[0])) == 3
    wait_for(born, 10, "the namespace's processes")
    return u, init[0]


def _below(pid: int) -> list[int]:
    from omuscd.proctab import tree
    return tree(pid)


def _state_of(pid: int) -> str:
    from omuscd.migrate.tree import state_of
    return state_of(pid)


def test_the_guard_stops_only_the_namespaces_it_watches_and_a_thaw_continues_them():
    """The guard itself (real sh, nsenter, kill): told of a job, of another then no
    longer of it, and of a pid outside any namespace of its own (a reused pid: never hit,
    kill -1 out here would stop the machine); its daemon gone (stdin closed), the watched
    job's every process is stopped, the rest untouched; SIGCONT as a thaw sends to the
    job's tree continues them all."""
    import signal

    import trio

    from omuscd.migrate.leaseguard import Guard

    watched, init = _ns_job()
    other, other_init = _ns_job()
    outsider = subprocess.Popen(["sleep", "60"])
    try:
        async def daemon_dies() -> None:
            g = Guard()
            await g.sync({"j1": init, "j2": other_init, "j3": outsider.pid})
            await g.sync({"j1": init, "j3": outsider.pid})
            assert g.proc is not None and g.proc.stdin is not None
            await g.proc.stdin.aclose()  # as the daemon's death does
            with trio.fail_after(10):
                await g.proc.wait()
        trio.run(daemon_dies)
        assert [_state_of(p) for p in _below(init)] == ["T"] * 3
        assert "T" not in [_state_of(p) for p in _below(other_init)]
        assert _state_of(outsider.pid) != "T" and _state_of(os.getpid()) != "T"
        for p in _below(init):  # the lease's thaw
            os.kill(p, signal.SIGCONT)
        assert "T" not in [_state_of(p) for p in _below(init)]
    finally:
        for u, i in ((watched, init), (other, other_init)):
            os.kill(i, signal.SIGKILL)  # a PID namespace's init: the kernel kills the rest
            u.wait()
        outsider.kill()
        outsider.wait()
