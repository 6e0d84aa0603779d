"""The command line: thin click commands over the modules."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
import socket
import stat
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click
import trio

from . import __version__, accept
from .diff import diff_sessions, exchanges_of, format_unified, tls_facts
from .events import Side
from .export import export_recording
from .net import is_loopback, parse_hostport
from .recording import (
    Recording,
    RecordingError,
    encode_event,
    ensure_private_dir,
    iter_recordings,
    read_recording,
)
from .relay import Proxy, ProxyConfig, UpstreamTls
from .render import Transcript, json_visible, visible
from .replay import ReplayOptions, format_result, format_table, replay_all
from .server import Sink, SinkConfig
from .summary import SessionSummary, session_row
from .tls import (
    CertificateAuthority,
    ServerContexts,
    TlsFailure,
    client_context,
    default_home,
    private_keylog,
)
from .workers import WorkerGroup, plan, stop_signals

F = TypeVar("F", bound=Callable[..., Any])


def _hostport(default_port: int | None = None) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def convert(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return parse_hostport(value, default_port)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None

    return convert


def _positive(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if value is not None and value < 0:
        raise click.BadParameter("must be zero (no limit) or more")
    return value


color_option = click.option(
    "--color/--no-color",
    default=None,
    help="Color the transcript (default: when writing to a terminal).",
)


def _transcript(color: bool | None, quiet: bool = False, show_body: bool = False) -> Transcript:
    if color is None:
        color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    return Transcript(sys.stdout, color=color, quiet=quiet, show_body=show_body)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="smtpproxy")
def main() -> None:
    """See, keep, replay and compare what happens between a mail client and
    an SMTP server."""


@main.command()
@click.option(
    "--listen",
    default="127.0.0.1:2525",
    show_default=True,
    metavar="HOST:PORT",
    callback=_hostport(2525),
    help="Address to accept mail clients on.",
)
@click.option(
    "--upstream",
    default=None,
    metavar="HOST:PORT",
    callback=_hostport(25),
    help="The real SMTP server HOST:PORT. Default: an embedded server that accepts everything.",
)
@click.option(
    "--recordings",
    type=click.Path(path_type=Path),
    default=Path("recordings"),
    show_default=True,
    help="Folder for the session recordings (created mode 0700).",
)
@click.option("--quiet", "-q", is_flag=True, help="Print only one summary line per session.")
@click.option("--show-body", is_flag=True, help="Print message bodies instead of a summary.")
@click.option(
    "--idle-timeout",
    type=float,
    default=300.0,
    show_default=True,
    callback=_positive,
    help="Close a session after this many seconds without traffic (0: never).",
)
@click.option(
    "--connect-timeout",
    type=float,
    default=10.0,
    show_default=True,
    callback=_positive,
    help="Give up dialing the upstream after this many seconds.",
)
@click.option(
    "--handshake-timeout",
    type=float,
    default=30.0,
    show_default=True,
    callback=_positive,
    help="Give up a TLS handshake after this many seconds (0: no limit); "
    "a lower --idle-timeout wins for the client's.",
)
@click.option(
    "--line-timeout",
    type=float,
    default=300.0,
    show_default=True,
    callback=_positive,
    help="Close a session (421 4.4.2) whose client takes longer than this to send one "
    "command line, from its first byte (0: never).",
)
@click.option(
    "--message-timeout",
    type=float,
    default=3600.0,
    show_default=True,
    callback=_positive,
    help="Close a session (421 4.4.2) whose client takes longer than this to send one "
    "message, from its first byte; the upstream never gets a half message (0: never).",
)
@click.option(
    "--max-sessions",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Refuse clients beyond this many at once (421 4.3.2).",
)
@click.option("--listen-tls", is_flag=True, help="Clients speak TLS from the first byte (SMTPS, port 465 style).")
@click.option(
    "--upstream-tls",
    type=click.Choice(["mirror", "starttls", "implicit", "plain"]),
    default="mirror",
    show_default=True,
    help="mirror: TLS upstream exactly when the client uses it; starttls: always upgrade the "
    "upstream after the client's first EHLO; implicit: TLS from the first byte; plain: never "
    "(the proxy answers the client's STARTTLS itself).",
)
@click.option(
    "--cert",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Certificate (PEM, chain) to show clients instead of one minted by the local CA.",
)
@click.option(
    "--key",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Private key for --cert (default: --cert holds it).",
)
@click.option(
    "--upstream-ca",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Also trust this CA (PEM) when verifying the upstream's certificate.",
)
@click.option("--upstream-insecure", is_flag=True, help="Do not verify the upstream's certificate.")
@click.option(
    "--strip-starttls",
    is_flag=True,
    help="Remove STARTTLS from the EHLO reply the client sees (test whether it then sends secrets in clear).",
)
@click.option(
    "--keylog",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Append both legs' TLS secrets to this file (NSS key log format, for Wireshark). "
    "Default: $SSLKEYLOGFILE if set.",
)
@click.option(
    "--redact",
    is_flag=True,
    help="Keep passwords, tokens and CRAM-MD5 digests out of recordings and the transcript (user names stay).",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Relay processes sharing the --listen address (Linux); each session stays in one. "
    "Default: one per core, at most 8; 1 with the embedded upstream.",
)
@color_option
def record(
    listen: tuple[str, int],
    upstream: tuple[str, int] | None,
    recordings: Path,
    quiet: bool,
    show_body: bool,
    idle_timeout: float,
    connect_timeout: float,
    handshake_timeout: float,
    line_timeout: float,
    message_timeout: float,
    max_sessions: int,
    listen_tls: bool,
    upstream_tls: str,
    cert: Path | None,
    key: Path | None,
    upstream_ca: Path | None,
    upstream_insecure: bool,
    strip_starttls: bool,
    keylog: Path | None,
    redact: bool,
    workers: int | None,
    color: bool | None,
) -> None:
    """Relay mail clients to an SMTP server, showing and recording every
    command and reply.

    Point a mail client at the --listen address (127.0.0.1:2525 by default).
    Each session is saved as a JSON Lines recording under --recordings.
    """
    try:
        ensure_private_dir(recordings)
    except OSError as exc:
        raise click.ClickException(
            f"cannot use recordings folder {recordings}: {exc.strerror or exc}; "
            "choose another with --recordings DIR"
        ) from None
    info = recordings.stat()
    mode = stat.S_IMODE(info.st_mode)
    transcript = _transcript(color, quiet, show_body)
    if mode & 0o077:
        # a checkout gives the repository's recordings/ 0755: recordings hold credentials
        if info.st_uid == os.geteuid():
            os.chmod(recordings, 0o700)
            click.echo(f"note: {recordings}/ was mode {mode:o}; made it 0700 (recordings hold credentials)", err=True)
        else:
            click.echo(
                f"warning: {recordings}/ is mode {mode:o} and not yours; recordings hold credentials "
                "(files are 0600 all the same)",
                err=True,
            )
    if not is_loopback(listen[0]):
        click.echo(
            f"warning: listening on {listen[0]}, not loopback: anyone who can reach it can relay "
            "through this proxy, and their credentials will be recorded",
            err=True,
        )
    if key is not None and cert is None:
        raise click.UsageError("--key goes with --cert")
    keylog_file = str(keylog) if keylog else os.environ.get("SSLKEYLOGFILE") or None
    ca: CertificateAuthority | None = None
    try:
        if keylog_file is not None:
            _note(private_keylog(keylog_file))
        if cert is None:
            ca = CertificateAuthority.load_or_create()
            for line in ca.notes:
                _note(line)
        names = ["localhost", "127.0.0.1", "::1", listen[0]]
        if upstream is not None:
            names.append(upstream[0])
        contexts = ServerContexts(names, ca=ca, cert_file=cert, key_file=key, keylog=keylog_file)
        upstream_ctx = client_context(upstream_ca, upstream_insecure, keylog_file)
        if upstream is None and ca is not None:
            upstream_ctx.load_verify_locations(cafile=str(ca.cert_path))
    except TlsFailure as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(
            f"cannot set up the local CA in {default_home()}: {exc.strerror or exc}; "
            "set SMTPPROXY_HOME to a writable folder, or give --cert/--key"
        ) from None
    config = ProxyConfig(
        listen=listen,
        upstream=upstream or ("127.0.0.1", 0),
        recordings=recordings,
        idle_timeout=idle_timeout,
        connect_timeout=connect_timeout,
        handshake_timeout=handshake_timeout,
        line_timeout=line_timeout,
        message_timeout=message_timeout,
        max_sessions=max_sessions,
        listen_tls=listen_tls,
        upstream_tls=UpstreamTls(upstream_tls),
        upstream_context=upstream_ctx,
        server_contexts=contexts,
        strip_starttls=strip_starttls,
        redact=redact,
    )
    count, config.max_sessions = plan(workers, max_sessions, embedded=upstream is None)
    config.max_sessions = _fit_descriptors(
        config.max_sessions,
        count,
        per_session=3 + (upstream is None) + (keylog_file is not None),
        held=contexts.descriptors() + (keylog_file is not None),
    )
    if count > 1:
        totals, ok = _record_in_workers(config, transcript, count, ca)
    else:
        proxy = Proxy(config, transcript)
        try:
            trio.run(_run_record, proxy, upstream is None, ca)
        except OSError as exc:
            raise _cannot_listen(listen, exc) from None
        totals, ok = dataclasses.asdict(proxy.stats), True
    click.echo(
        f"smtpproxy: {totals.get('sessions', 0)} session(s), {totals.get('recordings', 0)} recording(s) in {recordings}/"
        + (f", {totals['recorder_failures']} recording failure(s)" if totals.get("recorder_failures") else "")
        + (f", {totals['refused']} refused (too many sessions)" if totals.get("refused") else ""),
        err=True,
    )
    if not ok:
        sys.exit(1)


def _note(line: str | None) -> None:
    if line is not None:
        click.echo(line, err=True)


def _fit_descriptors(sessions: int, workers: int, per_session: int, held: int) -> int:
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
        raise click.ClickException(
            f"the descriptor limit of {limit}{raised} leaves no room for a session: each needs "
            f"{per_session} and the proxy keeps {in_use + accept.RESERVE}; raise it (ulimit -n 1024)"
        )
    each = " per worker" if workers > 1 else ""
    click.echo(
        f"note: at most {allowed} sessions at once{each}, not {sessions}: the descriptor limit is "
        f"{limit}{raised} and each session needs {per_session}; further clients get 421 4.3.2 "
        "(raise the hard limit, ulimit -Hn, for more)",
        err=True,
    )
    return allowed


def _cannot_listen(listen: tuple[str, int], exc: OSError) -> click.ClickException:
    return click.ClickException(
        f"cannot listen on {listen[0]}:{listen[1]}: {exc.strerror or exc}; "
        "choose another address with --listen HOST:PORT"
    )


def _banner(address: tuple[str, int], config: ProxyConfig, ca: CertificateAuthority | None, workers: int = 1) -> None:
    target = config.upstream_label or f"{config.upstream[0]}:{config.upstream[1]}"
    click.echo(
        f"smtpproxy {__version__}: listening on {address[0]}:{address[1]}, relaying to {target}; "
        f"recording to {config.recordings}/"
        + (f"; {workers} worker processes" if workers > 1 else "")
        + " (Ctrl-C to stop)",
        err=True,
    )
    if ca is not None:
        click.echo(
            f"TLS: clients are shown certificates from the local CA {ca.cert_path} "
            "(trust it for STARTTLS: see 'smtpproxy ca')",
            err=True,
        )


def _record_in_workers(
    config: ProxyConfig, transcript: Transcript, count: int, ca: CertificateAuthority | None
) -> tuple[dict[str, int], bool]:
    """``record`` with several worker processes (see smtpproxy/workers.py)."""
    try:
        group = WorkerGroup.bind(config.listen[0], config.listen[1], count)
    except OSError as exc:
        raise _cannot_listen(config.listen, exc) from None

    def work(sockets: list[socket.socket]) -> dict[str, int]:
        proxy = Proxy(config, transcript)
        trio.run(_serve_sockets, proxy, sockets)
        return dataclasses.asdict(proxy.stats)

    ok = group.run(work, ready=lambda: _banner(group.address, config, ca, count))
    for problem in group.problems:
        click.echo(f"smtpproxy: {problem}", err=True)
    return group.totals, ok


async def _serve_sockets(proxy: Proxy, sockets: list[socket.socket]) -> None:
    """One worker: serve on sockets bound by the parent until a signal."""
    listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in sockets]
    with _stop_signals() as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(proxy.serve, listeners)
            await _first(signals)
            nursery.cancel_scope.cancel()


def _stop_signals() -> contextlib.AbstractContextManager[AsyncIterator[int]]:
    """SIGINT, SIGTERM and SIGHUP (a closed terminal or SSH session; not
    under ``nohup``: workers.stop_signals), caught from here on; each stops
    the proxy the same way. Entered before the banner is printed: a signal
    sent as soon as the banner shows must not meet the default action
    (death, with recordings left without their close line and no summary)."""
    return trio.open_signal_receiver(*stop_signals())


async def _first(signals: AsyncIterator[int]) -> None:
    async for _ in signals:
        return


async def _run_record(proxy: Proxy, embedded: bool, ca: CertificateAuthority | None) -> None:
    config = proxy.config
    listeners = await proxy.listen()
    with _stop_signals() as signals:
        async with trio.open_nursery() as nursery:
            if embedded:
                sink_tls = ServerContexts(["localhost", "127.0.0.1"], ca=ca) if ca is not None else None
                sink = Sink(
                    SinkConfig(
                        idle_timeout=config.idle_timeout or 300.0,
                        tls=sink_tls.default if sink_tls else None,
                        implicit_tls=config.listen_tls and config.upstream_tls is not UpstreamTls.PLAIN,
                    )
                )
                host, port = await nursery.start(sink.serve, "127.0.0.1", 0)
                config.upstream = (host, port)
                config.upstream_label = f"embedded sink {host}:{port}"
            address = await nursery.start(proxy.serve, listeners)
            _banner(address, config, ca)
            await _first(signals)
            nursery.cancel_scope.cancel()


@main.command()
@click.option(
    "--listen",
    default="127.0.0.1:2526",
    show_default=True,
    metavar="HOST:PORT",
    callback=_hostport(2526),
    help="Address to accept SMTP clients on.",
)
@click.option("--hostname", default=None, help="Name in the greeting and EHLO reply.")
@click.option(
    "--max-size",
    type=click.IntRange(min=1),
    default=52_428_800,
    show_default=True,
    help="SIZE advertised and enforced (552 above it).",
)
def sink(listen: tuple[str, int], hostname: str | None, max_size: int) -> None:
    """Run the embedded SMTP server alone: it accepts any credentials and
    every message, and keeps nothing."""
    config = SinkConfig(max_size=max_size)
    if hostname:
        config.hostname = hostname
    server = Sink(config)

    async def run() -> None:
        listeners = await trio.open_tcp_listeners(listen[1], host=listen[0])
        with _stop_signals() as signals:
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
                click.echo(f"smtpproxy sink: listening on {addr[0]}:{addr[1]} (Ctrl-C to stop)", err=True)
                await _first(signals)
                nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on {listen[0]}:{listen[1]}: {exc.strerror or exc}"
        ) from None
    click.echo(
        f"smtpproxy sink: {server.stats.sessions} session(s), {server.stats.messages} message(s) accepted",
        err=True,
    )


@main.command()
@click.option("--regenerate", is_flag=True, help="Make a new CA, replacing the old one.")
def ca(regenerate: bool) -> None:
    """Show the local CA that signs the certificates shown to clients.

    Made on first use in $SMTPPROXY_HOME (default ~/.smtpproxy). Clients
    must trust it for STARTTLS and implicit TLS interception.
    """
    try:
        authority = CertificateAuthority.load_or_create()
        for line in authority.notes:
            _note(line)
        if regenerate:
            authority.regenerate()
    except TlsFailure as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(
            f"cannot use {default_home()}: {exc.strerror or exc}; set SMTPPROXY_HOME to a writable folder"
        ) from None
    click.echo(f"path:        {authority.cert_path}")
    click.echo(f"sha256:      {authority.fingerprint()}")
    click.echo(
        "trust it:    swaks --tls-ca-path PATH | msmtp tls_trust_file PATH | "
        "Python ssl.create_default_context(cafile=PATH) | Thunderbird: Settings > Certificates > Import"
    )
    click.echo(authority.pem().decode("ascii"), nl=False)


# -- working with recordings ---------------------------------------------------


class RecordingProblem(click.ClickException):
    """An unreadable recording or target: exit 2, one line, no traceback."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(visible(message))


def _echo(text: str = "", err: bool = False) -> None:
    """Print a line whose text may hold what a peer or a file said: control
    characters are made visible (render.visible)."""
    click.echo(visible(text), err=err)


def _read(path: Path) -> Recording:
    try:
        return read_recording(path)
    except RecordingError as exc:
        raise RecordingProblem(str(exc)) from None


def _paths(paths: tuple[Path, ...]) -> list[Path]:
    files = iter_recordings(paths)
    if not files:
        raise RecordingProblem(f"no recordings (*.jsonl) in {', '.join(map(str, paths))}")
    return files


class _Readable:
    """Reads the recordings of a command that takes several: one that cannot
    be read is reported on stderr and skipped, and the command goes on with
    the others. ``done`` ends it: exit 2 when none could be read, 1 when
    some could not."""

    def __init__(self, files: list[Path]) -> None:
        self.files = files
        self.unreadable = 0

    def __iter__(self) -> Iterator[Recording]:
        for f in self.files:
            try:
                yield read_recording(f)
            except RecordingError as exc:
                self.unreadable += 1
                _echo(f"Error: {exc}" + (" (skipped)" if len(self.files) > 1 else ""), err=True)

    def done(self, ctx: click.Context) -> None:
        if self.unreadable == len(self.files):
            ctx.exit(2)
        if self.unreadable:
            _echo(f"{self.unreadable} of {len(self.files)} recording(s) could not be read", err=True)
            ctx.exit(1)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--show-body", is_flag=True, help="Print message bodies.")
@click.option("--raw", "raw", is_flag=True, help="Write the exact bytes one side sent (with --side); "
              "to a terminal, with control characters made visible.")
@click.option("--side", type=click.Choice(["client", "server"]), help="Which side's bytes --raw writes.")
@click.option("--json", "as_json", is_flag=True, help="Print the events as JSON Lines.")
@color_option
@click.pass_context
def show(
    ctx: click.Context,
    paths: tuple[Path, ...],
    show_body: bool,
    raw: bool,
    side: str | None,
    as_json: bool,
    color: bool | None,
) -> None:
    """Show recordings: a file as its transcript, a folder as one row per session.
    A recording that cannot be read is reported and skipped (exit 1)."""
    if raw and side is None:
        raise click.UsageError("--raw needs --side client or --side server")
    if side is not None and not raw:
        raise click.UsageError("--side goes with --raw")
    single = len(paths) == 1 and not paths[0].is_dir()
    files = _paths(paths)
    if not raw and not as_json and (single or all(not p.is_dir() for p in paths) and len(files) == 1):
        _show_one(_read(files[0]), color, show_body)
        return
    readable = _Readable(files)
    if raw:
        out = sys.stdout.buffer
        terminal = sys.stdout.isatty()
        for rec in readable:
            data = rec.raw(Side(side))
            if terminal:
                data = "".join(visible(line) + "\n" for line in _lines(data)).encode()
            out.write(data)
        out.flush()
    elif as_json:
        for rec in readable:
            for entry in rec.entries:
                click.echo(json_visible(json.dumps(encode_event(entry.t, entry.event, full=True), ensure_ascii=False)))
    else:
        rows = [[visible(cell) for cell in session_row(rec)] for rec in readable]
        rows.sort(key=lambda r: r[0])
        headers = ("start", "session", "client", "upstream", "TLS", "AUTH", "accepted", "rejected", "ended", "seconds")
        widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
        if rows:
            click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
        for r in rows:
            click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    readable.done(ctx)


def _lines(data: bytes) -> list[str]:
    """``data`` as text lines without their line ends (for a terminal)."""
    text = data.decode("utf-8", errors="backslashreplace")
    lines = re.split(r"\r?\n", text)
    if lines and not lines[-1]:
        lines.pop()
    return lines


def _show_one(rec: Recording, color: bool | None, show_body: bool) -> None:
    transcript = _transcript(color, show_body=show_body)
    _echo(
        f"session {rec.header.session} started {rec.header.start}: client {rec.header.client}, "
        f"upstream {rec.header.upstream}"
    )
    for entry in rec.entries:
        transcript.events(rec.header.session, [entry.event])
    summary = SessionSummary()
    summary.update(rec.events())
    if rec.close is not None:
        ended = f"closed by {rec.close.by} ({rec.close.reason}) after {rec.close.t:.2f}s"
    else:
        ended = "no close line: the proxy was stopped mid-session"
    if rec.truncated:
        ended += "; the last line was cut short"
    transcript.summary(rec.header.session, f"{ended}: {summary.describe()}")


@main.command()
@click.argument("recording_path", metavar="RECORDING", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--to",
    "targets",
    multiple=True,
    required=True,
    metavar="HOST:PORT",
    callback=lambda c, p, v: tuple(_hostport(25)(c, p, x) for x in v),
    help="Target server HOST:PORT; repeat to replay against several at once.",
)
@click.option("--tls", type=click.Choice(["auto", "implicit"]), default="auto", show_default=True,
              help="auto: STARTTLS where the recording did; implicit: TLS from the first byte (SMTPS).")
@click.option("--ca", "cafile", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Trust this CA (PEM) for the target's certificate.")
@click.option("--insecure", is_flag=True, help="Do not verify the target's certificate.")
@click.option("--user", help="Authenticate as this user instead of the recorded one.")
@click.option("--password", envvar="SMTPPROXY_PASSWORD", help="Password for new credentials (CRAM-MD5 needs it). Env: SMTPPROXY_PASSWORD.")
@click.option("--strict", is_flag=True, help="Compare reply texts too (after masking hosts, ids, dates, numbers).")
@click.option("--timeout", type=float, default=30.0, show_default=True, callback=_positive,
              help="Seconds to wait for each reply.")
@click.option("--save", type=click.Path(file_okay=False, path_type=Path),
              help="Write the replay's own session as a recording in this folder.")
def replay(
    recording_path: Path,
    targets: tuple[tuple[str, int], ...],
    tls: str,
    cafile: Path | None,
    insecure: bool,
    user: str | None,
    password: str | None,
    strict: bool,
    timeout: float,
    save: Path | None,
) -> None:
    """Replay RECORDING against one or more servers and report where their
    replies differ from the recorded ones. Exit 0 when all match, 1 when any
    differ, 2 when the recording or a target cannot be used."""
    rec = _read(recording_path)
    if save is not None:
        try:
            ensure_private_dir(save)
        except OSError as exc:
            raise RecordingProblem(f"cannot use --save folder {save}: {exc.strerror or exc}") from None
    options = [
        ReplayOptions(
            target=t, tls=tls, cafile=cafile, insecure=insecure, user=user, password=password,
            strict=strict, timeout=timeout, save=save,
        )
        for t in targets
    ]
    results = trio.run(replay_all, rec, options)
    lines = format_result(results[0]) if len(results) == 1 else format_table(results, exchanges_of(rec))
    for line in lines:
        _echo(line)
    if any(r.error for r in results):
        raise RecordingProblem("; ".join(r.error for r in results if r.error))
    for r in results:
        if r.saved:
            click.echo(f"replay of {r.target} saved to {r.saved}", err=True)
    if any(r.differences for r in results):
        sys.exit(1)


@main.command()
@click.argument("a", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("b", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--strict", is_flag=True, help="Compare reply texts too (after masking hosts, ids, dates, numbers).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def diff(a: Path, b: Path, strict: bool, as_json: bool) -> None:
    """Compare two recordings exchange by exchange. Exit 0 when they match,
    1 when they differ, 2 when one cannot be read."""
    ra, rb = _read(a), _read(b)
    count, diffs = diff_sessions(exchanges_of(ra), exchanges_of(rb), strict)
    tls_a, tls_b = tls_facts(ra.events()), tls_facts(rb.events())
    if as_json:
        click.echo(
            json_visible(json.dumps(
                {
                    "a": str(a),
                    "b": str(b),
                    "exchanges": count,
                    "differences": [d.as_json() for d in diffs],
                    "tls": {"a": tls_a, "b": tls_b},
                },
                indent=2,
                ensure_ascii=False,
            ))
        )
    else:
        if diffs:
            for line in format_unified(str(a), str(b), diffs):
                _echo(line)
        if tls_a.get("server") != tls_b.get("server"):
            _echo(f"TLS with the server: {tls_a.get('server', 'none')} -> {tls_b.get('server', 'none')}")
        click.echo(f"{count} exchanges, {len(diffs)} differ")
    if diffs:
        sys.exit(1)


@main.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--eml", "folder", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the .eml files and their envelope .json files.")
@click.option("--force", is_flag=True, help="Replace files of the same name already in the folder.")
@click.pass_context
def export(ctx: click.Context, paths: tuple[Path, ...], folder: Path, force: bool) -> None:
    """Write each message in the recordings as an .eml file (exactly what the
    server received), with its envelope in a .json file beside it. Names are
    SESSION-N.eml; an existing file is kept unless --force. A recording that
    cannot be read, or a file that cannot be written, is reported and the
    others go on (exit 1)."""
    total = 0
    refused = 0
    taken: set[str] = set()
    readable = _Readable(_paths(paths))
    for rec in readable:
        try:
            written, problems = export_recording(rec, folder, force, taken)
        except OSError as exc:
            raise click.ClickException(visible(f"cannot write to {folder}: {exc.strerror or exc}")) from None
        total += len(written)
        refused += len(problems)
        for path in written:
            _echo(str(path))
        for problem in problems:
            _echo(f"Error: {problem}", err=True)
    if readable.unreadable < len(readable.files):
        _echo(f"{total} message(s) exported to {folder}/", err=True)
    if refused:
        _echo(f"{refused} message(s) not exported", err=True)
    readable.done(ctx)
    if refused:
        ctx.exit(1)
