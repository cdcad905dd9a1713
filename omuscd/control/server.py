"""The control servers: sessions on the TCP control port and on the Unix socket, counted
per user and overall, each identified (:mod:`.identity`) before its first line.
"""

from __future__ import annotations

import logging
import os
import socket

import trio

from omuscd.control import protocol
from omuscd.control.identity import (
    Identity,
    peer_cred,
    peer_groups,
    rights_of,
    source_of,
    tcp_identity,
    user_name,
)
from omuscd.control.services import Services
from omuscd.control.session import UNIX_MAX_LINE, Session

log = logging.getLogger("omuscd.control")


class ControlServer:
    """Serves sessions on the TCP control port and on the Unix socket.

    Sessions are counted per user (uid; a client the daemon cannot identify counts by its
    address) and overall, so no user can take the port from the others; root's and the
    daemon user's sessions on the Unix socket count apart, so nobody can lock them out."""

    def __init__(self, services: Services, secret: bytes | None):
        self.services = services
        self.secret = secret
        self.sessions = 0  # every open session (status shows it)
        self.shared = 0  # those counted against control_sessions
        self.reserved = 0  # root's and the daemon user's Unix-socket sessions
        self.per_key: dict[object, int] = {}

    def _refusal(self, key: object, reserved: bool) -> str | None:
        """Why a new session may not open now, or None."""
        cfg = self.services.cfg
        total = int(cfg.control_sessions)
        if reserved:
            if self.reserved >= total:
                return f"too many sessions for root ({total} at once); try again later"
            return None
        if self.per_key.get(key, 0) >= int(cfg.control_user_sessions):
            return (f"too many sessions for you ({int(cfg.control_user_sessions)} at once); "
                    "close one or try again later")
        if self.shared >= total:
            return f"too many sessions ({total} at once); try again later"
        return None

    async def _serve(self, stream: trio.abc.Stream, peer: str, who: Identity, key: object,
                     secret: bytes | None, max_line: int = protocol.MAX_LINE,
                     reserved: bool = False) -> None:
        refusal = self._refusal(key, reserved)
        if refusal is not None:
            log.info("control: refused a session from %s (%s): %s", peer, who.user, refusal)
            with trio.move_on_after(2):
                await stream.send_all(protocol.err(protocol.BUSY, refusal).render())
            await trio.aclose_forcefully(stream)
            return
        self.sessions += 1
        if reserved:
            self.reserved += 1
        else:
            self.shared += 1
            self.per_key[key] = self.per_key.get(key, 0) + 1
        session = Session(self.services, stream, peer, who.admin, who.user, secret, uid=who.uid,
                          gid=who.gid, groups=list(who.groups), max_line=max_line)
        log.debug("control: session from %s (%s)", peer, who.user)
        try:
            await session.run()
        except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError) as e:
            log.debug("control: session from %s ended: %s", peer, e)
        except Exception:
            log.exception("control: internal error in a session from %s (closed)", peer)
        finally:
            self.sessions -= 1
            if reserved:
                self.reserved -= 1
            else:
                self.shared -= 1
                self.per_key[key] -= 1
                if not self.per_key[key]:
                    del self.per_key[key]
            await trio.aclose_forcefully(stream)

    async def handle_tcp(self, stream: trio.SocketStream) -> None:
        try:
            local = stream.socket.getsockname()
            remote = stream.socket.getpeername()
            peer = f"{remote[0]}:{remote[1]}"
        except OSError:
            local = remote = None
            peer = "?"
        if self.secret is not None:
            # beyond loopback, or by choice: the password is the way in (it is root's)
            who = Identity(f"tcp:{peer}")
        else:
            who = await trio.to_thread.run_sync(  # a scan of /proc: not in the loop
                tcp_identity, stream.socket.family, local, remote, peer)
        # unidentified clients share one allowance per address (on loopback: one)
        key = ("uid", who.uid) if who.uid is not None else ("addr", source_of(remote))
        await self._serve(stream, peer, who, key, self.secret)

    async def handle_unix(self, stream: trio.SocketStream) -> None:
        pid, uid, gid = peer_cred(stream.socket)
        if uid is None:  # cannot happen on Linux; no identity, no rights
            who = Identity("?")
        else:
            who = rights_of(uid, gid, peer_groups(pid), user_name(uid))
        # the socket's owner is known from the kernel: no password needed
        # root's and the daemon user's sessions here have room of their own: whatever
        # others hold, 'omuscd ctl' and 'omuscd run' as root get through
        await self._serve(stream, f"unix:{who.user}", who, ("uid", who.uid), None,
                          max_line=UNIX_MAX_LINE, reserved=who.admin)

    async def serve_tcp(self, host: str, port: int,
                        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self.handle_tcp, listeners)
            task_status.started()

    async def serve_unix(self, path: str,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if os.path.exists(path):
            if await _unix_in_use(path):
                raise OSError(f"control socket {path} is in use by another daemon")
            os.unlink(path)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        await sock.bind(path)
        os.chmod(path, 0o666)  # any local user may connect; the kernel tells us who
        sock.listen(16)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(trio.serve_listeners, self.handle_unix,
                                    [trio.SocketListener(sock)])
                task_status.started()
        finally:
            try:
                os.unlink(path)
            except OSError:
                pass


async def _unix_in_use(path: str) -> bool:
    probe = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with trio.move_on_after(1):
            await probe.connect(path)
            return True
        return True
    except OSError:
        return False
    finally:
        probe.close()
