"""End to end over loopback: Python's smtplib -> smtpproxy -> aiosmtpd."""

from __future__ import annotations

import os
import smtplib
import stat
from pathlib import Path

import trio
from conftest import AioServer, start_proxy, wait_for_sessions

from smtpproxy.events import AuthResponse, AuthResult, Command, MessageEnd, Reply, Side
from smtpproxy.recording import read_recording

MESSAGE = (
    b"From: Ann <ann@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: =?utf-8?q?caf=C3=A9?= test\r\n"
    b"Message-ID: <1@example.org>\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b".a line that starts with a dot\r\n"
    b"8-bit: \xc3\xa9t\xc3\xa9 na\xc3\xafve\r\n"
)


def send(host: str, port: int, mechanism: str | None, message: bytes = MESSAGE) -> None:
    with smtplib.SMTP(host, port, timeout=10) as client:
        client.ehlo("client.example")
        if mechanism == "PLAIN":
            client.user, client.password = "user@domain.com", "password"
            client.auth("PLAIN", client.auth_plain)
        elif mechanism == "LOGIN":
            client.user, client.password = "user@domain.com", "password"
            client.auth("LOGIN", client.auth_login, initial_response_ok=False)
        client.sendmail("ann@example.org", ["bob@example.net"], message)


async def test_plain_auth_message_delivered_byte_exact_and_recorded(
    aiosmtpd_server: AioServer, tmp_path: Path
) -> None:
    async with trio.open_nursery() as nursery:
        proxy = await start_proxy(nursery, tmp_path, aiosmtpd_server.address)
        await trio.to_thread.run_sync(send, proxy.host, proxy.port, "PLAIN")
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()

    (msg,) = aiosmtpd_server.received.messages
    assert msg["content"] == MESSAGE
    assert msg["from"] == "ann@example.org" and msg["to"] == ["bob@example.net"]
    assert aiosmtpd_server.received.auth == [("PLAIN", "user@domain.com")]

    (path,) = proxy.recording_paths()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    rec = read_recording(path)
    assert rec.close is not None and rec.close.totals["messages_accepted"] == 1
    events = list(rec.events())
    auth = next(e for e in events if isinstance(e, Command) and e.verb == "AUTH")
    assert auth.auth is not None
    assert (
        auth.auth.fields["user"] == "user@domain.com" and auth.auth.fields["password"] == "password"
    )
    (end,) = [e for e in events if isinstance(e, MessageEnd)]
    assert end.headers["Subject"] == "café test"
    assert end.size == len(MESSAGE)
    # the recording rebuilds what the client sent: the commands and the
    # dot-stuffed message
    client_bytes = rec.raw(Side.CLIENT)
    assert b"\r\n..a line that starts with a dot\r\n" in client_bytes
    assert client_bytes.startswith(b"ehlo client.example\r\n")
    assert rec.raw(Side.SERVER).startswith(b"220 ")

    text = proxy.transcript()
    assert 'user="user@domain.com" password="password"' in text
    assert "message via DATA" in text and "Subject: café test" in text


async def test_login_auth_challenges_decoded(aiosmtpd_server: AioServer, tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        proxy = await start_proxy(nursery, tmp_path, aiosmtpd_server.address)
        await trio.to_thread.run_sync(send, proxy.host, proxy.port, "LOGIN")
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()

    assert aiosmtpd_server.received.messages[0]["content"] == MESSAGE
    rec = read_recording(proxy.recording_paths()[0])
    events = list(rec.events())
    challenges = [e for e in events if isinstance(e, Reply) and e.code == 334]
    # aiosmtpd's LOGIN prompts are "User Name" and "Password", not "Username:"
    assert [c.auth.fields["challenge"].rstrip("\x00") for c in challenges] == [
        "User Name",
        "Password",
    ]
    answers = [e.auth.fields for e in events if isinstance(e, AuthResponse)]
    assert answers == [{"user": "user@domain.com"}, {"password": "password"}]
    (result,) = [e for e in events if isinstance(e, AuthResult)]
    assert result.success and result.user == "user@domain.com"


async def test_five_megabyte_message_and_exact_streams(
    aiosmtpd_server: AioServer, tmp_path: Path
) -> None:
    line = b"0123456789abcdefghijklmnopqrstuvwxyz" * 2 + b"\r\n"
    big = b"Subject: big\r\n\r\n" + line * (5 * 1024 * 1024 // len(line))
    async with trio.open_nursery() as nursery:
        proxy = await start_proxy(nursery, tmp_path, aiosmtpd_server.address)
        await trio.to_thread.run_sync(send, proxy.host, proxy.port, None, big)
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    assert aiosmtpd_server.received.messages[0]["content"] == big
    rec = read_recording(proxy.recording_paths()[0])
    (end,) = [e for e in rec.events() if isinstance(e, MessageEnd)]
    assert end.size == len(big)
    assert rec.raw(Side.CLIENT).count(line) == big.count(line)


async def test_pipelined_transaction_through_proxy(
    aiosmtpd_server: AioServer, tmp_path: Path
) -> None:
    """Send MAIL, RCPT, RCPT and DATA in one write, as a PIPELINING client does."""
    async with trio.open_nursery() as nursery:
        proxy = await start_proxy(nursery, tmp_path, aiosmtpd_server.address)
        stream = await trio.open_tcp_stream(proxy.host, proxy.port)
        received = bytearray()

        async def read_until(marker: bytes) -> None:
            with trio.fail_after(10):
                while marker not in received:
                    chunk = await stream.receive_some(65536)
                    assert chunk, "proxy closed early"
                    received.extend(chunk)

        await read_until(b"220 ")
        await stream.send_all(b"EHLO pipe.example\r\n")
        await read_until(b"250 ")
        received.clear()
        await stream.send_all(
            b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n"
        )
        await read_until(b"354 ")
        await stream.send_all(b"Subject: p\r\n\r\nhi\r\n.\r\nQUIT\r\n")
        await read_until(b"221 ")
        await stream.aclose()
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()

    msg = aiosmtpd_server.received.messages[0]
    assert msg["to"] == ["b@example.net", "c@example.net"]
    assert msg["content"] == b"Subject: p\r\n\r\nhi\r\n"
    rec = read_recording(proxy.recording_paths()[0])
    replies = [(e.command, e.code) for e in rec.events() if isinstance(e, Reply)]
    assert replies[2:] == [
        ("MAIL", 250),
        ("RCPT", 250),
        ("RCPT", 250),
        ("DATA", 354),
        ("DATA", 250),
        ("QUIT", 221),
    ]
