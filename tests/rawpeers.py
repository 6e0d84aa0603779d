"""Raw trio peers for the fault, fuzz and security tests: a client and an
upstream that send exactly the bytes a test gives them and keep every byte
they receive, so a test can check the relay changed nothing.

Every wait is bounded by ``TIMEOUT``.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import trio

from smtpproxy.events import Note
from smtpproxy.recording import Recording, read_recording

TIMEOUT = 10.0


class Peer:
    """One end of a TCP connection and everything received on it.

    ``mark`` is how far ``until`` has consumed ``got``."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.got = bytearray()
        self.mark = 0
        self.eof = False

    @property
    def port(self) -> int:
        """The local port: what a recording's header names the client by."""
        stream = self.stream
        while isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        assert isinstance(stream, trio.SocketStream)
        return int(stream.socket.getsockname()[1])

    async def _more(self, what: str) -> None:
        try:
            data = await self.stream.receive_some(1 << 20)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            data = b""
        if not data:
            self.eof = True
            raise AssertionError(
                f"connection closed while waiting for {what}; got {bytes(self.got[-300:])!r}"
            )
        self.got += data

    async def until(self, marker: bytes, timeout: float = TIMEOUT) -> bytes:
        """Read until ``marker`` arrives after what earlier calls consumed;
        return the bytes up to and including it."""
        with trio.fail_after(timeout):
            while (i := self.got.find(marker, self.mark)) < 0:
                await self._more(repr(marker))
        start, self.mark = self.mark, i + len(marker)
        return bytes(self.got[start : self.mark])

    async def reply(self, timeout: float = TIMEOUT) -> bytes:
        """One complete SMTP reply (the lines up to one without ``-``)."""
        out = b""
        while True:
            line = await self.until(b"\r\n", timeout)
            out += line
            if line[3:4] != b"-":
                return out

    async def exactly(self, n: int, timeout: float = TIMEOUT) -> bytes:
        """The next ``n`` bytes after the mark."""
        with trio.fail_after(timeout):
            while len(self.got) - self.mark < n:
                await self._more(f"{n} bytes")
        start, self.mark = self.mark, self.mark + n
        return bytes(self.got[start : self.mark])

    async def to_eof(self, timeout: float = TIMEOUT) -> bytes:
        """Read until the other end closes (a reset counts as closed);
        return what came after the mark."""
        with trio.fail_after(timeout):
            while not self.eof:
                try:
                    data = await self.stream.receive_some(1 << 20)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    self.eof = True
                self.got += data
        start, self.mark = self.mark, len(self.got)
        return bytes(self.got[start:])

    async def send(self, data: bytes) -> None:
        with trio.fail_after(TIMEOUT):
            await self.stream.send_all(data)

    async def half_close(self) -> None:
        assert isinstance(self.stream, trio.SocketStream)
        with trio.fail_after(TIMEOUT):
            await self.stream.send_eof()

    async def close(self) -> None:
        await self.stream.aclose()

    async def reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0) instead of a FIN."""
        assert isinstance(self.stream, trio.SocketStream)
        self.stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await self.stream.aclose()


async def trickle_until_answered(
    client: Peer, chunks: list[bytes], every: float, grace: float = 2
) -> bytes:
    """Send ``chunks`` one at a time, ``every`` seconds apart, until the
    proxy says something; return what it said (one reply). Fails when all
    were sent and nothing came within ``grace`` seconds more."""
    answer = b""

    async def listen(nursery: trio.Nursery) -> None:
        nonlocal answer
        answer = await client.reply(timeout=len(chunks) * every + grace)
        nursery.cancel_scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(listen, nursery)
        for chunk in chunks:
            try:
                await client.send(chunk)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                break
            await trio.sleep(every)
    return answer


async def connect(host: str, port: int) -> Peer:
    with trio.fail_after(TIMEOUT):
        return Peer(await trio.open_tcp_stream(host, port))


class RawUpstream:
    """A loopback TCP server whose connections the test drives by hand:
    ``accept()`` gives the next one as a ``Peer``. They close when the
    nursery it was started in ends."""

    def __init__(self) -> None:
        self._send, self._receive = trio.open_memory_channel[Peer](100)
        self.peers: list[Peer] = []
        self.address: tuple[str, int] = ("127.0.0.1", 0)

    async def start(self, nursery: trio.Nursery) -> RawUpstream:
        (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.address = listener.socket.getsockname()[:2]
        nursery.start_soon(trio.serve_listeners, self._handle, [listener])
        return self

    async def _handle(self, stream: trio.SocketStream) -> None:
        peer = Peer(stream)
        self.peers.append(peer)
        await self._send.send(peer)
        # trio.serve_listeners closes the stream when the handler returns;
        # the test owns it until the server's nursery is cancelled
        await trio.sleep_forever()

    async def accept(self, timeout: float = TIMEOUT) -> Peer:
        with trio.fail_after(timeout):
            return await self._receive.receive()


def proxy_notes(rec: Recording) -> bytes:
    """The bytes the proxy wrote to the client on its own account (its 421s)."""
    return b"".join(e.raw for e in rec.events() if isinstance(e, Note) and e.kind == "proxy_reply")


def recordings_by_client(folder: Path) -> dict[int, Recording]:
    """Each recording in ``folder`` by its client's port (file names sort by
    start time only to the millisecond, so their order is not the order of
    connection)."""
    out = {}
    for path in folder.glob("*.jsonl"):
        rec = read_recording(path)
        out[int(rec.header.client.rpartition(":")[2])] = rec
    return out


def only_recording(folder: Path) -> Recording:
    (path,) = sorted(folder.glob("*.jsonl"))
    return read_recording(path)
