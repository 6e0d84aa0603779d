"""Fault rules applied by the proxy (``record --fault``), with real peers
over loopback: smtplib and aiosmtpd, a raw upstream that keeps every byte it
got, and Postfix with swaks. Each test checks what users rely on: what the
client was told, what the server received, what the recording holds.
Every wait is bounded (``trio.fail_after`` or the clients' own timeouts)."""

from __future__ import annotations

import re
import smtplib
import ssl
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from click.testing import CliRunner
from conftest import (
    RunningProxy,
    run_aiosmtpd,
    start_proxy,
    swaks_argv,
    wait_for_sessions,
)
from rawpeers import TIMEOUT, Peer, RawUpstream, connect, only_recording
from servers import Server, postfix_server, server_ca

__all__ = ["postfix_server", "server_ca"]  # fixtures

from smtpproxy.cli import main
from smtpproxy.events import Command, Note, NoteKind, Reply
from smtpproxy.faults import FaultPlan, parse_rule
from smtpproxy.recording import Recording, read_recording
from smtpproxy.tls import CertificateAuthority, ServerContexts

RCPTS = ["a@example.net", "b@example.net", "c@example.net"]
MESSAGE = b"From: ann@example.org\r\nSubject: faults\r\n\r\nhello\r\n"


def plan(*rules: str) -> FaultPlan:
    return FaultPlan([parse_rule(r) for r in rules])


def fault_notes(rec: Recording) -> list[Note]:
    return [e for e in rec.events() if isinstance(e, Note) and e.kind == NoteKind.FAULT]


async def in_thread(fn: Callable[[], Any]) -> Any:
    with trio.fail_after(30):
        return await trio.to_thread.run_sync(fn)


async def with_proxy(
    tmp_path: Path, upstream: tuple[str, int], rules: tuple[str, ...], client: Callable[[int], Any]
) -> tuple[Any, Recording, RunningProxy]:
    """Run ``client(port)`` in a thread through a proxy with ``rules`` in
    front of ``upstream``; its result, the recording and the proxy."""
    async with trio.open_nursery() as nursery:
        proxy = await start_proxy(nursery, tmp_path, upstream, faults=plan(*rules))
        result = await in_thread(lambda: client(proxy.port))
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    return result, only_recording(proxy.recordings), proxy


# -- smtplib and aiosmtpd ---------------------------------------------------------


def send_three(port: int) -> dict[str, tuple[int, bytes]]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        return client.sendmail("ann@example.org", RCPTS, MESSAGE)  # type: ignore[return-value]


async def test_second_rcpt_refused(tmp_path: Path) -> None:
    with run_aiosmtpd() as server:
        refused, rec, proxy = await with_proxy(
            tmp_path,
            server.address,
            ("rcpt#2: 452 4.5.3 Too many recipients",),
            send_three,
        )
        (got,) = server.received.messages
    assert refused == {"b@example.net": (452, b"4.5.3 Too many recipients")}
    assert got["to"] == ["a@example.net", "c@example.net"]
    (note,) = fault_notes(rec)
    assert "rcpt#2: 452 4.5.3 Too many recipients" in note.text
    assert note.raw == b"452 4.5.3 Too many recipients\r\n"
    # the recording holds the proxy's 452 (the note) between the server's two 250s
    answers = [
        e.code if isinstance(e, Reply) else e.raw[:3]
        for e in rec.events()
        if (isinstance(e, Reply) and e.command == "RCPT") or e is note
    ]
    assert answers == [250, b"452", 250]
    assert "!! fault rcpt#2: 452 4.5.3 Too many recipients" in proxy.transcript()
    (path,) = proxy.recording_paths()
    shown = CliRunner().invoke(main, ["show", str(path)])
    assert shown.exit_code == 0, shown.output
    assert "!! fault rcpt#2: 452 4.5.3 Too many recipients: proxy answered RCPT" in shown.output


async def test_dot_reply_withholds_the_message(tmp_path: Path) -> None:
    """``dot: 451``: the upstream gets the body without its final dot and
    its connection is closed (so it drops the message); the proxy dials it
    again, says the client's EHLO, and the client's session goes on there."""

    def client(port: int) -> BaseException | None:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            try:
                smtp.sendmail("ann@example.org", RCPTS[:1], MESSAGE)
            except smtplib.SMTPDataError as exc:
                return exc
        return None

    async with trio.open_nursery() as nursery:
        upstream = await RawUpstream().start(nursery)
        proxy = await start_proxy(
            nursery, tmp_path, upstream.address, faults=plan("dot: 451 4.3.0 Try later")
        )
        outcome: list[BaseException | None] = []

        async def run_client() -> None:
            outcome.append(await in_thread(lambda: client(proxy.port)))

        nursery.start_soon(run_client)
        server = await upstream.accept()
        await serve_until_dot(server)
        # the body came, not its end; then the proxy closed the connection
        body = await server.to_eof()
        await server.close()
        again = await upstream.accept()
        await again.send(b"220 raw.test ESMTP\r\n")
        hello = await again.until(b"\r\n")
        await again.send(b"250-raw.test\r\n250 PIPELINING\r\n")
        # smtplib's RSET after a failed DATA, then its QUIT: on the new connection
        assert await again.until(b"\r\n") == b"rset\r\n"
        await again.send(b"250 2.0.0 ok\r\n")
        assert await again.until(b"\r\n") == b"QUIT\r\n"
        await again.send(b"221 bye\r\n")
        await again.to_eof()
        await again.close()
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    (exc,) = outcome
    assert isinstance(exc, smtplib.SMTPDataError)
    assert (exc.smtp_code, exc.smtp_error) == (451, b"4.3.0 Try later")
    assert body == MESSAGE  # everything but the final ".\r\n"
    assert hello == server.got.split(b"\r\n", 1)[0] + b"\r\n"  # the client's EHLO line
    rec = only_recording(proxy.recordings)
    withheld, reopened = fault_notes(rec)
    assert "withheld" in withheld.text and "no message is delivered" in withheld.text
    assert "upstream reopened" in reopened.text
    assert rec.close is not None and rec.close.by == "client"


async def serve_until_dot(server: Peer) -> None:
    """Play a server up to DATA's 354 for one recipient (what the proxy forwards)."""
    await server.send(b"220 raw.test ESMTP\r\n")
    await server.until(b"\r\n")  # EHLO
    await server.send(b"250-raw.test\r\n250 PIPELINING\r\n")
    await server.until(b"\r\n")  # smtplib's "mail FROM:..."
    await server.send(b"250 2.1.0 ok\r\n")
    await server.until(b"\r\n")
    await server.send(b"250 2.1.5 ok\r\n")
    await server.until(b"data\r\n")
    await server.send(b"354 go on\r\n")


async def test_dot_replace_the_server_has_the_message(tmp_path: Path) -> None:
    def client(port: int) -> BaseException | None:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            try:
                smtp.sendmail("ann@example.org", RCPTS[:1], MESSAGE)
            except smtplib.SMTPDataError as exc:
                return exc
        return None

    with run_aiosmtpd() as server:
        exc, rec, _ = await with_proxy(
            tmp_path, server.address, ("dot: replace 451 4.3.0 Lost",), client
        )
        messages = server.received.messages
    assert isinstance(exc, smtplib.SMTPDataError) and exc.smtp_code == 451
    assert len(messages) == 1 and messages[0]["to"] == RCPTS[:1]
    (final,) = [e for e in rec.events() if isinstance(e, Reply) and e.ends_message]
    assert final.code == 250  # what the server said
    (note,) = fault_notes(rec)
    assert note.raw == b"451 4.3.0 Lost\r\n"
    assert "the server accepted the message" in note.text


async def test_ehlo_remove(tmp_path: Path) -> None:
    def client(port: int) -> dict[str, str]:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.ehlo()
            return dict(smtp.esmtp_features)

    with run_aiosmtpd(enable_SMTPUTF8=True) as server:
        features, rec, _ = await with_proxy(
            tmp_path, server.address, ("ehlo: remove 8BITMIME SMTPUTF8",), client
        )
    assert "8bitmime" not in features and "smtputf8" not in features
    assert "size" in features
    (ehlo,) = [e for e in rec.events() if isinstance(e, Reply) and e.command == "EHLO"]
    assert ehlo.capabilities is not None
    assert {"8BITMIME", "SMTPUTF8"} <= set(ehlo.capabilities)  # the server's real reply
    (note,) = fault_notes(rec)
    assert b"8BITMIME" not in note.raw and note.raw.startswith(b"250-")


async def test_ehlo_add(tmp_path: Path) -> None:
    def client(port: int) -> dict[str, str]:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            smtp.ehlo()
            return dict(smtp.esmtp_features)

    with run_aiosmtpd() as server:
        features, _, _ = await with_proxy(tmp_path, server.address, ("ehlo: add CHUNKING",), client)
    assert "chunking" in features


async def test_connect_reply(tmp_path: Path) -> None:
    def client(port: int) -> BaseException | None:
        try:
            smtplib.SMTP("127.0.0.1", port, timeout=10)
        except smtplib.SMTPConnectError as exc:
            return exc
        return None

    with run_aiosmtpd() as server:
        exc, rec, _ = await with_proxy(
            tmp_path, server.address, ("connect: 421 4.3.2 busy",), client
        )
    assert isinstance(exc, smtplib.SMTPConnectError)
    assert (exc.smtp_code, exc.smtp_error) == (421, b"4.3.2 busy")
    (note,) = fault_notes(rec)
    assert note.raw == b"421 4.3.2 busy\r\n"
    assert rec.close is not None and rec.close.by == "proxy"


async def test_mail_close(tmp_path: Path) -> None:
    def client(port: int) -> BaseException | None:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
            try:
                smtp.sendmail("ann@example.org", RCPTS, MESSAGE)
            except smtplib.SMTPServerDisconnected as exc:
                return exc
        return None

    with run_aiosmtpd() as server:
        exc, rec, _ = await with_proxy(tmp_path, server.address, ("mail: close",), client)
        assert server.received.messages == []
    assert isinstance(exc, smtplib.SMTPServerDisconnected)
    assert rec.close is not None and rec.close.by == "proxy"
    (note,) = fault_notes(rec)
    assert "closed the client's connection at MAIL" in note.text
    # MAIL never reached the server: it is the last command, and unanswered
    commands = [e.verb for e in rec.events() if isinstance(e, Command)]
    assert commands[-1] == "MAIL"


async def test_rcpt_delay(tmp_path: Path) -> None:
    with run_aiosmtpd() as server:
        start = trio.current_time()
        refused, rec, _ = await with_proxy(
            tmp_path, server.address, ("rcpt: delay 1s",), send_three
        )
        took = trio.current_time() - start
        assert len(server.received.messages) == 1
    assert refused == {}
    assert took >= 1.0  # each RCPT waited a second: at least one did
    assert len(fault_notes(rec)) == 3


async def test_quit_reset(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        with run_aiosmtpd() as server:
            proxy = await start_proxy(nursery, tmp_path, server.address, faults=plan("quit: reset"))
            client = await connect(proxy.host, proxy.port)
            await client.reply()
            await client.send(b"EHLO c.test\r\n")
            await client.reply()
            await client.send(b"QUIT\r\n")
            with trio.fail_after(TIMEOUT):
                with pytest.raises(trio.BrokenResourceError) as caught:
                    while await client.stream.receive_some(1024):
                        pass
            await client.close()
            await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    assert isinstance(caught.value.__cause__, ConnectionResetError)
    (note,) = fault_notes(only_recording(proxy.recordings))
    assert "RST" in note.text


# -- byte for byte ---------------------------------------------------------------------

SESSION = (
    b"EHLO c.test\r\n",
    b"MAIL FROM:<ann@example.org>\r\nRCPT TO:<a@example.net>\r\nDATA\r\n",
    b"Subject: x\r\n\r\n.leading dot\r\nbody\r\n.\r\nQUIT\r\n",
)
SERVER_SAYS = (
    b"250-raw.test\r\n250 PIPELINING\r\n",
    b"250 ok\r\n250 ok\r\n354 go\r\n",
    b"250 queued\r\n221 bye\r\n",
)


async def relay_session(
    tmp_path: Path,
    faults: FaultPlan | None,
    server_says: tuple[bytes, ...] = SERVER_SAYS,
    split_server: bool = False,
) -> tuple[bytes, bytes]:
    """A scripted session through the proxy to a raw upstream, the client's
    writes split at awkward places (``split_server``: the server's too, the
    greeting included); what the server and the client got."""

    async def send_split(peer: Peer, data: bytes, cut: int) -> None:
        await peer.send(data[:cut])
        await trio.sleep(0.05)  # two reads, not one: not a wait for a peer
        await peer.send(data[cut:])

    async with trio.open_nursery() as nursery:
        upstream = await RawUpstream().start(nursery)
        proxy = await start_proxy(nursery, tmp_path, upstream.address, faults=faults)
        client = await connect(proxy.host, proxy.port)
        server = await upstream.accept()
        if split_server:
            await send_split(server, b"220 raw.test\r\n", 7)
        else:
            await server.send(b"220 raw.test\r\n")
        await client.reply()
        for i, (said, answer) in enumerate(zip(SESSION, server_says, strict=True)):
            await send_split(client, said, len(said) // 2 + i)  # a line across two reads
            await server.until(said[-6:])
            if split_server:
                await send_split(server, answer, len(answer) // 2 - i)
            else:
                await server.send(answer)
            await client.until(answer[-8:])
        await client.close()
        await server.to_eof()
        await server.close()
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    return bytes(server.got), bytes(client.got)


async def test_unmatched_rules_relay_byte_for_byte(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "rules").mkdir()
    plain = await relay_session(tmp_path / "plain", None)
    rules = plan("rcpt#5: 452 4.5.3 no", "session#9 mail: close", "to=*@nowhere.test dot: stall")
    faulty = await relay_session(tmp_path / "rules", rules)
    assert faulty == plain
    assert plain[0] == b"".join(SESSION)


# -- Postfix and swaks -------------------------------------------------------------------


async def swaks_through(
    tmp_path: Path, server: Server, rules: tuple[str, ...], *args: str
) -> tuple[int, str, Recording]:
    """swaks through a proxy with ``rules`` to ``server``: its exit code,
    its output and the recording."""
    message = tmp_path / "message.eml"
    message.write_bytes(MESSAGE)
    async with trio.open_nursery() as nursery:
        proxy = await start_proxy(nursery, tmp_path, server.address, faults=plan(*rules))
        with trio.fail_after(30):
            done = await trio.run_process(
                swaks_argv("127.0.0.1", proxy.port, message, *args),
                capture_stdout=True,
                capture_stderr=True,
                check=False,
            )
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    text = (done.stdout + done.stderr).decode("utf-8", "replace")
    return done.returncode, text, only_recording(proxy.recordings)


def postfix_recipients(server: Server, final_reply: str) -> list[str]:
    """The recipients of the message Postfix keeps on hold (its envelope)."""
    match = re.search(r"queued as ([0-9A-Za-z]+)", final_reply)
    assert match is not None, final_reply
    done = subprocess.run(
        ["postcat", "-c", str(server.base / "conf"), "-e", "-q", match.group(1)],
        capture_output=True,
        check=True,
        timeout=30,
    )
    return re.findall(r"(?m)^recipient: (\S+)$", done.stdout.decode())


@pytest.mark.peer("postfix")
@pytest.mark.peer("swaks")
async def test_swaks_postfix_second_rcpt_refused(tmp_path: Path, postfix_server: Server) -> None:
    code, text, rec = await swaks_through(
        tmp_path,
        postfix_server,
        ("rcpt#2: 452 4.5.3 Too many recipients",),
        "--to",
        ",".join(RCPTS),
    )
    assert code == 0, text  # swaks goes on when one recipient of several is refused
    assert "<** 452 4.5.3 Too many recipients" in text
    (final,) = [e for e in rec.events() if isinstance(e, Reply) and e.ends_message]
    assert final.code == 250, text
    assert postfix_recipients(postfix_server, final.text) == [RCPTS[0], RCPTS[2]]
    (note,) = fault_notes(rec)
    assert note.raw == b"452 4.5.3 Too many recipients\r\n"


@pytest.mark.peer("postfix")
@pytest.mark.peer("swaks")
async def test_swaks_tls_starttls_refused(tmp_path: Path, postfix_server: Server) -> None:
    code, text, rec = await swaks_through(
        tmp_path, postfix_server, ("starttls: 454 4.7.0 TLS not available",), "--tls"
    )
    assert code == 29, text  # swaks: "TLS negotiation failed"
    assert "<** 454 4.7.0 TLS not available" in text
    verbs = [e.verb for e in rec.events() if isinstance(e, Command)]
    assert verbs[:2] == ["EHLO", "STARTTLS"] and "MAIL" not in verbs
    (note,) = fault_notes(rec)
    assert "starttls: 454 4.7.0 TLS not available" in note.text


async def test_tls_abort(tmp_path: Path) -> None:
    """``tls: abort`` on an implicit-TLS listener: the client's handshake
    fails, nothing is dialled upstream."""
    contexts = ServerContexts(["127.0.0.1"], ca=CertificateAuthority.load_or_create(tmp_path))

    def client(port: int) -> BaseException | None:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        try:
            smtplib.SMTP_SSL("127.0.0.1", port, timeout=10, context=context)
        except (OSError, smtplib.SMTPServerDisconnected) as exc:
            return exc
        return None

    async with trio.open_nursery() as nursery:
        upstream = await RawUpstream().start(nursery)
        proxy = await start_proxy(
            nursery,
            tmp_path,
            upstream.address,
            faults=plan("tls: abort"),
            listen_tls=True,
            server_contexts=contexts,
        )
        exc = await in_thread(lambda: client(proxy.port))
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    assert exc is not None
    assert upstream.peers == []
    rec = only_recording(proxy.recordings)
    (note,) = fault_notes(rec)
    assert "aborted the client's TLS handshake" in note.text
    assert rec.close is not None and rec.close.by == "proxy"


async def test_replay_says_which_recorded_replies_were_injected(tmp_path: Path) -> None:
    """A session recorded under ``rcpt#2: 452``, replayed against the same
    kind of server: the 452 was the proxy's, so replay sends that RCPT, shows
    what the server says, names the fault, and counts no difference."""
    with run_aiosmtpd() as server:
        _, rec, _ = await with_proxy(
            tmp_path, server.address, ("rcpt#2: 452 4.5.3 Too many recipients",), send_three
        )
        from smtpproxy.protocol import exchanges

        (injected,) = [ex for ex in exchanges(rec.events()) if ex.injected is not None]
        assert (injected.verb, injected.position.nth, injected.reply and injected.reply.code) == (
            "RCPT",
            2,
            452,
        )
        done = await in_thread(
            lambda: CliRunner().invoke(
                main, ["replay", str(rec.path), "--to", f"127.0.0.1:{server.address[1]}"]
            )
        )
        assert len(server.received.messages) == 2  # the replay delivered to all three
        assert server.received.messages[1]["to"] == RCPTS
    assert done.exit_code == 0, done.output
    assert (
        "== the recorded reply was the proxy's: fault rcpt#2: 452 4.5.3 Too many recipients"
        in done.output
    )


async def test_greeting_replace_stall_and_throttle(tmp_path: Path) -> None:
    """Three actions the other tests leave out, on one raw client each:
    ``greeting: replace`` (the client hears the rule's greeting, the
    recording keeps the server's), ``noop: stall`` (no answer; the idle
    timeout ends the session with 421) and ``ehlo: throttle`` (the EHLO reply
    comes at that rate: about two seconds for its 94 octets at 50 octets/s)."""
    async with trio.open_nursery() as nursery:
        with run_aiosmtpd() as server:
            proxy = await start_proxy(
                nursery,
                tmp_path,
                server.address,
                idle_timeout=1.0,
                faults=plan(
                    "greeting: replace 220 fault.example ESMTP replaced",
                    "noop: stall",
                    "session#2 ehlo: throttle 50/s",
                ),
            )
            first = await connect(proxy.host, proxy.port)
            assert await first.reply() == b"220 fault.example ESMTP replaced\r\n"
            await first.send(b"NOOP\r\n")
            with trio.fail_after(TIMEOUT):
                stalled = await first.reply()  # the idle timeout's 421, not NOOP's 250
            assert stalled.startswith(b"421 4.4.2"), stalled
            await first.close()

            second = await connect(proxy.host, proxy.port)
            await second.reply()
            await second.send(b"EHLO c.test\r\n")
            start = trio.current_time()
            ehlo = await second.reply()
            took = trio.current_time() - start
            assert ehlo.startswith(b"250-")
            assert took >= len(ehlo) / 50 / 2  # a bound, not a timing target: half the rate's time
            await second.send(b"QUIT\r\n")
            await second.reply()
            await second.close()
            await wait_for_sessions(proxy.proxy, 2)
            nursery.cancel_scope.cancel()
    first_rec, second_rec = sorted(
        (read_recording(p) for p in proxy.recording_paths()), key=lambda r: r.header.start
    )
    greeting = next(e for e in first_rec.events() if isinstance(e, Reply))
    assert greeting.raw.startswith(b"220 ") and b"replaced" not in greeting.raw  # the server's
    assert [n.text.split(":")[0] for n in fault_notes(first_rec)] == [
        "fault greeting",
        "fault noop",
    ]
    assert first_rec.close is not None and first_rec.close.by == "proxy"
    assert [n.text.split(":")[0] for n in fault_notes(second_rec)] == [
        "fault greeting",
        "fault session#2 ehlo",
    ]
    # throttled writing kept the session from going idle: it ended with QUIT
    assert second_rec.close is not None and second_rec.close.by != "proxy"
