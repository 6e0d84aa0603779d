"""The recording format: every event survives the writer and the reader,
including the fields the file leaves for the reader to derive."""

from __future__ import annotations

import json

from scripts import SCRIPTS

from smtpproxy.auth import redact
from smtpproxy.events import Command, Reply, Side
from smtpproxy.protocol import Conversation
from smtpproxy.recording import decode_event, encode_event


def events_of(script):  # type: ignore[no-untyped-def]
    conv = Conversation()
    out = []
    for side, data in script:
        out += conv.feed(side, data)
    return out + conv.close()


def test_every_event_round_trips_through_the_file_format() -> None:
    for name, script in SCRIPTS.items():
        for ev in events_of(script):
            for candidate in (ev, redact(ev)):
                line = json.dumps(encode_event(1.5, candidate))
                back = decode_event(json.loads(line))
                assert back.event == candidate, (name, candidate)
                assert back.t == 1.5


def test_derived_fields_are_not_written_but_read_back() -> None:
    events = events_of(SCRIPTS["seed_auth_login"])
    mail = next(e for e in events if isinstance(e, Reply) and e.command == "EHLO")
    d = encode_event(0.0, mail)
    assert "lines" not in d and "code" not in d and "side" not in d
    assert decode_event(d).event == mail
    cmd = next(e for e in events if isinstance(e, Command))
    full = encode_event(0.0, cmd, full=True)
    assert full["verb"] == "EHLO" and full["arg"] == "test" and full["side"] == "client"


def test_large_text_pieces_take_the_fast_path_and_read_back_the_same() -> None:
    from smtpproxy.events import MessageData
    from smtpproxy.recording import encode_line

    body = (b"line of text \xc3\xa9\t\r\n" * 1000) + b".\r\n"
    for raw in (body, body.replace(b"\t", b"\x01"), body + b'"quoted" \\ slash', b"\xff" * 5000):
        ev = MessageData(raw, "DATA", True)
        line = encode_line(0.25, ev)
        assert line.endswith(b"\n") and line.count(b"\n") == 1
        assert decode_event(json.loads(line)).event == ev


def test_the_quick_lines_are_the_lines_encode_event_gives() -> None:
    from smtpproxy.recording import _dumps, encode_line

    for script in SCRIPTS.values():
        for ev in events_of(script):
            for t in (0.0, 1.5, 123.4567891):
                assert encode_line(t, ev) == (_dumps(encode_event(t, ev)) + "\n").encode(), ev


def recorded(tmp_path, events, name="0000000a"):  # type: ignore[no-untyped-def]
    """Write ``events`` with the real Recorder in the event layout (what
    ``--redact`` writes); (the file's lines, the events read back)."""
    import datetime as dt

    from smtpproxy.recording import Recorder, read_recording

    rec = Recorder.create(
        tmp_path,
        name,
        dt.datetime.now(dt.UTC),
        0.0,
        derive=False,
        client="c",
        listen="l",
        upstream="u",
    )
    for ev in events:
        rec.write(1.0, [ev])
    rec.close(2.0, "client", "done")
    lines = [json.loads(x) for x in rec.path.read_text().splitlines()]
    return lines, [e.event for e in read_recording(rec.path).entries]


def test_message_headers_are_derived_from_the_data_not_written(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from smtpproxy.events import MessageEnd, Side

    body = b"Subject: =?utf-8?q?caf=C3=A9?=\r\nFrom: ann@example.org\r\n\r\nhi\r\n"
    script = [
        (Side.SERVER, b"220 mx\r\n"), (Side.CLIENT, b"EHLO c\r\n"), (Side.SERVER, b"250 mx\r\n"),
        # a transaction reset after its body began must not leak into the next
        (Side.CLIENT, b"MAIL FROM:<a@x>\r\n"), (Side.SERVER, b"250 ok\r\n"),
        (Side.CLIENT, b"DATA\r\n"), (Side.SERVER, b"354 go\r\n"),
        (Side.CLIENT, b"Subject: first\r\n"), (Side.CLIENT, b"\r\nbody\r\n.\r\n"), (Side.SERVER, b"250 ok\r\n"),
        (Side.CLIENT, b"MAIL FROM:<a@x>\r\n"), (Side.SERVER, b"250 ok\r\n"),
        (Side.CLIENT, b"DATA\r\n"), (Side.SERVER, b"354 go\r\n"),
        (Side.CLIENT, body[:20]), (Side.CLIENT, body[20:] + b".\r\n"), (Side.SERVER, b"250 ok\r\n"),
    ]  # fmt: skip
    events = events_of(script)
    ends = [e for e in events if isinstance(e, MessageEnd)]
    assert [e.headers.get("Subject") for e in ends] == ["first", "café"]
    lines, back = recorded(tmp_path, events)
    written = [x for x in lines if x.get("type") == "message_end"]
    assert len(written) == 2 and all("headers" not in x for x in written)
    assert back == events


def test_message_headers_are_written_when_the_data_would_not_give_them(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from smtpproxy.events import MessageData, MessageEnd

    # a Conversation never makes these; a writer fed them must not lose the headers
    odd = [
        MessageData(b"Subject: one\r\n\r\nx\r\n.\r\n", "DATA", True),
        MessageEnd(20, {"Subject": "two"}),
    ]
    lines, back = recorded(tmp_path, odd)
    (end,) = [x for x in lines if x.get("type") == "message_end"]
    assert end["headers"] == {"Subject": "two"}
    assert back == odd


# -- version 2: the input is written, the events are derived ------------------


def _live(tmp_path, steps, derive=True, redacting=False):  # type: ignore[no-untyped-def]
    """Drive a Conversation as the relay does and report it to a real
    Recorder: ``steps`` are (side, bytes) reads, ``"implicit_tls"``,
    ``"tls_established"``, ``("note", side, bytes)`` (bytes the proxy made
    itself and fed as that side's) and ``("event", ev)`` (made outside the
    Conversation). Returns (the events as seen live, with their times; the
    recording read back)."""
    import datetime as dt

    from smtpproxy.events import Note
    from smtpproxy.recording import Recorder, note_in_place, read_recording

    conv = Conversation()
    rec = Recorder.create(
        tmp_path,
        "0000000b",
        dt.datetime.now(dt.UTC),
        100.0,
        derive=derive,
        client="c",
        listen="l",
        upstream="u",
    )
    seen = []
    clock = 100.0

    def tidy(events):  # type: ignore[no-untyped-def]
        return [redact(e) for e in events] if redacting else list(events)

    for step in steps:
        clock += 0.001
        if step in ("implicit_tls", "tls_established"):
            if step == "implicit_tls":
                conv.implicit_tls()
                events = []
            else:
                events = tidy(conv.tls_established())
            rec.call(clock, step, events)
        elif step[0] == "note":
            _, side, data = step
            note = Note(side, "proxy_reply", "answered by the proxy", data)
            events = tidy(note_in_place(note, conv.feed(side, data)))
            rec.feed(clock, side, data, events, note)
        elif step[0] == "event":
            events = [step[1]]
            rec.write(clock, events)
        else:
            side, data = step
            events = tidy(conv.feed(side, data))
            rec.feed(clock, side, data, events)
        seen += [(round(clock - 100.0, 6), e) for e in events]
    clock += 0.001
    events = tidy(conv.close())
    rec.call(clock, "close", events)
    rec.close(clock, "client", "done")
    seen += [(round(clock - 100.0, 6), e) for e in events]
    return seen, read_recording(rec.path)


def test_every_event_is_derived_again_from_the_recorded_input(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Each test conversation, written as its input and read back: the same
    events at the same times as seen live, and the file holds nothing else."""
    for name, script in SCRIPTS.items():
        folder = tmp_path / name
        folder.mkdir()
        seen, back = _live(folder, script)
        assert [(e.t, e.event) for e in back.entries] == seen, name
        lines = back.path.read_text().splitlines()
        assert all(line.startswith("[") for line in lines[1:-1]), name
        assert back.close is not None and back.close.totals["bytes_from_client"] == sum(
            len(d) for s, d in script if s is Side.CLIENT
        )


def test_starttls_implicit_tls_and_the_proxys_own_reply_are_derived_again(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from smtpproxy.events import Note, Side, TlsEstablished

    C, S = Side.CLIENT, Side.SERVER
    steps = [
        (S, b"220 mx\r\n"), (C, b"EHLO c\r\n"), (S, b"250-mx\r\n250 STARTTLS\r\n"),
        # a client that does not wait: the plaintext after STARTTLS is flagged
        (C, b"STARTTLS\r\nMAIL FROM:<evil@x>\r\n"),
        ("note", S, b"220 2.0.0 Ready (answered by smtpproxy)\r\n"),
        ("event", TlsEstablished(C, "TLSv1.3", "TLS_AES_256_GCM_SHA384")),
        "tls_established",
        (C, b"EHLO c\r\n"), (S, b"250-mx\r\n250 AUTH PLAIN\r\n"),
        (C, b"AUTH PLAIN AHUAcA==\r\n"), (S, b"235 ok\r\n"),
        (C, b"QUIT\r\n"), (S, b"221 bye\r\n"),
        ("event", Note(S, "idle", "a note the proxy made")),
    ]  # fmt: skip
    seen, back = _live(tmp_path, steps)
    assert [(e.t, e.event) for e in back.entries] == seen
    kinds = [type(e.event).__name__ for e in back.entries]
    assert "TlsStart" in kinds and "Anomaly" in kinds and "AuthResult" in kinds
    assert back.raw(S).startswith(b"220 mx\r\n250-mx") and b"answered by smtpproxy" not in back.raw(
        S
    )
    lines = [json.loads(x) for x in back.path.read_text().splitlines()[1:]]
    (fed,) = [x for x in lines if isinstance(x, dict) and x.get("fed")]
    assert fed["kind"] == "proxy_reply"
    assert [x for x in lines if isinstance(x, list) and x[1] == "tls_established"]
    # implicit TLS: AUTH is not "in clear"
    (tmp_path / "implicit").mkdir()
    seen, back = _live(tmp_path / "implicit", ["implicit_tls", *SCRIPTS["seed_auth_plain"]])
    assert [(e.t, e.event) for e in back.entries] == seen
    assert not [e for e in back.events() if type(e).__name__ == "Anomaly"]


def test_a_redacted_recording_holds_events_and_no_secret(tmp_path) -> None:  # type: ignore[no-untyped-def]
    seen, back = _live(tmp_path, SCRIPTS["seed_auth_plain"], derive=False, redacting=True)
    assert [(e.t, e.event) for e in back.entries] == seen
    text = back.path.read_text()
    assert "cGFzc3dvcmQ" not in text and "AHVzZXJAZG9tYWluLmNvbQBwYXNzd29yZA" not in text
    assert all(line.startswith("{") for line in text.splitlines())


def test_input_lines_split_anywhere_give_the_same_events(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Reads cut mid-line, mid-UTF-8 character and mid-terminator, and bytes
    that are not UTF-8: written as they came, read back to the same events."""
    from smtpproxy.events import Side

    whole = b"".join(d for s, d in SCRIPTS["seed_plain"] if s is Side.CLIENT)
    steps = []
    stream = iter(SCRIPTS["seed_plain"])
    for side, data in stream:
        if side is Side.CLIENT and len(data) > 40:
            data = data.replace(b"hitting", b"h\xc3\xa9tting \xff")
            steps += [(side, data[i : i + 7]) for i in range(0, len(data), 7)]
        else:
            steps += [(side, data[:1]), (side, data[1:])]
    seen, back = _live(tmp_path, steps)
    assert [(e.t, e.event) for e in back.entries] == seen
    lines = back.path.read_text().splitlines()
    assert any('"c64"' in x for x in lines)
    assert back.raw(Side.CLIENT) == whole.replace(b"hitting", b"h\xc3\xa9tting \xff")


def test_a_version_1_recording_reads_as_before(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A file written by smtpproxy before format 2 (events, totals on the
    close line): its events are the ones a Conversation reads from its bytes,
    and an input line in it is refused."""
    from pathlib import Path

    from smtpproxy.recording import RecordingError, read_recording

    v1 = Path(__file__).parent / "data" / "v1-smtplib-auth-plain.jsonl"
    rec = read_recording(v1)
    assert rec.header.version == 1 and rec.close is not None
    assert rec.close.totals["bytes_from_client"] == len(rec.raw(Side.CLIENT)) == 155
    assert rec.close.totals["auth"] == {
        "mechanism": "PLAIN",
        "user": "user@domain.com",
        "success": True,
    }
    conv = Conversation()
    again = []
    for e in rec.entries:
        if e.event.raw:
            again += conv.feed(e.event.side, e.event.raw)
    assert [e.event for e in rec.entries] == again + conv.close()
    bad = tmp_path / "v1-with-input.jsonl"
    lines = v1.read_text().splitlines()
    bad.write_text("\n".join([*lines[:2], '[0.1, "c", "NOOP\\r\\n"]', *lines[2:]]) + "\n")
    try:
        read_recording(bad)
    except RecordingError as exc:
        assert (
            str(exc)
            == f"{bad}:3: not a valid input line (input lines are format version 2, this file says 1)"
        )
    else:
        raise AssertionError("an input line in a version 1 file was read")
