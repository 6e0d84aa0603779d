"""Pure comparison of SMTP sessions: exchanges, the rules that say whether
two replies are the same, and the alignment of two recordings.

An *exchange* is what the client sent in one step (a command line, a SASL
answer, a message body, a BDAT chunk) and the reply it got. Replay and diff
both reason in exchanges; the comparison rules live here, in one place:

* default: same reply code and same enhanced status code (RFC 3463);
* ``strict``: also the same text after :func:`normalise_text` masks what
  differs between any two runs (dates, times, host names, addresses, queue
  ids, numbers);
* EHLO replies: compared as capability sets (keywords added or removed,
  parameters changed, such as SIZE).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .auth import b64decode_text
from .events import (
    AuthDecode,
    AuthResponse,
    Command,
    Event,
    MessageData,
    MessageEnd,
    Reply,
    TlsEstablished,
)
from .protocol import GREETING

if TYPE_CHECKING:
    from .recording import Recording

__all__ = [
    "Difference",
    "Exchange",
    "compare_replies",
    "diff_sessions",
    "exchanges",
    "exchanges_of",
    "format_unified",
    "normalise_text",
]


@dataclass
class Exchange:
    """One client step and the reply to it."""

    kind: str  # greeting | command | auth | body | unsolicited
    verb: str  # the command verb, "<auth>", "<body>" or "<greeting>"
    client: bytes = b""  # the raw bytes the client sent for this step
    reply: Reply | None = None
    group: float | None = None  # steps sent in one write share a group
    auth: AuthDecode | None = None
    message: MessageEnd | None = None
    extra: list[bytes] = field(default_factory=list)

    @property
    def label(self) -> str:
        if self.kind == "greeting":
            return "(greeting)"
        if self.kind == "body":
            size = self.message.size if self.message else len(self.client)
            return f"(message body, {size} octets)"
        if self.kind == "unsolicited":
            return "(unsolicited reply)"
        line = self.client.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "backslashreplace")
        if self.verb == "BDAT":
            return line + f" (+{len(self.client) - len(line) - 2} octets)"
        return line


def exchanges(events: Iterable[Event], times: Iterable[float] | None = None) -> list[Exchange]:
    """Split a session's events into exchanges; replies are matched to the
    client's steps in order (RFC 5321 4.1.1; RFC 2920 keeps that order)."""
    out: list[Exchange] = []
    unanswered: list[Exchange] = []
    tlist = list(times) if times is not None else None
    open_body: Exchange | None = None
    for i, ev in enumerate(events):
        t = tlist[i] if tlist is not None else None
        match ev:
            case Command():
                open_body = None
                ex = Exchange("command", ev.verb, ev.raw, group=t, auth=ev.auth)
                out.append(ex)
                unanswered.append(ex)
                if ev.verb == "BDAT":
                    open_body = ex
            case AuthResponse():
                ex = Exchange("auth", "<auth>", ev.raw, group=None, auth=ev.auth)
                out.append(ex)
                unanswered.append(ex)
            case MessageData(via="DATA"):
                if open_body is None or open_body.kind != "body":
                    open_body = Exchange("body", "<body>", b"", group=None)
                    out.append(open_body)
                    unanswered.append(open_body)
                open_body.client += ev.raw
            case MessageData():
                if open_body is not None:
                    open_body.client += ev.raw
            case MessageEnd():
                if open_body is not None:
                    open_body.message = ev
                    if open_body.kind == "body":
                        open_body = None
            case Reply(command=cmd) if cmd == GREETING:
                out.append(Exchange("greeting", GREETING, reply=ev))
            case Reply(command=None):
                out.append(Exchange("unsolicited", "<unsolicited>", reply=ev))
            case Reply():
                if unanswered:
                    unanswered.pop(0).reply = ev
    return out


def exchanges_of(recording: Recording) -> list[Exchange]:
    """A recording's exchanges; steps written at the same moment share a
    group (the client sent them in one write: a PIPELINING group)."""
    return exchanges(recording.events(), [e.t for e in recording.entries])


# -- comparing replies ---------------------------------------------------------

_MASKS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(r"\b(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun),?\s+\d{1,2}\s+\w{3}\s+\d{2,4}\s+[\d:]+(?:\s+[+-]\d{4})?(?:\s+\(\w+\))?", re.IGNORECASE), "<date>"),
    (re.compile(r"\b\d{4}-\d{2}-\d{2}(?:[T ][\d:.]+(?:Z|[+-]\d{2}:?\d{2})?)?"), "<date>"),
    (re.compile(r"\b\d{1,2}:\d{2}(?::\d{2})?(?:\.\d+)?\b"), "<time>"),
    (re.compile(r"\[?\b(?:\d{1,3}\.){3}\d{1,3}\b\]?|\[?[0-9a-f]*:[0-9a-f:]+:[0-9a-f]*\]?", re.IGNORECASE), "<ip>"),
    (re.compile(r"<[^<>\s@]*@[^<>\s]*>"), "<address>"),
    (re.compile(r"\b[^\s@<>]+@[^\s@<>]+\b"), "<address>"),
    (re.compile(r"\b(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)+[a-z]{2,}\b", re.IGNORECASE), "<host>"),
    (re.compile(r"\b(?=[A-Za-z0-9]*\d)[A-Za-z0-9]{6,}\b"), "<id>"),
    (re.compile(r"\d+"), "<n>"),
]


def normalise_text(text: str) -> str:
    """Mask what legitimately differs between two runs of the same session:
    dates, times, IP addresses, mail addresses, host names, queue and session
    ids (runs of 6 or more letters and digits with at least one digit: Postfix
    ids are sometimes all digits), and any other number."""
    for pattern, mask in _MASKS:
        text = pattern.sub(mask, text)
    return " ".join(text.split())


def _reply_body(reply: Reply) -> str:
    lines = list(reply.lines)
    if reply.enhanced and lines and lines[0].startswith(reply.enhanced):
        lines[0] = lines[0][len(reply.enhanced) :].lstrip()
    return "\n".join(lines)


def _challenge(reply: Reply) -> str:
    """What a 334 challenge says, base64 decoded when it is base64."""
    text = reply.lines[0] if reply.lines else ""
    decoded = b64decode_text(text)
    return decoded if decoded is not None else text


def _caps(reply: Reply) -> Mapping[str, str]:
    return reply.capabilities or {}


def compare_replies(expected: Reply | None, actual: Reply | None, strict: bool = False) -> list[str]:
    """Why ``actual`` does not count as ``expected``; empty when it does."""
    if expected is None and actual is None:
        return []
    if expected is None:
        return [f"unexpected reply {_short(actual)}"]
    if actual is None:
        return [f"no reply (recorded {_short(expected)})"]
    out: list[str] = []
    if expected.code != actual.code:
        out.append(f"code {expected.code} -> {actual.code}")
    if (expected.enhanced or None) != (actual.enhanced or None) and expected.code == actual.code:
        out.append(f"enhanced code {expected.enhanced or '-'} -> {actual.enhanced or '-'}")
    if expected.capabilities is not None or actual.capabilities is not None:
        out.extend(capability_changes(_caps(expected), _caps(actual)))
    elif expected.code == 334 and actual.code == 334:
        # SASL challenges: compare what they say, decoded; CRAM-MD5's are random
        said = [normalise_text(_challenge(r)) for r in (expected, actual)]
        if strict and said[0] != said[1]:
            out.append(f"challenge {said[0]!r} -> {said[1]!r}")
    elif strict and normalise_text(_reply_body(expected)) != normalise_text(_reply_body(actual)):
        out.append(f"text {_reply_body(expected)!r} -> {_reply_body(actual)!r}")
    return out


def capability_changes(a: Mapping[str, str], b: Mapping[str, str]) -> list[str]:
    """EHLO keywords removed, added or with other parameters."""
    out = []
    for key in a:
        if key not in b:
            out.append(f"capability {key}{' ' + a[key] if a[key] else ''} removed")
        elif key == "AUTH":
            gone = set(a[key].split()) - set(b[key].split())
            new = set(b[key].split()) - set(a[key].split())
            if gone or new:
                out.append(
                    "AUTH mechanisms"
                    + (f" removed {' '.join(sorted(gone))}" if gone else "")
                    + (f" added {' '.join(sorted(new))}" if new else "")
                )
        elif a[key] != b[key]:
            out.append(f"capability {key} {a[key] or '(none)'} -> {b[key] or '(none)'}")
    for key in b:
        if key not in a:
            out.append(f"capability {key}{' ' + b[key] if b[key] else ''} added")
    return out


def _short(reply: Reply | None) -> str:
    if reply is None:
        return "(none)"
    first = reply.lines[0] if reply.lines else ""
    return f"{reply.code} {first}".strip()


# -- two recordings ------------------------------------------------------------


@dataclass
class Difference:
    index: int  # position in A's exchanges (or B's where A has none)
    label: str
    a: Reply | None
    b: Reply | None
    reasons: list[str]
    a_client: str | None = None
    b_client: str | None = None

    def as_json(self) -> dict[str, Any]:
        def reply(r: Reply | None) -> Any:
            if r is None:
                return None
            return {"code": r.code, "enhanced": r.enhanced, "lines": list(r.lines)}

        return {
            "exchange": self.index,
            "step": self.label,
            "a": reply(self.a),
            "b": reply(self.b),
            "a_client": self.a_client,
            "b_client": self.b_client,
            "reasons": self.reasons,
        }


def _key(ex: Exchange) -> str:
    return ex.verb


def diff_sessions(
    a: Sequence[Exchange], b: Sequence[Exchange], strict: bool = False
) -> tuple[int, list[Difference]]:
    """Align two sessions' exchanges (by the sequence of steps, as ``diff``
    aligns lines) and compare each aligned pair. Returns the number of
    exchanges compared and the differences."""
    matcher = difflib.SequenceMatcher(a=[_key(x) for x in a], b=[_key(x) for x in b], autojunk=False)
    diffs: list[Difference] = []
    count = 0
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            for i, j in zip(range(i1, i2), range(j1, j2)):
                count += 1
                reasons = compare_replies(a[i].reply, b[j].reply, strict)
                if a[i].kind == "command" and a[i].client != b[j].client and strict:
                    reasons.append("the client sent a different line")
                if reasons:
                    diffs.append(Difference(i, a[i].label, a[i].reply, b[j].reply, reasons, a[i].label, b[j].label))
            continue
        for i in range(i1, i2):
            count += 1
            diffs.append(Difference(i, a[i].label, a[i].reply, None, ["only in A"], a[i].label, None))
        for j in range(j1, j2):
            count += 1
            diffs.append(Difference(i1, b[j].label, None, b[j].reply, ["only in B"], None, b[j].label))
    return count, diffs


def tls_facts(events: Iterable[Event]) -> dict[str, str]:
    """The TLS versions each leg used, for comparing sessions."""
    out = {}
    for ev in events:
        if isinstance(ev, TlsEstablished):
            out[ev.side.value] = f"{ev.version} {ev.cipher}"
    return out


def format_unified(name_a: str, name_b: str, diffs: Sequence[Difference]) -> list[str]:
    """The differences in the style of ``diff -u``."""
    lines = [f"--- {name_a}", f"+++ {name_b}"]
    for d in diffs:
        lines.append(f"@@ exchange {d.index}: {d.label} @@ " + "; ".join(d.reasons))
        if d.a is not None or d.a_client is not None:
            for text in _reply_lines(d.a):
                lines.append(f"-{text}")
        if d.b is not None or d.b_client is not None:
            for text in _reply_lines(d.b):
                lines.append(f"+{text}")
    return lines


def _reply_lines(reply: Reply | None) -> list[str]:
    if reply is None:
        return ["(no reply)"]
    raw = reply.raw.decode("utf-8", "backslashreplace").splitlines()
    return raw or [f"{reply.code}"]

