"""Shared fixtures: real SMTP peers on loopback, the proxy, and helpers."""

from __future__ import annotations

import io
import os
import shutil
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
import trio

from smtpproxy.relay import Proxy, ProxyConfig
from smtpproxy.render import Transcript

sys.path.insert(0, str(Path(__file__).parent))

SEEDS = Path(__file__).resolve().parents[1].parent / "shared" / "seeds"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_program(name: str, package: str) -> str:
    """The path of an external peer; skip (or fail in CI) when it is missing."""
    path = shutil.which(name) or next(
        (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None
    )
    if path is None:
        msg = f"{name} is not installed (apt-get install {package})"
        if os.environ.get("SMTPPROXY_REQUIRE_PEERS"):
            pytest.fail(msg + "; SMTPPROXY_REQUIRE_PEERS is set, so this is a failure")
        pytest.skip(msg)
    return path


@dataclass
class Received:
    """What the aiosmtpd server received."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    auth: list[tuple[str, Any]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler:
    def __init__(self, received: Received) -> None:
        self.received = received

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.received.lock:
            self.received.messages.append(
                {
                    "from": envelope.mail_from,
                    "to": list(envelope.rcpt_tos),
                    "content": envelope.original_content,
                }
            )
        return "250 2.0.0 OK queued"


class _Authenticator:
    def __init__(self, received: Received, users: dict[str, str]) -> None:
        self.received = received
        self.users = users

    def __call__(self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> Any:
        from aiosmtpd.smtp import AuthResult, LoginPassword

        if isinstance(auth_data, LoginPassword):
            user = auth_data.login.decode()
            ok = self.users.get(user) == auth_data.password.decode()
            with self.received.lock:
                self.received.auth.append((mechanism, user))
            return AuthResult(success=ok)
        return AuthResult(success=False, handled=False)


@dataclass
class AioServer:
    host: str
    port: int
    received: Received

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)


@pytest.fixture
def aiosmtpd_server() -> Iterator[AioServer]:
    """A real aiosmtpd server on loopback with AUTH PLAIN/LOGIN for
    user@domain.com / password (the seed's credentials)."""
    from aiosmtpd.controller import Controller

    received = Received()
    port = free_port()
    controller = Controller(
        _Handler(received),
        hostname="127.0.0.1",
        port=port,
        authenticator=_Authenticator(received, {"user@domain.com": "password"}),
        auth_require_tls=False,
        data_size_limit=20 * 1024 * 1024,
        ready_timeout=10,
    )
    controller.start()
    try:
        yield AioServer("127.0.0.1", port, received)
    finally:
        controller.stop()


@dataclass
class RunningProxy:
    proxy: Proxy
    host: str
    port: int
    recordings: Path
    out: io.StringIO

    def transcript(self) -> str:
        return self.out.getvalue()

    def recording_paths(self) -> list[Path]:
        return sorted(self.recordings.glob("*.jsonl"))


async def start_proxy(
    nursery: trio.Nursery, tmp_path: Path, upstream: tuple[str, int], **config: Any
) -> RunningProxy:
    rec = tmp_path / "recordings"
    rec.mkdir(mode=0o700, exist_ok=True)
    out = io.StringIO()
    cfg = ProxyConfig(listen=("127.0.0.1", 0), upstream=upstream, recordings=rec, **config)
    proxy = Proxy(cfg, Transcript(out))
    host, port = await nursery.start(proxy.serve)
    return RunningProxy(proxy, host, port, rec, out)


async def wait_for_sessions(proxy: Proxy, count: int, timeout: float = 10) -> None:
    """Wait until ``count`` sessions have ended (their recordings closed)."""
    with trio.fail_after(timeout):
        await proxy.wait_sessions_ended(count)
