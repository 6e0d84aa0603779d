"""A recorded session for code to look at: what ``smtpproxy.read(path)``
returns, and what the Python API's servers list in ``.sessions``.

Everything here is read from the recording's events through the modules
that own their meaning: the step model (``protocol.exchanges``) pairs
commands and replies, ``export.messages`` takes the messages out as the
server received them, ``auth.credentials`` gathers what an AUTH exchange
decoded to, ``views.show_recording`` writes the transcript ``show`` prints.
Nothing is parsed again.
"""

from __future__ import annotations

import email
import email.policy
import io
from dataclasses import dataclass, field
from email.message import EmailMessage
from functools import cached_property
from pathlib import Path

from .auth import REDACTED, credentials
from .diff import exchanges_of
from .events import Command, Reply, Side, TlsEstablished
from .export import messages as exported_messages
from .protocol import Exchange, auth_exchanges
from .recording import Recording, read_recording
from .render import Transcript

__all__ = ["Auth", "Message", "Session", "Tls", "TlsLeg", "read"]


@dataclass(frozen=True)
class Auth:
    """One AUTH exchange (RFC 4954): the mechanism, the user and password
    it decoded to (None when the mechanism has none, or the recording was
    redacted), and whether the server said 235."""

    mechanism: str
    user: str | None
    password: str | None = field(repr=False)  # a repr in a test report shows no secret
    success: bool
    reply: Reply | None = field(default=None, repr=False)


@dataclass(frozen=True)
class TlsLeg:
    """A TLS handshake on one leg: ``leg`` is ``"client"`` (the client and
    the proxy) or ``"upstream"`` (the proxy and the server)."""

    leg: str
    version: str
    cipher: str
    sni: str | None = None


@dataclass(frozen=True)
class Tls:
    """The session's TLS: each leg that had it."""

    legs: tuple[TlsLeg, ...]

    @property
    def client(self) -> TlsLeg | None:
        return next((leg for leg in self.legs if leg.leg == "client"), None)

    @property
    def upstream(self) -> TlsLeg | None:
        return next((leg for leg in self.legs if leg.leg == "upstream"), None)

    @property
    def version(self) -> str:
        """The client leg's version (else the upstream's)."""
        return (self.client or self.legs[0]).version

    @property
    def cipher(self) -> str:
        return (self.client or self.legs[0]).cipher


@dataclass(frozen=True)
class Message:
    """A message as the server received it: the envelope, the content
    (dot-stuffing undone, BDAT chunks joined), how it was sent, and the
    server's answer."""

    sender: str | None
    recipients: tuple[str, ...]  # the recipients the server accepted
    rejected: tuple[str, ...]  # the ones it refused
    content: bytes = field(repr=False)
    via: str  # "DATA" or "BDAT"
    reply: Reply | None = field(default=None, repr=False)
    complete: bool = True

    @property
    def size(self) -> int:
        return len(self.content)

    @property
    def accepted(self) -> bool:
        """The server accepted it (a 2xx to its end)."""
        return self.reply is not None and 200 <= self.reply.code < 300

    @cached_property
    def message(self) -> EmailMessage:
        """The content parsed (``email.policy.default``)."""
        parsed = email.message_from_bytes(self.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


class Session:
    """One recorded session, read."""

    def __init__(self, recording: Recording) -> None:
        self.recording = recording

    def __repr__(self) -> str:
        return f"<smtpproxy.Session {self.id} {self.path.name}>"

    @property
    def path(self) -> Path:
        return self.recording.path

    @property
    def id(self) -> str:
        return self.recording.header.session

    @property
    def client(self) -> str:
        """The client's ``ip:port``."""
        return self.recording.header.client

    @property
    def closed_by(self) -> str | None:
        """``client``, ``server`` or ``proxy`` (None: no close line, the
        proxy was stopped mid-session)."""
        return self.recording.close.by if self.recording.close is not None else None

    @cached_property
    def commands(self) -> list[Command]:
        """The client's commands, in order (SASL answers and message
        content are not commands: see ``exchanges``)."""
        return [ev for ev in self.recording.events() if isinstance(ev, Command)]

    @cached_property
    def replies(self) -> list[Reply]:
        """Every reply the client got, the greeting first."""
        return [ex.reply for ex in self.exchanges if ex.reply is not None]

    @cached_property
    def exchanges(self) -> list[Exchange]:
        """Each client step with the reply to it (``protocol.Exchange``)."""
        return exchanges_of(self.recording)

    @cached_property
    def auth_attempts(self) -> list[Auth]:
        out: list[Auth] = []
        for steps in auth_exchanges(self.exchanges):
            ex = steps[0]
            found = credentials(step.auth for step in steps)
            password = found.get("password")
            final = steps[-1].reply
            out.append(
                Auth(
                    ex.args.mechanism or "",
                    found.get("user"),
                    None if password == REDACTED else password,
                    final is not None and final.code == 235,
                    final,
                )
            )
        return out

    @property
    def auth(self) -> Auth | None:
        """The session's last AUTH exchange (None: no AUTH)."""
        return self.auth_attempts[-1] if self.auth_attempts else None

    @cached_property
    def tls(self) -> Tls | None:
        """The TLS handshakes, by leg (None: no TLS on either leg)."""
        legs = tuple(
            TlsLeg(
                "client" if ev.side is Side.CLIENT else "upstream", ev.version, ev.cipher, ev.sni
            )
            for ev in self.recording.events()
            if isinstance(ev, TlsEstablished)
        )
        return Tls(legs) if legs else None

    @cached_property
    def messages(self) -> list[Message]:
        """The messages the client sent, as the server received them."""
        out: list[Message] = []
        for m in exported_messages(self.recording):
            ok = [r["address"] for r in m.recipients if 200 <= (r.get("code") or 0) < 300]
            bad = [r["address"] for r in m.recipients if not 200 <= (r.get("code") or 0) < 300]
            out.append(
                Message(m.mail_from, tuple(ok), tuple(bad), m.content, m.via, m.outcome, m.complete)
            )
        return out

    def transcript(self, show_body: bool = False) -> str:
        """The text ``smtpproxy show`` prints for this session."""
        from .views import show_recording  # views imports click; keep it off import

        buf = io.StringIO()
        show_recording(
            self.recording,
            Transcript(buf, show_body=show_body),
            echo=lambda line: buf.write(line + "\n"),
        )
        return buf.getvalue()


def read(path: str | Path) -> Session:
    """A saved recording, read (``RecordingError`` when it cannot be)."""
    return Session(read_recording(Path(path)))
