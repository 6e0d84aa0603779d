"""``smtpproxy mock``: a recorded server played to real clients (smtplib over
loopback), run as a process the way a user runs it. The recordings are made
by ``smtpproxy record`` on its embedded server, so what the mock must say is
what that server said. Every wait is bounded."""

from __future__ import annotations

import json
import signal
import smtplib
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import SMTPPROXY, run_smtpproxy_once, smtpproxy_env, smtpproxy_process

from smtpproxy.events import Side
from smtpproxy.recording import read_recording

TIMEOUT = 10
MESSAGE = "From: ann@example.org\r\nTo: bob@example.net\r\nSubject: mock\r\n\r\nHello\r\n"
RCPTS = ["bob@example.net", "carol@example.net"]

Client = Callable[[int], Any]


def plain_client(
    message: str = MESSAGE, rcpts: list[str] = RCPTS, user: str = "ann", password: str = "s3cret"
) -> Client:
    """smtplib as an application uses it: EHLO, AUTH, one message, QUIT."""

    def run(port: int) -> Any:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=TIMEOUT) as c:
            c.login(user, password)
            return c.sendmail("ann@example.org", rcpts, message)

    return run


def tls_client(cafile: Path) -> Client:
    def run(port: int) -> Any:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=TIMEOUT) as c:
            c.starttls(context=ssl.create_default_context(cafile=str(cafile)))
            c.login("ann", "s3cret")
            return c.sendmail("ann@example.org", RCPTS, MESSAGE)

    return run


def record(tmp_path: Path, clients: list[Client], *rules: str) -> list[Path]:
    """Record ``clients`` one after another through ``record`` on its
    embedded server; the recordings, in file order."""
    folder = tmp_path / "original"
    args = ["record", "--listen", "127.0.0.1:0", "--recordings", str(folder)]
    for rule in rules:
        args += ["--fault", rule]
    with smtpproxy_process(*args, cwd=tmp_path) as proxy:
        for client in clients:
            client(proxy.port)
        finished = proxy.finish()
    assert finished.returncode == 0, finished.stderr
    files = sorted(folder.glob("*.jsonl"))
    assert len(files) == len(clients)
    return files


class Mock:
    """A ``smtpproxy mock ... --sessions N`` process and how it ended."""

    def __init__(self, tmp_path: Path, sources: list[Path], sessions: int, *options: str) -> None:
        self.folder = tmp_path / f"mocked{len(list(tmp_path.glob('mocked*')))}"
        self.args = [
            "mock", *map(str, sources), "--listen", "127.0.0.1:0", "--recordings",
            str(self.folder), "--sessions", str(sessions), "--json", *options,
        ]  # fmt: skip
        self.tmp_path = tmp_path

    def run(self, *clients: Client) -> tuple[subprocess.CompletedProcess[str], list[Any]]:
        results: list[Any] = []
        with smtpproxy_process(*self.args, cwd=self.tmp_path) as mock:
            for client in clients:
                try:
                    results.append(client(mock.port))
                except (smtplib.SMTPException, OSError) as exc:
                    results.append(exc)
            out, err = mock.proc.communicate(timeout=TIMEOUT)
        done = subprocess.CompletedProcess(mock.proc.args, mock.proc.returncode, "", "")
        done.stdout = (bytes(mock.out) + out).decode()
        done.stderr = (bytes(mock.err) + err).decode()
        return done, results

    def recordings(self) -> list[Path]:
        return sorted(self.folder.glob("*.jsonl"))


def report(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(done.stdout)
    return data


def test_the_same_client_hears_the_recorded_server(tmp_path: Path) -> None:
    (original,) = record(tmp_path, [plain_client()])
    mock = Mock(tmp_path, [original], 1)
    done, results = mock.run(plain_client())
    assert done.returncode == 0, done.stderr
    assert results == [{}]
    assert report(done)["departures"] == 0
    # the client heard exactly what the recorded server said, byte for byte
    (mocked,) = mock.recordings()
    assert read_recording(mocked).raw(Side.SERVER) == read_recording(original).raw(Side.SERVER)
    assert oct(mocked.stat().st_mode & 0o777) == "0o600"
    # and diff, with its masking rules, finds no difference
    diff = run_smtpproxy_once("diff", str(original), str(mocked), cwd=tmp_path)
    assert diff.returncode == 0, diff.stdout + diff.stderr


def test_a_different_recipient_is_a_departure(tmp_path: Path) -> None:
    (original,) = record(tmp_path, [plain_client()])
    other = plain_client(rcpts=["bob@example.net", "mallory@example.net"])
    done, results = Mock(tmp_path, [original], 1).run(other)
    assert done.returncode == 1, done.stderr
    assert results == [{}]  # the client was kept going: the recorded 250 for the second RCPT
    (session,) = report(done)["sessions"]
    (departure,) = session["departures"]
    assert departure["step"] == "RCPT #2 (message 1)"
    assert departure["recorded"] == "rcpt TO:<carol@example.net>"
    assert departure["sent"] == "rcpt TO:<mallory@example.net>"
    assert "path <carol@example.net> -> <mallory@example.net>" in departure["why"]
    assert "RCPT #2 (message 1)" in done.stderr  # the live transcript says it too


def test_strict_answers_421_and_closes(tmp_path: Path) -> None:
    (original,) = record(tmp_path, [plain_client()])
    other = plain_client(rcpts=["bob@example.net", "mallory@example.net"])
    done, results = Mock(tmp_path, [original], 1, "--strict").run(other)
    assert done.returncode == 1
    (error,) = results
    assert isinstance(error, smtplib.SMTPRecipientsRefused)
    code, text = error.recipients["mallory@example.net"]
    assert code == 421
    assert text == b"4.3.0 smtpproxy mock: expected rcpt TO:<carol@example.net>"


def test_a_different_body_is_reported_not_refused(tmp_path: Path) -> None:
    (original,) = record(tmp_path, [plain_client()])
    done, results = Mock(tmp_path, [original], 1).run(plain_client(message=MESSAGE + "more\r\n"))
    assert done.returncode == 1
    assert results == [{}]
    (departure,) = report(done)["sessions"][0]["departures"]
    assert departure["step"] == "message body #1 (message 1)"
    assert departure["why"].startswith("the message differs")


def test_a_wrong_password_gets_535(tmp_path: Path) -> None:
    (original,) = record(tmp_path, [plain_client()])
    done, results = Mock(tmp_path, [original], 1).run(plain_client(password="Zq-not-it-9"))
    assert done.returncode == 1
    (error,) = results
    assert isinstance(error, smtplib.SMTPAuthenticationError)
    assert error.smtp_code == 535
    departures = report(done)["sessions"][0]["departures"]
    assert any("not the recorded client's" in d["why"] for d in departures)
    assert "Zq-not-it-9" not in done.stdout  # the report never quotes a secret


def test_a_client_that_stops_early_departs(tmp_path: Path) -> None:
    (original,) = record(tmp_path, [plain_client()])

    def hello_only(port: int) -> Any:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=TIMEOUT) as c:
            code, _ = c.noop()  # not in the recording: a plain 250
            vrfy = c.verify("ann")  # a verb the recorded server never saw
            return code, vrfy[0]

    done, results = Mock(tmp_path, [original], 1).run(hello_only)
    assert done.returncode == 1
    assert results == [(250, 502)]
    whys = [d["why"] for d in report(done)["sessions"][0]["departures"]]
    assert "the recorded server never saw this command" in whys
    assert any(w.startswith("this client stopped before the recorded client's") for w in whys)


def test_starttls_is_played_with_the_local_ca(tmp_path: Path) -> None:
    cafile = tmp_path / ".smtpproxy-home" / "smtpproxy-ca.pem"
    (original,) = record(tmp_path, [tls_client(cafile)])
    mock = Mock(tmp_path, [original], 1)
    done, results = mock.run(tls_client(cafile))
    assert done.returncode == 0, done.stdout + done.stderr
    assert results == [{}]
    (mocked,) = mock.recordings()
    assert read_recording(mocked).raw(Side.SERVER) == read_recording(original).raw(Side.SERVER)


def test_timing_recorded_waits_as_the_server_did(tmp_path: Path) -> None:
    (original,) = record(tmp_path, [plain_client()], "dot: delay 2s")

    def timed(port: int) -> float:
        start = time.monotonic()
        plain_client()(port)
        return time.monotonic() - start

    done, (fast,) = Mock(tmp_path, [original], 1).run(timed)
    assert done.returncode == 0, done.stderr
    done, (slow,) = Mock(tmp_path, [original], 1, "--timing", "recorded").run(timed)
    assert done.returncode == 0, done.stderr
    assert fast < 1.5
    assert 1.8 <= slow < TIMEOUT


def test_a_folder_is_served_in_file_order(tmp_path: Path) -> None:
    files = record(
        tmp_path,
        [plain_client(), plain_client(), plain_client()],
        "session#2 rcpt#2: 550 5.1.1 second server",
        "session#3 rcpt#2: 551 5.1.6 third server",
    )
    folder = files[0].parent
    done, results = Mock(tmp_path, [folder], 3).run(plain_client(), plain_client(), plain_client())
    assert done.returncode == 0, done.stderr
    assert results == [
        {},
        {"carol@example.net": (550, b"5.1.1 second server")},
        {"carol@example.net": (551, b"5.1.6 third server")},
    ]
    assert [s["session"] for s in report(done)["sessions"]] == [1, 2, 3]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.write_text("not a recording\n"), "input:1: not valid JSON"),
        (lambda p: p.mkdir(), "no recordings (*.jsonl)"),
    ],
)
def test_bad_input_exits_2(tmp_path: Path, make: Callable[[Path], Any], message: str) -> None:
    target = tmp_path / "input"
    make(target)
    done = run_smtpproxy_once("mock", str(target), "--listen", "127.0.0.1:0", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_a_recording_without_a_server_side_exits_2(tmp_path: Path) -> None:
    (original,) = record(tmp_path, [plain_client()])
    # keep the header, the client's reads and the close line: no server at all
    lines = original.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not line.startswith("[") or '"c"' in line.split(",")[1]]
    client_only = tmp_path / "client-only.jsonl"
    client_only.write_text("".join(kept))
    done = run_smtpproxy_once("mock", str(client_only), "--listen", "127.0.0.1:0", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "no server greeting" in done.stderr
    assert "Traceback" not in done.stderr


def test_help_lists_mock() -> None:
    done = subprocess.run(
        [*SMTPPROXY, "mock", "--help"], capture_output=True, text=True, timeout=30, check=False,
        env=smtpproxy_env(Path("/tmp")),
    )  # fmt: skip
    assert done.returncode == 0
    assert "--timing [fast|recorded]" in done.stdout


def test_listen_tls_plays_an_implicit_tls_session(tmp_path: Path) -> None:
    cafile = tmp_path / ".smtpproxy-home" / "smtpproxy-ca.pem"

    def implicit(port: int) -> Any:
        context = ssl.create_default_context(cafile=str(cafile))
        with smtplib.SMTP_SSL(
            "127.0.0.1", port, local_hostname="client.example", timeout=TIMEOUT, context=context
        ) as c:
            c.login("ann", "s3cret")
            return c.sendmail("ann@example.org", RCPTS, MESSAGE)

    folder = tmp_path / "original"
    args = ["record", "--listen", "127.0.0.1:0", "--listen-tls", "--recordings", str(folder)]
    with smtpproxy_process(*args, cwd=tmp_path) as proxy:
        implicit(proxy.port)
        assert proxy.finish().returncode == 0
    (original,) = sorted(folder.glob("*.jsonl"))
    mock = Mock(tmp_path, [original], 1, "--listen-tls")
    done, results = mock.run(implicit)
    assert done.returncode == 0, done.stdout + done.stderr
    assert results == [{}]
    (mocked,) = mock.recordings()
    assert read_recording(mocked).raw(Side.SERVER) == read_recording(original).raw(Side.SERVER)


def test_ctrl_c_ends_the_mock_with_the_exit_status(tmp_path: Path) -> None:
    (original,) = record(tmp_path, [plain_client()])
    args = ["mock", str(original), "--listen", "127.0.0.1:0", "--recordings", str(tmp_path / "m")]
    with smtpproxy_process(*args, cwd=tmp_path) as mock:
        plain_client(rcpts=["bob@example.net"])(mock.port)  # one recipient fewer
        mock.wait_stdout("closed by")
        finished = mock.finish(signal.SIGINT)
    assert finished.returncode == 1
    assert "this client stopped before the recorded client's" in finished.stderr
    assert "Traceback" not in finished.stderr


def test_fault_rules_apply_on_top_of_the_recorded_server(tmp_path: Path) -> None:
    three = ["bob@example.net", "carol@example.net", "dan@example.net"]
    (original,) = record(tmp_path, [plain_client(rcpts=three)])
    rule = "rcpt#2: 452 4.5.3 Too many recipients"
    mock = Mock(tmp_path, [original], 1, "--fault", rule)
    done, results = mock.run(plain_client(rcpts=three))
    assert results == [{"carol@example.net": (452, b"4.5.3 Too many recipients")}]
    # the rule answered the second RCPT before the mock: the third is still the
    # recorded third, so the client did what the recorded one did
    assert done.returncode == 0, done.stdout + done.stderr
    assert report(done)["departures"] == 0
    (mocked,) = mock.recordings()
    notes = [
        e.event for e in read_recording(mocked).entries if getattr(e.event, "kind", "") == "fault"
    ]
    assert len(notes) == 1 and rule in notes[0].text


def test_starttls_the_recorded_client_did_not_take_is_performed(tmp_path: Path) -> None:
    """The recorded server offered STARTTLS (the embedded sink does) and its
    client did not use it: a client that does gets TLS, not a 502, and the
    departure is reported."""
    cafile = tmp_path / ".smtpproxy-home" / "smtpproxy-ca.pem"
    (original,) = record(tmp_path, [plain_client()])
    done, results = Mock(tmp_path, [original], 1).run(tls_client(cafile))
    assert results == [{}]
    assert done.returncode == 1
    whys = [d["why"] for d in report(done)["sessions"][0]["departures"]]
    assert "the recorded client did not start TLS (its server offered it)" in whys


def test_auth_said_the_other_way_is_served_as_servers_do(tmp_path: Path) -> None:
    """PLAIN without the initial response the recorded client sent, and LOGIN
    with one where the recording had PLAIN: prompted the usual way (one
    password prompt), the password checked against the recorded one."""

    def plain_with_initial_response(port: int) -> Any:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=TIMEOUT) as c:
            c.ehlo()
            c.user, c.password = "ann", "s3cret"
            return c.auth("PLAIN", c.auth_plain)[0]

    (original,) = record(tmp_path, [plain_with_initial_response])

    def plain_then_login(port: int) -> Any:
        results = []
        for mechanism, initial in (("PLAIN", False), ("LOGIN", True)):
            with smtplib.SMTP(
                "127.0.0.1", port, local_hostname="client.example", timeout=TIMEOUT
            ) as c:
                c.ehlo()
                c.user, c.password = "ann", "s3cret"
                method = c.auth_plain if mechanism == "PLAIN" else c.auth_login
                results.append(c.auth(mechanism, method, initial_response_ok=initial)[0])
        return results

    mock = Mock(tmp_path, [original], 2)
    done, results = mock.run(plain_then_login)
    assert results == [[235, 235]], done.stdout + done.stderr
    login = read_recording(mock.recordings()[-1]).raw(Side.SERVER)
    assert login.count(b"334 UGFzc3dvcmQ6") == 1  # "Password:" asked once
