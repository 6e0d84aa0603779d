"""The step model: what each step of a session means, named the way people
name it ("the second RCPT", "the reply to DATA", "the AUTH exchange").

The Conversation reads bytes into events; this module gives those events
their meaning once, for every consumer (the embedded server, replay, diff,
export, the summary, and the fault rules, mock server and test API to come):

* :func:`parse_args` reads a command's argument: MAIL and RCPT paths and ESMTP
  parameters (RFC 5321 section 4.1.2), BDAT's size and LAST (RFC 3030), AUTH's
  mechanism and initial response (RFC 4954 section 4);
* :func:`exchanges` pairs each client step with the reply to it, in order
  (RFC 5321 section 4.1.1; RFC 2920 keeps that order under pipelining), and
  gives each its :class:`Position`: which occurrence of its verb it is in the
  session and in its mail transaction, and after how many TLS upgrades.

Nothing here does I/O; events in, exchanges out.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ..events import (
    AuthDecode,
    AuthResponse,
    Command,
    Event,
    MessageData,
    MessageEnd,
    Note,
    Reply,
    Side,
    TlsEstablished,
    TlsStart,
)
from .text import parse_path, reply_fields

__all__ = [
    "GREETING",
    "NEW_TRANSACTION",
    "Args",
    "Exchange",
    "Position",
    "StepCounter",
    "StepKind",
    "auth_exchanges",
    "exchanges",
    "parse_args",
    "parse_params",
]

GREETING = "<greeting>"

#: Commands that start a new mail transaction or end one (RFC 5321 4.1.1.5,
#: RFC 3030): a message begun before them is dropped, the transaction count
#: moves on at MAIL.
NEW_TRANSACTION = frozenset({"RSET", "EHLO", "HELO", "MAIL"})


class StepKind(enum.StrEnum):
    """What the client did in one step (its value is what older code and
    JSON output compare with)."""

    GREETING = "greeting"  # nothing: the server spoke first (RFC 5321 3.1)
    COMMAND = "command"  # a command line (a BDAT's chunk goes with it)
    AUTH = "auth"  # a SASL answer line after a 334 (RFC 4954 section 4)
    BODY = "body"  # a DATA body, from after the 354 to its final dot
    UNSOLICITED = "unsolicited"  # a reply that answers nothing (a 421 on timeout)


@dataclass(frozen=True, slots=True)
class Args:
    """What a command's argument says, parsed once.

    ``valid`` is false when the argument does not have its verb's syntax (a
    MAIL without ``FROM:``, a BDAT size that is not a number); the other
    fields then hold what could be read."""

    #: MAIL/RCPT: the reverse- or forward-path, without angle brackets
    path: str | None = None
    #: MAIL/RCPT: ESMTP parameters, keywords upper-cased (``SIZE``, ``BODY``)
    params: Mapping[str, str] = field(default_factory=dict)
    #: BDAT: the chunk size, and whether it is the last chunk
    size: int | None = None
    last: bool = False
    #: AUTH: the mechanism (upper-cased) and the initial response, if any
    mechanism: str | None = None
    initial: str | None = None
    valid: bool = True


_NO_ARGS = Args()


def parse_params(text: str) -> dict[str, str]:
    """ESMTP parameters ``KEY[=VALUE]`` separated by spaces (RFC 5321
    section 4.1.2, ``Mail-parameters``); keywords upper-cased, a keyword
    without a value maps to ``""``."""
    out: dict[str, str] = {}
    for word in text.split():
        key, _, value = word.partition("=")
        out[key.upper()] = value
    return out


def parse_args(verb: str, arg: str) -> Args:
    """The meaning of ``arg`` for ``verb`` (upper-cased, as ``Command.verb``)."""
    if verb in ("MAIL", "RCPT"):
        path = parse_path(arg)
        prefix = "FROM:" if verb == "MAIL" else "TO:"
        valid = path is not None and arg.lstrip().upper().startswith(prefix)
        _, colon, rest = arg.partition(":")
        rest = rest.strip()
        if rest.startswith("<"):
            end = rest.find(">")
            tail = rest[end + 1 :] if end >= 0 else ""
        else:
            _, _, tail = rest.partition(" ")
        return Args(path=path, params=parse_params(tail) if colon else {}, valid=valid)
    if verb == "BDAT":
        parts = arg.split()
        ok = bool(parts) and parts[0].isascii() and parts[0].isdigit() and len(parts) <= 2
        last = len(parts) == 2 and parts[1].upper() == "LAST"
        valid = ok and (len(parts) == 1 or last)
        return Args(size=int(parts[0]) if ok else None, last=last, valid=valid)
    if verb == "AUTH":
        # servers split AUTH's arguments on any whitespace (docs/interop.md)
        words = arg.split(None, 1)
        if not words:
            return Args(valid=False)
        initial = words[1].strip() if len(words) > 1 else None
        return Args(mechanism=words[0].upper(), initial=initial or None)
    return _NO_ARGS


@dataclass(frozen=True, slots=True)
class Position:
    """Where a step stands in its session, counted from 1.

    ``nth``: the how-many-th step with this verb in the session (the second
    RCPT is ``nth == 2``); ``transaction``: the mail transaction it belongs
    to (the how-many-th MAIL of the session; 0 before the first and after
    one ends with RSET, EHLO or HELO); ``nth_in_transaction``: the
    how-many-th with this verb in that transaction (0 outside one);
    ``tls``: how many TLS upgrades came before it (0: in clear; implicit TLS
    counts as one)."""

    nth: int = 0
    transaction: int = 0
    nth_in_transaction: int = 0
    tls: int = 0


@dataclass
class Exchange:
    """One client step and the reply to it."""

    kind: StepKind
    verb: str  # the command verb, "<auth>", "<body>" or "<greeting>"
    client: bytes = b""  # the raw bytes the client sent for this step
    reply: Reply | None = None
    group: float | None = None  # steps sent in one write share a group
    auth: AuthDecode | None = None
    message: MessageEnd | None = None
    extra: list[bytes] = field(default_factory=list)
    #: the command event (COMMAND steps), its parsed argument, its place
    command: Command | None = None
    args: Args = _NO_ARGS
    position: Position = Position()
    #: the reply the client got was the proxy's, not the server's (a fault
    #: rule's reply, a STARTTLS it answered, its 421): the note that says so;
    #: ``reply`` then holds what the proxy sent
    injected: Note | None = None

    @property
    def chunk(self) -> bytes:
        """A BDAT step's chunk: the octets after its command line (RFC 3030)."""
        if self.command is None or self.verb != "BDAT":
            return b""
        return self.client[len(self.command.raw) :]

    @property
    def label(self) -> str:
        if self.kind == StepKind.GREETING:
            return "(greeting)"
        if self.kind == StepKind.BODY:
            size = self.message.size if self.message else len(self.client)
            return f"(message body, {size} octets)"
        if self.kind == StepKind.UNSOLICITED:
            return "(unsolicited reply)"
        line = self.client.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "backslashreplace")
        if self.verb == "BDAT":
            return line + f" (+{len(self.client) - len(line) - 2} octets)"
        return line


class StepCounter:
    """Counts steps by verb, in the session and in the open transaction:
    ``place(verb)`` gives the next step's :class:`Position`. ``exchanges``
    uses it, and so does anything that must name a step as it happens
    (fault rules: ``rcpt#2``, ``message#2``); tell it ``open = False`` when
    a message ends and ``tls += 1`` when TLS comes up."""

    def __init__(self) -> None:
        self.session: dict[str, int] = {}
        self.transaction = 0  # MAIL commands so far
        self.open = False  # a transaction is open (from MAIL to its end)
        self.in_transaction: dict[str, int] = {}
        self.tls = 0

    def place(self, verb: str) -> Position:
        if verb == "MAIL":
            self.transaction += 1
            self.open = True
            self.in_transaction = {}
        elif verb in NEW_TRANSACTION:
            self.open = False
        nth = self.session[verb] = self.session.get(verb, 0) + 1
        if not self.open:
            return Position(nth, 0, 0, self.tls)
        inner = self.in_transaction[verb] = self.in_transaction.get(verb, 0) + 1
        return Position(nth, self.transaction, inner, self.tls)


def exchanges(events: Iterable[Event], times: Iterable[float] | None = None) -> list[Exchange]:
    """Split a session's events into exchanges; replies are matched to the
    client's steps in order (RFC 5321 4.1.1; RFC 2920 keeps that order).
    ``times``: each event's time; steps sent at the same time share a group
    (the client sent them in one write)."""
    out: list[Exchange] = []
    unanswered: list[Exchange] = []
    tlist = list(times) if times is not None else None
    open_body: Exchange | None = None
    count = StepCounter()
    implicit = True  # a TLS handshake before any SMTP is implicit TLS (RFC 8314)
    for i, ev in enumerate(events):
        t = tlist[i] if tlist is not None else None
        match ev:
            case Command():
                implicit = False
                open_body = None
                args = parse_args(ev.verb, ev.arg)
                ex = Exchange(
                    StepKind.COMMAND, ev.verb, ev.raw, group=t, auth=ev.auth,
                    command=ev, args=args, position=count.place(ev.verb),
                )  # fmt: skip
                out.append(ex)
                unanswered.append(ex)
                if ev.verb == "BDAT":
                    open_body = ex
            case AuthResponse():
                ex = Exchange(
                    StepKind.AUTH, "<auth>", ev.raw, auth=ev.auth, position=count.place("<auth>")
                )
                out.append(ex)
                unanswered.append(ex)
            case MessageData(via="DATA"):
                if open_body is None or open_body.kind != StepKind.BODY:
                    open_body = Exchange(
                        StepKind.BODY, "<body>", b"", position=count.place("<body>")
                    )
                    out.append(open_body)
                    unanswered.append(open_body)
                open_body.client += ev.raw
            case MessageData():
                if open_body is not None:
                    open_body.client += ev.raw
            case MessageEnd():
                count.open = False  # the message ends its transaction
                if open_body is not None:
                    open_body.message = ev
                    if open_body.kind == StepKind.BODY:
                        open_body = None
            case TlsStart():
                implicit = False
                count.tls += 1  # 220 to STARTTLS: what follows is inside TLS
                count.open = False  # and the session starts afresh (RFC 3207 4.2)
            case TlsEstablished():
                if implicit and count.tls == 0:  # handshakes before any SMTP: RFC 8314
                    count.tls = 1
            case Note(side=Side.SERVER, fed=True) if ev.raw and unanswered:
                # a reply the proxy made in the server's place (not a note that
                # only says what became of the server's reply)
                ex = unanswered.pop(0)
                ex.injected = ev
                if ev.raw[:3].isdigit():
                    ex.reply = Reply(ev.raw, **reply_fields(ev.raw))  # type: ignore[arg-type]
            case Reply(command=cmd) if cmd == GREETING:
                implicit = False
                out.append(
                    Exchange(
                        StepKind.GREETING, GREETING, reply=ev, position=Position(1, 0, 0, count.tls)
                    )
                )
            case Reply(command=None):
                out.append(
                    Exchange(
                        StepKind.UNSOLICITED,
                        "<unsolicited>",
                        reply=ev,
                        position=Position(tls=count.tls),
                    )
                )
            case Reply():
                if unanswered:
                    unanswered.pop(0).reply = ev
    return out


def auth_exchanges(exs: Sequence[Exchange]) -> list[list[Exchange]]:
    """Each AUTH exchange of a session (RFC 4954): the AUTH command and the
    SASL answers that followed it, in order."""
    out: list[list[Exchange]] = []
    for i, ex in enumerate(exs):
        if ex.kind is not StepKind.COMMAND or ex.verb != "AUTH":
            continue
        steps = [ex]
        for later in exs[i + 1 :]:
            if later.kind is not StepKind.AUTH:
                break
            steps.append(later)
        out.append(steps)
    return out
