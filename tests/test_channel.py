"""The cluster channel (omuscd.channel): real handshakes over real TCP sockets, a proxy in
the middle that alters, replays, reorders and reflects frames as an attacker on the LAN
would, the older channel's own code (from git history) as the peer of a mixed cluster,
and a capture of the LAN of a namespace cluster while a job holding secrets moves."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import trio

from omuscd import channel
from omuscd.channel import AEAD_HEAD, AEAD_TAG, Channel, ChannelError

KEY = b"cluster-key-for-the-channel-test"
CLIENT = {"node": 1, "proto": 1, "name": "a"}
SERVER = {"node": 2, "proto": 1, "name": "b"}
MARK = b"plain-text-marker-" * 4
#: The channel as it was before it was encrypted (the last commit with HMAC-only frames).
OLD_COMMIT = "5e8db4a"
ROOT = Path(__file__).resolve().parent.parent

Transform = Callable[[bytes], bytes]


def socketpair_channels(key: bytes = KEY) -> tuple[Channel, Channel]:
    a, b = socket.socketpair()
    return (Channel(trio.SocketStream(trio.socket.from_stdlib_socket(a)), key, {}),
            Channel(trio.SocketStream(trio.socket.from_stdlib_socket(b)), key, {}))


async def listener() -> tuple[trio.SocketListener, tuple[str, int]]:
    (lst,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    return lst, lst.socket.getsockname()[:2]


async def pair(accept: Any = channel.accept, connect: Any = channel.connect,
               via: tuple[trio.Nursery, Proxy] | None = None, key: bytes = KEY,
               server_key: bytes | None = None, boots: tuple[int, int] | None = None
               ) -> tuple[Any, Any]:
    """A connected (client, server) pair, optionally through a proxy (run in the given
    nursery, which outlives the pair); each end a fresh daemon start unless ``boots``."""
    client, server = boots or (int.from_bytes(os.urandom(7), "big"),
                               int.from_bytes(os.urandom(7), "big"))
    lst, addr = await listener()
    got: dict[str, Any] = {}
    async def serve() -> None:
        stream = await lst.accept()
        try:
            got["server"] = await accept(stream, server_key or key,
                                         {**SERVER, "boot": server})
        except Exception as e:  # the client's error is the one to raise
            got["server-error"] = e

    async with trio.open_nursery() as n:
        n.start_soon(serve)
        if via is not None:
            addr = await via[0].start(via[1].run, addr)
        try:
            got["client"] = await connect(addr, key, {**CLIENT, "boot": client})
        except Exception as e:
            got["client-error"] = e
    await lst.aclose()
    for side in ("client-error", "server-error"):
        if side in got:
            raise got[side]
    return got["client"], got["server"]


class Proxy:
    """A TCP proxy between two channel ends: the LAN.  ``to_server``/``to_client`` see and
    may change what crosses after the handshake, one whole frame at a time (``frames``)
    or one chunk at a time; everything that crosses is kept in ``seen``."""

    def __init__(self) -> None:
        self.armed = False  # set once the handshake is over
        self.to_server: Callable[[list[bytes]], list[bytes]] = lambda fs: fs
        self.to_client: Callable[[list[bytes]], list[bytes]] = lambda fs: fs
        self.seen = bytearray()
        self.from_server: list[bytes] = []  # frames the server sent, for reflection

    async def run(self, server: tuple[str, int],
                  task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        lst, addr = await listener()
        task_status.started(addr)
        client = await lst.accept()
        upstream = await trio.open_tcp_stream(*server)
        async with trio.open_nursery() as n:
            n.start_soon(self._pump, client, upstream, True)
            n.start_soon(self._pump, upstream, client, False)
        await lst.aclose()

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, up: bool) -> None:
        buf = b""
        try:
            while data := await src.receive_some(1 << 16):
                self.seen += data
                if not self.armed:
                    await dst.send_all(data)
                    continue
                buf += data
                frames = []
                while len(buf) >= AEAD_HEAD.size:
                    size = AEAD_HEAD.size + AEAD_HEAD.unpack(buf[:AEAD_HEAD.size])[0] + AEAD_TAG
                    if len(buf) < size:
                        break
                    frames.append(buf[:size])
                    buf = buf[size:]
                if not up:
                    self.from_server += frames
                for frame in (self.to_server if up else self.to_client)(frames):
                    await dst.send_all(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(dst)


def flip(offset: int) -> Callable[[list[bytes]], list[bytes]]:
    """Flip one bit at ``offset`` of the first frame that crosses (negative: from its end)."""
    done = []

    def change(frames: list[bytes]) -> list[bytes]:
        if frames and not done:
            done.append(1)
            f = bytearray(frames[0])
            f[offset] ^= 0x01
            frames[0] = bytes(f)
        return frames
    return change


# ---------------------------------------------------------------------------- basics
def test_a_handshake_gives_an_encrypted_channel_each_way() -> None:
    async def main() -> None:
        proxy = Proxy()
        async with trio.open_nursery() as outer:
            c, s = await pair(via=(outer, proxy))
            proxy.armed = True
            await exchange(c, s, proxy)
            outer.cancel_scope.cancel()
    trio.run(main)


async def exchange(c: Channel, s: Channel, proxy: Proxy) -> None:
        assert c.cipher == s.cipher == channel.AEADS[0]
        big = os.urandom(3 << 20) + MARK
        async with trio.open_nursery() as n:
            n.start_soon(c.send, {"op": "hello", "secret": MARK.decode()})
            assert await s.receive_msg() == {"op": "hello", "secret": MARK.decode()}
            n.start_soon(s.send_data, 7, big)
            got = bytearray()
            while len(got) < len(big):
                stream_id, data = await c.receive(borrow=True)
                assert stream_id == 7
                got += data
            assert got == big
        assert MARK not in proxy.seen and b"hello" not in proxy.seen
        assert len(proxy.seen) > len(big)  # it did see the traffic
        await c.aclose()
        await s.aclose()


def test_the_wrong_key_is_refused() -> None:
    async def main() -> None:
        with pytest.raises(ChannelError, match="prove the cluster key"):
            await pair(server_key=b"another key")
    trio.run(main)


def test_the_insecure_key_still_gives_a_working_encrypted_channel() -> None:
    async def main() -> None:
        c, s = await pair(key=channel.INSECURE_KEY)
        assert c.cipher == s.cipher != channel.HMAC_ONLY
        await s.send({"op": "x"})
        assert await c.receive_msg() == {"op": "x"}
    trio.run(main)


def test_each_aead_works_and_a_cpu_without_aes_prefers_chacha(monkeypatch) -> None:
    async def main() -> None:
        for offer in (["aes-256-gcm"], ["chacha20-poly1305"],
                      ["chacha20-poly1305", "aes-256-gcm"]):
            monkeypatch.setattr(channel, "AEADS", offer)
            c, s = await pair()
            assert c.cipher == s.cipher == offer[0]
            await c.send_data(3, b"x" * 100)
            stream_id, data = await s.receive()
            assert stream_id == 3 and bytes(data) == b"x" * 100
    trio.run(main)


def test_the_server_picks_chacha_where_either_end_lacks_aes_instructions(monkeypatch) -> None:
    both, client_only, server_only = [channel.AES_GCM, channel.CHACHA], \
        [channel.AES_GCM, channel.CHACHA], [channel.CHACHA, channel.AES_GCM]
    monkeypatch.setattr(channel, "AEADS", both)
    assert channel._choose(client_only) == channel.AES_GCM
    assert channel._choose(server_only) == channel.CHACHA  # the client lacks them
    assert channel._choose(["rot13", channel.AES_GCM]) == channel.AES_GCM
    assert channel._choose(["rot13"]) is None and channel._choose([]) is None
    monkeypatch.setattr(channel, "AEADS", server_only)  # the server lacks them
    assert channel._choose(client_only) == channel.CHACHA
    with pytest.raises(ChannelError, match="bad AEAD offer"):
        channel._offer({"aead": "aes-256-gcm"})
    with pytest.raises(ChannelError, match="bad AEAD offer"):
        channel._offer({"aead": ["x"] * 9})


def test_socketpair_channels_built_with_one_key_frame_with_hmac() -> None:
    """The constructor's single key: older peers' framing, byte for byte."""
    async def main() -> None:
        a, b = socketpair_channels()
        assert a.cipher == channel.HMAC_ONLY
        await a.send({"k": 1})
        await a.send_data(5, b"abc")
        assert await b.receive_msg() == {"k": 1}
        stream_id, data = await b.receive()
        assert stream_id == 5 and bytes(data) == b"abc"
    trio.run(main)


# ---------------------------------------------------------------------------- attacks
async def attacked(to_server: Callable[[list[bytes]], list[bytes]], messages: int = 2,
                   reads: int = 2) -> tuple[list[Any], str, Channel]:
    """Send ``messages`` messages client to server through a proxy applying
    ``to_server``; what the server got (up to ``reads`` messages) before its channel
    failed, and why it failed."""
    proxy = Proxy()
    async with trio.open_nursery() as outer:
        c, s = await pair(via=(outer, proxy))
        proxy.armed = True
        proxy.to_server = to_server
        got: list[Any] = []
        why = ""
        for i in range(messages):
            await c.send({"n": i})
        try:
            with trio.fail_after(5):
                while len(got) < reads:
                    got.append(await s.receive())
        except ChannelError as e:
            why = str(e)
        await c.aclose()
        outer.cancel_scope.cancel()
    return got, why, s


@pytest.mark.parametrize("offset", [4, 5, AEAD_HEAD.size + 2, -1],
                         ids=["kind", "stream", "ciphertext", "tag"])
def test_a_bit_flipped_in_flight_closes_the_channel(offset: int) -> None:
    async def main() -> None:
        got, why, s = await attacked(flip(offset))
        assert got == [] and "failed authentication" in why
        with pytest.raises(ChannelError, match="failed authentication"):
            await s.receive()  # and stays failed
        with pytest.raises(ChannelError):
            await s.send({"after": 1})  # closed
    trio.run(main)


def test_a_replayed_frame_closes_the_channel() -> None:
    async def main() -> None:
        got, why, _ = await attacked(lambda fs: [f for f in fs for _ in (0, 1)], 1)
        assert got == [{"n": 0}] and "failed authentication" in why
    trio.run(main)


def test_reordered_frames_close_the_channel() -> None:
    held: list[bytes] = []

    def swap(frames: list[bytes]) -> list[bytes]:
        held.extend(frames)
        if len(held) < 2:
            return []
        out = [held[1], held[0], *held[2:]]
        held.clear()
        return out

    async def main() -> None:
        got, why, _ = await attacked(swap)
        assert got == [] and "failed authentication" in why
    trio.run(main)


def test_a_dropped_frame_closes_the_channel() -> None:
    dropped: list[bytes] = []

    def drop_first(frames: list[bytes]) -> list[bytes]:
        if not dropped and frames:
            dropped.append(frames.pop(0))
        return frames

    async def main() -> None:
        got, why, _ = await attacked(drop_first)
        assert got == [] and "failed authentication" in why
    trio.run(main)


def test_a_frame_reflected_back_to_its_sender_fails() -> None:
    """Each direction has its own key: the server's own frame, sent back to it as the
    client's (same counter), does not decrypt."""
    async def main() -> None:
        proxy = Proxy()
        async with trio.open_nursery() as outer:
            c, s = await pair(via=(outer, proxy))
            proxy.armed = True
            await s.send({"n": 0})
            assert await c.receive_msg() == {"n": 0}
            proxy.to_server = lambda fs: proxy.from_server[:1]
            await c.send({"n": 0})
            with pytest.raises(ChannelError, match="failed authentication"), \
                    trio.fail_after(5):
                await s.receive()
            outer.cancel_scope.cancel()
    trio.run(main)


def test_a_handshake_whose_offer_is_altered_fails() -> None:
    """Narrowing the client's offer (to force the other AEAD) breaks the server's proof."""
    async def main() -> None:
        proxy = Proxy()
        first = []
        orig = proxy._pump

        async def pump(src: Any, dst: Any, up: bool) -> None:
            if up:  # rewrite the client's hello: offer its second AEAD only
                head = await src.receive_some(4)
                length = int.from_bytes(head, "big")
                body = b""
                while len(body) < length:
                    body += await src.receive_some(length - len(body))
                hello = json.loads(body)
                hello["aead"] = hello["aead"][1:]
                first.append(hello)
                body = json.dumps(hello).encode()
                await dst.send_all(len(body).to_bytes(4, "big") + body)
            await orig(src, dst, up)

        proxy._pump = pump  # type: ignore[method-assign]
        async with trio.open_nursery() as outer:
            with pytest.raises(ChannelError, match="prove the cluster key"):
                await pair(via=(outer, proxy))
            outer.cancel_scope.cancel()
        assert first and len(first[0]["aead"]) == 1
    trio.run(main)


class StripOffer(Proxy):
    """Removes the AEAD offer from the client's hello: the peer looks older."""

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, up: bool) -> None:
        if up:
            head = await src.receive_some(4)
            length = int.from_bytes(head, "big")
            body = b""
            while len(body) < length:
                body += await src.receive_some(length - len(body))
            hello = json.loads(body)
            del hello["aead"]
            body = json.dumps(hello).encode()
            await dst.send_all(len(body).to_bytes(4, "big") + body)
        await super()._pump(src, dst, up)


def test_a_stripped_offer_is_refused_from_a_peer_that_encrypted_before(caplog) -> None:
    """Stripping the offer makes the peers look older to each other: obeyed (and logged
    NOT encrypted) from a peer never heard encrypting, refused from one that has since
    it started: its node id and boot are bound into the proofs."""
    async def main() -> None:
        async with trio.open_nursery() as outer:
            c, _ = await pair(boots=(101, 202))
            assert c.cipher != channel.HMAC_ONLY
            with pytest.raises(ChannelError, match="no encryption"):
                await pair(via=(outer, StripOffer()), boots=(101, 202))
            fresh, _ = await pair(via=(outer, StripOffer()), boots=(103, 204))
            assert fresh.cipher == channel.HMAC_ONLY
            outer.cancel_scope.cancel()
    with caplog.at_level("WARNING", logger="omuscd.channel"):
        trio.run(main)
    assert "NOT encrypted" in caplog.text


# ---------------------------------------------------------------------------- mixed cluster
def old_channel() -> ModuleType:
    """The channel module of the last commit before encryption, from git history."""
    r = subprocess.run(["git", "-C", str(ROOT), "show", f"{OLD_COMMIT}:omuscd/channel.py"],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"no git history here to take the older channel from: {r.stderr!r}")
    spec = importlib.util.spec_from_loader("old_channel", loader=None)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    exec(compile(r.stdout, "old_channel.py", "exec"), mod.__dict__)
    assert "cipher" not in r.stdout.decode()
    return mod


@pytest.mark.parametrize("old_side", ["server", "client"])
def test_an_older_peer_gets_the_hmac_channel_it_knows(old_side: str, caplog) -> None:
    old = old_channel()

    async def main() -> None:
        proxy = Proxy()
        async with trio.open_nursery() as outer:
            if old_side == "server":
                c, s = await pair(accept=old.accept, via=(outer, proxy))
                new = c
            else:
                c, s = await pair(connect=old.connect, via=(outer, proxy))
                new = s
            assert new.cipher == channel.HMAC_ONLY
            await c.send({"op": "x", "m": MARK.decode()})
            assert await s.receive_msg() == {"op": "x", "m": MARK.decode()}
            await s.send_data(9, MARK)
            stream_id, data = await c.receive()
            assert stream_id == 9 and bytes(data) == MARK
            assert MARK in proxy.seen  # not encrypted: what an older peer can speak
            outer.cancel_scope.cancel()
    with caplog.at_level("WARNING", logger="omuscd.channel"):
        channel._told.clear()
        trio.run(main)
    assert "NOT encrypted" in caplog.text


# ---------------------------------------------------------------------------- the LAN
CAPTURE = r"""
import signal, socket, sys
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))  # ETH_P_ALL
s.setsockopt(socket.SOL_SOCKET, 33, 256 << 20)  # SO_RCVBUFFORCE: drop nothing
s.bind((sys.argv[2], 0))
s.settimeout(0.2)
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
print("capturing", flush=True)
with open(sys.argv[1], "wb") as out:
    while not stop:
        try:
            frame = s.recv(1 << 18)
        except (TimeoutError, InterruptedError):
            continue
        out.write(len(frame).to_bytes(4, "big") + frame)
"""
# A job holding a secret in memory (8 MB of it) and printing another: neither is written
# in its source (built from hex), so neither is in its command line, which the nodes
# gossip; they exist only in its memory and its output.
SECRET_MEMORY = b"omuscd-secret-in-memory-7c1d-"
SECRET_OUTPUT = b"omuscd-secret-on-stdout-2b9e"
SECRETS_JOB = f"""
import os, sys, time
memory = bytearray(bytes.fromhex("{SECRET_MEMORY.hex()}") * ((8 << 20) // {len(SECRET_MEMORY)}))
print("ready", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.05)
for _ in range(20):
    print(bytes.fromhex("{SECRET_OUTPUT.hex()}").decode(), len(memory), flush=True)
"""


def tcp_payload_bytes(path: Path, port: int) -> int:
    """The bytes of TCP payload to or from ``port`` in a capture (IPv4 over Ethernet)."""
    total = 0
    data = path.read_bytes()
    i = 0
    while i < len(data):
        n = int.from_bytes(data[i:i + 4], "big")
        frame = data[i + 4:i + 4 + n]
        i += 4 + n
        if frame[12:14] != b"\x08\x00" or frame[23] != 6:
            continue
        ihl = (frame[14] & 0x0F) * 4
        tcp = frame[14 + ihl:]
        ports = {int.from_bytes(tcp[0:2], "big"), int.from_bytes(tcp[2:4], "big")}
        if port in ports:
            total += len(tcp) - (tcp[12] >> 4) * 4
    return total


def test_a_moving_jobs_memory_and_output_are_not_readable_on_the_lan(tmp_path) -> None:
    from tests.test_migration import REASON, job_of
    if REASON is not None:
        pytest.skip(REASON)
    from tests.cluster import namespace_cluster

    flag = tmp_path / "go"
    capture = tmp_path / "lan.cap"
    with namespace_cluster("ab", prefix=f"omc{os.getpid() % 10000}x",
                           leftovers="omuscd-channel-test") as (lan, _, _, n):
        sniffer = subprocess.Popen(["nsenter", f"--net=/run/netns/{lan.bridge}", sys.executable,
                                    "-c", CAPTURE, str(capture), "v0"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert sniffer.stdout is not None and sniffer.stdout.readline() == b"capturing\n"
            p = subprocess.Popen([sys.executable, "-m", "omuscd", "run", "--connect",
                                  n["a"].socket, "--home", "--", sys.executable, "-c",
                                  SECRETS_JOB, str(flag), "omuscd-channel-test"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/tmp")
            assert p.stdout is not None and p.stdout.readline() == b"ready\n"
            job = job_of(n["a"], "omuscd-channel-test")
            moved = n["a"].ctl(f"migrate {job} b")
            assert moved.code == 200 and "migrated to b" in moved.text, moved
            flag.touch()  # it prints its secret on b; the output crosses to a
            out, err = p.communicate(timeout=60)
            assert p.returncode == 0, err
            assert out.count(SECRET_OUTPUT) == 20, out
            # each side says how its channel with the other is protected
            for me, other in (("a", "b"), ("b", "a")):
                peer = str(n[other].json("status")["id"])
                assert n[me].json("status")["channels"][peer] == channel.AEADS[0]
                assert f"channels: node {peer} {channel.AEADS[0]}" in n[me].ctl("status").text
            time.sleep(0.5)
        finally:
            sniffer.send_signal(signal.SIGTERM)
            sniffer.wait(10)
    assert sniffer.returncode == 0, sniffer.stderr.read() if sniffer.stderr else ""
    # the capture saw the move: its 8 MB of memory at least crossed on the cluster port
    assert tcp_payload_bytes(capture, 4270) > 8 << 20, "the capture missed the move"
    seen = capture.read_bytes()
    assert SECRET_MEMORY not in seen
    assert SECRET_OUTPUT not in seen



def test_a_daemon_of_the_previous_protocol_is_listed_and_never_used(tmp_path) -> None:
    """A daemon of the older tree (its whole package, from git history: protocol version 1,
    heartbeat gossip and the HMAC channel) beside a current one (version 2, SWIM): by the
    version rule each lists the other as incompatible and neither uses it; a job asked to
    run there is refused, saying why (it said "no node 'b'")."""
    from omuscd import config
    from omuscd.version import PROTOCOL_VERSION
    from tests.cluster import NetnsLan, start_daemon, wait_for

    old_channel()  # skips where there is no history to take the older tree from
    old_tree = tmp_path / "old"
    old_tree.mkdir()
    subprocess.run(f"git -C {ROOT} archive {OLD_COMMIT} omuscd | tar -x -C {old_tree}",
                   shell=True, check=True)
    with NetnsLan(2, prefix=f"omo{os.getpid() % 10000}x") as lan:
        key = tmp_path / "cluster.key"
        config.write_key(str(key))
        new = start_daemon("a", ["--key-file", str(key)], tmp_path, netns=lan.ns(0))
        old = start_daemon("b", ["--key-file", str(key)], tmp_path, netns=lan.ns(1),
                           env={"PYTHONPATH": str(old_tree), "PYTHONSAFEPATH": "1"})
        try:
            assert "channels" not in old.json("status")  # it is the older code
            for d, other in ((new, "b"), (old, "a")):
                wait_for(lambda d=d, other=other: d.nodes().get(other, {}).get("state")
                         == "incompatible", 15, f"{d.name} to list {other} as incompatible")
            assert PROTOCOL_VERSION > 1
            ran = subprocess.run([sys.executable, "-m", "omuscd", "run", "--connect",
                                  new.socket, "--node", "b", "--", "echo", "from-b"],
                                 capture_output=True, timeout=60, cwd="/tmp")
            assert ran.returncode == 125 and ran.stdout == b"", ran
            assert b"node b runs omuscd-1a0 (protocol version 1): listed, never used" \
                in ran.stderr, ran.stderr
            best = subprocess.run([sys.executable, "-m", "omuscd", "run", "--connect",
                                   new.socket, "--", "echo", "somewhere"],
                                  capture_output=True, timeout=60, cwd="/tmp")
            assert (best.returncode, best.stdout) == (0, b"somewhere\n"), best  # at home
        finally:
            for d in (new, old):
                if d.alive():
                    d.popen.kill()
                    d.popen.wait()


async def framed(framing: str) -> tuple[Channel, Channel]:
    """Two ends of a channel: encrypted ("aead", after a real handshake) or HMAC-framed."""
    return await pair() if framing == "aead" else socketpair_channels()


@pytest.mark.parametrize("framing", ["aead", "hmac"])
def test_a_sender_cancelled_mid_frame_leaves_the_channel_whole(framing: str) -> None:
    """A task cancelled while its megabyte frame is half out (the peer reading slowly)
    stops between frames: the next message, sent after it (a refusal after a failed
    restore), arrives intact.  A cut-off frame followed by the next made the peer read
    garbage ("frame failed authentication" instead of the reason)."""
    async def main() -> None:
        c, s = await framed(framing)
        big = os.urandom(1 << 20)
        got: list[Any] = []

        async def reader() -> None:
            await trio.sleep(0.5)  # the sender is cancelled meanwhile, its frame half out
            while not got or not isinstance(got[-1], dict):
                m = await s.receive()
                got.append(m if isinstance(m, dict) else bytes(m[1]))

        with trio.fail_after(30):  # torn, the peer waits for the rest of a frame for ever
            async with trio.open_nursery() as n:
                n.start_soon(reader)
                with trio.move_on_after(0.2) as scope:
                    await c.send_data(1, big)  # blocks: the buffers fill
                assert scope.cancelled_caught
                await c.send({"op": "refused", "why": "the reason"})
        assert got[-1] == {"op": "refused", "why": "the reason"}
        assert all(isinstance(g, bytes) for g in got[:-1])
        assert big.startswith(b"".join(got[:-1]))
        await c.aclose()
        await s.aclose()
    trio.run(main)


@pytest.mark.parametrize("framing", ["aead", "hmac"])
def test_a_receiver_cancelled_mid_frame_says_so_and_reads_no_garbage(framing: str) -> None:
    """A task cancelled while half of a big frame has arrived (the sender slow): the
    channel says plainly that a receive was cancelled mid-frame on every later receive,
    instead of reading the rest of that frame as the next one (before: 'bad frame header'
    or 'frame failed authentication', logged as a forgery)."""
    async def main() -> None:
        c, s = await framed(framing)
        big = os.urandom(1 << 20)

        async def sender() -> None:
            try:
                await c.send_data(1, big)
                await c.send({"op": "after"})
            except ChannelError:
                pass  # the reader's end closed below

        with trio.fail_after(30):
            async with trio.open_nursery() as n:
                with trio.move_on_after(0.3) as scope:
                    # the stream's buffers hold less than a megabyte: only part of the
                    # frame is in when the receive gives up
                    c.stream.send_all = _slowed(c.stream.send_all)  # type: ignore[method-assign]
                    n.start_soon(sender)
                    await s.receive()
                assert scope.cancelled_caught
                for _ in range(2):
                    with pytest.raises(ChannelError, match="cancelled in the middle of a frame"):
                        await s.receive()
                await s.aclose()
                n.cancel_scope.cancel()
        await c.aclose()
    trio.run(main)


def _slowed(send_all):
    """``send_all`` in 64 KB pieces, 0.1 s apart (a slow link)."""
    async def slow(data) -> None:
        view = memoryview(data)
        for i in range(0, len(view), 1 << 16):
            await send_all(view[i:i + (1 << 16)])
            await trio.sleep(0.1)
    return slow
