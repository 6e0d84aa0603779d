"""The web view in a real browser (issue 17): Debian's Chromium, driven by
Playwright's Python API pointed at the system browser (no browser download).

Every recording is made in the test by real clients through ``smtpproxy
record`` run as a process: swaks (STARTTLS, AUTH LOGIN), smtplib (an HTML
message), a raw socket client (a hostile session), and smtplib in front of
Postfix and OpenSMTPD. The pages are served by ``smtpproxy web`` and
``smtpproxy record --web`` as processes, and read the way a user does:
what is visible, what a click reveals, what a filter leaves, whether a
script ran (a canary on ``window``, the console, uncaught errors) and
whether a request left for a URL a recording holds (the browser's own
request log and a local HTTP listener that counts what reaches it).

Screenshots of each page go to ``artifacts/screenshots/`` at the repository
root (kept by CI as artefacts). One Chromium serves the whole module; every
page has a bounded default timeout.
"""

from __future__ import annotations

import base64
import contextlib
import http.server
import os
import re
import selectors
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from conftest import SmtpproxyProcess, read_reply, smtpproxy_process, swaks_argv
from servers import (  # noqa: F401  (fixtures)
    OpenSmtpd,
    Postfix,
    missing_peer,
    opensmtpd_server,
    postfix_server,
    server_ca,
)

import smtpproxy
from smtpproxy.web.index import NAMES

if TYPE_CHECKING:
    from playwright.sync_api import Browser, ConsoleMessage, Page, Request

TIMEOUT = 10.0
#: every Playwright wait (navigation, selector, click) is bounded by this
PAGE_MS = 10_000
CHROMIUM = Path(os.environ.get("SMTPPROXY_CHROMIUM", "/usr/bin/chromium"))
ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "artifacts" / "screenshots"

SWAKS_USER, SWAKS_PASSWORD = "swaks-sam", "pa55-w0rd-secret"
HTML_USER = "hana-html"

#: what a hostile recording holds, everywhere it can
PWN_SCRIPT = "<script>window.__pwned=1</script>"
PWN_IMG = '"><img src=x onerror="window.__pwned=1">'
QUOTES = "'\"`"


def column(name: str) -> int:
    """The 1-based position of a list column (for ``td:nth-child``)."""
    return NAMES.index(name) + 1


# -- a local HTTP listener: did anything try to fetch a recording's URL? -------


@dataclass
class Listener:
    """A plain HTTP server on loopback that only counts the requests that
    reach it: the URLs a recording holds point here."""

    port: int
    paths: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path}"

    def seen(self) -> list[str]:
        with self.lock:
            return list(self.paths)


@pytest.fixture(scope="module")
def listener() -> Iterator[Listener]:
    found = Listener(0)

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with found.lock:
                found.paths.append(self.path)
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass  # counted above; nothing to print

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    found.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1})
    thread.start()
    try:
        yield found
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=TIMEOUT)


# -- the browser ---------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium for the module: Debian's, through Playwright
    (``--no-sandbox``: CI runs as root)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing_peer("playwright is not installed (pip install -e '.[test]')")
    if not os.access(CHROMIUM, os.X_OK):
        missing_peer(f"{CHROMIUM} is not installed (apt-get install chromium)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox"], headless=True, timeout=30_000
        )
        try:
            yield chromium
        finally:
            chromium.close()


@dataclass
class Tab:
    """A page of its own browser context, and what it saw: console
    messages, uncaught errors, every request, main-frame navigations."""

    page: Page
    origin: str
    console: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    #: requests the browser itself stopped (CSP), with its reason
    blocked: dict[str, str] = field(default_factory=dict)
    navigations: list[str] = field(default_factory=list)

    def goto(self, path: str) -> None:
        answer = self.page.goto(self.origin + path)
        assert answer is not None and answer.status == 200, (path, answer and answer.status)

    def foreign_requests(self) -> list[str]:
        """Requests for anything but the web view's own origin that the
        browser did not block itself (with the reason it gives)."""
        return [
            url
            for url in self.requests
            if not url.startswith(self.origin + "/")
            and "csp" not in self.blocked.get(url, "").lower()
        ]

    def violations(self) -> list[str]:
        """The Content-Security-Policy violations of the page itself (not its
        frames): its own scripts and styles are files, so any is markup
        from a recording that reached the document."""
        return list(self.page.evaluate("() => window.__csp || []"))

    def canary(self) -> list[Any]:
        """``window.__pwned`` in every frame that lets the test look in."""
        values = []
        for frame in self.page.frames:
            with contextlib.suppress(Exception):  # a frame gone or not ready
                values.append(frame.evaluate("() => window.__pwned"))
        return values


@contextlib.contextmanager
def open_tab(browser: Browser, entry: str) -> Iterator[Tab]:
    """A new context entered through ``entry`` (the URL with the token the
    server printed: the answer sets the cookie every later page needs)."""
    origin = re.sub(r"^(http://[^/]+).*$", r"\1", entry)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(PAGE_MS)
    context.set_default_navigation_timeout(PAGE_MS)
    # CSP violations are the browser blocking something: kept, to show in a failure
    context.add_init_script(
        "document.addEventListener('securitypolicyviolation', e => {"
        " (window.__csp = window.__csp || []).push(e.violatedDirective + ' ' + e.blockedURI); });"
    )
    try:
        page = context.new_page()
        tab = Tab(page, origin)

        def on_console(message: ConsoleMessage) -> None:
            tab.console.append(f"{message.type}: {message.text}")

        def on_request(request: Request) -> None:
            tab.requests.append(request.url)

        page.on("console", on_console)
        page.on("pageerror", lambda error: tab.errors.append(str(error)))
        page.on("request", on_request)
        page.on("requestfailed", lambda r: tab.blocked.__setitem__(r.url, r.failure or ""))
        page.on(
            "framenavigated",
            lambda frame: tab.navigations.append(frame.url) if frame == page.main_frame else None,
        )
        answer = page.goto(entry)
        assert answer is not None and answer.status == 200, entry
        assert "token=" not in page.url  # the token went into a cookie
        yield tab
    finally:
        context.close()


def screenshot(page: Page, name: str, selector: str | None = None) -> Path:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / name
    if selector is None:
        page.screenshot(path=str(path), full_page=True)
    else:
        page.locator(selector).screenshot(path=str(path))
    assert path.stat().st_size > 1000
    return path


# -- recordings made by real clients through ``smtpproxy record`` --------------


def wait_sessions_closed(child: SmtpproxyProcess, count: int, timeout: float = TIMEOUT) -> None:
    """Read the child's transcript until ``count`` sessions have ended (the
    ``== session ... closed`` line is printed once the recording is closed)."""
    assert child.proc.stdout is not None
    fd = child.proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(fd, selectors.EVENT_READ)
        while len(re.findall(rb"\] == session \S+ closed ", bytes(child.out))) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{count} sessions never closed: {bytes(child.out)!r}")
            if sel.select(remaining):
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise AssertionError(f"smtpproxy ended: {bytes(child.err)!r}")
                child.out.extend(chunk)


def proxy_ca(cwd: Path) -> ssl.SSLContext:
    """A client context trusting the local CA of the smtpproxy run in ``cwd``."""
    return ssl.create_default_context(cafile=str(cwd / ".smtpproxy-home" / "smtpproxy-ca.pem"))


def html_message(listener: Listener) -> EmailMessage:
    """multipart/alternative whose HTML part would set a canary and load a
    remote image, were it allowed to."""
    m = EmailMessage()
    m["Subject"] = "an HTML newsletter"
    m["From"] = f"{HTML_USER}@example.org"
    m["To"] = "bob@example.net"
    m.set_content("the plain text part\n")
    m.add_alternative(
        "<h1>Hello from the HTML part</h1>"
        f'<p>remote: <img src="{listener.url("remote.png")}" alt="remote"></p>'
        "<script>window.__canary = 1; document.title = 'canary';"
        " parent.postMessage('canary', '*');</script>",
        subtype="html",
    )
    return m


def send_html(address: tuple[str, int], cwd: Path, listener: Listener) -> None:
    with smtplib.SMTP(*address, timeout=TIMEOUT) as client:
        client.starttls(context=proxy_ca(cwd))
        client.login(HTML_USER, "another-secret")
        client.send_message(html_message(listener))


def send_hostile(address: tuple[str, int], listener: Listener) -> None:
    """A raw client whose EHLO name, MAIL path, AUTH user, headers, HTML
    body and file name are markup, quotes, control characters and URLs
    of the listener: the bytes on the wire are exactly these."""
    remote = f'<img src="{listener.url("injected.png")}">'
    style = f'<link rel="stylesheet" href="{listener.url("injected.css")}">'
    user = f"{PWN_SCRIPT}{PWN_IMG}{remote}{QUOTES}\x1b[31m"
    plain = base64.b64encode(f"\0{user}\0{PWN_IMG}".encode()).decode()
    body = (
        f"Subject: {PWN_SCRIPT}{PWN_IMG}{QUOTES}\x07\r\n"
        f'From: "{PWN_IMG}" <x@example.org>\r\n'
        f"X-Remote: {remote}{style}\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/mixed; boundary="b"\r\n\r\n'
        "--b\r\nContent-Type: text/plain\r\n\r\n"
        f"{PWN_SCRIPT}{PWN_IMG}\x1b]8;;{listener.url('osc8')}\x07\r\n"
        "--b\r\nContent-Type: text/html\r\n\r\n"
        f"{PWN_SCRIPT}{PWN_IMG}{remote}{style}"
        f'<iframe src="{listener.url("injected-frame")}"></iframe>\r\n'
        f'--b\r\nContent-Type: application/x-evil; name="{PWN_SCRIPT}.html"\r\n'
        f'Content-Disposition: attachment; filename="{PWN_IMG}.html"\r\n\r\n{PWN_SCRIPT}\r\n'
        "--b--\r\n.\r\n"
    )
    lines = [
        f"EHLO {PWN_SCRIPT}{PWN_IMG}{QUOTES}\x1b[2J\r\n",
        f"AUTH PLAIN {plain}\r\n",
        f"MAIL FROM:<{PWN_SCRIPT}@example.org>\r\n",
        f"RCPT TO:<{PWN_IMG}@example.net>\r\n",
        "RCPT TO:<bob@example.net>\r\n",
        "DATA\r\n",
        body,
        f"NOOP {PWN_SCRIPT}{remote}\u202e\r\n",
        "QUIT\r\n",
    ]
    with socket.create_connection(address, timeout=TIMEOUT) as sock:
        assert read_reply(sock).startswith(b"220")
        for line in lines:
            sock.sendall(line.encode())
            read_reply(sock)


@dataclass
class Made:
    folder: Path
    swaks: str  # session ids
    html: str
    hostile: str


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory, listener: Listener) -> Made:
    """Three sessions through ``smtpproxy record`` (its embedded sink offers
    STARTTLS and AUTH): swaks with STARTTLS and AUTH LOGIN, smtplib with an
    HTML message, the hostile raw client."""
    cwd = tmp_path_factory.mktemp("browser")
    folder = cwd / "recordings"
    message = cwd / "message.eml"
    message.write_bytes(b"Subject: from swaks\r\n\r\nhello from swaks\r\n")
    with smtpproxy_process("record", "--listen", "127.0.0.1:0", cwd=cwd) as proxy:
        argv = swaks_argv(proxy.host, proxy.port, message, "-tls", "-a", "LOGIN")
        argv += ["-au", SWAKS_USER, "-ap", SWAKS_PASSWORD]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
        wait_sessions_closed(proxy, 1)
        send_html(proxy.address, cwd, listener)
        wait_sessions_closed(proxy, 2)
        send_hostile(proxy.address, listener)
        wait_sessions_closed(proxy, 3)
        finished = proxy.finish()
    assert finished.returncode == 0, finished.stderr
    ids: dict[str, str] = {}
    for path in folder.glob("*.jsonl"):
        session = smtpproxy.read(path)
        user = session.auth.user if session.auth else None
        name = {SWAKS_USER: "swaks", HTML_USER: "html"}.get(user or "", "hostile")
        ids[name] = session.id
    assert sorted(ids) == ["hostile", "html", "swaks"], ids
    return Made(folder, ids["swaks"], ids["html"], ids["hostile"])


@pytest.fixture(scope="module")
def web(recordings: Made) -> Iterator[str]:
    """``smtpproxy web FOLDER`` as a process: the URL with its token."""
    cwd = recordings.folder.parent
    args = ("web", str(recordings.folder), "--listen", "127.0.0.1:0")
    with smtpproxy_process(*args, cwd=cwd) as child:
        yield entry_url(child)
        finished = child.finish()
    assert finished.returncode == 0, finished.stderr


def entry_url(child: SmtpproxyProcess) -> str:
    line = child._wait(child.err, b"?token=", TIMEOUT).decode()
    match = re.search(r"http://127\.0\.0\.1:\d+/\?token=\S+", line)
    assert match is not None, line
    return match.group(0)


# -- the list ------------------------------------------------------------------


def listed(page: Page, name: str) -> list[str]:
    """The visible cells of one column, row by row."""
    cells = page.locator(f"#sessions tbody tr[data-session] td:nth-child({column(name)})")
    return [text.strip() for text in cells.all_inner_texts()]


def test_the_list_and_its_filter(browser: Browser, web: str, recordings: Made) -> None:
    with open_tab(browser, web) as tab:
        page = tab.page
        page.locator("#sessions").wait_for()
        assert page.locator("#count").inner_text().startswith("3 session(s)")
        ids = page.locator("#sessions tbody tr[data-session]").evaluate_all(
            "rows => rows.map(r => r.dataset.session)"
        )
        assert sorted(ids) == sorted([recordings.swaks, recordings.html, recordings.hostile])
        rows = dict(zip(listed(page, "id"), listed(page, "auth_user")))
        assert rows[recordings.swaks] == SWAKS_USER and rows[recordings.html] == HTML_USER
        tls = dict(zip(listed(page, "id"), listed(page, "tls_client")))
        assert tls[recordings.swaks].startswith("TLSv1.")
        screenshot(page, "list.png")

        # free text: typed into the field, the form submitted
        page.fill("input[name=q]", SWAKS_USER)
        with page.expect_navigation():
            page.click("#filters button[type=submit]")
        assert listed(page, "id") == [recordings.swaks]
        assert page.locator("#count").inner_text().startswith("1 session(s)")
        # the URL holds the filter and no empty field (a link to share)
        assert re.search(rf"[?&]q={SWAKS_USER}(&|$)", page.url), page.url
        assert "auth_user=" not in page.url

        # by column: the closed <details> opened by a click, a field typed in
        page.goto(tab.origin + "/")
        page.click("#filters details.by-column summary")
        page.fill("input[name=auth_user]", HTML_USER)
        with page.expect_navigation():
            page.press("input[name=auth_user]", "Enter")
        assert listed(page, "id") == [recordings.html]
        assert f"auth_user={HTML_USER}" in page.url and "q=" not in page.url
        assert page.locator("input[name=auth_user]").input_value() == HTML_USER
        assert tab.errors == [] and tab.foreign_requests() == [] and tab.violations() == []


# -- a session -----------------------------------------------------------------


def test_a_session_with_starttls_and_auth_login(
    browser: Browser, web: str, recordings: Made
) -> None:
    with open_tab(browser, web) as tab:
        page = tab.page
        # reached from the list by a click, as a user would
        page.click(f"#sessions a[href='/session/{recordings.swaks}']")
        page.wait_for_url(f"**/session/{recordings.swaks}")
        labels = [
            text.strip() for text in page.locator("#diagram g.arrow text.label").all_text_contents()
        ]
        want = [
            r"220 ",
            r"EHLO client\.example$",
            r"250[ -]",
            r"STARTTLS$",
            r"220 ",
            r"EHLO client\.example$",
            r"250[ -]",
            r"AUTH LOGIN$",
            r"334 .*Username:",
            rf'.*user="{SWAKS_USER}"',
            r"334 .*Password:",
            r".*password=",
            r"235 ",
            r"MAIL FROM:<ann@example\.org>",
            r"250 ",
            r"RCPT TO:<bob@example\.net>",
            r"250 ",
            r"DATA$",
            r"354 ",
        ]
        assert len(labels) >= len(want) + 3, labels
        for pattern, label in zip(want, labels):
            assert re.match(pattern, label), (pattern, labels)
        # the arrows go down the page in that order
        ys = page.locator("#diagram g.arrow").evaluate_all("gs => gs.map(g => Number(g.dataset.y))")
        assert ys == sorted(ys)

        # the decoded user in view; the password only after a click
        user = page.locator("#auth-1 .auth-value[data-field=user]")
        assert user.is_visible() and user.inner_text() == SWAKS_USER
        secret = page.locator("#auth-1 details.secret[data-field=password]")
        value = secret.locator(".secret-value")
        assert value.is_hidden()
        assert SWAKS_PASSWORD not in page.locator("body").inner_text()
        assert SWAKS_PASSWORD not in "".join(labels)
        secret.locator("summary").click()
        value.wait_for(state="visible")
        assert value.inner_text() == SWAKS_PASSWORD
        assert SWAKS_PASSWORD in page.locator("body").inner_text()

        # both legs' TLS facts
        for leg in ("client", "server"):
            box = page.locator(f"#tls-{leg}")
            assert box.is_visible()
            assert box.locator(".tls-version").inner_text().startswith("TLSv1.")
            assert box.locator(".tls-cipher").inner_text().strip() != ""
        subject = page.locator("#tls-server .certificate .cert-subject").first
        assert "CN=" in subject.inner_text()

        # a click on an arrow shows its whole text under the diagram
        page.locator("#diagram g.arrow[data-verb=STARTTLS] line").first.click(force=True)
        assert "STARTTLS" in page.locator("#arrow-detail").inner_text()
        value.evaluate("v => v.closest('details').open = false")  # no password in the shots
        screenshot(page, "session.png")
        screenshot(page, "session-diagram.png", "#sequence")
        assert tab.errors == [] and tab.foreign_requests() == [] and tab.violations() == []


# -- a message -----------------------------------------------------------------


def test_a_message_html_part_is_sandboxed(
    browser: Browser, web: str, recordings: Made, listener: Listener
) -> None:
    with open_tab(browser, web) as tab:
        page = tab.page
        page.add_init_script(
            "window.addEventListener('message', e => { window.__posted = String(e.data); });"
        )
        tab.goto(f"/session/{recordings.html}")
        page.click("#messages a[href$='/message/1']")
        page.wait_for_url(f"**/session/{recordings.html}/message/1")
        frame_element = page.locator("iframe.html-part")
        frame_element.wait_for()
        sandbox = frame_element.get_attribute("sandbox")
        assert sandbox is not None and "allow-scripts" not in sandbox, sandbox
        # the HTML is shown: its heading in the frame
        heading = page.frame_locator("iframe.html-part").locator("h1")
        assert heading.inner_text() == "Hello from the HTML part"
        frame = frame_element.element_handle().content_frame()
        assert frame is not None
        frame.wait_for_load_state("load")
        assert frame.evaluate("() => window.__canary") is None
        assert frame.evaluate("() => document.title") != "canary"
        # the remote image did not load
        assert frame.evaluate("() => document.querySelector('img').naturalWidth") == 0
        assert page.evaluate("() => window.__canary") is None
        assert page.evaluate("() => window.__posted") is None
        assert page.locator("pre.text-part").inner_text().strip() == "the plain text part"
        screenshot(page, "message.png")
        assert listener.seen() == []
        assert tab.foreign_requests() == [], tab.blocked
        # Chromium names the block: the frame's Content-Security-Policy
        assert tab.blocked.get(listener.url("remote.png"), "csp") == "csp", tab.blocked
        assert tab.errors == []


# -- side by side: Postfix and OpenSMTPD ---------------------------------------


def test_side_by_side_postfix_and_opensmtpd(
    browser: Browser,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    """The same smtplib client (STARTTLS, AUTH, one message) through
    ``record --upstream`` to each server; the pages compare the two."""
    postfix: Postfix = request.getfixturevalue("postfix_server")
    opensmtpd: OpenSmtpd = request.getfixturevalue("opensmtpd_server")
    folder = tmp_path / "recordings"
    ids: list[str] = []
    seen: set[Path] = set()
    for server in (postfix, opensmtpd):
        args = ["record", "--listen", "127.0.0.1:0", "--upstream", f"127.0.0.1:{server.port}"]
        args += ["--upstream-ca", str(server.tls.ca_pem), "-q"]
        with smtpproxy_process(*args, cwd=tmp_path) as proxy:
            with smtplib.SMTP(*proxy.address, timeout=TIMEOUT) as client:
                client.starttls(context=proxy_ca(tmp_path))
                client.login("user@domain.com", "password")
                client.sendmail(
                    "ann@example.org", ["bob@example.net"], "Subject: compared\r\n\r\nx\r\n"
                )
            wait_sessions_closed(proxy, 1)
            assert proxy.finish().returncode == 0
        (path,) = set(folder.glob("*.jsonl")) - seen
        seen.add(path)
        ids.append(smtpproxy.read(path).id)
    a, b = ids
    args = ("web", str(folder), "--listen", "127.0.0.1:0")
    with (
        smtpproxy_process(*args, cwd=tmp_path) as child,
        open_tab(browser, entry_url(child)) as tab,
    ):
        page = tab.page
        # from a session page's compare form, as a user would
        tab.goto(f"/session/{a}")
        page.fill("#compare-form input[name=b]", b)
        with page.expect_navigation():
            page.click("#compare-form button[type=submit]")
        assert f"a={a}" in page.url and f"b={b}" in page.url
        heads = page.locator("#compare thead tr").first.locator("th").all_inner_texts()
        assert heads[0].startswith(f"A: {a}") and heads[1].startswith(f"B: {b}")
        assert page.locator("#compare tbody td.side-a").count() >= 5
        assert page.locator("#compare tbody td.side-b").count() >= 5
        # each column is its server's: the greetings
        assert "ESMTP Postfix" in page.locator("#compare td.side-a").first.inner_text()
        assert "ESMTP OpenSMTPD" in page.locator("#compare td.side-b").first.inner_text()
        differs = page.locator("#compare tbody tr.differs")
        assert differs.count() >= 1
        # the difference is marked, and marked in its own colour
        changed = differs.first.locator(".changed").first
        assert changed.is_visible()
        colour = changed.evaluate("e => getComputedStyle(e).backgroundColor")
        same = page.locator("#compare tbody tr.same td.reply").first
        assert colour != same.evaluate("e => getComputedStyle(e).backgroundColor")
        # the EHLO answers differ by their extensions, and the row says which
        ehlo = differs.filter(has_text="ehlo").first
        reasons = ehlo.locator("ul.reasons li").all_inner_texts()
        assert any(r.startswith("capability ") for r in reasons), reasons
        count = page.locator("#compare-count")
        assert int(count.get_attribute("data-differences") or "0") >= 1
        screenshot(page, "compare.png")
        assert tab.errors == [] and tab.foreign_requests() == [] and tab.violations() == []
        child.finish()


# -- live: record --web --------------------------------------------------------


def test_record_web_shows_a_new_session_without_reload(browser: Browser, tmp_path: Path) -> None:
    args = ("record", "--listen", "127.0.0.1:0", "--web", "127.0.0.1:0")
    with (
        smtpproxy_process(*args, cwd=tmp_path) as proxy,
        open_tab(browser, entry_url(proxy)) as tab,
    ):
        page = tab.page
        assert page.locator("#sessions tbody tr[data-session]").count() == 0
        # the event stream is open once the badge shows
        page.locator("#live").wait_for(state="visible")
        page.evaluate("() => { window.__marker = 1; }")
        loaded = len(tab.navigations)
        row = page.locator("#sessions tbody tr[data-session]")
        with smtplib.SMTP(*proxy.address, timeout=TIMEOUT) as client:
            client.login("livia", "s3cret")
            # listed while it happens
            row.wait_for()
            reason = row.locator(f"td:nth-child({column('reason')})")
            assert reason.inner_text() == "in progress"
            assert "fresh" in (row.get_attribute("class") or "")  # marked as new
            client.sendmail("livia@example.org", ["bob@example.net"], "Subject: hi\r\n\r\nx\r\n")
        # and brought up to date when it ends
        page.wait_for_function(
            "n => { const td = document.querySelector("
            "'#sessions tbody tr[data-session] td:nth-child(' + n + ')');"
            " return td && td.textContent.trim() === 'livia'; }",
            arg=column("auth_user"),
        )
        assert reason.inner_text() != "in progress"
        assert row.locator(f"td:nth-child({column('accepted')})").inner_text() == "1"
        # the same document all along: no reload, no navigation
        assert page.evaluate("() => window.__marker") == 1
        assert len(tab.navigations) == loaded
        assert tab.errors == [] and tab.foreign_requests() == [] and tab.violations() == []
        finished = proxy.finish()
    assert finished.returncode == 0, finished.stderr


# -- a hostile recording -------------------------------------------------------


def test_a_hostile_recording_runs_no_script(
    browser: Browser, web: str, recordings: Made, listener: Listener
) -> None:
    sid = recordings.hostile
    pages = [
        "/",
        f"/?q={PWN_SCRIPT}",
        f"/session/{sid}",
        f"/session/{sid}/message/1",
        f"/session/{sid}/raw/client",
        f"/session/{sid}/raw/server",
        f"/compare?a={sid}&b={recordings.swaks}&strict=1",
    ]
    with open_tab(browser, web) as tab:
        page = tab.page
        for path in pages:
            tab.goto(path)
            page.wait_for_load_state("load")
            for frame in page.frames:
                frame.wait_for_load_state("load")
            assert set(tab.canary()) == {None}, (path, tab.canary())
            assert tab.violations() == [], path
            # shown as text, where a user can read it
            text = page.locator("body").inner_text()
            assert "window.__pwned=1" in text, path
        # a click on each AUTH secret and arrow: nothing runs then either
        tab.goto(f"/session/{sid}")
        for summary in page.locator("details.secret summary").all():
            summary.click()
        for arrow in page.locator("#diagram g.arrow line").all()[:12]:
            arrow.click(force=True)
        assert set(tab.canary()) == {None}
        # the arrow's label and its whole text (the tooltip) hold the markup as text
        ehlo = page.locator("#diagram g.arrow[data-verb=EHLO]").first
        assert (ehlo.locator("text.label").text_content() or "").startswith("EHLO <script>")
        assert PWN_SCRIPT + PWN_IMG in (ehlo.locator("title").text_content() or "")
        screenshot(page, "hostile-session.png")
        tab.goto(f"/session/{sid}/message/1")
        assert page.locator("iframe.html-part").get_attribute("sandbox") == ""
        headers = page.locator("#headers").inner_text()
        assert PWN_SCRIPT in headers and PWN_IMG in headers

        assert tab.errors == [], tab.errors  # no uncaught error: no injected code ran
        injected = [line for line in tab.console if "__pwned" in line or "Uncaught" in line]
        assert injected == [], tab.console
        assert tab.foreign_requests() == [], tab.foreign_requests()
        assert listener.seen() == []
