"""Export the messages of recordings as .eml files with their envelopes."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .events import Reply
from .protocol import NEW_TRANSACTION, StepKind, Unstuffer, exchanges
from .recording import Recording

__all__ = [
    "ExportFailed",
    "ExportRefused",
    "ExportedMessage",
    "export_all",
    "export_recording",
    "messages",
]


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
        if ex.kind == StepKind.BODY:
            u = Unstuffer()
            content = u.feed(ex.client) + u.end()
            complete = ex.message.complete if ex.message else False
            out.append(ExportedMessage(content, "DATA", mail_from, list(rcpts), ex.reply, complete))
        elif ex.kind != StepKind.COMMAND:
            continue
        elif ex.verb == "MAIL":
            mail_from = ex.args.path
            rcpts = []
            bdat = None
        elif ex.verb == "RCPT":
            rcpts.append({"address": ex.args.path, **_reply(ex.reply)})
        elif ex.verb == "BDAT":
            if bdat is None:
                bdat = ExportedMessage(b"", "BDAT", mail_from, list(rcpts), None, False)
                out.append(bdat)
            bdat.content += ex.chunk
            if ex.message is not None:
                bdat.complete = ex.message.complete
                bdat.outcome = ex.reply
                bdat = None
        elif ex.verb in NEW_TRANSACTION:
            bdat = None
    return out


class ExportRefused(Exception):
    """One file export will not write; the message names it and the fix."""


class ExportFailed(Exception):
    """The export folder cannot be written at all; the message names it."""


def export_all(
    recordings: Iterable[Recording], folder: Path, force: bool = False
) -> Iterator[Path | ExportRefused]:
    """``smtpproxy export``: each recording's messages written into
    ``folder`` (``export_recording``), one run sharing the names taken.
    Yields, recording by recording, the ``.eml`` paths written and then what
    was refused; ``ExportFailed`` when the folder cannot be made or opened."""
    taken: set[str] = set()
    for rec in recordings:
        try:
            written, refused = export_recording(rec, folder, force, taken)
        except OSError as exc:
            raise ExportFailed(f"cannot write to {folder}: {exc.strerror or exc}") from None
        yield from written
        yield from refused


#: The only names export writes: a session id (the reader accepts only the
#: proxy's hex form), a message number and a suffix. No separator, no dot
#: from the recording, so a name cannot leave the folder or choose a suffix.
_NAME = re.compile(r"[0-9a-f]{8,32}-[0-9]{3,}\.(?:eml|json)")


def export_recording(
    rec: Recording, folder: Path, force: bool = False, taken: set[str] | None = None
) -> tuple[list[Path], list[ExportRefused]]:
    """Write ``<session>-<n>.eml`` and ``<session>-<n>.json`` for each message
    into ``folder`` (created 0700). Files are created new, never through a
    symlink; an existing one is replaced only with ``force``, and never one
    this export wrote already (``taken``, shared across the recordings of one
    run: two recordings claiming the same session). Returns the ``.eml``
    paths written and what was refused."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    taken = set() if taken is None else taken
    written: list[Path] = []
    refused: list[ExportRefused] = []
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for n, msg in enumerate(messages(rec), 1):
            stem = f"{rec.header.session}-{n:03d}"
            env = {
                "session": rec.header.session,
                "recording": str(rec.path),
                "message": n,
                **msg.envelope(),
            }
            files = (
                (f"{stem}.eml", msg.content),
                (f"{stem}.json", (json.dumps(env, indent=2, ensure_ascii=False) + "\n").encode()),
            )
            try:
                for name, _ in files:
                    if name in taken:
                        raise ExportRefused(
                            f"{folder / name}: written already from another recording of session "
                            f"{rec.header.session} ({rec.path} is a copy or claims a session it is not)"
                        )
                for name, data in files:
                    _write(dir_fd, folder, name, data, force)
                    taken.add(name)
            except ExportRefused as exc:
                refused.append(exc)
            else:
                written.append(folder / files[0][0])
    finally:
        os.close(dir_fd)
    return written, refused


def _write(dir_fd: int, folder: Path, name: str, data: bytes, force: bool) -> None:
    """Create ``name`` in the folder open as ``dir_fd`` (mode 0600) and write
    ``data``. ``O_EXCL`` with ``O_NOFOLLOW``: a symlink planted in the folder
    is not followed, an existing file is not overwritten (``force`` removes
    it first: the link itself, never its target)."""
    if not _NAME.fullmatch(name):
        raise ExportRefused(f"{folder}: refusing the file name {name!r}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        try:
            fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            if not force:
                raise ExportRefused(
                    f"{folder / name}: exists; not overwritten (--force replaces it)"
                ) from None
            os.unlink(name, dir_fd=dir_fd)
            fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
    except ExportRefused:
        raise
    except OSError as exc:
        raise ExportRefused(f"{folder / name}: cannot write: {exc.strerror or exc}") from None
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
