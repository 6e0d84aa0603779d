"""The SMTP conversation as a sans-IO state machine.

Everything that affects how the bytes of an SMTP session are read lives here:
command lines, replies and their matching to commands, PIPELINING, DATA
bodies, BDAT chunks, AUTH exchanges and STARTTLS. There is no I/O: the caller
feeds the bytes each side sent, in any chunking, and gets typed events back.

One ``Conversation`` serves three roles:

* the proxy's observer feeds both byte streams as it relays them;
* the embedded server feeds what the client sent and the replies it writes;
* replay feeds what it sends and what the target answers.

The observer never rejects anything and never raises on input: what it cannot
read becomes ``Opaque`` bytes and an ``Anomaly``. Memory held is bounded by
``MAX_LINE`` per side (and ``MAX_HOLD`` for bytes a client sends before the
reply it should have waited for).
"""

from __future__ import annotations

import enum
from collections import deque

from ..auth import SaslExchange
from ..events import (
    Anomaly,
    AnomalyKind,
    AuthDecode,
    AuthResponse,
    AuthResult,
    Command,
    Event,
    MessageData,
    MessageEnd,
    Opaque,
    OpaqueReason,
    Reply,
    Side,
    TlsStart,
)
from .steps import GREETING, NEW_TRANSACTION, parse_args
from .text import MessageHead, decode_line, enhanced_code, parse_capabilities, split_command

__all__ = [
    "GREETING",
    "MAX_HOLD",
    "MAX_LINE",
    "MAX_PENDING",
    "ClientState",
    "Conversation",
    "MessageHeads",
]

#: Longest line the observer holds before it gives up on it (RFC 5321 allows
#: 512 octets for a command and 1000 for a text line; servers may send more).
MAX_LINE = 64 * 1024
#: Most bytes held from a client that did not wait for a reply it needed.
MAX_HOLD = 1024 * 1024
#: Most commands tracked while waiting for their replies; past it the oldest
#: is forgotten (a peer that never answers must not grow the observer).
MAX_PENDING = 1_000_000
#: Verbs whose pending entry carries state (or is waited on).
_STATEFUL = frozenset({"AUTH", "DATA", "STARTTLS", "BDAT"})
_TERM = b"\r\n.\r\n"


class ClientState(enum.Enum):
    """What the next client bytes are."""

    COMMAND = "command"  # command lines (RFC 5321 section 4.1)
    WAITING = "waiting"  # held until the server answers DATA, AUTH or STARTTLS
    DATA = "data"  # a message body after 354, up to CRLF.CRLF (section 4.1.1.4)
    BDAT = "bdat"  # the octets of a BDAT chunk (RFC 3030)
    AUTH = "auth"  # one SASL answer line after a 334 (RFC 4954 section 4)
    TLS = "tls"  # TLS records after 220 to STARTTLS (RFC 3207)


class _Pending:
    """A command waiting for its reply."""

    __slots__ = ("data_started", "last", "verb")

    def __init__(self, verb: str, last: bool = False) -> None:
        self.verb = verb
        self.data_started = False
        self.last = last


class _Lines:
    """Cuts one side's buffer into lines. A line longer than ``MAX_LINE`` is
    given up on: its bytes come back, flagged too long, as soon as they
    arrive, so that no chunking holds more than ``MAX_LINE`` of it."""

    __slots__ = ("discard",)

    def __init__(self) -> None:
        self.discard = False  # inside a line already given up on

    def cut(self, buf: bytearray, pos: int) -> tuple[bytes | None, int, bool, bool]:
        """(bytes, new position, too long, line ended); bytes None: wait for more."""
        nl = buf.find(b"\n", pos)
        if nl < 0:
            if self.discard or len(buf) - pos > MAX_LINE:
                self.discard = True
                return bytes(buf[pos:]), len(buf), True, False
            return None, pos, False, False
        too_long = self.discard or nl - pos > MAX_LINE
        self.discard = False
        return bytes(buf[pos : nl + 1]), nl + 1, too_long, True


class _Message:
    """Size and header accounting for the message being sent."""

    __slots__ = ("dots", "head", "prev", "via", "wire")

    def __init__(self, via: str) -> None:
        self.via = via
        self.wire = 0
        self.dots = 0
        self.prev = b"\r\n"  # the body starts as if after a line end
        self.head = MessageHead()

    def size(self, complete: bool = True) -> int:
        if self.via == "DATA" and complete:
            # the terminator's "\r\n." was counted as a dot; ".\r\n" is not content
            return max(0, self.wire - max(0, self.dots - 1) - 3)
        if self.via == "DATA":
            return self.wire - self.dots  # no terminator came: every dot counted was stuffed
        return self.wire

    def end(self, complete: bool) -> MessageEnd:
        return MessageEnd(
            size=self.size(complete),
            headers=self.head.headers(),
            via=self.via,
            complete=complete,
        )


class MessageHeads:
    """The header block of each message, found again from a Conversation's
    events in order (``see`` each one): the message boundaries are the
    Conversation's own (a 354, a refused BDAT chunk, a new transaction, the
    end of a message, TLS). The recording writer and reader use it, so that a
    ``message_end`` line can leave out headers the reader derives the same
    way."""

    __slots__ = ("head",)

    def __init__(self) -> None:
        self.head = MessageHead()

    def see(self, ev: Event) -> None:
        kind = type(ev)
        if kind is MessageData:
            if not self.head.done:
                self.head.add(ev.raw)
        elif kind is MessageEnd or kind is TlsStart:
            self.head = MessageHead()
        elif kind is Command:
            if ev.verb in NEW_TRANSACTION:  # type: ignore[union-attr]
                self.head = MessageHead()
        elif kind is Reply:
            r: Reply = ev  # type: ignore[assignment]
            if (r.command == "DATA" and r.intermediate) or (
                r.command == "BDAT" and not 200 <= r.code < 300
            ):
                self.head = MessageHead()  # a new message starts, or a refused chunk ends one

    def derived(self) -> dict[str, str]:
        """The headers of the message whose pieces were seen last."""
        return self.head.headers()


class Conversation:
    """One SMTP session, read from both sides.

    ``feed(side, data)`` returns the events the new bytes complete. Call
    ``tls_established()`` once a STARTTLS handshake has completed on the
    caller's streams, and ``close()`` when the connection ends.
    """

    def __init__(self, greeted: bool = False) -> None:
        """``greeted``: the greeting was already exchanged (a conversation
        picked up mid-session, e.g. after a STARTTLS the caller drove)."""
        self.client_state = ClientState.COMMAND
        self.server_tls = False
        #: the capabilities of the last positive EHLO reply
        self.capabilities: dict[str, str] = {}
        #: true once a STARTTLS upgrade (or implicit TLS) is in place
        self.encrypted = False
        self._cbuf = bytearray()
        self._sbuf = bytearray()
        self._client_lines = _Lines()
        self._server_lines = _Lines()
        self._pending: deque[_Pending] = deque([] if greeted else [_Pending(GREETING)])
        self._waiting_on: _Pending | None = None
        self._shared: dict[str, _Pending] = {}
        self._message: _Message | None = None
        self._messages = 0  # messages begun, for message_number
        self._client_line_count = 0  # client lines ended, for open_line
        self._bdat_left = 0
        self._bdat_last = False
        self._sasl: SaslExchange | None = None
        self._auth_pending: _Pending | None = None
        self._auth_cancelled = False
        self._reply_raw: list[bytes] = []
        self._reply_lines: list[str] = []
        self._reply_held = 0  # octets in _reply_raw
        self._reply_code = 0
        self._reply_flags: tuple[str, ...] = ()
        self._anomalies: set[str] = set()
        self._out: list[Event] = []

    # -- public API -------------------------------------------------------

    def feed(self, side: Side, data: bytes | bytearray) -> list[Event]:
        """Take the next bytes ``side`` sent; return the events they complete."""
        if side is Side.CLIENT:
            if self.client_state is ClientState.TLS and not self._cbuf:
                self._out.append(Opaque(Side.CLIENT, bytes(data), OpaqueReason.TLS))
            elif self.client_state is ClientState.DATA and not self._cbuf:
                # the body's fast path: no copy through the line buffer
                chunk = bytes(data)
                used = self._on_body(chunk)
                if used < len(chunk):
                    self._cbuf += chunk[used:]
                    self._run_client()
            else:
                self._cbuf += data
                self._run_client()
        else:
            if self.server_tls and not self._sbuf:
                self._out.append(Opaque(Side.SERVER, bytes(data), OpaqueReason.TLS))
            else:
                self._sbuf += data
                self._run_server()
        out, self._out = self._out, []
        return out

    def tls_established(self) -> list[Event]:
        """The STARTTLS handshake is done on both legs: SMTP starts afresh
        (RFC 3207 section 4.2: the client must EHLO again, state is reset)."""
        self.client_state = ClientState.COMMAND
        self.server_tls = False
        self.encrypted = True
        self.capabilities = {}
        self._cbuf.clear()
        if self._sbuf:
            self._injected(
                Side.SERVER,
                self._sbuf,
                "server sent plaintext after its 220 to STARTTLS; not carried into TLS",
                OpaqueReason.PLAINTEXT_AFTER_220,
            )
        self._pending.clear()
        self._waiting_on = None
        self._message = None
        out, self._out = self._out, []
        return out

    def implicit_tls(self) -> None:
        """The connection was encrypted from its first byte (RFC 8314)."""
        self.encrypted = True

    def close(self) -> list[Event]:
        """The connection ended: flush what was left half read."""
        if self._message is not None and self.client_state in (ClientState.DATA, ClientState.BDAT):
            if self._cbuf:
                self._emit_data(bytes(self._cbuf))
                self._cbuf.clear()
            self._out.append(self._message.end(complete=False))
            self._message = None
        if self._cbuf:
            self._out.append(
                Opaque(Side.CLIENT, bytes(self._cbuf), OpaqueReason.INCOMPLETE_AT_CLOSE)
            )
            self._cbuf.clear()
        if self._reply_raw:
            self._out.append(
                Opaque(
                    Side.SERVER, b"".join(self._reply_raw), OpaqueReason.INCOMPLETE_REPLY_AT_CLOSE
                )
            )
            self._reply_raw = []
            self._reply_lines = []
            self._reply_held = 0
        if self._sbuf:
            self._out.append(
                Opaque(Side.SERVER, bytes(self._sbuf), OpaqueReason.INCOMPLETE_AT_CLOSE)
            )
            self._sbuf.clear()
        out, self._out = self._out, []
        return out

    @property
    def waiting_for(self) -> str | None:
        """The verb whose reply the client must wait for (DATA, AUTH,
        STARTTLS), or None."""
        if self.client_state is ClientState.WAITING and self._waiting_on is not None:
            return self._waiting_on.verb
        return None

    @property
    def held_client_bytes(self) -> int:
        """Client bytes received but not yet read (waiting for a reply, or a
        partial line)."""
        return len(self._cbuf)

    @property
    def held_server_bytes(self) -> int:
        """Server bytes received but not yet read: a partial line, or what
        followed the 220 to STARTTLS in the same read."""
        return len(self._sbuf)

    @property
    def partial_reply_bytes(self) -> int:
        """Server bytes of a reply not yet complete (lines of a multi-line
        reply so far, and a partial line)."""
        return len(self._sbuf) + self._reply_held

    @property
    def in_message(self) -> bool:
        """True while the client is sending message content."""
        return self.client_state in (ClientState.DATA, ClientState.BDAT)

    @property
    def open_line(self) -> int:
        """The number (from 1) of the client's command or SASL line begun
        but not yet ended, or 0 when none is: a caller can give each line a
        deadline of its own, as Postfix's ``smtpd_per_record_deadline`` does.
        A line given up on as too long stays open until its end comes."""
        state = self.client_state
        if (state is ClientState.COMMAND or state is ClientState.AUTH) and (
            self._cbuf or self._client_lines.discard
        ):
            return self._client_line_count + 1
        return 0

    @property
    def message_number(self) -> int:
        """The number (from 1) of the message being transferred, from its
        354 (or first BDAT chunk, RFC 3030) to its end, or 0 when none is."""
        return self._messages if self._message is not None else 0

    @property
    def next_reply_for(self) -> str | None:
        """The verb the server's next reply answers (``<greeting>`` first),
        or None when nothing waits for one."""
        return self._pending[0].verb if self._pending else None

    # -- client side ------------------------------------------------------

    def _anomaly(self, side: Side, kind: AnomalyKind, detail: str, once: bool = True) -> None:
        key = f"{side.value}:{kind}"
        if once and key in self._anomalies:
            return
        self._anomalies.add(key)
        self._out.append(Anomaly(side, kind, detail))

    def _injected(self, side: Side, held: bytearray, detail: str, reason: OpaqueReason) -> None:
        """Plaintext ``side`` sent around a STARTTLS that must not be carried
        into TLS (RFC 3207 section 6): flagged every time, given back as
        opaque, and dropped from the buffer."""
        self._anomaly(side, AnomalyKind.STARTTLS_INJECTION, detail, once=False)
        self._out.append(Opaque(side, bytes(held), reason))
        held.clear()

    def _too_long(self, side: Side, raw: bytes) -> None:
        if side is Side.SERVER and self._reply_raw:
            self._finish_reply()  # keep the events in wire order
        self._anomaly(side, AnomalyKind.LINE_TOO_LONG, f"a line longer than {MAX_LINE} octets")
        self._out.append(Opaque(side, raw, OpaqueReason.LINE_TOO_LONG))

    def _run_client(self) -> None:
        buf = self._cbuf
        pos = 0
        while pos < len(buf):
            state = self.client_state
            if state is ClientState.COMMAND or state is ClientState.AUTH:
                raw, pos, too_long, ended = self._client_lines.cut(buf, pos)
                if raw is None:
                    break
                if ended:
                    self._client_line_count += 1
                if too_long:
                    self._too_long(Side.CLIENT, raw)
                    if not ended:
                        break
                    # the server answers the line it could not read
                    if state is ClientState.AUTH and self._auth_pending is not None:
                        self._wait(self._auth_pending)
                    else:
                        self._expect(self._plain_pending("<line too long>"))
                elif state is ClientState.COMMAND:
                    self._on_command(raw)
                else:
                    self._on_auth_line(raw)
            elif state is ClientState.DATA:
                chunk = bytes(buf[pos:])
                used = self._on_body(chunk)
                pos += used
            elif state is ClientState.BDAT:
                n = min(self._bdat_left, len(buf) - pos)
                self._bdat_left -= n
                self._emit_data(bytes(buf[pos : pos + n]), last=self._bdat_left == 0)
                pos += n
                if self._bdat_left == 0:
                    self.client_state = ClientState.COMMAND
                    if self._bdat_last and self._message is not None:
                        self._out.append(self._message.end(complete=True))
                        self._message = None
            elif state is ClientState.TLS:
                self._out.append(Opaque(Side.CLIENT, bytes(buf[pos:]), OpaqueReason.TLS))
                pos = len(buf)
            else:  # WAITING
                if len(buf) - pos > MAX_HOLD:
                    self._anomaly(
                        Side.CLIENT,
                        AnomalyKind.DID_NOT_WAIT,
                        "client sent more than 1 MiB before a reply it must wait for",
                    )
                    self._release(self._assume_positive())
                    continue
                break
        del buf[:pos]

    def _assume_positive(self) -> ClientState:
        waiting = self._waiting_on
        if waiting is not None and waiting.verb == "DATA":
            waiting.data_started = True
            self._message = self._new_message("DATA")
            return ClientState.DATA
        if waiting is not None and waiting.verb == "AUTH":
            return ClientState.AUTH
        return ClientState.COMMAND

    def _on_command(self, raw: bytes) -> None:
        text, flags = decode_line(raw)
        if AnomalyKind.BARE_LF in flags:
            self._anomaly(
                Side.CLIENT, AnomalyKind.BARE_LF, "a command line ended with LF alone, not CRLF"
            )
        verb, arg, path = split_command(text)
        auth: AuthDecode | None = None
        pending = _Pending(verb) if verb in _STATEFUL else self._plain_pending(verb)
        if verb == "AUTH":
            args = parse_args(verb, arg)
            self._sasl = SaslExchange(args.mechanism or "")
            self._auth_pending = pending
            self._auth_cancelled = False
            if args.initial:
                auth = self._sasl.initial(args.initial)
            if not self.encrypted:
                self._anomaly(
                    Side.CLIENT,
                    AnomalyKind.AUTH_IN_CLEAR,
                    "AUTH sent on a connection that is not encrypted",
                )
            self._wait(pending)
        elif verb in ("DATA", "STARTTLS"):
            self._wait(pending)
        elif verb == "BDAT":
            # the chunk is read whatever the rest of the line says (RFC 3030
            # section 2: a server reads it, then answers)
            args = parse_args(verb, arg)
            if args.size is not None:
                self._bdat_left = args.size
                self._bdat_last = args.last
                pending.last = self._bdat_last
                if self._message is None:
                    self._message = self._new_message("BDAT")
                if self._bdat_left:
                    self.client_state = ClientState.BDAT
                elif self._bdat_last:
                    self._out.append(Command(raw, verb, arg, path, flags, auth))
                    self._expect(pending)
                    self._out.append(self._message.end(complete=True))
                    self._message = None
                    return
        elif verb in NEW_TRANSACTION:
            self._message = None  # a new transaction, or none (RFC 5321 4.1.1.5, RFC 3030)
        self._out.append(Command(raw, verb, arg, path, flags, auth))
        self._expect(pending)

    def _new_message(self, via: str) -> _Message:
        self._messages += 1
        return _Message(via)

    def _plain_pending(self, verb: str) -> _Pending:
        """One shared entry per verb for commands that keep no state while
        they wait: a long pipeline then costs a pointer per command."""
        pending = self._shared.get(verb)
        if pending is None:
            pending = _Pending(verb)
            if len(self._shared) < 64:
                self._shared[verb] = pending
        return pending

    def _expect(self, pending: _Pending) -> None:
        self._pending.append(pending)
        if len(self._pending) > MAX_PENDING:
            self._pending.popleft()
            self._anomaly(
                Side.CLIENT,
                AnomalyKind.TOO_MANY_UNANSWERED,
                f"more than {MAX_PENDING} commands without a reply",
            )

    def _wait(self, pending: _Pending) -> None:
        self.client_state = ClientState.WAITING
        self._waiting_on = pending

    def _release(self, state: ClientState) -> None:
        self._waiting_on = None
        self.client_state = state

    def _on_auth_line(self, raw: bytes) -> None:
        text, flags = decode_line(raw)
        sasl = self._sasl
        mech = sasl.mechanism if sasl else "?"
        if text.strip() == "*":
            self._auth_cancelled = True
            auth = AuthDecode(mech, {"cancel": "*"})
        elif sasl is not None:
            auth = sasl.response(text)
        else:
            auth = None
        self._out.append(AuthResponse(raw, text, flags, auth))
        if self._auth_pending is not None:
            self._wait(self._auth_pending)

    def _emit_data(self, chunk: bytes, last: bool = False) -> None:
        msg = self._message
        if msg is not None:
            msg.wire += len(chunk)
            if not msg.head.done:
                msg.head.add(chunk)
            via = msg.via
        else:
            via = "BDAT"
        self._out.append(MessageData(chunk, via, last))

    def _on_body(self, chunk: bytes) -> int:
        """Consume DATA body octets up to and including the terminator;
        return how many were consumed."""
        msg = self._message
        assert msg is not None
        prev = msg.prev
        i = (prev + chunk[:4]).find(_TERM)
        if i >= 0:
            end = i + 5 - len(prev)
        else:
            j = chunk.find(_TERM)
            end = j + 5 if j >= 0 else -1
        piece = chunk if end < 0 else chunk[:end]
        # count "\r\n." whose dot lies in this piece: each is a stuffed dot,
        # except the terminator's own
        edge = prev[-2:] + piece[:2]
        if edge[0:3] == b"\r\n.":
            msg.dots += 1
        if edge[1:4] == b"\r\n.":
            msg.dots += 1
        msg.dots += piece.count(b"\r\n.")
        msg.prev = (prev + piece)[-4:]
        self._emit_data(piece, last=end >= 0)
        if end >= 0:
            self._out.append(msg.end(complete=True))
            self._message = None
            self.client_state = ClientState.COMMAND
        return len(piece)

    # -- server side ------------------------------------------------------

    def _run_server(self) -> None:
        buf = self._sbuf
        pos = 0
        while pos < len(buf):
            if self.server_tls:
                self._out.append(Opaque(Side.SERVER, bytes(buf[pos:]), OpaqueReason.TLS))
                pos = len(buf)
                break
            raw, pos, too_long, _ = self._server_lines.cut(buf, pos)
            if raw is None:
                break
            if too_long:
                self._too_long(Side.SERVER, raw)
                continue
            self._on_reply_line(raw)
            if self.server_tls:
                break  # what follows the 220 waits for the caller's TLS decision
        del buf[:pos]

    def _on_reply_line(self, raw: bytes) -> None:
        text, flags = decode_line(raw)
        if (
            len(text) < 3
            or not (text[:3].isascii() and text[:3].isdigit())
            or (len(text) > 3 and text[3] not in " -")
        ):
            if self._reply_raw:
                # a broken line ends a multi-line reply, as clients read it, and
                # keeps the events in wire order
                self._finish_reply()
            self._anomaly(
                Side.SERVER, AnomalyKind.NOT_A_REPLY, f"not an SMTP reply line: {text[:60]!r}"
            )
            self._out.append(Opaque(Side.SERVER, raw, OpaqueReason.NOT_A_REPLY))
            return
        code = int(text[:3])
        if self._reply_raw and code != self._reply_code:
            self._anomaly(
                Side.SERVER,
                AnomalyKind.CODE_CHANGED,
                "reply code changed within a multi-line reply",
            )
            self._finish_reply()
        if AnomalyKind.BARE_LF in flags:
            self._anomaly(
                Side.SERVER, AnomalyKind.BARE_LF, "a reply line ended with LF alone, not CRLF"
            )
        self._reply_code = code
        self._reply_raw.append(raw)
        self._reply_lines.append(text[4:])
        self._reply_held += len(raw)
        if self._reply_held > MAX_LINE and len(self._reply_raw) > 1:
            self._reply_too_long()
        if flags:
            self._reply_flags = tuple(dict.fromkeys(self._reply_flags + flags))
        if text[3:4] != "-":
            self._finish_reply()

    def _reply_too_long(self) -> None:
        """A multi-line reply past ``MAX_LINE`` octets (a server that never
        sends the last line must not grow memory): the lines so far but the
        last become opaque; the last keeps the reply open until its end."""
        self._anomaly(
            Side.SERVER,
            AnomalyKind.REPLY_TOO_LONG,
            f"a multi-line reply longer than {MAX_LINE} octets",
        )
        self._out.append(
            Opaque(Side.SERVER, b"".join(self._reply_raw[:-1]), OpaqueReason.REPLY_TOO_LONG)
        )
        del self._reply_raw[:-1], self._reply_lines[:-1]
        self._reply_held = len(self._reply_raw[0])

    def _finish_reply(self) -> None:
        raw = b"".join(self._reply_raw)
        lines = tuple(self._reply_lines)
        code = self._reply_code
        flags = self._reply_flags
        self._reply_raw = []
        self._reply_lines = []
        self._reply_held = 0
        self._reply_flags = ()
        enhanced = enhanced_code(lines[0]) if lines else None
        pending = self._pending[0] if self._pending else None
        verb = pending.verb if pending else None
        after: list[Event] = []
        intermediate = False
        ends_message = False
        caps = None
        auth = None
        release: ClientState | None = None
        if pending is None:
            pass
        elif verb == "DATA" and code == 354 and not pending.data_started:
            intermediate = True
            pending.data_started = True
            if self._waiting_on is pending:
                self._message = self._new_message("DATA")
                release = ClientState.DATA
        elif verb == "AUTH" and code == 334:
            intermediate = True
            if self._sasl is not None:
                auth = self._sasl.challenge(lines[0] if lines else "")
            if self._waiting_on is pending:
                release = ClientState.AUTH
        else:
            self._pending.popleft()
            ends_message = (verb == "DATA" and pending.data_started) or (
                verb == "BDAT" and pending.last
            )
            if verb == "BDAT" and not pending.last and not 200 <= code < 300:
                self._message = None  # a refused chunk ends the transaction (RFC 3030 section 3)
            if verb in ("EHLO", "HELO") and 200 <= code < 300:
                caps = parse_capabilities(lines[1:]) if verb == "EHLO" else {}
                self.capabilities = caps
            elif verb == "AUTH":
                sasl = self._sasl
                after.append(
                    AuthResult(
                        mechanism=sasl.mechanism if sasl else "?",
                        user=sasl.user if sasl else None,
                        success=200 <= code < 300,
                        code=code,
                        cancelled=self._auth_cancelled,
                    )
                )
                self._sasl = None
            elif verb == "STARTTLS" and code == 220:
                after.append(TlsStart())
                self.server_tls = True
            if self._waiting_on is pending:
                release = (
                    ClientState.TLS if (verb == "STARTTLS" and code == 220) else ClientState.COMMAND
                )
        self._out.append(
            Reply(
                raw=raw,
                code=code,
                lines=lines,
                enhanced=enhanced,
                command=verb,
                intermediate=intermediate,
                ends_message=ends_message,
                capabilities=caps,
                flags=flags,
                auth=auth,
            )
        )
        self._out.extend(after)
        if release is ClientState.TLS:
            self._release(release)
            if self._cbuf:
                self._injected(
                    Side.CLIENT,
                    self._cbuf,
                    "plaintext sent after STARTTLS before the 220 reply (CVE-2011-0411 class)",
                    OpaqueReason.PLAINTEXT_AFTER_STARTTLS,
                )
        elif release is not None:
            self._release(release)
            if self._cbuf:
                self._run_client()
