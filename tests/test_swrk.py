"""The CRIU that dumps (or restores) a job is started before the job is frozen and waits
for its request (omuscd.migrate.swrk): the job runs on until the request, the dump and
the restore do what the command line did (stopped, file locks, inherited files), and a
failure says its cause."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from omuscd.migrate import Inherit, MoveError
from omuscd.migrate.criu import Criu, find_criu
from omuscd.migrate.swrk import Response, decode, dump_options, restore_options
from tests.cluster import wait_for
from tests.test_migration import REASON

JOB = """
import sys, time
n = 0
while True:
    n += 1
    print(n, flush=True)
    time.sleep(0.02)
"""


def test_the_requests_say_what_the_command_line_said():
    """The options as CRIU reads them (images/rpc.proto: criu_opts)."""
    dump = decode(dump_options(4242, 7, "dump.log", 9))
    assert dump[1] == [7] and dump[2] == [4242] and dump[8] == [1]  # images fd, pid, locks
    assert dump[9] == [2] and dump[10] == [b"dump.log"] and dump[69] == [1]  # -v2, stopped
    assert decode(dump[11][0]) == {4: [9]}  # --ps-socket 9
    assert 11 not in decode(dump_options(4242, 7, "dump.log", None))
    rst = decode(restore_options(5, "restore.log", [("var/x/stdout", 3), ("a b", 4)], True))
    assert rst[1] == [5] and rst[26] == [1] and rst[69] == [1] and rst[48] == [1]
    assert [decode(x) for x in rst[27]] == [{1: [b"var/x/stdout"], 2: [3]},
                                            {1: [b"a b"], 2: [4]}]
    assert 48 not in decode(restore_options(5, "restore.log", [], False))
    assert 12 not in rst and decode(restore_options(5, "r.log", [], False, notify=True))[12] == [1]
    # a notification (criu_resp type 6) naming the restored root, then CRIU's answer
    note = Response(bytes([0x08, 0x06, 0x10, 0x01, 0x2a, 0x15, 0x0a, 0x10]) +
                    b"setup-namespaces" + bytes([0x10, 0xb9, 0x60]))
    assert note.type == 6 and note.script == "setup-namespaces" and note.notified_pid == 12345
    # CRIU's answer: a restore's pid; a failure's message; nothing usable: no pid
    ok = Response(bytes([0x08, 0x02, 0x10, 0x01, 0x22, 0x03, 0x08, 0xb9, 0x60]))
    assert ok.success and ok.pid == 12345
    bad = Response(bytes([0x08, 0x01, 0x10, 0x00, 0x4a, 0x03]) + b"why")
    assert not bad.success and bad.error == "why" and bad.pid is None
    with pytest.raises(ValueError):
        decode(bytes([0x0a, 0x05, 0x01]))  # a field longer than the message


def gone(pid: int) -> bool:
    """Whether our child ``pid`` has ended (collected now if so)."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return not Path(f"/proc/{pid}").exists()


def state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


@pytest.mark.skipif(REASON is not None, reason=str(REASON))
def test_a_job_runs_on_until_its_started_criu_is_asked(tmp_path):
    """Started ahead, the CRIU that dumps a job leaves it running; asked, it dumps it and
    leaves it stopped; the CRIU started ahead to restore it restores it stopped, writing
    to the file it was given (--inherit-fd), and goes on from where it was."""
    images = tmp_path / "img"
    images.mkdir()
    out = tmp_path / "out"
    with open(out, "w") as f:  # a file: CRIU restores it by path
        launcher = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "setsid",
                                     sys.executable, "-c", JOB], stdout=f,
                                    stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    restored = None
    try:
        wait_for(lambda: out.read_text().count("\n") > 2, 30, "the job to count")
        init = int(subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                  text=True).stdout.split()[0])
        criu = Criu(find_criu(None))
        moved = tmp_path / "moved"

        async def move() -> int:
            await criu.check()
            dumper = await criu.prepare_dump(init, images)
            lines = out.read_text().count("\n")
            time.sleep(0.2)
            assert dumper.proc.returncode is None
            assert out.read_text().count("\n") > lines and state(init) != "T"  # runs on
            await criu.dump(init, images, worker=dumper)
            assert dumper.proc.returncode == 0  # (stopped as CRIU lets it go: a moment)
            wait_for(lambda: state(init) == "T", 5, "the dumped job to be stopped")
            os.kill(init, signal.SIGKILL)  # the copy: the restore takes its pid
            launcher.wait()
            fd = os.open(moved, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            told: list[int] = []

            async def refuse(pid: int) -> None:  # as when the guard is gone
                told.append(pid)
                raise MoveError("no guard")

            async def note(pid: int) -> None:
                assert not (images / "pid").exists()  # before CRIU answered
                assert Path(f"/proc/{pid}").exists()
                told.append(pid)

            try:
                # told "stop" when it names the job's init, CRIU fails the restore and
                # kills what it made (a child of ours: collected here)
                restorer = await criu.prepare_restore(images, (fd,))
                with pytest.raises(MoveError, match="no guard"):
                    await criu.restore(images, [Inherit(str(out), fd)], images / "pid",
                                       worker=restorer, rooted=refuse)
                assert len(told) == 1 and not (images / "pid").exists()
                wait_for(lambda: gone(told[0]), 10, "CRIU to kill the refused restore")
                told.clear()
                restorer = await criu.prepare_restore(images, (fd,))
                pid = await criu.restore(images, [Inherit(str(out), fd)], images / "pid",
                                         worker=restorer, rooted=note)
                assert told == [pid]  # told the init's pid before the answer
                return pid
            finally:
                os.close(fd)

        restored = trio.run(move)
        assert int((images / "pid").read_text()) == restored
        wait_for(lambda: state(restored) == "T", 5, "the restored job to be stopped")
        last = int(out.read_text().split()[-1])
        os.kill(restored, signal.SIGCONT)
        wait_for(lambda: moved.exists() and moved.read_text().count("\n") > 2, 30,
                 "the restored job to count on")
        assert int(moved.read_text().split()[0]) == last + 1  # where it was
    finally:
        if restored is not None:
            os.kill(restored, signal.SIGKILL)
            os.waitpid(restored, 0)
        launcher.kill()
        launcher.wait()


@pytest.mark.skipif(REASON is not None, reason=str(REASON))
def test_a_failed_request_says_its_cause_and_a_killed_criu_fails_the_dump(tmp_path):
    """A dump CRIU refuses names CRIU's own error (from its log), and a CRIU killed
    while it waited (as its user may do) fails the dump it was to do."""
    criu = Criu(find_criu(None), tmp_path)
    images = tmp_path / "img"
    images.mkdir()

    async def main() -> None:
        await criu.check()
        gone = subprocess.Popen(["true"])
        gone.wait()
        with pytest.raises(MoveError, match=r"criu dump failed: .*Error") as e:
            await criu.dump(gone.pid, images)
        assert "full log" in str(e.value) and (tmp_path / "criu-dump-failed.log").exists()
        sleeper = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "setsid",
                                    "sleep", "30"])
        try:
            wait_for(lambda: subprocess.run(["pgrep", "-P", str(sleeper.pid)],
                                            capture_output=True).returncode == 0, 10,
                     "the sleeper")
            init = int(subprocess.run(["pgrep", "-P", str(sleeper.pid)],
                                      capture_output=True, text=True).stdout.split()[0])
            worker = await criu.prepare_dump(init, images)
            worker.proc.kill()
            await worker.proc.wait()
            with pytest.raises(MoveError, match="criu dump failed"):
                await criu.dump(init, images, worker=worker)
            assert state(init) != "T"  # never frozen
        finally:
            sleeper.kill()
            sleeper.wait()

    trio.run(main)


@pytest.mark.skipif(REASON is not None, reason=str(REASON))
def test_lazy_pages_started_ahead_waits_at_the_gate_until_its_images_are_there(tmp_path):
    """Post-copy (omuscd.migrate.gate): lazy-pages starts before the job is frozen, with
    the inventory a FIFO held by the daemon.  It waits there, not ready, until the gate is
    released; then it reads the inventory the source dumped, and goes on once our end is
    closed (settle: as soon as the bytes are read), and the restore finds the real file in
    its place.  Released before lazy-pages opens it, it reads the file; abandoned, nothing
    is left; released without an inventory, the move fails."""
    import socket

    from omuscd.migrate.gate import INVENTORY, GateError, InventoryGate

    src = tmp_path / "src"
    src.mkdir()
    launcher = subprocess.Popen(["unshare", "--pid", "--fork", "--kill-child", "setsid",
                                 sys.executable, "-c", "import time; time.sleep(600)"],
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    criu = Criu(find_criu(None))
    try:
        def child() -> str:
            return subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                  text=True).stdout.strip()

        wait_for(child, 30, "the job to start")
        init = int(child().split()[0])
        inventory = None

        async def ahead(case: str) -> None:
            images = tmp_path / case
            images.mkdir()
            for f in src.iterdir():
                if f.suffix != ".log" and f.name != INVENTORY:
                    (images / f.name).write_bytes(f.read_bytes())
            gate = InventoryGate(images)
            mine, theirs = socket.socketpair()
            starting = await criu.start_lazy_pages(images, theirs.fileno())
            theirs.close()
            try:
                if case == "late":
                    await trio.sleep(1.0)  # time enough to start and reach the inventory
                    assert starting.proc.returncode is None
                    with trio.move_on_after(0.2) as waited:
                        await starting.status.receive_some(1)
                    assert waited.cancelled_caught, "lazy-pages ready without its inventory"
                if case == "abandoned":
                    gate.close()
                    await starting.abandon()
                    assert not (images / INVENTORY).exists()
                    return
                if case == "empty":
                    with pytest.raises(GateError, match="did not come"):
                        gate.release()
                    gate.close()
                    await starting.abandon()
                    return
                gate.hold(inventory)
                gate.release()
                assert (images / INVENTORY).is_file()  # the restore's, from now on
                if case == "late":  # it read the FIFO and waits for its end: ours is open
                    with trio.move_on_after(0.3) as waited:
                        await starting.status.receive_some(1)
                    assert waited.cancelled_caught, "lazy-pages went on before its end"
                proc = await starting.ready(meanwhile=gate.settle)
                assert proc.returncode is None
                if case == "late":
                    assert not gate.open  # closed once read
                gate.close()
                assert (images / INVENTORY).read_bytes() == inventory
            finally:
                mine.close()
                if starting.proc.returncode is None:
                    await starting.abandon()

        async def main() -> None:
            nonlocal inventory
            await criu.check()
            await criu.dump(init, src)
            inventory = (src / INVENTORY).read_bytes()
            for case in ("late", "at once", "abandoned", "empty"):
                await ahead(case)

        trio.run(main)
    finally:
        criu.close()
        launcher.kill()
        launcher.wait()


def test_a_criu_server_given_up_goes_with_all_it_forked(tmp_path):
    """Starting.abandon kills the server's whole process group: a lazy-pages killed while it
    started could leave a process it had forked (one was found running for ever, its
    command line that of lazy-pages, after a move given up before the freeze)."""
    import socket

    from omuscd.migrate.criu import _start

    server = tmp_path / "criu"  # stands for it: forks a child, then waits
    child = tmp_path / "child"
    server.write_text(f"#!/bin/sh\nsleep 300 &\necho $! > {child}\nwait\n")
    server.chmod(0o700)

    async def main() -> None:
        mine, theirs = socket.socketpair()
        starting = await _start(str(server), ["lazy-pages"], tmp_path / "log", theirs.fileno())
        theirs.close()
        mine.close()
        with trio.fail_after(10):
            while not child.exists() or not child.read_text().strip():
                await trio.sleep(0.01)
        forked = int(child.read_text())
        await starting.abandon()
        assert starting.proc.returncode == -signal.SIGKILL
        with trio.fail_after(10):
            while Path(f"/proc/{forked}").exists() and state(forked) != "Z":
                await trio.sleep(0.01)

    trio.run(main)


def test_waiting_for_a_server_polls_only_while_asked_to(tmp_path):
    """Starting.ready calls ``meanwhile`` every millisecond while it returns True (the gate
    not yet closed) and no more once it returns False, until the server says it is ready."""
    import socket

    from omuscd.migrate.criu import _start

    server = tmp_path / "criu"  # stands for it: ready after 0.3 s, then waits
    server.write_text('#!/bin/sh\nwhile [ "$1" != --status-fd ]; do shift; done\n'
                      'sleep 0.3\nprintf x > "/dev/fd/$2"\nexec sleep 300\n')
    server.chmod(0o700)

    async def wait(go_on: bool) -> int:
        calls = 0

        def meanwhile() -> bool:
            nonlocal calls
            calls += 1
            return go_on

        mine, theirs = socket.socketpair()
        starting = await _start(str(server), ["lazy-pages"], tmp_path / "log", theirs.fileno())
        theirs.close()
        mine.close()
        try:
            proc = await starting.ready(timeout=10.0, meanwhile=meanwhile)
            assert proc.returncode is None
        finally:
            await starting.abandon()
        return calls

    assert trio.run(wait, False) == 1
    assert trio.run(wait, True) >= 30  # every millisecond for 0.3 s, however slow
