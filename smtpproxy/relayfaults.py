"""The relay's faults: ``--fault`` rules (smtpproxy/faults.py) applied to a
live session between a real client and a real upstream.

``FaultSteps`` is the part of ``relay.Session`` that runs when some rule can
still fire in the session (``SessionFaults.live``: what is known at connect,
``session#K``, ``client=``, a ``p=`` draw, leaves one); a session with none
takes the relay's plain path, exactly as without rules. Here the client's
bytes go upstream event by event (a command line only once whole, message
octets as they come), so that at each step the session can ask
``SessionFaults.step`` before the step goes on. What no rule stops goes on
at once, everything a read allowed in one send; only a step a fault acts on
(or a STARTTLS) waits for its turn. The server's side is
``relayreplies.FaultReplies``. Every event still goes to the observer first,
and the bytes that go on are exactly the events' bytes: a session no rule
touches relays the same octets as without rules.

Every fault that fires is a ``Note`` of kind ``fault`` naming the rule (a
``!!`` line in the transcript, a note in the recording); a reply the proxy
gives the client in the server's place is fed to the Conversation as the
server's, with the note standing for it, as the proxy's own STARTTLS reply
is. docs/faults.md says what each action does here.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import trio

from .events import (
    AuthResponse,
    Command,
    MessageData,
    MessageEnd,
    Opaque,
    OpaqueReason,
    Side,
)
from .faults import ActionKind, Fault, FaultPlan, SessionFaults
from .protocol import Args, StepCounter, parse_args
from .relayredial import SETUP_REPLIES, UpstreamRedial
from .relayreplies import FaultReplies, ThrottledStream

if TYPE_CHECKING:
    from .events import Event


__all__ = ["FaultSteps", "ThrottledStream", "unsupported"]

#: the end of a DATA body the proxy withholds (RFC 5321 section 4.1.1.4)
_DOT = b".\r\n"
#: a command's step name (``SessionFaults.step``), without lower-casing each time
_STEP_NAMES = {v.upper(): v for v in ("ehlo", "helo", "mail", "rcpt", "data", "bdat", "rset")}
_STEP_NAMES |= {v.upper(): v for v in ("quit", "noop", "auth", "starttls", "vrfy", "expn")}
#: the commands a new upstream connection is told again (relayredial.py)
_SETUP = SETUP_REPLIES


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


@dataclass(slots=True)
class _Held:
    """A client step that cannot simply go on: a fault fired at it (``at``
    says where: ``command``, ``body`` or ``dot``), or it is a STARTTLS."""

    ev: Event
    fault: Fault | None
    at: str = "command"
    data: bytes = b""
    bdat: Args | None = None


class FaultSteps(FaultReplies, UpstreamRedial):
    """Fault rules, for ``relay.Session`` (one of its base classes)."""

    if TYPE_CHECKING:  # what the session gives these steps

        def upstream_port(self) -> int | None: ...

        _scope: trio.CancelScope
        _resume_client: trio.Event
        _cert_fault: Fault | None

        def _client_clocks(self, now: float) -> None: ...

        async def _local_starttls(self) -> bool: ...

    def _init_faults(self, faults: SessionFaults) -> None:
        self.faults = faults
        self._counter = StepCounter()
        if self.proxy.config.listen_tls:
            self._counter.tls = 1
        self._init_replies()
        self._init_redial()
        #: client events not yet acted on, in wire order
        self._units: deque[Event] = deque()
        #: client octets received and not yet in an event (a partial line)
        self._client_unsent = bytearray()
        self._draining = False
        self._drained: trio.Event | None = None  # made when someone waits for a drain
        self._nursery: trio.Nursery | None = None
        self._skip_chunk = False  # a BDAT the proxy answered: its chunk stays here
        #: a ``body`` rule is live: count the message's octets
        self._body_rule = "body" in faults.steps
        #: a ``dot`` rule is live: hold back what may begin a body's end
        self._hold_end = "dot" in faults.steps
        self._body_octets = 0
        self._body_prev = b"\r\n"  # the last octets sent of the body (for its end)
        self._body_held = b""  # a possible start of the body's end, held back
        self._quiet_upstream = False  # the proxy closed the upstream on purpose
        self._client_eof = False

    # -- the client's side ------------------------------------------------------

    async def _fault_client_read(self, data: bytes | bytearray, now: float) -> bool:
        """A client read when faults are on: observe it, then act on its
        events in order. False ends the session."""
        self.tls.client_silent = False
        events = self.conv.feed(Side.CLIENT, data)
        self.observe(events, now, fed=(Side.CLIENT, data))
        self._client_clocks(now)
        self._queue(events, data)
        while self._draining:  # a drain the server side started: let it finish
            if self._drained is None:
                self._drained = trio.Event()
            await self._drained.wait()
        return await self._drain() if self._units else True

    def _queue(self, events: list[Event], data: bytes | bytearray = b"") -> None:
        """Take the client's events to act on, in wire order, and keep what
        of ``data`` is in none yet (a partial line). Some come out of a
        server read: what the client sent before a 354 it did not wait for."""
        units = self._units
        size = 0
        for ev in events:
            if ev.raw:
                if ev.side is Side.CLIENT:
                    size += len(ev.raw)
                    units.append(ev)
            elif type(ev) is MessageEnd:
                units.append(ev)
        unsent = self._client_unsent
        if unsent or size != len(data):
            unsent += data
            del unsent[:size]

    def _take_unsent(self) -> bytes:
        """The client's partial line, when it has finished sending (its
        half-close goes upstream after it, as without rules)."""
        self._client_eof = True
        out = bytes(self._client_unsent)
        self._client_unsent.clear()
        return out

    async def _drain(self) -> bool:
        """Act on the client's events in order: what may go on at once goes
        in one send; a step a fault acts on waits for what came before it.
        False ends the session."""
        self._draining = True
        try:
            units = self._units
            out: list[bytes] = []
            while units:
                ev = units.popleft()
                if self._client_eof:
                    continue
                step = self._pass(ev)
                if type(step) is bytes:
                    if step:
                        out.append(step)
                    continue
                if out:
                    await self._send(Side.SERVER, out[0] if len(out) == 1 else b"".join(out))
                    out.clear()
                assert isinstance(step, _Held)
                if not await self._act(step):
                    units.clear()
                    return False
            if out:
                await self._send(Side.SERVER, out[0] if len(out) == 1 else b"".join(out))
            return True
        finally:
            self._draining = False
            drained, self._drained = self._drained, None
            if drained is not None:
                drained.set()

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

    def _pass(self, ev: Event) -> bytes | _Held:
        """The client's bytes of ``ev`` to send on now (steps counted, the
        rules asked), or what must be acted on first."""
        match ev:
            case Command():
                fault, bdat = self._ask(ev)
                if fault is None and ev.verb != "STARTTLS":
                    self._owe()
                    if ev.verb in _SETUP:
                        self._setup.command(ev)
                    return ev.raw
                return _Held(ev, fault, bdat=bdat)
            case MessageData(via="DATA"):
                if self._body_rule:
                    counter = self._counter
                    self._body_octets += len(ev.raw)
                    fault = self.faults.step(
                        "body",
                        nth=counter.session.get("DATA", 0),
                        transaction=counter.transaction if counter.open else 0,
                        octets=self._body_octets,
                    )
                    if fault is not None:
                        return _Held(ev, fault, "body")
                return self._body_end(ev) if self._hold_end else ev.raw
            case MessageData():
                if self._skip_chunk:
                    self._skip_chunk = not ev.last
                    return b""
                return ev.raw
            case MessageEnd():
                self._counter.open = False  # the message ends its transaction
                return b""
            case Opaque(reason=OpaqueReason.PLAINTEXT_AFTER_STARTTLS):
                return b""  # never carried into TLS (RFC 3207 section 6)
            case AuthResponse():
                self._setup.response(ev)
        return ev.raw

    def _ask(self, ev: Command) -> tuple[Fault | None, Args | None]:
        """Count the command's step, tell the rules what it says, and ask
        them: the fault that fires (None: none) and a BDAT's arguments."""
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
        name = _STEP_NAMES.get(verb) or verb.lower()
        fault = faults.step(name, nth=pos.nth, transaction=pos.transaction)
        bdat = parse_args(verb, ev.arg) if verb == "BDAT" else None
        if bdat is not None and bdat.last:
            dot = self._counter.place("<dot>")
            if fault is None:
                fault = faults.step("dot", nth=dot.nth, transaction=pos.transaction)
        return fault, bdat

    async def _act(self, step: _Held) -> bool:
        """Act on a step a fault fired at (or a STARTTLS)."""
        fault = step.fault
        if step.at == "body":
            assert fault is not None and isinstance(step.ev, MessageData)
            if not await self._connection_fault(fault, "in the message body"):
                return False
            rest = self._body_end(step.ev) if self._hold_end else step.ev.raw
            if type(rest) is bytes:
                if rest:
                    await self._send(Side.SERVER, rest)
                return True
            assert isinstance(rest, _Held)
            return await self._act(rest)
        if step.at == "dot":
            assert fault is not None
            return await self._dot(fault, step.data)
        assert isinstance(step.ev, Command)
        return await self._command(step.ev, fault, step.bdat)

    async def _command(self, ev: Command, fault: Fault | None, bdat: Args | None) -> bool:
        if fault is None:
            return await self._forward_command(ev, None)  # STARTTLS
        kind = fault.kind
        if kind is ActionKind.REPLY:
            self._skip_chunk = bdat is not None and bool(bdat.size)
            if self.proxy.on_withheld is not None:  # the mock keeps its step count
                self.proxy.on_withheld(self.upstream_port(), ev.verb)
            return await self._answer(fault, ev.verb)
        if kind in (ActionKind.REPLACE, ActionKind.REMOVE, ActionKind.ADD):
            return await self._forward_command(ev, fault)
        if not await self._connection_fault(fault, f"at {ev.verb}"):
            return False
        return await self._forward_command(ev, None)

    async def _forward_command(self, ev: Command, fault: Fault | None) -> bool:
        if ev.verb == "STARTTLS":
            if self.tls.answers_starttls():
                await self._answered_before()
                return await self._local_starttls()
            self._owe(fault)
            self._setup.command(ev)
            await self._send(Side.SERVER, ev.raw)
            await self._resume_client.wait()  # the server side handles the 220
            self._resume_client = trio.Event()
            return not self.closed_by
        self._owe(fault)
        if ev.verb in _SETUP:
            self._setup.command(ev)
        await self._send(Side.SERVER, ev.raw)
        return True

    async def _answer(self, fault: Fault, what: str) -> bool:
        """REPLY: the proxy answers the client; nothing goes upstream."""
        await self._answered_before()
        reply = fault.reply_bytes()
        note = self._fault_note(fault, f"proxy answered {what}: {fault.code} {fault.text}", reply)
        self.observe(self.conv.feed(Side.SERVER, reply), fed=(Side.SERVER, reply), note=note)
        self.tls.server_answered = False  # the upstream did not answer it
        await self._send(Side.CLIENT, reply)
        return True

    # -- the message's octets ------------------------------------------------

    def _body_end(self, ev: MessageData) -> bytes | _Held:
        """A piece of a DATA body while a ``dot`` rule is live: the bytes
        that may begin its end (``.`` or ``.\\r`` after a line end) are held
        back until the next piece says whether they are the end, so that the
        rule can withhold it; at the end, the ``dot`` step."""
        data = self._body_held + ev.raw
        if not ev.last:
            ctx = self._body_prev + data
            keep = 2 if ctx.endswith(b"\r\n.\r") else 1 if ctx.endswith(b"\r\n.") else 0
            keep = min(keep, len(data))
            out, self._body_held = data[: len(data) - keep], data[len(data) - keep :]
            if out:
                self._body_prev = (self._body_prev + out)[-2:]
            return out
        self._body_held = b""
        counter = self._counter
        dot = counter.place("<dot>")
        fault = self.faults.step("dot", nth=dot.nth, transaction=counter.transaction)
        if fault is None:
            return data
        return _Held(ev, fault, "dot", data)

    async def _dot(self, fault: Fault, data: bytes) -> bool:
        """A rule fired at the end of a DATA body (``data``: the last piece,
        its end included)."""
        if fault.kind is ActionKind.REPLY:
            return await self._withhold(fault, data[: len(data) - len(_DOT)])
        if fault.kind is ActionKind.REPLACE:
            self._acting.append((self._asked, fault))  # the final reply to this DATA
            await self._send(Side.SERVER, data)
            return True
        if not await self._connection_fault(fault, "at the end of the message"):
            return False
        await self._send(Side.SERVER, data)
        return True

    async def _withhold(self, fault: Fault, body: bytes) -> bool:
        """``dot: REPLY``: the body goes on without its end and the client
        gets the fault's reply; then the upstream connection is closed and
        another dialled in the client's state (``_reopen_upstream``). A DATA
        body ends only at its final dot (RFC 5321 section 4.1.1.4), so a
        server still reading it would take an RSET as message text; closing
        the connection before the dot is what makes it drop the message
        (RFC 5321 section 3.8). False: the session ends (the client is gone,
        or the new upstream could not be brought to its state)."""
        if body:
            await self._send(Side.SERVER, body)
        self._unowe()  # the DATA's final reply will never come
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
        try:
            await self._send(Side.CLIENT, reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._end("client", f"connection lost: {exc.__cause__ or exc}")
            await trio.aclose_forcefully(self.streams[Side.SERVER])
            return False
        if not await self._reopen_upstream(fault):
            return False
        self._quiet_upstream = False
        return True

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
