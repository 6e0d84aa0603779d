"""Terminal escape injection (issue 12, item 6): what a client, a server or a
recording file says reaches a terminal with its control characters made
visible, in the live transcript, ``show``, ``show --json``, ``diff`` and
``replay``; the recording keeps the exact bytes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import trio
from conftest import start_proxy, wait_for_sessions
from rawpeers import connect
from test_recordings import hostport, run_cli, start_sink

from smtpproxy.events import Side
from smtpproxy.recording import read_recording
from smtpproxy.render import json_visible, visible

#: C0 but LF (lines), DEL, C1, and the bidirectional overrides
CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")

TITLE = b"\x1b]0;pwned\x07\x1b[2J"
OSC8 = b"\x1b]8;;http://evil.example/\x1b\\click me\x1b]8;;\x1b\\"
CSI_C1 = "\u009b31m".encode()  # a one-octet CSI (U+009B) in UTF-8
BIDI = "\u202egnp.exe".encode()


def _client_bytes(tag: bytes) -> list[bytes]:
    return [
        b"EHLO " + TITLE + tag + b"\r\n",
        b"MAIL FROM:<\x1b[31mred" + tag + b"@example.org>\r\n",
        b"RCPT TO:<bob\x08\x08\x08eve@example.net>\r\n",
        b"NOOP fake\rline\x1b[K" + CSI_C1 + b"\r\n",
        b"DATA\r\n",
        b"Subject: " + OSC8 + b" " + BIDI + b"\r\n\r\nbody\r\n.\r\n",
        b"QUIT\r\n",
    ]


async def _session(tmp_path: Path, folder: str, tag: bytes) -> tuple[Path, str, bytes]:
    """One hostile session through the proxy to the Sink (which echoes the
    EHLO name in its reply): the recording, the live transcript, the bytes sent."""
    sent = _client_bytes(tag)
    async with trio.open_nursery() as nursery:
        sink = await start_sink(nursery)
        (tmp_path / folder).mkdir()
        proxy = await start_proxy(nursery, tmp_path / folder, sink)
        peer = await connect(proxy.host, proxy.port)
        await peer.reply()
        for line in sent:
            await peer.send(line)
            await peer.reply()
        await peer.to_eof()
        await peer.close()
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    (path,) = proxy.recording_paths()
    return path, proxy.transcript(), b"".join(sent)


def _clean(text: str, where: str) -> None:
    found = CONTROL.search(text)
    assert found is None, (
        f"{found.group()!r} reached the terminal in {where}: {text[max(0, found.start() - 40) : found.end() + 40]!r}"
    )


async def test_hostile_bytes_reach_no_terminal_raw_and_stay_exact_in_the_recording(
    tmp_path: Path,
) -> None:
    path, live, sent = await _session(tmp_path, "a", b"A")
    rec = read_recording(path)
    assert rec.raw(Side.CLIENT) == sent  # the recording keeps every byte
    _clean(live, "the live transcript")
    assert "\\x1b]0;pwned\\x07\\x1b[2J" in live  # shown, made visible
    assert "NOOP fake\\rline\\x1b[K\\x9b31m" in live
    assert "\\u202egnp.exe" in live
    assert "bob\\x08\\x08\\x08eve@example.net" in live

    shown = run_cli(tmp_path, "show", str(path))
    assert shown.returncode == 0, shown.stderr
    _clean(shown.stdout, "show")
    # what show prints is what was printed live
    assert [line for line in shown.lines if " -> " in line or " <- " in line] == [
        line for line in live.splitlines() if " -> " in line or " <- " in line
    ]

    as_json = run_cli(tmp_path, "show", "--json", str(path))
    _clean(as_json.stdout, "show --json")
    events = [json.loads(line) for line in as_json.lines]
    raw = "".join(e.get("raw", "") for e in events if e["side"] == "client")
    assert raw.encode() == sent  # the JSON escapes give the exact text back

    listing = run_cli(tmp_path, "show", str(path.parent))
    _clean(listing.stdout, "the folder listing")


async def test_diff_and_replay_print_hostile_text_made_visible(tmp_path: Path) -> None:
    a, _, _ = await _session(tmp_path, "a", b"A")
    b, _, _ = await _session(tmp_path, "b", b"\x1b[5mB")
    done = run_cli(tmp_path, "diff", "--strict", str(a), str(b))
    assert done.returncode == 1, done.stdout
    _clean(done.stdout, "diff")
    assert "\\x1b[5mB" in done.stdout
    done = run_cli(tmp_path, "diff", "--json", "--strict", str(a), str(b))
    _clean(done.stdout, "diff --json")
    json.loads(done.stdout)

    async with trio.open_nursery() as nursery:
        sink = await start_sink(nursery, hostname="sink\x1b]0;other\x07.test")
        done = await trio.to_thread.run_sync(
            lambda: run_cli(tmp_path, "replay", str(b), "--to", hostport(sink), "--strict")
        )
        nursery.cancel_scope.cancel()
    assert done.returncode in (0, 1), done.stderr
    _clean(done.stdout + done.stderr, "replay")
    assert "\\x1b]0;other\\x07" in done.stdout


def test_header_fields_of_a_file_are_printed_made_visible(tmp_path: Path) -> None:
    lines = [
        json.dumps(
            {
                "format": "smtpproxy-recording",
                "version": 2,
                "session": "0123abcd",
                "start": "2026-11-30T00:00:00.000Z\x1b[2J",
                "client": "127.0.0.1:1\u009b2J",
                "listen": "l",
                "upstream": "\x1b]0;title\x07",
            }
        ),
        '[0.1,"s","220 hi\\u001b[31m\\r\\n"]',
        '{"t":0.2,"type":"close","by":"client","reason":"gone\\u0007"}',
    ]
    path = tmp_path / "20261130T000000000Z-0123abcd.jsonl"
    path.write_text("\n".join(lines) + "\n", "utf-8")
    for args in (["show", str(path)], ["show", str(tmp_path)], ["show", "--json", str(path)]):
        done = run_cli(tmp_path, *args)
        assert done.returncode == 0, done.stderr
        _clean(done.stdout, " ".join(args[:2]))
    done = run_cli(tmp_path, "show", str(path))
    assert "client 127.0.0.1:1\\x9b2J, upstream \\x1b]0;title\\x07" in done.lines[0]


def test_visible_and_json_visible() -> None:
    assert visible("a\x1b[2Jb\r\n\t\x9b\u202e") == "a\\x1b[2Jb\\r\\n\\t\\x9b\\u202e"
    assert visible("café ☃ plain") == "café ☃ plain"
    text = json.dumps({"a": "x\x9b\u202ey\x7f\x1b"}, ensure_ascii=False, indent=2)
    out = json_visible(text)
    assert CONTROL.search(out.replace("\n", "")) is None
    assert json.loads(out) == {"a": "x\x9b\u202ey\x7f\x1b"}
