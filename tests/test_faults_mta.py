"""Real MTAs as the client of ``smtpproxy record`` (issue 14): Postfix and
Exim relay a message through the proxy, which greylists it
(``rcpt: 451 4.7.1 Greylisted, greylist=2s``); the MTA defers, tries again on
its own after its retry interval, and the message arrives on the second try.
And Exim, the first real client here that sends BDAT when the server offers
CHUNKING (RFC 3030), through the proxy to Postfix.

The MTAs, the proxy (the real command, as a child process) and the servers
run on 127.0.0.1 only. Every wait is bounded: the MTA's queue and the
server's mailbox are looked at until a deadline, the proxy's output is read
with a timeout. The MTAs are set up by tests/mta_clients.py (see
docs/interop.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path

import pytest
from conftest import Received, run_aiosmtpd, run_smtpproxy_once, smtpproxy_process
from mta_clients import (
    DELIVERY_TIMEOUT,
    RETRY_SECONDS,
    MtaClient,
    run_exim_client,
    run_postfix_client,
)
from servers import Postfix, postfix_server, server_ca, split_trace

__all__ = ["postfix_server", "server_ca"]  # fixtures

from smtpproxy.events import Command, MessageData, MessageEnd, Note, NoteKind, Reply
from smtpproxy.recording import Recording, read_recording

SENDER, RCPT = "ann@example.org", "bob@example.net"
GREYLIST = "rcpt: 451 4.7.1 Greylisted, greylist=2s"
GREYLIST_SECONDS = 2.0
BODY = b"hello from a real MTA\r\n"
MESSAGE = b"From: ann@example.org\r\nTo: bob@example.net\r\nSubject: greylisted\r\n\r\n" + BODY

RunMta = Callable[[tuple[str, int]], AbstractContextManager[MtaClient]]
MTAS = [
    pytest.param(run_postfix_client, id="postfix"),
    pytest.param(run_exim_client, id="exim"),
]

assert RETRY_SECONDS > GREYLIST_SECONDS  # the MTA's second try is past the window


def record_argv(upstream: tuple[str, int], recordings: Path, *rules: str) -> list[str]:
    # one worker: a rule's greylist= window lives in the process that saw
    # the first try (see the report of issue 14 / docs/faults.md)
    argv = ["record", "--listen", "127.0.0.1:0", "--quiet", "--workers", "1"]
    argv += ["--recordings", str(recordings), "--upstream", f"{upstream[0]}:{upstream[1]}"]
    for rule in rules:
        argv += ["--fault", rule]
    return argv


def wait_messages(received: Received, count: int, mta: MtaClient) -> None:
    """Wait (bounded) until aiosmtpd holds ``count`` messages."""
    deadline = time.monotonic() + DELIVERY_TIMEOUT
    while True:
        with received.lock:
            if len(received.messages) >= count:
                return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{mta.name} delivered nothing in {DELIVERY_TIMEOUT}s: {mta.log.read_text()}"
            )
        time.sleep(0.1)  # between looks, bounded by the deadline


def by_start(folder: Path) -> list[Recording]:
    return sorted(
        (read_recording(p) for p in folder.glob("*.jsonl")),
        key=lambda r: datetime.fromisoformat(r.header.start),
    )


def when(rec: Recording, match: Callable[[object], bool]) -> float:
    """The time (epoch seconds) of the first event of ``rec`` that ``match``es."""
    start = datetime.fromisoformat(rec.header.start).timestamp()
    return start + next(e.t for e in rec.entries if match(e.event))


def faults(rec: Recording) -> list[Note]:
    return [e for e in rec.events() if isinstance(e, Note) and e.kind == NoteKind.FAULT]


def show(path: Path, cwd: Path) -> str:
    done = run_smtpproxy_once("show", str(path), cwd=cwd)
    assert done.returncode == 0, done.stderr
    return done.stdout


# -- 1, 2. greylisted, deferred, delivered on the MTA's own retry -----------------


@pytest.mark.parametrize("run_mta", MTAS)
def test_mta_retries_after_greylisting(tmp_path: Path, run_mta: RunMta) -> None:
    rec_dir = tmp_path / "recordings"
    with (
        run_aiosmtpd() as server,
        smtpproxy_process(*record_argv(server.address, rec_dir, GREYLIST), cwd=tmp_path) as proxy,
        run_mta(proxy.address) as mta,
    ):
        mta.send(SENDER, [RCPT], MESSAGE)
        wait_messages(server.received, 1, mta)
        mta.wait_queue_empty()
        proxy.wait_stdout(" 1 accepted")  # the second session is over
        done = proxy.finish()
        log = mta.log.read_text(errors="replace")

    assert done.returncode == 0, done.stderr
    assert "2 session(s), 2 recording(s)" in done.stderr
    # the MTA took the 451 as a temporary failure, then delivered
    assert "451 4.7.1 Greylisted" in log
    (got,) = server.received.messages
    assert got["from"] == SENDER and got["to"] == [RCPT]
    head, body = got["content"].split(b"\r\n\r\n", 1)
    assert body == BODY and b"\r\nSubject: greylisted\r\n" in head

    first, second = by_start(rec_dir)
    (note,) = faults(first)
    assert GREYLIST in note.text and note.raw == b"451 4.7.1 Greylisted\r\n"
    assert RCPT in [e.path for e in first.events() if isinstance(e, Command) and e.verb == "RCPT"]
    assert not [e for e in first.events() if isinstance(e, MessageEnd)]
    assert first.close is not None and first.close.totals["messages_accepted"] == 0
    assert "!! fault " + GREYLIST + ": proxy answered RCPT: 451 4.7.1 Greylisted" in show(
        first.path, tmp_path
    )

    assert faults(second) == []
    (rcpt_ok,) = [e for e in second.events() if isinstance(e, Reply) and e.command == "RCPT"]
    assert rcpt_ok.code == 250
    assert second.close is not None and second.close.totals["messages_accepted"] == 1
    # the second try came after the greylisting window, on the MTA's own clock
    greylisted = when(first, lambda e: e is note)
    retried = when(second, lambda e: isinstance(e, Command) and e.verb == "RCPT")
    assert retried - greylisted >= GREYLIST_SECONDS


# -- 3. Exim sends BDAT to a server offering CHUNKING ------------------------------

#: large enough that Exim sends the message in more than one BDAT chunk
BIG_BODY = b"".join(b"line %06d " % i + b"x" * 60 + b"\r\n" for i in range(3000))
BIG = b"From: ann@example.org\r\nTo: bob@example.net\r\nSubject: chunks\r\n\r\n" + BIG_BODY


@pytest.fixture
def exim_to_postfix(
    tmp_path: Path, postfix_server: Postfix, request: pytest.FixtureRequest
) -> Iterator[tuple[Recording, str]]:
    """Exim -> record (with the rules of ``request.param``) -> Postfix, one
    big message; the recording and what ``record`` printed."""
    rec_dir = tmp_path / "recordings"
    argv = record_argv(postfix_server.address, rec_dir, *request.param)
    with (
        smtpproxy_process(*argv, cwd=tmp_path) as proxy,
        run_exim_client(proxy.address) as mta,
    ):
        mta.send(SENDER, [RCPT], BIG)
        mta.wait_queue_empty()
        proxy.wait_stdout(" 1 accepted")
        done = proxy.finish()
        log = mta.log.read_text(errors="replace")
    assert done.returncode == 0, done.stderr
    assert "=> bob@example.net" in log and "Completed" in log, log
    (path,) = rec_dir.glob("*.jsonl")
    yield read_recording(path), done.stdout


@pytest.mark.parametrize(
    "exim_to_postfix",
    # no rules: the plain relay; a rule that never fires: the path with a plan
    [pytest.param((), id="no-rules"), pytest.param(("rcpt#2: 452 4.5.3 Too many",), id="plan")],
    indirect=True,
)
def test_exim_sends_bdat_through_the_proxy(
    exim_to_postfix: tuple[Recording, str], postfix_server: Postfix, tmp_path: Path
) -> None:
    rec, _ = exim_to_postfix
    ehlo = next(e for e in rec.events() if isinstance(e, Reply) and e.command == "EHLO")
    assert ehlo.capabilities is not None and "CHUNKING" in ehlo.capabilities
    verbs = [e.verb for e in rec.events() if isinstance(e, Command)]
    assert "DATA" not in verbs
    chunks = [e for e in rec.events() if isinstance(e, Command) and e.verb == "BDAT"]
    assert len(chunks) >= 2, verbs
    assert [c.arg.upper().endswith(" LAST") for c in chunks] == [False] * (len(chunks) - 1) + [True]
    sizes = [int(c.arg.split()[0]) for c in chunks]

    # what the recording holds of the message is what Postfix stored
    sent = b"".join(e.raw for e in rec.events() if isinstance(e, MessageData))
    assert all(e.via == "BDAT" for e in rec.events() if isinstance(e, MessageData))
    assert len(sent) == sum(sizes)
    (end,) = [e for e in rec.events() if isinstance(e, MessageEnd)]
    assert end.via == "BDAT" and end.complete and end.size == sum(sizes)
    assert end.headers["Subject"] == "chunks"
    (final,) = [e for e in rec.events() if isinstance(e, Reply) and e.ends_message]
    assert final.code == 250
    stored = postfix_server.stored(final.text)
    # Postfix's Received: on top of exactly what the recording holds
    assert stored.endswith(sent)
    trace, rest = split_trace(stored[: -len(sent)], postfix_server.trace_fields)
    assert len(trace) == 1 and b"by postfix.test" in trace[0] and rest == b""
    assert sent.split(b"\r\n\r\n", 1)[1] == BIG_BODY  # the body arrived intact
    assert rec.close is not None and rec.close.totals["messages_accepted"] == 1
    assert faults(rec) == []

    shown = show(rec.path, tmp_path)
    for size in sizes[:-1]:
        assert f"-> BDAT {size}\n" in shown
    assert f"-> BDAT {sizes[-1]} LAST\n" in shown
    assert f"== message via BDAT: {sum(sizes)} octets, From: ann@example.org" in shown
