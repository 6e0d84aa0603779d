"""Faults on either leg, over real loopback sockets: every one ends in a
defined outcome for the client, a recording that says who closed and why, and
no leaked sockets or sessions. Every wait is under ``trio.fail_after``.

Not testable on loopback, so not here: an upstream whose address does not
route (only 127.0.0.1 is allowed; the connect timeout is tested with a listener
whose accept queue is full instead, which drops SYNs just the same), packet
loss and reordering, and a full disk (RLIMIT_FSIZE stands in for it).
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from conftest import (
    free_port,
    smtpproxy_process,
    start_proxy,
    wait_for_sessions,
)
from rawpeers import (
    Peer,
    RawUpstream,
    connect,
    only_recording,
    proxy_notes,
    recordings_by_client,
)

from smtpproxy.events import MessageEnd, Note, Side
from smtpproxy.protocol import Unstuffer
from smtpproxy.recording import read_recording
from smtpproxy.relay import Proxy
from smtpproxy.server import Sink
from smtpproxy.tls import CertificateAuthority, ServerContexts

C, S = Side.CLIENT, Side.SERVER
UPSTREAM_GONE = b"421 4.4.2 smtpproxy: upstream closed the connection\r\n"


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def no_leaked_fds() -> Iterator[None]:
    """Every socket and recording a fault test opened is closed at its end."""
    before = _open_fds()
    yield
    assert _open_fds() <= before + 2, sorted(os.listdir("/proc/self/fd"))


async def _ended(proxy: Proxy, count: int) -> None:
    """Wait for ``count`` sessions to end; none may be left active."""
    await wait_for_sessions(proxy, count)
    assert proxy.stats.active == 0


async def _greet(client: Peer, server: Peer, ehlo: bool = True) -> bytes:
    """Greeting and EHLO through the proxy; return what the client sent."""
    await server.send(b"220 raw.example ESMTP\r\n")
    assert await client.reply() == b"220 raw.example ESMTP\r\n"
    if not ehlo:
        return b""
    await client.send(b"EHLO client.example\r\n")
    assert await server.until(b"\r\n") == b"EHLO client.example\r\n"
    await server.send(b"250-raw.example\r\n250 PIPELINING\r\n")
    assert await client.reply() == b"250-raw.example\r\n250 PIPELINING\r\n"
    return b"EHLO client.example\r\n"


async def test_upstream_refuses_gives_421_4_4_0(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    async with trio.open_nursery() as nursery:
        proxy = await start_proxy(nursery, tmp_path, ("127.0.0.1", port))
        client = await connect(proxy.host, proxy.port)
        got = await client.to_eof()
        await client.close()
        await _ended(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    reason = f"upstream 127.0.0.1:{port} unreachable: connection refused"
    assert got == f"421 4.4.0 smtpproxy: {reason}\r\n".encode()
    rec = only_recording(proxy.recordings)
    assert rec.close is not None and (rec.close.by, rec.close.reason) == ("proxy", reason)
    assert proxy_notes(rec) == got
    assert [e.kind for e in rec.events() if isinstance(e, Note)] == [
        "upstream_error",
        "proxy_reply",
    ]
    assert rec.raw(C) == b"" and rec.raw(S) == b""
    assert rec.close.totals["messages_accepted"] == 0


async def test_totals_count_only_what_the_peers_sent(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        proxy = await start_proxy(nursery, tmp_path, ("127.0.0.1", free_port()))
        client = await connect(proxy.host, proxy.port)
        await client.to_eof()
        await client.close()
        await _ended(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    rec = only_recording(proxy.recordings)
    assert rec.close is not None
    assert rec.close.totals["bytes_from_server"] == len(rec.raw(S)) == 0


async def test_upstream_that_never_answers_the_connect(tmp_path: Path) -> None:
    """A listener whose accept queue is full drops the SYN, as a filtered
    port does: the dial hangs until ``connect_timeout``."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        with socket.create_connection(listener.getsockname(), timeout=5):  # fills the queue
            async with trio.open_nursery() as nursery:
                proxy = await start_proxy(
                    nursery, tmp_path, listener.getsockname(), connect_timeout=0.3
                )
                client = await connect(proxy.host, proxy.port)
                start = trio.current_time()
                got = await client.to_eof(timeout=5)
                elapsed = trio.current_time() - start
                await client.close()
                await _ended(proxy.proxy, 1)
                nursery.cancel_scope.cancel()
    reason = "unreachable: no answer within 0.3s"
    assert got.startswith(b"421 4.4.0 smtpproxy: upstream 127.0.0.1:") and got.endswith(
        f"{reason}\r\n".encode()
    )
    assert 0.25 <= elapsed < 3
    rec = only_recording(proxy.recordings)
    assert rec.close is not None and rec.close.by == "proxy" and rec.close.reason.endswith(reason)
    assert proxy_notes(rec) == got


async def test_upstream_drops_mid_session(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        up = await RawUpstream().start(nursery)
        proxy = await start_proxy(nursery, tmp_path, up.address)
        client = await connect(proxy.host, proxy.port)
        server = await up.accept()
        sent = await _greet(client, server)
        await client.send(b"MAIL FROM:<a@example.org>\r\n")
        await server.until(b"\r\n")
        await server.close()
        rest = await client.to_eof()
        await client.close()
        await _ended(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    assert rest == UPSTREAM_GONE
    rec = only_recording(proxy.recordings)
    assert rec.close is not None
    assert (rec.close.by, rec.close.reason) == ("server", "server closed the connection")
    assert rec.raw(C) == sent + b"MAIL FROM:<a@example.org>\r\n" == bytes(server.got)
    assert rec.raw(S) == b"220 raw.example ESMTP\r\n250-raw.example\r\n250 PIPELINING\r\n"
    assert bytes(client.got) == rec.raw(S) + UPSTREAM_GONE
    assert proxy_notes(rec) == UPSTREAM_GONE


async def _to_data(client: Peer, server: Peer) -> bytes:
    """Greeting, EHLO, MAIL, RCPT and DATA up to the 354; what the client sent."""
    sent = await _greet(client, server)
    cmds = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
    await client.send(cmds)
    await server.until(b"DATA\r\n")
    await server.send(b"250 ok\r\n250 ok\r\n354 go ahead\r\n")
    await client.until(b"354 go ahead\r\n")
    return sent + cmds


BODY = b"Subject: cut short\r\n\r\n" + b"a line of the body\r\n" * 200


async def test_upstream_drops_mid_data(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        up = await RawUpstream().start(nursery)
        proxy = await start_proxy(nursery, tmp_path, up.address)
        client = await connect(proxy.host, proxy.port)
        server = await up.accept()
        sent = await _to_data(client, server)
        await client.send(BODY)
        await server.until(BODY)
        await server.close()
        rest = await client.to_eof()
        await client.close()
        await _ended(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    assert rest == UPSTREAM_GONE
    rec = only_recording(proxy.recordings)
    assert rec.close is not None
    assert (rec.close.by, rec.close.reason) == ("server", "server closed the connection")
    assert rec.close.totals["messages_incomplete"] == 1
    (end,) = [e for e in rec.events() if isinstance(e, MessageEnd)]
    assert not end.complete and end.headers == {"Subject": "cut short"}
    assert rec.raw(C) == sent + BODY == bytes(server.got)


async def test_upstream_resets_while_the_client_streams_a_body(tmp_path: Path) -> None:
    """The upstream resets while the client is still sending the body: the
    recording names the server, whichever pump hits the reset first."""
    async with trio.open_nursery() as nursery:
        up = await RawUpstream().start(nursery)
        proxy = await start_proxy(nursery, tmp_path, up.address)
        client = await connect(proxy.host, proxy.port)
        server = await up.accept()
        await _to_data(client, server)
        stop = trio.Event()

        async def stream_body() -> None:
            try:
                while not stop.is_set():
                    await client.stream.send_all(b"x" * 65536 + b"\r\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        async with trio.open_nursery() as inner:
            inner.start_soon(stream_body)
            await server.exactly(200_000)
            await server.reset()
            rest = await client.to_eof()
            stop.set()
        await client.close()
        await _ended(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    # the 421 may be lost: the proxy closes a client whose bytes it has not
    # read, and the kernel then resets rather than closes
    assert rest in (b"", UPSTREAM_GONE)
    rec = only_recording(proxy.recordings)
    assert rec.close is not None
    assert rec.close.by == "server", rec.close.reason
    # under load the kernel may report the reset to a read as an end of file
    reason = rec.close.reason
    assert reason.startswith("connection lost: ") or reason == "server closed the connection", (
        reason
    )


async def test_upstream_stalls_before_greeting(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        up = await RawUpstream().start(nursery)
        proxy = await start_proxy(nursery, tmp_path, up.address, idle_timeout=0.5)
        client = await connect(proxy.host, proxy.port)
        server = await up.accept()
        got = await client.to_eof(timeout=5)
        upstream_saw = await server.to_eof(timeout=5)
        await client.close()
        await _ended(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    assert got == b"421 4.4.2 smtpproxy: idle for 0.5s, closing\r\n"
    assert upstream_saw == b""
    rec = only_recording(proxy.recordings)
    assert rec.close is not None and (rec.close.by, rec.close.reason) == ("proxy", "idle for 0.5s")
    assert [e.kind for e in rec.events() if isinstance(e, Note)] == ["idle_timeout", "proxy_reply"]
    assert rec.raw(C) == rec.raw(S) == b""


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_client_drops_mid_data(tmp_path: Path, how: str) -> None:
    """The upstream must never see the terminator the client did not send:
    the proxy closes it instead of half-closing it."""
    partial = b"Subject: half\r\n\r\nfirst line\r\n.\r"  # one octet short of the end
    async with trio.open_nursery() as nursery:
        up = await RawUpstream().start(nursery)
        proxy = await start_proxy(nursery, tmp_path, up.address)
        client = await connect(proxy.host, proxy.port)
        server = await up.accept()
        sent = await _to_data(client, server)
        await client.send(partial)
        await server.until(partial)
        await (client.close() if how == "close" else client.reset())
        await server.to_eof()
        await _ended(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    assert bytes(server.got) == sent + partial
    assert b"\r\n.\r\n" not in server.got
    rec = only_recording(proxy.recordings)
    (end,) = [e for e in rec.events() if isinstance(e, MessageEnd)]
    unstuffer = Unstuffer()
    content = unstuffer.feed(partial) + unstuffer.end()
    assert not end.complete and end.size == len(content) == len(partial) - 1
    assert rec.raw(C) == sent + partial
    assert rec.close is not None and rec.close.by == "client"
    if how == "close":
        assert (
            rec.close.reason == "client closed mid-message; upstream closed without completing it"
        )
    else:
        assert rec.close.reason.startswith("connection lost")


def _closes(folder: Path, *ports: int) -> list[tuple[str, str, int]]:
    """(by, reason, messages accepted) of the recordings of these clients."""
    recs = recordings_by_client(folder)
    assert sorted(recs) == sorted(ports)
    out = []
    for port in ports:
        close = recs[port].close
        assert close is not None, port
        out.append((close.by, close.reason, close.totals["messages_accepted"]))
    return out


async def test_stalled_client_times_out_while_another_session_completes(tmp_path: Path) -> None:
    sink = Sink()
    async with trio.open_nursery() as nursery:
        address = await nursery.start(sink.serve)
        proxy = await start_proxy(nursery, tmp_path, address, idle_timeout=0.5)
        silent = await connect(proxy.host, proxy.port)
        greeting = await silent.reply()
        busy = await connect(proxy.host, proxy.port)
        silent_port, busy_port = silent.port, busy.port
        await busy.reply()
        await busy.send(b"EHLO busy.example\r\n")
        await busy.reply()
        timed_out = trio.Event()

        async def wait_silent() -> None:
            await silent.to_eof(timeout=5)
            timed_out.set()

        nursery.start_soon(wait_silent)
        with trio.fail_after(5):
            while not timed_out.is_set():  # stay active past the other's deadline
                await busy.send(b"NOOP\r\n")
                assert (await busy.reply()).startswith(b"250 ")
                await trio.sleep(0.05)
        await busy.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
        for _ in range(3):
            last = await busy.reply()
        assert last.startswith(b"354 ")
        await busy.send(b"Subject: alive\r\n\r\nstill here\r\n.\r\nQUIT\r\n")
        assert (await busy.reply()).startswith(b"250 2.0.0 Ok: queued")
        assert (await busy.reply()).startswith(b"221 ")
        assert await busy.to_eof() == b""
        await silent.close()
        await busy.close()
        await _ended(proxy.proxy, 2)
        nursery.cancel_scope.cancel()
    assert greeting.startswith(b"220 ")
    assert bytes(silent.got) == greeting + b"421 4.4.2 smtpproxy: idle for 0.5s, closing\r\n"
    assert sink.stats.messages == 1
    # the busy client waits for the sink to close after 221, so the server closes first
    assert _closes(proxy.recordings, silent_port, busy_port) == [
        ("proxy", "idle for 0.5s", 0),
        ("server", "server closed the connection", 1),
    ]


async def test_tls_garbage_and_silence_from_clients_on_implicit_tls(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "home")
    sink = Sink()
    async with trio.open_nursery() as nursery:
        address = await nursery.start(sink.serve)
        proxy = await start_proxy(
            nursery,
            tmp_path,
            address,
            listen_tls=True,
            upstream_tls="plain",
            handshake_timeout=0.5,
            server_contexts=ServerContexts(["localhost", "127.0.0.1"], ca=ca),
        )
        ctx = ssl.create_default_context(cafile=str(ca.cert_path))
        good_tcp = await connect(proxy.host, proxy.port)
        good = Peer(trio.SSLStream(good_tcp.stream, ctx, server_hostname="localhost"))
        assert (await good.reply()).startswith(b"220 ")
        garbage = await connect(proxy.host, proxy.port)
        await garbage.send(b"EHLO not.tls.example\r\n\x00\xff" * 20)
        await garbage.to_eof()
        silent = await connect(proxy.host, proxy.port)
        ports = good.port, garbage.port, silent.port
        await silent.to_eof(timeout=5)
        await wait_for_sessions(proxy.proxy, 2)  # the good one goes on
        await good.send(b"EHLO good.example\r\n")
        assert (await good.reply()).startswith(b"250-")
        await good.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
        for _ in range(3):
            last = await good.reply()
        assert last.startswith(b"354 ")
        await good.send(b"Subject: tls\r\n\r\nfine\r\n.\r\nQUIT\r\n")
        assert (await good.reply()).startswith(b"250 ")
        assert (await good.reply()).startswith(b"221 ")
        for peer in (good, garbage, silent):
            await trio.aclose_forcefully(peer.stream)
        await _ended(proxy.proxy, 3)
        nursery.cancel_scope.cancel()
    assert sink.stats.messages == 1
    good_close, garbage_close, silent_close = _closes(proxy.recordings, *ports)
    assert good_close == ("server", "server closed the connection", 1)
    assert garbage_close[:2] == (
        "client",
        "TLS handshake with the client failed: WRONG_VERSION_NUMBER",
    )
    assert silent_close[:2] == ("proxy", "TLS handshake with the client timed out after 0.5s")


def _limit_file_size() -> None:
    """In the child: files may not grow past 4 KiB, and going past fails
    with EFBIG instead of killing the process."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


async def _one_session(host: str, port: int, bodies: list[bytes]) -> bytes:
    """A plain session sending each body as a message; all the client got."""
    client = await connect(host, port)
    await client.reply()
    await client.send(b"EHLO writer.example\r\n")
    await client.reply()
    for body in bodies:
        await client.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
        for _ in range(3):
            last = await client.reply()
        assert last.startswith(b"354 "), last
        await client.send(body + b".\r\n")
        assert (await client.reply()).startswith(b"250 2.0.0 Ok: queued"), client.got[-200:]
    await client.send(b"QUIT\r\n")
    assert (await client.reply()).startswith(b"221 ")
    await client.to_eof()
    await client.close()
    return bytes(client.got)


async def test_recording_that_cannot_be_written_does_not_stop_the_mail(tmp_path: Path) -> None:
    """A real write failure: the proxy runs as a child whose files may not
    exceed 4 KiB (RLIMIT_FSIZE), so the recorder's write(2) fails with EFBIG."""
    sink = Sink()
    recordings = tmp_path / "recordings"
    big = b"Subject: big\r\n\r\n" + b"0123456789" * 300 + b"\r\n"
    async with trio.open_nursery() as nursery:
        host, port = await nursery.start(sink.serve)
        with smtpproxy_process(
            "record",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            f"{host}:{port}",
            "--recordings",
            str(recordings),
            "--no-color",
            cwd=tmp_path,
            env={"PYTHONDONTWRITEBYTECODE": "1"},
            preexec_fn=_limit_file_size,
        ) as child:
            await _one_session(child.host, child.port, [big, big, big])
            await _one_session(child.host, child.port, [b"Subject: small\r\n\r\nhi\r\n"])
            # the second session's summary line: both have ended
            await trio.to_thread.run_sync(child.wait_stdout, "1 accepted", 10)
            finished = await trio.to_thread.run_sync(child.finish)
        nursery.cancel_scope.cancel()
    assert finished.returncode == 0, finished.stderr
    assert sink.stats.messages == 4
    warnings = [line for line in finished.stdout.splitlines() if "recording failed" in line]
    assert len(warnings) == 1 and "mail keeps flowing: File too large" in warnings[0], (
        finished.stdout
    )
    assert finished.stdout.count("closed by") == 2
    assert (
        "2 session(s), 2 recording(s)" in finished.stderr
        and "1 recording failure(s)" in finished.stderr
    )
    # the first session's recording stopped at the limit, without its close
    # line (a recording cut short); the second one's is whole
    sizes = sorted(
        ((p.stat().st_size, read_recording(p)) for p in recordings.glob("*.jsonl")),
        key=lambda pair: pair[0],
    )
    (small, whole), (limit, cut) = sizes
    assert limit == 4096 and small < 4096
    assert cut.close is None
    assert whole.close is not None and whole.close.totals["messages_accepted"] == 1


async def test_failed_handshakes_leave_no_sni_behind(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "home")
    contexts = ServerContexts(["localhost", "127.0.0.1"], ca=ca)
    sink = Sink()
    async with trio.open_nursery() as nursery:
        address = await nursery.start(sink.serve)
        proxy = await start_proxy(
            nursery,
            tmp_path,
            address,
            listen_tls=True,
            upstream_tls="plain",
            server_contexts=contexts,
        )
        for i in range(3):
            tcp = await connect(proxy.host, proxy.port)
            # the system store does not trust the proxy's CA: the client aborts
            tls = trio.SSLStream(
                tcp.stream, ssl.create_default_context(), server_hostname=f"n{i}.example"
            )
            with pytest.raises(trio.BrokenResourceError):
                with trio.fail_after(5):
                    await tls.do_handshake()
            await trio.aclose_forcefully(tls)
        await _ended(proxy.proxy, 3)
        nursery.cancel_scope.cancel()
    assert contexts.snis == {}
