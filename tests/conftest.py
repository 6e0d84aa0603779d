"""Shared fixtures: real SMTP peers on loopback, the proxy, and helpers."""

from __future__ import annotations

import contextlib
import io
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def swaks_argv(host: str, port: int, message: Path, *args: str) -> list[str]:
    """The swaks command line every peer test uses: ann@example.org to
    bob@example.net, the message from ``message``, then ``args``."""
    return [
        require_program("swaks", "swaks"),
        "--server", f"{host}:{port}",
        "--helo", "client.example",
        "--from", "ann@example.org",
        "--to", "bob@example.net",
        "--data", f"@{message}",
        "--timeout", "10",
        *args,
    ]  # fmt: skip


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

    def __call__(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> Any:
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


@contextlib.contextmanager
def run_aiosmtpd(users: dict[str, str] | None = None, **options: Any) -> Iterator[AioServer]:
    """A real aiosmtpd server on loopback, AUTH PLAIN/LOGIN in the clear for
    ``users`` (default: user@domain.com / password, the seed's credentials);
    ``options`` go to its Controller."""
    from aiosmtpd.controller import Controller

    received = Received()
    port = free_port()
    options.setdefault("data_size_limit", 20 * 1024 * 1024)
    controller = Controller(
        _Handler(received),
        hostname="127.0.0.1",
        port=port,
        authenticator=_Authenticator(received, users or {"user@domain.com": "password"}),
        auth_require_tls=False,
        ready_timeout=10,
        **options,
    )
    controller.start()
    try:
        yield AioServer("127.0.0.1", port, received)
    finally:
        controller.stop()


@pytest.fixture
def aiosmtpd_server() -> Iterator[AioServer]:
    """A real aiosmtpd server on loopback with AUTH PLAIN/LOGIN for
    user@domain.com / password (the seed's credentials)."""
    with run_aiosmtpd() as server:
        yield server


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


# -- the real command, as a subprocess ---------------------------------------

SMTPPROXY = [sys.executable, "-m", "smtpproxy"]
_BANNER = re.compile(r"listening on (\S+):(\d+)[ ,]")


def smtpproxy_env(cwd: Path) -> dict[str, str]:
    """The environment for a child smtpproxy: no colors whatever the terminal,
    and its local CA in ``cwd/.smtpproxy-home``, never in the real home."""
    return {**os.environ, "NO_COLOR": "1", "SMTPPROXY_HOME": str(cwd / ".smtpproxy-home")}


def run_smtpproxy_once(
    *args: str, cwd: Path, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run a command that is expected to exit by itself (``--help``, a usage error)."""
    return subprocess.run(
        [*SMTPPROXY, *args],
        cwd=cwd,
        env=smtpproxy_env(cwd),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
        text=True,
        timeout=timeout,
    )


@dataclass
class Finished:
    """How a child smtpproxy ended: exit code (``-N`` for signal N) and output."""

    returncode: int
    stdout: str
    stderr: str


class SmtpproxyProcess:
    """A running ``smtpproxy record`` or ``smtpproxy sink`` this test started.

    Both pipes are drained while the test waits for output, so a chatty
    transcript cannot block the child. Every wait is bounded.
    """

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.out = bytearray()
        self.err = bytearray()
        self.host = ""
        self.port = 0
        self.banner = ""

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def _wait(self, buffer: bytearray, pattern: bytes, timeout: float) -> bytes:
        """Read both pipes until a complete line of ``buffer`` contains ``pattern``."""
        assert self.proc.stdout is not None and self.proc.stderr is not None
        targets = {self.proc.stdout.fileno(): self.out, self.proc.stderr.fileno(): self.err}
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            for fd in targets:
                sel.register(fd, selectors.EVENT_READ)
            while True:
                for line in bytes(buffer).split(b"\n")[:-1]:
                    if pattern in line:
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not sel.get_map():
                    raise AssertionError(
                        f"smtpproxy never printed {pattern!r} (exit code {self.proc.poll()}); "
                        f"stdout: {bytes(self.out)!r}; stderr: {bytes(self.err)!r}"
                    )
                for key, _ in sel.select(remaining):
                    chunk = os.read(key.fd, 65536)
                    if chunk:
                        targets[key.fd].extend(chunk)
                    else:
                        sel.unregister(key.fd)

    def wait_stdout(self, pattern: str, timeout: float = 10) -> str:
        """The first transcript line containing ``pattern``, once printed."""
        return self._wait(self.out, pattern.encode(), timeout).decode()

    def wait_listening(self, timeout: float = 15) -> None:
        """Wait for the stderr banner ``... listening on HOST:PORT ...``."""
        self.banner = self._wait(self.err, b"listening on ", timeout).decode()
        match = _BANNER.search(self.banner)
        assert match is not None, self.banner
        self.host, self.port = match.group(1), int(match.group(2))

    def finish(self, sig: int = signal.SIGTERM, timeout: float = 15) -> Finished:
        """Send ``sig`` to the child (by its pid) and collect everything it printed."""
        self.proc.send_signal(sig)
        out, err = self.proc.communicate(timeout=timeout)
        return Finished(
            self.proc.returncode,
            (bytes(self.out) + out).decode("utf-8", "replace"),
            (bytes(self.err) + err).decode("utf-8", "replace"),
        )


@contextlib.contextmanager
def smtpproxy_process(
    *args: str,
    cwd: Path,
    startup_timeout: float = 15,
    preexec_fn: Any = None,
    env: dict[str, str] | None = None,
) -> Iterator[SmtpproxyProcess]:
    """Start ``python -m smtpproxy ARGS`` and wait until it listens
    (``preexec_fn`` runs in the child first: a umask, a resource limit).

    On the way out the child is killed if the test left it running, and its
    pipes are closed.
    """
    proc = subprocess.Popen(
        [*SMTPPROXY, *args],
        cwd=cwd,
        env={**smtpproxy_env(cwd), **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=preexec_fn,
    )
    try:
        child = SmtpproxyProcess(proc)
        child.wait_listening(startup_timeout)
        yield child
    finally:
        if proc.poll() is None:
            proc.kill()
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        proc.wait(timeout=15)


def read_reply(sock: socket.socket) -> bytes:
    """One complete (possibly multi-line) SMTP reply from a blocking socket
    with a timeout set; the bytes after it are not consumed."""
    data = bytearray()
    while True:
        lines = bytes(data).split(b"\r\n")
        for i, line in enumerate(lines[:-1]):
            if len(line) < 4 or line[3:4] != b"-":
                return b"\r\n".join(lines[: i + 1]) + b"\r\n"
        byte = sock.recv(1)
        if not byte:
            raise AssertionError(f"connection closed in the middle of a reply: {bytes(data)!r}")
        data += byte
