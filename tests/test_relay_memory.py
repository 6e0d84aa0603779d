"""The relay over memory streams, on trio's mock clock.

A ``Session`` is driven with a fake client stream and a fake upstream stream
(``trio.testing.memory_stream_pair``, the upstream handed to the session
through its ``open_upstream`` opener), under ``MockClock(autojump_threshold=0)``
(pytest-trio's ``autojump_clock``): when every task waits, the clock jumps to
the next deadline, so a 300 s idle timeout or a 3600 s message deadline takes
no real time, and each happens at the exact second it should. Every wait
below is bounded on that clock.
"""

from __future__ import annotations

import io
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from rawpeers import Peer, only_recording, trickle_until_answered

from smtpproxy.events import MessageEnd, Note, Side, TlsEstablished
from smtpproxy.recording import Recording
from smtpproxy.relay import Proxy, ProxyConfig, Session
from smtpproxy.render import Transcript
from smtpproxy.tls import CertificateAuthority, HandshakeFailed, ServerContexts, handshake
from smtpproxy.tlsmodes import UpstreamTls

#: a bound on any wait, in mock-clock seconds: past every deadline under test
LONG = 10_000.0

GREETING = b"220 up.example ESMTP\r\n"


@dataclass
class Harness:
    """A running session, the test's two ends of it, and where it records."""

    session: Session
    client: Peer
    server: Peer
    recordings: Path
    dialed: list[tuple[str, int]] = field(default_factory=list)
    ended: trio.Event = field(default_factory=trio.Event)

    async def wait_ended(self) -> None:
        with trio.fail_after(LONG):
            await self.ended.wait()

    def recording(self) -> Recording:
        return only_recording(self.recordings)

    def notes(self) -> list[str]:
        return [e.kind for e in self.recording().events() if isinstance(e, Note)]


@asynccontextmanager
async def session(tmp_path: Path, **config: Any) -> AsyncIterator[Harness]:
    """Run one ``Session`` over memory streams with ``config``; on leaving,
    wait until it has ended (closed its streams and its recording)."""
    folder = tmp_path / "recordings"
    folder.mkdir(mode=0o700, exist_ok=True)
    proxy = Proxy(
        ProxyConfig(upstream=("192.0.2.1", 25), recordings=folder, **config),
        Transcript(io.StringIO()),
    )
    client_end, proxy_client = trio.testing.memory_stream_pair()
    proxy_upstream, server_end = trio.testing.memory_stream_pair()
    dialed: list[tuple[str, int]] = []

    async def open_upstream(host: str, port: int) -> trio.abc.Stream:
        dialed.append((host, port))
        return proxy_upstream

    s = Session(proxy, proxy_client, open_upstream=open_upstream)
    h = Harness(s, Peer(client_end), Peer(server_end), folder, dialed)

    async def run() -> None:
        try:
            await s.run()
        finally:
            h.ended.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        yield h
        await h.wait_ended()


async def exchange(h: Harness, command: bytes, reply: bytes) -> None:
    """The client sends ``command``, the upstream gets it whole and answers
    ``reply``, and the client gets that."""
    await h.client.send(command)
    assert await h.server.until(b"\r\n") == command
    await h.server.send(reply)
    assert await h.client.until(reply) == reply


async def greeted(h: Harness) -> None:
    await h.server.send(GREETING)
    assert await h.client.until(GREETING) == GREETING


# -- deadlines: idle, line, message --------------------------------------------


async def test_idle_timeout_ends_a_session_whose_upstream_never_greets(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """The default ``--idle-timeout`` (300 s) on the mock clock: the client
    gets the 421 exactly 300 s after the session began, the upstream is
    closed without a byte, and the recording says why."""
    async with session(tmp_path) as h:
        start = trio.current_time()
        got = await h.client.to_eof(timeout=LONG)
        closed_after = trio.current_time() - start
        upstream_saw = await h.server.to_eof(timeout=LONG)
    assert got == b"421 4.4.2 smtpproxy: idle for 300s, closing\r\n"
    assert closed_after == pytest.approx(300)
    assert upstream_saw == b""
    assert h.dialed == [("192.0.2.1", 25)]
    rec = h.recording()
    assert rec.close is not None and (rec.close.by, rec.close.reason) == ("proxy", "idle for 300s")
    assert h.notes() == ["idle_timeout", "proxy_reply"]
    assert rec.raw(Side.CLIENT) == rec.raw(Side.SERVER) == b""


async def test_idle_timeout_counts_from_the_last_byte_either_way(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Bytes keep a session alive: a reply at 250 s and a command at 500 s
    put the idle deadline at 800 s, not at 300 s."""
    async with session(tmp_path, idle_timeout=300) as h:
        start = trio.current_time()
        await trio.sleep(250)
        await greeted(h)
        await trio.sleep(250)
        await exchange(h, b"EHLO c.example\r\n", b"250 up.example\r\n")
        got = await h.client.to_eof(timeout=LONG)
        closed_at = trio.current_time() - start
    assert got == b"421 4.4.2 smtpproxy: idle for 300s, closing\r\n"
    assert closed_at == pytest.approx(800)
    rec = h.recording()
    assert rec.close is not None and (rec.close.by, rec.close.reason) == ("proxy", "idle for 300s")


async def test_line_timeout_ends_a_client_trickling_one_command_line(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """One byte every 70 s keeps the session from going idle (300 s), but a
    command line must end within ``--line-timeout`` (300 s) of its first
    byte. The upstream never gets a whole line."""
    line = b"EHLO a.very.slow.client.example\r\n"
    async with session(tmp_path) as h:
        await greeted(h)
        first_byte = trio.current_time()
        answer = await trickle_until_answered(
            h.client, [line[i : i + 1] for i in range(len(line))], 70, grace=1
        )
        answered_after = trio.current_time() - first_byte
        assert await h.client.to_eof() == b""
        upstream_saw = await h.server.to_eof()
    assert answer == b"421 4.4.2 smtpproxy: command line not completed within 300s, closing\r\n"
    assert answered_after == pytest.approx(300)
    assert upstream_saw == line[:5]  # the bytes sent at 0, 70, 140, 210 and 280 s
    rec = h.recording()
    assert rec.close is not None
    assert (rec.close.by, rec.close.reason) == ("proxy", "command line not completed within 300s")
    assert h.notes() == ["line_timeout", "proxy_reply"]


async def test_message_timeout_ends_a_client_trickling_a_message(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """Whole body lines every 200 s: no line is slow and the session is never
    idle, yet the message must end within ``--message-timeout`` (3600 s)
    of its first byte. The upstream gets no terminator: no half message is
    delivered."""
    async with session(tmp_path) as h:
        await greeted(h)
        for command, reply in (
            (b"EHLO c.example\r\n", b"250 up.example\r\n"),
            (b"MAIL FROM:<a@example.org>\r\n", b"250 ok\r\n"),
            (b"RCPT TO:<b@example.net>\r\n", b"250 ok\r\n"),
            (b"DATA\r\n", b"354 go ahead\r\n"),
        ):
            await exchange(h, command, reply)
        first_byte = trio.current_time()
        lines = [b"Subject: slow\r\n", b"\r\n"] + [b"line %d\r\n" % i for i in range(40)]
        answer = await trickle_until_answered(h.client, lines, 200, grace=1)
        answered_after = trio.current_time() - first_byte
        upstream_got = await h.server.to_eof(timeout=LONG)
    assert answer == b"421 4.4.2 smtpproxy: message not completed within 3600s, closing\r\n"
    assert answered_after == pytest.approx(3600)
    assert upstream_got.startswith(b"Subject: slow\r\n\r\nline 0\r\n")
    assert b"\r\n.\r\n" not in bytes(h.server.got)
    rec = h.recording()
    assert rec.close is not None
    assert (rec.close.by, rec.close.reason) == ("proxy", "message not completed within 3600s")
    assert [e.complete for e in rec.events() if isinstance(e, MessageEnd)] == [False]


# -- TLS arrangements -----------------------------------------------------------


@pytest.fixture
def proxy_ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "home")


def trusting(ca: CertificateAuthority) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca.cert_path))


async def test_silent_implicit_tls_client_is_closed_at_the_handshake_timeout_before_any_dial(
    tmp_path: Path, proxy_ca: CertificateAuthority, autojump_clock: trio.testing.MockClock
) -> None:
    """``--listen-tls``: a client that never starts its handshake is closed
    by the proxy after ``--handshake-timeout`` (30 s, lower than the idle
    300 s), and no upstream connection is made for it."""
    contexts = ServerContexts(["localhost"], ca=proxy_ca)
    async with session(
        tmp_path, listen_tls=True, upstream_tls="plain", server_contexts=contexts
    ) as h:
        start = trio.current_time()
        assert await h.client.to_eof(timeout=LONG) == b""
        closed_after = trio.current_time() - start
    assert closed_after == pytest.approx(30)
    assert h.dialed == []
    rec = h.recording()
    assert rec.close is not None
    assert (rec.close.by, rec.close.reason) == (
        "proxy",
        "TLS handshake with the client timed out after 30s",
    )


async def test_plain_upstream_the_proxy_answers_starttls_after_what_precedes_it(
    tmp_path: Path, proxy_ca: CertificateAuthority, autojump_clock: trio.testing.MockClock
) -> None:
    """``--upstream-tls plain``: the NOOP pipelined before STARTTLS goes
    upstream and its reply comes first, the proxy answers STARTTLS itself,
    shakes hands with the client, and what the client says over TLS reaches
    the upstream in clear. No byte of STARTTLS goes upstream."""
    contexts = ServerContexts(["localhost"], ca=proxy_ca)
    async with session(tmp_path, upstream_tls=UpstreamTls.PLAIN, server_contexts=contexts) as h:
        await greeted(h)
        await exchange(h, b"EHLO c.example\r\n", b"250-up.example\r\n250 STARTTLS\r\n")
        await h.client.send(b"NOOP\r\nSTARTTLS\r\n")
        assert await h.server.until(b"\r\n") == b"NOOP\r\n"
        await h.server.send(b"250 2.0.0 ok\r\n")
        assert await h.client.reply() == b"250 2.0.0 ok\r\n"
        assert await h.client.reply() == b"220 2.0.0 Ready to start TLS (answered by smtpproxy)\r\n"
        tls = trio.SSLStream(h.client.stream, trusting(proxy_ca), server_hostname="localhost")
        with trio.fail_after(LONG):
            await tls.do_handshake()
        client = Peer(tls)
        await client.send(b"EHLO c.example\r\n")
        assert await h.server.until(b"\r\n") == b"EHLO c.example\r\n"
        await h.server.send(b"250 up.example\r\n")
        assert await client.reply() == b"250 up.example\r\n"
        await client.send(b"QUIT\r\n")
        assert await h.server.until(b"\r\n") == b"QUIT\r\n"
        await h.server.send(b"221 bye\r\n")
        assert await client.reply() == b"221 bye\r\n"
        await h.server.close()
    assert bytes(h.server.got) == b"EHLO c.example\r\nNOOP\r\nEHLO c.example\r\nQUIT\r\n"
    rec = h.recording()
    tls_events = [e for e in rec.events() if isinstance(e, TlsEstablished)]
    assert [e.side for e in tls_events] == [Side.CLIENT]
    assert "proxy_reply" in h.notes()


async def test_starttls_upstream_sends_starttls_after_the_first_ehlo_and_a_refusal_ends_the_session(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """``--upstream-tls starttls``: the upstream's reply to the client's
    first EHLO is held back, the proxy says STARTTLS upstream, and when the
    upstream refuses, the client gets a 421 naming the refusal instead of
    that EHLO reply."""
    async with session(tmp_path, upstream_tls="starttls") as h:
        await greeted(h)
        await h.client.send(b"EHLO c.example\r\n")
        assert await h.server.until(b"\r\n") == b"EHLO c.example\r\n"
        await h.server.send(b"250-up.example\r\n250 STARTTLS\r\n")
        assert await h.server.until(b"\r\n") == b"STARTTLS\r\n"
        await h.server.send(b"454 4.7.0 TLS not available\r\n")
        got = await h.client.to_eof(timeout=LONG)
        await h.server.to_eof(timeout=LONG)
    assert got == b"421 4.7.0 smtpproxy: upstream refused STARTTLS: 454 4.7.0 TLS not available\r\n"
    rec = h.recording()
    assert rec.close is not None
    assert (rec.close.by, rec.close.reason) == (
        "proxy",
        "upstream refused STARTTLS: 454 4.7.0 TLS not available",
    )
    assert h.notes()[:2] == ["proxy_command", "proxy_reply_from_upstream"]


async def test_strip_starttls_rewrites_a_line_split_across_reads_once(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    """``--strip-starttls``: the STARTTLS line of the EHLO reply reaches the
    client as ``XXXXXXXA`` even when it arrives in two reads; the recording
    keeps the server's own bytes and notes the rewrite once."""
    async with session(tmp_path, strip_starttls=True) as h:
        await greeted(h)
        await h.client.send(b"EHLO c.example\r\n")
        assert await h.server.until(b"\r\n") == b"EHLO c.example\r\n"
        await h.server.send(b"250-up.example\r\n250-STAR")
        await trio.sleep(1)
        await h.server.send(b"TTLS\r\n250 8BITMIME\r\n")
        assert await h.client.reply() == b"250-up.example\r\n250-XXXXXXXA\r\n250 8BITMIME\r\n"
        await exchange(h, b"QUIT\r\n", b"221 bye\r\n")
        await h.server.close()
    rec = h.recording()
    assert (
        rec.raw(Side.SERVER)
        == GREETING + b"250-up.example\r\n250-STARTTLS\r\n250 8BITMIME\r\n221 bye\r\n"
    )
    assert h.notes() == ["strip_starttls"]


# -- the one handshake helper ------------------------------------------------------


async def test_handshake_timeout_names_the_reason_and_closes_the_stream(
    proxy_ca: CertificateAuthority, autojump_clock: trio.testing.MockClock
) -> None:
    ours, peer = trio.testing.memory_stream_pair()
    contexts = ServerContexts(["localhost"], ca=proxy_ca)
    start = trio.current_time()
    with pytest.raises(HandshakeFailed) as failed:
        await handshake(ours, contexts.default, server_side=True, timeout=30)
    assert trio.current_time() - start == pytest.approx(30)
    assert (failed.value.reason, failed.value.timed_out) == ("timed out", True)
    with trio.fail_after(LONG):
        assert await peer.receive_some() == b""  # closed, as trio requires


async def test_handshake_with_a_peer_speaking_plaintext_fails_with_the_ssl_reason(
    proxy_ca: CertificateAuthority, autojump_clock: trio.testing.MockClock
) -> None:
    ours, peer = trio.testing.memory_stream_pair()
    contexts = ServerContexts(["localhost"], ca=proxy_ca)
    await peer.send_all(b"EHLO c.example\r\n" * 4)
    with pytest.raises(HandshakeFailed) as failed:
        await handshake(ours, contexts.default, server_side=True, timeout=30)
    assert not failed.value.timed_out
    assert failed.value.reason and failed.value.reason != "timed out"
    with trio.fail_after(LONG):
        got = b""
        for _ in range(100):
            data = await peer.receive_some()
            if not data:
                break
            got += data  # the TLS alert, if OpenSSL sends one
        assert data == b""
