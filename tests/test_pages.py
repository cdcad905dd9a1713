"""The page stream of a migration (omuscd.pages), between two channels over a real socket
pair, with stand-ins only for CRIU's two ends (a "dump" that writes pages and waits for
the page server's answer, and a "page server" that reads them and answers)."""

from __future__ import annotations

import os
import socket

import pytest
import trio
import trio.testing

from omuscd.channel import Channel
from omuscd.migrate import MoveError
from omuscd.migrate.page_relay import receive_pages, send_pages, socket_pair

KEY = b"k" * 32
PAGES = os.urandom(3 << 20) + b"tail"
ANSWER = b"\0\0\0\0"  # the page server's closing status


def channels() -> tuple[Channel, Channel]:
    a, b = socket.socketpair()
    return (Channel(trio.SocketStream(trio.socket.from_stdlib_socket(a)), KEY, {}),
            Channel(trio.SocketStream(trio.socket.from_stdlib_socket(b)), KEY, {}))


async def fake_dump(fd: int, got: dict[str, bytes]) -> None:
    """What CRIU's dump does with its page server socket: pages out, an answer back."""
    s = trio.SocketStream(trio.socket.from_stdlib_socket(socket.socket(fileno=os.dup(fd))))
    try:
        await s.send_all(PAGES)
        answer = b""
        while len(answer) < len(ANSWER):
            chunk = await s.receive_some(4)
            if not chunk:
                raise MoveError("criu dump failed: the page server went away")
            answer += chunk
        got["answer"] = answer
    except (trio.BrokenResourceError, OSError) as e:
        raise MoveError(f"criu dump failed: {e}") from None
    finally:
        await s.aclose()


async def fake_page_server(sock: socket.socket, got: dict[str, bytes],
                           fail_after: int | None = None) -> None:
    s = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    data = b""
    while len(data) < len(PAGES):
        data += await s.receive_some(1 << 16)
        if fail_after is not None and len(data) >= fail_after:
            await s.aclose()  # a full disk, say: it stops and closes
            return
    got["pages"] = data
    await s.send_all(ANSWER)
    await s.aclose()


def test_pages_and_answers_cross_both_ways() -> None:
    trio.run(_crossing)


async def _crossing() -> None:
    source, target = channels()
    got: dict[str, bytes] = {}
    result: dict[str, int] = {}

    async def target_side() -> None:
        mine, theirs = socket_pair()

        async def done() -> int:
            return len(got["pages"])

        async with trio.open_nursery() as n:
            n.start_soon(fake_page_server, theirs, got)
            result["target"] = await receive_pages(target, mine, 10, done)

    async with trio.open_nursery() as n:
        n.start_soon(target_side)
        result["source"] = await send_pages(source, lambda fd: fake_dump(fd, got))
    assert got["pages"] == PAGES and got["answer"] == ANSWER
    assert result["source"] == result["target"] == len(PAGES)


def test_a_page_server_that_stops_fails_the_dump_with_the_reason() -> None:
    trio.run(_stopping)


async def _stopping() -> None:
    source, target = channels()
    got: dict[str, bytes] = {}

    async def target_side() -> None:
        mine, theirs = socket_pair()
        async with trio.open_nursery() as n:
            n.start_soon(fake_page_server, theirs, got, 1 << 20)
            try:
                await receive_pages(target, mine, 10, lambda: trio.sleep(0))  # type: ignore
            except Exception as e:  # what immigrate() does: tell the source why
                await target.send({"op": "failed", "reason": f"b: {e}"})

    errors: list[str] = []
    async with trio.open_nursery() as n:
        n.start_soon(target_side)
        try:
            await send_pages(source, lambda fd: fake_dump(fd, got))
        except MoveError as e:
            errors.append(str(e))
    assert "answer" not in got and "pages" not in got
    # the cause is said (the target's reason), not only that the dump then failed
    assert errors and "b: " in errors[0], errors


def test_a_silent_target_times_out_and_the_dump_fails() -> None:
    """Under MockClock: the 30 s without progress pass at once."""
    trio.run(_silent, clock=trio.testing.MockClock(autojump_threshold=0))


async def _silent() -> None:
    source, _target = channels()  # the target never reads: its socket buffers fill
    got: dict[str, bytes] = {}
    with pytest.raises(MoveError):
        await send_pages(source, lambda fd: fake_dump(fd, got))
    assert "answer" not in got
