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
    swaks_argv,
    wait_for_sessions,
)

from smtpproxy.events import AuthResponse, Command, Reply, Side
from smtpproxy.recording import read_recording
from smtpproxy.replay import ReplayOptions, replay
from smtpproxy.server import Sink, SinkConfig
from smtpproxy.tls import CertificateAuthority, ServerContexts, client_context
from smtpproxy.views import format_result

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
            controller = Controller(
                handler, hostname="127.0.0.1", port=port, ready_timeout=10, **kwargs
            )
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

    def send(self, s: Any) -> None:
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


def swaks_client(tmp_path: Path, *args: str) -> Callable[[str, int], None]:
    message = tmp_path / "swaks-message.eml"
    message.write_bytes(MESSAGE.replace(b"\r\n", b"\n"))

    def client(host: str, port: int) -> None:
        done = subprocess.run(
            swaks_argv(host, port, message, *args),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            check=False,
            text=True,
            errors="replace",
            timeout=TIMEOUT,
        )
        assert done.returncode == 0, done.stdout + done.stderr

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
    nursery: trio.Nursery,
    folder: Path,
    upstream: tuple[str, int],
    client: Callable[[str, int], None],
    **config: Any,
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


def command_times(path: Path) -> dict[str, float]:
    """When each command verb was (last) sent, from a recording."""
    rec = read_recording(path)
    return {e.event.verb: e.t for e in rec.entries if isinstance(e.event, Command)}


def after(lines: list[str], first: str, count: int) -> list[str]:
    """The line equal to ``first`` and the ``count - 1`` lines after it."""
    assert first in lines, "\n".join(lines)
    i = lines.index(first)
    return lines[i : i + count]


def table(lines: list[str]) -> list[list[str]]:
    """Columns of a table printed with two or more spaces between them."""
    return [re.split(r"\s{2,}", line.rstrip()) for line in lines]


# -- replay: same server, differing servers ---------------------------------


async def test_replay_against_the_recorded_server_matches_and_diffs_equal(
    nursery: trio.Nursery, aio: StartAio, tmp_path: Path
) -> None:
    a = aio()
    rec = await record_one(nursery, tmp_path / "a", a.address, smtplib_client("LOGIN"))
    saved = tmp_path / "saved"

    done = await cli(
        tmp_path, "replay", str(rec), "--to", hostport(a.address), "--save", str(saved)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.lines[0] == f"replay against {hostport(a.address)}"
    assert done.lines[-1] == "11 exchanges, 0 differ"
    assert "!!" not in done.stdout
    (replayed,) = saved.glob("*.jsonl")
    assert f"replay of {hostport(a.address)} saved to {replayed}" in done.stderr
    close = read_recording(replayed).close
    assert (
        close is not None and close.totals["differences"] == 0
    )  # written: the events cannot give it
    assert (
        close.totals["messages_accepted"] == 1 and close.totals["auth"]["user"] == USER
    )  # derived

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
    assert after(done.lines, f"-> rcpt TO:<{CAROL}>", 3) == [
        f"-> rcpt TO:<{CAROL}>",
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
    assert reasons[1] == ("ehlo client.example", True, ["AUTH mechanisms removed LOGIN"])
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
    assert after(done.lines, "-> ehlo client.example", 3)[2].startswith(
        "!! differs: capability SIZE 52428800 -> 100 (recorded: 250-sink.test greets client.example | "
    )
    assert after(done.lines, f"-> mail FROM:<{SENDER}> size={len(MESSAGE)}", 3)[1:] == [
        "<- 552 5.3.4 message size exceeds fixed limit",
        "!! differs: code 250 -> 552 (recorded: 250 2.1.0 sender ok)",
    ]
    assert after(done.lines, f"-> rcpt TO:<{CAROL}>", 3)[1:] == [
        "<- 503 5.5.1 need MAIL before RCPT",
        "!! differs: code 250 -> 503 (recorded: 250 2.1.5 recipient ok)",
    ]
    assert after(done.lines, "-> data", 3)[1:] == [
        "<- 503 5.5.1 need MAIL and RCPT before DATA",
        "!! differs: code 354 -> 503 (recorded: 354 End data with <CR><LF>.<CR><LF>)",
    ]
    # the body is not sent after a refused DATA; the session ends with QUIT
    body = after(done.lines, f"   (not sent) (message body, {len(MESSAGE)} octets)", 6)
    assert body[1] == "== the target answered DATA with 503"
    assert re.fullmatch(
        r"!! differs: not sent: the target answered DATA with 503 \(recorded: 250 2\.0\.0 Ok: queued as \w+\)",
        body[2],
    )
    assert body[3:] == ["-> QUIT", "<- 221 2.0.0 bye", "8 exchanges, 6 differ"]


@pytest.mark.peer("swaks")
async def test_replay_of_a_pipelined_session_without_pipelining_sends_one_by_one(
    nursery: trio.Nursery, aio: StartAio, tmp_path: Path
) -> None:
    require_program("swaks", "swaks")
    sink = await start_sink(nursery)
    a = aio()
    rec = await record_one(nursery, tmp_path / "a", sink, swaks_client(tmp_path, "--pipeline"))
    saved = tmp_path / "saved"
    saved.mkdir()
    with trio.fail_after(TIMEOUT):
        result = await replay(
            read_recording(rec), ReplayOptions(target=a.address, timeout=5, save=saved)
        )
    # aiosmtpd differs from the Sink the session was recorded against: no
    # PIPELINING, CHUNKING or enhanced codes, another SIZE, no CRAM-MD5
    assert [(st.exchange.label, st.reasons) for st in result.steps if st.differs] == [
        (
            "EHLO client.example",
            [
                "capability SIZE 52428800 -> 33554432",
                "capability PIPELINING removed",
                "capability ENHANCEDSTATUSCODES removed",
                "capability CHUNKING removed",
                "AUTH mechanisms removed CRAM-MD5",
            ],
        ),
        (f"MAIL FROM:<{SENDER}>", ["enhanced code 2.1.0 -> -"]),
        (f"RCPT TO:<{BOB}>", ["enhanced code 2.1.5 -> -"]),
        ("QUIT", ["enhanced code 2.0.0 -> -"]),
    ]
    assert a.received.messages[0]["to"] == [BOB]
    # recorded as one write; aiosmtpd does not offer PIPELINING, so the
    # replay sent each command after the reply to the one before
    t = command_times(rec)
    assert t["MAIL"] == t["RCPT"] == t["DATA"]
    (path,) = saved.glob("*.jsonl")
    steps = [
        f"-> {e.verb}" if isinstance(e, Command) else f"<- {e.command}"
        for e in read_recording(path).events()
        if isinstance(e, (Command, Reply))
    ]
    i = steps.index("-> MAIL")
    assert steps[i : i + 6] == ["-> MAIL", "<- MAIL", "-> RCPT", "<- RCPT", "-> DATA", "<- DATA"]


# -- replay: TLS and AUTH ----------------------------------------------------


@pytest.fixture(scope="module")
def upstream_ca() -> trustme.CA:
    return trustme.CA()


async def record_starttls_session(
    nursery: trio.Nursery, aio: StartAio, upstream_ca: trustme.CA, tmp_path: Path
) -> tuple[AioServer, Path, Path]:
    """smtplib -> proxy -> aiosmtpd with STARTTLS (certificate from a trustme
    CA) and AUTH required inside TLS: the server, the recording, the CA's PEM."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    upstream_ca.issue_cert("localhost", "127.0.0.1").configure_cert(server_ctx)
    a = aio(tls_context=server_ctx, require_starttls=True, auth_require_tls=True)
    proxy_ca = CertificateAuthority.load_or_create(tmp_path / "home")
    up = client_context()
    upstream_ca.configure_trust(up)
    tls = {
        "server_contexts": ServerContexts(["localhost", "127.0.0.1"], ca=proxy_ca),
        "upstream_context": up,
        "upstream_sni": "localhost",
    }

    def client(host: str, port: int) -> None:
        with smtplib.SMTP("localhost", port, timeout=10) as c:
            c.ehlo("tls.example")
            c.starttls(context=ssl.create_default_context(cafile=str(proxy_ca.cert_path)))
            c.ehlo("tls.example")
            c.login(USER, PASSWORD)
            c.sendmail(SENDER, [BOB], MESSAGE)

    rec = await record_one(nursery, tmp_path / "a", a.address, client, **tls)
    ca_pem = tmp_path / "upstream-ca.pem"
    upstream_ca.cert_pem.write_to_path(str(ca_pem))
    return a, rec, ca_pem


async def test_replay_of_a_starttls_and_auth_session_with_the_target_ca(
    nursery: trio.Nursery, aio: StartAio, upstream_ca: trustme.CA, tmp_path: Path
) -> None:
    a, rec, ca_pem = await record_starttls_session(nursery, aio, upstream_ca, tmp_path)
    saved = tmp_path / "saved"
    done = await cli(
        tmp_path,
        "replay",
        str(rec),
        "--to",
        hostport(a.address),
        "--ca",
        str(ca_pem),
        "--save",
        str(saved),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (
        "-> STARTTLS" in done.lines
        and "-> AUTH PLAIN AHVzZXJAZG9tYWluLmNvbQBwYXNzd29yZA==" in done.lines
    )
    assert done.lines[-1] == "10 exchanges, 0 differ"
    assert a.received.auth == [("PLAIN", USER), ("PLAIN", USER)]
    assert [m["content"] for m in a.received.messages] == [MESSAGE, MESSAGE]
    (replayed,) = saved.glob("*.jsonl")
    done = await cli(tmp_path, "diff", str(rec), str(replayed))
    assert done.returncode == 0, done.stdout
    assert done.lines[-1] == "10 exchanges, 0 differ"

    # without --ca the system store does not know the test CA: the replay
    # stops at the handshake and says so, nothing is sent in clear
    done = await cli(tmp_path, "replay", str(rec), "--to", hostport(a.address))
    assert done.returncode == 1, done.stdout + done.stderr
    stop = [line for line in done.lines if line.startswith("!! stopped:")]
    assert len(stop) == 1 and "TLS handshake with the target failed" in stop[0]
    assert "CERTIFICATE_VERIFY_FAILED" in stop[0]
    assert "-> AUTH" not in done.stdout
    assert len(a.received.messages) == 2


async def test_diff_of_a_tls_recording_and_its_replay_shows_no_tls_change(
    nursery: trio.Nursery, aio: StartAio, upstream_ca: trustme.CA, tmp_path: Path
) -> None:
    a, rec, ca_pem = await record_starttls_session(nursery, aio, upstream_ca, tmp_path)
    saved = tmp_path / "saved"
    done = await cli(
        tmp_path,
        "replay",
        str(rec),
        "--to",
        hostport(a.address),
        "--ca",
        str(ca_pem),
        "--save",
        str(saved),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (replayed,) = saved.glob("*.jsonl")
    done = await cli(tmp_path, "diff", str(rec), str(replayed))
    assert done.returncode == 0
    assert done.lines == ["10 exchanges, 0 differ"]


def cram_md5_answers(path: Path) -> list[tuple[str, str, str]]:
    """(challenge, user, digest) of each CRAM-MD5 exchange in a recording."""
    out = []
    challenge = None
    for ev in read_recording(path).events():
        if isinstance(ev, Reply) and ev.code == 334 and ev.auth is not None:
            challenge = ev.auth.fields["challenge"]
        elif isinstance(ev, AuthResponse) and ev.auth is not None and challenge is not None:
            out.append((challenge, ev.auth.fields["user"], ev.auth.fields["digest"]))
            challenge = None
    return out


async def test_replay_answers_a_new_cram_md5_challenge_with_the_password(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    sink = await start_sink(nursery)
    rec = await record_one(nursery, tmp_path / "a", sink, smtplib_client("login"))
    ((recorded_challenge, user, recorded_digest),) = cram_md5_answers(rec)
    assert user == USER
    saved = tmp_path / "saved"

    done = await cli(
        tmp_path,
        "replay",
        str(rec),
        "--to",
        hostport(sink),
        "--password",
        PASSWORD,
        "--save",
        str(saved),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.lines[-1] == "10 exchanges, 0 differ"
    (answer,) = [line for line in done.lines if line.endswith("(new credentials)")]
    assert answer.startswith("-> ")
    (replayed,) = saved.glob("*.jsonl")
    ((challenge, user, digest),) = cram_md5_answers(replayed)
    # a new challenge, answered with HMAC-MD5 keyed with the password (RFC 2195)
    assert challenge != recorded_challenge and digest != recorded_digest
    assert user == USER
    assert digest == hmac.new(PASSWORD.encode(), challenge.encode(), hashlib.md5).hexdigest()


async def test_replay_of_cram_md5_without_a_password_says_how_to_give_it(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    sink = await start_sink(nursery)
    rec = await record_one(nursery, tmp_path / "a", sink, smtplib_client("login"))
    done = await cli(tmp_path, "replay", str(rec), "--to", hostport(sink))
    assert done.returncode != 0
    stop = [line for line in done.lines if line.startswith("!! stopped:")]
    assert len(stop) == 1, done.stdout
    assert stop[0].startswith("!! stopped: AUTH CRAM-MD5 ") and "--password" in stop[0]
    assert "-> mail" not in done.stdout


async def test_replay_stopped_inside_auth_cancels_the_exchange(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    sink = await start_sink(nursery)
    rec = await record_one(nursery, tmp_path / "a", sink, smtplib_client("login"))
    saved = tmp_path / "saved"
    done = await cli(tmp_path, "replay", str(rec), "--to", hostport(sink), "--save", str(saved))
    assert done.returncode != 0
    (replayed,) = saved.glob("*.jsonl")
    answers = [e.text for e in read_recording(replayed).events() if isinstance(e, AuthResponse)]
    assert answers == ["*"]


# -- replay: divergence, pipelining, several targets ----------------------------


async def test_replay_does_not_send_the_body_when_the_target_refuses_data(
    nursery: trio.Nursery, aio: StartAio, tmp_path: Path
) -> None:
    a, b = aio(), aio(reject="all")
    rec = await record_one(nursery, tmp_path / "a", a.address, smtplib_client("PLAIN"))
    saved = tmp_path / "saved"
    saved.mkdir()
    with trio.fail_after(TIMEOUT):
        result = await replay(
            read_recording(rec), ReplayOptions(target=b.address, timeout=5, save=saved)
        )
    assert result.error is None
    steps = [
        (s.exchange.label, s.sent, s.reply.code if s.reply else None, s.reasons)
        for s in result.steps
    ]
    assert steps[4:] == [
        (f"rcpt TO:<{BOB}>", True, 550, ["code 250 -> 550"]),
        (f"rcpt TO:<{CAROL}>", True, 550, ["code 250 -> 550"]),
        ("data", True, 503, ["code 354 -> 503"]),
        (
            f"(message body, {len(MESSAGE)} octets)",
            False,
            None,
            ["not sent: the target answered DATA with 503"],
        ),
        ("QUIT", True, 221, []),
    ]
    assert b.received.messages == []
    # the body never reached the target; it only ever got commands
    (path,) = saved.glob("*.jsonl")
    replayed = read_recording(path)
    assert b"Subject: recordings" not in replayed.raw(Side.CLIENT)
    assert replayed.raw(Side.CLIENT).endswith(b"data\r\nQUIT\r\n")
    assert replayed.close is not None and replayed.close.reason == "replay finished"
    lines = format_result(result)
    assert f"   (not sent) (message body, {len(MESSAGE)} octets)" in lines
    assert lines[-1] == "9 exchanges, 4 differ"


def refused_data_client(host: str, port: int) -> None:
    """MAIL, a recipient the server refuses, DATA anyway (refused), QUIT."""
    with smtplib.SMTP(host, port, timeout=10) as c:
        c.ehlo("client.example")
        assert c.docmd(f"MAIL FROM:<{SENDER}>")[0] == 250
        assert c.docmd(f"RCPT TO:<{BOB}>")[0] == 550
        assert c.docmd("DATA")[0] == 503


async def test_replay_ends_a_data_the_recording_had_refused_with_an_empty_message(
    nursery: trio.Nursery, aio: StartAio, tmp_path: Path
) -> None:
    a, b = aio(), aio(reject="all")
    rec = await record_one(nursery, tmp_path / "b", b.address, refused_data_client)
    with trio.fail_after(TIMEOUT):
        result = await replay(read_recording(rec), ReplayOptions(target=a.address, timeout=5))
    steps = [(s.exchange.kind, s.reply.code if s.reply else None, s.note) for s in result.steps]
    assert steps[3:] == [
        ("command", 250, None),  # RCPT
        ("command", 354, None),  # DATA
        ("body", 250, "empty message ends the DATA the target accepted"),
        ("command", 221, None),  # QUIT
    ]
    (msg,) = a.received.messages
    assert msg["content"] == b"" and msg["to"] == [BOB]


@pytest.mark.peer("swaks")
async def test_replay_sends_a_pipelined_group_in_one_write(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    require_program("swaks", "swaks")
    sink = await start_sink(nursery)
    rec = await record_one(nursery, tmp_path / "a", sink, swaks_client(tmp_path, "--pipeline"))
    saved = tmp_path / "saved"

    done = await cli(tmp_path, "replay", str(rec), "--to", hostport(sink), "--save", str(saved))
    assert done.returncode == 0, done.stdout + done.stderr
    (replayed,) = saved.glob("*.jsonl")

    # recorded as one group, replayed as one group: one write, one time
    for path in (rec, replayed):
        t = command_times(path)
        assert t["MAIL"] == t["RCPT"] == t["DATA"], (path, t)
        assert t["EHLO"] < t["MAIL"]
    events = list(read_recording(replayed).events())
    first_reply = next(
        i for i, e in enumerate(events) if isinstance(e, Reply) and e.command == "MAIL"
    )
    last_command = next(
        i for i, e in enumerate(events) if isinstance(e, Command) and e.verb == "DATA"
    )
    assert last_command < first_reply


async def test_replay_against_two_targets_prints_one_table(
    nursery: trio.Nursery, aio: StartAio, tmp_path: Path
) -> None:
    a, b = aio(), aio(reject={CAROL})
    rec = await record_one(nursery, tmp_path / "a", a.address, smtplib_client("PLAIN"))
    ta, tb = hostport(a.address), hostport(b.address)

    done = await cli(tmp_path, "replay", str(rec), "--to", ta, "--to", tb)
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.lines
    assert table(lines[:1]) == [["exchange", "recorded", ta, tb]]
    assert sum(1 for line in lines if line.startswith("exchange ")) == 1
    assert not any(line.startswith("replay against") for line in lines)
    rows = {row[0]: row[1:] for row in table(lines[1:-2])}
    assert rows[f"rcpt TO:<{CAROL}>"] == ["250", "250", "*550 5.1.1"]
    assert rows[f"rcpt TO:<{BOB}>"] == ["250", "250", "250"]
    assert rows["(greeting)"] == ["220", "220", "220"]
    assert sum("*" in cell for row in rows.values() for cell in row) == 1
    assert lines[-2:] == [f"{ta}: 9 exchanges, 0 differ", f"{tb}: 9 exchanges, 1 differ"]
    assert len(a.received.messages) == 2 and b.received.messages[0]["to"] == [BOB]


async def test_replay_table_keeps_rows_aligned_when_one_target_adds_a_step(
    nursery: trio.Nursery, aio: StartAio, tmp_path: Path
) -> None:
    a, b = aio(), aio(reject="all")
    rec = await record_one(nursery, tmp_path / "b", b.address, refused_data_client)
    ta, tb = hostport(a.address), hostport(b.address)
    done = await cli(tmp_path, "replay", str(rec), "--to", ta, "--to", tb)
    assert done.returncode == 1, done.stdout + done.stderr
    rows = {r[0]: r[1:] for r in table(done.lines[1:-2])}
    # b did exactly what the recording did: same replies on the same rows
    assert rows["DATA"] == ["503", "*354", "503"]
    assert rows["QUIT"] == ["221", "221", "221"], done.stdout
    assert "(stopped)" not in done.stdout


# -- diff ----------------------------------------------------------------------


async def test_diff_of_sessions_against_two_servers(
    nursery: trio.Nursery, aio: StartAio, tmp_path: Path
) -> None:
    a, b = aio(), aio(reject={CAROL})
    rec_a = await record_one(nursery, tmp_path / "a", a.address, smtplib_client("PLAIN"))
    rec_b = await record_one(nursery, tmp_path / "b", b.address, smtplib_client("PLAIN"))

    done = await cli(tmp_path, "diff", str(rec_a), str(rec_b))
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.lines == [
        f"--- {rec_a}",
        f"+++ {rec_b}",
        f"@@ exchange 5: rcpt TO:<{CAROL}> @@ code 250 -> 550",
        "-250 OK",
        "+550 5.1.1 no such user",
        "9 exchanges, 1 differ",
    ]
    done = await cli(tmp_path, "diff", "--json", str(rec_a), str(rec_b))
    assert done.returncode == 1
    report = json.loads(done.stdout)
    assert report["exchanges"] == 9
    assert report["differences"] == [
        {
            "exchange": 5,
            "step": f"rcpt TO:<{CAROL}>",
            "a": {"code": 250, "enhanced": None, "lines": ["OK"]},
            "b": {"code": 550, "enhanced": "5.1.1", "lines": ["5.1.1 no such user"]},
            "a_client": f"rcpt TO:<{CAROL}>",
            "b_client": f"rcpt TO:<{CAROL}>",
            "reasons": ["code 250 -> 550"],
        }
    ]


# -- show ----------------------------------------------------------------------


async def test_show_a_folder_one_row_per_session_sorted_by_start(
    nursery: trio.Nursery, aio: StartAio, tmp_path: Path
) -> None:
    a = aio()
    paths = await record(
        nursery,
        tmp_path / "a",
        a.address,
        smtplib_client("PLAIN"),
        smtplib_client("LOGIN"),
        smtplib_client(),
    )
    recs = [read_recording(p) for p in paths]
    # file names that sort the other way round: the rows still follow the start
    folder = tmp_path / "shuffled"
    folder.mkdir()
    for name, path in zip("cba", paths):
        shutil.copy(path, folder / f"{name}.jsonl")

    done = await cli(tmp_path, "show", str(folder))
    assert done.returncode == 0, done.stderr
    head, *rows = table(done.lines)
    assert head == [
        "start", "session", "client", "upstream", "TLS", "AUTH", "accepted", "rejected", "ended", "seconds"
    ]  # fmt: skip
    assert len(rows) == 3
    assert [r[:2] for r in rows] == [[r.header.start, r.header.session] for r in recs]
    assert [r[0] for r in rows] == sorted(r[0] for r in rows)
    assert [r[5] for r in rows] == [f"PLAIN {USER} ok", f"LOGIN {USER} ok", "-"]
    assert all(
        r[3] == hostport(a.address) and r[4] == "-" and r[6:8] == ["1", "0"] for r in rows
    ), rows


async def test_show_a_file_and_its_raw_bytes_and_json(
    nursery: trio.Nursery, aio: StartAio, tmp_path: Path
) -> None:
    a = aio()
    sent = bytearray()
    rec = await record_one(nursery, tmp_path / "a", a.address, smtplib_client("PLAIN", sent=sent))
    session = read_recording(rec).header.session

    done = await cli(tmp_path, "show", str(rec))
    assert done.returncode == 0, done.stderr
    assert done.lines[0].startswith(f"session {session} started ")
    assert done.lines[0].endswith(f"upstream {hostport(a.address)}")
    # AUTH PLAIN decoded beside the raw line
    plain = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode()).decode()
    assert (
        f'[{session}] -> AUTH PLAIN {plain}   [user="{USER}" password="{PASSWORD}"]' in done.lines
    )
    assert f'[{session}] == AUTH PLAIN user "{USER}" succeeded (235)' in done.lines
    assert (
        f"[{session}] == message via DATA: {len(MESSAGE)} octets, From: Ann <{SENDER}>, "
        f"To: {BOB}, {CAROL}, Subject: recordings"
    ) in done.lines
    assert done.lines[-1].startswith(f"[{session}] == closed by ")
    summary = done.lines[-1]

    # --raw: exactly the bytes smtplib sent, the message dot-stuffed
    raw = await trio.to_thread.run_sync(
        lambda: run_cli(tmp_path, "show", "--raw", "--side", "client", str(rec), binary=True)
    )
    assert raw.returncode == 0
    assert raw.stdout == bytes(sent)
    (msg,) = a.received.messages
    stuffed = re.sub(rb"(^|\r\n)\.", rb"\1..", msg["content"])
    assert f"rcpt TO:<{CAROL}>\r\ndata\r\n".encode() + stuffed + b".\r\nQUIT\r\n" in raw.stdout
    server = await trio.to_thread.run_sync(
        lambda: run_cli(tmp_path, "show", "--raw", "--side", "server", str(rec), binary=True)
    )
    assert server.returncode == 0
    assert server.stdout.startswith(b"220 ") and server.stdout.endswith(b"221 Bye\r\n")
    up, down = len(sent), len(server.stdout)
    assert summary.endswith(
        f": 1 accepted, 0 rejected, {up} B up, {down} B down, AUTH PLAIN {USER} ok"
    )

    # the file holds what each side sent, read by read ([t, "c"|"s", bytes]),
    # and the close line; every event is derived from that when it is read
    in_file = [json.loads(line) for line in rec.read_text("utf-8").splitlines()[1:]]
    inputs = [x for x in in_file if isinstance(x, list)]
    assert len(inputs) == len(in_file) - 1 and in_file[-1]["type"] == "close"
    assert "".join(x[2] for x in inputs if x[1] == "c").encode() == bytes(sent)
    assert "".join(x[2] for x in inputs if x[1] == "s").encode() == server.stdout
    assert [x[0] for x in inputs] == sorted(x[0] for x in inputs)

    # --json: one event per line, each one JSON object, every field written
    done = await cli(tmp_path, "show", "--json", str(rec))
    assert done.returncode == 0
    events = [json.loads(line) for line in done.lines]
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["reply", "command", "reply"] and kinds[-2:] == ["command", "reply"]
    assert {"anomaly", "auth_result", "data", "message_end"} <= set(kinds)
    (end,) = [e for e in events if e["type"] == "message_end"]
    assert end["size"] == len(MESSAGE) and end["headers"]["Subject"] == "recordings"
    assert [e["command"] for e in events if e["type"] == "reply"][:2] == ["<greeting>", "EHLO"]
    assert all(isinstance(e["t"], float) and e["side"] in ("client", "server") for e in events)
    assert "".join(e.get("raw", "") for e in events if e["side"] == "client").encode() == bytes(
        sent
    )


# -- export ----------------------------------------------------------------------


async def test_export_of_an_8bitmime_message(
    nursery: trio.Nursery, aio: StartAio, tmp_path: Path
) -> None:
    b = aio(reject={CAROL})
    rec = await record_one(
        nursery, tmp_path / "a", b.address, smtplib_client(mail_options=("BODY=8BITMIME",))
    )
    out = tmp_path / "out"
    done = await cli(tmp_path, "export", str(rec), "--eml", str(out))
    assert done.returncode == 0, done.stderr
    session = read_recording(rec).header.session
    eml = out / f"{session}-001.eml"
    assert done.lines == [str(eml)]
    assert done.stderr.strip() == f"1 message(s) exported to {out}/"

    assert b" BODY=8BITMIME\r\n" in read_recording(rec).raw(Side.CLIENT)
    (msg,) = b.received.messages
    assert eml.read_bytes() == MESSAGE == msg["content"]
    envelope = json.loads((out / f"{session}-001.json").read_text("utf-8"))
    assert envelope["session"] == session and envelope["message"] == 1
    assert envelope["mail_from"] == SENDER
    assert envelope["rcpt_to"] == [
        {"address": BOB, "code": 250, "enhanced": None, "text": "OK"},
        {"address": CAROL, "code": 550, "enhanced": "5.1.1", "text": "5.1.1 no such user"},
    ]
    assert (
        envelope["via"] == "DATA"
        and envelope["size"] == len(MESSAGE)
        and envelope["complete"] is True
    )
    assert envelope["outcome"]["code"] == 250 and envelope["outcome"]["accepted"] is True
    assert sorted(p.name for p in out.iterdir()) == [f"{session}-001.eml", f"{session}-001.json"]
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in out.iterdir())


async def read_reply_from(stream: trio.SocketStream, buffer: bytearray) -> bytes:
    """One complete reply from the stream (bytes after it stay in ``buffer``)."""
    with trio.fail_after(TIMEOUT):
        while True:
            lines = bytes(buffer).split(b"\r\n")
            for i, line in enumerate(lines[:-1]):
                if len(line) < 4 or line[3:4] != b"-":
                    reply = b"\r\n".join(lines[: i + 1]) + b"\r\n"
                    del buffer[: len(reply)]
                    return reply
            data = await stream.receive_some(65536)
            assert data, f"closed in the middle of a reply: {bytes(buffer)!r}"
            buffer += data


async def test_export_of_a_bdat_message(nursery: trio.Nursery, tmp_path: Path) -> None:
    sink = await start_sink(nursery)
    folder = tmp_path / "a"
    folder.mkdir()
    proxy = await start_proxy(nursery, folder, sink)
    # BDAT content is not dot-stuffed: lines starting with a dot, a lone
    # "." line, 8-bit octets and a chunk boundary inside a line all stay
    chunks = [
        b"Subject: chunks\r\n\r\n.one\r\n.\r\n8-bit: \xc3\xa9t",
        b"\xc3\xa9\r\nlast line\r\n",
    ]
    stream = await trio.open_tcp_stream(proxy.host, proxy.port)
    buffer = bytearray()
    replies = [await read_reply_from(stream, buffer)]
    for command in (
        b"EHLO bdat.example\r\n",
        f"MAIL FROM:<{SENDER}>\r\n".encode(),
        f"RCPT TO:<{BOB}>\r\n".encode(),
    ):
        await stream.send_all(command)
        replies.append(await read_reply_from(stream, buffer))
    assert b"CHUNKING" in replies[1]
    await stream.send_all(f"BDAT {len(chunks[0])}\r\n".encode() + chunks[0])
    replies.append(await read_reply_from(stream, buffer))
    await stream.send_all(f"BDAT {len(chunks[1])} LAST\r\n".encode() + chunks[1])
    replies.append(await read_reply_from(stream, buffer))
    await stream.send_all(b"QUIT\r\n")
    replies.append(await read_reply_from(stream, buffer))
    await stream.aclose()
    assert [r[:3] for r in replies] == [b"220", b"250", b"250", b"250", b"250", b"250", b"221"]
    await wait_for_sessions(proxy.proxy, 1)
    (rec,) = proxy.recording_paths()

    out = tmp_path / "out"
    done = await cli(tmp_path, "export", str(rec), "--eml", str(out))
    assert done.returncode == 0, done.stderr
    (eml,) = out.glob("*.eml")
    assert eml.read_bytes() == b"".join(chunks)
    envelope = json.loads(eml.with_suffix(".json").read_text("utf-8"))
    assert envelope["via"] == "BDAT" and envelope["complete"] is True
    assert envelope["size"] == len(b"".join(chunks))
    assert envelope["mail_from"] == SENDER
    assert envelope["rcpt_to"] == [
        {"address": BOB, "code": 250, "enhanced": "2.1.5", "text": "2.1.5 recipient ok"}
    ]
    assert envelope["outcome"]["code"] == 250 and envelope["outcome"]["accepted"] is True
    assert envelope["outcome"]["text"].startswith("2.0.0 Ok: queued as ")


# -- broken recordings -------------------------------------------------------------


@pytest.fixture(scope="module")
def good_recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real session (smtplib, AUTH PLAIN, to the Sink), recorded once for the module."""
    folder = tmp_path_factory.mktemp("good")

    async def main() -> Path:
        async with trio.open_nursery() as nursery:
            sink = await start_sink(nursery)
            path = await record_one(nursery, folder, sink, smtplib_client("PLAIN"))
            nursery.cancel_scope.cancel()
        return path

    return trio.run(main)


def _insert(line: str, at: int = 3) -> Callable[[list[str]], list[str]]:
    return lambda lines: lines[:at] + [line] + lines[at:]


def _header(**change: Any) -> Callable[[list[str]], list[str]]:
    def apply(lines: list[str]) -> list[str]:
        header = json.loads(lines[0])
        header.update(change)
        return [json.dumps(header)] + lines[1:]

    return apply


def _newer(lines: list[str]) -> list[str]:
    header = json.loads(lines[0])
    header["version"] = 3
    return [json.dumps(header)] + lines[1:]


#: name -> (how to damage the lines of a good recording, the line to name, what to say)
DAMAGES: dict[str, tuple[Callable[[list[str]], list[str]], int | None, str]] = {
    "not JSON": (_insert('{"t": 0.1, "type": '), 4, "not valid JSON"),
    "not an object": (_insert('"EHLO x"'), 4, "not valid JSON (not a JSON object or input line)"),
    "no header": (lambda lines: lines[1:], 1, "not an smtpproxy recording"),
    "newer version": (_newer, 1, "recording format version 3 is not supported"),
    "unknown input": (
        _insert('[0.1, "x", "EHLO x\\r\\n"]'),
        4,
        "not a valid input line (unknown input line 'x')",
    ),
    "input without bytes": (
        _insert('[0.1, "c"]'),
        4,
        "not a valid input line (a 'c' input line carries",
    ),
    "input with bad base64": (_insert('[0.1, "c64", "!!"]'), 4, "not a valid input line"),
    "input with a bad time": (
        _insert('["soon", "c", "x"]'),
        4,
        "not a valid input line (t must be a number)",
    ),
    "unknown event": (
        _insert('{"t": 0.1, "type": "bogus", "side": "client"}'),
        4,
        "not a valid event",
    ),
    "bad base64": (
        _insert(
            '{"t": 0.1, "type": "command", "side": "client", "verb": "NOOP", "arg": "", "raw_b64": "!!"}'
        ),
        4,
        "not a valid event",
    ),
    "empty file": (lambda lines: [], 1, "empty file"),
    "nested too deep": (
        _insert("[" * 100_000 + "]" * 100_000),
        4,
        "not valid JSON (nested too deeply)",
    ),
    "lone surrogate in a note": (
        _insert('{"t": 0.1, "type": "note", "side": "server", "kind": "x", "text": "a\\ud800"}'),
        4,
        "not valid JSON (a string holds a lone surrogate",
    ),
    "lone surrogate in the session": (
        _header(session="\ud800"),
        1,
        "not valid JSON (a string holds a lone",
    ),
    "session that is a path": (_header(session="../../victim/x.sh"), 1, "damaged header: session"),
    "session that is absolute": (_header(session="/tmp/x"), 1, "damaged header: session"),
    "close with a bad time": (
        lambda lines: (
            lines[:-1] + ['{"t": "soon", "type": "close", "by": "client", "reason": "x"}']
        ),
        None,
        "not a valid close line",
    ),
    "capabilities not an object": (
        _insert(
            '{"t": 0.1, "type": "reply", "side": "server", "code": 250, "lines": ["x"], '
            '"command": "EHLO", "capabilities": ["SIZE"], "raw": "250 x\\r\\n"}'
        ),
        4,
        "not a valid event (capabilities must be an object of strings)",
    ),
}

COMMANDS: dict[str, Callable[[Path, Path, Path], list[str]]] = {
    "show": lambda bad, good, tmp: ["show", str(bad)],
    "show --json": lambda bad, good, tmp: ["show", "--json", str(bad)],
    "show --raw": lambda bad, good, tmp: ["show", "--raw", "--side", "client", str(bad)],
    "show folder": lambda bad, good, tmp: ["show", str(bad.parent)],
    "replay": lambda bad, good, tmp: [
        "replay",
        str(bad),
        "--to",
        f"127.0.0.1:{free_port()}",
        "--timeout",
        "5",
    ],
    "diff good bad": lambda bad, good, tmp: ["diff", str(good), str(bad)],
    "diff bad good": lambda bad, good, tmp: ["diff", str(bad), str(good)],
    "export": lambda bad, good, tmp: ["export", str(bad), "--eml", str(tmp / "out")],
}


def _cases() -> Iterator[Any]:
    for damage in DAMAGES:
        for command in COMMANDS:
            yield pytest.param(damage, command, id=f"{damage}-{command}")


def damage(good: Path, folder: Path, name: str) -> tuple[Path, int, str]:
    """A copy of ``good`` damaged as DAMAGES[name] says, alone in ``folder``."""
    change, line, says = DAMAGES[name]
    lines = good.read_text("utf-8").splitlines()
    new = change(lines)
    folder.mkdir()
    bad = folder / "20200101T000000000Z-badbadba.jsonl"
    bad.write_text("".join(x + "\n" for x in new), "utf-8")
    return bad, line if line is not None else len(new), says


@pytest.mark.parametrize(("name", "command"), list(_cases()))
def test_a_broken_recording_is_named_with_its_line(
    good_recording: Path, tmp_path: Path, name: str, command: str
) -> None:
    from click.testing import CliRunner

    from smtpproxy.cli import main

    bad, line, says = damage(good_recording, tmp_path / "broken", name)
    result = CliRunner().invoke(main, COMMANDS[command](bad, good_recording, tmp_path))
    assert result.exit_code == 2, (result.exception, result.output)
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    assert result.stderr.startswith(f"Error: {bad}:{line}: {says}"), result.stderr
    assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_broken_recordings_through_the_real_command(good_recording: Path, tmp_path: Path) -> None:
    """The same, as a user runs it: one line on stderr, exit 2, no traceback."""
    bad, line, says = damage(good_recording, tmp_path / "broken", "not JSON")
    for command, args in COMMANDS.items():
        done = run_cli(tmp_path, *args(bad, good_recording, tmp_path))
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert done.stderr.startswith(f"Error: {bad}:{line}: {says} ("), (command, done.stderr)
        assert len(done.stderr.splitlines()) == 1, (command, done.stderr)


def test_a_recording_cut_short_is_read(good_recording: Path, tmp_path: Path) -> None:
    """The proxy killed mid-write: the last line is cut; show, diff and export
    still work, and show says what happened."""
    data = good_recording.read_bytes()
    lines = data.splitlines(keepends=True)
    assert json.loads(lines[-1])["type"] == "close"
    # cut in the middle of the close line
    cut_close = tmp_path / "cut-close.jsonl"
    cut_close.write_bytes(b"".join(lines[:-1]) + lines[-1][:15])
    # the close line lost and the last event cut in the middle
    cut_event = tmp_path / "cut-event.jsonl"
    cut_event.write_bytes(b"".join(lines[:-2]) + lines[-2][: len(lines[-2]) // 2])

    done = run_cli(tmp_path, "show", str(cut_close))
    assert done.returncode == 0, done.stderr
    assert (
        "no close line: the proxy was stopped mid-session; the last line was cut short: 1 accepted"
        in done.lines[-1]
    )
    assert "<- 221 " in done.lines[-2]
    done = run_cli(tmp_path, "show", str(cut_event))
    assert done.returncode == 0, done.stderr
    assert "the last line was cut short" in done.lines[-1]
    assert "-> QUIT" in done.lines[-2]  # the 221 was the line cut short

    done = run_cli(tmp_path, "diff", str(good_recording), str(cut_close))
    assert (done.returncode, done.lines[-1]) == (0, "9 exchanges, 0 differ"), done.stdout
    done = run_cli(tmp_path, "export", str(cut_event), "--eml", str(tmp_path / "out"))
    assert done.returncode == 0, done.stderr
    (eml,) = (tmp_path / "out").glob("*.eml")
    assert eml.read_bytes() == MESSAGE
    done = run_cli(tmp_path, "show", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert [r[8] for r in table(done.lines)[1:]] == ["(cut short)", "(cut short)"]
