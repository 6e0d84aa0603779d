"""The sessions index: one SQLite row per recording, for the web view's list.

A cache beside the recordings (``.smtpproxy-index.sqlite`` in the folder,
0600): deleting it loses nothing, ``smtpproxy index DIR`` rebuilds it from
the files, and ``record --web`` adds a recording when it opens and again
when it closes. The row's values come from the recording through
``session.Session`` and ``summary.SessionSummary``, which own their meaning;
the index only stores them. Paths are stored relative to the folder and only
ever come from listing it: an id or a filter from a URL is a value in a
query, never a path.

Built for 100,000 rows (docs/performance.md, "Web view"): every column the
list sorts by has an index on (column, id), so a sorted page is read from
the index and stops after its rows; free text is one ``LIKE`` over one
column that holds every text column (``search``), not one per column.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..events import Note, NoteKind
from ..recording import Recording, RecordingError, iter_recordings, read_recording
from ..session import Session
from ..summary import SessionSummary

__all__ = [
    "COLUMNS",
    "Built",
    "FilterError",
    "Index",
    "Page",
    "Stored",
    "build",
    "read_row",
    "row_of",
    "search_text",
]

INDEX_NAME = ".smtpproxy-index.sqlite"
SCHEMA_VERSION = 3

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
#: stored beside the list's columns: the fault notes' text (the ``faults``
#: filter matches it when not given a number) and the free-text haystack
EXTRA = ("fault_text", "search")
#: a filtered page sorts its matches itself when at most this many (or a
#: twentieth of the rows) match, else walks the sort column's index
FEW = 1000
#: recordings ``update`` stores in one transaction
BATCH = 200
#: what a session still being recorded shows as "how it ended"
CUT_SHORT = "cut short"

_COMPARE = re.compile(r"\s*(>=|<=|!=|>|<|=)?\s*(.*?)\s*", re.S)
_AUTH_OK = {"ok": 1, "yes": 1, "1": 1, "failed": 0, "no": 0, "0": 0}


class FilterError(ValueError):
    """A filter from the URL that means nothing for its column: the message
    is one line naming the column and what it takes."""


def row_of(rec: Recording) -> dict[str, Any]:
    """A recording's row: what the list shows of it (and ``EXTRA``)."""
    summary = SessionSummary()
    summary.update(rec.events())
    session = Session(rec)
    helo = next((c.arg.strip() for c in session.commands if c.verb in ("EHLO", "HELO")), "")
    tls = session.tls
    faults = [ev.text for ev in rec.events() if isinstance(ev, Note) and ev.kind == NoteKind.FAULT]
    duration = rec.close.t if rec.close else (rec.entries[-1].t if rec.entries else 0.0)
    row: dict[str, Any] = {
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
        "faults": len(faults),
        "duration": round(duration, 3),
        "closed_by": rec.close.by if rec.close else "",
        "reason": rec.close.reason if rec.close else CUT_SHORT,
        "fault_text": "\n".join(faults),
    }
    row["search"] = search_text(row)
    return row


def search_text(row: dict[str, Any]) -> str:
    """What free text is looked for in: every text column and the fault notes."""
    return "\n".join(str(row[n]) for n in (*sorted(TEXT_COLUMNS), "fault_text"))


@dataclass(frozen=True)
class Stored:
    """A recording read for the index: its file's name, mtime and size, and
    its row (None when it cannot be read; ``problem`` says why)."""

    file: str
    mtime: float
    size: int
    row: dict[str, Any] | None
    problem: str = ""


def read_row(path: Path) -> Stored:
    """Read one recording for the index. Touches no database, so it can run
    in a worker thread while the index serves pages."""
    try:
        stat = path.stat()
        rec = read_recording(path)
    except (OSError, RecordingError) as exc:
        return Stored(path.name, 0.0, 0, None, str(exc))
    return Stored(path.name, stat.st_mtime, stat.st_size, row_of(rec))


@dataclass(frozen=True)
class Page:
    """One page of the list: its rows, the total that matched, where it starts."""

    rows: list[dict[str, Any]]
    total: int
    offset: int
    limit: int


class Index:
    """The index of one recordings folder. Its methods may be called from
    several threads (the web view reads pages in a worker thread): one lock
    keeps them one at a time on the one connection."""

    def __init__(self, folder: Path, path: Path | None = None) -> None:
        self.folder = folder
        self.path = path or folder / INDEX_NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.close(fd)
        self.db = sqlite3.connect(self.path, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self._lock = threading.Lock()
        self._closed = False
        #: the unreadable recordings met by the last ``update``: (file, why)
        self.problems: list[tuple[str, str]] = []
        self._schema()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self.db.close()

    def _schema(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:  # a cache: an old layout is dropped and rebuilt
            self.db.execute("DROP TABLE IF EXISTS sessions")
        cols = ", ".join(f"{name} {kind}" for name, kind, _ in COLUMNS if name != "id")
        extra = ", ".join(f"{name} TEXT" for name in EXTRA)
        self.db.execute(
            # keyed by file: two copies of one recording (one session id) are two rows
            f"CREATE TABLE IF NOT EXISTS sessions (file TEXT PRIMARY KEY, id TEXT, "
            f"mtime REAL, size INTEGER, {cols}, {extra})"
        )
        # one index per sortable column, with id (the order's tie-break):
        # a sorted page is then a walk of the index that stops at LIMIT
        for name in NAMES:
            if name != "id":
                self.db.execute(f"CREATE INDEX IF NOT EXISTS by_{name} ON sessions ({name}, id)")
        self.db.execute("CREATE INDEX IF NOT EXISTS by_id ON sessions (id)")
        # free text scans this narrow index, not the whole rows
        self.db.execute("CREATE INDEX IF NOT EXISTS by_search ON sessions (search)")
        self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        self.db.commit()

    def add(self, path: Path) -> bool:
        """Index one recording of the folder (again if it changed); False
        when it cannot be read (it is left out, the others go on)."""
        return self.put(read_row(path))

    def put(self, stored: Stored) -> bool:
        """Store a recording read by :func:`read_row`; False if it was unreadable."""
        return self.put_all([stored]) == 1

    def put_all(self, stored: Iterable[Stored]) -> int:
        """Store many in one transaction; how many were readable."""
        with self._lock:
            if self._closed:
                return 0
            count = sum(self._put(one) for one in stored)
            self.db.commit()
        return count

    def _put(self, stored: Stored) -> bool:
        if stored.row is None:
            return False
        before = self.db.execute(
            "SELECT mtime FROM sessions WHERE file = ?", (stored.file,)
        ).fetchone()
        if before is not None and before["mtime"] > stored.mtime:
            return True  # a later read of the file is in already (record --web)
        names = ["file", "mtime", "size", *NAMES, *EXTRA]
        self.db.execute(
            f"INSERT OR REPLACE INTO sessions ({', '.join(names)}) "
            f"VALUES ({', '.join('?' for _ in names)})",
            [
                stored.file,
                stored.mtime,
                stored.size,
                *(stored.row[n] for n in (*NAMES, *EXTRA)),
            ],
        )
        return True

    def update(self) -> tuple[int, int]:
        """Bring the index up to date with the folder: new or changed files
        added, gone ones dropped. Returns (indexed, unreadable); the
        unreadable ones are in ``problems``. Files are read outside the lock
        and stored a batch at a time, so pages are served meanwhile (``record
        --web`` runs this in a thread beside the proxy); ``close`` stops it."""
        with self._lock:
            known = {
                r["file"]: (r["mtime"], r["size"])
                for r in self.db.execute("SELECT file, mtime, size FROM sessions")
            }
        files = iter_recordings([self.folder]) if self.folder.is_dir() else []
        present = {p.name for p in files}
        gone = [name for name in known if name not in present]
        with self._lock:
            self.db.executemany("DELETE FROM sessions WHERE file = ?", [(n,) for n in gone])
            self.db.commit()
        problems: list[tuple[str, str]] = []
        batch: list[Stored] = []
        indexed = 0
        for path in files:
            if self._closed:
                break
            with contextlib.suppress(OSError):
                st = path.stat()
                if known.get(path.name) == (st.st_mtime, st.st_size):
                    continue
            stored = read_row(path)
            if stored.row is None:
                problems.append((path.name, stored.problem))
                continue
            batch.append(stored)
            if len(batch) == BATCH:
                indexed += self.put_all(batch)
                batch = []
        indexed += self.put_all(batch)
        self.problems = problems
        return indexed, len(problems)

    def count(self) -> int:
        """How many sessions the index holds."""
        with self._lock:
            return self._rows()

    def file_of(self, session_id: str) -> Path | None:
        """The recording of a session id, from the index (never built from the
        id); of copies that share it, the first by name."""
        with self._lock:
            row = self.db.execute(
                "SELECT file FROM sessions WHERE id = ? ORDER BY file LIMIT 1", (session_id,)
            ).fetchone()
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
        """A page of rows: ``filters`` by column (see :func:`condition`),
        ``text`` anywhere in the text columns and the fault notes (a
        substring, case-insensitively for ASCII), sorted by a known column
        (else by start). Raises :class:`FilterError` for a filter that means
        nothing for its column."""
        where: list[str] = []
        args: list[Any] = []
        for name, value in (filters or {}).items():
            if name in NAMES and value.strip() != "":
                sql, values = condition(name, value)
                where.append(sql)
                args += values
        if text:
            where.append("search LIKE ? ESCAPE '\\'")
            args.append(f"%{_like(text)}%")
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        column = sort if sort in NAMES else "start"
        order = "DESC" if descending else "ASC"
        limit = max(1, min(limit, 500))
        offset = max(0, offset)
        with self._lock:
            total = self.db.execute(f"SELECT COUNT(*) FROM sessions {clause}", args).fetchone()[0]
            if where and total <= max(FEW, self._rows() // 20):
                # few match: find them (a scan of the filter's column index),
                # then sort just those; walking the sort column's index would
                # look up every row to test the filter
                source = f"sessions WHERE rowid IN (SELECT rowid FROM sessions {clause})"
                by = f"+{column}"
            else:  # many or all match: the sort column's index, stopped at LIMIT
                source, by = f"sessions {clause}", column
            rows = self.db.execute(
                f"SELECT {', '.join(NAMES)}, fault_text FROM {source} "
                f"ORDER BY {by} {order}, id {order} LIMIT ? OFFSET ?",
                [*args, limit, offset],
            ).fetchall()
        return Page([dict(r) for r in rows], total, offset, limit)

    def _rows(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM sessions").fetchone()[0])


def condition(name: str, value: str) -> tuple[str, list[Any]]:
    """The SQL condition of one column's filter (``name`` is one of
    ``NAMES``, never a value from a URL). Text columns: a substring,
    ``=TEXT`` exactly (``=`` alone: empty), ``>TEXT``, ``<=TEXT``...
    compared as text (dates: ``start >2026-11-30T16``). Number columns:
    ``N``, ``>N``, ``<=N``, ``!=N``; ``faults`` given words matches the
    fault notes' text; ``auth_ok``: ``ok``, ``failed`` or ``none``."""
    match = _COMPARE.fullmatch(value)
    assert match is not None  # the pattern matches any text
    op, operand = match.group(1), match.group(2)
    if name == "auth_ok":
        word = operand.lower()
        if word in ("none", "-"):
            return ("auth_ok IS NULL" if op != "!=" else "auth_ok IS NOT NULL"), []
        if word not in _AUTH_OK or op not in (None, "=", "!="):
            raise FilterError(f"filter {name}: write ok, failed or none")
        return f"auth_ok {op or '='} ?", [_AUTH_OK[word]]
    if name in TEXT_COLUMNS:
        if op is None:
            return f"{name} LIKE ? ESCAPE '\\'", [f"%{_like(operand)}%"]
        return f"{name} {op} ?", [operand]
    try:
        number = float(operand)
    except ValueError:
        if name == "faults" and op is None:
            return "fault_text LIKE ? ESCAPE '\\'", [f"%{_like(operand)}%"]
        raise FilterError(
            f"filter {name}: write a number, or >N, <N, >=N, <=N, !=N"
            + (", or words from the fault notes" if name == "faults" else "")
        ) from None
    return f"{name} {op or '='} ?", [number]


def _like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


@dataclass(frozen=True)
class Built:
    """What ``smtpproxy index DIR`` did: recordings (re)read into the
    index, the unreadable ones (file, why), the sessions it now holds."""

    indexed: int
    problems: list[tuple[str, str]]
    total: int


def build(folder: Path) -> Built:
    """``smtpproxy index DIR``: bring the folder's index up to date (made
    if missing)."""
    index = Index(folder)
    try:
        indexed, _ = index.update()
        return Built(indexed, index.problems, index.count())
    finally:
        index.close()
