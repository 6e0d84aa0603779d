"""``smtpproxy record --workers N``: several relay processes on one address.

Real ``smtpproxy`` subprocesses, a real aiosmtpd upstream, real smtplib
clients, all on loopback. What a user relies on: every message arrives
intact and is recorded once, the counts at the end add up over the workers,
signals stop them all, and a dead worker neither loses the address nor
leaves orphans behind.
"""

from __future__ import annotations

import os
import signal
import smtplib
import socket
import stat
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import AioServer, free_port, run_smtpproxy_once, smtpproxy_process

from smtpproxy.events import MessageEnd
from smtpproxy.recording import read_recording

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="workers share a port on Linux only"
)


def children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def wait_children(pid: int, count: int, timeout: float = 10) -> list[int]:
    """The worker pids, once ``count`` of them run (the banner comes first)."""
    deadline = time.monotonic() + timeout
    while len(found := children(pid)) != count and time.monotonic() < deadline:
        time.sleep(0.02)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def message(i: int) -> bytes:
    return f"From: ann@example.org\r\nTo: bob@example.net\r\nSubject: worker test {i}\r\n\r\nbody {i}\r\n".encode()


def send_many(address: tuple[str, int], count: int) -> list[BaseException]:
    """``count`` clients at once, one message each; the errors they met."""
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            with smtplib.SMTP(*address, timeout=10) as client:
                client.sendmail("ann@example.org", ["bob@example.net"], message(i))
        except BaseException as exc:  # noqa: BLE001 - collected: the test asserts there are none
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not any(t.is_alive() for t in threads), "a client hung"
    return errors


def record_args(rec_dir: Path, upstream: AioServer, *extra: str) -> list[str]:
    return [
        "record", "--listen", f"127.0.0.1:{free_port()}", "--upstream", f"{upstream.host}:{upstream.port}",
        "--recordings", str(rec_dir), "--quiet", *extra,
    ]  # fmt: skip


def test_two_workers_relay_and_record_every_message(
    tmp_path: Path, aiosmtpd_server: AioServer
) -> None:
    rec_dir = tmp_path / "recordings"
    with smtpproxy_process(
        *record_args(rec_dir, aiosmtpd_server, "--workers", "2"), cwd=tmp_path
    ) as proxy:
        assert "2 worker processes" in proxy.banner
        workers = wait_children(proxy.proc.pid, 2)
        assert len(workers) == 2
        assert send_many(proxy.address, 16) == []
        done = proxy.finish(signal.SIGTERM)

    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "16 session(s), 16 recording(s)" in done.stderr
    assert not any(alive(pid) for pid in workers)
    got = sorted(m["content"] for m in aiosmtpd_server.received.messages)
    assert got == sorted(message(i) for i in range(16))
    paths = sorted(rec_dir.glob("*.jsonl"))
    assert len(paths) == 16
    subjects = []
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        rec = read_recording(path)
        assert rec.close is not None
        (end,) = [e for e in rec.events() if isinstance(e, MessageEnd)]
        subjects.append(end.headers["Subject"])
    assert sorted(subjects) == sorted(f"worker test {i}" for i in range(16))
    # one transcript summary line per session, whichever worker served it
    assert done.stdout.count("== session ") == 16


def test_a_killed_worker_is_started_again(tmp_path: Path, aiosmtpd_server: AioServer) -> None:
    rec_dir = tmp_path / "recordings"
    with smtpproxy_process(
        *record_args(rec_dir, aiosmtpd_server, "--workers", "2"), cwd=tmp_path
    ) as proxy:
        first = wait_children(proxy.proc.pid, 2)
        time.sleep(2.2)  # workers that die young are not restarted (workers.MIN_LIFETIME)
        victim = first[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len(set(children(proxy.proc.pid)) - {victim}) < 2:
            time.sleep(0.02)
        now = children(proxy.proc.pid)
        assert victim not in now and len(now) == 2
        # the address still serves every client: the socket outlived the worker
        assert send_many(proxy.address, 8) == []
        done = proxy.finish(signal.SIGTERM)

    assert done.returncode == 1  # the run had a failure, and says so
    assert "worker 1 was killed by signal 9; started it again" in done.stderr
    got = sorted(m["content"] for m in aiosmtpd_server.received.messages)
    assert got == sorted(message(i) for i in range(8))
    assert len(list(rec_dir.glob("*.jsonl"))) == 8
    assert "8 session(s), 8 recording(s)" in done.stderr


def test_sigkill_of_the_proxy_takes_its_workers(tmp_path: Path, aiosmtpd_server: AioServer) -> None:
    rec_dir = tmp_path / "recordings"
    with smtpproxy_process(
        *record_args(rec_dir, aiosmtpd_server, "--workers", "2"), cwd=tmp_path
    ) as proxy:
        workers = wait_children(proxy.proc.pid, 2)
        assert len(workers) == 2
        done = proxy.finish(signal.SIGKILL)
        address = proxy.address
    assert done.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(pid) for pid in workers):
        time.sleep(0.05)
    assert not any(alive(pid) for pid in workers)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(address, timeout=5).close()


def test_a_port_taken_by_another_proxy_is_an_error(
    tmp_path: Path, aiosmtpd_server: AioServer
) -> None:
    """SO_REUSEPORT must not quietly share the port with a proxy already there."""
    rec_dir = tmp_path / "recordings"
    with smtpproxy_process(
        *record_args(rec_dir, aiosmtpd_server, "--workers", "2"), cwd=tmp_path
    ) as first:
        port = first.port
        second = run_smtpproxy_once(
            "record", "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{aiosmtpd_server.port}",
            "--recordings", str(tmp_path / "other"), "--workers", "2", cwd=tmp_path,
        )  # fmt: skip
        first.finish(signal.SIGTERM)
    assert second.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in second.stderr
    assert "Traceback" not in second.stderr


def test_max_sessions_below_workers_means_one_process(
    tmp_path: Path, aiosmtpd_server: AioServer
) -> None:
    rec_dir = tmp_path / "recordings"
    args = record_args(rec_dir, aiosmtpd_server, "--workers", "4", "--max-sessions", "1")
    with smtpproxy_process(*args, cwd=tmp_path) as proxy:
        assert "worker processes" not in proxy.banner
        assert children(proxy.proc.pid) == []
        done = proxy.finish(signal.SIGTERM)
    assert done.returncode == 0


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_signal_as_soon_as_the_banner_shows_stops_cleanly(
    tmp_path: Path, aiosmtpd_server: AioServer, workers: str
) -> None:
    """The banner comes only once SIGINT/SIGTERM are caught: a script that
    signals the moment it reads the banner gets exit 0, not death by the
    default action (it used to, now and then, on a loaded machine)."""
    for i in range(5):
        rec_dir = tmp_path / f"recordings-{i}"
        args = record_args(rec_dir, aiosmtpd_server, "--workers", workers)
        with smtpproxy_process(*args, cwd=tmp_path) as proxy:
            done = proxy.finish(signal.SIGTERM)
        assert done.returncode == 0, (i, done.stderr)
        assert "0 session(s), 0 recording(s)" in done.stderr
