"""The relay's faults: ``--fault`` rules (smtpproxy/faults.py) applied to a
live session between a real client and a real upstream.

``FaultSteps`` is the part of ``relay.Session`` that runs when a fault plan
is configured. Without one the session never comes here and forwards each
read as it comes. With one, the client's bytes go upstream event by event
(a command line only once whole, message octets as they come), so that at
each step the session can ask ``SessionFaults.step`` before the step goes
on; the server's bytes go to the client reply by reply, so that a reply can
be replaced or an EHLO reply rewritten. Every event still goes to the
observer first, and the bytes that go on are exactly the events' bytes: a
session no rule touches relays the same octets as without rules.

Every fault that fires is a ``Note`` of kind ``fault`` naming the rule (a
``!!`` line in the transcript, a note in the recording); a reply the proxy
gives the client in the server's place is fed to the Conversation as the
server's, with the note standing for it, as the proxy's own STARTTLS reply
is. docs/faults.md says what each action does here.
"""

from __future__ import annotations

import socket
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from .events import (
    Command,
    MessageData,
    MessageEnd,
    Note,
    NoteKind,
    Opaque,
    OpaqueReason,
    Reply,
    Side,
    TlsStart,
)
from .faults import ActionKind, Fault, FaultPlan, SessionFaults
from .protocol import GREETING, StepCounter, parse_args
from .tlsmodes import rewrite_capabilities

if TYPE_CHECKING:
    from .events import Event
    from .protocol import Conversation
    from .relay import Proxy
    from .tlsmodes import TlsArrangement

__all__ = ["FaultSteps", "ThrottledStream", "unsupported"]

#: the end of a DATA body the proxy withholds (RFC 5321 section 4.1.1.4)
_DOT = b".\r\n"
_STARTTLS = frozenset({"STARTTLS"})


def unsupported(plan: FaultPlan, fixed_cert: bool = False) -> str | None:
    """A one-line refusal for a rule ``record`` cannot apply, or None: it is
    refused at start rather than let it never fire. ``tls: cert ...`` shows
    leaves minted by the local CA (``tls.CertificateAuthority.leaf``), so it
    cannot go with ``--cert``/``--key`` (``fixed_cert``)."""
    for rule in plan.rules:
        if fixed_cert and rule.fault.kind is ActionKind.TLS_CERT:
            return (
                f"fault rule {rule.text!r}: 'tls: cert ...' shows certificates minted by "
                "the local CA; drop --cert/--key, or the rule"
            )
    return None


@dataclass(frozen=True, slots=True)
class _Expect:
    """A reply the upstream owes for a step the proxy forwarded: ``fault``
    acts on it when it comes (REPLACE, or REMOVE/ADD on EHLO)."""

    fault: Fault | None = None


_PLAIN = _Expect()


class ThrottledStream(trio.abc.Stream):
    """``throttle RATE``: what goes to the client leaves at most ``rate``
    octets a second, in tenth-of-a-second slices; what comes from it is not
    slowed."""

    def __init__(
        self, inner: trio.abc.Stream, rate: int, progress: Callable[[], None] | None = None
    ) -> None:
        self.inner = inner
        self.rate = max(1, rate)
        #: told after each slice: a session writing slowly is not idle
        self.progress = progress

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        step = max(1, self.rate // 10)
        while view:
            piece, view = view[:step], view[step:]
            await self.inner.send_all(piece)
            if self.progress is not None:
                self.progress()
            await trio.sleep(len(piece) / self.rate)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def send_eof(self) -> None:
        await self.inner.send_eof()  # type: ignore[attr-defined]

    async def aclose(self) -> None:
        await self.inner.aclose()


def _raw_socket(stream: trio.abc.Stream) -> socket.socket | None:
    """The socket under a client's stream (TLS and throttling wrap it)."""
    while True:
        if isinstance(stream, trio.SocketStream):
            return stream.socket  # type: ignore[return-value]
        inner = getattr(stream, "transport_stream", None) or getattr(stream, "inner", None)
        if not isinstance(inner, trio.abc.Stream):
            return None
        stream = inner


class FaultSteps:
    """Fault rules, for ``relay.Session`` (one of its base classes)."""

    if TYPE_CHECKING:  # what the session gives these steps
        proxy: Proxy
        conv: Conversation
        tls: TlsArrangement
        streams: dict[Side, trio.abc.Stream]
        closed_by: str
        _scope: trio.CancelScope
        _resume_client: trio.Event
        _activity: float
        _cert_fault: Fault | None

        def observe(
            self,
            events: list[Event],
            now: float | None = None,
            fed: tuple[Side, bytes | bytearray] | None = None,
            call: str | None = None,
            note: Note | None = None,
        ) -> None: ...

        def _end(self, by: str, reason: str) -> None: ...

        def _client_clocks(self, now: float) -> None: ...

        async def _send(self, side: Side, data: bytes | bytearray) -> None: ...

        async def _with_care(self, side: Side, data: bytes | bytearray) -> bool: ...

        async def _local_starttls(self) -> bool: ...

    def _init_faults(self, faults: SessionFaults) -> None:
        self.faults = faults
        self._counter = StepCounter()
        if self.proxy.config.listen_tls:
            self._counter.tls = 1
        #: client events not yet acted on, in wire order
        self._units: deque[Event] = deque()
        #: client octets received and not yet in an event (a partial line)
        self._client_unsent = bytearray()
        #: server octets received and not yet sent on (a partial reply)
        self._server_unsent = bytearray()
        #: the replies the upstream owes, first the greeting (RFC 5321 4.1.1)
        self._expect: deque[_Expect] = deque([_PLAIN])
        self._answered: trio.Event | None = None
        self._draining = False
        self._drained = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._skip_chunk = False  # a BDAT the proxy answered: its chunk stays here
        self._body_octets = 0
        self._body_prev = b"\r\n"  # the last octets sent of the body (for its end)
        self._body_held = b""  # a possible start of the body's end, held back
        self._quiet_upstream = False  # the proxy closed the upstream on purpose
        self._client_eof = False

    # -- notes ---------------------------------------------------------------

    def _fault_note(self, fault: Fault, what: str, raw: bytes = b"") -> Note:
        return Note(Side.SERVER, NoteKind.FAULT, f"fault {fault.rule}: {what}", raw)

    def _writing(self) -> None:
        """A throttled write to the client moved on: the session is not idle."""
        self._activity = trio.current_time()

    def _fired(self, fault: Fault, what: str, raw: bytes = b"") -> None:
        self.observe([self._fault_note(fault, what, raw)])

    # -- the client's side ------------------------------------------------------

    async def _fault_client_read(self, data: bytes | bytearray, now: float) -> bool:
        """A client read when faults are on: observe it, then act on its
        events in order. False ends the session."""
        self.tls.client_silent = False
        events = self.conv.feed(Side.CLIENT, data)
        self.observe(events, now, fed=(Side.CLIENT, data))
        self._client_clocks(now)
        self._client_unsent += data
        self._queue(events)
        while self._draining:  # a drain the server side started: let it finish
            await self._drained.wait()
        return await self._drain() if self._units else True

    def _queue(self, events: list[Event]) -> None:
        """Take the client's events to act on, in wire order (some come out
        of a server read: what the client sent before a 354 it did not wait
        for)."""
        unsent = self._client_unsent
        for ev in events:
            if ev.side is Side.CLIENT and ev.raw:
                del unsent[: len(ev.raw)]
                self._units.append(ev)
            elif type(ev) is MessageEnd:
                self._units.append(ev)

    def _take_unsent(self) -> bytes:
        """The client's partial line, when it has finished sending (its
        half-close goes upstream after it, as without rules)."""
        self._client_eof = True
        out = bytes(self._client_unsent)
        self._client_unsent.clear()
        return out

    async def _drain(self) -> bool:
        """Act on the client's events in order. False ends the session."""
        self._draining = True
        try:
            units = self._units
            while units:
                ev = units.popleft()
                if self._client_eof:
                    continue
                if not await self._act(ev):
                    units.clear()
                    return False
            return True
        finally:
            self._draining = False
            self._drained.set()
            self._drained = trio.Event()

    async def _drain_task(self) -> None:
        """A drain started by the server side, with the pump's error rules."""
        try:
            ok = await self._drain()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            side = getattr(exc, "side", Side.CLIENT)
            self._end(side.value, f"connection lost: {exc.__cause__ or exc}")
            ok = False
        if not ok:
            self._scope.cancel()

    async def _act(self, ev: Event) -> bool:
        match ev:
            case Command():
                return await self._command(ev)
            case MessageData(via="DATA"):
                return await self._body(ev)
            case MessageData():
                if self._skip_chunk:
                    self._skip_chunk = not ev.last
                    return True
                await self._send(Side.SERVER, ev.raw)
                return True
            case MessageEnd():
                self._counter.open = False  # the message ends its transaction
                return True
            case Opaque(reason=OpaqueReason.PLAINTEXT_AFTER_STARTTLS):
                return True  # never carried into TLS (RFC 3207 section 6)
            case _:
                await self._send(Side.SERVER, ev.raw)
                return True

    async def _command(self, ev: Command) -> bool:
        verb = ev.verb
        faults = self.faults
        if verb in ("EHLO", "HELO"):
            faults.learn(helo=ev.arg.strip())
        elif verb == "MAIL" and ev.path is not None:
            faults.learn(mail_from=ev.path)
        elif verb == "RCPT" and ev.path is not None:
            faults.learn(rcpt=ev.path)
        elif verb == "AUTH" and ev.auth is not None and ev.auth.fields.get("user"):
            faults.learn(user=ev.auth.fields["user"])
        elif verb == "DATA":
            self._body_octets, self._body_prev, self._body_held = 0, b"\r\n", b""
        pos = self._counter.place(verb)
        fault = faults.step(verb.lower(), nth=pos.nth, transaction=pos.transaction)
        bdat = parse_args(verb, ev.arg) if verb == "BDAT" else None
        if bdat is not None and bdat.last:
            dot = self._counter.place("<dot>")
            if fault is None:
                fault = faults.step("dot", nth=dot.nth, transaction=pos.transaction)
        if fault is None:
            return await self._forward_command(ev, _PLAIN)
        kind = fault.kind
        if kind is ActionKind.REPLY:
            self._skip_chunk = bdat is not None and bool(bdat.size)
            return await self._answer(fault, verb)
        if kind in (ActionKind.REPLACE, ActionKind.REMOVE, ActionKind.ADD):
            return await self._forward_command(ev, _Expect(fault))
        if not await self._connection_fault(fault, f"at {verb}"):
            return False
        return await self._forward_command(ev, _PLAIN)

    async def _forward_command(self, ev: Command, expect: _Expect) -> bool:
        self._expect.append(expect)
        if ev.verb == "STARTTLS":
            if self.tls.answers_starttls():
                self._expect.pop()
                await self._answered_before()
                return await self._local_starttls()
            await self._send(Side.SERVER, ev.raw)
            await self._resume_client.wait()  # the server side handles the 220
            self._resume_client = trio.Event()
            return not self.closed_by
        await self._send(Side.SERVER, ev.raw)
        return True

    async def _answered_before(self) -> None:
        """Wait until the upstream has answered every step sent before this
        one: the proxy's own reply then goes in its turn (RFC 2920 section
        3.1) and the Conversation pairs it with the right command."""
        while self._expect:
            self._answered = trio.Event()
            try:
                await self._answered.wait()
            finally:
                self._answered = None

    async def _answer(self, fault: Fault, what: str) -> bool:
        """REPLY: the proxy answers the client; nothing goes upstream."""
        await self._answered_before()
        reply = fault.reply_bytes()
        note = self._fault_note(fault, f"proxy answered {what}: {fault.code} {fault.text}", reply)
        self.observe(self.conv.feed(Side.SERVER, reply), fed=(Side.SERVER, reply), note=note)
        self.tls.server_answered = False  # the upstream did not answer it
        await self._send(Side.CLIENT, reply)
        return True

    async def _connection_fault(self, fault: Fault, where: str) -> bool:
        """DELAY, STALL, CLOSE, RESET, THROTTLE at a step; True: go on with
        the step (after a delay, or with the client's leg now throttled)."""
        kind = fault.kind
        if kind is ActionKind.DELAY:
            self._fired(fault, f"delayed {fault.seconds:g}s {where}")
            await trio.sleep(fault.seconds)
            return True
        if kind is ActionKind.THROTTLE:
            self._fired(fault, f"{where}: the client gets at most {fault.rate} octets/s from here")
            self.streams[Side.CLIENT] = ThrottledStream(
                self.streams[Side.CLIENT], fault.rate, self._writing
            )
            return True
        if kind is ActionKind.STALL:
            self._fired(fault, f"stalled {where}: no answer (the session's timeouts apply)")
            await trio.sleep_forever()
        if kind is ActionKind.RESET:
            sock = _raw_socket(self.streams[Side.CLIENT])
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
        what = "reset the client's connection (RST)" if kind is ActionKind.RESET else (
            "closed the client's connection"
        )  # fmt: skip
        self._fired(fault, f"{what} {where}")
        self._end("proxy", f"fault {fault.rule}: {what} {where}")
        return False

    # -- the message's octets ------------------------------------------------

    async def _body(self, ev: MessageData) -> bool:
        """A piece of a DATA body: ``body@SIZE`` once that much has passed,
        ``dot`` at its end. The bytes that may begin the end (``.`` or
        ``.\\r`` after a line end) are held back until the next piece says
        whether they are the end, so that a ``dot`` rule can withhold it."""
        self._body_octets += len(ev.raw)
        counter = self._counter
        fault = self.faults.step(
            "body",
            nth=counter.session.get("DATA", 0),
            transaction=counter.transaction if counter.open else 0,
            octets=self._body_octets,
        )
        if fault is not None and not await self._connection_fault(fault, "in the message body"):
            return False
        data = self._body_held + ev.raw
        if not ev.last:
            ctx = self._body_prev + data
            keep = 2 if ctx.endswith(b"\r\n.\r") else 1 if ctx.endswith(b"\r\n.") else 0
            keep = min(keep, len(data))
            out, self._body_held = data[: len(data) - keep], data[len(data) - keep :]
            if out:
                self._body_prev = (self._body_prev + out)[-2:]
                await self._send(Side.SERVER, out)
            return True
        self._body_held = b""
        dot = counter.place("<dot>")
        fault = self.faults.step("dot", nth=dot.nth, transaction=counter.transaction)
        if fault is None:
            await self._send(Side.SERVER, data)
            return True
        if fault.kind is ActionKind.REPLY:
            return await self._withhold(fault, data[: len(data) - len(_DOT)])
        if fault.kind is ActionKind.REPLACE:
            if self._expect:
                self._expect[-1] = _Expect(fault)  # the final reply to this DATA
            await self._send(Side.SERVER, data)
            return True
        if not await self._connection_fault(fault, "at the end of the message"):
            return False
        await self._send(Side.SERVER, data)
        return True

    async def _withhold(self, fault: Fault, body: bytes) -> bool:
        """``dot: REPLY``: the body goes on without its end, the client gets
        the fault's reply, and the upstream connection is closed. A DATA body
        ends only at its final dot (RFC 5321 section 4.1.1.4), so a server
        still reading it would take an RSET as message text; closing the
        connection before the dot is what makes it drop the message
        (RFC 5321 section 3.8). The client's connection is closed after the
        reply: there is no upstream left to carry the session on."""
        if body:
            await self._send(Side.SERVER, body)
        if self._expect:
            self._expect.pop()  # the DATA's final reply will never come
        await self._answered_before()
        reply = fault.reply_bytes()
        note = self._fault_note(
            fault,
            f"message withheld: its final dot was not sent upstream; proxy answered "
            f"{fault.code} {fault.text}; upstream connection closed so no message is delivered",
            reply,
        )
        self.observe(self.conv.feed(Side.SERVER, reply), fed=(Side.SERVER, reply), note=note)
        self._quiet_upstream = True
        self._end("proxy", f"fault {fault.rule}: message withheld, upstream closed")
        try:
            await self._send(Side.CLIENT, reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        await trio.aclose_forcefully(self.streams[Side.SERVER])
        return False

    # -- the server's side ---------------------------------------------------

    async def _fault_server_read(self, data: bytes | bytearray, now: float) -> bool:
        """A server read when faults are on: observe it, then pass it on
        reply by reply, each as its fault says. False ends the session."""
        pending = self._server_unsent
        pending += data
        events = self.conv.feed(Side.SERVER, data)
        self.observe(events, now, fed=(Side.SERVER, data))
        tls = self.tls
        if tls.server_answered or tls.upgrade_pending:
            # STARTTLS's reply, or --upstream-tls starttls before the upgrade
            care = bytes(pending)
            pending.clear()
            for ev in events:
                if type(ev) is Reply and not ev.intermediate and ev.command and self._expect:
                    self._expect.popleft()
            self._after_replies(events)
            return await self._with_care(Side.SERVER, care)
        out = bytearray()
        used = 0
        for ev in events:
            raw = ev.raw
            if ev.side is Side.CLIENT or not raw:
                continue
            piece = bytes(pending[used : used + len(raw)])
            used += len(raw)
            if type(ev) is Reply:
                fault = self._reply_fault(ev)
                if fault is not None:
                    if out:
                        await self._send(Side.CLIENT, out)
                        out = bytearray()
                    piece, ok = await self._server_fault(fault, ev, piece)
                    if not ok:
                        return False
            out += piece
        del pending[:used]
        if out:
            await self._send(Side.CLIENT, out)
        self._after_replies(events)
        return True

    def _after_replies(self, events: list[Event]) -> None:
        """Steps counted from the server's side; client events a reply
        released are acted on (a drain is started if none runs); whoever
        waits for replies is woken."""
        released = False
        for ev in events:
            if type(ev) is TlsStart:
                self._counter.tls += 1  # what follows is inside TLS (RFC 3207 section 4.2)
                self._counter.open = False
            elif ev.side is Side.CLIENT:
                released = True
        if released:
            self._queue([ev for ev in events if ev.side is Side.CLIENT])
            if not self._draining and self._units and self._nursery is not None:
                self._draining = True
                self._nursery.start_soon(self._drain_task)
        if self._answered is not None:
            self._answered.set()

    def _reply_fault(self, ev: Reply) -> Fault | None:
        """What to do with this reply: the fault the step it answers
        carries, or a ``greeting`` rule's; also pops the reply owed."""
        if ev.command == GREETING:
            if self._expect:
                self._expect.popleft()
            return self.faults.step("greeting")
        if ev.command is None or ev.intermediate:
            head = self._expect[0] if self._expect else _PLAIN
            fault = head.fault
            if ev.intermediate and fault is not None and fault.kind is ActionKind.REPLACE:
                self._expect[0] = _PLAIN  # DATA's 354 or AUTH's 334 is what it replaces
                return fault
            return None
        expect = self._expect.popleft() if self._expect else _PLAIN
        if ev.command in ("EHLO",) and 200 <= ev.code < 300 and self.tls.strip:
            if not self.conv.encrypted and expect.fault is None:
                return _STRIP
        return expect.fault

    async def _server_fault(
        self, fault: Fault, ev: Reply, raw: bytes | bytearray
    ) -> tuple[bytes, bool]:
        """Act on a reply: what goes to the client instead, and whether the
        session goes on."""
        said = f"{ev.code} {ev.lines[0] if ev.lines else ''}".rstrip()
        kind = fault.kind
        if kind in (ActionKind.REPLY, ActionKind.REPLACE):
            reply = fault.reply_bytes()
            step = "greeting" if ev.command == GREETING else f"reply to {ev.command}"
            what = f"the client was told {fault.code} {fault.text} instead of the server's {step}: {said}"
            if ev.ends_message and 200 <= ev.code < 300:
                what += " (the server accepted the message)"
            self._fired(fault, what, reply)
            return reply, True
        if kind in (ActionKind.REMOVE, ActionKind.ADD) or fault is _STRIP:
            strip = self.tls.strip and not self.conv.encrypted
            remove = frozenset(fault.capabilities) if kind is ActionKind.REMOVE else frozenset()
            add = fault.capabilities if kind is ActionKind.ADD else ()
            out, _ = rewrite_capabilities(
                raw, mask=_STARTTLS if strip else frozenset(), remove=remove, add=add
            )
            if strip and not self.tls.stripped and out != bytes(raw):
                self.tls.stripped = True
                self.observe(
                    [
                        Note(
                            Side.SERVER,
                            NoteKind.STRIP_STARTTLS,
                            "STARTTLS hidden from the client's EHLO reply",
                        )
                    ]
                )
            if fault is not _STRIP:
                self._fired(fault, f"{fault.describe()}; the client got this EHLO reply", out)
            return out, True
        if not await self._connection_fault(fault, f"at the server's {said}"):
            return b"", False
        return bytes(raw), True

    # -- the connection --------------------------------------------------------

    async def _fault_tls(self) -> bool:
        """``tls``: before the client's TLS handshake (implicit or after
        STARTTLS). ``abort``: the proxy closes the connection instead of
        answering the client's hello, so its handshake fails. False: the
        session ends here."""
        fault = self.faults.step("tls", nth=self._counter.tls + 1)
        if fault is None:
            return True
        if fault.kind is ActionKind.TLS_ABORT:
            self._fired(fault, "aborted the client's TLS handshake (connection closed)")
            self._end("proxy", f"fault {fault.rule}: TLS handshake aborted")
            return False
        if fault.kind is ActionKind.TLS_CERT:
            self._cert_fault = fault  # relaytls shows that certificate, and notes it
            return True
        return await self._connection_fault(fault, "before the TLS handshake")

    async def _fault_connect(self) -> bool:
        """``connect``: before the upstream is dialled. False: the session
        ends here (after the fault's reply, if it has one)."""
        fault = self.faults.step("connect")
        if fault is None:
            return True
        if fault.kind is ActionKind.REPLY:
            reply = fault.reply_bytes()
            self._fired(fault, f"proxy answered the connection: {fault.code} {fault.text}", reply)
            self._end("proxy", f"fault {fault.rule}: answered {fault.code} at connect")
            with trio.move_on_after(5):
                try:
                    await self._send(Side.CLIENT, reply)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass
            return False
        return await self._connection_fault(fault, "at connect")


#: ``--strip-starttls`` on an EHLO reply no rule rewrites (the relay's own rewrite)
_STRIP = Fault("--strip-starttls", ActionKind.REMOVE)
