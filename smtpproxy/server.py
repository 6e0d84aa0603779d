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
import struct
from dataclasses import dataclass, field

import trio

from . import accept
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
)
from .faults import ActionKind, Fault, FaultPlan, SessionFaults
from .protocol import MAX_LINE, StepCounter, format_reply, parse_args
from .render import Transcript
from .serverside import ServerSide
from .tls import HandshakeFailed, ServerContexts, TlsFailure, bad_cert_words, handshake

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
    #: what a ``tls: cert KIND`` fault shows instead (``ServerContexts.bad``:
    #: leaves from the local CA); None: such a rule is not applied, and the
    #: transcript says so
    certs: ServerContexts | None = None
    #: speak TLS from the first byte
    implicit_tls: bool = False
    #: ``--fault`` / ``--faults``: fail the steps they name (docs/faults.md)
    faults: FaultPlan | None = None
    #: where ``!! fault <rule>: ...`` lines go (None: nowhere)
    transcript: Transcript | None = None


@dataclass
class SinkStats:
    sessions: int = 0
    messages: int = 0
    octets: int = 0


class _Sink(ServerSide[Fault]):
    """The server's side of one session: policy only; reading the client is
    ``ServerSide``'s (the Conversation's)."""

    def __init__(
        self, config: SinkConfig, stats: SinkStats, faults: SessionFaults | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.stats = stats
        #: the fault rules of this session (None: no rules, the plain path)
        self.faults = faults
        self.label = ""  # the client's ip:port, for the transcript
        self.steps = StepCounter()
        self.messages = 0  # messages begun in the session, for body/dot's number
        self.body_octets = 0
        self.bdat_fault: Fault | None = None
        self.helo: str | None = None
        self.mail_from: str | None = None
        self.rcpts: list[str] = []
        self.authed: str | None = None
        self.auth_mech: str | None = None
        self.auth_step = 0
        #: octets accepted by BDAT in this transaction (None: no BDAT yet)
        self.bdat_octets: int | None = None
        #: the context a ``tls: cert`` fault chose for the next handshake
        self.bad_tls: ssl.SSLContext | None = None

    def greeting(self) -> bytes:
        return self.reply(220, f"{self.config.hostname} ESMTP smtpproxy sink")

    def act(self, fault: Fault) -> None:
        """A fault to act on after the replies so far (a delay, a stall, a
        close): the I/O loop in ``Sink.handle`` does it."""
        self.put(fault)
        if fault.kind in (ActionKind.STALL, ActionKind.CLOSE, ActionKind.RESET):
            self.halted = True

    def report(self, fault: Fault, what: str = "") -> None:
        """``!! fault <rule>: <what happened>`` in the transcript."""
        if self.config.transcript is not None:
            line = f"fault {fault.rule}: {what or fault.describe()}"
            self.config.transcript.say(self.label, line, warn=True)

    def _reset(self) -> None:
        self.mail_from = None
        self.rcpts = []
        self.bdat_octets = None

    def respond(self, ev: Event) -> bytes | None:
        match ev:
            case Command() if self.faults is not None:
                return self._command_fault(ev, self.faults)
            case Command():
                return self._command(ev)
            case AuthResponse():
                if len(ev.raw) > MAX_LINE:
                    self.auth_mech = None
                    return self.reply(500, "5.5.6 authentication exchange line is too long")
                return self._auth_step(ev.text, ev.auth)
            case MessageData():
                self._body(ev)
            case MessageEnd(via="BDAT"):
                return self.chunk_done(last=True)
            case MessageEnd():
                return self._message(ev)
            case Opaque(reason=OpaqueReason.LINE_TOO_LONG) if ev.raw.endswith(b"\n"):
                if self.auth_mech is not None:
                    # RFC 4954 section 6; the Conversation keeps reading SASL
                    # lines after this reply, so the session cannot go on
                    self.auth_mech = None
                    self.quit = True
                    return self.reply(500, "5.5.6 authentication exchange line is too long")
                return self.reply(500, "5.5.2 line too long")
        return None

    def _command_fault(self, cmd: Command, faults: SessionFaults) -> bytes | None:
        """A command with fault rules in force: its step, then the sink's own
        work or the fault's (docs/faults.md says what each action does)."""
        verb = cmd.verb
        pos = self.steps.place(verb)
        if verb in ("EHLO", "HELO"):
            faults.learn(helo=cmd.arg.strip())
        elif verb in ("MAIL", "RCPT") and cmd.path is not None:
            faults.learn(**{"mail_from" if verb == "MAIL" else "rcpt": cmd.path})
        elif verb == "AUTH" and cmd.auth is not None and cmd.auth.fields.get("user"):
            faults.learn(user=cmd.auth.fields["user"])
        fault = faults.step(verb.lower(), nth=pos.nth, transaction=pos.transaction)
        if fault is None:
            return self._command(cmd)
        self.report(fault)
        match fault.kind:
            case ActionKind.REPLY if verb == "BDAT":
                self.bdat_cmd, self.bdat_fault = cmd, fault
                return None
            case ActionKind.REPLY:
                return self.reply_raw(fault.reply_bytes())
            case ActionKind.REPLACE:
                own = self._command(cmd)
                if verb == "BDAT":
                    self.bdat_fault = fault
                    return own
                return fault.reply_bytes()
            case ActionKind.REMOVE | ActionKind.ADD:
                return self._command(cmd, fault)
            case ActionKind.STALL | ActionKind.CLOSE | ActionKind.RESET:
                self.act(fault)
                return None
        self.act(fault)  # DELAY, THROTTLE: then answer as usual
        return self._command(cmd)

    def _body(self, ev: MessageData) -> None:
        """``body`` steps, as the message passes."""
        if self.faults is None:
            return
        if self.body_octets == 0:
            self.messages += 1
        self.body_octets += len(ev.raw)
        fault = self.faults.step(
            "body", nth=self.messages, transaction=self.steps.transaction, octets=self.body_octets
        )
        if fault is not None:
            self.report(fault, f"{fault.describe()} after {self.body_octets} octets of the message")
            self.act(fault)

    def _dot(self, size: int, answer: bytes | None = None) -> bytes:
        """The end of a message (DATA's dot or BDAT LAST) with fault rules:
        the ``dot`` step, then the sink's own acceptance or the fault's.
        ``answer``: the reply a BDAT fault already chose."""
        assert self.faults is not None
        if self.body_octets == 0:
            self.messages += 1
        self.body_octets = 0
        self.steps.open = False
        fault = self.faults.step("dot", nth=self.messages, transaction=self.steps.transaction)
        match fault:
            case None:
                return self._accept(size)
            case Fault(kind=ActionKind.REPLY):
                self.report(fault, f"{fault.describe()}; the message was not accepted")
                self._reset()
                return self.reply_raw(fault.reply_bytes())
            case Fault(kind=ActionKind.REPLACE):
                own = self._accept(size)
                accepted = "accepted (counted)" if own.startswith(b"250") else "refused"
                self.report(fault, f"{fault.describe()}; the sink {accepted} the message")
                return fault.reply_bytes()
        self.report(fault)
        self.act(fault)
        if fault.kind in (ActionKind.DELAY, ActionKind.THROTTLE):
            return self._accept(size)
        self._reset()
        return b""

    def _command(self, cmd: Command, caps: Fault | None = None) -> bytes | None:
        verb, arg = cmd.verb, cmd.arg.strip()
        if len(cmd.raw) > MAX_LINE:
            return self.reply(500, "5.5.2 line too long")
        if "bad_utf8" in cmd.flags and verb not in ("DATA", "BDAT"):
            return self.reply(500, "5.5.2 command is not valid UTF-8")
        match verb:
            case "EHLO" | "HELO":
                if not arg:
                    return self.reply(501, f"5.5.4 {verb} needs a domain")
                self.helo = arg
                self._reset()
                if verb == "HELO":
                    return self.reply(250, self.config.hostname)
                starttls = ("STARTTLS",) if self._offers_tls() else ()
                keywords = [f"SIZE {self.config.max_size}", *starttls, *_EHLO_KEYWORDS]
                if caps is not None:
                    keywords = _edit_keywords(keywords, caps)
                return self.reply(250, f"{self.config.hostname} greets {arg}", *keywords)
            case "MAIL":
                if self.helo is None:
                    return self.reply(503, "5.5.1 say EHLO or HELO first")
                if self.mail_from is not None:
                    return self.reply(503, "5.5.1 nested MAIL command")
                args = parse_args(verb, arg)
                if not args.valid:
                    return self.reply(501, "5.5.4 syntax: MAIL FROM:<address>")
                size = args.params.get("SIZE")
                if size is not None:
                    if not (size.isascii() and size.isdigit()):
                        return self.reply(501, "5.5.4 syntax: SIZE=<octets> (RFC 1870)")
                    if int(size) > self.config.max_size:
                        return self.reply(552, "5.3.4 message size exceeds fixed limit")
                self.mail_from = cmd.path
                return self.reply(250, "2.1.0 sender ok")
            case "RCPT":
                if self.mail_from is None:
                    return self.reply(503, "5.5.1 need MAIL before RCPT")
                if not cmd.path or not parse_args(verb, arg).valid:
                    return self.reply(501, "5.5.4 syntax: RCPT TO:<address>")
                self.rcpts.append(cmd.path)
                return self.reply(250, "2.1.5 recipient ok")
            case "DATA":
                if arg:
                    return self.reply(501, "5.5.4 DATA takes no arguments")
                if self.mail_from is None or not self.rcpts:
                    return self.reply(503, "5.5.1 need MAIL and RCPT before DATA")
                if self.bdat_octets is not None:
                    # RFC 3030 section 3: DATA and BDAT do not mix in one transaction
                    return self.reply(503, "5.5.1 DATA after BDAT; RSET first")
                return self.reply(354, "End data with <CR><LF>.<CR><LF>")
            case "BDAT":
                self.bdat_cmd = cmd
                return None  # answered once its chunk is read: answer_chunk
            case "RSET":
                self._reset()
                return self.reply(250, "2.0.0 reset")
            case "NOOP":
                return self.reply(250, "2.0.0 ok")
            case "QUIT":
                self.quit = True
                return self.reply(221, "2.0.0 bye")
            case "VRFY":
                return self.reply(252, "2.5.2 cannot VRFY user, but will accept message")
            case "EXPN":
                return self.reply(502, "5.5.1 EXPN not implemented")
            case "HELP":
                return self.reply(214, "2.0.0 see RFC 5321")
            case "AUTH":
                return self._auth_start(arg, cmd.auth)
            case "STARTTLS":
                if self.conv.encrypted:
                    return self.reply(503, "5.5.1 TLS already active")
                if not self._offers_tls():
                    return self.reply(502, "5.5.1 STARTTLS is not offered here")
                if arg:
                    return self.reply(501, "5.5.4 STARTTLS takes no arguments")
                self.starttls = True
                return self.reply(220, "2.0.0 ready to start TLS")
        return self.reply(500, f"5.5.2 command not recognized: {verb[:20]}")

    def _offers_tls(self) -> bool:
        return self.config.tls is not None and not self.conv.encrypted

    def tls_established(self) -> None:
        """The STARTTLS handshake is done: forget all the session learned in
        clear; the client starts again with EHLO (RFC 3207 section 4.2).
        Bytes it sent after STARTTLS in clear were dropped by the Conversation."""
        self.conv.tls_established()
        self.steps.tls += 1
        self.steps.open = False
        self.starttls = False
        self.helo = None
        self.authed = None
        self.auth_mech = None
        self._reset()

    def _auth_start(self, arg: str, initial_decode: AuthDecode | None) -> bytes:
        if self.helo is None:
            return self.reply(503, "5.5.1 say EHLO first")
        if self.authed is not None:
            return self.reply(503, "5.5.1 already authenticated")
        if self.mail_from is not None:
            return self.reply(503, "5.5.1 AUTH is not permitted during a mail transaction")
        args = parse_args("AUTH", arg)
        mech, initial = args.mechanism or "", args.initial or ""
        if not mech:
            return self.reply(501, "5.5.4 syntax: AUTH <mechanism> [initial-response]")
        if mech not in ("PLAIN", "LOGIN", "CRAM-MD5"):
            return self.reply(504, f"5.5.4 mechanism {mech[:20]} not supported")
        self.auth_mech = mech
        self.auth_step = 0
        initial = initial.strip()
        if mech == "PLAIN":
            if initial:
                return self._auth_step(initial, initial_decode)
            return self.reply(334, "")
        if mech == "LOGIN":
            if initial:
                return self._auth_step(initial, initial_decode)
            return self.reply(334, "VXNlcm5hbWU6")
        challenge = f"<{secrets.randbelow(10**10)}.{secrets.token_hex(4)}@{self.config.hostname}>"
        return self.reply(334, base64.b64encode(challenge.encode()).decode())

    def _auth_step(self, text: str, decoded: AuthDecode | None) -> bytes:
        """One SASL answer, as the Conversation decoded it (auth.py)."""
        if text.strip() == "*":
            self.auth_mech = None
            return self.reply(501, "5.7.0 authentication cancelled")
        if decoded is None or decoded.error is AuthError.BAD_BASE64:
            self.auth_mech = None
            return self.reply(501, "5.5.2 cannot decode base64")
        mech = self.auth_mech
        if mech == "LOGIN" and self.auth_step == 0:
            self.auth_step = 1  # that was the user name; now the password
            return self.reply(334, "UGFzc3dvcmQ6")
        if mech == "PLAIN" and decoded.error:
            self.auth_mech = None
            return self.reply(501, "5.5.2 PLAIN wants authzid NUL user NUL password")
        self.authed = mech
        self.auth_mech = None
        return self.reply(
            235, "2.7.0 Authentication successful (smtpproxy sink accepts any credentials)"
        )

    def _message(self, ev: MessageEnd) -> bytes | None:
        """The end of a DATA body (RFC 5321 section 4.1.1.4)."""
        if not ev.complete:
            return None
        if self.faults is not None:
            return self._dot(ev.size)
        return self._accept(ev.size)

    def answer_chunk(self, cmd: Command, octets: int, last: bool) -> bytes:
        """A BDAT command whose chunk has been read (ServerSide.chunk_done): a
        failed chunk fails the transaction (RFC 3030 section 2)."""
        fault, self.bdat_fault = self.bdat_fault, None
        if fault is not None and fault.kind is ActionKind.REPLY:
            self._reset()  # the chunk is read and dropped, the transaction ends
            self.body_octets = 0
            self.steps.open = False
            return self.reply_raw(fault.reply_bytes())
        if fault is not None:  # REPLACE: the sink's own work, the fault's reply
            self._chunk_answer(cmd, octets, last)
            return fault.reply_bytes()
        return self._chunk_answer(cmd, octets, last)

    def _chunk_answer(self, cmd: Command, octets: int, last: bool) -> bytes:
        if not parse_args(cmd.verb, cmd.arg).valid:
            self._reset()
            return self.reply(501, "5.5.4 syntax: BDAT <size> [LAST]")
        if self.mail_from is None or not self.rcpts:
            self._reset()
            return self.reply(503, "5.5.1 need MAIL and RCPT before BDAT")
        total = (self.bdat_octets or 0) + octets
        if last:
            return self._dot(total) if self.faults is not None else self._accept(total)
        if total > self.config.max_size:
            self._reset()
            return self.reply(552, "5.3.4 message size exceeds fixed limit")
        self.bdat_octets = total
        return self.reply(250, f"2.0.0 {octets} octets received")

    def _accept(self, size: int) -> bytes:
        """Count and drop a complete message: the transaction ends here."""
        self._reset()
        if size > self.config.max_size:
            return self.reply(552, "5.3.4 message size exceeds fixed limit")
        self.stats.messages += 1
        self.stats.octets += size
        queue_id = secrets.token_hex(6).upper()
        return self.reply(250, f"2.0.0 Ok: queued as {queue_id}")


def _edit_keywords(keywords: list[str], fault: Fault) -> list[str]:
    """EHLO keywords with ``remove``'s hidden or ``add``'s appended
    (matched on the keyword, the first word: RFC 5321 section 4.1.1.1)."""
    names = set(fault.capabilities)
    if fault.kind is ActionKind.REMOVE:
        return [k for k in keywords if k.split()[0].upper() not in names]
    have = {k.split()[0].upper() for k in keywords}
    return keywords + [c for c in fault.capabilities if c not in have]


def _peer(stream: trio.abc.Stream) -> str:
    """The client's ``ip:port`` (``?`` when the stream is not a socket)."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if isinstance(stream, trio.SocketStream):
        with contextlib.suppress(OSError):
            addr = stream.socket.getpeername()
            return f"{addr[0]}:{addr[1]}"
    return "?"


def _linger_zero(stream: trio.abc.Stream) -> None:
    """Make the close that follows an RST (SO_LINGER on, 0 seconds)."""
    while isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    if isinstance(stream, trio.SocketStream):
        with contextlib.suppress(OSError):
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


class _Stop(Exception):
    """A fault ended the session (CLOSE or RESET)."""


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
        await accept.serve_embedded(self.handle, host, port, task_status)

    async def handle(self, stream: trio.abc.Stream) -> None:
        self.stats.sessions += 1
        plan = self.config.faults
        peer = _peer(stream) if plan is not None else ""
        faults = plan.session(peer) if plan is not None else None
        sink = _Sink(self.config, self.stats, faults)
        sink.label = peer
        out = _Output(stream)
        try:
            if faults is not None and not await self._before(sink, faults, out, "connect"):
                return
            if self.config.implicit_tls:
                if faults is not None and not await self._before(sink, faults, out, "tls"):
                    return
                tls = None if sink.halted else await self._handshake(stream, sink)
                if tls is None and not sink.halted:
                    return
                stream = out.stream = tls or stream
                sink.conv.implicit_tls()
                sink.steps.tls = 1
            greeting = sink.greeting()
            if faults is not None:
                fault = faults.step("greeting")
                if fault is not None and fault.kind in (ActionKind.REPLY, ActionKind.REPLACE):
                    sink.report(fault)
                    greeting = fault.reply_bytes()
                elif fault is not None:
                    sink.report(fault)
                    sink.halted = fault.kind is ActionKind.STALL
                    await out.send([fault])
            if not sink.halted:
                await out.send([greeting])
            while not sink.quit:
                with trio.move_on_after(self.config.idle_timeout) as idle:
                    data = await stream.receive_some(65536)
                if idle.cancelled_caught:
                    await stream.send_all(format_reply(421, "4.4.2 idle too long, closing"))
                    break
                if not data:
                    break
                if sink.halted:
                    continue  # stalled: read on, answer nothing, until the idle timeout
                await out.send(sink.receive(bytes(data)))
                if sink.starttls and not sink.halted:
                    if faults is not None and not await self._before(sink, faults, out, "tls"):
                        return
                    if sink.halted:
                        continue
                    tls = await self._handshake(stream, sink)
                    if tls is None:
                        return
                    stream = out.stream = tls
                    sink.tls_established()
        except _Stop:
            pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            # a bug met by one session must not stop the server for the others
            await accept.close_after_bug(stream, log, "sink")
        finally:
            await trio.aclose_forcefully(stream)

    async def _before(self, sink: _Sink, faults: SessionFaults, out: _Output, step: str) -> bool:
        """The ``connect`` or ``tls`` step; False: the session ends here."""
        fault = faults.step(step)
        if fault is None:
            return True
        if fault.kind is ActionKind.TLS_CERT:
            sink.bad_tls = self._bad_context(sink, fault)
            return True
        sink.report(fault)
        match fault.kind:
            case ActionKind.REPLY:  # connect: answer instead of the greeting, and close
                await out.send([fault.reply_bytes()])
                return False
            case ActionKind.TLS_ABORT:
                _linger_zero(out.stream)  # no handshake: the client's fails at once
                return False
        sink.halted = fault.kind is ActionKind.STALL
        await out.send([fault])
        return True

    def _bad_context(self, sink: _Sink, fault: Fault) -> ssl.SSLContext | None:
        """``tls: cert KIND``: the context showing that bad certificate, said
        in the transcript before the handshake; None (the sink's own
        certificate) when there is no CA to mint it from."""
        try:
            if self.config.certs is None:
                raise TlsFailure("the sink has no local CA to mint certificates from")
            context = self.config.certs.bad(fault.cert)
        except TlsFailure as exc:
            sink.report(fault, f"not applied: {exc}")
            return None
        sink.report(fault, f"showed the client {bad_cert_words(fault.cert)}")
        return context

    async def _handshake(
        self, stream: trio.abc.Stream, sink: _Sink
    ) -> trio.SSLStream[trio.abc.Stream] | None:
        """Shake hands as a TLS server, with the certificate a fault chose if
        one did; None (the stream closed) if that fails."""
        assert self.config.tls is not None
        context, sink.bad_tls = sink.bad_tls or self.config.tls, None
        try:
            return await handshake(
                stream, context, server_side=True, timeout=self.config.handshake_timeout
            )
        except HandshakeFailed:
            return None


class _Output:
    """Sends the sink's replies and acts on the faults between them."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.rate = 0  # THROTTLE: octets a second (0: no limit)

    async def send(self, pieces: list[bytes | Fault]) -> None:
        for piece in pieces:
            if isinstance(piece, bytes):
                if piece:
                    await self._send(piece)
                continue
            match piece.kind:
                case ActionKind.DELAY:
                    await trio.sleep(piece.seconds)
                case ActionKind.THROTTLE:
                    self.rate = piece.rate
                case ActionKind.CLOSE:
                    raise _Stop
                case ActionKind.RESET:
                    _linger_zero(self.stream)
                    raise _Stop
                case ActionKind.STALL:
                    return  # nothing more is sent; handle() reads on until the idle timeout

    async def _send(self, data: bytes) -> None:
        if not self.rate:
            await self.stream.send_all(data)
            return
        step = max(1, self.rate // 10)
        for i in range(0, len(data), step):
            await self.stream.send_all(data[i : i + step])
            await trio.sleep(len(data[i : i + step]) / self.rate)
