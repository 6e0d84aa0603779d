"""The embedded SMTP server: the default upstream of ``smtpproxy record``.

A small, correct RFC 5321 server built on the same ``Conversation`` as the
proxy. It accepts any credentials and every message (up to SIZE), so the first
run of the proxy needs no mail server and shows exactly what a client sends.
It keeps nothing: messages are counted and dropped.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import secrets
import socket
import ssl
from collections import deque
from dataclasses import dataclass, field

import trio

from .events import (
    AuthDecode,
    AuthError,
    AuthResponse,
    Command,
    Event,
    MessageData,
    MessageEnd,
    Opaque,
    OpaqueReason,
    Side,
)
from .protocol import MAX_LINE, ClientState, Conversation, format_reply, parse_args
from .tls import HandshakeFailed, handshake

__all__ = ["Sink", "SinkConfig"]

log = logging.getLogger(__name__)

DEFAULT_SIZE = 52_428_800
_EHLO_KEYWORDS = (
    "PIPELINING",
    "8BITMIME",
    "ENHANCEDSTATUSCODES",
    "CHUNKING",
    "SMTPUTF8",
    "AUTH PLAIN LOGIN CRAM-MD5",
    "HELP",
)


@dataclass
class SinkConfig:
    hostname: str = field(default_factory=lambda: socket.getfqdn() or "localhost")
    max_size: int = DEFAULT_SIZE
    idle_timeout: float = 300.0
    #: bound on a TLS handshake (STARTTLS or implicit)
    handshake_timeout: float = 30.0
    #: offer STARTTLS with this server context (None: not offered)
    tls: ssl.SSLContext | None = None
    #: speak TLS from the first byte
    implicit_tls: bool = False


@dataclass
class SinkStats:
    sessions: int = 0
    messages: int = 0
    octets: int = 0


class _Sink:
    """The server's side of one session: policy only; parsing is the Conversation's."""

    def __init__(self, config: SinkConfig, stats: SinkStats) -> None:
        self.config = config
        self.stats = stats
        self.conv = Conversation()
        self.helo: str | None = None
        self.mail_from: str | None = None
        self.rcpts: list[str] = []
        self.authed: str | None = None
        self.auth_mech: str | None = None
        self.auth_step = 0
        #: the BDAT command whose chunk is not answered yet, the octets of
        #: that chunk seen so far, and whether its last octet has arrived
        self.bdat_cmd: Command | None = None
        self.chunk_octets = 0
        self.chunk_seen = False
        #: octets accepted by BDAT in this transaction (None: no BDAT yet)
        self.bdat_octets: int | None = None
        #: close the connection once the replies are sent
        self.quit = False
        #: 220 to STARTTLS was sent: shake hands before reading on
        self.starttls = False
        self._released: list[Event] = []

    def greeting(self) -> bytes:
        return self._reply(220, f"{self.config.hostname} ESMTP smtpproxy sink")

    def _reply(self, code: int, *lines: str) -> bytes:
        data = format_reply(code, *lines)
        # the Conversation must see our replies to know what the client sends
        # next; client bytes it held back until now come out as events
        self._released += [e for e in self.conv.feed(Side.SERVER, data) if e.side is Side.CLIENT]
        return data

    def receive(self, data: bytes) -> bytes:
        """Client bytes in; the replies to send back out."""
        out = bytearray()
        todo: deque[Event] = deque(self.conv.feed(Side.CLIENT, data))
        while not (self.quit or self.starttls):
            while todo and not (self.quit or self.starttls):
                ev = todo.popleft()
                if self.bdat_cmd is not None and isinstance(ev, (Command, AuthResponse, Opaque)):
                    out += self._chunk_done(last=False)
                out += self._respond(ev) or b""
                todo.extend(self._released)
                self._released = []
            # a BDAT is answered once its chunk is read; no chunk may follow it
            # at all (the Conversation did not read it as a chunk)
            if self.bdat_cmd is None or (
                not self.chunk_seen and self.conv.client_state is ClientState.BDAT
            ):
                break
            out += self._chunk_done(last=False)
            todo.extend(self._released)
            self._released = []
        return bytes(out)

    def _reset(self) -> None:
        self.mail_from = None
        self.rcpts = []
        self.bdat_octets = None

    def _respond(self, ev: Event) -> bytes | None:
        match ev:
            case Command():
                return self._command(ev)
            case AuthResponse():
                if len(ev.raw) > MAX_LINE:
                    self.auth_mech = None
                    return self._reply(500, "5.5.6 authentication exchange line is too long")
                return self._auth_step(ev.text, ev.auth)
            case MessageData(via="BDAT") if self.bdat_cmd is not None:
                self.chunk_octets += len(ev.raw)
                self.chunk_seen = ev.last
            case MessageEnd(via="BDAT"):
                return self._chunk_done(last=True)
            case MessageEnd():
                return self._message(ev)
            case Opaque(reason=OpaqueReason.LINE_TOO_LONG) if ev.raw.endswith(b"\n"):
                if self.auth_mech is not None:
                    # RFC 4954 section 6; the Conversation keeps reading SASL
                    # lines after this reply, so the session cannot go on
                    self.auth_mech = None
                    self.quit = True
                    return self._reply(500, "5.5.6 authentication exchange line is too long")
                return self._reply(500, "5.5.2 line too long")
        return None

    def _command(self, cmd: Command) -> bytes | None:
        verb, arg = cmd.verb, cmd.arg.strip()
        if len(cmd.raw) > MAX_LINE:
            return self._reply(500, "5.5.2 line too long")
        if "bad_utf8" in cmd.flags and verb not in ("DATA", "BDAT"):
            return self._reply(500, "5.5.2 command is not valid UTF-8")
        match verb:
            case "EHLO" | "HELO":
                if not arg:
                    return self._reply(501, f"5.5.4 {verb} needs a domain")
                self.helo = arg
                self._reset()
                if verb == "HELO":
                    return self._reply(250, self.config.hostname)
                starttls = ("STARTTLS",) if self._offers_tls() else ()
                return self._reply(
                    250,
                    f"{self.config.hostname} greets {arg}",
                    f"SIZE {self.config.max_size}",
                    *starttls,
                    *_EHLO_KEYWORDS,
                )
            case "MAIL":
                if self.helo is None:
                    return self._reply(503, "5.5.1 say EHLO or HELO first")
                if self.mail_from is not None:
                    return self._reply(503, "5.5.1 nested MAIL command")
                args = parse_args(verb, arg)
                if not args.valid:
                    return self._reply(501, "5.5.4 syntax: MAIL FROM:<address>")
                size = args.params.get("SIZE")
                if size is not None:
                    if not (size.isascii() and size.isdigit()):
                        return self._reply(501, "5.5.4 syntax: SIZE=<octets> (RFC 1870)")
                    if int(size) > self.config.max_size:
                        return self._reply(552, "5.3.4 message size exceeds fixed limit")
                self.mail_from = cmd.path
                return self._reply(250, "2.1.0 sender ok")
            case "RCPT":
                if self.mail_from is None:
                    return self._reply(503, "5.5.1 need MAIL before RCPT")
                if not cmd.path or not parse_args(verb, arg).valid:
                    return self._reply(501, "5.5.4 syntax: RCPT TO:<address>")
                self.rcpts.append(cmd.path)
                return self._reply(250, "2.1.5 recipient ok")
            case "DATA":
                if arg:
                    return self._reply(501, "5.5.4 DATA takes no arguments")
                if self.mail_from is None or not self.rcpts:
                    return self._reply(503, "5.5.1 need MAIL and RCPT before DATA")
                if self.bdat_octets is not None:
                    # RFC 3030 section 3: DATA and BDAT do not mix in one transaction
                    return self._reply(503, "5.5.1 DATA after BDAT; RSET first")
                return self._reply(354, "End data with <CR><LF>.<CR><LF>")
            case "BDAT":
                self.bdat_cmd = cmd
                return None  # answered once its chunk is read: _chunk_done
            case "RSET":
                self._reset()
                return self._reply(250, "2.0.0 reset")
            case "NOOP":
                return self._reply(250, "2.0.0 ok")
            case "QUIT":
                self.quit = True
                return self._reply(221, "2.0.0 bye")
            case "VRFY":
                return self._reply(252, "2.5.2 cannot VRFY user, but will accept message")
            case "EXPN":
                return self._reply(502, "5.5.1 EXPN not implemented")
            case "HELP":
                return self._reply(214, "2.0.0 see RFC 5321")
            case "AUTH":
                return self._auth_start(arg, cmd.auth)
            case "STARTTLS":
                if self.conv.encrypted:
                    return self._reply(503, "5.5.1 TLS already active")
                if not self._offers_tls():
                    return self._reply(502, "5.5.1 STARTTLS is not offered here")
                if arg:
                    return self._reply(501, "5.5.4 STARTTLS takes no arguments")
                self.starttls = True
                return self._reply(220, "2.0.0 ready to start TLS")
        return self._reply(500, f"5.5.2 command not recognized: {verb[:20]}")

    def _offers_tls(self) -> bool:
        return self.config.tls is not None and not self.conv.encrypted

    def tls_established(self) -> None:
        """The STARTTLS handshake is done: forget all the session learned in
        clear; the client starts again with EHLO (RFC 3207 section 4.2).
        Bytes it sent after STARTTLS in clear were dropped by the Conversation."""
        self.conv.tls_established()
        self.starttls = False
        self.helo = None
        self.authed = None
        self.auth_mech = None
        self._reset()

    def _auth_start(self, arg: str, initial_decode: AuthDecode | None) -> bytes:
        if self.helo is None:
            return self._reply(503, "5.5.1 say EHLO first")
        if self.authed is not None:
            return self._reply(503, "5.5.1 already authenticated")
        if self.mail_from is not None:
            return self._reply(503, "5.5.1 AUTH is not permitted during a mail transaction")
        args = parse_args("AUTH", arg)
        mech, initial = args.mechanism or "", args.initial or ""
        if not mech:
            return self._reply(501, "5.5.4 syntax: AUTH <mechanism> [initial-response]")
        if mech not in ("PLAIN", "LOGIN", "CRAM-MD5"):
            return self._reply(504, f"5.5.4 mechanism {mech[:20]} not supported")
        self.auth_mech = mech
        self.auth_step = 0
        initial = initial.strip()
        if mech == "PLAIN":
            if initial:
                return self._auth_step(initial, initial_decode)
            return self._reply(334, "")
        if mech == "LOGIN":
            if initial:
                return self._auth_step(initial, initial_decode)
            return self._reply(334, "VXNlcm5hbWU6")
        challenge = f"<{secrets.randbelow(10**10)}.{secrets.token_hex(4)}@{self.config.hostname}>"
        return self._reply(334, base64.b64encode(challenge.encode()).decode())

    def _auth_step(self, text: str, decoded: AuthDecode | None) -> bytes:
        """One SASL answer, as the Conversation decoded it (auth.py)."""
        if text.strip() == "*":
            self.auth_mech = None
            return self._reply(501, "5.7.0 authentication cancelled")
        if decoded is None or decoded.error is AuthError.BAD_BASE64:
            self.auth_mech = None
            return self._reply(501, "5.5.2 cannot decode base64")
        mech = self.auth_mech
        if mech == "LOGIN" and self.auth_step == 0:
            self.auth_step = 1  # that was the user name; now the password
            return self._reply(334, "UGFzc3dvcmQ6")
        if mech == "PLAIN" and decoded.error:
            self.auth_mech = None
            return self._reply(501, "5.5.2 PLAIN wants authzid NUL user NUL password")
        self.authed = mech
        self.auth_mech = None
        return self._reply(
            235, "2.7.0 Authentication successful (smtpproxy sink accepts any credentials)"
        )

    def _message(self, ev: MessageEnd) -> bytes | None:
        """The end of a DATA body (RFC 5321 section 4.1.1.4)."""
        if not ev.complete:
            return None
        return self._accept(ev.size)

    def _chunk_done(self, last: bool) -> bytes:
        """Answer a BDAT command once its chunk has been read: the server reads
        the chunk whatever it then answers (RFC 3030 section 2), and a failed
        chunk fails the transaction."""
        cmd, octets = self.bdat_cmd, self.chunk_octets
        self.bdat_cmd, self.chunk_octets, self.chunk_seen = None, 0, False
        if cmd is None:
            return b""
        if not parse_args(cmd.verb, cmd.arg).valid:
            self._reset()
            return self._reply(501, "5.5.4 syntax: BDAT <size> [LAST]")
        if self.mail_from is None or not self.rcpts:
            self._reset()
            return self._reply(503, "5.5.1 need MAIL and RCPT before BDAT")
        total = (self.bdat_octets or 0) + octets
        if last:
            return self._accept(total)
        if total > self.config.max_size:
            self._reset()
            return self._reply(552, "5.3.4 message size exceeds fixed limit")
        self.bdat_octets = total
        return self._reply(250, f"2.0.0 {octets} octets received")

    def _accept(self, size: int) -> bytes:
        """Count and drop a complete message: the transaction ends here."""
        self._reset()
        if size > self.config.max_size:
            return self._reply(552, "5.3.4 message size exceeds fixed limit")
        self.stats.messages += 1
        self.stats.octets += size
        queue_id = secrets.token_hex(6).upper()
        return self._reply(250, f"2.0.0 Ok: queued as {queue_id}")


class Sink:
    """Serves the embedded SMTP server on a listener."""

    def __init__(self, config: SinkConfig | None = None) -> None:
        self.config = config or SinkConfig()
        if self.config.implicit_tls and self.config.tls is None:
            raise ValueError("SinkConfig(implicit_tls=True) needs a server context in tls=")
        self.stats = SinkStats()

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        listeners = await trio.open_tcp_listeners(port, host=host)
        addr = listeners[0].socket.getsockname()
        task_status.started((addr[0], addr[1]))
        await trio.serve_listeners(self.handle, listeners)

    async def handle(self, stream: trio.abc.Stream) -> None:
        self.stats.sessions += 1
        sink = _Sink(self.config, self.stats)
        try:
            if self.config.implicit_tls:
                tls = await self._handshake(stream)
                if tls is None:
                    return
                stream = tls
                sink.conv.implicit_tls()
            await stream.send_all(sink.greeting())
            while not sink.quit:
                with trio.move_on_after(self.config.idle_timeout) as idle:
                    data = await stream.receive_some(65536)
                if idle.cancelled_caught:
                    await stream.send_all(format_reply(421, "4.4.2 idle too long, closing"))
                    break
                if not data:
                    break
                out = sink.receive(bytes(data))
                if out:
                    await stream.send_all(out)
                if sink.starttls:
                    tls = await self._handshake(stream)
                    if tls is None:
                        return
                    stream = tls
                    sink.tls_established()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            # a bug met by one session must not stop the server for the others
            log.exception("sink session failed; closing it")
            with (
                trio.move_on_after(1),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                await stream.send_all(format_reply(421, "4.3.0 internal error, closing"))
        finally:
            await trio.aclose_forcefully(stream)

    async def _handshake(self, stream: trio.abc.Stream) -> trio.SSLStream[trio.abc.Stream] | None:
        """Shake hands as a TLS server; None (the stream closed) if that fails."""
        assert self.config.tls is not None
        try:
            return await handshake(
                stream, self.config.tls, server_side=True, timeout=self.config.handshake_timeout
            )
        except HandshakeFailed:
            return None
