"""Per-session totals, accumulated from events: what a session summary line,
a recording's close line and a folder listing show."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from .events import (
    AuthResult,
    Event,
    Anomaly,
    MessageEnd,
    Note,
    Reply,
    Side,
    TlsEstablished,
)

__all__ = ["SessionSummary"]


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
    tls: str | None = None
    anomalies: int = 0

    def update(self, events: Iterable[Event]) -> None:
        for ev in events:
            if isinstance(ev, Note):
                pass  # bytes the proxy itself sent, not a peer's
            elif ev.side is Side.CLIENT:
                self.bytes_from_client += len(ev.raw)
            else:
                self.bytes_from_server += len(ev.raw)
            match ev:
                case Reply(ends_message=True, code=code):
                    if 200 <= code < 300:
                        self.messages_accepted += 1
                    else:
                        self.messages_rejected += 1
                case MessageEnd(complete=False):
                    self.messages_incomplete += 1
                case AuthResult():
                    self.auth_mechanism = ev.mechanism
                    self.auth_user = ev.user
                    self.auth_success = ev.success
                case TlsEstablished(side=Side.CLIENT):
                    self.tls = ev.version
                case TlsEstablished():
                    self.tls = self.tls or ev.version
                case Anomaly():
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
        return ", ".join(parts)
