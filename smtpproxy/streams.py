"""Reading and writing a session's legs on the relay's hot path.

``receive`` and ``send_all`` are ``stream.receive_some(BUFSIZE)`` and
``stream.send_all(data)``. On a plain TCP leg (a ``trio.SocketStream``) they
do what trio's socket does, without the layers around it; a TLS leg goes
through its stream as usual. This took about a fifth off the proxy's CPU
per small message (docs/performance.md, "Changes that mattered").
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from typing import NoReturn

import trio

__all__ = ["BUFSIZE", "dial", "receive", "send_all"]

#: the most read from a leg at once
BUFSIZE = 256 * 1024


async def receive(stream: trio.abc.Stream) -> bytes | bytearray:
    """``stream.receive_some(BUFSIZE)``. On a plain TCP leg this is what
    trio's socket does (try the call; on success a checkpoint, on EAGAIN wait
    for the fd), without the layers around it: the stream's conflict detector
    and error translator and the socket's wrapper and context manager, on the
    proxy's hottest path. Cancellation, yielding and the errors raised are
    the stream's own."""
    if type(stream) is not trio.SocketStream:
        return await stream.receive_some(BUFSIZE)
    sock = stream.socket
    await trio.lowlevel.checkpoint_if_cancelled()
    try:
        data = os.read(sock.fileno(), BUFSIZE)
    except BlockingIOError:
        pass
    except OSError as exc:
        _broken(exc)
    else:
        await trio.lowlevel.cancel_shielded_checkpoint()
        return data
    while True:
        await trio.lowlevel.wait_readable(sock)
        try:
            return os.read(sock.fileno(), BUFSIZE)
        except BlockingIOError:
            continue
        except OSError as exc:
            _broken(exc)


async def send_all(stream: trio.abc.Stream, data: bytes | bytearray) -> None:
    """``stream.send_all(data)``, the same way round as ``receive``."""
    if type(stream) is not trio.SocketStream:
        await stream.send_all(data)
        return
    sock = stream.socket
    await trio.lowlevel.checkpoint_if_cancelled()
    try:
        sent = os.write(sock.fileno(), data)
    except BlockingIOError:
        sent = 0
    except OSError as exc:
        _broken(exc)
    if sent == len(data):
        await trio.lowlevel.cancel_shielded_checkpoint()
        return
    with memoryview(data) as view:
        while sent < len(view):
            await trio.lowlevel.wait_writable(sock)
            try:
                sent += os.write(sock.fileno(), view[sent:])
            except BlockingIOError:
                continue
            except OSError as exc:
                _broken(exc)


async def dial(host: str, port: int) -> trio.SocketStream:
    """``trio.open_tcp_stream(host, port)``; an IP address is dialed with one
    ``connect``, without the resolver and the happy-eyeballs nursery there is
    nothing to choose between (one dial per session: it shows when every
    message has its own connection)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return await trio.open_tcp_stream(host, port)
    sock = trio.socket.socket(
        socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_STREAM
    )
    try:
        await sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


#: errnos trio's SocketStream reports as a closed (not a broken) stream
_CLOSED = {errno.EBADF, errno.ENOTSOCK}


def _broken(exc: OSError) -> NoReturn:
    """Raise what trio's SocketStream raises for ``exc``."""
    if exc.errno in _CLOSED:
        raise trio.ClosedResourceError("this socket was already closed") from None
    raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
