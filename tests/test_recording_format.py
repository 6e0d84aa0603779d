"""The recording format: every event survives the writer and the reader,
including the fields the file leaves for the reader to derive."""

from __future__ import annotations

import json

from scripts import SCRIPTS

from smtpproxy.auth import redact
from smtpproxy.events import Command, Reply
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


def recorded(tmp_path, events, name="r"):  # type: ignore[no-untyped-def]
    """Write ``events`` with the real Recorder; (the file's lines, the events read back)."""
    import datetime as dt

    from smtpproxy.recording import Recorder, read_recording

    rec = Recorder.create(tmp_path, name, dt.datetime.now(dt.UTC), 0.0, client="c", listen="l", upstream="u")
    for ev in events:
        rec.write(1.0, [ev])
    rec.close(2.0, "client", "done", {})
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
    odd = [MessageData(b"Subject: one\r\n\r\nx\r\n.\r\n", "DATA", True), MessageEnd(20, {"Subject": "two"})]
    lines, back = recorded(tmp_path, odd)
    (end,) = [x for x in lines if x.get("type") == "message_end"]
    assert end["headers"] == {"Subject": "two"}
    assert back == odd
