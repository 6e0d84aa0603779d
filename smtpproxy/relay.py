"""The trio relay: accept clients, dial the upstream, copy bytes both ways.

A ``Session`` relays, observes and closes; what its TLS arrangement decides
(who answers a STARTTLS, when the upstream is upgraded, what
``--strip-starttls`` hides) is asked of its ``TlsArrangement``
(smtpproxy/tlsmodes.py), and every handshake is ``tls.handshake``.

The relay never changes a byte it forwards (but for the TLS arrangements). Each chunk it reads is handed to
the session's ``Conversation`` (the observer) first, then sent on; the
observer's events go to the recorder and the transcript. Nothing the observer
thinks can stop or alter the flow: its events only describe it.
"""

from __future__ import annotations

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
from .events import Command, Event, Note, Reply, Side, TlsEstablished
from .net import connect_reason, format_address, is_ip, tls_reason
from .protocol import Conversation, format_reply
from .recording import Recorder, new_session_id, note_in_place
from .render import Transcript
from .streams import dial, receive, send_all
from .summary import SessionSummary
from .tls import HandshakeFailed, ServerContexts, handshake, handshake_facts
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


class Session:
    """One client connection and its upstream connection. ``open_upstream``
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

    async def _reply_to_client(self, code: int, text: str, kind: str) -> None:
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
        finally:
            lock.release()

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
        if not await self._connect():
            return False
        if self.tls.implicit_upstream and not await self._upstream_handshake():
            await self._reply_to_client(421, f"4.7.0 smtpproxy: {self.reason}", "proxy_reply")
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
        self.observe([Note(Side.SERVER, "upstream_error", self.reason)])
        await self._reply_to_client(
            421, f"4.4.0 smtpproxy: upstream {label} unreachable: {reason}", "proxy_reply"
        )
        return False

    # -- TLS ----------------------------------------------------------------

    async def _client_handshake(self) -> bool:
        """Shake hands with the client as a TLS server."""
        cfg = self.proxy.config
        contexts = cfg.server_contexts
        if contexts is None:
            self._end("proxy", "TLS requested but no certificate is configured")
            self.observe([Note(Side.CLIENT, "tls_error", self.reason)])
            return False
        limit = min(
            (t for t in (cfg.handshake_timeout, cfg.idle_timeout) if t > 0), default=math.inf
        )
        try:
            stream = await handshake(
                self.streams[Side.CLIENT],
                contexts.default,
                server_side=True,
                timeout=limit,
                lock=self._locks[Side.CLIENT],
            )
        except HandshakeFailed as failed:
            if failed.timed_out:
                # the proxy gave up on a silent or slow client: its decision, not the client's
                self._end("proxy", f"TLS handshake with the client timed out after {limit:g}s")
            else:
                cause = failed.reason
                sni = contexts.sni_of(failed.ssl_object)
                if sni:
                    cause += f" (SNI {sni})"
                self._end(
                    "client",
                    f"TLS handshake with the client failed: {cause}"
                    + (
                        "; if the client does not trust the proxy, run 'smtpproxy ca' and trust that CA"
                        if any(
                            w in cause.lower()
                            for w in ("alert", "certificate", "eof", "closed", "unknown_ca")
                        )
                        else ""
                    ),
                )
            self.observe([Note(Side.CLIENT, "tls_error", self.reason)])
            return False
        # no checkpoint since the lock was released: no writer has used the old stream
        self.streams[Side.CLIENT] = stream
        self.tls.client_tls = self.tls.client_silent = True
        facts = handshake_facts(stream._ssl_object)
        self.observe(
            [
                TlsEstablished(
                    Side.CLIENT,
                    facts.version,
                    facts.cipher,
                    sni=contexts.sni_of(stream._ssl_object),
                )
            ]
        )
        return True

    async def _upstream_handshake(self) -> bool:
        """Shake hands with the upstream as a TLS client."""
        cfg = self.proxy.config
        ctx = cfg.upstream_context
        if ctx is None:
            self._end("proxy", "upstream TLS requested but no client context is configured")
            return False
        sni = cfg.upstream_sni or cfg.upstream[0]
        try:
            stream = await handshake(
                self.streams[Side.SERVER],
                ctx,
                server_side=False,
                server_hostname=sni if not is_ip(sni) or ctx.check_hostname else None,
                timeout=cfg.handshake_timeout or math.inf,
                lock=self._locks[Side.SERVER],
            )
        except HandshakeFailed as failed:
            self._end("proxy", f"TLS handshake with the upstream failed: {failed.reason}")
            self.observe([Note(Side.SERVER, "tls_error", self.reason)])
            return False
        self.streams[Side.SERVER] = stream  # no checkpoint since the lock was released
        self.tls.upstream_tls = True
        facts = handshake_facts(stream._ssl_object)
        verified = "skipped (--upstream-insecure)" if ctx.verify_mode == ssl.CERT_NONE else "ok"
        self.observe(
            [
                TlsEstablished(
                    Side.SERVER,
                    facts.version,
                    facts.cipher,
                    sni=sni,
                    peer=facts.peer,
                    verified=verified,
                )
            ]
        )
        return True

    async def _starttls(self, upgrade_upstream: bool, reply: bytes | bytearray) -> bool:
        """The client's STARTTLS was agreed: upgrade the upstream first (so a
        failure there can still be told to the client in clear), then pass
        the 220 on and shake hands with the client."""
        if upgrade_upstream and not await self._upstream_handshake():
            await self._reply_to_client(421, f"4.7.0 smtpproxy: {self.reason}", "proxy_reply")
            return False
        try:
            await self._send(Side.CLIENT, reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._end("client", "client went away during STARTTLS")
            return False
        if not await self._client_handshake():
            return False
        self.observe(self.conv.tls_established(), call="tls_established")
        return True

    # -- relaying -----------------------------------------------------------

    async def _relay(self) -> None:
        cfg = self.proxy.config
        self._done = {Side.CLIENT: False, Side.SERVER: False}
        async with trio.open_nursery() as nursery:
            self._scope = nursery.cancel_scope
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
            self.observe([Note(Side.CLIENT, f"{hit}_timeout", self.reason)])
            await self._reply_to_client(421, f"4.4.2 smtpproxy: {why}, closing", "proxy_reply")

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
        conv = self.conv
        other = side.other
        streams = self.streams
        try:
            while True:
                data = await receive(streams[side])
                if not data:
                    break
                self._activity = now = trio.current_time()
                if side is Side.CLIENT:
                    self.tls.client_silent = False
                self.observe(conv.feed(side, data), now, fed=(side, data))
                if side is Side.CLIENT:
                    self._client_clocks(now)
                if self._needs_care(side):
                    if not await self._with_care(side, data):
                        self._scope.cancel()
                        return
                    continue
                await self._send(other, data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # a failed send is the fault of the peer sent to, not the one read
            lost = exc.side if isinstance(exc, _SendFailed) else side
            self._end(lost.value, f"connection lost: {exc.__cause__ or exc}")
            await self._upstream_gone(lost)
            self._scope.cancel()
            return
        self._done[side] = True
        if side is Side.CLIENT and conv.in_message:
            # never let a half message through: no terminator, no half-close
            self._end("client", "client closed mid-message; upstream closed without completing it")
            self._scope.cancel()
            return
        self._end(side.value, f"{side.value} closed the connection")
        if side is Side.SERVER or all(self._done.values()):
            await self._upstream_gone(side)
            self._scope.cancel()
            return
        # the client is done sending: pass the half-close on, and keep
        # reading the server's last replies
        unsent = self.tls.take_unsent()
        if unsent:
            await self._send(other, unsent)
        try:
            await streams[other].send_eof()  # type: ignore[attr-defined]
        except (trio.BrokenResourceError, trio.ClosedResourceError, AttributeError):
            self._scope.cancel()

    async def _with_care(self, side: Side, data: bytes | bytearray) -> bool:
        """The rare reads: STARTTLS on either leg, ``--upstream-tls
        starttls`` and ``--strip-starttls``. False ends the session."""
        if side is Side.CLIENT:
            return await self._client_care(data)
        try:
            return await self._server_care(data)
        finally:
            if self._replies_seen is not None:
                self._replies_seen.set()  # the client pump may be waiting for these replies

    async def _client_care(self, data: bytes | bytearray) -> bool:
        conv = self.conv
        held = conv.held_client_bytes
        if self.tls.answers_starttls():
            out, starttls = self.tls.client_bytes(
                data,
                held=held,
                open_line=bool(conv.open_line),
                starttls_next=conv.waiting_for == "STARTTLS",
            )
            if out:
                await self._send(Side.SERVER, out)
            if starttls:
                await self._replies_before_starttls()
                return await self._local_starttls()
            return True
        # never carry bytes pipelined after STARTTLS into TLS
        await self._send(Side.SERVER, data[: len(data) - held] if held else data)
        await self._resume_client.wait()
        self._resume_client = trio.Event()
        return not self.closed_by

    async def _replies_before_starttls(self) -> None:
        """Wait until the server has answered every command the client sent
        before the STARTTLS the proxy answers itself (the server pump passes
        those replies on), so that the client gets each reply in its turn
        (RFC 2920 section 3.1) and the proxy's 220 last."""
        while self.conv.next_reply_for not in ("STARTTLS", None):
            self._replies_seen = trio.Event()
            try:
                await self._replies_seen.wait()
            finally:
                self._replies_seen = None

    async def _server_care(self, data: bytes | bytearray) -> bool:
        conv = self.conv
        tls = self.tls
        other = Side.CLIENT
        if tls.server_answered:
            tls.server_answered = False
            held = conv.held_server_bytes
            upto = data[: len(data) - held] if held else data
            ok = True
            if conv.server_tls:
                ok = await self._starttls(True, upto)
            else:
                await self._send(other, upto)
            self._resume_client.set()
            return ok
        if tls.upgrade_pending:
            out, upgrade = tls.hold_for_upgrade(data, conv.partial_reply_bytes)
            if out:
                await self._send(other, out)
            return await self._upgrade_upstream_now() if upgrade else True
        if tls.strip:
            data, first = tls.strip_starttls(data)
            if first:
                self.observe(
                    [
                        Note(
                            Side.SERVER,
                            "strip_starttls",
                            "STARTTLS hidden from the client's EHLO reply",
                        )
                    ]
                )
        await self._send(other, data)
        return True

    async def _upstream_gone(self, side: Side) -> None:
        """The upstream went away without saying goodbye: tell the client
        with a 421 (RFC 5321 3.8) unless it was closing anyway or a reply is
        half sent (then the connection is just closed)."""
        if side is not Side.SERVER or self._last_server_code == 221 or self.conv.server_tls:
            return
        if self.conv.partial_reply_bytes:
            return
        await self._reply_to_client(
            421, "4.4.2 smtpproxy: upstream closed the connection", "proxy_reply"
        )

    async def _exchange(self, conv: Conversation, line: bytes) -> tuple[Reply | None, bytes]:
        """Send one command upstream on the proxy's own account and read its
        reply through ``conv``; both are recorded as notes (the client did
        not send it). Returns the reply and the bytes read after it."""
        conv.feed(Side.CLIENT, line)
        self.observe(
            [
                Note(
                    Side.CLIENT,
                    "proxy_command",
                    f"proxy sent upstream: {line.decode('utf-8', 'replace').strip()}",
                    line,
                )
            ]
        )
        await self._send(Side.SERVER, line)
        got = bytearray()
        with trio.fail_after(self.proxy.config.handshake_timeout or math.inf):
            while True:
                data = await receive(self.streams[Side.SERVER])
                if not data:
                    return None, b""
                got += data
                used = 0  # the events' raw bytes are what the Conversation read, in order
                for ev in conv.feed(Side.SERVER, data):
                    used += len(ev.raw)
                    if isinstance(ev, Reply):
                        self.observe(
                            [Note(Side.SERVER, "proxy_reply_from_upstream", ev.text, ev.raw)]
                        )
                        return ev, bytes(got[used:])
                del got[:used]

    async def _upgrade_upstream_now(self) -> bool:
        """``--upstream-tls starttls``: after the client's first EHLO, upgrade
        the upstream leg with STARTTLS, say EHLO again over TLS, and give the
        client that reply instead. The client's own leg stays as it chose."""
        try:
            conv = Conversation(greeted=True)
            reply, _ = await self._exchange(conv, b"STARTTLS\r\n")
            if reply is None or reply.code != 220:
                why = (
                    f"upstream refused STARTTLS: {reply.code} {reply.text}"
                    if reply
                    else "upstream closed"
                )
                self._end("proxy", why)
                await self._reply_to_client(421, f"4.7.0 smtpproxy: {why}", "proxy_reply")
                return False
            # what the server sent after its 220 is not carried into TLS, and
            # is flagged as in the default mode (RFC 3207 section 6)
            self.observe(conv.tls_established())
            if not await self._upstream_handshake():
                await self._reply_to_client(421, f"4.7.0 smtpproxy: {self.reason}", "proxy_reply")
                return False
            again, rest = await self._exchange(
                Conversation(greeted=True), self.tls.last_hello or b"EHLO smtpproxy\r\n"
            )
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._end("proxy", f"upstream STARTTLS failed: {tls_reason(exc)}")
            await self._reply_to_client(421, f"4.7.0 smtpproxy: {self.reason}", "proxy_reply")
            return False
        if again is None:
            self._end("server", "upstream closed after STARTTLS")
            return False
        self.observe(
            [
                Note(
                    Side.SERVER,
                    "proxy_forwarded",
                    "the client was given the upstream's EHLO reply after TLS",
                )
            ]
        )
        await self._send(Side.CLIENT, again.raw)
        if rest:
            # the server said more after its EHLO reply: the session's own bytes
            self.observe(self.conv.feed(Side.SERVER, rest), fed=(Side.SERVER, rest))
            await self._send(Side.CLIENT, rest)
        return True

    async def _local_starttls(self) -> bool:
        """``--upstream-tls plain`` (or an upstream already in TLS): answer
        the client's STARTTLS here and do not pass it on."""
        reply = format_reply(220, "2.0.0 Ready to start TLS (answered by smtpproxy)")
        note = Note(Side.SERVER, "proxy_reply", "STARTTLS answered by the proxy", reply)
        self.observe(self.conv.feed(Side.SERVER, reply), fed=(Side.SERVER, reply), note=note)
        # the server did not answer it: its next bytes go on as they come
        self.tls.server_answered = False
        return await self._starttls(False, reply)


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
