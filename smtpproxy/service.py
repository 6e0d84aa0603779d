"""A proxy and what it relays to, started as one: what ``record``, ``mock``
and the Python API (``smtpproxy.sink()``, ``proxy()``, ``mock()``) run.

The upstream is a real server (``config.upstream``) or an embedded one
served on an ephemeral loopback port beside the proxy: the embedded sink
(``server.Sink``) or a recorded server (``mockserver.MockServer``). The
proxy in front is the same either way, so what it promises (recordings
0600, the transcript, TLS with the local CA, fault rules) holds for all.
"""

from __future__ import annotations

from typing import Protocol

import trio

from .relay import Proxy, ProxyConfig
from .render import Transcript
from .server import Sink, SinkConfig
from .tls import CertificateAuthority, ServerContexts
from .tlsmodes import UpstreamTls

__all__ = ["Embedded", "Service", "embedded_sink"]


class Embedded(Protocol):
    """A server run beside the proxy as its upstream."""

    async def serve(
        self,
        host: str = ...,
        port: int = ...,
        *,
        task_status: trio.TaskStatus[tuple[str, int]] = ...,
    ) -> None: ...


def embedded_sink(config: ProxyConfig, ca: CertificateAuthority | None) -> Sink:
    """The embedded server as ``record``'s default upstream: STARTTLS with a
    certificate from the local CA (which the proxy's upstream leg trusts),
    implicit TLS when the proxy listens with it and mirrors it."""
    tls = ServerContexts(["localhost", "127.0.0.1"], ca=ca) if ca is not None else None
    return Sink(
        SinkConfig(
            idle_timeout=config.idle_timeout or 300.0,
            tls=tls.default if tls else None,
            implicit_tls=config.listen_tls and config.upstream_tls is not UpstreamTls.PLAIN,
        )
    )


class Service:
    """The proxy of ``config`` and, when ``embedded`` is given, that server as
    its upstream (``label`` names it in the banner and recordings)."""

    def __init__(
        self,
        config: ProxyConfig,
        transcript: Transcript,
        embedded: Embedded | None = None,
        label: str = "embedded sink",
    ) -> None:
        self.config = config
        self.proxy = Proxy(config, transcript)
        self.embedded = embedded
        self.label = label
        self._listeners: list[trio.SocketListener] | None = None

    async def listen(self) -> None:
        """Bind the proxy's listening sockets (OSError when the address
        cannot be had: in use, not ours), before anything else starts."""
        self._listeners = await self.proxy.listen()

    async def run(
        self, *, task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Start the embedded server, then serve until cancelled;
        ``task_status`` gets the address the proxy listens on (the real port
        when asked for 0). Call ``listen`` first."""
        listeners = self._listeners
        if listeners is None:
            raise RuntimeError("Service.listen() first")
        async with trio.open_nursery() as nursery:
            if self.embedded is not None:
                host, port = await nursery.start(self.embedded.serve, "127.0.0.1", 0)
                self.config.upstream = (host, port)
                self.config.upstream_label = f"{self.label} {host}:{port}"
            address = await nursery.start(self.proxy.serve, listeners)
            task_status.started(address)
