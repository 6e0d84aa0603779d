"""Interoperability with TLS interception: real mail clients (swaks, msmtp)
through an in-process proxy that terminates TLS on both legs, to the embedded
sink and to aiosmtpd, with STARTTLS and with implicit TLS.

The clients verify the proxy's certificate against its local CA, the proxy
verifies the upstream's against a separate test CA (trustme). Each test checks
what a user relies on: the client's exit code, what the upstream received
compared with the client bytes the proxy recorded, the decoded AUTH, and the
facts of both handshakes.
"""

from __future__ import annotations

import contextlib
import os
import ssl
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from conftest import (
    AioServer,
    Received,
    RunningProxy,
    _Authenticator,
    _Handler,
    free_port,
    require_program,
    start_proxy,
    swaks_argv,
    wait_for_sessions,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from test_peers import (
    MESSAGE,
    MESSAGE_CRLF,
    PASSWORD,
    USER,
    auth_args,
    check_recording,
    decoded_auth,
)

from smtpproxy.events import Anomaly, AuthResult, Command, Note, Side, TlsEstablished
from smtpproxy.recording import Recording, read_recording
from smtpproxy.server import Sink, SinkConfig
from smtpproxy.tls import CertificateAuthority, ServerContexts, client_context

#: bound on one client run (the clients' own timeouts are 10 s)
CLIENT_TIMEOUT = 30


@pytest.fixture(scope="module")
def upstream_ca() -> trustme.CA:
    """The upstreams' CA: not the proxy's, so the two legs are verified apart."""
    return trustme.CA()


@pytest.fixture
def proxy_ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "home")


@dataclass
class Upstream:
    """A TLS-speaking upstream: the embedded sink or aiosmtpd."""

    address: tuple[str, int]
    leaf_sha256: str
    sink: Sink | None = None
    server: AioServer | None = None

    def check_received(self, rec: Recording, mechanism: str) -> bytes:
        """The message reached the upstream exactly as the recording says the
        client sent it; returns that content."""
        if self.server is not None:
            (msg,) = self.server.received.messages
            assert msg["from"] == "ann@example.org" and msg["to"] == ["bob@example.net"]
            assert self.server.received.auth == [(mechanism, USER)]
            return check_recording(rec, msg["content"])  # byte for byte
        assert self.sink is not None
        content = check_recording(rec, None)
        # the sink keeps no content, only counts: one message of that many octets
        assert (self.sink.stats.messages, self.sink.stats.octets) == (1, len(content))
        return content


def _sha256(leaf: trustme.LeafCert) -> str:
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


@pytest.fixture
async def upstream(
    request: pytest.FixtureRequest, nursery: trio.Nursery, upstream_ca: trustme.CA
) -> AsyncIterator[Upstream]:
    """``request.param`` is ``(kind, mode)``: kind ``sink`` or ``aiosmtpd``,
    mode ``starttls`` or ``implicit``. The sink runs in the test's nursery."""
    kind, mode = request.param
    implicit = mode == "implicit"
    leaf = upstream_ca.issue_cert("localhost", "127.0.0.1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(ctx)
    if kind == "sink":
        sink = Sink(SinkConfig(hostname="localhost", tls=ctx, implicit_tls=implicit))
        address = await nursery.start(sink.serve, "127.0.0.1", 0)
        yield Upstream(address, _sha256(leaf), sink=sink)
    else:
        with aiosmtpd(ctx, implicit) as server:
            yield Upstream(server.address, _sha256(leaf), server=server)


@contextlib.contextmanager
def aiosmtpd(ctx: ssl.SSLContext, implicit: bool) -> Iterator[AioServer]:
    """aiosmtpd with AUTH PLAIN/LOGIN for USER/PASSWORD, as tests/test_tls.py
    starts it, here with a leaf whose fingerprint the test knows."""
    from aiosmtpd.controller import Controller

    received = Received()
    port = free_port()
    kwargs: dict[str, Any] = (
        # aiosmtpd only counts STARTTLS as TLS for AUTH; implicit TLS is TLS too
        {"ssl_context": ctx, "auth_require_tls": False}
        if implicit
        else {"tls_context": ctx, "require_starttls": True}
    )
    controller = Controller(
        _Handler(received),
        hostname="127.0.0.1",
        port=port,
        authenticator=_Authenticator(received, {USER: PASSWORD}),
        ready_timeout=10,
        **kwargs,
    )
    controller.start()
    try:
        yield AioServer("127.0.0.1", port, received)
    finally:
        controller.stop()


def starttls(*kinds: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize(
        "upstream", [(k, "starttls") for k in kinds], ids=list(kinds), indirect=True
    )


def implicit(*kinds: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize(
        "upstream", [(k, "implicit") for k in kinds], ids=list(kinds), indirect=True
    )


def tls_config(
    proxy_ca: CertificateAuthority, upstream_ca: trustme.CA, **extra: Any
) -> dict[str, Any]:
    up = client_context()
    upstream_ca.configure_trust(up)
    return {
        "server_contexts": ServerContexts(["localhost", "127.0.0.1"], ca=proxy_ca),
        "upstream_context": up,
        "upstream_sni": "localhost",
        **extra,
    }


async def run_client(argv: Sequence[str], stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(CLIENT_TIMEOUT):
        return await trio.run_process(
            list(argv), stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
        )


def output(done: subprocess.CompletedProcess[bytes]) -> str:
    return (done.stdout + done.stderr).decode(errors="replace")


async def session(
    tmp_path: Path,
    upstream: Upstream,
    config: dict[str, Any],
    client: Callable[[int], list[str]],
    stdin: bytes = b"",
) -> tuple[subprocess.CompletedProcess[bytes], Recording, str]:
    """Start the proxy, run the client command ``client(proxy port)`` to its
    end, wait for the session to end; the client's result, the one
    recording and the transcript."""
    async with trio.open_nursery() as nursery:
        proxy: RunningProxy = await start_proxy(nursery, tmp_path, upstream.address, **config)
        done = await run_client(client(proxy.port), stdin)
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    (path,) = proxy.recording_paths()
    rec = read_recording(path)
    assert rec.close is not None
    return done, rec, proxy.transcript()


def check_tls(rec: Recording, upstream: Upstream, proxy_ca: CertificateAuthority) -> None:
    """Both legs shook hands and the recording says how."""
    events = list(rec.events())
    tls = {e.side: e for e in events if isinstance(e, TlsEstablished)}
    assert [e.side for e in events if isinstance(e, TlsEstablished)].count(Side.CLIENT) == 1
    assert set(tls) == {Side.CLIENT, Side.SERVER}
    client, server = tls[Side.CLIENT], tls[Side.SERVER]
    assert client.version.startswith("TLS") and client.cipher not in ("", "?")
    assert server.version.startswith("TLS") and server.cipher not in ("", "?")
    assert server.verified == "ok" and server.sni == "localhost"
    assert server.peer is not None
    assert "127.0.0.1" in server.peer["sans"] and "localhost" in server.peer["sans"]  # type: ignore[operator]
    assert "trustme" in str(server.peer["issuer"])  # the upstream's CA, not the proxy's
    assert server.peer["sha256"] == upstream.leaf_sha256
    assert proxy_ca.fingerprint() != server.peer["sha256"]
    assert not [e for e in events if isinstance(e, Anomaly) and e.kind == "auth_in_clear"]
    assert not [e for e in events if isinstance(e, Note) and e.kind == "tls_error"]


def check_auth(rec: Recording, mechanism: str) -> None:
    """The AUTH exchange was decoded, and happened inside TLS on both legs."""
    events = list(rec.events())
    decoded_mechanism, fields = decoded_auth(rec)
    assert decoded_mechanism == mechanism
    assert fields["user"] == USER
    if mechanism == "CRAM-MD5":
        assert "password" not in fields and len(fields["digest"]) == 32
    else:
        assert fields["password"] == PASSWORD
    first_auth = next(
        i for i, e in enumerate(events) if isinstance(e, Command) and e.verb == "AUTH"
    )
    last_tls = max(i for i, e in enumerate(events) if isinstance(e, TlsEstablished))
    assert last_tls < first_auth
    (result,) = [e for e in events if isinstance(e, AuthResult)]
    assert result.success and result.code == 235
    assert result.mechanism == mechanism and result.user == USER
    assert rec.close is not None
    assert rec.close.totals["auth"] == {"mechanism": mechanism, "user": USER, "success": True}


# -- swaks ---------------------------------------------------------------------


def swaks(tmp_path: Path, *args: str) -> Callable[[int], list[str]]:
    """The swaks command line for a proxy port."""
    message = tmp_path / "message.eml"
    message.write_bytes(MESSAGE)

    def argv(port: int) -> list[str]:
        return swaks_argv("127.0.0.1", port, message, *args)

    return argv


def trust(proxy_ca: CertificateAuthority) -> list[str]:
    return ["--tls-verify", "--tls-ca-path", str(proxy_ca.cert_path)]


@pytest.mark.peer("swaks")
@pytest.mark.parametrize(
    "mechanism, upstream",
    [
        ("PLAIN", ("sink", "starttls")),
        ("PLAIN", ("aiosmtpd", "starttls")),
        ("LOGIN", ("sink", "starttls")),
        ("LOGIN", ("aiosmtpd", "starttls")),
        ("CRAM-MD5", ("sink", "starttls")),  # aiosmtpd does not offer CRAM-MD5
    ],
    ids=["PLAIN-sink", "PLAIN-aiosmtpd", "LOGIN-sink", "LOGIN-aiosmtpd", "CRAM-MD5-sink"],
    indirect=["upstream"],
)
async def test_swaks_starttls_auth(
    tmp_path: Path,
    upstream: Upstream,
    upstream_ca: trustme.CA,
    proxy_ca: CertificateAuthority,
    mechanism: str,
) -> None:
    peer_cert = tmp_path / "peer.pem"
    argv = swaks(
        tmp_path,
        "--tls",
        *trust(proxy_ca),
        "--tls-get-peer-cert", str(peer_cert),
        *auth_args(mechanism),
    )  # fmt: skip
    done, rec, transcript = await session(
        tmp_path, upstream, tls_config(proxy_ca, upstream_ca), argv
    )
    assert done.returncode == 0, output(done)

    # the client was shown a leaf of the proxy's CA, valid for the address it dialled
    shown = x509.load_pem_x509_certificate(peer_cert.read_bytes())
    assert shown.issuer == proxy_ca.cert.subject
    sans = shown.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]

    content = upstream.check_received(rec, mechanism)
    # swaks sends the file with CRLF line ends and may end it with one more CRLF
    assert content in (MESSAGE_CRLF, MESSAGE_CRLF + b"\r\n")
    check_tls(rec, upstream, proxy_ca)
    check_auth(rec, mechanism)
    verbs = [e.verb for e in rec.events() if isinstance(e, Command)]
    assert verbs == ["EHLO", "STARTTLS", "EHLO", "AUTH", "MAIL", "RCPT", "DATA", "QUIT"]
    assert rec.raw(Side.CLIENT).startswith(b"EHLO client.example\r\nSTARTTLS\r\n")
    assert f"~> AUTH {mechanism}" in transcript


@pytest.mark.peer("swaks")
@implicit("sink", "aiosmtpd")
async def test_swaks_implicit_tls(
    tmp_path: Path, upstream: Upstream, upstream_ca: trustme.CA, proxy_ca: CertificateAuthority
) -> None:
    argv = swaks(tmp_path, "--tlsc", *trust(proxy_ca), *auth_args("PLAIN"))
    done, rec, _ = await session(
        tmp_path, upstream, tls_config(proxy_ca, upstream_ca, listen_tls=True), argv
    )
    assert done.returncode == 0, output(done)
    content = upstream.check_received(rec, "PLAIN")
    assert content in (MESSAGE_CRLF, MESSAGE_CRLF + b"\r\n")
    check_tls(rec, upstream, proxy_ca)
    check_auth(rec, "PLAIN")
    verbs = [e.verb for e in rec.events() if isinstance(e, Command)]
    assert verbs == ["EHLO", "AUTH", "MAIL", "RCPT", "DATA", "QUIT"]
    # TLS from the first byte: both handshakes come before any SMTP
    events = list(rec.events())
    assert all(isinstance(e, TlsEstablished) for e in events[:2]), events[:3]


@pytest.mark.peer("swaks")
@starttls("sink")
async def test_swaks_that_does_not_trust_the_proxy_fails_and_is_told_the_fix(
    tmp_path: Path, upstream: Upstream, upstream_ca: trustme.CA, proxy_ca: CertificateAuthority
) -> None:
    argv = swaks(tmp_path, "--tls", "--tls-verify", *auth_args("PLAIN"))  # system store only
    done, rec, transcript = await session(
        tmp_path, upstream, tls_config(proxy_ca, upstream_ca), argv
    )
    assert done.returncode != 0, output(done)
    assert rec.close is not None
    assert rec.close.by == "client"
    assert "TLS handshake with the client failed" in rec.close.reason
    assert "smtpproxy ca" in rec.close.reason
    assert "smtpproxy ca" in transcript
    events = list(rec.events())
    # nothing after STARTTLS was relayed: no credentials, no message
    assert not [e for e in events if isinstance(e, TlsEstablished) and e.side is Side.CLIENT]
    assert [e.verb for e in events if isinstance(e, Command)] == ["EHLO", "STARTTLS"]
    assert upstream.sink is not None and upstream.sink.stats.messages == 0


# -- msmtp ---------------------------------------------------------------------


def msmtp(tmp_path: Path, *settings: str) -> Callable[[int], list[str]]:
    """The msmtp command line for a proxy port; its configuration file is
    written once the port is known."""
    exe = require_program("msmtp", "msmtp")
    config = tmp_path / "msmtprc"

    def argv(port: int) -> list[str]:
        config.write_text(
            "\n".join(
                [
                    "defaults",
                    "syslog off",
                    "account proxy",
                    "host 127.0.0.1",
                    f"port {port}",
                    "protocol smtp",
                    "domain client.example",
                    "auth plain",
                    f"user {USER}",
                    f"password {PASSWORD}",
                    "from ann@example.org",
                    "timeout 10",
                    *settings,
                    "",
                ]
            )
        )
        os.chmod(config, 0o600)  # msmtp refuses a password file others can read
        return [exe, "-C", str(config), "-a", "proxy", "bob@example.net"]

    return argv


def check_msmtp_content(content: bytes) -> None:
    # msmtp sends CRLF and prepends the Date and Message-ID headers it finds missing
    assert content.endswith(MESSAGE_CRLF)
    added = content[: -len(MESSAGE_CRLF)]
    lines = added.split(b"\r\n")[:-1]
    assert all(ln.startswith((b"Date: ", b"Message-ID: ")) for ln in lines), added


@pytest.mark.peer("msmtp")
@starttls("sink", "aiosmtpd")
async def test_msmtp_starttls_auth_plain(
    tmp_path: Path, upstream: Upstream, upstream_ca: trustme.CA, proxy_ca: CertificateAuthority
) -> None:
    done, rec, transcript = await session(
        tmp_path,
        upstream,
        tls_config(proxy_ca, upstream_ca),
        msmtp(tmp_path, "tls on", "tls_starttls on", f"tls_trust_file {proxy_ca.cert_path}"),
        MESSAGE,
    )
    assert done.returncode == 0, output(done)
    content = upstream.check_received(rec, "PLAIN")
    check_msmtp_content(content)
    check_tls(rec, upstream, proxy_ca)
    check_auth(rec, "PLAIN")
    verbs = [e.verb for e in rec.events() if isinstance(e, Command)]
    assert verbs == ["EHLO", "STARTTLS", "EHLO", "AUTH", "MAIL", "RCPT", "DATA", "QUIT"]
    assert f'user="{USER}" password="{PASSWORD}"' in transcript


@pytest.mark.peer("msmtp")
@implicit("sink", "aiosmtpd")
async def test_msmtp_implicit_tls(
    tmp_path: Path, upstream: Upstream, upstream_ca: trustme.CA, proxy_ca: CertificateAuthority
) -> None:
    done, rec, _ = await session(
        tmp_path,
        upstream,
        tls_config(proxy_ca, upstream_ca, listen_tls=True),
        msmtp(tmp_path, "tls on", "tls_starttls off", f"tls_trust_file {proxy_ca.cert_path}"),
        MESSAGE,
    )
    assert done.returncode == 0, output(done)
    content = upstream.check_received(rec, "PLAIN")
    check_msmtp_content(content)
    check_tls(rec, upstream, proxy_ca)
    check_auth(rec, "PLAIN")
    verbs = [e.verb for e in rec.events() if isinstance(e, Command)]
    assert verbs == ["EHLO", "AUTH", "MAIL", "RCPT", "DATA", "QUIT"]


@pytest.mark.peer("msmtp")
@starttls("sink")
async def test_msmtp_that_does_not_trust_the_proxy_fails_and_is_told_the_fix(
    tmp_path: Path, upstream: Upstream, upstream_ca: trustme.CA, proxy_ca: CertificateAuthority
) -> None:
    done, rec, transcript = await session(
        tmp_path,
        upstream,
        tls_config(proxy_ca, upstream_ca),
        msmtp(tmp_path, "tls on", "tls_starttls on"),  # no tls_trust_file: the system store
        MESSAGE,
    )
    assert done.returncode != 0, output(done)
    assert b"TLS certificate verification failed" in done.stderr
    events = list(rec.events())
    # nothing after STARTTLS was relayed: no credentials, no message
    assert [e.verb for e in events if isinstance(e, Command)] == ["EHLO", "STARTTLS"]
    assert upstream.sink is not None and upstream.sink.stats.messages == 0
    assert rec.close is not None and rec.close.by == "client"
    assert "smtpproxy ca" in rec.close.reason, rec.close.reason
    assert "smtpproxy ca" in transcript
