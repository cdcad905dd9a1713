"""The guest side of jobs: the cluster channel's connections accepted here, and the jobs run
here for another home (exec, attach, output pumped home, signals and input taken).

The requests and their answers are listed in :mod:`omuscd.cluster.rpc`; the table of
those this node serves is built in :mod:`omuscd.jobs.node`.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import signal
from typing import Any

import trio

from omuscd import channel, ids
from omuscd.channel import Channel, ChannelError
from omuscd.cluster.rpc import refusal
from omuscd.jobs import jobinit
from omuscd.jobs.books import NODE_FLAGS, JobBooks, serve_with_progress
from omuscd.jobs.process import (
    catches,
    check_runnable,
    init_pid,
    measure,
    supervise,
)
from omuscd.jobs.record import FINAL, MOVED, STDERR, STDOUT, Job, JobError

log = logging.getLogger("omuscd.jobs")

#: Cluster-channel connections from one source address (all of loopback being one) that
#: may be waiting to authenticate at once.
MAX_HANDSHAKES = 64
INIT_READY_WAIT = 2.0  # seconds a signal waits for a starting job's init to catch it
INFO_EVERY = 2.0
CHUNK = 256 * 1024


class GuestJobs(JobBooks):
    """The jobs run here, and the cluster channel's requests."""

    async def serve(self, stream: trio.SocketStream) -> None:
        """One incoming cluster-channel connection.  A bug met here costs this connection,
        never the daemon."""
        try:
            await self._serve(stream)
        except Exception:
            log.exception("cluster channel: internal error (connection dropped)")
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.SocketStream) -> None:
        # Anyone may connect; until the challenge is answered a connection is held for up
        # to channel.HANDSHAKE_TIMEOUT.  Bounded per source address (every loopback
        # address counting as one), or a local user holding thousands ran the daemon out
        # of descriptors: no job could start, no control session open.
        source = _source_of(stream)
        if self.handshaking.get(source, 0) >= MAX_HANDSHAKES:
            self.host.counters["channel-refused"] += 1
            await trio.aclose_forcefully(stream)
            return
        self.handshaking[source] = self.handshaking.get(source, 0) + 1
        try:
            ch = await channel.accept(stream, self.host.channel_key, self.hello())
        except ChannelError as e:
            self.host.counters["channel-refused"] += 1
            log.warning("cluster channel: refused a connection: %s", e)
            await trio.aclose_forcefully(stream)
            return
        finally:
            self.handshaking[source] -= 1
            if not self.handshaking[source]:
                del self.handshaking[source]
        msg: Any = None
        try:
            if ch.peer.get("proto") != self.host.protocol:
                await ch.send(refusal("incompatible protocol version"))
                return
            msg = await ch.receive_msg()
            await self.ops.dispatch(ch, msg)
        except ChannelError as e:  # the peer went, or spoke out of turn: its own business
            log.debug("cluster channel from node %s: %s", ch.peer.get("node"), e)
        except (KeyError, TypeError, ValueError) as e:
            # a request this daemon could not serve (a field missing or of the wrong kind,
            # or a bug here): said, since the peer sees only its connection closed
            log.warning("cluster channel: node %s's %.20r request failed: %s: %.200r",
                        ch.peer.get("node"), msg.get("op") if isinstance(msg, dict) else None,
                        type(e).__name__, e)
        finally:
            await ch.aclose()

    async def _serve_attach(self, ch: Channel, msg: dict[str, Any]) -> None:
        job = self.guests.get(str(msg.get("job")))
        if job is None:
            await ch.send({"op": "unknown", "fenced": str(msg.get("job")) in self.fenced})
            return
        await ch.send({"op": "attached"})
        offsets = {int(k): int(v) for k, v in dict(msg.get("offsets", {})).items()}
        await self._pump(ch, job, offsets)

    def fence_guests(self, home: int) -> None:
        """This node declared ``home`` dead: its guests here that have checkpoints are
        killed, since that home, declaring this node dead in turn, restores them from their
        checkpoints elsewhere (one copy only).  Not on suspicion (a slow home keeps its
        jobs); SWIM may declare the home dead here later than the home declares this node
        dead, so the home also drops a stale copy once it hears this node again."""
        for job in list(self.guests.values()):
            # one with a checkpoint taken (none yet: its home cannot restore it, so it is
            # not killed here either)
            if job.home == home and job.node == self.me and job.state not in FINAL and (
                    job.checkpoint):
                self.moves.fence(job, f"its home, node {home}, was declared dead here; it "
                                 "goes back to its checkpoint there")

    async def _serve_emigrate(self, ch: Channel, msg: dict[str, Any]) -> None:
        job = self.find(str(msg.get("job")))
        try:
            if job is None or job.node != self.me:
                raise JobError(f"job {msg.get('job')} does not run on {self.host.name}")
            stats = await serve_with_progress(ch, msg, lambda progress: self.moves.emigrate(
                job, ids.node_id(msg["to"]), progress))
            await ch.send({"op": "migrated", **stats})
        except JobError as e:
            await ch.send(refusal(str(e), "failed"))

    async def _serve_flag(self, ch: Channel, msg: dict[str, Any]) -> None:
        flag = str(msg.get("flag"))
        if flag not in NODE_FLAGS:
            await ch.send(refusal(f"no node flag {flag!r}"))
            return
        log.info("node flag %s %s, asked by node %s", flag,
                 "on" if msg.get("on") else "off", ch.peer.get("node"))
        await ch.send({"op": "done", "text": self.set_flag(flag, bool(msg.get("on")))})

    async def _serve_exec(self, ch: Channel, msg: dict[str, Any]) -> None:
        try:
            try:
                job = Job.from_wire(msg["job"])
            except (KeyError, TypeError, ValueError) as e:
                raise JobError(f"bad job record: {e}") from None
            env = {str(k): str(v) for k, v in dict(msg.get("env", {})).items()}
            if job.node != self.me:
                raise JobError(f"job {job.id} was meant for node {job.node}, not {self.me}")
            if job.id in self.guests:
                raise JobError(f"job {job.id} already runs here")
            self.check_guest_ok(job.owner, local=False)
            check_runnable(job.argv, job.cwd, env, self.host.name, job.owner)
            job.offsets = {STDOUT: 0, STDERR: 0}
            job.changed = trio.Event()
            await self._launch(self.guests, self._run_guest, job, env)
        except JobError as e:
            await ch.send(refusal(str(e)))
            return
        self.save(job)
        log.info("job %s of %s from node %d started: %s", job.id, job.owner.user, job.home,
                 " ".join(job.argv)[:80])
        job.cannot_move = self.static_cannot_move(job)
        await ch.send({"op": "started", "pid": job.pid, "cannot_move": job.cannot_move})
        await self._pump(ch, job, {STDOUT: 0, STDERR: 0})

    async def _run_guest(self, job: Job, env: dict[str, str],
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await supervise(job, self.spool, env, self.host.cfg.cpus, task_status=task_status)
        self._prune()

    async def _pump(self, ch: Channel, job: Job, offsets: dict[int, int]) -> None:
        """Send a guest job's output from ``offsets`` on, then its end; take signals."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._take_signals, ch, job, nursery.cancel_scope)
            last_info = 0.0
            while True:
                changed = job.changed
                for stream in (STDOUT, STDERR):
                    while offsets.get(stream, 0) < job.offsets[stream]:
                        start = offsets.get(stream, 0)
                        data = self.spool.read(job.id, stream, start,
                                               min(job.offsets[stream], start + CHUNK))
                        if not data:
                            break
                        await ch.send_data(stream, data)
                        offsets[stream] = start + len(data)
                if job.state == MOVED:
                    await ch.send({"op": "moved", "node": job.node})
                    break
                if job.state in FINAL:
                    await ch.send({"op": "exit", "exit": job.exit, "cpu": job.cpu})
                    break
                now = trio.current_time()
                if now - last_info >= INFO_EVERY and job.pid is not None:
                    measure(job)
                    await ch.send({"op": "info", "cpu": job.cpu, "rss_mb": job.rss_mb})
                    last_info = now
                with trio.move_on_after(INFO_EVERY):
                    await changed.wait()
            nursery.cancel_scope.cancel()

    async def _take_signals(self, ch: Channel, job: Job, scope: trio.CancelScope) -> None:
        """What the home sends about a running job: signals, and --stdin input."""
        try:
            while True:
                msg = await ch.receive()
                if isinstance(msg, tuple):
                    await self.feed_stdin(job, msg[1])
                elif msg.get("op") == "stdin-eof":
                    await self.feed_stdin(job, b"")
                elif msg.get("op") == "signal":
                    await self.signal_local(job, int(msg.get("sig", signal.SIGTERM)))
        except ChannelError:
            scope.cancel()  # the home went away; the job runs on, and it may reattach

    async def feed_stdin(self, job: Job, data: bytes) -> None:
        """Give a --stdin job its input (``b""``: the end of it), wherever it runs."""
        if not job.stdin:
            raise JobError(f"job {job.id} was not started with --stdin")
        if job.node != self.me:
            link = self.links.get(job.id)
            if link is None:
                raise JobError(f"cannot reach node {job.node_name} right now")
            if data:
                await link.send_data(0, data)
            else:
                await link.send({"op": "stdin-eof"})
            return
        pipe = job.stdin_pipe
        if pipe is None:
            return  # it ended, or its input was closed already
        try:
            if data:
                await pipe.send_all(data)
            else:
                job.stdin_pipe = None
                await pipe.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            job.stdin_pipe = None  # the job closed its input: drop the rest, as a pipe would

    async def signal_local(self, job: Job, sig: int) -> None:
        """Signals go to the job's init, which forwards them; SIGKILL and SIGSTOP cannot be
        caught, so they go straight to the command (the init then reports its end).  The
        init, PID 1 of the job's namespace, ignores a signal it has no handler for yet, so
        one sent as the job starts (Ctrl-C right after ``omuscd run``) waits until the
        init catches it (it was lost, and the job ran on)."""
        if not 1 <= sig <= 64:
            raise JobError(f"no signal {sig}")
        if job.pid is None and job.launcher is not None:  # unshare had not forked yet
            with trio.move_on_after(INIT_READY_WAIT):
                while (found := init_pid(job.launcher)) is None:
                    await trio.sleep(0.01)
                job.pid = found
        pid = job.pid
        if pid is not None and sig in (signal.SIGKILL, signal.SIGSTOP):
            pid = init_pid(pid) or pid
        elif pid is not None:
            # its handlers are all set once the last is (Python itself catches SIGINT from
            # its first moment, turning it into KeyboardInterrupt: that one tells nothing)
            with trio.move_on_after(INIT_READY_WAIT):
                while not catches(pid, jobinit.FORWARDED[-1]):
                    await trio.sleep(0.01)
        if pid is None:
            raise JobError(f"job {job.id} has no process here")
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            raise JobError(f"job {job.id} has already ended") from None


def _source_of(stream: trio.SocketStream) -> str:
    """The address a connection is counted by (see GuestJobs._serve)."""
    try:
        host = str(stream.socket.getpeername()[0]).split("%")[0]
        addr = ipaddress.ip_address(host)
    except (OSError, ValueError, IndexError):
        return "?"
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return "loopback" if addr.is_loopback else str(addr)
