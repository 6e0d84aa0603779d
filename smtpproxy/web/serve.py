"""Serving the web view: Hypercorn's trio worker on the listen address."""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import socket
from typing import Any, cast

import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from ..net import is_loopback
from .app import WebConfig, create_app
from .index import Index
from .live import Live

__all__ = ["allowed_hosts", "bind", "serve_web", "url_of"]


def allowed_hosts(host: str, port: int) -> frozenset[str]:
    """The Host header values a browser sends for this address (a loopback
    address also by the name ``localhost``)."""
    shown = f"[{host}]" if ":" in host else host
    names = {f"{shown}:{port}".lower()}
    if is_loopback(host):
        names |= {f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}"}
    if port == 80:  # a browser leaves out the default port
        names |= {n.rsplit(":", 1)[0] for n in names}
    return frozenset(names)


def url_of(host: str, port: int, token: str, path: str = "/") -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}{path}?token={token}"


def bind(listen: tuple[str, int]) -> socket.socket:
    """The listening socket (OSError when the address cannot be had), made
    before any loop starts so the error is one line, not a task's. An
    unspecified address (``0.0.0.0``, ``::``) is refused: the Host check
    (against DNS rebinding) must know the name browsers use."""
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(listen[0]).is_unspecified:
            raise OSError(
                errno.EADDRNOTAVAIL,
                "the web view checks each request's Host header against the address it "
                f"listens on, so it needs the address browsers will use, not {listen[0]} "
                "(this machine's LAN address, say)",
            )
    family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(listen)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


async def serve_web(
    config: WebConfig,
    sock: socket.socket,
    index: Index | None = None,
    live: Live | None = None,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve on ``sock`` (from :func:`bind`) until cancelled; ``task_status``
    gets its address. The allowed Host names follow it. ``live``
    (``record --web``): its recordings are indexed and its ``/events``
    served while this runs, and its streams ended when it stops."""
    host, port = sock.getsockname()[:2]
    config.hosts = allowed_hosts(host, port)
    config.cookie = f"smtpproxy_token_{port}"
    app = create_app(config, index, live)
    hc = Config()
    hc.bind = [f"fd://{sock.detach()}"]  # Hypercorn owns (and closes) the socket now
    hc.accesslog = None
    hc.errorlog = logging.getLogger("smtpproxy.web")
    hc.graceful_timeout = 1.0
    stop = trio.Event()
    shield = trio.CancelScope(shield=True)

    async def run(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        # Hypercorn stops by its shutdown trigger, not by cancellation (its
        # lifespan task fails if cancelled): shielded, and bounded once stopping
        with shield:
            await hypercorn_serve(
                cast(Any, app), hc, shutdown_trigger=stop.wait, task_status=task_status
            )

    async with trio.open_nursery() as nursery:
        if live is not None:
            nursery.start_soon(live.run)
        await nursery.start(run)
        task_status.started((host, port))
        try:
            await trio.sleep_forever()
        finally:
            if live is not None:
                live.close()  # the event streams end, so Hypercorn need not wait for them
            stop.set()
            shield.deadline = trio.current_time() + 5
