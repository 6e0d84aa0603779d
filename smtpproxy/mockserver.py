"""The mock server's I/O: plays :class:`mockplay.Script` s to the clients that connect.

``smtpproxy mock`` runs this server behind the proxy, the way ``record``
runs the embedded sink: the proxy faces the client (TLS with the local CA,
the live transcript, the recording of each mock session, ``--fault``
rules), and this server, on an ephemeral loopback port, plays the recorded
server. Connection K gets script K (modulo their number): a folder is served
one recording per connection, in file order, then again.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import trio

from . import accept
from .mockplay import Departure, MockOptions, Player, Script, Wait
from .protocol import format_reply
from .render import Transcript
from .tls import HandshakeFailed, handshake

__all__ = ["MockServer", "MockSession"]

log = logging.getLogger(__name__)


@dataclass
class MockSession:
    """One client's session: which recording it got and where it departed."""

    number: int
    recording: Path
    departures: list[Departure] = field(default_factory=list)

    def as_json(self) -> dict[str, object]:
        return {
            "session": self.number,
            "recording": str(self.recording),
            "departures": [d.as_json() for d in self.departures],
        }


class MockServer:
    """Serves ``scripts`` on a listener, one per connection in turn."""

    def __init__(
        self,
        scripts: list[Script],
        options: MockOptions,
        *,
        tls: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        transcript: Transcript | None = None,
        idle_timeout: float = 300.0,
        handshake_timeout: float = 30.0,
    ) -> None:
        if not scripts:
            raise ValueError("MockServer needs at least one script")
        self.scripts = scripts
        self.options = options
        self.tls = tls
        self.implicit_tls = implicit_tls
        self.transcript = transcript
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.sessions: list[MockSession] = []
        #: the sessions going on, by the client's port (the proxy's upstream leg)
        self._players: dict[int, Player] = {}
        #: connections so far
        self.started = 0
        self._ended = trio.Event()

    async def serve(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await accept.serve_embedded(self.handle, host, port, task_status)

    def withheld(self, port: int | None, verb: str) -> None:
        """The proxy in front answered the command ``verb`` of the session
        on ``port`` itself (a fault rule's reply): the player counts it."""
        player = self._players.get(port) if port is not None else None
        if player is not None:
            player.skip(verb)

    async def wait_sessions(self, count: int) -> None:
        """Until ``count`` sessions have ended (their departures are known)."""
        while len(self.sessions) < count:
            await self._ended.wait()
            self._ended = trio.Event()

    def _say(self, number: int, text: str) -> None:
        if self.transcript is not None:
            self.transcript.say(f"mock#{number}", text, warn=True)

    async def handle(self, stream: trio.abc.Stream) -> None:
        self.started += 1
        number = self.started
        script = self.scripts[(number - 1) % len(self.scripts)]
        player = Player(script, self.options)
        session = MockSession(number, script.path)
        reported = 0
        port = _peer_port(stream)
        if port is not None:
            self._players[port] = player
        try:
            if self.implicit_tls:
                tls = await self._handshake(stream)
                if tls is None:
                    return
                stream = tls
                player.implicit_tls()
            await self._send(stream, player.greeting())
            while not player.quit:
                with trio.move_on_after(self.idle_timeout) as idle:
                    data = await stream.receive_some(65536)
                if idle.cancelled_caught:
                    await stream.send_all(format_reply(421, "4.4.2 idle too long, closing"))
                    break
                if not data:
                    break
                pieces = player.receive(bytes(data))
                for d in player.departures[reported:]:
                    self._say(number, d.describe())
                reported = len(player.departures)
                await self._send(stream, pieces)
                if player.starttls:
                    tls = await self._handshake(stream)
                    if tls is None:
                        return
                    stream = tls
                    player.tls_established()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            # a bug met by one session must not stop the server for the others
            await accept.close_after_bug(stream, log, "mock")
        finally:
            if port is not None:
                self._players.pop(port, None)
            session.departures = player.finish()
            for d in session.departures[reported:]:
                self._say(number, d.describe())
            self.sessions.append(session)
            self._ended.set()
            await trio.aclose_forcefully(stream)

    async def _send(self, stream: trio.abc.Stream, pieces: list[bytes | Wait]) -> None:
        for piece in pieces:
            if isinstance(piece, Wait):
                await trio.sleep(piece.seconds)
            elif piece:
                await stream.send_all(piece)

    async def _handshake(self, stream: trio.abc.Stream) -> trio.SSLStream[trio.abc.Stream] | None:
        if self.tls is None:
            return None
        try:
            return await handshake(
                stream, self.tls, server_side=True, timeout=self.handshake_timeout
            )
        except HandshakeFailed:
            return None


def _peer_port(stream: trio.abc.Stream) -> int | None:
    """The connecting side's port: the proxy's upstream leg, on loopback."""
    if isinstance(stream, trio.SocketStream):
        with contextlib.suppress(OSError):
            return int(stream.socket.getpeername()[1])
    return None
