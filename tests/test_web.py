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


def test_the_token_redirect_keeps_the_query_as_given(web: tuple[TestClient, WebConfig]) -> None:
    client, config = web
    entered = client.get(
        f"/?token={config.token}&q=a%26b%3Dc&auth_user=%23x", follow_redirects=False
    )
    assert entered.headers["location"] == "/?q=a%26b%3Dc&auth_user=%23x"


def test_an_unspecified_address_is_refused(tmp_path: Path) -> None:
    from conftest import run_smtpproxy_once

    done = run_smtpproxy_once("web", str(tmp_path), "--listen", "0.0.0.0:0", cwd=tmp_path)
    assert done.returncode == 1
    assert "needs the address browsers will use" in done.stderr
    assert "Traceback" not in done.stderr


async def test_an_index_that_cannot_be_written_does_not_stop_the_live_view(
    folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import trio

    from smtpproxy.web.live import Live

    (session,) = await trio.to_thread.run_sync(record_sessions, folder, "ann")
    index = Index(folder)
    live = Live(index)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(live.run)
        await trio.sleep(0.2)
        index.db.close()  # as a full disk or a read-only folder would: writes fail
        live.opened("0123abcd", session.path)
        live.ended("0123abcd", session.path)
        with trio.fail_after(5):
            while "cannot be written" not in capsys.readouterr().err:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()  # still running: nothing was raised


def test_a_sasl_answer_read_as_a_command_is_not_shown(folder: Path) -> None:
    """AUTH refused (here by a fault rule), then the client sends its base64
    answer anyway: the observer reads it as a command. The diagram hides it
    and the reply that quotes it, as the redactor would."""
    import base64

    answer = base64.b64encode(b"\0ann\0hunter2secret").decode()
    with smtpproxy.sink(recordings=folder, faults=["auth: 504 5.5.4 not here"]) as server:
        with smtplib.SMTP(*server.address, timeout=TIMEOUT) as client:
            client.ehlo()
            assert client.docmd("AUTH", "PLAIN")[0] == 504
            assert client.docmd(answer)[0] == 500  # the sink: an unknown command
        (session,) = server.wait_for_sessions(1, timeout=TIMEOUT)
    client_, config = client_for(folder)
    with client_:
        client_.get(f"/?token={config.token}")
        html = client_.get(f"/session/{session.id}").text
    assert "looks like a SASL answer" in html
    assert answer[:8] not in html and answer[:8].upper() not in html


def test_copies_of_a_recording_are_listed_both(folder: Path) -> None:
    (session,) = record_sessions(folder, "ann")
    copy = folder / session.path.name.replace(".jsonl", "-copy.jsonl")
    copy.write_bytes(session.path.read_bytes())
    index = Index(folder)
    assert index.update() == (2, 0)
    assert index.update() == (0, 0)  # stable: neither copy evicts the other
    assert index.page().total == 2
    assert index.file_of(session.id) == min(session.path, copy)
    index.close()
