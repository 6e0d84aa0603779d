"""Addresses and the reasons connections fail, in words a user can act on.

Shared by the relay, replay and the CLI, so that a refused connection or a
failed handshake reads the same wherever it happens.
"""

from __future__ import annotations

import errno
import ipaddress
import ssl
from typing import Any

import trio

__all__ = [
    "connect_reason",
    "format_address",
    "is_ip",
    "is_loopback",
    "parse_hostport",
    "tls_reason",
]


def parse_hostport(value: str, default_port: int | None = None) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or (with a default port) ``host``."""
    value = value.strip()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, _, port_text = value.partition(":")
    else:
        host, port_text = value, ""
    if not port_text:
        if default_port is None:
            raise ValueError(f"{value!r} has no port; write HOST:PORT")
        return host or "127.0.0.1", default_port
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{value!r}: port must be a number from 0 to 65535")
    return host or "127.0.0.1", int(port_text)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def format_address(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(addr)


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def connect_reason(exc: BaseException) -> str:
    """Why a connect failed: trio wraps the per-address errors in a group."""
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    causes: list[BaseException] = [exc]
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        causes = list(cause.exceptions) + causes
    elif cause is not None:
        causes.insert(0, cause)
    for c in causes:
        if isinstance(c, OSError) and c.errno == errno.ECONNREFUSED:
            return "connection refused"
        if isinstance(c, OSError) and c.strerror:
            return c.strerror
    return str(exc)


def tls_reason(exc: BaseException) -> str:
    """Why a TLS handshake failed (trio puts the ssl error in ``__cause__``)."""
    if isinstance(exc, trio.TooSlowError):
        return "timed out"
    cause = exc.__cause__ or exc.__context__ or exc
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {cause.verify_message} ({cause.reason})"
    if isinstance(cause, ssl.SSLError):
        return cause.reason or str(cause)
    return str(cause) or type(cause).__name__
