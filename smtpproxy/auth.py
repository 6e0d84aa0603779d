"""SASL both ways for SMTP AUTH (RFC 4954): decoders for what a client and a
server said, encoders for what a client sends.

Nothing here does I/O or raises on bad input: a payload that is not valid
base64, or does not have its mechanism's shape, gives an ``AuthDecode`` whose
``error`` is an ``AuthError`` member saying so. One ``SaslExchange`` follows
one AUTH command from its initial response through the server's challenges
and the client's answers. The encoders (``plain``, ``login``, ``cram_md5``,
``xoauth2``, ``oauthbearer`` and ``client_response``, which picks one) make
the base64 payloads replay sends with new credentials.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Iterable
from dataclasses import replace

from .events import (
    SECRET_FIELDS,
    AuthDecode,
    AuthError,
    AuthResponse,
    Command,
    Event,
    Note,
    NoteKind,
    Opaque,
    OpaqueReason,
    Reply,
    Side,
)

__all__ = [
    "KNOWN_MECHANISMS",
    "LOGIN_PROMPTS",
    "REDACTED",
    "SECRET_FIELDS",
    "AuthError",
    "Redactor",
    "SaslExchange",
    "b64decode",
    "b64decode_text",
    "client_response",
    "cram_md5",
    "cram_md5_digest",
    "credentials",
    "login",
    "oauthbearer",
    "plain",
    "redact",
    "stray_secret",
    "xoauth2",
]


def b64decode(payload: str) -> bytes | None:
    """Decode strict base64, or None when it is not base64; never raises.
    ``=`` alone is the empty payload (RFC 4954 section 4). The one base64
    decoder for SASL payloads: the observer, diff and replay all use it."""
    payload = payload.strip()
    if payload == "=":
        return b""
    try:
        return binascii.a2b_base64(payload.encode("ascii"), strict_mode=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return None


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="backslashreplace")


def b64decode_text(payload: str) -> str | None:
    """The text a base64 payload stands for, or None if it is not base64."""
    data = b64decode(payload)
    return None if data is None else _text(data)


# -- encoders: what a client sends --------------------------------------------------


def plain(user: str, password: str, authzid: str = "") -> bytes:
    """The PLAIN initial response, ``authzid NUL authcid NUL passwd`` in
    base64 (RFC 4616 section 2)."""
    return base64.b64encode(f"{authzid}\0{user}\0{password}".encode())


def login(answer: str) -> bytes:
    """A LOGIN answer (the user name or the password) in base64; LOGIN is
    the de facto mechanism of draft-murchison-sasl-login."""
    return base64.b64encode(answer.encode())


def cram_md5(user: str, password: str, challenge: bytes) -> bytes:
    """The CRAM-MD5 answer to a decoded challenge: ``user SP digest``, the
    digest being HMAC-MD5 of the challenge keyed with the password, in
    lower-case hex (RFC 2195 section 2), in base64."""
    return base64.b64encode(f"{user} {cram_md5_digest(password, challenge)}".encode())


def cram_md5_digest(password: str, challenge: bytes) -> str:
    """HMAC-MD5 of a decoded CRAM-MD5 challenge keyed with the password, in
    lower-case hex (RFC 2195 section 2): what a server checks."""
    return hmac.new(password.encode(), challenge, hashlib.md5).hexdigest()


def credentials(auths: Iterable[AuthDecode | None]) -> dict[str, str]:
    """The user and the secrets (password, token, digest) a SASL exchange
    carried, merged over its decoded steps (the first value of each wins)."""
    out: dict[str, str] = {}
    for auth in auths:
        if auth is None:
            continue
        for name, value in auth.fields.items():
            if name == "user" or name in SECRET_FIELDS:
                out.setdefault(name, value)
    return out


#: the LOGIN mechanism's prompts, base64 ("Username:", "Password:"), as
#: servers send them (draft-murchison-sasl-login section 2)
LOGIN_PROMPTS = ("VXNlcm5hbWU6", "UGFzc3dvcmQ6")


def xoauth2(user: str, token: str) -> bytes:
    """The XOAUTH2 initial response, ``user=U ^A auth=Bearer T ^A ^A`` in
    base64 (Google's XOAUTH2 protocol, the model of RFC 7628)."""
    return base64.b64encode(f"user={user}\x01auth=Bearer {token}\x01\x01".encode())


def oauthbearer(user: str, token: str, host: str | None = None, port: int | None = None) -> bytes:
    """The OAUTHBEARER initial response (RFC 7628 section 3.1): a GS2
    header naming the user (``,`` and ``=`` escaped, RFC 5801 section 4),
    then ``host``, ``port`` and ``auth=Bearer T`` as ^A-separated pairs."""
    saslname = user.replace("=", "=3D").replace(",", "=2C")
    pairs = f"host={host}\x01" if host else ""
    pairs += f"port={port}\x01" if port is not None else ""
    pairs += f"auth=Bearer {token}\x01"
    return base64.b64encode(f"n,a={saslname},\x01{pairs}\x01".encode())


def client_response(
    mechanism: str, user: str, password: str, challenge: str | None
) -> bytes | AuthError:
    """What a client with these credentials sends next in an AUTH exchange,
    as the base64 payload of the line: the initial response when
    ``challenge`` is None, else the answer to the text of a 334 reply.
    Returns the ``AuthError`` that keeps it from answering instead: a
    challenge that is not base64 (RFC 4954 section 4), CRAM-MD5 without a
    challenge, a mechanism it has no encoder for.

    LOGIN answers the user name first and the password to a prompt that
    says "pass"; an OAuth error challenge (JSON) gets the dummy answer
    that ends the exchange (RFC 7628 section 3.2.3)."""
    mech = mechanism.upper()
    if mech not in KNOWN_MECHANISMS:
        return AuthError.UNKNOWN_MECHANISM
    said = None if challenge is None else b64decode(challenge)
    if challenge is not None and said is None:
        return AuthError.BAD_BASE64
    if mech == "PLAIN":
        return plain(user, password)
    if mech == "LOGIN":
        wants_password = said is not None and b"pass" in said.lower()
        return login(password if wants_password else user)
    if mech == "CRAM-MD5":
        if said is None:
            return AuthError.NO_CHALLENGE
        return cram_md5(user, password, said)
    if said and said.lstrip().startswith(b"{"):
        return base64.b64encode(b"\x01") if mech == "OAUTHBEARER" else b""
    if mech == "XOAUTH2":
        return xoauth2(user, password)
    return oauthbearer(user, password)


def _bearer(kvpairs: list[bytes]) -> dict[str, str]:
    """Pick ``auth=Bearer <token>`` and the other key=value pairs of an OAuth payload."""
    out: dict[str, str] = {}
    for pair in kvpairs:
        if not pair:
            continue
        key, sep, value = pair.partition(b"=")
        if not sep:
            continue
        k = _text(key).strip().lower()
        v = _text(value)
        if k == "auth":
            scheme, _, token = v.partition(" ")
            out["scheme"] = scheme
            out["token"] = token
        elif k in ("user", "host", "port"):
            out[k] = v
    return out


class SaslExchange:
    """The decoding state of one AUTH exchange.

    ``user`` is the best knowledge of the authentication identity so far.
    """

    def __init__(self, mechanism: str) -> None:
        self.mechanism = mechanism.upper()
        self.user: str | None = None
        self._login_next = "user"  # LOGIN: what the next client answer holds

    def _decode(self, payload: str) -> tuple[bytes | None, AuthDecode | None]:
        data = b64decode(payload)
        if data is None:
            return None, AuthDecode(self.mechanism, {}, AuthError.BAD_BASE64)
        return data, None

    def initial(self, payload: str) -> AuthDecode:
        """The initial response given on the AUTH command line."""
        return self.response(payload)

    def challenge(self, payload: str) -> AuthDecode:
        """A server challenge: the text of a 334 reply."""
        data, bad = self._decode(payload)
        if data is None:
            assert bad is not None
            return bad
        text = _text(data)
        if self.mechanism == "LOGIN":
            low = text.lower()
            if "pass" in low:
                self._login_next = "password"
            elif "user" in low or "name" in low:
                self._login_next = "user"
        if self.mechanism in ("XOAUTH2", "OAUTHBEARER") and text.startswith("{"):
            return AuthDecode(self.mechanism, {"error": text})
        return AuthDecode(self.mechanism, {"challenge": text})

    def response(self, payload: str) -> AuthDecode:
        """A client answer: the initial response or a line after a 334."""
        data, bad = self._decode(payload)
        if data is None:
            assert bad is not None
            return bad
        mech = self.mechanism
        if mech == "PLAIN":
            parts = data.split(b"\x00")
            if len(parts) != 3:
                return AuthDecode(mech, {"text": _text(data)}, AuthError.PLAIN_SHAPE)
            authzid, user, password = (_text(p) for p in parts)
            self.user = user
            fields = {"user": user, "password": password}
            if authzid:
                fields["authzid"] = authzid
            return AuthDecode(mech, fields)
        if mech == "LOGIN":
            key = self._login_next
            self._login_next = "password"
            if key == "user":
                self.user = _text(data)
            return AuthDecode(mech, {key: _text(data)})
        if mech == "CRAM-MD5":
            user, sep, digest = _text(data).rpartition(" ")
            if not sep:
                return AuthDecode(mech, {"text": _text(data)}, AuthError.CRAM_SHAPE)
            self.user = user
            return AuthDecode(mech, {"user": user, "digest": digest})
        if mech == "XOAUTH2":
            if not data:
                return AuthDecode(mech, {})
            fields = _bearer(data.split(b"\x01"))
            if "user" in fields:
                self.user = fields["user"]
            return AuthDecode(mech, fields)
        if mech == "OAUTHBEARER":
            if data in (b"", b"\x01"):
                return AuthDecode(mech, {})
            _, _, after_gs2 = data.partition(b",")  # the GS2 header (RFC 5801)
            gs2_authzid, _, kvpairs = after_gs2.partition(b",")
            fields = _bearer(kvpairs.split(b"\x01"))
            if gs2_authzid.startswith(b"a="):
                fields["user"] = _text(gs2_authzid[2:]).replace("=2C", ",").replace("=3D", "=")
                self.user = fields["user"]
            return AuthDecode(mech, fields)
        return AuthDecode(mech, {"text": _text(data)})


#: What stands in for a secret in a redacted recording or transcript.
REDACTED = "<redacted>"


#: Mechanisms whose payloads this module knows field by field.
KNOWN_MECHANISMS = frozenset({"PLAIN", "LOGIN", "CRAM-MD5", "XOAUTH2", "OAUTHBEARER"})
_SMTP_VERBS = frozenset(
    [
        "HELO",
        "EHLO",
        "MAIL",
        "RCPT",
        "DATA",
        "BDAT",
        "RSET",
        "NOOP",
        "QUIT",
        "VRFY",
        "EXPN",
        "HELP",
        "AUTH",
        "STARTTLS",
        "ETRN",
        "TURN",
        "ATRN",
    ]
)


def stray_secret(cmd: Command) -> bool:
    """A command line that is likely a SASL answer the observer did not read
    as one (sent after an AUTH the server refused, or a malformed AUTH): no
    SMTP verb, and base64 or an AUTH-like verb. Whoever shows it hides it:
    the redactor, the web view."""
    return (
        cmd.auth is None
        and cmd.verb not in _SMTP_VERBS
        and (cmd.verb.startswith("AUTH") or _looks_like_sasl(cmd.raw))
    )


def _looks_like_sasl(line: bytes) -> bool:
    text = line.strip()
    if len(text) < 4 or b" " in text:
        return False
    return b64decode(text.decode("ascii", "replace")) is not None


#: An AUTH line the observer reads cleanly: the verb, one space, a mechanism
#: name (RFC 4422 section 3.1), optionally one space and a base64 initial
#: response or ``=`` (RFC 4954 section 4). Servers also take other
#: whitespace (Postfix any, OpenSMTPD and aiosmtpd a tab between the
#: arguments: docs/interop.md); such a line is redacted whole.
_CLEAN_AUTH = re.compile(
    rb"AUTH [A-Za-z0-9_-]{1,20}(?: (?:[A-Za-z0-9+/]+={0,2}|=))?\r?\n?", re.IGNORECASE
)


#: A run of characters a quoted secret is made of (base64, and the usual
#: characters of passwords and tokens).
_TOKEN = re.compile(r"[A-Za-z0-9+/=._~-]{6,}")


class Redactor:
    """Takes passwords, tokens and CRAM-MD5 digests out of one session's
    events (``--redact``), in the decoded fields and in the raw bytes alike
    (the raw line would give the secret back by base64-decoding it). User
    names stay. A redacted event gets the ``redacted`` flag, so rebuilding
    the byte stream knows to leave it out.

    Erring on the side of secrecy: every client payload of a mechanism not
    known field by field (SCRAM, NTLM, DIGEST-MD5...) is removed whole; so is
    an AUTH line not read cleanly (other whitespace, extra words), a line read
    as an unknown command that is base64 (a SASL answer pipelined after an
    AUTH the server refused), and any client bytes the observer could not
    read (except TLS records).

    It keeps state for the session, because other events quote a redacted
    line: the reply to it names its verb (for a base64 line read as a
    command, the line itself, upper-cased), and a server may echo the
    argument it refused (OpenSMTPD's ``504 ... AUTH method "..." not
    supported``). Such fields are redacted too."""

    def __init__(self) -> None:
        self._verbs: set[str] = set()
        self._secrets: list[str] = []

    def __call__(self, ev: Event) -> Event:
        if isinstance(ev, Opaque) and ev.side is Side.CLIENT and ev.reason != OpaqueReason.TLS:
            return Note(
                Side.CLIENT,
                NoteKind.REDACTED,
                f"{len(ev.raw)} octets the observer could not read ({ev.reason}), redacted",
            )
        if isinstance(ev, Reply):
            return self._reply(ev)
        if isinstance(ev, Command):
            if ev.verb == "AUTH" and not _CLEAN_AUTH.fullmatch(ev.raw):
                return self._whole_auth(ev)
            if stray_secret(ev):
                self._remember(ev.verb, _words(ev.raw))
                return replace(
                    ev,
                    raw=f"{REDACTED}\r\n".encode(),
                    verb=REDACTED.upper(),
                    arg="",
                    flags=(*ev.flags, "redacted"),
                )
        if not isinstance(ev, (Command, AuthResponse)) or ev.auth is None:
            return ev
        unknown = ev.auth.mechanism not in KNOWN_MECHANISMS
        secret = SECRET_FIELDS.intersection(ev.auth.fields)
        if not secret and not ev.auth.error and not unknown:
            return ev
        payload = _words(ev.raw)[2:] if isinstance(ev, Command) else _words(ev.raw)
        self._remember(None, [*payload, *_secret_values(ev.auth)])
        auth = _redacted_auth(ev.auth)
        flags = (*ev.flags, "redacted")
        if isinstance(ev, Command):
            head = f"{ev.verb} {ev.auth.mechanism} {REDACTED}\r\n".encode()
            return replace(
                ev, raw=head, arg=f"{ev.auth.mechanism} {REDACTED}", auth=auth, flags=flags
            )
        return replace(ev, raw=f"{REDACTED}\r\n".encode(), text=REDACTED, auth=auth, flags=flags)

    def _whole_auth(self, ev: Command) -> Event:
        """An AUTH line not read cleanly: nothing of its argument is kept."""
        self._remember(None, [*_words(ev.raw)[2:], ev.arg, *_secret_values(ev.auth)])
        auth = _redacted_auth(ev.auth) if ev.auth is not None else None
        return replace(
            ev,
            raw=f"AUTH {REDACTED}\r\n".encode(),
            arg=REDACTED,
            auth=auth,
            flags=(*ev.flags, "redacted"),
        )

    def _remember(self, verb: str | None, secrets: Iterable[str]) -> None:
        """A redacted line: its verb (what the reply to it will name) and the
        secrets a server may echo (payloads and decoded secrets)."""
        if verb is not None:
            self._verbs.add(verb)
        for word in secrets:
            word = word.strip()
            if len(word) >= 4 and word not in self._secrets and len(self._secrets) < 64:
                self._secrets.append(word)

    def _scrub(self, text: str) -> str:
        """``text`` with every quote of a remembered secret redacted: the
        whole secret in any letter case, and any run of 6 or more of its
        characters (a server that echoes the first 20 octets of a line it did
        not know, as the embedded sink does, quotes a secret's prefix)."""
        folded = [s.casefold() for s in self._secrets]
        for secret in self._secrets:
            text = re.sub(re.escape(secret), REDACTED, text, flags=re.IGNORECASE)

        def quote(m: re.Match[str]) -> str:
            word = m.group().casefold()
            return REDACTED if any(word in s for s in folded) else m.group()

        return _TOKEN.sub(quote, text)

    def _reply(self, ev: Reply) -> Event:
        command = ev.command
        if command is not None and command in self._verbs:
            command = REDACTED.upper()
        raw = ev.raw
        if self._secrets:
            text = raw.decode("utf-8", "replace")
            scrubbed = self._scrub(text)
            if scrubbed != text:
                raw = scrubbed.encode("utf-8")
        if raw is ev.raw:
            # only the field naming the command changed: the bytes are the
            # server's as sent, so ``show --raw`` keeps them
            return ev if command == ev.command else replace(ev, command=command)
        lines = tuple(line[4:] for line in raw.decode("utf-8", "replace").splitlines())
        return replace(ev, raw=raw, command=command, lines=lines, flags=(*ev.flags, "redacted"))


def _words(raw: bytes) -> list[str]:
    return raw.decode("utf-8", "replace").split()


def _secret_values(auth: AuthDecode | None) -> list[str]:
    if auth is None:
        return []
    return [v for k, v in auth.fields.items() if k in SECRET_FIELDS or k == "text"]


def _redacted_auth(auth: AuthDecode) -> AuthDecode:
    unknown = auth.mechanism not in KNOWN_MECHANISMS
    fields = {k: (REDACTED if k in SECRET_FIELDS or unknown else v) for k, v in auth.fields.items()}
    if "text" in fields:
        fields["text"] = REDACTED
    return AuthDecode(auth.mechanism, fields, auth.error)


def redact(ev: Event) -> Event:
    """One event redacted on its own (``Redactor`` redacts a session, and
    with it the fields of later events that quote a redacted line)."""
    return Redactor()(ev)
