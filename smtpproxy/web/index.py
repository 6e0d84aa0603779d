"""The sessions index: one SQLite row per recording, for the web view's list.

A cache beside the recordings (``.smtpproxy-index.sqlite`` in the folder,
0600): deleting it loses nothing, ``smtpproxy index DIR`` rebuilds it from
the files, and the web view adds a recording when it closes. The row's
values come from the recording through ``session.Session`` and
``summary.SessionSummary``, which own their meaning; the index only stores
them. Paths are stored relative to the folder and only ever come from
listing it: an id or a filter from a URL is a value in a query, never a path.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..events import Note, NoteKind
from ..recording import Recording, RecordingError, iter_recordings, read_recording
from ..session import Session
from ..summary import SessionSummary

__all__ = ["COLUMNS", "Index", "Page", "row_of"]

INDEX_NAME = ".smtpproxy-index.sqlite"
SCHEMA_VERSION = 1

#: the list's columns, in order: (name, SQL type, heading)
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("start", "TEXT", "start"),
    ("id", "TEXT", "session"),
    ("client", "TEXT", "client"),
    ("upstream", "TEXT", "upstream"),
    ("helo", "TEXT", "EHLO"),
    ("auth_mechanism", "TEXT", "AUTH"),
    ("auth_user", "TEXT", "user"),
    ("auth_ok", "INTEGER", "AUTH ok"),
    ("tls_client", "TEXT", "TLS client"),
    ("tls_upstream", "TEXT", "TLS upstream"),
    ("accepted", "INTEGER", "accepted"),
    ("rejected", "INTEGER", "rejected"),
    ("faults", "INTEGER", "faults"),
    ("duration", "REAL", "seconds"),
    ("closed_by", "TEXT", "closed by"),
    ("reason", "TEXT", "how it ended"),
)
NAMES = tuple(c[0] for c in COLUMNS)
#: columns matched by a filter as text (``LIKE``), the others by value
TEXT_COLUMNS = frozenset(c[0] for c in COLUMNS if c[1] == "TEXT")


def row_of(rec: Recording) -> dict[str, Any]:
    """A recording's row: what the list shows of it."""
    summary = SessionSummary()
    summary.update(rec.events())
    session = Session(rec)
    helo = next((c.arg.strip() for c in session.commands if c.verb in ("EHLO", "HELO")), "")
    tls = session.tls
    faults = sum(1 for ev in rec.events() if isinstance(ev, Note) and ev.kind == NoteKind.FAULT)
    duration = rec.close.t if rec.close else (rec.entries[-1].t if rec.entries else 0.0)
    return {
        "start": rec.header.start,
        "id": rec.header.session,
        "client": rec.header.client,
        "upstream": rec.header.upstream,
        "helo": helo,
        "auth_mechanism": summary.auth_mechanism or "",
        "auth_user": summary.auth_user or "",
        "auth_ok": None if summary.auth_success is None else int(summary.auth_success),
        "tls_client": tls.client.version if tls and tls.client else "",
        "tls_upstream": tls.upstream.version if tls and tls.upstream else "",
        "accepted": summary.messages_accepted,
        "rejected": summary.messages_rejected,
        "faults": faults,
        "duration": round(duration, 3),
        "closed_by": rec.close.by if rec.close else "",
        "reason": rec.close.reason if rec.close else "cut short",
    }


@dataclass(frozen=True)
class Page:
    """One page of the list: its rows, the total that matched, where it starts."""

    rows: list[dict[str, Any]]
    total: int
    offset: int
    limit: int


class Index:
    """The index of one recordings folder."""

    def __init__(self, folder: Path, path: Path | None = None) -> None:
        self.folder = folder
        self.path = path or folder / INDEX_NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.close(fd)
        self.db = sqlite3.connect(self.path, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self._schema()

    def close(self) -> None:
        self.db.close()

    def _schema(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:  # a cache: an old layout is dropped and rebuilt
            self.db.execute("DROP TABLE IF EXISTS sessions")
        cols = ", ".join(f"{name} {kind}" for name, kind, _ in COLUMNS if name != "id")
        self.db.execute(
            f"CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, file TEXT UNIQUE, "
            f"mtime REAL, size INTEGER, {cols})"
        )
        for name in ("start", "client", "auth_user", "closed_by"):
            self.db.execute(f"CREATE INDEX IF NOT EXISTS by_{name} ON sessions ({name})")
        self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self.db.commit()

    def add(self, path: Path) -> bool:
        """Index one recording of the folder (again if it changed); False
        when it cannot be read (it is left out, the others go on)."""
        ok = self._store(path)
        self.db.commit()
        return ok

    def _store(self, path: Path) -> bool:
        try:
            stat = path.stat()
            rec = read_recording(path)
        except (OSError, RecordingError):
            return False
        row = row_of(rec)
        names = ["file", "mtime", "size", *NAMES]
        self.db.execute(
            f"INSERT OR REPLACE INTO sessions ({', '.join(names)}) "
            f"VALUES ({', '.join('?' for _ in names)})",
            [path.name, stat.st_mtime, stat.st_size, *(row[n] for n in NAMES)],
        )
        return True

    def update(self) -> tuple[int, int]:
        """Bring the index up to date with the folder: new or changed files
        added, gone ones dropped. Returns (indexed, unreadable)."""
        known = {
            r["file"]: (r["mtime"], r["size"])
            for r in self.db.execute("SELECT file, mtime, size FROM sessions")
        }
        files = iter_recordings([self.folder]) if self.folder.is_dir() else []
        present = {p.name for p in files}
        gone = [name for name in known if name not in present]
        self.db.executemany("DELETE FROM sessions WHERE file = ?", [(n,) for n in gone])
        indexed = unreadable = 0
        for path in files:
            with contextlib.suppress(OSError):
                st = path.stat()
                if known.get(path.name) == (st.st_mtime, st.st_size):
                    continue
            if self._store(path):
                indexed += 1
            else:
                unreadable += 1
        self.db.commit()
        return indexed, unreadable

    def file_of(self, session_id: str) -> Path | None:
        """The recording of a session id, from the index (never built from the id)."""
        row = self.db.execute("SELECT file FROM sessions WHERE id = ?", (session_id,)).fetchone()
        return self.folder / row["file"] if row is not None else None

    def page(
        self,
        *,
        filters: dict[str, str] | None = None,
        text: str = "",
        sort: str = "start",
        descending: bool = True,
        offset: int = 0,
        limit: int = 50,
    ) -> Page:
        """A page of rows: ``filters`` by column (text columns match a
        substring, case-insensitively; numbers exactly), ``text`` anywhere in
        the text columns, sorted by a known column (else by start)."""
        where: list[str] = []
        args: list[Any] = []
        for name, value in (filters or {}).items():
            if name not in NAMES or value == "":
                continue
            if name in TEXT_COLUMNS:
                where.append(f"{name} LIKE ? ESCAPE '\\'")
                args.append(f"%{_like(value)}%")
            else:
                where.append(f"{name} = ?")
                args.append(value)
        if text:
            where.append(
                "(" + " OR ".join(f"{n} LIKE ? ESCAPE '\\'" for n in sorted(TEXT_COLUMNS)) + ")"
            )
            args += [f"%{_like(text)}%"] * len(TEXT_COLUMNS)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        column = sort if sort in NAMES else "start"
        order = "DESC" if descending else "ASC"
        total = self.db.execute(f"SELECT COUNT(*) FROM sessions {clause}", args).fetchone()[0]
        rows = self.db.execute(
            f"SELECT {', '.join(NAMES)} FROM sessions {clause} "
            f"ORDER BY {column} {order}, id {order} LIMIT ? OFFSET ?",
            [*args, max(1, min(limit, 500)), max(0, offset)],
        ).fetchall()
        return Page([dict(r) for r in rows], total, offset, limit)


def _like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def build(folder: Path) -> tuple[int, int]:
    """``smtpproxy index DIR``: bring the folder's index up to date (made
    if missing); (indexed, unreadable)."""
    index = Index(folder)
    try:
        return index.update()
    finally:
        index.close()
