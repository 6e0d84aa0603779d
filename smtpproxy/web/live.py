"""``record --web``: the list grows as sessions happen.

The proxy tells ``Live`` when a session's recording opens and when it
closes (``relay.Proxy.on_session_start`` and ``on_session_end``, called in
the proxy's trio loop, which also serves the pages). ``Live.run`` reads each
recording into the index in a worker thread, so neither a large recording
nor a page being read holds up the relay, then tells every open ``/events`` stream (server-sent
events, ``text/event-stream``; the HTML Living Standard, section 9.2). The
list page's script (static/app.js) answers an event by fetching ``/rows``
for its own filters and putting the new rows in place.

A session being recorded is in the index as what its file holds so far
(its "how it ended" is "in progress" while ``Live`` knows it open). A
browser that reads too slowly is dropped (its ``EventSource`` connects
again by itself); events are never queued without bound.
"""

from __future__ import annotations

import json
import math
import sqlite3
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import trio
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from ..render import visible
from .index import Index, read_row

if TYPE_CHECKING:
    from ..relay import Proxy, Session

__all__ = ["Live", "routes"]

#: events a browser may fall behind by before it is dropped
BACKLOG = 64
#: a comment line this often keeps proxies and the browser from timing out
KEEPALIVE = 15.0
#: how often the recordings of open sessions are looked at: one that grew is
#: indexed again and told as ``grow`` (its row shows the messages so far)
GROW_EVERY = 1.0


class Live:
    """The sessions being recorded and the browsers listening for them."""

    def __init__(self, index: Index) -> None:
        self.index = index
        #: ids of the sessions whose recording is open
        self.active: set[str] = set()
        #: their recordings, and each one's size when it was last indexed
        self._paths: dict[str, Path] = {}
        self._sizes: dict[str, int] = {}
        self._send, self._todo = trio.open_memory_channel[tuple[str, str, Path]](math.inf)
        self._listeners: set[trio.MemorySendChannel[str]] = set()
        self.closed = False
        self._warned = False

    # -- the proxy's side: called in its loop, never blocking ------------------

    def follow(self, proxy: Proxy) -> None:
        """Be told of ``proxy``'s sessions (its ``on_session_start`` and
        ``on_session_end``); a session without a recording is not listed."""

        def started(session: Session) -> None:
            if session.recorder is not None:
                self.opened(session.id, session.recorder.path)

        def ended(session: Session) -> None:
            if session.recorder is not None:
                self.ended(session.id, session.recorder.path)

        proxy.on_session_start = started
        proxy.on_session_end = ended

    def opened(self, session_id: str, path: Path) -> None:
        """A session's recording was created."""
        self.active.add(session_id)
        self._paths[session_id] = path
        self._queue("open", session_id, path)

    def ended(self, session_id: str, path: Path) -> None:
        """A session's recording was closed."""
        self._queue("closed", session_id, path)

    def _queue(self, state: str, session_id: str, path: Path) -> None:
        if not self.closed:
            self._send.send_nowait((state, session_id, path))

    # -- the loop between them -------------------------------------------------

    async def run(self) -> None:
        """Bring the index up to date with the folder, then index each
        recording as it opens and closes and tell the browsers; until
        cancelled. Both in a worker thread: a folder of 10,000 new
        recordings takes a while (docs/performance.md), and the proxy
        relays meanwhile; sessions made in that while are listed after it."""
        # abandoned when cancelled: Index.close() stops it at its next file
        try:
            indexed, _ = await trio.to_thread.run_sync(self.index.update, abandon_on_cancel=True)
        except (sqlite3.Error, OSError) as exc:
            indexed = 0
            self._failed(exc)
        if indexed:
            self._publish(json.dumps({"state": "indexed", "count": indexed}))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._grow)
            await self._follow()

    async def _follow(self) -> None:
        async for state, session_id, path in self._todo:
            if state == "grow" and session_id not in self._paths:
                continue  # closed meanwhile: its "closed" says the rest
            try:
                size = await trio.to_thread.run_sync(self._index, path)
            except (sqlite3.Error, OSError) as exc:
                # the list goes stale; the relay and its recordings go on
                self._failed(exc)
                continue
            if state == "closed":
                self.active.discard(session_id)
                self._paths.pop(session_id, None)
                self._sizes.pop(session_id, None)
            else:
                self._sizes[session_id] = size
            self._publish(json.dumps({"id": session_id, "state": state}))

    async def _grow(self) -> None:
        """Sessions grow as they happen: an open recording that grew since it
        was last indexed is indexed again (a stat a second per open session)."""
        while True:
            await trio.sleep(GROW_EVERY)
            for session_id, path in list(self._paths.items()):
                try:
                    size = path.stat().st_size
                except OSError:
                    continue
                if size != self._sizes.get(session_id, size):
                    self._sizes[session_id] = size  # asked once until indexed
                    self._queue("grow", session_id, path)

    def _failed(self, exc: BaseException) -> None:
        """The index could not be written (a full disk, a read-only folder):
        said once, on stderr; the proxy must not stop for its list."""
        if not self._warned:
            self._warned = True
            print(
                visible(
                    f"smtpproxy: the web view's index cannot be written ({exc}); "
                    "the list stops following new sessions, the recordings go on"
                ),
                file=sys.stderr,
            )

    def _index(self, path: Path) -> int:
        """Index ``path``; the size it had (what was read, or more)."""
        size = path.stat().st_size if path.exists() else 0
        self.index.put(read_row(path))
        return size

    def _publish(self, data: str) -> None:
        for channel in list(self._listeners):
            try:
                channel.send_nowait(data)
            except trio.WouldBlock:  # too slow: dropped, its browser connects again
                self._listeners.discard(channel)
                channel.close()

    def close(self) -> None:
        """End every ``/events`` stream (the server is stopping)."""
        self.closed = True
        for channel in self._listeners:
            channel.close()
        self._listeners.clear()

    @contextmanager
    def listen(self) -> Iterator[trio.MemoryReceiveChannel[str]]:
        """A browser's stream of events (JSON: ``{"id", "state"}``)."""
        send, receive = trio.open_memory_channel[str](BACKLOG)
        if self.closed:
            send.close()
        else:
            self._listeners.add(send)
        try:
            yield receive
        finally:
            self._listeners.discard(send)
            send.close()
            receive.close()


def routes(live: Live | None) -> list[Route]:
    """``/events``: the server-sent events of ``live`` (404 when the web
    view is not recording: ``smtpproxy web`` shows a folder as it is)."""

    async def events(request: Request) -> Response:
        if live is None:
            return PlainTextResponse(
                "no live updates: this is 'smtpproxy web'; 'smtpproxy record --web' has them\n",
                status_code=404,
            )
        return StreamingResponse(
            _stream(live),
            media_type="text/event-stream",
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )

    return [Route("/events", events, name="events")]


async def _stream(live: Live) -> AsyncIterator[str]:
    with live.listen() as receive:
        yield "retry: 2000\n\n"
        while True:
            data: str | None = None
            with trio.move_on_after(KEEPALIVE):
                try:
                    data = await receive.receive()
                except (trio.EndOfChannel, trio.ClosedResourceError):
                    return
            yield ": keep-alive\n\n" if data is None else f"event: session\ndata: {data}\n\n"
