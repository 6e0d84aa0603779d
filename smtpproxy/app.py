"""Running ``record`` and ``sink``: what they set up before the relay or the
embedded server runs, and what they say around it.

cli.py turns the options into a ``ProxyConfig`` (or a ``SinkConfig``) and
calls ``record`` or ``sink`` here. This module readies the recordings folder,
the local CA and the TLS contexts, fits ``--max-sessions`` to the descriptor
limit, runs one process or several workers (smtpproxy/workers.py) until a
stop signal, and prints the banner and the closing counts on stderr. A
failure the user can fix is a ``StartError``: one line that names the fix,
which cli.py prints (exit 1), never a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import signal
import socket
import sqlite3
import stat
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from . import __version__, accept
from .faults import FaultPlan, FaultSource, FaultSyntaxError
from .net import is_loopback
from .recording import ensure_private_dir
from .relay import Proxy, ProxyConfig
from .render import Transcript
from .server import Sink, SinkConfig
from .service import Service, embedded_sink
from .tls import (
    CertificateAuthority,
    ServerContexts,
    TlsFailure,
    client_context,
    default_home,
    private_keylog,
)
from .workers import WorkerGroup, plan, stop_signals

if TYPE_CHECKING:
    from .web.app import WebConfig
    from .web.live import Live

__all__ = ["StartError", "TlsFiles", "fit_descriptors", "local_ca", "record", "sink"]


class StartError(Exception):
    """``record`` or ``sink`` cannot start (or go on): the message is one
    line that names the fix."""


@dataclass(frozen=True)
class TlsFiles:
    """The TLS files ``record`` was given (``--cert``, ``--key``,
    ``--upstream-ca``, ``--upstream-insecure``, ``--keylog``)."""

    cert: Path | None = None
    key: Path | None = None
    upstream_ca: Path | None = None
    upstream_insecure: bool = False
    keylog: Path | None = None


def _say(line: str) -> None:
    """A line for the user on stderr (the transcript has stdout)."""
    print(line, file=sys.stderr, flush=True)


def _note(line: str | None) -> None:
    if line is not None:
        _say(line)


def record(
    config: ProxyConfig,
    transcript: Transcript,
    tls: TlsFiles,
    workers: int | None = None,
    embedded: bool = False,
    reload: FaultSource | None = None,
    web: tuple[str, int] | None = None,
) -> bool:
    """Relay clients as ``config`` says until SIGINT, SIGTERM or SIGHUP, in
    one process or ``workers`` (default: one per core; one with the
    ``embedded`` upstream, which this process then runs). Fills in
    ``config``'s TLS contexts and the sessions each process may hold.
    ``reload``: SIGHUP re-reads the fault rules from it instead of stopping.
    ``web``: also serve the web view of the recordings there, live, from
    this one process (docs/web.md). Returns True when every worker ended
    cleanly."""
    if config.recordings is not None:
        prepare_recordings(config.recordings)
    if not is_loopback(config.listen[0]):
        _say(
            f"warning: listening on {config.listen[0]}, not loopback: anyone who can reach it can relay "
            "through this proxy, and their credentials will be recorded"
        )
    keylog = str(tls.keylog) if tls.keylog else os.environ.get("SSLKEYLOGFILE") or None
    ca = _setup_tls(config, tls, keylog, embedded)
    assert config.server_contexts is not None
    if config.faults is not None and workers is None:
        # fault counts (session#K, times=, greylist=, rate=, p=) are kept per
        # process: one worker keeps them exact (docs/faults.md)
        workers = 1
    elif config.faults is not None and workers is not None and workers > 1:
        _say(
            f"warning: with --workers {workers}, fault rules count per worker process: "
            "session#K, times=, greylist=, rate= and p= see only their worker's sessions "
            "(--workers 1 keeps them exact)"
        )
    if web is not None:
        workers = 1  # the pages are served from the proxy's own loop (cli.py refuses more)
    count, config.max_sessions = plan(workers, config.max_sessions, embedded=embedded)
    config.max_sessions = fit_descriptors(
        config.max_sessions,
        count,
        per_session=3 + embedded + (keylog is not None),
        held=config.server_contexts.descriptors()
        + (keylog is not None)
        + (WEB_DESCRIPTORS if web is not None else 0),
    )
    if count > 1:
        totals, ok = _record_in_workers(config, transcript, count, ca, reload)
    else:
        service = Service(config, transcript, embedded_sink(config, ca) if embedded else None)
        live = _live_web(config.recordings, web) if web is not None else None
        try:
            trio.run(_run_record, service, ca, reload, live)
        except OSError as exc:
            raise _cannot_listen(config.listen, exc) from None
        finally:
            if live is not None:
                live.close()
        totals, ok = dataclasses.asdict(service.proxy.stats), True
    _say(
        f"smtpproxy: {totals.get('sessions', 0)} session(s), {totals.get('recordings', 0)} recording(s) "
        f"in {config.recordings}/"
        + (
            f", {totals['recorder_failures']} recording failure(s)"
            if totals.get("recorder_failures")
            else ""
        )
        + (f", {totals['refused']} refused (too many sessions)" if totals.get("refused") else "")
    )
    return ok


def prepare_recordings(folder: Path) -> None:
    """Make the recordings folder (0700) or make one of ours 0700: a
    checkout gives the repository's recordings/ 0755, and recordings hold
    credentials. One not ours is only warned about (its files are 0600)."""
    try:
        ensure_private_dir(folder)
    except OSError as exc:
        raise StartError(
            f"cannot use recordings folder {folder}: {exc.strerror or exc}; "
            "choose another with --recordings DIR"
        ) from None
    info = folder.stat()
    mode = stat.S_IMODE(info.st_mode)
    if not mode & 0o077:
        return
    if info.st_uid == os.geteuid():
        os.chmod(folder, 0o700)
        _say(f"note: {folder}/ was mode {mode:o}; made it 0700 (recordings hold credentials)")
    else:
        _say(
            f"warning: {folder}/ is mode {mode:o} and not yours; recordings hold credentials "
            "(files are 0600 all the same)"
        )


def _setup_tls(
    config: ProxyConfig, tls: TlsFiles, keylog: str | None, embedded: bool
) -> CertificateAuthority | None:
    """The key log, the local CA (unless ``--cert``), the contexts shown to
    clients and the one for the upstream, set in ``config``. Returns the CA."""
    ca: CertificateAuthority | None = None
    try:
        if keylog is not None:
            _note(private_keylog(keylog))
        if tls.cert is None:
            ca = CertificateAuthority.load_or_create()
            for line in ca.notes:
                _note(line)
        names = ["localhost", "127.0.0.1", "::1", config.listen[0]]
        if not embedded:
            names.append(config.upstream[0])
        config.server_contexts = ServerContexts(
            names, ca=ca, cert_file=tls.cert, key_file=tls.key, keylog=keylog
        )
        config.upstream_context = client_context(tls.upstream_ca, tls.upstream_insecure, keylog)
        if embedded and ca is not None:
            config.upstream_context.load_verify_locations(cafile=str(ca.cert_path))
    except TlsFailure as exc:
        raise StartError(str(exc)) from None
    except OSError as exc:
        raise StartError(
            f"cannot set up the local CA in {default_home()}: {exc.strerror or exc}; "
            "set SMTPPROXY_HOME to a writable folder, or give --cert/--key"
        ) from None
    return ca


def fit_descriptors(sessions: int, workers: int, per_session: int, held: int) -> int:
    """The sessions each worker may hold at once: ``sessions``, or fewer if
    the descriptor limit (raised to the hard limit first) does not allow
    them, and then say so. Each session needs ``per_session`` descriptors
    (client, upstream, recording; the embedded server's side; a key log
    context); ``held``: those the TLS contexts keep open (smtpproxy/accept.py)."""
    before, limit = accept.raise_descriptor_limit()
    in_use = accept.open_descriptors() + held + workers
    allowed = accept.sessions_allowed(limit, in_use, per_session)
    if allowed >= sessions:
        return sessions
    raised = f" (raised from {before})" if before != limit else ""
    if allowed < 1:
        raise StartError(
            f"the descriptor limit of {limit}{raised} leaves no room for a session: each needs "
            f"{per_session} and the proxy keeps {in_use + accept.RESERVE}; raise it (ulimit -n 1024)"
        )
    each = " per worker" if workers > 1 else ""
    _say(
        f"note: at most {allowed} sessions at once{each}, not {sessions}: the descriptor limit is "
        f"{limit}{raised} and each session needs {per_session}; further clients get 421 4.3.2 "
        "(raise the hard limit, ulimit -Hn, for more)"
    )
    return allowed


def _cannot_listen(listen: tuple[str, int], exc: OSError) -> StartError:
    return StartError(
        f"cannot listen on {listen[0]}:{listen[1]}: {exc.strerror or exc}; "
        "choose another address with --listen HOST:PORT"
    )


def _banner(
    address: tuple[str, int], config: ProxyConfig, ca: CertificateAuthority | None, workers: int = 1
) -> None:
    target = config.upstream_label or f"{config.upstream[0]}:{config.upstream[1]}"
    _say(
        f"smtpproxy {__version__}: listening on {address[0]}:{address[1]}, relaying to {target}; "
        f"recording to {config.recordings}/"
        + (f"; {workers} worker processes" if workers > 1 else "")
        + " (Ctrl-C to stop)"
    )
    if ca is not None:
        _say(
            f"TLS: clients are shown certificates from the local CA {ca.cert_path} "
            "(trust it for STARTTLS: see 'smtpproxy ca')"
        )


def _record_in_workers(
    config: ProxyConfig,
    transcript: Transcript,
    count: int,
    ca: CertificateAuthority | None,
    reload: FaultSource | None = None,
) -> tuple[Mapping[str, int], bool]:
    """``record`` with several worker processes (see smtpproxy/workers.py).
    With ``reload``, a SIGHUP is checked here (one line said) and passed on
    to the workers, which each read the rules again."""
    try:
        group = WorkerGroup.bind(config.listen[0], config.listen[1], count)
    except OSError as exc:
        raise _cannot_listen(config.listen, exc) from None

    def work(sockets: list[socket.socket]) -> dict[str, int]:
        proxy = Proxy(config, transcript)
        trio.run(_serve_sockets, proxy, sockets, reload)
        return dataclasses.asdict(proxy.stats)

    def check() -> bool:
        # the parent's plan too: a worker started again later inherits it
        return reload is not None and _reload_faults(config.faults, reload)

    ok = group.run(
        work,
        ready=lambda: _banner(group.address, config, ca, count),
        reload=check if reload is not None else None,
    )
    for problem in group.problems:
        _say(f"smtpproxy: {problem}")
    return group.totals, ok


async def _serve_sockets(
    proxy: Proxy, sockets: list[socket.socket], reload: FaultSource | None = None
) -> None:
    """One worker: serve on sockets bound by the parent until a signal
    (a SIGHUP passed on by the parent re-reads the fault rules, quietly:
    the parent said whether they were good)."""
    listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]
    with _stop_signals(reload) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve, listeners)
            await _first(signals, proxy.config.faults, reload, quiet=True)
            nursery.cancel_scope.cancel()


def _stop_signals(
    reload: FaultSource | None = None,
) -> contextlib.AbstractContextManager[AsyncIterator[int]]:
    """SIGINT, SIGTERM and SIGHUP (a closed terminal or SSH session; not
    under ``nohup``: workers.stop_signals), caught from here on; each stops
    the proxy the same way, except SIGHUP with ``reload`` (``--faults
    FILE``): it re-reads the rules (see ``_first``). Entered before the
    banner is printed: a signal sent as soon as the banner shows must not
    meet the default action (death, with recordings left without their
    close line and no summary)."""
    wanted = stop_signals() | ({signal.SIGHUP} if reload is not None else set())
    return trio.open_signal_receiver(*wanted)


async def _first(
    signals: AsyncIterator[int],
    plan: FaultPlan | None = None,
    reload: FaultSource | None = None,
    quiet: bool = False,
) -> None:
    """Wait for a stop signal; a SIGHUP with ``reload`` re-reads the fault
    rules into ``plan`` instead and waits on."""
    async for signum in signals:
        if signum == signal.SIGHUP and reload is not None:
            _reload_faults(plan, reload, quiet)
            continue
        return


def _reload_faults(plan: FaultPlan | None, source: FaultSource, quiet: bool = False) -> bool:
    """SIGHUP: read the fault rules again into ``plan`` (None: only check
    them); a bad file keeps the rules in force. One line says which."""
    try:
        rules = source.load()
    except FaultSyntaxError as exc:
        if not quiet:
            _say(f"smtpproxy: SIGHUP: {exc}; the rules in force stay")
        return False
    if plan is not None:
        plan.replace(rules)
    if not quiet:
        _say(
            f"smtpproxy: SIGHUP: {len(rules)} fault rule(s) read from {source.file}; new sessions follow them"
        )
    return True


async def _run_record(
    service: Service,
    ca: CertificateAuthority | None,
    reload: FaultSource | None = None,
    web: LiveWeb | None = None,
) -> None:
    await service.listen()
    with _stop_signals(reload) as signals:
        async with trio.open_nursery() as nursery:
            if web is not None:
                web.live.follow(service.proxy)
                web_address = await nursery.start(web.serve)
            address = await nursery.start(service.run)
            _banner(address, service.config, ca)
            if web is not None:
                _say(
                    f"smtpproxy: the web view of {web.folder}/ is served on {web_address[0]}:"
                    f"{web_address[1]}, live; open"
                )
                _say(f"  {web.url(web_address)}")
            await _first(signals, service.config.faults, reload)
            nursery.cancel_scope.cancel()


def local_ca(regenerate: bool = False) -> CertificateAuthority:
    """``smtpproxy ca``: the local CA, made on first use (``--regenerate``:
    made anew); what was done to its files' modes is said on stderr."""
    try:
        authority = CertificateAuthority.load_or_create()
        for line in authority.notes:
            _say(line)
        if regenerate:
            authority.regenerate()
    except TlsFailure as exc:
        raise StartError(str(exc)) from None
    except OSError as exc:
        raise StartError(
            f"cannot use {default_home()}: {exc.strerror or exc}; "
            "set SMTPPROXY_HOME to a writable folder"
        ) from None
    return authority


def sink(listen: tuple[str, int], config: SinkConfig, reload: FaultSource | None = None) -> None:
    """Run the embedded server alone on ``listen`` until a stop signal, then
    print what it accepted. ``reload``: SIGHUP re-reads the fault rules."""
    server = Sink(config)

    async def run() -> None:
        listeners = await trio.open_tcp_listeners(listen[1], host=listen[0])
        with _stop_signals(reload) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    functools.partial(
                        accept.serve,
                        listeners,
                        server.handle,
                        admit=lambda: True,
                        refusal=b"421 4.3.2 smtpproxy sink: out of resources, try later\r\n",
                    )
                )
                addr = listeners[0].socket.getsockname()
                _say(f"smtpproxy sink: listening on {addr[0]}:{addr[1]} (Ctrl-C to stop)")
                await _first(signals, config.faults, reload)
                nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    except OSError as exc:
        raise StartError(
            f"cannot listen on {listen[0]}:{listen[1]}: {exc.strerror or exc}"
        ) from None
    _say(
        f"smtpproxy sink: {server.stats.sessions} session(s), {server.stats.messages} message(s) accepted"
    )


def _web_warning(host: str) -> None:
    if not is_loopback(host):
        _say(
            f"warning: the web view listens on {host}, not loopback: the pages show the "
            "recordings' credentials to anyone who has the address and its token"
        )


#: descriptors ``record --web`` keeps for its pages: the index (and its
#: journal), the listening socket, a few browsers
WEB_DESCRIPTORS = 16


@dataclass
class LiveWeb:
    """``record --web``: the web view's socket, config, index and ``Live``,
    made before the loop starts so a failure is one line."""

    folder: Path
    sock: socket.socket
    config: WebConfig
    live: Live

    async def serve(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        from .web.serve import serve_web

        await serve_web(self.config, self.sock, self.live.index, self.live, task_status=task_status)

    def url(self, address: tuple[str, int]) -> str:
        from .web.serve import url_of

        return url_of(address[0], address[1], self.config.token)

    def close(self) -> None:
        self.live.close()
        self.live.index.close()
        self.sock.close()


def _live_web(folder: Path | None, listen: tuple[str, int]) -> LiveWeb:
    """Bind the web view's address and bring the folder's index up to date
    (``record --web``); a failure is a ``StartError``."""
    from .web.app import WebConfig
    from .web.index import INDEX_NAME, Index
    from .web.live import Live
    from .web.serve import bind

    if folder is None:
        raise StartError("--web shows the recordings: it needs a --recordings folder")
    _web_warning(listen[0])
    try:
        sock = bind(listen)
    except OSError as exc:
        raise StartError(
            f"cannot serve the web view on {listen[0]}:{listen[1]}: {exc.strerror or exc}; "
            "choose another address with --web [HOST:]PORT"
        ) from None
    try:
        index = Index(folder)  # brought up to date by Live.run, beside the proxy
    except (OSError, sqlite3.Error) as exc:
        sock.close()
        raise StartError(
            f"cannot use the index {folder / INDEX_NAME}: {exc}; delete it (it is a cache)"
        ) from None
    return LiveWeb(folder, sock, WebConfig(folder), Live(index))


def web(folder: Path, listen: tuple[str, int]) -> None:
    """``smtpproxy web``: serve the web view of ``folder`` until a stop signal."""
    from .web.app import WebConfig
    from .web.index import INDEX_NAME, Index
    from .web.serve import bind, serve_web, url_of

    _web_warning(listen[0])
    config = WebConfig(folder)
    try:
        sock = bind(listen)
    except OSError as exc:
        raise _cannot_listen(listen, exc) from None
    try:
        index = Index(folder)
        indexed, unreadable = index.update()
    except (OSError, sqlite3.Error) as exc:
        sock.close()
        raise StartError(
            f"cannot use the index {folder / INDEX_NAME}: {exc}; delete it (it is a cache)"
        ) from None
    _say(
        f"smtpproxy web: {index.count()} session(s) in {folder}/, {indexed} recording(s) read now"
        + (
            f", {unreadable} unreadable ('smtpproxy index {folder}' names them)"
            if unreadable
            else ""
        )
    )

    async def run() -> None:
        with _stop_signals() as signals:
            async with trio.open_nursery() as nursery:
                host, port = await nursery.start(serve_web, config, sock, index)
                _say(f"smtpproxy web: listening on {host}:{port} (Ctrl-C to stop); open")
                _say(f"  {url_of(host, port, config.token)}")
                await _first(signals)
                nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    finally:
        index.close()
