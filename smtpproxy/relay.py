"""The trio relay: accept clients, dial the upstream, copy bytes both ways.

A ``Session`` relays, observes and closes; what its TLS arrangement decides
(who answers a STARTTLS, when the upstream is upgraded, what
``--strip-starttls`` hides) is asked of its ``TlsArrangement``
(smtpproxy/tlsmodes.py), and the TLS steps themselves (handshakes, the
proxy's own STARTTLS) are its base class ``TlsSteps`` (smtpproxy/relaytls.py).

The relay never changes a byte it forwards. Each chunk it reads is handed to
the session's ``Conversation`` (the observer) first, then sent on; the
observer's events go to the recorder and the transcript. Nothing the observer
thinks can stop or alter the flow: its events only describe it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import logging
import math
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from . import accept
from .auth import Redactor
from .events import Command, Event, Note, NoteKind, Reply, Side
from .faults import FaultPlan
from .net import connect_reason, format_address
from .protocol import Conversation, format_reply
from .recording import Recorder, new_session_id, note_in_place
from .relayfaults import FaultSteps
from .relaytls import TlsSteps
from .render import Transcript
from .streams import dial, receive, send_all
from .summary import SessionSummary
from .tls import ServerContexts
from .tlsmodes import TlsArrangement, UpstreamTls

__all__ = ["Proxy", "ProxyConfig", "Session", "UpstreamTls"]

#: how a session reaches its upstream: ``streams.dial`` unless a test gives another
Opener = Callable[[str, int], Awaitable[trio.abc.Stream]]

#: the verbs whose commands and replies the TLS arrangement follows
_TLS_VERBS = frozenset({"STARTTLS", "EHLO", "HELO"})

log = logging.getLogger(__name__)


@dataclass
class ProxyConfig:
    listen: tuple[str, int] = ("127.0.0.1", 2525)
    upstream: tuple[str, int] = ("127.0.0.1", 25)
    upstream_label: str | None = None
    recordings: Path | None = Path("recordings")
    idle_timeout: float = 300.0
    connect_timeout: float = 10.0
    #: a TLS handshake must end within it (0: no limit); a lower idle_timeout
    #: wins for the client's
    handshake_timeout: float = 30.0
    #: a client's command line must end within it from its first byte (0: never)
    line_timeout: float = 300.0
    #: a client's message must end within it from its first byte (0: never)
    message_timeout: float = 3600.0
    max_sessions: int = 1000
    #: clients speak TLS from the first byte (SMTPS, RFC 8314)
    listen_tls: bool = False
    #: ``--upstream-tls`` (docs/tls.md); its word (``"plain"``) is taken too
    upstream_tls: UpstreamTls = UpstreamTls.MIRROR
    upstream_context: ssl.SSLContext | None = None
    upstream_sni: str | None = None
    server_contexts: ServerContexts | None = None
    strip_starttls: bool = False
    #: remove passwords, tokens and digests from recordings and the transcript
    redact: bool = False
    #: ``--fault`` / ``--faults``: the rules to apply (docs/faults.md)
    faults: FaultPlan | None = None

    def __post_init__(self) -> None:
        self.upstream_tls = UpstreamTls(self.upstream_tls)


@dataclass
class ProxyStats:
    sessions: int = 0
    active: int = 0
    ended: int = 0
    refused: int = 0
    recorder_failures: int = 0
    recordings: int = 0  # a count, not a list: a proxy may run for months


class _SendFailed(trio.BrokenResourceError):
    """Sending to ``side`` failed: that peer is gone, not the one a pump was
    reading from. Its ``__cause__`` is the underlying error."""

    def __init__(self, side: Side) -> None:
        super().__init__(f"sending to the {side.value} failed")
        self.side = side


class Session(FaultSteps, TlsSteps):
    """One client connection and its upstream connection: relaying,
    observing and closing (the TLS steps are ``TlsSteps``, fault rules
    ``FaultSteps``). ``open_upstream``
    dials the upstream (tests give one that returns a memory stream)."""

    def __init__(
        self, proxy: Proxy, client: trio.abc.Stream, *, open_upstream: Opener = dial
    ) -> None:
        self.proxy = proxy
        cfg = proxy.config
        self.id = new_session_id()
        self._open_upstream = open_upstream
        self.tls = TlsArrangement(
            cfg.upstream_tls, listen_tls=cfg.listen_tls, strip=cfg.strip_starttls
        )
        self.conv = Conversation()
        self._redactor = Redactor() if proxy.config.redact else None
        self.summary = SessionSummary()
        self.streams: dict[Side, trio.abc.Stream] = {Side.CLIENT: client}
        # one writer at a time per peer, and none while its TLS handshake runs
        # (a semaphore: the same guard as a Lock at a third of the cost per send)
        self._locks = {Side.CLIENT: trio.Semaphore(1), Side.SERVER: trio.Semaphore(1)}
        #: a send to that side was cut short: its peer got part of what was sent
        self._cut = {Side.CLIENT: False, Side.SERVER: False}
        self._last_server_code = 0
        self._resume_client = trio.Event()
        self._activity = trio.current_time()
        self._deadline_hit = ""  # idle, line or message: what ended the session
        self._watch: trio.CancelScope | None = None  # the watchdog's sleep
        self._line_no = 0  # Conversation.open_line at the last client read
        self._line_since = 0.0
        self._message_no = 0  # Conversation.message_number at the last client read
        self._message_since = 0.0
        self._replies_seen: trio.Event | None = None
        self._done: dict[Side, bool] = {}
        self._scope = trio.CancelScope()
        self.start = trio.current_time()
        self.recorder: Recorder | None = None
        self._warned = False
        self.closed_by = ""
        self.reason = ""
        try:
            self.peer = (
                format_address(client.socket.getpeername())
                if isinstance(client, trio.SocketStream)
                else "?"
            )
        except OSError:
            self.peer = "?"
        #: some --fault rule can fire in this session: its steps are asked
        #: before they go on (smtpproxy/relayfaults.py); without one (no
        #: rules, or none for this session) the plain path, as without rules
        self._faulty = False
        if cfg.faults is not None:
            faults = cfg.faults.session(self.peer)
            if faults.live:
                self._faulty = True
                self._init_faults(faults)

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
                _dt.datetime.now(_dt.UTC),
                self.start,
                derive=not cfg.redact,  # redaction rewrites events, so those are what is written
                client=self.peer,
                listen=format_address(cfg.listen),
                upstream=cfg.upstream_label or format_address(cfg.upstream),
            )
        except OSError as exc:
            self._recorder_failed(exc)
        else:
            self.proxy.stats.recordings += 1

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

    def observe(
        self,
        events: list[Event],
        now: float | None = None,
        fed: tuple[Side, bytes | bytearray] | None = None,
        call: str | None = None,
        note: Note | None = None,
    ) -> None:
        """Hand events to the summary, the recorder and the transcript
        (``now``: the clock time they were seen, if the caller has it).
        ``fed``: the Conversation gave them for these bytes (``note``: the
        proxy's own, which the note stands for); ``call``: for this call of
        its (``tls_established``, ``implicit_tls``, ``close``); neither:
        they were made outside it. Never raises: observing must not disturb
        relaying."""
        if note is not None:
            events = note_in_place(note, events)
        redactor = self._redactor
        if redactor is not None:
            events = [redactor(e) for e in events]
        tls = self.tls
        for ev in events:
            if type(ev) is Reply:
                self._last_server_code = ev.code
                if ev.command in _TLS_VERBS:
                    tls.see_reply(ev)
            elif type(ev) is Command and ev.verb in _TLS_VERBS:
                tls.see_command(ev)
        rec = self.recorder
        if rec is not None:
            rec.report(trio.current_time() if now is None else now, events, fed, call, note)
            if rec.failed:
                assert rec.error is not None
                self._recorder_failed(rec.error)
                self.recorder = None
        if not events:
            return
        self.summary.update(events)
        try:
            self.transcript.events(self.id, events)
        except (OSError, ValueError):
            pass

    async def _reply_to_client(self, code: int, text: str, kind: NoteKind) -> None:
        """Send a reply the proxy made itself, and record it as such."""
        data = format_reply(code, text)
        self.observe([Note(Side.SERVER, kind, f"proxy replied: {code} {text}", data)])
        with trio.move_on_after(5):
            try:
                await self._send(Side.CLIENT, data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    async def _send(self, side: Side, data: bytes | bytearray) -> None:
        """Send to ``side``'s peer, over whatever stream it has now."""
        lock = self._locks[side]
        try:
            lock.acquire_nowait()  # the usual case: no wait, and no extra trip to the scheduler
        except trio.WouldBlock:
            await lock.acquire()
        try:
            await send_all(self.streams[side], data)
        except trio.BrokenResourceError as exc:
            raise _SendFailed(side) from (exc.__cause__ or exc)
        except trio.Cancelled:
            # a send cut short (a deadline ended the session mid-write, as a
            # throttled reply can be): what the peer got ends mid-line
            self._cut[side] = True
            raise
        finally:
            lock.release()

    def upstream_port(self) -> int | None:
        """The local port of the upstream connection (None: none yet, or
        not a socket)."""
        stream = self.streams.get(Side.SERVER)
        while isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        if isinstance(stream, trio.SocketStream):
            with contextlib.suppress(OSError):
                return int(stream.socket.getsockname()[1])
        return None

    def _end(self, by: str, reason: str) -> None:
        if not self.closed_by:
            if by == "client" and self.tls.client_silent:
                # GnuTLS clients (msmtp, mutt) check the certificate after the
                # handshake and just hang up when they do not trust it
                reason += (
                    "; the client hung up right after the TLS handshake: if it does not trust "
                    "the proxy's certificate, run 'smtpproxy ca' and trust that CA"
                )
            self.closed_by, self.reason = by, reason

    async def run(self) -> None:
        self.open_recording()
        if self.proxy.on_session_start is not None:
            self.proxy.on_session_start(self)
        self._say(f"client {self.peer} connected")
        try:
            if await self._start():
                await self._relay()
        finally:
            self.observe(self.conv.close(), call="close")
            with trio.CancelScope(shield=True):
                for stream in self.streams.values():
                    await trio.aclose_forcefully(stream)
            duration = trio.current_time() - self.start
            self._end("proxy", "proxy shutting down")
            if self.recorder is not None:
                self.recorder.close(trio.current_time(), self.closed_by, self.reason)
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

    async def _start(self) -> bool:
        """Implicit TLS with the client, the upstream connection, implicit TLS
        with the upstream. False when the session cannot go on."""
        cfg = self.proxy.config
        if cfg.listen_tls:
            if not await self._client_handshake():
                return False
            self.conv.implicit_tls()
            self.observe([], call="implicit_tls")
        if self._faulty and not await self._fault_connect():
            return False
        if not await self._connect():
            return False
        if self.tls.implicit_upstream and not await self._upstream_handshake():
            await self._reply_to_client(
                421, f"4.7.0 smtpproxy: {self.reason}", NoteKind.PROXY_REPLY
            )
            return False
        return True

    async def _connect(self) -> bool:
        cfg = self.proxy.config
        host, port = cfg.upstream
        reason = ""
        try:
            with trio.fail_after(cfg.connect_timeout):
                self.streams[Side.SERVER] = await self._open_upstream(host, port)
            return True
        except trio.TooSlowError:
            reason = f"no answer within {cfg.connect_timeout:g}s"
        except OSError as exc:
            reason = connect_reason(exc)
        label = cfg.upstream_label or format_address(cfg.upstream)
        self._end("proxy", f"upstream {label} unreachable: {reason}")
        self.observe([Note(Side.SERVER, NoteKind.UPSTREAM_ERROR, self.reason)])
        await self._reply_to_client(
            421, f"4.4.0 smtpproxy: upstream {label} unreachable: {reason}", NoteKind.PROXY_REPLY
        )
        return False

    # -- relaying -----------------------------------------------------------

    async def _relay(self) -> None:
        cfg = self.proxy.config
        self._done = {Side.CLIENT: False, Side.SERVER: False}
        async with trio.open_nursery() as nursery:
            self._scope = nursery.cancel_scope
            if self._faulty:
                self._nursery = nursery
            nursery.start_soon(self._watchdog)
            nursery.start_soon(self._pump, Side.CLIENT)
            nursery.start_soon(self._pump, Side.SERVER)
        hit = self._deadline_hit
        if hit and not self.closed_by:
            why = {
                "idle": f"idle for {cfg.idle_timeout:g}s",
                "line": f"command line not completed within {cfg.line_timeout:g}s",
                "message": f"message not completed within {cfg.message_timeout:g}s",
            }[hit]
            self._end("proxy", why)
            self.observe([Note(Side.CLIENT, NoteKind(f"{hit}_timeout"), self.reason)])
            if not self._cut[Side.CLIENT]:  # never a 421 in the middle of a reply
                await self._reply_to_client(
                    421, f"4.4.2 smtpproxy: {why}, closing", NoteKind.PROXY_REPLY
                )

    def _next_deadline(self) -> tuple[str, float]:
        """The first deadline of the session and its name: ``idle_timeout``
        after the last byte either way, ``line_timeout`` after the first byte
        of a client's line still open, ``message_timeout`` after the first
        byte of a message still open. The last two are whole-record limits,
        as Postfix's ``smtpd_per_record_deadline``: a client trickling one
        byte at a time keeps a session from going idle, not from ending."""
        cfg = self.proxy.config
        why, when = "", math.inf
        if cfg.idle_timeout > 0:
            why, when = "idle", self._activity + cfg.idle_timeout
        if self._line_no and 0 < cfg.line_timeout and self._line_since + cfg.line_timeout < when:
            why, when = "line", self._line_since + cfg.line_timeout
        if (
            self._message_no
            and 0 < cfg.message_timeout
            and self._message_since + cfg.message_timeout < when
        ):
            why, when = "message", self._message_since + cfg.message_timeout
        return why, when

    async def _watchdog(self) -> None:
        """End the session when its first deadline passes. The idle deadline
        is not moved on every read (cheaper): the watchdog wakes at the old
        one and looks again. A line or message that begins brings the wake
        forward (``_client_clocks``)."""
        while True:
            why, wake = self._next_deadline()
            if trio.current_time() >= wake:
                self._deadline_hit = why
                self._scope.cancel()
                return
            with trio.move_on_at(wake) as self._watch:
                await trio.sleep_forever()

    def _client_clocks(self, now: float) -> None:
        """After a client read: start the clock of a line or message that
        began in it, and stop that of one that ended."""
        conv = self.conv
        line = conv.open_line
        if line != self._line_no:
            self._line_no, self._line_since = line, now
            if line and self.proxy.config.line_timeout > 0:
                self._wake_by(now + self.proxy.config.line_timeout)
        message = conv.message_number
        if message != self._message_no:
            self._message_no, self._message_since = message, now
            if message and self.proxy.config.message_timeout > 0:
                self._wake_by(now + self.proxy.config.message_timeout)

    def _wake_by(self, when: float) -> None:
        watch = self._watch
        if watch is not None and when < watch.deadline:
            watch.deadline = when

    def _needs_care(self, side: Side) -> bool:
        """Whether this read needs more than forwarding: a STARTTLS on its
        way or possible, a reply the client pump waits for, or a mode that
        rewrites or holds what the server says."""
        if side is Side.CLIENT:
            return self.conv.waiting_for == "STARTTLS" or self.tls.answers_starttls()
        return self._replies_seen is not None or self.tls.server_needs_care(self.conv.encrypted)

    async def _pump(self, side: Side) -> None:
        """Read from one peer, observe, forward to the other, until EOF."""
        while await self._pump_stream(side):
            pass  # a fault rule's re-dial replaced the upstream: read the new one

    async def _pump_stream(self, side: Side) -> bool:
        """``_pump`` on the peer's connection of now; True: the proxy
        replaced the upstream connection (smtpproxy/relayredial.py)."""
        conv = self.conv
        other = side.other
        streams = self.streams
        faulty = self._faulty
        gen = self._upstream_gen if faulty else 0
        try:
            while True:
                data = await receive(streams[side])
                if not data:
                    if faulty and side is Side.SERVER and await self._upstream_replaced(gen):
                        return True
                    break
                self._activity = now = trio.current_time()
                if faulty:
                    read = (
                        self._fault_client_read if side is Side.CLIENT else self._fault_server_read
                    )
                    if not await read(data, now):
                        self._scope.cancel()
                        return False
                    continue
                if side is Side.CLIENT:
                    self.tls.client_silent = False
                self.observe(conv.feed(side, data), now, fed=(side, data))
                if side is Side.CLIENT:
                    self._client_clocks(now)
                if self._needs_care(side):
                    if not await self._with_care(side, data):
                        self._scope.cancel()
                        return False
                    continue
                await self._send(other, data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if (
                faulty
                and side is Side.SERVER
                and not isinstance(exc, _SendFailed)
                and await self._upstream_replaced(gen)
            ):
                return True
            # a failed send is the fault of the peer sent to, not the one read
            lost = exc.side if isinstance(exc, _SendFailed) else side
            self._end(lost.value, f"connection lost: {exc.__cause__ or exc}")
            await self._upstream_gone(lost)
            self._scope.cancel()
            return False
        self._done[side] = True
        if side is Side.CLIENT and conv.in_message:
            # never let a half message through: no terminator, no half-close
            self._end("client", "client closed mid-message; upstream closed without completing it")
            self._scope.cancel()
            return False
        self._end(side.value, f"{side.value} closed the connection")
        if side is Side.SERVER or all(self._done.values()):
            await self._upstream_gone(side)
            self._scope.cancel()
            return False
        # the client is done sending: pass the half-close on, and keep
        # reading the server's last replies
        unsent = self._take_unsent() if faulty else self.tls.take_unsent()
        if unsent:
            await self._send(other, unsent)
        try:
            await streams[other].send_eof()  # type: ignore[attr-defined]
        except (trio.BrokenResourceError, trio.ClosedResourceError, AttributeError):
            self._scope.cancel()
        return False

    async def _upstream_gone(self, side: Side) -> None:
        """The upstream went away without saying goodbye: tell the client
        with a 421 (RFC 5321 3.8) unless it was closing anyway or a reply is
        half sent (then the connection is just closed)."""
        if side is not Side.SERVER or self._last_server_code == 221 or self.conv.server_tls:
            return
        if self._faulty and self._quiet_upstream:
            return  # the proxy closed it for a fault, and has told the client
        if self.conv.partial_reply_bytes:
            return
        await self._reply_to_client(
            421, "4.4.2 smtpproxy: upstream closed the connection", NoteKind.PROXY_REPLY
        )


class Proxy:
    """Listens for clients and runs a ``Session`` for each."""

    def __init__(self, config: ProxyConfig, transcript: Transcript) -> None:
        self.config = config
        self.transcript = transcript
        self.stats = ProxyStats()
        #: called with each session once its recording is open, and when it ended
        self.on_session_start: Callable[[Session], None] | None = None
        self.on_session_end: Callable[[Session], None] | None = None
        #: a fault rule answered a command that never went upstream: called
        #: with the upstream connection's local port and the verb (the mock
        #: server behind the proxy counts the step all the same)
        self.on_withheld: Callable[[int | None, str], None] | None = None
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
        """Serve until cancelled; ``task_status`` gets the bound address.
        Clients past ``max_sessions``, and those waiting while the process
        is out of descriptors, get ``421 4.3.2`` at once (smtpproxy/accept.py)."""
        if listeners is None:
            listeners = await self.listen()
        addr = listeners[0].socket.getsockname()
        task_status.started((addr[0], addr[1]))
        await accept.serve(
            listeners, self._handle, admit=self._admit, refusal=_TOO_MANY, refused=self._refused
        )

    def _admit(self) -> bool:
        """Take a new client in, or count it refused: at accept time, so a
        burst of clients cannot all pass before their tasks start."""
        stats = self.stats
        if stats.active >= self.config.max_sessions:
            stats.refused += 1
            return False
        stats.sessions += 1
        stats.active += 1
        return True

    def _refused(self, count: int) -> None:
        self.stats.refused += count

    async def _handle(self, stream: trio.SocketStream) -> None:
        """Run one admitted client's session."""
        stats = self.stats
        session = Session(self, stream)
        try:
            await session.run()
        except Exception:
            # a bug met by one session must not stop the proxy for the others;
            # the session's own cleanup has closed its streams and recording
            log.exception("session %s failed; it was closed, the proxy goes on", session.id)
        finally:
            stats.active -= 1
            stats.ended += 1
            self._ended.set()
            self._ended = trio.Event()
            if self.on_session_end is not None:
                self.on_session_end(session)


#: RFC 5321 3.8 and RFC 3463: X.3.2, system not accepting network messages
_TOO_MANY = format_reply(421, "4.3.2 smtpproxy: too many sessions, try later")
