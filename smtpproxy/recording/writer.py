"""The writer: ``Recorder`` writes one session's recording as it happens,
through the codec, one ``write(2)`` per report."""

from __future__ import annotations

import datetime as _dt
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..events import Event, MessageEnd, Note, Side
from ..protocol import MessageHeads
from .codec import _CALLS, _dumps, _input_line, _message_end_line, encode_event, encode_line
from .model import _SESSION_ID, FORMAT, VERSION, Header


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (mode 0700) if needed; raise OSError if unusable."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write to {path}")


class Recorder:
    """Writes one session's recording as it happens.

    The caller reports the session's Conversation as it drives it: ``feed``
    for each chunk of bytes it gave it, ``call`` for its ``tls_established``
    and ``implicit_tls``, and ``write`` for events made outside it (notes,
    TLS handshakes). By default (``derive``) the file holds the input, and
    the reader derives the events from it again; with ``derive=False`` (what
    ``--redact`` needs, since it rewrites events) the file holds every event
    as it is.

    Each report is one ``write(2)`` of whole lines, with no buffering in
    between, so a proxy killed at any moment leaves every completed read on
    disk. A failing disk never raises into the relay: the first error is
    kept in ``error`` and later writes are dropped and counted.
    """

    def __init__(self, path: Path, header: Header, clock_start: float, derive: bool = True) -> None:
        self.path = path
        self.error: OSError | None = None
        self.dropped = 0
        self.derive = derive
        self._start = clock_start
        self._heads = MessageHeads()
        self._fd: int | None = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600
        )
        head = {
            "format": FORMAT,
            "version": VERSION,
            "session": header.session,
            "start": header.start,
            "client": header.client,
            "listen": header.listen,
            "upstream": header.upstream,
            **dict(header.extra),
        }
        self._write_text(_dumps(head) + "\n")

    @classmethod
    def create(
        cls,
        folder: Path,
        session: str,
        now: _dt.datetime,
        clock_start: float,
        derive: bool = True,
        **header: Any,
    ) -> Recorder:
        """A new recording in ``folder``, named so a listing sorts by start time.
        ``session`` is a session id (``new_session_id``), the only form a
        reader accepts."""
        if not _SESSION_ID.fullmatch(session):
            raise ValueError(f"not a session id: {session!r}")
        stamp = now.strftime("%Y%m%dT%H%M%S") + f"{now.microsecond // 1000:03d}Z"
        path = folder / f"{stamp}-{session}.jsonl"
        iso = now.isoformat(timespec="milliseconds").replace("+00:00", "Z")
        extra = {k: v for k, v in header.items() if k not in ("client", "listen", "upstream")}
        return cls(
            path,
            Header(
                session=session,
                start=iso,
                client=str(header.get("client", "")),
                listen=str(header.get("listen", "")),
                upstream=str(header.get("upstream", "")),
                extra=extra,
            ),
            clock_start,
            derive,
        )

    def _write_text(self, text: str) -> None:
        self._write(text.encode("utf-8"))

    def _write(self, data: bytes) -> None:
        if self._fd is None:
            self.dropped += 1
            return
        try:
            while data:
                n = os.write(self._fd, data)
                data = data[n:]
        except OSError as exc:
            self.error = exc
            self.dropped += 1
            self._abandon()

    def _abandon(self) -> None:
        if self._fd is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass
            self._fd = None

    def report(
        self,
        now: float,
        events: Sequence[Event],
        fed: tuple[Side, bytes | bytearray] | None = None,
        call: str | None = None,
        note: Note | None = None,
    ) -> None:
        """One report of a session's observer: ``fed`` (side, bytes) for
        :meth:`feed`, ``call`` for :meth:`call`, neither for :meth:`write`."""
        if fed is not None:
            self.feed(now, fed[0], fed[1], events, note)
        elif call is not None:
            self.call(now, call, events)
        elif events:
            self.write(now, events)

    def feed(
        self,
        now: float,
        side: Side,
        data: bytes | bytearray,
        events: Sequence[Event],
        note: Note | None = None,
    ) -> None:
        """The Conversation read ``data`` from ``side`` at clock time ``now``;
        ``events`` is what the session reports for it. ``note``: the bytes
        were the proxy's own, not the peer's (an answer it made itself), and
        ``events`` has the note in place of the events made of them; the
        reader feeds the note's ``raw`` and does the same."""
        if not self.derive:
            self.write(now, events)
        elif note is not None:
            line = _dumps({**encode_event(now - self._start, note), "fed": True}) + "\n"
            self._write(line.encode("utf-8"))
        elif data:
            self._write(_input_line(now - self._start, side, data))

    def call(self, now: float, name: str, events: Sequence[Event]) -> None:
        """The Conversation's ``tls_established()`` or ``implicit_tls()``
        (``name``) was called and gave ``events``. Its ``close()`` needs no
        report: the close line stands for it."""
        if name == "close":
            if not self.derive:
                self.write(now, events)
            return
        if name not in _CALLS:
            raise ValueError(f"not a Conversation call a recording knows: {name!r}")
        if self.derive:
            self._write(f'[{round(now - self._start, 6)!r},"{name}"]\n'.encode())
        else:
            self.write(now, events)

    def write(self, now: float, events: Sequence[Event]) -> None:
        """Append events seen at clock time ``now`` that the reader cannot
        derive (with ``derive``: only events made outside the Conversation)."""
        t = now - self._start
        heads = self._heads
        lines = []
        for ev in events:
            if type(ev) is MessageEnd:
                lines.append(_message_end_line(t, ev, heads.derived()))
            else:
                lines.append(encode_line(t, ev))
            heads.see(ev)
        if lines:
            self._write(lines[0] if len(lines) == 1 else b"".join(lines))

    def close(
        self, now: float, by: str, reason: str, extra: Mapping[str, Any] | None = None
    ) -> None:
        """Write the close line and close the file. The session's totals are
        not written (the reader counts them from the events); ``extra`` is
        what else belongs with them."""
        rec: dict[str, Any] = {
            "t": round(now - self._start, 6),
            "type": "close",
            "by": by,
            "reason": reason,
        }
        if extra:
            rec["totals"] = dict(extra)
        self._write_text(_dumps(rec) + "\n")
        self._abandon()

    @property
    def failed(self) -> bool:
        return self.error is not None
