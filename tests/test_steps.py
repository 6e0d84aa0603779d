"""The step model (protocol/steps.py): what each command means, parsed once,
and where each step stands. Pure: bytes through a Conversation, no sockets.
The pipelined session here is the worked example in docs/architecture.md."""

from __future__ import annotations

import base64

import pytest

from smtpproxy.diff import diff_sessions
from smtpproxy.events import Event, Note, NoteKind, Side
from smtpproxy.protocol import Args, Conversation, Exchange, Position, exchanges, parse_args
from smtpproxy.recording import note_in_place

C, S = Side.CLIENT, Side.SERVER


@pytest.mark.parametrize(
    ("verb", "arg", "expected"),
    [
        (
            "MAIL",
            "FROM:<a@example.org> SIZE=1024 BODY=8BITMIME",
            Args(path="a@example.org", params={"SIZE": "1024", "BODY": "8BITMIME"}),
        ),
        ("MAIL", "from:<> size=0", Args(path="", params={"SIZE": "0"})),
        (
            "MAIL",
            "FROM:a@example.org SMTPUTF8",
            Args(path="a@example.org", params={"SMTPUTF8": ""}),
        ),
        ("MAIL", "TO:<a@example.org>", Args(path="a@example.org", valid=False)),
        ("MAIL", "", Args(path=None, valid=False)),
        (
            "RCPT",
            "TO:<b@example.net> NOTIFY=SUCCESS,FAILURE",
            Args(path="b@example.net", params={"NOTIFY": "SUCCESS,FAILURE"}),
        ),
        ("BDAT", "1000 LAST", Args(size=1000, last=True)),
        ("BDAT", "0", Args(size=0)),
        ("BDAT", "12 FIRST", Args(size=12, valid=False)),
        ("BDAT", "x LAST", Args(last=True, valid=False)),
        ("BDAT", "", Args(valid=False)),
        ("AUTH", "plain AHUAcA==", Args(mechanism="PLAIN", initial="AHUAcA==")),
        ("AUTH", "PLAIN\tAHUAcA==", Args(mechanism="PLAIN", initial="AHUAcA==")),
        ("AUTH", "LOGIN", Args(mechanism="LOGIN")),
        ("AUTH", "", Args(valid=False)),
        ("NOOP", "anything", Args()),
    ],
)
def test_parse_args(verb: str, arg: str, expected: Args) -> None:
    assert parse_args(verb, arg) == expected


def _session(*script: tuple[Side, bytes] | str) -> list[Event]:
    conv = Conversation()
    events: list[Event] = []
    for step in script:
        if step == "tls":
            events += conv.tls_established()
        else:
            assert isinstance(step, tuple)
            events += conv.feed(*step)
    return events + conv.close()


PLAIN = base64.b64encode(b"\0user@example.org\0secret")

#: STARTTLS, AUTH PLAIN, then two transactions, the first pipelined (RFC 2920)
PIPELINED = (
    (S, b"220 mx.example ESMTP\r\n"),
    (C, b"EHLO client.example\r\n"),
    (S, b"250-mx.example\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 STARTTLS\r\n"),
    (C, b"STARTTLS\r\n"),
    (S, b"220 2.0.0 go ahead\r\n"),
    "tls",
    (C, b"EHLO client.example\r\n"),
    (S, b"250-mx.example\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 AUTH PLAIN\r\n"),
    (C, b"AUTH PLAIN " + PLAIN + b"\r\n"),
    (S, b"235 2.7.0 ok\r\n"),
    (
        C,
        b"MAIL FROM:<a@example.org> SIZE=22\r\nRCPT TO:<b@example.net>\r\nRCPT TO:<c@example.net>\r\nDATA\r\n",
    ),
    (S, b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n452 4.5.3 too many recipients\r\n354 go on\r\n"),
    (C, b"Subject: one\r\n\r\nhello\r\n.\r\n"),
    (S, b"250 2.0.0 queued as A1\r\n"),
    (C, b"MAIL FROM:<a@example.org>\r\nRCPT TO:<d@example.net>\r\nBDAT 5 LAST\r\nhello"),
    (S, b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.0.0 queued as B2\r\n"),
    (C, b"QUIT\r\n"),
    (S, b"221 2.0.0 bye\r\n"),
)


def _table(exs: list[Exchange]) -> list[tuple[str, str, Position, int | None]]:
    return [(str(ex.kind), ex.verb, ex.position, ex.reply.code if ex.reply else None) for ex in exs]


def test_positions_of_a_pipelined_session() -> None:
    exs = exchanges(_session(*PIPELINED))
    P = Position
    assert _table(exs) == [
        ("greeting", "<greeting>", P(1, 0, 0, 0), 220),
        ("command", "EHLO", P(1, 0, 0, 0), 250),
        ("command", "STARTTLS", P(1, 0, 0, 0), 220),
        ("command", "EHLO", P(2, 0, 0, 1), 250),
        ("command", "AUTH", P(1, 0, 0, 1), 235),
        ("command", "MAIL", P(1, 1, 1, 1), 250),
        ("command", "RCPT", P(1, 1, 1, 1), 250),
        ("command", "RCPT", P(2, 1, 2, 1), 452),  # the second RCPT: the one a 452 hit
        ("command", "DATA", P(1, 1, 1, 1), 354),
        ("body", "<body>", P(1, 1, 1, 1), 250),
        ("command", "MAIL", P(2, 2, 1, 1), 250),
        ("command", "RCPT", P(3, 2, 1, 1), 250),  # the 1st RCPT of the 2nd transaction
        ("command", "BDAT", P(1, 2, 1, 1), 250),
        ("command", "QUIT", P(1, 0, 0, 1), 221),
    ]
    mail, rcpt = exs[5], exs[7]
    assert mail.args.params == {"SIZE": "22"} and rcpt.args.path == "c@example.net"
    assert exs[4].args.mechanism == "PLAIN" and exs[4].auth is not None
    assert exs[4].auth.fields["user"] == "user@example.org"
    assert exs[12].args == Args(size=5, last=True) and exs[12].chunk == b"hello"
    assert exs[9].message is not None and exs[9].message.headers["Subject"] == "one"
    # one write, one group: the pipelined commands share their time
    assert len({ex.group for ex in exchanges(_session(*PIPELINED), range(100))[5:9]}) == 4


def test_a_transaction_ends_with_its_message_rset_or_ehlo() -> None:
    exs = exchanges(
        _session(
            (S, b"220 x\r\n"),
            (C, b"EHLO c\r\n"),
            (S, b"250 x\r\n"),
            (C, b"MAIL FROM:<a@x>\r\n"),
            (S, b"250 ok\r\n"),
            (C, b"RSET\r\n"),
            (S, b"250 ok\r\n"),
            (C, b"RCPT TO:<b@x>\r\n"),
            (S, b"503 need MAIL\r\n"),
            (C, b"MAIL FROM:<a@x>\r\n"),
            (S, b"250 ok\r\n"),
            (C, b"RCPT TO:<b@x>\r\n"),
            (S, b"250 ok\r\n"),
        )  # fmt: skip
    )
    assert [(ex.verb, ex.position.transaction, ex.position.nth_in_transaction) for ex in exs[1:]] == [
        ("EHLO", 0, 0), ("MAIL", 1, 1), ("RSET", 0, 0), ("RCPT", 0, 0), ("MAIL", 2, 1), ("RCPT", 2, 1),
    ]  # fmt: skip


def _auth_session(
    mechanism: bytes, sender: bytes, mail: bytes = b"MAIL FROM:<%s> SIZE=100\r\n"
) -> list[Exchange]:
    answer = {
        b"CRAM-MD5": [(S, b"334 PDEyMzQ1QHgueD4=\r\n"), (C, base64.b64encode(b"ann 0123456789abcdef") + b"\r\n")],
        b"LOGIN": [
            (S, b"334 VXNlcm5hbWU6\r\n"), (C, base64.b64encode(b"bob") + b"\r\n"),
            (S, b"334 UGFzc3dvcmQ6\r\n"), (C, base64.b64encode(b"pw") + b"\r\n"),
        ],
    }[mechanism]  # fmt: skip
    return exchanges(
        _session(
            (S, b"220 x\r\n"),
            (C, b"EHLO c\r\n"),
            (S, b"250 x\r\n"),
            (C, b"AUTH " + mechanism + b"\r\n"),
            *answer,
            (S, b"235 2.7.0 ok\r\n"),
            (C, mail.replace(b"%s", sender)),
            (S, b"250 ok\r\n"),
            (C, b"QUIT\r\n"),
            (S, b"221 bye\r\n"),
        )  # fmt: skip
    )


def test_diff_compares_what_commands_mean() -> None:
    """CRAM-MD5 as ann vs LOGIN as bob, from different senders: the verbs
    align, so only an extra 334 showed before; now the mechanism, the user
    and the sender are named."""
    a = _auth_session(b"CRAM-MD5", b"ann@example.org")
    b = _auth_session(b"LOGIN", b"bob@example.org")
    _, diffs = diff_sessions(a, b)
    reasons = [r for d in diffs for r in d.reasons]
    assert "mechanism CRAM-MD5 -> LOGIN" in reasons
    assert "user ann -> bob" in reasons
    assert "path <ann@example.org> -> <bob@example.org>" in reasons
    assert "only in B" in reasons  # LOGIN's second 334
    # the same meaning written differently is no difference without --strict
    c = _auth_session(b"CRAM-MD5", b"ann@example.org", b"mail from:<%s>  size=101\r\n")
    assert diff_sessions(a, c)[1] == []
    assert [d.reasons for d in diff_sessions(a, c, strict=True)[1]] == [
        ["the client sent a different line"]
    ]


def test_a_reply_the_proxy_made_is_paired_only_when_it_stood_for_the_servers() -> None:
    """A fed note (the proxy answered in the server's place) answers the next
    step; a note that only says what became of a server's reply (a fault's
    ``replace``, an EHLO rewritten) answers nothing, even under pipelining."""
    conv = Conversation()
    events: list[Event] = [*conv.feed(S, b"220 x\r\n")]
    events += conv.feed(C, b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nRCPT TO:<c@x>\r\n")
    events += conv.feed(S, b"250 ok\r\n")
    replaced = Note(S, NoteKind.FAULT, "fault rcpt: replace 451 4.3.0 Lost", b"451 4.3.0 Lost\r\n")
    events += [*conv.feed(S, b"250 rcpt ok\r\n"), replaced]
    answered = Note(
        S, NoteKind.FAULT, "fault rcpt#2: 452 4.5.3 Too many", b"452 4.5.3 Too many\r\n"
    )
    events += note_in_place(answered, conv.feed(S, answered.raw))
    exs = exchanges(events)
    assert [(ex.verb, ex.reply and ex.reply.code, ex.injected is not None) for ex in exs] == [
        ("<greeting>", 220, False),
        ("MAIL", 250, False),
        ("RCPT", 250, False),
        ("RCPT", 452, True),
    ]
