"""Replay a recording against a server, as the recorded client would, and
compare each reply with the recorded one.

The replayer follows the protocol rather than the bytes: it says EHLO again,
does STARTTLS where the recording did, answers a new CRAM-MD5 challenge,
sends a body only when the server asked for it with 354, and stops cleanly
when the server's behaviour leaves the recording behind. Parsing is the
``Conversation``'s; the comparison rules are ``diff``'s.

Message content never goes where the server may read it as commands: a DATA
body goes as its content dot-stuffed again, only after 354 and only when the
recording holds its end; BDAT chunks go only to a server that offers CHUNKING
(to one that does not, the message goes with DATA, dot-stuffed), and none
after a refused chunk.
"""

from __future__ import annotations

import datetime as _dt
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import trio

from .auth import REDACTED, AuthError, b64decode, client_response
from .diff import Exchange, compare_replies, exchanges_of
from .events import Command, Event, MessageData, MessageEnd, Reply, Side, TlsEstablished
from .net import connect_reason, format_address
from .protocol import NEW_TRANSACTION, ClientState, Conversation, StepKind
from .protocol.text import Unstuffer, dot_stuff
from .recording import Recorder, Recording, new_session_id
from .tls import HandshakeFailed, client_context, handshake, handshake_facts

__all__ = [
    "ReplayOptions",
    "ReplayResult",
    "Step",
    "replay",
    "replay_all",
]


@dataclass
class ReplayOptions:
    target: tuple[str, int]
    tls: str = "auto"  # auto: STARTTLS where the recording did; implicit: TLS from the first byte
    cafile: Path | None = None
    insecure: bool = False
    user: str | None = None
    password: str | None = None
    strict: bool = False
    timeout: float = 30.0
    connect_timeout: float = 10.0
    save: Path | None = None

    @property
    def label(self) -> str:
        return format_address(self.target)


@dataclass
class Step:
    """One recorded exchange and what the target did with it."""

    exchange: Exchange
    reply: Reply | None = None
    sent: bool = True
    reasons: list[str] = field(default_factory=list)
    note: str | None = None
    payload: bytes | None = None  # what was sent, when it is not the recorded bytes
    index: int | None = None  # position among the recorded exchanges; None for a step replay added
    shown: str | None = None  # what the transcript shows as sent, when not the recorded step

    @property
    def differs(self) -> bool:
        return bool(self.reasons)


@dataclass
class ReplayResult:
    target: str
    steps: list[Step] = field(default_factory=list)
    error: str | None = None
    saved: Path | None = None

    @property
    def differences(self) -> int:
        return sum(1 for s in self.steps if s.differs)


class _Stop(Exception):
    """The replay cannot follow the recording any further."""


class _Unusable(_Stop):
    """The replay cannot go on for want of something only the user can give."""


class _Replayer:
    def __init__(self, recording: Recording, opts: ReplayOptions) -> None:
        self.rec = recording
        self.opts = opts
        self.result = ReplayResult(opts.label)
        self.conv = Conversation()
        self.replies: deque[Reply] = deque()
        self.stream: trio.abc.Stream | None = None
        self.recorder: Recorder | None = None
        self.start = 0.0
        self.mechanism: str | None = None
        self.challenge: str | None = None
        self._index: dict[int, int] = {}
        self._proxy_starttls = False
        self._chunks: dict[int, tuple[bytes, bool, bool]] = {}
        self._bodies: dict[int, tuple[bytes, bool]] = {}

    # -- I/O --------------------------------------------------------------

    def _observe(
        self,
        events: list[Event],
        fed: tuple[Side, bytes | bytearray] | None = None,
        call: str | None = None,
    ) -> None:
        """Take the Conversation's events (``fed``: for these bytes; ``call``:
        for this call of its; neither: events made here)."""
        for ev in events:
            if isinstance(ev, Reply):
                self.replies.append(ev)
        if self.recorder is not None:
            self.recorder.report(trio.current_time(), events, fed, call)

    async def _send(self, data: bytes) -> None:
        assert self.stream is not None
        self._observe(self.conv.feed(Side.CLIENT, data), fed=(Side.CLIENT, data))
        try:
            await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            raise _Stop("the target closed the connection") from None

    async def _reply(self) -> Reply | None:
        assert self.stream is not None
        with trio.move_on_after(self.opts.timeout):
            while not self.replies:
                try:
                    data = await self.stream.receive_some(65536)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
                if not data:
                    return None
                self._observe(self.conv.feed(Side.SERVER, data), fed=(Side.SERVER, data))
            return self.replies.popleft()
        raise _Stop(f"no reply within {self.opts.timeout:g}s (--timeout)")

    async def _handshake(self) -> None:
        assert self.stream is not None
        host = self.opts.target[0]
        context = client_context(self.opts.cafile, self.opts.insecure)
        try:
            stream = await handshake(
                self.stream,
                context,
                server_side=False,
                server_hostname=host,
                timeout=self.opts.timeout,
            )
        except HandshakeFailed as failed:
            raise _Stop(f"TLS handshake with the target failed: {failed.reason}") from None
        self.stream = stream
        facts = handshake_facts(stream._ssl_object)
        self._observe(
            [TlsEstablished(Side.SERVER, facts.version, facts.cipher, sni=host, peer=facts.peer)]
        )

    # -- the replay -------------------------------------------------------

    async def run(self) -> ReplayResult:
        exs = exchanges_of(self.rec)
        host, port = self.opts.target
        self.start = trio.current_time()
        if self.opts.save is not None:
            now = _dt.datetime.now(_dt.UTC)
            self.recorder = Recorder.create(
                self.opts.save,
                new_session_id(),
                now,
                self.start,
                client="smtpproxy replay",
                listen="",
                upstream=self.opts.label,
                replay_of=str(self.rec.path),
            )
            self.result.saved = self.recorder.path
        try:
            with trio.fail_after(self.opts.connect_timeout):
                self.stream = await trio.open_tcp_stream(host, port)
        except (OSError, trio.TooSlowError) as exc:
            self.result.error = f"cannot connect to {self.opts.label}: {connect_reason(exc)}"
            if self.recorder is not None:
                self.recorder.close(trio.current_time(), "proxy", self.result.error)
            return self.result
        try:
            upstream = upstream_tls_of(self.rec)
            if self.opts.tls == "implicit" or (self.opts.tls == "auto" and upstream == "implicit"):
                await self._handshake()
                self.conv.implicit_tls()
                self._observe([], call="implicit_tls")
            self._proxy_starttls = self.opts.tls == "auto" and upstream == "proxy-starttls"
            await self._follow(exs)
        except _Stop as stop:
            self.result.steps.append(
                Step(Exchange(StepKind.COMMAND, "<stop>"), None, False, [str(stop)])
            )
            if isinstance(stop, _Unusable):
                self.result.error = str(stop)
            await self._quit()
        finally:
            if self.stream is not None:
                await trio.aclose_forcefully(self.stream)
            self._observe(self.conv.close(), call="close")
            if self.recorder is not None:
                self.recorder.close(
                    trio.current_time(),
                    "client",
                    "replay finished",
                    {"differences": self.result.differences},
                )
        return self.result

    async def _quit(self) -> None:
        """Leave politely: cancel a SASL exchange first (RFC 4954 section 4),
        so QUIT is never taken for a credential."""
        with trio.move_on_after(2):
            try:
                if self.conv.client_state is ClientState.AUTH:
                    await self._send(b"*\r\n")
                    await self._reply()
                if not self.conv.in_message:  # QUIT would be message content
                    await self._send(b"QUIT\r\n")
            except _Stop:
                pass

    def _step(self, ex: Exchange, reply: Reply | None, note: str | None = None) -> Step:
        reasons = compare_replies(ex.reply, reply, self.opts.strict)
        if ex.injected is not None:
            # the client got the proxy's reply, not the server's: nothing of the
            # server's to compare with (a fault rule's reply, docs/faults.md)
            said = f"the recorded reply was the proxy's: {ex.injected.text}"
            note, reasons = f"{said}; {note}" if note else said, []
        step = Step(ex, reply, True, reasons, note)
        step.index = self._index.get(id(ex))
        self.result.steps.append(step)
        return step

    def _skip(self, ex: Exchange, why: str, differs: bool = True) -> None:
        step = Step(ex, None, False, [f"not sent: {why}"] if ex.reply and differs else [], why)
        step.index = self._index.get(id(ex))
        self.result.steps.append(step)

    async def _added(self, verb: str, note: str) -> Reply:
        """Send a command the recording does not have (a step of its own,
        not compared); stop if the target does not answer."""
        ex = Exchange(StepKind.COMMAND, verb, verb.encode("ascii") + b"\r\n")
        await self._send(ex.client)
        reply = await self._reply()
        self.result.steps.append(Step(ex, reply, True, [], note))
        if reply is None:
            raise _Stop("the target closed the connection")
        return reply

    async def _follow(self, exs: list[Exchange]) -> None:
        self._index = {id(x): k for k, x in enumerate(exs)}
        i = 0
        n = len(exs)
        while i < n:
            ex = exs[i]
            if ex.kind == StepKind.GREETING:
                reply = await self._reply()
                self._step(ex, reply)
                if reply is None:
                    raise _Stop("the target closed the connection")
                i += 1
                continue
            if ex.kind == StepKind.UNSOLICITED:
                i += 1
                continue
            if ex.kind == StepKind.BODY:
                i = await self._data_body(exs, i)
                continue
            if ex.kind == StepKind.COMMAND and ex.verb == "DATA" and self._cut_short(exs, i):
                i = await self._drop_data(exs, i)
                continue
            if ex.kind == StepKind.COMMAND and ex.verb == "BDAT" and not self._may_send_chunk(ex):
                if "CHUNKING" not in self.conv.capabilities:
                    i = await self._bdat_as_data(exs, i)
                else:
                    i = await self._drop_message(exs, i, "the recorded chunk is cut short")
                continue
            group = [ex]
            if (
                ex.kind == StepKind.COMMAND
                and ex.group is not None
                and "PIPELINING" in self.conv.capabilities
            ):
                # a BDAT ends a group: the next chunk waits for its reply
                j = i + 1
                while (
                    j < n
                    and group[-1].verb != "BDAT"
                    and exs[j].kind == StepKind.COMMAND
                    and exs[j].group == ex.group
                    and (exs[j].verb != "BDAT" or self._may_send_chunk(exs[j]))
                    and (exs[j].verb != "DATA" or not self._cut_short(exs, j))
                ):
                    group.append(exs[j])
                    j += 1
            payloads = [self._payload(x) for x in group]
            await self._send(b"".join(payloads))
            skip_to = i + len(group)
            for x, payload in zip(group, payloads):
                reply = await self._reply()
                step = self._step(x, reply)
                if payload != x.client:
                    step.payload = payload
                if reply is None:
                    raise _Stop("the target closed the connection")
                skip_to = await self._adapt(exs, skip_to, x, reply)
            i = skip_to

    async def _adapt(self, exs: list[Exchange], nxt: int, ex: Exchange, reply: Reply) -> int:
        """Follow the target where it leaves the recording; return the index
        of the next exchange to play."""
        recorded = ex.reply.code if ex.reply else None
        if ex.verb in ("EHLO", "HELO") and self._proxy_starttls and 200 <= reply.code < 300:
            await self._upgrade_like_the_proxy(ex)
            return nxt
        if ex.verb == "DATA":
            body = nxt < len(exs) and exs[nxt].kind == StepKind.BODY
            if reply.code != 354 and body:
                self._skip(exs[nxt], f"the target answered DATA with {reply.code}")
                return nxt + 1
            if reply.code == 354 and not body:
                await self._send(b".\r\n")
                empty = Exchange(
                    StepKind.BODY, "<body>", b".\r\n", message=MessageEnd(size=0, headers={})
                )
                self._step(
                    empty, await self._reply(), "empty message ends the DATA the target accepted"
                )
            return nxt
        if ex.verb == "BDAT" and ex.kind == StepKind.COMMAND and not 200 <= reply.code < 300:
            why = f"the target refused an earlier chunk of this message with {reply.code}"
            return await self._drop_message(exs, nxt, why + " (RFC 3030 section 2)")
        if ex.verb == "STARTTLS" or (ex.kind == StepKind.COMMAND and ex.verb == "STARTTLS"):
            if reply.code == 220:
                await self._handshake()
                self._observe(self.conv.tls_established(), call="tls_established")
                return nxt
            if recorded == 220:
                raise _Stop("the target refused STARTTLS; the rest is not sent in clear")
            return nxt
        if ex.verb == "AUTH" or ex.kind == StepKind.AUTH:
            if ex.verb == "AUTH":
                self.mechanism = ex.args.mechanism
            if reply.code == 334:
                self.challenge = reply.lines[0] if reply.lines else ""
                if b64decode(self.challenge) is None:
                    step = self.result.steps[-1]
                    assert step.exchange is ex
                    why = "the target's challenge is not valid base64"
                    step.reasons.append(f"{why} (RFC 4954 section 4)")
                    return await self._cancel_auth(exs, nxt, why)
                if nxt >= len(exs) or exs[nxt].kind != StepKind.AUTH:
                    why = "the recording has no answer for this challenge"
                    return await self._cancel_auth(exs, nxt, why)
                return nxt
            while nxt < len(exs) and exs[nxt].kind == StepKind.AUTH:
                self._skip(exs[nxt], f"the target ended AUTH with {reply.code}")
                nxt += 1
        return nxt

    async def _cancel_auth(self, exs: list[Exchange], nxt: int, why: str) -> int:
        """End the AUTH exchange the target is in with ``*`` (RFC 4954
        section 4) and send none of the recording's answers in it; return
        the index of the next exchange to play."""
        await self._send(b"*\r\n")
        reply = await self._reply()
        cancel = Exchange(StepKind.AUTH, "<auth>", b"*\r\n")
        self.result.steps.append(Step(cancel, reply, True, [], f"cancelled: {why}"))
        if reply is None:
            raise _Stop("the target closed the connection")
        while nxt < len(exs) and exs[nxt].kind == StepKind.AUTH:
            self._skip(exs[nxt], "the AUTH exchange was cancelled")
            nxt += 1
        return nxt

    # -- DATA bodies (RFC 5321 section 4.1.1.4) -----------------------------

    def _content(self, ex: Exchange) -> tuple[bytes, bool]:
        """A recorded DATA body as the message content a server stored (the
        dot-stuffing undone, RFC 5321 section 4.5.2), and whether the body
        ends with its terminator in the recording."""
        known = self._bodies.get(id(ex))
        if known is None:
            unstuffer = Unstuffer()
            content = unstuffer.feed(ex.client)
            known = (content, unstuffer.done)
            self._bodies[id(ex)] = known
        return known

    def _cut_short(self, exs: list[Exchange], i: int) -> bool:
        """Whether the DATA at ``i`` is followed by a body the recording
        holds without its end: after 354 the target would wait for the rest,
        and no command could follow it."""
        nxt = i + 1
        return nxt < len(exs) and exs[nxt].kind == StepKind.BODY and not self._content(exs[nxt])[1]

    async def _drop_data(self, exs: list[Exchange], i: int) -> int:
        """Send neither the DATA at ``i`` nor its body cut short; RSET
        unless the recording ends the transaction itself."""
        why = "the recorded message is cut short (no '.' line ends its body)"
        self._skip(exs[i], why)
        self._skip(exs[i + 1], why)
        await self._clean(exs, i + 2)
        return i + 2

    async def _data_body(self, exs: list[Exchange], i: int) -> int:
        """Send a recorded DATA body as its content dot-stuffed again, so
        that the only '.' line a server can find, strict about CRLF or not,
        is the terminator (RFC 5321 sections 4.5.2 and 2.3.8): the recorded
        octets may hold a '.' line between bare CR or LF, after which a
        lenient server would read the rest as commands. A body of CRLF
        lines goes byte for byte as recorded. It goes only while the target
        waits for message data (its 354 to the DATA before it)."""
        ex = exs[i]
        content, whole = self._content(ex)
        if self.conv.client_state is not ClientState.DATA:
            self._skip(ex, "the target is not reading message data")
            return i + 1
        if not whole:
            self._skip(ex, "the recorded message is cut short (no '.' line ends its body)")
            raise _Stop("the recorded message is cut short; the connection closes before its end")
        wire, ends_changed = dot_stuff(content)
        await self._send(wire)
        reply = await self._reply()
        note = None
        if ends_changed:
            note = "line ends made CRLF for DATA (RFC 5321 section 2.3.8)"
        elif wire != ex.client:
            note = (
                "a leading dot not doubled in the recording is left off, "
                "as a server takes it off (RFC 5321 section 4.5.2)"
            )
        step = self._step(ex, reply, note)
        if wire != ex.client:
            what = "a bare CR or LF" if ends_changed else "a line with a leading dot not doubled"
            why = f"sent as its content, dot-stuffed again: the recorded body has {what}"
            step.reasons.insert(0, why)
            step.payload = wire
            step.shown = ex.label
        if reply is None:
            raise _Stop("the target closed the connection")
        return i + 1

    # -- BDAT (RFC 3030) ---------------------------------------------------

    def _chunk(self, ex: Exchange) -> tuple[bytes, bool, bool]:
        """A recorded BDAT step read again by the protocol module: the
        chunk's octets, whether all the octets its command line announced
        are there, and whether it ends the message (LAST)."""
        known = self._chunks.get(id(ex))
        if known is None:
            conv = Conversation(greeted=True)
            events = conv.feed(Side.CLIENT, ex.client)
            content = b"".join(ev.raw for ev in events if isinstance(ev, MessageData))
            known = (content, not conv.in_message, any(isinstance(ev, MessageEnd) for ev in events))
            self._chunks[id(ex)] = known
        return known

    def _may_send_chunk(self, ex: Exchange) -> bool:
        """A recorded BDAT step may go as recorded: the target offers
        CHUNKING, and the chunk is whole (cut short, the target would take
        what follows it for the rest of the chunk)."""
        return "CHUNKING" in self.conv.capabilities and self._chunk(ex)[1]

    def _bdat_run(self, exs: list[Exchange], i: int) -> list[int]:
        """The indexes of the BDAT steps of one message from ``i``: up to
        the one with LAST, or to the first step that is not a BDAT."""
        run: list[int] = []
        while i < len(exs) and exs[i].kind == StepKind.COMMAND and exs[i].verb == "BDAT":
            run.append(i)
            if self._chunk(exs[i])[2]:
                break
            i += 1
        return run

    async def _drop_message(self, exs: list[Exchange], i: int, why: str) -> int:
        """Send none of the BDAT steps of this message from ``i`` on (a
        refused chunk fails the transaction and no further chunk may follow
        it, RFC 3030 section 2); RSET unless the recording ends the
        transaction itself. Return the index of the next exchange to play."""
        for k in self._bdat_run(exs, i):
            self._skip(exs[k], why)
            i = k + 1
        await self._clean(exs, i)
        return i

    async def _clean(self, exs: list[Exchange], nxt: int) -> None:
        """The transaction did not end as recorded: RSET, so the next one
        starts clean (RFC 5321 section 4.1.1.5), unless the recording's next
        command is RSET or QUIT, or there is none."""
        if nxt >= len(exs) or (
            exs[nxt].kind == StepKind.COMMAND and exs[nxt].verb in ("RSET", "QUIT")
        ):
            return
        await self._added(
            "RSET", "RSET: the transaction did not end as recorded (RFC 5321 section 4.1.1.5)"
        )

    async def _bdat_as_data(self, exs: list[Exchange], i: int) -> int:
        """The target does not offer CHUNKING, so it would read a chunk's
        octets as commands (RFC 3030 section 2 sends them right after the
        command line, without waiting for a reply): send the message with
        DATA instead, dot-stuffed, after 354, and compare the reply to its
        end with the recorded reply to the last chunk. A message that is
        not whole in the recording, or whose MAIL said BODY=BINARYMIME (only
        BDAT may carry that, RFC 3030 section 3), is not sent."""
        run = self._bdat_run(exs, i)
        chunks = [self._chunk(exs[k]) for k in run]
        nxt = run[-1] + 1
        why = None
        if any(not whole for _, whole, _ in chunks):
            why = "the recorded chunk is cut short"
        elif not chunks[-1][2]:
            why = "the recorded message has no last chunk (BDAT ... LAST)"
        elif _binarymime(exs, i):
            why = "BODY=BINARYMIME needs BDAT, which the target does not offer (RFC 3030 section 3)"
        if why is not None:
            return await self._drop_message(exs, i, why)
        reply = await self._added(
            "DATA",
            "the target does not offer CHUNKING: the BDAT message goes with DATA, dot-stuffed",
        )
        if reply.code != 354:
            return await self._drop_message(exs, i, f"the target answered DATA with {reply.code}")
        content = b"".join(content for content, _, _ in chunks)
        wire, changed = dot_stuff(content)
        for k in run[:-1]:
            self._skip(exs[k], "its chunk goes in the DATA body below", differs=False)
        last = exs[run[-1]]
        await self._send(wire)
        end = await self._reply()
        note = "line ends made CRLF for DATA (RFC 5321 section 2.3.8)" if changed else None
        step = self._step(last, end, note)
        step.reasons.insert(0, "sent with DATA: the target does not offer CHUNKING")
        step.payload = wire
        step.shown = f"(message body from BDAT, {len(content)} octets)"
        if end is None:
            raise _Stop("the target closed the connection")
        return nxt

    async def _upgrade_like_the_proxy(self, ehlo: Exchange) -> None:
        """The recording was made with ``--upstream-tls starttls``: the proxy
        upgraded the upstream leg itself after the first EHLO. Do the same, so
        nothing the recording sent under TLS goes out in clear."""
        self._proxy_starttls = False
        start = Exchange(StepKind.COMMAND, "STARTTLS", b"STARTTLS\r\n")
        await self._send(start.client)
        reply = await self._reply()
        self.result.steps.append(
            Step(start, reply, True, [], "STARTTLS as the proxy did (--upstream-tls starttls)")
        )
        if reply is None or reply.code != 220:
            raise _Stop(
                "the target refused STARTTLS, which the recorded upstream leg used; the rest is not sent in clear"
            )
        await self._handshake()
        self._observe(self.conv.tls_established(), call="tls_established")
        again = Exchange(StepKind.COMMAND, ehlo.verb, ehlo.client)
        await self._send(ehlo.client)
        self.result.steps.append(Step(again, await self._reply(), True, [], "EHLO again over TLS"))

    # -- what to send ------------------------------------------------------

    def _payload(self, ex: Exchange) -> bytes:
        opts = self.opts
        if ex.kind == StepKind.AUTH:
            return self._auth_answer(ex)
        if ex.kind == StepKind.COMMAND and ex.verb == "AUTH":
            mech, initial = ex.args.mechanism, ex.args.initial
            if mech and initial and (opts.user or opts.password or _redacted(ex)):
                return f"AUTH {mech} ".encode() + self._credential(mech, None) + b"\r\n"
        return ex.client

    def _auth_answer(self, ex: Exchange) -> bytes:
        mech = self.mechanism or (ex.auth.mechanism if ex.auth else "")
        if ex.client.strip() == b"*":
            return ex.client
        if mech == "CRAM-MD5" or self.opts.user or self.opts.password or _redacted(ex):
            return self._credential(mech, self.challenge or "") + b"\r\n"
        return ex.client

    def _credential(self, mech: str, challenge: str | None) -> bytes:
        """A fresh SASL payload from --user/--password and the recorded user:
        the initial response (``challenge`` None) or the answer to the
        target's challenge (auth.client_response)."""
        user = self.opts.user or self._recorded_user() or ""
        password = self.opts.password
        if password is None:
            why = (
                "the recording is redacted"
                if self._is_redacted()
                else f"AUTH {mech} answers a new challenge"
            )
            raise _Unusable(f"{why}: give the password with --password or SMTPPROXY_PASSWORD")
        payload = client_response(mech, user, password, challenge)
        if payload is AuthError.UNKNOWN_MECHANISM:
            raise _Stop(f"cannot make new credentials for AUTH {mech}")
        if isinstance(payload, AuthError):
            raise _Stop(f"cannot answer AUTH {mech}: {payload}")
        return payload

    def _is_redacted(self) -> bool:
        return any("redacted" in getattr(ev, "flags", ()) for ev in self.rec.events())

    def _recorded_user(self) -> str | None:
        for ev in self.rec.events():
            auth = getattr(ev, "auth", None)
            if auth is not None and auth.fields.get("user"):
                return str(auth.fields["user"])
        return None


def upstream_tls_of(rec: Recording) -> str:
    """How the recorded upstream leg was encrypted: ``implicit`` (TLS before
    the greeting), ``starttls`` (the client's STARTTLS), ``proxy-starttls``
    (the proxy upgraded it on its own, ``--upstream-tls starttls``) or ``none``."""
    greeted = False
    client_starttls = False
    for ev in rec.events():
        if isinstance(ev, Reply):
            greeted = True
        elif isinstance(ev, Command) and ev.verb == "STARTTLS":
            client_starttls = True
        elif isinstance(ev, TlsEstablished) and ev.side is Side.SERVER:
            if not greeted:
                return "implicit"
            return "starttls" if client_starttls else "proxy-starttls"
    return "none"


def _binarymime(exs: list[Exchange], i: int) -> bool:
    """Whether the MAIL command of the transaction that step ``i`` is in
    said BODY=BINARYMIME (RFC 3030 section 3)."""
    for ex in reversed(exs[:i]):
        if ex.kind == StepKind.COMMAND and ex.verb == "MAIL":
            return ex.args.params.get("BODY", "").upper() == "BINARYMIME"
        if ex.kind == StepKind.COMMAND and ex.verb in NEW_TRANSACTION:
            break
    return False


def _redacted(ex: Exchange) -> bool:
    return bool(ex.auth and REDACTED in ex.auth.fields.values())


async def replay(recording: Recording, opts: ReplayOptions) -> ReplayResult:
    """Replay one recording against one target."""
    return await _Replayer(recording, opts).run()


async def replay_all(recording: Recording, options: list[ReplayOptions]) -> list[ReplayResult]:
    """Replay one recording against several targets at the same time; the
    results come back in the order of ``options``."""
    results = [ReplayResult(o.label) for o in options]

    async def one(slot: int, opts: ReplayOptions) -> None:
        results[slot] = await replay(recording, opts)

    async with trio.open_nursery() as nursery:
        for slot, opts in enumerate(options):
            nursery.start_soon(one, slot, opts)
    return results
