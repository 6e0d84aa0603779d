"""Pure comparison of SMTP sessions: the rules that say whether two
replies (and two commands) are the same, and the alignment of two recordings.

An *exchange* (``protocol.steps``) is what the client sent in one step (a
command line, a SASL answer, a message body, a BDAT chunk), what it means,
and the reply it got. Replay and diff both reason in exchanges; the
comparison rules live here, in one place:

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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .auth import b64decode_text
from .events import Event, Reply, TlsEstablished
from .protocol import Exchange, StepKind, exchanges

if TYPE_CHECKING:
    from .recording import Recording

__all__ = [
    "Aligned",
    "Difference",
    "align",
    "Exchange",
    "compare_commands",
    "compare_replies",
    "diff_sessions",
    "exchanges",
    "exchanges_of",
    "format_unified",
    "normalise_text",
]


def exchanges_of(recording: Recording) -> list[Exchange]:
    """A recording's exchanges; steps written at the same moment share a
    group (the client sent them in one write: a PIPELINING group)."""
    return exchanges(recording.events(), [e.t for e in recording.entries])


# -- comparing replies ---------------------------------------------------------

_MASKS: list[tuple[re.Pattern[str], str]] = [
    (
        re.compile(
            r"\b(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun),?\s+\d{1,2}\s+\w{3}\s+\d{2,4}\s+[\d:]+(?:\s+[+-]\d{4})?(?:\s+\(\w+\))?",
            re.IGNORECASE,
        ),
        "<date>",
    ),
    (re.compile(r"\b\d{4}-\d{2}-\d{2}(?:[T ][\d:.]+(?:Z|[+-]\d{2}:?\d{2})?)?"), "<date>"),
    (re.compile(r"\b\d{1,2}:\d{2}(?::\d{2})?(?:\.\d+)?\b"), "<time>"),
    (
        re.compile(
            r"\[?\b(?:\d{1,3}\.){3}\d{1,3}\b\]?|\[?[0-9a-f]*:[0-9a-f:]+:[0-9a-f]*\]?", re.IGNORECASE
        ),
        "<ip>",
    ),
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


def compare_replies(
    expected: Reply | None, actual: Reply | None, strict: bool = False
) -> list[str]:
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


def _auth_users(exs: Sequence[Exchange]) -> dict[int, str | None]:
    """The user each AUTH command authenticated as, decoded from its initial
    response or the SASL answers after it (by the AUTH exchange's index)."""
    out: dict[int, str | None] = {}
    current: int | None = None
    for i, ex in enumerate(exs):
        if ex.kind == StepKind.COMMAND:
            current = i if ex.verb == "AUTH" else None
            if current is not None:
                out[i] = None
        if current is not None and ex.auth is not None and out[current] is None:
            out[current] = ex.auth.fields.get("user")
    return out


def compare_commands(
    a: Exchange,
    b: Exchange,
    users: tuple[str | None, str | None] = (None, None),
    strict: bool = False,
) -> list[str]:
    """How two aligned commands differ in what they mean: MAIL and RCPT
    paths and ESMTP parameters (values masked as reply texts are, so a SIZE
    that differs by a Date header's length is the same), BDAT sizes and
    LAST, AUTH mechanism and decoded user (``users``); ``strict`` adds the
    raw text. Empty when they mean the same."""
    if a.kind != StepKind.COMMAND or b.kind != StepKind.COMMAND:
        return []
    out: list[str] = []
    pa, pb = a.args, b.args
    if a.verb in ("MAIL", "RCPT"):
        if pa.path != pb.path:
            out.append(f"path <{pa.path}> -> <{pb.path}>")
        for key in sorted(set(pa.params) | set(pb.params)):
            if key not in pb.params:
                out.append(f"parameter {key} removed")
            elif key not in pa.params:
                out.append(f"parameter {key} added")
            elif normalise_text(pa.params[key]) != normalise_text(pb.params[key]):
                out.append(f"parameter {key}={pa.params[key]} -> {key}={pb.params[key]}")
    elif a.verb == "BDAT":
        if (pa.size, pa.last) != (pb.size, pb.last):
            out.append(
                f"chunk {pa.size}{' LAST' if pa.last else ''} -> {pb.size}{' LAST' if pb.last else ''}"
            )
    elif a.verb == "AUTH":
        if pa.mechanism != pb.mechanism:
            out.append(f"mechanism {pa.mechanism} -> {pb.mechanism}")
        if users[0] != users[1]:
            out.append(f"user {users[0]} -> {users[1]}")
    if strict and a.client != b.client:
        out.append("the client sent a different line")
    return out


@dataclass(frozen=True)
class Aligned:
    """One row of two aligned sessions: A's exchange and B's (by index;
    None where the step is only in the other), why they differ (empty: the
    same), and ``at``: the row's place in A's exchanges."""

    a: int | None
    b: int | None
    reasons: list[str]
    at: int


def align(a: Sequence[Exchange], b: Sequence[Exchange], strict: bool = False) -> list[Aligned]:
    """Align two sessions' exchanges (by the sequence of steps, as ``diff``
    aligns lines) and compare each aligned pair: what the commands mean
    (:func:`compare_commands`) and the replies (:func:`compare_replies`).
    Every exchange of both is in one row, in order."""
    matcher = difflib.SequenceMatcher(
        a=[_key(x) for x in a], b=[_key(x) for x in b], autojunk=False
    )
    users_a, users_b = _auth_users(a), _auth_users(b)
    rows: list[Aligned] = []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            for i, j in zip(range(i1, i2), range(j1, j2)):
                reasons = compare_commands(a[i], b[j], (users_a.get(i), users_b.get(j)), strict)
                reasons += compare_replies(a[i].reply, b[j].reply, strict)
                rows.append(Aligned(i, j, reasons, i))
            continue
        rows += [Aligned(i, None, ["only in A"], i) for i in range(i1, i2)]
        rows += [Aligned(None, j, ["only in B"], i1) for j in range(j1, j2)]
    return rows


def diff_sessions(
    a: Sequence[Exchange], b: Sequence[Exchange], strict: bool = False
) -> tuple[int, list[Difference]]:
    """The rows of :func:`align` that differ. Returns the number of
    exchanges compared and the differences."""
    rows = align(a, b, strict)
    diffs: list[Difference] = []
    for row in rows:
        ea = a[row.a] if row.a is not None else None
        eb = b[row.b] if row.b is not None else None
        if ea is not None and eb is not None and not row.reasons:
            continue
        first = ea if ea is not None else eb
        diffs.append(
            Difference(
                row.at,
                first.label if first is not None else "",
                ea.reply if ea else None,
                eb.reply if eb else None,
                row.reasons,
                ea.label if ea else None,
                eb.label if eb else None,
            )
        )
    return len(rows), diffs


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
