"""End to end: working with recordings.

Real sessions are recorded through the proxy (``start_proxy``) between real
clients (smtplib, swaks, raw bytes on a trio socket) and real servers
(aiosmtpd, the embedded ``Sink``); then the real commands ``show``,
``replay``, ``diff`` and ``export`` run on them as subprocesses. The servers
run in the test (aiosmtpd in its thread, the Sink in the test's nursery), so
the commands that talk to them run in a worker thread.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import re
import shutil
import smtplib
import ssl
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from conftest import (
    SMTPPROXY,
    AioServer,
    Received,
    _Authenticator,
    _Handler,
    free_port,
    require_program,
    smtpproxy_env,
    start_proxy,
    wait_for_sessions,
)

from smtpproxy.events import AuthResponse, Command, MessageData, Reply, Side
from smtpproxy.recording import Recording, read_recording
from smtpproxy.replay import ReplayOptions, format_result, replay
from smtpproxy.server import Sink, SinkConfig
from smtpproxy.tls import CertificateAuthority, ServerContexts, client_context

USER, PASSWORD = "user@domain.com", "password"
SENDER = "ann@example.org"
BOB, CAROL = "bob@example.net", "carol@example.net"
#: bound on anything a test waits for
TIMEOUT = 20

# 8-bit UTF-8, a line that starts with a dot (dot-stuffed on the wire)
MESSAGE = (
    b"From: Ann <ann@example.org>\r\n"
    b"To: bob@example.net, carol@example.net\r\n"
    b"Subject: recordings\r\n"
    b"Message-ID: <rec-1@example.org>\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b".a line that starts with a dot\r\n"
    b"..and one with two\r\n"
    b"8-bit: \xc3\xa9t\xc3\xa9 na\xc3\xafve\r\n"
)


# -- servers -----------------------------------------------------------------


class _Rejecting(_Handler):
    """aiosmtpd handler that answers 550 to some recipients (all when ``reject`` is None)."""

    def __init__(self, received: Received, reject: set[str] | None) -> None:
        super().__init__(received)
        self.reject = reject

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if self.reject is None or address in self.reject:
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"


StartAio = Callable[..., AioServer]


@pytest.fixture
def aio() -> Iterator[StartAio]:
    """Start aiosmtpd servers (AUTH PLAIN and LOGIN for USER/PASSWORD unless
    told otherwise); ``reject=`` makes RCPT answer 550 for those addresses
    (``"all"``: every one). Stopped when the test ends."""
    from aiosmtpd.controller import Controller

    with contextlib.ExitStack() as stack:

        def start(reject: set[str] | str | None = None, **kwargs: Any) -> AioServer:
            received = Received()
            port = free_port()
            handler = (
                _Handler(received)
                if reject is None
                else _Rejecting(received, None if reject == "all" else set(reject))
            )
            kwargs.setdefault("authenticator", _Authenticator(received, {USER: PASSWORD}))
            kwargs.setdefault("auth_require_tls", False)
            controller = Controller(handler, hostname="127.0.0.1", port=port, ready_timeout=10, **kwargs)
            controller.start()
            stack.callback(controller.stop)
            return AioServer("127.0.0.1", port, received)

        yield start


async def start_sink(nursery: trio.Nursery, **config: Any) -> tuple[str, int]:
    config.setdefault("hostname", "sink.test")
    address: tuple[str, int] = await nursery.start(Sink(SinkConfig(**config)).serve, "127.0.0.1", 0)
    return address


def hostport(address: tuple[str, int]) -> str:
    return f"{address[0]}:{address[1]}"


# -- clients -----------------------------------------------------------------


class CapturingSMTP(smtplib.SMTP):
    """smtplib.SMTP that keeps every byte it sends (smtplib sends all of
    them through ``send``: commands and the dot-stuffed body)."""

    sent: bytearray

    def send(self, s: bytes | str) -> None:
        if not hasattr(self, "sent"):
            self.sent = bytearray()
        self.sent += s.encode("ascii") if isinstance(s, str) else s
        super().send(s)


def smtplib_client(
    auth: str | None = None,
    rcpts: tuple[str, ...] = (BOB, CAROL),
    message: bytes = MESSAGE,
    mail_options: tuple[str, ...] = (),
    sent: bytearray | None = None,
) -> Callable[[str, int], None]:
    """A client sending ``message`` to ``rcpts``, after AUTH ``auth`` (PLAIN,
    LOGIN without initial response, or smtplib's own choice with "login")."""

    def client(host: str, port: int) -> None:
        with CapturingSMTP(host, port, timeout=10) as c:
            c.ehlo("client.example")
            if auth == "login":
                c.login(USER, PASSWORD)
            elif auth is not None:
                c.user, c.password = USER, PASSWORD
                method = {"PLAIN": c.auth_plain, "LOGIN": c.auth_login}[auth]
                c.auth(auth, method, initial_response_ok=auth == "PLAIN")
            c.sendmail(SENDER, list(rcpts), message, mail_options=list(mail_options))
        if sent is not None:
            sent.extend(c.sent)  # QUIT included: __exit__ sent it

    return client


async def record(
    nursery: trio.Nursery,
    folder: Path,
    upstream: tuple[str, int],
    *clients: Callable[[str, int], None],
    **config: Any,
) -> list[Path]:
    """Run each client through a new proxy to ``upstream``, one after the
    other; the recordings, in order."""
    folder.mkdir(parents=True, exist_ok=True)
    proxy = await start_proxy(nursery, folder, upstream, **config)
    for n, client in enumerate(clients, 1):
        await trio.to_thread.run_sync(client, proxy.host, proxy.port)
        await wait_for_sessions(proxy.proxy, n)
    paths = proxy.recording_paths()
    assert len(paths) == len(clients)
    return paths


async def record_one(
    nursery: trio.Nursery, folder: Path, upstream: tuple[str, int], client: Callable[[str, int], None], **config: Any
) -> Path:
    (path,) = await record(nursery, folder, upstream, client, **config)
    return path


# -- the commands ------------------------------------------------------------


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return self.stdout.splitlines()


def run_cli(cwd: Path, *args: str, binary: bool = False) -> Any:
    env = smtpproxy_env(cwd)
    env.pop("SMTPPROXY_PASSWORD", None)
    done = subprocess.run(
        [*SMTPPROXY, *args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
        timeout=TIMEOUT,
    )
    stderr = done.stderr.decode("utf-8", "replace")
    assert "Traceback" not in stderr, stderr
    if binary:
        return done
    return Done(done.returncode, done.stdout.decode("utf-8", "replace"), stderr)


async def cli(cwd: Path, *args: str) -> Done:
    """``python -m smtpproxy ARGS`` in a worker thread, so servers in this
    test's event loop keep serving it."""
    done: Done = await trio.to_thread.run_sync(lambda: run_cli(cwd, *args))
    return done


def after(lines: list[str], first: str, count: int) -> list[str]:
    """The line equal to ``first`` and the ``count - 1`` lines after it."""
    assert first in lines, "\n".join(lines)
    i = lines.index(first)
    return lines[i : i + count]


# -- replay: same server, differing servers ---------------------------------


async def test_replay_against_the_recorded_server_matches_and_diffs_equal(
    nursery: trio.Nursery, aio: StartAio, tmp_path: Path
) -> None:
    a = aio()
    rec = await record_one(nursery, tmp_path / "a", a.address, smtplib_client("LOGIN"))
    saved = tmp_path / "saved"

    done = await cli(tmp_path, "replay", str(rec), "--to", hostport(a.address), "--save", str(saved))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.lines[0] == f"replay against {hostport(a.address)}"
    assert done.lines[-1] == "11 exchanges, 0 differ"
    assert "!!" not in done.stdout
    (replayed,) = saved.glob("*.jsonl")
    assert f"replay of {hostport(a.address)} saved to {replayed}" in done.stderr

    # the server got the same message twice, as the same user
    first, second = a.received.messages
    assert first["content"] == second["content"] == MESSAGE
    assert second["to"] == [BOB, CAROL]
    assert a.received.auth == [("LOGIN", USER), ("LOGIN", USER)]

    # the replay's own recording says the same as the original
    done = await cli(tmp_path, "diff", str(rec), str(replayed))
    assert (done.returncode, done.lines) == (0, ["11 exchanges, 0 differ"]), done.stdout
    done = await cli(tmp_path, "diff", "--json", str(rec), str(replayed))
    assert done.returncode == 0
    report = json.loads(done.stdout)
    assert report["a"] == str(rec) and report["b"] == str(replayed)
    assert report["exchanges"] == 11 and report["differences"] == []
    assert report["tls"] == {"a": {}, "b": {}}


async def test_replay_reports_a_rejected_recipient_at_its_exchange(
    nursery: trio.Nursery, aio: StartAio, tmp_path: Path
) -> None:
    a, b = aio(), aio(reject={CAROL})
    rec = await record_one(nursery, tmp_path / "a", a.address, smtplib_client("LOGIN"))

    done = await cli(tmp_path, "replay", str(rec), "--to", hostport(b.address))
    assert done.returncode == 1, done.stdout + done.stderr
    assert after(done.lines, f"-> RCPT TO:<{CAROL}>", 3) == [
        f"-> RCPT TO:<{CAROL}>",
        "<- 550 5.1.1 no such user",
        "!! differs: code 250 -> 550 (recorded: 250 OK)",
    ]
    assert [line for line in done.lines if line.startswith("!!")] == [
        "!! differs: code 250 -> 550 (recorded: 250 OK)"
    ]
    assert done.lines[-1] == "11 exchanges, 1 differ"
    # the rest of the session went on: the message went to the other recipient
    (msg,) = b.received.messages
    assert msg["to"] == [BOB] and msg["content"] == MESSAGE


async def test_replay_against_a_server_without_auth_login(
    nursery: trio.Nursery, aio: StartAio, tmp_path: Path
) -> None:
    a, b = aio(), aio(auth_exclude_mechanism=["LOGIN"])
    rec = await record_one(nursery, tmp_path / "a", a.address, smtplib_client("LOGIN"))

    with trio.fail_after(TIMEOUT):
        result = await replay(read_recording(rec), ReplayOptions(target=b.address, timeout=5))
    assert result.error is None
    reasons = [(s.exchange.label, s.sent, s.reasons) for s in result.steps]
    assert reasons[1] == ("EHLO client.example", True, ["AUTH mechanisms removed LOGIN"])
    assert reasons[2] == ("AUTH LOGIN", True, ["code 334 -> 504"])
    # the recorded SASL answers are not sent once the server ended AUTH
    assert [r[1:] for r in reasons[3:5]] == [
        (False, ["not sent: the target ended AUTH with 504"]),
        (False, ["not sent: the target ended AUTH with 504"]),
    ]
    assert all(not r[2] for r in reasons[5:]), reasons
    assert result.differences == 4
    assert b.received.auth == []
    assert b.received.messages[0]["content"] == MESSAGE
    lines = format_result(result)
    assert lines[-1] == "11 exchanges, 4 differ"
    assert "<- 504 5.5.4 Unrecognized authentication type" in lines


async def test_replay_against_a_smaller_size_limit_stops_before_the_body(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    big = await start_sink(nursery)
    small = await start_sink(nursery, max_size=100)
    rec = await record_one(nursery, tmp_path / "a", big, smtplib_client())

    done = await cli(tmp_path, "replay", str(rec), "--to", hostport(small))
    assert done.returncode == 1, done.stdout + done.stderr
    differs = [line for line in done.lines if line.startswith("!!")]
    assert differs == [
        "!! differs: capability SIZE 52428800 -> 100 (recorded: 250-sink.test greets client.example"
        " | 250-SIZE 52428800 | 250-PIPELINING | 250-8BITMIME | 250-ENHANCEDSTATUSCODES | 250-CHUNKING"
        " | 250-SMTPUTF8 | 250-AUTH PLAIN LOGIN CRAM-MD5 | 250 HELP)",
        "!! differs: code 250 -> 552 (recorded: 250 2.1.0 sender ok)",
        "!! differs: code 250 -> 503 (recorded: 250 2.1.5 recipient ok)",
        "!! differs: code 250 -> 503 (recorded: 250 2.1.5 recipient ok)",
        "!! differs: code 354 -> 503 (recorded: 354 End data with <CR><LF>.<CR><LF>)",
        f"!! differs: not sent: the target answered DATA with 503 (recorded: "
        f"{next(l for l in done.lines if l.startswith('(recorded: 250 2.0.0 Ok'))})",
    ]


async def test_replay_of_a_pipelined_session_without_pipelining_sends_one_by_one(
    nursery: trio.Nursery, aio: StartAio, tmp_path: Path
) -> None:
    swaks = require_program("swaks", "swaks")
    sink = await start_sink(nursery)
    a = aio()
    rec = await record_one(nursery, tmp_path / "a", sink, swaks_client(swaks, tmp_path, "--pipeline"))
    saved = tmp_path / "saved"
    with trio.fail_after(TIMEOUT):
        result = await replay(read_recording(rec), ReplayOptions(target=a.address, timeout=5, save=saved))
    ehlo = result.steps[1]
    assert ehlo.exchange.verb == "EHLO"
    assert "capability PIPELINING removed" in ehlo.reasons
    assert "capability CHUNKING removed" in ehlo.reasons
    assert a.received.messages[0]["to"] == [BOB]
    # aiosmtpd does not offer PIPELINING: each command waited for its reply
    (path,) = saved.glob("*.jsonl")
    order = [
        (type(e).__name__, e.verb if isinstance(e, Command) else e.command)
        for e in read_recording(path).events()
        if isinstance(e, (Command, Reply)) and (getattr(e, "verb", None) or getattr(e, "command", None)) in ("MAIL", "RCPT", "DATA")
    ]
    assert order[:6] == [
        ("Command", "MAIL"),
        ("Reply", "MAIL"),
        ("Command", "RCPT"),
        ("Reply", "RCPT"),
        ("Command", "DATA"),
        ("Reply", "DATA"),
    ]


# -- swaks ---------------------------------------------------------------------


def swaks_client(exe: str, tmp_path: Path, *args: str) -> Callable[[str, int], None]:
    message = tmp_path / "swaks-message.eml"
    message.write_bytes(MESSAGE.replace(b"\r\n", b"\n"))

    def client(host: str, port: int) -> None:
        done = subprocess.run(
            [
                exe,
                "--server", f"{host}:{port}",
                "--helo", "client.example",
                "--from", SENDER,
                "--to", BOB,
                "--data", f"@{message}",
                "--timeout", "10",
                *args,
            ],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
            text=True,
            errors="replace",
            timeout=TIMEOUT,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr

    return client
