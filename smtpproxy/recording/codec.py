"""The codec: an event, or a read of a peer's bytes, to one line of the file,
and an event line back to its event.

The writer calls the encoders, the reader ``decode_event``; neither knows
how a line is spelt. Fields the reader derives from ``raw`` are left out,
and the commonest lines are written without building a dict (the same
bytes, faster: ``tests/test_recording_format.py`` checks they agree).
"""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Callable, Mapping
from typing import Any

from ..events import (
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
from ..protocol import auth_response_fields, command_fields, reply_fields
from .model import Entry

#: What input lines may say besides bytes: the Conversation's other calls.
_CALLS = ("tls_established", "implicit_tls")
_INPUT_KEYS = {Side.CLIENT: ("c", "c64"), Side.SERVER: ("s", "s64")}
_INPUT_SIDES = {"c": Side.CLIENT, "s": Side.SERVER, "c64": Side.CLIENT, "s64": Side.SERVER}

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
    cls: [f for f in dataclasses.fields(cls) if f.name not in ("raw", "side", "fed")]
    for cls in _TYPES
}
#: Fields not written because the reader derives them from ``raw``
#: (keeps recordings small: they are read far less often than written).
_DERIVE: dict[type, Callable[[bytes], dict[str, object]]] = {
    Command: command_fields,
    AuthResponse: auth_response_fields,
    Reply: reply_fields,
}
_DERIVED_NAMES = {
    Command: {"verb", "arg", "path"},
    AuthResponse: {"text"},
    Reply: {"code", "lines", "enhanced"},
}
_WRITTEN: dict[type, list[dataclasses.Field[Any]]] = {
    cls: [f for f in fields if f.name not in _DERIVED_NAMES.get(cls, ())]
    for cls, fields in _FIELDS.items()
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
        return (
            f'[{round(t, 6)!r},"{b64_key}","{base64.b64encode(data).decode("ascii")}"]\n'.encode()
        )
    return f'[{round(t, 6)!r},"{text_key}",{text}]\n'.encode()


_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_str = json.encoder.encode_basestring  # a JSON string, non-ASCII kept, as _ENCODER writes it


def _dumps(obj: Mapping[str, Any]) -> str:
    return _ENCODER.encode(obj)


def decode_event(
    d: Mapping[str, Any], headers: Callable[[], dict[str, str]] | None = None
) -> Entry:
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
            value = AuthDecode(
                str(value["mechanism"]), dict(value.get("fields", {})), value.get("error")
            )
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
        if base in _SIMPLE and not (
            isinstance(value, _SIMPLE[base]) and not (base == "int" and isinstance(value, bool))
        ):
            raise TypeError(f"{name} must be {base}, not {type(value).__name__}")
        if base.startswith("tuple") and not (
            isinstance(value, tuple) and all(isinstance(v, str) for v in value)
        ):
            raise TypeError(f"{name} must be a list of strings")
        if base.startswith("Mapping[str, str]") and not (
            isinstance(value, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items())
        ):
            raise TypeError(f"{name} must be an object of strings")
        if base.startswith("Mapping[str, object]") and not isinstance(value, dict):
            raise TypeError(f"{name} must be an object")
        if name == "auth" and not (
            isinstance(value.fields, dict)
            and all(isinstance(v, str) for v in value.fields.values())
        ):
            raise TypeError("auth.fields must be an object of strings")
