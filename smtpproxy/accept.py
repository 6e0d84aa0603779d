"""Accepting clients within the process's file descriptors.

Each session holds a few descriptors: the client's socket, the upstream
socket, the recording file (and, with the embedded upstream, the server's
side of that connection). A process may hold ``RLIMIT_NOFILE`` of them, often
1024. ``record`` raises its soft limit to the hard one
(``raise_descriptor_limit``) and lowers ``--max-sessions`` to what the rest
allows (``sessions_allowed``), so a client past the limit is answered
``421 4.3.2`` at once instead of meeting a full descriptor table.

Should accept(2) still fail for want of descriptors (a consumer not counted,
or the system table full), ``serve`` does not leave the clients queued in
the backlog hanging, as trio's ``serve_listeners`` does (it logs a traceback
per failure and retries every 100 ms). It keeps one descriptor spare and frees
it to accept and refuse the waiting clients one at a time (the trick libev
and nginx use), says so in one line at most every ``WARN_EVERY`` seconds, and
tries again after ``BACKOFF``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import NoReturn

import trio

__all__ = [
    "RESERVE",
    "open_descriptors",
    "raise_descriptor_limit",
    "serve",
    "sessions_allowed",
]

log = logging.getLogger(__name__)

#: descriptors kept back from sessions: the listeners, trio's own (epoll, its
#: wakeup pair), the spare, a refused client, a leaf minted through a scratch
#: file, the resolver, a worker's pipes
RESERVE = 32
#: errnos of accept(2) that say the process or the system is out of room
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
#: seconds between two tries of accept(2) while out of descriptors
BACKOFF = 0.1
#: seconds between two warnings about it
WARN_EVERY = 10.0
#: the most waiting clients refused in one go through the spare descriptor
DRAIN_AT_ONCE = 256


def raise_descriptor_limit() -> tuple[int, int]:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard one, as far as the
    kernel lets it (an unlimited hard limit stops at ``fs.nr_open`` on
    Linux). Returns (the limit before, the limit now)."""
    try:
        import resource
    except ImportError:  # not on this platform: nothing to raise
        return 0, 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open", encoding="ascii") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = soft
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            return soft, soft
        return soft, target
    return soft, soft


def open_descriptors() -> int:
    """How many descriptors this process has open now (3 where the system
    does not say)."""
    for folder in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(folder)) - 1  # less the one listdir used
        except OSError:
            continue
    return 3


def sessions_allowed(limit: int, in_use: int, per_session: int) -> int:
    """How many sessions fit in ``limit`` descriptors when ``in_use`` are
    taken and ``RESERVE`` are kept back (2**31 for a limit of 0: unknown)."""
    if limit <= 0:
        return 2**31
    return max(0, (limit - in_use - RESERVE) // per_session)


async def serve(
    listeners: Sequence[trio.SocketListener],
    handler: Callable[[trio.SocketStream], Awaitable[object]],
    *,
    admit: Callable[[], bool],
    refusal: bytes,
    refused: Callable[[int], None] = lambda n: None,
) -> NoReturn:
    """Accept clients on ``listeners`` until cancelled, running
    ``handler(stream)`` for each that ``admit()`` lets in (the stream is
    closed when it returns). A client not admitted is sent ``refusal`` and
    closed at once, without a task of its own; so are the clients waiting
    while accept(2) runs out of descriptors (``refused(n)`` counts those)."""
    room = _Room(refusal, refused)
    try:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(_accept_loop, listener, nursery, handler, admit, room)
    finally:
        room.close()
    raise AssertionError("the accept loops never end")  # pragma: no cover


async def serve_embedded(
    handler: Callable[[trio.SocketStream], Awaitable[object]],
    host: str,
    port: int,
    task_status: trio.TaskStatus[tuple[str, int]],
) -> None:
    """An embedded server (the sink, a mock) on ``host:port`` (0: any free
    port) until cancelled; ``task_status`` gets the address it listens on."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    addr = listeners[0].socket.getsockname()
    task_status.started((addr[0], addr[1]))
    await trio.serve_listeners(handler, listeners)


async def close_after_bug(stream: trio.abc.Stream, logger: logging.Logger, what: str) -> None:
    """A bug met by one session of an embedded server (the sink, a mock):
    logged with its traceback, and the client told ``421`` (RFC 5321 section
    3.8) within a second, so the server goes on for the others."""
    logger.exception("%s session failed; closing it", what)
    with (
        trio.move_on_after(1),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        await stream.send_all(b"421 4.3.0 internal error, closing\r\n")


async def _accept_loop(
    listener: trio.SocketListener,
    nursery: trio.Nursery,
    handler: Callable[[trio.SocketStream], Awaitable[object]],
    admit: Callable[[], bool],
    room: _Room,
) -> NoReturn:
    async with listener:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno not in CAPACITY_ERRNOS:
                    raise
                room.exhausted(listener.socket.fileno(), exc)
                await trio.sleep(BACKOFF)
                continue
            if admit():
                nursery.start_soon(_run, handler, stream)
            else:
                _refuse(stream.socket.fileno(), room.refusal)
                stream.socket.close()


async def _run(
    handler: Callable[[trio.SocketStream], Awaitable[object]], stream: trio.SocketStream
) -> None:
    try:
        await handler(stream)
    finally:
        await trio.aclose_forcefully(stream)


def _refuse(fd: int, refusal: bytes) -> None:
    """Send ``refusal`` on a freshly accepted socket without waiting: its
    send buffer is empty, so a short reply fits, and a client that is
    already gone just misses it."""
    try:
        os.write(fd, refusal)
    except OSError:
        pass


def _spare() -> int | None:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None


class _Room:
    """The spare descriptor, and the warnings about running out."""

    def __init__(self, refusal: bytes, refused: Callable[[int], None]) -> None:
        self.refusal = refusal
        self._refused = refused
        self._spare = _spare()
        self._warned_at = -math.inf
        self._since_warning = 0

    def close(self) -> None:
        if self._spare is not None:
            os.close(self._spare)
            self._spare = None

    def exhausted(self, listening_fd: int, exc: OSError) -> None:
        """accept(2) on ``listening_fd`` failed with ``exc`` for want of
        room: refuse the clients waiting there, and say so now and then."""
        count = self._refuse_waiting(listening_fd)
        self._since_warning += count
        self._refused(count)
        now = trio.current_time()
        if now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            log.warning(
                "smtpproxy: cannot accept clients: %s; %d refused with 421 4.3.2 so far, the others "
                "wait; raise the descriptor limit (ulimit -n) or lower --max-sessions",
                reason,
                self._since_warning,
            )
            self._since_warning = 0

    def _refuse_waiting(self, listening_fd: int) -> int:
        """Free the spare descriptor to accept one waiting client, refuse it,
        take the spare back; again, while clients wait (at most
        ``DRAIN_AT_ONCE``). Nothing else runs in between: no await."""
        if self._spare is None:
            self._spare = _spare()  # lost to another consumer: try to regain it
            return 0
        count = 0
        listening = socket.socket(fileno=listening_fd)
        try:
            while count < DRAIN_AT_ONCE and self._spare is not None:
                os.close(self._spare)
                self._spare = None
                try:
                    client, _ = listening.accept()
                except OSError:  # none waiting (the socket does not block), or still no room
                    break
                with client:
                    client.setblocking(False)
                    _refuse(client.fileno(), self.refusal)
                count += 1
                self._spare = _spare()
        finally:
            listening.detach()
            if self._spare is None:
                self._spare = _spare()
        return count
