"""What the daemon keeps for a job is its own (namespace cluster of real daemons, real
users): the spool is root's and never followed through a link, a job record a user could
have written is refused, a moving job's images are private, and a job id or node name
that is not one is refused at every door, the cluster channel included."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from omuscd.client import ControlClient
from tests.cluster import (
    as_user,
    can_netns,
    namespace_cluster,
    ordinary_user,
    start_daemon,
    wait_for,
)

REASON = can_netns()
pytestmark = [pytest.mark.netns, pytest.mark.skipif(REASON is not None, reason=REASON or "")]
PY = sys.executable
MARK = "omuscd-spool-test"
SECRET = "omuscd-spool-test-secret-8f3a1c"


@pytest.fixture(scope="module")
def cluster():
    with namespace_cluster("ab", prefix=f"oms{os.getpid() % 10000}x", open_to_all=True,
                           leftovers=MARK) as c:
        yield c


@pytest.fixture(scope="module")
def user():
    with ordinary_user("sp") as u:
        yield u


def user_job(user, node, *args: str) -> str:
    """A job of ``user``, started with ``omuscd run --detach`` as that user."""
    r = user.run(user.run_argv(node.socket, *args, "--detach", "--", "sh", "-c",
                               f"echo hello; while :; do echo tick; sleep 0.2; done; {MARK}"))
    assert r.returncode == 0, r.stderr
    return r.stdout.decode().strip()


def root_job(node, *args: str, script: str = f"sleep 60; : {MARK}") -> str:
    r = subprocess.run([PY, "-m", "omuscd", "run", "--connect", node.socket, *args,
                        "--detach", "--", "sh", "-c", script], capture_output=True,
                       text=True, cwd="/tmp")
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def as_client(uid: int, socket: str, *lines: str) -> list[tuple[int, str]]:
    def ask() -> list[tuple[int, str]]:
        with ControlClient.unix(socket) as c:
            return [(r.code, r.text) for r in (c.command(line) for line in lines)]
    return as_user(uid, ask)


def private_file(directory: Path, name: str, text: str) -> Path:
    """A root-only file (0600, in a 0700 directory of root's)."""
    directory.mkdir(mode=0o700, exist_ok=True)
    p = directory / name
    p.write_text(text)
    os.chmod(p, 0o600)
    return p


def plant_link(path: Path, target: Path) -> None:
    """As root: replace ``path`` with a link to ``target`` (an older version's spool,
    which its user could write, or a race)."""
    path.unlink(missing_ok=True)
    path.symlink_to(target)


def test_the_spool_is_roots_and_no_link_in_it_is_followed(cluster, user, tmp_path):
    _, _, _, n = cluster
    job = user_job(user, n["a"], "--home")
    d = n["a"].state_dir / "spool" / job
    wait_for(lambda: (d / "stdout").stat().st_size > 0, 10, "its first line")
    # not the user's: its directory and files are root's, 0700 and 0600
    st = d.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)
    for name in ("stdout", "stderr", "status", "job.json"):
        st = (d / name).lstat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600), name

    def plant() -> str:
        try:
            (d / "mine").write_text("x")
        except PermissionError:
            return "refused"
        return "written"
    assert as_user(user.uid, plant) == "refused"
    # the user still reads it through the daemon
    [(code, text)] = as_client(user.uid, n["a"].socket, f"output {job}")
    assert code == 200 and "hello" in text

    # links planted as root are not followed: output shows nothing of a root-only file
    secret = private_file(tmp_path / "root-only", "secret", SECRET + "\n")
    plant_link(d / "stdout", secret)
    [(code, text)] = as_client(user.uid, n["a"].socket, f"output {job}")
    assert SECRET not in text
    # nor is a record written through one: the root file stays as it was
    victim = private_file(tmp_path / "root-only", "victim", "untouched\n")
    plant_link(d / "job.json.tmp", victim)
    [(code, text)] = as_client(user.uid, n["a"].socket, f"kill {job}")
    assert code == 200, text
    wait_for(lambda: n["a"].json(f"job {job}")["state"] == "exited", 10, "the job to end")
    assert victim.read_text() == "untouched\n" and secret.read_text() == SECRET + "\n"
    assert n["a"].alive()


def test_remote_output_is_not_appended_through_a_link_at_the_home(cluster, user, tmp_path):
    _, _, _, n = cluster
    job = user_job(user, n["a"], "--node", "b")
    d = n["a"].state_dir / "spool" / job
    wait_for(lambda: "tick" in n["a"].ctl(f"output {job}").text, 10, "its output at home")
    victim = private_file(tmp_path / "root-only", "victim", "untouched\n")
    plant_link(d / "stdout", victim)
    time.sleep(1.5)  # several more ticks come home meanwhile
    assert n["b"].ctl(f"kill {job} KILL").code == 200
    wait_for(lambda: n["a"].json(f"job {job}")["state"] == "exited", 10, "the job to end")
    assert victim.read_text() == "untouched\n"
    assert n["a"].alive() and n["b"].alive()


def test_a_forged_job_record_does_not_survive_a_restart(user, tmp_path):
    """A user who could write a record naming another job's process (root's) would kill
    it after a restart: the record is not writable by the user, and one not written by
    the daemon (another owner, or a link) is refused when the daemon starts again."""
    with namespace_cluster("a", prefix=f"osr{os.getpid() % 10000}x", open_to_all=True,
                           leftovers=MARK) as (lan, work, _, n):
        victim = root_job(n["a"], "--home")
        wait_for(lambda: _record(n["a"], victim).get("pid"), 10, "root's job's record")
        victim_pid = _record(n["a"], victim)["pid"]
        mine = [user_job(user, n["a"], "--home") for _ in range(3)]

        def forge(job: str) -> dict:
            rec = _record(n["a"], job)
            return {**rec, "pid": victim_pid, "state": "running", "node": rec["home"]}

        def write_as_user(job: str, rec: dict) -> str:
            d = n["a"].state_dir / "spool" / job
            try:
                (d / "forged").write_text(json.dumps(rec))
                os.replace(d / "forged", d / "job.json")
            except PermissionError:
                return "refused"
            return "written"
        forged = {job: forge(job) for job in mine}
        assert as_user(user.uid, lambda: write_as_user(mine[0], forged[mine[0]])) \
            == "refused"
        # planted as root, as an older version's spool would have let the user: a record
        # the user owns, and one that is a link to a file elsewhere
        d1 = n["a"].state_dir / "spool" / mine[1]
        (d1 / "job.json").unlink()
        (d1 / "job.json").write_text(json.dumps(forged[mine[1]]))
        os.chown(d1 / "job.json", user.uid, user.gid)
        elsewhere = tmp_path / "forged.json"
        elsewhere.write_text(json.dumps(forged[mine[2]]))
        plant_link(n["a"].state_dir / "spool" / mine[2] / "job.json", elsewhere)

        old = n["a"]
        assert old.stop() == 0
        n["a"] = start_daemon("a", old.args[:-4], work, netns=lan.ns(0))
        answers = as_client(user.uid, n["a"].socket, *(f"kill {job} KILL" for job in mine))
        time.sleep(1)
        os.kill(victim_pid, 0)  # root's job lives
        assert n["a"].json(f"job {victim}")["state"] == "running", answers
        assert "job record refused" in n["a"].log()
        assert n["a"].ctl(f"kill {victim} KILL").code == 200


def _record(node, job: str) -> dict:
    try:
        return json.loads((node.state_dir / "spool" / job / "job.json").read_text())
    except (OSError, ValueError):
        return {}


#: Run as another ordinary user while a job moves: every image file it can read.
SNOOP = """
import os, sys, time
end = time.time() + float(sys.argv[1])
seen = set()
while time.time() < end:
    for top in sys.argv[2:]:
        try:
            moves = os.listdir(top)
        except OSError:
            continue
        for m in moves:
            try:
                names = os.listdir(os.path.join(top, m))
            except OSError:
                continue
            for name in names:
                p = os.path.join(top, m, name)
                try:
                    with open(p, "rb") as f:
                        f.read(1)
                except OSError:
                    continue
                if p not in seen:
                    seen.add(p)
                    print(p, flush=True)
    time.sleep(0.002)
"""

#: A job of 100 MB whose memory holds a secret: its dump takes a while.
BIG = ("import time\nsecret = ('%s' * 4096) * 2500\nprint('ready', flush=True)\n"
       "while True: time.sleep(0.05)\n# %s\n")


def test_another_user_cannot_read_a_moving_jobs_images(cluster, user):
    _, _, _, n = cluster
    tops = [str(n[x].state_dir / "images") for x in "ab"]
    with ordinary_user("sq") as other:
        script = BIG % (SECRET, MARK)
        # the job of one ordinary user, the snoop another's
        r = user.run(user.run_argv(n["a"].socket, "--home", "--detach", "--",
                                   "/usr/bin/python3", "-c", script))
        assert r.returncode == 0, r.stderr
        job = r.stdout.decode().strip()
        assert n["a"].json(f"job {job}")["owner"] == user.name
        wait_for(lambda: "ready" in n["a"].ctl(f"output {job}").text, 30, "the job's memory")
        seen: dict[str, int] = {}  # what root saw there during the moves, and its mode
        stop = threading.Event()

        def look() -> None:
            while not stop.is_set():
                for top in tops:
                    for d in Path(top).glob("*"):
                        for p in [d, *d.glob("*")]:
                            try:
                                st = p.lstat()
                            except OSError:
                                continue
                            seen[str(p)] = st.st_mode
                time.sleep(0.002)
        snoop = other.popen([other.python, "-c", SNOOP, "30", *tops])
        watcher = threading.Thread(target=look)
        watcher.start()
        try:
            time.sleep(0.5)
            for where in ("b", "a"):
                reply = n["a"].ctl(f"migrate {job} {where}")
                assert reply.code == 200, reply
        finally:
            stop.set()
            watcher.join()
            snoop.kill()
            out, _ = snoop.communicate()
        n["a"].ctl(f"kill {job} KILL")
        assert any(p.endswith(".img") for p in seen), "no images seen: the test saw nothing"
        assert out.decode() == "", f"another user read images:\n{out.decode()}"
        for p, mode in seen.items():
            assert not mode & 0o077, f"{p} is {stat.S_IMODE(mode):o}"


#: Run as a keyed peer in node b's namespace: requests to node a, one connection each.
PEER = """
import json, sys, trio
from omuscd import channel
from omuscd.config import read_secret
from omuscd.version import PROTOCOL_VERSION

async def one(msg):
    ch = await channel.connect((sys.argv[1], 4270), read_secret(sys.argv[2]),
                               {"node": 11, "boot": 1, "proto": PROTOCOL_VERSION, "name": "b"})
    try:
        await ch.send(msg)
        with trio.fail_after(10):
            return await ch.receive_msg()
    except channel.ChannelError as e:
        return {"op": "closed", "reason": str(e)}
    finally:
        await ch.aclose()

async def main():
    print(json.dumps([await one(m) for m in json.loads(sys.stdin.read())]))

trio.run(main)
"""

OUT = f"omx{os.getpid()}"  # where a path made of a bad id would end up, beside the state dir
BAD_IDS = [f"../../{OUT}", "1.2/../..", "", "9" * 300, "1.\u00e9", "..",
           f"1.2/../../../../{OUT}"]


def _tree(root: Path) -> set[str]:
    return {str(p) for p in root.rglob("*") if not p.name.endswith(".log")}


def test_bad_job_ids_are_refused_on_the_channel_and_in_commands(cluster):
    lan, work, key, n = cluster
    rec = {"owner": {"uid": 0, "gid": 0, "groups": [0], "user": "root"}, "home": 11,
           "node": 10, "node_name": "a", "argv": ["sleep", "1"], "cwd": "/tmp"}
    msgs = []
    for bad in BAD_IDS:
        msgs += [{"op": "exec", "job": {**rec, "id": bad}, "env": {}},
                 {"op": "immigrate", "job": {**rec, "id": bad}},
                 {"op": "attach", "job": bad, "offsets": {}},
                 {"op": "act", "job": bad, "action": "kill", "uid": 0, "sig": 9},
                 {"op": "emigrate", "job": bad, "to": 11},
                 {"op": "drop", "job": bad, "to": 11},
                 {"op": "has", "job": bad},
                 {"op": "checkpoint", "job": bad, "stop": True},
                 {"op": "act", "job": bad, "action": "checkpoint-stop", "uid": 0}]
    msgs.append({"op": "emigrate", "job": "10.1", "to": "../x"})
    outside = [work / OUT, work / f"{OUT}.in", Path("/tmp", OUT), Path("/tmp", f"{OUT}.in")]
    assert not any(p.exists() for p in outside)
    before = _tree(work)
    r = subprocess.run(["nsenter", f"--net=/run/netns/{lan.ns(1)}", PY, "-c", PEER,
                        lan.address(0), str(key)], input=json.dumps(msgs),
                       capture_output=True, text=True, timeout=120, cwd="/tmp")
    assert r.returncode == 0, r.stderr
    replies = json.loads(r.stdout)
    for msg, reply in zip(msgs, replies, strict=True):
        assert reply.get("op") in ("refused", "failed", "error"), (msg, reply)
        assert "not a job id" in str(reply) or "not a node id" in str(reply), (msg, reply)
    assert _tree(work) == before  # nothing inside the state dirs, nothing beside them
    assert not [p for p in outside if p.exists()]
    assert n["a"].alive()
    # and the same in commands: a 4xx, not a lookup
    for line in ("job ../x", "kill ..", "output ../../x", "attach 1.2/../..", "stay ''",
                 "migrate ../x b", "migrate 10.1 ../b", f"kill {'9' * 39}", "block ../x"):
        reply = n["a"].ctl(line)
        assert 400 <= reply.code < 500, (line, reply)
