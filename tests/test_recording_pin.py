"""Recordings pinned byte for byte.

Each case drives a Conversation through the test scripts (``scripts.py``)
as the relay does and reports it to the real ``Recorder``, with a fixed
clock, a fixed session id and a fixed start time, and compares the file
with a golden copy under ``tests/data/pinned/``. The golden files were
written by the single-module ``recording.py`` before it was split into a
package (issue 13, item 5), so these tests prove the split changed no
byte of what the writer writes, in the input layout (``derive=True``,
what the proxy writes by default) and the event layout (``derive=False``,
what ``--redact`` writes), and that the reader still reads each file as
the events seen live.

A change to the format that is meant (a new field, a new line kind) will
fail here. Regenerate the golden files deliberately, from the repository
root, and commit them with the change that explains them::

    .venv/bin/python tests/test_recording_pin.py

Then read the diff of ``tests/data/pinned/``: every changed byte is a change
to what users' recordings hold.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from scripts import SCRIPTS

from smtpproxy.auth import Redactor
from smtpproxy.events import Event, Note, Side, TlsEstablished
from smtpproxy.protocol import Conversation
from smtpproxy.recording import Recorder, note_in_place, read_recording

PINNED = Path(__file__).parent / "data" / "pinned"
SESSION = "0000c0de"
START = dt.datetime(2026, 11, 29, 3, 23, 30, 793000, tzinfo=dt.UTC)
FILE_NAME = "20261129T032330793Z-0000c0de.jsonl"
CLOCK_START = 1000.0
#: the clock advances this much before each step (not a round number, so
#: the rounding of ``t`` to microseconds is pinned too)
TICK = 0.0013

C, S = Side.CLIENT, Side.SERVER
#: STARTTLS answered by the proxy (a fed note), the TLS handshake (an event
#: made outside the Conversation), plaintext injected after STARTTLS, a read
#: that is not UTF-8 and reads cut mid-line, and a note at the end.
TLS_AND_NOTES: list[Any] = [
    (S, b"220 mx\r\n"), (C, b"EHLO c\r\n"), (S, b"250-mx\r\n250 STARTTLS\r\n"),
    (C, b"STARTTLS\r\nMAIL FROM:<evil@x>\r\n"),
    ("note", S, b"220 2.0.0 Ready (answered by smtpproxy)\r\n"),
    ("event", TlsEstablished(C, "TLSv1.3", "TLS_AES_256_GCM_SHA384")),
    "tls_established",
    (C, b"EHLO c\r\n"), (S, b"250-mx\r\n250 AUTH PLAIN\r\n"),
    (C, b"AUTH PLAIN AHUAcA==\r\n"), (S, b"235 ok\r\n"),
    (C, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n"), (S, b"250 ok\r\n250 ok\r\n354 go\r\n"),
    (C, b"Subject: caf\xc3\xa9 \xff\r\n\r\nhal"), (C, b"f a line\r\n.\r\n"), (S, b"250 queued\r\n"),
    (C, b"QUIT\r\n"), (S, b"221 bye\r\n"),
    ("event", Note(S, "idle", "a note the proxy made")),
]  # fmt: skip

#: Bodies over the writers' fast-path thresholds (256 octets for an input
#: line, 4 KiB for an event line): plain text, and text with a control
#: character and a quote that the fast path leaves to the json module.
LARGE_BODY: list[Any] = [
    (S, b"220 mx\r\n"), (C, b"EHLO c\r\n"), (S, b"250 mx\r\n"),
    (C, b"MAIL FROM:<a@x>\r\n"), (S, b"250 ok\r\n"), (C, b"RCPT TO:<b@y>\r\n"), (S, b"250 ok\r\n"),
    (C, b"DATA\r\n"), (S, b"354 go\r\n"),
    (C, b"Subject: big\r\n\r\n" + b"a line of text \xc3\xa9\r\n" * 300),
    (C, b'"quoted" \\ \x01 ' * 300 + b"\r\n.\r\n"), (S, b"250 ok\r\n"),
    (C, b"QUIT\r\n"), (S, b"221 bye\r\n"),
]  # fmt: skip

#: name -> (steps, derive, redact, header extra, close extra)
CASES: dict[str, tuple[Sequence[Any], bool, bool, dict[str, Any], dict[str, Any] | None]] = {
    **{f"{name}-derived": (script, True, False, {}, None) for name, script in SCRIPTS.items()},
    **{f"{name}-events": (script, False, False, {}, None) for name, script in SCRIPTS.items()},
    "seed_auth_login-redacted": (SCRIPTS["seed_auth_login"], False, True, {}, None),
    "tls_and_notes-derived": (TLS_AND_NOTES, True, False, {}, None),
    "tls_and_notes-redacted": (TLS_AND_NOTES, False, True, {}, None),
    "large_body-derived": (LARGE_BODY, True, False, {}, None),
    "large_body-events": (LARGE_BODY, False, False, {}, None),
    "implicit_tls-derived": (["implicit_tls", *SCRIPTS["seed_auth_plain"]], True, False, {}, None),
    "replay-derived": (
        SCRIPTS["pipelined"],
        True,
        False,
        {"replay_of": "/tmp/recordings/x.jsonl"},
        {"differences": 2},
    ),
}


def record(folder: Path, case: str) -> tuple[Path, list[tuple[float, Event]]]:
    """Write ``case`` with the real Recorder into ``folder``, as the relay
    reports a session; (the file, the events seen live with their times)."""
    steps, derive, redacting, header, close_extra = CASES[case]
    conv = Conversation()
    redactor = Redactor() if redacting else None
    rec = Recorder.create(
        folder,
        SESSION,
        START,
        CLOCK_START,
        derive=derive,
        client="127.0.0.1:40064",
        listen="127.0.0.1:2525",
        upstream="127.0.0.1:25",
        **header,
    )
    seen: list[tuple[float, Event]] = []
    clock = CLOCK_START

    def tidy(events: Sequence[Event]) -> list[Event]:
        return [redactor(e) for e in events] if redactor is not None else list(events)

    for step in steps:
        clock += TICK
        if step == "implicit_tls":
            conv.implicit_tls()
            events: list[Event] = []
            rec.report(clock, events, call=step)
        elif step == "tls_established":
            events = tidy(conv.tls_established())
            rec.report(clock, events, call=step)
        elif step[0] == "note":
            _, side, data = step
            note = Note(side, "proxy_reply", "answered by the proxy", data)
            events = tidy(note_in_place(note, conv.feed(side, data)))
            rec.report(clock, events, fed=(side, data), note=note)
        elif step[0] == "event":
            events = tidy([step[1]])
            rec.report(clock, events)
        else:
            side, data = step
            events = tidy(conv.feed(side, data))
            rec.report(clock, events, fed=(side, data))
        seen += [(round(clock - CLOCK_START, 6), e) for e in events]
    clock += TICK
    events = tidy(conv.close())
    rec.report(clock, events, call="close")
    rec.close(clock, "client", "client closed the connection", close_extra)
    seen += [(round(clock - CLOCK_START, 6), e) for e in events]
    assert rec.error is None and rec.dropped == 0
    return rec.path, seen


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_recording_is_byte_identical_to_the_pinned_one(tmp_path: Path, case: str) -> None:
    path, _ = record(tmp_path, case)
    assert path.name == FILE_NAME
    golden = PINNED / f"{case}.jsonl"
    assert golden.is_file(), f"{golden} is missing: run python tests/test_recording_pin.py"
    assert path.read_bytes() == golden.read_bytes(), case


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_pinned_recording_reads_as_the_events_seen_live(tmp_path: Path, case: str) -> None:
    _, seen = record(tmp_path, case)
    back = read_recording(PINNED / f"{case}.jsonl")
    assert back.header.session == SESSION and back.header.start == "2026-11-29T03:23:30.793Z"
    assert [(e.t, e.event) for e in back.entries] == seen
    assert back.close is not None and back.close.reason == "client closed the connection"
    _, _, _, header, close_extra = CASES[case]
    assert dict(back.header.extra) == header
    for key, value in (close_extra or {}).items():
        assert back.close.totals[key] == value


def test_the_pins_cover_both_layouts_and_every_line_kind() -> None:
    """The golden files hold input lines (text and base64), both calls, a fed
    note, event lines and close lines with and without totals."""
    text = "".join(p.read_text() for p in sorted(PINNED.glob("*.jsonl")))
    for needle in (
        '"c",',
        '"s",',
        '"c64"',
        '"tls_established"]',
        '"implicit_tls"]',
        '"fed":true',
        '"type":"close"',
    ):
        assert needle in text, needle
    for needle in (
        '"type":"command"',
        '"type":"reply"',
        '"type":"data"',
        '"type":"message_end"',
        '"totals":{',
    ):
        assert needle in text, needle
    assert '"redacted"' in text


def regenerate() -> None:
    """Write every golden file again from the code as it is now."""
    import tempfile

    PINNED.mkdir(parents=True, exist_ok=True)
    for case in sorted(CASES):
        with tempfile.TemporaryDirectory() as tmp:
            path, _ = record(Path(tmp), case)
            (PINNED / f"{case}.jsonl").write_bytes(path.read_bytes())
        print(f"wrote {PINNED / case}.jsonl")


if __name__ == "__main__":
    regenerate()
