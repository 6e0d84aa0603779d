"""What ``show`` prints of recordings besides the folder listing
(summary.listing): one recording as its transcript with a closing line, and
one side's raw bytes made safe for a terminal. Everything a peer or a file
said goes out with its control characters made visible (render.visible).
"""

from __future__ import annotations

import os
import re
import sys

import click

from .recording import Recording
from .render import Transcript, visible
from .summary import SessionSummary

__all__ = ["show_recording", "terminal_text", "transcript"]


def transcript(color: bool | None, quiet: bool = False, show_body: bool = False) -> Transcript:
    """The console transcript on stdout; ``color`` None: color when stdout is
    a terminal and ``NO_COLOR`` is not set (https://no-color.org)."""
    if color is None:
        color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    return Transcript(sys.stdout, color=color, quiet=quiet, show_body=show_body)


def show_recording(rec: Recording, out: Transcript) -> None:
    """``smtpproxy show FILE``: the session's header, its events as the live
    transcript showed them, and how it ended with its totals."""
    header = rec.header
    click.echo(
        visible(
            f"session {header.session} started {header.start}: client {header.client}, "
            f"upstream {header.upstream}"
        )
    )
    for entry in rec.entries:
        out.events(header.session, [entry.event])
    summary = SessionSummary()
    summary.update(rec.events())
    if rec.close is not None:
        ended = f"closed by {rec.close.by} ({rec.close.reason}) after {rec.close.t:.2f}s"
    else:
        ended = "no close line: the proxy was stopped mid-session"
    if rec.truncated:
        ended += "; the last line was cut short"
    out.summary(header.session, f"{ended}: {summary.describe()}")


def terminal_text(data: bytes) -> bytes:
    """``show --raw`` to a terminal: ``data`` as UTF-8 text lines (bytes that
    are not as escapes), each with its control characters made visible and
    ended by a newline."""
    text = data.decode("utf-8", errors="backslashreplace")
    lines = re.split(r"\r?\n", text)
    if lines and not lines[-1]:
        lines.pop()
    return "".join(visible(line) + "\n" for line in lines).encode()
