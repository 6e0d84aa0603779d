"""The sans-IO protocol module, fed whole, byte by byte, and split anywhere."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import given, settings
from hypothesis import strategies as st
from scripts import (
    BDAT_SESSION,
    PIPELINED,
    SCRIPTS,
    SEED_AUTH_LOGIN,
    SEED_AUTH_PLAIN,
    SEED_PLAIN_SESSION,
)

from smtpproxy.events import (
    Anomaly,
    AuthResponse,
    AuthResult,
    Command,
    Event,
    MessageData,
    MessageEnd,
    Opaque,
    Reply,
    Side,
    TlsStart,
)
from smtpproxy.protocol import Conversation, Unstuffer, format_reply, parse_capabilities

Script = Sequence[tuple[Side, bytes]]


def run(script: Script, splits: Sequence[Sequence[int]] | None = None) -> list[Event]:
    conv = Conversation()
    events: list[Event] = []
    for i, (side, data) in enumerate(script):
        cuts = sorted(set(splits[i])) if splits else []
        start = 0
        for cut in cuts + [len(data)]:
            if cut > start:
                events.extend(conv.feed(side, data[start:cut]))
                start = cut
    events.extend(conv.close())
    return events


def normalise(events: list[Event]) -> list[object]:
    """Merge the pieces whose boundaries follow the chunking (body data)."""
    out: list[object] = []
    for ev in events:
        if (
            isinstance(ev, MessageData)
            and out
            and isinstance(out[-1], MessageData)
            and not out[-1].last
        ):
            prev = out.pop()
            assert isinstance(prev, MessageData)
            ev = MessageData(prev.raw + ev.raw, ev.via, ev.last)
        elif isinstance(ev, Opaque) and out and isinstance(out[-1], Opaque):
            last = out[-1]
            assert isinstance(last, Opaque)
            if (last.side, last.reason) == (ev.side, ev.reason):
                out.pop()
                ev = Opaque(ev.side, last.raw + ev.raw, ev.reason)
        out.append(ev)
    return out


def of(events: list[Event], kind: type) -> list:
    return [e for e in events if isinstance(e, kind)]


def test_seed_plain_session() -> None:
    events = run(SEED_PLAIN_SESSION)
    commands = of(events, Command)
    assert [c.verb for c in commands] == ["HELO", "MAIL", "RCPT", "DATA", "QUIT"]
    assert commands[1].path == "me@telnettingin.com"
    assert commands[2].path == "postmaster@mail.getsdeliveredhere.net"
    replies = of(events, Reply)
    assert [(r.command, r.code) for r in replies] == [
        ("<greeting>", 220),
        ("HELO", 250),
        ("MAIL", 250),
        ("RCPT", 250),
        ("DATA", 354),
        ("DATA", 250),
        ("QUIT", 221),
    ]
    assert replies[4].intermediate and not replies[4].ends_message
    assert replies[5].ends_message and replies[5].text == "ok 1103093638 qp 87827"
    (end,) = of(events, MessageEnd)
    assert end.complete
    assert end.headers == {
        "To": "postmaster@mail.getsdeliveredhere.net",
        "From": "telnetclient@mail.getsdeliveredhere.net",
        "Subject": "this is a test message",
        "Date": "Thu, 21 Jun 2007 11:11:40 -0400",
    }
    body = SEED_PLAIN_SESSION[9][1]
    assert end.size == len(body) - 3
    assert b"".join(e.raw for e in of(events, MessageData)) == body


def test_seed_auth_plain_decodes_user_and_password() -> None:
    events = run(SEED_AUTH_PLAIN)
    ehlo = next(r for r in of(events, Reply) if r.command == "EHLO")
    assert ehlo.capabilities == {
        "AUTH": "LOGIN PLAIN",
        "STARTTLS": "",
        "PIPELINING": "",
        "8BITMIME": "",
    }
    auth = next(c for c in of(events, Command) if c.verb == "AUTH")
    assert auth.auth is not None
    assert dict(auth.auth.fields) == {"user": "user@domain.com", "password": "password"}
    (result,) = of(events, AuthResult)
    assert (result.mechanism, result.user, result.success, result.code) == (
        "PLAIN",
        "user@domain.com",
        True,
        235,
    )
    assert any(isinstance(e, Anomaly) and e.kind == "auth_in_clear" for e in events)


def test_seed_auth_login_decodes_challenges_and_answers() -> None:
    events = run(SEED_AUTH_LOGIN)
    challenges = [r for r in of(events, Reply) if r.code == 334]
    assert [dict(r.auth.fields) for r in challenges] == [
        {"challenge": "Username:"},
        {"challenge": "Password:"},
    ]
    assert all(r.intermediate for r in challenges)
    answers = of(events, AuthResponse)
    assert [dict(a.auth.fields) for a in answers] == [
        {"user": "user@domain.com"},
        {"password": "password"},
    ]
    (result,) = of(events, AuthResult)
    assert result.success and result.user == "user@domain.com"
    final = [r for r in of(events, Reply) if r.command == "AUTH"][-1]
    assert final.enhanced == "2.0.0"


def test_pipelined_replies_match_commands_in_order() -> None:
    events = run(PIPELINED)
    replies = [(r.command, r.code) for r in of(events, Reply)]
    assert replies == [
        ("<greeting>", 220),
        ("EHLO", 250),
        ("MAIL", 250),
        ("RCPT", 250),
        ("RCPT", 550),
        ("DATA", 354),
        ("DATA", 250),
        ("QUIT", 221),
    ]
    rejected = of(events, Reply)[4]
    assert rejected.enhanced == "5.1.1"
    (end,) = of(events, MessageEnd)
    # "..leading dot" is unstuffed to ".leading dot": content is 37 octets
    assert end.size == len(b"Subject: pipe\r\n\r\n.leading dot\r\nline\r\n")
    assert of(events, Command)[-1].verb == "QUIT"


def test_bdat_chunk_may_hold_lines_that_look_like_commands() -> None:
    events = run(BDAT_SESSION)
    verbs = [c.verb for c in of(events, Command)]
    assert verbs == ["EHLO", "MAIL", "RCPT", "BDAT", "BDAT", "QUIT"]
    data = of(events, MessageData)
    assert b"".join(d.raw for d in data) == b"Subject: b\r\n\r\nQUIT\r\n.\r\nRSET\r\n"
    (end,) = of(events, MessageEnd)
    assert (end.via, end.size, end.complete) == ("BDAT", 29, True)
    last = [r for r in of(events, Reply) if r.ends_message]
    assert [r.text for r in last] == ["2.0.0 queued"]


def test_data_refused_means_no_body_follows() -> None:
    script = [
        (Side.SERVER, b"220 x\r\n"),
        (Side.CLIENT, b"HELO a\r\nMAIL FROM:<a@b>\r\nDATA\r\n"),
        (Side.SERVER, b"250 hi\r\n250 ok\r\n554 5.5.1 no valid recipients\r\n"),
        (Side.CLIENT, b"QUIT\r\n"),
        (Side.SERVER, b"221 bye\r\n"),
    ]
    events = run(script)
    assert not of(events, MessageData)
    assert [c.verb for c in of(events, Command)] == ["HELO", "MAIL", "DATA", "QUIT"]


def test_client_bytes_sent_early_are_held_until_the_reply() -> None:
    """A client that sends the body with DATA before 354 is read correctly
    once the 354 arrives."""
    script = [
        (Side.SERVER, b"220 x\r\n"),
        (Side.CLIENT, b"DATA\r\nhello\r\n.\r\nQUIT\r\n"),
        (Side.SERVER, b"354 go\r\n250 ok\r\n221 bye\r\n"),
    ]
    events = run(script)
    assert [c.verb for c in of(events, Command)] == ["DATA", "QUIT"]
    assert of(events, MessageEnd)[0].size == 7


def test_auth_cancel_and_bad_base64_do_not_raise() -> None:
    script = [
        (Side.SERVER, b"220 x\r\n"),
        (Side.CLIENT, b"AUTH LOGIN\r\n"),
        (Side.SERVER, b"334 VXNlcm5hbWU6\r\n"),
        (Side.CLIENT, b"*\r\n"),
        (Side.SERVER, b"501 5.7.0 cancelled\r\n"),
        (Side.CLIENT, b"AUTH PLAIN !!!notbase64\r\n"),
        (Side.SERVER, b"501 5.5.2 bad base64\r\n"),
    ]
    events = run(script)
    results = of(events, AuthResult)
    assert [(r.cancelled, r.success) for r in results] == [(True, False), (False, False)]
    bad = of(events, Command)[-1].auth
    assert bad is not None and bad.error == "not valid base64"


def test_xoauth2_and_oauthbearer_decode_user_token_and_error() -> None:
    import base64

    x = base64.b64encode(b"user=someone@example.com\x01auth=Bearer ya29.token\x01\x01").decode()
    err = base64.b64encode(
        b'{"status":"401","schemes":"Bearer","scope":"https://mail.google.com/"}'
    ).decode()
    o = base64.b64encode(
        b"n,a=user@example.com,\x01host=server.example.com\x01port=587\x01auth=Bearer vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg==\x01\x01"
    ).decode()
    script = [
        (Side.SERVER, b"220 x\r\n"),
        (Side.CLIENT, f"AUTH XOAUTH2 {x}\r\n".encode()),
        (Side.SERVER, f"334 {err}\r\n".encode()),
        (Side.CLIENT, b"\r\n"),
        (Side.SERVER, b"535 5.7.8 bad credentials\r\n"),
        (Side.CLIENT, f"AUTH OAUTHBEARER {o}\r\n".encode()),
        (Side.SERVER, b"235 2.7.0 ok\r\n"),
    ]
    events = run(script)
    cmds = of(events, Command)
    assert dict(cmds[0].auth.fields) == {
        "user": "someone@example.com",
        "scheme": "Bearer",
        "token": "ya29.token",
    }
    challenge = of(events, Reply)[1].auth
    assert challenge is not None and '"status":"401"' in challenge.fields["error"]
    ob = dict(cmds[1].auth.fields)
    assert (
        ob["user"] == "user@example.com"
        and ob["token"].startswith("vF9dft4q")
        and ob["port"] == "587"
    )
    results = of(events, AuthResult)
    assert [(r.mechanism, r.user, r.success) for r in results] == [
        ("XOAUTH2", "someone@example.com", False),
        ("OAUTHBEARER", "user@example.com", True),
    ]


def test_starttls_switches_both_sides_to_opaque_and_flags_injection() -> None:
    script = [
        (Side.SERVER, b"220 x\r\n"),
        (Side.CLIENT, b"EHLO a\r\n"),
        (Side.SERVER, b"250-x\r\n250 STARTTLS\r\n"),
        (Side.CLIENT, b"STARTTLS\r\nRSET\r\n"),
        (Side.SERVER, b"220 2.0.0 go ahead\r\n"),
        (Side.CLIENT, b"\x16\x03\x01\x00\x05hello"),
        (Side.SERVER, b"\x16\x03\x03\x00\x02hi"),
    ]
    events = run(script)
    assert of(events, TlsStart)
    injected = [e for e in events if isinstance(e, Anomaly) and e.kind == "starttls_injection"]
    assert injected
    opaque = of(events, Opaque)
    assert opaque[0].raw == b"RSET\r\n"
    assert [o.reason for o in opaque[1:]] == ["tls", "tls"]


def test_bare_lf_and_bad_utf8_are_kept_and_flagged() -> None:
    events = run([(Side.SERVER, b"220 x\r\n"), (Side.CLIENT, b"HELO \xff\xfe\nNOOP\r\n")])
    helo = of(events, Command)[0]
    assert helo.raw == b"HELO \xff\xfe\n"
    assert set(helo.flags) == {"bare_lf", "bad_utf8"}


def test_capabilities_merge_auth_lines() -> None:
    caps = parse_capabilities(["AUTH LOGIN PLAIN", "AUTH=LOGIN", "size 1000", "AUTH CRAM-MD5"])
    assert caps == {"AUTH": "LOGIN PLAIN CRAM-MD5", "SIZE": "1000"}


def test_format_reply_multiline() -> None:
    assert format_reply(250, "a", "b") == b"250-a\r\n250 b\r\n"


def test_unstuffer_restores_content_across_any_split() -> None:
    wire = b"..a\r\nb\r\n...c\r\n.\r\n"
    for cut in range(len(wire) + 1):
        u = Unstuffer()
        out = u.feed(wire[:cut]) + u.feed(wire[cut:]) + u.end()
        assert out == b".a\r\nb\r\n..c\r\n", cut


def test_raw_fields_rebuild_both_streams_exactly() -> None:
    for script in SCRIPTS.values():
        events = run(script)
        for side in Side:
            sent = b"".join(d for s, d in script if s is side)
            assert b"".join(e.raw for e in events if e.side is side) == sent


def test_byte_by_byte_gives_the_same_events() -> None:
    for name, script in SCRIPTS.items():
        whole = normalise(run(script))
        splits = [list(range(1, len(data))) for _, data in script]
        assert normalise(run(script, splits)) == whole, name


@settings(max_examples=150, deadline=None)
@given(
    name=st.sampled_from(sorted(SCRIPTS)),
    data=st.data(),
)
def test_any_split_gives_the_same_events(name: str, data: st.DataObject) -> None:
    script = SCRIPTS[name]
    splits = [
        data.draw(st.lists(st.integers(min_value=0, max_value=len(chunk)), max_size=8))
        for _, chunk in script
    ]
    assert normalise(run(script, splits)) == normalise(run(script))


def test_bdat_message_state_does_not_leak_into_the_next_transaction() -> None:
    C, S = Side.CLIENT, Side.SERVER
    script = [
        (S, b"220 x\r\n"),
        (C, b"EHLO a\r\n"),
        (S, b"250 x\r\n"),
        (C, b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 5\r\nhello"),
        (S, b"250 ok\r\n250 ok\r\n503 5.5.1 refused\r\n"),
        (C, b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nBDAT 3 LAST\r\nabc"),
        (S, b"250 ok\r\n250 ok\r\n250 queued\r\n"),
    ]
    (end,) = of(run(script), MessageEnd)
    assert end.size == 3


def test_over_long_lines_give_the_same_events_however_split() -> None:
    line = b"NOOP " + b"A" * 65536 + b"\r\n"
    script = [
        (Side.SERVER, b"220 x\r\n"),
        (Side.CLIENT, line + b"QUIT\r\n"),
        (Side.SERVER, b"500 too long\r\n221 bye\r\n"),
    ]
    whole = normalise(run(script))
    split = normalise(run(script, [[], [65537, 65540], []]))
    assert whole == split
    assert any(isinstance(e, Anomaly) and e.kind == "line_too_long" for e in whole)
    replies = [(r.command, r.code) for r in of(whole, Reply)]
    assert replies == [("<greeting>", 220), ("<line too long>", 500), ("QUIT", 221)]


def test_over_long_auth_answer_returns_to_commands() -> None:
    C, S = Side.CLIENT, Side.SERVER
    script = [
        (S, b"220 x\r\n"),
        (C, b"AUTH LOGIN\r\n"),
        (S, b"334 VXNlcm5hbWU6\r\n"),
        (C, b"A" * 65537),
        (C, b"\r\n"),
        (S, b"500 5.5.6 too long\r\n"),
        (C, b"NOOP\r\n"),
        (S, b"250 ok\r\n"),
    ]
    events = run(script)
    assert of(events, Command)[-1].verb == "NOOP"
    assert of(events, AuthResult)[0].success is False
