"""Per-session totals, accumulated from events: what a session summary line,
a recording's close line and a folder listing show."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .events import (
    Anomaly,
    AuthResult,
    Event,
    MessageEnd,
    Note,
    NoteKind,
    Reply,
    Side,
    TlsEstablished,
)
from .render import visible

if TYPE_CHECKING:
    from .recording import Recording

__all__ = ["LISTING_HEADERS", "SessionSummary", "listing", "session_row"]


@dataclass
class SessionSummary:
    bytes_from_client: int = 0
    bytes_from_server: int = 0
    messages_accepted: int = 0
    messages_rejected: int = 0
    messages_incomplete: int = 0
    auth_mechanism: str | None = None
    auth_user: str | None = None
    auth_success: bool | None = None
    #: the TLS version the client's leg ended up with (else the upstream's)
    tls: str | None = None
    #: the client's TLS handshake failed: the session had no TLS with it
    tls_failed: bool = False
    anomalies: int = 0

    def update(self, events: Iterable[Event]) -> None:
        for ev in events:
            kind = type(ev)
            if kind is Note:
                if ev.side is Side.CLIENT and ev.kind == NoteKind.TLS_ERROR:  # type: ignore[union-attr]
                    # an upstream leg shaken hands with first (STARTTLS) is not the client's TLS
                    self.tls, self.tls_failed = None, True
                continue  # bytes the proxy itself sent, not a peer's
            if ev.side is Side.CLIENT:
                self.bytes_from_client += len(ev.raw)
            else:
                self.bytes_from_server += len(ev.raw)
            if kind is Reply:
                if ev.ends_message:  # type: ignore[union-attr]
                    if 200 <= ev.code < 300:  # type: ignore[union-attr]
                        self.messages_accepted += 1
                    else:
                        self.messages_rejected += 1
            elif kind is MessageEnd:
                if not ev.complete:  # type: ignore[union-attr]
                    self.messages_incomplete += 1
            elif kind is AuthResult:
                assert isinstance(ev, AuthResult)
                self.auth_mechanism = ev.mechanism
                self.auth_user = ev.user
                self.auth_success = ev.success
            elif kind is TlsEstablished:
                assert isinstance(ev, TlsEstablished)
                if ev.side is Side.CLIENT:
                    self.tls = ev.version
                else:
                    self.tls = self.tls or ev.version
            elif kind is Anomaly:
                self.anomalies += 1

    def totals(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "bytes_from_client": self.bytes_from_client,
            "bytes_from_server": self.bytes_from_server,
            "messages_accepted": self.messages_accepted,
            "messages_rejected": self.messages_rejected,
        }
        if self.messages_incomplete:
            out["messages_incomplete"] = self.messages_incomplete
        if self.auth_mechanism:
            out["auth"] = {
                "mechanism": self.auth_mechanism,
                "user": self.auth_user,
                "success": self.auth_success,
            }
        if self.tls:
            out["tls"] = self.tls
        if self.anomalies:
            out["anomalies"] = self.anomalies
        return out

    def describe(self) -> str:
        """One line for humans."""
        parts = [
            f"{self.messages_accepted} accepted, {self.messages_rejected} rejected",
        ]
        if self.messages_incomplete:
            parts.append(f"{self.messages_incomplete} incomplete")
        parts.append(f"{self.bytes_from_client} B up, {self.bytes_from_server} B down")
        if self.auth_mechanism:
            outcome = "ok" if self.auth_success else "failed"
            parts.append(f"AUTH {self.auth_mechanism} {self.auth_user or '?'} {outcome}")
        if self.tls:
            parts.append(self.tls)
        elif self.tls_failed:
            parts.append("TLS failed")
        return ", ".join(parts)


def session_row(rec: Recording) -> tuple[str, ...]:
    """One row of ``smtpproxy show FOLDER``: start, session, client, upstream,
    TLS (``failed`` when the client's handshake failed), AUTH, accepted,
    rejected, how it ended, seconds."""
    summary = SessionSummary()
    summary.update(rec.events())
    auth = "-"
    if summary.auth_mechanism:
        auth = f"{summary.auth_mechanism} {summary.auth_user or '?'} {'ok' if summary.auth_success else 'failed'}"
    ended = f"{rec.close.by}: {rec.close.reason}" if rec.close else "(cut short)"
    seconds = (
        f"{rec.close.t:.2f}" if rec.close else (f"{rec.entries[-1].t:.2f}" if rec.entries else "0")
    )
    return (
        rec.header.start,
        rec.header.session,
        rec.header.client,
        rec.header.upstream,
        summary.tls or ("failed" if summary.tls_failed else "-"),
        auth,
        str(summary.messages_accepted),
        str(summary.messages_rejected),
        ended[:60],
        seconds,
    )


#: the columns of ``smtpproxy show FOLDER``, in the order of ``session_row``
LISTING_HEADERS = (
    "start",
    "session",
    "client",
    "upstream",
    "TLS",
    "AUTH",
    "accepted",
    "rejected",
    "ended",
    "seconds",
)


def listing(recordings: Iterable[Recording]) -> list[str]:
    """The lines of ``smtpproxy show FOLDER``: a header line and one row per
    session, sorted by start, in columns as wide as their widest cell; none
    without a recording. Cells hold what peers and files said, so their
    control characters are made visible (render.visible)."""
    rows = [[visible(cell) for cell in session_row(rec)] for rec in recordings]
    if not rows:
        return []
    rows.sort(key=lambda r: r[0])
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(LISTING_HEADERS)]
    lines = [list(LISTING_HEADERS), *rows]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines]
