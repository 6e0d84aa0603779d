"""The pytest plugin: fixtures that start smtpproxy's servers for a test,
markers that configure them, golden sessions, and the sessions' transcript
in the report of a failed test.

Loaded through the ``pytest11`` entry point ``smtpproxy`` when smtpproxy is
installed (``-p no:smtpproxy`` turns it off). It only wires pytest to the
Python API (``smtpproxy.api``): the fixtures are ``with smtpproxy.sink()``,
``proxy(upstream=...)`` and ``mock(recording)`` around a test, and golden
files are compared with ``smtpproxy diff``'s rules (``smtpproxy.diff``).
Nothing starts unless a test asks for a fixture. docs/pytest-plugin.md has
the fixtures, markers, options and an example.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import pluggy

    from .api import Starter, SyncServer
    from .session import Session

__all__ = ["assert_session_matches", "safe_name"]

_SERVERS = pytest.StashKey[list[tuple[str, "SyncServer"]]]()
_UPSTREAM = pytest.StashKey["tuple[str, int] | None"]()
_KEEP = pytest.StashKey["Path | None"]()

#: the configs of the pytest runs under way (pytester nests them), newest
#: last: what the fixture-free ``assert_session_matches`` reads its options from
_CONFIGS: list[pytest.Config] = []

_MOCK_OPTIONS = ("strict", "timing", "password")


# -- options, markers ----------------------------------------------------------


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("smtpproxy", "smtpproxy: SMTP servers for tests")
    group.addoption(
        "--smtp-upstream",
        metavar="HOST:PORT",
        default=None,
        help="the real SMTP server the smtp_proxy fixture stands in front of "
        "(default: the smtp_upstream ini setting; neither: smtp_proxy tests skip)",
    )
    group.addoption(
        "--smtp-keep",
        metavar="DIR",
        default=None,
        help="keep the recordings in DIR/<test id>/<fixture>/ "
        "(default: under each test's tmp_path)",
    )
    group.addoption(
        "--smtp-update-golden",
        action="store_true",
        default=False,
        help="assert_session_matches writes the golden recordings instead of comparing",
    )
    parser.addini(
        "smtp_upstream",
        "HOST:PORT of the real SMTP server for the smtp_proxy fixture",
        type="string",
        default="",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "smtp_faults(*rules): start the test's smtp_sink, smtp_proxy and smtp_mock "
        "with these fault rules (the grammar of --fault, docs/faults.md)",
    )
    config.addinivalue_line(
        "markers",
        "smtp_mock(*recordings, strict=False, timing='fast', password=None): the "
        "recording(s) the smtp_mock fixture plays, relative to the test file's "
        "folder or the rootdir",
    )
    upstream = config.getoption("smtp_upstream") or str(config.getini("smtp_upstream")).strip()
    if upstream:
        from .net import parse_hostport

        try:
            config.stash[_UPSTREAM] = parse_hostport(upstream)
        except ValueError as exc:
            raise pytest.UsageError(f"--smtp-upstream / smtp_upstream: {exc}") from None
    else:
        config.stash[_UPSTREAM] = None
    keep = config.getoption("smtp_keep")
    config.stash[_KEEP] = (
        config.invocation_params.dir / Path(keep).expanduser() if keep is not None else None
    )
    _CONFIGS.append(config)


def pytest_unconfigure(config: pytest.Config) -> None:
    if config in _CONFIGS:
        _CONFIGS.remove(config)


# -- the fixtures --------------------------------------------------------------


def safe_name(nodeid: str) -> str:
    """A test id made a single safe folder name: no ``/``, no ``..``, no
    control or shell characters, at most 113 characters; a name that had to
    be changed or cut ends with a hash of the whole id, so two ids stay apart."""
    name = re.sub(r"[^A-Za-z0-9._=+-]+", "_", nodeid)
    name = re.sub(r"\.{2,}", "_", name).strip("._") or "test"
    if name != nodeid or len(name) > 120:
        # changed (``[a b]`` and ``[a/b]`` both give ``a_b``) or long: the
        # hash of the whole id keeps two ids apart
        digest = hashlib.sha256(nodeid.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        name = f"{name[:100]}-{digest}"
    return name


def _folder(request: pytest.FixtureRequest, kind: str) -> Path:
    """Where a fixture's server records: under the test's ``tmp_path``, or
    ``--smtp-keep DIR/<test id>/<kind>`` (emptied of an earlier run's
    recordings)."""
    keep = request.config.stash[_KEEP]
    if keep is None:
        tmp_path: Path = request.getfixturevalue("tmp_path")
        return tmp_path / "smtp-recordings" / kind
    folder = keep / safe_name(request.node.nodeid) / kind
    if folder.is_dir() and not folder.is_symlink():
        for old in folder.glob("*.jsonl"):
            old.unlink()
    return folder


def _fault_rules(item: pytest.Item) -> list[str]:
    """The rules of every ``smtp_faults`` marker, the outermost (module,
    class) first."""
    rules: list[str] = []
    for marker in reversed(list(item.iter_markers("smtp_faults"))):
        for rule in marker.args:
            if not isinstance(rule, str):
                pytest.fail(f"smtp_faults: a rule is a string, not {rule!r}", pytrace=False)
            rules.append(rule)
    return rules


def _serve(
    request: pytest.FixtureRequest, kind: str, build: Callable[[list[str], Path], Starter]
) -> Iterator[SyncServer]:
    """Start the server ``build`` makes, hand it to the test, stop it after.
    What a user got wrong (a rule, a recording, a folder) fails the test
    with one line, not a traceback into the plugin."""
    from .api import FaultSyntaxError
    from .recording import RecordingError

    fixture = f"smtp_{kind}"
    try:
        starter = build(_fault_rules(request.node), _folder(request, kind))
        server = starter.__enter__()
    except FaultSyntaxError as exc:
        pytest.fail(f"smtp_faults: {exc}", pytrace=False)
    except (RecordingError, OSError, ValueError) as exc:
        pytest.fail(f"{fixture}: {exc}", pytrace=False)
    try:
        request.node.stash.setdefault(_SERVERS, []).append((fixture, server))
        yield server
    finally:
        starter.__exit__(None, None, None)


@pytest.fixture
def smtp_sink(request: pytest.FixtureRequest) -> Iterator[SyncServer]:
    """A fresh embedded SMTP server for the test (it accepts every message),
    behind the proxy so each session is recorded: ``.address``, ``.faults``,
    ``.sessions``, ``.messages``, ``.wait_for_messages(n)``."""
    from . import api

    yield from _serve(
        request, "sink", lambda faults, folder: api.sink(faults=faults, recordings=folder)
    )


@pytest.fixture
def smtp_proxy(request: pytest.FixtureRequest) -> Iterator[SyncServer]:
    """The proxy in front of ``--smtp-upstream HOST:PORT`` (or the
    ``smtp_upstream`` ini setting); the test is skipped when neither is set."""
    from . import api

    upstream = request.config.stash[_UPSTREAM]
    if upstream is None:
        pytest.skip(
            "smtp_proxy needs a real server: give --smtp-upstream HOST:PORT "
            "or set smtp_upstream in the ini file"
        )
    yield from _serve(
        request,
        "proxy",
        lambda faults, folder: api.proxy(upstream, faults=faults, recordings=folder),
    )


@pytest.fixture
def smtp_mock(request: pytest.FixtureRequest) -> Iterator[SyncServer]:
    """The server of the recording named by ``@pytest.mark.smtp_mock(...)``,
    played to the clients that connect (docs/mock.md); ``.departures`` says
    where they left the recording."""
    from . import api

    marker = request.node.get_closest_marker("smtp_mock")
    if marker is None or not marker.args:
        pytest.fail(
            "smtp_mock needs a recording: mark the test "
            "@pytest.mark.smtp_mock('path/to/recording.jsonl')",
            pytrace=False,
        )
    unknown = sorted(set(marker.kwargs) - set(_MOCK_OPTIONS))
    if unknown:
        pytest.fail(
            f"smtp_mock: unknown option {', '.join(unknown)} (it takes {', '.join(_MOCK_OPTIONS)})",
            pytrace=False,
        )
    paths = [_find_recording(request, arg) for arg in marker.args]
    options: dict[str, Any] = dict(marker.kwargs)
    yield from _serve(
        request,
        "mock",
        lambda faults, folder: api.mock(*paths, faults=faults, recordings=folder, **options),
    )


def _find_recording(request: pytest.FixtureRequest, name: object) -> Path:
    """A marker's recording: relative to the test file's folder, else to
    the rootdir."""
    if not isinstance(name, str | os.PathLike):
        pytest.fail(f"smtp_mock: a recording is a path, not {name!r}", pytrace=False)
    path = Path(name)
    places = [request.path.parent, request.config.rootpath]
    candidates = [path] if path.is_absolute() else [place / path for place in places]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    where = " or ".join(str(c) for c in candidates)
    pytest.fail(f"smtp_mock: recording {str(path)!r} not found (looked for {where})", pytrace=False)


# -- the report of a failed test -----------------------------------------------


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pluggy.Result[pytest.TestReport], None]:
    """A failed test's report gets an ``smtp sessions`` section: the
    transcript of each session its fixtures' servers recorded, as pytest
    adds captured output and logs."""
    outcome = yield
    report = outcome.get_result()
    servers = item.stash.get(_SERVERS, [])
    if report.when == "call" and report.failed and servers:
        report.sections.append(("smtp sessions", _transcripts(servers)))
    elif report.when == "teardown" and servers:
        del item.stash[_SERVERS]  # the servers are stopped: let their sessions go


def _transcripts(servers: list[tuple[str, SyncServer]]) -> str:
    """What ``smtpproxy show`` prints for each recording of each server,
    sessions still open included."""
    from .recording import RecordingError, iter_recordings, read_recording
    from .session import Session

    parts: list[str] = []
    for fixture, server in servers:
        paths = iter_recordings([server.recordings]) if server.recordings.is_dir() else []
        parts.append(f"{fixture} at {server.host}:{server.port}: {len(paths)} session(s)")
        for path in paths:
            try:
                session = Session(read_recording(path))
            except RecordingError as exc:
                parts.append(f"{path}: {exc}")
                continue
            parts.append(session.transcript().rstrip("\n"))
            if session.closed_by is None:
                parts.append("(the session was still open)")
    return "\n".join(parts) + "\n"


# -- golden sessions -----------------------------------------------------------


def _update_golden() -> bool:
    return bool(_CONFIGS) and bool(_CONFIGS[-1].getoption("smtp_update_golden"))


def _golden_path(golden: str | os.PathLike[str]) -> Path:
    path = Path(golden)
    if path.is_absolute() or not _CONFIGS:
        return path
    return _CONFIGS[-1].rootpath / path


def assert_session_matches(
    session: Session | str | os.PathLike[str],
    golden: str | os.PathLike[str],
    *,
    strict: bool = False,
) -> None:
    """Assert that ``session`` (a Session, or a recording's path) matches
    the golden recording ``golden`` (relative: to pytest's rootdir) by the
    rules of ``smtpproxy diff``: each exchange's step, what the commands
    mean, reply codes and enhanced codes, EHLO capabilities; ``strict``
    also compares reply texts with host names, queue ids and dates masked.

    A mismatch raises AssertionError with the ``diff -u`` style comparison.
    Under ``pytest --smtp-update-golden`` the session's recording is copied
    to ``golden`` (mode 0600, folders made) instead."""
    __tracebackhide__ = True
    from .diff import diff_sessions, exchanges_of, format_unified
    from .recording import RecordingError, read_recording
    from .session import Session, read

    if not isinstance(session, Session):
        session = read(Path(session))
    path = _golden_path(golden)
    if _update_golden():
        try:
            data = session.path.read_bytes()
        except OSError as exc:
            raise AssertionError(f"cannot copy the session's recording: {exc}") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            os.fchmod(out.fileno(), 0o600)
            out.write(data)
        return
    if not path.exists():
        raise AssertionError(
            f"golden session {path} does not exist; run pytest with --smtp-update-golden to write it"
        )
    try:
        want = read_recording(path)
    except RecordingError as exc:
        raise AssertionError(f"golden session {path} cannot be read: {exc}") from None
    count, diffs = diff_sessions(exchanges_of(want), session.exchanges, strict)
    if diffs:
        lines = format_unified(str(path), str(session.path), diffs)
        lines.append(f"{count} exchanges, {len(diffs)} differ")
        raise AssertionError("\n".join(["the session does not match its golden", *lines]))
