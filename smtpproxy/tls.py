"""TLS for the proxy: the local CA, leaf certificates, SSL contexts, the
handshake every leg shakes (``handshake``), and the facts of a finished one.

The CA is made once with the ``cryptography`` package in ``$SMTPPROXY_HOME``
(default ``~/.smtpproxy``; folder 0700, key 0600), like mitmproxy's
``~/.mitmproxy``. Leaf certificates for the names clients ask for (SNI) are
minted on demand, all with one leaf key, and cached; clients choose those
names, so both caches are bounded (least recently used goes first). A
``tls: cert KIND`` fault rule (docs/faults.md) has the same minter spoil a
leaf one way (``BAD_CERTS``), so that a client's verification fails as it
would against a broken server.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import ipaddress
import math
import os
import ssl
import stat
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .net import is_ip, tls_reason

__all__ = [
    "BAD_CERTS",
    "CertificateAuthority",
    "HandshakeFailed",
    "ServerContexts",
    "TlsFailure",
    "bad_cert_words",
    "client_context",
    "default_home",
    "describe_certificate",
    "handshake",
    "private_keylog",
]

CA_CERT = "smtpproxy-ca.pem"
CA_KEY = "smtpproxy-ca-key.pem"
_LEAF_DAYS = 397  # the longest validity browsers and Apple clients accept
#: leaf certificates the CA keeps, by their names (each about 3 KB of PEM)
MAX_LEAVES = 256
#: SSL contexts kept for SNI names; with a key log each holds the file open
MAX_CONTEXTS = 64
#: the ways a ``tls: cert`` fault spoils a leaf (faults.CERT_KINDS says the same)
BAD_CERTS = ("expired", "wrong-name", "self-signed")
#: the only name a ``wrong-name`` leaf is for (.invalid: RFC 2606 section 2)
WRONG_NAME = "wrong-name.smtpproxy.invalid"
#: contexts kept for spoilt leaves: one per kind and SNI name, fewer than
#: MAX_CONTEXTS since only a fault rule makes them
MAX_BAD_CONTEXTS = 16


class TlsFailure(Exception):
    """A TLS problem the user can fix; the message says how."""


def default_home() -> Path:
    home = os.environ.get("SMTPPROXY_HOME")
    return Path(home) if home else Path.home() / ".smtpproxy"


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, 0o600)


def _make_private(path: Path, mode: int, why: str) -> str | None:
    """Take group and other access away from ``path`` (to ``mode``) if it
    has any; a line saying so, or warning when it is not ours to change."""
    info = path.stat()
    have = stat.S_IMODE(info.st_mode)
    if not have & 0o077:
        return None
    if info.st_uid != os.geteuid():
        return f"warning: {path} is mode {have:o} and not yours; {why}"
    os.chmod(path, mode)
    return f"note: {path} was mode {have:o}; made it {mode:04o} ({why})"


def private_keylog(path: str) -> str | None:
    """Create the key log ``path`` 0600 whatever the umask, before OpenSSL
    opens it (it would create it 0666 less the umask, 0644 as a rule); an
    existing one others can read is made 0600. It holds every session key:
    with it and a capture anyone reads the mail and the passwords. Returns
    the line that says the mode was changed, if it was. Raises TlsFailure."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.close(fd)
        return _make_private(Path(path), 0o600, "it holds TLS session keys")
    except OSError as exc:
        raise TlsFailure(
            f"cannot write the key log {path}: {exc.strerror or exc}; choose another file with --keylog"
        ) from None


def _new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class CertificateAuthority:
    """The local CA that signs the certificates the proxy shows clients."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.cert_path = home / CA_CERT
        self.key_path = home / CA_KEY
        self._cert: x509.Certificate | None = None
        self._key: rsa.RSAPrivateKey | None = None
        self._leaf_key: rsa.RSAPrivateKey | None = None
        # least recently used first; names come from clients, so it is bounded
        self._leaves: OrderedDict[tuple[str, ...], tuple[bytes, bytes]] = OrderedDict()
        #: the spoilt ones (``leaf(bad=...)``), by the kind and then the names
        self._bad_leaves: OrderedDict[tuple[str, ...], tuple[bytes, bytes]] = OrderedDict()
        #: lines for the user: modes made private at load (see load_or_create)
        self.notes: list[str] = []

    @classmethod
    def load_or_create(cls, home: Path | None = None) -> CertificateAuthority:
        """The CA in ``home``, made there if missing. An existing folder that
        others can enter, or a key they can read, is made 0700/0600 and
        ``notes`` says so (a copied or restored ``~/.smtpproxy`` often is)."""
        ca = cls(home or default_home())
        if ca.cert_path.exists() and ca.key_path.exists():
            for path, mode, why in (
                (ca.home, 0o700, "it holds the CA key"),
                (ca.key_path, 0o600, "the CA key signs certificates your mail clients trust"),
            ):
                note = _make_private(path, mode, why)
                if note is not None:
                    ca.notes.append(note)
            ca._load()
        else:
            ca.regenerate()
        return ca

    def _load(self) -> None:
        try:
            cert = x509.load_pem_x509_certificate(self.cert_path.read_bytes())
            key = serialization.load_pem_private_key(self.key_path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise TlsFailure(
                f"cannot load the CA in {self.home}: {exc}; run 'smtpproxy ca --regenerate'"
            ) from None
        if not isinstance(key, rsa.RSAPrivateKey):
            raise TlsFailure(f"{self.key_path} is not an RSA key; run 'smtpproxy ca --regenerate'")
        self._cert, self._key = cert, key

    def regenerate(self) -> None:
        """Make a new CA key and certificate (10 years), replacing any old one."""
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.home, 0o700)
        key = _new_key()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, "smtpproxy local CA"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "smtpproxy"),
            ]
        )
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _dt.timedelta(days=1))
            .not_valid_after(now + _dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        _write_private(
            self.key_path,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        self.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        self._cert, self._key = cert, key
        self._leaves.clear()
        self._bad_leaves.clear()

    @property
    def cert(self) -> x509.Certificate:
        assert self._cert is not None
        return self._cert

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def fingerprint(self) -> str:
        return _colon_hex(self.cert.fingerprint(hashes.SHA256()))

    def leaf(self, names: Iterable[str], bad: str = "") -> tuple[bytes, bytes]:
        """(certificate chain PEM, key PEM) for these DNS names and IP addresses.

        ``bad`` (one of ``BAD_CERTS``, for a ``tls: cert`` fault) spoils the
        leaf in one way only, so that a client's verification fails for one
        reason: ``expired``, the CA's leaf for these names whose notAfter
        has passed (RFC 5280 section 4.1.2.5); ``wrong-name``, the CA's leaf
        for ``WRONG_NAME`` alone (the name check, RFC 6125 section 6);
        ``self-signed``, a leaf for these names signed with its own key, the
        CA left out of the chain (no path to a trust anchor, RFC 5280
        section 6.1)."""
        if bad and bad not in BAD_CERTS:
            raise ValueError(f"unknown bad certificate {bad!r}: one of {', '.join(BAD_CERTS)}")
        key_names = tuple(sorted(dict.fromkeys(n for n in names if n)))
        if bad == "wrong-name":
            key_names = (WRONG_NAME,)
        cache, cache_key = (
            (self._bad_leaves, (bad, *key_names)) if bad else (self._leaves, key_names)
        )
        cached = cache.get(cache_key)
        if cached is not None:
            cache.move_to_end(cache_key)
            return cached
        assert self._key is not None and self._cert is not None
        if self._leaf_key is None:
            self._leaf_key = _new_key()
        sans: list[x509.GeneralName] = []
        for n in key_names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(n)))
            except ValueError:
                sans.append(x509.DNSName(n))
        common = next(
            (n for n in key_names if not is_ip(n)), key_names[0] if key_names else "localhost"
        )
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common[:64])])
        now = _now()
        if bad == "expired":
            start, end = now - _dt.timedelta(days=30), now - _dt.timedelta(days=1)
        else:
            start, end = now - _dt.timedelta(days=1), now + _dt.timedelta(days=_LEAF_DAYS - 2)
        own = bad == "self-signed"
        signer = self._leaf_key if own else self._key
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject if own else self._cert.subject)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()),
                critical=False,
            )
            .sign(signer, hashes.SHA256())
        )
        chain = cert.public_bytes(serialization.Encoding.PEM) + (b"" if own else self.pem())
        key_pem = self._leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        pair = cache[cache_key] = (chain, key_pem)
        if len(cache) > MAX_LEAVES:
            cache.popitem(last=False)
        return pair


def bad_cert_words(kind: str) -> str:
    """How the transcript names a ``BAD_CERTS`` certificate ("an expired certificate")."""
    return f"{'an' if kind[:1] in 'aeiou' else 'a'} {kind} certificate"


def _colon_hex(data: bytes) -> str:
    return ":".join(f"{b:02X}" for b in data)


def _load_chain(ctx: ssl.SSLContext, chain: bytes, key: bytes, scratch: Path) -> None:
    """SSLContext.load_cert_chain wants files: write them privately, load, remove."""
    scratch.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_file = scratch / f"leaf-{os.getpid()}-{id(ctx)}.pem"
    _write_private(cert_file, chain + key)
    try:
        ctx.load_cert_chain(cert_file)
    finally:
        cert_file.unlink(missing_ok=True)


def _keylog(ctx: ssl.SSLContext, keylog: str | None) -> None:
    """Log the context's secrets to ``keylog``. The context keeps the file
    open (one descriptor each) and OpenSSL would create it world-readable:
    it is made 0600 first, every time, in case it was removed meanwhile."""
    if keylog:
        private_keylog(keylog)
        ctx.keylog_filename = keylog


class ServerContexts:
    """The SSL contexts the proxy uses to shake hands with clients.

    With a fixed certificate (``--cert``/``--key``) every client gets it.
    Otherwise the CA mints a leaf for the SNI name the client sends, or, for
    a client that sends none, for ``default_names`` (localhost, the listen
    address, the upstream host name). ``bad(kind)`` is the same with a
    spoilt leaf, for a ``tls: cert`` fault.
    """

    def __init__(
        self,
        default_names: Iterable[str],
        ca: CertificateAuthority | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        keylog: str | None = None,
    ) -> None:
        self.ca = ca
        self.default_names = list(dict.fromkeys(default_names))
        self.keylog = keylog
        self._by_name: OrderedDict[str, ssl.SSLContext] = OrderedDict()
        #: ``bad``'s contexts, by the kind and the SNI name ("": none sent)
        self._bad: OrderedDict[tuple[str, str], ssl.SSLContext] = OrderedDict()
        # the name each handshake asked for; gone with its ssl object
        self.snis: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        if cert_file is not None:
            ctx = self._new()
            try:
                ctx.load_cert_chain(cert_file, key_file)
            except (OSError, ssl.SSLError) as exc:
                raise TlsFailure(
                    f"cannot load --cert {cert_file} / --key {key_file}: {exc}"
                ) from None
            self.default = ctx
            self._fixed = True
        else:
            if ca is None:
                raise TlsFailure("no certificate to show clients: give --cert/--key or a CA")
            self._fixed = False
            self.default = self._minted(self.default_names)
        self.default.sni_callback = self._sni

    def _new(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        _keylog(ctx, self.keylog)
        return ctx

    def _minted(self, names: list[str], bad: str = "") -> ssl.SSLContext:
        assert self.ca is not None
        chain, key = self.ca.leaf(names, bad)
        ctx = self._new()
        _load_chain(ctx, chain, key, self.ca.home / "tmp")
        return ctx

    def bad(self, kind: str) -> ssl.SSLContext:
        """The context to shake hands with when a ``tls: cert KIND`` fault
        fires: like ``default``, with leaves spoilt the ``kind`` way
        (``CertificateAuthority.leaf``), for the SNI name the client sends
        too. Raises TlsFailure with a fixed ``--cert``: there is no CA."""
        if self._fixed or self.ca is None:
            raise TlsFailure(
                "'tls: cert ...' shows certificates minted by the local CA, and --cert/--key "
                "replaces it"
            )
        ctx = self._bad.get((kind, ""))
        if ctx is None:
            ctx = self._minted(self.default_names, kind)
            ctx.sni_callback = functools.partial(self._sni, bad=kind)
            self._keep_bad((kind, ""), ctx)
        return ctx

    def _keep_bad(self, key: tuple[str, str], ctx: ssl.SSLContext) -> None:
        self._bad[key] = ctx
        if len(self._bad) > MAX_BAD_CONTEXTS:
            self._bad.popitem(last=False)

    def _sni(
        self,
        sslobj: ssl.SSLObject | ssl.SSLSocket,
        name: str | None,
        ctx: ssl.SSLContext,
        bad: str = "",
    ) -> None:
        if name is None:
            return
        self.snis[sslobj] = name
        if self._fixed:
            return
        if bad:
            mctx = self._bad.get((bad, name))
            if mctx is None:
                mctx = self._minted([name] + self.default_names, bad)
                self._keep_bad((bad, name), mctx)
            else:
                self._bad.move_to_end((bad, name))
            sslobj.context = mctx
            return
        mctx = self._by_name.get(name)
        if mctx is None:
            mctx = self._minted([name] + self.default_names)
            self._by_name[name] = mctx
            if len(self._by_name) > MAX_CONTEXTS:
                self._by_name.popitem(last=False)  # clients choose the names
        else:
            self._by_name.move_to_end(name)
        sslobj.context = mctx

    def descriptors(self) -> int:
        """The most file descriptors these contexts hold open at once apart
        from handshakes in progress: with a key log, each context keeps the
        file open; without, none."""
        return 1 + MAX_CONTEXTS + MAX_BAD_CONTEXTS if self.keylog else 0

    def sni_of(self, sslobj: Any) -> str | None:
        return self.snis.pop(sslobj, None)


def client_context(
    cafile: Path | None = None, insecure: bool = False, keylog: str | None = None
) -> ssl.SSLContext:
    """The context for the proxy's own TLS connections to upstreams: the
    system trust store, plus ``cafile``; ``insecure`` skips verification."""
    ctx = ssl.create_default_context()
    if cafile is not None:
        try:
            ctx.load_verify_locations(cafile=str(cafile))
        except (OSError, ssl.SSLError) as exc:
            raise TlsFailure(f"cannot load --upstream-ca {cafile}: {exc}") from None
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    _keylog(ctx, keylog)
    return ctx


@dataclass(frozen=True)
class HandshakeFacts:
    version: str
    cipher: str
    peer: dict[str, object] | None


def describe_certificate(der: bytes | None) -> dict[str, object] | None:
    """Subject, issuer, SANs, validity and SHA-256 fingerprint of a DER cert."""
    if not der:
        return None
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return {"sha256": hashlib.sha256(der).hexdigest()}
    try:
        san_ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        sans = [str(v) for v in san_ext.value.get_values_for_type(x509.DNSName)] + [
            str(v) for v in san_ext.value.get_values_for_type(x509.IPAddress)
        ]
    except x509.ExtensionNotFound:
        sans = []
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "sans": sans,
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "sha256": _colon_hex(cert.fingerprint(hashes.SHA256())),
    }


def handshake_facts(sslobj: Any) -> HandshakeFacts:
    """What a finished handshake agreed, from an ssl object."""
    cipher = sslobj.cipher()
    try:
        der = sslobj.getpeercert(binary_form=True)
    except (ValueError, ssl.SSLError):
        der = None
    return HandshakeFacts(
        version=str(sslobj.version() or "?"),
        cipher=str(cipher[0]) if cipher else "?",
        peer=describe_certificate(der),
    )


class HandshakeFailed(Exception):
    """A TLS handshake did not finish. ``reason`` says why in words
    (``net.tls_reason``: ``timed out``, ``certificate verify failed: ...``,
    an OpenSSL reason); ``timed_out`` tells a peer too slow (the proxy gave
    up) from one that broke the handshake off; ``ssl_object`` is the
    handshake's, for the SNI a client asked (``ServerContexts.sni_of``).
    The stream is closed already."""

    def __init__(self, reason: str, *, timed_out: bool, ssl_object: Any) -> None:
        super().__init__(reason)
        self.reason = reason
        self.timed_out = timed_out
        self.ssl_object = ssl_object


async def handshake(
    stream: trio.abc.Stream,
    context: ssl.SSLContext,
    *,
    server_side: bool,
    server_hostname: str | None = None,
    timeout: float = math.inf,
    lock: trio.Semaphore | None = None,
) -> trio.SSLStream[trio.abc.Stream]:
    """Wrap ``stream`` in TLS and shake hands now, within ``timeout`` seconds
    (``math.inf``: no limit), as a server or as a client of
    ``server_hostname`` (also its SNI; None sends none and checks no name).
    ``lock``, if given, is held while the handshake runs and waited for
    within the same limit, so that no writer of the caller's uses the
    stream meanwhile. Raises ``HandshakeFailed``: a failed or timed-out
    handshake leaves the stream unusable (trio's ``SSLStream``), so it is
    closed first. Used by the relay's two legs, the embedded server and
    replay, so that each times out and says why the same way."""
    tls = trio.SSLStream(stream, context, server_side=server_side, server_hostname=server_hostname)
    try:
        with trio.fail_after(timeout):
            if lock is None:
                await tls.do_handshake()
            else:
                async with lock:
                    await tls.do_handshake()
    except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        await trio.aclose_forcefully(tls)
        raise HandshakeFailed(
            tls_reason(exc),
            timed_out=isinstance(exc, trio.TooSlowError),
            ssl_object=tls._ssl_object,
        ) from exc
    return tls
