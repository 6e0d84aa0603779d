"""The server's half of a session, without I/O: client bytes in, reply bytes out.

The embedded server (``server._Sink``) and the mock server (``mockplay.Player``)
both answer a client; what they answer differs, how they read the client
does not. This base holds that common part over the one ``Conversation``:
every reply sent is fed back to it (so it knows that a 354 opens a body, a
334 a SASL answer, a 220 to STARTTLS a handshake), client bytes it held back
until a reply come out as events then, and a BDAT command is answered only
once its chunk has been read (RFC 3030 section 2). Subclasses say what to
answer (``respond``) and how to answer a BDAT whose chunk is read
(``answer_chunk``).
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

from .events import AuthResponse, Command, Event, MessageData, Opaque, Side
from .protocol import ClientState, Conversation, format_reply

__all__ = ["ServerSide"]

#: what a subclass may put between replies for its I/O loop to act on
#: (a fault to act on, a pause)
P = TypeVar("P")


class ServerSide(Generic[P]):
    """Reads a client with a Conversation and collects the replies to send."""

    def __init__(self) -> None:
        self.conv = Conversation()
        #: close the connection once the replies are sent
        self.quit = False
        #: 220 to STARTTLS was sent: shake hands before reading on
        self.starttls = False
        #: the answers stopped (a fault's stall or close)
        self.halted = False
        #: the BDAT command whose chunk is not answered yet, the octets of
        #: that chunk seen so far, and whether its last octet has arrived
        self.bdat_cmd: Command | None = None
        self.chunk_octets = 0
        self.chunk_seen = False
        self._released: list[Event] = []
        self._out = bytearray()
        self._pieces: list[bytes | P] = []

    # -- what subclasses implement ---------------------------------------

    def respond(self, ev: Event) -> bytes | None:
        """The reply to one client event (None or b"": nothing yet)."""
        raise NotImplementedError

    def answer_chunk(self, cmd: Command, octets: int, last: bool) -> bytes:
        """The reply to BDAT ``cmd`` whose chunk of ``octets`` has now been
        read (``last``: it was the message's last, from the MessageEnd)."""
        raise NotImplementedError

    # -- the common part ---------------------------------------------------

    def reply(self, code: int, *lines: str) -> bytes:
        return self.reply_raw(format_reply(code, *lines))

    def reply_raw(self, data: bytes) -> bytes:
        """``data`` is what the server says: the Conversation must see it to
        know what the client sends next; client bytes it held back until now
        come out as events."""
        self._released += [e for e in self.conv.feed(Side.SERVER, data) if e.side is Side.CLIENT]
        return data

    def chunk_done(self, last: bool) -> bytes:
        """The BDAT command waiting for its chunk, answered now that the chunk
        is read: the server reads the chunk whatever it then answers (RFC
        3030 section 2)."""
        cmd, octets = self.bdat_cmd, self.chunk_octets
        self.bdat_cmd, self.chunk_octets, self.chunk_seen = None, 0, False
        if cmd is None:
            return b""
        return self.answer_chunk(cmd, octets, last)

    def put(self, piece: P) -> None:
        """Something for the I/O loop to act on after the replies so far."""
        self._pieces += [bytes(self._out), piece]
        self._out.clear()

    def receive(self, data: bytes) -> list[bytes | P]:
        """Client bytes in; the replies to send back out, with what to act on
        between them (usually one piece of bytes)."""
        out = self._out = bytearray()
        self._pieces = []
        todo: deque[Event] = deque(self.conv.feed(Side.CLIENT, data))
        while not (self.quit or self.starttls or self.halted):
            while todo and not (self.quit or self.starttls or self.halted):
                ev = todo.popleft()
                if self.bdat_cmd is not None and isinstance(ev, (Command, AuthResponse, Opaque)):
                    out += self.chunk_done(last=False)
                if isinstance(ev, MessageData) and ev.via == "BDAT" and self.bdat_cmd is not None:
                    self.chunk_octets += len(ev.raw)
                    self.chunk_seen = ev.last
                out += self.respond(ev) or b""
                todo.extend(self._released)
                self._released = []
            # a BDAT is answered once its chunk is read; no chunk may follow it
            # at all (the Conversation did not read it as a chunk)
            if self.bdat_cmd is None or (
                not self.chunk_seen and self.conv.client_state is ClientState.BDAT
            ):
                break
            out += self.chunk_done(last=False)
            todo.extend(self._released)
            self._released = []
        return [*self._pieces, bytes(out)] if self._pieces else [bytes(out)]
