"""``checkpoint_dir`` (issue #20): the node running a job writes its checkpoints' images into
a directory that may be a shared filesystem, ``DIR/JOB/N``, and its home keeps only the
record.  Real daemons in network namespaces with real CRIU; the namespaces share the
host's filesystem, so one host directory is a shared filesystem for them.  Node a (the
home of the jobs here) has no CRIU and no checkpoint_dir: the setting of the node running
the job decides, and the home revives from the directory the record names."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.cluster import Reference, namespace_cluster, ordinary_user, start_daemon, wait_for
from tests.test_checkpoint import (  # noqa: F401 (pytestmark: netns, CRIU needed)
    APPENDER,
    checkpoint_taken,
    job_view,
    power_off,
    pytestmark,
    resumed_exactly,
)
from tests.test_checkpoint import restart as restart_with

PY = sys.executable
ARGV = ["/usr/bin/python3", "-c", APPENDER]
SHARED = Path(tempfile.mkdtemp(prefix="omuscd-ckdir-"))  # root's, 0700


def extra(i: int) -> list[str]:
    """a: no CRIU, no checkpoint_dir (a login node, the home); b and c: both."""
    if i == 0:
        return ["--no-balancing", "--criu", "/nonexistent/criu"]
    return ["--no-balancing", "--checkpoint-dir", str(SHARED)]


@pytest.fixture(scope="module")
def cluster():
    try:
        with namespace_cluster("abc", extra=extra, prefix=f"omd{os.getpid() % 10000}x",
                               leftovers="omuscd-ckdir-test") as c:
            yield c
    finally:
        shutil.rmtree(SHARED, ignore_errors=True)


def restart(cluster, names: str) -> None:
    """Start the daemons ``names`` again, as they were."""
    restart_with(cluster, names, extra)


def run(node, tag: str, file: Path, lines: str, *opts: str) -> subprocess.Popen[bytes]:
    """``omuscd run`` of APPENDER homed on ``node``, run on b."""
    return subprocess.Popen([PY, "-m", "omuscd", "run", "--connect", node.socket, "--node",
                             "b", *opts, "--", *ARGV, str(file), lines, tag],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/tmp")


def reference(tmp: Path, lines: str, tag: str) -> Reference:
    """The plain run to compare with, started now beside the job."""
    return Reference([*ARGV, str(tmp / "ref"), lines, f"{tag}-plain"], ends=b"done\n")


def images_at_home(home, job: str) -> dict[str, list[str]]:
    """What the home keeps of each checkpoint of ``job``: its files, by number."""
    top = home.state_dir / "spool" / job / "checkpoints"
    return {seq: sorted(os.listdir(top / seq)) for seq in os.listdir(top) if seq.isdigit()}


def shared_checkpoint(job: str, seq: int) -> Path:
    """Checkpoint ``seq`` of ``job`` in the checkpoint_dir, checked to be root's and
    private, its images there."""
    d = SHARED / job / str(seq)
    for p in (SHARED / job, d):
        st = p.lstat()
        assert st.st_uid == 0 and oct(st.st_mode & 0o777) == "0o700", (p, oct(st.st_mode))
    names = os.listdir(d)
    assert "inventory.img" in names and any(x.startswith("pages-") for x in names), names
    for name in names:
        st = (d / name).lstat()
        assert st.st_uid == 0 and oct(st.st_mode & 0o777) == "0o600", (name, st)
    return d


def test_a_checkpoint_dir_not_roots_or_open_to_others_is_refused_at_start(tmp_path):
    with ordinary_user("ckdirs") as user:
        theirs = tmp_path / "theirs"
        theirs.mkdir()
        os.chown(theirs, user.uid, user.gid)
        open_ = tmp_path / "open"
        open_.mkdir()
        open_.chmod(0o777)
        good = tmp_path / "good"
        good.mkdir()
        link = tmp_path / "link"
        link.symlink_to(good)
        for bad, said in ((theirs, f"belongs to uid {user.uid}, not to root"),
                          (open_, "is writable by group or others (mode 777)"),
                          (link, "(a link?)"),
                          (tmp_path / "missing", "No such file or directory"),
                          (Path("relative/dir"), "not an absolute")):
            r = subprocess.run([PY, "-m", "omuscd", "--insecure", "--state-dir",
                                str(tmp_path / "state"), "--checkpoint-dir", str(bad)],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 2, (bad, r)
            assert "checkpoint_dir refused" in r.stderr and said in r.stderr, (bad, r.stderr)
        toml = tmp_path / "omuscd.toml"
        toml.write_text(f'checkpoint_dir = "{open_}"\n')
        r = subprocess.run([PY, "-m", "omuscd", "--insecure", "--config", str(toml),
                            "--state-dir", str(tmp_path / "state")],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "writable by group or others" in r.stderr, r.stderr


def test_a_job_survives_its_nodes_death_from_the_checkpoint_dir(cluster, tmp_path):
    """Homed on a, run on b, checkpointed every 5 s into the checkpoint_dir (the images
    never cross the channel: a keeps meta.json alone); b loses power; a restores the job
    on c from the directory; output and appended file as an uninterrupted run's."""
    lan, _, _, n = cluster
    tag, lines = "omuscd-ckdir-test-survive", "160"
    ref = reference(tmp_path, lines, tag)
    file = tmp_path / "appended"
    p = run(n["a"], tag, file, lines, "--checkpoint-every", "5s")
    try:
        wait_for(lambda: checkpoint_taken(n["a"], tag), 30, "a checkpoint of the job")
        job = job_view(n["a"], tag)["id"]
        seq = job_view(n["a"], tag)["checkpoint"]["seq"]
        assert images_at_home(n["a"], job)[str(seq)] == ["meta.json"]
        d = shared_checkpoint(job, seq)
        size = sum(f.stat().st_size for f in d.iterdir())
        assert job_view(n["a"], tag)["checkpoint"]["size"] == size
        time.sleep(1.5)  # output and appended lines after the checkpoint, to be undone
        power_off(lan, n, "b")
        out, err = p.communicate(timeout=90)
    finally:
        p.kill()
        restart(cluster, "b")
    assert p.returncode == 0, err
    assert out == ref.stdout
    assert file.read_bytes() == (tmp_path / "ref").read_bytes()
    assert b"went back to its checkpoint of" in err, err
    view = job_view(n["a"], tag)
    assert view["state"] == "exited" and view["node_name"] == "c" and view["revived"] == 1
    wait_for(lambda: not (SHARED / job).exists(), 10, "its checkpoints to go with it")
    assert "checkpoint images" not in n["a"].log()
    # c read the images from the directory itself: they did not cross the network
    assert re.search(rf"job {re.escape(job)}: its checkpoint's images read from "
                     rf"{re.escape(str(SHARED))}/{re.escape(job)}/\d+ \({size} bytes\)",
                     n["c"].log()), n["c"].log()[-3000:]


def test_stop_and_resume_across_a_restart_of_every_daemon(cluster, tmp_path):
    _, _, _, n = cluster
    tag, lines = "omuscd-ckdir-test-maint", "100"
    ref = reference(tmp_path, lines, tag)
    file = tmp_path / "appended"
    p = run(n["a"], tag, file, lines)
    wait_for(lambda: job_view(n["a"], tag).get("state") == "running", 10, "the job")
    job = job_view(n["a"], tag)["id"]
    time.sleep(1.5)
    r = n["a"].ctl(f"checkpoint --stop {job}")
    assert r.code == 200 and "stopped" in r.text, r
    seq = n["a"].json(f"job {job}")["checkpoint"]["seq"]
    assert images_at_home(n["a"], job) == {str(seq): ["meta.json"]}
    shared_checkpoint(job, seq)
    for d in n.values():
        d.stop()
    assert p.wait(10) == 123
    restart(cluster, "abc")
    assert job_view(n["a"], tag)["state"] == "checkpointed"
    resumed_exactly(n["a"], job, "c", ref.stdout, file, tmp_path / "ref")


def sleeper(cluster, tag: str) -> str:
    """A job homed on a running on b, started: its id."""
    n = cluster[3]
    r = subprocess.run([PY, "-m", "omuscd", "run", "--connect", n["a"].socket, "--node", "b",
                        "--detach", "--", "sh", "-c", f"while :; do sleep 0.2; done; : {tag}"],
                       capture_output=True, cwd="/tmp", timeout=60)
    job = r.stdout.decode().strip()
    wait_for(lambda: job_view(n["a"], tag).get("state") == "running", 10, "the job")
    time.sleep(1)  # past 'still starting'
    return job


def test_an_unreachable_checkpoint_dir_fails_the_checkpoint_and_keeps_the_last(cluster):
    """The directory renamed away (a file server gone) or replaced by one open to others:
    the checkpoint fails with the reason, in the reply and b's log; the job runs on; the
    checkpoint before stays, and serves once the directory is back."""
    n = cluster[3]
    tag = "omuscd-ckdir-test-gone"
    job = sleeper(cluster, tag)
    away = SHARED.with_name(SHARED.name + ".away")
    try:
        assert n["a"].ctl(f"checkpoint {job}").code == 200
        first = shared_checkpoint(job, 1)
        before = sorted(os.listdir(first))
        SHARED.rename(away)
        r = n["a"].ctl(f"checkpoint {job}")
        assert r.code == 500 and f"checkpoint_dir {SHARED} cannot be used" in r.text and \
            "No such file or directory" in r.text, r
        assert "checkpoint failed, it runs on" in n["b"].log()
        SHARED.mkdir(mode=0o777)  # someone made another, open to all
        SHARED.chmod(0o777)
        r = n["a"].ctl(f"checkpoint {job}")
        assert r.code == 500 and "writable by group or others" in r.text, r
        assert os.listdir(SHARED) == []
        SHARED.rmdir()
        away.rename(SHARED)
        view = n["a"].json(f"job {job}")
        assert view["state"] == "running" and view["checkpoint"]["seq"] == 1, view
        assert sorted(os.listdir(first)) == before
        assert images_at_home(n["a"], job) == {"1": ["meta.json"]}
        r = n["a"].ctl(f"checkpoint --stop {job}")  # the next one works again
        assert r.code == 200, r
        assert n["a"].json(f"job {job}")["checkpoint"]["seq"] == 2
        assert sorted(os.listdir(SHARED / job)) == ["1", "2"]
        r = n["a"].ctl(f"resume {job} c")
        assert r.code == 200 and "resumed on c" in r.text, r
    finally:
        if away.exists():
            shutil.rmtree(SHARED, ignore_errors=True)
            away.rename(SHARED)
        n["a"].ctl(f"kill {job} KILL")


def test_links_and_foreign_directories_in_the_checkpoint_dir_are_not_followed(cluster,
                                                                             tmp_path):
    """A link where the job's directory goes, a directory of a user's there, and a link
    put in place of a checkpoint: the checkpoint fails, nothing is written through the
    link, and a resume refuses the linked checkpoint (then takes the real one back)."""
    n = cluster[3]
    tag = "omuscd-ckdir-test-links"
    job = sleeper(cluster, tag)
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    try:
        (SHARED / job).symlink_to(victim)
        r = n["a"].ctl(f"checkpoint {job}")
        assert r.code == 500 and "checkpoint of job" in r.text, r
        assert os.listdir(victim) == []
        (SHARED / job).unlink()
        with ordinary_user("ckdirl") as user:
            (SHARED / job).mkdir(mode=0o700)
            os.chown(SHARED / job, user.uid, user.gid)
            r = n["a"].ctl(f"checkpoint {job}")
            assert r.code == 500 and f"belongs to uid {user.uid}" in r.text, r
            assert os.listdir(SHARED / job) == []
            (SHARED / job).rmdir()
        r = n["a"].ctl(f"checkpoint --stop {job}")
        assert r.code == 200, r
        seq = n["a"].json(f"job {job}")["checkpoint"]["seq"]
        real = shared_checkpoint(job, seq)
        moved = tmp_path / "moved"
        real.rename(moved)
        real.symlink_to(moved)
        r = n["a"].ctl(f"resume {job} c")
        assert r.code == 500 and "stays checkpointed" in r.text, r
        assert re.search(r"a link|Too many levels|Not a directory", r.text), r
        assert n["a"].json(f"job {job}")["state"] == "checkpointed"
        real.unlink()
        moved.rename(real)
        r = n["a"].ctl(f"resume {job} c")
        assert r.code == 200 and "resumed on c" in r.text, r
    finally:
        n["a"].ctl(f"kill {job} KILL")


def test_a_job_at_its_home_is_checkpointed_into_the_checkpoint_dir_too(cluster, tmp_path):
    """Homed and run on b (which has a checkpoint_dir): the images go there, b's spool has
    the record alone; stopped, then resumed on b from the directory, the job ends as an
    uninterrupted run."""
    n = cluster[3]
    tag, lines = "omuscd-ckdir-test-home", "60"
    ref = reference(tmp_path, lines, tag)
    file = tmp_path / "appended"
    p = subprocess.Popen([PY, "-m", "omuscd", "run", "--connect", n["b"].socket, "--home",
                          "--", *ARGV, str(file), lines, tag], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd="/tmp")
    try:
        wait_for(lambda: job_view(n["b"], tag).get("state") == "running", 10, "the job")
        job = job_view(n["b"], tag)["id"]
        time.sleep(1.5)
        r = n["b"].ctl(f"checkpoint --stop {job}")
        assert r.code == 200 and "stopped" in r.text, r
        assert images_at_home(n["b"], job) == {"1": ["meta.json"]}
        shared_checkpoint(job, 1)
        r = n["b"].ctl(f"resume {job} b")
        assert r.code == 200 and "resumed on b" in r.text, r
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 0 and out == ref.stdout, err
    assert file.read_bytes() == (tmp_path / "ref").read_bytes()
    wait_for(lambda: not (SHARED / job).exists(), 10, "its checkpoints to go with it")


def hidden(command: list[str]) -> list[str]:
    """The daemon in a mount namespace of its own, an empty private tmpfs over the
    checkpoint_dir: a node that does not mount the shared filesystem."""
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'mount -t tmpfs -o mode=0700 omuscd-ckdir "$0" && exec "$@"', str(SHARED),
            *command]


def test_a_node_that_cannot_see_the_directory_gets_the_images_from_the_home(cluster,
                                                                           tmp_path):
    """c does not see b's checkpoint_dir: resumed there, the job's images are read by its
    home (a) and sent; the job ends as an uninterrupted run."""
    lan, work, key, n = cluster
    tag, lines = "omuscd-ckdir-test-hidden", "60"
    ref = reference(tmp_path, lines, tag)
    file = tmp_path / "appended"
    n["c"].stop()
    n["c"] = start_daemon("c", ["--key-file", str(key), *extra(2)], work, netns=lan.ns(2),
                          wrap=hidden)
    try:
        wait_for(lambda: all(x["state"] == "alive" for x in n["a"].nodes().values()) and
                 "c" in n["a"].nodes(), 20, "c to be back")
        p = run(n["a"], tag, file, lines)
        wait_for(lambda: job_view(n["a"], tag).get("state") == "running", 10, "the job")
        job = job_view(n["a"], tag)["id"]
        time.sleep(1.5)
        r = n["a"].ctl(f"checkpoint --stop {job}")
        assert r.code == 200, r
        shared_checkpoint(job, 1)
        r = n["a"].ctl(f"resume {job} c")
        assert r.code == 200 and "resumed on c" in r.text, r
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0 and out == ref.stdout, err
        assert file.read_bytes() == (tmp_path / "ref").read_bytes()
        assert "its checkpoint's images not read from" in n["c"].log()
        assert f"c cannot read checkpoint 1 in {SHARED}/{job}/1" in n["a"].log()
    finally:
        n["c"].stop()
        restart(cluster, "c")
