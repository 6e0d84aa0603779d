"""The web view's session, message and side-by-side pages with the ASGI
test client (on trio), over recordings made by real clients through the
proxy: smtplib (STARTTLS, AUTH LOGIN, fault rules) in front of the embedded
sink or aiosmtpd, and a raw socket client for the hostile session.

What is checked is what the HTML holds: the diagram's arrows in order and
their places, the decoded AUTH user and no password outside the element a
click opens, the TLS facts, the frame's sandbox and its route's CSP, the
bytes a download gives, escaping everywhere."""

from __future__ import annotations

import base64
import re
import smtplib
import socket
import ssl
from email.message import EmailMessage
from html.parser import HTMLParser
from pathlib import Path

import pytest
import trio
from conftest import read_reply, run_aiosmtpd, start_proxy, wait_for_sessions
from starlette.testclient import TestClient

import smtpproxy
from smtpproxy.events import Anomaly, Command, Note, Reply, Side
from smtpproxy.protocol import exchanges
from smtpproxy.server import Sink
from smtpproxy.web import diagram
from smtpproxy.web.app import WebConfig, create_app
from smtpproxy.web.messagepage import HTML_PART_CSP, safe_filename

TIMEOUT = 10
HOST = "127.0.0.1:8025"
USER, PASSWORD = "alice", "pa55-w0rd-secret"


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SMTPPROXY_HOME", str(tmp_path / "ca-home"))
    return tmp_path / "recordings"


def page(client: TestClient, url: str, status: int = 200) -> str:
    answer = client.get(url)
    assert answer.status_code == status, (url, answer.text[:300])
    return answer.text


class Arrows(HTMLParser):
    """The diagram's arrows and boxes as the HTML holds them: each one's
    data- attributes, class and label, in document order."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.items: list[dict[str, str]] = []
        self._open: dict[str, str] | None = None
        self._in_label = False
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        classes = a.get("class", "").split()
        if tag == "g" and ("arrow" in classes or "marker" in classes):
            self._open = {**a, "label": ""}
            self.items.append(self._open)
        elif tag == "text" and self._open is not None and "label" in classes:
            self._in_label = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "text":
            self._in_label = False
        elif tag == "g":
            self._open = None

    def handle_data(self, data: str) -> None:
        if self._in_label and self._open is not None:
            self._open["label"] += data

    def arrows(self) -> list[dict[str, str]]:
        return [i for i in self.items if "arrow" in i["class"].split()]


def login_with_starttls(server: smtpproxy.SyncServer) -> None:
    """smtplib: STARTTLS (trusting the local CA), AUTH LOGIN without an
    initial response (RFC 4954: the user and the password each after a
    334), one message."""
    assert server.ca is not None
    context = ssl.create_default_context(cafile=str(server.ca))
    with smtplib.SMTP(*server.address, timeout=TIMEOUT) as client:
        client.starttls(context=context)
        client.ehlo()
        client.user, client.password = USER, PASSWORD
        client.auth("LOGIN", client.auth_login, initial_response_ok=False)
        client.sendmail(f"{USER}@example.org", ["bob@example.net"], "Subject: hi\r\n\r\nhello\r\n")


def only_session(folder: Path, n: int = 0) -> str:
    paths = sorted(folder.glob("*.jsonl"))
    return smtpproxy.read(paths[n]).id


# -- the session page ----------------------------------------------------------


def test_a_session_with_starttls_and_auth_login(folder: Path) -> None:
    with smtpproxy.sink(recordings=folder) as server:
        login_with_starttls(server)
        (session,) = server.wait_for_sessions(1, timeout=TIMEOUT)
    config = WebConfig(folder, hosts=frozenset({HOST}))
    with TestClient(create_app(config), base_url=f"http://{HOST}", backend="trio") as client:
        client.get(f"/?token={config.token}")
        html = page(client, f"/session/{session.id}")
        transcript = client.get(f"/session/{session.id}/transcript")

    arrows = Arrows(html).arrows()
    got = [(a["data-kind"], a["data-verb"], a["data-from"], a["data-to"]) for a in arrows]
    c, r = ("client", "server"), ("server", "client")
    want = [
        ("reply", "<greeting>", *r),
        ("command", "EHLO", *c), ("reply", "EHLO", *r),
        ("command", "STARTTLS", *c), ("reply", "STARTTLS", *r),
        ("command", "EHLO", *c), ("reply", "EHLO", *r),
        ("command", "AUTH", *c), ("reply", "AUTH", *r),
        ("auth", "<auth>", *c), ("reply", "<auth>", *r),
        ("auth", "<auth>", *c), ("reply", "<auth>", *r),
        ("command", "MAIL", *c), ("reply", "MAIL", *r),
        ("command", "RCPT", *c), ("reply", "RCPT", *r),
        ("command", "DATA", *c), ("reply", "DATA", *r),
        ("body", "<body>", *c), ("reply", "<body>", *r),
        ("command", "QUIT", *c), ("reply", "QUIT", *r),
    ]  # fmt: skip
    assert got == want
    ys = [float(a["data-y"]) for a in arrows]
    assert ys == sorted(ys) and len(set(ys)) == len(ys)  # time flows down, one row each
    labels = [a["label"] for a in arrows]
    assert labels[0].startswith("220 ") and labels[7] == "AUTH LOGIN"
    assert 'challenge="Username:"' in labels[8]
    assert f'user="{USER}"' in labels[9]  # the decoded user, on its arrow
    assert PASSWORD not in labels[11] and "password=" in labels[11]
    assert "secret" in arrows[11]["class"].split()

    # the password only inside the closed <details> a click opens; its
    # base64 (what the client sent) nowhere
    secrets = re.findall(r'<details class="secret"[^>]*>.*?</details>', html, re.S)
    assert len(secrets) == 1 and PASSWORD in secrets[0] and "<details open" not in html
    assert PASSWORD not in html.replace(secrets[0], "")
    assert base64.b64encode(PASSWORD.encode()).decode() not in html
    auth_box = html[html.index('id="auth-1"') :]
    assert f'data-field="user">{USER}<' in auth_box

    # the TLS facts of both legs: version and cipher; the server's
    # certificate with subject, issuer and validity
    tls = {leg.leg: leg for leg in session.tls.legs} if session.tls else {}
    assert set(tls) == {"client", "upstream"}
    for leg_id, leg in (("tls-client", tls["client"]), ("tls-server", tls["upstream"])):
        box = html[html.index(f'id="{leg_id}"') :][:3000]
        assert f'class="tls-version">{leg.version}<' in box
        assert f'class="tls-cipher">{leg.cipher}<' in box
    server_box = html[html.index('id="tls-server"') :][:3000]
    assert 'class="cert-subject">CN=localhost<' in server_box
    assert "smtpproxy local CA" in server_box
    assert 'class="cert-valid-from">' in server_box and 'class="cert-valid-until">' in server_box
    markers = [m for m in Arrows(html).items if m["data-kind"] == "tls"]
    assert len(markers) == 2

    assert transcript.status_code == 200
    assert transcript.headers["content-type"].startswith("text/plain")
    assert transcript.text == session.transcript()
    assert f'href="/session/{session.id}/transcript"' in html


def test_a_delay_is_drawn_to_scale(folder: Path) -> None:
    with smtpproxy.sink(recordings=folder, faults=["dot: delay 3s"]) as server:
        with smtplib.SMTP(*server.address, timeout=TIMEOUT) as client:
            client.sendmail("a@example.org", ["b@example.net"], "Subject: slow\r\n\r\nx\r\n")
        (session,) = server.wait_for_sessions(1, timeout=TIMEOUT)
    config = WebConfig(folder, hosts=frozenset({HOST}))
    with TestClient(create_app(config), base_url=f"http://{HOST}", backend="trio") as client:
        client.get(f"/?token={config.token}")
        html = page(client, f"/session/{session.id}")
    arrows = Arrows(html).arrows()
    by = {(a["data-kind"], a["data-verb"]): a for a in arrows}
    body, queued = by[("body", "<body>")], by[("reply", "<body>")]
    mail, mail_ok = by[("command", "MAIL")], by[("reply", "MAIL")]
    slow = float(queued["data-y"]) - float(body["data-y"])
    fast = float(mail_ok["data-y"]) - float(mail["data-y"])
    seconds = float(queued["data-t"]) - float(body["data-t"])
    assert seconds >= 3.0
    # to scale: the pause's height is its length times the scale, and many
    # times a quick exchange's
    assert slow >= seconds * diagram.PX_PER_SECOND
    assert slow > 8 * fast
    gap = re.search(r'<g class="gap" data-seconds="([0-9.]+)"', html)
    assert gap is not None and float(gap.group(1)) >= 3.0
    assert html.count('class="tick-label grid"') >= 2  # whole seconds on the axis
    faults = [m for m in Arrows(html).items if m["data-kind"] == "fault"]
    assert len(faults) == 1 and "delay 3s" in faults[0]["label"]


def test_a_long_pause_is_capped_with_a_break_mark() -> None:
    """Pure layout: a gap past CAP_SECONDS is drawn BREAK_PX high and says
    how long it really was."""
    events = [
        Reply(b"220 hi\r\n", 220, ("hi",), command="<greeting>"),
        Command(b"NOOP\r\n", "NOOP", ""),
        Reply(b"250 ok\r\n", 250, ("ok",), command="NOOP"),
    ]
    times = [0.0, 0.01, 95.0]
    drawing = diagram.build(list(zip(times, events)), exchanges(events))
    (gap,) = drawing.gaps
    assert gap.capped and gap.seconds == pytest.approx(94.99)
    assert gap.label == "1 min 35 s"
    assert drawing.arrows[2].y - drawing.arrows[1].y == diagram.BREAK_PX


def test_a_fault_reply_starts_at_the_proxy() -> None:
    """Pure layout: a reply the proxy made in the server's place (a fault
    rule's) is drawn from the proxy lane, marked as a fault, and the
    command it answered ends at the proxy; an anomaly is a box of its own."""
    note = Note(Side.SERVER, "fault", "fault rcpt: 550 ...", b"550 5.1.1 no\r\n", fed=True)
    events = [
        Reply(b"220 hi\r\n", 220, ("hi",), command="<greeting>"),
        Command(b"RCPT TO:<a@b>\r\n", "RCPT", "TO:<a@b>", path="a@b"),
        note,
        Anomaly(Side.CLIENT, "bare_lf", "a line ended with LF alone"),
    ]
    drawing = diagram.build([(0.0, e) for e in events], exchanges(events))
    rcpt, injected = drawing.arrows[1], drawing.arrows[2]
    assert (rcpt.start, rcpt.end) == (diagram.Lane.CLIENT, diagram.Lane.PROXY)
    assert (injected.start, injected.end) == (diagram.Lane.PROXY, diagram.Lane.CLIENT)
    assert injected.fault and injected.label == "550 5.1.1 no"
    (anomaly,) = drawing.markers
    assert anomaly.kind == "anomaly" and anomaly.start == diagram.Lane.CLIENT


def test_a_redacted_recording_has_no_secret_to_show(folder: Path) -> None:
    async def record() -> None:
        async with trio.open_nursery() as nursery:
            sink = await nursery.start(Sink().serve)
            proxy = await start_proxy(nursery, folder.parent, sink, redact=True)

            def send() -> None:
                with smtplib.SMTP(proxy.host, proxy.port, timeout=TIMEOUT) as client:
                    client.ehlo()
                    client.user, client.password = USER, PASSWORD
                    client.auth("LOGIN", client.auth_login, initial_response_ok=False)

            await trio.to_thread.run_sync(send)
            await wait_for_sessions(proxy.proxy, 1)
            nursery.cancel_scope.cancel()

    trio.run(record)
    sid = only_session(folder)
    config = WebConfig(folder, hosts=frozenset({HOST}))
    with TestClient(create_app(config), base_url=f"http://{HOST}", backend="trio") as client:
        client.get(f"/?token={config.token}")
        html = page(client, f"/session/{sid}")
    assert PASSWORD not in html and 'class="secret"' not in html
    assert 'class="redacted" data-field="password">redacted in the recording<' in html


# -- errors --------------------------------------------------------------------


def test_unknown_malformed_and_unreadable_sessions_get_one_line(folder: Path) -> None:
    with smtpproxy.sink(recordings=folder) as server:
        with smtplib.SMTP(*server.address, timeout=TIMEOUT) as client:
            client.sendmail("a@example.org", ["b@example.net"], "Subject: x\r\n\r\nx\r\n")
        (session,) = server.wait_for_sessions(1, timeout=TIMEOUT)
    config = WebConfig(folder, hosts=frozenset({HOST}))
    with TestClient(create_app(config), base_url=f"http://{HOST}", backend="trio") as client:
        client.get(f"/?token={config.token}")
        cases = [
            ("/session/0123456789abcdef", 404, "no session 0123456789abcdef"),
            ("/session/NOT-AN-ID", 404, "not a session id"),
            ("/session/..%2E", 404, "not a session id"),
            (f"/session/{session.id}/message/2", 404, "has 1 message(s): no message 2"),
            (f"/session/{session.id}/message/0.eml", 404, "no message 0"),
            (f"/session/{session.id}/message/1/part/9", 404, "no part 9"),
            (f"/session/{session.id}/raw/both", 404, "client or the server"),
            ("/compare?a=0123456789abcdef&b=fedcba9876543210", 404, "no session"),
        ]
        for url, status, line in cases:
            html = page(client, url, status)
            error = re.search(r'<p class="error" id="error"[^>]*>([^<]*)</p>', html)
            assert error is not None and line in error.group(1), (url, html)
            assert "Traceback" not in html
        session.path.write_bytes(b"\x00not a recording\n")
        for url in (f"/session/{session.id}", f"/session/{session.id}/message/1.eml"):
            html = page(client, url, 410)
            assert "cannot be read" in html and "Traceback" not in html
        session.path.unlink()
        assert "cannot be read" in page(client, f"/session/{session.id}", 410)


# -- the message page ----------------------------------------------------------


HOSTILE_NAME = "../../etc/pa\x1bss\u202ewd\r\n.txt"


def a_message() -> EmailMessage:
    m = EmailMessage()
    m["Subject"] = "=?utf-8?q?h=C3=A9llo?="
    m["From"] = "ann@example.org"
    m["To"] = "bob@example.net"
    m.set_content("the text part\n")
    m.add_alternative(
        '<p>hi <img src="https://tracker.example/p.gif"></p><script>parent.x=1</script>',
        subtype="html",
    )
    m.add_attachment(b"\x00\x01 attached octets", "application", "octet-stream", filename="a.bin")
    m.add_attachment(b"evil", "application", "octet-stream", filename=HOSTILE_NAME)
    return m


def test_a_message_page_frame_attachments_and_eml(folder: Path) -> None:
    with (
        run_aiosmtpd() as upstream,
        smtpproxy.proxy(upstream.address, upstream_tls="plain", recordings=folder) as server,
    ):
        with smtplib.SMTP(*server.address, timeout=TIMEOUT) as client:
            client.send_message(a_message())
        (session,) = server.wait_for_sessions(1, timeout=TIMEOUT)
        received = upstream.received.messages[0]["content"]
    config = WebConfig(folder, hosts=frozenset({HOST}))
    with TestClient(create_app(config), base_url=f"http://{HOST}", backend="trio") as client:
        client.get(f"/?token={config.token}")
        base = f"/session/{session.id}/message/1"
        html = page(client, base)
        assert 'id="envelope-from">ann@example.org<' in html
        assert '<span class="rcpt">bob@example.net</span>' in html
        assert "<td>héllo</td>" in html  # the header decoded (RFC 2047)
        assert '<pre class="text-part" data-part="2">the text part</pre>' in html

        # the HTML part: a frame sandboxed with no permission at all, from a
        # route whose own CSP lets nothing remote load and no script run
        frame = re.search(r"<iframe [^>]*>", html)
        assert frame is not None
        assert 'sandbox=""' in frame.group(0) and "allow-" not in frame.group(0)
        src = re.search(r'src="([^"]+)"', frame.group(0))
        assert src is not None
        part = client.get(src.group(1))
        assert part.status_code == 200 and "<script>" in part.text  # shown, but cannot run
        csp = part.headers["content-security-policy"]
        assert csp == HTML_PART_CSP
        directives = dict(d.strip().split(" ", 1) for d in csp.split(";") if " " in d.strip())
        assert directives["default-src"] == "'none'" and directives["img-src"] == "data:"
        assert "script-src" not in directives and "sandbox" in csp.split("; ")
        assert part.headers["x-frame-options"] == "SAMEORIGIN"

        # attachments download with a safe name (never a path, no control
        # or bidirectional characters) and their octets
        links = re.findall(r'<a class="attachment" href="([^"]+)">', html)
        assert len(links) == 2
        first = client.get(links[0])
        assert first.content == b"\x00\x01 attached octets"
        assert first.headers["content-type"] == "application/octet-stream"
        assert first.headers["content-disposition"].startswith('attachment; filename="a.bin"')
        evil = client.get(links[1])
        disposition = evil.headers["content-disposition"]
        assert disposition.startswith('attachment; filename="passwd.txt"'), disposition
        assert evil.content == b"evil"

        # the .eml: byte for byte what the server received
        eml = client.get(base + ".eml")
        assert eml.status_code == 200
        assert eml.headers["content-disposition"].startswith("attachment;")
        assert eml.content == received


def test_safe_filename() -> None:
    assert safe_filename("../../etc/passwd", "x") == "passwd"
    assert safe_filename("C:\\Windows\\evil.exe", "x") == "evil.exe"
    assert safe_filename("a\x00b\x1b[31m\u202e.txt", "x") == "ab[31m.txt"
    assert safe_filename("...", "part-3.bin") == "part-3.bin"
    assert safe_filename(None, "part-3.bin") == "part-3.bin"


# -- side by side --------------------------------------------------------------


def test_compare_highlights_the_differing_reply(folder: Path) -> None:
    def send(server: smtpproxy.SyncServer) -> None:
        with smtplib.SMTP(*server.address, timeout=TIMEOUT) as client:
            client.sendmail("a@example.org", ["b@example.net"], "Subject: x\r\n\r\nx\r\n")

    with smtpproxy.sink(recordings=folder) as server:
        send(server)
        server.faults.set("rcpt: 450 4.2.0 mailbox busy")
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            send(server)
        a, b = server.wait_for_sessions(2, timeout=TIMEOUT)
    config = WebConfig(folder, hosts=frozenset({HOST}))
    with TestClient(create_app(config), base_url=f"http://{HOST}", backend="trio") as client:
        client.get(f"/?token={config.token}")
        session_html = page(client, f"/session/{a.id}")
        assert 'action="/compare"' in session_html and f'name="a" value="{a.id}"' in session_html
        html = page(client, f"/compare?a={a.id}&b={b.id}")
    rows = re.findall(
        r'<tr class="(differs|same|only-a|only-b)" data-kind="\1">(.*?)</tr>', html, re.S
    )
    kinds = [k for k, _ in rows]
    assert kinds.count("same") >= 3  # greeting, EHLO, MAIL
    rcpt = [body for kind, body in rows if kind == "differs" and "rcpt TO:" in body]
    assert len(rcpt) == 1
    assert '<span class="code changed">250</span>' in rcpt[0]
    assert '<span class="code changed">450</span>' in rcpt[0]
    assert "code 250 -&gt; 450" in rcpt[0]
    # after the refused recipient A sends DATA and B does not: rows of one side only
    assert "only-a" in kinds


# -- a hostile session ---------------------------------------------------------

SCRIPT = "<script>alert(1)</script>"
IMG = '"><img src=x onerror=alert(2)>'


def hostile_session(server: smtpproxy.SyncServer) -> None:
    """A raw client whose every field is markup, quotes and control
    characters: EHLO, paths, the AUTH user, headers, a file name, HTML."""
    user = f"{SCRIPT}{IMG}'\x1b[31m"
    plain = base64.b64encode(f"\0{user}\0{IMG}".encode()).decode()
    body = (
        f"Subject: {SCRIPT}{IMG}\x07\r\n"
        f'From: "{IMG}" <{SCRIPT}@example.org>\r\n'
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\n"
        f"{SCRIPT}{IMG}\x1b]8;;http://x\x07\r\n"
        f"--b\r\nContent-Type: text/html\r\n\r\n{SCRIPT}{IMG}\r\n"
        f'--b\r\nContent-Type: application/x-evil; name="{SCRIPT}.html"\r\n'
        f'Content-Disposition: attachment; filename="{IMG}.html"\r\n\r\n{SCRIPT}\r\n'
        "--b--\r\n.\r\n"
    )
    lines = [
        f"EHLO {SCRIPT}{IMG}\x1b[2J\r\n",
        f"AUTH PLAIN {plain}\r\n",
        f"MAIL FROM:<{SCRIPT}@example.org>\r\n",
        f"RCPT TO:<{IMG}@example.net>\r\n",
        "RCPT TO:<bob@example.net>\r\n",
        "DATA\r\n",
        body,
        f"NOOP {SCRIPT}\u202e\r\n",
        "QUIT\r\n",
    ]
    with socket.create_connection(server.address, timeout=TIMEOUT) as sock:
        assert read_reply(sock).startswith(b"220")
        for line in lines:
            sock.sendall(line.encode())
            read_reply(sock)


def test_a_hostile_recording_renders_escaped_everywhere(folder: Path) -> None:
    with smtpproxy.sink(recordings=folder) as server:
        hostile_session(server)
        (session,) = server.wait_for_sessions(1, timeout=TIMEOUT)
        with smtplib.SMTP(*server.address, timeout=TIMEOUT) as client:
            client.noop()
        server.wait_for_sessions(2, timeout=TIMEOUT)
    assert len(session.messages) == 1 and session.auth is not None
    other = next(p for p in folder.glob("*.jsonl") if p != session.path)
    other_id = smtpproxy.read(other).id
    config = WebConfig(folder, hosts=frozenset({HOST}))
    with TestClient(create_app(config), base_url=f"http://{HOST}", backend="trio") as client:
        client.get(f"/?token={config.token}")
        base = f"/session/{session.id}"
        urls = [
            base,
            f"{base}/raw/client",
            f"{base}/raw/server",
            f"{base}/message/1",
            f"/compare?a={session.id}&b={other_id}",
            f"/compare?a={other_id}&b={session.id}&strict=1",
        ]
        for url in urls:
            html = page(client, url)
            # the only script elements are the page's own
            for m in re.finditer(r"<script", html, re.I):
                assert html.startswith('<script src="/static/', m.start()), url
            assert "<img" not in html.lower(), url
            assert "\x1b" not in html and "\x07" not in html and "\u202e" not in html, url
            assert "&lt;script&gt;" in html, url  # shown, as text
        # the diagram's labels and tooltips hold the text, escaped
        svg = page(client, base)
        assert "EHLO &lt;script&gt;alert(1)&lt;/script&gt;&#34;&gt;&lt;img" in svg
        assert "\\x1b[2J" in svg  # control characters made visible
        # text/plain answers are text: the browser does not read them as HTML
        transcript = client.get(f"{base}/transcript")
        assert transcript.headers["content-type"].startswith("text/plain")
        assert transcript.headers["x-content-type-options"] == "nosniff"
        assert "\x1b" not in transcript.text
        # the attachment's name: no markup, no quote, no path
        message = page(client, f"{base}/message/1")
        links = re.findall(r'<a class="attachment" href="([^"]+)">', message)
        assert links
        for link in links:
            got = client.get(link)
            assert got.headers["content-type"] == "application/octet-stream"
            name = got.headers["content-disposition"]
            assert "<" not in name and ">" not in name and "/" not in name.split("''")[0]
