"""``smtpproxy mock`` with real peers (issue 15): a session recorded from a
real server (Postfix, OpenSMTPD, which the tests start themselves,
tests/servers.py) through ``smtpproxy record``, then played by ``smtpproxy
mock`` to real clients (swaks, msmtp, smtplib) that run the same command
line again. What the clients print and how they exit must be what they
printed and how they exited against the real server.

``record`` and ``mock`` run as processes, the way a user runs them; every
wait is bounded (the clients' own timeouts, the processes' pipes read with
a deadline). Everything talks on 127.0.0.1 only.
"""

from __future__ import annotations

import os
import smtplib
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import require_program, run_smtpproxy_once, smtpproxy_process, swaks_argv
from servers import (
    PASSWORD,
    REJECTED,
    USER,
    OpenSmtpd,
    Postfix,
    opensmtpd_server,
    postfix_server,
    server_ca,
)
from test_mock import Mock, report
from test_servers import swaks_lines

from smtpproxy.events import Command, Reply, Side
from smtpproxy.recording import read_recording

__all__ = ["opensmtpd_server", "postfix_server", "server_ca"]  # fixtures

#: bound on one client run (the clients' own timeouts are 10 s)
CLIENT_TIMEOUT = 30

Client = Callable[[int], Any]


def record_through(
    tmp_path: Path, upstream: tuple[str, int], clients: list[Client], *options: str
) -> tuple[list[Path], list[Any]]:
    """Run each of ``clients`` through its own ``smtpproxy record --upstream``
    (all in ``tmp_path``: the same local CA), waiting for its session to be
    recorded; the recordings and what each client returned, in order."""
    folder = tmp_path / "original"
    argv = ["record", "--listen", "127.0.0.1:0", "--recordings", str(folder)]
    argv += ["--upstream", f"{upstream[0]}:{upstream[1]}", "--workers", "1", *options]
    results: list[Any] = []
    for client in clients:
        with smtpproxy_process(*argv, cwd=tmp_path) as proxy:
            results.append(client(proxy.port))
            proxy.wait_stdout(" closed by ", timeout=CLIENT_TIMEOUT)  # its recording is closed
            finished = proxy.finish()
        assert finished.returncode == 0, finished.stderr
    files = sorted(folder.glob("*.jsonl"))
    assert len(files) == len(clients)
    return files, results


def local_ca(tmp_path: Path) -> Path:
    """The local CA ``record`` and ``mock`` show clients (conftest's
    SMTPPROXY_HOME for a child run in ``tmp_path``)."""
    return tmp_path / ".smtpproxy-home" / "smtpproxy-ca.pem"


# -- 1. Postfix, AUTH LOGIN, a refused and an accepted recipient, to swaks ---------

SWAKS_MESSAGE = (
    b"From: ann@example.org\r\nTo: bob@example.net\r\nSubject: mock of Postfix\r\n"
    b"Date: Mon, 30 Nov 2026 12:00:00 +0000\r\nMessage-ID: <mock-peers-1@example.org>\r\n"
    b"\r\nHello Bob\r\n"
)


def swaks(tmp_path: Path, *extra: str) -> Client:
    """The same swaks command line each time: AUTH LOGIN, a recipient the
    server refuses, then one it accepts; then ``extra``."""
    message = tmp_path / "message.eml"
    message.write_bytes(SWAKS_MESSAGE)

    def run(port: int) -> subprocess.CompletedProcess[bytes]:
        argv = swaks_argv("127.0.0.1", port, message)
        argv += ["--to", f"{REJECTED},bob@example.net", "-a", "LOGIN"]
        argv += ["--auth-user", USER, "--auth-password", PASSWORD, *extra]
        return subprocess.run(argv, capture_output=True, timeout=CLIENT_TIMEOUT, check=False)

    return run


@pytest.mark.peer("postfix")
@pytest.mark.peer("swaks")
def test_swaks_hears_postfix_again(tmp_path: Path, postfix_server: Postfix) -> None:
    client = swaks(tmp_path)
    (original,), (real,) = record_through(tmp_path, postfix_server.address, [client])
    real_sent, real_heard = swaks_lines(real.stdout + real.stderr)
    # against Postfix: AUTH LOGIN accepted, the refused recipient, one message queued
    assert b"235 2.7.0 Authentication successful" in real_heard
    assert f"550 5.1.1 <{REJECTED}>: Recipient address rejected: no such user here".encode() in (
        real_heard
    )
    assert any(line.startswith(b"250 2.0.0 Ok: queued as ") for line in real_heard)
    assert real.returncode == 0, real.stdout  # swaks goes on when one of two recipients is refused

    mock = Mock(tmp_path, [original], 1)
    done, (again,) = mock.run(client)
    assert done.returncode == 0, done.stderr
    assert report(done)["departures"] == 0
    # swaks printed the same lines, both ways, byte for byte, and exits the same
    assert swaks_lines(again.stdout + again.stderr) == (real_sent, real_heard)
    assert again.returncode == real.returncode

    (mocked,) = mock.recordings()
    assert read_recording(mocked).raw(Side.SERVER) == read_recording(original).raw(Side.SERVER)
    diff = run_smtpproxy_once("diff", str(original), str(mocked), cwd=tmp_path)
    assert diff.returncode == 0, diff.stdout + diff.stderr


# -- 2. OpenSMTPD, STARTTLS and AUTH PLAIN, to msmtp and smtplib --------------------

#: complete, so that msmtp adds no header of its own (Date, Message-ID, From)
#: and sends the same bytes each run
MSMTP_MESSAGE = (
    b"From: ann@example.org\nTo: bob@example.net\nSubject: mock of OpenSMTPD\n"
    b"Date: Mon, 30 Nov 2026 12:00:00 +0000\nMessage-ID: <mock-peers-2@example.org>\n"
    b"\nHello Bob, from msmtp\n"
)
SMTPLIB_MESSAGE = (
    "From: ann@example.org\r\nTo: bob@example.net\r\nSubject: mock of OpenSMTPD\r\n"
    "\r\nHello Bob, from smtplib\r\n"
)


def msmtp(tmp_path: Path, cafile: Path) -> Client:
    """msmtp with STARTTLS (trusting ``cafile``) and AUTH PLAIN."""
    exe = require_program("msmtp", "msmtp")
    config = tmp_path / "msmtprc"

    def run(port: int) -> subprocess.CompletedProcess[bytes]:
        lines = [
            "defaults", "syslog off", "account mock", "host 127.0.0.1", f"port {port}",
            "protocol smtp", "domain client.example", "tls on", "tls_starttls on",
            f"tls_trust_file {cafile}", "auth plain", f"user {USER}", f"password {PASSWORD}",
            "from ann@example.org", "timeout 10", "",
        ]  # fmt: skip
        config.write_text("\n".join(lines))
        os.chmod(config, 0o600)  # msmtp refuses a password file others can read
        return subprocess.run(
            [exe, "-C", str(config), "-a", "mock", "bob@example.net"],
            input=MSMTP_MESSAGE,
            capture_output=True,
            timeout=CLIENT_TIMEOUT,
            check=False,
        )

    return run


def smtplib_tls(cafile: Path) -> Client:
    """smtplib with STARTTLS (trusting ``cafile``) and AUTH (PLAIN: the first
    of its choices that OpenSMTPD offers)."""

    def run(port: int) -> Any:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=10) as c:
            c.starttls(context=ssl.create_default_context(cafile=str(cafile)))
            c.login(USER, PASSWORD)
            return c.sendmail("ann@example.org", ["bob@example.net"], SMTPLIB_MESSAGE)

    return run


def auth_mechanisms(path: Path) -> list[str | None]:
    rec = read_recording(path)
    return [e.auth.mechanism for e in rec.events() if isinstance(e, Command) and e.verb == "AUTH"]


@pytest.mark.peer("opensmtpd")
@pytest.mark.peer("msmtp")
def test_msmtp_and_smtplib_hear_opensmtpd_again(
    tmp_path: Path, opensmtpd_server: OpenSmtpd
) -> None:
    cafile = local_ca(tmp_path)
    clients = [msmtp(tmp_path, cafile), smtplib_tls(cafile)]
    originals, (real_msmtp, real_smtplib) = record_through(
        tmp_path,
        opensmtpd_server.address,
        clients,
        "--upstream-ca",
        str(opensmtpd_server.tls.ca_pem),
    )
    assert real_msmtp.returncode == 0, real_msmtp.stderr
    assert real_smtplib == {}
    for path in originals:
        rec = read_recording(path)
        verbs = [e.verb for e in rec.events() if isinstance(e, Command)]
        assert verbs[:2] == ["EHLO", "STARTTLS"], verbs
        assert auth_mechanisms(path) == ["PLAIN"]
        assert [e.code for e in rec.events() if isinstance(e, Reply) and e.ends_message] == [250]

    mock = Mock(tmp_path, originals, 2)
    done, (again_msmtp, again_smtplib) = mock.run(*clients)
    assert again_msmtp.returncode == 0, again_msmtp.stderr
    assert again_smtplib == {}
    assert done.returncode == 0, done.stderr
    data = report(done)
    assert data["departures"] == 0
    assert [s["departures"] for s in data["sessions"]] == [[], []]
    # each client heard its recorded server, byte for byte
    for original, mocked in zip(originals, mock.recordings(), strict=True):
        assert read_recording(mocked).raw(Side.SERVER) == read_recording(original).raw(Side.SERVER)


# -- departures a real client makes -------------------------------------------------


@pytest.mark.peer("postfix")
@pytest.mark.peer("swaks")
def test_a_client_that_skips_starttls_departs_there_only(
    tmp_path: Path, postfix_server: Postfix
) -> None:
    """swaks recorded with STARTTLS, then run without: the one departure is
    the STARTTLS and the EHLO after it. The commands that followed matched
    their recorded steps (a step outside a transaction is placed by its
    count in the session, TLS or not: docs/mock.md) and were answered as
    recorded, so they are not reported as never reached."""
    tls = ["--tls", "--tls-verify", "--tls-ca-path", str(local_ca(tmp_path))]
    (original,), (real,) = record_through(
        tmp_path,
        postfix_server.address,
        [swaks(tmp_path, *tls)],
        "--upstream-ca",
        str(postfix_server.tls.ca_pem),
    )
    assert real.returncode == 0, real.stdout
    done, (again,) = Mock(tmp_path, [original], 1).run(swaks(tmp_path))
    assert again.returncode == 0, again.stdout
    _, heard = swaks_lines(again.stdout + again.stderr)
    assert any(line.startswith(b"250 2.0.0 Ok: queued as ") for line in heard)
    assert done.returncode == 1
    (session,) = report(done)["sessions"]
    (departure,) = session["departures"]
    assert departure["step"] == "STARTTLS #1"
    assert departure["why"] == (
        "this client stopped before the recorded client's 'STARTTLS' and 1 more command(s)"
    )
