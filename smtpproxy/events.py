"""Typed events of an SMTP conversation.

The protocol module turns the bytes each peer sends into these events; the
recorder, the console renderer, replay and diff consume them. Every event says
which side sent it and carries ``raw``: the exact bytes it was made from, so
that the concatenation of one side's ``raw`` fields, in order, is that side's
byte stream. Events that are derived rather than read (``MessageEnd``,
``AuthResult``, ``TlsStart``, ``Anomaly``) carry ``raw=b""``.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar


class Side(enum.Enum):
    """Which peer sent the bytes an event was made from."""

    CLIENT = "client"
    SERVER = "server"

    # members are singletons: hash by identity, in C (Enum's own __hash__ is
    # Python code, and the relay looks sides up on every read)
    __hash__ = object.__hash__

    @property
    def other(self) -> Side:
        return Side.SERVER if self is Side.CLIENT else Side.CLIENT


#: Field names of an ``AuthDecode`` that hold secrets: ``--redact`` removes
#: exactly these, and reprs never show them.
SECRET_FIELDS = frozenset({"password", "token", "digest"})

#: What a repr shows in place of a secret.
_HIDDEN = "***"


class AuthError(enum.StrEnum):
    """Why a SASL step could not be read or answered (RFC 4954, RFC 4422).

    The values are the strings recordings have always held in an AUTH
    decode's ``error`` (docs/recording-format.md): the format does not
    change, and consumers compare members, never the text."""

    #: the payload is not base64 (RFC 4954 section 4 requires it)
    BAD_BASE64 = "not valid base64"
    #: a PLAIN response is not ``authzid NUL authcid NUL passwd`` (RFC 4616 section 2)
    PLAIN_SHAPE = "PLAIN wants authzid NUL user NUL password"
    #: a CRAM-MD5 response is not ``user SP digest`` (RFC 2195 section 2)
    CRAM_SHAPE = "CRAM-MD5 wants 'user digest'"
    #: a client cannot answer CRAM-MD5 without the server's challenge (RFC 2195)
    NO_CHALLENGE = "CRAM-MD5 answers a challenge, not an initial response"
    #: a client has no encoder for this mechanism
    UNKNOWN_MECHANISM = "no encoder for this mechanism"


@dataclass(frozen=True, slots=True)
class AuthDecode:
    """One step of a SASL exchange, decoded (RFC 4954).

    ``fields`` holds what the step revealed, for example ``user`` and
    ``password`` for PLAIN, ``challenge`` for a server prompt, ``digest`` for
    CRAM-MD5, ``token`` for XOAUTH2/OAUTHBEARER. ``error`` says why a payload
    could not be decoded; it never raises. A string naming an ``AuthError``
    (as a recording holds it) becomes that member; any other string read
    from a file stays as it is.

    The repr shows ``***`` for passwords, tokens, digests and undecoded
    ``text`` (aiosmtpd's ``LoginPassword`` does the same), so a log line or
    a traceback does not leak them.
    """

    mechanism: str
    fields: Mapping[str, str] = field(default_factory=dict)
    error: AuthError | str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.error, str) and not isinstance(self.error, AuthError):
            try:
                object.__setattr__(self, "error", AuthError(self.error))
            except ValueError:
                pass

    @property
    def secret(self) -> bool:
        """Whether the payload this step decodes holds something secret: a
        password, token or digest, or text not read field by field."""
        if self.error or "text" in self.fields:
            return True
        return not SECRET_FIELDS.isdisjoint(self.fields)

    def __repr__(self) -> str:
        hide = SECRET_FIELDS | {"text"}
        shown = {k: (_HIDDEN if k in hide else v) for k, v in self.fields.items()}
        return f"AuthDecode(mechanism={self.mechanism!r}, fields={shown!r}, error={self.error!r})"


def _repr_hiding_secrets(ev: Command | AuthResponse, hidden: tuple[str, ...]) -> str:
    """The dataclass repr of an event, with the fields named in ``hidden``
    shown as ``***`` when its AUTH decode holds a secret (the raw line is
    the secret in base64)."""
    secret = ev.auth is not None and ev.auth.secret
    parts = []
    for f in dataclasses.fields(ev):
        value = getattr(ev, f.name)
        parts.append(f"{f.name}={_HIDDEN if secret and f.name in hidden else repr(value)}")
    return f"{type(ev).__name__}({', '.join(parts)})"


@dataclass(frozen=True, slots=True)
class Command:
    """A command line from the client (RFC 5321 section 4.1).

    ``verb`` is upper-cased; ``arg`` is the rest of the line as sent.
    ``path`` is the reverse- or forward-path of MAIL and RCPT (without the
    angle brackets). ``flags`` notes oddities kept as they were: ``bare_lf``,
    ``bad_utf8``.
    """

    side: ClassVar[Side] = Side.CLIENT
    raw: bytes
    verb: str
    arg: str
    path: str | None = None
    flags: tuple[str, ...] = ()
    auth: AuthDecode | None = None

    def __repr__(self) -> str:
        return _repr_hiding_secrets(self, ("raw", "arg"))


@dataclass(frozen=True, slots=True)
class AuthResponse:
    """A client's SASL response line after a 334 challenge (RFC 4954 section 4)."""

    side: ClassVar[Side] = Side.CLIENT
    raw: bytes
    text: str
    flags: tuple[str, ...] = ()
    auth: AuthDecode | None = None

    def __repr__(self) -> str:
        return _repr_hiding_secrets(self, ("raw", "text"))


@dataclass(frozen=True, slots=True)
class Reply:
    """A complete (possibly multi-line) server reply (RFC 5321 section 4.2).

    ``command`` is the verb of the command this reply answers: ``"<greeting>"``
    for the server's greeting, ``None`` for an unsolicited reply (such as a
    421 sent on timeout). ``enhanced`` is the RFC 3463 status code of the first line
    when present. ``lines`` are the text parts of each line. ``capabilities``
    is set for a positive EHLO reply: keyword -> parameters. ``ends_message``
    marks the reply that decides a message's fate (the final reply to DATA, or
    to ``BDAT ... LAST``).
    """

    side: ClassVar[Side] = Side.SERVER
    raw: bytes
    code: int
    lines: tuple[str, ...]
    enhanced: str | None = None
    command: str | None = None
    intermediate: bool = False
    ends_message: bool = False
    capabilities: Mapping[str, str] | None = None
    flags: tuple[str, ...] = ()
    auth: AuthDecode | None = None

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass(frozen=True, slots=True)
class MessageData:
    """Message octets as sent on the wire: a piece of a DATA body (still
    dot-stuffed, the final ``.CRLF`` included in the last piece) or of a BDAT
    chunk. ``last`` marks the piece that completes the body or the chunk."""

    side: ClassVar[Side] = Side.CLIENT
    raw: bytes
    via: str = "DATA"
    last: bool = False


@dataclass(frozen=True, slots=True)
class MessageEnd:
    """The client finished sending a message.

    ``size`` is the size of the message content (dot-stuffing undone, the
    terminator excluded). ``headers`` holds From, To, Cc, Subject, Date and
    Message-ID when present. ``complete`` is false when the connection ended
    before the terminator (or the last BDAT chunk).
    """

    side: ClassVar[Side] = Side.CLIENT
    raw: ClassVar[bytes] = b""
    size: int
    headers: Mapping[str, str]
    via: str = "DATA"
    complete: bool = True


@dataclass(frozen=True, slots=True)
class AuthResult:
    """The end of an AUTH exchange: the server's final answer (RFC 4954)."""

    side: ClassVar[Side] = Side.SERVER
    raw: ClassVar[bytes] = b""
    mechanism: str
    user: str | None
    success: bool
    code: int
    cancelled: bool = False


@dataclass(frozen=True, slots=True)
class TlsStart:
    """The server answered 220 to STARTTLS (RFC 3207): the next bytes of both
    sides are a TLS handshake."""

    side: ClassVar[Side] = Side.SERVER
    raw: ClassVar[bytes] = b""


class OpaqueReason(enum.StrEnum):
    """Why bytes were not read as SMTP. The values are what recordings hold
    in ``reason``; consumers compare members (a recording read back holds
    the same strings, which compare equal)."""

    TLS = "tls"  # TLS records: the observer sees ciphertext only there
    LINE_TOO_LONG = "line too long"  # past MAX_LINE (RFC 5321 4.5.3.1 allows 512/1000)
    REPLY_TOO_LONG = "reply too long"  # a multi-line reply past MAX_LINE
    NOT_A_REPLY = "not a reply line"  # no 3-digit code (RFC 5321 4.2)
    INCOMPLETE_AT_CLOSE = "incomplete at close"  # a partial line when the connection ended
    INCOMPLETE_REPLY_AT_CLOSE = "incomplete reply at close"
    PLAINTEXT_AFTER_220 = "plaintext after 220 to STARTTLS"  # RFC 3207 section 6
    PLAINTEXT_AFTER_STARTTLS = "plaintext pipelined after STARTTLS"


class AnomalyKind(enum.StrEnum):
    """What an ``Anomaly`` flags (the values are what recordings hold)."""

    AUTH_IN_CLEAR = "auth_in_clear"  # AUTH on a connection not encrypted
    BARE_LF = "bare_lf"  # a line ended with LF alone (RFC 5321 2.3.8)
    CODE_CHANGED = "code_changed"  # the code changed within a multi-line reply
    DID_NOT_WAIT = "did_not_wait"  # a client that sent past a reply it must wait for
    LINE_TOO_LONG = "line_too_long"
    NOT_A_REPLY = "not_a_reply"
    REPLY_TOO_LONG = "reply_too_long"
    STARTTLS_INJECTION = "starttls_injection"  # plaintext around STARTTLS (RFC 3207 6)
    TOO_MANY_UNANSWERED = "too_many_unanswered"


class NoteKind(enum.StrEnum):
    """What a ``Note`` records (the values are what recordings hold)."""

    PROXY_REPLY = "proxy_reply"  # a reply the proxy wrote to the client itself
    PROXY_REPLY_FROM_UPSTREAM = "proxy_reply_from_upstream"
    PROXY_COMMAND = "proxy_command"  # a command the proxy sent upstream itself
    PROXY_FORWARDED = "proxy_forwarded"
    STRIP_STARTTLS = "strip_starttls"  # STARTTLS hidden from the client's EHLO reply
    REDACTED = "redacted"  # client bytes removed by --redact
    UPSTREAM_ERROR = "upstream_error"  # the upstream could not be reached
    TLS_ERROR = "tls_error"  # a TLS handshake failed
    IDLE_TIMEOUT = "idle_timeout"
    LINE_TIMEOUT = "line_timeout"
    MESSAGE_TIMEOUT = "message_timeout"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    FAULT = "fault"  # a --fault rule fired: the note names the rule and what it did


#: Notes the transcript shows as warnings (``!!``). A recording read back
#: holds plain strings, which hash and compare as the members do.
WARNING_NOTES: frozenset[str] = frozenset(
    {NoteKind.UPSTREAM_ERROR, NoteKind.TLS_ERROR, NoteKind.FAULT}
)


@dataclass(frozen=True, slots=True)
class Opaque:
    """Bytes the observer relays but cannot read as SMTP: TLS records, the rest
    of an over-long line, or a partial line left when the connection closed."""

    side: Side
    raw: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class Anomaly:
    """Something a careful reader of the wire would want flagged: a protocol
    violation, a suspicious pattern, a limit hit. Never fatal."""

    side: Side
    kind: str
    detail: str
    raw: ClassVar[bytes] = b""


@dataclass(frozen=True, slots=True)
class TlsEstablished:
    """A TLS handshake completed on one leg: ``side`` is the peer the proxy
    shook hands with. Written by the relay, not the protocol module."""

    side: Side
    version: str
    cipher: str
    sni: str | None = None
    peer: Mapping[str, object] | None = None
    verified: str | None = None
    raw: ClassVar[bytes] = b""


@dataclass(frozen=True, slots=True)
class Note:
    """Something the proxy itself did or saw outside the byte streams: an
    upstream that could not be reached, a handshake that failed, a reply the
    proxy wrote to the client itself. ``raw`` then holds the bytes the proxy
    sent, and ``side`` is the role it played: SERVER for a reply it wrote to
    the client, CLIENT for a command it sent upstream on its own account."""

    side: Side
    kind: str
    text: str
    raw: bytes = b""
    #: the note stands in place of what the Conversation read of ``raw`` as
    #: ``side``'s bytes (a reply the proxy wrote for the server: a fault's
    #: reply, its STARTTLS answer); set by ``recording.note_in_place``. Not a
    #: field of the file's event (the writer marks such lines ``"fed"``).
    fed: bool = field(default=False, compare=False)


Event = (
    Command
    | AuthResponse
    | Reply
    | MessageData
    | MessageEnd
    | AuthResult
    | TlsStart
    | Opaque
    | Anomaly
    | TlsEstablished
    | Note
)
