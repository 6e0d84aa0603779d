"""Rules that never fire cost nothing (issue 14): a session in which no rule
can fire takes the relay's plain path, and in one where some can, only what
a live rule could act on is held back. Checked on what the peers see: a raw
client and a raw upstream over loopback that keep every byte they get. The
waits that would hang if bytes were held are bounded (``until``'s timeout)."""

from __future__ import annotations

import random
from pathlib import Path

import trio
from conftest import RunningProxy, start_proxy, wait_for_sessions
from rawpeers import Peer, RawUpstream, connect, only_recording
from test_faults_proxy import SESSION, relay_session

from smtpproxy.events import Note, NoteKind
from smtpproxy.faults import FaultPlan, parse_rule

#: long enough for loopback under load, short enough for a held byte to fail fast
SOON = 5.0


def plan(*rules: str) -> FaultPlan:
    return FaultPlan([parse_rule(r) for r in rules])


def test_rules_that_cannot_fire_in_a_session_are_not_live() -> None:
    """What is known at connect decides: ``session#K``, ``client=``, the
    ``p=`` draw (seed 0's first draw is 0.84: not picked at 0.5)."""
    assert random.Random(0).random() > 0.5
    rules = plan(
        "session#2 mail: 451 4.3.0 not this session",
        "client=10.9.9.9 rcpt: 452 4.5.3 not this client",
        "mail: 451 4.3.0 not drawn, p=0.5",
    )
    first = rules.session("127.0.0.1:4000")
    assert not first.live and first.steps == frozenset()
    second = rules.session("127.0.0.1:4001")  # session#2, and p=0.5's second draw
    assert second.live and "mail" in second.steps and "rcpt" not in second.steps
    named = plan("client=10.9.9.* ehlo: remove PIPELINING").session("10.9.9.9:25")
    assert named.steps == frozenset({"ehlo", "helo"})


async def greeted(
    nursery: trio.Nursery, tmp_path: Path, faults: FaultPlan
) -> tuple[Peer, Peer, RunningProxy]:
    """A raw client through a proxy with ``faults`` to a raw upstream, past
    the greeting and EHLO (the upstream offers PIPELINING)."""
    upstream = await RawUpstream().start(nursery)
    proxy = await start_proxy(nursery, tmp_path, upstream.address, faults=faults)
    client = await connect(proxy.host, proxy.port)
    server = await upstream.accept()
    await server.send(b"220 raw.test\r\n")
    await client.reply()
    await client.send(b"EHLO c.test\r\n")
    await server.until(b"EHLO c.test\r\n")
    await server.send(b"250-raw.test\r\n250 PIPELINING\r\n")
    await client.reply()
    return client, server, proxy


async def finish(client: Peer, server: Peer, proxy: RunningProxy) -> None:
    await client.send(b"QUIT\r\n")
    await server.until(b"QUIT\r\n")
    await server.send(b"221 bye\r\n")
    await client.until(b"221 bye\r\n")
    await client.close()
    await server.to_eof()
    await server.close()
    await wait_for_sessions(proxy.proxy, 1)


async def test_a_session_no_rule_can_fire_in_is_relayed_read_by_read(tmp_path: Path) -> None:
    """A partial command line goes upstream as it comes, as without rules:
    a rule that could fire at MAIL would have to hold it until whole."""
    rules = plan("session#2 mail: 451 4.3.0 no", "client=10.9.9.9 mail: close")
    async with trio.open_nursery() as nursery:
        client, server, proxy = await greeted(nursery, tmp_path, rules)
        await client.send(b"MAIL FROM:<ann@exam")
        assert await server.until(b"MAIL FROM:<ann@exam", timeout=SOON)
        await client.send(b"ple.org>\r\n")
        await server.until(b"\r\n")
        await server.send(b"250 ok\r\n")
        await client.until(b"250 ok\r\n")
        await finish(client, server, proxy)
        nursery.cancel_scope.cancel()
    assert not [e for e in only_recording(tmp_path / "recordings").events() if _fault(e)]


async def test_a_reply_no_live_rule_acts_on_goes_on_as_it_comes(tmp_path: Path) -> None:
    """With a live ``rcpt`` rule, the server's replies are not held reply by
    reply: the first lines of a multi-line reply reach the client before
    the server has sent its last line."""
    async with trio.open_nursery() as nursery:
        client, server, proxy = await greeted(nursery, tmp_path, plan("rcpt#9: 452 4.5.3 no"))
        await client.send(b"HELP\r\n")
        await server.until(b"HELP\r\n")
        await server.send(b"214-help\r\n214-more")
        assert await client.until(b"214-more", timeout=SOON)
        await server.send(b"\r\n214 end\r\n")
        await client.until(b"214 end\r\n")
        await finish(client, server, proxy)
        nursery.cancel_scope.cancel()


async def test_a_reply_begun_early_then_one_a_rule_replaces(tmp_path: Path) -> None:
    """Pipelined MAIL and RCPT under ``rcpt: replace``: the start of MAIL's
    reply goes on at once (no rule acts on it), RCPT's reply is still
    replaced whole, and the client gets each of MAIL's octets once."""
    async with trio.open_nursery() as nursery:
        client, server, proxy = await greeted(
            nursery, tmp_path, plan("rcpt: replace 451 4.3.0 replaced")
        )
        await client.send(b"MAIL FROM:<ann@example.org>\r\nRCPT TO:<a@example.net>\r\n")
        await server.until(b"RCPT TO:<a@example.net>\r\n")
        await server.send(b"250 o")
        assert await client.until(b"250 o", timeout=SOON)
        await server.send(b"k\r\n250 2.1.5 ok\r\n")
        assert await client.until(b"451 4.3.0 replaced\r\n") == b"k\r\n451 4.3.0 replaced\r\n"
        await finish(client, server, proxy)
        nursery.cancel_scope.cancel()
    notes = [e for e in only_recording(tmp_path / "recordings").events() if _fault(e)]
    (note,) = notes
    assert "instead of the server's reply to RCPT: 250 2.1.5 ok" in note.text


#: the EHLO reply has a line a live ``ehlo: remove`` rule could take away
SERVER_SAYS = (
    b"250-raw.test\r\n250-SIZE 1000\r\n250 PIPELINING\r\n",
    b"250 ok\r\n250 ok\r\n354 go\r\n",
    b"250 queued\r\n221 bye\r\n",
)


async def split_session(tmp_path: Path, faults: FaultPlan | None) -> tuple[bytes, bytes]:
    """Both peers' writes split mid-line (the greeting too); what the
    server and the client got."""
    return await relay_session(tmp_path, faults, SERVER_SAYS, split_server=True)


async def test_live_rules_that_do_not_fire_relay_byte_for_byte(tmp_path: Path) -> None:
    """Live rules on the greeting, EHLO's reply, RCPT and the dot, none of
    which fires: both peers get exactly what they get without rules."""
    (tmp_path / "plain").mkdir()
    (tmp_path / "rules").mkdir()
    plain = await split_session(tmp_path / "plain", None)
    rules = plan(
        "helo=nohost.test greeting: replace 220 never",
        "helo=nohost.test ehlo: remove PIPELINING",
        "rcpt#5: 452 4.5.3 no",
        "message#2 dot: 451 4.3.0 no",
        "from=nobody@nowhere.test data: replace 554 no",
    )
    faulty = await split_session(tmp_path / "rules", rules)
    assert faulty == plain
    assert plain == (b"".join(SESSION), b"220 raw.test\r\n" + b"".join(SERVER_SAYS))


def _fault(ev: object) -> bool:
    return isinstance(ev, Note) and ev.kind == NoteKind.FAULT
