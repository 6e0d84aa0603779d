"""``tls: cert expired|wrong-name|self-signed``: the certificate the proxy
(``record``) or the embedded server (``Sink``) shows a client is spoilt one
way, and a client that verifies refuses it for that reason.

Real clients over 127.0.0.1: smtplib trusting the proxy's local CA (the
verify code OpenSSL gives is what is checked: 10 expired, 62 host name
mismatch, 18 self-signed leaf), swaks through the real ``smtpproxy record``
command. Each test also checks what the recording or the transcript says,
and that a session the rule does not pick verifies and sends as before.
Every wait is bounded (``trio.fail_after``, the clients' own timeouts)."""

from __future__ import annotations

import signal
import smtplib
import ssl
import subprocess
from datetime import UTC, datetime
from io import StringIO
from pathlib import Path

import pytest
import trio
from conftest import (
    free_port,
    run_smtpproxy_once,
    smtpproxy_process,
    start_proxy,
    swaks_argv,
    wait_for_sessions,
)
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from rawpeers import TIMEOUT, only_recording
from test_faults_proxy import fault_notes, in_thread, plan

from smtpproxy.recording import read_recording
from smtpproxy.render import Transcript
from smtpproxy.server import Sink, SinkConfig
from smtpproxy.tls import WRONG_NAME, CertificateAuthority, ServerContexts
from smtpproxy.tls import client_context as tls_client_context

MESSAGE = b"From: ann@example.org\r\nSubject: certs\r\n\r\nhello\r\n"

#: each kind, and the verify code (OpenSSL's X509_V_ERR_*) a client meets
CODES = {
    "expired": 10,  # X509_V_ERR_CERT_HAS_EXPIRED
    "wrong-name": 62,  # X509_V_ERR_HOSTNAME_MISMATCH
    "self-signed": 18,  # X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT
}
KINDS = pytest.mark.parametrize("kind", list(CODES))

Outcome = ssl.SSLCertVerificationError | str


def client_context(ca: CertificateAuthority) -> ssl.SSLContext:
    """What a careful client does: trust the proxy's CA, check the name."""
    return ssl.create_default_context(cafile=str(ca.cert_path))


def starttls_send(port: int, ca: CertificateAuthority) -> Outcome:
    """EHLO, STARTTLS verifying against ``ca`` (server name ``localhost``),
    then one message: the verification error, or ``"sent"``."""
    smtp = smtplib.SMTP("localhost", port, timeout=TIMEOUT)
    try:
        smtp.ehlo("client.example")
        try:
            smtp.starttls(context=client_context(ca))
        except ssl.SSLCertVerificationError as exc:
            return exc
        smtp.sendmail("ann@example.org", ["bob@example.net"], MESSAGE)
        smtp.quit()
        return "sent"
    finally:
        smtp.close()


def implicit_send(port: int, ca: CertificateAuthority) -> Outcome:
    """The same over implicit TLS (SMTPS, RFC 8314)."""
    try:
        smtp = smtplib.SMTP_SSL("localhost", port, timeout=TIMEOUT, context=client_context(ca))
    except ssl.SSLCertVerificationError as exc:
        return exc
    try:
        smtp.sendmail("ann@example.org", ["bob@example.net"], MESSAGE)
        smtp.quit()
        return "sent"
    finally:
        smtp.close()


def check_refused(outcome: Outcome, kind: str) -> None:
    assert isinstance(outcome, ssl.SSLCertVerificationError), outcome
    assert outcome.verify_code == CODES[kind], outcome.verify_message


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path / "home")


# -- the leaves themselves --------------------------------------------------------


@KINDS
def test_spoilt_leaf_differs_from_the_good_one_in_one_way(
    ca: CertificateAuthority, kind: str
) -> None:
    """The leaf a fault shows: the name, the issuer or the dates are wrong,
    nothing else; it is cached like the good ones."""
    names = ["localhost", "127.0.0.1"]
    good = x509.load_pem_x509_certificates(ca.leaf(names)[0])
    chain, _ = ca.leaf(names, kind)
    bad = x509.load_pem_x509_certificates(chain)
    assert ca.leaf(names, kind)[0] == chain  # cached
    assert ca.leaf(names)[0] == b"".join(c.public_bytes(serialization.Encoding.PEM) for c in good)

    def sans(cert: x509.Certificate) -> list[str]:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        return [str(v.value) for v in ext.value]

    match kind:
        case "expired":
            assert bad[0].not_valid_after_utc < datetime.now(UTC)
            assert bad[0].not_valid_before_utc < bad[0].not_valid_after_utc
            assert (bad[0].issuer, sans(bad[0]), bad[1]) == (
                ca.cert.subject,
                sans(good[0]),
                ca.cert,
            )
        case "wrong-name":
            assert sans(bad[0]) == [WRONG_NAME]
            assert (bad[0].issuer, bad[1]) == (ca.cert.subject, ca.cert)
        case "self-signed":
            assert len(bad) == 1 and bad[0].issuer == bad[0].subject != ca.cert.subject
            assert sans(bad[0]) == sans(good[0])
            bad[0].verify_directly_issued_by(bad[0])


# -- record ---------------------------------------------------------------------


async def record_sessions(
    tmp_path: Path,
    ca: CertificateAuthority,
    rules: tuple[str, ...],
    clients: int,
    *,
    implicit: bool = False,
) -> tuple[list[Outcome], list[dict[str, object]], str, int]:
    """``clients`` smtplib sessions one after another through a proxy with
    ``rules`` in front of the embedded server speaking TLS as the client
    does (as ``record`` without ``--upstream``): each one's outcome, the
    fault notes and close of each recording in session order, the
    transcript, and the messages the server accepted."""
    contexts = ServerContexts(["localhost", "127.0.0.1"], ca=ca)
    upstream = Sink(SinkConfig(tls=contexts.default, implicit_tls=implicit))
    client = implicit_send if implicit else starttls_send
    async with trio.open_nursery() as nursery:
        address = await nursery.start(upstream.serve, "127.0.0.1", 0)
        proxy = await start_proxy(
            nursery,
            tmp_path,
            address,
            faults=plan(*rules),
            server_contexts=contexts,
            upstream_context=tls_client_context(ca.cert_path),
            listen_tls=implicit,
        )
        outcomes = []
        for n in range(clients):
            outcomes.append(await in_thread(lambda: client(proxy.port, ca)))
            await wait_for_sessions(proxy.proxy, n + 1)
        nursery.cancel_scope.cancel()
    recs = [read_recording(p) for p in proxy.recording_paths()]  # named by start time
    sessions = [
        {
            "notes": [n.text for n in fault_notes(r)],
            "by": r.close.by if r.close else None,
            "reason": r.close.reason if r.close else None,
        }
        for r in recs
    ]
    return outcomes, sessions, proxy.transcript(), upstream.stats.messages


@KINDS
async def test_record_starttls_shows_the_bad_certificate(
    tmp_path: Path, ca: CertificateAuthority, kind: str
) -> None:
    rule = f"tls: cert {kind}"
    (outcome,), (session,), transcript, got = await record_sessions(tmp_path, ca, (rule,), 1)
    check_refused(outcome, kind)
    assert got == 0
    words = "an expired" if kind == "expired" else f"a {kind}"
    assert session["notes"] == [f"fault {rule}: showed the client {words} certificate"]
    assert f"!! fault {rule}: showed the client {words} certificate" in transcript
    # the client refused it: the session ends there, and says why without
    # sending the user to trust the CA (the client was right not to)
    assert session["by"] == "client", session
    assert f"it was shown {words} certificate by fault {rule}" in str(session["reason"])
    assert "smtpproxy ca" not in str(session["reason"])


async def test_record_implicit_tls_and_only_the_session_picked(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    """``--listen-tls``, and ``session#2``: the first session verifies and
    delivers, the second meets the self-signed leaf, the third is as the
    first."""
    rule = "session#2 tls: cert self-signed"
    outcomes, sessions, _, got = await record_sessions(tmp_path, ca, (rule,), 3, implicit=True)
    assert outcomes[0] == outcomes[2] == "sent"
    check_refused(outcomes[1], "self-signed")
    assert got == 2
    assert [s["notes"] for s in sessions] == [
        [],
        [f"fault {rule}: showed the client a self-signed certificate"],
        [],
    ]


async def test_record_times_1_then_the_good_certificate(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    rule = "tls: cert expired, times=1"
    outcomes, sessions, _, got = await record_sessions(tmp_path, ca, (rule,), 2)
    check_refused(outcomes[0], "expired")
    assert outcomes[1] == "sent" and got == 1
    assert [len(s["notes"]) for s in sessions] == [1, 0]  # type: ignore[arg-type]


def test_record_refuses_a_cert_rule_with_a_fixed_cert(
    tmp_path: Path, ca: CertificateAuthority
) -> None:
    """``--cert`` replaces the CA the bad leaves come from: refused at
    start, exit 2, one line."""
    pem = tmp_path / "fixed.pem"
    chain, key = ca.leaf(["localhost"])
    pem.write_bytes(chain + key)
    done = run_smtpproxy_once(
        "record",
        "--recordings",
        str(tmp_path / "rec"),
        "--cert",
        str(pem),
        "--fault",
        "tls: cert wrong-name",
        cwd=tmp_path,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "'tls: cert wrong-name'" in done.stderr
    assert "drop --cert/--key, or the rule" in done.stderr
    assert not (tmp_path / "rec").exists()


# -- the embedded server ----------------------------------------------------------


async def sink_sessions(
    ca: CertificateAuthority, rules: tuple[str, ...], clients: int
) -> tuple[list[Outcome], str, int]:
    """``clients`` smtplib sessions with a Sink offering STARTTLS with the
    CA's leaves and ``rules``: outcomes, transcript, messages accepted."""
    contexts = ServerContexts(["localhost", "127.0.0.1"], ca=ca)
    out = StringIO()
    sink = Sink(
        SinkConfig(
            hostname="sink.test",
            tls=contexts.default,
            certs=contexts,
            faults=plan(*rules),
            transcript=Transcript(out),
        )
    )
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(sink.serve, "127.0.0.1", 0)
        outcomes = [await in_thread(lambda: starttls_send(port, ca)) for _ in range(clients)]
        nursery.cancel_scope.cancel()
    return outcomes, out.getvalue(), sink.stats.messages


@KINDS
async def test_sink_starttls_shows_the_bad_certificate(ca: CertificateAuthority, kind: str) -> None:
    rule = f"session#1 tls: cert {kind}"
    outcomes, transcript, messages = await sink_sessions(ca, (rule,), 2)
    check_refused(outcomes[0], kind)
    assert outcomes[1] == "sent" and messages == 1  # session#2: the sink's own leaf
    words = "an expired" if kind == "expired" else f"a {kind}"
    assert transcript.count("!! fault") == 1
    assert f"!! fault {rule}: showed the client {words} certificate" in transcript


async def test_sink_without_a_ca_says_the_rule_was_not_applied(
    ca: CertificateAuthority,
) -> None:
    """A Sink given a context but no ``certs``: its own leaf, and the
    transcript says why the rule did nothing."""
    out = StringIO()
    contexts = ServerContexts(["localhost"], ca=ca)
    sink = Sink(
        SinkConfig(
            tls=contexts.default, faults=plan("tls: cert expired"), transcript=Transcript(out)
        )
    )
    async with trio.open_nursery() as nursery:
        _, port = await nursery.start(sink.serve, "127.0.0.1", 0)
        outcome = await in_thread(lambda: starttls_send(port, ca))
        nursery.cancel_scope.cancel()
    assert outcome == "sent"
    assert "!! fault tls: cert expired: not applied: the sink has no local CA" in out.getvalue()


def test_sink_command_refuses_cert_rules(tmp_path: Path) -> None:
    """``smtpproxy sink`` offers no TLS: the rule could never fire."""
    done = run_smtpproxy_once("sink", "--fault", "tls: cert expired", cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "offers no TLS" in done.stderr


# -- a real external client through the real command ------------------------------


@pytest.mark.peer("swaks")
def test_swaks_tls_verify_reports_the_expired_certificate(tmp_path: Path) -> None:
    """swaks ``--tls --tls-verify`` trusting the proxy's CA, through
    ``smtpproxy record`` (embedded upstream): it reports the failed
    verification as it would against a server with an expired certificate,
    and sends nothing; the recording holds the fault."""
    message = tmp_path / "message.eml"
    message.write_bytes(MESSAGE)
    rec_dir = tmp_path / "recordings"
    rule = "tls: cert expired"
    args = ["record", "--listen", f"127.0.0.1:{free_port()}", "--recordings", str(rec_dir)]
    with smtpproxy_process(*args, "--fault", rule, cwd=tmp_path) as proxy:
        cafile = tmp_path / ".smtpproxy-home" / "smtpproxy-ca.pem"
        swaks = subprocess.run(
            swaks_argv(
                *proxy.address, message, "--tls", "--tls-verify", "--tls-ca-path", str(cafile)
            ),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        proxy.wait_stdout("== session ")
        done = proxy.finish(signal.SIGTERM)
    text = swaks.stdout + swaks.stderr
    assert swaks.returncode == 29, text  # swaks: TLS negotiation failed
    assert "certificate verify failed" in text, text
    assert "MAIL FROM" not in swaks.stdout
    assert f"!! fault {rule}: showed the client an expired certificate" in done.stdout
    rec = only_recording(rec_dir)
    assert [n.text for n in fault_notes(rec)] == [
        f"fault {rule}: showed the client an expired certificate"
    ]
