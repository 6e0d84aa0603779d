"""SASL both ways (issue 13, items 2, 3 and 7): the encoders replay sends
with, the one base64 decoder that never raises, AUTH errors as enum members,
and reprs that hide secrets.

The replay tests drive ``smtpproxy replay`` as users run it against a raw
trio server that offers AUTH and answers with a 334 challenge that is not
valid base64 (RFC 4954 section 4 says the text of a 334 is base64).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path

import pytest
import trio
from conftest import run_smtpproxy_once
from hypothesis import given
from hypothesis import strategies as st
from rawpeers import Peer, RawUpstream

from smtpproxy import auth
from smtpproxy.auth import AuthError, SaslExchange, b64decode
from smtpproxy.events import AuthDecode, AuthResponse, Command, Reply
from smtpproxy.recording import read_recording

USER, PASSWORD = "ann@example.org", "s3cret-Pa55"
#: bound on anything a test waits for
TIMEOUT = 30

# -- the encoders, read back by the decoders -------------------------------------


def test_plain_initial_response_decodes_to_its_parts() -> None:
    payload = auth.plain(USER, PASSWORD, authzid="admin")
    assert base64.b64decode(payload) == f"admin\0{USER}\0{PASSWORD}".encode()
    decoded = SaslExchange("PLAIN").initial(payload.decode())
    assert decoded.error is None
    assert dict(decoded.fields) == {"authzid": "admin", "user": USER, "password": PASSWORD}


def test_login_answers_follow_the_prompts() -> None:
    sasl = SaslExchange("LOGIN")
    sasl.challenge(base64.b64encode(b"Username:").decode())
    assert sasl.response(auth.login(USER).decode()).fields == {"user": USER}
    sasl.challenge(base64.b64encode(b"Password:").decode())
    assert sasl.response(auth.login(PASSWORD).decode()).fields == {"password": PASSWORD}


def test_cram_md5_answer_is_the_rfc_2195_example() -> None:
    """RFC 2195 section 2: user tim, secret tanstaaftanstaaf."""
    challenge = b"<1896.697170952@postoffice.reston.mci.net>"
    answer = auth.cram_md5("tim", "tanstaaftanstaaf", challenge)
    assert answer == b"dGltIGI5MTNhNjAyYzdlZGE3YTQ5NWI0ZTZlNzMzNGQzODkw"
    decoded = SaslExchange("CRAM-MD5").response(answer.decode())
    assert dict(decoded.fields) == {"user": "tim", "digest": "b913a602c7eda7a495b4e6e7334d3890"}


def test_xoauth2_and_oauthbearer_carry_the_user_and_token() -> None:
    token = "ya29.vF9dft4qmTc2Nvb3RlckBhbHRhdmlzdGEuY29tCg"
    x = auth.xoauth2(USER, token)
    assert base64.b64decode(x) == f"user={USER}\x01auth=Bearer {token}\x01\x01".encode()
    assert dict(SaslExchange("XOAUTH2").initial(x.decode()).fields) == {
        "user": USER,
        "scheme": "Bearer",
        "token": token,
    }
    # RFC 7628 section 4.1, with a comma in the user name escaped (RFC 5801)
    o = auth.oauthbearer("a,b=c@example.com", token, host="server.example.com", port=587)
    assert base64.b64decode(o) == (
        b"n,a=a=2Cb=3Dc@example.com,\x01host=server.example.com\x01port=587\x01auth=Bearer "
        + token.encode()
        + b"\x01\x01"
    )
    assert dict(SaslExchange("OAUTHBEARER").initial(o.decode()).fields) == {
        "user": "a,b=c@example.com",
        "host": "server.example.com",
        "port": "587",
        "scheme": "Bearer",
        "token": token,
    }


def test_client_response_answers_each_mechanism_and_refuses_a_bad_challenge() -> None:
    cram = base64.b64encode(b"<1.2@mx.test>").decode()
    digest = hmac.new(PASSWORD.encode(), b"<1.2@mx.test>", hashlib.md5).hexdigest()
    assert (
        base64.b64decode(auth.client_response("CRAM-MD5", USER, PASSWORD, cram))
        == f"{USER} {digest}".encode()
    )
    assert auth.client_response("CRAM-MD5", USER, PASSWORD, cram[:-1]) is AuthError.BAD_BASE64
    assert auth.client_response("CRAM-MD5", USER, PASSWORD, None) is AuthError.NO_CHALLENGE
    assert auth.client_response("LOGIN", USER, PASSWORD, None) == auth.login(USER)
    assert auth.client_response("LOGIN", USER, PASSWORD, "UGFzc3dvcmQ6") == auth.login(PASSWORD)
    assert auth.client_response("LOGIN", USER, PASSWORD, "VXNlcm5hbWU") is AuthError.BAD_BASE64
    assert auth.client_response("PLAIN", USER, PASSWORD, None) == auth.plain(USER, PASSWORD)
    assert auth.client_response("PLAIN", USER, PASSWORD, "") == auth.plain(USER, PASSWORD)
    # an OAuth error challenge (RFC 7628 section 3.2.3) gets the dummy answer
    error = base64.b64encode(b'{"status":"invalid_token"}').decode()
    assert auth.client_response("OAUTHBEARER", USER, "tok", error) == base64.b64encode(b"\x01")
    assert auth.client_response("XOAUTH2", USER, "tok", error) == b""
    assert auth.client_response("SCRAM-SHA-1", USER, PASSWORD, None) is AuthError.UNKNOWN_MECHANISM


@given(st.text(max_size=40))
def test_the_base64_decoder_never_raises(text: str) -> None:
    data = b64decode(text)
    assert data is None or isinstance(data, bytes)
    decoded = SaslExchange("CRAM-MD5").challenge(text)
    assert decoded.error in (None, AuthError.BAD_BASE64)


def test_auth_errors_are_enum_members_written_as_the_same_strings() -> None:
    bad = SaslExchange("PLAIN").initial("%%%")
    assert bad.error is AuthError.BAD_BASE64
    assert (
        SaslExchange("PLAIN").initial(base64.b64encode(b"x").decode()).error
        is AuthError.PLAIN_SHAPE
    )
    assert (
        SaslExchange("CRAM-MD5").response(base64.b64encode(b"x").decode()).error
        is AuthError.CRAM_SHAPE
    )
    # the recording's strings do not change (docs/recording-format.md)
    assert [
        e.value for e in (AuthError.BAD_BASE64, AuthError.PLAIN_SHAPE, AuthError.CRAM_SHAPE)
    ] == [
        "not valid base64",
        "PLAIN wants authzid NUL user NUL password",
        "CRAM-MD5 wants 'user digest'",
    ]
    # a string read back from a file becomes the member
    assert AuthDecode("PLAIN", {}, "not valid base64").error is AuthError.BAD_BASE64  # type: ignore[arg-type]


# -- reprs hide secrets ------------------------------------------------------------


def test_reprs_of_auth_events_hide_passwords_tokens_and_digests() -> None:
    plain = SaslExchange("PLAIN").initial(auth.plain(USER, PASSWORD).decode())
    cram = SaslExchange("CRAM-MD5").response(
        auth.cram_md5(USER, PASSWORD, b"<1.2@mx.test>").decode()
    )
    oauth = SaslExchange("XOAUTH2").initial(auth.xoauth2(USER, "tok-en-123").decode())
    digest = hmac.new(PASSWORD.encode(), b"<1.2@mx.test>", hashlib.md5).hexdigest()
    events = [
        plain,
        cram,
        oauth,
        Command(b"AUTH PLAIN x\r\n", "AUTH", "PLAIN x", auth=plain),
        AuthResponse(b"x\r\n", "x", auth=cram),
        Reply(b"334 x\r\n", 334, ("x",), auth=oauth),
    ]
    for ev in events:
        shown = repr(ev)
        for secret in (PASSWORD, digest, "tok-en-123"):
            assert secret not in shown, shown
        assert USER in shown, shown  # user names stay, as --redact keeps them
    assert "'password': '***'" in repr(plain)
    assert str(plain) == repr(plain)


# -- replay against a server whose challenge is not base64 ------------------------------


def input_line(t: float, side: str, data: bytes) -> str:
    return json.dumps([t, side, data.decode("utf-8")])


def write_recording(path: Path, reads: list[tuple[str, bytes]]) -> Path:
    """A format 2 recording of these reads (docs/recording-format.md)."""
    header = {
        "format": "smtpproxy-recording",
        "version": 2,
        "session": "5a51bad0",
        "start": "2026-11-29T06:39:16.599Z",
        "client": "127.0.0.1:40000",
        "listen": "127.0.0.1:2525",
        "upstream": "127.0.0.1:25",
    }
    lines = [json.dumps(header)]
    lines += [input_line(n / 1000, side, data) for n, (side, data) in enumerate(reads, 1)]
    close = {
        "t": (len(reads) + 1) / 1000,
        "type": "close",
        "by": "client",
        "reason": "client closed the connection",
    }
    lines.append(json.dumps(close))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


RECORDED_CHALLENGE = {"CRAM-MD5": _b64("<4711.1@mx.test>"), "LOGIN": _b64("Username:")}
CRAM_ANSWER = _b64(
    f"{USER} " + hmac.new(PASSWORD.encode(), b"<4711.1@mx.test>", hashlib.md5).hexdigest()
)


def auth_recording(path: Path, mechanism: str) -> Path:
    """A session that authenticated with ``mechanism``, then sent MAIL and QUIT."""
    if mechanism == "CRAM-MD5":
        answers = [("c", CRAM_ANSWER + b"\r\n")]
    else:
        answers = [
            ("c", _b64(USER) + b"\r\n"),
            ("s", b"334 " + _b64("Password:") + b"\r\n"),
            ("c", _b64(PASSWORD) + b"\r\n"),
        ]
    return write_recording(
        path,
        [
            ("s", b"220 mx.test ESMTP\r\n"),
            ("c", b"EHLO client.example\r\n"),
            ("s", b"250-mx.test\r\n250-AUTH CRAM-MD5 LOGIN\r\n250 ENHANCEDSTATUSCODES\r\n"),
            ("c", f"AUTH {mechanism}\r\n".encode()),
            ("s", b"334 " + RECORDED_CHALLENGE[mechanism] + b"\r\n"),
            *answers,
            ("s", b"235 2.7.0 Authentication successful\r\n"),
            ("c", f"MAIL FROM:<{USER}>\r\n".encode()),
            ("s", b"250 2.1.0 ok\r\n"),
            ("c", b"QUIT\r\n"),
            ("s", b"221 2.0.0 bye\r\n"),
        ],
    )


async def bad_challenge_server(upstream: RawUpstream, challenge: bytes, got: list[bytes]) -> None:
    """One session of a server that offers AUTH CRAM-MD5 and LOGIN and
    answers AUTH with ``334 <challenge>``; in the exchange ``*`` cancels
    (501, RFC 4954 section 4) and any other line is refused (535). It keeps
    every line it reads and ends at QUIT or when the client closes."""
    peer: Peer = await upstream.accept()
    await peer.send(b"220 raw.test ESMTP\r\n")
    in_auth = False
    try:
        while True:
            line = await peer.until(b"\r\n")
            got.append(line)
            verb = line.split()[0].upper() if line.split() else b""
            if in_auth:
                in_auth = False
                cancelled = line == b"*\r\n"
                await peer.send(
                    b"501 5.7.0 cancelled\r\n" if cancelled else b"535 5.7.8 bad credentials\r\n"
                )
            elif verb == b"EHLO":
                await peer.send(
                    b"250-raw.test\r\n250-AUTH CRAM-MD5 LOGIN\r\n250 ENHANCEDSTATUSCODES\r\n"
                )
            elif verb == b"AUTH":
                in_auth = True
                await peer.send(b"334 " + challenge + b"\r\n")
            elif verb == b"QUIT":
                await peer.send(b"221 2.0.0 bye\r\n")
                return
            else:
                await peer.send(b"250 2.1.0 ok\r\n")
    except AssertionError:
        if not peer.eof:
            raise  # the client closed the connection: the session is over


@pytest.mark.parametrize(
    ("mechanism", "challenge", "credentials"),
    [
        pytest.param(
            "CRAM-MD5",
            _b64("<4711.2@raw.test>").rstrip(b"="),
            ["--password", PASSWORD],
            id="cram-md5-unpadded",
        ),
        pytest.param(
            "CRAM-MD5", b"<4711.2@raw.test>", ["--password", PASSWORD], id="cram-md5-not-base64"
        ),
        pytest.param(
            "LOGIN",
            b"VXNlcm5hbWU",
            ["--user", USER, "--password", PASSWORD],
            id="login-new-credentials",
        ),
        pytest.param("LOGIN", b"VXNlcm5hbWU", [], id="login-as-recorded"),
    ],
)
async def test_replay_against_a_challenge_that_is_not_base64_reports_it_and_cancels(
    nursery: trio.Nursery, tmp_path: Path, mechanism: str, challenge: bytes, credentials: list[str]
) -> None:
    rec = auth_recording(tmp_path / "auth.jsonl", mechanism)
    upstream = await RawUpstream().start(nursery)
    got: list[bytes] = []
    nursery.start_soon(bad_challenge_server, upstream, challenge, got)
    target = f"127.0.0.1:{upstream.address[1]}"

    done = await trio.to_thread.run_sync(
        lambda: run_smtpproxy_once(
            "replay",
            str(rec),
            "--to",
            target,
            "--timeout",
            "5",
            "--save",
            str(tmp_path / "out"),
            *credentials,
            cwd=tmp_path,
            timeout=TIMEOUT,
        )
    )

    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    # the server got the AUTH line, then the cancel: no answer to the bad
    # challenge, no credentials; the session went on and ended with QUIT
    assert got == [
        b"EHLO client.example\r\n",
        f"AUTH {mechanism}\r\n".encode(),
        b"*\r\n",
        f"MAIL FROM:<{USER}>\r\n".encode(),
        b"QUIT\r\n",
    ]
    recorded = RECORDED_CHALLENGE[mechanism].decode()
    i = lines.index(f"-> AUTH {mechanism}")
    assert lines[i : i + 6] == [
        f"-> AUTH {mechanism}",
        f"<- 334 {challenge.decode()}",
        f"!! differs: the target's challenge is not valid base64 (RFC 4954 section 4) (recorded: 334 {recorded})",
        "-> *",
        "<- 501 5.7.0 cancelled",
        "== cancelled: the target's challenge is not valid base64",
    ]
    not_sent = [line for line in lines if line.startswith("   (not sent) ")]
    assert len(not_sent) == (1 if mechanism == "CRAM-MD5" else 2), lines
    assert "-> MAIL FROM:<ann@example.org>" in lines
    # the saved replay holds the target's challenge flagged as undecodable
    (saved,) = (tmp_path / "out").glob("*.jsonl")
    flagged = [
        e.auth.error
        for e in read_recording(saved).events()
        if isinstance(e, Reply) and e.auth is not None
    ]
    assert flagged == [AuthError.BAD_BASE64]
