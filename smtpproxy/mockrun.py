"""Running ``smtpproxy mock``: the scripts read, the mock server behind the proxy.

The mock is ``record`` with a recorded server as its embedded upstream
(``app.record`` runs the sink there): the proxy in front gives the client
the local CA's certificate on STARTTLS or ``--listen-tls``, prints the live
transcript, records each mock session (so ``show``, ``diff`` and ``replay``
work on it) and applies ``--fault`` rules; the :class:`MockServer` behind it
plays the recording. docs/mock.md says why it is built this way.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import trio

from . import app
from .mockplay import MockOptions, Script
from .mockserver import MockServer, MockSession
from .net import is_loopback
from .recording import RecordingError, iter_recordings, read_recording
from .relay import ProxyConfig
from .render import Transcript
from .service import Service
from .tls import ServerContexts

__all__ = ["load_scripts", "mock"]


def load_scripts(paths: Sequence[Path]) -> list[Script]:
    """The recordings named (files, or folders of ``*.jsonl`` in file
    order), read for playing. A file that cannot be played is refused:
    RecordingError naming it (a mock that silently skipped one would play a
    different server than asked)."""
    files = iter_recordings(paths)
    if not files:
        raise RecordingError(f"no recordings (*.jsonl) in {', '.join(map(str, paths))}")
    return [Script(read_recording(f)) for f in files]


def mock(
    config: ProxyConfig,
    transcript: Transcript,
    scripts: list[Script],
    options: MockOptions,
    sessions: int | None = None,
) -> list[MockSession]:
    """Serve ``scripts`` behind the proxy until ``sessions`` client sessions
    have ended (None: until SIGINT or SIGTERM). Returns each session's
    departures, in the order the sessions ended."""
    if config.recordings is not None:
        app.prepare_recordings(config.recordings)
    if not is_loopback(config.listen[0]):
        app._say(
            f"warning: listening on {config.listen[0]}, not loopback: anyone who can reach it can "
            "talk to this mock, and what they send will be recorded"
        )
    ca = app._setup_tls(config, app.TlsFiles(), None, embedded=True)
    server_tls = ServerContexts(["localhost", "127.0.0.1"], ca=ca).default if ca else None
    server = MockServer(
        scripts,
        options,
        tls=server_tls,
        implicit_tls=config.listen_tls,
        transcript=transcript,
        idle_timeout=config.idle_timeout or 300.0,
        handshake_timeout=config.handshake_timeout or 30.0,
    )
    service = Service(config, transcript, server, label=f"mock of {_label(scripts)}")
    service.proxy.on_withheld = server.withheld  # fault replies count as steps

    async def run() -> None:
        await service.listen()
        with app._stop_signals() as signals:
            async with trio.open_nursery() as nursery:
                address = await nursery.start(service.run)
                app._banner(address, config, ca)
                if sessions is not None:
                    nursery.start_soon(_until, service, server, sessions, nursery.cancel_scope)
                await app._first(signals)
                nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    except OSError as exc:
        raise app._cannot_listen(config.listen, exc) from None
    departed = sum(1 for s in server.sessions if s.departures)
    app._say(
        f"smtpproxy mock: {len(server.sessions)} session(s), {departed} departed from the recording; "
        f"recordings in {config.recordings}/"
    )
    return server.sessions


def _label(scripts: list[Script]) -> str:
    return str(scripts[0].path) if len(scripts) == 1 else f"{len(scripts)} recordings"


async def _until(
    service: Service, server: MockServer, sessions: int, scope: trio.CancelScope
) -> None:
    """``--sessions N``: once N client sessions have ended (and the mock's
    side of each has said its departures), stop."""
    await service.proxy.wait_sessions_ended(sessions)
    with trio.move_on_after(5):  # the mock's side ends as the proxy closes it
        await server.wait_sessions(min(sessions, server.started))
    scope.cancel()
