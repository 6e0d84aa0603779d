"""``smtpproxy mock``: a recording's server side, played to a new client.

No I/O here (the server is ``mockserver.py``): a :class:`Script` is one
recorded session read once for playing; a :class:`Player` is one client's
session against it, client bytes in, reply bytes out, over the same
``ServerSide`` reading of the client as the embedded server.

Matching uses the step model (``protocol.steps``): a client's command is
placed as the recording's were (the second RCPT of the first message, the
EHLO after TLS) and answered with the recorded reply at that step when it
means the same (``diff.compare_commands``, the rules of ``replay`` and
``diff``). When it does not, the client is kept going with the most faithful
answer and the :class:`Departure` is reported; docs/mock.md gives the rules.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from dataclasses import dataclass
from pathlib import Path

from .auth import LOGIN_PROMPTS, REDACTED, b64decode, cram_md5_digest, credentials
from .diff import compare_commands
from .events import (
    SECRET_FIELDS,
    AuthDecode,
    AuthResponse,
    Command,
    Event,
    MessageData,
    MessageEnd,
    Opaque,
    OpaqueReason,
    Reply,
    Side,
)
from .protocol import (
    Exchange,
    Position,
    StepCounter,
    StepKind,
    exchanges,
    format_reply,
    parse_args,
)
from .recording import Recording, RecordingError
from .serverside import ServerSide

__all__ = ["Departure", "MockOptions", "Player", "Script", "Wait"]

#: the steps a client takes, in the order the recorded client took them
_CLIENT_STEPS = (StepKind.COMMAND, StepKind.AUTH, StepKind.BODY)


@dataclass(frozen=True)
class MockOptions:
    #: a departure ends the session with 421 instead of a faithful answer
    strict: bool = False
    #: wait before each reply as long as the recorded server took
    timing: bool = False
    #: the password a CRAM-MD5 digest (or a redacted recording's PLAIN or
    #: LOGIN password) is checked against
    password: str | None = None


@dataclass(frozen=True)
class Wait:
    """Wait this long before sending what follows (``--timing recorded``)."""

    seconds: float


@dataclass(frozen=True)
class Departure:
    """Where a client did not do what the recorded client did."""

    #: the step, named as ``--fault`` names steps: ``RCPT #2 (message 1)``
    step: str
    #: what the recorded client sent at that step ("" when it sent nothing there)
    recorded: str
    #: what this client sent ("" when it stopped before the step)
    sent: str
    #: how the two differ
    why: str
    #: what the mock answered
    answer: str

    def as_json(self) -> dict[str, str]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        recorded = self.recorded or "nothing"
        sent = self.sent or "nothing"
        return (
            f"departure at {self.step}: recorded {recorded!r}, this client {sent!r}: "
            f"{self.why}; answered {self.answer}"
        )


def step_name(verb: str, pos: Position) -> str:
    """A step as a person names it: ``RCPT #2 (message 1)``, ``EHLO #2 (after TLS)``."""
    name = {"<auth>": "AUTH answer", "<body>": "message body"}.get(verb, verb)
    where = f" (message {pos.transaction})" if pos.transaction else ""
    if pos.tls and not pos.transaction:
        where = " (after TLS)"
    return f"{name} #{pos.nth}{where}"


def _key(verb: str, pos: Position) -> tuple[str, int, int]:
    """Where a step stands: in a mail transaction by its place in that
    transaction, outside one by its place in the session."""
    if pos.transaction:
        return (verb, pos.transaction, pos.nth_in_transaction)
    return (verb, 0, pos.nth)


def _first_line(raw: bytes) -> str:
    return raw.split(b"\n", 1)[0].rstrip(b"\r").decode("utf-8", "backslashreplace")


def _said(ex: Exchange) -> str:
    """What a client step was, safe to print: an AUTH answer is not shown."""
    if ex.kind is StepKind.AUTH:
        return "(an AUTH answer)"
    if ex.kind is StepKind.BODY:
        return ex.label
    if ex.verb == "AUTH":
        return f"AUTH {ex.args.mechanism or ''}".strip()
    return ex.label


class Script:
    """One recorded session, read once for playing: its greeting, its client
    steps by place, and how long the server took to answer each."""

    def __init__(self, recording: Recording) -> None:
        self.path: Path = recording.path
        self.session = recording.header.session
        entries = recording.entries
        exs = exchanges(recording.events(), [e.t for e in entries])
        # how long the server took: from the client's last bytes to the reply
        took: dict[int, float] = {}
        last_client = 0.0
        for e in entries:
            if e.event.side is Side.CLIENT and e.event.raw:
                last_client = e.t
            elif isinstance(e.event, Reply):
                took[id(e.event)] = max(0.0, e.t - last_client)
        self.greeting: Reply | None = None
        self.greeting_wait = 0.0
        self.implicit_tls = False
        self.steps: dict[tuple[str, int, int], Exchange] = {}
        self.by_verb: dict[str, list[Exchange]] = {}
        self.order: list[Exchange] = []
        self.took: dict[int, float] = {}
        #: a 535 the recorded server gave: what a wrong password gets here
        self.auth_failure: Reply | None = None
        for ex in exs:
            if ex.kind is StepKind.GREETING and self.greeting is None and ex.reply is not None:
                self.greeting = ex.reply
                self.greeting_wait = next((e.t for e in entries if e.event is ex.reply), 0.0)
                self.implicit_tls = ex.position.tls > 0
            elif ex.kind in _CLIENT_STEPS and ex.reply is not None:
                self.steps.setdefault(_key(ex.verb, ex.position), ex)
                self.by_verb.setdefault(ex.verb, []).append(ex)
                self.order.append(ex)
                self.took[id(ex)] = took.get(id(ex.reply), 0.0)
                if ex.reply.code == 535 and self.auth_failure is None:
                    self.auth_failure = ex.reply
        #: the recorded client's commands, and their ids (``Player.finish``)
        self.commands = [ex for ex in self.order if ex.kind is StepKind.COMMAND]
        self.command_ids = frozenset(id(ex) for ex in self.commands)
        #: the recorded server's EHLO offered STARTTLS
        self.offers_starttls = any(
            "STARTTLS" in (ex.reply.capabilities or {})
            for ex in self.by_verb.get("EHLO", [])
            if ex.reply
        )
        if self.greeting is None:
            raise RecordingError(
                f"{self.path}: no server greeting in this recording, so no server to play "
                "(was the upstream reached?)"
            )

    def at(self, verb: str, pos: Position) -> Exchange | None:
        return self.steps.get(_key(verb, pos))

    def nearest(self, verb: str, pos: Position, like: Exchange | None = None) -> Exchange | None:
        """The recorded step with this verb nearest to ``pos``; one that means
        what ``like`` means first (a recipient the server answered before)."""
        found = self.by_verb.get(verb, [])
        if like is not None:
            same = [ex for ex in found if not compare_commands(ex, like)]
            found = same or found

        def distance(ex: Exchange) -> tuple[int, int, int]:
            p = ex.position
            return (
                abs(p.transaction - pos.transaction),
                abs(p.nth_in_transaction - pos.nth_in_transaction),
                abs(p.nth - pos.nth),
            )

        return min(found, key=distance, default=None)

    def following(self, ex: Exchange) -> list[Exchange]:
        """The steps after ``ex`` up to the next command: an AUTH's answers."""
        i = self.order.index(ex) + 1
        out: list[Exchange] = []
        while i < len(self.order) and self.order[i].kind is StepKind.AUTH:
            out.append(self.order[i])
            i += 1
        return out


@dataclass
class _Attempt:
    """An AUTH exchange in progress, and the recorded one it follows."""

    command: Exchange  # the recorded AUTH command
    answers: list[Exchange]  # the recorded answers after it
    client: list[AuthDecode | None]  # what this client's steps decoded to
    step: int = 0  # recorded answers played
    #: the mechanism this client chose when it is not the recorded one
    #: (PLAIN or LOGIN, run the usual way); "" when following the recording
    generic: str = ""
    #: the client's answers so far, its initial response counted
    #: (RFC 4954 section 4): which prompt comes next on the generic path
    given: int = 0

    def recorded_credentials(self) -> dict[str, str]:
        return credentials([self.command.auth, *(a.auth for a in self.answers)])

    def challenge(self) -> bytes | None:
        """The recorded CRAM-MD5 challenge, decoded (None: not CRAM-MD5)."""
        reply = self.command.reply
        if self.command.args.mechanism != "CRAM-MD5" or reply is None or reply.code != 334:
            return None
        return b64decode(reply.lines[0].strip() if reply.lines else "")

    def outcome(self) -> Reply | None:
        """The recorded exchange's final reply."""
        steps = [self.command, *self.answers]
        return steps[-1].reply


class Player(ServerSide[Wait]):
    """One client's session against a :class:`Script`."""

    def __init__(self, script: Script, options: MockOptions) -> None:
        super().__init__()
        self.script = script
        self.options = options
        self.counter = StepCounter()
        self.departures: list[Departure] = []
        self.played: set[int] = set()
        self._attempt: _Attempt | None = None
        self._body = hashlib.sha256()
        self._body_pos: Position | None = None
        self._bdat: Exchange | None = None
        self._chunks = hashlib.sha256()

    # -- the I/O loop's calls ---------------------------------------------

    def greeting(self) -> list[bytes | Wait]:
        greeting = self.script.greeting
        assert greeting is not None
        wait = [Wait(self.script.greeting_wait)] if self.options.timing else []
        return [*wait, self.reply_raw(greeting.raw)]

    def implicit_tls(self) -> None:
        self.conv.implicit_tls()
        self.counter.tls = 1

    def tls_established(self) -> None:
        """STARTTLS's handshake is done: the session starts again (RFC 3207
        section 4.2), in the recording's part after TLS."""
        self.conv.tls_established()
        self.counter.tls += 1
        self.counter.open = False
        self.starttls = False
        self._attempt = None

    def skip(self, verb: str) -> None:
        """A fault rule in front of the mock answered this client's command
        itself (it never came here): count its step all the same, and the
        recorded step there is not a step the client failed to take."""
        position = self.counter.place(verb)
        recorded = self.script.at(verb, position)
        if recorded is not None:
            self.played.add(id(recorded))
            for answer in self.script.following(recorded) if verb == "AUTH" else []:
                self.played.add(id(answer))

    def finish(self) -> list[Departure]:
        """The client is gone: the recorded steps it never took are one more
        departure. Returns all of the session's."""
        # the count from the set of played ids, the first by a scan that stops
        # there: a short session against a long recording does not walk it all
        script = self.script
        missing = len(script.commands) - len(self.played & script.command_ids)
        if missing:
            first = next(ex for ex in script.commands if id(ex) not in self.played)
            more = f" and {missing - 1} more command(s)" if missing > 1 else ""
            self.departures.append(
                Departure(
                    step_name(first.verb, first.position),
                    _said(first),
                    "",
                    f"this client stopped before the recorded client's {_said(first)!r}{more}",
                    "nothing (the client had gone)",
                )
            )
        return self.departures

    # -- answering ---------------------------------------------------------

    def respond(self, ev: Event) -> bytes | None:
        match ev:
            case Command():
                return self._command(ev)
            case AuthResponse():
                return self._auth_answer(ev)
            case MessageData(via="DATA"):
                if self._body_pos is None:
                    self._body_pos = self.counter.place("<body>")
                self._body.update(ev.raw)
            case MessageData():
                self._chunks.update(ev.raw)
            case MessageEnd(via="BDAT"):
                return self.chunk_done(last=True)
            case MessageEnd() if ev.complete:
                return self._message_end(ev)
            case Opaque(reason=OpaqueReason.LINE_TOO_LONG) if ev.raw.endswith(b"\n"):
                return self.reply(500, "5.5.2 line too long")
        return None

    def _send(self, ex: Exchange | None, reply: bytes) -> bytes:
        """``reply`` to the client, after the recorded server's pause when
        ``--timing recorded`` (``ex``: the recorded step it came from)."""
        if self.options.timing and ex is not None:
            wait = self.script.took.get(id(ex), 0.0)
            if wait > 0:
                self.put(Wait(wait))
        return self.reply_raw(reply)

    def _depart(self, ex: Exchange, recorded: Exchange | None, why: str, answer: bytes) -> bytes:
        """Report a departure at client step ``ex``; the answer, or with
        ``--strict`` the 421 that ends the session."""
        if self.options.strict:
            expected = _said(recorded) if recorded is not None else self._next_expected()
            answer = f"421 4.3.0 smtpproxy mock: expected {expected}\r\n".encode(
                "utf-8", "backslashreplace"
            )
            self.quit = True
        self.departures.append(
            Departure(
                step_name(ex.verb, ex.position),
                _said(recorded) if recorded is not None else "",
                _said(ex),
                why,
                _first_line(answer),
            )
        )
        return answer

    def _next_expected(self) -> str:
        nxt = next((ex for ex in self.script.order if id(ex) not in self.played), None)
        return _said(nxt) if nxt is not None else "nothing more (the recorded client had quit)"

    def _command(self, cmd: Command) -> bytes | None:
        position = self.counter.place(cmd.verb)
        if cmd.verb not in ("AUTH", "BDAT"):
            recorded = self.script.at(cmd.verb, position)
            if recorded is not None and recorded.client == cmd.raw:
                # the recorded client's very bytes mean what they meant: no
                # parsing or comparing (the mock's hot path, docs/performance.md)
                self.played.add(id(recorded))
                return self._ends(cmd.verb, self._send(recorded, self._raw(recorded)))
        ex = Exchange(
            StepKind.COMMAND, cmd.verb, cmd.raw, auth=cmd.auth, command=cmd,
            args=parse_args(cmd.verb, cmd.arg), position=position,
        )  # fmt: skip
        if cmd.verb == "BDAT":
            self.bdat_cmd, self._bdat = cmd, ex
            return None  # answered once its chunk is read: answer_chunk
        if cmd.verb == "AUTH":
            return self._auth_start(ex)
        return self._play(ex)

    def _play(self, ex: Exchange) -> bytes:
        """A command answered from the recording (docs/mock.md, "Matching")."""
        recorded = self.script.at(ex.verb, ex.position)
        differs = compare_commands(recorded, ex) if recorded is not None else []
        if recorded is not None and not differs:
            return self._answer(ex, recorded, self._send(recorded, self._raw(recorded)))
        if recorded is not None:
            # a different recipient at this step: the reply the server gave that
            # recipient if it saw it at another step, else this step's
            like = self.script.nearest(ex.verb, ex.position, like=ex)
            source = like if like is not None and not compare_commands(like, ex) else recorded
            self.played.add(id(recorded))
            answer = self._depart(ex, recorded, "; ".join(differs), self._raw(source))
            return self._answer(ex, source, self._send(source, answer))
        nearest = self.script.nearest(ex.verb, ex.position, like=ex)
        if nearest is not None:
            why = "the recorded client sent no such command at this step"
            answer = self._depart(ex, None, why, self._raw(nearest))
            return self._answer(ex, nearest, self._send(nearest, answer))
        why = "the recorded server never saw this command"
        if ex.verb == "STARTTLS" and self.script.offers_starttls:
            why = "the recorded client did not start TLS (its server offered it)"
        answer = self._depart(ex, None, why, self._own(ex))
        return self._answer(ex, None, self.reply_raw(answer))

    def _raw(self, ex: Exchange) -> bytes:
        assert ex.reply is not None
        return ex.reply.raw

    def _own(self, ex: Exchange) -> bytes:
        """The mock's answer to a verb the recording lacks."""
        match ex.verb:
            case "NOOP" | "RSET":
                return b"250 2.0.0 Ok (smtpproxy mock)\r\n"
            case "QUIT":
                return b"221 2.0.0 Bye (smtpproxy mock)\r\n"
            case "STARTTLS" if self.script.offers_starttls and not self.conv.encrypted:
                # the recorded server offered it and its client did not take it:
                # a server that offers STARTTLS performs it (RFC 3207 section 4)
                return b"220 2.0.0 Ready to start TLS (smtpproxy mock)\r\n"
        return b"502 5.5.1 smtpproxy mock: the recorded server never saw this command\r\n"

    def _answer(self, ex: Exchange, recorded: Exchange | None, sent: bytes) -> bytes:
        """Book-keeping after answering ``ex`` with ``sent``. A recorded step
        answered at its own place is played (its place as ``Script.at`` keys
        it, before or after TLS alike)."""
        if recorded is not None and _key(recorded.verb, recorded.position) == _key(
            ex.verb, ex.position
        ):
            self.played.add(id(recorded))
        return self._ends(ex.verb, sent)

    def _ends(self, verb: str, sent: bytes) -> bytes:
        """``sent`` answers ``verb``: the session ends, or TLS starts, after it."""
        code = sent[:3]
        if verb == "QUIT" or code in (b"221", b"421"):
            self.quit = True
        elif verb == "STARTTLS" and code == b"220":
            self.starttls = True
        return sent

    # -- AUTH (RFC 4954) ----------------------------------------------------

    def _auth_start(self, ex: Exchange) -> bytes:
        """AUTH as the recorded client sent it: the recorded exchange. Another
        mechanism, or an AUTH where the recorded client sent none: a
        departure, and PLAIN or LOGIN run as servers run them, the outcome
        decided by the recorded credentials (docs/mock.md)."""
        mechanism = ex.args.mechanism or ""
        recorded = self.script.at("AUTH", ex.position)
        same_initial = recorded is not None and (
            bool(recorded.args.initial) == bool(ex.args.initial)
        )
        if recorded is not None and recorded.args.mechanism == mechanism and same_initial:
            self._attempt = _Attempt(recorded, self.script.following(recorded), [ex.auth])
            return self._auth_reply(ex, recorded)
        if recorded is not None:
            self.played.add(id(recorded))
            why = f"mechanism {recorded.args.mechanism} -> {mechanism}"
            if recorded.args.mechanism == mechanism:
                # the same mechanism said the other way: the recorded replies
                # would answer steps this client is not at (RFC 4954 section 4)
                sent = "sent" if ex.args.initial else "did not send"
                why = f"this client {sent} an initial response, the recorded one did the opposite"
        else:
            why = "the recorded client did not authenticate at this step"
        source = recorded or self.script.nearest("AUTH", ex.position)
        if source is None or mechanism not in ("PLAIN", "LOGIN"):
            refusal = f"504 5.5.4 smtpproxy mock: the recording has no AUTH {mechanism} here\r\n"
            answer = self._depart(ex, recorded, why, refusal.encode("utf-8", "backslashreplace"))
            return self._answer(ex, None, self.reply_raw(answer))
        given = 1 if ex.args.initial else 0
        attempt = _Attempt(
            source, self.script.following(source), [ex.auth], generic=mechanism, given=given
        )
        self._attempt = attempt
        answer = self._generic_step(attempt, given=given)
        answer = self._depart(ex, recorded, why, answer)
        if self.quit:
            self._attempt = None
        return self._answer(ex, None, self.reply_raw(answer))

    def _auth_answer(self, ev: AuthResponse) -> bytes:
        ex = Exchange(
            StepKind.AUTH, "<auth>", ev.raw, auth=ev.auth, position=self.counter.place("<auth>")
        )
        attempt = self._attempt
        if attempt is None:  # not after one of our 334s: the Conversation would not say so
            return self.reply(503, "5.5.1 smtpproxy mock: no AUTH in progress")
        recorded = attempt.answers[attempt.step] if attempt.step < len(attempt.answers) else None
        if ev.text.strip() == "*":  # RFC 4954 section 4: the client cancels
            self._attempt = None
            if recorded is not None and not attempt.generic and recorded.client.strip() == b"*":
                self.played.add(id(recorded))
                return self._send(recorded, self._raw(recorded))
            cancelled = format_reply(501, "5.7.0 authentication cancelled")
            why = "this client cancelled the AUTH exchange"
            return self.reply_raw(self._depart(ex, None, why, cancelled))
        attempt.client.append(ev.auth)
        if attempt.generic:
            attempt.given += 1
            return self.reply_raw(self._generic_step(attempt, given=attempt.given))
        if recorded is None:
            self._attempt = None
            why = "the recorded client gave fewer AUTH answers"
            return self.reply_raw(self._depart(ex, None, why, self._auth_failed()))
        attempt.step += 1
        self.played.add(id(recorded))
        return self._auth_reply(ex, recorded)

    def _auth_reply(self, ex: Exchange, recorded: Exchange) -> bytes:
        """The recorded reply to this AUTH step: a challenge as recorded, the
        outcome once the credentials are checked against the recording's."""
        reply = recorded.reply
        assert reply is not None and self._attempt is not None
        if recorded.kind is StepKind.COMMAND:
            self.played.add(id(recorded))
        if reply.code == 334:
            return self._send(recorded, reply.raw)
        attempt, self._attempt = self._attempt, None
        why = self._wrongcredentials(attempt)
        if why is None or reply.code >= 400:
            return self._send(recorded, reply.raw)
        return self._send(recorded, self._depart(ex, recorded, why, self._auth_failed()))

    def _generic_step(self, attempt: _Attempt, given: int) -> bytes:
        """PLAIN or LOGIN, served the usual way: the next prompt (PLAIN's empty
        challenge, RFC 4616; LOGIN's "Username:" and "Password:"), or, once
        every answer is in, the outcome: the recorded success when the
        credentials are the recorded ones, 535 when they are not."""
        needed = 1 if attempt.generic == "PLAIN" else 2
        if given < needed:
            prompt = "" if attempt.generic == "PLAIN" else LOGIN_PROMPTS[given]
            return format_reply(334, prompt)
        self._attempt = None
        if self._wrong_password(attempt) is not None:
            return self._auth_failed()
        outcome = attempt.outcome()
        if outcome is not None and outcome.code == 235:
            return outcome.raw
        return format_reply(235, "2.7.0 Authentication successful (smtpproxy mock)")

    def _auth_failed(self) -> bytes:
        """What a wrong password gets: the recorded server's 535 if it gave
        one, else the usual 535 5.7.8 (RFC 4954 section 6)."""
        failure = self.script.auth_failure
        if failure is not None:
            return failure.raw
        return format_reply(535, "5.7.8 Authentication credentials invalid")

    def _wrongcredentials(self, attempt: _Attempt) -> str | None:
        """Why this client's credentials are not the recorded client's (None:
        they are, or the recording cannot say: it was redacted). Secrets are
        never quoted."""
        recorded = attempt.recorded_credentials()
        client = credentials(attempt.client)
        if recorded.get("user") != client.get("user"):
            return f"user {recorded.get('user')!r} -> {client.get('user')!r}"
        for name in sorted(SECRET_FIELDS & (recorded.keys() | client.keys())):
            expected = recorded.get(name)
            if expected == REDACTED:
                expected = self._from_password(name, attempt)
                if expected is None:
                    continue  # a redacted recording: the secret cannot be checked
            if expected != client.get(name):
                return f"the {name} is not the recorded client's"
        return None

    def _wrong_password(self, attempt: _Attempt) -> str | None:
        """A PLAIN or LOGIN password checked against what the recording
        knows: its password, or its CRAM-MD5 digest of the challenge it
        recorded, or ``--password``; None when right or nothing can say."""
        recorded = attempt.recorded_credentials()
        client = credentials(attempt.client)
        if recorded.get("user") != client.get("user"):
            return f"user {recorded.get('user')!r} -> {client.get('user')!r}"
        password = client.get("password")
        expected = recorded.get("password")
        if expected is not None and expected != REDACTED:
            return None if password == expected else "the password is not the recorded client's"
        digest, challenge = recorded.get("digest"), attempt.challenge()
        if digest not in (None, REDACTED) and challenge is not None and password is not None:
            ok = hmac.compare_digest(cram_md5_digest(password, challenge), digest or "")
            return None if ok else "the password does not give the recorded CRAM-MD5 digest"
        if self.options.password is not None and password != self.options.password:
            return "the password is not --password"
        return None

    def _from_password(self, name: str, attempt: _Attempt) -> str | None:
        """What ``--password`` makes of a redacted secret: the password
        itself, or the CRAM-MD5 digest of the recorded challenge (RFC 2195)."""
        password = self.options.password
        if password is None:
            return None
        if name == "password":
            return password
        challenge = attempt.challenge()
        if name == "digest" and challenge is not None:
            return cram_md5_digest(password, challenge)
        return None

    # -- messages (RFC 5321 section 4.1.1.4, RFC 3030) ------------------------

    def _message_end(self, end: MessageEnd) -> bytes:
        pos, self._body_pos = self._body_pos or self.counter.place("<body>"), None
        self.counter.open = False
        digest = self._body.hexdigest()
        self._body = hashlib.sha256()
        ex = Exchange(StepKind.BODY, "<body>", b"", message=end, position=pos)
        recorded = self.script.at("<body>", pos)
        if recorded is not None:
            self.played.add(id(recorded))
            if hashlib.sha256(recorded.client).hexdigest() == digest:
                return self._send(recorded, self._raw(recorded))
            size = recorded.message.size if recorded.message else len(recorded.client)
            why = (
                f"the message differs: {end.size} octets (sha256 {digest[:16]}), "
                f"recorded {size} (sha256 {hashlib.sha256(recorded.client).hexdigest()[:16]})"
            )
            return self._send(recorded, self._depart(ex, recorded, why, self._raw(recorded)))
        nearest = self.script.nearest("<body>", pos)
        answer = self._raw(nearest) if nearest is not None else b"250 2.0.0 Ok (smtpproxy mock)\r\n"
        return self._send(
            nearest, self._depart(ex, None, "the recorded client sent no message here", answer)
        )

    def answer_chunk(self, cmd: Command, octets: int, last: bool) -> bytes:
        ex, self._bdat = self._bdat, None
        assert ex is not None
        if last:
            self.counter.open = False
            digest, self._chunks = self._chunks.hexdigest(), hashlib.sha256()
            recorded = self.script.at("BDAT", ex.position)
            if recorded is not None and not compare_commands(recorded, ex):
                whole = b"".join(
                    b.chunk
                    for b in self.script.by_verb.get("BDAT", [])
                    if b.position.transaction == recorded.position.transaction
                )
                if hashlib.sha256(whole).hexdigest() != digest:
                    self.played.add(id(recorded))
                    why = f"the message differs: sha256 {digest[:16]}, recorded {hashlib.sha256(whole).hexdigest()[:16]}"
                    return self._send(
                        recorded, self._depart(ex, recorded, why, self._raw(recorded))
                    )
        return self._play(ex)
