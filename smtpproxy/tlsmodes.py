"""The proxy's TLS arrangements: which leg is encrypted when, and who answers
a client's STARTTLS.

``UpstreamTls`` is ``--upstream-tls``; ``TlsArrangement`` is one session's
state of it (the STARTTLS it is waiting for, what it holds back from the
client, what ``--strip-starttls`` rewrote) and the decisions the relay asks
of it. Nothing here does I/O: the relay moves the bytes and shakes hands
(``tls.handshake``), this module says what to do with them. The table of
arrangements is in docs/tls.md.
"""

from __future__ import annotations

import enum
import re

from .events import Command, Reply
from .protocol import MAX_LINE

__all__ = ["TlsArrangement", "UpstreamTls", "rewrite_capabilities"]


class UpstreamTls(enum.Enum):
    """``--upstream-tls``: what the upstream leg does about TLS. The values
    are the option's words."""

    #: the upstream leg does what the client's does: implicit TLS with
    #: ``--listen-tls``, STARTTLS on both legs when the client sends one
    MIRROR = "mirror"
    #: the proxy upgrades the upstream with STARTTLS after the client's first
    #: EHLO has been answered, whatever the client does on its own leg
    STARTTLS = "starttls"
    #: TLS to the upstream from the first byte (SMTPS, RFC 8314)
    IMPLICIT = "implicit"
    #: the upstream leg is never encrypted; the proxy answers the client's
    #: STARTTLS itself
    PLAIN = "plain"


#: a capability line of an EHLO reply: ``250-KEYWORD params`` (RFC 5321 section 4.1.1.1)
_CAPABILITY_LINE = re.compile(rb"(250[ -])([A-Za-z0-9][A-Za-z0-9-]*)([ \t][^\r\n]*)?(\r?\n)")


def rewrite_capabilities(
    data: bytes | bytearray,
    *,
    mask: frozenset[str] = frozenset(),
    remove: frozenset[str] = frozenset(),
    add: tuple[str, ...] = (),
) -> tuple[bytes, int]:
    """Rewrite the capability lines of an EHLO reply (RFC 5321 section
    4.1.1.1: one keyword a line after the first) as the client will see them:
    keywords in ``mask`` become an unknown keyword of the same length
    (``STARTTLS`` -> ``XXXXXXXA``, so nothing else moves), lines whose
    keyword is in ``remove`` go, and ``add`` keywords come before the last
    line. ``data`` is whole lines; with ``remove`` or ``add`` it must be one
    whole positive EHLO reply, whose first line (the server's name) is kept
    and whose continuation marks are set again. Returns the bytes and how
    many lines were changed."""
    lines = bytes(data).splitlines(keepends=True)
    whole = bool(remove or add)
    out: list[bytes] = []
    changed = 0
    for i, line in enumerate(lines):
        m = _CAPABILITY_LINE.fullmatch(line)
        if m is None or (whole and i == 0):
            out.append(line)
            continue
        keyword = m.group(2).decode("ascii").upper()
        if keyword in remove:
            changed += 1
            continue
        if keyword in mask:
            changed += 1
            line = m.group(1) + b"X" * (len(keyword) - 1) + b"A" + line[m.end(2) :]
        out.append(line)
    if not whole or not out:
        return b"".join(out), changed
    end = b"\r\n" if out[-1].endswith(b"\r\n") else b"\n"
    last = out.pop() if len(out) > 1 else None
    have = {_keyword(line) for line in out[1:]} | ({_keyword(last)} if last else set())
    for keyword in add:
        if keyword.upper() not in have:
            out.append(b"250-" + keyword.encode("ascii") + end)
            changed += 1
    if last is not None:
        out.append(last)
    # every line but the last says more follows (RFC 5321 section 4.2.1)
    fixed = [b"250-" + line[4:] for line in out[:-1]] + [b"250 " + out[-1][4:]]
    return b"".join(fixed), changed


def _keyword(line: bytes) -> str:
    m = _CAPABILITY_LINE.fullmatch(line)
    return m.group(2).decode("ascii").upper() if m else ""


_STARTTLS = frozenset({"STARTTLS"})


class TlsArrangement:
    """One session's TLS arrangement: the mode, which legs are encrypted, and
    the STARTTLS bookkeeping the relay used to carry as loose flags."""

    __slots__ = (
        "client_tls",
        "client_silent",
        "hello_reply",
        "last_hello",
        "listen_tls",
        "mode",
        "server_answered",
        "starttls_line",
        "strip",
        "stripped",
        "upstream_tls",
        "upstream_upgraded",
        "_held_out",
        "_strip_tail",
        "_unsent",
    )

    def __init__(self, mode: UpstreamTls, *, listen_tls: bool = False, strip: bool = False) -> None:
        self.mode = mode
        #: ``--strip-starttls``
        self.strip = strip
        self.listen_tls = listen_tls
        #: the client's leg is in TLS now
        self.client_tls = False
        #: the upstream's leg is in TLS now
        self.upstream_tls = False
        #: the client has sent nothing since its TLS handshake ended (GnuTLS
        #: clients hang up there when they do not trust the certificate)
        self.client_silent = False
        #: the upstream answered a client's STARTTLS; its reply is on its way
        self.server_answered = False
        #: ``starttls`` mode: the upstream has been upgraded (or tried)
        self.upstream_upgraded = False
        #: the upstream's last EHLO/HELO reply not yet acted on
        self.hello_reply: Reply | None = None
        #: the client's last EHLO/HELO line, said again over TLS in ``starttls`` mode
        self.last_hello = b""
        #: the client's last STARTTLS line, as it sent it
        self.starttls_line = b""
        self.stripped = False
        self._strip_tail = b""
        self._held_out = bytearray()
        self._unsent = bytearray()

    # -- what the observer saw ---------------------------------------------

    def see_reply(self, reply: Reply) -> None:
        """A reply to STARTTLS, EHLO or HELO went by."""
        if reply.command == "STARTTLS":
            self.server_answered = True
        elif reply.command in ("EHLO", "HELO"):
            self.hello_reply = reply

    def see_command(self, command: Command) -> None:
        """A client's STARTTLS, EHLO or HELO went by."""
        if command.verb == "STARTTLS":
            self.starttls_line = command.raw
        else:
            self.last_hello = command.raw

    # -- decisions ---------------------------------------------------------

    @property
    def implicit_upstream(self) -> bool:
        """Shake hands with the upstream as soon as it is connected."""
        return self.mode is UpstreamTls.IMPLICIT or (
            self.mode is UpstreamTls.MIRROR and self.listen_tls
        )

    def answers_starttls(self) -> bool:
        """Whether the proxy answers the client's STARTTLS itself: the
        upstream leg is settled (``plain``, or already in TLS while the
        client's is not). In ``mirror`` mode never: the upstream answers."""
        mode = self.mode
        if mode is UpstreamTls.PLAIN:
            return True
        return mode is not UpstreamTls.MIRROR and self.upstream_tls and not self.client_tls

    @property
    def upgrade_pending(self) -> bool:
        """``starttls`` mode before the upstream has been upgraded: the
        server's replies are held until the client's first EHLO is answered."""
        return self.mode is UpstreamTls.STARTTLS and not self.upstream_upgraded

    def server_needs_care(self, encrypted: bool) -> bool:
        """Whether the server's bytes need more than forwarding: a STARTTLS
        reply on its way, replies held for the upgrade, or an EHLO reply to
        strip (only while the session is in clear: over TLS the client has
        already chosen)."""
        return self.server_answered or self.upgrade_pending or (self.strip and not encrypted)

    # -- the client's bytes when the proxy answers STARTTLS ----------------

    def client_bytes(
        self, data: bytes | bytearray, *, held: int, open_line: bool, starttls_next: bool
    ) -> tuple[bytes, bool]:
        """When the proxy answers STARTTLS itself, the client's command lines
        go upstream only once whole, so that no byte of a STARTTLS reaches it.
        ``held``: the bytes the observer holds unread at the end of ``data``;
        ``starttls_next``: the client's STARTTLS has come. Returns what may go
        upstream now and whether the STARTTLS has come; then nothing after it
        is passed on (RFC 3207 section 6)."""
        unsent = self._unsent
        unsent += data
        if starttls_next:
            before = max(0, len(unsent) - held - len(self.starttls_line))
            out = bytes(unsent[:before])
            unsent.clear()
            return out, True
        keep = held if open_line else 0
        if len(unsent) <= keep:
            return b"", False
        out = bytes(unsent[: len(unsent) - keep])
        del unsent[: len(unsent) - keep]
        return out, False

    def take_unsent(self) -> bytes:
        """The client's partial line held back, when it has finished sending
        (its half-close goes upstream after it)."""
        out = bytes(self._unsent)
        self._unsent.clear()
        return out

    # -- the server's bytes before the upstream upgrade --------------------

    def hold_for_upgrade(
        self, data: bytes | bytearray, partial_reply_bytes: int
    ) -> tuple[bytes, bool]:
        """``starttls`` mode before the upgrade: hold the server's bytes until
        the reply to the client's EHLO is whole. Returns what goes to the
        client now and whether to upgrade the upstream now; the EHLO reply
        itself is left out (the client gets the one said over TLS instead).
        Whole replies go on at once, and an endless one is not held without
        bound."""
        held = self._held_out
        held += data
        hello = self.hello_reply
        if hello is not None and 200 <= hello.code < 300:
            self.hello_reply = None
            out = bytes(held)
            held.clear()
            if out.endswith(hello.raw):
                out = out[: len(out) - len(hello.raw)]
            self.upstream_upgraded = True
            return out, True
        if held and (partial_reply_bytes == 0 or len(held) > 2 * MAX_LINE):
            out = bytes(held)
            held.clear()
            return out, False
        return b"", False

    # -- --strip-starttls ---------------------------------------------------

    def strip_starttls(self, data: bytes | bytearray) -> tuple[bytes, bool]:
        """``--strip-starttls``: in the EHLO reply the client sees, STARTTLS
        becomes ``XXXXXXXA`` (an unknown keyword of the same length, as
        middleboxes do), so the client believes TLS is not offered. Only
        whole lines are rewritten; a partial last line waits for its end.
        Returns what to pass on and whether this is the first line stripped
        (to note it once)."""
        data = self._strip_tail + data
        cut = data.rfind(b"\n") + 1
        self._strip_tail = data[cut:]
        out, n = rewrite_capabilities(data[:cut], mask=_STARTTLS)
        first = bool(n) and not self.stripped
        if n:
            self.stripped = True
        return out, first
