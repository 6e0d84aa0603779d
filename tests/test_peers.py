"""Interoperability: real mail clients (swaks, msmtp) through the real
``smtpproxy record`` command, to the embedded sink and to aiosmtpd.

Each test checks three things: the client's exit code, what the server
received (byte for byte, compared with the client bytes the proxy recorded),
and what the recording holds (decoded AUTH, the message_end event).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    AioServer,
    SmtpproxyProcess,
    free_port,
    require_program,
    smtpproxy_process,
    swaks_argv,
)

from smtpproxy.events import AuthResponse, AuthResult, Command, MessageData, MessageEnd, Reply, Side
from smtpproxy.recording import Recording, read_recording

USER, PASSWORD = "user@domain.com", "password"

# What a user gives the client: LF line ends, a line starting with a dot,
# 8-bit UTF-8. The clients send CRLF and dot-stuff.
MESSAGE = (
    "From: Ann <ann@example.org>\n"
    "To: bob@example.net\n"
    "Subject: peers test\n"
    "\n"
    "Hello Bob,\n"
    ".a line that starts with a dot\n"
    "8-bit: été naïve\n"
).encode()
MESSAGE_CRLF = MESSAGE.replace(b"\n", b"\r\n")


@contextlib.contextmanager
def proxy_to(tmp_path: Path, upstream: AioServer | None) -> Iterator[SmtpproxyProcess]:
    """``smtpproxy record`` to aiosmtpd, or to its embedded sink when ``upstream`` is None."""
    args = [
        "record",
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--recordings",
        str(tmp_path / "recordings"),
    ]
    if upstream is not None:
        args += ["--upstream", f"{upstream.host}:{upstream.port}"]
    with smtpproxy_process(*args, cwd=tmp_path) as proxy:
        yield proxy


def finish(proxy: SmtpproxyProcess, tmp_path: Path) -> tuple[Recording, str]:
    """Wait for the session to end, stop the proxy; the one recording and the transcript."""
    proxy.wait_stdout("== session ")
    done = proxy.finish(signal.SIGTERM)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    (path,) = (tmp_path / "recordings").glob("*.jsonl")
    rec = read_recording(path)
    assert rec.close is not None
    return rec, done.stdout


def upstream_for(request: pytest.FixtureRequest, name: str) -> AioServer | None:
    if name == "aiosmtpd":
        server: AioServer = request.getfixturevalue("aiosmtpd_server")
        return server
    return None


def swaks(proxy: SmtpproxyProcess, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    message = tmp_path / "message.eml"
    message.write_bytes(MESSAGE)
    return subprocess.run(
        swaks_argv(proxy.host, proxy.port, message, *args),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        check=False,
        text=True,
        errors="replace",
        timeout=30,
    )


def auth_args(mechanism: str) -> list[str]:
    return ["--auth", mechanism, "--auth-user", USER, "--auth-password", PASSWORD]


def recorded_content(rec: Recording) -> bytes:
    """The message content the client sent, rebuilt from the recorded wire
    bytes: the final ``.CRLF`` removed, dot-stuffing undone (RFC 5321 4.5.2)."""
    wire = b"".join(e.raw for e in rec.events() if isinstance(e, MessageData))
    assert wire.endswith(b"\r\n.\r\n"), wire[-20:]
    return re.sub(rb"(^|\r\n)\.", rb"\1", wire[: -len(b".\r\n")])


def decoded_auth(rec: Recording) -> tuple[str, dict[str, str]]:
    """The mechanism and every field the client's AUTH steps revealed."""
    mechanism = ""
    fields: dict[str, str] = {}
    for ev in rec.events():
        if isinstance(ev, (Command, AuthResponse)) and ev.auth is not None:
            mechanism = mechanism or ev.auth.mechanism
            fields.update(ev.auth.fields)
    return mechanism, fields


def check_recording(rec: Recording, server_content: bytes | None) -> bytes:
    """Checks common to every delivered message; returns the recorded content."""
    content = recorded_content(rec)
    if server_content is not None:
        assert server_content == content  # relayed byte for byte
    (end,) = [e for e in rec.events() if isinstance(e, MessageEnd)]
    assert end.complete and end.via == "DATA"
    assert end.size == len(content)
    assert end.headers["Subject"] == "peers test"
    (final,) = [e for e in rec.events() if isinstance(e, Reply) and e.ends_message]
    assert final.code == 250
    assert rec.close is not None and rec.close.totals["messages_accepted"] == 1
    return content


# -- swaks: AUTH ---------------------------------------------------------------


@pytest.mark.peer("swaks")
@pytest.mark.parametrize(
    "mechanism, upstream",
    [
        ("PLAIN", "sink"),
        ("PLAIN", "aiosmtpd"),
        ("LOGIN", "sink"),
        ("LOGIN", "aiosmtpd"),
        ("CRAM-MD5", "sink"),  # aiosmtpd does not offer CRAM-MD5
    ],
)
def test_swaks_auth(
    request: pytest.FixtureRequest, tmp_path: Path, mechanism: str, upstream: str
) -> None:
    require_program("swaks", "swaks")
    server = upstream_for(request, upstream)
    with proxy_to(tmp_path, server) as proxy:
        done = swaks(proxy, tmp_path, *auth_args(mechanism))
        assert done.returncode == 0, done.stdout + done.stderr
        rec, transcript = finish(proxy, tmp_path)

    received = None
    if server is not None:
        (msg,) = server.received.messages
        assert msg["from"] == "ann@example.org" and msg["to"] == ["bob@example.net"]
        assert server.received.auth == [(mechanism, USER)]
        received = msg["content"]
    content = check_recording(rec, received)
    # swaks sends the file with CRLF line ends and ends it with one more CRLF
    assert content in (MESSAGE_CRLF, MESSAGE_CRLF + b"\r\n")

    decoded_mechanism, fields = decoded_auth(rec)
    assert decoded_mechanism == mechanism
    assert fields["user"] == USER
    if mechanism == "CRAM-MD5":
        (challenge,) = [
            e.auth.fields["challenge"]
            for e in rec.events()
            if isinstance(e, Reply) and e.code == 334 and e.auth is not None
        ]
        expected = hmac.new(PASSWORD.encode(), challenge.encode(), hashlib.md5).hexdigest()
        assert fields["digest"] == expected
        assert "password" not in fields
        assert f'digest="{expected}"' in transcript
    else:
        assert fields["password"] == PASSWORD
        assert f'password="{PASSWORD}"' in transcript
    (result,) = [e for e in rec.events() if isinstance(e, AuthResult)]
    assert result.success and result.code == 235
    assert result.mechanism == mechanism and result.user == USER
    assert rec.close is not None
    assert rec.close.totals["auth"] == {"mechanism": mechanism, "user": USER, "success": True}
    assert rec.raw(Side.CLIENT).startswith(b"EHLO client.example\r\n")


# -- swaks: PIPELINING -----------------------------------------------------------


@pytest.mark.peer("swaks")
def test_swaks_pipeline(tmp_path: Path) -> None:
    """The sink offers PIPELINING (aiosmtpd does not): swaks sends MAIL, RCPT
    and DATA in one go, and the proxy pairs each reply with its command."""
    require_program("swaks", "swaks")
    with proxy_to(tmp_path, None) as proxy:
        done = swaks(proxy, tmp_path, "--pipeline")
        assert done.returncode == 0, done.stdout + done.stderr
        rec, _ = finish(proxy, tmp_path)

    content = check_recording(rec, None)
    assert content in (MESSAGE_CRLF, MESSAGE_CRLF + b"\r\n")
    events = list(rec.events())

    def index(kind: type, **match: object) -> int:
        return next(
            i for i, e in enumerate(events)
            if isinstance(e, kind) and all(getattr(e, k) == v for k, v in match.items())
        )  # fmt: skip

    # the whole batch was on the wire before the first of its replies
    assert index(Command, verb="DATA") < index(Reply, command="MAIL")
    replies = [(e.command, e.code) for e in events if isinstance(e, Reply)]
    assert replies[2:] == [
        ("MAIL", 250),
        ("RCPT", 250),
        ("DATA", 354),
        ("DATA", 250),
        ("QUIT", 221),
    ]
    assert not [e for e in events if getattr(e, "kind", None) == "did_not_wait"]


# -- msmtp -------------------------------------------------------------------------


@pytest.mark.peer("msmtp")
@pytest.mark.parametrize("upstream", ["sink", "aiosmtpd"])
def test_msmtp_auth_plain_from_stdin(
    request: pytest.FixtureRequest, tmp_path: Path, upstream: str
) -> None:
    exe = require_program("msmtp", "msmtp")
    server = upstream_for(request, upstream)
    with proxy_to(tmp_path, server) as proxy:
        config = tmp_path / "msmtprc"
        config.write_text(
            "defaults\n"
            "syslog off\n"
            "account proxy\n"
            f"host {proxy.host}\n"
            f"port {proxy.port}\n"
            "protocol smtp\n"
            "domain client.example\n"
            "auth plain\n"
            f"user {USER}\n"
            f"password {PASSWORD}\n"
            "tls off\n"
            "from ann@example.org\n"
            "timeout 10\n"
        )
        os.chmod(config, 0o600)  # msmtp refuses a password file others can read
        done = subprocess.run(
            [exe, "-C", str(config), "-a", "proxy", "bob@example.net"],
            input=MESSAGE,
            capture_output=True,
            check=False,
            timeout=30,
        )
        assert done.returncode == 0, (done.stdout + done.stderr).decode(errors="replace")
        rec, transcript = finish(proxy, tmp_path)

    received = None
    if server is not None:
        (msg,) = server.received.messages
        assert msg["from"] == "ann@example.org" and msg["to"] == ["bob@example.net"]
        assert server.received.auth == [("PLAIN", USER)]
        received = msg["content"]
    content = check_recording(rec, received)
    # msmtp sends CRLF and prepends the Date and Message-ID headers it finds missing
    assert content.endswith(MESSAGE_CRLF)
    added = content[: -len(MESSAGE_CRLF)]
    assert re.fullmatch(rb"(?:(?:Date|Message-ID): [^\r\n]+\r\n)*", added), added

    mechanism, fields = decoded_auth(rec)
    assert mechanism == "PLAIN"
    assert fields["user"] == USER and fields["password"] == PASSWORD
    assert f'user="{USER}" password="{PASSWORD}"' in transcript
    (result,) = [e for e in rec.events() if isinstance(e, AuthResult)]
    assert result.success and result.user == USER
    assert rec.raw(Side.CLIENT).startswith(b"EHLO client.example\r\n")
