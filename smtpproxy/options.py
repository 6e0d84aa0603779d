"""The command line's options and arguments, each defined once (as
pip-tools' ``scripts/options.py``): cli.py stacks them on its commands.

An option two commands share (``--listen``, ``--strict``, ``--show-body``,
``--json``, ``--color``, the timeouts) is one decorator here, with the help
text as a parameter where the commands word it differently. Values are
checked by click callbacks, so a bad one is a one-line usage error (exit 2).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar

import click

from .faults import FaultSyntaxError, load_rules, parse_rule
from .net import parse_hostport

F = TypeVar("F", bound=Callable[..., Any])


class Decorator(Protocol):
    """What ``click.option`` returns: it adds a parameter to a command."""

    def __call__(self, f: F, /) -> F: ...


def _hostport(default_port: int) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A callback making ``HOST[:PORT]`` a (host, port) pair."""

    def convert(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return parse_hostport(value, default_port)
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None

    return convert


def _hostports(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    return tuple(_hostport(25)(ctx, param, one) for one in value)


def _positive(ctx: click.Context, param: click.Parameter, value: float) -> float:
    if value is not None and value < 0:
        raise click.BadParameter("must be zero (no limit) or more")
    return value


def _file(exists: bool = True) -> click.Path:
    return click.Path(dir_okay=False, exists=exists, path_type=Path)


def _fault_rules(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """Each ``--fault`` parsed now, so a bad one stops the start (exit 2)."""
    for text in value:
        try:
            parse_rule(text)
        except FaultSyntaxError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


def _fault_file(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    if value is not None:
        try:
            load_rules(file=value)
        except FaultSyntaxError as exc:
            raise click.BadParameter(str(exc)) from None
    return value


# -- shared by several commands ------------------------------------------------


fault = click.option(
    "--fault",
    "fault_rules",
    multiple=True,
    metavar="RULE",
    callback=_fault_rules,
    help="Fail a named step: '[SELECTOR ]STEP[#N]: ACTION[, OPTION=VALUE ...]', "
    "e.g. 'rcpt#2: 452 4.5.3 Too many recipients' (repeatable; docs/faults.md).",
)
faults_file = click.option(
    "--faults",
    "faults_file",
    type=_file(),
    callback=_fault_file,
    metavar="FILE",
    help='TOML file of rules, one [[fault]] table each with rule = "..."; re-read on SIGHUP.',
)


def listen(port: int, help: str) -> Decorator:
    """``--listen HOST:PORT`` (``record``, ``sink``), 127.0.0.1:``port`` by default."""
    return click.option(
        "--listen",
        default=f"127.0.0.1:{port}",
        show_default=True,
        metavar="HOST:PORT",
        callback=_hostport(port),
        help=help,
    )


def seconds(name: str, default: float, help: str) -> Decorator:
    """A timeout in seconds, zero (no limit) or more (``record``, ``replay``)."""
    return click.option(
        name, type=float, default=default, show_default=True, callback=_positive, help=help
    )


def show_body(help: str) -> Decorator:
    """``--show-body`` (``record``, ``show``)."""
    return click.option("--show-body", is_flag=True, help=help)


def json(help: str) -> Decorator:
    """``--json``, passed as ``as_json`` (``show``, ``diff``)."""
    return click.option("--json", "as_json", is_flag=True, help=help)


#: ``--strict`` (``replay``, ``diff``)
strict = click.option(
    "--strict",
    is_flag=True,
    help="Compare reply texts too (after masking hosts, ids, dates, numbers).",
)
#: ``--color/--no-color`` (``record``, ``show``)
color = click.option(
    "--color/--no-color",
    default=None,
    help="Color the transcript (default: when writing to a terminal).",
)
#: recording files, or folders of them (``show``, ``export``)
recordings = click.argument(
    "paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path)
)


def recording(name: str, metavar: str | None = None) -> Decorator:
    """One recording file (``replay``, ``diff``)."""
    return click.argument(name, metavar=metavar, type=_file())


# -- record --------------------------------------------------------------------

upstream = click.option(
    "--upstream",
    default=None,
    metavar="HOST:PORT",
    callback=_hostport(25),
    help="The real SMTP server HOST:PORT. Default: an embedded server that accepts everything.",
)
recordings_folder = click.option(
    "--recordings",
    type=click.Path(path_type=Path),
    default=Path("recordings"),
    show_default=True,
    help="Folder for the session recordings (created mode 0700).",
)
quiet = click.option("--quiet", "-q", is_flag=True, help="Print only one summary line per session.")
idle_timeout = seconds(
    "--idle-timeout", 300.0, "Close a session after this many seconds without traffic (0: never)."
)
connect_timeout = seconds(
    "--connect-timeout", 10.0, "Give up dialing the upstream after this many seconds."
)
handshake_timeout = seconds(
    "--handshake-timeout",
    30.0,
    "Give up a TLS handshake after this many seconds (0: no limit); "
    "a lower --idle-timeout wins for the client's.",
)
line_timeout = seconds(
    "--line-timeout",
    300.0,
    "Close a session (421 4.4.2) whose client takes longer than this to send one "
    "command line, from its first byte (0: never).",
)
message_timeout = seconds(
    "--message-timeout",
    3600.0,
    "Close a session (421 4.4.2) whose client takes longer than this to send one "
    "message, from its first byte; the upstream never gets a half message (0: never).",
)
max_sessions = click.option(
    "--max-sessions",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Refuse clients beyond this many at once (421 4.3.2).",
)
listen_tls = click.option(
    "--listen-tls",
    is_flag=True,
    help="Clients speak TLS from the first byte (SMTPS, port 465 style).",
)
upstream_tls = click.option(
    "--upstream-tls",
    type=click.Choice(["mirror", "starttls", "implicit", "plain"]),
    default="mirror",
    show_default=True,
    help="mirror: TLS upstream exactly when the client uses it; starttls: always upgrade the "
    "upstream after the client's first EHLO; implicit: TLS from the first byte; plain: never "
    "(the proxy answers the client's STARTTLS itself).",
)
cert = click.option(
    "--cert",
    type=_file(),
    help="Certificate (PEM, chain) to show clients instead of one minted by the local CA.",
)
key = click.option("--key", type=_file(), help="Private key for --cert (default: --cert holds it).")
upstream_ca = click.option(
    "--upstream-ca",
    type=_file(),
    help="Also trust this CA (PEM) when verifying the upstream's certificate.",
)
upstream_insecure = click.option(
    "--upstream-insecure", is_flag=True, help="Do not verify the upstream's certificate."
)
strip_starttls = click.option(
    "--strip-starttls",
    is_flag=True,
    help="Remove STARTTLS from the EHLO reply the client sees "
    "(test whether it then sends secrets in clear).",
)
keylog = click.option(
    "--keylog",
    type=_file(exists=False),
    default=None,
    help="Append both legs' TLS secrets to this file (NSS key log format, for Wireshark). "
    "Default: $SSLKEYLOGFILE if set.",
)
redact = click.option(
    "--redact",
    is_flag=True,
    help="Keep passwords, tokens and CRAM-MD5 digests out of recordings and the transcript "
    "(user names stay).",
)
workers = click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=None,
    help="Relay processes sharing the --listen address (Linux); each session stays in one. "
    "Default: one per core, at most 8; 1 with the embedded upstream.",
)


def _web_address(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """``[HOST:]PORT``: a port alone is on 127.0.0.1 (the pages show credentials)."""
    if value is None:
        return None
    text = value.strip()
    try:
        if text.isascii() and text.isdigit():
            return parse_hostport(f"127.0.0.1:{text}")
        return parse_hostport(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


web = click.option(
    "--web",
    metavar="[HOST:]PORT",
    default=None,
    callback=_web_address,
    help="Also serve the web view of the recordings on [HOST:]PORT (127.0.0.1 unless a host "
    "is given), sessions listed as they happen; runs one process (no --workers N).",
)

# -- sink, ca ------------------------------------------------------------------

hostname = click.option("--hostname", default=None, help="Name in the greeting and EHLO reply.")
max_size = click.option(
    "--max-size",
    type=click.IntRange(min=1),
    default=52_428_800,
    show_default=True,
    help="SIZE advertised and enforced (552 above it).",
)
regenerate = click.option(
    "--regenerate", is_flag=True, help="Make a new CA, replacing the old one."
)

# -- show ----------------------------------------------------------------------

raw = click.option(
    "--raw",
    "raw",
    is_flag=True,
    help="Write the exact bytes one side sent (with --side); "
    "to a terminal, with control characters made visible.",
)
side = click.option(
    "--side", type=click.Choice(["client", "server"]), help="Which side's bytes --raw writes."
)

# -- replay --------------------------------------------------------------------

targets = click.option(
    "--to",
    "targets",
    multiple=True,
    required=True,
    metavar="HOST:PORT",
    callback=_hostports,
    help="Target server HOST:PORT; repeat to replay against several at once.",
)
replay_tls = click.option(
    "--tls",
    type=click.Choice(["auto", "implicit"]),
    default="auto",
    show_default=True,
    help="auto: STARTTLS where the recording did; implicit: TLS from the first byte (SMTPS).",
)
cafile = click.option(
    "--ca", "cafile", type=_file(), help="Trust this CA (PEM) for the target's certificate."
)
insecure = click.option("--insecure", is_flag=True, help="Do not verify the target's certificate.")
user = click.option("--user", help="Authenticate as this user instead of the recorded one.")
password = click.option(
    "--password",
    envvar="SMTPPROXY_PASSWORD",
    help="Password for new credentials (CRAM-MD5 needs it). Env: SMTPPROXY_PASSWORD.",
)
reply_timeout = seconds("--timeout", 30.0, "Seconds to wait for each reply.")
save = click.option(
    "--save",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write the replay's own session as a recording in this folder.",
)

# -- export --------------------------------------------------------------------

eml = click.option(
    "--eml",
    "folder",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder for the .eml files and their envelope .json files.",
)
force = click.option(
    "--force", is_flag=True, help="Replace files of the same name already in the folder."
)
