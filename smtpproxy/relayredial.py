"""``dot: REPLY`` in the relay keeps the client's session going: the proxy
closes the upstream connection before the final dot (that is what makes the
server drop the message; an RSET there would be message text, RFC 5321
section 4.1.1.4), then dials the upstream again and brings the new
connection to the state the client believes it is in: the greeting, the
client's EHLO, STARTTLS when the upstream leg was in TLS (with the same
settings), and the client's AUTH exchange when it can be said again byte for
byte (PLAIN, LOGIN, XOAUTH2, OAUTHBEARER: answers that do not depend on the
server's challenge, RFC 4954 section 4).

``UpstreamSetup`` follows, as they go by, the steps the client's session
rests on at the upstream; ``UpstreamRedial`` (a base of
``relayfaults.FaultSteps``) makes the new connection. What the proxy says to
the new upstream, and its replies, are notes in the recording (the client
never sent them); a ``!!`` line says the upstream was reopened. Where the
state cannot be rebuilt (an AUTH that answered a challenge, a dial or
handshake that fails, a reply of another class than the original's), the
client gets ``421 4.4.2`` after the fault's reply and the session ends,
noted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio

from .events import AuthResponse, Command, Note, NoteKind, Reply, Side
from .net import is_ip, tls_reason
from .protocol import Conversation
from .streams import receive, send_all
from .tls import HandshakeFailed, handshake

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from .faults import Fault
    from .relayparts import SessionParts as _Parts
else:
    _Parts = object

__all__ = ["REPLAYABLE", "UpstreamRedial", "UpstreamSetup"]

#: SASL mechanisms whose client side can be said again byte for byte: its
#: answers do not depend on what the server sends (RFC 4954, RFC 4616, RFC 7628)
REPLAYABLE = frozenset({"PLAIN", "LOGIN", "XOAUTH2", "OAUTHBEARER"})
#: the replies ``UpstreamSetup.reply`` wants to see
SETUP_REPLIES = frozenset({"EHLO", "HELO", "AUTH", "STARTTLS"})


@dataclass(slots=True)
class _Said:
    """A line the client sent the upstream and the reply codes it got."""

    raw: bytes
    verb: str  # EHLO, HELO, AUTH, or <auth> for a SASL response
    codes: list[int] = field(default_factory=list)


class UpstreamSetup:
    """The steps the client's session rests on at the upstream, followed as
    they go by: the hello in force (a new EHLO/HELO starts afresh, RFC 5321
    section 4.1.4), the AUTH exchange that succeeded after it, and, when the
    upstream leg went into TLS by STARTTLS, the hello said before it (after
    TLS the server forgets what it knew, RFC 3207 section 4.2)."""

    __slots__ = ("said", "hello_before_tls", "starttls_line", "_open")

    def __init__(self) -> None:
        self.said: list[_Said] = []
        self.hello_before_tls: bytes | None = None
        self.starttls_line = b"STARTTLS\r\n"
        self._open: _Said | None = None  # the line whose reply comes next

    def command(self, ev: Command) -> None:
        """The client's EHLO, HELO, AUTH or STARTTLS went upstream."""
        verb = ev.verb
        if verb == "STARTTLS":
            self.starttls_line = ev.raw
            self._open = None
            return
        said = _Said(ev.raw, verb)
        if verb in ("EHLO", "HELO"):
            self.said = [said]
        elif verb == "AUTH":
            mech = ev.auth.mechanism if ev.auth is not None else ev.arg.split(" ", 1)[0]
            said.verb = f"AUTH {mech.upper()}"
            self.said.append(said)
        else:
            return
        self._open = said

    def response(self, ev: AuthResponse) -> None:
        """A SASL response went upstream."""
        said = _Said(ev.raw, "<auth>")
        self.said.append(said)
        self._open = said

    def reply(self, ev: Reply) -> None:
        """The upstream answered one of them."""
        if ev.command == "STARTTLS":
            if 200 <= ev.code < 300:
                hello = next((s.raw for s in self.said if s.verb in ("EHLO", "HELO")), None)
                self.hello_before_tls = hello or b"EHLO smtpproxy\r\n"
                self.said = []
            return
        said = self._open
        if said is None:
            return
        said.codes.append(ev.code)
        if ev.intermediate:
            return
        self._open = None
        if said.verb != "<auth>" and not said.verb.startswith("AUTH"):
            return
        if not 200 <= ev.code < 300:  # a failed AUTH leaves no state behind
            while self.said and self.said[-1].verb == "<auth>":
                self.said.pop()
            if self.said and self.said[-1].verb.startswith("AUTH"):
                self.said.pop()

    def script(self) -> tuple[list[_Said], str]:
        """The lines to say again in order, each with the reply codes the
        original got, and why it cannot be done ("" when it can)."""
        out: list[_Said] = []
        for said in self.said:
            if not said.codes:
                continue  # never answered: the upstream has no state from it
            if said.verb.startswith("AUTH") and said.verb[5:] not in REPLAYABLE:
                return [], (
                    f"{said.verb} cannot be said again: its answer depends on the server's "
                    "challenge"
                )
            out.append(said)
        return out, ""


class UpstreamRedial(_Parts):
    """A new upstream connection in the client's state, for
    ``relayfaults.FaultSteps``."""

    if TYPE_CHECKING:  # what the session gives these steps
        _open_upstream: Callable[[str, int], Awaitable[trio.abc.Stream]]
        _server_unsent: bytearray
        _server_ahead: int

    def _init_redial(self) -> None:
        self._setup = UpstreamSetup()
        #: set while the proxy replaces the upstream connection
        self._redialing: trio.Event | None = None
        #: how many times the upstream connection was replaced
        self._upstream_gen = 0

    async def _upstream_replaced(self, gen: int) -> bool:
        """The server pump's upstream was closed under it: if the proxy did
        it to dial again, wait for that; True: read the new connection."""
        if self._redialing is not None:
            await self._redialing.wait()
        return self._upstream_gen != gen

    async def _reopen_upstream(self, fault: Fault) -> bool:
        """Close the upstream connection (the message it was reading is
        dropped) and dial another in the client's state. False: it could
        not be done; the client has been told 421 and the session ends."""
        self._redialing = done = trio.Event()
        try:
            await trio.aclose_forcefully(self.streams[Side.SERVER])
            stream, why = await self._redial()
            if stream is not None:
                self.streams[Side.SERVER] = stream
                self._upstream_gen += 1
                self._server_unsent.clear()
                self._server_ahead = 0
                self._fired(
                    fault,
                    "upstream reopened: a new connection in the client's state "
                    f"({why}); the client's session goes on",
                )
                return True
        finally:
            self._redialing = None
            done.set()
        self._fired(fault, f"upstream not reopened: {why}; the client is told 421")
        self._end("proxy", f"fault {fault.rule}: message withheld, upstream closed; {why}")
        await self._reply_to_client(
            421, "4.4.2 smtpproxy: upstream connection lost, closing", NoteKind.PROXY_REPLY
        )
        return False

    async def _redial(self) -> tuple[trio.abc.Stream | None, str]:
        """A new upstream connection brought to the client's state, and
        what was said to it; or None and why not."""
        script, why = self._setup.script()
        if why:
            return None, why
        cfg = self.proxy.config
        host, port = cfg.upstream
        try:
            with trio.fail_after(cfg.connect_timeout):
                stream = await self._open_upstream(host, port)
        except (trio.TooSlowError, OSError) as exc:
            return None, f"dialling again failed: {tls_reason(exc)}"
        tls = self.tls
        done: list[str] = []
        try:
            with trio.fail_after(cfg.handshake_timeout or math.inf):
                if tls.upstream_tls and tls.implicit_upstream:
                    stream = await self._redial_tls(stream)
                    done.append("TLS")
                conv = Conversation()
                said: list[tuple[_Said, str]] = []
                if tls.upstream_tls and not tls.implicit_upstream:
                    hello = self._setup.hello_before_tls
                    if hello is None:  # --upstream-tls starttls: the proxy's own upgrade
                        hello = script[0].raw if script else b"EHLO smtpproxy\r\n"
                    said = [(_Said(hello, "EHLO", [250]), ""), (_Said(b"", "STARTTLS"), "")]
                said += [(s, "") for s in script]
                reply = await self._heard(stream, conv, None)
                if reply is None or not 200 <= reply.code < 300:
                    raise _Refused(f"the new upstream greeted with {_said(reply)}")
                for step, _ in said:
                    if step.verb == "STARTTLS":
                        line = self._setup.starttls_line
                        reply = await self._heard(stream, conv, line, line)
                        if reply is None or reply.code != 220:
                            raise _Refused(f"STARTTLS again got {_said(reply)}")
                        stream = await self._redial_tls(stream)
                        conv = Conversation(greeted=True)
                        done.append("STARTTLS")
                        continue
                    shown = step.raw if not step.verb.startswith(("AUTH", "<")) else None
                    reply = await self._heard(stream, conv, step.raw, shown, step.verb)
                    if reply is None or reply.code // 100 != step.codes[-1] // 100:
                        raise _Refused(
                            f"{step.verb} again got {_said(reply)}, not {step.codes[-1]} as before"
                        )
                    if step.verb[0] != "<":
                        done.append(step.verb)
        except _Refused as exc:
            await trio.aclose_forcefully(stream)
            return None, str(exc)
        except (
            trio.TooSlowError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            HandshakeFailed,
        ) as exc:
            await trio.aclose_forcefully(stream)
            reason = exc.reason if isinstance(exc, HandshakeFailed) else tls_reason(exc)
            return None, f"the new upstream connection failed: {reason}"
        except BaseException:  # cancelled: the session is ending
            await trio.aclose_forcefully(stream)
            raise
        return stream, ", ".join(["greeting", *done])

    async def _redial_tls(self, stream: trio.abc.Stream) -> trio.abc.Stream:
        """The upstream TLS handshake again, with the session's settings."""
        cfg = self.proxy.config
        ctx = cfg.upstream_context
        if ctx is None:
            raise _Refused("no upstream TLS context")
        sni = cfg.upstream_sni or cfg.upstream[0]
        new = await handshake(
            stream,
            ctx,
            server_side=False,
            server_hostname=sni if not is_ip(sni) or ctx.check_hostname else None,
            timeout=cfg.handshake_timeout or math.inf,
        )
        self.observe(
            [Note(Side.SERVER, NoteKind.PROXY_FORWARDED, "TLS with the new upstream connection")]
        )
        return new

    async def _heard(
        self,
        stream: trio.abc.Stream,
        conv: Conversation,
        line: bytes | None,
        shown: bytes | None = None,
        what: str = "",
    ) -> Reply | None:
        """Say ``line`` to the new upstream (None: only listen, for its
        greeting) and read its reply. Both are notes: the line as ``shown``,
        or (an AUTH line, which holds a secret) only its verb."""
        if line is not None:
            conv.feed(Side.CLIENT, line)
            text = (
                shown.decode("utf-8", "replace").strip()
                if shown is not None
                else f"{what} (the client's, as it sent it)"
            )
            self.observe(
                [
                    Note(
                        Side.CLIENT,
                        NoteKind.PROXY_COMMAND,
                        f"proxy sent the new upstream: {text}",
                        shown or b"",
                    )
                ]
            )
            await send_all(stream, line)
        while True:
            data = await receive(stream)
            if not data:
                return None
            for ev in conv.feed(Side.SERVER, data):
                if type(ev) is Reply:
                    self.observe(
                        [Note(Side.SERVER, NoteKind.PROXY_REPLY_FROM_UPSTREAM, ev.text, ev.raw)]
                    )
                    return ev


class _Refused(Exception):
    """The new upstream did not get to the client's state (the reason)."""


def _said(reply: Reply | None) -> str:
    return "no reply (connection closed)" if reply is None else f"{reply.code} {reply.text}"
