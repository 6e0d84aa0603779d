"""The web view's routes and defences with the ASGI test client (on trio):
the token, the Host check, the security headers, the sessions list from the
index. Recordings are made by the Python API's sink with smtplib."""

from __future__ import annotations

import smtplib
from collections.abc import Iterator
from pathlib import Path

import pytest
from starlette.testclient import TestClient

import smtpproxy
from smtpproxy.web.app import CSP, WebConfig, create_app
from smtpproxy.web.index import INDEX_NAME, Index

TIMEOUT = 10
HOST = "127.0.0.1:8025"


def record_sessions(folder: Path, *users: str) -> list[smtpproxy.Session]:
    """One session per user through the embedded sink, recorded into ``folder``."""
    with smtpproxy.sink(recordings=folder) as server:
        for user in users:
            with smtplib.SMTP(*server.address, timeout=TIMEOUT) as client:
                client.login(user, "s3cret")
                client.sendmail(
                    f"{user}@example.org", ["bob@example.net"], "Subject: hi\r\n\r\nx\r\n"
                )
        return server.wait_for_sessions(len(users), timeout=TIMEOUT)


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SMTPPROXY_HOME", str(tmp_path / "ca-home"))
    return tmp_path / "recordings"


def client_for(folder: Path) -> tuple[TestClient, WebConfig]:
    config = WebConfig(folder, hosts=frozenset({HOST}))
    return TestClient(create_app(config), base_url=f"http://{HOST}", backend="trio"), config


@pytest.fixture
def web(folder: Path) -> Iterator[tuple[TestClient, WebConfig]]:
    record_sessions(folder, "ann", "carl")
    client, config = client_for(folder)
    with client:
        yield client, config


def test_every_page_needs_the_token(web: tuple[TestClient, WebConfig]) -> None:
    client, config = web
    refused = client.get("/")
    assert refused.status_code == 403
    assert "token" in refused.text
    assert client.get("/?token=wrong").status_code == 403
    entered = client.get(f"/?token={config.token}&q=ann", follow_redirects=False)
    assert entered.status_code == 303
    assert entered.headers["location"] == "/?q=ann"  # the token leaves the URL
    assert "httponly" in entered.headers["set-cookie"].lower()
    assert "samesite=strict" in entered.headers["set-cookie"].lower()
    page = client.get("/?q=ann")  # the cookie from now on
    assert page.status_code == 200
    assert page.headers["content-security-policy"] == CSP
    assert page.headers["x-frame-options"] == "DENY"


def test_a_foreign_host_header_is_refused(web: tuple[TestClient, WebConfig]) -> None:
    client, config = web
    answer = client.get(f"/?token={config.token}", headers={"host": "attacker.example:8025"})
    assert answer.status_code == 421


def test_the_list_filters_and_sorts(web: tuple[TestClient, WebConfig]) -> None:
    client, config = web
    client.get(f"/?token={config.token}")
    both = client.get("/").text
    assert "2 session(s)" in both and "ann" in both and "carl" in both
    only = client.get("/", params={"auth_user": "carl"}).text
    assert "1 session(s)" in only and ">ann<" not in only
    free = client.get("/", params={"q": "ann@"}).text  # free text: no column has it
    assert "0 session(s)" in free
    none = client.get("/", params={"q": "%"}).text  # LIKE's wildcard is a character here
    assert "0 session(s)" in none


def test_the_index_is_a_private_cache(folder: Path) -> None:
    sessions = record_sessions(folder, "ann")
    index = Index(folder)
    assert index.update() == (1, 0)
    assert index.update() == (0, 0)  # unchanged files are not read again
    assert index.file_of(sessions[0].id) == sessions[0].path
    assert index.file_of("../../etc/passwd") is None
    index.close()
    assert oct((folder / INDEX_NAME).stat().st_mode & 0o777) == "0o600"
    (folder / INDEX_NAME).unlink()  # deleting it loses nothing
    rebuilt = Index(folder)
    assert rebuilt.update() == (1, 0)
    assert rebuilt.page().total == 1
    rebuilt.close()
