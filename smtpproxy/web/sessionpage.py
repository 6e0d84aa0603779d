"""A session's page (``/session/<id>``): the sequence diagram
(``diagram.py``), the TLS handshake of each leg, the AUTH exchanges with
their secrets masked until clicked, the messages, and links to the
transcript and to each side's raw bytes.

Also what the other pages of one session share: finding a session from
the id in a URL (only ever through ``Index.file_of``: a URL never names a
path) and the error page (one line, a 404 or 410, never a traceback).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from ..auth import REDACTED, credentials
from ..events import SECRET_FIELDS, Side, TlsEstablished
from ..protocol import auth_exchanges
from ..recording import RecordingError, read_recording
from ..session import Session
from .app import Context
from .diagram import PX_PER_SECOND, ROW_PX, build, shown

__all__ = ["PageError", "error_page", "load", "routes"]

#: the form of a session id (as ``recording.new_session_id`` makes it and
#: the reader accepts): anything else is not looked up at all
SESSION_ID = re.compile(r"[0-9a-f]{8,32}")
#: raw bytes shown at most on the raw page (the recording has all of them)
RAW_LIMIT = 2 << 20


class PageError(Exception):
    """A page that cannot be shown: its status and one line saying why."""

    def __init__(self, status: int, line: str) -> None:
        super().__init__(line)
        self.status = status
        self.line = line


def error_page(ctx: Context, err: PageError) -> HTMLResponse:
    response = ctx.render("error.html", status=err.status, message=err.line)
    response.status_code = err.status
    return response


def load(ctx: Context, sid: str) -> Session:
    """The session a URL names, read from its recording; ``PageError``
    (404: not a session id, or no such session; 410: its recording is gone
    or cannot be read)."""
    if not SESSION_ID.fullmatch(sid):
        raise PageError(404, "not a session id: ids are 8 to 32 lowercase hex digits")
    path = ctx.index.file_of(sid)
    if path is None:
        raise PageError(404, f"no session {sid} in this folder")
    try:
        return Session(read_recording(path))
    except RecordingError as exc:
        raise PageError(410, f"the recording of session {sid} cannot be read: {exc}") from None
    except OSError as exc:
        why = exc.strerror or type(exc).__name__
        raise PageError(410, f"the recording of session {sid} cannot be read: {why}") from None


def header_text(value: Any) -> str:
    """A header's value as text, however malformed (the parser is lazy:
    ``str()`` of a header may be where it fails)."""
    try:
        return shown(str(value))
    except Exception:  # noqa: BLE001 - a hostile header must not end the page
        return shown(repr(value))


@dataclass
class TlsLegView:
    leg: str
    version: str
    cipher: str
    sni: str
    verified: str
    #: the certificates the peer presented, leaf first: each a list of
    #: (name, value) pairs (subject, issuer, validity, names, fingerprint)
    chain: list[list[tuple[str, str]]] = field(default_factory=list)


_CERT_FIELDS = (
    ("subject", "subject"),
    ("issuer", "issuer"),
    ("not_before", "valid from"),
    ("not_after", "valid until"),
    ("sans", "names"),
    ("sha256", "SHA-256"),
)


def _certificate(peer: Mapping[str, object]) -> list[tuple[str, str]]:
    out = []
    for key, name in _CERT_FIELDS:
        value = peer.get(key)
        if value is None or value == "":
            continue
        if isinstance(value, list):
            value = ", ".join(str(v) for v in value)
        out.append((name, shown(str(value))))
    return out


def tls_legs(session: Session) -> list[TlsLegView]:
    """Each TLS handshake's facts (``TlsEstablished``): the client leg
    (the client and the proxy) and the server leg (the proxy and the server)."""
    out = []
    for ev in session.recording.events():
        if not isinstance(ev, TlsEstablished):
            continue
        chain: list[list[tuple[str, str]]] = []
        if ev.peer:
            chain.append(_certificate(ev.peer))
            more = ev.peer.get("chain")
            if isinstance(more, list):
                chain += [_certificate(c) for c in more if isinstance(c, Mapping)]
        out.append(
            TlsLegView(
                "client" if ev.side is Side.CLIENT else "server",
                shown(ev.version),
                shown(ev.cipher),
                shown(ev.sni or ""),
                shown(ev.verified or ""),
                chain,
            )
        )
    return out


@dataclass
class AuthView:
    number: int
    mechanism: str
    success: bool
    code: int | None
    #: what the exchange decoded to that is not secret (user, authzid)
    shown: list[tuple[str, str]]
    #: the secrets (password, token, digest): revealed by a click only
    secrets: list[tuple[str, str]]
    #: the secrets the recording no longer holds (``--redact``)
    redacted: list[str]


def auth_views(session: Session) -> list[AuthView]:
    """Each AUTH exchange (RFC 4954) and what its SASL steps decoded to."""
    out: list[AuthView] = []
    for steps in auth_exchanges(session.exchanges):
        ex = steps[0]
        found = credentials(step.auth for step in steps)
        final = steps[-1].reply
        view = AuthView(
            len(out) + 1,
            shown(ex.args.mechanism or ""),
            final is not None and final.code == 235,
            final.code if final is not None else None,
            [],
            [],
            [],
        )
        for key, value in found.items():
            if key in SECRET_FIELDS or key == "text":
                if value == REDACTED:
                    view.redacted.append(key)
                else:
                    view.secrets.append((key, shown(value)))
            else:
                view.shown.append((key, shown(value)))
        out.append(view)
    return out


@dataclass
class MessageRow:
    number: int
    sender: str
    recipients: str
    rejected: str
    size: int
    via: str
    outcome: str
    subject: str


def message_rows(session: Session) -> list[MessageRow]:
    out = []
    for n, m in enumerate(session.messages, 1):
        try:
            subject = header_text(m.message.get("Subject", ""))
        except Exception:  # noqa: BLE001 - a hostile message must not end the page
            subject = ""
        outcome = f"{m.reply.code} {m.reply.lines[0] if m.reply.lines else ''}" if m.reply else ""
        out.append(
            MessageRow(
                n,
                shown(m.sender or ""),
                shown(", ".join(m.recipients)),
                shown(", ".join(m.rejected)),
                m.size,
                m.via,
                shown(outcome.strip()),
                subject,
            )
        )
    return out


def _text(body: str) -> Response:
    """A text/plain answer that cannot fail to encode."""
    return Response(body.encode("utf-8", "backslashreplace"), media_type="text/plain")


def routes(ctx: Context) -> list[Route]:
    # plain functions: Starlette runs them in its thread pool, so reading a
    # large recording never holds up the loop a proxy may share (record --web)
    ctx.env.filters["shown"] = shown

    def session_page(request: Request) -> Response:
        sid = request.path_params["sid"]
        try:
            session = load(ctx, sid)
        except PageError as err:
            return error_page(ctx, err)
        rec = session.recording
        drawing = build([(e.t, e.event) for e in rec.entries], session.exchanges)
        return ctx.render(
            "session.html",
            sid=session.id,
            header=rec.header,
            close=rec.close,
            truncated=rec.truncated,
            drawing=drawing,
            tls=tls_legs(session),
            auths=auth_views(session),
            messages=message_rows(session),
            px_per_second=PX_PER_SECOND,
            row_px=ROW_PX,
        )

    def transcript(request: Request) -> Response:
        try:
            session = load(ctx, request.path_params["sid"])
        except PageError as err:
            return error_page(ctx, err)
        return _text(session.transcript())

    def raw(request: Request) -> Response:
        side = request.path_params["side"]
        try:
            if side not in ("client", "server"):
                raise PageError(404, "the raw bytes are of the client or the server")
            session = load(ctx, request.path_params["sid"])
        except PageError as err:
            return error_page(ctx, err)
        data = session.recording.raw(Side.CLIENT if side == "client" else Side.SERVER)
        lines = [
            shown(piece.decode("utf-8", "backslashreplace"))
            for piece in data[:RAW_LIMIT].splitlines(keepends=True)
        ]
        return ctx.render(
            "raw.html", sid=session.id, side=side, lines=lines, size=len(data), limit=RAW_LIMIT
        )

    return [
        Route("/session/{sid}", session_page, name="session"),
        Route("/session/{sid}/transcript", transcript, name="transcript"),
        Route("/session/{sid}/raw/{side}", raw, name="raw"),
    ]
