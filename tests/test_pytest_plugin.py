"""The pytest plugin as users run it: pytest's own ``pytester`` writes a
test file, runs pytest on it (the plugin loads through its ``pytest11``
entry point), and these tests look at the outcomes, the printed report and
the files left behind. The servers are real (smtplib talks to them over
loopback); the ``smtp_proxy`` tests stand in front of a real aiosmtpd."""

from __future__ import annotations

import shutil
import smtplib
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import AioServer, run_aiosmtpd

import smtpproxy
from smtpproxy.pytest_plugin import safe_name

pytest_plugins = ["pytester"]

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "password-reset"

SEND = """
import smtplib

def send(server, to=("bob@example.net",)):
    with smtplib.SMTP(server.host, server.port, timeout=10) as c:
        return c.sendmail("ann@example.org", list(to), b"Subject: hi\\r\\n\\r\\nhello\\r\\n")
"""


@pytest.fixture
def pytester(
    pytester: pytest.Pytester, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> pytest.Pytester:
    """pytester with a helper that sends a mail, and the local CA kept in
    the test's folder."""
    pytester.makeini("[pytest]\naddopts = --strict-markers -p no:cacheprovider\n")
    pytester.makepyfile(helpers=SEND)
    monkeypatch.setenv("SMTPPROXY_HOME", str(tmp_path / "ca-home"))
    return pytester


def run(pytester: pytest.Pytester, *args: str, subprocess: bool = False) -> pytest.RunResult:
    """pytest on pytester's folder, in this process (fast), or with
    ``subprocess`` in a fresh one exactly as a user runs it (ended if it
    runs over two minutes)."""
    if subprocess:
        return pytester.runpytest_subprocess(*args, timeout=120)
    return pytester.runpytest(*args)


# -- the fixtures ----------------------------------------------------------------


def test_smtp_sink_receives_what_smtplib_sends(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_inner_sink="""
        from helpers import send

        def test_send(smtp_sink, tmp_path):
            assert send(smtp_sink) == {}
            [message] = smtp_sink.wait_for_messages(1, timeout=10)
            assert message.sender == "ann@example.org"
            assert message.recipients == ("bob@example.net",)
            assert message.message["Subject"] == "hi"
            assert message.content == b"Subject: hi\\r\\n\\r\\nhello\\r\\n"
            # recorded under the test's own tmp_path
            assert smtp_sink.recordings.is_relative_to(tmp_path)
            assert len(list(smtp_sink.recordings.glob("*.jsonl"))) == 1
            assert smtp_sink.sessions[0].closed_by in ("client", "server")

        def test_fresh_server_each_test(smtp_sink):
            assert smtp_sink.sessions == []
        """
    )
    pytester.makeconftest(
        """
        import os, threading
        import pytest

        @pytest.fixture(autouse=True)
        def no_leak():
            fds = sorted(os.listdir("/proc/self/fd"))
            yield
            # every server thread joined, every socket and file closed
            assert [t for t in threading.enumerate() if t.name == "smtpproxy"] == []
            assert sorted(os.listdir("/proc/self/fd")) == fds
        """
    )
    result = run(pytester)
    result.assert_outcomes(passed=2)


def test_smtp_faults_marker_starts_the_server_with_its_rules(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_inner_faults="""
        import pytest
        from helpers import send

        pytestmark = pytest.mark.smtp_faults("mail: delay 0s")

        @pytest.mark.smtp_faults("rcpt#2: 452 4.5.3 Too many recipients")
        def test_second_rcpt_refused(smtp_sink):
            assert smtp_sink.faults.rules == [
                "mail: delay 0s", "rcpt#2: 452 4.5.3 Too many recipients"
            ]
            refused = send(smtp_sink, ["b@example.net", "c@example.net"])
            assert refused == {"c@example.net": (452, b"4.5.3 Too many recipients")}
            [message] = smtp_sink.wait_for_messages(1, timeout=10)
            assert message.recipients == ("b@example.net",)
            assert message.rejected == ("c@example.net",)
        """
    )
    run(pytester).assert_outcomes(passed=1)


def test_a_bad_fault_rule_errors_with_one_line(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_inner_bad="""
        import pytest

        @pytest.mark.smtp_faults("rcpt#x: 452 4.5.3 Too many")
        def test_it(smtp_sink):
            pass
        """
    )
    result = run(pytester)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(
        ["smtp_faults: bad fault rule 'rcpt#x: 452 4.5.3 Too many': column 6: *example: *"]
    )
    assert "pytest_plugin.py" not in result.stdout.str()
    assert "Traceback" not in result.stdout.str()


def _record_one_session(folder: Path, ca_home: Path) -> Path:
    """A real session with the embedded server: what smtp_mock will play."""
    with smtpproxy.sink(recordings=folder, ca_home=ca_home) as server:
        with smtplib.SMTP(server.host, server.port, timeout=10) as c:
            c.sendmail("ann@example.org", ["bob@example.net"], b"Subject: hi\r\n\r\nhello\r\n")
        server.wait_for_sessions(1)
    [path] = folder.glob("*.jsonl")
    return path


def test_smtp_mock_plays_the_marked_recording(pytester: pytest.Pytester, tmp_path: Path) -> None:
    recorded = _record_one_session(tmp_path / "rec", tmp_path / "home")
    (pytester.path / "data").mkdir()
    shutil.copy(recorded, pytester.path / "data" / "hello.jsonl")
    pytester.makepyfile(
        test_inner_mock="""
        import pytest
        from helpers import send

        @pytest.mark.smtp_mock("data/hello.jsonl")
        def test_same_session(smtp_mock):
            assert send(smtp_mock) == {}
            [session] = smtp_mock.wait_for_sessions(1, timeout=10)
            assert [d.departures for d in smtp_mock.departures] == [[]]
            assert session.messages[0].recipients == ("bob@example.net",)

        @pytest.mark.smtp_mock("data/hello.jsonl")
        def test_another_recipient_departs(smtp_mock):
            send(smtp_mock, ["eve@example.net"])
            smtp_mock.wait_for_sessions(1, timeout=10)
            assert smtp_mock.departures[0].departures

        def test_no_marker(smtp_mock):
            pass

        @pytest.mark.smtp_mock("data/missing.jsonl")
        def test_missing(smtp_mock):
            pass
        """
    )
    # the recording is also found relative to the rootdir, from a test in a subfolder
    sub = pytester.mkpydir("sub")
    (sub / "test_inner_sub.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.smtp_mock('data/hello.jsonl')\n"
        "def test_from_sub(smtp_mock):\n"
        "    assert smtp_mock.port > 0\n"
    )
    result = run(pytester)
    result.assert_outcomes(passed=3, errors=2)
    result.stdout.fnmatch_lines(
        [
            "*smtp_mock needs a recording: mark the test "
            "@pytest.mark.smtp_mock('path/to/recording.jsonl')",
            "*smtp_mock: recording 'data/missing.jsonl' not found (looked for *)",
        ],
        consecutive=False,
    )
    assert "pytest_plugin.py" not in result.stdout.str()


@pytest.fixture
def aiosmtpd() -> Iterator[AioServer]:
    with run_aiosmtpd() as server:
        yield server


PROXY_TEST = """
from helpers import send

def test_through(smtp_proxy):
    assert send(smtp_proxy) == {}
    [message] = smtp_proxy.wait_for_messages(1, timeout=10)
    assert message.accepted
"""


def test_smtp_proxy_relays_to_the_upstream_option(
    pytester: pytest.Pytester, aiosmtpd: AioServer
) -> None:
    pytester.makepyfile(test_inner_proxy=PROXY_TEST)
    run(pytester, f"--smtp-upstream={aiosmtpd.host}:{aiosmtpd.port}").assert_outcomes(passed=1)
    [got] = aiosmtpd.received.messages
    assert (got["from"], got["to"]) == ("ann@example.org", ["bob@example.net"])
    assert got["content"] == b"Subject: hi\r\n\r\nhello\r\n"


def test_smtp_proxy_reads_the_ini_setting(pytester: pytest.Pytester, aiosmtpd: AioServer) -> None:
    pytester.makeini(
        "[pytest]\naddopts = --strict-markers -p no:cacheprovider\n"
        f"smtp_upstream = {aiosmtpd.host}:{aiosmtpd.port}\n"
    )
    pytester.makepyfile(test_inner_proxy=PROXY_TEST)
    run(pytester).assert_outcomes(passed=1)
    assert len(aiosmtpd.received.messages) == 1


def test_smtp_proxy_skips_without_an_upstream(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner_proxy=PROXY_TEST)
    result = run(pytester, "-rs")
    result.assert_outcomes(skipped=1)
    result.stdout.fnmatch_lines(
        ["*smtp_proxy needs a real server: give --smtp-upstream HOST:PORT*"]
    )


def test_a_bad_upstream_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner_proxy=PROXY_TEST)
    result = run(pytester, "--smtp-upstream=mx:smtp")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["ERROR: --smtp-upstream / smtp_upstream: 'mx:smtp': port must be a number *"]
    )
    assert "Traceback" not in result.stderr.str()


def test_p_no_smtpproxy_disables_the_plugin(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_inner_sink="def test_it(smtp_sink):\n    pass\n")
    result = run(pytester, "-p", "no:smtpproxy", subprocess=True)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'smtp_sink' not found*"])
    result = run(pytester, subprocess=True)
    result.assert_outcomes(passed=1)
    result = run(pytester, "-p", "no:smtpproxy")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*fixture 'smtp_sink' not found*"])


# -- where recordings go -----------------------------------------------------------


def test_safe_name_is_one_harmless_folder_name() -> None:
    name = safe_name("tests/test_a.py::test_b[x]")
    assert name.startswith("tests_test_a.py_test_b_x-")  # changed: the id's hash follows
    assert safe_name("test_plain") == "test_plain"  # nothing to change
    # ids that clean up to the same text stay apart
    assert len({safe_name(f"t.py::test[a{c}b]") for c in " ?/"}) == 3
    for nodeid in ("../../etc/passwd::t", "a/..::b", "t[\x1b]0;x\x07\n\r]", "..", "/", "x" * 500):
        name = safe_name(nodeid)
        assert name and "/" not in name and ".." not in name and name not in (".", "..")
        assert name.isprintable() and len(name) <= 120
    assert safe_name("x" * 300 + "a") != safe_name("x" * 300 + "b")


def test_smtp_keep_keeps_each_tests_recordings(pytester: pytest.Pytester, tmp_path: Path) -> None:
    pytester.makepyfile(
        test_inner_keep="""
        import pytest
        from helpers import send

        @pytest.mark.parametrize("n", ["../../x", "plain"])
        def test_send(smtp_sink, n):
            send(smtp_sink)
            smtp_sink.wait_for_sessions(1, timeout=10)
        """
    )
    keep = tmp_path / "kept"
    for _ in range(2):  # the second run replaces the first's recordings
        run(pytester, f"--smtp-keep={keep}").assert_outcomes(passed=2)
    folders = sorted(p.name for p in keep.iterdir())
    assert folders == [
        safe_name("test_inner_keep.py::test_send[../../x]"),
        safe_name("test_inner_keep.py::test_send[plain]"),
    ]
    assert not (tmp_path / "x").exists()
    for folder in folders:
        [path] = (keep / folder / "sink").glob("*.jsonl")
        session = smtpproxy.read(path)
        assert session.messages[0].recipients == ("bob@example.net",)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600


# -- golden sessions ---------------------------------------------------------------


GOLDEN_TEST = """
import os
from helpers import send
from smtpproxy.pytest_plugin import assert_session_matches

def test_golden(smtp_sink):
    if os.environ.get("INNER_FAULT"):
        smtp_sink.faults.add(os.environ["INNER_FAULT"])
    send(smtp_sink, ["bob@example.net", "carol@example.net"])
    [session] = smtp_sink.wait_for_sessions(1, timeout=10)
    assert_session_matches(session, "golden/hello.jsonl")
"""


def test_golden_missing_then_updated_then_matched_then_not(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_inner_golden=GOLDEN_TEST)
    golden = pytester.path / "golden" / "hello.jsonl"

    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [f"E * golden session {golden} does not exist; run pytest with --smtp-update-golden*"]
    )

    run(pytester, "--smtp-update-golden").assert_outcomes(passed=1)
    assert stat.S_IMODE(golden.stat().st_mode) == 0o600
    assert smtpproxy.read(golden).messages[0].recipients == ("bob@example.net", "carol@example.net")

    run(pytester).assert_outcomes(passed=1)

    monkeypatch.setenv("INNER_FAULT", "rcpt#2: 550 5.1.1 No such user")
    result = run(pytester)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "E * the session does not match its golden",
            f"E * --- {golden}",
            "E * +++ */smtp-recordings/sink/*.jsonl",
            "E * @@ exchange *: rcpt TO:<carol@example.net> @@ code 250 -> 550",
            "E * -250 2.1.5 recipient ok",
            "E * +550 5.1.1 No such user",
        ]
    )
    out = result.stdout.str()
    assert "Session object" not in out and "<smtpproxy.Session" not in out
    assert "def assert_session_matches" not in out  # __tracebackhide__


# -- the report of a failed test -----------------------------------------------------


def test_a_failed_test_reports_its_smtp_sessions(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_inner_report="""
        from helpers import send

        def test_fails(smtp_sink):
            send(smtp_sink)
            smtp_sink.wait_for_sessions(1, timeout=10)
            assert False, "on purpose"

        def test_passes(smtp_sink):
            send(smtp_sink)
            smtp_sink.wait_for_sessions(1, timeout=10)

        def test_fails_without_smtp():
            assert False
        """
    )
    result = run(pytester, "-rA")
    result.assert_outcomes(passed=1, failed=2)
    out = result.stdout.str()
    assert out.count("smtp sessions") == 1
    result.stdout.fnmatch_lines(
        [
            "*_ test_fails _*",
            "*- smtp sessions -*",
            "smtp_sink at 127.0.0.1:*: 1 session(s)",
            "session * started *: client 127.0.0.1:*, upstream embedded sink *",
            "[[]*] <- 220 *",
            "[[]*] -> mail FROM:<ann@example.org> *",
            "[[]*] -> rcpt TO:<bob@example.net>",
            "[[]*] == closed by * after *",
            "*_ test_fails_without_smtp _*",
        ]
    )


# -- the example project ----------------------------------------------------------------


def test_the_example_project(pytester: pytest.Pytester) -> None:
    shutil.copytree(
        EXAMPLE, pytester.path, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__")
    )
    result = run(pytester, "-v", subprocess=True)
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "*_ test_reset_mail_to_a_full_mailbox _*",
            "E * smtplib.SMTPRecipientsRefused: *552*Mailbox full*",
            "*- smtp sessions -*",
            "[[]*] -> mail FROM:<no-reply@example.com> *",
            "[[]*] -> rcpt TO:<bob@example.org>",
            "[[]*] !! fault rcpt: 552 5.2.2 Mailbox full: *",
        ]
    )
    result.stdout.fnmatch_lines(["test_app.py::test_reset_mail PASSED*"])
