"""What ``show`` prints of recordings besides the folder listing
(summary.listing): one recording as its transcript with a closing line, and
one side's raw bytes made safe for a terminal; and what ``replay`` prints of
its results (one target's transcript, several targets side by side). Everything a peer or a file
said goes out with its control characters made visible (render.visible).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

import click

from .events import Reply
from .protocol import Exchange, StepKind
from .recording import Recording
from .render import Transcript, visible
from .summary import SessionSummary

if TYPE_CHECKING:
    from .replay import ReplayResult, Step

__all__ = ["format_result", "format_table", "show_recording", "terminal_text", "transcript"]


def transcript(color: bool | None, quiet: bool = False, show_body: bool = False) -> Transcript:
    """The console transcript on stdout; ``color`` None: color when stdout is
    a terminal and ``NO_COLOR`` is not set (https://no-color.org)."""
    if color is None:
        color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    return Transcript(sys.stdout, color=color, quiet=quiet, show_body=show_body)


def show_recording(
    rec: Recording, out: Transcript, echo: Callable[[str], object] = click.echo
) -> None:
    """``smtpproxy show FILE``: the session's header, its events as the live
    transcript showed them, and how it ended with its totals (``echo``
    prints the header line; the API's ``Session.transcript()`` collects it)."""
    header = rec.header
    echo(
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


# -- output -------------------------------------------------------------------


def _reply_text(reply: Reply | None) -> str:
    if reply is None:
        return "(none)"
    return reply.raw.decode("utf-8", "backslashreplace").rstrip("\r\n").replace("\r\n", " | ")


def format_result(result: ReplayResult) -> list[str]:
    """The replay's transcript with each difference marked."""
    lines = [f"replay against {result.target}"]
    if result.error and not result.steps:
        return lines + [f"!! {result.error}"]
    for step in result.steps:
        ex = step.exchange
        if ex.verb == "<stop>":
            lines.append(f"!! stopped: {step.reasons[0]}")
            continue
        if ex.kind != StepKind.GREETING:
            label = ex.label
            if step.shown is not None:
                label = step.shown
            elif step.payload is not None:
                label = (
                    step.payload.decode("utf-8", "backslashreplace").rstrip("\r\n")
                    + "   (new credentials)"
                )
            lines.append(f"-> {label}" if step.sent else f"   (not sent) {label}")
        if step.sent or step.reply is not None:
            lines.append(f"<- {_reply_text(step.reply)}")
        if step.note:
            lines.append(f"== {step.note}")
        if step.differs:
            lines.append(
                f"!! differs: {'; '.join(step.reasons)} (recorded: {_reply_text(ex.reply)})"
            )
    compared = sum(1 for s in result.steps if s.exchange.verb != "<stop>")
    lines.append(f"{compared} exchanges, {result.differences} differ")
    return lines


def format_table(results: list[ReplayResult], recorded: list[Exchange]) -> list[str]:
    """One row per recorded exchange: the recorded reply, then each target's
    (``*`` marks a difference). Steps a replay added (an empty message, a
    cancelled challenge) are noted below the table, not given rows."""

    def cell(step: Step | None, stopped: bool) -> str:
        if step is None:
            return " (stopped)" if stopped else " -"
        if not step.sent:
            text = "not sent"
        elif step.reply is None:
            text = "-"
        else:
            text = f"{step.reply.code} {step.reply.enhanced or ''}".strip()
        return ("*" if step.differs else " ") + text

    headers = ["exchange", "recorded"] + [r.target for r in results]
    by_index = [{s.index: s for s in r.steps if s.index is not None} for r in results]
    stops = [next((s for s in r.steps if s.exchange.verb == "<stop>"), None) for r in results]
    rows: list[list[str]] = []
    for k, ex in enumerate(recorded):
        if ex.kind == StepKind.UNSOLICITED:
            continue
        recorded_cell = " " + (
            f"{ex.reply.code} {ex.reply.enhanced or ''}".strip() if ex.reply else "-"
        )
        row = [ex.label[:40], recorded_cell]
        for r, steps, stop in zip(results, by_index, stops):
            row.append(cell(steps.get(k), stop is not None or r.error is not None))
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    for r, stop in zip(results, stops):
        for s in r.steps:
            if s.index is None and s.exchange.verb != "<stop>":
                out.append(f"== {r.target}: {s.note or s.exchange.label}: {_reply_text(s.reply)}")
        if r.error:
            out.append(f"!! {r.target}: {r.error}")
        elif stop is not None:
            out.append(f"!! {r.target}: stopped: {stop.reasons[0]}")
        out.append(
            f"{r.target}: {sum(1 for s in r.steps if s.exchange.verb != '<stop>')} exchanges, {r.differences} differ"
        )
    return out
