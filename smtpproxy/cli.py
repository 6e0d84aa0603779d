"""The command line: thin click commands over the modules.

Each command turns its options (smtpproxy/options.py, each defined once)
into a config and calls the module that does the work: ``record``, ``sink``
and ``ca`` smtpproxy/app.py; ``show`` views.py and summary.listing;
``replay`` replay.py; ``diff`` diff.py; ``export`` export.py; ``mock``
mockrun.py. A problem the user can fix ends the command with one line and an
exit code (click exceptions, ``ctx.exit``), never ``sys.exit`` or a
traceback.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

import click
import trio

from . import __version__, app, mockrun, options, relayfaults
from .diff import diff_sessions, exchanges_of, format_unified, tls_facts
from .events import Side
from .export import ExportFailed, ExportRefused, export_all
from .faults import ActionKind, FaultPlan, FaultSource, FaultSyntaxError
from .mockplay import MockOptions
from .recording import (
    Recording,
    RecordingError,
    encode_event,
    ensure_private_dir,
    iter_recordings,
    read_recording,
)
from .relay import ProxyConfig, UpstreamTls
from .render import Transcript, json_visible, visible
from .replay import ReplayOptions, replay_all
from .server import SinkConfig
from .summary import listing
from .views import format_result, format_table, show_recording, terminal_text, transcript


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="smtpproxy")
def main() -> None:
    """See, keep, replay and compare what happens between a mail client and
    an SMTP server."""


@main.command()
@options.listen(2525, "Address to accept mail clients on.")
@options.upstream
@options.recordings_folder
@options.quiet
@options.show_body("Print message bodies instead of a summary.")
@options.idle_timeout
@options.connect_timeout
@options.handshake_timeout
@options.line_timeout
@options.message_timeout
@options.max_sessions
@options.listen_tls
@options.upstream_tls
@options.cert
@options.key
@options.upstream_ca
@options.upstream_insecure
@options.strip_starttls
@options.keylog
@options.redact
@options.workers
@options.color
@options.fault
@options.faults_file
@options.web
@click.pass_context
def record(
    ctx: click.Context,
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
    fault_rules: tuple[str, ...],
    faults_file: Path | None,
    web: tuple[str, int] | None,
) -> None:
    """Relay mail clients to an SMTP server, showing and recording every
    command and reply.

    Point a mail client at the --listen address (127.0.0.1:2525 by default).
    Each session is saved as a JSON Lines recording under --recordings.
    """
    if key is not None and cert is None:
        raise click.UsageError("--key goes with --cert")
    if web is not None and workers is not None and workers > 1:
        raise click.UsageError(
            "--web serves the pages from the proxy's own process: leave out --workers "
            "(or give --workers 1)"
        )
    if web is not None and web[1] != 0 and web == listen:
        raise click.UsageError("--web and --listen name the same address: give them two ports")
    plan = _fault_plan(fault_rules, faults_file)
    refusal = (
        relayfaults.unsupported(plan, fixed_cert=cert is not None) if plan is not None else None
    )
    if refusal is not None:
        raise click.UsageError(refusal)
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
        strip_starttls=strip_starttls,
        redact=redact,
        faults=plan,
    )
    tls = app.TlsFiles(
        cert=cert,
        key=key,
        upstream_ca=upstream_ca,
        upstream_insecure=upstream_insecure,
        keylog=keylog,
    )
    try:
        ok = app.record(
            config,
            transcript(color, quiet, show_body),
            tls,
            workers,
            embedded=upstream is None,
            reload=FaultSource(fault_rules, faults_file) if faults_file else None,
            web=web,
        )
    except app.StartError as exc:
        raise click.ClickException(str(exc)) from None
    if not ok:
        ctx.exit(1)


@main.command()
@options.listen(2526, "Address to accept SMTP clients on.")
@options.hostname
@options.max_size
@options.fault
@options.faults_file
def sink(
    listen: tuple[str, int],
    hostname: str | None,
    max_size: int,
    fault_rules: tuple[str, ...],
    faults_file: Path | None,
) -> None:
    """Run the embedded SMTP server alone: it accepts any credentials and
    every message, and keeps nothing."""
    plan = _fault_plan(fault_rules, faults_file)
    for rule in plan.rules if plan is not None else ():
        if rule.fault.kind is ActionKind.TLS_CERT:
            raise click.UsageError(
                f"fault rule {rule.text!r}: the sink command offers no TLS, so it would "
                "never fire; 'tls: cert ...' works on 'smtpproxy record'"
            )
    config = SinkConfig(max_size=max_size, faults=plan)
    if plan is not None:
        config.transcript = transcript(None)
    if hostname:
        config.hostname = hostname
    try:
        app.sink(
            listen, config, reload=FaultSource(fault_rules, faults_file) if faults_file else None
        )
    except app.StartError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@options.regenerate
def ca(regenerate: bool) -> None:
    """Show the local CA that signs the certificates shown to clients.

    Made on first use in $SMTPPROXY_HOME (default ~/.smtpproxy). Clients
    must trust it for STARTTLS and implicit TLS interception.
    """
    try:
        authority = app.local_ca(regenerate)
    except app.StartError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"path:        {authority.cert_path}")
    click.echo(f"sha256:      {authority.fingerprint()}")
    click.echo(
        "trust it:    swaks --tls-ca-path PATH | msmtp tls_trust_file PATH | "
        "Python ssl.create_default_context(cafile=PATH) | "
        "Thunderbird: Settings > Certificates > Import"
    )
    click.echo(authority.pem().decode("ascii"), nl=False)


# -- working with recordings ---------------------------------------------------


class RecordingProblem(click.ClickException):
    """An unreadable recording or target: exit 2, one line, no traceback."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(visible(message))


def _fault_plan(rules: tuple[str, ...], file: Path | None) -> FaultPlan | None:
    """The rules of ``--fault`` and ``--faults`` (checked by their callbacks),
    or None when there are none: the plain path, with nothing to match."""
    if not rules and file is None:
        return None
    try:
        return FaultPlan(FaultSource(rules, file).load())
    except FaultSyntaxError as exc:  # the file changed since its check
        raise click.BadParameter(str(exc), param_hint="'--faults'") from None


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
            _echo(
                f"{self.unreadable} of {len(self.files)} recording(s) could not be read", err=True
            )
            ctx.exit(1)


@main.command()
@options.recordings
@options.show_body("Print message bodies.")
@options.raw
@options.side
@options.json("Print the events as JSON Lines.")
@options.color
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
    if (
        not raw
        and not as_json
        and (single or all(not p.is_dir() for p in paths) and len(files) == 1)
    ):
        show_recording(_read(files[0]), transcript(color, show_body=show_body))
        return
    readable = _Readable(files)
    if raw:
        out = sys.stdout.buffer
        terminal = sys.stdout.isatty()
        for rec in readable:
            data = rec.raw(Side(side))
            if terminal:
                data = terminal_text(data)
            out.write(data)
        out.flush()
    elif as_json:
        for rec in readable:
            for entry in rec.entries:
                event = encode_event(entry.t, entry.event, full=True)
                click.echo(json_visible(json.dumps(event, ensure_ascii=False)))
    else:
        for line in listing(readable):
            click.echo(line)
    readable.done(ctx)


@main.command()
@options.recording("recording_path", metavar="RECORDING")
@options.targets
@options.replay_tls
@options.cafile
@options.insecure
@options.user
@options.password
@options.strict
@options.reply_timeout
@options.save
@click.pass_context
def replay(
    ctx: click.Context,
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
            raise RecordingProblem(
                f"cannot use --save folder {save}: {exc.strerror or exc}"
            ) from None
    settings = [
        ReplayOptions(
            target=t,
            tls=tls,
            cafile=cafile,
            insecure=insecure,
            user=user,
            password=password,
            strict=strict,
            timeout=timeout,
            save=save,
        )
        for t in targets
    ]
    results = trio.run(replay_all, rec, settings)
    if len(results) == 1:
        lines = format_result(results[0])
    else:
        lines = format_table(results, exchanges_of(rec))
    for line in lines:
        _echo(line)
    if any(r.error for r in results):
        raise RecordingProblem("; ".join(r.error for r in results if r.error))
    for r in results:
        if r.saved:
            click.echo(f"replay of {r.target} saved to {r.saved}", err=True)
    if any(r.differences for r in results):
        ctx.exit(1)


@main.command()
@options.recording("a")
@options.recording("b")
@options.strict
@options.json("Machine-readable output.")
@click.pass_context
def diff(ctx: click.Context, a: Path, b: Path, strict: bool, as_json: bool) -> None:
    """Compare two recordings exchange by exchange. Exit 0 when they match,
    1 when they differ, 2 when one cannot be read."""
    ra, rb = _read(a), _read(b)
    count, diffs = diff_sessions(exchanges_of(ra), exchanges_of(rb), strict)
    tls_a, tls_b = tls_facts(ra.events()), tls_facts(rb.events())
    if as_json:
        report = {
            "a": str(a),
            "b": str(b),
            "exchanges": count,
            "differences": [d.as_json() for d in diffs],
            "tls": {"a": tls_a, "b": tls_b},
        }
        click.echo(json_visible(json.dumps(report, indent=2, ensure_ascii=False)))
    else:
        for line in format_unified(str(a), str(b), diffs) if diffs else []:
            _echo(line)
        if tls_a.get("server") != tls_b.get("server"):
            was, now = tls_a.get("server", "none"), tls_b.get("server", "none")
            _echo(f"TLS with the server: {was} -> {now}")
        click.echo(f"{count} exchanges, {len(diffs)} differ")
    if diffs:
        ctx.exit(1)


@main.command()
@options.recordings
@options.eml
@options.force
@click.pass_context
def export(ctx: click.Context, paths: tuple[Path, ...], folder: Path, force: bool) -> None:
    """Write each message in the recordings as an .eml file (exactly what the
    server received), with its envelope in a .json file beside it. Names are
    SESSION-N.eml; an existing file is kept unless --force. A recording that
    cannot be read, or a file that cannot be written, is reported and the
    others go on (exit 1)."""
    total = refused = 0
    readable = _Readable(_paths(paths))
    try:
        for item in export_all(readable, folder, force):
            if isinstance(item, ExportRefused):
                refused += 1
                _echo(f"Error: {item}", err=True)
            else:
                total += 1
                _echo(str(item))
    except ExportFailed as exc:
        raise click.ClickException(visible(str(exc))) from None
    if readable.unreadable < len(readable.files):
        _echo(f"{total} message(s) exported to {folder}/", err=True)
    if refused:
        _echo(f"{refused} message(s) not exported", err=True)
    readable.done(ctx)
    if refused:
        ctx.exit(1)


@main.command()
@options.recordings
@options.listen(2525, "Address to accept mail clients on.")
@options.listen_tls
@click.option(
    "--strict",
    is_flag=True,
    help="A client that departs from the recording gets 421 and is closed.",
)
@click.option(
    "--timing",
    type=click.Choice(["fast", "recorded"]),
    default="fast",
    show_default=True,
    help="recorded: wait before each reply as long as the recorded server took.",
)
@click.option(
    "--sessions",
    type=click.IntRange(min=1),
    default=None,
    help="End after this many client sessions (exit 1 if one departed).",
)
@options.password
@options.recordings_folder
@options.quiet
@options.color
@options.json("Print the report of departures as JSON on stdout (the transcript goes to stderr).")
@options.idle_timeout
@options.fault
@options.faults_file
@click.pass_context
def mock(
    ctx: click.Context,
    paths: tuple[Path, ...],
    listen: tuple[str, int],
    listen_tls: bool,
    strict: bool,
    timing: str,
    sessions: int | None,
    password: str | None,
    recordings: Path,
    quiet: bool,
    color: bool | None,
    as_json: bool,
    idle_timeout: float,
    fault_rules: tuple[str, ...],
    faults_file: Path | None,
) -> None:
    """Play the server of RECORDING (or of each recording in a FOLDER, one
    per connection, in file order) to the clients that connect, replying as
    the recorded server did. A client that departs from what the recorded
    client did is kept going with the most faithful answer, and reported.
    Each mock session is itself recorded. Exit 0 when every client did what
    the recorded one did, 1 when one departed, 2 for a usage or file error."""
    try:
        scripts = mockrun.load_scripts(paths)
    except RecordingError as exc:
        raise RecordingProblem(str(exc)) from None
    plan = _fault_plan(fault_rules, faults_file)
    refusal = relayfaults.unsupported(plan) if plan is not None else None
    if refusal is not None:
        raise click.UsageError(refusal)
    config = ProxyConfig(
        listen=listen,
        upstream=("127.0.0.1", 0),
        recordings=recordings,
        idle_timeout=idle_timeout,
        listen_tls=listen_tls,
        faults=plan,
    )
    out = transcript(color, quiet)
    if as_json:
        out = Transcript(sys.stderr, color=False, quiet=quiet)
    opts = MockOptions(strict=strict, timing=timing == "recorded", password=password)
    try:
        results = mockrun.mock(config, out, scripts, opts, sessions)
    except app.StartError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        departures = sum(len(s.departures) for s in results)
        click.echo(
            json.dumps(
                {"sessions": [s.as_json() for s in results], "departures": departures},
                indent=2,
            )
        )
    else:
        for s in results:
            for d in s.departures:
                _echo(f"session {s.number} ({s.recording.name}): {d.describe()}", err=True)
    if any(s.departures for s in results):
        ctx.exit(1)


@main.command()
@click.argument(
    "folder", required=False, default=Path("recordings"), type=click.Path(path_type=Path)
)
@options.listen(
    8025, "Address to serve the web view on (loopback by default: it shows credentials)."
)
def web(folder: Path, listen: tuple[str, int]) -> None:
    """Show the recordings of FOLDER in a browser: the sessions list, each
    session as a sequence diagram, messages, two sessions side by side. The
    address printed at start carries a token every page needs."""
    if not folder.is_dir():
        raise RecordingProblem(f"{folder} is not a folder of recordings")
    try:
        app.web(folder, listen)
    except app.StartError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.argument("folder", type=click.Path(path_type=Path))
def index(folder: Path) -> None:
    """(Re)build the sessions index of FOLDER (the web view's list). The
    index is a cache: deleting it loses nothing. A recording that cannot be
    read is named on stderr and left out; the others are indexed."""
    from .web.index import build

    if not folder.is_dir():
        raise RecordingProblem(f"{folder} is not a folder of recordings")
    try:
        built = build(folder)
    except (OSError, sqlite3.Error) as exc:
        raise click.ClickException(visible(f"cannot index {folder}: {exc}")) from None
    for name, why in built.problems:
        _echo(f"unreadable, left out: {name}: {why}", err=True)
    _echo(
        f"{built.total} session(s) in the index of {folder}: {built.indexed} recording(s) read"
        + (f", {len(built.problems)} unreadable" if built.problems else "")
    )
