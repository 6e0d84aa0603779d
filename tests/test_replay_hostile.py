"""Replay never lets message content become commands (issue 12, item 2).

A recorded BDAT chunk is message content: the octets follow the command line
without waiting for a reply (RFC 3030 section 2). A server that did not
advertise CHUNKING answers BDAT with 500 and reads those octets as commands,
so replay must send them another way (DATA, dot-stuffed) or not at all; and
after a refused chunk it sends no further chunk of that message.

The recordings are written here in format version 2 (input lines: what each
side sent, read by read; docs/recording-format.md); the targets are real:
aiosmtpd (no CHUNKING) and a raw trio server that offers CHUNKING and keeps
every byte it receives. ``smtpproxy replay`` runs as users run it.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import trio
from conftest import AioServer, run_smtpproxy_once
from hypothesis import given
from hypothesis import strategies as st
from rawpeers import Peer, RawUpstream

from smtpproxy.protocol import Unstuffer
from smtpproxy.protocol.text import dot_stuff

SENDER, BOB, VICTIM = "ann@example.org", "bob@example.net", "victim@example.com"
#: bound on anything a test waits for
TIMEOUT = 30

#: the chunk of the issue: a message, then a DATA terminator and a whole
#: second transaction for a recipient the recording never named
SMUGGLING = (
    b"Subject: hostile\r\n"
    b"\r\n"
    b".\r\n"
    b"MAIL FROM:<smuggled@evil>\r\n"
    b"RCPT TO:<victim@example.com>\r\n"
    b"DATA\r\n"
    b"Subject: smuggled\r\n"
    b"\r\n"
    b"owned\r\n"
    b".\r\n"
)
#: the same with bare line ends around the dot: a lenient DATA reader ends
#: the message at "\n.\r\n" or "\r\n.\n"
BARE_LF = (
    b"Subject: bare\r\n\r\nhello\n.\r\nMAIL FROM:<smuggled@evil>\r\n"
    b"RCPT TO:<victim@example.com>\r\nDATA\r\n\r\nowned\r\n.\n"
)
#: a last line without CRLF (BDAT content need not end in one)
NO_FINAL_CRLF = b"Subject: open end\r\n\r\n..starts with dots\r\nno line end"


def input_line(t: float, side: str, data: bytes) -> str:
    try:
        return json.dumps([t, side, data.decode("utf-8")])
    except UnicodeDecodeError:
        return json.dumps([t, side + "64", base64.b64encode(data).decode("ascii")])


def write_recording(path: Path, reads: list[tuple[str, bytes]]) -> Path:
    """A format 2 recording of these reads (``"c"``: the client sent it,
    ``"s"``: the server), one millisecond apart."""
    header = {
        "format": "smtpproxy-recording",
        "version": 2,
        "session": "0badc0de",
        "start": "2026-11-29T06:39:16.599Z",
        "client": "127.0.0.1:40000",
        "listen": "127.0.0.1:2525",
        "upstream": "127.0.0.1:25",
    }
    lines = [json.dumps(header)]
    for n, (side, data) in enumerate(reads, 1):
        lines.append(input_line(n / 1000, side, data))
    close = {
        "t": (len(reads) + 1) / 1000,
        "type": "close",
        "by": "client",
        "reason": "client closed the connection",
    }
    lines.append(json.dumps(close))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


EHLO_REPLY = (
    b"250-mx.test greets hostile.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n250 CHUNKING\r\n"
)


def bdat_recording(path: Path, chunk: bytes) -> Path:
    """The issue's session: one message in one ``BDAT n LAST``, then NOOPs
    (whose replies a desynchronised replay would match) and QUIT."""
    return write_recording(
        path,
        [
            ("s", b"220 mx.test ESMTP\r\n"),
            ("c", b"EHLO hostile.example\r\n"),
            ("s", EHLO_REPLY),
            ("c", f"MAIL FROM:<{SENDER}>\r\n".encode()),
            ("s", b"250 2.1.0 sender ok\r\n"),
            ("c", f"RCPT TO:<{BOB}>\r\n".encode()),
            ("s", b"250 2.1.5 recipient ok\r\n"),
            ("c", f"BDAT {len(chunk)} LAST\r\n".encode() + chunk),
            ("s", b"250 2.0.0 Ok: queued as 1A2B3C\r\n"),
            ("c", b"NOOP\r\n"),
            ("s", b"250 2.0.0 Ok\r\n"),
            ("c", b"NOOP\r\n"),
            ("s", b"250 2.0.0 Ok\r\n"),
            ("c", b"NOOP\r\n"),
            ("s", b"250 2.0.0 Ok\r\n"),
            ("c", b"QUIT\r\n"),
            ("s", b"221 2.0.0 bye\r\n"),
        ],
    )


async def run_replay(cwd: Path, *args: str) -> tuple[int, list[str], str]:
    """``smtpproxy replay ARGS`` as a subprocess, in a worker thread so that
    servers in this test's event loop keep serving it."""
    done = await trio.to_thread.run_sync(
        lambda: run_smtpproxy_once("replay", *args, cwd=cwd, timeout=TIMEOUT)
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, done.stdout.splitlines(), done.stderr


def after(lines: list[str], first: str, count: int) -> list[str]:
    """The line equal to ``first`` and the ``count - 1`` lines after it."""
    assert first in lines, "\n".join(lines)
    i = lines.index(first)
    return lines[i : i + count]


# -- a target without CHUNKING ----------------------------------------------------


@pytest.mark.parametrize(
    ("chunk", "content"),
    [
        pytest.param(SMUGGLING, SMUGGLING, id="crlf-dot-crlf"),
        pytest.param(
            BARE_LF, BARE_LF.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"), id="bare-lf"
        ),
        pytest.param(NO_FINAL_CRLF, NO_FINAL_CRLF + b"\r\n", id="no-final-crlf"),
    ],
)
async def test_a_bdat_chunk_to_a_server_without_chunking_goes_as_one_dot_stuffed_data_body(
    aiosmtpd_server: AioServer, tmp_path: Path, chunk: bytes, content: bytes
) -> None:
    rec = bdat_recording(tmp_path / "hostile.jsonl", chunk)
    target = f"{aiosmtpd_server.host}:{aiosmtpd_server.port}"

    code, lines, stderr = await run_replay(tmp_path, str(rec), "--to", target, "--timeout", "5")

    # aiosmtpd got the message once, for the recorded recipient, with the
    # recorded content (line ends made CRLF); nothing for the smuggled one
    messages = aiosmtpd_server.received.messages
    assert [(m["from"], m["to"]) for m in messages] == [(SENDER, [BOB])], messages
    assert messages[0]["content"] == content
    assert code == 1, "\n".join(lines) + stderr  # differs: no CHUNKING, the message adapted
    ends_changed = content != chunk
    block = after(lines, "-> DATA", 7 if ends_changed else 6)
    assert block[:3] == [
        "-> DATA",
        "<- 354 End data with <CR><LF>.<CR><LF>",
        "== the target does not offer CHUNKING: the BDAT message goes with DATA, dot-stuffed",
    ]
    assert block[3] == f"-> (message body from BDAT, {len(chunk)} octets)"
    assert block[4] == "<- 250 2.0.0 OK queued"
    if ends_changed:
        assert block[5] == "== line ends made CRLF for DATA (RFC 5321 section 2.3.8)"
    assert block[-1] == (
        "!! differs: sent with DATA: the target does not offer CHUNKING "
        "(recorded: 250 2.0.0 Ok: queued as 1A2B3C)"
    )
    # the NOOPs and QUIT after it get their own replies, in step
    assert lines[lines.index(block[-1]) + 1 :][:8] == [
        "-> NOOP",
        "<- 250 OK",
        "!! differs: enhanced code 2.0.0 -> - (recorded: 250 2.0.0 Ok)",
        "-> NOOP",
        "<- 250 OK",
        "!! differs: enhanced code 2.0.0 -> - (recorded: 250 2.0.0 Ok)",
        "-> NOOP",
        "<- 250 OK",
    ]
    assert not [line for line in lines if line.startswith("-> BDAT")]
    assert lines[-1] == "10 exchanges, 8 differ"  # DATA added; the capabilities, codes, adaptation


async def test_a_binarymime_message_is_not_sent_to_a_server_without_chunking(
    aiosmtpd_server: AioServer, tmp_path: Path
) -> None:
    """BODY=BINARYMIME content may only go with BDAT (RFC 3030 section 3):
    no DATA adaptation, the chunk is a difference, and RSET clears the
    transaction before the next one."""
    chunk = b"Subject: binary\r\n\r\n\x00\xff\n.\nRCPT TO:<victim@example.com>\r\n"
    rec = write_recording(
        tmp_path / "binary.jsonl",
        [
            ("s", b"220 mx.test ESMTP\r\n"),
            ("c", b"EHLO hostile.example\r\n"),
            ("s", EHLO_REPLY.replace(b"250 CHUNKING", b"250-CHUNKING\r\n250 BINARYMIME")),
            ("c", f"MAIL FROM:<{SENDER}> BODY=BINARYMIME\r\n".encode()),
            ("s", b"250 2.1.0 sender ok\r\n"),
            ("c", f"RCPT TO:<{BOB}>\r\n".encode()),
            ("s", b"250 2.1.5 recipient ok\r\n"),
            ("c", f"BDAT {len(chunk)} LAST\r\n".encode() + chunk),
            ("s", b"250 2.0.0 Ok: queued as 1A2B3C\r\n"),
            ("c", f"MAIL FROM:<{SENDER}>\r\n".encode()),
            ("s", b"250 2.1.0 sender ok\r\n"),
            ("c", b"QUIT\r\n"),
            ("s", b"221 2.0.0 bye\r\n"),
        ],
    )
    target = f"{aiosmtpd_server.host}:{aiosmtpd_server.port}"

    code, lines, stderr = await run_replay(tmp_path, str(rec), "--to", target, "--timeout", "5")

    assert aiosmtpd_server.received.messages == []
    assert code == 1, "\n".join(lines) + stderr
    assert after(lines, f"   (not sent) BDAT {len(chunk)} LAST (+{len(chunk)} octets)", 4)[1:] == [
        "== BODY=BINARYMIME needs BDAT, which the target does not offer (RFC 3030 section 3)",
        (
            "!! differs: not sent: BODY=BINARYMIME needs BDAT, which the target does not offer "
            "(RFC 3030 section 3) (recorded: 250 2.0.0 Ok: queued as 1A2B3C)"
        ),
        "-> RSET",
    ]
    assert after(lines, "-> RSET", 3)[1:] == [
        "<- 250 OK",
        "== RSET: the transaction did not end as recorded (RFC 5321 section 4.1.1.5)",
    ]
    assert after(lines, f"-> MAIL FROM:<{SENDER}>", 2)[1] == "<- 250 OK"


# -- a target with CHUNKING that refuses a chunk -----------------------------------


async def chunking_server(upstream: RawUpstream, commands: list[bytes], peers: list[Peer]) -> None:
    """One session of a server that offers CHUNKING and PIPELINING, refuses
    the first BDAT chunk it reads (552, after reading it: RFC 3030 section 2)
    and accepts everything else; it ends when the client sends QUIT or
    closes."""
    peer = await upstream.accept()
    peers.append(peer)
    await peer.send(b"220 raw.test ESMTP\r\n")
    chunks = 0
    while True:
        try:
            line = await peer.until(b"\r\n")
        except AssertionError:
            if peer.eof:
                return  # the client closed the connection
            raise
        commands.append(line)
        words = line.split()
        verb = words[0].upper() if words else b""
        if verb == b"EHLO":
            await peer.send(EHLO_REPLY.replace(b"mx.test", b"raw.test"))
        elif verb == b"BDAT":
            await peer.exactly(int(words[1]))
            chunks += 1
            if chunks == 1:
                await peer.send(b"552 5.3.4 message size exceeds fixed limit\r\n")
            else:
                await peer.send(b"250 2.0.0 chunk ok\r\n")
        elif verb == b"QUIT":
            await peer.send(b"221 2.0.0 bye\r\n")
            return
        else:
            code = {b"MAIL": b"2.1.0", b"RCPT": b"2.1.5"}.get(verb, b"2.0.0")
            await peer.send(b"250 " + code + b" ok\r\n")


async def replay_to_chunking_server(
    nursery: trio.Nursery, tmp_path: Path, rec: Path, timeout: str = "3"
) -> tuple[list[bytes], list[Peer], tuple[int, list[str], str]]:
    """Replay ``rec`` to a ``chunking_server``: what it read (command lines,
    its peer) and the replay's exit code, output lines and stderr."""
    upstream = await RawUpstream().start(nursery)
    commands: list[bytes] = []
    peers: list[Peer] = []
    nursery.start_soon(chunking_server, upstream, commands, peers)
    target = f"127.0.0.1:{upstream.address[1]}"
    done = await run_replay(tmp_path, str(rec), "--to", target, "--timeout", timeout)
    return commands, peers, done


async def test_after_a_refused_bdat_chunk_no_further_chunk_of_that_message_is_sent(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    one, two, three = b"A" * 10, b"SECOND-CHUNK" + b"B" * 8, b"C" * 5
    second_message = b"Subject: 2\r\n\r\nok\r\n"
    # the client pipelined all three chunks in one write (one read, one time)
    rec = write_recording(
        tmp_path / "chunks.jsonl",
        [
            ("s", b"220 mx.test ESMTP\r\n"),
            ("c", b"EHLO hostile.example\r\n"),
            ("s", EHLO_REPLY),
            ("c", f"MAIL FROM:<{SENDER}>\r\n".encode()),
            ("s", b"250 2.1.0 sender ok\r\n"),
            ("c", f"RCPT TO:<{BOB}>\r\n".encode()),
            ("s", b"250 2.1.5 recipient ok\r\n"),
            ("c", b"BDAT 10\r\n" + one + b"BDAT 20\r\n" + two + b"BDAT 5 LAST\r\n" + three),
            ("s", b"250 2.0.0 10 octets\r\n250 2.0.0 20 octets\r\n250 2.0.0 Ok: queued as 1\r\n"),
            ("c", f"MAIL FROM:<{SENDER}>\r\n".encode()),
            ("s", b"250 2.1.0 sender ok\r\n"),
            ("c", f"RCPT TO:<{BOB}>\r\n".encode()),
            ("s", b"250 2.1.5 recipient ok\r\n"),
            ("c", f"BDAT {len(second_message)} LAST\r\n".encode() + second_message),
            ("s", b"250 2.0.0 Ok: queued as 2\r\n"),
            ("c", b"QUIT\r\n"),
            ("s", b"221 2.0.0 bye\r\n"),
        ],
    )
    upstream = await RawUpstream().start(nursery)
    commands: list[bytes] = []
    peers: list[Peer] = []
    nursery.start_soon(chunking_server, upstream, commands, peers)

    code, lines, stderr = await run_replay(
        tmp_path, str(rec), "--to", f"127.0.0.1:{upstream.address[1]}"
    )

    # the server read the first chunk, refused it, and got no other chunk of
    # that message; RSET cleared the transaction before the next MAIL
    assert commands == [
        b"EHLO hostile.example\r\n",
        f"MAIL FROM:<{SENDER}>\r\n".encode(),
        f"RCPT TO:<{BOB}>\r\n".encode(),
        b"BDAT 10\r\n",
        b"RSET\r\n",
        f"MAIL FROM:<{SENDER}>\r\n".encode(),
        f"RCPT TO:<{BOB}>\r\n".encode(),
        f"BDAT {len(second_message)} LAST\r\n".encode(),
        b"QUIT\r\n",
    ]
    (peer,) = peers
    assert b"SECOND-CHUNK" not in peer.got and three not in peer.got
    assert code == 1, "\n".join(lines) + stderr
    assert after(lines, "-> BDAT 10 (+10 octets)", 3)[1:] == [
        "<- 552 5.3.4 message size exceeds fixed limit",
        "!! differs: code 250 -> 552 (recorded: 250 2.0.0 10 octets)",
    ]
    refused = "not sent: the target refused an earlier chunk of this message with 552 (RFC 3030 section 2)"
    assert after(lines, "   (not sent) BDAT 20 (+20 octets)", 3)[1:] == [
        "== " + refused.removeprefix("not sent: "),
        f"!! differs: {refused} (recorded: 250 2.0.0 20 octets)",
    ]
    assert after(lines, "   (not sent) BDAT 5 LAST (+5 octets)", 4)[1:] == [
        "== " + refused.removeprefix("not sent: "),
        f"!! differs: {refused} (recorded: 250 2.0.0 Ok: queued as 1)",
        "-> RSET",
    ]
    assert lines[-1] == "12 exchanges, 3 differ"


async def test_a_chunk_the_recording_holds_only_part_of_is_not_sent(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Cut short (the proxy was killed mid-chunk), the chunk would make the
    target read what follows it as the rest of the chunk: not sent."""
    rec = write_recording(
        tmp_path / "cut.jsonl",
        [
            ("s", b"220 mx.test ESMTP\r\n"),
            ("c", b"EHLO hostile.example\r\n"),
            ("s", EHLO_REPLY),
            ("c", f"MAIL FROM:<{SENDER}>\r\n".encode()),
            ("s", b"250 2.1.0 sender ok\r\n"),
            ("c", f"RCPT TO:<{BOB}>\r\n".encode()),
            ("s", b"250 2.1.5 recipient ok\r\n"),
            ("c", b"BDAT 100\r\n" + b"x" * 40),
        ],
    )
    commands, peers, (code, lines, stderr) = await replay_to_chunking_server(
        nursery, tmp_path, rec, timeout="3"
    )

    assert commands == [
        b"EHLO hostile.example\r\n",
        f"MAIL FROM:<{SENDER}>\r\n".encode(),
        f"RCPT TO:<{BOB}>\r\n".encode(),
    ]
    assert b"BDAT" not in peers[0].got
    # the recording has no reply to that chunk: nothing to compare, no difference
    assert code == 0, "\n".join(lines) + stderr
    assert lines[-1] == "5 exchanges, 0 differ"
    assert after(lines, "   (not sent) BDAT 100 (+40 octets)", 2)[1] == (
        "== the recorded chunk is cut short"
    )


async def test_chunks_to_a_server_without_chunking_are_joined_into_one_data_body(
    aiosmtpd_server: AioServer, tmp_path: Path
) -> None:
    """Two chunks, split inside a line that starts with a dot: aiosmtpd gets
    the content exactly once, joined; only the last chunk's step is compared."""
    first, last = b"Subject: two\r\n\r\n.do", b"t line\r\n.\r\nend\r\n"
    rec = write_recording(
        tmp_path / "two.jsonl",
        [
            ("s", b"220 mx.test ESMTP\r\n"),
            ("c", b"EHLO hostile.example\r\n"),
            ("s", EHLO_REPLY),
            ("c", f"MAIL FROM:<{SENDER}>\r\n".encode()),
            ("s", b"250 2.1.0 sender ok\r\n"),
            ("c", f"RCPT TO:<{BOB}>\r\n".encode()),
            ("s", b"250 2.1.5 recipient ok\r\n"),
            ("c", f"BDAT {len(first)}\r\n".encode() + first),
            ("s", b"250 2.0.0 chunk ok\r\n"),
            ("c", f"BDAT {len(last)} LAST\r\n".encode() + last),
            ("s", b"250 2.0.0 Ok: queued as 1A2B3C\r\n"),
            ("c", b"QUIT\r\n"),
            ("s", b"221 2.0.0 bye\r\n"),
        ],
    )
    target = f"{aiosmtpd_server.host}:{aiosmtpd_server.port}"

    code, lines, stderr = await run_replay(tmp_path, str(rec), "--to", target, "--timeout", "5")

    (message,) = aiosmtpd_server.received.messages
    assert message["to"] == [BOB] and message["content"] == first + last
    assert code == 1, "\n".join(lines) + stderr
    assert after(lines, f"   (not sent) BDAT {len(first)} (+{len(first)} octets)", 3)[1:] == [
        "== its chunk goes in the DATA body below",
        f"-> (message body from BDAT, {len(first + last)} octets)",
    ]


# -- the stuffing itself ----------------------------------------------------------


def lenient_lines(wire: bytes) -> list[bytes]:
    """The lines of a DATA body as the most lenient reader splits them: at
    CRLF, at a bare LF and at a bare CR."""
    return re.split(rb"\r\n|\n|\r", wire)


@given(st.binary().map(lambda b: bytes(b"a.\r\n"[x % 4] for x in b)) | st.binary())
def test_dot_stuffed_content_ends_only_at_its_terminator_for_any_reader(content: bytes) -> None:
    wire, changed = dot_stuff(content)
    assert wire.endswith(b".\r\n") and (wire == b".\r\n" or wire.endswith(b"\r\n.\r\n"))
    # strict readers (CRLF.CRLF) and lenient ones (any line end) find no
    # lone "." line before the terminator
    assert b"\r\n.\r\n" not in wire[:-3]
    assert b"." not in lenient_lines(wire)[:-2]
    # what a strict reader gives back is the content with CRLF line ends
    unstuffer = Unstuffer()
    got = unstuffer.feed(wire) + unstuffer.end()
    assert unstuffer.done
    normal = re.sub(rb"\r\n|\n|\r", b"\r\n", content)
    if normal and not normal.endswith(b"\r\n"):
        normal += b"\r\n"
    assert got == normal
    assert changed is (normal != content)


def test_dot_stuff_examples() -> None:
    assert dot_stuff(b"") == (b".\r\n", False)
    assert dot_stuff(b".\r\n") == (b"..\r\n.\r\n", False)
    assert dot_stuff(b"a\r\n.b\r\n..c") == (b"a\r\n..b\r\n...c\r\n.\r\n", True)
    assert dot_stuff(b"a\n.\rb\r\n") == (b"a\r\n..\r\nb\r\n.\r\n", True)


# -- a recorded DATA body ---------------------------------------------------------

#: what follows the '.' line of a smuggling body: a second transaction for a
#: recipient the recording never named
SMUGGLED = (
    b"MAIL FROM:<smuggled@evil>\r\n"
    b"RCPT TO:<victim@example.com>\r\n"
    b"DATA\r\n"
    b"Subject: smuggled\r\n"
    b"\r\n"
    b"owned\r\n"
)
HEAD = b"Subject: hostile\r\n\r\nhello"
#: (the line end, '.', line end the recorded body holds; what a strict
#: server stores for them; the same re-stuffed on the wire)
DOT_LINES = [
    pytest.param(b"\n.\n", b"\r\n.\r\n", b"\r\n..\r\n", id="lf-dot-lf"),
    pytest.param(b"\r.\r\n", b"\r\n.\r\n", b"\r\n..\r\n", id="cr-dot-crlf"),
    pytest.param(b"\n.\r\n", b"\r\n.\r\n", b"\r\n..\r\n", id="lf-dot-crlf"),
    pytest.param(b"\r\n.\r", b"\r\n\r\n", b"\r\n\r\n", id="crlf-dot-cr"),
    pytest.param(b"\r\n.\n", b"\r\n\r\n", b"\r\n\r\n", id="crlf-dot-lf"),
]


#: the replies of the DATA recordings below, by command; a raw server that
#: gives the same ones lets a replay match the recording step for step
DATA_REPLIES = {
    b"EHLO": b"250-mx.test greets hostile.example\r\n250-PIPELINING\r\n250 8BITMIME\r\n",
    b"MAIL": b"250 2.1.0 sender ok\r\n",
    b"RCPT": b"250 2.1.5 recipient ok\r\n",
    b"DATA": b"354 End data with <CR><LF>.<CR><LF>\r\n",
    b"<body>": b"250 2.0.0 Ok: queued as 1A2B3C\r\n",
    b"NOOP": b"250 2.0.0 Ok\r\n",
    b"QUIT": b"221 2.0.0 bye\r\n",
}


def data_recording(path: Path, body: bytes) -> Path:
    """One message sent with DATA and this recorded body (the wire octets
    after 354, its terminator included unless the recording was cut short),
    then NOOP and QUIT; with no terminator, the recording ends in the body."""
    reads = [("s", b"220 mx.test ESMTP\r\n")]
    for client in (
        b"EHLO hostile.example\r\n",
        f"MAIL FROM:<{SENDER}>\r\n".encode(),
        f"RCPT TO:<{BOB}>\r\n".encode(),
        b"DATA\r\n",
    ):
        reads += [("c", client), ("s", DATA_REPLIES[client.split()[0]])]
    reads.append(("c", body))
    if body.endswith(b"\r\n.\r\n"):
        reads.append(("s", DATA_REPLIES[b"<body>"]))
        for verb in (b"NOOP", b"QUIT"):
            reads += [("c", verb + b"\r\n"), ("s", DATA_REPLIES[verb])]
    return write_recording(path, reads)


async def data_server(upstream: RawUpstream, commands: list[bytes], bodies: list[bytes]) -> None:
    """One session of a strict server without CHUNKING that answers as the
    recordings above say, and keeps the exact octets of each command line
    and of each DATA body it reads (up to CRLF.CRLF, RFC 5321 4.1.1.4); it
    ends at QUIT or when the client closes."""
    peer = await upstream.accept()
    await peer.send(b"220 raw.test ESMTP\r\n")
    try:
        while True:
            line = await peer.until(b"\r\n")
            commands.append(line)
            verb = line.split()[0].upper() if line.split() else b""
            await peer.send(DATA_REPLIES.get(verb, b"250 2.0.0 ok\r\n"))
            if verb == b"DATA":
                start = peer.mark
                await peer.until(b"\r\n.\r\n")
                bodies.append(bytes(peer.got[start : peer.mark]))
                await peer.send(DATA_REPLIES[b"<body>"])
            elif verb == b"QUIT":
                return
    except AssertionError:
        if not peer.eof:
            raise  # the client closed the connection: the session is over


async def replay_to_data_server(
    nursery: trio.Nursery, tmp_path: Path, rec: Path, timeout: str = "5"
) -> tuple[RawUpstream, list[bytes], list[bytes], tuple[int, list[str], str]]:
    """Replay ``rec`` to a ``data_server``: the server, the command lines and
    DATA bodies it read, and the replay's exit code, output lines and stderr."""
    upstream = await RawUpstream().start(nursery)
    commands: list[bytes] = []
    bodies: list[bytes] = []
    nursery.start_soon(data_server, upstream, commands, bodies)
    target = f"127.0.0.1:{upstream.address[1]}"
    done = await run_replay(tmp_path, str(rec), "--to", target, "--timeout", timeout)
    return upstream, commands, bodies, done


@pytest.mark.parametrize(("dot_line", "stored", "wire"), DOT_LINES)
async def test_a_recorded_data_body_with_a_lenient_dot_line_delivers_one_message(
    aiosmtpd_server: AioServer, tmp_path: Path, dot_line: bytes, stored: bytes, wire: bytes
) -> None:
    """The body holds a '.' line with a bare CR or LF, then a second
    transaction: sent as its content re-stuffed, the target reads one
    message and the smuggled commands as its text."""
    body = HEAD + dot_line + SMUGGLED + b".\r\n"
    rec = data_recording(tmp_path / "smuggle.jsonl", body)
    target = f"{aiosmtpd_server.host}:{aiosmtpd_server.port}"

    code, lines, stderr = await run_replay(tmp_path, str(rec), "--to", target, "--timeout", "5")

    messages = aiosmtpd_server.received.messages
    assert [(m["from"], m["to"]) for m in messages] == [(SENDER, [BOB])], messages
    assert messages[0]["content"] == HEAD + stored + SMUGGLED
    assert code == 1, "\n".join(lines) + stderr
    size = len(Unstuffer().feed(body))
    assert after(lines, f"-> (message body, {size} octets)", 4)[1:] == [
        "<- 250 2.0.0 OK queued",
        "== line ends made CRLF for DATA (RFC 5321 section 2.3.8)",
        (
            "!! differs: sent as its content, dot-stuffed again: the recorded body has a bare CR or LF "
            "(recorded: 250 2.0.0 Ok: queued as 1A2B3C)"
        ),
    ]
    assert after(lines, "-> NOOP", 2)[1] == "<- 250 OK"


@pytest.mark.parametrize(("dot_line", "stored", "wire"), DOT_LINES)
async def test_a_recorded_data_body_reaches_the_server_with_no_dot_line_before_its_end(
    nursery: trio.Nursery, tmp_path: Path, dot_line: bytes, stored: bytes, wire: bytes
) -> None:
    """The exact octets a server reads after 354: no line that is only '.'
    before the terminator, for a reader that ends lines at CRLF, LF or CR."""
    rec = data_recording(tmp_path / "smuggle.jsonl", HEAD + dot_line + SMUGGLED + b".\r\n")
    upstream, commands, bodies, (code, lines, stderr) = await replay_to_data_server(
        nursery, tmp_path, rec, timeout="5"
    )

    (got,) = bodies
    assert b"." not in lenient_lines(got)[:-2], got
    assert got == HEAD + wire + SMUGGLED + b".\r\n"
    assert commands == [
        b"EHLO hostile.example\r\n",
        f"MAIL FROM:<{SENDER}>\r\n".encode(),
        f"RCPT TO:<{BOB}>\r\n".encode(),
        b"DATA\r\n",
        b"NOOP\r\n",
        b"QUIT\r\n",
    ]
    assert code == 1, "\n".join(lines) + stderr
    assert lines[-1] == "8 exchanges, 1 differ"  # the body, re-stuffed


async def test_an_ordinary_recorded_data_body_is_sent_byte_for_byte(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """CRLF lines, stuffed dots and all: re-stuffing the content gives the
    recorded octets back, and nothing is noted or counted."""
    body = b"Subject: plain\r\n\r\n..leading dot\r\n...two\r\n..\r\nx.\r\n\r\n.\r\n"
    rec = data_recording(tmp_path / "plain.jsonl", body)
    upstream, commands, bodies, (code, lines, stderr) = await replay_to_data_server(
        nursery, tmp_path, rec, timeout="5"
    )

    assert bodies == [body]
    size = len(Unstuffer().feed(body))
    assert after(lines, f"-> (message body, {size} octets)", 3)[1:] == [
        "<- 250 2.0.0 Ok: queued as 1A2B3C",
        "-> NOOP",
    ]
    assert code == 0, "\n".join(lines) + stderr
    assert lines[-1] == "8 exchanges, 0 differ"


async def test_a_recorded_data_body_cut_short_is_not_sent(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """The recording ends inside the body (no terminating '.' line): the
    target would wait for its end, and a lenient one might end it at the
    bare-LF '.' line and read the rest as commands. Neither DATA nor the body
    is sent."""
    body = HEAD + b"\n.\n" + SMUGGLED
    rec = data_recording(tmp_path / "cut.jsonl", body)
    upstream, commands, bodies, (code, lines, stderr) = await replay_to_data_server(
        nursery, tmp_path, rec, timeout="3"
    )

    assert commands == [
        b"EHLO hostile.example\r\n",
        f"MAIL FROM:<{SENDER}>\r\n".encode(),
        f"RCPT TO:<{BOB}>\r\n".encode(),
    ]
    assert bodies == [] and b"smuggled" not in upstream.peers[0].got
    why = "the recorded message is cut short (no '.' line ends its body)"
    assert after(lines, "   (not sent) DATA", 3)[1:] == [
        f"== {why}",
        f"!! differs: not sent: {why} (recorded: 354 End data with <CR><LF>.<CR><LF>)",
    ]
    assert f"== {why}" in after(lines, f"   (not sent) (message body, {len(body)} octets)", 2)
    assert code == 1, "\n".join(lines) + stderr
    assert lines[-1] == "6 exchanges, 1 differ"


async def test_a_leading_dot_the_recorded_client_did_not_double_is_sent_as_the_server_read_it(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    """A server takes the first '.' off a line that starts with one (RFC
    5321 4.5.2), doubled or not: the replay sends the line as it was stored,
    and says the bytes changed."""
    rec = data_recording(tmp_path / "dot.jsonl", b"Subject: dot\r\n\r\n.hidden\r\n.\r\n")
    upstream, commands, bodies, (code, lines, stderr) = await replay_to_data_server(
        nursery, tmp_path, rec, timeout="5"
    )

    assert bodies == [b"Subject: dot\r\n\r\nhidden\r\n.\r\n"]
    assert code == 1, "\n".join(lines) + stderr
    assert after(lines, "-> (message body, 24 octets)", 4)[1:] == [
        "<- 250 2.0.0 Ok: queued as 1A2B3C",
        (
            "== a leading dot not doubled in the recording is left off, as a server takes it off "
            "(RFC 5321 section 4.5.2)"
        ),
        (
            "!! differs: sent as its content, dot-stuffed again: the recorded body has a line with "
            "a leading dot not doubled (recorded: 250 2.0.0 Ok: queued as 1A2B3C)"
        ),
    ]
