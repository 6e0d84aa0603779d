"""End to end: the real ``smtpproxy`` command in a subprocess, on loopback.

These tests cover what only the command line does: the banner, signals,
exit codes, the recordings folder and files, and the one-line errors a user
can cause.
"""

from __future__ import annotations

import os
import re
import signal
import smtplib
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest
from conftest import (
    SmtpproxyProcess,
    free_port,
    read_reply,
    run_smtpproxy_once,
    smtpproxy_process,
    swaks_argv,
)

from smtpproxy.events import Command, MessageEnd, Note, Side
from smtpproxy.recording import Recording, read_recording

# after QUIT and 221 both peers hang up; the proxy may see either end first
CLOSED_AFTER_QUIT = re.compile(
    r"closed by (client|server) \((client|server) closed the connection\)"
)

MESSAGE = b"From: ann@example.org\r\nTo: bob@example.net\r\nSubject: cli test\r\n\r\nhello\r\n"


def send_plain(address: tuple[str, int]) -> None:
    """One message with AUTH PLAIN (not smtplib's first choice, CRAM-MD5)."""
    with smtplib.SMTP(*address, timeout=10) as client:
        client.ehlo("client.example")
        client.user, client.password = "user@domain.com", "password"
        client.auth("PLAIN", client.auth_plain)
        client.sendmail("ann@example.org", ["bob@example.net"], MESSAGE)


def record_args(port: int, recordings: Path, *extra: str) -> list[str]:
    return ["record", "--listen", f"127.0.0.1:{port}", "--recordings", str(recordings), *extra]


def recordings_in(folder: Path) -> list[Recording]:
    return [read_recording(p) for p in sorted(folder.glob("*.jsonl"))]


def wait_session_closed(proxy: SmtpproxyProcess) -> str:
    """The summary line of the first session, once the proxy has closed it."""
    return proxy.wait_stdout("== session ")


# -- 1. a session, SIGTERM, the files ----------------------------------------


def test_record_embedded_upstream_sigterm(tmp_path: Path) -> None:
    rec_dir = tmp_path / "recordings"
    port = free_port()
    with smtpproxy_process(*record_args(port, rec_dir), cwd=tmp_path) as proxy:
        assert proxy.address == ("127.0.0.1", port)
        assert "embedded sink" in proxy.banner
        send_plain(proxy.address)
        summary = wait_session_closed(proxy)
        done = proxy.finish(signal.SIGTERM)

    assert done.returncode == 0, done.stderr
    assert CLOSED_AFTER_QUIT.search(summary) and "1 accepted" in summary
    assert 'user="user@domain.com" password="password"' in done.stdout
    assert "message via DATA" in done.stdout and "Subject: cli test" in done.stdout
    assert "1 session(s), 1 recording(s)" in done.stderr
    assert "Traceback" not in done.stderr

    assert stat.S_IMODE(rec_dir.stat().st_mode) == 0o700
    (path,) = rec_dir.glob("*.jsonl")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert b'"type":"close"' in path.read_bytes().splitlines()[-1]
    rec = read_recording(path)
    assert rec.close is not None and not rec.truncated
    assert rec.close.by in ("client", "server")
    assert rec.close.totals["messages_accepted"] == 1
    assert rec.header.upstream.startswith("embedded sink 127.0.0.1:")
    (end,) = [e for e in rec.events() if isinstance(e, MessageEnd)]
    assert end.size == len(MESSAGE)


# -- 2. SIGINT, with a session still open --------------------------------------


def test_sigint_closes_open_session_and_recordings(tmp_path: Path) -> None:
    rec_dir = tmp_path / "recordings"
    with smtpproxy_process(*record_args(free_port(), rec_dir), cwd=tmp_path) as proxy:
        send_plain(proxy.address)
        wait_session_closed(proxy)
        with socket.create_connection(proxy.address, timeout=10) as open_client:
            assert read_reply(open_client).startswith(b"220 ")
            open_client.sendall(b"EHLO still.open\r\n")
            assert read_reply(open_client).startswith(b"250")
            host, port = open_client.getsockname()[:2]
            local = f"{host}:{port}"
            done = proxy.finish(signal.SIGINT)
            # the proxy closed its side: the client sees the end of the stream
            assert open_client.recv(1024) == b""

    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "2 session(s), 2 recording(s)" in done.stderr
    recs = {r.header.client: r for r in recordings_in(rec_dir)}
    assert len(recs) == 2
    still_open = recs.pop(local)
    (finished,) = recs.values()
    assert finished.close is not None and finished.close.by in ("client", "server")
    assert still_open.close is not None
    assert still_open.close.by == "proxy"
    assert still_open.close.reason == "proxy shutting down"
    assert [e.verb for e in still_open.events() if isinstance(e, Command)] == ["EHLO"]
    assert f"session {local} closed by proxy (proxy shutting down)" in done.stdout


# -- 3. SIGKILL mid-session ----------------------------------------------------


def test_sigkill_leaves_a_readable_recording(tmp_path: Path) -> None:
    rec_dir = tmp_path / "recordings"
    with (
        smtpproxy_process(*record_args(free_port(), rec_dir), cwd=tmp_path) as proxy,
        socket.create_connection(proxy.address, timeout=10) as client,
    ):
        assert read_reply(client).startswith(b"220 ")
        client.sendall(b"EHLO killed.example\r\n")
        assert read_reply(client).startswith(b"250")
        client.sendall(b"MAIL FROM:<ann@example.org>\r\n")
        assert read_reply(client).startswith(b"250 ")
        done = proxy.finish(signal.SIGKILL)

    assert done.returncode == -signal.SIGKILL
    (path,) = rec_dir.glob("*.jsonl")
    rec = read_recording(path)
    assert rec.close is None
    commands = [e for e in rec.events() if isinstance(e, Command)]
    assert [c.verb for c in commands] == ["EHLO", "MAIL"]
    assert commands[1].path == "ann@example.org"
    assert rec.raw(Side.CLIENT) == b"EHLO killed.example\r\nMAIL FROM:<ann@example.org>\r\n"
    assert rec.raw(Side.SERVER).endswith(b"\r\n250 2.1.0 sender ok\r\n")


# -- 4. an upstream that refuses -----------------------------------------------


def unreachable_session(tmp_path: Path) -> tuple[str, Recording, str]:
    """Point the proxy at a closed port, connect once: (the client's reply,
    the recording, the transcript)."""
    rec_dir = tmp_path / "recordings"
    closed = free_port()  # bound and closed again: nothing listens there
    args = record_args(free_port(), rec_dir, "--upstream", f"127.0.0.1:{closed}")
    with smtpproxy_process(*args, cwd=tmp_path) as proxy:
        assert f"relaying to 127.0.0.1:{closed}" in proxy.banner
        with socket.create_connection(proxy.address, timeout=10) as client:
            reply = read_reply(client).decode()
            assert client.recv(1024) == b""  # and the proxy hangs up
        wait_session_closed(proxy)
        done = proxy.finish(signal.SIGTERM)
    assert done.returncode == 0, done.stderr
    (rec,) = recordings_in(rec_dir)
    return reply, rec, done.stdout


def test_unreachable_upstream_gets_421(tmp_path: Path) -> None:
    reply, rec, transcript = unreachable_session(tmp_path)
    assert reply.startswith("421 4.4.0 ")
    assert reply.count("\r\n") == 1
    assert reply.rstrip("\r\n").endswith("unreachable: connection refused")
    notes = [e for e in rec.events() if isinstance(e, Note)]
    (error,) = [n for n in notes if n.kind == "upstream_error"]
    assert error.text.endswith("unreachable: connection refused")
    # the proxy's own 421 is recorded as a note holding the bytes it sent,
    # which are no part of either peer's stream
    (own,) = [n for n in notes if n.kind == "proxy_reply"]
    assert own.raw.decode() == reply
    assert rec.raw(Side.CLIENT) == b"" and rec.raw(Side.SERVER) == b""
    assert rec.close is not None and rec.close.by == "proxy"
    assert "unreachable: connection refused" in rec.close.reason
    assert "closed by proxy (upstream 127.0.0.1:" in transcript


# -- 5. --quiet ------------------------------------------------------------------


def test_quiet_prints_only_the_summary_line(tmp_path: Path) -> None:
    rec_dir = tmp_path / "recordings"
    with smtpproxy_process(*record_args(free_port(), rec_dir, "--quiet"), cwd=tmp_path) as proxy:
        send_plain(proxy.address)
        wait_session_closed(proxy)
        done = proxy.finish(signal.SIGTERM)
    assert done.returncode == 0, done.stderr
    assert len(recordings_in(rec_dir)) == 1
    (summary,) = done.stdout.splitlines()
    assert " -> " not in done.stdout and " <- " not in done.stdout
    assert "== session " in summary
    assert CLOSED_AFTER_QUIT.search(summary) and "1 accepted" in summary
    assert "AUTH PLAIN user@domain.com ok" in summary


# -- 6. user mistakes: one clear line, no traceback --------------------------------


def test_listen_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        for command in (
            record_args(port, tmp_path / "rec"),
            ["sink", "--listen", f"127.0.0.1:{port}"],
        ):
            done = run_smtpproxy_once(*command, cwd=tmp_path)
            assert done.returncode == 1, done.stderr
            assert "Traceback" not in done.stderr
            (line,) = done.stderr.splitlines()
            assert line.startswith(f"Error: cannot listen on 127.0.0.1:{port}: ")
            assert "in use" in line


def test_listen_not_an_address(tmp_path: Path) -> None:
    done = run_smtpproxy_once("record", "--listen", "nonsense:abc", cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert "Invalid value for '--listen': 'nonsense:abc': port must be a number" in done.stderr
    assert not (tmp_path / "recordings").exists()


def test_recordings_under_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a folder\n")
    done = run_smtpproxy_once(*record_args(free_port(), tmp_path / "afile" / "sub"), cwd=tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("Error: cannot use recordings folder ")
    assert "--recordings DIR" in line


def test_recordings_is_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("not a folder\n")
    done = run_smtpproxy_once(*record_args(free_port(), tmp_path / "afile"), cwd=tmp_path)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"Error: cannot use recordings folder {tmp_path / 'afile'}: ")
    assert "--recordings DIR" in line
    assert (tmp_path / "afile").read_text() == "not a folder\n"


# -- 7. --help and sink -------------------------------------------------------------


def test_help_lists_commands(tmp_path: Path) -> None:
    done = run_smtpproxy_once("--help", cwd=tmp_path)
    assert done.returncode == 0
    commands = done.stdout.split("Commands:")[1].split()
    assert "record" in commands and "sink" in commands


def test_sink_accepts_a_message_and_stops_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    with smtpproxy_process("sink", "--listen", f"127.0.0.1:{port}", cwd=tmp_path) as sink:
        assert sink.address == ("127.0.0.1", port)
        with smtplib.SMTP(*sink.address, timeout=10) as client:
            client.ehlo("client.example")
            assert client.has_extn("pipelining") and client.has_extn("chunking")
            refused = client.sendmail("ann@example.org", ["bob@example.net"], MESSAGE)
            assert refused == {}
        done = sink.finish(signal.SIGTERM)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "1 session(s), 1 message(s) accepted" in done.stderr
    assert not (set(os.listdir(tmp_path)) - {".smtpproxy-home"})  # the sink keeps nothing


# -- what a recording shows is what the proxy showed live ------------------------


def test_show_of_each_recording_prints_what_the_proxy_printed_live(tmp_path: Path) -> None:
    """The recording holds the reads; ``show`` derives every event from them
    again. Through the real command, for swaks pipelining after AUTH LOGIN,
    for smtplib after STARTTLS, and for a client that types byte by byte:
    every event line ``show`` prints is the line the live console printed."""
    import ssl

    rec_dir = tmp_path / "recordings"
    message = tmp_path / "message.eml"
    message.write_bytes(MESSAGE)
    with smtpproxy_process(*record_args(free_port(), rec_dir), cwd=tmp_path) as proxy:
        host, port = proxy.address
        done = subprocess.run(
            swaks_argv(
                host,
                port,
                message,
                "--pipeline",
                "--auth",
                "LOGIN",
                "--auth-user",
                "u",
                "--auth-password",
                "p",
            ),
            capture_output=True,
            timeout=30,
            check=False,
        )
        assert done.returncode == 0, done.stdout
        ca = ssl.create_default_context(
            cafile=str(tmp_path / ".smtpproxy-home" / "smtpproxy-ca.pem")
        )
        with smtplib.SMTP(host, port, timeout=10) as client:
            client.starttls(context=ca)
            client.sendmail("ann@example.org", ["bob@example.net"], MESSAGE)
        with socket.create_connection(proxy.address, timeout=10) as typist:
            typist.recv(1000)
            for byte in b"HELO t\r\nNOOP\r\nQUIT\r\n":
                typist.sendall(bytes([byte]))
                time.sleep(0.002)
            typist.settimeout(10)
            while typist.recv(1000):
                pass
        live = proxy.finish(signal.SIGTERM)  # ends any session still open, with its summary
    assert live.returncode == 0, live.stderr
    paths = sorted(rec_dir.glob("*.jsonl"))
    assert len(paths) == 3
    for path in paths:
        session = path.stem.rsplit("-", 1)[1]
        printed = [x for x in live.stdout.splitlines() if x.startswith(f"[{session}] ")]
        shown = run_smtpproxy_once("show", str(path), cwd=tmp_path)
        assert shown.returncode == 0, shown.stderr
        # the first and last lines differ by design: "connected" / the file's header, and the summary
        assert printed[1:-1] == shown.stdout.splitlines()[1:-1], session
        assert len(printed) > 8
    assert "TLS with client" in live.stdout and '-> cA==   [password="p"]' in live.stdout


@pytest.mark.parametrize("mode", ["plain", "starttls"])
def test_show_prints_what_was_printed_live_when_the_proxy_speaks_itself(
    tmp_path: Path, mode: str
) -> None:
    """``--upstream-tls plain``: the proxy answers STARTTLS itself, and the
    Conversation reads its 220 (the recording's fed note). ``starttls``: the
    proxy upgrades the upstream with its own commands (notes). Upstream: a
    second smtpproxy with its embedded sink, which offers STARTTLS."""
    import ssl

    with smtpproxy_process(
        *record_args(free_port(), tmp_path / "upstream", "--quiet"), cwd=tmp_path
    ) as upstream:
        ca = ssl.create_default_context(
            cafile=str(tmp_path / ".smtpproxy-home" / "smtpproxy-ca.pem")
        )
        args = record_args(
            free_port(), tmp_path / "recordings", "--upstream", f"{upstream.host}:{upstream.port}"
        )
        with smtpproxy_process(
            *args, "--upstream-tls", mode, "--upstream-insecure", cwd=tmp_path
        ) as proxy:
            with smtplib.SMTP(*proxy.address, timeout=10) as client:
                client.ehlo("client.example")
                if mode == "plain":
                    client.starttls(context=ca)
                client.login("u", "p")
                client.sendmail("ann@example.org", ["bob@example.net"], MESSAGE)
            live = proxy.finish(signal.SIGTERM)
        upstream.finish(signal.SIGTERM)
    assert live.returncode == 0, live.stderr
    (path,) = (tmp_path / "recordings").glob("*.jsonl")
    session = path.stem.rsplit("-", 1)[1]
    printed = [x for x in live.stdout.splitlines() if x.startswith(f"[{session}] ")]
    shown = run_smtpproxy_once("show", str(path), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert printed[1:-1] == shown.stdout.splitlines()[1:-1]
    # a note quoting the upstream's multi-line EHLO reply keeps the prefix on every line
    assert all(x.startswith(f"[{session}] ") for x in shown.stdout.splitlines()[1:])
    assert len([x for x in live.stdout.splitlines() if x.strip() and not x.startswith("[")]) == 0
    assert "1 accepted" in printed[-1] and "1 accepted" in shown.stdout.splitlines()[-1]
    proxy_made = (
        "STARTTLS answered by the proxy" if mode == "plain" else "proxy sent upstream: STARTTLS"
    )
    assert f"[{session}] == {proxy_made}" in printed
