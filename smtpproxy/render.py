"""Events to the console transcript.

Markers follow swaks, which SMTP people already read: ``->`` the client sent,
``<-`` the server sent, ``~>`` and ``<~`` the same inside TLS, ``==`` what the
proxy itself observed, ``!!`` a warning. Decoded AUTH payloads are shown in
brackets beside the raw line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import TextIO

import click

from .events import (
    WARNING_NOTES,
    Anomaly,
    AnomalyKind,
    AuthDecode,
    AuthResponse,
    AuthResult,
    Command,
    Event,
    MessageData,
    MessageEnd,
    Note,
    Opaque,
    OpaqueReason,
    Reply,
    Side,
    TlsEstablished,
    TlsStart,
)

__all__ = ["Transcript", "format_auth", "json_visible", "visible"]

#: Characters a terminal may act on instead of showing: C0 controls, DEL and
#: C1 controls (ESC starts colours, titles and OSC 8 links, CR rewrites the
#: line, U+009B is a one-byte CSI), and the bidirectional overrides that can
#: reorder what is shown ("Trojan Source"). Each is shown as its escape.
_CONTROLS = [*range(0x20), 0x7F, *range(0x80, 0xA0)]
_BIDI = [0x061C, 0x200E, 0x200F, *range(0x202A, 0x202F), *range(0x2066, 0x206A), 0x2028, 0x2029]
_VISIBLE = {
    **{c: f"\\x{c:02x}" for c in _CONTROLS},
    0x09: "\\t",
    0x0A: "\\n",
    0x0D: "\\r",
    **{c: f"\\u{c:04x}" for c in _BIDI},
}
#: What the json module leaves raw in a string (DEL, C1, the overrides), as
#: JSON escapes. It escapes C0 itself, so a C0 character in its output is
#: structure (indentation); the others can only be inside a string, where
#: ``\\u`` escapes are valid (RFC 8259 section 7).
_JSON_VISIBLE = {c: f"\\u{c:04x}" for c in [0x7F, *range(0x80, 0xA0), *_BIDI]}


def visible(text: str) -> str:
    """``text`` with every character a terminal could act on made visible
    (``\\x1b``, ``\\r``, ``\\x9b``, ``\\u202e``). Everything that came from a
    peer or a file goes through this before it reaches a terminal; the
    recording keeps the exact bytes."""
    if text.isprintable():  # the usual case, at C speed
        return text
    return text.translate(_VISIBLE)


def json_visible(text: str) -> str:
    """JSON text (``json.dumps(..., ensure_ascii=False)``) with C0 and C1
    controls and bidirectional overrides escaped as ``\\u`` sequences: the
    json module leaves C1 and the overrides raw."""
    return text if text.isprintable() else text.translate(_JSON_VISIBLE)


_LINE_END = re.compile(r"\r?\n")
_COLORS = {"client": "cyan", "server": "green", "proxy": "magenta", "warn": "yellow"}


def format_auth(auth: AuthDecode | None) -> str:
    """``[user="u" password="p"]`` for a decoded SASL step."""
    if auth is None:
        return ""
    items = [f'{k}="{v}"' for k, v in auth.fields.items()]
    if auth.error:
        items.append(f"undecodable: {auth.error}")
    return f"[{' '.join(items)}]" if items else ""


def _line(raw: bytes) -> str:
    text = raw.decode("utf-8", errors="backslashreplace")
    return text.rstrip("\r\n")


class Transcript:
    """Writes the transcript of one or more sessions to a text stream.

    ``color`` adds click styles; ``quiet`` shows only session summaries;
    ``show_body`` prints message bodies instead of a one-line summary.
    """

    def __init__(
        self,
        out: TextIO,
        *,
        color: bool = False,
        quiet: bool = False,
        show_body: bool = False,
        prefix: bool = True,
    ) -> None:
        self._out = out
        self._color = color
        self.quiet = quiet
        self.show_body = show_body
        self._prefix = prefix
        self._tls: dict[str, bool] = {}

    def _emit(self, session: str, marker: str, text: str, role: str) -> None:
        """One transcript line: ``text`` with its control characters made
        visible, so a peer can neither act on the terminal nor start a line."""
        line = (
            f"[{session}] {marker} {visible(text)}" if self._prefix else f"{marker} {visible(text)}"
        )
        if self._color:
            line = click.style(line, fg=_COLORS[role])
        self._out.write(line + "\n")

    def _emit_lines(self, session: str, marker: str, text: str, role: str) -> None:
        """A note that quotes a multi-line reply: each line with its prefix."""
        for part in _LINE_END.split(text):
            self._emit(session, marker, part, role)

    def _flush(self) -> None:
        try:
            self._out.flush()
        except (OSError, ValueError):
            pass

    def say(self, session: str, text: str, warn: bool = False) -> None:
        """A line from the proxy itself (warnings show even when quiet)."""
        if self.quiet and not warn:
            return
        self._emit_lines(session, "!!" if warn else "==", text, "warn" if warn else "proxy")
        self._flush()

    def events(self, session: str, events: Iterable[Event]) -> None:
        if self.quiet:
            for ev in events:
                if isinstance(ev, Anomaly) and ev.kind == AnomalyKind.STARTTLS_INJECTION:
                    self._anomaly(session, ev)
            return
        for ev in events:
            self._event(session, ev)
        self._flush()

    def _marker(self, session: str, side: Side) -> str:
        tls = self._tls.get(session, False)
        if side is Side.CLIENT:
            return "~>" if tls else "->"
        return "<~" if tls else "<-"

    def _anomaly(self, session: str, ev: Anomaly) -> None:
        self._emit(session, "!!", f"{ev.side.value}: {ev.kind}: {ev.detail}", "warn")

    def _event(self, session: str, ev: Event) -> None:
        emit = self._emit
        match ev:
            case Command(auth=auth, flags=flags):
                extra = format_auth(auth)
                odd = f" ({', '.join(flags)})" if flags else ""
                text = _line(ev.raw) + (f"   {extra}" if extra else "") + odd
                emit(session, self._marker(session, Side.CLIENT), text, "client")
            case AuthResponse(auth=auth):
                extra = format_auth(auth)
                text = _line(ev.raw) + (f"   {extra}" if extra else "")
                emit(session, self._marker(session, Side.CLIENT), text, "client")
            case Reply(auth=auth):
                marker = self._marker(session, Side.SERVER)
                lines = ev.raw.split(b"\n")
                if lines and not lines[-1]:
                    lines.pop()
                extra = format_auth(auth)
                for i, raw_line in enumerate(lines):
                    text = _line(raw_line)
                    if extra and i == len(lines) - 1:
                        text += f"   {extra}"
                    emit(session, marker, text, "server")
            case MessageData():
                if self.show_body:
                    marker = self._marker(session, Side.CLIENT)
                    for raw_line in ev.raw.splitlines():
                        emit(session, marker, _line(raw_line), "client")
            case MessageEnd():
                emit(session, "==", _describe_message(ev), "proxy")
            case AuthResult():
                outcome = "cancelled" if ev.cancelled else ("succeeded" if ev.success else "failed")
                who = f' user "{ev.user}"' if ev.user is not None else ""
                emit(session, "==", f"AUTH {ev.mechanism}{who} {outcome} ({ev.code})", "proxy")
            case TlsStart():
                emit(session, "==", "STARTTLS agreed: TLS handshake follows", "proxy")
            case TlsEstablished():
                self._tls[session] = True
                emit(session, "==", _describe_tls(ev), "proxy")
            case Opaque():
                if ev.reason != OpaqueReason.TLS:
                    who = "client" if ev.side is Side.CLIENT else "server"
                    emit(session, "!!", f"{who} sent {len(ev.raw)} octets: {ev.reason}", "warn")
                else:
                    emit(
                        session,
                        self._marker(session, ev.side),
                        f"({len(ev.raw)} octets of TLS)",
                        "proxy",
                    )
            case Anomaly():
                self._anomaly(session, ev)
            case Note():
                self._emit_lines(
                    session, "!!" if ev.kind in WARNING_NOTES else "==", ev.text, "warn"
                )

    def summary(self, session: str, text: str) -> None:
        self._emit(session, "==", text, "proxy")
        self._tls.pop(session, None)
        self._flush()


def _describe_message(ev: MessageEnd) -> str:
    h: Mapping[str, str] = ev.headers
    parts = [f"message via {ev.via}: {ev.size} octets"]
    for name in ("From", "To", "Subject"):
        if name in h:
            parts.append(f"{name}: {h[name]}")
    if not ev.complete:
        parts.append("INCOMPLETE (connection ended)")
    return ", ".join(parts)


def _describe_tls(ev: TlsEstablished) -> str:
    who = "client" if ev.side is Side.CLIENT else "server"
    parts = [f"TLS with {who}: {ev.version} {ev.cipher}"]
    if ev.sni:
        parts.append(f"SNI {ev.sni}")
    if ev.peer:
        subject = ev.peer.get("subject")
        if subject:
            parts.append(f"cert {subject}")
    if ev.verified:
        parts.append(f"verification: {ev.verified}")
    return ", ".join(parts)
