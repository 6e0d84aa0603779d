"""``smtpproxy web``: the ASGI application (Starlette) and its defences.

The pages show credentials, so every request must carry the token printed
at start (``?token=`` once, then an HttpOnly SameSite=Strict cookie, as
Jupyter does), its Host header must name the address the server listens on
(DNS rebinding), and every response carries a Content-Security-Policy that
allows the page's own script and style and nothing else. Templates escape
everything (Jinja2 autoescape); what came from a recording is data.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from ..render import visible
from .index import COLUMNS, Index

if TYPE_CHECKING:
    from .live import Live

__all__ = ["CSP", "WebConfig", "create_app"]

COOKIE = "smtpproxy_token"

#: what a page may load and run: its own script and style only; frames
#: (the message's HTML) from the same origin only; nothing may frame us
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'"
)


@dataclass
class WebConfig:
    """What the web view serves and how it is reached."""

    folder: Path
    #: the Host header values accepted: the listen address as ``host:port``
    #: (and ``localhost:port`` for a loopback address)
    hosts: frozenset[str] = frozenset()
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    page_size: int = 50
    #: the token's cookie; ``serve_web`` names it by the port (a browser
    #: sends a host's cookies to all its ports: two web views must not
    #: overwrite each other's token)
    cookie: str = COOKIE


class Guard:
    """ASGI middleware: the Host check, the token, the security headers."""

    def __init__(self, app: ASGIApp, config: WebConfig) -> None:
        self.app = app
        self.config = config

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        host = request.headers.get("host", "")
        if self.config.hosts and host.lower() not in self.config.hosts:
            await _plain(421, "unknown Host header: the web view answers only its own address")(
                scope, receive, send
            )
            return
        given = request.query_params.get("token")
        cookie = request.cookies.get(self.config.cookie, "")
        if given is not None and _same(given, self.config.token):
            # the token once in the URL: a cookie from now on, and the URL without it
            query = urlencode(
                [(k, v) for k, v in request.query_params.multi_items() if k != "token"]
            )
            # the same path, never another host's (``//host`` would be one)
            target = "/" + request.url.path.lstrip("/") + (f"?{query}" if query else "")
            response = RedirectResponse(target, status_code=303)
            response.set_cookie(
                self.config.cookie, self.config.token, httponly=True, samesite="strict"
            )
            await _secured(response)(scope, receive, send)
            return
        if not _same(cookie, self.config.token):
            await _plain(403, "a token is needed: open the address smtpproxy web printed at start")(
                scope, receive, send
            )
            return

        async def send_secured(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                for k, v in _HEADERS:
                    if k not in names:
                        headers.append((k, v))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_secured)


_HEADERS: list[tuple[bytes, bytes]] = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cache-control", b"no-store"),
]


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _plain(status: int, text: str) -> Response:
    return _secured(PlainTextResponse(text + "\n", status_code=status))


def _secured(response: Response) -> Response:
    for k, v in _HEADERS:
        response.headers[k.decode()] = v.decode()
    return response


def templates() -> Environment:
    env = Environment(
        loader=PackageLoader("smtpproxy.web", "templates"),
        autoescape=select_autoescape(default=True, default_for_string=True),
    )
    env.filters["visible"] = visible
    return env


@dataclass
class Context:
    """What every page's handler needs: the folder's index, the config, the
    templates (``render``)."""

    config: WebConfig
    index: Index
    env: Environment
    #: ``record --web``: the sessions being recorded, the ``/events`` stream
    live: Live | None = None

    def render(self, name: str, **values: Any) -> HTMLResponse:
        return HTMLResponse(
            self.env.get_template(name).render(
                columns=COLUMNS, folder=str(self.config.folder), **values
            )
        )


def create_app(config: WebConfig, index: Index | None = None, live: Live | None = None) -> ASGIApp:
    """The web view of ``config.folder``; ``index`` is the folder's (made
    and brought up to date here when not given); ``live``: the sessions
    ``record --web`` is recording (smtpproxy/web/live.py)."""
    from . import compare, listing, messagepage, sessionpage  # the pages: each gives its routes

    if index is None:
        index = Index(config.folder)
        index.update()
    ctx = Context(config, index, templates(), live)
    routes: list[Route | Mount] = [
        *listing.routes(ctx),
        *sessionpage.routes(ctx),
        *messagepage.routes(ctx),
        *compare.routes(ctx),
        Mount("/static", app=StaticFiles(packages=[("smtpproxy.web", "static")]), name="static"),
    ]
    app = Starlette(routes=routes)
    app.state.ctx = ctx
    return Guard(app, config)
