"""Process-level defences of ``smtpproxy record`` (issue 12, items 5 and 7):
file descriptors running out, SIGHUP, the key log's mode, the modes of the
CA's folder and key, and the bound on the CA's per-SNI caches.

Real ``smtpproxy`` subprocesses under real resource limits, real sockets on
127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import os
import re
import resource
import selectors
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from conftest import (
    SMTPPROXY,
    SmtpproxyProcess,
    free_port,
    read_reply,
    smtpproxy_env,
    smtpproxy_process,
    start_proxy,
    wait_for_sessions,
)
from cryptography import x509

from smtpproxy.events import Command
from smtpproxy.recording import read_recording
from smtpproxy.server import Sink
from smtpproxy.tls import MAX_CONTEXTS, MAX_LEAVES, CertificateAuthority, ServerContexts

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="descriptor limits as on Linux"
)

#: clients opened at once against a proxy that can hold far fewer
CLIENTS = 200
#: seconds within which every one of them must have its first line
FIRST_LINE_WITHIN = 20.0


@pytest.fixture(autouse=True)
def _enough_descriptors() -> Iterator[None]:
    """The test process opens CLIENTS sockets: its soft limit goes up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    assert hard >= CLIENTS + 100, f"the hard descriptor limit {hard} is too low for this test"
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def nofile(soft: int, hard: int) -> Callable[[], None]:
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return limit


def first_lines(address: tuple[str, int], count: int) -> tuple[list[bytes], list[socket.socket]]:
    """Connect ``count`` clients at once and wait (bounded) for each one's
    first line; the lines (b"" for none) and the open sockets."""
    socks = []
    for _ in range(count):
        s = socket.create_connection(address, timeout=5)
        s.setblocking(False)
        socks.append(s)
    got = {s: b"" for s in socks}
    deadline = time.monotonic() + FIRST_LINE_WITHIN
    with selectors.DefaultSelector() as sel:
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        while sel.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(left):
                client = key.fileobj
                assert isinstance(client, socket.socket)
                try:
                    data = client.recv(4096)
                except ConnectionError:
                    data = b""
                got[client] += data
                if not data or b"\n" in got[client]:
                    sel.unregister(client)
    return [got[s].split(b"\r\n")[0] for s in socks], socks


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        s.close()


# -- 5. out of file descriptors ----------------------------------------------


@pytest.mark.parametrize(("soft", "hard"), [(64, 64), (64, 160)], ids=["hard=soft", "soft<hard"])
def test_descriptor_limit_lowers_max_sessions_and_every_client_gets_a_first_line(
    tmp_path: Path, soft: int, hard: int
) -> None:
    args = ["record", "--workers", "1", "--listen", f"127.0.0.1:{free_port()}",
            "--recordings", str(tmp_path / "recordings"), "--quiet"]  # fmt: skip
    with smtpproxy_process(*args, cwd=tmp_path, preexec_fn=nofile(soft, hard)) as proxy:
        note = re.search(
            r"note: at most (\d+) sessions at once, not 1000: the descriptor limit is (\d+)(.*)",
            proxy.err.decode(),
        )
        assert note is not None, proxy.err.decode()
        allowed, limit = int(note.group(1)), int(note.group(2))
        assert limit == hard  # the soft limit was raised to the hard one
        assert ("raised from 64" in note.group(3)) == (soft < hard)
        assert 1 <= allowed <= hard // 4  # 4 descriptors a session with the embedded server
        lines, socks = first_lines(proxy.address, CLIENTS)
        try:
            greeted = [ln for ln in lines if ln.startswith(b"220 ")]
            refused = [
                ln for ln in lines if ln == b"421 4.3.2 smtpproxy: too many sessions, try later"
            ]
            assert not [ln for ln in lines if ln not in greeted and ln not in refused], lines
            assert len(greeted) == allowed and len(refused) == CLIENTS - allowed
        finally:
            close_all(socks)
        done = proxy.finish(signal.SIGTERM)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and "EMFILE" not in done.stderr
    assert "Too many open files" not in done.stderr + done.stdout
    assert f"smtpproxy: {allowed} session(s), {allowed} recording(s)" in done.stderr
    assert f"{CLIENTS - allowed} refused (too many sessions)" in done.stderr


def test_a_limit_with_no_room_for_a_session_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [*SMTPPROXY, "record", "--workers", "1", "--listen", f"127.0.0.1:{free_port()}",
         "--recordings", str(tmp_path / "recordings")],
        cwd=tmp_path, env=smtpproxy_env(tmp_path), capture_output=True, text=True, timeout=60,
        preexec_fn=nofile(36, 36), stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.startswith("Error: the descriptor limit of 36 leaves no room for a session")
    assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr


_UNCAPPED = """
import signal, sys, trio
from pathlib import Path
from smtpproxy.relay import Proxy, ProxyConfig
from smtpproxy.render import Transcript

async def main() -> None:
    config = ProxyConfig(listen=("127.0.0.1", 0), upstream=("127.0.0.1", int(sys.argv[1])),
                         recordings=Path(sys.argv[2]), max_sessions=1000)
    proxy = Proxy(config, Transcript(sys.stdout, quiet=True))
    with trio.open_signal_receiver(signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(proxy.serve)
            print(f"listening on {host}:{port} ", file=sys.stderr, flush=True)
            async for _ in signals:
                break
            nursery.cancel_scope.cancel()
    print(f"refused {proxy.stats.refused}", file=sys.stderr, flush=True)

trio.run(main)
"""


def test_out_of_descriptors_the_waiting_clients_get_421_not_silence(tmp_path: Path) -> None:
    """A proxy whose --max-sessions is far above what its descriptors allow
    (the accept loop's own defence, as when something uncounted holds
    descriptors): every client still gets a first line at once, with no
    traceback per failed accept."""
    script = tmp_path / "uncapped.py"
    script.write_text(_UNCAPPED)
    rec = tmp_path / "recordings"
    rec.mkdir(mode=0o700)
    with smtpproxy_process("sink", "--listen", f"127.0.0.1:{free_port()}", cwd=tmp_path) as sink:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(sink.port), str(rec)],
            cwd=tmp_path, env=smtpproxy_env(tmp_path), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=nofile(48, 48),  # noqa: PLW1509 - this test runs no threads
        )  # fmt: skip
        try:
            proxy = SmtpproxyProcess(proc)
            proxy.wait_listening()
            lines, socks = first_lines(proxy.address, CLIENTS)
            try:
                silent = lines.count(b"")
                assert silent == 0, f"{silent} of {CLIENTS} clients got no first line"
                assert all(ln.startswith((b"220 ", b"421 4.")) for ln in lines), set(lines)
                assert (
                    lines.count(b"421 4.3.2 smtpproxy: too many sessions, try later") > CLIENTS // 2
                )
            finally:
                close_all(socks)
            done = proxy.finish(signal.SIGTERM)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    warnings = [
        ln for ln in done.stderr.splitlines() if "cannot accept clients: Too many open files" in ln
    ]
    assert 1 <= len(warnings) <= 3, done.stderr  # one line per 10 s at most, not one per failure


# -- 7. SIGHUP ------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_sighup_mid_data_stops_like_sigterm(tmp_path: Path, workers: int) -> None:
    rec_dir = tmp_path / "recordings"
    with smtpproxy_process("sink", "--listen", f"127.0.0.1:{free_port()}", cwd=tmp_path) as sink:
        args = ["record", "--workers", str(workers), "--listen", f"127.0.0.1:{free_port()}",
                "--upstream", f"127.0.0.1:{sink.port}", "--recordings", str(rec_dir)]  # fmt: skip
        with (
            smtpproxy_process(*args, cwd=tmp_path) as proxy,
            socket.create_connection(proxy.address, timeout=10) as client,
        ):
            assert read_reply(client).startswith(b"220 ")
            client.sendall(b"EHLO hup.example\r\n")
            assert read_reply(client).startswith(b"250")
            client.sendall(b"MAIL FROM:<ann@example.org>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n")
            for _ in range(2):
                assert read_reply(client).startswith(b"250 ")
            assert read_reply(client).startswith(b"354 ")
            client.sendall(b"Subject: hangup\r\n\r\nhalf a mess")
            proxy.wait_stdout("-> DATA")
            done = proxy.finish(signal.SIGHUP)
        sink.finish()
    assert done.returncode == 0, done.stderr
    assert "smtpproxy: 1 session(s), 1 recording(s)" in done.stderr
    assert "closed by proxy (proxy shutting down)" in done.stdout
    (path,) = rec_dir.glob("*.jsonl")
    rec = read_recording(path)
    assert rec.close is not None and rec.close.by == "proxy"
    assert [e.verb for e in rec.events() if isinstance(e, Command)] == [
        "EHLO",
        "MAIL",
        "RCPT",
        "DATA",
    ]


def _ignore_sighup() -> None:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


@pytest.mark.parametrize("workers", [1, 2])
def test_under_nohup_sighup_is_still_ignored(tmp_path: Path, workers: int) -> None:
    """Started ignoring SIGHUP (``nohup smtpproxy record &``), the proxy
    keeps that choice: a hangup does not stop it."""
    with smtpproxy_process("sink", "--listen", f"127.0.0.1:{free_port()}", cwd=tmp_path) as sink:
        args = ["record", "--workers", str(workers), "--listen", f"127.0.0.1:{free_port()}",
                "--upstream", f"127.0.0.1:{sink.port}", "--recordings", str(tmp_path / "rec")]  # fmt: skip
        with smtpproxy_process(*args, cwd=tmp_path, preexec_fn=_ignore_sighup) as proxy:
            pids = [proxy.proc.pid, *_children(proxy.proc.pid, 0 if workers == 1 else workers)]
            for pid in pids:
                # ignored, and neither caught nor held pending for a sigwait
                assert _sighup_disposition(pid) == {"SigIgn"}
                os.kill(pid, signal.SIGHUP)
            with socket.create_connection(proxy.address, timeout=10) as client:
                assert read_reply(client).startswith(b"220 ")  # still serving
                client.sendall(b"QUIT\r\n")
                assert read_reply(client).startswith(b"221 ")
            assert proxy.proc.poll() is None
            done = proxy.finish(signal.SIGTERM)
        sink.finish()
    assert done.returncode == 0, done.stderr
    assert "smtpproxy: 1 session(s)" in done.stderr


def _sighup_disposition(pid: int) -> set[str]:
    """Which of the masks in /proc/PID/status hold SIGHUP."""
    fields = dict(
        line.split(":\t", 1)
        for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        if ":\t" in line
    )
    bit = 1 << (signal.SIGHUP - 1)
    return {name for name in ("SigBlk", "SigIgn", "SigCgt") if int(fields[name], 16) & bit}


def _children(pid: int, count: int, timeout: float = 10) -> list[int]:
    """The worker pids, once ``count`` of them run (the banner comes first)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        if len(found) == count or time.monotonic() > deadline:
            assert len(found) == count, found
            return found
        time.sleep(0.02)


# -- 7. modes of the key log, the CA folder and the CA key ----------------------


def _umask(value: int) -> Callable[[], None]:
    def set_it() -> None:
        os.umask(value)

    return set_it


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_keylog_is_created_private_whatever_the_umask(tmp_path: Path) -> None:
    keylog = tmp_path / "keys.log"
    args = ["record", "--workers", "1", "--listen", f"127.0.0.1:{free_port()}",
            "--recordings", str(tmp_path / "recordings"), "--keylog", str(keylog)]  # fmt: skip
    with smtpproxy_process(*args, cwd=tmp_path, preexec_fn=_umask(0)) as proxy:
        assert mode(keylog) == 0o600
        done = proxy.finish()
    assert done.returncode == 0
    assert "keys.log" not in done.stderr  # a new file: nothing to say


def test_loose_keylog_ca_folder_and_key_are_made_private_and_said(tmp_path: Path) -> None:
    home = tmp_path / ".smtpproxy-home"  # the folder smtpproxy_env points at
    CertificateAuthority.load_or_create(home)
    key = home / "smtpproxy-ca-key.pem"
    home.chmod(0o755)
    key.chmod(0o644)
    keylog = tmp_path / "keys.log"
    keylog.write_text("# an old key log\n")
    keylog.chmod(0o644)
    args = ["record", "--workers", "1", "--listen", f"127.0.0.1:{free_port()}",
            "--recordings", str(tmp_path / "recordings"), "--keylog", str(keylog)]  # fmt: skip
    with smtpproxy_process(*args, cwd=tmp_path) as proxy:
        done = proxy.finish()
    assert done.returncode == 0
    assert (mode(home), mode(key), mode(keylog)) == (0o700, 0o600, 0o600)
    assert f"note: {keylog} was mode 644; made it 0600 (it holds TLS session keys)" in done.stderr
    assert f"note: {home} was mode 755; made it 0700 (it holds the CA key)" in done.stderr
    assert f"note: {key} was mode 644; made it 0600" in done.stderr
    assert keylog.read_text().startswith("# an old key log\n")  # appended to, not replaced


def test_ca_command_makes_a_loose_key_private_and_says_so(tmp_path: Path) -> None:
    home = tmp_path / ".smtpproxy-home"
    CertificateAuthority.load_or_create(home)
    key = home / "smtpproxy-ca-key.pem"
    key.chmod(0o640)
    proc = subprocess.run(
        [*SMTPPROXY, "ca"], cwd=tmp_path, env=smtpproxy_env(tmp_path),
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, check=False,
    )  # fmt: skip
    assert proc.returncode == 0
    assert mode(key) == 0o600
    assert (
        proc.stderr == f"note: {key} was mode 640; made it 0600 "
        "(the CA key signs certificates your mail clients trust)\n"
    )


# -- 7. the per-SNI caches are bounded ------------------------------------------


def test_ca_keeps_at_most_max_leaves_and_the_recent_ones(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "home")
    first = ca.leaf(["n0.example"])
    for i in range(1, MAX_LEAVES + 50):
        ca.leaf([f"n{i}.example"])
        if i % 10 == 0:
            assert (
                ca.leaf(["n0.example"]) == first
            )  # kept while in use (a new one has a new serial)
    assert len(ca._leaves) == MAX_LEAVES
    recent = ca.leaf([f"n{MAX_LEAVES + 49}.example"])
    assert ca.leaf([f"n{MAX_LEAVES + 49}.example"]) == recent
    assert ca.leaf(["n0.example"]) == first
    assert ("n1.example",) not in ca._leaves  # the least recently used went first
    assert len(ca._leaves) == MAX_LEAVES


async def test_sni_contexts_are_bounded_and_a_new_name_still_gets_its_leaf(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "home")
    contexts = ServerContexts(["localhost", "127.0.0.1"], ca=ca)
    trust = ssl.create_default_context(cafile=str(ca.cert_path))
    sink = Sink()
    names = [f"sni{i}.example" for i in range(MAX_CONTEXTS + 5)]
    seen: list[bytes] = []

    async def shake_hands(port: int, name: str) -> bytes:
        """The certificate the proxy shows a client asking for ``name``."""
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        tls = trio.SSLStream(tcp, trust, server_hostname=name)
        with trio.fail_after(10):
            await tls.do_handshake()
            assert (await tls.receive_some(4096)).startswith(b"220 ")
        der: bytes | None = tls.getpeercert(binary_form=True)
        await tls.aclose()
        assert der is not None
        return der

    async with trio.open_nursery() as nursery:
        address = await nursery.start(sink.serve)
        proxy = await start_proxy(
            nursery,
            tmp_path,
            address,
            listen_tls=True,
            upstream_tls="plain",
            server_contexts=contexts,
        )
        for name in names:
            seen.append(await shake_hands(proxy.port, name))
        again = await shake_hands(proxy.port, names[-1])
        await wait_for_sessions(proxy.proxy, len(names) + 1)
        nursery.cancel_scope.cancel()
    for name, der in zip(names, seen):
        sans = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
        assert name in sans.value.get_values_for_type(x509.DNSName)
    assert again == seen[-1]  # a recent name keeps its leaf
    assert len(contexts._by_name) == MAX_CONTEXTS
    assert list(contexts._by_name)[-1] == names[-1]
