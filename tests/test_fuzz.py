"""Bad input: the relay stays byte-transparent, the observer never raises and
the recording stays valid JSON Lines that gives back each side's bytes.

The relay tests use raw trio peers on loopback that send exactly the given
bytes and keep everything they receive; the hypothesis test drives the
sans-IO ``Conversation`` with random streams, interleavings and chunkings.
"""

from __future__ import annotations

import base64
import random
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import start_proxy, wait_for_sessions
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rawpeers import Peer, RawUpstream, connect, only_recording, proxy_notes

from smtpproxy.events import (
    Anomaly,
    AuthResponse,
    Command,
    Event,
    MessageData,
    MessageEnd,
    Opaque,
    Reply,
    Side,
    TlsStart,
)
from smtpproxy.protocol import MAX_HOLD, MAX_LINE, Conversation
from smtpproxy.recording import Recording
from smtpproxy.server import Sink

# hypothesis's pytest plugin meets this deprecation while it reports a
# failing example; as an error it would hide the example behind an INTERNALERROR
pytestmark = pytest.mark.filterwarnings(
    "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
)

C, S = Side.CLIENT, Side.SERVER
UPSTREAM_GONE = b"421 4.4.2 smtpproxy: upstream closed the connection\r\n"

# a step: that side sends the bytes (the other side reads them all before
# the next step), or "close" / "reset" its connection
Step = tuple[Side, bytes | str]


class Run:
    """What a scripted session through the proxy left behind."""

    def __init__(self, rec: Recording, client: Peer, server: Peer, sent: dict[Side, bytes]) -> None:
        self.rec = rec
        self.client = client
        self.server = server
        self.sent = sent

    def events(self) -> list[Event]:
        return list(self.rec.events())

    def check_transparent(self) -> None:
        """Each far side got exactly what the other sent (the client also
        gets the proxy's own 421s, which are recorded as notes), and the
        recording gives back each side's bytes."""
        assert bytes(self.server.got) == self.sent[C]
        assert bytes(self.client.got) == self.sent[S] + proxy_notes(self.rec)
        assert self.rec.raw(C) == self.sent[C]
        assert self.rec.raw(S) == self.sent[S]
        assert self.rec.close is not None


async def relay(tmp_path: Path, steps: Sequence[Step], **config: Any) -> Run:
    """Play ``steps`` through a proxy between two raw peers. At the end the
    client half-closes, the server reads to the end and closes, and the
    client reads to the end: every byte in flight has arrived."""
    sent = {C: bytearray(), S: bytearray()}
    async with trio.open_nursery() as nursery:
        up = await RawUpstream().start(nursery)
        proxy = await start_proxy(nursery, tmp_path, up.address, **config)
        client = await connect(proxy.host, proxy.port)
        server = await up.accept()
        peers = {C: client, S: server}
        closed = set()
        for side, what in steps:
            if what == "close":
                await peers[side].close()
                closed.add(side)
            elif what == "reset":
                await peers[side].reset()
                closed.add(side)
            else:
                assert isinstance(what, bytes)
                far = peers[side.other]
                async with trio.open_nursery() as both:
                    both.start_soon(peers[side].send, what)
                    await far.exactly(len(what), timeout=30)
                sent[side] += what
        if C not in closed:
            await client.half_close()
        if S not in closed:
            await server.to_eof()
            await server.close()
        if C not in closed:
            await client.to_eof()
            await client.close()
        await wait_for_sessions(proxy.proxy, 1)
        assert proxy.proxy.stats.active == 0
        nursery.cancel_scope.cancel()
    return Run(
        only_recording(proxy.recordings), client, server, {k: bytes(v) for k, v in sent.items()}
    )


def _rand(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


async def test_garbage_and_binary_from_both_sides(tmp_path: Path) -> None:
    steps: list[Step] = [
        (S, b"220\x00 nul in the greeting\r\n"),
        (C, b"EHLO \x00\xff\xfe bad utf-8 \xc3\x28\r\n"),
        (S, b"250-ok\n250-bare lf\r250 bare cr\r\n"),
        (C, b"MAIL FROM:<a\rb@example.org>\nRCPT TO:<\x00>\r\r\r\n\n\n"),
        (S, b"\xff\xfe\xfd not a reply\r\n250 fine\r\n2"),
        (C, _rand(1, 200_000)),
        (S, _rand(2, 200_000)),
        (C, b"\r\n\r\n" + _rand(3, 4096) + b"\n"),
        (S, b"\r\n" + _rand(4, 70_000)),
    ]
    run = await relay(tmp_path, steps)
    run.check_transparent()
    kinds = {e.kind for e in run.events() if isinstance(e, Anomaly)}
    assert {"bare_lf", "not_a_reply"} <= kinds
    assert any(isinstance(e, Command) and "bad_utf8" in e.flags for e in run.events())


async def test_ten_megabyte_lines_without_line_end(tmp_path: Path) -> None:
    line = b"A" * (10 * 1024 * 1024)
    steps: list[Step] = [
        (S, b"220 ready\r\n"),
        (C, line),
        (S, line),
    ]
    run = await relay(tmp_path, steps)
    run.check_transparent()
    opaque = [e for e in run.events() if isinstance(e, Opaque)]
    assert {(e.side, e.reason) for e in opaque} >= {(C, "line too long"), (S, "line too long")}
    assert max(len(e.raw) for e in opaque) <= 2 * MAX_LINE + 256 * 1024  # read in bounded pieces


async def test_bdat_sizes_that_do_not_match_the_data(tmp_path: Path) -> None:
    steps: list[Step] = [
        (S, b"220 ready\r\n"),
        (C, b"EHLO c\r\n"),
        (S, b"250-s\r\n250 CHUNKING\r\n"),
        (C, b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"),
        (S, b"250 ok\r\n250 ok\r\n"),
        # more data than announced: the rest reads as commands
        (C, b"BDAT 5\r\n0123456789\r\nNOOP\r\n"),
        (S, b"250 5 octets\r\n500 what\r\n250 ok\r\n"),
        # a size that is not a number, then one far bigger than the data
        (C, b"BDAT 1x LAST\r\nabc\r\n"),
        (S, b"501 syntax\r\n500 what\r\n"),
        (C, b"BDAT 99999999999999999999 LAST\r\nshort"),
    ]
    run = await relay(tmp_path, steps)
    run.check_transparent()
    data = [e for e in run.events() if isinstance(e, MessageData)]
    assert data[0].raw == b"01234" and data[0].via == "BDAT" and data[0].last
    (end,) = [e for e in run.events() if isinstance(e, MessageEnd)]
    assert not end.complete and end.via == "BDAT" and end.size == len(b"short")
    assert run.rec.close is not None
    assert run.rec.close.by == "client"  # closed inside the chunk: no half-close upstream


@pytest.mark.parametrize("when", ["at once", "after EHLO"])
async def test_upstream_is_an_http_server(tmp_path: Path, when: str) -> None:
    http = (
        b"HTTP/1.1 400 Bad Request\r\nServer: nginx\r\nContent-Type: text/html\r\n"
        b"Content-Length: 26\r\nConnection: close\r\n\r\n<html>400 Bad Request</html>\r\n"
    )
    steps: list[Step] = [(S, http), (S, "close")]
    if when == "after EHLO":
        steps.insert(0, (C, b"EHLO c\r\n"))
    run = await relay(tmp_path, steps)
    run.check_transparent()
    assert bytes(run.client.got).endswith(UPSTREAM_GONE)
    assert any(isinstance(e, Anomaly) and e.kind == "not_a_reply" for e in run.events())
    assert not any(isinstance(e, Reply) for e in run.events())
    assert run.rec.close is not None and run.rec.close.by == "server"


@pytest.mark.parametrize("after_greeting", [False, True])
async def test_upstream_resets_the_connection(tmp_path: Path, after_greeting: bool) -> None:
    steps: list[Step] = [(S, "reset")]
    if after_greeting:
        steps[:0] = [(S, b"220 ready\r\n"), (C, b"EHLO c\r\n")]
    run = await relay(tmp_path, steps)
    run.check_transparent()
    assert bytes(run.client.got).endswith(UPSTREAM_GONE)
    assert run.rec.close is not None
    assert run.rec.close.by == "server" and "reset" in run.rec.close.reason.lower()


async def test_invalid_base64_in_every_sasl_mechanism(tmp_path: Path) -> None:
    steps: list[Step] = [
        (S, b"220 ready\r\n"),
        (C, b"EHLO c\r\n"),
        (S, b"250-s\r\n250 AUTH PLAIN LOGIN CRAM-MD5 XOAUTH2 OAUTHBEARER\r\n"),
        (C, b"AUTH PLAIN !!not*base64!!\r\n"),
        (S, b"501 5.5.2 cannot decode\r\n"),
        (C, b"AUTH LOGIN\r\n"),
        (S, b"334 VXNlcm5hbWU6\r\n"),
        (C, b"%%%\xff\r\n"),
        (S, b"501 5.5.2 cannot decode\r\n"),
        (C, b"AUTH CRAM-MD5\r\n"),
        (S, b"334 @@not base64@@\r\n"),
        (C, b"dXNlcg\r\n"),  # missing padding
        (S, b"501 5.5.2 cannot decode\r\n"),
        (C, b"AUTH XOAUTH2 dXNlcj1h\x01\x01=\r\n"),
        (S, b"334 e3N0YXR1czo0MDB9\r\n"),  # not JSON base64 either
        (C, b"====\r\n"),
        (S, b"535 5.7.8 no\r\n"),
        (C, b"AUTH OAUTHBEARER \xc3\x28\r\n"),
        (S, b"501 5.5.2 cannot decode\r\n"),
        (C, b"AUTH PLAIN\r\n"),
        (S, b"334 \r\n"),
        (C, b"*\r\n"),
        (S, b"501 5.7.0 cancelled\r\n"),
    ]
    run = await relay(tmp_path, steps)
    run.check_transparent()
    events = run.events()
    errors = [
        (e.auth.mechanism, e.auth.error)
        for e in events
        if isinstance(e, (Command, AuthResponse)) and e.auth is not None and e.auth.error
    ]
    assert errors == [
        ("PLAIN", "not valid base64"),
        ("LOGIN", "not valid base64"),
        ("CRAM-MD5", "not valid base64"),
        ("XOAUTH2", "not valid base64"),
        ("XOAUTH2", "not valid base64"),
        ("OAUTHBEARER", "not valid base64"),
    ]
    cram = next(
        e
        for e in events
        if isinstance(e, Reply) and e.auth is not None and e.auth.mechanism == "CRAM-MD5"
    )
    assert cram.auth is not None and cram.auth.error == "not valid base64"


async def test_a_hundred_thousand_pipelined_noops_to_the_sink(tmp_path: Path) -> None:
    burst = b"NOOP\r\n" * 100_000
    sink = Sink()
    async with trio.open_nursery() as nursery:
        address = await nursery.start(sink.serve)
        proxy = await start_proxy(nursery, tmp_path, address)
        client = await connect(proxy.host, proxy.port)
        await client.reply()
        await client.send(b"EHLO burst.example\r\n")
        await client.reply()
        async with trio.open_nursery() as both:
            both.start_soon(client.send, burst + b"QUIT\r\n")
            replies = await client.until(b"221 2.0.0 bye\r\n", timeout=60)
        await client.to_eof()
        await client.close()
        await wait_for_sessions(proxy.proxy, 1, timeout=30)
        nursery.cancel_scope.cancel()
    assert replies == b"250 2.0.0 ok\r\n" * 100_000 + b"221 2.0.0 bye\r\n"
    rec = only_recording(proxy.recordings)
    assert rec.raw(C) == b"EHLO burst.example\r\n" + burst + b"QUIT\r\n"
    assert rec.raw(S) == bytes(client.got)
    noops = [e for e in rec.events() if isinstance(e, Reply) and e.command == "NOOP"]
    assert len(noops) == 100_000


# -- the sans-IO observer under hypothesis -----------------------------------

TOKENS = [
    b"EHLO x\r\n",
    b"HELO x\r\n",
    b"MAIL FROM:<a@b>\r\n",
    b"RCPT TO:<c@d>\r\n",
    b"DATA\r\n",
    b"BDAT 5\r\n",
    b"BDAT 3 LAST\r\n",
    b"BDAT 0 LAST\r\n",
    b"AUTH PLAIN\r\n",
    b"AUTH PLAIN AHVAZABw\r\n",
    b"AUTH LOGIN\r\n",
    b"AUTH CRAM-MD5\r\n",
    b"AUTH XOAUTH2 dXNlcj1h\r\n",
    b"STARTTLS\r\n",
    b"QUIT\r\n",
    b"RSET\r\n",
    b"NOOP\r\n",
    b".\r\n",
    b"\r\n.\r\n",
    b"..dot\r\n",
    b"*\r\n",
    b"=\r\n",
    b"dXNlcg==\r\n",
    b"\r\n",
    b"\n",
    b"\r",
    b"\x00",
    b"\xff\xfe",
    b"\xc3\x28",
    b"220 hi\r\n",
    b"220-hi\r\n",
    b"250 ok\r\n",
    b"250-x\r\n",
    b"250-AUTH PLAIN\r\n",
    b"354 go\r\n",
    b"334 \r\n",
    b"334 VXNlcm5hbWU6\r\n",
    b"334 UGFzc3dvcmQ6\r\n",
    b"235 ok\r\n",
    b"421 bye\r\n",
    b"500 no\r\n",
    b"550-no\r\n",
    b"2",
    b"25",
    b"250",
    b"25x\r\n",
]
# big pieces go by name, so a failing example prints short (and hypothesis
# does not warn about an overly large repr, which pytest makes an error)
BIG = {
    "<over-long line>": b"A" * (MAX_LINE + 10),
    "<half the hold limit>": b"x" * (MAX_HOLD // 2 + 10),  # two outrun a client that should wait
}
PART = st.one_of(st.sampled_from(TOKENS), st.binary(max_size=24), st.sampled_from(sorted(BIG)))
SCRIPT = st.lists(st.tuples(st.sampled_from([C, S]), st.lists(PART, max_size=8)), max_size=14)


def _expand(script: list[tuple[Side, list[bytes | str]]]) -> list[tuple[Side, bytes]]:
    return [
        (side, b"".join(BIG[p] if isinstance(p, str) else p for p in parts))
        for side, parts in script
    ]


def _normalise(events: list[Event]) -> list[object]:
    """Merge the pieces whose boundaries follow the chunking (body data and
    opaque runs), as tests/test_protocol.py does."""
    out: list[object] = []
    for ev in events:
        last = out[-1] if out else None
        if isinstance(ev, MessageData) and isinstance(last, MessageData) and not last.last:
            out[-1] = MessageData(last.raw + ev.raw, ev.via, ev.last)
        elif (
            isinstance(ev, Opaque)
            and isinstance(last, Opaque)
            and (last.side, last.reason) == (ev.side, ev.reason)
        ):
            out[-1] = Opaque(ev.side, last.raw + ev.raw, ev.reason)
        else:
            out.append(ev)
    return out


def _examples(count: int) -> Any:
    """hypothesis settings for the observer tests: ``count`` examples, no
    deadline (large pieces are slow on a busy machine)."""
    return settings(
        max_examples=count,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def _feed(script: list[tuple[Side, bytes]], cuts: list[list[int]] | None) -> list[Event]:
    conv = Conversation()
    events: list[Event] = []
    for i, (side, data) in enumerate(script):
        points = sorted(set(cuts[i])) if cuts else []
        start = 0
        for cut in [*points, len(data)]:
            if cut <= start:
                continue
            chunk = data[start:cut]
            events.extend(conv.feed(side, chunk))
            start = cut
            bound = MAX_HOLD + MAX_LINE + len(chunk)
            assert conv.held_client_bytes <= bound
            assert conv.held_server_bytes <= bound
            assert conv.partial_reply_bytes <= bound
    events.extend(conv.close())
    return events


@_examples(200)
@given(parts=SCRIPT, data=st.data())
def test_conversation_survives_any_bytes_in_any_chunking(
    parts: list[tuple[Side, list[bytes | str]]], data: st.DataObject
) -> None:
    """The observer never raises, holds bounded memory, gives back each
    side's bytes exactly, and reads the same events however the bytes of each
    piece are split."""
    script = _expand(parts)
    cuts = [data.draw(st.lists(st.integers(0, len(piece)), max_size=6)) for _, piece in script]
    whole = _feed(script, None)
    chunked = _feed(script, cuts)
    for events in (whole, chunked):
        for side in (C, S):
            assert b"".join(e.raw for e in events if e.side is side) == b"".join(
                d for s, d in script if s is side
            )
    # after a 220 to STARTTLS what the server sends next depends on when the
    # caller switches to TLS, which a read boundary decides: compare up to it
    assert _normalise(_upto_tls(chunked)) == _normalise(_upto_tls(whole))


@_examples(150)
@given(parts=SCRIPT, data=st.data())
def test_a_recording_gives_back_the_events_seen_live(
    parts: list[tuple[Side, list[bytes | str]]], data: st.DataObject
) -> None:
    """Any bytes in any chunking, with the STARTTLS switch wherever a 220
    came: the recording holds the reads, and reading it derives exactly the
    events the live Conversation gave, piece for piece, at the same times."""
    import datetime as dt
    import tempfile

    from smtpproxy.recording import Recorder, read_recording

    script = _expand(parts)
    if data.draw(st.booleans()):  # random bytes seldom make a STARTTLS: often start with one
        script = [
            (S, b"220 hi\r\n"),
            (C, b"EHLO x\r\nSTARTTLS\r\n"),
            (S, b"250 x\r\n220 go\r\n"),
            *script,
        ]
    cuts = [data.draw(st.lists(st.integers(0, len(piece)), max_size=6)) for _, piece in script]
    with tempfile.TemporaryDirectory() as folder:
        rec = Recorder.create(
            Path(folder),
            "0000000c",
            dt.datetime.now(dt.UTC),
            0.0,
            client="c",
            listen="l",
            upstream="u",
        )
        conv = Conversation()
        seen: list[tuple[float, Event]] = []
        clock = 0.0
        for i, (side, piece) in enumerate(script):
            start = 0
            for cut in [*sorted(set(cuts[i])), len(piece)]:
                if cut <= start:
                    continue
                clock += 0.25
                events = conv.feed(side, piece[start:cut])
                rec.feed(clock, side, piece[start:cut], events)
                seen += [(clock, e) for e in events]
                start = cut
                if conv.server_tls and data.draw(st.booleans()):
                    clock += 0.25
                    events = conv.tls_established()
                    rec.call(clock, "tls_established", events)
                    seen += [(clock, e) for e in events]
        clock += 0.25
        events = conv.close()
        rec.call(clock, "close", events)
        rec.close(clock, "client", "done")
        seen += [(clock, e) for e in events]
        back = read_recording(rec.path)
    assert [(e.t, e.event) for e in back.entries] == seen


def _upto_tls(events: list[Event]) -> list[Event]:
    cut = next((i for i, e in enumerate(events) if isinstance(e, TlsStart)), len(events) - 1)
    return events[: cut + 1]


def test_endless_multiline_reply_keeps_memory_bounded() -> None:
    conv = Conversation()
    raw = bytearray()
    for _ in range(40):
        chunk = b"250-still going\r\n" * 10_000
        events = conv.feed(S, chunk)
        raw += b"".join(e.raw for e in events)
        assert conv.partial_reply_bytes <= 2 * MAX_LINE
    events = conv.feed(S, b"250 done\r\n") + conv.close()
    raw += b"".join(e.raw for e in events)
    assert raw == b"250-still going\r\n" * 400_000 + b"250 done\r\n"
    (reply,) = [e for e in events if isinstance(e, Reply)]
    assert reply.command == "<greeting>" and reply.lines[-1] == "done"


def test_unanswered_pipelined_lines_keep_memory_bounded() -> None:
    conv = Conversation()
    conv.feed(S, b"220 hi\r\n")
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(3):
            conv.feed(C, b"\n" * 20_000)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown <= MAX_HOLD + 2 * MAX_LINE, f"{grown} bytes held for 60,000 bytes of input"


def test_recording_raw_base64_roundtrip_of_binary(tmp_path: Path) -> None:
    """Bytes that are not UTF-8 are recorded in ``raw_b64`` and read back."""
    from smtpproxy.recording import decode_event, encode_event

    ev = Opaque(C, bytes(range(256)), "line too long")
    d = encode_event(0.5, ev)
    assert "raw" not in d and base64.b64decode(d["raw_b64"]) == bytes(range(256))
    assert decode_event(d).event == ev
