"""Authenticated TCP streams between daemons (the cluster channel, on the cluster port).

Remote execution, output streaming, job queries and, later, migration images travel here.
A connection starts with a mutual challenge: each side proves it holds the cluster key
over the other's fresh nonce, so neither a replayed handshake nor a stranger gets in.
Both then derive a session key, and every frame carries an HMAC-SHA256 over its sequence
number and content under it: nothing can be injected, altered, replayed or reordered in
the stream without the frame being refused and the connection closed.

Frame: ``u32 length | u8 kind | payload | 32-byte tag``; kind 0 is a JSON object, kind 1 is
data (``u8 stream`` then bytes).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
from typing import Any

import trio

FRAME_HEAD = struct.Struct(">IB")
TAG = 32
MAX_FRAME = 1 << 20
READ_AHEAD = 65536
KIND_JSON, KIND_DATA = 0, 1
HANDSHAKE_TIMEOUT = 5.0
#: The "key" of --insecure clusters: frames are still checked for integrity.
INSECURE_KEY = b"omuscd-insecure-cluster"


class ChannelError(Exception):
    """The peer failed authentication, broke the framing, or went away."""


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"|".join(parts), hashlib.sha256).digest()


def _frame_mac(key: bytes, seq: int, kind: int, *payload: bytes | memoryview) -> bytes:
    """The tag of one frame, fed piecewise: no copy of a megabyte to compute it."""
    h = hmac.new(key, struct.pack(">QB", seq, kind), hashlib.sha256)
    for part in payload:
        h.update(part)
    return h.digest()


class Channel:
    """One authenticated connection.  ``send*`` may be called from several tasks."""

    def __init__(self, stream: trio.abc.Stream, key: bytes, peer: dict[str, Any]):
        self.stream = stream
        self.key = key
        self.peer = peer  # the peer's hello: node id, boot
        self._send_seq = 0
        self._recv_seq = 0
        self._buf = bytearray()
        self._frame: bytearray | None = None  # the buffer borrowed data frames use
        self._lock = trio.Lock()

    @property
    def peer_id(self) -> int:
        return int(self.peer["node"])

    async def _send_frame(self, kind: int, *payload: bytes | memoryview) -> None:
        length = sum(len(p) for p in payload)
        if length > MAX_FRAME:
            raise ChannelError("frame too large")
        async with self._lock:
            tag = _frame_mac(self.key, self._send_seq, kind, *payload)
            self._send_seq += 1
            try:
                await self.stream.send_all(FRAME_HEAD.pack(length, kind) + payload[0])
                for part in payload[1:]:
                    await self.stream.send_all(part)
                await self.stream.send_all(tag)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                raise ChannelError(f"send failed: {e}") from None

    async def send(self, msg: dict[str, Any]) -> None:
        await self._send_frame(KIND_JSON, json.dumps(msg, separators=(",", ":")).encode())

    async def send_data(self, stream_id: int, data: bytes) -> None:
        view = memoryview(data)
        for i in range(0, len(data), MAX_FRAME - 1):
            await self._send_frame(KIND_DATA, bytes([stream_id]), view[i:i + MAX_FRAME - 1])

    async def _receive_some(self, n: int) -> bytes:
        try:
            chunk = await self.stream.receive_some(n)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            raise ChannelError(f"receive failed: {e}") from None
        if not chunk:
            raise ChannelError("connection closed by the peer")
        return chunk

    async def _exactly(self, n: int) -> bytes:
        """``n`` bytes of a header, a tag or a handshake: read ahead, since they are small."""
        while len(self._buf) < n:
            self._buf += await self._receive_some(READ_AHEAD)
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    async def _payload(self, n: int, borrow: bool) -> memoryview:
        """``n`` bytes of a frame's payload, received straight into a buffer: a megabyte
        of migration pages is copied once from the kernel, not gathered, joined and
        sliced.  ``borrow``: the channel's own buffer, reused by the next frame (a fresh
        megabyte per frame costs page faults: a gigabyte of them per gigabyte moved)."""
        if borrow:
            if self._frame is None:
                self._frame = bytearray(MAX_FRAME)
            payload = memoryview(self._frame)[:n]
        else:
            payload = memoryview(bytearray(n))
        have = min(n, len(self._buf))
        payload[:have] = self._buf[:have]
        del self._buf[:have]
        sock = getattr(self.stream, "socket", None)
        while have < n:
            if sock is None:  # not a socket (tests): the plain stream interface
                chunk = await self._receive_some(n - have)
                payload[have:have + len(chunk)] = chunk
                have += len(chunk)
                continue
            try:
                got = await sock.recv_into(payload[have:])
            except (trio.ClosedResourceError, OSError) as e:
                raise ChannelError(f"receive failed: {e}") from None
            if not got:
                raise ChannelError("connection closed by the peer")
            have += got
        return payload

    async def receive(self, borrow: bool = False) -> dict[str, Any] | tuple[int, memoryview]:
        """The next message: a dict (JSON) or ``(stream, data)``.  ``borrow``: the data is
        only good until the next call (for callers that write it out at once)."""
        length, kind = FRAME_HEAD.unpack(await self._exactly(FRAME_HEAD.size))
        if length > MAX_FRAME or kind not in (KIND_JSON, KIND_DATA):
            raise ChannelError("bad frame header")
        payload = await self._payload(length, borrow and kind == KIND_DATA)
        tag = await self._exactly(TAG)
        want = _frame_mac(self.key, self._recv_seq, kind, payload)
        if not hmac.compare_digest(tag, want):
            raise ChannelError("frame failed authentication")
        self._recv_seq += 1
        if kind == KIND_DATA:
            if not payload:
                raise ChannelError("empty data frame")
            return payload[0], payload[1:]  # no copy; write() takes it
        try:
            msg = json.loads(bytes(payload))
        except ValueError:
            raise ChannelError("frame is not JSON") from None
        if not isinstance(msg, dict):
            raise ChannelError("frame is not a JSON object")
        return msg

    async def receive_msg(self) -> dict[str, Any]:
        msg = await self.receive()
        if not isinstance(msg, dict):
            raise ChannelError("expected a message, got data")
        return msg

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


async def _plain_send(stream: trio.abc.Stream, msg: dict[str, Any]) -> None:
    data = json.dumps(msg).encode()
    await stream.send_all(struct.pack(">I", len(data)) + data)


async def _plain_receive(ch: Channel) -> dict[str, Any]:
    (length,) = struct.unpack(">I", await ch._exactly(4))
    if length > 4096:
        raise ChannelError("handshake message too large")
    try:
        msg = json.loads(await ch._exactly(length))
    except ValueError:
        raise ChannelError("handshake is not JSON") from None
    if not isinstance(msg, dict):
        raise ChannelError("handshake is not a JSON object")
    return msg


def _hello(me: dict[str, Any], nonce: bytes) -> dict[str, Any]:
    return {**me, "nonce": nonce.hex()}


def _ids(client: dict[str, Any], server: dict[str, Any]) -> bytes:
    """Both identities, bound into the proofs so that neither can be swapped."""
    return f"{client.get('node')}:{client.get('boot')}>{server.get('node')}:" \
           f"{server.get('boot')}".encode()


def _nonce(msg: dict[str, Any]) -> bytes:
    try:
        nonce = bytes.fromhex(str(msg.get("nonce", "")))
    except ValueError:
        raise ChannelError("bad nonce") from None
    if len(nonce) != 16:
        raise ChannelError("bad nonce")
    return nonce


async def connect(address: tuple[str, int], key: bytes, me: dict[str, Any],
                  timeout: float = HANDSHAKE_TIMEOUT) -> Channel:
    """Open an authenticated channel to a daemon.  ``me`` names us (node id, boot)."""
    try:
        return await _connect(address, key, me, timeout)
    except trio.TooSlowError:
        raise ChannelError(f"no answer from {address[0]}:{address[1]} within "
                           f"{timeout:g}s") from None


async def _connect(address: tuple[str, int], key: bytes, me: dict[str, Any],
                   timeout: float) -> Channel:
    with trio.fail_after(timeout):
        try:
            stream = await trio.open_tcp_stream(*address)
        except OSError as e:
            raise ChannelError(f"cannot connect to {address[0]}:{address[1]}: "
                               f"{e.strerror or e}") from None
        ch = Channel(stream, key, {})
        try:
            nc = os.urandom(16)
            await _plain_send(stream, _hello(me, nc))
            theirs = await _plain_receive(ch)
            ns = _nonce(theirs)
            proof = bytes.fromhex(str(theirs.get("proof", "")))
            ids = _ids(me, theirs)
            if not hmac.compare_digest(proof, _mac(key, b"server", nc, ns, ids)):
                raise ChannelError(f"{address[0]} failed to prove the cluster key")
            await _plain_send(stream, {"proof": _mac(key, b"client", ns, nc, ids).hex()})
            ok = await _plain_receive(ch)
            if ok.get("ok") is not True:
                raise ChannelError(f"{address[0]} refused: {ok.get('error', '?')}")
        except (ChannelError, ValueError, trio.BrokenResourceError, OSError) as e:
            await trio.aclose_forcefully(stream)
            raise ChannelError(str(e)) from None
        except trio.Cancelled:
            await trio.aclose_forcefully(stream)
            raise
        ch.key = _mac(key, b"session", nc, ns)
        ch.peer = theirs
        return ch


async def accept(stream: trio.abc.Stream, key: bytes, me: dict[str, Any],
                 timeout: float = HANDSHAKE_TIMEOUT) -> Channel:
    """Authenticate an incoming connection; raises ChannelError (and closes it) if the
    peer does not hold the key."""
    ch = Channel(stream, key, {})
    try:
        with trio.fail_after(timeout):
            theirs = await _plain_receive(ch)
            nc = _nonce(theirs)
            ns = os.urandom(16)
            ids = _ids(theirs, me)
            await _plain_send(stream, {**_hello(me, ns),
                                       "proof": _mac(key, b"server", nc, ns, ids).hex()})
            reply = await _plain_receive(ch)
            proof = bytes.fromhex(str(reply.get("proof", "")))
            if not hmac.compare_digest(proof, _mac(key, b"client", ns, nc, ids)):
                await _plain_send(stream, {"ok": False, "error": "authentication failed"})
                raise ChannelError("peer failed to prove the cluster key")
            await _plain_send(stream, {"ok": True})
    except (ChannelError, ValueError, trio.TooSlowError, trio.BrokenResourceError,
            OSError) as e:
        await trio.aclose_forcefully(stream)
        raise ChannelError(str(e) or type(e).__name__) from None
    ch.key = _mac(key, b"session", nc, ns)
    ch.peer = theirs
    return ch
