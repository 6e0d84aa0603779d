"""The Python API: ``smtpproxy.sink()``, ``smtpproxy.proxy(upstream=...)``
and ``smtpproxy.mock(recording)``.

Each returns a :class:`Starter`, a context manager both ways:

* ``with smtpproxy.sink() as server:`` from ordinary synchronous code: the
  trio loop runs in a thread of its own, ready (listening, its real port
  known) when ``__enter__`` returns, stopped and joined by ``__exit__``;
* ``async with smtpproxy.sink() as server:`` in trio code: the server runs
  in the caller's loop, in a nursery of its own.

What runs is what the command line runs (``service.Service``): the proxy,
in front of the embedded server (``sink``), of a real server (``proxy``) or
of a recorded one (``mock``). Every session is recorded, and
``server.sessions`` reads the recordings back (``session.Session``). The
fault rules are a ``FaultPlan`` from the start, empty or not, so
``server.faults.add(rule)`` works at run time. docs/python-api.md has the
examples.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import TextIO, cast

import trio

from .faults import FaultPlan, FaultSyntaxError, parse_rule
from .mockplay import MockOptions
from .mockrun import load_scripts
from .mockserver import MockServer, MockSession
from .net import parse_hostport
from .recording import RecordingError, ensure_private_dir, iter_recordings, read_recording
from .relay import ProxyConfig
from .render import Transcript
from .service import Embedded, Service, embedded_sink
from .session import Message, Session
from .tls import CertificateAuthority, ServerContexts, client_context
from .tlsmodes import UpstreamTls

__all__ = [
    "AsyncServer",
    "Faults",
    "FaultSyntaxError",
    "Server",
    "Starter",
    "SyncServer",
    "mock",
    "proxy",
    "sink",
]


class _Discard(io.TextIOBase):
    """Where the transcript goes when nobody asked for it."""

    def write(self, s: str) -> int:
        return len(s)


class Faults:
    """A running server's fault rules (the grammar of ``--fault``,
    docs/faults.md). New sessions follow the rules in force when they
    start."""

    def __init__(self, plan: FaultPlan) -> None:
        self._plan = plan
        self._texts: list[str] = [rule.text for rule in plan.rules]

    @property
    def rules(self) -> list[str]:
        return list(self._texts)

    def add(self, *rules: str) -> None:
        """Add rules; ``FaultSyntaxError`` (a ValueError) names the mistake,
        and then none of them is added."""
        parsed = [parse_rule(text) for text in rules]
        self._plan.replace([*self._plan.rules, *parsed])
        self._texts += rules

    def set(self, *rules: str) -> None:
        """Replace all rules."""
        parsed = [parse_rule(text) for text in rules]
        self._plan.replace(parsed)
        self._texts = list(rules)

    def clear(self) -> None:
        self._plan.replace([])
        self._texts = []


class Server:
    """What the context managers give: the address to point a client at,
    the CA it should trust, the fault rules, the recordings."""

    def __init__(self, starter: Starter) -> None:
        self._starter = starter
        self.address: tuple[str, int] = ("", 0)
        #: the fault rules in force (``add``, ``set``, ``clear``)
        self.faults = Faults(starter.plan)
        self._seen: dict[Path, Session] = {}

    @property
    def host(self) -> str:
        return self.address[0]

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def ca(self) -> Path | None:
        """The CA file a client should trust for STARTTLS or implicit TLS."""
        ca = self._starter.ca
        return ca.cert_path if ca is not None else None

    @property
    def recordings(self) -> Path:
        """The folder the sessions are recorded in."""
        return self._starter.folder

    @property
    def sessions(self) -> list[Session]:
        """The sessions that have ended, in the order they started (their
        recordings', which are named by start time)."""
        if self._starter.final is not None:
            return list(self._starter.final)
        out: list[Session] = []
        for path in iter_recordings([self.recordings]):
            if path not in self._seen:
                try:
                    rec = read_recording(path)
                except RecordingError:
                    continue
                if rec.close is None:
                    continue  # still going
                self._seen[path] = Session(rec)
            out.append(self._seen[path])
        return out

    @property
    def messages(self) -> list[Message]:
        """The messages of the ended sessions, in order."""
        return [m for s in self.sessions for m in s.messages]

    @property
    def departures(self) -> list[MockSession]:
        """``mock`` only: each mock session and where its client departed
        from the recording (``MockSession.departures``; empty: none)."""
        server = self._starter.embedded
        return list(server.sessions) if isinstance(server, MockServer) else []

    def _ended(self) -> int:
        return self._starter.service.proxy.stats.ended

    def _fail(self, what: str, want: int, have: int, timeout: float) -> TimeoutError:
        return TimeoutError(f"waited {timeout}s for {want} {what}; {have} so far")


class SyncServer(Server):
    """A server run in a thread, for synchronous code."""

    def wait_for_sessions(self, count: int, timeout: float = 10.0) -> list[Session]:
        """Block until ``count`` sessions have ended (TimeoutError after
        ``timeout`` seconds); their sessions."""
        cond = self._starter.cond
        with cond:
            if not cond.wait_for(lambda: self._ended() >= count, timeout):
                raise self._fail("session(s) to end", count, self._ended(), timeout)
        return self.sessions

    def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[Message]:
        """Block until the ended sessions hold ``count`` messages."""
        cond = self._starter.cond
        with cond:
            if not cond.wait_for(lambda: len(self.messages) >= count, timeout):
                raise self._fail("message(s)", count, len(self.messages), timeout)
        return self.messages


class AsyncServer(Server):
    """A server run in the caller's trio loop."""

    async def wait_for_sessions(self, count: int, timeout: float = 10.0) -> list[Session]:
        with trio.move_on_after(timeout):
            await self._starter.service.proxy.wait_sessions_ended(count)
            return self.sessions
        raise self._fail("session(s) to end", count, self._ended(), timeout)

    async def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[Message]:
        with trio.move_on_after(timeout):
            ended = self._ended()
            while len(self.messages) < count:
                ended += 1
                await self._starter.service.proxy.wait_sessions_ended(ended)
            return self.messages
        raise self._fail("message(s)", count, len(self.messages), timeout)


class Starter:
    """``sink()``, ``proxy()`` or ``mock()`` before it runs: enter it with
    ``with`` (a :class:`SyncServer`) or ``async with`` (an
    :class:`AsyncServer`). One use only."""

    def __init__(
        self,
        config: ProxyConfig,
        *,
        embedded: str,
        recordings: str | Path | None,
        faults: Iterable[str],
        ca_home: str | Path | None,
        transcript: TextIO | None,
        scripts: Sequence[Path] = (),
        mock_options: MockOptions | None = None,
    ) -> None:
        self.plan = FaultPlan([parse_rule(text) for text in faults])
        config.faults = self.plan
        self.config = config
        self._kind = embedded
        self._own_folder = recordings is None
        self._recordings = recordings
        self._ca_home = Path(ca_home) if ca_home is not None else None
        self._transcript = transcript
        self._scripts = list(scripts)
        self._mock_options = mock_options or MockOptions()
        self.ca: CertificateAuthority | None = None
        self.embedded: Embedded | None = None
        self.folder = Path()
        self.final: list[Session] | None = None
        self.cond = threading.Condition()
        self._used = False
        self._server: Server | None = None
        self._thread: threading.Thread | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._scope: trio.CancelScope | None = None
        self._error: BaseException | None = None
        self._ready = threading.Event()
        self._stack: contextlib.AsyncExitStack | None = None

    # -- what both ways share ------------------------------------------------

    def _prepare(self) -> None:
        """Everything that does no network I/O: the folder, the CA, the
        contexts, the service. Errors are the caller's to see."""
        if self._used:
            raise RuntimeError("a smtpproxy server can be started once; make another")
        self._used = True
        if self._recordings is None:
            self.folder = Path(tempfile.mkdtemp(prefix="smtpproxy-"))
        else:
            self.folder = Path(self._recordings)
            ensure_private_dir(self.folder)
        try:
            self._prepare_service()
        except BaseException:
            self._finish()  # a temporary folder made above is not left behind
            raise

    def _prepare_service(self) -> None:
        """The CA, the contexts, the embedded server and the service."""
        self.config.recordings = self.folder
        config = self.config
        self.ca = CertificateAuthority.load_or_create(self._ca_home)
        config.server_contexts = ServerContexts(
            ["localhost", "127.0.0.1", "::1", config.listen[0]], ca=self.ca
        )
        if config.upstream_context is None:
            config.upstream_context = client_context(None, False, None)
        inner_tls = ServerContexts(["localhost", "127.0.0.1"], ca=self.ca).default
        if self._kind == "sink":
            config.upstream_context.load_verify_locations(cafile=str(self.ca.cert_path))
            self.embedded = embedded_sink(config, self.ca)
        elif self._kind == "mock":
            config.upstream_context.load_verify_locations(cafile=str(self.ca.cert_path))
            self.embedded = MockServer(
                load_scripts(self._scripts),
                self._mock_options,
                tls=inner_tls,
                implicit_tls=config.listen_tls,
            )
        out = self._transcript if self._transcript is not None else cast(TextIO, _Discard())
        label = "mock of" if self._kind == "mock" else "embedded sink"
        self.service = Service(config, Transcript(out), self.embedded, label=label)
        if isinstance(self.embedded, MockServer):
            self.service.proxy.on_withheld = self.embedded.withheld  # as mockrun does

    async def _watch(self) -> None:
        """Wake the synchronous waiters as each session ends."""
        ended = 0
        while True:
            ended += 1
            await self.service.proxy.wait_sessions_ended(ended)
            with self.cond:
                self.cond.notify_all()

    def _finish(self) -> None:
        """After the loop stopped: keep the sessions read, drop a folder we made."""
        if self._server is not None:
            self.final = self._server.sessions
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    # -- with ----------------------------------------------------------------

    def __enter__(self) -> SyncServer:
        self._prepare()
        server = SyncServer(self)
        self._server = server
        self._thread = threading.Thread(
            target=trio.run, args=(self._main, server), name="smtpproxy", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            self._finish()
            raise self._error
        return server

    async def _main(self, server: Server) -> None:
        try:
            await self.service.listen()
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                self._token = trio.lowlevel.current_trio_token()
                server.address = await nursery.start(self.service.run)
                nursery.start_soon(self._watch)
                self._ready.set()
        except BaseException as exc:  # noqa: BLE001 - handed to __enter__
            self._error = exc
        finally:
            self._ready.set()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None and self._scope is not None:
            scope = self._scope
            with contextlib.suppress(trio.RunFinishedError):
                self._token.run_sync_soon(scope.cancel)
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._finish()
        if self._error is not None and exc is None:
            raise self._error  # the server failed while the block ran

    # -- async with ------------------------------------------------------------

    async def __aenter__(self) -> AsyncServer:
        self._prepare()
        server = AsyncServer(self)
        self._server = server
        stack = contextlib.AsyncExitStack()
        try:
            await self.service.listen()
            nursery = await stack.enter_async_context(trio.open_nursery())
            server.address = await nursery.start(self.service.run)
        except BaseException:
            await stack.aclose()
            self._finish()
            raise
        self._scope = nursery.cancel_scope
        self._stack = stack
        return server

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._scope is not None and self._stack is not None
        self._scope.cancel()
        await self._stack.aclose()
        self._finish()


def _config(listen: str | tuple[str, int], listen_tls: bool, idle_timeout: float) -> ProxyConfig:
    address = parse_hostport(listen, 0) if isinstance(listen, str) else listen
    return ProxyConfig(
        listen=address, listen_tls=listen_tls, idle_timeout=idle_timeout, max_sessions=1000
    )


def sink(
    *,
    faults: Iterable[str] = (),
    listen: str | tuple[str, int] = ("127.0.0.1", 0),
    listen_tls: bool = False,
    recordings: str | Path | None = None,
    ca_home: str | Path | None = None,
    transcript: TextIO | None = None,
    idle_timeout: float = 300.0,
) -> Starter:
    """The embedded server (it accepts any credentials and every message),
    behind the proxy so every session is recorded. ``recordings``: the
    folder (default: a temporary one, removed on exit; the sessions stay
    readable from the server object). ``transcript``: where the live
    transcript goes (default: nowhere). ``ca_home``: the local CA's folder
    (default: ``$SMTPPROXY_HOME`` or ``~/.smtpproxy``, as the command line)."""
    return Starter(
        _config(listen, listen_tls, idle_timeout),
        embedded="sink",
        recordings=recordings,
        faults=faults,
        ca_home=ca_home,
        transcript=transcript,
    )


def proxy(
    upstream: str | tuple[str, int],
    *,
    faults: Iterable[str] = (),
    listen: str | tuple[str, int] = ("127.0.0.1", 0),
    listen_tls: bool = False,
    upstream_tls: str = "mirror",
    upstream_ca: str | Path | None = None,
    upstream_insecure: bool = False,
    recordings: str | Path | None = None,
    ca_home: str | Path | None = None,
    transcript: TextIO | None = None,
    idle_timeout: float = 300.0,
) -> Starter:
    """The proxy in front of a real server ``upstream`` (``"host:port"`` or
    a tuple); the TLS options are ``record``'s (docs/tls.md)."""
    config = _config(listen, listen_tls, idle_timeout)
    config.upstream = parse_hostport(upstream, 25) if isinstance(upstream, str) else upstream
    config.upstream_tls = UpstreamTls(upstream_tls)
    config.upstream_context = client_context(
        Path(upstream_ca) if upstream_ca is not None else None, upstream_insecure, None
    )
    return Starter(
        config,
        embedded="",
        recordings=recordings,
        faults=faults,
        ca_home=ca_home,
        transcript=transcript,
    )


def mock(
    *recordings_to_play: str | Path,
    strict: bool = False,
    timing: str = "fast",
    password: str | None = None,
    faults: Iterable[str] = (),
    listen: str | tuple[str, int] = ("127.0.0.1", 0),
    listen_tls: bool = False,
    recordings: str | Path | None = None,
    ca_home: str | Path | None = None,
    transcript: TextIO | None = None,
    idle_timeout: float = 300.0,
) -> Starter:
    """The server of a recording (or of each recording of a folder, one per
    connection) played to the clients that connect, as ``smtpproxy mock``
    (docs/mock.md); ``server.departures`` says where clients departed."""
    if timing not in ("fast", "recorded"):
        raise ValueError(f"timing must be 'fast' or 'recorded', not {timing!r}")
    if not recordings_to_play:
        raise ValueError("mock() needs a recording (or a folder of them)")
    return Starter(
        _config(listen, listen_tls, idle_timeout),
        embedded="mock",
        recordings=recordings,
        faults=faults,
        ca_home=ca_home,
        transcript=transcript,
        scripts=[Path(p) for p in recordings_to_play],
        mock_options=MockOptions(strict=strict, timing=timing == "recorded", password=password),
    )
