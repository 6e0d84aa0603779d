"""``--redact`` against clients and servers chosen to leak (issue 12, items
3 and 4): AUTH lines with other whitespace, base64 answers read as commands
whose replies quote them, a server that echoes the refused argument. For
every case no field anywhere in the recording, in ``show --json`` or in the
transcript holds the secret or its base64, in any letter case."""

from __future__ import annotations

import base64
import contextlib
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import (
    AioServer,
    RunningProxy,
    run_aiosmtpd,
    start_proxy,
    wait_for_sessions,
)
from rawpeers import Peer, RawUpstream, connect
from test_recordings import run_cli

from smtpproxy.events import AuthResult, Command, Reply
from smtpproxy.recording import read_recording
from smtpproxy.server import Sink

USER, PASSWORD = "user@domain.com", "password"
SECRET = "Tr0ub4dor&3-Secret"


def aiosmtpd(**options: Any) -> contextlib.AbstractContextManager[AioServer]:
    """A real aiosmtpd taking AUTH for USER with SECRET."""
    return run_aiosmtpd({USER: SECRET}, **options)


def _b64(data: str | bytes) -> bytes:
    return base64.b64encode(data.encode() if isinstance(data, str) else data)


PLAIN = _b64(b"\0" + USER.encode() + b"\0" + SECRET.encode())


async def _ehlo(peer: Peer) -> None:
    assert (await peer.reply()).startswith(b"220")
    await peer.send(b"EHLO client.example\r\n")
    assert (await peer.reply()).startswith(b"250")


def _forms(secret: bytes) -> list[bytes]:
    """The secret and its base64, lower-cased (compared with lower-cased text)."""
    return [secret.lower(), _b64(secret).lower()]


def _assert_not_recorded(tmp_path: Path, proxy: RunningProxy, secrets: list[bytes]) -> str:
    """No secret in the recording, ``show --json`` or the live transcript;
    what ``show --json`` printed."""
    (path,) = proxy.recording_paths()
    shown = run_cli(tmp_path, "show", "--json", str(path))
    _assert_nowhere(
        {
            "recording": path.read_bytes(),
            "show --json": shown.stdout.encode(),
            "transcript": proxy.transcript().encode(),
        },
        secrets,
    )
    return shown.stdout


def _assert_nowhere(blobs: dict[str, bytes], secrets: list[bytes]) -> None:
    for where, blob in blobs.items():
        low = blob.lower()
        for secret in secrets:
            for form in _forms(secret):
                assert form not in low, f"{form!r} (any case) in the {where}"


#: name -> (the client's AUTH bytes, what aiosmtpd answers first)
WHITESPACE = {
    "tab before the response": (b"AUTH PLAIN\t" + PLAIN + b"\r\n", b"235 "),
    "vertical tab before the response": (b"AUTH PLAIN\x0b" + PLAIN + b"\r\n", b"235 "),
    "two spaces": (b"AUTH  PLAIN  " + PLAIN + b"\r\n", b"235 "),
    "trailing tab": (b"AUTH PLAIN " + PLAIN + b"\t\r\n", b"235 "),
}


@pytest.mark.parametrize("case", list(WHITESPACE))
async def test_auth_with_other_whitespace_is_read_as_servers_read_it_and_redacted(
    tmp_path: Path, case: str
) -> None:
    line, answer = WHITESPACE[case]
    with aiosmtpd() as server:
        async with trio.open_nursery() as nursery:
            proxy = await start_proxy(nursery, tmp_path, server.address, redact=True)
            peer = await connect(proxy.host, proxy.port)
            await _ehlo(peer)
            await peer.send(line)
            assert (await peer.reply()).startswith(answer)
            await peer.send(b"QUIT\r\n")
            await peer.reply()
            await peer.close()
            await wait_for_sessions(proxy.proxy, 1)
            nursery.cancel_scope.cancel()
        assert server.received.auth == [("PLAIN", USER)]  # the server did authenticate
    (path,) = proxy.recording_paths()
    shown = run_cli(tmp_path, "show", "--json", str(path))
    transcript = run_cli(tmp_path, "show", str(path))
    raw = run_cli(tmp_path, "show", "--raw", "--side", "client", str(path), binary=True)
    _assert_nowhere(
        {
            "recording": path.read_bytes(),
            "show --json": shown.stdout.encode(),
            "show": transcript.stdout.encode(),
            "show --raw": raw.stdout,
            "live transcript": proxy.transcript().encode(),
        },
        [SECRET.encode(), PLAIN],
    )
    # the observer read the AUTH as the server did: the user and the outcome
    from smtpproxy.recording import read_recording

    rec = read_recording(path)
    (result,) = [e for e in rec.events() if isinstance(e, AuthResult)]
    assert (result.mechanism, result.user, result.success) == ("PLAIN", USER, True)
    (auth,) = [e for e in rec.events() if isinstance(e, Command) and e.verb == "AUTH"]
    assert auth.raw == b"AUTH <redacted>\r\n" and "redacted" in auth.flags
    assert 'AUTH PLAIN user "user@domain.com" succeeded (235)' in transcript.stdout


async def test_base64_lines_after_a_refused_auth_do_not_leak_through_the_replies(
    tmp_path: Path,
) -> None:
    """The server refuses AUTH LOGIN (504); the client pipelined its two
    answers, which the server reads as commands and answers 500. The replies
    name the command they answer: that must not be the answer upper-cased."""
    with aiosmtpd(auth_exclude_mechanism=["LOGIN"]) as server:
        async with trio.open_nursery() as nursery:
            proxy = await start_proxy(nursery, tmp_path, server.address, redact=True)
            peer = await connect(proxy.host, proxy.port)
            await _ehlo(peer)
            await peer.send(b"AUTH LOGIN\r\n" + _b64(USER) + b"\r\n" + _b64(SECRET) + b"\r\n")
            replies = [await peer.reply() for _ in range(3)]
            assert [r[:4] for r in replies] == [b"504 ", b"500 ", b"500 "], replies
            await peer.send(b"QUIT\r\n")
            await peer.reply()
            await peer.close()
            await wait_for_sessions(proxy.proxy, 1)
            nursery.cancel_scope.cancel()
    _assert_not_recorded(tmp_path, proxy, [SECRET.encode()])
    path = proxy.recording_paths()[0]
    assert b'"command":"<REDACTED>"' in path.read_bytes()
    # aiosmtpd's 500 quotes the line it did not know (upper-cased): that
    # quote is redacted, the rest of the reply kept
    refused = [e for e in read_recording(path).events() if isinstance(e, Reply) and e.code == 500]
    assert [e.raw for e in refused] == [b'500 Error: command "<redacted>" not recognized\r\n'] * 2


async def test_a_server_that_echoes_the_refused_argument_does_not_leak_it(tmp_path: Path) -> None:
    """OpenSMTPD answers an AUTH it cannot read with
    ``504 5.7.4 ... AUTH method "<the whole argument>" not supported``
    (docs/interop.md); a raw server here says the same."""
    upstream = RawUpstream()
    line = b"AUTH PLAIN\x0b" + PLAIN + b"\r\n"
    async with trio.open_nursery() as nursery:
        await upstream.start(nursery)
        proxy = await start_proxy(nursery, tmp_path, upstream.address, redact=True)
        client = await connect(proxy.host, proxy.port)
        server = await upstream.accept()
        await server.send(b"220 raw ESMTP\r\n")
        await client.send(b"EHLO client.example\r\n")
        await server.until(b"\r\n")
        await server.send(b"250-raw\r\n250 AUTH PLAIN\r\n")
        await _ehlo_reply(client)
        await client.send(line)
        await server.until(b"\r\n")
        echo = (
            b'504 5.7.4 Security features not supported: AUTH method "PLAIN\x0b'
            + PLAIN
            + b'" not supported\r\n'
        )
        await server.send(echo)
        assert await client.reply() == echo  # relayed unchanged: only the recording is redacted
        await client.close()
        await server.close()
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    shown = _assert_not_recorded(tmp_path, proxy, [SECRET.encode(), PLAIN])
    assert "Security features not supported: AUTH method" in shown


async def _ehlo_reply(peer: Peer) -> None:
    assert (await peer.reply()).startswith(b"220")
    assert (await peer.reply()).startswith(b"250")


async def test_a_server_that_quotes_a_prefix_of_the_line_does_not_leak_it(tmp_path: Path) -> None:
    """The embedded sink answers a line it does not know with its first 20
    octets, upper-cased: for a long password's base64 that is a prefix of
    the secret. No run of 8 of its characters may stay, in any case."""
    secret = _b64(b"correct-horse-battery-staple-" + SECRET.encode())
    async with trio.open_nursery() as nursery:
        sink = await nursery.start(Sink().serve)
        proxy = await start_proxy(nursery, tmp_path, sink, redact=True)
        peer = await connect(proxy.host, proxy.port)
        await _ehlo(peer)
        await peer.send(b"MAIL FROM:<a@example.org>\r\n")
        assert (await peer.reply()).startswith(b"250")
        # AUTH inside a transaction is refused (503); the answers become commands
        await peer.send(b"AUTH LOGIN\r\n" + _b64(USER) + b"\r\n" + secret + b"\r\n")
        replies = [await peer.reply() for _ in range(3)]
        assert replies[2].startswith(b"500 5.5.2 command not recognized: " + secret[:20].upper())
        await peer.send(b"QUIT\r\n")
        await peer.reply()
        await peer.close()
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    (path,) = proxy.recording_paths()
    shown = run_cli(tmp_path, "show", "--json", str(path)).stdout.encode()
    for where, blob in (("recording", path.read_bytes()), ("show --json", shown)):
        low = blob.lower()
        for i in range(len(secret) - 8):
            assert secret[i : i + 8].lower() not in low, (where, secret[i : i + 8])
