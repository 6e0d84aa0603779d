"""``dot: REPLY`` keeps the client's session going (issue 14): the proxy
closes the upstream connection before the final dot, so the server drops the
message, and dials it again in the client's state (greeting, EHLO, STARTTLS,
AUTH said again). Real peers over loopback: smtplib and aiosmtpd (with
STARTTLS and AUTH PLAIN), and raw peers where a server must do what aiosmtpd
does not (CRAM-MD5). Every wait is bounded."""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from conftest import RunningProxy, run_aiosmtpd, start_proxy, wait_for_sessions
from rawpeers import TIMEOUT, RawUpstream, connect, only_recording

from smtpproxy.events import Command, MessageEnd, Note, NoteKind, Reply
from smtpproxy.faults import FaultPlan, parse_rule
from smtpproxy.recording import Recording
from smtpproxy.tls import CertificateAuthority, ServerContexts, client_context

USER, PASSWORD = "user@domain.com", "password"
RULE = "message#1 dot: 451 4.3.0 Try again later"
FIRST = b"From: ann@example.org\r\nSubject: first\r\n\r\nwithheld\r\n"
SECOND = b"From: ann@example.org\r\nSubject: second\r\n\r\ndelivered\r\n"


def plan(*rules: str) -> FaultPlan:
    return FaultPlan([parse_rule(r) for r in rules])


def notes(rec: Recording, kind: str) -> list[Note]:
    return [e for e in rec.events() if isinstance(e, Note) and e.kind == kind]


async def through_proxy(
    tmp_path: Path, upstream: tuple[str, int], client: Callable[[int], Any], **config: Any
) -> tuple[Any, Recording, RunningProxy]:
    """``client(port)`` in a thread through a proxy with ``RULE``."""
    async with trio.open_nursery() as nursery:
        proxy = await start_proxy(nursery, tmp_path, upstream, faults=plan(RULE), **config)
        with trio.fail_after(30):
            result = await trio.to_thread.run_sync(lambda: client(proxy.port))
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    return result, only_recording(proxy.recordings), proxy


def send_two(smtp: smtplib.SMTP) -> list[Any]:
    """Two messages in one session: what each sendmail gave or raised."""
    out: list[Any] = []
    for body in (FIRST, SECOND):
        try:
            out.append(smtp.sendmail("ann@example.org", ["bob@example.net"], body))
        except smtplib.SMTPDataError as exc:
            out.append((exc.smtp_code, exc.smtp_error))
    return out


def check_both_recorded(rec: Recording) -> None:
    """The recording says both: the first message withheld by the rule (no
    server reply to it), the upstream reopened, the second accepted."""
    withheld, reopened = notes(rec, NoteKind.FAULT)
    assert "message withheld" in withheld.text and RULE in withheld.text
    assert withheld.raw == b"451 4.3.0 Try again later\r\n"
    assert "upstream reopened" in reopened.text
    assert len([e for e in rec.events() if isinstance(e, MessageEnd)]) == 2
    finals = [e.code for e in rec.events() if isinstance(e, Reply) and e.ends_message]
    assert finals == [250]  # the server's: only the second message reached its end
    assert rec.close is not None and rec.close.by != "proxy"
    # what the proxy told the new upstream is in notes, not client commands
    assert [e.verb for e in rec.events() if isinstance(e, Command)].count("MAIL") == 2


async def test_two_messages_the_first_withheld_the_second_delivered(tmp_path: Path) -> None:
    def client(port: int) -> list[Any]:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            return send_two(smtp)

    with run_aiosmtpd() as server:
        outcome, rec, proxy = await through_proxy(tmp_path, server.address, client)
        received = [m["content"] for m in server.received.messages]
    assert outcome == [(451, b"4.3.0 Try again later"), {}]
    assert received == [SECOND]
    check_both_recorded(rec)
    said = [n.text for n in notes(rec, NoteKind.PROXY_COMMAND)]
    assert len(said) == 1 and said[0].startswith("proxy sent the new upstream: ehlo ")
    assert "!! fault message#1 dot: 451 4.3.0 Try again later: upstream reopened" in (
        proxy.transcript()
    )


@pytest.fixture(scope="module")
def upstream_ca() -> trustme.CA:
    return trustme.CA()


async def test_starttls_and_auth_plain_are_said_again(
    tmp_path: Path, upstream_ca: trustme.CA
) -> None:
    """The upstream leg was in TLS (the client's STARTTLS, passed on) and
    authenticated with AUTH PLAIN: the new connection does STARTTLS with the
    same settings and the client's AUTH PLAIN again (aiosmtpd takes mail
    only inside TLS), and no note holds the credentials."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    upstream_ca.issue_cert("localhost", "127.0.0.1").configure_cert(server_ctx)
    proxy_ca = CertificateAuthority.load_or_create(tmp_path / "home")
    up = client_context()
    upstream_ca.configure_trust(up)

    def client(port: int) -> list[Any]:
        with smtplib.SMTP("localhost", port, timeout=10) as smtp:
            smtp.starttls(context=ssl.create_default_context(cafile=str(proxy_ca.cert_path)))
            smtp.login(USER, PASSWORD)
            return send_two(smtp)

    with run_aiosmtpd(tls_context=server_ctx, require_starttls=True) as server:
        outcome, rec, _ = await through_proxy(
            tmp_path,
            server.address,
            client,
            server_contexts=ServerContexts(["localhost", "127.0.0.1"], ca=proxy_ca),
            upstream_context=up,
            upstream_sni="localhost",
        )
        received = [m["content"] for m in server.received.messages]
        auth = list(server.received.auth)
    assert outcome == [(451, b"4.3.0 Try again later"), {}]
    assert received == [SECOND]
    assert auth == [("PLAIN", USER), ("PLAIN", USER)]  # the client's, then the re-dial's
    check_both_recorded(rec)
    said = [
        n.text.removeprefix("proxy sent the new upstream: ") for n in notes(rec, "proxy_command")
    ]
    assert [s.split()[0].upper() for s in said] == ["EHLO", "STARTTLS", "EHLO", "AUTH"]
    assert said[-1] == "AUTH PLAIN (the client's, as it sent it)"
    secret = b"AHVzZXJAZG9tYWluLmNvbQBwYXNzd29yZA=="
    assert all(secret not in n.raw for n in rec.events() if isinstance(n, Note))
    (reopened,) = [n for n in notes(rec, NoteKind.FAULT) if "reopened" in n.text]
    assert "greeting, EHLO, STARTTLS, EHLO, AUTH PLAIN" in reopened.text


async def test_cram_md5_cannot_be_said_again_the_client_is_told_421(tmp_path: Path) -> None:
    """An AUTH that answered the server's challenge cannot be said again:
    the client gets the fault's reply, then 421 4.4.2, and the session ends;
    the upstream connection was closed before the dot and none other dialled."""
    async with trio.open_nursery() as nursery:
        upstream = await RawUpstream().start(nursery)
        proxy = await start_proxy(nursery, tmp_path, upstream.address, faults=plan(RULE))
        client = await connect(proxy.host, proxy.port)
        server = await upstream.accept()
        script = [
            (b"EHLO c.test\r\n", b"250-raw.test\r\n250 AUTH CRAM-MD5\r\n"),
            (b"AUTH CRAM-MD5\r\n", b"334 PDEyMzQ1QHJhdy50ZXN0Pg==\r\n"),
            (b"dXNlciBkaWdlc3Q=\r\n", b"235 2.7.0 ok\r\n"),
            (b"MAIL FROM:<ann@example.org>\r\n", b"250 ok\r\n"),
            (b"RCPT TO:<bob@example.net>\r\n", b"250 ok\r\n"),
            (b"DATA\r\n", b"354 go\r\n"),
        ]
        await server.send(b"220 raw.test\r\n")
        await client.reply()
        for said, answer in script:
            await client.send(said)
            await server.until(said)
            await server.send(answer)
            assert await client.reply() == answer
        await client.send(FIRST + b".\r\n")
        assert await server.to_eof() == FIRST  # the body, not its end; then closed
        assert await client.reply() == b"451 4.3.0 Try again later\r\n"
        assert (await client.reply()).startswith(b"421 4.4.2 ")
        assert await client.to_eof() == b""
        await client.close()
        await server.close()
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    assert len(upstream.peers) == 1
    rec = only_recording(proxy.recordings)
    _, refused = notes(rec, NoteKind.FAULT)
    assert "upstream not reopened: AUTH CRAM-MD5 cannot be said again" in refused.text
    assert rec.close is not None and rec.close.by == "proxy"


async def test_a_new_upstream_that_answers_otherwise_is_given_up(tmp_path: Path) -> None:
    """The new connection's EHLO gets 5xx where the first got 250: the
    state cannot be rebuilt, so the client is told 421 after the 451."""
    async with trio.open_nursery() as nursery:
        upstream = await RawUpstream().start(nursery)
        proxy = await start_proxy(nursery, tmp_path, upstream.address, faults=plan(RULE))
        client = await connect(proxy.host, proxy.port)
        server = await upstream.accept()
        await server.send(b"220 raw.test\r\n")
        await client.reply()
        for said, answer in [
            (b"EHLO c.test\r\n", b"250 raw.test\r\n"),
            (b"MAIL FROM:<ann@example.org>\r\n", b"250 ok\r\n"),
            (b"RCPT TO:<bob@example.net>\r\n", b"250 ok\r\n"),
            (b"DATA\r\n", b"354 go\r\n"),
        ]:
            await client.send(said)
            await server.until(said)
            await server.send(answer)
            await client.reply()
        await client.send(FIRST + b".\r\n")
        await server.to_eof()
        again = await upstream.accept()
        await again.send(b"220 raw.test\r\n")
        assert await again.until(b"\r\n", TIMEOUT) == b"EHLO c.test\r\n"
        await again.send(b"550 5.7.1 not you again\r\n")
        assert await client.reply() == b"451 4.3.0 Try again later\r\n"
        assert (await client.reply()).startswith(b"421 4.4.2 ")
        await again.to_eof()  # the proxy gave the new connection up
        await client.to_eof()
        for peer in (client, server, again):
            await peer.close()
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    _, refused = notes(only_recording(proxy.recordings), NoteKind.FAULT)
    assert "EHLO again got 550 5.7.1 not you again, not 250 as before" in refused.text
