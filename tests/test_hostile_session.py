"""Session-level defences against hostile or broken clients and servers
(issue 12), over real loopback sockets: what precedes a STARTTLS the proxy
answers itself, bytes a server sends after its 220 to the proxy's own
STARTTLS, a silent implicit-TLS client, the folder listing after a failed
client handshake, and clients that trickle a line or a message.

Every wait is bounded (``rawpeers.TIMEOUT`` or ``trio.fail_after``); the
trickling clients send a bounded number of bytes.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trio
import trustme
from conftest import RunningProxy, smtpproxy_process, start_proxy, wait_for_sessions
from rawpeers import Peer, RawUpstream, connect, only_recording, trickle_until_answered

from smtpproxy.events import Anomaly, MessageEnd, Note, Opaque, Reply, Side, TlsStart
from smtpproxy.protocol import MAX_LINE, Conversation
from smtpproxy.server import Sink
from smtpproxy.summary import session_row
from smtpproxy.tls import CertificateAuthority, ServerContexts, client_context

ANSWERED_HERE = b"220 2.0.0 Ready to start TLS (answered by smtpproxy)\r\n"


@pytest.fixture(scope="module")
def upstream_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def proxy_ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "home")


def _contexts(ca: CertificateAuthority) -> ServerContexts:
    return ServerContexts(["localhost", "127.0.0.1"], ca=ca)


def _upstream_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = client_context()
    ca.configure_trust(ctx)
    return ctx


async def _server_tls(server: Peer, ca: trustme.CA) -> None:
    """The raw upstream shakes hands as a TLS server with a certificate of ``ca``."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    stream = trio.SSLStream(server.stream, ctx, server_side=True)
    with trio.fail_after(10):
        await stream.do_handshake()
    server.stream = stream


async def _greet(client: Peer, server: Peer, ehlo_reply: bytes) -> None:
    await server.send(b"220 raw.example ESMTP\r\n")
    assert await client.reply() == b"220 raw.example ESMTP\r\n"
    await client.send(b"EHLO client.example\r\n")
    assert await server.until(b"\r\n") == b"EHLO client.example\r\n"
    await server.send(ehlo_reply)


async def _starttls_both_legs(
    nursery: trio.Nursery,
    tmp_path: Path,
    proxy_ca: CertificateAuthority,
    upstream_ca: trustme.CA,
    after_220: bytes = b"",
) -> tuple[RunningProxy, Peer, Peer]:
    """The default mode to a raw upstream, up to the client's STARTTLS: the
    server answers 220 (then ``after_220`` in the same write) and shakes
    hands; the client has the 220 and has not shaken hands yet."""
    upstream = await RawUpstream().start(nursery)
    proxy = await start_proxy(
        nursery,
        tmp_path,
        upstream.address,
        upstream_context=_upstream_context(upstream_ca),
        upstream_sni="localhost",
        server_contexts=_contexts(proxy_ca),
    )
    client = await connect(proxy.host, proxy.port)
    server = await upstream.accept()
    await _greet(client, server, b"250-raw.example\r\n250 STARTTLS\r\n")
    await client.reply()
    await client.send(b"STARTTLS\r\n")
    assert await server.until(b"\r\n") == b"STARTTLS\r\n"
    await server.send(b"220 2.0.0 go ahead\r\n" + after_220)
    await _server_tls(server, upstream_ca)
    assert await client.reply() == b"220 2.0.0 go ahead\r\n"
    return proxy, client, server


# -- --upstream-tls plain: what precedes STARTTLS goes on first ---------------

RSET_STARTTLS = b"RSET\r\nSTARTTLS\r\n"


@pytest.mark.parametrize(
    "chunks",
    [
        pytest.param([RSET_STARTTLS], id="one-write"),
        pytest.param([b"RSET\r\nSTART", b"TLS\r\n"], id="split-in-starttls"),
        pytest.param([b"RSET\r\n", b"STARTTLS\r\n"], id="before-the-rset-reply"),
        pytest.param(
            [RSET_STARTTLS[i : i + 1] for i in range(len(RSET_STARTTLS))], id="byte-by-byte"
        ),
    ],
)
async def test_plain_upstream_relays_and_answers_what_precedes_starttls(
    tmp_path: Path, proxy_ca: CertificateAuthority, chunks: list[bytes]
) -> None:
    """The RSET pipelined with STARTTLS reaches the server and its reply the
    client, before the proxy's own 220; no byte of STARTTLS goes upstream."""
    async with trio.open_nursery() as nursery:
        upstream = await RawUpstream().start(nursery)
        proxy = await start_proxy(
            nursery,
            tmp_path,
            upstream.address,
            upstream_tls="plain",
            server_contexts=_contexts(proxy_ca),
        )
        client = await connect(proxy.host, proxy.port)
        server = await upstream.accept()
        await _greet(client, server, b"250-raw.example\r\n250 STARTTLS\r\n")
        assert await client.reply() == b"250-raw.example\r\n250 STARTTLS\r\n"
        for chunk in chunks:
            await client.send(chunk)
        assert await server.until(b"\r\n") == b"RSET\r\n"
        await server.send(b"250 2.0.0 reset\r\n")
        assert await client.reply() == b"250 2.0.0 reset\r\n"
        assert await client.reply() == ANSWERED_HERE
        tls = trio.SSLStream(
            client.stream,
            ssl.create_default_context(cafile=str(proxy_ca.cert_path)),
            server_hostname="localhost",
        )
        with trio.fail_after(10):
            await tls.do_handshake()
        client.stream = tls
        await client.send(b"EHLO again.example\r\n")
        assert await server.until(b"\r\n") == b"EHLO again.example\r\n"
        await server.send(b"250 raw.example\r\n")
        assert await client.reply() == b"250 raw.example\r\n"
        await trio.aclose_forcefully(client.stream)
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    assert bytes(server.got) == b"EHLO client.example\r\nRSET\r\nEHLO again.example\r\n"
    events = list(only_recording(proxy.recordings).events())
    replies = [(e.command, e.code) for e in events if isinstance(e, Reply)]
    assert replies == [("<greeting>", 220), ("EHLO", 250), ("RSET", 250), ("EHLO", 250)]
    # the proxy's 220 (a note in place of its reply) answered STARTTLS, not RSET
    answered = next(
        i for i, e in enumerate(events) if isinstance(e, Note) and e.kind == "proxy_reply"
    )
    assert isinstance(events[answered + 1], TlsStart)


# -- --upstream-tls starttls: bytes after the upstream's 220 -------------------


async def test_upstream_starttls_flags_and_keeps_bytes_sent_after_the_220(
    tmp_path: Path, proxy_ca: CertificateAuthority, upstream_ca: trustme.CA
) -> None:
    """What the server sends after its 220 to the proxy's STARTTLS is not
    carried into TLS, not passed to the client, and is flagged and recorded
    as in the default mode."""
    async with trio.open_nursery() as nursery:
        upstream = await RawUpstream().start(nursery)
        proxy = await start_proxy(
            nursery,
            tmp_path,
            upstream.address,
            upstream_tls="starttls",
            upstream_context=_upstream_context(upstream_ca),
            upstream_sni="localhost",
            server_contexts=_contexts(proxy_ca),
        )
        client = await connect(proxy.host, proxy.port)
        server = await upstream.accept()
        await _greet(client, server, b"250-raw.example\r\n250 STARTTLS\r\n")
        assert await server.until(b"\r\n") == b"STARTTLS\r\n"
        await server.send(b"220 2.0.0 go ahead\r\n250 injected\r\n")
        await _server_tls(server, upstream_ca)
        assert await server.until(b"\r\n") == b"EHLO client.example\r\n"
        # and what follows its EHLO reply over TLS is the session's: passed on
        await server.send(b"250-raw.example\r\n250 AUTH PLAIN\r\n250 more\r\n")
        assert await client.reply() == b"250-raw.example\r\n250 AUTH PLAIN\r\n"
        assert await client.reply() == b"250 more\r\n"
        await client.send(b"QUIT\r\n")
        assert await server.until(b"\r\n") == b"QUIT\r\n"
        await server.send(b"221 bye\r\n")
        assert await client.reply() == b"221 bye\r\n"
        await trio.aclose_forcefully(client.stream)
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    assert b"injected" not in client.got
    events = list(only_recording(proxy.recordings).events())
    flagged = [e for e in events if isinstance(e, Anomaly) and e.kind == "starttls_injection"]
    assert [e.side for e in flagged] == [Side.SERVER]
    kept = [e for e in events if isinstance(e, Opaque) and e.side is Side.SERVER]
    assert [e.raw for e in kept] == [b"250 injected\r\n"]
    assert "starttls_injection" in proxy.transcript()


async def test_mirror_flags_and_keeps_bytes_the_server_sent_after_its_220(
    tmp_path: Path, proxy_ca: CertificateAuthority, upstream_ca: trustme.CA
) -> None:
    """The default mode, for comparison: the same bytes after the server's
    220 to the client's STARTTLS are flagged and kept, never passed on."""
    async with trio.open_nursery() as nursery:
        proxy, client, server = await _starttls_both_legs(
            nursery, tmp_path, proxy_ca, upstream_ca, b"250 injected\r\n"
        )
        tls = trio.SSLStream(
            client.stream,
            ssl.create_default_context(cafile=str(proxy_ca.cert_path)),
            server_hostname="localhost",
        )
        with trio.fail_after(10):
            await tls.do_handshake()
        client.stream = tls
        await client.send(b"EHLO client.example\r\n")
        assert await server.until(b"\r\n") == b"EHLO client.example\r\n"
        await server.send(b"250 raw.example\r\n")
        assert await client.reply() == b"250 raw.example\r\n"
        await trio.aclose_forcefully(client.stream)
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    assert b"injected" not in client.got
    events = list(only_recording(proxy.recordings).events())
    flagged = [e for e in events if isinstance(e, Anomaly) and e.kind == "starttls_injection"]
    assert [e.side for e in flagged] == [Side.SERVER]
    kept = [e for e in events if isinstance(e, Opaque) and e.side is Side.SERVER and e.raw != b""]
    assert b"250 injected\r\n" in [e.raw for e in kept]


# -- implicit TLS: a client that never shakes hands ---------------------------


async def test_silent_implicit_tls_client_is_closed_by_the_handshake_timeout_option(
    tmp_path: Path,
) -> None:
    """The real command: ``--handshake-timeout 1`` ends a silent client's
    session after 1 s (not 30), recorded as ended by the proxy."""
    recordings = tmp_path / "recordings"
    with smtpproxy_process(
        "record", "--listen", "127.0.0.1:0", "--recordings", str(recordings), "--no-color",
        "--listen-tls", "--handshake-timeout", "1",
        cwd=tmp_path,
    ) as child:  # fmt: skip
        silent = await connect(child.host, child.port)
        assert await silent.to_eof(timeout=6) == b""
        await silent.close()
        child.wait_stdout("closed by proxy")
        done = child.finish()
    assert done.returncode == 0, done.stderr
    rec = only_recording(recordings)
    assert rec.close is not None
    assert (rec.close.by, rec.close.reason) == (
        "proxy",
        "TLS handshake with the client timed out after 1s",
    )


async def test_silent_implicit_tls_client_obeys_a_lower_idle_timeout(
    tmp_path: Path, proxy_ca: CertificateAuthority
) -> None:
    async with trio.open_nursery() as nursery:
        address = await nursery.start(Sink().serve)
        proxy = await start_proxy(
            nursery,
            tmp_path,
            address,
            listen_tls=True,
            upstream_tls="plain",
            idle_timeout=0.5,
            server_contexts=_contexts(proxy_ca),
        )
        silent = await connect(proxy.host, proxy.port)
        assert await silent.to_eof(timeout=5) == b""
        await silent.close()
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    rec = only_recording(proxy.recordings)
    assert rec.close is not None
    assert (rec.close.by, rec.close.reason) == (
        "proxy",
        "TLS handshake with the client timed out after 0.5s",
    )


# -- the folder listing --------------------------------------------------------


async def test_folder_listing_shows_no_tls_version_when_the_client_handshake_failed(
    tmp_path: Path, proxy_ca: CertificateAuthority, upstream_ca: trustme.CA
) -> None:
    """STARTTLS on both legs: the upstream's handshake succeeds first, the
    client's fails (it does not trust the proxy). The session had no TLS
    with its client, so the row must not show a TLS version."""
    async with trio.open_nursery() as nursery:
        proxy, client, server = await _starttls_both_legs(nursery, tmp_path, proxy_ca, upstream_ca)
        tls = trio.SSLStream(
            client.stream, ssl.create_default_context(), server_hostname="localhost"
        )
        with pytest.raises(trio.BrokenResourceError), trio.fail_after(10):
            await tls.do_handshake()  # the system store does not trust the proxy's CA
        await trio.aclose_forcefully(tls)
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    rec = only_recording(proxy.recordings)
    assert rec.close is not None and rec.close.reason.startswith(
        "TLS handshake with the client failed"
    )
    assert session_row(rec)[4] == "failed"
    assert "tls" not in rec.close.totals


# -- deadlines of a line and of a message --------------------------------------


async def test_client_trickling_a_command_line_is_closed_by_the_line_timeout_option(
    tmp_path: Path,
) -> None:
    """The real command with ``--line-timeout 1``: one byte every 0.2 s keeps
    the session from going idle, but the line must end within 1 s of its
    first byte."""
    recordings = tmp_path / "recordings"
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(Sink().serve)
        with smtpproxy_process(
            "record", "--listen", "127.0.0.1:0", "--upstream", f"{host}:{port}", "--workers", "1",
            "--recordings", str(recordings), "--no-color", "--line-timeout", "1", "--idle-timeout", "10",
            cwd=tmp_path,
        ) as child:  # fmt: skip
            client = await connect(child.host, child.port)
            assert (await client.reply()).startswith(b"220 ")
            line = b"EHLO a.very.slow.client.example\r\n"
            answer = await trickle_until_answered(
                client, [line[i : i + 1] for i in range(len(line))], 0.2
            )
            assert (
                answer == b"421 4.4.2 smtpproxy: command line not completed within 1s, closing\r\n"
            )
            assert await client.to_eof() == b""
            await client.close()
            child.wait_stdout("closed by proxy")
            done = child.finish()
        nursery.cancel_scope.cancel()
    assert done.returncode == 0, done.stderr
    rec = only_recording(recordings)
    assert rec.close is not None
    assert (rec.close.by, rec.close.reason) == ("proxy", "command line not completed within 1s")
    assert [e.kind for e in rec.events() if isinstance(e, Note)] == ["line_timeout", "proxy_reply"]


async def test_client_trickling_a_message_is_closed_by_the_message_timeout(tmp_path: Path) -> None:
    """Whole lines of a message body every 0.2 s: no line is slow, yet the
    message must end within ``message_timeout``. The upstream never gets a
    terminator, so no half message is delivered."""
    async with trio.open_nursery() as nursery:
        upstream = await RawUpstream().start(nursery)
        proxy = await start_proxy(
            nursery, tmp_path, upstream.address, message_timeout=1, idle_timeout=10
        )
        client = await connect(proxy.host, proxy.port)
        server = await upstream.accept()
        await _greet(client, server, b"250 raw.example\r\n")
        assert await client.reply() == b"250 raw.example\r\n"
        for command, reply in (
            (b"MAIL FROM:<a@example.org>\r\n", b"250 ok\r\n"),
            (b"RCPT TO:<b@example.net>\r\n", b"250 ok\r\n"),
            (b"DATA\r\n", b"354 go ahead\r\n"),
        ):
            await client.send(command)
            assert await server.until(b"\r\n") == command
            await server.send(reply)
            assert await client.reply() == reply
        lines = [b"Subject: slow\r\n", b"\r\n"] + [b"line %d\r\n" % i for i in range(20)]
        answer = await trickle_until_answered(client, lines, 0.2)
        assert answer == b"421 4.4.2 smtpproxy: message not completed within 1s, closing\r\n"
        upstream_got = await server.to_eof()
        await trio.aclose_forcefully(client.stream)
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    assert b"\r\n.\r\n" not in bytes(server.got)
    assert upstream_got.startswith(b"Subject: slow\r\n")
    rec = only_recording(proxy.recordings)
    assert rec.close is not None
    assert (rec.close.by, rec.close.reason) == ("proxy", "message not completed within 1s")
    assert [e.complete for e in rec.events() if isinstance(e, MessageEnd)] == [False]


# -- what the observer knows: the line and message in progress ----------------


def test_open_line_numbers_each_partial_client_line_afresh() -> None:
    """A pipelining client whose reads end mid-line starts a new line each
    time: each gets its own number, so its deadline starts afresh."""
    conv = Conversation()
    conv.feed(Side.SERVER, b"220 hi\r\n")
    assert conv.open_line == 0
    conv.feed(Side.CLIENT, b"NOOP\r\nNO")
    first = conv.open_line
    conv.feed(Side.CLIENT, b"OP")
    assert conv.open_line == first != 0
    conv.feed(Side.CLIENT, b"\r\nNO")
    assert conv.open_line == first + 1
    conv.feed(Side.CLIENT, b"OP\r\n")
    assert conv.open_line == 0


def test_open_line_stays_open_through_a_line_given_up_on() -> None:
    conv = Conversation()
    conv.feed(Side.SERVER, b"220 hi\r\n")
    conv.feed(Side.CLIENT, b"X" * (MAX_LINE + 10))
    line = conv.open_line
    assert line and conv.held_client_bytes == 0
    conv.feed(Side.CLIENT, b"X" * 10)
    assert conv.open_line == line
    conv.feed(Side.CLIENT, b"\r\n")
    assert conv.open_line == 0


@pytest.mark.parametrize("split", [False, True], ids=["whole", "byte-by-byte"])
def test_message_number_spans_data_body_and_bdat_chunks(split: bool) -> None:
    conv = Conversation()
    seen: list[int] = []

    def feed(side: Side, data: bytes) -> None:
        for piece in [data[i : i + 1] for i in range(len(data))] if split else [data]:
            conv.feed(side, piece)
            seen.append(conv.message_number)

    feed(Side.SERVER, b"220 hi\r\n")
    feed(Side.CLIENT, b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n")
    feed(Side.SERVER, b"250 hi\r\n250 ok\r\n250 ok\r\n")
    assert conv.message_number == 0
    feed(Side.SERVER, b"354 go\r\n")
    assert conv.message_number == 1
    feed(Side.CLIENT, b"Subject: x\r\n\r\nbody\r\n.\r\n")
    assert conv.message_number == 0
    feed(Side.SERVER, b"250 queued\r\n")
    feed(Side.CLIENT, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT 3\r\nabc")
    assert conv.message_number == 2  # open between chunks too
    feed(Side.CLIENT, b"BDAT 2 LAST\r\nde")
    assert conv.message_number == 0
    assert set(seen) == {0, 1, 2}
