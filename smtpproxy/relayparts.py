"""What ``relay.Session`` gives the steps it is made of, declared once.

``relay.Session`` is built from mixins (``relaytls.TlsSteps``,
``relayfaults.FaultSteps`` with ``relayreplies.FaultReplies`` and
``relayredial.UpstreamRedial``); each uses the session's streams, its
observer and its way of ending. For the type checker each mixin derives from
:class:`SessionParts`, which declares those; at run time the mixins derive
from ``object`` and the session provides them::

    if TYPE_CHECKING:
        from .relayparts import SessionParts as _Parts
    else:
        _Parts = object
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import trio

from .events import Event, Note, NoteKind, Side

if TYPE_CHECKING:
    from .faults import Fault
    from .protocol import Conversation
    from .relay import Proxy
    from .tlsmodes import TlsArrangement

__all__ = ["SessionParts"]


class SessionParts(Protocol):
    """The session's attributes and methods its mixins use."""

    proxy: Proxy
    conv: Conversation
    tls: TlsArrangement
    streams: dict[Side, trio.abc.Stream]
    closed_by: str
    _activity: float

    def observe(
        self,
        events: list[Event],
        now: float | None = None,
        fed: tuple[Side, bytes | bytearray] | None = None,
        call: str | None = None,
        note: Note | None = None,
    ) -> None: ...

    def _end(self, by: str, reason: str) -> None: ...

    async def _send(self, side: Side, data: bytes | bytearray) -> None: ...

    async def _with_care(self, side: Side, data: bytes | bytearray) -> bool: ...

    async def _reply_to_client(self, code: int, text: str, kind: NoteKind) -> None: ...

    def _fired(self, fault: Fault, what: str, raw: bytes = b"") -> None: ...
