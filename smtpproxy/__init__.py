"""smtpproxy: a recording man-in-the-middle SMTP proxy.

See, keep, replay and compare what really happens on the wire between a mail
client and an SMTP server.

The Python API (docs/python-api.md): ``smtpproxy.sink()``,
``smtpproxy.proxy(upstream=...)`` and ``smtpproxy.mock(recording)`` start
servers (``with`` or ``async with``); ``smtpproxy.read(path)`` reads a
recording as a :class:`Session`. The names are imported on first use, so
``import smtpproxy`` (and the pytest plugin's loading) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .api import AsyncServer, Faults, FaultSyntaxError, Server, SyncServer, mock, proxy, sink
    from .events import Side
    from .protocol import Conversation
    from .recording import Recording, RecordingError, read_recording
    from .session import Auth, Message, Session, Tls, TlsLeg, read

#: each public name and the module it lives in
_HOMES = {
    **dict.fromkeys(
        (
            "AsyncServer",
            "Faults",
            "FaultSyntaxError",
            "Server",
            "SyncServer",
            "mock",
            "proxy",
            "sink",
        ),
        ".api",
    ),
    "Side": ".events",
    "Conversation": ".protocol",
    **dict.fromkeys(("Recording", "RecordingError", "read_recording"), ".recording"),
    **dict.fromkeys(("Auth", "Message", "Session", "Tls", "TlsLeg", "read"), ".session"),
}

__all__ = [
    "AsyncServer",
    "Auth",
    "Conversation",
    "FaultSyntaxError",
    "Faults",
    "Message",
    "Recording",
    "RecordingError",
    "Server",
    "Session",
    "Side",
    "SyncServer",
    "Tls",
    "TlsLeg",
    "__version__",
    "mock",
    "proxy",
    "read",
    "read_recording",
    "sink",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'smtpproxy' has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value
    return value
