"""Faults at a named step: the rule language, one parser and one matcher.

A rule says where a session should fail and how, in the step model's words
(``smtpproxy.protocol.steps``)::

    [SELECTOR ]STEP[#N]: ACTION[, OPTION=VALUE ...]
    rcpt#2: 452 4.5.3 Too many recipients
    to=*@example.org dot: replace 451 4.3.0 Lost, times=2
    session#3 starttls: 454 4.7.0 TLS not available

:func:`parse_rule` builds a small typed :class:`Rule` (the model is
Toxiproxy's toxics and Postfix smtp-sink's per-command switches, without a
chance-only mode); :class:`FaultPlan` holds the rules of one process and
:class:`SessionFaults` applies them to one session: the relay or the sink
calls :meth:`SessionFaults.step` at each step as it happens and acts on the
:class:`Fault` it gets back. Nothing here does I/O: time comes from the clock
function the plan is given. docs/faults.md is the user's guide.
"""

from __future__ import annotations

import enum
import fnmatch
import random
import re
import time
import tomllib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .protocol import format_reply

__all__ = [
    "ActionKind",
    "Fault",
    "FaultFileError",
    "FaultPlan",
    "FaultSource",
    "FaultSyntaxError",
    "Rule",
    "SessionFaults",
    "load_rules",
    "parse_rule",
]


class FaultSyntaxError(ValueError):
    """A rule that does not parse or cannot apply: ``str(exc)`` is one line
    quoting the rule, the position (1-based column) of the mistake, what is
    wrong, and a valid example."""

    def __init__(self, rule: str, column: int, problem: str, example: str) -> None:
        self.rule = rule
        self.column = column
        self.problem = problem
        self.example = example
        super().__init__(
            f"bad fault rule {rule!r}: column {column}: {problem} (example: {example!r})"
        )


class FaultFileError(FaultSyntaxError):
    """A ``--faults`` file that cannot be read or does not hold rules."""

    def __init__(self, path: Path, problem: str) -> None:
        ValueError.__init__(
            self, f"faults file {str(path)!r}: {problem} (example: {_FILE_EXAMPLE})"
        )
        self.rule = ""
        self.column = 0
        self.problem = problem
        self.example = _FILE_EXAMPLE


class ActionKind(enum.StrEnum):
    """What a fault does (the value is the word a rule uses, a reply aside)."""

    REPLY = "reply"  # answer the client ourselves; the command goes no further
    REPLACE = "replace"  # the command goes on; the client hears our reply instead
    DELAY = "delay"  # wait, then go on
    STALL = "stall"  # never answer (the client's timeout is what is tested)
    CLOSE = "close"  # close the client's connection (FIN)
    RESET = "reset"  # abort the client's connection (RST: SO_LINGER 0)
    THROTTLE = "throttle"  # from here on, at most ``rate`` octets a second to the client
    REMOVE = "remove"  # EHLO: hide these capabilities from the client
    ADD = "add"  # EHLO: show these capabilities too
    TLS_ABORT = "abort"  # tls: the handshake with the client fails
    TLS_CERT = "cert"  # tls: show the client this kind of bad certificate


@dataclass(frozen=True)
class Fault:
    """What fired: the caller acts on it."""

    #: the rule's text as given, for the note and the transcript
    rule: str
    kind: ActionKind
    #: REPLY / REPLACE: the reply code and the text after it
    code: int | None = None
    text: str = ""
    #: DELAY: how long
    seconds: float = 0.0
    #: THROTTLE: octets per second
    rate: int = 0
    #: REMOVE / ADD: EHLO keywords, upper-cased
    capabilities: tuple[str, ...] = ()
    #: TLS_CERT: expired | wrong-name | self-signed
    cert: str = ""

    def reply_bytes(self) -> bytes:
        """REPLY / REPLACE: the reply on the wire (one line, CRLF)."""
        if self.code is None:
            raise ValueError(f"fault {self.rule!r} ({self.kind}) has no reply")
        return format_reply(self.code, self.text)

    def describe(self) -> str:
        """What the fault does, in a few words, for ``!! fault <rule>: ...``."""
        match self.kind:
            case ActionKind.REPLY:
                return f"answered {self.code} {self.text}".rstrip()
            case ActionKind.REPLACE:
                return f"replaced the reply with {self.code} {self.text}".rstrip()
            case ActionKind.DELAY:
                return f"delayed {self.seconds:g}s"
            case ActionKind.STALL:
                return "stalled (no answer)"
            case ActionKind.CLOSE:
                return "closed the connection"
            case ActionKind.RESET:
                return "reset the connection"
            case ActionKind.THROTTLE:
                return f"throttled to {self.rate} octets/s"
            case ActionKind.REMOVE:
                return "removed " + " ".join(self.capabilities) + " from EHLO"
            case ActionKind.ADD:
                return "added " + " ".join(self.capabilities) + " to EHLO"
            case ActionKind.TLS_ABORT:
                return "aborted the TLS handshake"
            case ActionKind.TLS_CERT:
                return f"showed a {self.cert} certificate"
        return str(self.kind)  # pragma: no cover


#: Steps a command makes (the step name is the verb, lower-cased).
COMMAND_STEPS = frozenset(
    {"ehlo", "helo", "starttls", "auth", "mail", "rcpt", "data", "bdat", "rset", "quit"}
    | {"noop", "vrfy", "expn", "help"}
)
#: Every step a rule may name.
STEPS = COMMAND_STEPS | {"connect", "greeting", "tls", "body", "dot", "any"}

_CONNECTION = frozenset({ActionKind.DELAY, ActionKind.STALL, ActionKind.CLOSE, ActionKind.RESET})
_ANY_STEP = _CONNECTION | {ActionKind.THROTTLE}
_ANSWER = _ANY_STEP | {ActionKind.REPLY, ActionKind.REPLACE}
#: The actions each step can take (``remove`` on ``rcpt`` is refused).
ALLOWED: dict[str, frozenset[ActionKind]] = {
    **{s: _ANSWER for s in COMMAND_STEPS | {"greeting", "dot", "any"}},
    "ehlo": _ANSWER | {ActionKind.REMOVE, ActionKind.ADD},
    "connect": _ANY_STEP | {ActionKind.REPLY},
    "body": _ANY_STEP,
    "tls": _ANY_STEP | {ActionKind.TLS_ABORT, ActionKind.TLS_CERT},
}
CERT_KINDS = ("expired", "wrong-name", "self-signed")

_EXAMPLE = "rcpt#2: 452 4.5.3 Too many recipients"
_FILE_EXAMPLE = '[[fault]] rule = "rcpt#2: 452 4.5.3 Too many recipients"'
_STEP_EXAMPLES: dict[str, str] = {
    "connect": "connect: 421 4.3.2 Service not available",
    "greeting": "greeting: delay 5s",
    "ehlo": "ehlo: remove PIPELINING CHUNKING",
    "helo": "helo: 501 5.5.4 Bad HELO",
    "starttls": "starttls: 454 4.7.0 TLS not available",
    "tls": "tls: cert expired",
    "auth": "auth: 535 5.7.8 Authentication failed",
    "mail": "mail: 451 4.3.0 Try again later",
    "rcpt": _EXAMPLE,
    "data": "data: 554 5.5.1 No valid recipients",
    "bdat": "bdat: 552 5.3.4 Message too big",
    "body": "body@64KiB: close",
    "dot": "dot: replace 451 4.3.0 Lost",
    "rset": "rset: close",
    "quit": "quit: stall",
    "any": "any#5: reset",
}
_SELECTORS = ("to", "from", "user", "client", "helo")
_OPTIONS = ("times", "p", "seed", "greylist", "rate")
_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 10**6, "mb": 10**6}
_SIZE_UNITS |= {"mib": 1 << 20, "g": 10**9, "gb": 10**9, "gib": 1 << 30}
_TIME_UNITS = {"ms": 0.001, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}
_WORD = re.compile(r"\S+")
_NUMBER_UNIT = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)")


@dataclass(frozen=True)
class Rule:
    """One parsed rule: where it applies (step, occurrence, selectors), what
    fires (``fault``) and the options that decide whether it fires."""

    text: str
    step: str
    fault: Fault
    nth: int | None = None  # STEP#N
    body_at: int = 0  # body@SIZE: octets of the message that must have passed
    session: int | None = None  # session#K
    message: int | None = None  # message#K
    #: selectors on what was said, (name, glob) pairs: to, from, user, client, helo
    match: tuple[tuple[str, str], ...] = ()
    times: int | None = None
    p: float | None = None
    seed: int = 0
    greylist: float | None = None  # seconds
    rate: tuple[int, float] | None = None  # (count, window seconds)

    def steps(self) -> frozenset[str]:
        """The step names :meth:`SessionFaults.step` is called with that this
        rule can match (``ehlo`` also matches HELO; ``any``: every command)."""
        if self.step == "any":
            return COMMAND_STEPS
        if self.step == "ehlo":
            return frozenset({"ehlo", "helo"})
        return frozenset({self.step})


# ---------------------------------------------------------------- the parser


class _Scan:
    """The rule's text and where its parts start, for the column in errors."""

    def __init__(self, text: str) -> None:
        self.text = text

    def fail(self, at: int, problem: str, example: str = _EXAMPLE) -> FaultSyntaxError:
        return FaultSyntaxError(self.text, at + 1, problem, example)


def _words(text: str, start: int, end: int) -> list[tuple[int, str]]:
    return [(m.start(), m.group()) for m in _WORD.finditer(text, start, end)]


def parse_size(value: str) -> int | None:
    """``64KiB`` -> 65536 (also ``KB``, ``MiB``, ``MB``, a bare number of octets)."""
    m = _NUMBER_UNIT.fullmatch(value.strip())
    if m is None or m.group(2).lower() not in _SIZE_UNITS or "." in m.group(1):
        return None
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


def parse_duration(value: str) -> float | None:
    """``5s``, ``500ms``, ``2m``, ``1h`` -> seconds (a unit is required)."""
    m = _NUMBER_UNIT.fullmatch(value.strip())
    if m is None or m.group(2).lower() not in _TIME_UNITS:
        return None
    return float(m.group(1)) * _TIME_UNITS[m.group(2).lower()]


def _occurrence(scan: _Scan, at: int, word: str, what: str) -> int:
    """The number after ``#`` in ``rcpt#2`` or ``session#3`` (from 1)."""
    _, _, digits = word.partition("#")
    col = at + word.index("#") + 1
    if not digits.isascii() or not digits.isdigit() or int(digits) < 1:
        raise scan.fail(
            col, f"the occurrence after '#' must be a number from 1, not {digits!r}", what
        )
    return int(digits)


def parse_rule(text: str) -> Rule:
    """Parse ``[SELECTOR ]STEP[#N]: ACTION[, OPTION=VALUE ...]``; raises
    :class:`FaultSyntaxError` naming the column of the mistake."""
    scan = _Scan(text)
    words = _words(text, 0, len(text))
    if not words:
        raise scan.fail(0, "the rule is empty")
    selectors: dict[str, object] = {}
    match: list[tuple[str, str]] = []
    step_at = -1
    step_word = ""
    colon = -1
    for at, word in words:
        low = word.lower()
        if low.startswith(("session#", "message#")):
            name = low.split("#", 1)[0]
            selectors[name] = _occurrence(scan, at, word.rstrip(":"), f"{name}#2 {_EXAMPLE}")
            if word.endswith(":"):
                raise scan.fail(
                    at + len(word) - 1, f"'{name}#K' selects, a step must follow it",
                    f"{name}#2 {_EXAMPLE}",
                )  # fmt: skip
            continue
        key, eq, value = word.partition("=")
        if eq and ":" not in key:
            if key.lower() not in _SELECTORS:
                raise scan.fail(
                    at, f"unknown selector {key!r} (known: session#K, message#K, "
                    + ", ".join(s + "=" for s in _SELECTORS) + ")",
                    f"to=*@example.org {_EXAMPLE}",
                )  # fmt: skip
            if not value:
                raise scan.fail(at + len(key) + 1, f"selector {key}= needs a value",
                                f"to=*@example.org {_EXAMPLE}")  # fmt: skip
            match.append((key.lower(), value.lower()))
            continue
        step_at, step_word = at, word
        cut = word.find(":")
        if cut >= 0:
            colon = at + cut
        break
    if step_at < 0:
        raise scan.fail(len(text.rstrip()), "a step is missing (connect, greeting, ehlo, ...)")
    if colon < 0:
        # the colon may stand alone after the step: "rcpt#2 : 452 ..."
        rest = text[step_at + len(step_word) :]
        if rest.lstrip().startswith(":"):
            colon = step_at + len(step_word) + (len(rest) - len(rest.lstrip()))
        else:
            raise scan.fail(
                step_at + len(step_word),
                "a ':' must follow the step, before the action",
                _STEP_EXAMPLES.get(step_word.split("#")[0].split("@")[0].lower(), _EXAMPLE),
            )
    head = text[step_at:colon]
    step_part = head.strip()
    name = re.split(r"[#@]", step_part, maxsplit=1)[0].lower()
    if name not in STEPS:
        raise scan.fail(step_at, f"unknown step {name!r} (steps: {', '.join(sorted(STEPS))})")
    example = _STEP_EXAMPLES.get(name, _EXAMPLE)
    nth: int | None = None
    body_at = 0
    tail = step_part[len(name) :]
    if tail.startswith("@"):
        if name != "body":
            raise scan.fail(step_at + len(name), "only 'body' takes '@SIZE'", example)
        size = parse_size(tail[1:])
        if size is None:
            raise scan.fail(
                step_at + len(name) + 1, f"{tail[1:]!r} is not a size like 64KiB", example
            )
        body_at = size
    elif tail.startswith("#"):
        nth = _occurrence(scan, step_at, step_part, example)
    elif tail:
        raise scan.fail(step_at + len(name), f"unexpected {tail!r} after the step", example)
    fault_text, options_at = _split_options(text, colon + 1)
    fault = _parse_action(scan, name, colon + 1, fault_text, example)
    opts, cols = _parse_options(scan, options_at, example)
    rule = Rule(
        text=text.strip(), step=name, fault=fault, nth=nth, body_at=body_at,
        session=selectors.get("session"),  # type: ignore[arg-type]
        message=selectors.get("message"),  # type: ignore[arg-type]
        match=tuple(match), **opts,  # type: ignore[arg-type]
    )  # fmt: skip
    if rule.greylist is not None and rule.fault.kind not in (ActionKind.REPLY, ActionKind.REPLACE):
        raise scan.fail(
            cols["greylist"], "greylist= goes with a reply",
            "rcpt: 451 4.7.1 Greylisted, greylist=60s",
        )  # fmt: skip
    return rule


def _split_options(text: str, start: int) -> tuple[str, list[tuple[int, str]]]:
    """The action is everything after the colon up to the first
    ``, name=value`` part; the options are the parts after it (so a reply's
    text may hold commas)."""
    parts: list[tuple[int, str]] = []
    pos = start
    for piece in text[start:].split(","):
        parts.append((pos, piece))
        pos += len(piece) + 1
    for i, (_, piece) in enumerate(parts[1:], 1):
        if re.fullmatch(r"\s*[A-Za-z]+\s*=.*", piece):
            action = ",".join(p for _, p in parts[:i])
            return action, parts[i:]
    return text[start:], []


def _parse_action(scan: _Scan, step: str, at: int, text: str, example: str) -> Fault:
    words = _words(scan.text, at, at + len(text))
    if not words:
        raise scan.fail(at, "an action must follow the ':'", example)
    first_at, first = words[0]
    allowed = ALLOWED[step]
    rule = scan.text.strip()

    def refuse(kind: ActionKind) -> None:
        if kind not in allowed:
            names = sorted("a reply" if k == ActionKind.REPLY else str(k) for k in allowed)
            raise scan.fail(
                first_at, f"step {step!r} cannot take {kind.value!r} (it takes: "
                + ", ".join(names) + ")", example,
            )  # fmt: skip

    def reply(kind: ActionKind, rest: list[tuple[int, str]]) -> Fault:
        if not rest:
            raise scan.fail(at + len(text), "a reply code must follow", example)
        code_at, code = rest[0]
        if not (code.isascii() and code.isdigit() and len(code) == 3):
            raise scan.fail(code_at, f"{code!r} is not a three-digit reply code", example)
        if not 200 <= int(code) <= 599:
            raise scan.fail(code_at, f"reply code {code} is outside 200-599", example)
        refuse(kind)
        reply_text = scan.text[rest[1][0] : at + len(text)].strip() if len(rest) > 1 else ""
        return Fault(rule, kind, code=int(code), text=reply_text)

    low = first.lower()
    args = words[1:]
    if first[:1].isdigit():
        return reply(ActionKind.REPLY, words)
    if low == "replace":
        return reply(ActionKind.REPLACE, args)
    try:
        kind = ActionKind(low)
    except ValueError:
        raise scan.fail(
            first_at, f"unknown action {first!r} (a reply like '452 4.5.3 ...', replace, "
            "delay, stall, close, reset, throttle, remove, add, abort, cert)", example,
        ) from None  # fmt: skip
    refuse(kind)
    end = at + len(text)

    def one_arg(what: str) -> tuple[int, str]:
        if len(args) != 1:
            where = args[1][0] if len(args) > 1 else end
            raise scan.fail(where, f"{kind.value!r} takes one {what}", example)
        return args[0]

    match kind:
        case ActionKind.DELAY:
            a_at, value = one_arg("duration like 5s or 500ms")
            seconds = parse_duration(value)
            if seconds is None:
                raise scan.fail(a_at, f"{value!r} is not a duration like 5s, 500ms or 2m",
                                "greeting: delay 5s")  # fmt: skip
            return Fault(rule, kind, seconds=seconds)
        case ActionKind.THROTTLE:
            a_at, value = one_arg("rate like 10KiB/s")
            size, slash, unit = value.partition("/")
            rate = parse_size(size)
            if rate is None or slash != "/" or unit.lower() not in ("s", "sec") or rate < 1:
                raise scan.fail(a_at, f"{value!r} is not a rate like 10KiB/s",
                                "dot: throttle 10KiB/s")  # fmt: skip
            return Fault(rule, kind, rate=rate)
        case ActionKind.REMOVE | ActionKind.ADD:
            if not args:
                raise scan.fail(end, f"{kind.value!r} needs EHLO keywords",
                                "ehlo: remove PIPELINING CHUNKING")  # fmt: skip
            for a_at, value in args:
                if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", value):
                    raise scan.fail(a_at, f"{value!r} is not an EHLO keyword",
                                    "ehlo: remove PIPELINING CHUNKING")  # fmt: skip
            return Fault(rule, kind, capabilities=tuple(v.upper() for _, v in args))
        case ActionKind.TLS_CERT:
            a_at, value = one_arg("kind: " + "|".join(CERT_KINDS))
            if value.lower() not in CERT_KINDS:
                raise scan.fail(a_at, f"{value!r} is not one of " + ", ".join(CERT_KINDS),
                                "tls: cert expired")  # fmt: skip
            return Fault(rule, kind, cert=value.lower())
    if args:
        raise scan.fail(args[0][0], f"{kind.value!r} takes nothing after it", example)
    return Fault(rule, kind)


def _parse_options(
    scan: _Scan, parts: list[tuple[int, str]], example: str
) -> tuple[dict[str, object], dict[str, int]]:
    """The options' values, and where each starts (for later errors)."""
    out: dict[str, object] = {}
    cols: dict[str, int] = {}
    for at, piece in parts:
        key, _, value = piece.partition("=")
        col = at + len(piece) - len(piece.lstrip())
        name = key.strip().lower()
        value = value.strip()
        raw = piece[len(key) + 1 :]
        v_at = at + len(key) + 1 + len(raw) - len(raw.lstrip())
        if name not in _OPTIONS:
            raise scan.fail(
                col, f"unknown option {key.strip()!r} (options: " + ", ".join(_OPTIONS) + ")",
                example + ", times=2",
            )  # fmt: skip
        if name in out:
            raise scan.fail(col, f"option {name}= is given twice", example + ", times=2")
        cols[name] = col
        match name:
            case "times" | "seed":
                if not (value.isascii() and value.isdigit()) or (
                    name == "times" and int(value) < 1
                ):
                    raise scan.fail(v_at, f"{name}= wants a whole number, not {value!r}",
                                    example + ", times=2")  # fmt: skip
                out[name] = int(value)
            case "p":
                try:
                    p = float(value)
                except ValueError:
                    p = -1.0
                if not 0.0 <= p <= 1.0:
                    raise scan.fail(v_at, f"p= wants a chance from 0 to 1, not {value!r}",
                                    example + ", p=0.05, seed=7")  # fmt: skip
                out["p"] = p
            case "greylist":
                seconds = parse_duration(value)
                if seconds is None:
                    raise scan.fail(v_at, f"greylist= wants a duration like 60s, not {value!r}",
                                    "rcpt: 451 4.7.1 Greylisted, greylist=60s")  # fmt: skip
                out["greylist"] = seconds
            case "rate":
                count, slash, unit = value.partition("/")
                window = _TIME_UNITS.get(unit.lower()) if slash else None
                if window is None or not (count.isascii() and count.isdigit()) or unit == "ms":
                    raise scan.fail(v_at, f"rate= wants a count per time like 100/min, not {value!r}",
                                    "mail: 421 4.7.0 Too many messages, rate=100/min")  # fmt: skip
                out["rate"] = (int(count), window)
    if "seed" in out and "p" not in out:
        raise scan.fail(cols["seed"], "seed= goes with p=", example + ", p=0.05, seed=7")
    return out, cols


def load_rules(rules: Sequence[str] = (), file: Path | None = None) -> list[Rule]:
    """The rules of ``--fault`` (in order) then those of ``--faults FILE``:
    a TOML file with one ``[[fault]]`` table per rule, its key ``rule``
    holding the rule's text (``rule = "rcpt#2: 452 4.5.3 Too many recipients"``)."""
    out = [parse_rule(r) for r in rules]
    if file is None:
        return out
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FaultFileError(file, f"cannot read it: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise FaultFileError(file, "it is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise FaultFileError(file, f"not valid TOML: {exc}") from None
    extra = sorted(set(data) - {"fault"})
    if extra:
        raise FaultFileError(
            file, f"unknown top-level key {extra[0]!r}: rules go in [[fault]] tables"
        )
    tables = data.get("fault", [])
    if not isinstance(tables, list):
        raise FaultFileError(file, "'fault' must be an array of tables: write [[fault]]")
    for i, table in enumerate(tables, 1):
        if not isinstance(table, dict) or not isinstance(table.get("rule"), str):
            raise FaultFileError(file, f'[[fault]] number {i} needs a rule = "..." string')
        unknown = sorted(set(table) - {"rule"})
        if unknown:
            raise FaultFileError(
                file, f"[[fault]] number {i}: unknown key {unknown[0]!r} (only rule)"
            )
        out.append(parse_rule(table["rule"]))
    return out


@dataclass(frozen=True)
class FaultSource:
    """Where a process's rules come from (``--fault`` texts, ``--faults``
    file), so a SIGHUP can read them again."""

    rules: tuple[str, ...] = ()
    file: Path | None = None

    def load(self) -> list[Rule]:
        return load_rules(self.rules, self.file)


# --------------------------------------------------------------- the matcher


@dataclass
class _RuleState:
    """What one rule remembers across the sessions of one plan."""

    rule: Rule
    random: random.Random | None = None
    fired: int = 0
    seen: deque[float] = field(default_factory=deque)  # rate=: times of matching steps
    greylist: dict[tuple[str, str, str], float] = field(default_factory=dict)  # first seen


class _Generation:
    """The rules in force, indexed by step, and their state; a reload makes a
    new one, sessions already running keep theirs."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.states = [
            _RuleState(r, random.Random(r.seed) if r.p is not None else None) for r in rules
        ]
        self.index: dict[str, list[_RuleState]] = {}
        for st in self.states:
            for step in st.rule.steps():
                self.index.setdefault(step, []).append(st)
        self.any = any(st.rule.step == "any" for st in self.states)
        self.chance = [st for st in self.states if st.random is not None]


class FaultPlan:
    """The rules of one proxy or sink process; :meth:`session` for each
    session accepted. ``clock``: seconds, for ``greylist=`` and ``rate=``
    windows (tests give a fake one)."""

    def __init__(
        self, rules: Sequence[Rule], *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.clock = clock
        self.sessions = 0
        self._gen = _Generation(rules)

    @property
    def rules(self) -> list[Rule]:
        return [st.rule for st in self._gen.states]

    def replace(self, rules: Sequence[Rule]) -> None:
        """New sessions follow ``rules`` (SIGHUP reload); counts start afresh."""
        self._gen = _Generation(rules)

    def session(self, client: str) -> SessionFaults:
        """A new session from ``client`` (``"ip:port"``); counts it for ``session#K``."""
        self.sessions += 1
        return SessionFaults(self, self._gen, client, self.sessions)


def _client_ip(client: str) -> str:
    host, colon, port = client.rpartition(":")
    if not colon or not port.isdigit():
        host = client
    return host.strip("[]").lower()


class SessionFaults:
    """The rules applied to one session: call :meth:`step` at each step as
    it happens and :meth:`learn` with what the client said."""

    def __init__(self, plan: FaultPlan, gen: _Generation, client: str, number: int) -> None:
        self._plan = plan
        self._gen = gen
        self.client = _client_ip(client)
        self.number = number
        self.said: dict[str, str] = {"client": self.client}
        self.rcpts: list[str] = []
        self._any = 0
        self._body_fired: set[tuple[int, int]] = set()
        # p=: one draw per session and rule, in session order, from the rule's seed
        self._picked = {
            id(st) for st in gen.chance if st.random and st.random.random() < (st.rule.p or 0)
        }
        live = [st for st in gen.states if self._live(st)]
        if len(live) == len(gen.states):
            self._index, self._any_live = gen.index, gen.any
        else:
            self._index = {}
            for st in live:
                for name in st.rule.steps():
                    self._index.setdefault(name, []).append(st)
            self._any_live = any(st.rule.step == "any" for st in live)
        #: the steps a rule can still fire at in this session (``any`` gives
        #: every command step): the relay holds back nothing for the others
        self.steps: frozenset[str] = frozenset(self._index)

    def _live(self, st: _RuleState) -> bool:
        """Whether the rule can fire in this session at all: what is known
        at connect (``session#K``, ``client=``, the ``p=`` draw) allows it."""
        rule = st.rule
        if rule.session is not None and rule.session != self.number:
            return False
        if rule.p is not None and id(st) not in self._picked:
            return False
        return all(
            fnmatch.fnmatchcase(self.client, pattern)
            for name, pattern in rule.match
            if name == "client"
        )

    @property
    def live(self) -> bool:
        """Some rule can still fire in this session: without one, the
        session is relayed exactly as with no rules."""
        return bool(self._index)

    def learn(
        self,
        *,
        helo: str | None = None,
        mail_from: str | None = None,
        rcpt: str | None = None,
        user: str | None = None,
    ) -> None:
        """What the client said so far, for ``helo=``, ``from=``, ``to=``
        (the recipient being matched: learn it before ``step("rcpt")``) and
        ``user=``. A new sender starts a new list of recipients."""
        if helo is not None:
            self.said["helo"] = helo.lower()
        if mail_from is not None:
            self.said["from"] = mail_from.lower()
            self.rcpts = []
            self.said.pop("to", None)
        if rcpt is not None:
            self.said["to"] = rcpt.lower()
            self.rcpts.append(rcpt.lower())
        if user is not None:
            self.said["user"] = user.lower()

    def step(
        self, step: str, *, nth: int = 1, transaction: int = 0, octets: int = 0
    ) -> Fault | None:
        """The fault for this step, or None: the first rule (in the order
        given) whose step, occurrence and selectors match and whose options
        let it fire."""
        rules = self._index.get(step)
        if rules is None:
            if not self._any_live:
                return None
        if self._any_live and step in COMMAND_STEPS:
            self._any += 1
        if rules is None:
            return None
        for st in rules:
            if self._matches(st, step, nth, transaction, octets) and self._fires(st):
                return st.rule.fault
        return None

    def _matches(self, st: _RuleState, step: str, nth: int, transaction: int, octets: int) -> bool:
        rule = st.rule
        if rule.nth is not None and rule.nth != (self._any if rule.step == "any" else nth):
            return False
        if rule.session is not None and rule.session != self.number:
            return False
        if rule.message is not None and rule.message != transaction:
            return False
        if rule.p is not None and id(st) not in self._picked:
            return False
        for name, pattern in rule.match:
            if name == "to" and step != "rcpt":
                if not any(fnmatch.fnmatchcase(r, pattern) for r in self.rcpts):
                    return False
                continue
            said = self.said.get(name)
            if said is None or not fnmatch.fnmatchcase(said, pattern):
                return False
        if step == "body":
            if octets < rule.body_at or (id(st), nth) in self._body_fired:
                return False
            self._body_fired.add((id(st), nth))
        return True

    def _fires(self, st: _RuleState) -> bool:
        rule = st.rule
        now = self._plan.clock() if rule.rate or rule.greylist is not None else 0.0
        if rule.rate is not None:
            count, window = rule.rate
            st.seen.append(now)
            while st.seen and st.seen[0] <= now - window:
                st.seen.popleft()
            if len(st.seen) <= count:
                return False
        if rule.greylist is not None:
            key = (self.client, self.said.get("from", ""), self.said.get("to", ""))
            first = st.greylist.setdefault(key, now)
            if now - first >= rule.greylist:
                return False  # retried after the window: it passes, as with greylisting
        if rule.times is not None:
            if st.fired >= rule.times:
                return False
        st.fired += 1
        return True
