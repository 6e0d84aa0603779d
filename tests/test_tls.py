"""TLS interception over loopback with real peers: smtplib clients,
aiosmtpd upstreams with STARTTLS or implicit TLS, test CAs from trustme."""

from __future__ import annotations

import smtplib
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trustme
from conftest import (
    AioServer,
    Received,
    _Authenticator,
    _Handler,
    free_port,
    start_proxy,
    wait_for_sessions,
)

from smtpproxy.events import Anomaly, Command, Note, Reply, Side, TlsEstablished
from smtpproxy.recording import read_recording
from smtpproxy.tls import CertificateAuthority, ServerContexts, client_context

MESSAGE = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: tls\r\n\r\nsecret body\r\n"


@pytest.fixture(scope="module")
def upstream_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def proxy_ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "home")


def _aiosmtpd(upstream_ca: trustme.CA, implicit: bool) -> Iterator[AioServer]:
    from aiosmtpd.controller import Controller

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    upstream_ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
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
        authenticator=_Authenticator(received, {"user@domain.com": "password"}),
        ready_timeout=10,
        **kwargs,
    )
    controller.start()
    try:
        yield AioServer("127.0.0.1", port, received)
    finally:
        controller.stop()


@pytest.fixture
def starttls_server(upstream_ca: trustme.CA) -> Iterator[AioServer]:
    yield from _aiosmtpd(upstream_ca, implicit=False)


@pytest.fixture
def implicit_server(upstream_ca: trustme.CA) -> Iterator[AioServer]:
    yield from _aiosmtpd(upstream_ca, implicit=True)


def tls_config(
    proxy_ca: CertificateAuthority, upstream_ca: trustme.CA | None, **extra: Any
) -> dict[str, Any]:
    up = client_context()
    if upstream_ca is not None:
        upstream_ca.configure_trust(up)
    return {
        "server_contexts": ServerContexts(["localhost", "127.0.0.1"], ca=proxy_ca),
        "upstream_context": up,
        "upstream_sni": "localhost",
        **extra,
    }


def client_ctx(proxy_ca: CertificateAuthority) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(proxy_ca.cert_path))


async def test_starttls_intercepted_on_both_legs(
    starttls_server: AioServer,
    upstream_ca: trustme.CA,
    proxy_ca: CertificateAuthority,
    tmp_path: Path,
) -> None:
    def client(port: int) -> None:
        with smtplib.SMTP("localhost", port, timeout=10) as c:
            c.ehlo("tls.example")
            c.starttls(context=client_ctx(proxy_ca))
            c.ehlo("tls.example")
            c.login("user@domain.com", "password")
            c.sendmail("a@example.org", ["b@example.net"], MESSAGE)

    async with trio.open_nursery() as nursery:
        proxy = await start_proxy(
            nursery, tmp_path, starttls_server.address, **tls_config(proxy_ca, upstream_ca)
        )
        await trio.to_thread.run_sync(client, proxy.port)
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()

    assert starttls_server.received.messages[0]["content"] == MESSAGE
    rec = read_recording(proxy.recording_paths()[0])
    events = list(rec.events())
    tls = [e for e in events if isinstance(e, TlsEstablished)]
    assert {t.side for t in tls} == {Side.CLIENT, Side.SERVER}
    server_tls = next(t for t in tls if t.side is Side.SERVER)
    assert server_tls.verified == "ok" and server_tls.version.startswith("TLS")
    assert server_tls.peer is not None and "sha256" in server_tls.peer and server_tls.peer["sans"]
    client_tls = next(t for t in tls if t.side is Side.CLIENT)
    assert client_tls.sni == "localhost"
    auth = next(e for e in events if isinstance(e, Command) and e.verb == "AUTH")
    assert auth.auth is not None and auth.auth.fields.get("user") == "user@domain.com"
    # AUTH happened inside TLS: not flagged as clear-text
    assert not any(isinstance(e, Anomaly) and e.kind == "auth_in_clear" for e in events)
    # decrypted commands after STARTTLS were recorded
    verbs = [e.verb for e in events if isinstance(e, Command)]
    assert verbs == ["EHLO", "STARTTLS", "EHLO", "AUTH", "MAIL", "RCPT", "DATA", "QUIT"]
    assert b"secret body" in rec.raw(Side.CLIENT)
    assert "TLS with client" in proxy.transcript() and "~> AUTH PLAIN" in proxy.transcript()


async def test_implicit_tls_both_sides(
    implicit_server: AioServer,
    upstream_ca: trustme.CA,
    proxy_ca: CertificateAuthority,
    tmp_path: Path,
) -> None:
    def client(port: int) -> None:
        with smtplib.SMTP_SSL("localhost", port, timeout=10, context=client_ctx(proxy_ca)) as c:
            c.ehlo("tls.example")
            c.login("user@domain.com", "password")
            c.sendmail("a@example.org", ["b@example.net"], MESSAGE)

    async with trio.open_nursery() as nursery:
        proxy = await start_proxy(
            nursery,
            tmp_path,
            implicit_server.address,
            **tls_config(proxy_ca, upstream_ca, listen_tls=True),
        )
        await trio.to_thread.run_sync(client, proxy.port)
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    assert implicit_server.received.messages[0]["content"] == MESSAGE
    events = list(read_recording(proxy.recording_paths()[0]).events())
    assert len([e for e in events if isinstance(e, TlsEstablished)]) == 2


async def test_plain_client_to_implicit_upstream(
    implicit_server: AioServer,
    upstream_ca: trustme.CA,
    proxy_ca: CertificateAuthority,
    tmp_path: Path,
) -> None:
    def client(port: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
            c.ehlo("plain.example")
            c.sendmail("a@example.org", ["b@example.net"], MESSAGE)

    async with trio.open_nursery() as nursery:
        proxy = await start_proxy(
            nursery,
            tmp_path,
            implicit_server.address,
            **tls_config(proxy_ca, upstream_ca, upstream_tls="implicit"),
        )
        await trio.to_thread.run_sync(client, proxy.port)
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    assert implicit_server.received.messages[0]["content"] == MESSAGE


async def test_untrusted_upstream_certificate_gives_421_and_reason(
    starttls_server: AioServer, proxy_ca: CertificateAuthority, tmp_path: Path
) -> None:
    def client(port: int) -> tuple[int, bytes]:
        with smtplib.SMTP("localhost", port, timeout=10) as c:
            c.ehlo("tls.example")
            try:
                c.starttls(context=client_ctx(proxy_ca))
            except smtplib.SMTPResponseException as exc:
                return exc.smtp_code, exc.smtp_error
            raise AssertionError("STARTTLS should have failed")

    async with trio.open_nursery() as nursery:
        # the proxy does not trust the upstream's test CA
        proxy = await start_proxy(
            nursery, tmp_path, starttls_server.address, **tls_config(proxy_ca, None)
        )
        code, text = await trio.to_thread.run_sync(client, proxy.port)
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    assert code == 421 and b"certificate verify failed" in text
    rec = read_recording(proxy.recording_paths()[0])
    assert rec.close is not None and "certificate verify failed" in rec.close.reason
    assert any(isinstance(e, Note) and e.kind == "tls_error" for e in rec.events())


async def test_upstream_insecure_skips_verification_and_says_so(
    starttls_server: AioServer, proxy_ca: CertificateAuthority, tmp_path: Path
) -> None:
    def client(port: int) -> None:
        with smtplib.SMTP("localhost", port, timeout=10) as c:
            c.ehlo("tls.example")
            c.starttls(context=client_ctx(proxy_ca))
            c.ehlo("tls.example")
            c.sendmail("a@example.org", ["b@example.net"], MESSAGE)

    cfg = tls_config(proxy_ca, None)
    cfg["upstream_context"] = client_context(insecure=True)
    async with trio.open_nursery() as nursery:
        proxy = await start_proxy(nursery, tmp_path, starttls_server.address, **cfg)
        await trio.to_thread.run_sync(client, proxy.port)
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    assert starttls_server.received.messages[0]["content"] == MESSAGE
    events = list(read_recording(proxy.recording_paths()[0]).events())
    up = next(e for e in events if isinstance(e, TlsEstablished) and e.side is Side.SERVER)
    assert up.verified == "skipped (--upstream-insecure)"
    assert "verification: skipped" in proxy.transcript()


async def test_client_that_does_not_trust_the_proxy_is_named_with_the_fix(
    starttls_server: AioServer,
    upstream_ca: trustme.CA,
    proxy_ca: CertificateAuthority,
    tmp_path: Path,
) -> None:
    def client(port: int) -> str:
        with smtplib.SMTP("localhost", port, timeout=10) as c:
            c.ehlo("tls.example")
            try:
                c.starttls(context=ssl.create_default_context())  # system store only
            except ssl.SSLError as exc:
                return str(exc)
            raise AssertionError("the handshake should fail")

    async with trio.open_nursery() as nursery:
        proxy = await start_proxy(
            nursery, tmp_path, starttls_server.address, **tls_config(proxy_ca, upstream_ca)
        )
        error = await trio.to_thread.run_sync(client, proxy.port)
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    assert "CERTIFICATE_VERIFY_FAILED" in error
    rec = read_recording(proxy.recording_paths()[0])
    assert rec.close is not None and "smtpproxy ca" in rec.close.reason
    assert "smtpproxy ca" in proxy.transcript()


async def test_plain_upstream_proxy_answers_starttls(
    aiosmtpd_server: AioServer, proxy_ca: CertificateAuthority, tmp_path: Path
) -> None:
    """--upstream-tls plain: the client gets TLS with the proxy, the upstream
    (which offers no TLS) never sees STARTTLS."""

    def client(port: int) -> None:
        with smtplib.SMTP("localhost", port, timeout=10) as c:
            c.ehlo("tls.example")
            c.esmtp_features["starttls"] = ""  # aiosmtpd here does not offer it
            c.starttls(context=client_ctx(proxy_ca))
            c.ehlo("tls.example")
            c.login("user@domain.com", "password")
            c.sendmail("a@example.org", ["b@example.net"], MESSAGE)

    async with trio.open_nursery() as nursery:
        proxy = await start_proxy(
            nursery,
            tmp_path,
            aiosmtpd_server.address,
            **tls_config(proxy_ca, None, upstream_tls="plain"),
        )
        await trio.to_thread.run_sync(client, proxy.port)
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    assert aiosmtpd_server.received.messages[0]["content"] == MESSAGE
    events = list(read_recording(proxy.recording_paths()[0]).events())
    assert [e.side for e in events if isinstance(e, TlsEstablished)] == [Side.CLIENT]
    assert any(isinstance(e, Note) and "answered by the proxy" in e.text for e in events)


async def test_strip_starttls_hides_it_and_flags_clear_text_auth(
    starttls_server: AioServer,
    upstream_ca: trustme.CA,
    proxy_ca: CertificateAuthority,
    tmp_path: Path,
) -> None:
    def client(port: int) -> dict[str, str]:
        with smtplib.SMTP("localhost", port, timeout=10) as c:
            c.ehlo("tls.example")
            features = dict(c.esmtp_features)
            try:
                c.login("user@domain.com", "password")
            except smtplib.SMTPException:
                pass
            return features

    async with trio.open_nursery() as nursery:
        proxy = await start_proxy(
            nursery,
            tmp_path,
            starttls_server.address,
            **tls_config(proxy_ca, upstream_ca, strip_starttls=True),
        )
        features = await trio.to_thread.run_sync(client, proxy.port)
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    assert "starttls" not in features
    events = list(read_recording(proxy.recording_paths()[0]).events())
    ehlo = next(e for e in events if isinstance(e, Reply) and e.command == "EHLO")
    assert (
        ehlo.capabilities is not None and "STARTTLS" in ehlo.capabilities
    )  # what the server really said
    assert any(isinstance(e, Note) and e.kind == "strip_starttls" for e in events)


async def test_plain_client_upstream_upgraded_with_starttls(
    starttls_server: AioServer,
    upstream_ca: trustme.CA,
    proxy_ca: CertificateAuthority,
    tmp_path: Path,
) -> None:
    """--upstream-tls starttls: a clear-text client reaches a server that
    requires STARTTLS (and AUTH only under TLS); the client sees the
    post-TLS EHLO reply."""

    def client(port: int) -> dict[str, str]:
        with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
            c.ehlo("plain.example")
            features = dict(c.esmtp_features)
            c.login("user@domain.com", "password")
            c.sendmail("a@example.org", ["b@example.net"], MESSAGE)
            return features

    async with trio.open_nursery() as nursery:
        proxy = await start_proxy(
            nursery,
            tmp_path,
            starttls_server.address,
            **tls_config(proxy_ca, upstream_ca, upstream_tls="starttls"),
        )
        features = await trio.to_thread.run_sync(client, proxy.port)
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    assert "auth" in features and "starttls" not in features  # the post-TLS reply
    assert starttls_server.received.messages[0]["content"] == MESSAGE
    assert starttls_server.received.auth == [("PLAIN", "user@domain.com")]
    events = list(read_recording(proxy.recording_paths()[0]).events())
    notes = [e.kind for e in events if isinstance(e, Note)]
    assert notes[:2] == ["proxy_command", "proxy_reply_from_upstream"]
    assert [e.side for e in events if isinstance(e, TlsEstablished)] == [Side.SERVER]


async def test_keylog_has_secrets_of_both_legs(
    starttls_server: AioServer,
    upstream_ca: trustme.CA,
    proxy_ca: CertificateAuthority,
    tmp_path: Path,
) -> None:
    keylog = tmp_path / "keys.log"

    def client(port: int) -> None:
        with smtplib.SMTP("localhost", port, timeout=10) as c:
            c.ehlo("tls.example")
            c.starttls(context=client_ctx(proxy_ca))
            c.ehlo("tls.example")

    up = client_context(keylog=str(keylog))
    upstream_ca.configure_trust(up)
    cfg = {
        "server_contexts": ServerContexts(["localhost"], ca=proxy_ca, keylog=str(keylog)),
        "upstream_context": up,
        "upstream_sni": "localhost",
    }
    async with trio.open_nursery() as nursery:
        proxy = await start_proxy(nursery, tmp_path, starttls_server.address, **cfg)
        await trio.to_thread.run_sync(client, proxy.port)
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    lines = [ln.split() for ln in keylog.read_text().splitlines() if ln and not ln.startswith("#")]
    secrets = [ln for ln in lines if ln[0] == "CLIENT_TRAFFIC_SECRET_0"]
    # one TLS 1.3 session per leg, each with its own client random
    assert len({ln[1] for ln in secrets}) == 2


def test_ca_command_prints_and_regenerates(tmp_path: Path) -> None:
    import os
    import stat
    import subprocess
    import sys

    home = tmp_path / "home"
    env = {**os.environ, "SMTPPROXY_HOME": str(home)}
    first = subprocess.run(
        [sys.executable, "-m", "smtpproxy", "ca"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert first.returncode == 0, first.stderr
    assert f"path:        {home / 'smtpproxy-ca.pem'}" in first.stdout
    assert "-----BEGIN CERTIFICATE-----" in first.stdout and "sha256:" in first.stdout
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "smtpproxy-ca-key.pem").stat().st_mode) == 0o600
    again = subprocess.run(
        [sys.executable, "-m", "smtpproxy", "ca"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert again.stdout == first.stdout  # made once, then reused
    new = subprocess.run(
        [sys.executable, "-m", "smtpproxy", "ca", "--regenerate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    fp = [ln for ln in first.stdout.splitlines() if ln.startswith("sha256:")]
    assert new.returncode == 0 and fp[0] not in new.stdout
