"""Encrypted, authenticated TCP streams between daemons (the cluster channel, on the
cluster port).

Remote execution, output streaming, job queries and migration images and pages travel
here.  A connection starts with a mutual challenge: each side proves it holds the cluster
key over the other's fresh nonce, so neither a replayed handshake nor a stranger gets in.

The client's hello offers the AEADs it can use (:data:`AEADS`, in its order of
preference: AES-256-GCM first where the CPU has AES instructions, ChaCha20-Poly1305 first
where it has not); the server answers with its choice, and both proofs then cover the
offer and the choice, so that neither can be altered on the way.  Each direction gets
its own key, derived with HKDF-SHA256 from the cluster key, both nonces, both identities
and the choice; a frame's nonce is its direction's frame counter.  Every frame is
encrypted and authenticated: a frame altered, injected, replayed, reordered or reflected
fails to decrypt, and the channel is closed.  So neither a moving job's memory nor a
job's output can be read on the LAN.

An older daemon offers (or answers) no AEAD; the channel then stays as it was before:
every frame carries an HMAC-SHA256 over its sequence number and content under a session
key, authenticated but not encrypted.  That is logged once per peer boot and shown by
:attr:`Channel.cipher`; it is there so that a cluster can be upgraded node by node.  A
peer that has encrypted since it started (its node id and boot, bound by the proofs)
never gets it: an offer stripped on the way to it is refused, not obeyed.

Frames (big-endian):

* AEAD: ``u32 length | u8 kind | u8 stream | ciphertext (length bytes) | 16-byte tag``;
  the six header bytes are the associated data (authenticated, not encrypted).
* HMAC (older peers): ``u32 length | u8 kind | payload | 32-byte tag``, a data payload
  starting with its ``u8 stream``.

Kind 0 is a JSON object, kind 1 is data of a stream.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import json
import logging
import os
import struct
from typing import Any

import trio

log = logging.getLogger("omuscd.channel")

FRAME_HEAD = struct.Struct(">IB")  # HMAC frames
AEAD_HEAD = struct.Struct(">IBB")  # AEAD frames: length, kind, stream
TAG = 32
AEAD_TAG = 16
MAX_FRAME = 1 << 20
READ_AHEAD = 65536
#: Frames up to this size get buffers of their own; bigger ones reuse the channel's.
SMALL = 65536
KIND_JSON, KIND_DATA = 0, 1
HANDSHAKE_TIMEOUT = 5.0
#: The "key" of --insecure clusters: frames are encrypted and checked with keys anyone
#: can derive, which guards against accidents, not against anyone.
INSECURE_KEY = b"omuscd-insecure-cluster"
#: How a channel's frames are protected (:attr:`Channel.cipher`).
AES_GCM, CHACHA, HMAC_ONLY = "aes-256-gcm", "chacha20-poly1305", "hmac-sha256"
#: The AEADs a channel may use, in no order (the offer orders them).
AEADS = (AES_GCM, CHACHA)
_SEND_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
#: How long one frame, once begun, may take to go out: a frame is sent whole or the
#: channel is broken (a frame cut off by a cancelled sender, then the next frame, made
#: the peer read garbage: "frame failed authentication" instead of the refusal that
#: followed).  Cancellation of a sender takes effect between frames.
FRAME_SEND_LIMIT = 10.0


@functools.cache
def _crypto() -> Any:
    """The cryptography package's pieces, imported at the first keyed channel: an idle
    daemon opens none, and the import costs 7 MB of resident memory (bench_idle)."""
    from types import SimpleNamespace

    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return SimpleNamespace(InvalidTag=InvalidTag, hashes=hashes, HKDF=HKDF,
                           aead={AES_GCM: AESGCM, CHACHA: ChaCha20Poly1305})


def _cpu_has_aes() -> bool:
    """True if the CPU has AES instructions (x86 'aes', arm64 'aes' in Features): then
    AES-GCM is the fastest AEAD; without them ChaCha20-Poly1305 is several times faster
    (and free of table timing)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                name, _, value = line.partition(":")
                if name.strip() in ("flags", "Features"):
                    return "aes" in value.split()
    except OSError:
        pass
    return True  # no /proc/cpuinfo to read: the common case is a CPU that has them


#: The AEADs this node offers, preferred first.
AEADS: list[str] = [AES_GCM, CHACHA] if _cpu_has_aes() else [CHACHA, AES_GCM]


class ChannelError(Exception):
    """The peer failed authentication, broke the framing, or went away."""


class NotSent(ChannelError):
    """No connection to the peer could be made: nothing of a request went out, so it
    may be sent again without being carried out twice."""


class _Forged(ChannelError):
    """A frame that fails its check or breaks the framing: the stream cannot be trusted
    from there on, and is closed."""


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"|".join(parts), hashlib.sha256).digest()


def _frame_mac(key: bytes, seq: int, kind: int, *payload: bytes | memoryview) -> bytes:
    """The tag of one HMAC frame, fed piecewise: no copy of a megabyte to compute it."""
    h = hmac.new(key, struct.pack(">QB", seq, kind), hashlib.sha256)
    for part in payload:
        h.update(part)
    return h.digest()


class _Aead:
    """One direction's AEAD state: its cipher and its frame counter, which is the nonce
    (never reused: a direction's key is used by one side only, and the counter only
    grows)."""

    def __init__(self, name: str, key: bytes):
        self.cipher = _crypto().aead[name](key)
        self.counter = 0

    def nonce(self) -> bytes:
        n = self.counter.to_bytes(12, "big")
        self.counter += 1
        return n

    def seal_into(self, head: bytes, data: bytes | memoryview, out: memoryview) -> None:
        """Encrypt ``data`` into ``out`` (its length plus the tag)."""
        if hasattr(self.cipher, "encrypt_into"):
            self.cipher.encrypt_into(self.nonce(), data, head, out)
        else:  # an older cryptography, without it: one more copy
            out[:] = self.cipher.encrypt(self.nonce(), bytes(data), head)

    def open_into(self, head: bytes, sealed: memoryview, out: memoryview) -> None:
        """Decrypt and check ``sealed`` into ``out``; ChannelError if it fails."""
        try:
            if hasattr(self.cipher, "decrypt_into"):
                self.cipher.decrypt_into(self.nonce(), sealed, head, out)
            else:
                out[:] = self.cipher.decrypt(self.nonce(), bytes(sealed), head)
        except _crypto().InvalidTag:
            raise _Forged("frame failed authentication") from None


class Channel:
    """One authenticated connection.  ``send*`` may be called from several tasks.

    Built with one ``key`` it frames with HMAC under that key (the older peers' channel);
    :func:`connect` and :func:`accept` switch it to an AEAD when both sides offer one."""

    def __init__(self, stream: trio.abc.Stream, key: bytes, peer: dict[str, Any]):
        self.stream = stream
        self.key = key
        self.peer = peer  # the peer's hello: node id, boot
        self.cipher = HMAC_ONLY
        self._sealer: _Aead | None = None
        self._opener: _Aead | None = None
        self._send_seq = 0
        self._recv_seq = 0
        self._buf = bytearray()
        self._frame: bytearray | None = None  # the buffer borrowed data frames use
        self._sealed: bytearray | None = None  # received ciphertext, before decryption
        self._out: bytearray | None = None  # the frame being sent, encrypted
        self._broken = ""
        self._torn = ""  # why nothing more can be sent (a frame left half sent)
        #: a frame's header was read and the rest not (yet): a receive cancelled now
        #: leaves the stream in the middle of a frame, and nothing more can be read
        self._mid_frame = False
        self._lock = trio.Lock()

    @property
    def peer_id(self) -> int:
        return int(self.peer["node"])

    def use_aead(self, name: str, send_key: bytes, receive_key: bytes) -> None:
        """Encrypt from the next frame on, with a key for each direction."""
        self.cipher = name
        self._sealer = _Aead(name, send_key)
        self._opener = _Aead(name, receive_key)

    # ------------------------------------------------------------------ sending
    async def _send_frame(self, kind: int, stream_id: int, data: bytes | memoryview) -> None:
        length = len(data) + (1 if self._sealer is None and kind == KIND_DATA else 0)
        if length > MAX_FRAME:
            raise ChannelError("frame too large")
        async with self._lock:
            if self._torn:
                raise ChannelError(self._torn)
            # whole frames only (see FRAME_SEND_LIMIT): a cancelled sender stops between
            # frames, and a frame that cannot go out in time breaks the channel
            with trio.CancelScope(shield=True):
                with trio.move_on_after(FRAME_SEND_LIMIT) as limit:
                    try:
                        if self._sealer is None:
                            await self._send_hmac(kind, stream_id, data)
                        else:
                            await self._send_aead(kind, stream_id, data)
                    except _SEND_ERRORS as e:
                        self._torn = f"send failed: {e}"
                        raise ChannelError(self._torn) from None
            if limit.cancelled_caught:
                self._torn = f"a frame did not go out within {FRAME_SEND_LIMIT:g}s"
                raise ChannelError(self._torn)
            await trio.lowlevel.checkpoint_if_cancelled()

    async def _send_hmac(self, kind: int, stream_id: int, data: bytes | memoryview) -> None:
        payload = (bytes([stream_id]), data) if kind == KIND_DATA else (data,)
        length = sum(len(p) for p in payload)
        tag = _frame_mac(self.key, self._send_seq, kind, *payload)
        self._send_seq += 1
        await self.stream.send_all(FRAME_HEAD.pack(length, kind) + payload[0])
        for part in payload[1:]:
            await self.stream.send_all(part)
        await self.stream.send_all(tag)

    async def _send_aead(self, kind: int, stream_id: int, data: bytes | memoryview) -> None:
        """One write of header, ciphertext and tag, encrypted into a buffer: the channel's
        own for big frames (reused: the lock is held until it is sent), a small one for
        small frames (a channel that only ever sends a request keeps no megabyte)."""
        assert self._sealer is not None
        end = AEAD_HEAD.size + len(data) + AEAD_TAG
        if len(data) <= SMALL:
            out = memoryview(bytearray(end))
        else:
            if self._out is None:
                self._out = bytearray(AEAD_HEAD.size + MAX_FRAME + AEAD_TAG)
            out = memoryview(self._out)[:end]
        head = AEAD_HEAD.pack(len(data), kind, stream_id)
        out[:AEAD_HEAD.size] = head
        self._sealer.seal_into(head, data, out[AEAD_HEAD.size:])
        await self.stream.send_all(out)

    async def send(self, msg: dict[str, Any]) -> None:
        await self._send_frame(KIND_JSON, 0, json.dumps(msg, separators=(",", ":")).encode())

    async def send_data(self, stream_id: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        for i in range(0, len(data), MAX_FRAME - 1):
            await self._send_frame(KIND_DATA, stream_id, view[i:i + MAX_FRAME - 1])

    # ------------------------------------------------------------------ receiving
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

    async def _payload(self, n: int, into: bytearray | None) -> memoryview:
        """``n`` bytes of a frame, received straight into a buffer: a megabyte of
        migration pages is copied once from the kernel, not gathered, joined and sliced.
        ``into``: a buffer of the channel's, reused by the next frame (a fresh megabyte
        per frame costs page faults: a gigabyte of them per gigabyte moved)."""
        payload = memoryview(into)[:n] if into is not None else memoryview(bytearray(n))
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

    def _frame_buffer(self) -> bytearray:
        if self._frame is None:
            self._frame = bytearray(MAX_FRAME)
        return self._frame

    async def receive(self, borrow: bool = False) -> dict[str, Any] | tuple[int, memoryview]:
        """The next message: a dict (JSON) or ``(stream, data)``.  ``borrow``: the data is
        only good until the next call (for callers that write it out at once).  A frame
        that fails its check closes the channel: nothing after it can be trusted."""
        if self._broken:
            raise _Forged(self._broken)
        if self._mid_frame:
            raise ChannelError("a receive was cancelled in the middle of a frame: nothing "
                               "more can be read on this channel")
        try:
            if self._opener is None:
                kind, stream_id, payload = await self._receive_hmac(borrow)
            else:
                kind, stream_id, payload = await self._receive_aead(borrow)
        except _Forged as e:
            self._broken = str(e)
            log.warning("cluster channel with node %s: %s; closed", self.peer.get("node"), e)
            await trio.aclose_forcefully(self.stream)
            raise
        if kind == KIND_DATA:
            return stream_id, payload  # no copy; write() takes it
        try:
            msg = json.loads(bytes(payload))
        except ValueError:
            raise ChannelError("frame is not JSON") from None
        if not isinstance(msg, dict):
            raise ChannelError("frame is not a JSON object")
        return msg

    async def _receive_hmac(self, borrow: bool) -> tuple[int, int, memoryview]:
        length, kind = FRAME_HEAD.unpack(await self._exactly(FRAME_HEAD.size))
        if length > MAX_FRAME or kind not in (KIND_JSON, KIND_DATA):
            raise _Forged("bad frame header")
        into = self._frame_buffer() if borrow and kind == KIND_DATA else None
        self._mid_frame = True
        payload = await self._payload(length, into)
        tag = await self._exactly(TAG)
        self._mid_frame = False
        want = _frame_mac(self.key, self._recv_seq, kind, payload)
        if not hmac.compare_digest(tag, want):
            raise _Forged("frame failed authentication")
        self._recv_seq += 1
        if kind == KIND_JSON:
            return kind, 0, payload
        if not payload:
            raise ChannelError("empty data frame")
        return kind, payload[0], payload[1:]

    async def _receive_aead(self, borrow: bool) -> tuple[int, int, memoryview]:
        """Ciphertext and tag into one buffer, decrypted into another (or a fresh one)."""
        assert self._opener is not None
        head = await self._exactly(AEAD_HEAD.size)
        length, kind, stream_id = AEAD_HEAD.unpack(head)
        if length > MAX_FRAME or kind not in (KIND_JSON, KIND_DATA):
            raise _Forged("bad frame header")
        if length <= SMALL:
            into = None  # a small frame: a small buffer of its own
        else:
            if self._sealed is None:
                self._sealed = bytearray(MAX_FRAME + AEAD_TAG)
            into = self._sealed
        self._mid_frame = True
        sealed = await self._payload(length + AEAD_TAG, into)
        self._mid_frame = False
        if borrow and kind == KIND_DATA:
            payload = memoryview(self._frame_buffer())[:length]
        else:
            payload = memoryview(bytearray(length))
        self._opener.open_into(head, sealed, payload)
        return kind, stream_id, payload

    async def receive_msg(self) -> dict[str, Any]:
        msg = await self.receive()
        if not isinstance(msg, dict):
            raise ChannelError("expected a message, got data")
        return msg

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


# ---------------------------------------------------------------------- handshake
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


def _offer(hello: dict[str, Any]) -> list[str] | None:
    """The AEADs a client's hello offers (None: an older daemon, which offers none)."""
    offer = hello.get("aead")
    if offer is None:
        return None
    if not isinstance(offer, list) or not all(isinstance(a, str) for a in offer) \
            or len(offer) > 8:
        raise ChannelError("bad AEAD offer")
    return offer


def _choose(offer: list[str] | None) -> str | None:
    """The server's choice: AES-GCM where both prefer it, else ChaCha20-Poly1305 (the
    fast one on a CPU without AES instructions, at either end); None: HMAC frames."""
    usable = [a for a in offer or [] if a in AEADS]
    if not usable:
        return None
    if usable[0] == AES_GCM and AEADS[0] == AES_GCM:
        return AES_GCM
    return CHACHA if CHACHA in usable else usable[0]


def _terms(offer: list[str] | None, choice: str | None) -> tuple[bytes, ...]:
    """What the proofs cover besides nonces and identities: the offer and the choice
    (nothing for an older peer, whose proofs are as they were)."""
    if choice is None:
        return ()
    return (b"aead", ",".join(offer or []).encode(), choice.encode())


def _session(ch: Channel, key: bytes, nc: bytes, ns: bytes, ids: bytes,
             choice: str | None, client: bool) -> None:
    """Key the channel: two AEAD keys (client to server, server to client), or the HMAC
    session key of older peers."""
    if choice is None:
        ch.key = _mac(key, b"session", nc, ns)
        return
    c = _crypto()
    keys = c.HKDF(algorithm=c.hashes.SHA256(), length=64, salt=nc + ns,
                  info=b"omuscd channel|" + choice.encode() + b"|" + ids).derive(key)
    c2s, s2c = keys[:32], keys[32:]
    ch.use_aead(choice, c2s if client else s2c, s2c if client else c2s)


_told: set[tuple[Any, Any]] = set()
#: Peers (node id, boot) that have used an AEAD with this daemon: a peer does not forget
#: how to encrypt while it runs, so a later handshake of theirs without one is someone
#: on the path stripping the offer, and is refused.
_encrypted_before: set[tuple[str, str]] = set()
#: Node id (as a string) -> how the last channel with that node was protected (status).
ciphers: dict[str, str] = {}


def _who(hello: dict[str, Any]) -> tuple[str, str]:
    return str(hello.get("node")), str(hello.get("boot"))


def _check_downgrade(peer: dict[str, Any], choice: str | None) -> None:
    """Remember peers that encrypt; refuse one of them that no longer does (called once
    the proofs have bound its node id and boot to this handshake)."""
    who = _who(peer)
    if choice is not None:
        if len(_encrypted_before) > 4096:
            _encrypted_before.clear()
        _encrypted_before.add(who)
    elif who in _encrypted_before:
        raise ChannelError(f"node {who[0]} encrypted its channels before and now offers no "
                           "encryption: refused (something on the path may be stripping it)")


def describe(by_node: dict[str, str]) -> str:
    """``status``'s line: how the last channel with each node was protected."""
    return ", ".join(f"node {n} {how}" + (" (NOT encrypted: an older omuscd)"
                                          if how == HMAC_ONLY else "")
                     for n, how in by_node.items()) or "none yet"


def _note_cipher(ch: Channel, address: str) -> None:
    """Record how the channel with this peer is protected; say once per peer boot that
    it is not encrypted (an older peer)."""
    if len(ciphers) > 4096:
        ciphers.clear()
    ciphers[str(ch.peer.get("node"))] = ch.cipher
    if ch.cipher != HMAC_ONLY:
        return
    who = (ch.peer.get("node"), ch.peer.get("boot"))
    if who in _told:
        return
    if len(_told) > 4096:
        _told.clear()
    _told.add(who)
    log.warning("cluster channel with node %s (%s): the peer offers no encryption (an older "
                "omuscd); its frames are authenticated but NOT encrypted", who[0], address)


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
            offer = list(AEADS)
            await _plain_send(stream, {**_hello(me, nc), "aead": offer})
            theirs = await _plain_receive(ch)
            ns = _nonce(theirs)
            choice = theirs.get("aead")
            if choice is not None and choice not in offer:
                raise ChannelError(f"{address[0]} chose an AEAD not offered")
            proof = bytes.fromhex(str(theirs.get("proof", "")))
            ids = _ids(me, theirs)
            terms = _terms(offer, choice)
            if not hmac.compare_digest(proof, _mac(key, b"server", nc, ns, ids, *terms)):
                raise ChannelError(f"{address[0]} failed to prove the cluster key")
            _check_downgrade(theirs, choice)
            await _plain_send(stream, {"proof": _mac(key, b"client", ns, nc, ids,
                                                     *terms).hex()})
            ok = await _plain_receive(ch)
            if ok.get("ok") is not True:
                raise ChannelError(f"{address[0]} refused: {ok.get('error', '?')}")
        except (ChannelError, ValueError, trio.BrokenResourceError, OSError) as e:
            await trio.aclose_forcefully(stream)
            raise ChannelError(str(e)) from None
        except trio.Cancelled:
            await trio.aclose_forcefully(stream)
            raise
        _session(ch, key, nc, ns, ids, choice, client=True)
        ch.peer = theirs
        _note_cipher(ch, address[0])
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
            offer = _offer(theirs)
            choice = _choose(offer)
            terms = _terms(offer, choice)
            ns = os.urandom(16)
            ids = _ids(theirs, me)
            hello = {**_hello(me, ns), "proof": _mac(key, b"server", nc, ns, ids, *terms).hex()}
            if choice is not None:
                hello["aead"] = choice
            await _plain_send(stream, hello)
            reply = await _plain_receive(ch)
            proof = bytes.fromhex(str(reply.get("proof", "")))
            if not hmac.compare_digest(proof, _mac(key, b"client", ns, nc, ids, *terms)):
                await _plain_send(stream, {"ok": False, "error": "authentication failed"})
                raise ChannelError("peer failed to prove the cluster key")
            try:
                _check_downgrade(theirs, choice)
            except ChannelError as e:
                await _plain_send(stream, {"ok": False, "error": "no encryption offered"})
                raise ChannelError(str(e)) from None
            await _plain_send(stream, {"ok": True})
    except (ChannelError, ValueError, trio.TooSlowError, trio.BrokenResourceError,
            OSError) as e:
        await trio.aclose_forcefully(stream)
        raise ChannelError(str(e) or type(e).__name__) from None
    _session(ch, key, nc, ns, ids, choice, client=False)
    ch.peer = theirs
    peer = getattr(getattr(stream, "socket", None), "getpeername", lambda: ("?",))()
    _note_cipher(ch, str(peer[0]))
    return ch
