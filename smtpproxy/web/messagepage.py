"""A message's page (``/session/<id>/message/<n>``, ``n`` from 1): the
envelope, the headers, the MIME tree, text parts as text, HTML parts in a
sandboxed frame, attachments to download, and the whole ``.eml``.

The message is ``Session.messages[n - 1]``: its content as the server
received it (``export.messages``), parsed by the standard library's email
package (``email.policy.default``), which is lenient: a malformed header
or part is shown as far as it can be read, never a traceback.

An HTML part is served on a route of its own (``.../html/<k>``) for an
``<iframe sandbox>`` without ``allow-scripts`` or ``allow-same-origin``:
its response carries its own Content-Security-Policy (nothing may load but
inline style and ``data:`` images; the CSP ``sandbox`` directive holds even
when the route is opened directly), so remote content (tracking pixels,
scripts, fonts) is never fetched and nothing in it runs.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from email.message import EmailMessage, Message
from urllib.parse import quote

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ..session import Message as SessionMessage
from ..session import Session
from .app import Context
from .diagram import shown
from .sessionpage import PageError, error_page, header_text, load

__all__ = ["HTML_PART_CSP", "routes", "safe_filename"]

#: the HTML part's own policy: inline style and data: images only, no
#: script, no remote anything; sandboxed even if opened as a page
HTML_PART_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src data:; "
    "sandbox; frame-ancestors 'self'; base-uri 'none'; form-action 'none'"
)
#: text shown at most per part (the .eml has everything)
TEXT_LIMIT = 1 << 20
#: parts listed at most
PART_LIMIT = 500


def safe_filename(name: str | None, fallback: str) -> str:
    """A download's name: the last component of ``name`` (never a path),
    without control, format (bidirectional) or separator characters,
    without leading dots, at most 120 characters; ``fallback`` when nothing
    is left."""
    name = (name or "").replace("\\", "/").rsplit("/", 1)[-1]
    kept = "".join(
        ch for ch in name if unicodedata.category(ch)[0] not in "CZ" or ch == " "
    ).strip()
    kept = kept.lstrip(". ")[:120]
    return kept or fallback


def _disposition(filename: str) -> str:
    """``attachment`` with an ASCII name and the UTF-8 one (RFC 6266)."""
    ascii_name = "".join(c if 32 < ord(c) < 127 and c not in '"\\;%' else "_" for c in filename)
    return f"attachment; filename=\"{ascii_name}\"; filename*=UTF-8''{quote(filename, safe='')}"


@dataclass
class Part:
    """One node of the MIME tree: ``number`` is its place in ``walk()``
    order (0: the message itself), what the part routes take."""

    number: int
    content_type: str
    filename: str
    disposition: str
    size: int
    children: list[Part] = field(default_factory=list)
    #: how it is shown: "text", "html", "attachment" or "" (a container)
    show: str = ""
    text: str = ""


def _parts(msg: Message) -> list[Message]:
    out = []
    for part in msg.walk():
        out.append(part)
        if len(out) >= PART_LIMIT:
            break
    return out


def _filename(part: Message) -> str:
    try:
        return part.get_filename() or ""
    except Exception:  # noqa: BLE001 - a hostile parameter must not end the page
        return ""


def _payload(part: Message) -> bytes:
    try:
        data = part.get_payload(decode=True)
    except Exception:  # noqa: BLE001
        return b""
    return data if isinstance(data, bytes) else b""


def _text_of(part: Message) -> str:
    """A text part's content as text (its charset, else UTF-8 with
    replacement characters)."""
    try:
        if isinstance(part, EmailMessage):
            content = part.get_content()
            if isinstance(content, str):
                return content
    except Exception:  # noqa: BLE001 - an unknown charset, a broken encoding
        pass
    return _payload(part).decode("utf-8", "replace")


def tree(msg: Message) -> tuple[Part, list[Part]]:
    """The MIME tree of ``msg`` and its parts in ``walk()`` order."""
    parts = _parts(msg)
    nodes: dict[int, Part] = {}
    flat: list[Part] = []
    for number, part in enumerate(parts):
        ctype = part.get_content_type()
        filename = _filename(part)
        disposition = part.get_content_disposition() or ""
        multipart = part.is_multipart()
        node = Part(
            number,
            shown(ctype),
            shown(filename),
            shown(disposition),
            0 if multipart else len(_payload(part)),
        )
        if not multipart:
            if disposition == "attachment" or filename or not ctype.startswith("text/"):
                node.show = "attachment"
            elif ctype == "text/html":
                node.show = "html"
            else:
                node.show = "text"
                text = _text_of(part)
                node.text = "\n".join(
                    "\t".join(shown(piece) for piece in line.split("\t"))
                    for line in text[:TEXT_LIMIT].splitlines()
                )
        nodes[id(part)] = node
        flat.append(node)
    for part in parts:
        if part.is_multipart():
            payload = part.get_payload()
            if isinstance(payload, list):
                nodes[id(part)].children = [nodes[id(p)] for p in payload if id(p) in nodes]
    return flat[0], flat


def _message(session: Session, n: int) -> SessionMessage:
    if not 1 <= n <= len(session.messages):
        count = len(session.messages)
        raise PageError(404, f"session {session.id} has {count} message(s): no message {n}")
    return session.messages[n - 1]


def routes(ctx: Context) -> list[Route]:
    # plain functions: Starlette runs them in its thread pool, so reading a
    # large recording never holds up the loop a proxy may share (record --web)
    def message_page(request: Request) -> Response:
        n = request.path_params["n"]
        try:
            session = load(ctx, request.path_params["sid"])
            m = _message(session, n)
        except PageError as err:
            return error_page(ctx, err)
        msg = m.message
        headers = [
            (shown(name), header_text(_decoded(msg, name, value)))
            for name, value in msg.raw_items()
        ]
        root, parts = tree(msg)
        return ctx.render(
            "message.html",
            sid=session.id,
            n=n,
            m=m,
            sender=shown(m.sender or ""),
            recipients=[shown(r) for r in m.recipients],
            rejected=[shown(r) for r in m.rejected],
            reply=shown(m.reply.raw.decode("utf-8", "backslashreplace").strip()) if m.reply else "",
            headers=headers,
            root=root,
            parts=parts,
        )

    def eml(request: Request) -> Response:
        n = request.path_params["n"]
        try:
            session = load(ctx, request.path_params["sid"])
            m = _message(session, n)
        except PageError as err:
            return error_page(ctx, err)
        name = f"{session.id}-{n}.eml"
        return Response(
            m.content,
            media_type="message/rfc822",
            headers={"content-disposition": _disposition(name)},
        )

    def _part(request: Request) -> tuple[Message, int]:
        session = load(ctx, request.path_params["sid"])
        m = _message(session, request.path_params["n"])
        k = request.path_params["k"]
        parts = _parts(m.message)
        if not 0 <= k < len(parts) or parts[k].is_multipart():
            raise PageError(404, f"message {request.path_params['n']} has no part {k} to show")
        return parts[k], k

    def part_download(request: Request) -> Response:
        try:
            part, k = _part(request)
        except PageError as err:
            return error_page(ctx, err)
        name = safe_filename(_filename(part), f"part-{k}.bin")
        return Response(
            _payload(part),
            media_type="application/octet-stream",
            headers={"content-disposition": _disposition(name)},
        )

    def html_part(request: Request) -> Response:
        try:
            part, k = _part(request)
            if part.get_content_type() != "text/html":
                raise PageError(404, f"part {k} is not HTML")
        except PageError as err:
            return error_page(ctx, err)
        body = _text_of(part).encode("utf-8", "backslashreplace")
        return Response(
            body,
            media_type="text/html; charset=utf-8",
            headers={"content-security-policy": HTML_PART_CSP, "x-frame-options": "SAMEORIGIN"},
        )

    base = "/session/{sid}/message/{n:int}"
    return [
        Route(base, message_page, name="message"),
        Route(base + ".eml", eml, name="message_eml"),
        Route(base + "/part/{k:int}", part_download, name="message_part"),
        Route(base + "/html/{k:int}", html_part, name="message_html"),
    ]


def _decoded(msg: Message, name: str, value: str) -> object:
    """A header's value decoded (RFC 2047 words) by the message's policy,
    else as it is in the message."""
    try:
        return msg.policy.header_fetch_parse(name, value)
    except Exception:  # noqa: BLE001 - a hostile header must not end the page
        return value
