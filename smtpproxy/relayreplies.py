"""The server's side of the relay's fault rules (smtpproxy/relayfaults.py):
the upstream's replies passed on, replaced or rewritten, and the actions on
the connection that either side's step can take (delay, stall, close, reset,
throttle).

Replies are numbered as the proxy asks for them (the greeting is the first,
then one per command forwarded, RFC 5321 section 4.1.1; PIPELINING keeps
that order, RFC 2920 section 3.1). A fault that acts on a reply (REPLACE,
``ehlo: remove/add``) is kept with the number of the reply it acts on. A
server read none of whose replies can be one of those, nor the greeting
when a ``greeting`` rule is live, goes to the client whole, as it came, as
without rules: that is the usual case, and costs one comparison.
"""

from __future__ import annotations

import socket
import struct
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

import trio

from .events import Note, NoteKind, Reply, Side, TlsStart
from .faults import ActionKind, Fault, SessionFaults
from .protocol import GREETING, StepCounter
from .relayredial import SETUP_REPLIES, UpstreamSetup
from .tlsmodes import rewrite_capabilities

if TYPE_CHECKING:
    from .events import Event
    from .relayparts import SessionParts as _Parts
else:
    _Parts = object

__all__ = ["FaultReplies", "ThrottledStream"]

_STARTTLS = frozenset({"STARTTLS"})


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


class FaultReplies(_Parts):
    """The server's side of fault rules, for ``relayfaults.FaultSteps``."""

    if TYPE_CHECKING:  # what the session and FaultSteps give these steps
        faults: SessionFaults
        _counter: StepCounter
        _units: deque[Event]
        _draining: bool
        _nursery: trio.Nursery | None
        _setup: UpstreamSetup

        def _queue(self, events: list[Event], data: bytes | bytearray = b"") -> None: ...

        async def _drain_task(self) -> None: ...

    def _init_replies(self) -> None:
        #: server octets received and not yet sent on (a partial reply held)
        self._server_unsent = bytearray()
        #: server octets sent on before the Conversation made them a reply
        self._server_ahead = 0
        #: replies asked of the upstream, the greeting first, and replies had
        self._asked = 1
        self._got = 0
        #: (the number of a reply, the fault that acts on it), in order
        self._acting: deque[tuple[int, Fault]] = deque()
        self._greeting_rule = "greeting" in self.faults.steps
        self._answered: trio.Event | None = None

    # -- notes ---------------------------------------------------------------

    def _fault_note(self, fault: Fault, what: str, raw: bytes = b"") -> Note:
        return Note(Side.SERVER, NoteKind.FAULT, f"fault {fault.rule}: {what}", raw)

    def _fired(self, fault: Fault, what: str, raw: bytes = b"") -> None:
        self.observe([self._fault_note(fault, what, raw)])

    def _writing(self) -> None:
        """A throttled write to the client moved on: the session is not idle."""
        self._activity = trio.current_time()

    # -- replies owed ----------------------------------------------------------

    def _owe(self, fault: Fault | None = None) -> None:
        """A step went upstream: the upstream owes one more reply, on which
        ``fault`` (REPLACE, ``ehlo: remove/add``) acts."""
        self._asked += 1
        if fault is not None:
            self._acting.append((self._asked, fault))

    def _unowe(self) -> None:
        """The last reply asked for will not come (the proxy answered that
        step itself, or closed the connection before it)."""
        asked = self._asked
        acting = self._acting
        while acting and acting[-1][0] >= asked:
            acting.pop()
        self._asked = asked - 1

    async def _answered_before(self) -> None:
        """Wait until the upstream has answered every step sent before this
        one: the proxy's own reply then goes in its turn (RFC 2920 section
        3.1) and the Conversation pairs it with the right command."""
        while self._got < self._asked:
            self._answered = trio.Event()
            try:
                await self._answered.wait()
            finally:
                self._answered = None

    # -- the server's side ---------------------------------------------------

    async def _fault_server_read(self, data: bytes | bytearray, now: float) -> bool:
        """A server read when faults are on: observe it, then pass it on,
        whole when no fault can act on its replies, else reply by reply,
        each as its fault says. False ends the session."""
        events = self.conv.feed(Side.SERVER, data)
        self.observe(events, now, fed=(Side.SERVER, data))
        size = replies = finals = 0
        released = tls_start = False
        for ev in events:
            if ev.side is Side.CLIENT:
                released = True
            elif type(ev) is Reply:
                replies += 1
                size += len(ev.raw)
                if ev.command and not ev.intermediate:
                    finals += 1
                if ev.command in SETUP_REPLIES:
                    self._setup.reply(ev)
            elif type(ev) is TlsStart:
                tls_start = True
            else:
                size += len(ev.raw)
        pending = self._server_unsent
        tls = self.tls
        acting = self._acting
        if tls.server_answered or tls.upgrade_pending:
            # STARTTLS's reply, or --upstream-tls starttls before the upgrade
            care = bytes(pending + data) if pending else bytes(data)
            pending.clear()
            self._server_ahead += len(care) - size
            self._got += finals
            self._after_replies(events, released, tls_start)
            return await self._with_care(Side.SERVER, care)
        if (
            # the +1: a reply begun in this read and not yet whole
            (not acting or acting[0][0] > self._got + replies + 1)
            and (self._got or not self._greeting_rule)
            and not (tls.strip and not self.conv.encrypted)
        ):
            if pending:
                pending += data
                data = bytes(pending)
                pending.clear()
            self._server_ahead += len(data) - size
            self._got += finals
            if data:
                await self._send(Side.CLIENT, data)
            if released or acting or self._answered is not None:
                self._after_replies(events, released, tls_start)
            return True
        pending += data
        ahead = self._server_ahead
        out = bytearray()
        used = 0
        for ev in events:
            raw = ev.raw
            if ev.side is Side.CLIENT or not raw:
                continue
            size = len(raw)
            sent = min(ahead, size)  # already gone on whole (not a reply a fault acts on)
            ahead -= sent
            piece = bytes(pending[used : used + size - sent])
            used += size - sent
            if type(ev) is Reply:
                fault = self._reply_fault(ev)
                if fault is not None and not sent:
                    if out:
                        await self._send(Side.CLIENT, out)
                        out = bytearray()
                    piece, ok = await self._server_fault(fault, ev, piece)
                    if not ok:
                        return False
            out += piece
        del pending[:used]
        self._server_ahead = ahead
        if out:
            await self._send(Side.CLIENT, out)
        self._after_replies(events, released, tls_start)
        return True

    def _after_replies(self, events: list[Event], released: bool, tls_start: bool) -> None:
        """Steps counted from the server's side; client events a reply
        released are acted on (a drain is started if none runs); whoever
        waits for replies is woken."""
        if tls_start:
            self._counter.tls += 1  # what follows is inside TLS (RFC 3207 section 4.2)
            self._counter.open = False
        acting = self._acting
        while acting and acting[0][0] <= self._got:
            acting.popleft()  # a reply no fault could act on any more (one STARTTLS took)
        if released:
            self._queue(events)
            if not self._draining and self._units and self._nursery is not None:
                self._draining = True
                self._nursery.start_soon(self._drain_task)
        if self._answered is not None:
            self._answered.set()

    def _reply_fault(self, ev: Reply) -> Fault | None:
        """What to do with this reply: the fault that acts on it, or a
        ``greeting`` rule's; counts it among the replies had."""
        if ev.command == GREETING:
            self._got += 1
            return self.faults.step("greeting")
        acting = self._acting
        if ev.command is None or ev.intermediate:
            if (
                ev.intermediate
                and acting
                and acting[0][0] == self._got + 1
                and acting[0][1].kind is ActionKind.REPLACE
            ):
                return acting.popleft()[1]  # DATA's 354 or AUTH's 334 is what it replaces
            return None
        self._got += 1
        fault = acting.popleft()[1] if acting and acting[0][0] == self._got else None
        if ev.command == "EHLO" and 200 <= ev.code < 300 and self.tls.strip:
            if not self.conv.encrypted and fault is None:
                return _STRIP
        return fault

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


#: ``--strip-starttls`` on an EHLO reply no rule rewrites (the relay's own rewrite)
_STRIP = Fault("--strip-starttls", ActionKind.REMOVE)
