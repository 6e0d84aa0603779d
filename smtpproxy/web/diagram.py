"""The session page's sequence diagram, laid out: events and exchanges in,
drawing items out (the template writes them as SVG).

Three lanes, client, proxy and server; time flows down. Each row is one
thing that happened: a command or SASL answer (client to server, through
the proxy; to the proxy only when the proxy answered it itself), a reply
(server to client; from the proxy lane when the proxy made it: a fault's
reply, its own STARTTLS answer, its 421), a message body as one arrow with
its size, and the proxy's notes, the anomalies and the TLS handshakes as
boxes across the lanes they concern.

Rows are placed by their time, to scale (``PX_PER_SECOND``), with a
minimum height so labels never overlap; a gap longer than ``CAP_SECONDS``
is drawn ``BREAK_PX`` high with a break mark that gives its real length.
Every row's time is written on the axis, so nothing is compressed without
saying so.

What a SASL step carried is shown decoded, with the secrets (password,
token, digest, anything not read field by field) masked: the page shows
them only on a click, beside the diagram. Everything from the recording
goes through :func:`shown` (control characters made visible); the
template escapes it. Nothing here parses SMTP: the step model
(``protocol.exchanges``) pairs commands and replies, and rows are found
from it by event identity.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ..auth import REDACTED, stray_secret
from ..events import (
    SECRET_FIELDS,
    WARNING_NOTES,
    Anomaly,
    AuthDecode,
    AuthResponse,
    Command,
    Event,
    MessageEnd,
    Note,
    NoteKind,
    Opaque,
    Reply,
    Side,
    TlsEstablished,
)
from ..protocol import NEW_TRANSACTION, Exchange, StepKind
from ..render import visible

__all__ = [
    "Arrow",
    "Drawing",
    "Gap",
    "Lane",
    "Marker",
    "Tick",
    "build",
    "message_numbers",
    "shown",
    "step_label",
]

#: pixels per second of session time
PX_PER_SECOND = 100.0
#: the least height of a row (label room): gaps shorter than this in time
#: (0.28 s) all look the same; the axis gives each row's time
ROW_PX = 28.0
#: gaps longer than this are not drawn to scale but ``BREAK_PX`` high,
#: with a break mark and their real length
CAP_SECONDS = 10.0
BREAK_PX = 120.0
#: a gap at least this long gets its length written beside the axis
GAP_LABEL_SECONDS = 0.5
#: rows drawn at most (the transcript has the rest)
MAX_ROWS = 2000
TOP = 64.0
LANE_X = (160.0, 470.0, 780.0)
WIDTH = 900.0
#: about how many characters of label fit in one lane's span
CHARS_PER_SPAN = 42
MASK = "••••••"


class Lane(enum.IntEnum):
    CLIENT = 0
    PROXY = 1
    SERVER = 2

    @property
    def x(self) -> float:
        return LANE_X[self.value]


def shown(text: str) -> str:
    """Text from a recording as a page may show it: control characters and
    bidirectional overrides made visible (``render.visible``), and anything
    UTF-8 cannot encode (a header's undecodable octets) as an escape."""
    text = visible(text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(1, limit - 1)] + "…"


@dataclass(frozen=True)
class Arrow:
    """A command, SASL answer, body or reply going from one lane to another."""

    row: int
    t: float
    y: float
    start: Lane
    end: Lane
    #: command | auth | body | reply | proxy (a reply or command the proxy made)
    kind: str
    label: str
    full: str
    verb: str = ""
    #: the exchange it belongs to (its index in the session's exchanges)
    step: int | None = None
    #: a fault rule made it
    fault: bool = False
    #: the label hides a secret; ``auth`` is the AUTH attempt (from 1)
    secret: bool = False
    auth: int | None = None
    #: a message body's number (from 1), for its link
    message: int | None = None

    @property
    def x1(self) -> float:
        return self.start.x

    @property
    def x2(self) -> float:
        return self.end.x

    @property
    def via_proxy(self) -> bool:
        return abs(self.end - self.start) == 2

    @property
    def label_x(self) -> float:
        return (self.x1 + self.x2) / 2

    @property
    def head(self) -> str:
        """The arrowhead: a triangle at the end, pointing along the arrow."""
        d = 1.0 if self.x2 > self.x1 else -1.0
        x, y = self.x2, self.y
        return f"{x:.1f},{y:.1f} {x - 9 * d:.1f},{y - 4:.1f} {x - 9 * d:.1f},{y + 4:.1f}"


@dataclass(frozen=True)
class Marker:
    """A box across lanes: a note, fault, warning, anomaly or TLS handshake."""

    row: int
    t: float
    y: float
    start: Lane
    end: Lane
    kind: str
    label: str
    full: str

    @property
    def x(self) -> float:
        return self.start.x - (110.0 if self.start == self.end else 0.0)

    @property
    def width(self) -> float:
        return self.end.x - self.start.x if self.start != self.end else 220.0

    @property
    def label_x(self) -> float:
        return self.x + self.width / 2


@dataclass(frozen=True)
class Gap:
    """A pause between two rows: ``capped`` when it is not drawn to scale."""

    y0: float
    y1: float
    seconds: float
    capped: bool

    @property
    def label(self) -> str:
        return _duration(self.seconds)

    @property
    def middle(self) -> float:
        return (self.y0 + self.y1) / 2


@dataclass(frozen=True)
class Tick:
    """A mark on the time axis: ``grid`` ticks are whole seconds inside a
    gap drawn to scale, the others a row's own time."""

    y: float
    label: str
    grid: bool = False


@dataclass(frozen=True)
class Drawing:
    width: float
    height: float
    lanes: tuple[tuple[str, float], ...]
    arrows: tuple[Arrow, ...]
    markers: tuple[Marker, ...]
    gaps: tuple[Gap, ...]
    ticks: tuple[Tick, ...]
    #: rows left out past ``MAX_ROWS``
    cut: int = 0


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.2f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {seconds % 60:.0f} s"
    return f"{seconds / 3600:.1f} h"


def _first_line(raw: bytes) -> tuple[str, int]:
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    first = lines[0].rstrip(b"\r") if lines else b""
    return first.decode("utf-8", "backslashreplace"), len(lines)


def auth_text(decode: AuthDecode | None) -> str:
    """What a SASL step decoded to, secrets masked: ``user="alice"
    password=••••••`` (a redacted recording's secrets say so)."""
    if decode is None:
        return ""
    parts = []
    for key, value in decode.fields.items():
        if value == REDACTED:
            parts.append(f"{key}={REDACTED}")
        elif key in SECRET_FIELDS or key == "text":
            parts.append(f"{key}={MASK}")
        else:
            parts.append(f'{key}="{value}"')
    if decode.error:
        parts.append(f"(not decoded: {decode.error})")
    return " ".join(parts)


def message_numbers(exchanges: Sequence[Exchange]) -> dict[int, int]:
    """Which message (from 1, in ``Session.messages``' order) each body
    exchange ends: a DATA body, or the BDAT chunk that completes one
    (RFC 3030; a run of BDAT chunks is one message)."""
    out: dict[int, int] = {}
    count = 0
    in_bdat = False
    for i, ex in enumerate(exchanges):
        if ex.kind is StepKind.BODY:
            count += 1
            out[i] = count
        elif ex.kind is StepKind.COMMAND and ex.verb == "BDAT":
            if not in_bdat:
                count += 1
                in_bdat = True
            if ex.message is not None:
                out[i] = count
                in_bdat = False
        elif ex.kind is StepKind.COMMAND and ex.verb in NEW_TRANSACTION:
            in_bdat = False
    return out


def _auth_numbers(exchanges: Sequence[Exchange]) -> dict[int, int]:
    """The AUTH attempt (from 1) each AUTH command and SASL answer belongs to."""
    out: dict[int, int] = {}
    count = 0
    for i, ex in enumerate(exchanges):
        if ex.kind is StepKind.COMMAND and ex.verb == "AUTH":
            count += 1
            out[i] = count
        elif ex.kind is StepKind.AUTH and count:
            out[i] = count
    return out


@dataclass
class _Row:
    t: float
    item: Arrow | Marker


def _lines(text: str) -> str:
    """A tooltip's text: each line shown, the line ends kept as line ends."""
    return "\n".join(shown(line) for line in re.split(r"\r?\n", text.rstrip("\r\n")))


def _arrow(start: Lane, end: Lane, kind: str, label: str, full: str, **more: Any) -> Arrow:
    """An arrow not placed yet (``layout`` gives it its row and height)."""
    return Arrow(
        row=0, t=0.0, y=0.0, start=start, end=end, kind=kind, label=label, full=full, **more
    )


def step_label(ex: Exchange) -> tuple[str, bool]:
    """A client step's text as the pages show it, and whether it hides a
    secret: a SASL step shows what it decoded to with its secrets masked,
    never the base64 that carries them."""
    secret = ex.auth is not None and ex.auth.secret
    if ex.kind is StepKind.AUTH:
        if ex.auth is None:
            return f"SASL answer ({len(ex.client)} octets, hidden)", True
        if secret:
            return f"{MASK}  {auth_text(ex.auth)}", True
        return f"{ex.label}  {auth_text(ex.auth)}", False
    if ex.verb == "AUTH" and ex.auth is not None:
        mechanism = ex.args.mechanism or ""
        label = f"AUTH {mechanism} {MASK if secret else ex.args.initial or ''}".rstrip()
        return f"{label}  {auth_text(ex.auth)}", secret
    if ex.command is not None and stray_secret(ex.command):
        return f"(a line that looks like a SASL answer: {len(ex.client)} octets, hidden)", True
    return ex.label, False


def _client_step(i: int, ex: Exchange, auth_no: int | None) -> Arrow:
    """The arrow of a client step: to the server through the proxy, or to
    the proxy when the proxy answered it itself."""
    answered_by_proxy = (
        ex.injected is not None and ex.injected.kind != NoteKind.PROXY_REPLY_FROM_UPSTREAM
    )
    end = Lane.PROXY if answered_by_proxy else Lane.SERVER
    label, secret = step_label(ex)
    kind = "auth" if ex.kind is StepKind.AUTH else "command"
    full = label
    if ex.injected is not None:
        full += f"\n{ex.injected.text}"
    verb = "(hidden)" if _stray(ex) else ex.verb
    return _arrow(
        Lane.CLIENT, end, kind, label, full, verb=verb, step=i, secret=secret, auth=auth_no
    )


def _stray(ex: Exchange | None) -> bool:
    return ex is not None and ex.command is not None and stray_secret(ex.command)


def _unquoted(text: str, ex: Exchange | None) -> str:
    """A reply's text without the stray SASL answer it may quote (servers
    echo an unknown command, or its first octets)."""
    if not _stray(ex):
        return text
    assert ex is not None
    secret = ex.client.strip().decode("utf-8", "replace").upper()
    upper = text.upper()  # servers echo a verb upper-cased
    for n in range(len(secret), 5, -1):
        at = upper.find(secret[:n])
        if at >= 0:
            return text[:at] + MASK + text[at + n :]
    return text


def _reply(i: int | None, ex: Exchange | None, reply: Reply) -> Arrow:
    first, count = _first_line(reply.raw)
    label = first + (f"  (+{count - 1} lines)" if count > 1 else "")
    if reply.auth is not None and reply.auth.fields:
        label += f"  {auth_text(reply.auth)}"
    full = _unquoted(reply.raw.decode("utf-8", "backslashreplace"), ex)
    label = _unquoted(label, ex)
    verb = ("(hidden)" if _stray(ex) else ex.verb) if ex is not None else ""
    return _arrow(Lane.SERVER, Lane.CLIENT, "reply", label, full, verb=verb, step=i)


def _proxy_bytes(i: int | None, ex: Exchange | None, note: Note) -> Arrow:
    """Bytes the proxy sent itself: a reply to the client (a fault's, its
    STARTTLS answer, its 421) or a command upstream."""
    first, count = _first_line(note.raw)
    end = Lane.CLIENT if note.side is Side.SERVER else Lane.SERVER
    label = first + (f"  (+{count - 1} lines)" if count > 1 else "")
    full = f"{note.raw.decode('utf-8', 'backslashreplace').rstrip()}\n{note.text}"
    verb = ex.verb if ex is not None else ""
    fault = note.kind == NoteKind.FAULT
    return _arrow(Lane.PROXY, end, "proxy", label, full, verb=verb, step=i, fault=fault)


def _body(i: int, ex: Exchange, end: MessageEnd, number: int | None) -> Arrow:
    label = f"message {number or '?'}: {end.size} octets via DATA"
    subject = end.headers.get("Subject")
    full = label + (f"\nSubject: {subject}" if subject else "")
    to = Lane.PROXY if ex.injected is not None else Lane.SERVER
    return _arrow(Lane.CLIENT, to, "body", label, full, verb="<body>", step=i, message=number)


def _marker(ev: Event) -> Marker | None:
    side = getattr(ev, "side", None)
    start, end = (Lane.CLIENT, Lane.PROXY) if side is Side.CLIENT else (Lane.PROXY, Lane.SERVER)
    match ev:
        case Note():
            start = end = Lane.PROXY
            kind = "note"
            if ev.kind == NoteKind.FAULT:
                kind = "fault"
            elif ev.kind in WARNING_NOTES:
                kind = "warning"
            full = ev.text
        case Anomaly():
            kind, full = "anomaly", f"anomaly {ev.kind}: {ev.detail}"
        case TlsEstablished():
            leg = "client" if ev.side is Side.CLIENT else "server"
            kind, full = "tls", f"TLS with the {leg}: {ev.version} {ev.cipher}"
            if ev.sni:
                full += f", SNI {ev.sni}"
            if ev.peer and ev.peer.get("subject"):
                full += f", certificate {ev.peer.get('subject')}"
            if ev.verified:
                full += f", verification: {ev.verified}"
        case Opaque():
            kind, full = "note", f"{len(ev.raw)} octets not read as SMTP ({ev.reason})"
        case _:
            return None
    return Marker(row=0, t=0.0, y=0.0, start=start, end=end, kind=kind, label="", full=full)


def build(entries: Iterable[tuple[float, Event]], exchanges: Sequence[Exchange]) -> Drawing:
    """The drawing of a session: ``entries`` are its events with their
    times (seconds from the start), ``exchanges`` the step model's
    exchanges of the same event objects (``diff.exchanges_of``)."""
    by_command: dict[int, int] = {}
    by_reply: dict[int, int] = {}
    by_note: dict[int, int] = {}
    by_body: dict[int, int] = {}
    answers: deque[int] = deque()
    for i, ex in enumerate(exchanges):
        if ex.command is not None:
            by_command[id(ex.command)] = i
        if ex.injected is not None:
            by_note[id(ex.injected)] = i
        elif ex.reply is not None:
            by_reply[id(ex.reply)] = i
        if ex.kind is StepKind.BODY and ex.message is not None:
            by_body[id(ex.message)] = i
        if ex.kind is StepKind.AUTH:
            answers.append(i)
    auths = _auth_numbers(exchanges)
    messages = message_numbers(exchanges)

    rows: list[_Row] = []
    last_t = 0.0
    for raw_t, ev in entries:
        t = raw_t if math.isfinite(raw_t) else last_t
        last_t = t
        item: Arrow | Marker | None
        match ev:
            case Command() if id(ev) in by_command:
                i = by_command[id(ev)]
                item = _client_step(i, exchanges[i], auths.get(i))
                if i in messages:  # a BDAT LAST ends a message
                    item = dataclasses.replace(item, message=messages[i])
            case AuthResponse() if answers:
                i = answers.popleft()
                item = _client_step(i, exchanges[i], auths.get(i))
            case MessageEnd() if id(ev) in by_body:
                i = by_body[id(ev)]
                item = _body(i, exchanges[i], ev, messages.get(i))
            case Reply():
                j = by_reply.get(id(ev))
                item = _reply(j, exchanges[j] if j is not None else None, ev)
            case Note() if ev.raw:
                j = by_note.get(id(ev))
                item = _proxy_bytes(j, exchanges[j] if j is not None else None, ev)
            case _:
                item = _marker(ev)
        if item is not None:
            rows.append(_Row(t, item))
    return layout(rows)


def layout(rows: Sequence[_Row]) -> Drawing:
    """Place the rows down the page, to scale, and draw the axis."""
    cut = max(0, len(rows) - MAX_ROWS)
    rows = rows[:MAX_ROWS]
    arrows: list[Arrow] = []
    markers: list[Marker] = []
    gaps: list[Gap] = []
    ticks: list[Tick] = []
    wide = bool(rows) and rows[-1].t >= 100
    y = TOP
    prev: float | None = None
    for n, row in enumerate(rows):
        if prev is not None:
            dt = max(0.0, row.t - prev)
            if dt > CAP_SECONDS:
                gaps.append(Gap(y, y + BREAK_PX, dt, True))
                y += BREAK_PX
            else:
                step = max(ROW_PX, dt * PX_PER_SECOND)
                if dt >= GAP_LABEL_SECONDS:
                    gaps.append(Gap(y, y + step, dt, False))
                    whole = math.floor(prev) + 1
                    while whole < row.t:
                        at = y + (whole - prev) * PX_PER_SECOND
                        ticks.append(Tick(at, f"{whole} s", grid=True))
                        whole += 1
                y += step
        prev = row.t
        ticks.append(Tick(y, f"{row.t:.1f}" if wide else f"{row.t:.3f}"))
        item = row.item
        lanes = max(1, abs(item.end - item.start))
        full = _lines(item.full)
        label = item.label if isinstance(item, Arrow) else full
        label = truncate(
            shown(label), CHARS_PER_SPAN * lanes - (0 if isinstance(item, Arrow) else 4)
        )
        placed = dataclasses.replace(item, row=n, t=row.t, y=y, label=label, full=full)
        if isinstance(placed, Arrow):
            arrows.append(dataclasses.replace(placed, verb=shown(placed.verb)))
        else:
            markers.append(placed)
    lane_x = tuple((lane.name.lower(), lane.x) for lane in Lane)
    return Drawing(
        WIDTH, y + 40.0, lane_x, tuple(arrows), tuple(markers), tuple(gaps), tuple(ticks), cut
    )
