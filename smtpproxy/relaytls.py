"""The relay's TLS steps: the handshakes of a session's two legs, STARTTLS
on either, and the reads its TLS arrangement (smtpproxy/tlsmodes.py) wants
handled with care.

``TlsSteps`` is the part of ``relay.Session`` that does TLS I/O: the
session relays, observes and closes, and hands a read here when
``TlsArrangement`` says it needs more than forwarding. Every handshake is
``tls.handshake``, under the leg's send lock. The rules are in docs/tls.md.
"""

from __future__ import annotations

import math
import ssl
from typing import TYPE_CHECKING

import trio

from .events import Note, NoteKind, Reply, Side, TlsEstablished
from .net import is_ip, tls_reason
from .protocol import Conversation, format_reply
from .streams import receive
from .tls import HandshakeFailed, TlsFailure, bad_cert_words, handshake, handshake_facts

if TYPE_CHECKING:
    from .faults import Fault
    from .relayparts import SessionParts as _Parts
    from .tls import ServerContexts
else:
    _Parts = object


__all__ = ["TlsSteps"]


class TlsSteps(_Parts):
    """STARTTLS and the handshakes, for ``relay.Session`` (its base class)."""

    if TYPE_CHECKING:  # what the session gives these steps
        reason: str
        _locks: dict[Side, trio.Semaphore]
        _replies_seen: trio.Event | None
        _resume_client: trio.Event

        _faulty: bool

        async def _fault_tls(self) -> bool: ...

    #: a ``tls: cert KIND`` fault that fired for the client's handshake
    #: (``FaultSteps._fault_tls`` sets it): show that bad certificate
    _cert_fault: Fault | None = None

    # -- the handshakes ------------------------------------------------------

    async def _client_handshake(self) -> bool:
        """Shake hands with the client as a TLS server."""
        cfg = self.proxy.config
        contexts = cfg.server_contexts
        if self._faulty and not await self._fault_tls():
            return False
        if contexts is None:
            self._end("proxy", "TLS requested but no certificate is configured")
            self.observe([Note(Side.CLIENT, NoteKind.TLS_ERROR, self.reason)])
            return False
        context, shown = self._client_context(contexts)
        limit = min(
            (t for t in (cfg.handshake_timeout, cfg.idle_timeout) if t > 0), default=math.inf
        )
        try:
            stream = await handshake(
                self.streams[Side.CLIENT],
                context,
                server_side=True,
                timeout=limit,
                lock=self._locks[Side.CLIENT],
            )
        except HandshakeFailed as failed:
            if failed.timed_out:
                # the proxy gave up on a silent or slow client: its decision, not the client's
                self._end("proxy", f"TLS handshake with the client timed out after {limit:g}s")
            else:
                cause = failed.reason
                sni = contexts.sni_of(failed.ssl_object)
                if sni:
                    cause += f" (SNI {sni})"
                hint = ""
                if shown:  # a fault's bad certificate: the client did what it should
                    hint = f"; it was shown {shown}"
                elif any(
                    w in cause.lower()
                    for w in ("alert", "certificate", "eof", "closed", "unknown_ca")
                ):
                    hint = "; if the client does not trust the proxy, run 'smtpproxy ca' and trust that CA"
                self._end("client", f"TLS handshake with the client failed: {cause}{hint}")
            self.observe([Note(Side.CLIENT, NoteKind.TLS_ERROR, self.reason)])
            return False
        # no checkpoint since the lock was released: no writer has used the old stream
        self.streams[Side.CLIENT] = stream
        self.tls.client_tls = self.tls.client_silent = True
        facts = handshake_facts(stream._ssl_object)
        self.observe(
            [
                TlsEstablished(
                    Side.CLIENT,
                    facts.version,
                    facts.cipher,
                    sni=contexts.sni_of(stream._ssl_object),
                )
            ]
        )
        return True

    def _client_context(self, contexts: ServerContexts) -> tuple[ssl.SSLContext, str]:
        """The context for the client's handshake, and unless it is the
        usual one what it shows: a ``tls: cert`` fault's bad certificate
        (``ServerContexts.bad``), noted in the recording and the transcript
        before the handshake, so that it is there whatever the client does."""
        fault, self._cert_fault = self._cert_fault, None
        if fault is None:
            return contexts.default, ""
        try:
            context = contexts.bad(fault.cert)
        except TlsFailure as exc:  # --cert and a rule from a re-read --faults file
            self._fired(fault, f"not applied: {exc}")
            return contexts.default, ""
        what = bad_cert_words(fault.cert)
        self._fired(fault, f"showed the client {what}")
        return context, f"{what} by fault {fault.rule}"

    async def _upstream_handshake(self) -> bool:
        """Shake hands with the upstream as a TLS client."""
        cfg = self.proxy.config
        ctx = cfg.upstream_context
        if ctx is None:
            self._end("proxy", "upstream TLS requested but no client context is configured")
            return False
        sni = cfg.upstream_sni or cfg.upstream[0]
        try:
            stream = await handshake(
                self.streams[Side.SERVER],
                ctx,
                server_side=False,
                server_hostname=sni if not is_ip(sni) or ctx.check_hostname else None,
                timeout=cfg.handshake_timeout or math.inf,
                lock=self._locks[Side.SERVER],
            )
        except HandshakeFailed as failed:
            self._end("proxy", f"TLS handshake with the upstream failed: {failed.reason}")
            self.observe([Note(Side.SERVER, NoteKind.TLS_ERROR, self.reason)])
            return False
        self.streams[Side.SERVER] = stream  # no checkpoint since the lock was released
        self.tls.upstream_tls = True
        facts = handshake_facts(stream._ssl_object)
        verified = "skipped (--upstream-insecure)" if ctx.verify_mode == ssl.CERT_NONE else "ok"
        self.observe(
            [
                TlsEstablished(
                    Side.SERVER,
                    facts.version,
                    facts.cipher,
                    sni=sni,
                    peer=facts.peer,
                    verified=verified,
                )
            ]
        )
        return True

    async def _starttls(self, upgrade_upstream: bool, reply: bytes | bytearray) -> bool:
        """The client's STARTTLS was agreed: upgrade the upstream first (so a
        failure there can still be told to the client in clear), then pass
        the 220 on and shake hands with the client."""
        if upgrade_upstream and not await self._upstream_handshake():
            await self._reply_to_client(
                421, f"4.7.0 smtpproxy: {self.reason}", NoteKind.PROXY_REPLY
            )
            return False
        try:
            await self._send(Side.CLIENT, reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._end("client", "client went away during STARTTLS")
            return False
        if not await self._client_handshake():
            return False
        self.observe(self.conv.tls_established(), call="tls_established")
        return True

    # -- reads the TLS arrangement wants handled ---------------------------

    async def _with_care(self, side: Side, data: bytes | bytearray) -> bool:
        """The rare reads: STARTTLS on either leg, ``--upstream-tls
        starttls`` and ``--strip-starttls``. False ends the session."""
        if side is Side.CLIENT:
            return await self._client_care(data)
        try:
            return await self._server_care(data)
        finally:
            if self._replies_seen is not None:
                self._replies_seen.set()  # the client pump may be waiting for these replies

    async def _client_care(self, data: bytes | bytearray) -> bool:
        conv = self.conv
        held = conv.held_client_bytes
        if self.tls.answers_starttls():
            out, starttls = self.tls.client_bytes(
                data,
                held=held,
                open_line=bool(conv.open_line),
                starttls_next=conv.waiting_for == "STARTTLS",
            )
            if out:
                await self._send(Side.SERVER, out)
            if starttls:
                await self._replies_before_starttls()
                return await self._local_starttls()
            return True
        # never carry bytes pipelined after STARTTLS into TLS
        await self._send(Side.SERVER, data[: len(data) - held] if held else data)
        await self._resume_client.wait()
        self._resume_client = trio.Event()
        return not self.closed_by

    async def _replies_before_starttls(self) -> None:
        """Wait until the server has answered every command the client sent
        before the STARTTLS the proxy answers itself (the server pump passes
        those replies on), so that the client gets each reply in its turn
        (RFC 2920 section 3.1) and the proxy's 220 last."""
        while self.conv.next_reply_for not in ("STARTTLS", None):
            self._replies_seen = trio.Event()
            try:
                await self._replies_seen.wait()
            finally:
                self._replies_seen = None

    async def _server_care(self, data: bytes | bytearray) -> bool:
        conv = self.conv
        tls = self.tls
        other = Side.CLIENT
        if tls.server_answered:
            tls.server_answered = False
            held = conv.held_server_bytes
            upto = data[: len(data) - held] if held else data
            ok = True
            if conv.server_tls:
                ok = await self._starttls(True, upto)
            else:
                await self._send(other, upto)
            self._resume_client.set()
            return ok
        if tls.upgrade_pending:
            out, upgrade = tls.hold_for_upgrade(data, conv.partial_reply_bytes)
            if out:
                await self._send(other, out)
            return await self._upgrade_upstream_now() if upgrade else True
        if tls.strip:
            data, first = tls.strip_starttls(data)
            if first:
                self.observe(
                    [
                        Note(
                            Side.SERVER,
                            NoteKind.STRIP_STARTTLS,
                            "STARTTLS hidden from the client's EHLO reply",
                        )
                    ]
                )
        await self._send(other, data)
        return True

    # -- --upstream-tls starttls and plain: the proxy's own STARTTLS -------

    async def _exchange(self, conv: Conversation, line: bytes) -> tuple[Reply | None, bytes]:
        """Send one command upstream on the proxy's own account and read its
        reply through ``conv``; both are recorded as notes (the client did
        not send it). Returns the reply and the bytes read after it."""
        conv.feed(Side.CLIENT, line)
        self.observe(
            [
                Note(
                    Side.CLIENT,
                    NoteKind.PROXY_COMMAND,
                    f"proxy sent upstream: {line.decode('utf-8', 'replace').strip()}",
                    line,
                )
            ]
        )
        await self._send(Side.SERVER, line)
        got = bytearray()
        with trio.fail_after(self.proxy.config.handshake_timeout or math.inf):
            while True:
                data = await receive(self.streams[Side.SERVER])
                if not data:
                    return None, b""
                got += data
                used = 0  # the events' raw bytes are what the Conversation read, in order
                for ev in conv.feed(Side.SERVER, data):
                    used += len(ev.raw)
                    if isinstance(ev, Reply):
                        self.observe(
                            [Note(Side.SERVER, NoteKind.PROXY_REPLY_FROM_UPSTREAM, ev.text, ev.raw)]
                        )
                        return ev, bytes(got[used:])
                del got[:used]

    async def _upgrade_upstream_now(self) -> bool:
        """``--upstream-tls starttls``: after the client's first EHLO, upgrade
        the upstream leg with STARTTLS, say EHLO again over TLS, and give the
        client that reply instead. The client's own leg stays as it chose."""
        try:
            conv = Conversation(greeted=True)
            reply, _ = await self._exchange(conv, b"STARTTLS\r\n")
            if reply is None or reply.code != 220:
                why = (
                    f"upstream refused STARTTLS: {reply.code} {reply.text}"
                    if reply
                    else "upstream closed"
                )
                self._end("proxy", why)
                await self._reply_to_client(421, f"4.7.0 smtpproxy: {why}", NoteKind.PROXY_REPLY)
                return False
            # what the server sent after its 220 is not carried into TLS, and
            # is flagged as in the default mode (RFC 3207 section 6)
            self.observe(conv.tls_established())
            if not await self._upstream_handshake():
                await self._reply_to_client(
                    421, f"4.7.0 smtpproxy: {self.reason}", NoteKind.PROXY_REPLY
                )
                return False
            again, rest = await self._exchange(
                Conversation(greeted=True), self.tls.last_hello or b"EHLO smtpproxy\r\n"
            )
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._end("proxy", f"upstream STARTTLS failed: {tls_reason(exc)}")
            await self._reply_to_client(
                421, f"4.7.0 smtpproxy: {self.reason}", NoteKind.PROXY_REPLY
            )
            return False
        if again is None:
            self._end("server", "upstream closed after STARTTLS")
            return False
        self.observe(
            [
                Note(
                    Side.SERVER,
                    NoteKind.PROXY_FORWARDED,
                    "the client was given the upstream's EHLO reply after TLS",
                )
            ]
        )
        await self._send(Side.CLIENT, again.raw)
        if rest:
            # the server said more after its EHLO reply: the session's own bytes
            self.observe(self.conv.feed(Side.SERVER, rest), fed=(Side.SERVER, rest))
            await self._send(Side.CLIENT, rest)
        return True

    async def _local_starttls(self) -> bool:
        """``--upstream-tls plain`` (or an upstream already in TLS): answer
        the client's STARTTLS here and do not pass it on."""
        reply = format_reply(220, "2.0.0 Ready to start TLS (answered by smtpproxy)")
        note = Note(Side.SERVER, NoteKind.PROXY_REPLY, "STARTTLS answered by the proxy", reply)
        self.observe(self.conv.feed(Side.SERVER, reply), fed=(Side.SERVER, reply), note=note)
        # the server did not answer it: its next bytes go on as they come
        self.tls.server_answered = False
        return await self._starttls(False, reply)
