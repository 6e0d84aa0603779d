"""Limits and security promises over loopback: the session limit, --redact,
private recordings, file names free of client input, and a bounded soak."""

from __future__ import annotations

import base64
import gc
import hashlib
import hmac
import os
import re
import resource
import stat
from pathlib import Path

import pytest
import trio
from conftest import smtpproxy_process, start_proxy, wait_for_sessions
from rawpeers import Peer, connect, recordings_by_client
from test_recordings import run_cli

from smtpproxy.events import AuthResponse, Command, Side
from smtpproxy.protocol import Conversation
from smtpproxy.recording import Recorder, read_recording
from smtpproxy.relay import Session
from smtpproxy.server import Sink

C, S = Side.CLIENT, Side.SERVER
USER = "user@domain.com"
NAME = re.compile(r"^\d{8}T\d{9}Z-([0-9a-f]{8})\.jsonl$")


async def _open(peer: Peer, hello: bytes = b"EHLO client.example\r\n") -> None:
    assert (await peer.reply()).startswith(b"220 ")
    await peer.send(hello)
    assert (await peer.reply()).startswith(b"250")


async def _message(peer: Peer, body: bytes = b"Subject: t\r\n\r\nhello\r\n") -> None:
    await peer.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n")
    for _ in range(3):
        last = await peer.reply()
    assert last.startswith(b"354 "), last
    await peer.send(body + b".\r\n")
    assert (await peer.reply()).startswith(b"250 2.0.0 Ok: queued")


async def _quit(peer: Peer) -> None:
    await peer.send(b"QUIT\r\n")
    assert (await peer.reply()).startswith(b"221 ")
    await peer.to_eof()
    await peer.close()


async def test_sessions_beyond_the_limit_get_421_at_once(tmp_path: Path) -> None:
    sink = Sink()
    async with trio.open_nursery() as nursery:
        address = await nursery.start(sink.serve)
        proxy = await start_proxy(nursery, tmp_path, address, max_sessions=2)
        first, second = [await connect(proxy.host, proxy.port) for _ in range(2)]
        await _open(first)
        await _open(second)
        assert proxy.proxy.stats.active == 2
        third = await connect(proxy.host, proxy.port)
        refused = await third.to_eof(timeout=1)
        await third.close()
        await _message(first)
        await _message(second)
        await _quit(first)
        await _quit(second)
        await wait_for_sessions(proxy.proxy, 2)
        later = await connect(proxy.host, proxy.port)  # a slot is free again
        await _open(later)
        await _quit(later)
        await wait_for_sessions(proxy.proxy, 3)
        nursery.cancel_scope.cancel()
    assert refused == b"421 4.3.2 smtpproxy: too many sessions, try later\r\n"
    stats = proxy.proxy.stats
    assert (stats.sessions, stats.refused, stats.active) == (3, 1, 0)
    assert sink.stats.messages == 2
    assert len(proxy.recording_paths()) == 3  # none for the refused client


# -- --redact ----------------------------------------------------------------


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class AuthSession:
    """One AUTH exchange through the proxy: each client line and whether it
    carries a secret, and the payloads and secrets that must not be recorded."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer
        self.port = peer.port
        self.lines: list[tuple[bytes, bool]] = [(b"EHLO client.example\r\n", False)]
        self.secrets: list[bytes] = []

    async def say(self, line: bytes, secret: bool = False) -> bytes:
        self.lines.append((line, secret))
        await self.peer.send(line)
        return await self.peer.reply()


async def _auth(peer: Peer, how: str) -> AuthSession:
    a = AuthSession(peer)
    pw = f"pw-{how}-s3cret".encode()
    a.secrets.append(pw)
    plain = _b64(b"\0" + USER.encode() + b"\0" + pw)
    if how == "plain-initial":
        assert (await a.say(b"AUTH PLAIN " + plain + b"\r\n", True)).startswith(b"235 ")
        a.secrets.append(plain)
    elif how == "plain":
        assert await a.say(b"AUTH PLAIN\r\n") == b"334 \r\n"
        assert (await a.say(plain + b"\r\n", True)).startswith(b"235 ")
        a.secrets.append(plain)
    elif how == "login-initial":
        assert (
            await a.say(b"AUTH LOGIN " + _b64(USER.encode()) + b"\r\n") == b"334 UGFzc3dvcmQ6\r\n"
        )
        assert (await a.say(_b64(pw) + b"\r\n", True)).startswith(b"235 ")
        a.secrets.append(_b64(pw))
    elif how == "login":
        assert await a.say(b"AUTH LOGIN\r\n") == b"334 VXNlcm5hbWU6\r\n"
        assert await a.say(_b64(USER.encode()) + b"\r\n") == b"334 UGFzc3dvcmQ6\r\n"
        assert (await a.say(_b64(pw) + b"\r\n", True)).startswith(b"235 ")
        a.secrets.append(_b64(pw))
    elif how == "cram-md5":
        challenge = base64.b64decode((await a.say(b"AUTH CRAM-MD5\r\n"))[4:].strip())
        digest = hmac.new(pw, challenge, hashlib.md5).hexdigest().encode()
        answer = _b64(USER.encode() + b" " + digest)
        assert (await a.say(answer + b"\r\n", True)).startswith(b"235 ")
        a.secrets[:] = [digest, answer]  # the password itself never goes on the wire
    elif how == "xoauth2":
        token = b"ya29.token-" + pw
        payload = _b64(b"user=" + USER.encode() + b"\x01auth=Bearer " + token + b"\x01\x01")
        # the sink does not offer XOAUTH2: it refuses, which is fine here
        assert (await a.say(b"AUTH XOAUTH2 " + payload + b"\r\n", True)).startswith(b"504 ")
        a.secrets[:] = [token, payload]
    elif how == "oauthbearer":
        token = b"bearer-token-" + pw
        payload = _b64(b"n,a=" + USER.encode() + b",\x01auth=Bearer " + token + b"\x01\x01")
        assert (await a.say(b"AUTH OAUTHBEARER " + payload + b"\r\n", True)).startswith(b"504 ")
        a.secrets[:] = [token, payload]
    return a


MECHANISMS = [
    "plain-initial",
    "plain",
    "login-initial",
    "login",
    "cram-md5",
    "xoauth2",
    "oauthbearer",
]


async def test_redact_keeps_every_secret_out_of_recordings_and_transcript(tmp_path: Path) -> None:
    sink = Sink()
    sessions: dict[str, AuthSession] = {}
    async with trio.open_nursery() as nursery:
        address = await nursery.start(sink.serve)
        proxy = await start_proxy(nursery, tmp_path, address, redact=True)
        for how in MECHANISMS:
            peer = await connect(proxy.host, proxy.port)
            await _open(peer)
            sessions[how] = await _auth(peer, how)
            await _quit(peer)
            sessions[how].lines.append((b"QUIT\r\n", False))
            await wait_for_sessions(proxy.proxy, len(sessions))
        nursery.cancel_scope.cancel()

    transcript = proxy.transcript().encode()
    recordings = recordings_by_client(proxy.recordings)
    for how, a in sessions.items():
        rec = recordings[a.port]
        data = rec.path.read_bytes()
        shown = run_cli(tmp_path, "show", "--json", str(rec.path)).stdout.encode()
        for secret in a.secrets:
            for where, text in (
                ("recording", data),
                ("transcript", transcript),
                ("show --json", shown),
            ):
                # in any letter case: a field that upper-cases a line gives the secret back up to case
                low = text.lower()
                assert secret.lower() not in low, f"{how}: {secret!r} in the {where}"
                assert _b64(secret).lower() not in low, (
                    f"{how}: base64 of {secret!r} in the {where}"
                )
        assert USER.encode() in data, how
        assert rec.raw(C) == b"".join(line for line, secret in a.lines if not secret), how
        redacted = [
            e
            for e in rec.events()
            if isinstance(e, (Command, AuthResponse)) and "redacted" in e.flags
        ]
        assert len(redacted) == sum(secret for _, secret in a.lines), how
        for ev in redacted:
            assert ev.auth is not None and "<redacted>" in ev.auth.fields.values()
    assert USER.encode() in transcript


@pytest.mark.parametrize(
    "case",
    [
        "scram",
        "pipelined-login",
        "cut-short",
    ],
)
async def test_redact_secrets_the_observer_cannot_read_as_sasl(tmp_path: Path, case: str) -> None:
    pw = b"correct-horse-battery"
    sink = Sink()
    async with trio.open_nursery() as nursery:
        address = await nursery.start(sink.serve)
        proxy = await start_proxy(nursery, tmp_path, address, redact=True)
        peer = await connect(proxy.host, proxy.port)
        await _open(peer)
        if case == "scram":
            await peer.send(b"AUTH SCRAM-SHA-256 " + _b64(b"n,,n=user,r=nonce") + b"\r\n")
            secret = _b64(b"c=biws,r=nonce-server,p=" + pw)
            await peer.reply()  # the sink: 504, not offered
            await peer.send(secret + b"\r\n")  # a client that went on regardless
            await peer.reply()
            await _quit(peer)
        elif case == "pipelined-login":
            # the sink refuses AUTH inside a mail transaction (503), then reads
            # the answers the client pipelined as commands (500 each)
            await peer.send(b"MAIL FROM:<a@example.org>\r\n")
            await peer.reply()
            secret = _b64(pw)
            await peer.send(b"AUTH LOGIN\r\n" + _b64(USER.encode()) + b"\r\n" + secret + b"\r\n")
            replies = [await peer.reply() for _ in range(3)]
            assert [r[:4] for r in replies] == [b"503 ", b"500 ", b"500 "]
            await _quit(peer)
        else:
            secret = _b64(b"\0" + USER.encode() + b"\0" + pw)
            await peer.send(b"AUTH PLAIN " + secret)
            await peer.close()
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    path = proxy.recording_paths()[0]
    shown = run_cli(tmp_path, "show", "--json", str(path)).stdout.encode()
    for text in (path.read_bytes(), shown, proxy.transcript().encode()):
        low = text.lower()
        assert secret.lower() not in low and pw.lower() not in low


# -- files -------------------------------------------------------------------


def _umask_zero() -> None:
    os.umask(0)


async def test_recordings_are_private_even_with_umask_zero(tmp_path: Path) -> None:
    """The proxy creates the folder (and its parents) itself: 0700, files 0600."""
    folder = tmp_path / "new" / "deeper" / "recordings"
    with smtpproxy_process(
        "record",
        "--listen",
        "127.0.0.1:0",
        "--recordings",
        str(folder),
        "--quiet",
        cwd=tmp_path,
        preexec_fn=_umask_zero,
    ) as child:
        peer = await connect(child.host, child.port)
        await _open(peer)
        await _message(peer)
        await _quit(peer)
        await trio.to_thread.run_sync(child.wait_stdout, "closed by", 10)
        finished = await trio.to_thread.run_sync(child.finish)
    assert finished.returncode == 0, finished.stderr
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    (path,) = folder.glob("*.jsonl")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_recording(path).close is not None


HOSTILE = [
    b"EHLO ../../etc/passwd\r\n",
    b"EHLO /tmp/evil.jsonl\r\n",
    b"EHLO ..\\..\\windows %2e%2e%2f \x00 \xff\r\n",
    b"HELO $(touch pwned) `id` ;rm -rf /\r\n",
]


async def test_file_names_never_hold_client_input(tmp_path: Path) -> None:
    sink = Sink()
    async with trio.open_nursery() as nursery:
        address = await nursery.start(sink.serve)
        proxy = await start_proxy(nursery, tmp_path, address)
        for hello in HOSTILE:
            peer = await connect(proxy.host, proxy.port)
            assert (await peer.reply()).startswith(b"220 ")
            await peer.send(hello)
            await peer.reply()
            await peer.send(
                b"MAIL FROM:<../../x@example.org>\r\nRCPT TO:<../etc/y@example.net>\r\n"
            )
            await peer.reply()
            await peer.reply()
            await _quit(peer)
        await wait_for_sessions(proxy.proxy, len(HOSTILE))
        nursery.cancel_scope.cancel()
    everything = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    names = [p.name for p in proxy.recording_paths()]
    assert everything == ["recordings"] + [f"recordings/{n}" for n in names]
    ids = []
    for name, path in zip(names, proxy.recording_paths()):
        match = NAME.match(name)
        assert match is not None, name
        rec = read_recording(path)
        assert rec.header.session == match.group(1)
        ids.append(match.group(1))
        assert any(isinstance(e, Command) and e.verb in ("EHLO", "HELO") for e in rec.events())
    assert len(set(ids)) == len(HOSTILE)


# -- soak ----------------------------------------------------------------------

CLIENTS = 500
MESSAGES = 3


async def test_soak_five_hundred_concurrent_sessions(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(4096, hard), hard))
    sink = Sink()
    sent = 0

    async def client(i: int) -> None:
        nonlocal sent
        peer = await connect(proxy.host, proxy.port)
        await _open(peer, b"EHLO soak%d.example\r\n" % i)
        for n in range(MESSAGES):
            await _message(peer, b"Subject: soak %d/%d\r\n\r\nbody\r\n" % (i, n))
            sent += 1
        await _quit(peer)

    async with trio.open_nursery() as nursery:
        address = await nursery.start(sink.serve)
        proxy = await start_proxy(nursery, tmp_path, address)
        with trio.fail_after(60):
            async with trio.open_nursery() as clients:
                for i in range(CLIENTS):
                    clients.start_soon(client, i)
        await wait_for_sessions(proxy.proxy, CLIENTS, timeout=30)
        nursery.cancel_scope.cancel()
    recorded = 0
    paths = proxy.recording_paths()
    for path in paths:
        rec = read_recording(path)
        assert rec.close is not None
        recorded += rec.close.totals["messages_accepted"]
    assert sent == sink.stats.messages == recorded == CLIENTS * MESSAGES
    assert len(paths) == CLIENTS
    stats = proxy.proxy.stats
    assert (stats.sessions, stats.active, stats.refused) == (CLIENTS, 0, 0)
    # memory goes back to idle: nothing of the 500 sessions is kept alive
    gc.collect()
    alive = [o for o in gc.get_objects() if isinstance(o, (Session, Conversation, Recorder))]
    assert alive == []


def test_an_existing_open_recordings_folder_is_made_private(tmp_path: Path) -> None:
    """A checkout gives the repository's recordings/ mode 0755; record makes it 0700."""
    folder = tmp_path / "recordings"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    with smtpproxy_process(
        "record", "--listen", "127.0.0.1:0", "--recordings", str(folder), "--quiet", cwd=tmp_path
    ) as child:
        finished = child.finish()
    assert finished.returncode == 0
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert "made it 0700" in finished.stderr
