"""The web view's sessions list (issue 17): sorting, filtering and paging
over the ASGI test client; ``smtpproxy index`` as a process; a hostile
recording shown escaped; ``record --web`` as a process, live over
server-sent events, behind the same token and Host check.

Recordings are made by real sessions (smtplib through the Python API's
sink, or through ``smtpproxy record``), the hostile one through the writer
API (``Recorder``) with a live ``Conversation``, as the relay writes them.
"""

from __future__ import annotations

import base64
import datetime as dt
import html.parser
import http.client
import json
import re
import smtplib
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import run_smtpproxy_once, smtpproxy_process
from starlette.testclient import TestClient

import smtpproxy
from smtpproxy.events import Side
from smtpproxy.protocol import Conversation
from smtpproxy.recording import Recorder, new_session_id
from smtpproxy.web.app import WebConfig, create_app
from smtpproxy.web.index import INDEX_NAME

TIMEOUT = 10
HOST = "127.0.0.1:8025"
HOSTILE = "<script>alert(1)</script>\"'\x1b[31m\x07"


class Cells(html.parser.HTMLParser):
    """The list's table as text: one list of cell texts per session row."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[str]] = []
        self._in_row = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "tr" and any(k == "data-session" for k, _ in attrs):
            self._in_row = True
            self.rows.append([])
        elif tag == "td" and self._in_row:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr":
            self._in_row = False

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


NAMES = [
    "start",
    "id",
    "client",
    "upstream",
    "helo",
    "auth_mechanism",
    "auth_user",
    "auth_ok",
    "tls_client",
    "tls_upstream",
    "accepted",
    "rejected",
    "faults",
    "duration",
    "closed_by",
    "reason",
]


def rows_of(page: str) -> list[dict[str, str]]:
    parser = Cells()
    parser.feed(page)
    return [dict(zip(NAMES, cells, strict=True)) for cells in parser.rows]


def column(page: str, name: str) -> list[str]:
    return [row[name] for row in rows_of(page)]


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SMTPPROXY_HOME", str(tmp_path / "ca-home"))
    return tmp_path / "recordings"


def record_mail(folder: Path, sent: dict[str, int]) -> None:
    """One session per user through the embedded sink, sending that many messages."""
    with smtpproxy.sink(recordings=folder) as server:
        for user, count in sent.items():
            with smtplib.SMTP(*server.address, timeout=TIMEOUT) as client:
                client.ehlo(f"host-of-{user}")
                client.login(user, "s3cret")
                for n in range(count):
                    client.sendmail(
                        f"{user}@example.org", ["bob@example.net"], f"Subject: {n}\r\n\r\nx\r\n"
                    )
        server.wait_for_sessions(len(sent), timeout=TIMEOUT)


@pytest.fixture
def client(folder: Path) -> Iterator[TestClient]:
    record_mail(folder, {"ann": 1, "bea": 3, "carl": 0, "dan": 2, "eve": 1})
    config = WebConfig(folder, hosts=frozenset({HOST}), page_size=2)
    with TestClient(create_app(config), base_url=f"http://{HOST}", backend="trio") as client:
        assert client.get(f"/?token={config.token}").status_code == 200
        yield client


def test_the_list_sorts_by_each_column(client: TestClient) -> None:
    everyone = {"sort": "auth_user", "order": "asc"}
    page = client.get("/", params=everyone).text
    assert column(page, "auth_user") == ["ann", "bea"]  # page_size 2
    assert "5 session(s), 1–2 shown" in page
    desc = client.get("/", params={"sort": "auth_user", "order": "desc"}).text
    assert column(desc, "auth_user") == ["eve", "dan"]
    most = client.get("/", params={"sort": "accepted", "order": "desc"}).text
    assert column(most, "accepted") == ["3", "2"]
    helo = client.get("/", params={"sort": "helo", "order": "asc"}).text
    assert column(helo, "helo") == ["host-of-ann", "host-of-bea"]
    for name in NAMES:  # every column sorts, both ways, and says so
        for order in ("asc", "desc"):
            answer = client.get("/", params={"sort": name, "order": order})
            assert answer.status_code == 200
            assert f'aria-sort="{"ascending" if order == "asc" else "descending"}"' in answer.text
            assert len(rows_of(answer.text)) == 2


def test_the_list_filters_by_columns_and_free_text(client: TestClient) -> None:
    busy = client.get("/", params={"accepted": ">1", "sort": "auth_user", "order": "asc"}).text
    assert "2 session(s)" in busy and column(busy, "auth_user") == ["bea", "dan"]
    idle = client.get("/", params={"accepted": "0"}).text
    assert column(idle, "auth_user") == ["carl"]
    exact = client.get("/", params={"auth_user": "=an"}).text  # '=': the whole value
    assert "0 session(s)" in exact
    part = client.get("/", params={"auth_user": "an", "sort": "auth_user", "order": "asc"}).text
    assert column(part, "auth_user") == ["ann", "dan"]
    both = client.get("/", params={"auth_user": "an", "accepted": "2"}).text
    assert column(both, "auth_user") == ["dan"]
    ok = client.get("/", params={"auth_ok": "ok"}).text
    assert "5 session(s)" in ok
    assert "0 session(s)" in client.get("/", params={"auth_ok": "failed"}).text
    assert "0 session(s)" in client.get("/", params={"faults": ">0"}).text
    free = client.get("/", params={"q": "HOST-OF-EVE"}).text  # any text column, any case
    assert column(free, "auth_user") == ["eve"]
    first = column(client.get("/", params={"sort": "start", "order": "asc"}).text, "start")[0]
    later = client.get("/", params={"start": f">{first}"}).text  # dates compare as text
    assert "4 session(s)" in later


def test_a_filter_that_means_nothing_is_one_line(client: TestClient) -> None:
    answer = client.get("/", params={"accepted": "many"})
    assert answer.status_code == 400
    assert "filter accepted: write a number" in answer.text
    assert "Traceback" not in answer.text
    assert client.get("/", params={"auth_ok": "perhaps"}).status_code == 400


def test_pages_and_shareable_links(client: TestClient) -> None:
    query = {"sort": "auth_user", "order": "asc", "auth_user": "a"}  # ann, bea, carl, dan
    first = client.get("/", params=query).text
    assert column(first, "auth_user") == ["ann", "bea"]
    assert "page 1 of 2" in first
    # the next page's link carries the sort and the filter: follow it as a user would
    next_link = re.search(r'href="(\?[^"]*)" rel="next"', first)
    assert next_link is not None
    href = next_link.group(1).replace("&amp;", "&")
    assert "auth_user=a" in href and "sort=auth_user" in href and "page=2" in href
    second = client.get("/" + href).text
    assert column(second, "auth_user") == ["carl", "dan"]
    assert 'rel="next"' not in second and 'rel="prev"' in second
    # a column's heading link keeps the filter, and turns the order round
    heading = re.search(r'href="(\?[^"]*)">user ▲', first)
    assert heading is not None
    assert heading.group(1).replace("&amp;", "&") == "?sort=auth_user&order=desc&auth_user=a"
    # the filter form carries the sort on as hidden fields
    assert '<input type="hidden" name="sort" value="auth_user">' in first
    # a page past the end is empty, not an error; a silly page number is the first
    assert "no sessions match" in client.get("/", params={**query, "page": "9"}).text
    assert column(client.get("/", params={**query, "page": "x"}).text, "auth_user") == [
        "ann",
        "bea",
    ]
    huge = client.get("/", params={**query, "page": str(10**30)})
    assert huge.status_code == 200 and "no sessions match" in huge.text
    # /rows: the same list without the page around it (for the live script)
    rows = client.get("/rows", params={**query, "page": "2"}).text
    assert column(rows, "auth_user") == ["carl", "dan"]
    assert "<form" not in rows and "<html" not in rows


def hostile_recording(folder: Path) -> str:
    """A session whose client, upstream, EHLO name, AUTH user and close
    reason are full of markup, quotes and control characters, written as
    the relay writes one (the Recorder fed by a live Conversation)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    session = new_session_id()
    rec = Recorder.create(
        folder,
        session,
        dt.datetime.now(dt.UTC),
        0.0,
        client=f"{HOSTILE}:25",
        listen="127.0.0.1:2525",
        upstream=f"{HOSTILE}up",
    )
    conv = Conversation()
    plain = base64.b64encode(f"\0{HOSTILE}\0pw".encode()).decode()
    script = [
        (Side.SERVER, b"220 hi\r\n"),
        (Side.CLIENT, f"EHLO {HOSTILE}\r\n".encode()),
        (Side.SERVER, b"250-hi\r\n250 AUTH PLAIN\r\n"),
        (Side.CLIENT, f"AUTH PLAIN {plain}\r\n".encode()),
        (Side.SERVER, b"235 2.7.0 ok\r\n"),
        (Side.CLIENT, b"QUIT\r\n"),
        (Side.SERVER, b"221 bye\r\n"),
    ]
    for n, (side, data) in enumerate(script):
        rec.feed(0.1 * n, side, data, conv.feed(side, data))
    rec.close(1.0, "client", f"ended {HOSTILE}")
    return session


def test_a_hostile_recording_is_shown_escaped(folder: Path) -> None:
    session = hostile_recording(folder)
    config = WebConfig(folder, hosts=frozenset({HOST}))
    with TestClient(create_app(config), base_url=f"http://{HOST}", backend="trio") as client:
        client.get(f"/?token={config.token}")
        for path in ("/", "/rows", f"/?q={HOSTILE[:8]}"):
            page = client.get(path).text
            assert session in page
            assert "<script>alert" not in page  # never raw
            assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
            assert "&#34;&#39;" in page  # the quotes, escaped
            assert "\x1b" not in page and "\x07" not in page
            assert "\\x1b[31m\\x07" in page  # control characters made visible
        row = rows_of(client.get("/").text)[0]
        for name in ("client", "upstream", "helo", "auth_user", "reason"):
            assert "<script>alert(1)</script>" in row[name], name  # the text, read back
        searched = client.get("/", params={"auth_user": "<script>"}).text
        assert "1 session(s)" in searched


def test_the_index_command(folder: Path, tmp_path: Path) -> None:
    record_mail(folder, {"ann": 1, "bea": 0})
    (folder / "20000101T000000000Z-0000beef.jsonl").write_bytes(b"not a recording\x1b[2J\n")
    done = run_smtpproxy_once("index", str(folder), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.strip()
        == f"2 session(s) in the index of {folder}: 2 recording(s) read, 1 unreadable"
    )
    assert "unreadable, left out: 20000101T000000000Z-0000beef.jsonl" in done.stderr
    assert "\x1b" not in done.stderr and "Traceback" not in done.stderr
    assert oct((folder / INDEX_NAME).stat().st_mode & 0o777) == "0o600"
    again = run_smtpproxy_once("index", str(folder), cwd=tmp_path)  # nothing changed
    assert again.stdout.strip().endswith("0 recording(s) read, 1 unreadable")
    (folder / INDEX_NAME).unlink()  # a cache: rebuilt the same
    rebuilt = run_smtpproxy_once("index", str(folder), cwd=tmp_path)
    assert rebuilt.stdout.startswith("2 session(s)")
    missing = run_smtpproxy_once("index", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        f"Error: {tmp_path / 'nowhere'} is not a folder of recordings"
    ]


# -- record --web, as a process ----------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    text: str


def request(
    address: tuple[str, int], path: str, cookie: str = "", host: str = ""
) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection(*address, timeout=TIMEOUT)
    headers = {"Host": host or f"{address[0]}:{address[1]}"}
    if cookie:
        headers["Cookie"] = cookie
    conn.request("GET", path, headers=headers)
    return conn


def get(address: tuple[str, int], path: str, cookie: str = "", host: str = "") -> Answer:
    """A whole answer (not for /events that was let in: it never ends)."""
    conn = request(address, path, cookie, host)
    try:
        response = conn.getresponse()
        return Answer(response.status, response.headers, response.read().decode())
    finally:
        conn.close()


def sse_events(
    response: http.client.HTTPResponse, wanted: int, states: tuple[str, ...] = ("open", "closed")
) -> list[dict[str, str]]:
    """Read ``wanted`` ``session`` events in ``states`` from an open event
    stream, skipping others (bounded by the socket's timeout and a line count)."""
    events: list[dict[str, str]] = []
    kind = ""
    for _ in range(200):
        line = response.readline().decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: ") and kind == "session":
            event = json.loads(line[6:])
            if event["state"] not in states:
                continue
            events.append(event)
            if len(events) == wanted:
                return events
    raise AssertionError(f"only {events} in the stream")


def test_record_web_lists_sessions_live(folder: Path, tmp_path: Path) -> None:
    assert folder == tmp_path / "recordings"  # record's default, in its cwd
    record_mail(folder, {"olga": 0})  # before: indexed when record starts
    args = ["record", "--listen", "127.0.0.1:0", "--web", "127.0.0.1:0"]
    with smtpproxy_process(*args, cwd=tmp_path) as proxy:
        line = proxy._wait(proxy.err, b"?token=", TIMEOUT).decode()
        url = re.search(r"http://127\.0\.0\.1:(\d+)/\?token=(\S+)", line)
        assert url is not None, line
        web = ("127.0.0.1", int(url.group(1)))
        token = url.group(2)
        evil = f"evil.example:{web[1]}"
        # every page needs the token; /events too, and the Host check first
        assert get(web, "/").status == 403
        assert get(web, "/events").status == 403
        assert get(web, f"/events?token={token}", host=evil).status == 421
        entered = get(web, f"/?token={token}")
        assert entered.status == 303
        cookie = entered.headers.get("set-cookie", "").split(";")[0]
        assert cookie.startswith(f"smtpproxy_token_{web[1]}=")
        assert get(web, "/events", cookie, host=evil).status == 421
        page = get(web, "/", cookie)
        assert page.status == 200 and 'data-live="/events"' in page.text
        conn = request(web, "/events", cookie)
        try:
            stream = conn.getresponse()
            assert stream.status == 200
            assert stream.getheader("content-type", "").startswith("text/event-stream")
            assert "default-src 'none'" in stream.getheader("content-security-policy", "")
            assert stream.readline() == b"retry: 2000\n"  # listening from here on
            with smtplib.SMTP(*proxy.address, timeout=TIMEOUT) as client:
                (opened,) = sse_events(stream, 1)  # connected: the recording is open
                assert opened["state"] == "open"
                # listed while it happens
                (now,) = rows_of(get(web, f"/?id={opened['id']}", cookie).text)
                assert now["id"] == opened["id"] and now["reason"] == "in progress"
                client.login("livia", "s3cret")  # after "open": what follows is growth
                # and it grows as it happens: AUTH's user in the row, still open
                (grown,) = sse_events(stream, 1, states=("grow",))
                assert grown["id"] == opened["id"]
                (now,) = rows_of(get(web, f"/?id={opened['id']}", cookie).text)
                assert now["auth_user"] == "livia" and now["reason"] == "in progress"
                client.sendmail(
                    "livia@example.org", ["bob@example.net"], "Subject: hi\r\n\r\nx\r\n"
                )
            (closed,) = sse_events(stream, 1)
        finally:
            conn.close()
        assert closed == {"id": opened["id"], "state": "closed"}
        row, old = rows_of(get(web, "/", cookie).text)
        assert old["auth_user"] == "olga"
        assert row["id"] == opened["id"] and row["auth_user"] == "livia"
        assert row["accepted"] == "1" and row["reason"].endswith("closed the connection")
        fragment = get(web, "/rows?auth_user=livia", cookie).text
        assert column(fragment, "id") == [opened["id"]]
        finished = proxy.finish()
    assert finished.returncode == 0, finished.stderr
    assert "Traceback" not in finished.stderr
    assert "1 session(s), 1 recording(s)" in finished.stderr


def test_smtpproxy_web_serves_a_folder(folder: Path, tmp_path: Path) -> None:
    record_mail(folder, {"ann": 1, "bea": 0})
    with smtpproxy_process("web", str(folder), "--listen", "127.0.0.1:0", cwd=tmp_path) as web:
        assert f"2 session(s) in {folder}/, 2 recording(s) read now" in web.err.decode()
        line = web._wait(web.err, b"?token=", TIMEOUT).decode()
        token = line.rsplit("token=", 1)[1].strip()
        entered = get(web.address, f"/?token={token}&sort=auth_user&order=asc")
        assert entered.status == 303
        cookie = entered.headers.get("set-cookie", "").split(";")[0]
        page = get(web.address, entered.headers["location"], cookie)
        assert column(page.text, "auth_user") == ["ann", "bea"]
        assert "data-live" not in page.text  # a folder as it is: no live updates
        assert get(web.address, "/events", cookie).status == 404
        finished = web.finish()
    assert finished.returncode == 0 and "Traceback" not in finished.stderr


def test_record_web_start_errors(tmp_path: Path) -> None:
    # bound (not listening) on every interface: --web cannot have the port,
    # and a web view off loopback is warned about first
    taken = socket.socket()
    try:
        taken.bind(("0.0.0.0", 0))
        port = taken.getsockname()[1]
        done = run_smtpproxy_once(
            "record", "--listen", "127.0.0.1:0", "--web", f"0.0.0.0:{port}", cwd=tmp_path
        )
    finally:
        taken.close()
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"Error: cannot serve the web view on 0.0.0.0:{port}: ")
    assert lines[-1].endswith("choose another address with --web [HOST:]PORT")
    assert any(line.startswith("warning: the web view listens on 0.0.0.0") for line in lines)
    workers = run_smtpproxy_once(
        "record", "--web", "0", "--workers", "2", "--listen", "127.0.0.1:0", cwd=tmp_path
    )
    assert workers.returncode == 2
    assert "--web serves the pages from the proxy's own process" in workers.stderr
    bad = run_smtpproxy_once("record", "--web", "127.0.0.1:x", cwd=tmp_path)
    assert bad.returncode == 2 and "port must be a number" in bad.stderr
