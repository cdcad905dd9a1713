"""A migrating job's memory, streamed to the target while it is dumped.

CRIU's dump can send the pages to a page server over a connected socket it is given
(``--ps-socket``) instead of writing them to disk.  Here each daemon holds the other end of
a socket pair with its own CRIU (the dump on the source, the page server on the target) and
relays between it and the move's authenticated cluster channel.  So the pages are as
authenticated as every other cluster message, nothing listens on a port for them, and the
connection is made before the job is frozen.  (CRIU's own TLS, used before, needed
certificates made per move, shook hands inside the freeze and carried about 275 MB/s on
the development machine; this relay carries several times that.)

The page server's protocol runs both ways (it answers each image opened, and confirms the
end), so both relays carry both directions.  On the channel the stream is a run of data
frames on :data:`PAGE_STREAM`, closed by ``pages-end`` (source: the dump is over) and
answered by ``paged`` (target: the page server stored everything; how many bytes) or
``failed``.  Anything going wrong closes the source's socket: CRIU's dump then fails
cleanly and resumes the job; a dump is never killed in the middle.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Callable

import trio

from omuscd.channel import Channel, ChannelError
from omuscd.cluster.rpc import error_text
from omuscd.migrate import MoveError

PAGE_STREAM = 10  # data frames of the page stream on a move's channel
CHUNK = (1 << 20) - 1  # one channel frame (MAX_FRAME less the stream byte)
SOCKET_BUFFER = 4 << 20
IDLE_TIMEOUT = 30.0  # no progress for this long: the other side is gone


def socket_pair() -> tuple[trio.SocketStream, socket.socket]:
    """Our end (a trio stream) and CRIU's (to pass to it, then close here)."""
    mine, theirs = socket.socketpair()
    for s in (mine, theirs):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    return trio.SocketStream(trio.socket.from_stdlib_socket(mine)), theirs


class _Relay:
    def __init__(self, ch: Channel, mine: trio.SocketStream,
                 on_sent: Callable[[int], None] | None = None):
        self.ch = ch
        self.mine = mine
        self.error = ""
        self.paged = 0
        self.sent = 0  # bytes of CRIU's stream relayed so far
        self.on_sent = on_sent

    def fail(self, why: str) -> None:
        """The first cause counts; closing our end makes CRIU fail where it stands."""
        self.error = self.error or why
        self.mine.socket.close()


async def send_pages(ch: Channel, dump: Callable[[int], Awaitable[None]],
                     pair: tuple[trio.SocketStream, socket.socket] | None = None,
                     on_sent: Callable[[int], None] | None = None) -> int:
    """On the source: run ``dump(fd)`` (CRIU writing to the page server at ``fd``) while
    relaying its socket to the target over ``ch``.  Returns the bytes the target stored;
    raises MoveError if the dump or the stream failed (the dump has ended either way).
    ``pair``: the :func:`socket_pair` to use (made before the freeze, the dump's CRIU
    started with CRIU's end: see omuscd.migrate.swrk); both ends are closed here.
    ``on_sent`` hears the bytes relayed so far, as they go (a move's progress)."""
    mine, theirs = pair or socket_pair()
    relay = _Relay(ch, mine, on_sent)
    answered = trio.CancelScope()
    failed: MoveError | None = None
    async with trio.open_nursery() as nursery:  # errors leave it by hand: no groups
        nursery.start_soon(_pages_out, relay, answered)
        nursery.start_soon(_answers_in, relay, answered)
        try:
            await dump(theirs.fileno())
        except MoveError as e:
            failed = e
            nursery.cancel_scope.cancel()
        finally:
            theirs.close()  # CRIU has exited: our end now reads to its end
    mine.socket.close()
    if relay.error:  # the cause: a failed relay closes CRIU's socket, failing the dump
        raise MoveError(relay.error)
    if failed is not None:
        raise failed
    return relay.paged


async def _pages_out(relay: _Relay, answered: trio.CancelScope) -> None:
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    sock = relay.mine.socket
    try:
        while got := await sock.recv_into(buf):
            with trio.fail_after(IDLE_TIMEOUT):
                await relay.ch.send_data(PAGE_STREAM, view[:got])
            relay.sent += got
            if relay.on_sent is not None:
                relay.on_sent(relay.sent)
        await relay.ch.send({"op": "pages-end"})
    except trio.TooSlowError:
        relay.fail("the target stopped taking pages")
        return
    except (ChannelError, OSError, trio.ClosedResourceError) as e:
        relay.fail(f"page stream: {e}")
        return
    answered.deadline = trio.current_time() + IDLE_TIMEOUT


async def _answers_in(relay: _Relay, answered: trio.CancelScope) -> None:
    with answered:
        try:
            while True:
                item = await relay.ch.receive(borrow=True)
                if isinstance(item, tuple):
                    if item[0] != PAGE_STREAM:
                        raise ChannelError("unexpected data during the page stream")
                    await relay.mine.send_all(item[1])
                    continue
                if item.get("op") == "paged":
                    relay.paged = int(item.get("bytes", 0))
                    return
                raise ChannelError(error_text(item, f"unexpected {item.get('op')!r}"))
        except (ChannelError, OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                ValueError, TypeError) as e:
            relay.fail(f"page stream: {e}")
            return
    if answered.cancelled_caught:
        relay.fail("the target did not confirm the pages")


async def receive_pages(ch: Channel, mine: trio.SocketStream, first_timeout: float,
                        done: Callable[[], Awaitable[int]]) -> int:
    """On the target: relay the page stream from ``ch`` into the page server's socket
    (and its answers back) until ``pages-end``; ``done()`` then waits for the page server
    and says how many bytes it stored, which the source is told.  Raises ChannelError
    (or whatever ``done`` raises) if the stream breaks; the caller abandons the move."""
    failed: Exception | None = None
    async with trio.open_nursery() as nursery:  # errors leave it by hand: no groups
        nursery.start_soon(_answers_out, ch, mine)
        try:
            paged = await _relay_in(ch, mine, first_timeout, done)
        except (ChannelError, MoveError, trio.TooSlowError) as e:
            failed = e
            nursery.cancel_scope.cancel()
    if failed is not None:
        raise failed
    await ch.send({"op": "paged", "bytes": paged})
    return paged


async def _relay_in(ch: Channel, mine: trio.SocketStream, first_timeout: float,
                    done: Callable[[], Awaitable[int]]) -> int:
    timeout = first_timeout  # the dump freezes and collects before its first page
    while True:
        with trio.fail_after(timeout):
            item = await ch.receive(borrow=True)
        timeout = IDLE_TIMEOUT
        if isinstance(item, tuple):
            if item[0] != PAGE_STREAM:
                raise ChannelError("unexpected data during the page stream")
            try:
                with trio.fail_after(IDLE_TIMEOUT):
                    await mine.send_all(item[1])
            except (trio.BrokenResourceError, OSError) as e:
                raise ChannelError(f"the page server stopped reading: {e}") from None
            continue
        if item.get("op") != "pages-end":
            raise ChannelError(f"unexpected {item.get('op')!r} during the page stream")
        return await done()


async def _answers_out(ch: Channel, mine: trio.SocketStream) -> None:
    """The page server's answers, to the dump; ends when the page server closes."""
    try:
        while data := await mine.receive_some(65536):
            await ch.send_data(PAGE_STREAM, data)
    except (ChannelError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return  # the relay the other way finds out too
