"""Export the messages of recordings as .eml files with their envelopes."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .diff import exchanges
from .events import Reply
from .protocol import Unstuffer, parse_path
from .recording import Recording

__all__ = ["ExportedMessage", "export_recording", "messages"]


@dataclass
class ExportedMessage:
    """A message as the server received it, with its envelope."""

    content: bytes
    via: str
    mail_from: str | None
    recipients: list[dict[str, Any]] = field(default_factory=list)
    outcome: Reply | None = None
    complete: bool = True

    def envelope(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mail_from": self.mail_from,
            "rcpt_to": self.recipients,
            "via": self.via,
            "size": len(self.content),
            "complete": self.complete,
        }
        if self.outcome is not None:
            out["outcome"] = {
                "code": self.outcome.code,
                "enhanced": self.outcome.enhanced,
                "text": self.outcome.text,
                "accepted": 200 <= self.outcome.code < 300,
            }
        return out


def _reply(r: Reply | None) -> dict[str, Any]:
    if r is None:
        return {"code": None}
    return {"code": r.code, "enhanced": r.enhanced, "text": r.text}


def messages(rec: Recording) -> list[ExportedMessage]:
    """Every message the client sent in a recording: DATA bodies with
    dot-stuffing undone (RFC 5321 4.5.2), BDAT chunks joined (RFC 3030)."""
    out: list[ExportedMessage] = []
    mail_from: str | None = None
    rcpts: list[dict[str, Any]] = []
    bdat: ExportedMessage | None = None
    for ex in exchanges(rec.events()):
        if ex.kind == "command" and ex.verb == "MAIL":
            text = ex.client.decode("utf-8", "replace")
            mail_from = _path(text)
            rcpts = []
            bdat = None
        elif ex.kind == "command" and ex.verb == "RCPT":
            rcpts.append({"address": _path(ex.client.decode("utf-8", "replace")), **_reply(ex.reply)})
        elif ex.kind == "body":
            u = Unstuffer()
            content = u.feed(ex.client) + u.end()
            complete = ex.message.complete if ex.message else False
            out.append(ExportedMessage(content, "DATA", mail_from, list(rcpts), ex.reply, complete))
        elif ex.kind == "command" and ex.verb == "BDAT":
            _, _, chunk = ex.client.partition(b"\n")
            if bdat is None:
                bdat = ExportedMessage(b"", "BDAT", mail_from, list(rcpts), None, False)
                out.append(bdat)
            bdat.content += chunk
            if ex.message is not None:
                bdat.complete = ex.message.complete
                bdat.outcome = ex.reply
                bdat = None
        elif ex.kind == "command" and ex.verb in ("RSET", "EHLO", "HELO"):
            bdat = None
    return out


def _path(line: str) -> str | None:
    _, _, arg = line.rstrip("\r\n").partition(" ")
    return parse_path(arg)


def export_recording(rec: Recording, folder: Path) -> list[Path]:
    """Write ``<session>-<n>.eml`` and ``<session>-<n>.json`` for each message."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    written = []
    for n, msg in enumerate(messages(rec), 1):
        stem = folder / f"{rec.header.session}-{n:03d}"
        eml = stem.with_suffix(".eml")
        _write(eml, msg.content)
        env = {"session": rec.header.session, "recording": str(rec.path), "message": n, **msg.envelope()}
        _write(stem.with_suffix(".json"), (json.dumps(env, indent=2, ensure_ascii=False) + "\n").encode())
        written.append(eml)
    return written


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
