"""What a recording is made of, shared by the writer and the reader: the
format's name and version, the header, the entries, the close line, the
session id's form, and the error a reader raises."""

from __future__ import annotations

import dataclasses
import re
import secrets
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..events import Event, Note, Side

FORMAT = "smtpproxy-recording"
VERSION = 2

#: A session id as the proxy makes it (``new_session_id``): the only form the
#: reader accepts, since names of exported files are built from it.
_SESSION_ID = re.compile(r"[0-9a-f]{8,32}")


class RecordingError(Exception):
    """A recording that cannot be read; the message names the file and line."""


def new_session_id() -> str:
    """A short random id: never derived from anything a client sent."""
    return secrets.token_hex(4)


@dataclass(frozen=True)
class Header:
    session: str
    start: str
    client: str
    listen: str
    upstream: str
    version: int = VERSION
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Close:
    t: float
    by: str
    reason: str
    #: the session's totals (``SessionSummary.totals()`` of its events), and
    #: what else the writer put on the close line (replay: ``differences``)
    totals: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Entry:
    """One recorded event and when it happened (seconds from the start)."""

    t: float
    event: Event


@dataclass
class Recording:
    path: Path
    header: Header
    entries: list[Entry]
    close: Close | None
    truncated: bool = False

    def raw(self, side: Side) -> bytes:
        """The bytes ``side`` sent, rebuilt from the events, in order. Notes
        hold bytes the proxy sent itself, not the peer's; redacted lines (see
        ``--redact``) are left out."""
        return b"".join(
            e.event.raw
            for e in self.entries
            if e.event.side is side
            and not isinstance(e.event, Note)
            and "redacted" not in getattr(e.event, "flags", ())
        )

    def events(self) -> Iterator[Event]:
        return (e.event for e in self.entries)


def note_in_place(note: Note, events: Sequence[Event]) -> list[Event]:
    """``note`` in place of the events the Conversation made of its bytes
    (the proxy's own, read as ``note.side``'s): the note first, then the
    events not made of them (a TLS start, anomalies). The relay reports a
    proxy-made reply this way and the reader derives the same from a fed note."""
    return [
        dataclasses.replace(note, fed=True),
        *(e for e in events if not (e.raw and e.side is note.side)),
    ]
