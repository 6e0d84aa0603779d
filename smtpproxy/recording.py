"""The recording file format: one writer, one reader.

A recording is JSON Lines, one file per client session:

* line 1, the header: ``{"format": "smtpproxy-recording", "version": 2, ...}``;
* then, in the order the proxy saw them, each with ``t`` (seconds since the
  session started):

  - input lines, JSON arrays: what the session's ``Conversation`` was given,
    ``[t, "c", "bytes the client sent"]``, ``[t, "s", ...]`` for the server
    (``"c64"``/``"s64"``: base64) and ``[t, "tls_established"]`` /
    ``[t, "implicit_tls"]``. The reader feeds them through a Conversation
    again, which is deterministic, and so gets every SMTP event back;
  - event lines, JSON objects with ``type``: what the Conversation cannot
    derive (the proxy's notes, TLS handshakes), or every event when the
    recording is redacted (``--redact`` rewrites events, not reads);

* last, ``{"type": "close", ...}`` saying who closed and why; it also ends
  the Conversation (what it held half read comes out).

Version 1 files (event lines only, totals on the close line) read as before.
``docs/recording-format.md`` documents the layout; this module is the only
code that knows it.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as _dt
import json
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from .events import (
    Anomaly,
    AuthDecode,
    AuthResponse,
    AuthResult,
    Command,
    Event,
    MessageData,
    MessageEnd,
    Note,
    Opaque,
    Reply,
    Side,
    TlsEstablished,
    TlsStart,
)
from .protocol import Conversation, MessageHeads, auth_response_fields, command_fields, reply_fields
from .summary import SessionSummary

FORMAT = "smtpproxy-recording"
VERSION = 2
#: What input lines may say besides bytes: the Conversation's other calls.
_CALLS = ("tls_established", "implicit_tls")
_INPUT_KEYS = {Side.CLIENT: ("c", "c64"), Side.SERVER: ("s", "s64")}
_INPUT_SIDES = {"c": Side.CLIENT, "s": Side.SERVER, "c64": Side.CLIENT, "s64": Side.SERVER}

__all__ = [
    "FORMAT",
    "VERSION",
    "Close",
    "Entry",
    "Header",
    "Recorder",
    "Recording",
    "RecordingError",
    "ensure_private_dir",
    "iter_recordings",
    "new_session_id",
    "note_in_place",
    "read_recording",
]

_TYPES: dict[type, str] = {
    Command: "command",
    AuthResponse: "auth_response",
    Reply: "reply",
    MessageData: "data",
    MessageEnd: "message_end",
    AuthResult: "auth_result",
    TlsStart: "tls_start",
    Opaque: "opaque",
    Anomaly: "anomaly",
    TlsEstablished: "tls",
    Note: "note",
}
_CLASSES = {name: cls for cls, name in _TYPES.items()}
_FIELDS: dict[type, list[dataclasses.Field[Any]]] = {
    cls: [f for f in dataclasses.fields(cls) if f.name not in ("raw", "side")] for cls in _TYPES
}
#: Fields not written because the reader derives them from ``raw``
#: (keeps recordings small: they are read far less often than written).
_DERIVE: dict[type, Callable[[bytes], dict[str, object]]] = {
    Command: command_fields,
    AuthResponse: auth_response_fields,
    Reply: reply_fields,
}
_DERIVED_NAMES = {Command: {"verb", "arg", "path"}, AuthResponse: {"text"}, Reply: {"code", "lines", "enhanced"}}
_WRITTEN: dict[type, list[dataclasses.Field[Any]]] = {
    cls: [f for f in fields if f.name not in _DERIVED_NAMES.get(cls, ())] for cls, fields in _FIELDS.items()
}
_MISSING = dataclasses.MISSING
_NO_DEFAULT = object()


def _defaults(fields: list[dataclasses.Field[Any]]) -> list[tuple[str, Any]]:
    """(name, default value) per field, computed once; a field without a
    default gets a marker equal to nothing."""
    out = []
    for f in fields:
        if f.default is not _MISSING:
            out.append((f.name, f.default))
        elif f.default_factory is not _MISSING:
            out.append((f.name, f.default_factory()))
        else:
            out.append((f.name, _NO_DEFAULT))
    return out


_DEFAULTS_ALL = {cls: _defaults(fields) for cls, fields in _FIELDS.items()}
_DEFAULTS_WRITTEN = {cls: _defaults(fields) for cls, fields in _WRITTEN.items()}
#: Types whose side is fixed (a class attribute): it is not written either.
_ONE_SIDED = {cls for cls in _TYPES if "side" not in {f.name for f in dataclasses.fields(cls)}}


class RecordingError(Exception):
    """A recording that cannot be read; the message names the file and line."""


def new_session_id() -> str:
    """A short random id: never derived from anything a client sent."""
    return secrets.token_hex(4)


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (mode 0700) if needed; raise OSError if unusable."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write to {path}")


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


# -- encoding ---------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, Side):
        return value.value
    if isinstance(value, AuthDecode):
        d: dict[str, Any] = {"mechanism": value.mechanism, "fields": dict(value.fields)}
        if value.error:
            d["error"] = value.error
        return d
    if isinstance(value, tuple):
        return list(value)
    return value


def encode_event(t: float, ev: Event, full: bool = False, raw: bool = True) -> dict[str, Any]:
    """The JSON object for one event. In the file, fields the reader derives
    are left out; ``full`` puts every field in (for ``show --json``)."""
    cls = type(ev)
    d: dict[str, Any] = {"t": round(t, 6), "type": _TYPES[cls]}
    if full or cls not in _ONE_SIDED:
        d["side"] = ev.side.value
    for name, default in _DEFAULTS_ALL[cls] if full else _DEFAULTS_WRITTEN[cls]:
        value = getattr(ev, name)
        if value is default or value == default:
            continue
        d[name] = _plain(value)
    data = ev.raw
    if data and raw:
        try:
            d["raw"] = data.decode("utf-8")
        except UnicodeDecodeError:
            d["raw_b64"] = base64.b64encode(data).decode("ascii")
    return d


#: Octets a JSON string must escape besides CR and LF (RFC 8259 section 7).
_JSON_SPECIAL = bytes([0x22, 0x5C] + [c for c in range(0x20) if c not in (0x0A, 0x0D)])


def _fast_raw(data: bytes) -> bytes | None:
    """``data`` as the inside of a JSON string, for the common case of
    message text (valid UTF-8 whose only special characters are CR and LF),
    about three times faster than the json module; None otherwise."""
    if len(data.translate(None, _JSON_SPECIAL)) != len(data):
        return None
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return data.replace(b"\r", b"\\r").replace(b"\n", b"\\n")


def _quick_line(t: float, ev: Event) -> str | None:
    """The line for the events of every transaction (a plain command, a reply
    with nothing decoded, a piece of body) without building a dict: the same
    text ``encode_event`` gives, faster. None for anything else."""
    kind = type(ev)
    if not ev.raw:
        return None
    if kind is Command:
        if ev.flags or ev.auth is not None:  # type: ignore[union-attr]
            return None
        head = f'{{"t":{round(t, 6)!r},"type":"command"'
    elif kind is Reply:
        r: Reply = ev  # type: ignore[assignment]
        if r.flags or r.auth is not None or r.capabilities is not None:
            return None
        head = f'{{"t":{round(t, 6)!r},"type":"reply","command":{_str(r.command) if r.command is not None else "null"}'
        if r.intermediate:
            head += ',"intermediate":true'
        if r.ends_message:
            head += ',"ends_message":true'
    elif kind is MessageData:
        m: MessageData = ev  # type: ignore[assignment]
        head = f'{{"t":{round(t, 6)!r},"type":"data"'
        if m.via != "DATA":
            head += f',"via":{_str(m.via)}'
        if m.last:
            head += ',"last":true'
    else:
        return None
    try:
        text = ev.raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return f'{head},"raw":{_str(text)}}}\n'


def encode_line(t: float, ev: Event) -> bytes:
    """One line of the file, newline included."""
    if len(ev.raw) < 4096:
        quick = _quick_line(t, ev)
        if quick is not None:
            return quick.encode("utf-8")
    else:
        inner = _fast_raw(ev.raw)
        if inner is not None:
            head = _dumps(encode_event(t, ev, raw=False)).encode("utf-8")
            return head[:-1] + b',"raw":"' + inner + b'"}\n'
    return (_dumps(encode_event(t, ev)) + "\n").encode("utf-8")


def _message_end_line(t: float, ev: MessageEnd, derived: Mapping[str, str]) -> bytes:
    """A ``message_end`` line; ``headers`` only when the reader would not
    derive the same from the data pieces before it."""
    if ev.headers != derived:
        return encode_line(t, ev)
    line = f'{{"t":{round(t, 6)!r},"type":"message_end","size":{ev.size}'
    if ev.via != "DATA":
        line += f',"via":{_str(ev.via)}'
    if not ev.complete:
        line += ',"complete":false'
    return (line + "}\n").encode("utf-8")


def _input_line(t: float, side: Side, data: bytes | bytearray) -> bytes:
    """The input line for bytes ``side`` sent, as the Conversation read them:
    ``[t,"c","..."]``, or ``"c64"`` with base64 when they are not UTF-8."""
    text_key, b64_key = _INPUT_KEYS[side]
    data = bytes(data)
    # a command or reply goes quickest through the json module's C escaper,
    # a body piece through the byte-level check (measured: 0.75 against 1.36
    # us for a 20-octet line; 2.8 against 3.5 us for 1 KiB of body)
    inner = _fast_raw(data) if len(data) >= 256 else None
    if inner is not None:
        return f'[{round(t, 6)!r},"{text_key}","'.encode() + inner + b'"]\n'
    try:
        text = _str(data.decode("utf-8"))
    except UnicodeDecodeError:
        return f'[{round(t, 6)!r},"{b64_key}","{base64.b64encode(data).decode("ascii")}"]\n'.encode()
    return f'[{round(t, 6)!r},"{text_key}",{text}]\n'.encode()


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_str = json.encoder.encode_basestring  # a JSON string, non-ASCII kept, as _ENCODER writes it


def _dumps(obj: Mapping[str, Any]) -> str:
    return _ENCODER.encode(obj)


def decode_event(d: Mapping[str, Any], headers: Callable[[], dict[str, str]] | None = None) -> Entry:
    """The inverse of :func:`encode_event`; raises KeyError/ValueError/TypeError.
    ``headers`` gives a ``message_end`` without them its headers (the
    reader's ``MessageHeads``); without it they are empty."""
    cls = _CLASSES[d["type"]]
    kwargs: dict[str, Any] = {}
    for f in _FIELDS[cls]:
        if f.name not in d:
            continue
        value = d[f.name]
        if f.name == "auth" and value is not None:
            if not isinstance(value, dict):
                raise TypeError("auth must be an object")
            value = AuthDecode(str(value["mechanism"]), dict(value.get("fields", {})), value.get("error"))
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[f.name] = value
    if "raw_b64" in d:
        raw = base64.b64decode(d["raw_b64"], validate=True)
    else:
        raw = str(d.get("raw", "")).encode("utf-8")
    names = {f.name for f in dataclasses.fields(cls)}
    if "raw" in names:
        kwargs["raw"] = raw
    if cls in _DERIVE:
        for name, value in _DERIVE[cls](raw).items():
            kwargs.setdefault(name, value)
    elif cls is MessageEnd and "headers" not in kwargs:
        kwargs["headers"] = headers() if headers is not None else {}
    if cls in _ONE_SIDED:
        fixed: Side = getattr(cls, "side")  # noqa: B009  (a ClassVar of the one-sided events)
        if "side" in d and Side(d["side"]) is not fixed:
            raise ValueError(f"a {d['type']} comes from the {fixed.value}, not the {d['side']}")
    else:
        kwargs["side"] = Side(d["side"])
    _check_types(cls, kwargs)
    return Entry(float(d["t"]), cls(**kwargs))


_SIMPLE = {"str": str, "int": int, "bool": bool, "float": float}


def _check_types(cls: type, kwargs: Mapping[str, Any]) -> None:
    """Refuse fields of the wrong JSON type, so that no reader of events
    meets a list where it expects a mapping."""
    hints = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    for name, value in kwargs.items():
        hint = hints.get(name, "")
        if value is None:
            if "None" not in hint:
                raise TypeError(f"{name} must not be null")
            continue
        base = hint.split("|")[0].strip()
        if base in _SIMPLE and not (isinstance(value, _SIMPLE[base]) and not (base == "int" and isinstance(value, bool))):
            raise TypeError(f"{name} must be {base}, not {type(value).__name__}")
        if base.startswith("tuple") and not (isinstance(value, tuple) and all(isinstance(v, str) for v in value)):
            raise TypeError(f"{name} must be a list of strings")
        if base.startswith("Mapping[str, str]") and not (
            isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
        ):
            raise TypeError(f"{name} must be an object of strings")
        if base.startswith("Mapping[str, object]") and not isinstance(value, dict):
            raise TypeError(f"{name} must be an object")
        if name == "auth" and not (
            isinstance(value.fields, dict) and all(isinstance(v, str) for v in value.fields.values())
        ):
            raise TypeError("auth.fields must be an object of strings")


# -- writing ----------------------------------------------------------------


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
        cls, folder: Path, session: str, now: _dt.datetime, clock_start: float, derive: bool = True, **header: Any
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
        self, now: float, side: Side, data: bytes | bytearray, events: Sequence[Event], note: Note | None = None
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

    def close(self, now: float, by: str, reason: str, extra: Mapping[str, Any] | None = None) -> None:
        """Write the close line and close the file. The session's totals are
        not written (the reader counts them from the events); ``extra`` is
        what else belongs with them."""
        rec: dict[str, Any] = {"t": round(now - self._start, 6), "type": "close", "by": by, "reason": reason}
        if extra:
            rec["totals"] = dict(extra)
        self._write_text(_dumps(rec) + "\n")
        self._abandon()

    @property
    def failed(self) -> bool:
        return self.error is not None


# -- reading ----------------------------------------------------------------

#: Converters from older format versions, each taking one version up by one.
_MIGRATIONS: dict[int, Any] = {}


def note_in_place(note: Note, events: Sequence[Event]) -> list[Event]:
    """``note`` in place of the events the Conversation made of its bytes
    (the proxy's own, read as ``note.side``'s): the note first, then the
    events not made of them (a TLS start, anomalies). The relay reports a
    proxy-made reply this way and the reader derives the same from a fed note."""
    return [note, *(e for e in events if not (e.raw and e.side is note.side))]


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
            data = base64.b64decode(item[2], validate=True) if kind.endswith("64") else item[2].encode("utf-8")
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

#: A session id as the proxy makes it (``new_session_id``): the only form the
#: reader accepts, since names of exported files are built from it.
_SESSION_ID = re.compile(r"[0-9a-f]{8,32}")
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
            what = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
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
                continue
            what = "input line" if isinstance(obj, list) else "close line" if obj.get("type") == "close" else "event"
            try:
                if isinstance(obj, list):
                    if header.version < 2:
                        raise ValueError(f"input lines are format version 2, this file says {header.version}")
                    new = inputs.line(obj)
                elif obj.get("type") == "close":
                    totals = obj.get("totals", {})
                    if not isinstance(totals, dict):
                        raise TypeError("totals must be an object")
                    written_totals = totals
                    close = Close(t=float(obj.get("t", 0.0)), by=str(obj.get("by", "")), reason=str(obj.get("reason", "")))
                    new = inputs.close(close.t)
                else:
                    entry = decode_event(obj, heads.derived)
                    new = inputs.fed_note(entry) if obj.get("fed") is True and type(entry.event) is Note else [entry]
            except (KeyError, ValueError, TypeError, RecursionError) as exc:
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
    if version > VERSION or version < 1:
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
