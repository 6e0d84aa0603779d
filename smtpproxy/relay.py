"""The trio relay: accept clients, dial the upstream, copy bytes both ways.

The relay never changes a byte it forwards. Each chunk it reads is handed to
the session's ``Conversation`` (the observer) first, then sent on; the
observer's events go to the recorder and the transcript. Nothing the observer
thinks can stop or alter the flow: its events only describe it.
"""

from __future__ import annotations

import datetime as _dt
import errno
import ipaddress
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import trio

from .events import Event, Note, Side
from .protocol import Conversation, format_reply
from .recording import Recorder, new_session_id
from .render import Transcript
from .summary import SessionSummary

__all__ = ["ProxyConfig", "Proxy", "parse_hostport", "is_loopback"]

BUFSIZE = 256 * 1024


def parse_hostport(value: str, default_port: int | None = None) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or (with a default port) ``host``."""
    value = value.strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
    else:
        host, port_text = value, ""
    if not port_text:
        if default_port is None:
            raise ValueError(f"{value!r} has no port; write HOST:PORT")
        return host or "127.0.0.1", default_port
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r}: port must be a number from 0 to 65535")
    return host or "127.0.0.1", int(port_text)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _fmt_addr(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)


@dataclass
class ProxyConfig:
    listen: tuple[str, int] = ("127.0.0.1", 2525)
    upstream: tuple[str, int] = ("127.0.0.1", 25)
    upstream_label: str | None = None
    recordings: Path | None = Path("recordings")
    idle_timeout: float = 300.0
    connect_timeout: float = 10.0
    max_sessions: int = 1000


@dataclass
class ProxyStats:
    sessions: int = 0
    active: int = 0
    ended: int = 0
    refused: int = 0
    recorder_failures: int = 0
    recordings: list[Path] = field(default_factory=list)


class _SessionEnd(Exception):
    def __init__(self, by: str, reason: str) -> None:
        super().__init__(reason)
        self.by = by
        self.reason = reason


class Session:
    """One client connection and its upstream connection."""

    def __init__(self, proxy: "Proxy", client: trio.SocketStream) -> None:
        self.proxy = proxy
        self.id = new_session_id()
        self.conv = Conversation()
        self.summary = SessionSummary()
        self.client = client
        self.upstream: trio.abc.Stream | None = None
        self.start = trio.current_time()
        self.recorder: Recorder | None = None
        self._warned = False
        self.closed_by = ""
        self.reason = ""
        try:
            self.peer = _fmt_addr(client.socket.getpeername())
        except OSError:
            self.peer = "?"

    @property
    def transcript(self) -> Transcript:
        return self.proxy.transcript

    def open_recording(self) -> None:
        cfg = self.proxy.config
        if cfg.recordings is None:
            return
        try:
            self.recorder = Recorder.create(
                cfg.recordings,
                self.id,
                _dt.datetime.now(_dt.timezone.utc),
                self.start,
                client=self.peer,
                listen=_fmt_addr(cfg.listen),
                upstream=cfg.upstream_label or _fmt_addr(cfg.upstream),
            )
        except OSError as exc:
            self._recorder_failed(exc)
        else:
            self.proxy.stats.recordings.append(self.recorder.path)

    def _recorder_failed(self, exc: OSError) -> None:
        if not self._warned:
            self._warned = True
            self.proxy.stats.recorder_failures += 1
            self._say(f"recording failed, mail keeps flowing: {exc.strerror or exc}", warn=True)

    def _say(self, text: str, warn: bool = False) -> None:
        try:
            self.transcript.say(self.id, text, warn=warn)
        except (OSError, ValueError):
            pass

    def observe(self, events: list[Event]) -> None:
        """Hand events to the summary, the recorder and the transcript.
        Never raises: observing must not disturb relaying."""
        if not events:
            return
        self.summary.update(events)
        rec = self.recorder
        if rec is not None:
            rec.write(trio.current_time(), events)
            if rec.failed:
                assert rec.error is not None
                self._recorder_failed(rec.error)
                self.recorder = None
        try:
            self.transcript.events(self.id, events)
        except (OSError, ValueError):
            pass

    async def _reply_to_client(self, code: int, text: str, kind: str) -> None:
        """Send a reply the proxy made itself, and record it as such."""
        data = format_reply(code, text)
        self.observe([Note(Side.SERVER, kind, f"proxy replied: {code} {text}", data)])
        with trio.move_on_after(5):
            try:
                await self.client.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def run(self) -> None:
        self.open_recording()
        self._say(f"client {self.peer} connected")
        try:
            await self._connect()
            if self.upstream is not None:
                await self._relay()
        finally:
            self.observe(self.conv.close())
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(self.client)
                if self.upstream is not None:
                    await trio.aclose_forcefully(self.upstream)
            duration = trio.current_time() - self.start
            if not self.closed_by:
                self.closed_by, self.reason = "proxy", "proxy shutting down"
            if self.recorder is not None:
                self.recorder.close(trio.current_time(), self.closed_by, self.reason, self.summary.totals())
                if self.recorder.failed:
                    assert self.recorder.error is not None
                    self._recorder_failed(self.recorder.error)
            try:
                self.transcript.summary(
                    self.id,
                    f"session {self.peer} closed by {self.closed_by} ({self.reason}) after "
                    f"{duration:.2f}s: {self.summary.describe()}",
                )
            except (OSError, ValueError):
                pass

    async def _connect(self) -> None:
        cfg = self.proxy.config
        host, port = cfg.upstream
        reason = ""
        try:
            with trio.fail_after(cfg.connect_timeout):
                self.upstream = await trio.open_tcp_stream(host, port)
            return
        except trio.TooSlowError:
            reason = f"no answer within {cfg.connect_timeout:g}s"
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if exc.errno == errno.ECONNREFUSED:
                reason = "connection refused"
        label = cfg.upstream_label or _fmt_addr(cfg.upstream)
        self.closed_by, self.reason = "proxy", f"upstream {label} unreachable: {reason}"
        self.observe([Note(Side.SERVER, "upstream_error", self.reason)])
        await self._reply_to_client(421, f"4.4.0 smtpproxy: upstream {label} unreachable: {reason}", "proxy_reply")

    async def _relay(self) -> None:
        cfg = self.proxy.config
        assert self.upstream is not None
        idle = cfg.idle_timeout if cfg.idle_timeout > 0 else math.inf
        done = {Side.CLIENT: False, Side.SERVER: False}
        async with trio.open_nursery() as nursery:
            scope = nursery.cancel_scope
            scope.deadline = trio.current_time() + idle

            async def pump(side: Side, src: trio.abc.Stream, dst: trio.abc.Stream) -> None:
                try:
                    while True:
                        data = await src.receive_some(BUFSIZE)
                        if not data:
                            break
                        scope.deadline = trio.current_time() + idle
                        self.observe(self.conv.feed(side, data))
                        await dst.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    self._ended(side, f"connection lost: {exc.__cause__ or exc}")
                    scope.cancel()
                    return
                done[side] = True
                self._ended(side, "closed the connection")
                if side is Side.SERVER or done[Side.CLIENT] and done[Side.SERVER]:
                    scope.cancel()
                    return
                # the client is done sending: pass the half-close on, and
                # keep reading the server's last replies
                try:
                    await dst.send_eof()  # type: ignore[attr-defined]
                except (trio.BrokenResourceError, trio.ClosedResourceError, AttributeError):
                    scope.cancel()

            nursery.start_soon(pump, Side.CLIENT, self.client, self.upstream)
            nursery.start_soon(pump, Side.SERVER, self.upstream, self.client)
        if scope.cancelled_caught and not self.closed_by:
            self.closed_by, self.reason = "proxy", f"idle for {cfg.idle_timeout:g}s"
            self.observe([Note(Side.CLIENT, "idle_timeout", self.reason)])
            await self._reply_to_client(421, f"4.4.2 smtpproxy: idle for {cfg.idle_timeout:g}s, closing", "proxy_reply")

    def _ended(self, side: Side, how: str) -> None:
        if not self.closed_by:
            self.closed_by = side.value
            self.reason = f"{side.value} {how}" if not how.startswith("connection") else how


class Proxy:
    """Listens for clients and runs a ``Session`` for each."""

    def __init__(self, config: ProxyConfig, transcript: Transcript) -> None:
        self.config = config
        self.transcript = transcript
        self.stats = ProxyStats()
        self.on_session_end: Callable[[Session], None] | None = None
        self._ended = trio.Event()

    async def wait_sessions_ended(self, count: int) -> None:
        """Wait until ``count`` sessions have ended since the start."""
        while self.stats.ended < count:
            await self._ended.wait()

    async def listen(self) -> list[trio.SocketListener]:
        """Bind the listening sockets (raises OSError, e.g. address in use)."""
        host, port = self.config.listen
        return await trio.open_tcp_listeners(port, host=host)

    async def serve(
        self,
        listeners: list[trio.SocketListener] | None = None,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve until cancelled; ``task_status`` gets the bound address."""
        if listeners is None:
            listeners = await self.listen()
        addr = listeners[0].socket.getsockname()
        task_status.started((addr[0], addr[1]))
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, stream: trio.SocketStream) -> None:
        stats = self.stats
        if stats.active >= self.config.max_sessions:
            stats.refused += 1
            with trio.move_on_after(5):
                try:
                    await stream.send_all(format_reply(421, "4.3.2 smtpproxy: too many sessions, try later"))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            await trio.aclose_forcefully(stream)
            return
        stats.sessions += 1
        stats.active += 1
        session = Session(self, stream)
        try:
            await session.run()
        finally:
            stats.active -= 1
            stats.ended += 1
            self._ended.set()
            self._ended = trio.Event()
            if self.on_session_end is not None:
                self.on_session_end(session)
