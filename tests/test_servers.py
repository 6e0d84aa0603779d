"""Interoperability with real SMTP servers: swaks, msmtp and smtplib through
the proxy into Postfix and OpenSMTPD, which the tests start themselves
(tests/servers.py, docs/interop.md).

For every client x server pair the peers support, each test checks:

* the client's exit code;
* the server's own copy of the message (read back from Postfix's queue or
  OpenSMTPD's delivery) is byte for byte what the recording says the client
  sent, once the trace header fields the server put on top are taken off;
* the recording holds every exchange (for swaks: every line swaks printed,
  in both directions), the facts of both TLS handshakes, and the decoded AUTH.

Where a server departs from the RFCs or from the other, an assertion pins the
behaviour down, with the reason in a comment.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import smtplib
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import (
    SMTPPROXY,
    require_program,
    smtpproxy_env,
    smtpproxy_process,
    start_proxy,
    swaks_argv,
    wait_for_sessions,
)
from servers import (  # noqa: F401  (fixtures)
    PASSWORD,
    REJECTED,
    USER,
    OpenSmtpd,
    Postfix,
    Server,
    opensmtpd_server,
    postfix_server,
    server_ca,
    split_trace,
)
from test_peers import MESSAGE, MESSAGE_CRLF, decoded_auth, recorded_content

from smtpproxy.diff import compare_replies
from smtpproxy.events import (
    Anomaly,
    AuthResult,
    Command,
    MessageData,
    MessageEnd,
    Note,
    Reply,
    Side,
    TlsEstablished,
)
from smtpproxy.protocol import Conversation
from smtpproxy.recording import Recording, read_recording
from smtpproxy.tls import CertificateAuthority, ServerContexts, client_context

#: bound on one client run (the clients' own timeouts are 10 s)
CLIENT_TIMEOUT = 30

pytestmark = [pytest.mark.peer("postfix"), pytest.mark.peer("opensmtpd")]


@pytest.fixture(scope="module")
def proxy_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("proxy-home"))


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Server:
    """``request.param`` names the server: ``postfix`` or ``opensmtpd``."""
    found: Server = request.getfixturevalue(f"{request.param}_server")
    return found


@pytest.fixture
def both(request: pytest.FixtureRequest) -> tuple[Postfix, OpenSmtpd]:
    """Postfix and OpenSMTPD, for the tests that compare them."""
    return request.getfixturevalue("postfix_server"), request.getfixturevalue("opensmtpd_server")


def servers(*names: str) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("server", names, indirect=True)


@dataclass
class Session:
    """One client run through the proxy: what the client said and what the
    proxy recorded."""

    returncode: int
    output: bytes
    rec: Recording
    transcript: str

    @property
    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    def events(self) -> list[Any]:
        return list(self.rec.events())

    def final_reply(self) -> Reply:
        (final,) = [e for e in self.rec.events() if isinstance(e, Reply) and e.ends_message]
        return final


async def through_proxy(
    tmp_path: Path,
    server: Server,
    proxy_ca: CertificateAuthority,
    client: Callable[[int], Awaitable[tuple[int, bytes]]],
    **options: Any,
) -> Session:
    """Start the proxy in front of ``server`` (trusting its CA, showing clients
    leaves of ``proxy_ca``), run ``client(proxy port)`` to its end, wait for
    the session to end; the client's result, the recording and the transcript."""
    upstream = client_context()
    server.tls.ca.configure_trust(upstream)
    config: dict[str, Any] = {
        "server_contexts": ServerContexts(["localhost", "127.0.0.1"], ca=proxy_ca),
        "upstream_context": upstream,
        "upstream_sni": "localhost",
        **options,
    }
    async with trio.open_nursery() as nursery:
        proxy = await start_proxy(nursery, tmp_path, server.address, **config)
        with trio.fail_after(CLIENT_TIMEOUT):
            code, output = await client(proxy.port)
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    (path,) = proxy.recording_paths()
    rec = read_recording(path)
    assert rec.close is not None
    return Session(code, output, rec, proxy.transcript())


# -- clients ----------------------------------------------------------------------


def swaks(tmp_path: Path, *args: str) -> Callable[[int], Awaitable[tuple[int, bytes]]]:
    message = tmp_path / "message.eml"
    message.write_bytes(MESSAGE)

    async def run(port: int) -> tuple[int, bytes]:
        done = await trio.run_process(
            swaks_argv("127.0.0.1", port, message, *args),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        return done.returncode, done.stdout + done.stderr

    return run


def swaks_auth(mechanism: str) -> list[str]:
    return ["--auth", mechanism, "--auth-user", USER, "--auth-password", PASSWORD]


def swaks_tls(proxy_ca: CertificateAuthority) -> list[str]:
    return ["--tls", "--tls-verify", "--tls-ca-path", str(proxy_ca.cert_path)]


def msmtp(tmp_path: Path, *settings: str) -> Callable[[int], Awaitable[tuple[int, bytes]]]:
    exe = require_program("msmtp", "msmtp")
    config = tmp_path / "msmtprc"

    async def run(port: int) -> tuple[int, bytes]:
        lines = [
            "defaults", "syslog off", "account proxy", "host 127.0.0.1", f"port {port}",
            "protocol smtp", "domain client.example", f"user {USER}", f"password {PASSWORD}",
            "from ann@example.org", "timeout 10", *settings, "",
        ]  # fmt: skip
        config.write_text("\n".join(lines))
        os.chmod(config, 0o600)  # msmtp refuses a password file others can read
        done = await trio.run_process(
            [exe, "-C", str(config), "-a", "proxy", "bob@example.net"],
            stdin=MESSAGE,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        return done.returncode, done.stdout + done.stderr

    return run


def smtplib_client(
    session: Callable[[smtplib.SMTP], None],
) -> Callable[[int], Awaitable[tuple[int, bytes]]]:
    """Python's smtplib, in a thread, running ``session`` on a connection."""

    def blocking(port: int) -> tuple[int, bytes]:
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example", timeout=10) as s:
            session(s)
        return 0, b""

    async def run(port: int) -> tuple[int, bytes]:
        return await trio.to_thread.run_sync(blocking, port)

    return run


def proxy_context(proxy_ca: CertificateAuthority) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(proxy_ca.cert_path))


# -- checks -------------------------------------------------------------------------


def swaks_lines(output: bytes) -> tuple[list[bytes], list[bytes]]:
    """The lines swaks printed as sent and as received, TLS or not (it prints
    message lines with their CR)."""
    sent, received = [], []
    for line in output.replace(b"\r\n", b"\n").split(b"\n"):
        if line[:4] in (b" -> ", b" ~> "):
            sent.append(line[4:])
        elif line[:4] in (b"<-  ", b"<~  ", b"<** ", b"<~* "):
            received.append(line[4:])
    return sent, received


def check_every_exchange(session: Session) -> None:
    """Every line swaks sent and received is in the recording, in order, and
    nothing else is."""
    sent, received = swaks_lines(session.output)
    assert session.rec.raw(Side.CLIENT).split(b"\r\n") == sent + [b""]
    assert session.rec.raw(Side.SERVER).split(b"\r\n") == received + [b""]


def check_stored(server: Server, session: Session, tls: bool, auth: bool) -> bytes:
    """The server's copy of the message is the client's, byte for byte, under
    the server's own trace fields; returns the client's content."""
    sent = recorded_content(session.rec)
    (end,) = [e for e in session.rec.events() if isinstance(e, MessageEnd)]
    assert end.complete and end.size == len(sent)
    final = session.final_reply()
    assert final.code == 250
    stored = server.stored(final.text)
    trace, rest = split_trace(stored, server.trace_fields)
    assert [f.split(b":", 1)[0] for f in trace] == list(server.trace_fields)
    received = trace[-1].decode()
    # RFC 3848: the "with" keyword tells TLS (S) and authentication (A) apart
    protocol = "ESMTP" + ("S" if tls else "") + ("A" if auth else "")
    assert re.search(rf"\bwith {protocol} id ", received), received
    assert "from client.example (localhost [127.0.0.1])" in received
    if isinstance(server, OpenSmtpd):
        assert trace[0] == b"Return-Path: <ann@example.org>\r\n"
        assert trace[1] == b"Delivered-To: bob@example.net\r\n"
        rest = opensmtpd_added_headers(sent, rest)
    else:
        assert "by postfix.test (Postfix)" in received
    assert rest == sent  # byte for byte
    return sent


def opensmtpd_added_headers(sent: bytes, stored: bytes) -> bytes:
    """OpenSMTPD adds a Date and a Message-ID header field where the message
    has none, at the end of the header section, as a submission server may
    (RFC 6409 section 8.3, 8.4) though this is not a submission port. Checks
    that and returns ``stored`` without them."""
    head, _, body = sent.partition(b"\r\n\r\n")
    names = {ln.split(b":", 1)[0].lower() for ln in head.split(b"\r\n")}
    added = b""
    if b"date" not in names:
        added += rb"Date: [^\r\n]+\r\n"
    if b"message-id" not in names:
        added += rb"Message-ID: <[0-9a-f]+@opensmtpd\.test>\r\n"
    match = re.fullmatch(
        re.escape(head + b"\r\n") + b"(" + added + b")" + re.escape(b"\r\n" + body), stored
    )
    assert match is not None, stored
    return stored[: len(head) + 2] + stored[match.end(1) :]


def check_tls(session: Session, server: Server, proxy_ca: CertificateAuthority) -> None:
    """Both legs shook hands and the recording says how."""
    events = session.events()
    legs = [e for e in events if isinstance(e, TlsEstablished)]
    assert sorted(e.side.value for e in legs) == ["client", "server"]
    client = next(e for e in legs if e.side is Side.CLIENT)
    upstream = next(e for e in legs if e.side is Side.SERVER)
    assert client.version.startswith("TLS") and client.cipher
    assert upstream.version.startswith("TLS") and upstream.cipher
    assert upstream.verified == "ok" and upstream.sni == "localhost"
    assert upstream.peer is not None
    assert upstream.peer["sha256"] == server.tls.leaf_sha256  # the server's own leaf
    assert "trustme" in str(upstream.peer["issuer"])
    assert proxy_ca.fingerprint() != upstream.peer["sha256"]
    # nothing but the greeting, EHLO and STARTTLS before the handshakes
    first_tls = events.index(legs[0])
    assert [e.verb for e in events[:first_tls] if isinstance(e, Command)] == ["EHLO", "STARTTLS"]


def check_auth(session: Session, mechanism: str, in_clear: bool) -> None:
    events = session.events()
    decoded_mechanism, fields = decoded_auth(session.rec)
    assert decoded_mechanism == mechanism
    assert fields["user"] == USER
    if mechanism == "CRAM-MD5":
        (challenge,) = [
            e.auth.fields["challenge"]
            for e in events
            if isinstance(e, Reply) and e.code == 334 and e.auth is not None
        ]
        assert (
            fields["digest"]
            == hmac.new(PASSWORD.encode(), challenge.encode(), hashlib.md5).hexdigest()
        )
        assert "password" not in fields
    else:
        assert fields["password"] == PASSWORD
    (result,) = [e for e in events if isinstance(e, AuthResult)]
    assert result.success and result.code == 235
    assert result.mechanism == mechanism and result.user == USER
    assert session.rec.close is not None
    assert session.rec.close.totals["auth"] == {
        "mechanism": mechanism,
        "user": USER,
        "success": True,
    }
    flagged = [e for e in events if isinstance(e, Anomaly) and e.kind == "auth_in_clear"]
    assert bool(flagged) == in_clear


def ehlo_replies(session: Session) -> list[dict[str, str]]:
    return [
        dict(e.capabilities)
        for e in session.rec.events()
        if isinstance(e, Reply) and e.command == "EHLO" and e.capabilities is not None
    ]


# -- swaks ----------------------------------------------------------------------------


@pytest.mark.peer("swaks")
@servers("postfix")
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN", "CRAM-MD5"])
async def test_swaks_auth_without_tls_to_postfix(
    tmp_path: Path, server: Server, proxy_ca: CertificateAuthority, mechanism: str
) -> None:
    """Postfix offers AUTH before STARTTLS (smtpd_tls_auth_only = no, its
    default); the proxy relays it and flags the credentials sent in clear."""
    session = await through_proxy(
        tmp_path, server, proxy_ca, swaks(tmp_path, *swaks_auth(mechanism))
    )
    assert session.returncode == 0, session.text
    check_every_exchange(session)
    sent = check_stored(server, session, tls=False, auth=True)
    assert sent in (MESSAGE_CRLF, MESSAGE_CRLF + b"\r\n")
    check_auth(session, mechanism, in_clear=True)
    assert ehlo_replies(session)[0]["AUTH"].split() == ["PLAIN", "LOGIN", "CRAM-MD5"]
    if mechanism == "LOGIN":
        prompts = [e.raw for e in session.rec.events() if isinstance(e, Reply) and e.code == 334]
        assert prompts == [b"334 VXNlcm5hbWU6\r\n", b"334 UGFzc3dvcmQ6\r\n"]  # Username:, Password:


@pytest.mark.peer("swaks")
@pytest.mark.parametrize(
    "server, mechanism",
    [
        ("postfix", "PLAIN"),
        ("postfix", "LOGIN"),
        ("postfix", "CRAM-MD5"),
        ("opensmtpd", "PLAIN"),
        ("opensmtpd", "LOGIN"),  # OpenSMTPD offers no CRAM-MD5
    ],
    indirect=["server"],
)
async def test_swaks_starttls_auth(
    tmp_path: Path, server: Server, proxy_ca: CertificateAuthority, mechanism: str
) -> None:
    argv = swaks(tmp_path, *swaks_tls(proxy_ca), *swaks_auth(mechanism))
    session = await through_proxy(tmp_path, server, proxy_ca, argv)
    assert session.returncode == 0, session.text
    check_every_exchange(session)
    sent = check_stored(server, session, tls=True, auth=True)
    assert sent in (MESSAGE_CRLF, MESSAGE_CRLF + b"\r\n")
    check_tls(session, server, proxy_ca)
    check_auth(session, mechanism, in_clear=False)
    verbs = [e.verb for e in session.rec.events() if isinstance(e, Command)]
    assert verbs == ["EHLO", "STARTTLS", "EHLO", "AUTH", "MAIL", "RCPT", "DATA", "QUIT"]
    assert f"~> AUTH {mechanism}" in session.transcript


@pytest.mark.peer("swaks")
@servers("opensmtpd")
async def test_opensmtpd_offers_auth_only_after_starttls(
    tmp_path: Path, server: Server, proxy_ca: CertificateAuthority
) -> None:
    """OpenSMTPD leaves AUTH out of its EHLO reply until the session is
    encrypted; swaks, asked for AUTH in clear, gives up before MAIL."""
    session = await through_proxy(tmp_path, server, proxy_ca, swaks(tmp_path, *swaks_auth("PLAIN")))
    assert session.returncode != 0
    assert "Host did not advertise authentication" in session.text
    check_every_exchange(session)
    (before,) = ehlo_replies(session)
    assert "AUTH" not in before and "STARTTLS" in before
    assert [e.verb for e in session.rec.events() if isinstance(e, Command)] == ["EHLO", "QUIT"]

    (tmp_path / "tls").mkdir()
    tls_session = await through_proxy(
        tmp_path / "tls",
        server,
        proxy_ca,
        swaks(tmp_path, *swaks_tls(proxy_ca), *swaks_auth("PLAIN")),
    )
    assert tls_session.returncode == 0, tls_session.text
    before, after = ehlo_replies(tls_session)
    assert "AUTH" not in before and after["AUTH"].split() == ["PLAIN", "LOGIN"]


@pytest.mark.peer("swaks")
@servers("postfix")
async def test_swaks_pipeline_to_postfix(
    tmp_path: Path, server: Server, proxy_ca: CertificateAuthority
) -> None:
    """Postfix offers PIPELINING (RFC 2920): swaks sends MAIL, RCPT and DATA in
    one write, Postfix answers all three in one write, and the proxy pairs each
    reply with its command."""
    session = await through_proxy(tmp_path, server, proxy_ca, swaks(tmp_path, "--pipeline"))
    assert session.returncode == 0, session.text
    check_every_exchange(session)
    check_stored(server, session, tls=False, auth=False)
    entries = session.rec.entries

    def at(kind: type, **match: object) -> int:
        return next(
            i for i, e in enumerate(entries)
            if isinstance(e.event, kind) and all(getattr(e.event, k) == v for k, v in match.items())
        )  # fmt: skip

    batch = [at(Command, verb=v) for v in ("MAIL", "RCPT", "DATA")]
    replies = [at(Reply, command=v) for v in ("MAIL", "RCPT", "DATA")]
    assert max(batch) < min(replies)  # the whole batch went out before any reply
    assert len({entries[i].t for i in batch}) == 1  # one write from swaks...
    assert len({entries[i].t for i in replies}) == 1  # ...and one from Postfix
    assert [getattr(entries[i].event, "code", None) for i in replies] == [250, 250, 354]
    assert not [e for e in session.rec.events() if isinstance(e, Anomaly)]


@pytest.mark.peer("swaks")
@servers("opensmtpd")
async def test_swaks_pipeline_to_opensmtpd_falls_back_to_lockstep(
    tmp_path: Path, server: Server, proxy_ca: CertificateAuthority
) -> None:
    """OpenSMTPD does not offer PIPELINING (and answers a pipelined batch with
    "500 5.5.1 Invalid command: Pipelining not supported", then hangs up);
    swaks --pipeline sees that and waits for each reply."""
    session = await through_proxy(tmp_path, server, proxy_ca, swaks(tmp_path, "--pipeline"))
    assert session.returncode == 0, session.text
    check_every_exchange(session)
    check_stored(server, session, tls=False, auth=False)
    assert "PIPELINING" not in ehlo_replies(session)[0]
    entries = session.rec.entries
    steps = [
        (
            type(e.event).__name__,
            getattr(e.event, "verb", None) or getattr(e.event, "command", None),
        )
        for e in entries
        if isinstance(e.event, (Command, Reply)) and getattr(e.event, "command", "") != "<greeting>"
    ]
    assert steps[2:8] == [
        ("Command", "MAIL"), ("Reply", "MAIL"), ("Command", "RCPT"), ("Reply", "RCPT"),
        ("Command", "DATA"), ("Reply", "DATA"),
    ]  # fmt: skip


@pytest.mark.peer("swaks")
@servers("postfix", "opensmtpd")
async def test_recipient_rejected(
    tmp_path: Path, server: Server, proxy_ca: CertificateAuthority
) -> None:
    """One recipient refused at RCPT, the other accepted: the message reaches
    the server for the one, and the recording has both answers."""
    argv = swaks(tmp_path, "--to", f"bob@example.net,{REJECTED}", *swaks_tls(proxy_ca))
    session = await through_proxy(tmp_path, server, proxy_ca, argv)
    assert session.returncode == 0, session.text
    check_every_exchange(session)
    check_stored(server, session, tls=True, auth=False)
    rcpt = [e for e in session.rec.events() if isinstance(e, Reply) and e.command == "RCPT"]
    assert [r.code for r in rcpt] == [250, 550]
    caps = ehlo_replies(session)[-1]
    assert "ENHANCEDSTATUSCODES" in caps
    if isinstance(server, Postfix):
        assert rcpt[1].enhanced == "5.1.1"
    else:
        # RFC 2034 section 3: once ENHANCEDSTATUSCODES is offered, replies carry
        # an enhanced code; OpenSMTPD's "550 Invalid recipient" has none
        assert rcpt[1].enhanced is None
        assert rcpt[1].raw == f"550 Invalid recipient: <{REJECTED}>\r\n".encode()
    assert session.rec.close is not None
    assert session.rec.close.totals["messages_accepted"] == 1


# -- msmtp ----------------------------------------------------------------------------


@pytest.mark.peer("msmtp")
@pytest.mark.parametrize(
    "server, tls, mechanism",
    [
        ("postfix", False, "plain"),
        ("postfix", True, "plain"),
        ("postfix", True, "cram-md5"),
        ("opensmtpd", True, "plain"),
        ("opensmtpd", True, "login"),
    ],
    indirect=["server"],
)
async def test_msmtp(
    tmp_path: Path, server: Server, proxy_ca: CertificateAuthority, tls: bool, mechanism: str
) -> None:
    settings = [f"auth {mechanism}"]
    settings += (
        ["tls on", "tls_starttls on", f"tls_trust_file {proxy_ca.cert_path}"]
        if tls
        else ["tls off"]
    )
    session = await through_proxy(tmp_path, server, proxy_ca, msmtp(tmp_path, *settings))
    assert session.returncode == 0, session.text
    sent = check_stored(server, session, tls=tls, auth=True)
    # msmtp sends CRLF and puts the Date and Message-ID it finds missing on top
    # (so OpenSMTPD adds none)
    assert sent.endswith(MESSAGE_CRLF)
    added = sent[: -len(MESSAGE_CRLF)].split(b"\r\n")[:-1]
    assert sorted(ln.split(b":")[0] for ln in added) == [b"Date", b"Message-ID"]
    if tls:
        check_tls(session, server, proxy_ca)
    check_auth(session, mechanism.upper(), in_clear=not tls)


# -- smtplib ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "server, tls, mechanism",
    [
        ("postfix", False, "CRAM-MD5"),  # smtplib prefers CRAM-MD5, then PLAIN, then LOGIN
        ("postfix", True, "CRAM-MD5"),
        ("opensmtpd", True, "PLAIN"),
    ],
    indirect=["server"],
)
async def test_smtplib(
    tmp_path: Path, server: Server, proxy_ca: CertificateAuthority, tls: bool, mechanism: str
) -> None:
    refused: dict[str, Any] = {}

    def session(s: smtplib.SMTP) -> None:
        s.ehlo()
        if tls:
            s.starttls(context=proxy_context(proxy_ca))
            s.ehlo()
        s.login(USER, PASSWORD)
        # bytes go out as given: a careful caller gives CRLF (see the bare LF test)
        refused.update(s.sendmail("ann@example.org", ["bob@example.net"], MESSAGE_CRLF))

    done = await through_proxy(tmp_path, server, proxy_ca, smtplib_client(session))
    assert refused == {}
    sent = check_stored(server, done, tls=tls, auth=True)
    assert sent == MESSAGE_CRLF
    mail = next(e for e in done.rec.events() if isinstance(e, Command) and e.verb == "MAIL")
    assert mail.arg.endswith(f" size={len(MESSAGE_CRLF)}")  # RFC 1870
    if tls:
        check_tls(done, server, proxy_ca)
    check_auth(done, mechanism, in_clear=not tls)


@servers("postfix", "opensmtpd")
async def test_smtplib_bytes_with_bare_lf(
    tmp_path: Path, server: Server, proxy_ca: CertificateAuthority
) -> None:
    """smtplib sends a bytes message as given, so LF line ends go out as bare
    LFs (RFC 5321 section 2.3.8 allows only CRLF), and it appends a CRLF to a
    message that does not end with one. Both servers take bare LF as a line
    end (Postfix 3.7: smtpd_forbid_bare_newline = no) and keep CRLF lines,
    so their copy has one more, empty, line than the user wrote. The dot
    smtplib stuffed after a bare LF is taken out again by both."""

    def session(s: smtplib.SMTP) -> None:
        s.ehlo()
        s.sendmail("ann@example.org", ["bob@example.net"], MESSAGE)

    done = await through_proxy(tmp_path, server, proxy_ca, smtplib_client(session))
    # on the wire: bare LFs, a dot stuffed after one (smtplib stuffs after any
    # LF), the CRLF smtplib adds, the terminator
    wire = b"".join(e.raw for e in done.rec.events() if isinstance(e, MessageData))
    assert wire == MESSAGE.replace(b"\n.", b"\n..") + b"\r\n.\r\n"
    stored = server.stored(done.final_reply().text)
    _, rest = split_trace(stored, server.trace_fields)
    as_lines = MESSAGE_CRLF + b"\r\n"
    if isinstance(server, OpenSmtpd):
        rest = opensmtpd_added_headers(as_lines, rest)
    assert rest == as_lines


@servers("postfix", "opensmtpd")
async def test_auth_login_with_initial_response(
    tmp_path: Path, server: Server, proxy_ca: CertificateAuthority
) -> None:
    """smtplib sends the user name of AUTH LOGIN with the command, as an
    initial response (RFC 4954 section 4), which the LOGIN draft does not
    define; both servers take it and skip the Username: prompt."""

    def session(s: smtplib.SMTP) -> None:
        s.ehlo()
        s.starttls(context=proxy_context(proxy_ca))
        s.ehlo()
        s.user, s.password = USER, PASSWORD
        code, _ = s.auth("LOGIN", s.auth_login, initial_response_ok=True)
        assert code == 235
        s.sendmail("ann@example.org", ["bob@example.net"], MESSAGE_CRLF)

    done = await through_proxy(tmp_path, server, proxy_ca, smtplib_client(session))
    auth = next(e for e in done.rec.events() if isinstance(e, Command) and e.verb == "AUTH")
    assert auth.raw == b"AUTH LOGIN dXNlckBkb21haW4uY29t\r\n"
    prompts = [e.raw for e in done.rec.events() if isinstance(e, Reply) and e.code == 334]
    assert prompts == [b"334 UGFzc3dvcmQ6\r\n"]  # Password: only
    check_auth(done, "LOGIN", in_clear=False)
    check_stored(server, done, tls=True, auth=True)


@pytest.mark.parametrize("server", ["postfix", "opensmtpd"], indirect=True)
async def test_auth_cancelled_with_star(
    tmp_path: Path, server: Server, proxy_ca: CertificateAuthority
) -> None:
    """RFC 4954 section 4: a client cancels an exchange with "*" and the server
    answers 501. Postfix says 5.7.0, OpenSMTPD 5.5.2 (a syntax error)."""

    def session(s: smtplib.SMTP) -> None:
        s.ehlo()
        s.starttls(context=proxy_context(proxy_ca))
        s.ehlo()
        assert s.docmd("AUTH", "PLAIN")[0] == 334
        assert s.docmd("*")[0] == 501
        s.sendmail("ann@example.org", ["bob@example.net"], MESSAGE_CRLF)

    done = await through_proxy(tmp_path, server, proxy_ca, smtplib_client(session))
    (result,) = [e for e in done.rec.events() if isinstance(e, AuthResult)]
    assert result.cancelled and not result.success and result.code == 501
    cancel = next(e for e in done.rec.events() if isinstance(e, Reply) and e.code == 501)
    assert cancel.enhanced == ("5.7.0" if isinstance(server, Postfix) else "5.5.2")
    check_stored(server, done, tls=True, auth=False)


# -- replay -----------------------------------------------------------------------------


async def smtpproxy(*args: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(60):
        return await trio.run_process(
            [*SMTPPROXY, *args],
            cwd=cwd,
            env=smtpproxy_env(cwd),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


def rich_session(proxy_ca: CertificateAuthority) -> Callable[[smtplib.SMTP], None]:
    """STARTTLS, AUTH PLAIN, a MAIL over Postfix's size limit, then a message
    for one accepted and one refused recipient."""

    def session(s: smtplib.SMTP) -> None:
        s.ehlo()
        s.starttls(context=proxy_context(proxy_ca))
        s.ehlo()
        s.user, s.password = USER, PASSWORD
        assert s.auth("PLAIN", s.auth_plain)[0] == 235
        assert s.mail("ann@example.org", ["SIZE=20000000"])[0] == 552
        s.rset()
        assert s.mail("ann@example.org")[0] == 250
        assert s.rcpt("bob@example.net")[0] == 250
        assert s.rcpt(REJECTED)[0] == 550
        assert s.data(MESSAGE_CRLF)[0] == 250

    return session


async def test_replay_against_postfix_and_opensmtpd(
    tmp_path: Path,
    both: tuple[Postfix, OpenSmtpd],
    proxy_ca: CertificateAuthority,
) -> None:
    """A session recorded against Postfix replays cleanly against the same
    Postfix, and shows what OpenSMTPD does differently."""
    postfix, opensmtpd = both
    done = await through_proxy(tmp_path, postfix, proxy_ca, smtplib_client(rich_session(proxy_ca)))
    path = done.rec.path
    assert [e.code for e in done.rec.events() if isinstance(e, Reply) and e.command == "MAIL"] == [
        552,
        250,
    ]

    same = await smtpproxy(
        "replay", str(path), "--to", f"127.0.0.1:{postfix.port}",
        "--ca", str(postfix.tls.ca_pem), cwd=tmp_path,
    )  # fmt: skip
    out = same.stdout.decode()
    assert same.returncode == 0, out + same.stderr.decode()
    assert re.search(r"^\d+ exchanges, 0 differ$", out, re.MULTILINE), out

    other = await smtpproxy(
        "replay", str(path), "--to", f"127.0.0.1:{opensmtpd.port}",
        "--ca", str(opensmtpd.tls.ca_pem), cwd=tmp_path,
    )  # fmt: skip
    out = other.stdout.decode()
    assert other.returncode == 1, out + other.stderr.decode()
    differs = [ln for ln in out.splitlines() if ln.startswith("!! differs:")]
    text = "\n".join(differs)
    # EHLO capability sets (both EHLOs), the size limit, the refused recipient
    assert "capability PIPELINING removed" in text
    assert "capability CHUNKING removed" in text
    assert "capability SIZE 10240000 -> 36700160" in text
    assert "AUTH mechanisms removed CRAM-MD5" in text
    assert "capability HELP added" in text
    assert "code 552 -> 250" in text  # OpenSMTPD's limit is 35 MB, Postfix's here 10 MB
    assert "enhanced code 5.1.1 -> -" in text  # "550 Invalid recipient" has no enhanced code
    # RFC 4954 section 6 gives 235 2.7.0; OpenSMTPD says 2.0.0. And 2.0.0 for
    # a sender where Postfix says 2.1.0 (RFC 3463: X.1.0, address status)
    assert "enhanced code 2.7.0 -> 2.0.0" in text
    assert "enhanced code 2.1.0 -> 2.0.0" in text
    # two EHLOs, AUTH, MAIL SIZE=, MAIL, RCPT; STARTTLS, RSET, DATA and QUIT match
    assert len(differs) == 6, out

    table = await smtpproxy(
        "replay", str(path),
        "--to", f"127.0.0.1:{postfix.port}", "--to", f"127.0.0.1:{opensmtpd.port}",
        "--ca", str(postfix.tls.ca_pem), cwd=tmp_path,
    )  # fmt: skip
    out = table.stdout.decode()
    assert table.returncode == 1, out + table.stderr.decode()
    # one CA file serves both: the servers' leaves come from one test CA
    assert re.search(rf"127\.0\.0\.1:{postfix.port}: \d+ exchanges, 0 differ", out), out
    assert re.search(rf"127\.0\.0\.1:{opensmtpd.port}: \d+ exchanges, 6 differ", out), out


async def test_replay_cram_md5_against_postfix_and_opensmtpd(
    tmp_path: Path,
    both: tuple[Postfix, OpenSmtpd],
    proxy_ca: CertificateAuthority,
) -> None:
    """A CRAM-MD5 session needs the password to answer the target's new
    challenge; OpenSMTPD has no CRAM-MD5 and says so."""
    postfix, opensmtpd = both
    argv = swaks(tmp_path, *swaks_tls(proxy_ca), *swaks_auth("CRAM-MD5"))
    done = await through_proxy(tmp_path, postfix, proxy_ca, argv)
    assert done.returncode == 0, done.text
    path = str(done.rec.path)

    same = await smtpproxy(
        "replay", path, "--to", f"127.0.0.1:{postfix.port}",
        "--ca", str(postfix.tls.ca_pem), "--password", PASSWORD, cwd=tmp_path,
    )  # fmt: skip
    assert same.returncode == 0, same.stdout.decode() + same.stderr.decode()

    other = await smtpproxy(
        "replay", path, "--to", f"127.0.0.1:{opensmtpd.port}",
        "--ca", str(opensmtpd.tls.ca_pem), "--password", PASSWORD, cwd=tmp_path,
    )  # fmt: skip
    out = other.stdout.decode()
    assert other.returncode == 1, out + other.stderr.decode()
    assert "code 334 -> 504" in out, out  # 504 5.7.4 AUTH method "CRAM-MD5" not supported


@pytest.mark.peer("swaks")
async def test_replay_pipelined_session_against_opensmtpd(
    tmp_path: Path,
    both: tuple[Postfix, OpenSmtpd],
    proxy_ca: CertificateAuthority,
) -> None:
    """A batch recorded against Postfix is sent as a batch again only where
    PIPELINING is offered: OpenSMTPD, which would refuse the batch, gets the
    commands one at a time and takes the message."""
    postfix, opensmtpd = both
    done = await through_proxy(tmp_path, postfix, proxy_ca, swaks(tmp_path, "--pipeline"))
    assert done.returncode == 0, done.text
    path = str(done.rec.path)
    save = tmp_path / "replays"
    again = await smtpproxy(
        "replay", path, "--to", f"127.0.0.1:{opensmtpd.port}", "--save", str(save),
        cwd=tmp_path,
    )  # fmt: skip
    out = again.stdout.decode()
    assert again.returncode == 1, out + again.stderr.decode()
    differs = [ln for ln in out.splitlines() if ln.startswith("!! differs:")]
    assert len(differs) == 2, out
    assert "capability PIPELINING removed" in differs[0]
    assert "enhanced code 2.1.0 -> 2.0.0" in differs[1]  # MAIL
    (saved,) = save.glob("*.jsonl")
    replayed = read_recording(saved)
    final = next(e for e in replayed.events() if isinstance(e, Reply) and e.ends_message)
    assert final.code == 250
    # the message OpenSMTPD delivered is the one swaks sent to Postfix
    stored = opensmtpd.stored(final.text)
    _, rest = split_trace(stored, opensmtpd.trace_fields)
    sent = recorded_content(done.rec)
    assert opensmtpd_added_headers(sent, rest) == sent


@servers("opensmtpd")
async def test_pipelined_batch_refused_by_opensmtpd(
    tmp_path: Path, server: Server, proxy_ca: CertificateAuthority
) -> None:
    """A batch sent to OpenSMTPD, which offers no PIPELINING, is answered
    "500 5.5.1 Invalid command: Pipelining not supported" (paired with the
    first command), and OpenSMTPD hangs up without answering the rest; the
    proxy tells the client, which still waits for two replies, with a 421."""
    answers: list[tuple[int, bytes]] = []

    def session(s: smtplib.SMTP) -> None:
        s.ehlo()
        s.send(b"MAIL FROM:<ann@example.org>\r\nRCPT TO:<bob@example.net>\r\nDATA\r\n")
        answers.append(s.getreply())
        answers.append(s.getreply())
        with pytest.raises(smtplib.SMTPServerDisconnected):
            s.getreply()

    done = await through_proxy(tmp_path, server, proxy_ca, smtplib_client(session))
    assert answers == [
        (500, b"5.5.1 Invalid command: Pipelining not supported"),
        (421, b"4.4.2 smtpproxy: upstream closed the connection"),
    ]
    events = done.events()
    verbs = [e.verb for e in events if isinstance(e, Command)]
    assert verbs == ["EHLO", "MAIL", "RCPT", "DATA"]
    replies = [(e.command, e.code) for e in events if isinstance(e, Reply)]
    assert replies == [("<greeting>", 220), ("EHLO", 250), ("MAIL", 500)]
    (note,) = [e for e in events if isinstance(e, Note)]
    assert note.kind == "proxy_reply" and note.raw.startswith(b"421 4.4.2 ")
    assert done.rec.close is not None and done.rec.close.by == "server"


async def plaintext_client_with_upstream_starttls(tmp_path: Path, server: Server) -> Session:
    """msmtp without TLS, AUTH PLAIN, through a proxy with --upstream-tls
    starttls (the proxy encrypts the upstream leg itself)."""
    upstream = client_context()
    server.tls.ca.configure_trust(upstream)
    client = msmtp(tmp_path, "auth plain", "tls off")
    async with trio.open_nursery() as nursery:
        proxy = await start_proxy(
            nursery, tmp_path, server.address, upstream_context=upstream,
            upstream_sni="localhost", upstream_tls="starttls",
        )  # fmt: skip
        with trio.fail_after(CLIENT_TIMEOUT):
            code, output = await client(proxy.port)
        await wait_for_sessions(proxy.proxy, 1)
        nursery.cancel_scope.cancel()
    (path,) = proxy.recording_paths()
    return Session(code, output, read_recording(path), proxy.transcript())


@pytest.mark.peer("msmtp")
@servers("opensmtpd")
async def test_plaintext_client_reaches_opensmtpd_auth_with_upstream_starttls(
    tmp_path: Path, server: Server
) -> None:
    """docs/tls.md: with --upstream-tls starttls a client speaking plain text
    is given OpenSMTPD's post-TLS EHLO reply, with AUTH in it, and can log in."""
    session = await plaintext_client_with_upstream_starttls(tmp_path, server)
    assert session.returncode == 0, session.text
    check_stored(server, session, tls=True, auth=True)
    check_auth(session, "PLAIN", in_clear=True)  # in clear on the client's leg
    events = session.events()
    (tls,) = [e for e in events if isinstance(e, TlsEstablished)]
    assert tls.side is Side.SERVER and tls.verified == "ok"
    assert tls.peer is not None and tls.peer["sha256"] == server.tls.leaf_sha256
    notes = [e for e in events if isinstance(e, Note)]
    assert [n.kind for n in notes] == [
        "proxy_command", "proxy_reply_from_upstream", "proxy_command",
        "proxy_reply_from_upstream", "proxy_forwarded",
    ]  # fmt: skip
    assert [n.raw for n in notes[:3]] == [
        b"STARTTLS\r\n",
        b"220 2.0.0 Ready to start TLS\r\n",
        b"EHLO client.example\r\n",
    ]
    assert b"250-AUTH PLAIN LOGIN\r\n" in notes[3].raw  # what the client was given


@pytest.mark.peer("msmtp")
@servers("opensmtpd")
async def test_replay_of_upstream_starttls_recording(tmp_path: Path, server: Server) -> None:
    """The recording of a session in which the proxy upgraded the upstream leg
    should replay against the same server as the server saw it: STARTTLS,
    then AUTH inside TLS. Replay instead sends AUTH PLAIN, password and all,
    in clear, and OpenSMTPD (AUTH only after STARTTLS) answers 503."""
    session = await plaintext_client_with_upstream_starttls(tmp_path, server)
    assert session.returncode == 0, session.text
    again = await smtpproxy(
        "replay", str(session.rec.path), "--to", f"127.0.0.1:{server.port}",
        "--ca", str(server.tls.ca_pem), cwd=tmp_path,
    )  # fmt: skip
    out = again.stdout.decode()
    assert "-> AUTH PLAIN" in out
    assert "503" not in out, out  # today: "code 235 -> 503", credentials sent in clear
    assert again.returncode == 0, out


@pytest.mark.peer("swaks")
@servers("postfix")
async def test_smtpproxy_record_command_to_postfix(tmp_path: Path, server: Server) -> None:
    """The real ``smtpproxy record`` command in front of Postfix, verifying it
    with --upstream-ca; swaks trusts the proxy's own local CA."""
    home = tmp_path / ".smtpproxy-home"  # where smtpproxy_env puts the local CA
    with smtpproxy_process(
        "record", "--listen", "127.0.0.1:0", "--recordings", str(tmp_path / "recordings"),
        "--upstream", f"127.0.0.1:{server.port}", "--upstream-ca", str(server.tls.ca_pem),
        cwd=tmp_path,
    ) as proxy:  # fmt: skip
        argv = swaks(
            tmp_path, "--tls", "--tls-verify", "--tls-ca-path", str(home / "smtpproxy-ca.pem"),
            *swaks_auth("LOGIN"),
        )  # fmt: skip
        with trio.fail_after(CLIENT_TIMEOUT):
            code, output = await argv(proxy.port)
        assert code == 0, output.decode(errors="replace")
        proxy.wait_stdout("== session ")
        finished = proxy.finish()
    assert finished.returncode == 0, finished.stderr
    (path,) = (tmp_path / "recordings").glob("*.jsonl")
    session = Session(code, output, read_recording(path), finished.stdout)
    check_every_exchange(session)
    sent = check_stored(server, session, tls=True, auth=True)
    check_auth(session, "LOGIN", in_clear=False)
    # export writes the message exactly as Postfix received it
    exported = await smtpproxy("export", str(path), "--eml", str(tmp_path / "eml"), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr.decode()
    (eml,) = (tmp_path / "eml").glob("*.eml")
    assert eml.read_bytes() == sent
    upstream = next(
        e for e in session.rec.events() if isinstance(e, TlsEstablished) and e.side is Side.SERVER
    )
    assert upstream.verified == "ok" and upstream.peer is not None
    assert upstream.peer["sha256"] == server.tls.leaf_sha256


# -- diff and export ------------------------------------------------------------------


@pytest.mark.peer("swaks")
async def test_diff_postfix_and_opensmtpd_sessions(
    tmp_path: Path,
    both: tuple[Postfix, OpenSmtpd],
    proxy_ca: CertificateAuthority,
) -> None:
    """The same swaks session (STARTTLS, AUTH PLAIN) against each server:
    two Postfix sessions match, Postfix and OpenSMTPD differ where they do."""
    postfix, opensmtpd = both
    paths = []
    for k, server in enumerate((postfix, postfix, opensmtpd)):
        folder = tmp_path / str(k)
        folder.mkdir()
        argv = swaks(folder, *swaks_tls(proxy_ca), *swaks_auth("PLAIN"))
        done = await through_proxy(folder, server, proxy_ca, argv)
        assert done.returncode == 0, done.text
        paths.append(str(done.rec.path))

    # not --strict: see test_strict_masks_postfix_queue_ids below
    same = await smtpproxy("diff", paths[0], paths[1], cwd=tmp_path)
    assert same.returncode == 0, same.stdout.decode()
    assert same.stdout.decode().splitlines()[-1] == "10 exchanges, 0 differ"

    other = await smtpproxy("diff", paths[0], paths[2], cwd=tmp_path)
    out = other.stdout.decode()
    assert other.returncode == 1, out + other.stderr.decode()
    hunks = re.findall(r"^@@ exchange \d+: (\S+)", out, re.MULTILINE)
    assert hunks == ["EHLO", "EHLO", "AUTH", "MAIL"], out
    assert "enhanced code 2.7.0 -> 2.0.0" in out and "enhanced code 2.1.0 -> 2.0.0" in out
    assert "TLS:" not in out  # both TLSv1.3, so no TLS difference line
    assert out.splitlines()[-1] == "10 exchanges, 4 differ"


# -- smtpproxy bugs found against these servers ---------------------------------------


def postfix_reply(raw: bytes) -> Reply:
    """A reply Postfix sent in these tests, as the proxy's parser reads it."""
    conv = Conversation(greeted=True)
    conv.feed(Side.CLIENT, b"NOOP\r\n")
    (reply,) = [e for e in conv.feed(Side.SERVER, raw) if isinstance(e, Reply)]
    return reply


def test_strict_masks_postfix_queue_ids() -> None:
    """Two final replies of the same Postfix to the same session, as seen in
    these tests: ``replay --strict`` and ``diff --strict`` call them different
    whenever one queue id happens to have no hex letter."""
    a = postfix_reply(b"250 2.0.0 Ok: queued as 54228211757\r\n")
    b = postfix_reply(b"250 2.0.0 Ok: queued as 7B56821175D\r\n")
    assert compare_replies(a, b, strict=True) == []


def test_strict_ignores_cram_md5_challenges() -> None:
    """Two CRAM-MD5 challenges of the same Postfix, as seen in these tests:
    ``replay --strict`` of a CRAM-MD5 session against the server it was
    recorded from reports "text '<id>==' -> '<id>='" about a third of the time."""
    a = postfix_reply(b"334 PDUwMTU1MzcwNC43NTg4ODVAcG9zdGZpeC50ZXN0Pg==\r\n")
    b = postfix_reply(b"334 PDEzMjg4NjgyMDkuNzU4ODg2QHBvc3RmaXgudGVzdD4=\r\n")
    assert compare_replies(a, b, strict=True) == []


# -- AUTH arguments with other whitespace (issue 12: --redact) -------------------------


@servers("postfix", "opensmtpd")
@pytest.mark.parametrize(("space", "name"), [(b"\t", "tab"), (b"\x0b", "vertical tab")])
async def test_auth_plain_with_other_whitespace_is_read_and_redacted(
    tmp_path: Path, server: Server, proxy_ca: CertificateAuthority, space: bytes, name: str
) -> None:
    """What each server makes of ``AUTH PLAIN<space><base64>`` (docs/interop.md),
    and that ``--redact`` keeps the password out whatever it made of it:
    OpenSMTPD refuses the vertical tab and echoes the whole argument."""
    import base64

    plain = base64.b64encode(f"\0{USER}\0{PASSWORD}".encode())

    async def client(port: int) -> tuple[int, bytes]:
        def run() -> tuple[int, bytes]:
            ctx = ssl.create_default_context(cafile=str(proxy_ca.cert_path))
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.starttls(context=ctx)
                s.ehlo("client.example")
                s.putcmd("AUTH", "PLAIN" + space.decode() + plain.decode())
                code, text = s.getreply()
                s.quit()
            return code, text

        result: tuple[int, bytes] = await trio.to_thread.run_sync(run)
        return result

    done = await through_proxy(tmp_path, server, proxy_ca, client, redact=True)
    accepted = not (server.name == "opensmtpd" and name == "vertical tab")
    assert done.returncode == (235 if accepted else 504), done.output
    if not accepted:
        assert plain in done.output  # the echo the recording must not keep
    data = next(tmp_path.glob("recordings/*.jsonl")).read_bytes().lower()
    # the password is the word "password": look for it as a value, not a field name
    for secret in (b': "password"', b':"password"', plain, base64.b64encode(PASSWORD.encode())):
        assert secret.lower() not in data, secret
    results = [e for e in done.events() if isinstance(e, AuthResult)]
    if accepted:
        assert [(r.mechanism, r.user, r.success) for r in results] == [("PLAIN", USER, True)]
