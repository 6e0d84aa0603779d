"""smtpproxy: a recording man-in-the-middle SMTP proxy.

See, keep, replay and compare what really happens on the wire between a mail
client and an SMTP server.

The Python API (docs/python-api.md): ``smtpproxy.sink()``,
``smtpproxy.proxy(upstream=...)`` and ``smtpproxy.mock(recording)`` start
servers (``with`` or ``async with``); ``smtpproxy.read(path)`` reads a
recording as a :class:`Session`.
"""

__version__ = "0.1.0"  # before the imports: app.py reads it

from .api import AsyncServer, Faults, FaultSyntaxError, Server, SyncServer, mock, proxy, sink
from .events import Side
from .protocol import Conversation
from .recording import Recording, RecordingError, read_recording
from .session import Auth, Message, Session, Tls, TlsLeg, read

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
