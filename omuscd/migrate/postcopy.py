"""A moving job's memory after the job runs on the target (post-copy), over the move's
authenticated channel.

A big job is frozen only while CRIU dumps it on the source and its small images travel
(the pages the restore needs itself go with them).  The target restores it lazily and
resumes it at once; ``criu lazy-pages`` there fetches the rest of its memory when the job
touches it and in the background, asking the source, whose daemon answers from the dump's
pages image (:class:`omuscd.migrate.lazy.PageServer`).  The target's relay joins that
daemon's socket to the channel; on the channel the requests and the answers are data
frames on :data:`PAGE_STREAM`, among the move's messages.

Only when the target has every page does it take the job into its books and say
``running``; only then does the source kill its frozen copy.  Until then the job depends
on both: anything failing kills the target's copy first (a lazily restored job whose
page source is gone would read zeros where its memory was) and the source resumes its
own, which has lost nothing.  What the target's copy did meanwhile is done again.  So a
move home, where the user reads the output as it is written, is never post-copy.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from omuscd.channel import Channel, ChannelError
from omuscd.migrate.lazy import PAGE, PageServer
from omuscd.migrate.page_relay import CHUNK, IDLE_TIMEOUT, PAGE_STREAM


async def serve(ch: Channel, server: PageServer, first_timeout: float,
                on_message: Callable[[dict[str, Any]], Awaitable[bool]],
                on_served: Callable[[int], None] | None = None,
                heard: Callable[[], None] | None = None) -> None:
    """On the source: answer the target's page requests from ``ch`` until
    ``on_message`` (given every message in between) returns True.  Raises ChannelError
    if the channel breaks, trio.TooSlowError after IDLE_TIMEOUT without a word (the
    first: ``first_timeout``) or with an answer stuck that long (a link cut: the
    socket's buffer stays full), MoveError for a request CRIU would not make.
    ``on_served`` hears the bytes of memory sent so far, after each answer (progress);
    ``heard`` is called after each word received and each part of an answer sent (the
    target's copy is killed within IDLE_TIMEOUT of the last: see Source.roll_back)."""
    timeout = first_timeout
    while True:
        with trio.fail_after(timeout):
            item = await ch.receive(borrow=True)
        if heard is not None:
            heard()
        timeout = IDLE_TIMEOUT
        if not isinstance(item, tuple):
            if await on_message(item):
                return
            continue
        if item[0] != PAGE_STREAM:
            raise ChannelError("unexpected data among the page requests")
        for answer in server.feed(item[1]):
            view = memoryview(answer)
            for start in range(0, len(view), CHUNK):
                with trio.fail_after(IDLE_TIMEOUT):
                    await ch.send_data(PAGE_STREAM, view[start:start + CHUNK])
                if heard is not None:
                    heard()
        if on_served is not None:
            on_served(server.served * PAGE)


class Relay:
    """On the target: joins the lazy-pages daemon's socket to the channel, both ways, and
    hands the channel's messages to :meth:`message`."""

    def __init__(self, ch: Channel, mine: trio.SocketStream):
        self.ch = ch
        self.mine = mine
        self.error: str = ""
        self.last = trio.current_time()  # when a page request or answer last went by
        self._send, self._messages = trio.open_memory_channel[dict[str, Any]](8)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Relay until cancelled or broken (then :attr:`error` says why)."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._from_source, nursery.cancel_scope)
            nursery.start_soon(self._to_source, nursery.cancel_scope)
            task_status.started()

    async def message(self, timeout: float) -> dict[str, Any]:
        """The next message on the channel; ChannelError if the relay broke first."""
        with trio.fail_after(timeout):
            try:
                return await self._messages.receive()
            except trio.EndOfChannel:
                raise ChannelError(self.error or "the channel broke") from None

    def check(self) -> None:
        """ChannelError if the relay broke, TooSlowError if nothing went by for
        IDLE_TIMEOUT."""
        if self.error:
            raise ChannelError(self.error)
        if trio.current_time() - self.last > IDLE_TIMEOUT:
            raise trio.TooSlowError

    def _fail(self, why: str, scope: trio.CancelScope) -> None:
        self.error = self.error or why
        self._send.close()
        scope.cancel()

    async def _from_source(self, scope: trio.CancelScope) -> None:
        try:
            while True:
                item = await self.ch.receive(borrow=True)
                if isinstance(item, tuple):
                    if item[0] != PAGE_STREAM:
                        raise ChannelError("unexpected data among the pages")
                    self.last = trio.current_time()
                    await self.mine.send_all(item[1])
                else:
                    await self._send.send(item)
        except (ChannelError, trio.BrokenResourceError, trio.ClosedResourceError,
                OSError) as e:
            self._fail(f"page relay: {e}", scope)

    async def _to_source(self, scope: trio.CancelScope) -> None:
        try:
            while data := await self.mine.receive_some(65536):
                self.last = trio.current_time()
                await self.ch.send_data(PAGE_STREAM, data)
        except (ChannelError, trio.BrokenResourceError, trio.ClosedResourceError,
                OSError) as e:
            self._fail(f"page relay: {e}", scope)
            return
        # the lazy-pages daemon closed its end: it is done, or gone (its exit says which)
