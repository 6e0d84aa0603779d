"""End to end over loopback: the embedded SMTP server (``Sink``) against
Python's smtplib and against raw bytes written on a trio socket stream."""

from __future__ import annotations

import logging
import re
import smtplib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from conftest import free_port, smtpproxy_process

from smtpproxy import server
from smtpproxy.events import Command
from smtpproxy.server import Sink, SinkConfig
from smtpproxy.tls import CA_CERT

MAX_SIZE = 1000
TIMEOUT = 10

MESSAGE = (
    b"From: Ann <ann@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: sink test\r\n"
    b"\r\n"
    b"Hello Bob,\r\n"
    b".a line that starts with a dot\r\n"
    b"..and one with two\r\n"
    b"8-bit: \xc3\xa9t\xc3\xa9\r\n"
)


@dataclass
class Running:
    sink: Sink
    host: str
    port: int
    clients: list[Raw] = field(default_factory=list)


StartSink = Callable[..., Awaitable[Running]]


@pytest.fixture
async def start_sink(nursery: trio.Nursery) -> AsyncIterator[StartSink]:
    """Start sinks on loopback; the test's nursery stops them when the test
    ends, and the raw clients they served are closed."""
    started: list[Running] = []

    async def start(**config: Any) -> Running:
        config.setdefault("hostname", "sink.test")
        config.setdefault("max_size", MAX_SIZE)
        sink = Sink(SinkConfig(**config))
        host, port = await nursery.start(sink.serve, "127.0.0.1", 0)
        started.append(Running(sink, host, port))
        return started[-1]

    yield start
    for running in started:
        for client in running.clients:
            await client.stream.aclose()


@pytest.fixture
async def running(start_sink: StartSink) -> Running:
    return await start_sink()


@dataclass
class Answer:
    code: int
    lines: list[str]

    @property
    def enhanced(self) -> str | None:
        m = re.match(r"([245]\.\d{1,3}\.\d{1,3})(?:\s|$)", self.lines[0])
        return m.group(1) if m else None

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


class Raw:
    """A client that writes exactly the bytes it is given and reads replies."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buf = bytearray()

    @classmethod
    async def connect(cls, running: Running) -> Raw:
        with trio.fail_after(TIMEOUT):
            client = cls(await trio.open_tcp_stream(running.host, running.port))
        running.clients.append(client)
        greeting = await client.reply()
        assert greeting.code == 220 and greeting.lines[0].startswith("sink.test ")
        return client

    async def send(self, data: bytes) -> None:
        with trio.fail_after(TIMEOUT):
            await self.stream.send_all(data)

    async def _line(self) -> bytes:
        with trio.fail_after(TIMEOUT):
            while b"\r\n" not in self.buf:
                chunk = await self.stream.receive_some(65536)
                assert chunk, f"server closed the connection; unread: {bytes(self.buf)!r}"
                self.buf += chunk
        end = self.buf.index(b"\r\n") + 2
        line = bytes(self.buf[:end])
        del self.buf[:end]
        return line

    async def reply(self) -> Answer:
        lines: list[str] = []
        while True:
            line = (await self._line()).decode("utf-8")
            assert re.match(r"\d{3}[ -]", line + " "), f"not a reply line: {line!r}"
            lines.append(line[4:-2])
            if line[3:4] != "-":
                return Answer(int(line[:3]), lines)

    async def command(self, line: bytes) -> Answer:
        await self.send(line + b"\r\n")
        return await self.reply()

    async def expect_close(self) -> None:
        """The server closes the connection, having sent nothing more."""
        with trio.fail_after(TIMEOUT):
            while chunk := await self.stream.receive_some(65536):
                self.buf += chunk
        assert not self.buf, f"unexpected bytes before close: {bytes(self.buf)!r}"

    async def expect_alive(self) -> None:
        """No stray reply is queued: the next reply is NOOP's own."""
        answer = await self.command(b"NOOP")
        assert (answer.code, answer.text) == (250, "2.0.0 ok")

    async def ehlo(self) -> Answer:
        answer = await self.command(b"EHLO client.test")
        assert answer.code == 250
        return answer

    async def envelope(self, *rcpts: bytes) -> None:
        assert (await self.command(b"MAIL FROM:<ann@example.org>")).code == 250
        for rcpt in rcpts or (b"bob@example.net",):
            assert (await self.command(b"RCPT TO:<" + rcpt + b">")).code == 250


async def in_thread(fn: Callable[[], Any]) -> Any:
    with trio.fail_after(TIMEOUT):
        return await trio.to_thread.run_sync(fn)


def smtp_client(running: Running) -> smtplib.SMTP:
    return smtplib.SMTP(running.host, running.port, local_hostname="client.test", timeout=TIMEOUT)


# -- smtplib -------------------------------------------------------------


async def test_ehlo_advertises_the_extensions(running: Running) -> None:
    def session() -> tuple[int, dict[str, str]]:
        with smtp_client(running) as client:
            code, _ = client.ehlo()
            return code, dict(client.esmtp_features)

    code, features = await in_thread(session)
    assert code == 250
    for keyword in ("pipelining", "8bitmime", "enhancedstatuscodes", "chunking", "smtputf8"):
        assert features[keyword] == "", keyword
    assert features["size"] == str(MAX_SIZE)
    assert features["auth"].split() == ["PLAIN", "LOGIN", "CRAM-MD5"]


@pytest.mark.parametrize(
    ("mechanism", "initial_response_ok"),
    [("PLAIN", True), ("PLAIN", False), ("LOGIN", True), ("LOGIN", False), ("CRAM-MD5", True)],
)
async def test_auth_mechanisms_accepted(
    running: Running, mechanism: str, initial_response_ok: bool
) -> None:
    def session() -> tuple[int, bytes]:
        with smtp_client(running) as client:
            client.ehlo()
            client.user, client.password = "user@domain.com", "password"
            authobject = {
                "PLAIN": client.auth_plain,
                "LOGIN": client.auth_login,
                "CRAM-MD5": client.auth_cram_md5,
            }[mechanism]
            code, text = client.auth(mechanism, authobject, initial_response_ok=initial_response_ok)
            # a second AUTH is refused (RFC 4954 section 4)
            again = client.docmd("AUTH", "PLAIN AHVAdgBw")
            assert again[0] == 503 and again[1].startswith(b"5.5.1 ")
            return code, text

    code, text = await in_thread(session)
    assert code == 235
    assert text.startswith(b"2.7.0 ")


async def test_login_picks_a_mechanism(running: Running) -> None:
    def session() -> tuple[int, bytes]:
        with smtp_client(running) as client:
            return client.login("user@domain.com", "password")

    assert (await in_thread(session))[0] == 235


async def test_message_queued_and_counted(running: Running) -> None:
    def session() -> tuple[dict[str, Any], tuple[int, bytes]]:
        with smtp_client(running) as client:
            refused = client.sendmail(
                "ann@example.org", ["bob@example.net", "cy@example.net"], MESSAGE
            )
            assert client.mail("ann@example.org")[0] == 250
            assert client.rcpt("bob@example.net")[0] == 250
            return refused, client.data(MESSAGE)

    refused, (code, text) = await in_thread(session)
    assert refused == {}
    assert code == 250
    assert re.fullmatch(rb"2\.0\.0 Ok: queued as [0-9A-F]{12}", text), text
    stats = running.sink.stats
    assert stats.messages == 2
    # smtplib dot-stuffed the two dotted lines; the sink counts the content
    assert stats.octets == 2 * len(MESSAGE)
    assert stats.sessions == 1


async def test_concurrent_clients(running: Running) -> None:
    def session() -> None:
        with smtp_client(running) as client:
            client.sendmail("ann@example.org", ["bob@example.net"], MESSAGE)

    async with trio.open_nursery() as nursery:
        for _ in range(5):
            nursery.start_soon(in_thread, session)
    assert running.sink.stats.messages == 5
    assert running.sink.stats.sessions == 5


async def test_smtplib_size_over_the_limit_refused_at_mail(running: Running) -> None:
    def session() -> None:
        with smtp_client(running) as client:
            client.sendmail("ann@example.org", ["bob@example.net"], b"x" * (MAX_SIZE + 1))

    with pytest.raises(smtplib.SMTPSenderRefused) as info:
        await in_thread(session)
    assert info.value.smtp_code == 552
    assert info.value.smtp_error.startswith(b"5.3.4 ")
    assert running.sink.stats.messages == 0


# -- sequence and syntax errors, on the wire ------------------------------

Step = tuple[bytes, int, str | None]

SCRIPTS: dict[str, list[Step]] = {
    "mail before ehlo": [(b"MAIL FROM:<a@example.org>", 503, "5.5.1")],
    "rcpt before mail": [(b"EHLO c.test", 250, None), (b"RCPT TO:<b@example.net>", 503, "5.5.1")],
    "data before rcpt": [
        (b"EHLO c.test", 250, None),
        (b"MAIL FROM:<a@example.org>", 250, "2.1.0"),
        (b"DATA", 503, "5.5.1"),
    ],
    "nested mail": [
        (b"EHLO c.test", 250, None),
        (b"MAIL FROM:<a@example.org>", 250, "2.1.0"),
        (b"MAIL FROM:<a@example.org>", 503, "5.5.1"),
    ],
    "mail syntax": [(b"EHLO c.test", 250, None), (b"MAIL FOO", 501, "5.5.4")],
    "unknown verb": [(b"FROB nicate", 500, "5.5.2")],
    "empty line": [(b"", 500, "5.5.2")],
    "ehlo without domain": [(b"EHLO", 501, "5.5.4")],
    "size over the limit": [
        (b"EHLO c.test", 250, None),
        (b"MAIL FROM:<a@b> SIZE=999999", 552, "5.3.4"),
        (b"MAIL FROM:<a@b> SIZE=1000", 250, "2.1.0"),
    ],
    "size not a number": [
        (b"EHLO c.test", 250, None),
        ("MAIL FROM:<a@b> SIZE=\u00b2".encode(), 501, "5.5.4"),
        (b"MAIL FROM:<a@b> SIZE=abc", 501, "5.5.4"),
    ],
    "data with an argument": [
        (b"EHLO c.test", 250, None),
        (b"MAIL FROM:<a@b>", 250, "2.1.0"),
        (b"RCPT TO:<c@d>", 250, "2.1.5"),
        (b"DATA now", 501, "5.5.4"),
    ],
    "auth before ehlo": [(b"AUTH PLAIN AHVAdgBw", 503, "5.5.1")],
    "auth bad base64": [(b"EHLO c.test", 250, None), (b"AUTH PLAIN !!notbase64", 501, "5.5.2")],
    "auth plain bad base64 after 334": [
        (b"EHLO c.test", 250, None),
        (b"AUTH PLAIN", 334, None),
        (b"%%%", 501, "5.5.2"),
        (b"AUTH PLAIN AHVAdgBw", 235, "2.7.0"),
    ],
    "auth plain wrong shape": [(b"EHLO c.test", 250, None), (b"AUTH PLAIN dXNlcg==", 501, "5.5.2")],
    "auth login cancelled": [
        (b"EHLO c.test", 250, None),
        (b"AUTH LOGIN", 334, None),
        (b"dXNlcg==", 334, None),
        (b"*", 501, "5.7.0"),
        (b"AUTH LOGIN dXNlcg==", 334, None),
        (b"cGFzcw==", 235, "2.7.0"),
    ],
    "auth unknown mechanism": [(b"EHLO c.test", 250, None), (b"AUTH GSSAPI", 504, "5.5.4")],
    "auth without mechanism": [(b"EHLO c.test", 250, None), (b"AUTH", 501, "5.5.4")],
    "auth inside a transaction": [
        (b"EHLO c.test", 250, None),
        (b"MAIL FROM:<a@b>", 250, "2.1.0"),
        (b"AUTH PLAIN AHVAdgBw", 503, "5.5.1"),
    ],
    "rset ends the transaction": [
        (b"EHLO c.test", 250, None),
        (b"MAIL FROM:<a@b>", 250, "2.1.0"),
        (b"RCPT TO:<c@d>", 250, "2.1.5"),
        (b"RSET", 250, "2.0.0"),
        (b"DATA", 503, "5.5.1"),
        (b"MAIL FROM:<a@b>", 250, "2.1.0"),
        (b"RCPT TO:<c@d>", 250, "2.1.5"),
        (b"DATA", 354, None),
    ],
    "starttls not offered": [(b"EHLO c.test", 250, None), (b"STARTTLS", 502, "5.5.1")],
    "helo": [
        (b"HELO c.test", 250, None),
        (b"MAIL FROM:<>", 250, "2.1.0"),
        (b"VRFY bob", 252, "2.5.2"),
    ],
    "bad utf-8": [(b"EHLO c.test", 250, None), (b"MAIL FROM:<\xff@b>", 500, "5.5.2")],
}


@pytest.mark.parametrize("script", list(SCRIPTS.values()), ids=list(SCRIPTS))
async def test_replies(running: Running, script: list[Step]) -> None:
    client = await Raw.connect(running)
    for line, code, enhanced in script:
        answer = await client.command(line)
        assert answer.code == code, (line, answer)
        if enhanced is not None:
            assert answer.enhanced == enhanced, (line, answer)


async def test_quit_replies_221_and_closes(running: Running) -> None:
    client = await Raw.connect(running)
    answer = await client.command(b"QUIT")
    assert (answer.code, answer.enhanced) == (221, "2.0.0")
    await client.expect_close()


async def test_commands_pipelined_after_quit_are_ignored(running: Running) -> None:
    client = await Raw.connect(running)
    await client.send(b"NOOP\r\nQUIT\r\nNOOP\r\n")
    assert (await client.reply()).code == 250
    assert (await client.reply()).code == 221
    await client.expect_close()


async def test_body_over_the_limit_refused_and_session_goes_on(running: Running) -> None:
    client = await Raw.connect(running)
    await client.ehlo()
    await client.envelope()
    assert (await client.command(b"DATA")).code == 354
    await client.send(b"x" * 98 + b"\r\n")  # 100 octets a line
    await client.send((b"y" * 98 + b"\r\n") * (MAX_SIZE // 100))
    answer = await client.command(b".")
    assert (answer.code, answer.enhanced) == (552, "5.3.4")
    assert running.sink.stats.messages == 0
    # the transaction is over; a new one works
    await client.envelope()
    assert (await client.command(b"DATA")).code == 354
    await client.send(b"y" * 98 + b"\r\n")
    answer = await client.command(b".")
    assert answer.code == 250 and "queued as" in answer.text
    assert running.sink.stats.octets == 100


async def test_body_of_exactly_max_size_accepted(running: Running) -> None:
    client = await Raw.connect(running)
    await client.ehlo()
    await client.envelope()
    assert (await client.command(b"DATA")).code == 354
    await client.send((b"z" * 98 + b"\r\n") * (MAX_SIZE // 100))
    answer = await client.command(b".")
    assert answer.code == 250
    assert running.sink.stats.octets == MAX_SIZE


@pytest.mark.parametrize("length", [70_000, 200_000], ids=["seen-whole-or-split", "always-split"])
async def test_overlong_command_line_refused_and_session_goes_on(
    running: Running, length: int
) -> None:
    client = await Raw.connect(running)
    answer = await client.command(b"NOOP " + b"A" * length)
    assert (answer.code, answer.enhanced) == (500, "5.5.2")
    await client.expect_alive()


async def test_overlong_auth_answer_refused(running: Running) -> None:
    client = await Raw.connect(running)
    await client.ehlo()
    assert (await client.command(b"AUTH LOGIN")).code == 334
    answer = await client.command(b"A" * 200_000)
    assert (answer.code, answer.enhanced) == (500, "5.5.6")
    # the Conversation would go on reading SASL answers: the sink hangs up
    await client.expect_close()


async def test_idle_client_gets_421(start_sink: StartSink) -> None:
    running = await start_sink(idle_timeout=0.2)
    client = await Raw.connect(running)
    answer = await client.reply()
    assert (answer.code, answer.enhanced) == (421, "4.4.2")
    await client.expect_close()


async def test_a_failing_session_does_not_stop_the_server(
    running: Running, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    command = server._Sink._command

    def crash_on_frob(self: server._Sink, cmd: Command) -> bytes | None:
        if cmd.verb == "FROB":
            raise RuntimeError("a bug")
        return command(self, cmd)

    monkeypatch.setattr(server._Sink, "_command", crash_on_frob)
    client = await Raw.connect(running)
    answer = await client.command(b"FROB")
    assert (answer.code, answer.enhanced) == (421, "4.3.0")
    await client.expect_close()
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)
    other = await Raw.connect(running)
    await other.expect_alive()


# -- BDAT (RFC 3030) -------------------------------------------------------

CHUNK = b"Subject: b\r\n\r\nQUIT\r\nh\r\n"
TAIL = b"more\r\n"


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "byte-by-byte"])
async def test_bdat_chunks(running: Running, split: bool) -> None:
    assert len(CHUNK) == 23 and len(TAIL) == 6
    client = await Raw.connect(running)
    await client.ehlo()
    await client.envelope()
    data = b"BDAT 23\r\n" + CHUNK
    if split:
        for i in range(len(data)):
            await client.send(data[i : i + 1])
    else:
        await client.send(data)
    answer = await client.reply()
    assert (answer.code, answer.text) == (250, "2.0.0 23 octets received")
    answer = await client.command(b"BDAT 6 LAST\r\n" + TAIL[:-2])
    assert answer.code == 250 and answer.enhanced == "2.0.0"
    assert "queued as" in answer.text
    assert running.sink.stats.messages == 1
    assert running.sink.stats.octets == 29
    await client.expect_alive()


async def test_bdat_pipelined_in_one_write(running: Running) -> None:
    client = await Raw.connect(running)
    await client.send(
        b"EHLO c.test\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n"
        b"BDAT 23\r\n" + CHUNK + b"BDAT 6 LAST\r\n" + TAIL + b"QUIT\r\n"
    )
    codes = [(await client.reply()).code for _ in range(6)]
    assert codes == [250, 250, 250, 250, 250, 221]
    await client.expect_close()
    assert running.sink.stats.octets == 29


async def test_bdat_without_transaction_is_503_and_its_chunk_is_read(running: Running) -> None:
    client = await Raw.connect(running)
    await client.ehlo()
    # the chunk is a command line; if it were run, RSET's reply would be NOOP's
    await client.send(b"BDAT 6\r\nNOOP\r\nRSET\r\n")
    answer = await client.reply()
    assert (answer.code, answer.enhanced) == (503, "5.5.1")
    answer = await client.reply()
    assert (answer.code, answer.text) == (250, "2.0.0 reset")
    await client.expect_alive()


async def test_bdat_after_refusal_counts_only_the_new_message(running: Running) -> None:
    client = await Raw.connect(running)
    await client.ehlo()
    await client.send(b"BDAT 5\r\nhello")
    assert (await client.reply()).code == 503
    await client.envelope()
    await client.send(b"BDAT 3 LAST\r\nabc")
    answer = await client.reply()
    assert answer.code == 250 and "queued as" in answer.text
    assert running.sink.stats.octets == 3


async def test_ehlo_inside_a_bdat_transaction_starts_afresh(running: Running) -> None:
    client = await Raw.connect(running)
    await client.ehlo()
    await client.envelope()
    await client.send(b"BDAT 5\r\nhello")
    assert (await client.reply()).code == 250
    await client.ehlo()
    await client.envelope()
    await client.send(b"BDAT 3 LAST\r\nabc")
    assert (await client.reply()).code == 250
    assert running.sink.stats.octets == 3


async def test_bdat_zero_last(running: Running) -> None:
    client = await Raw.connect(running)
    await client.ehlo()
    await client.envelope()
    answer = await client.command(b"BDAT 0 LAST")
    assert answer.code == 250 and "queued as" in answer.text
    assert (running.sink.stats.messages, running.sink.stats.octets) == (1, 0)
    # after LAST the transaction is over
    answer = await client.command(b"BDAT 0 LAST")
    assert (answer.code, answer.enhanced) == (503, "5.5.1")
    await client.expect_alive()


async def test_bdat_zero_then_last(running: Running) -> None:
    client = await Raw.connect(running)
    await client.ehlo()
    await client.envelope()
    assert (await client.command(b"BDAT 0")).text == "2.0.0 0 octets received"
    await client.send(b"BDAT 2 LAST\r\nhi")
    assert (await client.reply()).code == 250
    assert running.sink.stats.octets == 2


@pytest.mark.parametrize(
    "command",
    [b"BDAT", b"BDAT x", b"BDAT 0 FOO", b"BDAT 1 LAST extra", b"BDAT -1"],
)
async def test_bdat_syntax_error_without_chunk(running: Running, command: bytes) -> None:
    client = await Raw.connect(running)
    await client.ehlo()
    await client.envelope()
    answer = await client.command(command)
    assert (answer.code, answer.enhanced) == (501, "5.5.4")
    await client.expect_alive()


async def test_bdat_bad_keyword_gets_one_reply_after_its_chunk(running: Running) -> None:
    client = await Raw.connect(running)
    await client.ehlo()
    await client.envelope()
    # read as a 4-octet chunk ("NOOP"), answered once
    await client.send(b"BDAT 4 FOO\r\nNOOP")
    answer = await client.reply()
    assert (answer.code, answer.enhanced) == (501, "5.5.4")
    await client.expect_alive()


async def test_bdat_chunks_over_the_limit(running: Running) -> None:
    client = await Raw.connect(running)
    await client.ehlo()
    await client.envelope()
    await client.send(b"BDAT 600\r\n" + b"a" * 600)
    assert (await client.reply()).code == 250
    await client.send(b"BDAT 600\r\n" + b"a" * 600)
    answer = await client.reply()
    assert (answer.code, answer.enhanced) == (552, "5.3.4")
    # the transaction failed: further chunks are out of sequence
    await client.send(b"BDAT 1 LAST\r\na")
    assert (await client.reply()).code == 503
    assert running.sink.stats.messages == 0
    await client.expect_alive()


async def test_data_after_bdat_is_503(running: Running) -> None:
    client = await Raw.connect(running)
    await client.ehlo()
    await client.envelope()
    await client.send(b"BDAT 5\r\nhello")
    assert (await client.reply()).code == 250
    answer = await client.command(b"DATA")
    assert (answer.code, answer.enhanced) == (503, "5.5.1")
    await client.expect_alive()


async def test_bdat_non_ascii_digit_is_a_syntax_error(running: Running) -> None:
    client = await Raw.connect(running)
    await client.ehlo()
    await client.envelope()
    answer = await client.command("BDAT \u00b2".encode())
    assert (answer.code, answer.enhanced) == (501, "5.5.4")


# -- PIPELINING (RFC 2920) and DATA ---------------------------------------


async def test_pipelined_transaction(running: Running) -> None:
    client = await Raw.connect(running)
    await client.ehlo()
    await client.send(
        b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n"
    )
    answers = [await client.reply() for _ in range(4)]
    assert [(a.code, a.enhanced) for a in answers] == [
        (250, "2.1.0"),
        (250, "2.1.5"),
        (250, "2.1.5"),
        (354, None),
    ]
    await client.send(b"Subject: p\r\n\r\nhi\r\n.\r\n")
    answer = await client.reply()
    assert answer.code == 250 and "queued as" in answer.text
    assert running.sink.stats.octets == len(b"Subject: p\r\n\r\nhi\r\n")
    await client.expect_alive()


async def test_pipelined_with_a_refused_recipient_and_data(running: Running) -> None:
    """A refused DATA (no valid recipient) leaves what follows to be read as commands."""
    client = await Raw.connect(running)
    await client.ehlo()
    await client.send(b"MAIL FROM:<a@b>\r\nRCPT TO:<>\r\nDATA\r\nNOOP\r\n")
    answers = [await client.reply() for _ in range(4)]
    assert [a.code for a in answers] == [250, 501, 503, 250]


async def test_whole_session_in_one_write(running: Running) -> None:
    """A client that does not wait for 354 still gets every reply, in order."""
    client = await Raw.connect(running)
    await client.send(
        b"EHLO c.test\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n"
        b"Subject: x\r\n\r\n..x\r\n.\r\nQUIT\r\n"
    )
    codes = [(await client.reply()).code for _ in range(6)]
    assert codes == [250, 250, 250, 354, 250, 221]
    await client.expect_close()
    assert running.sink.stats.octets == len(b"Subject: x\r\n\r\n.x\r\n")


@pytest.mark.parametrize(
    ("wire", "content"),
    [
        (b"..x\r\n", b".x\r\n"),
        (b"a\r\n..\r\n...\r\n.. y\r\n", b"a\r\n.\r\n..\r\n. y\r\n"),
        (b"", b""),
        (b"\r\n", b"\r\n"),
        (b"no dot.\r\n.x\r\n", b"no dot.\r\nx\r\n"),
    ],
)
async def test_dot_stuffing_undone_in_the_count(
    running: Running, wire: bytes, content: bytes
) -> None:
    client = await Raw.connect(running)
    await client.ehlo()
    await client.envelope()
    assert (await client.command(b"DATA")).code == 354
    answer = await client.command(wire + b".")
    assert answer.code == 250
    assert running.sink.stats.octets == len(content)


# -- TLS: STARTTLS (RFC 3207) and implicit TLS (RFC 8314) ----------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "sink.test").configure_cert(ctx)
    return ctx


@pytest.fixture
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


async def test_starttls_then_auth_and_message(
    start_sink: StartSink, server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    running = await start_sink(tls=server_tls)

    def session() -> tuple[dict[str, str], tuple[int, bytes], dict[str, str], int]:
        with smtp_client(running) as client:
            client.ehlo()
            before = dict(client.esmtp_features)
            started = client.starttls(context=client_tls)
            client.ehlo()
            after = dict(client.esmtp_features)
            code, _ = client.login("user@domain.com", "password")
            client.sendmail("ann@example.org", ["bob@example.net"], MESSAGE)
            return before, started, after, code

    before, (code, text), after, login = await in_thread(session)
    assert "starttls" in before
    assert code == 220 and text.startswith(b"2.0.0 ")
    assert "starttls" not in after and "auth" in after
    assert login == 235
    assert (running.sink.stats.messages, running.sink.stats.octets) == (1, len(MESSAGE))


async def test_starttls_forgets_the_clear_session_and_drops_pipelined_bytes(
    start_sink: StartSink, server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    running = await start_sink(tls=server_tls)
    client = await Raw.connect(running)
    await client.ehlo()
    assert (await client.command(b"MAIL FROM:<a@b>")).code == 250
    # a client must wait for 220; bytes sent early in clear must not be obeyed
    # once TLS is up (the CVE-2011-0411 class of bugs)
    await client.send(b"STARTTLS\r\nRSET\r\n")
    answer = await client.reply()
    assert (answer.code, answer.enhanced) == (220, "2.0.0")
    assert not client.buf
    tls = trio.SSLStream(client.stream, client_tls, server_hostname="127.0.0.1")
    with trio.fail_after(TIMEOUT):
        await tls.do_handshake()
    client.stream = tls
    # nothing from the clear part survives: no RSET reply, no EHLO, no MAIL
    answer = await client.command(b"MAIL FROM:<a@b>")
    assert (answer.code, answer.enhanced) == (503, "5.5.1")
    answer = await client.ehlo()
    assert not any(line.startswith("STARTTLS") for line in answer.lines)
    answer = await client.command(b"STARTTLS")
    assert (answer.code, answer.enhanced) == (503, "5.5.1")
    await client.envelope()
    assert (await client.command(b"DATA")).code == 354
    assert (await client.command(b"hi\r\n.")).code == 250
    assert running.sink.stats.octets == 4


async def test_starttls_with_an_argument(start_sink: StartSink, server_tls: ssl.SSLContext) -> None:
    client = await Raw.connect(await start_sink(tls=server_tls))
    await client.ehlo()
    answer = await client.command(b"STARTTLS now")
    assert (answer.code, answer.enhanced) == (501, "5.5.4")
    await client.expect_alive()


async def test_failed_handshake_closes_only_that_session(
    start_sink: StartSink, server_tls: ssl.SSLContext
) -> None:
    running = await start_sink(tls=server_tls)
    client = await Raw.connect(running)
    assert (await client.command(b"STARTTLS")).code == 220
    await client.send(b"this is not a TLS ClientHello\r\n" * 4)
    with trio.fail_after(TIMEOUT):
        while await client.stream.receive_some(65536):
            pass
    other = await Raw.connect(running)
    await other.expect_alive()


async def test_implicit_tls(
    start_sink: StartSink, server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    running = await start_sink(tls=server_tls, implicit_tls=True)

    def session() -> dict[str, str]:
        with smtplib.SMTP_SSL(
            running.host,
            running.port,
            local_hostname="client.test",
            timeout=TIMEOUT,
            context=client_tls,
        ) as client:
            client.ehlo()
            client.sendmail("ann@example.org", ["bob@example.net"], MESSAGE)
            return dict(client.esmtp_features)

    features = await in_thread(session)
    assert "starttls" not in features
    assert running.sink.stats.messages == 1


def test_implicit_tls_needs_a_context() -> None:
    with pytest.raises(ValueError, match="tls="):
        Sink(SinkConfig(hostname="sink.test", implicit_tls=True))


@pytest.mark.parametrize("mode", ["listen-tls", "starttls"])
def test_record_reaches_the_embedded_sink_over_tls(tmp_path: Path, mode: str) -> None:
    """``record`` hands its TLS settings to the embedded sink: with
    ``--listen-tls`` the proxy dials the sink with implicit TLS; without it a
    client's STARTTLS is passed on to the sink."""
    port = free_port()
    args = ["record", "--listen", f"127.0.0.1:{port}", "--recordings", str(tmp_path / "rec")]
    if mode == "listen-tls":
        args.append("--listen-tls")
    with smtpproxy_process(*args, cwd=tmp_path) as proxy:
        assert "embedded sink" in proxy.banner
        ctx = ssl.create_default_context(cafile=str(tmp_path / ".smtpproxy-home" / CA_CERT))
        if mode == "listen-tls":
            with smtplib.SMTP_SSL(*proxy.address, context=ctx, timeout=TIMEOUT) as client:
                refused = client.sendmail("ann@example.org", ["bob@example.net"], MESSAGE)
        else:
            with smtplib.SMTP(*proxy.address, timeout=TIMEOUT) as client:
                client.ehlo()
                assert client.has_extn("starttls")
                assert client.starttls(context=ctx)[0] == 220
                refused = client.sendmail("ann@example.org", ["bob@example.net"], MESSAGE)
        assert refused == {}
        summary = proxy.wait_stdout("== session ")
        proxy.finish()
    assert "1 accepted" in summary and "TLS" in summary
