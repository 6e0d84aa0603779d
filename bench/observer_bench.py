#!/usr/bin/env python3
"""Micro benchmark of what the proxy does per read besides moving bytes.

    python bench/observer_bench.py [--messages N]

Feeds the eight reads of one `small` message as smtp-source sends it (MAIL,
RCPT, DATA, the 1 KiB body, and the four replies) through the protocol
module, then hands the read and its events to what the relay hands them to:
the session summary, a real Recorder writing to a scratch file, and a quiet
transcript. Prints microseconds per message (the best of three runs), for the
default recording layout (the reads are written) and the event layout that
``--redact`` uses. No sockets, no trio: the part of the proxy's cost that is
Python, per message.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import tempfile
import time
from pathlib import Path

from smtpproxy.events import Side
from smtpproxy.protocol import Conversation
from smtpproxy.recording import Recorder
from smtpproxy.render import Transcript
from smtpproxy.summary import SessionSummary

C, S = Side.CLIENT, Side.SERVER
BODY = (
    b"From: <foo@vm>\r\nTo: <foo@vm>\r\nDate: Sun, 29 Nov 2026 04:48:21 +0000 (UTC)\r\n"
    b"Message-Id: <6ee7.0010.2ec3@vm>\r\n\r\n"
    + b"".join(
        b"%dXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX\r\n" % i
        for i in range(13)
    )
    + b".\r\n"
)
READS = [
    (C, b"MAIL FROM:<foo@vm>\r\n"),
    (S, b"250 2.1.0 Ok\r\n"),
    (C, b"RCPT TO:<foo@vm>\r\n"),
    (S, b"250 2.1.5 Ok\r\n"),
    (C, b"DATA\r\n"),
    (S, b"354 End data with <CR><LF>.<CR><LF>\r\n"),
    (C, BODY),
    (S, b"250 2.0.0 Ok\r\n"),
]


def run(messages: int, folder: Path, derive: bool = True) -> float:
    conv = Conversation()
    for side, data in [(S, b"220 sink ESMTP\r\n"), (C, b"HELO vm\r\n"), (S, b"250 sink\r\n")]:
        conv.feed(side, data)
    recorder = Recorder.create(
        folder,
        f"{time.monotonic_ns() % 2**64:016x}",
        dt.datetime.now(dt.UTC),
        0.0,
        derive=derive,
        client="c",
        listen="l",
        upstream="u",
    )
    summary = SessionSummary()
    transcript = Transcript(io.StringIO(), color=False, quiet=True)
    start = time.perf_counter()
    for i in range(messages):
        for side, data in READS:
            events = conv.feed(side, data)
            recorder.feed(1.0 + i, side, data, events)
            if events:
                summary.update(events)
                transcript.events("b", events)
    elapsed = time.perf_counter() - start
    recorder.close(2.0, "client", "done")
    return elapsed / messages * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--messages", type=int, default=10000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="smtpproxy-observer-") as tmp:
        for derive, layout in (
            (True, "reads written (default)"),
            (False, "events written (--redact)"),
        ):
            run(1000, Path(tmp), derive)  # warm up
            best = min(run(args.messages, Path(tmp), derive) for _ in range(3))
            print(
                f"observer, {layout}: {best:.1f} us per message "
                "(8 reads, 9 events; parse, summary, recorder, quiet transcript)"
            )


if __name__ == "__main__":
    main()
