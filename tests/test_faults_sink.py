"""Fault rules on the embedded server, with real peers: ``smtpproxy sink
--fault ...`` run as a process for smtplib and swaks, and the Sink in this
process for the actions that end or stall a session (raw loopback sockets).
Every wait is bounded."""

from __future__ import annotations

import signal
import smtplib
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from io import StringIO
from pathlib import Path

import pytest
import trio
from conftest import run_smtpproxy_once, smtpproxy_process, swaks_argv

from smtpproxy.faults import FaultPlan, parse_rule
from smtpproxy.render import Transcript
from smtpproxy.server import Sink, SinkConfig

TIMEOUT = 10
MESSAGE = b"From: ann@example.org\r\nTo: bob@example.net\r\nSubject: faults\r\n\r\nHello\r\n"


def sink_args(*rules: str) -> list[str]:
    args = ["sink", "--listen", "127.0.0.1:0"]
    for rule in rules:
        args += ["--fault", rule]
    return args


def test_second_recipient_refused(tmp_path: Path) -> None:
    rule = "rcpt#2: 452 4.5.3 Too many recipients"
    with smtpproxy_process(*sink_args(rule), cwd=tmp_path) as sink:
        with smtplib.SMTP(*sink.address, timeout=TIMEOUT) as client:
            refused = client.sendmail(
                "ann@example.org",
                ["bob@example.net", "carol@example.net", "dan@example.net"],
                MESSAGE,
            )
        line = sink.wait_stdout("!! fault")
        done = sink.finish(signal.SIGINT)
    assert refused == {"carol@example.net": (452, b"4.5.3 Too many recipients")}
    assert line.endswith(f"!! fault {rule}: answered 452 4.5.3 Too many recipients")
    assert done.stdout.count("!! fault") == 1
    assert "1 session(s), 1 message(s) accepted" in done.stderr


@pytest.mark.peer("swaks")
def test_swaks_reports_starttls_refused(tmp_path: Path) -> None:
    message = tmp_path / "message.eml"
    message.write_bytes(MESSAGE)
    rules = ("ehlo: add STARTTLS", "starttls: 454 4.7.0 TLS not available")
    with smtpproxy_process(*sink_args(*rules), cwd=tmp_path) as sink:
        swaks = subprocess.run(
            swaks_argv(*sink.address, message, "--tls"),
            capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
        done = sink.finish(signal.SIGINT)
    # what swaks says when a server refuses STARTTLS in real life: exit 29
    assert swaks.returncode == 29, swaks.stdout + swaks.stderr
    assert "<** 454 4.7.0 TLS not available" in swaks.stdout
    assert "STARTTLS attempted but failed" in swaks.stdout + swaks.stderr
    assert "!! fault starttls: 454 4.7.0 TLS not available: answered 454" in done.stdout
    assert "0 message(s) accepted" in done.stderr


def test_dot_replaced_the_sink_keeps_the_message(tmp_path: Path) -> None:
    rule = "dot: replace 451 4.3.0 Lost"
    with smtpproxy_process(*sink_args(rule), cwd=tmp_path) as sink:
        with smtplib.SMTP(*sink.address, timeout=TIMEOUT) as client:
            with pytest.raises(smtplib.SMTPDataError) as caught:
                client.sendmail("ann@example.org", ["bob@example.net"], MESSAGE)
            assert caught.value.smtp_code == 451
            assert caught.value.smtp_error == b"4.3.0 Lost"
        done = sink.finish(signal.SIGINT)
    # the duplicate-delivery case: the client believes it failed, the server has it
    assert "1 message(s) accepted" in done.stderr
    assert (
        f"!! fault {rule}: replaced the reply with 451 4.3.0 Lost; the sink accepted" in done.stdout
    )


def test_dot_reply_withholds_the_message(tmp_path: Path) -> None:
    with smtpproxy_process(*sink_args("dot: 554 5.7.1 Rejected, times=1"), cwd=tmp_path) as sink:
        with smtplib.SMTP(*sink.address, timeout=TIMEOUT) as client:
            with pytest.raises(smtplib.SMTPDataError):
                client.sendmail("ann@example.org", ["bob@example.net"], MESSAGE)
            # the transaction ended: a new one goes through
            assert client.sendmail("ann@example.org", ["bob@example.net"], MESSAGE) == {}
        done = sink.finish(signal.SIGINT)
    assert "1 message(s) accepted" in done.stderr
    assert "the message was not accepted" in done.stdout


def test_ehlo_capabilities_removed(tmp_path: Path) -> None:
    with smtpproxy_process(*sink_args("ehlo: remove PIPELINING CHUNKING"), cwd=tmp_path) as sink:
        with smtplib.SMTP(*sink.address, timeout=TIMEOUT) as client:
            client.ehlo("client.example")
            assert not client.has_extn("pipelining") and not client.has_extn("chunking")
            assert client.has_extn("8bitmime") and client.has_extn("size")
            assert client.sendmail("ann@example.org", ["bob@example.net"], MESSAGE) == {}
        sink.finish(signal.SIGINT)


def write_rules(path: Path, *rules: str) -> None:
    path.write_text("".join(f'[[fault]]\nrule = "{r}"\n\n' for r in rules))


def mail_code(address: tuple[str, int]) -> int:
    with smtplib.SMTP(*address, timeout=TIMEOUT) as client:
        client.ehlo("client.example")
        code, _ = client.mail("ann@example.org")
        return code


def test_sighup_rereads_the_faults_file(tmp_path: Path) -> None:
    rules = tmp_path / "faults.toml"
    write_rules(rules, "mail: 451 4.3.0 First rules")
    args = ["sink", "--listen", "127.0.0.1:0", "--faults", str(rules)]
    with smtpproxy_process(*args, cwd=tmp_path) as sink:
        assert mail_code(sink.address) == 451
        write_rules(rules, "mail: 452 4.3.1 Second rules")
        sink.proc.send_signal(signal.SIGHUP)
        sink._wait(sink.err, b"SIGHUP: 1 fault rule(s) read", TIMEOUT)
        assert mail_code(sink.address) == 452
        # a file that no longer parses keeps the rules in force
        rules.write_text('[[fault]]\nrule = "mail#x: 452 x"\n')
        sink.proc.send_signal(signal.SIGHUP)
        line = sink._wait(sink.err, b"the rules in force stay", TIMEOUT).decode()
        assert "column 6" in line
        assert mail_code(sink.address) == 452
        assert sink.proc.poll() is None
        done = sink.finish(signal.SIGTERM)
    assert done.returncode == 0
    assert "3 session(s)" in done.stderr


def test_sighup_still_stops_without_a_faults_file(tmp_path: Path) -> None:
    with smtpproxy_process(*sink_args("mail: 451 x"), cwd=tmp_path) as sink:
        done = sink.finish(signal.SIGHUP)
    assert done.returncode == 0 and "0 session(s)" in done.stderr


@pytest.mark.parametrize("command", ["sink", "record"])
@pytest.mark.parametrize(
    ("rule", "problem"),
    [
        ("rcpt#x: 452 4.5.3 Too many", "column 6: the occurrence after '#' must be a number"),
        ("rcpt: 999 Nope", "column 7: reply code 999 is outside 200-599"),
        ("rcpt 452 Nope", "column 5: a ':' must follow the step"),
        ("rcpt: remove CHUNKING", "column 7: step 'rcpt' cannot take 'remove'"),
    ],
)
def test_bad_rule_is_exit_2_in_one_line(
    tmp_path: Path, command: str, rule: str, problem: str
) -> None:
    done = run_smtpproxy_once(command, "--listen", "127.0.0.1:0", "--fault", rule, cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    error = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1 and f"bad fault rule {rule!r}: {problem}" in error[0]
    assert "(example: 'rcpt#2: 452 4.5.3 Too many recipients')" in error[0]


def test_bad_faults_file_is_exit_2(tmp_path: Path) -> None:
    rules = tmp_path / "faults.toml"
    rules.write_text("[[fault]]\nrule = 'dot: remove X'\n")
    done = run_smtpproxy_once("sink", "--faults", str(rules), cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "step 'dot' cannot take 'remove'" in done.stderr


def test_cert_fault_is_refused_by_the_sink(tmp_path: Path) -> None:
    done = run_smtpproxy_once("sink", "--fault", "tls: cert expired", cwd=tmp_path)
    assert done.returncode == 2 and "works on 'smtpproxy record'" in done.stderr


# -------------------------------------------- in this process: ending a session

Talk = Callable[[bytes], Awaitable[bytes]]


async def start(
    nursery: trio.Nursery, *rules: str, idle: float = 300.0
) -> tuple[Sink, StringIO, int]:
    out = StringIO()
    config = SinkConfig(
        hostname="sink.test",
        idle_timeout=idle,
        faults=FaultPlan([parse_rule(r) for r in rules]),
        transcript=Transcript(out),
    )
    sink = Sink(config)
    _, port = await nursery.start(sink.serve, "127.0.0.1", 0)
    return sink, out, port


async def read_until(stream: trio.SocketStream, end: bytes) -> bytes:
    data = b""
    while not data.endswith(end):
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
    return data


async def read_lines(stream: trio.SocketStream, count: int) -> list[bytes]:
    data = b""
    while data.count(b"\r\n") < count:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n")[:-1]


@pytest.fixture
async def nursery() -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as n:
        yield n
        n.cancel_scope.cancel()


async def test_close_at_rcpt(nursery: trio.Nursery) -> None:
    _, out, port = await start(nursery, "rcpt: close")
    with trio.fail_after(TIMEOUT):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await read_until(stream, b"\r\n")
            await stream.send_all(b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\n")
            data = await read_until(stream, b"never")
    assert data.endswith(b"250 2.1.0 sender ok\r\n")  # the replies before it, then FIN
    assert "!! fault rcpt: close: closed the connection" in out.getvalue()


async def test_reset_at_data(nursery: trio.Nursery) -> None:
    _, out, port = await start(nursery, "data: reset")
    with trio.fail_after(TIMEOUT):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await read_until(stream, b"\r\n")
            await stream.send_all(b"HELO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n")
            with pytest.raises(trio.BrokenResourceError) as caught:
                await read_until(stream, b"never")
    assert isinstance(caught.value.__cause__, ConnectionResetError)
    assert "reset the connection" in out.getvalue()


async def test_stall_obeys_the_idle_timeout(nursery: trio.Nursery) -> None:
    _, out, port = await start(nursery, "rcpt#2: stall", idle=0.5)
    with trio.fail_after(TIMEOUT):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await read_until(stream, b"\r\n")
            await stream.send_all(
                b"HELO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nRCPT TO:<c@y>\r\nNOOP\r\n"
            )
            data = await read_until(stream, b"never")
    # no answer to the second RCPT nor after it: only the idle timeout's 421
    assert data.split(b"\r\n")[:-1] == [
        b"250 sink.test", b"250 2.1.0 sender ok", b"250 2.1.5 recipient ok",
        b"421 4.4.2 idle too long, closing",
    ]  # fmt: skip
    assert "stalled (no answer)" in out.getvalue()


async def test_greeting_replaced_and_connect_refused(nursery: trio.Nursery) -> None:
    _, out, port = await start(
        nursery, "session#1 greeting: 554 5.3.2 Not now", "session#2 connect: 421 4.3.2 Busy"
    )
    with trio.fail_after(TIMEOUT):
        async with await trio.open_tcp_stream("127.0.0.1", port) as first:
            assert await read_until(first, b"\r\n") == b"554 5.3.2 Not now\r\n"
            await first.send_all(b"QUIT\r\n")
            assert await read_until(first, b"\r\n") == b"221 2.0.0 bye\r\n"
        async with await trio.open_tcp_stream("127.0.0.1", port) as second:
            assert await read_until(second, b"never") == b"421 4.3.2 Busy\r\n"


async def test_bdat_last_answered_by_the_dot_rule(nursery: trio.Nursery) -> None:
    sink, out, port = await start(nursery, "dot#1: 452 4.3.1 Out of space", "bdat#1: delay 10ms")
    with trio.fail_after(TIMEOUT):
        async with await trio.open_tcp_stream("127.0.0.1", port) as stream:
            await read_until(stream, b"\r\n")
            await stream.send_all(b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT 5\r\nHello")
            await read_until(stream, b"250 2.0.0 5 octets received\r\n")
            await stream.send_all(b"BDAT 7 LAST\r\n, world")
            assert await read_until(stream, b"\r\n") == b"452 4.3.1 Out of space\r\n"
            await stream.send_all(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nBDAT 2 LAST\r\nok")
            replies = await read_lines(stream, 3)
    # the transaction the dot rule answered ended without a message; the next one is kept
    assert replies[0].startswith(b"250 2.1.0") and replies[2].startswith(b"250 2.0.0 Ok: queued")
    assert sink.stats.messages == 1
    assert "!! fault bdat#1: delay 10ms: delayed 0.01s" in out.getvalue()
    assert (
        "!! fault dot#1: 452 4.3.1 Out of space: answered 452 4.3.1 Out of space; the message was not accepted"
        in out.getvalue()
    )


@pytest.mark.parametrize("workers", [1, 2])
def test_record_rereads_the_faults_file_on_sighup(tmp_path: Path, workers: int) -> None:
    rules = tmp_path / "faults.toml"
    write_rules(rules, "mail: 451 4.3.0 First rules")
    with smtpproxy_process("sink", "--listen", "127.0.0.1:0", cwd=tmp_path) as upstream:
        args = [
            "record", "--listen", "127.0.0.1:0", "--recordings", str(tmp_path / "rec"),
            "--upstream", f"{upstream.host}:{upstream.port}", "--upstream-tls", "plain",
            "--workers", str(workers), "--faults", str(rules),
        ]  # fmt: skip
        with smtpproxy_process(*args, cwd=tmp_path) as proxy:
            write_rules(rules, "mail: 452 4.3.1 Second rules", "rcpt: 452 4.5.3 No")
            proxy.proc.send_signal(signal.SIGHUP)
            proxy._wait(proxy.err, b"SIGHUP: 2 fault rule(s) read", TIMEOUT)
            assert proxy.proc.poll() is None  # reloaded, not stopped
            done = proxy.finish(signal.SIGTERM)
        upstream.finish(signal.SIGINT)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
