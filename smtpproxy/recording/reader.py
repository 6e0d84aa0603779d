"""The reader: ``read_recording``, the one code that reads a recording.

It refuses what is not a recording's (not a regular file, a line longer
than any the writer writes, JSON nested too deep, lone surrogates, a
damaged header) with one line naming the file and line; it takes an older
file's lines up to the current version through ``migrate``; it feeds input
lines to a Conversation again to derive their events.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

from ..events import Note
from ..protocol import Conversation, MessageHeads
from ..summary import SessionSummary
from .codec import _INPUT_SIDES, decode_event
from .migrate import MIGRATIONS, Migration, migration
from .model import (
    _SESSION_ID,
    FORMAT,
    VERSION,
    Close,
    Entry,
    Header,
    Recording,
    RecordingError,
    note_in_place,
)


class _Inputs:
    """The reader's Conversation: input lines are fed to it again, and the
    events it gives take their place, at their time."""

    def __init__(self) -> None:
        self.conv = Conversation()

    def line(self, item: list[Any]) -> list[Entry]:
        """The events of one input line; raises ValueError/TypeError."""
        if not 2 <= len(item) <= 3 or not isinstance(item[1], str):
            raise ValueError("an input line is [t, kind] or [t, kind, bytes]")
        t = item[0]
        if not isinstance(t, (int, float)) or isinstance(t, bool):
            raise TypeError("t must be a number")
        kind = item[1]
        if kind in _INPUT_SIDES:
            if len(item) != 3 or not isinstance(item[2], str):
                raise ValueError(f"a {kind!r} input line carries its bytes as a string")
            data = (
                base64.b64decode(item[2], validate=True)
                if kind.endswith("64")
                else item[2].encode("utf-8")
            )
            events = self.conv.feed(_INPUT_SIDES[kind], data)
        elif kind == "tls_established" and len(item) == 2:
            events = self.conv.tls_established()
        elif kind == "implicit_tls" and len(item) == 2:
            self.conv.implicit_tls()
            events = []
        else:
            raise ValueError(f"unknown input line {kind!r}")
        return [Entry(float(t), ev) for ev in events]

    def fed_note(self, entry: Entry) -> list[Entry]:
        """A note whose bytes the Conversation read as its side's (the proxy
        answered for the server): the note stands for the events made of
        them; the others (a TLS start, anomalies) come out as usual."""
        note = entry.event
        assert isinstance(note, Note)
        return [Entry(entry.t, e) for e in note_in_place(note, self.conv.feed(note.side, note.raw))]

    def close(self, t: float) -> list[Entry]:
        return [Entry(t, ev) for ev in self.conv.close()]


#: The longest line a reader accepts. The writer writes one read (at most
#: 64 KiB) or one event (at most the 1 MiB the observer holds, six times that
#: if every octet is escaped) per line, so a longer line is not a recording's.
MAX_RECORD_LINE = 16 * 1024 * 1024

#: A ``\uD800``-``\uDFFF`` escape: a line holding one may hold a lone
#: surrogate, which is no text (it cannot be printed or encoded).
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading if it is a regular file (or a symlink to
    one). Not a device (``/dev/zero`` reads for ever), a FIFO (opening one
    waits for a writer: ``O_NONBLOCK`` does not) or a folder."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise RecordingError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            what = (
                "a folder"
                if stat.S_ISDIR(mode)
                else "a FIFO"
                if stat.S_ISFIFO(mode)
                else "a device or socket"
            )
            raise RecordingError(f"{path}: is {what}, not a recording file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _lone_surrogate(obj: Any) -> str | None:
    """The first string in ``obj`` that holds a lone surrogate, if any."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return obj
        return None
    if isinstance(obj, dict):
        obj = [*obj.keys(), *obj.values()]
    if isinstance(obj, list):
        for item in obj:
            bad = _lone_surrogate(item)
            if bad is not None:
                return bad
    return None


def _parse_line(line: bytes) -> Any:
    """One line's JSON; ValueError for anything that is not a recording's
    (not JSON, nested too deep to read, a lone surrogate in a string)."""
    try:
        obj = json.loads(line)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if not isinstance(obj, (dict, list)):
        raise ValueError("not a JSON object or input line")
    if _SURROGATE_ESCAPE.search(line) and _lone_surrogate(obj) is not None:
        raise ValueError("a string holds a lone surrogate (\\ud800-\\udfff), which is not text")
    return obj


#: What a line that is not a recording's raises while it is read.
_DAMAGE = (KeyError, ValueError, TypeError, RecursionError)


def read_recording(path: Path) -> Recording:
    """Read a recording. A truncated last line (the proxy killed mid-write) is
    dropped and flagged; any other damage raises RecordingError naming the
    file and line. Only regular files are read, a line at most
    ``MAX_RECORD_LINE`` long."""
    header: Header | None = None
    entries: list[Entry] = []
    close: Close | None = None
    written_totals: dict[str, Any] = {}
    truncated = False
    heads = MessageHeads()
    inputs = _Inputs()
    upgrade: Migration | None = None
    with _open_regular(Path(path)) as f:
        lineno = 0
        while True:
            try:
                line = f.readline(MAX_RECORD_LINE + 1)
            except OSError as exc:
                raise RecordingError(f"{path}: cannot read: {exc.strerror or exc}") from None
            if not line:
                break
            lineno += 1
            if line.endswith(b"\n"):
                line = line[:-1]
                cut = False
            elif len(line) > MAX_RECORD_LINE:
                raise RecordingError(
                    f"{path}:{lineno}: a line longer than {MAX_RECORD_LINE // (1024 * 1024)} MiB "
                    "is not a recording's (the proxy writes one read per line)"
                )
            else:
                cut = True  # no newline: the last line, cut short
            if not line.strip():
                continue
            try:
                obj = _parse_line(line)
            except ValueError as exc:
                if cut:
                    truncated = True
                    if header is None:
                        raise RecordingError(f"{path}:1: the header line is cut short") from None
                    break
                raise RecordingError(f"{path}:{lineno}: not valid JSON ({exc})") from None
            if header is None:
                header = _read_header(path, obj)
                upgrade = migration(header.version)
                continue
            what = (
                "input line"
                if isinstance(obj, list)
                else "close line"
                if obj.get("type") == "close"
                else "event"
            )
            try:
                objs = (obj,) if upgrade is None else upgrade(obj)
            except _DAMAGE as exc:
                raise RecordingError(f"{path}:{lineno}: not a valid {what} ({exc})") from None
            for obj in objs:
                try:
                    if isinstance(obj, list):
                        new = inputs.line(obj)
                    elif obj.get("type") == "close":
                        totals = obj.get("totals", {})
                        if not isinstance(totals, dict):
                            raise TypeError("totals must be an object")
                        written_totals = totals
                        close = Close(
                            t=float(obj.get("t", 0.0)),
                            by=str(obj.get("by", "")),
                            reason=str(obj.get("reason", "")),
                        )
                        new = inputs.close(close.t)
                    else:
                        entry = decode_event(obj, heads.derived)
                        new = (
                            inputs.fed_note(entry)
                            if obj.get("fed") is True and type(entry.event) is Note
                            else [entry]
                        )
                except _DAMAGE as exc:
                    raise RecordingError(f"{path}:{lineno}: not a valid {what} ({exc})") from None
                for entry in new:
                    heads.see(entry.event)
                entries.extend(new)
    if header is None:
        raise RecordingError(f"{path}:1: empty file, not a recording")
    if close is not None:
        summary = SessionSummary()
        summary.update(e.event for e in entries)
        close = dataclasses.replace(close, totals={**summary.totals(), **written_totals})
    return Recording(Path(path), header, entries, close, truncated)


def _read_header(path: Path, obj: Mapping[str, Any] | list[Any]) -> Header:
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise RecordingError(f"{path}:1: not an smtpproxy recording (no format header)")
    version = obj.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise RecordingError(f"{path}:1: format version must be a whole number, not {version!r}")
    if version > VERSION or (version < VERSION and version not in MIGRATIONS):
        raise RecordingError(
            f"{path}:1: recording format version {version!r} is not supported "
            f"(this smtpproxy reads up to {VERSION}; upgrade smtpproxy)"
        )
    known = {"format", "version", "session", "start", "client", "listen", "upstream"}
    session = obj.get("session")
    if not isinstance(session, str) or not _SESSION_ID.fullmatch(session):
        shown = json.dumps(session)[:60]
        raise RecordingError(
            f"{path}:1: damaged header: session {shown} is not a session id (8 to 32 lowercase hex digits)"
        )
    return Header(
        session=session,
        start=str(obj.get("start", "")),
        client=str(obj.get("client", "")),
        listen=str(obj.get("listen", "")),
        upstream=str(obj.get("upstream", "")),
        version=version,
        extra={k: v for k, v in obj.items() if k not in known},
    )


def iter_recordings(paths: Iterable[Path]) -> list[Path]:
    """Expand folders into their ``*.jsonl`` files, sorted by name (start time)."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out.extend(sorted(p.glob("*.jsonl")))
        else:
            out.append(p)
    return out
