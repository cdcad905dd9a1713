"""A job's checkpoints at its home are root's and never reached through a link; a checkpoint
that did not finish never replaces a good one; the files a job wrote are cut back with its
user's rights, never through a link (real files, a real user; no daemon needed)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import trio

from omuscd.duration import parse
from omuscd.jobs.checkpoints import KEEP, CheckpointStore, SharedDir, copy_shared
from omuscd.jobs.record import Job, JobError, Owner
from omuscd.jobs.spool import Spool
from omuscd.migrate.revive import Revival
from omuscd.paths import open_root_dir
from tests.cluster import as_user, ordinary_user

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the spool is root's")


def job_in(spool: Spool, owner: Owner | None = None) -> Job:
    job = Job("7.1", owner or Owner.of_uid(0), 7, 7, "x", ["true"], "/")
    spool.create(job)
    return job


def take(store: CheckpointStore, job_id: str, data: bytes, when: float) -> dict:
    with store.begin(job_id) as pending:
        fd = pending.create("pages-1.img")
        os.write(fd, data)
        os.close(fd)
        return store.commit(job_id, pending, {"time": when, "out": {"1": 0, "2": 0},
                                              "files": [], "paths": {}})


def test_the_last_two_whole_checkpoints_are_kept_root_only(tmp_path):
    spool = Spool(str(tmp_path))
    store = CheckpointStore(spool)
    job = job_in(spool)
    sums = [take(store, job.id, bytes([n]) * 1000, 100.0 + n) for n in range(1, 5)]
    assert [s["seq"] for s in sums] == [1, 2, 3, 4]
    top = spool.dir(job.id) / "checkpoints"
    assert sorted(os.listdir(top)) == ["3", "4"] and KEEP == 2
    for d in (top, top / "4"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700 and d.stat().st_uid == 0
    for f in (top / "4").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    seq, meta = store.latest(job.id)
    assert seq == 4 and meta["time"] == 104.0 and meta["size"] == 1000
    assert store.latest(job.id, before=4)[0] == 3


def test_a_checkpoint_that_did_not_finish_replaces_nothing(tmp_path):
    spool = Spool(str(tmp_path))
    store = CheckpointStore(spool)
    job = job_in(spool)
    take(store, job.id, b"good", 1.0)
    with pytest.raises(RuntimeError), store.begin(job.id) as pending:
        os.close(pending.create("pages-1.img"))
        raise RuntimeError("the node died in the middle of the transfer")
    assert sorted(os.listdir(spool.dir(job.id) / "checkpoints")) == ["1"]
    assert store.latest(job.id)[0] == 1


def test_a_checkpoint_swapped_for_a_link_is_never_used(tmp_path):
    spool = Spool(str(tmp_path))
    store = CheckpointStore(spool)
    job = job_in(spool)
    take(store, job.id, b"old", 1.0)
    take(store, job.id, b"new", 2.0)
    top = spool.dir(job.id) / "checkpoints"
    elsewhere = tmp_path / "planted"
    elsewhere.mkdir()
    (elsewhere / "meta.json").write_text(json.dumps({"time": 9.0, "files": []}))
    (top / "2").rename(tmp_path / "moved-away")
    (top / "2").symlink_to(elsewhere)
    assert store.latest(job.id)[0] == 1  # the link is skipped, the older one is used
    with pytest.raises(OSError):
        with store.opened(job.id, 2):
            pass
    # the whole checkpoints directory swapped for a link: refused, nothing written there
    os.rename(top, tmp_path / "old-top")
    top.symlink_to(elsewhere)
    assert store.latest(job.id) is None
    with pytest.raises(JobError), store.begin(job.id):
        pass
    assert sorted(os.listdir(elsewhere)) == ["meta.json"]


def test_bad_names_from_a_peer_are_refused(tmp_path):
    spool = Spool(str(tmp_path))
    store = CheckpointStore(spool)
    job = job_in(spool)
    with store.begin(job.id) as pending:
        for bad in ("../x", "a/b", "meta.json", ".."):
            with pytest.raises(OSError):
                pending.create(bad)
    with pytest.raises(ValueError):
        spool.dir("../7.1")


def test_durations_are_parsed_and_bounded():
    assert [parse(t) for t in ("10m", "30s", "5s", "1h30m", "90")] == [600, 30, 5, 5400, 90]
    for bad in ("", "0", "5ss", "-5s", "1e9", "nan", "100d", "5s5", "../", "1" * 40):
        with pytest.raises(ValueError):
            parse(bad)


def cut(job: Job, files: list) -> None:
    trio.run(Revival.cut_back, None, job, files)


def test_files_are_cut_back_as_the_user_never_through_a_link(tmp_path):
    os.chmod(tmp_path, 0o755)
    victim = tmp_path / "roots-file"
    victim.write_bytes(b"root's data, not to be cut\n")
    with ordinary_user("ckcut") as user:
        job = Job("7.2", Owner.of_uid(user.uid), 7, 7, "x", ["true"], str(user.home))
        out = user.home / "out.txt"

        def write(data: bytes) -> None:
            out.write_bytes(data)

        as_user(user.uid, lambda: write(b"0123456789"))
        cut(job, [[str(out), 4]])
        assert out.read_bytes() == b"0123"
        # between checkpoint and restore the user makes it a link to root's file
        as_user(user.uid, lambda: (out.unlink(), out.symlink_to(victim)))
        with pytest.raises(JobError, match=r"out\.txt"):
            cut(job, [[str(out), 4]])
        assert victim.read_bytes() == b"root's data, not to be cut\n"
        # a link in the middle of the path: followed, but with the user's rights only
        link_dir = user.home / "d"
        as_user(user.uid, lambda: link_dir.symlink_to(tmp_path))
        with pytest.raises(JobError, match="Permission denied"):
            cut(job, [[str(link_dir / "roots-file"), 4]])
        assert victim.read_bytes() == b"root's data, not to be cut\n"
        # a file made shorter than at the checkpoint cannot be put back: refused
        as_user(user.uid, lambda: (out.unlink(), write(b"01")))
        with pytest.raises(JobError, match="shorter"):
            cut(job, [[str(out), 4]])
        assert out.read_bytes() == b"01"


def test_roots_files_are_cut_without_following_a_link(tmp_path):
    target = tmp_path / "target"
    target.write_bytes(b"x" * 100)
    link = tmp_path / "link"
    link.symlink_to(target)
    job = Job("7.3", Owner.of_uid(0), 7, 7, "x", ["true"], "/")
    with pytest.raises(JobError):
        cut(job, [[str(link), 10]])
    assert target.stat().st_size == 100
    cut(job, [[str(target), 10]])
    assert target.read_bytes() == b"x" * 10
    assert Path(target).exists()


def shared_take(shared: SharedDir, images: Path, seq: int, data: bytes, keep: bool = True):
    """A checkpoint written to the checkpoint_dir as the node running the job does: its
    images (CRIU's own mode, 0644) into .part-SEQ, then made SEQ (``keep``) or dropped."""
    images.mkdir(mode=0o700, exist_ok=True)
    (images / "pages-1.img").write_bytes(data)
    (images / "pages-1.img").chmod(0o644)
    (images / "dump.log").write_text("a log, not an image")
    part = shared.prepare("7.1", seq, str(images))
    try:
        if keep:
            SharedDir.commit(part, seq)
    finally:
        part.close()
    return part


def test_a_checkpoint_dir_keeps_the_last_two_whole_ones_root_only(tmp_path):
    base = tmp_path / "ckpt"
    base.mkdir(mode=0o700)
    shared = SharedDir(str(base))
    for seq in (1, 2, 3):
        part = shared_take(shared, tmp_path / f"img{seq}", seq, bytes([seq]) * 100)
        assert part.where == f"{base}/7.1/{seq}" and part.pending.size == 100
    shared_take(shared, tmp_path / "img4", 4, b"half", keep=False)  # never kept
    job = base / "7.1"
    assert sorted(os.listdir(job)) == ["2", "3"]
    for d in (job, job / "3"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700 and d.stat().st_uid == 0
    assert os.listdir(job / "3") == ["pages-1.img"]  # CRIU's log left out
    assert stat.S_IMODE((job / "3" / "pages-1.img").stat().st_mode) == 0o600
    # a home that lost its state numbers from 1 again: what stands beyond goes
    shared_take(shared, tmp_path / "img5", 1, b"anew")
    assert sorted(os.listdir(job)) == ["1"]
    dest = tmp_path / "restore"
    dest.mkdir(mode=0o700)
    assert copy_shared(f"{job}/1", str(dest)) == 4
    assert (dest / "pages-1.img").read_bytes() == b"anew"


def test_a_checkpoint_dir_never_goes_through_a_link_nor_into_anothers_directory(tmp_path):
    base = tmp_path / "ckpt"
    base.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    shared = SharedDir(str(base))
    (base / "7.1").symlink_to(victim)
    with pytest.raises(OSError, match="checkpoint_dir"):
        shared_take(shared, tmp_path / "img", 1, b"x")
    assert os.listdir(victim) == []
    (base / "7.1").unlink()
    shared_take(shared, tmp_path / "img", 1, b"x")
    # restoring: the checkpoint's directory a link, or not 0700, is refused
    (base / "7.1" / "1").rename(victim / "1")
    (base / "7.1" / "1").symlink_to(victim / "1")
    with pytest.raises(OSError, match="a link"):
        copy_shared(f"{base}/7.1/1", str(tmp_path))
    (base / "7.1" / "1").unlink()
    (victim / "1").rename(base / "7.1" / "1")
    (base / "7.1" / "1").chmod(0o755)
    with pytest.raises(OSError, match="not 0700"):
        copy_shared(f"{base}/7.1/1", str(tmp_path))
    with ordinary_user("ckst") as user:
        (base / "7.1" / "1").chmod(0o700)
        os.chown(base / "7.1", user.uid, user.gid)
        with pytest.raises(OSError, match=f"belongs to uid {user.uid}"):
            copy_shared(f"{base}/7.1/1", str(tmp_path))
        with pytest.raises(OSError, match=f"belongs to uid {user.uid}"):
            shared_take(shared, tmp_path / "img", 2, b"y")


def test_the_checkpoint_dir_path_is_checked_from_the_root(tmp_path):
    """Every directory on the way root's, not writable by group or others (a sticky one on
    the way excepted: /tmp), no link anywhere."""
    good = tmp_path / "a" / "b"
    good.mkdir(parents=True, mode=0o755)
    os.close(open_root_dir(str(good)))
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "d").mkdir(mode=0o700)
    os.close(open_root_dir(str(sticky / "d")))
    with pytest.raises(OSError, match="writable by group or others"):
        open_root_dir(str(sticky))  # the directory itself may not be
    (tmp_path / "a").chmod(0o775)
    with pytest.raises(OSError, match=f"{tmp_path}/a is writable by group or others"):
        open_root_dir(str(good))
    (tmp_path / "a").chmod(0o755)
    (tmp_path / "l").symlink_to(tmp_path / "a")
    with pytest.raises(OSError, match="a link"):
        open_root_dir(str(tmp_path / "l" / "b"))
    for bad in ("a/b", f"{good}/../b", f"{good}/./x"):
        with pytest.raises(OSError, match="absolute, normalized"):
            open_root_dir(bad)


def test_a_stop_for_a_checkpoint_cancelled_halfway_leaves_no_process_stopped(monkeypatch):
    """The daemon stopping while a checkpoint stops the job's processes (the stop loop
    waiting for them all to stand still): every one it had stopped goes on.  Before, those
    stopped so far stayed stopped for good."""
    import signal
    import subprocess

    from omuscd.migrate import checkpoint
    from omuscd.migrate import tree as tree_module
    from omuscd.proctab import tree

    real_state = tree_module.state_of  # the reader itself, before it is patched below
    job = subprocess.Popen(["sh", "-c", "sleep 30 & sleep 30 & wait"])
    try:
        while len(tree(job.pid)) < 3:
            trio.run(trio.sleep, 0.01)
        # never seen to stand still: the loop waits on, and is cancelled meanwhile
        monkeypatch.setattr(tree_module, "state_of", lambda pid: "R")

        async def cancelled() -> None:
            with trio.move_on_after(0.2) as scope:
                await checkpoint.stop_tree(job.pid)
            assert scope.cancelled_caught
        trio.run(cancelled)
        assert [real_state(p) for p in tree(job.pid)] != [] and \
            "T" not in [real_state(p) for p in tree(job.pid)]
    finally:
        for p in reversed(tree(job.pid)):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass  # ended with its children
        job.wait()
