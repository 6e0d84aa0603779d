"""The Python API (``import smtpproxy``) with real clients: smtplib from plain
synchronous code (no trio in sight), and from trio code under pytest-trio.
What a test relies on: the address works as soon as the ``with`` is entered,
the sessions and messages are what crossed the wire, faults change what the
client hears, and nothing is left behind (threads, descriptors, folders)."""

from __future__ import annotations

import os
import smtplib
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from conftest import run_aiosmtpd

import smtpproxy

TIMEOUT = 10
MESSAGE = (
    "From: ann@example.org\r\nTo: bob@example.net\r\nSubject: reset your password\r\n\r\n"
    "Click here.\r\n"
)


@pytest.fixture(autouse=True)
def ca_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The local CA in the test's own folder, never in the real home."""
    home = tmp_path / "ca-home"
    monkeypatch.setenv("SMTPPROXY_HOME", str(home))
    yield home


def send(
    address: tuple[str, int], rcpts: list[str], cafile: Path | None = None
) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP(*address, local_hostname="app.example", timeout=TIMEOUT) as client:
        if cafile is not None:
            client.starttls(context=ssl.create_default_context(cafile=str(cafile)))
        client.login("ann", "s3cret")
        return client.sendmail("ann@example.org", rcpts, MESSAGE)


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def our_threads() -> list[str]:
    """Threads other than the main one and trio's cache of idle workers
    (``trio.to_thread`` keeps them a while: not ours)."""
    return [
        t.name
        for t in threading.enumerate()
        if t is not threading.main_thread() and not t.name.startswith("Trio thread")
    ]


def test_sink_from_plain_sync_code() -> None:
    threads, fds = our_threads(), open_descriptors()
    with smtpproxy.sink() as server:
        assert server.port > 0  # ready: the real port of port 0
        refused = send(server.address, ["bob@example.net", "carol@example.net"])
        (session,) = server.wait_for_sessions(1, timeout=TIMEOUT)
        folder = server.recordings
    assert refused == {}
    # what crossed the wire
    assert [c.verb for c in session.commands] == [
        "EHLO",
        "AUTH",
        "MAIL",
        "RCPT",
        "RCPT",
        "DATA",
        "QUIT",
    ]
    assert session.replies[0].code == 220
    assert session.auth is not None and session.auth.user == "ann" and session.auth.success
    (message,) = session.messages
    assert message.sender == "ann@example.org"
    assert message.recipients == ("bob@example.net", "carol@example.net")
    assert message.via == "DATA" and message.accepted
    assert message.message["Subject"] == "reset your password"
    assert message.message.get_content() == "Click here.\r\n"  # as received
    assert session.closed_by in ("client", "server")  # after QUIT either may close first
    assert "-> mail FROM:<ann@example.org>" in session.transcript()
    # nothing left behind: the loop's thread, its sockets, the temporary folder
    assert our_threads() == threads
    assert open_descriptors() == fds
    assert not folder.exists()
    assert server.sessions == [session]  # still readable after the exit


def test_faults_from_the_start_and_at_run_time() -> None:
    with smtpproxy.sink(faults=["rcpt#2: 452 4.5.3 Too many recipients"]) as server:
        first = send(server.address, ["a@example.net", "b@example.net", "c@example.net"])
        server.faults.set("mail: 451 4.3.0 Try later, times=1")
        with pytest.raises(smtplib.SMTPSenderRefused) as refused:
            send(server.address, ["a@example.net"])
        second = send(server.address, ["a@example.net"])
        server.faults.clear()
        assert server.faults.rules == []
        sessions = server.wait_for_sessions(3, timeout=TIMEOUT)
    assert first == {"b@example.net": (452, b"4.5.3 Too many recipients")}
    assert refused.value.smtp_code == 451
    assert second == {}
    assert [len(s.messages) for s in sessions] == [1, 0, 1]
    assert sessions[0].messages[0].recipients == ("a@example.net", "c@example.net")


def test_a_bad_rule_is_refused_with_its_mistake() -> None:
    with pytest.raises(smtpproxy.FaultSyntaxError, match="rcpt#two"):
        smtpproxy.sink(faults=["rcpt#two: 452 4.5.3 x"])
    with smtpproxy.sink() as server, pytest.raises(ValueError, match="remove"):
        server.faults.add("rcpt: remove PIPELINING")


def test_waiting_too_long_says_so() -> None:
    with smtpproxy.sink() as server, pytest.raises(TimeoutError, match="1 session"):
        server.wait_for_sessions(1, timeout=0.2)


def test_tls_legs_with_the_servers_ca(tmp_path: Path) -> None:
    with smtpproxy.sink(recordings=tmp_path / "kept") as server:
        assert server.ca is not None
        send(server.address, ["bob@example.net"], cafile=server.ca)
        (session,) = server.wait_for_sessions(1, timeout=TIMEOUT)
    assert session.tls is not None
    assert session.tls.client is not None and session.tls.upstream is not None
    assert session.tls.version.startswith("TLSv1.")
    # a folder the caller named is kept, private
    assert oct((tmp_path / "kept").stat().st_mode & 0o777) == "0o700"
    assert smtpproxy.read(session.path).messages[0].recipients == ("bob@example.net",)


def test_proxy_in_front_of_a_real_server() -> None:
    users = {"ann": "s3cret"}
    with run_aiosmtpd(users) as upstream, smtpproxy.proxy(upstream.address) as server:
        send(server.address, ["bob@example.net"])
        (message,) = server.wait_for_messages(1, timeout=TIMEOUT)
        received = upstream.received.messages
    assert message.recipients == ("bob@example.net",)
    assert len(received) == 1 and received[0]["content"] == message.content


def test_mock_of_a_recording(tmp_path: Path) -> None:
    with smtpproxy.sink(recordings=tmp_path / "original") as original:
        send(original.address, ["bob@example.net"])
        (recorded,) = original.wait_for_sessions(1, timeout=TIMEOUT)
    with smtpproxy.mock(recorded.path) as server:
        send(server.address, ["bob@example.net"])
        send(server.address, ["mallory@example.net"])
        sessions = server.wait_for_sessions(2, timeout=TIMEOUT)
        departures = server.departures
    assert [s.replies for s in sessions][0] == recorded.replies
    assert [len(d.departures) for d in departures] == [0, 1]
    assert departures[1].departures[0].step == "RCPT #1 (message 1)"


async def test_async_api_in_trio() -> None:
    threads, fds = our_threads(), open_descriptors()
    async with smtpproxy.sink(faults=["rcpt#2: 452 4.5.3 Too many recipients"]) as server:
        refused = await trio.to_thread.run_sync(
            send, server.address, ["bob@example.net", "carol@example.net"]
        )
        (message,) = await server.wait_for_messages(1, timeout=TIMEOUT)
        with pytest.raises(TimeoutError):
            await server.wait_for_sessions(2, timeout=0.2)
    assert refused == {"carol@example.net": (452, b"4.5.3 Too many recipients")}
    assert message.recipients == ("bob@example.net",)
    assert our_threads() == threads
    assert open_descriptors() == fds


def test_a_server_starts_once() -> None:
    starter = smtpproxy.sink()
    with starter:
        pass
    with pytest.raises(RuntimeError, match="once"), starter:
        pass


def test_a_server_that_cannot_start_leaves_no_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # TMPDIR read again
    not_a_recording = tmp_path / "missing.jsonl"
    with pytest.raises(smtpproxy.RecordingError), smtpproxy.mock(not_a_recording):
        pass
    assert list((tmp_path / "tmp").iterdir()) == []
