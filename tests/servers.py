"""Real SMTP servers for the interoperability tests: Postfix and OpenSMTPD.

Each server is started by the test session itself, in a throwaway directory
of its own, on a free loopback port, and stopped by its process id when the
module's tests are done. Nothing of the system's mail configuration is read
or changed: Postfix runs with ``-c DIR`` and its own queue and data
directories; OpenSMTPD, whose spool and control socket paths are compiled in,
runs in a private mount namespace where ``/var/spool`` and ``/run`` are empty
tmpfs mounts. How each is set up, and why, is in docs/interop.md.

Both servers offer STARTTLS with a certificate of a test CA (trustme) for
``localhost`` and ``127.0.0.1``, and AUTH for ``user@domain.com`` /
``password``. Every message is kept where the test can read it back: Postfix
puts it on hold (``postcat`` reads it from the queue), OpenSMTPD hands it to a
delivery script that writes one file per message.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import pytest
import trustme
from conftest import free_port, require_program
from cryptography import x509
from cryptography.hazmat.primitives import hashes

USER, PASSWORD = "user@domain.com", "password"
#: the recipient both servers refuse at RCPT time
REJECTED = "rejected@example.net"
#: bound on a server's start, stop and delivery
SERVER_TIMEOUT = 15.0

#: where .ci/run unpacks OpenSMTPD from bookworm-backports (see docs/interop.md)
OPENSMTPD_PREFIX = Path(
    os.environ.get("SMTPPROXY_OPENSMTPD_PREFIX", "/opt/smtpproxy-peers/opensmtpd")
)
OPENSMTPD_HOW = (
    "OpenSMTPD 7.x unpacked from bookworm-backports into "
    f"{OPENSMTPD_PREFIX} with its users opensmtpd/opensmtpq (see .ci/run)"
)


def missing_peer(msg: str) -> NoReturn:
    """Skip, or fail when SMTPPROXY_REQUIRE_PEERS is set (CI), as
    ``require_program`` does."""
    if os.environ.get("SMTPPROXY_REQUIRE_PEERS"):
        pytest.fail(msg + "; SMTPPROXY_REQUIRE_PEERS is set, so this is a failure")
    pytest.skip(msg)


def wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path, timeout: float) -> None:
    """Connect to ``port`` until it accepts, the process dies, or ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {_tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise AssertionError(  # noqa: B904  (the connect error is the expected state)
                    f"server not listening on {port} after {timeout}s: {_tail(log)}"
                )
        time.sleep(0.02)  # between connection attempts, never as the wait itself


def stop(proc: subprocess.Popen[bytes], port: int | None) -> None:
    """SIGTERM the server we started (it passes the signal on to its own
    children), reap it, and check that none of its processes is left and
    nothing listens on its port any more (``None``: it listened on none)."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=SERVER_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=SERVER_TIMEOUT)
    deadline = time.monotonic() + SERVER_TIMEOUT
    while True:
        left = _alive_in_session(proc.pid)
        if not left and (port is None or not _accepts(port)):
            return
        if time.monotonic() > deadline:
            raise AssertionError(
                f"after the server stopped: processes {left} of its session still run, "
                f"or port {port} still accepts"
            )
        time.sleep(0.02)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _alive_in_session(sid: int) -> list[int]:
    """Processes (zombies aside) of the session the server led: it was
    started with a session of its own, so these are its descendants."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        # after "pid (comm)": state ppid pgrp session ...
        if fields[0] != "Z" and int(fields[3]) == sid:
            alive.append(int(stat.parent.name))
    return alive


def _tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _base_dir(name: str) -> Path:
    """A private directory the servers' unprivileged users can traverse
    (pytest's tmp_path sits under a 0700 folder of root's)."""
    base = Path(tempfile.mkdtemp(prefix=f"smtpproxy-{name}-"))
    base.chmod(0o755)
    return base


def split_trace(content: bytes, names: tuple[bytes, ...]) -> tuple[list[bytes], bytes]:
    """Split the header fields named ``names`` that a server put at the top of
    a message (trace fields, RFC 5321 section 4.4) from the rest, which is what
    the client sent. Names are compared case-insensitively."""
    fields: list[bytes] = []
    rest = content
    wanted = {n.lower() for n in names}
    while True:
        match = re.match(rb"([!-9;-~]+):[^\r\n]*\r\n(?:[ \t][^\r\n]*\r\n)*", rest)
        if match is None or match.group(1).lower() not in wanted:
            return fields, rest
        fields.append(match.group(0))
        rest = rest[match.end() :]


@dataclass
class ServerTls:
    """The certificate a server shows: a trustme leaf for localhost and 127.0.0.1."""

    ca: trustme.CA
    leaf: trustme.LeafCert
    ca_pem: Path
    leaf_sha256: str


def server_tls(ca: trustme.CA, folder: Path) -> ServerTls:
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    ca_pem = folder / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    cert = x509.load_pem_x509_certificate(leaf.cert_chain_pems[0].bytes())
    sha = ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))
    return ServerTls(ca, leaf, ca_pem, sha)


@dataclass
class Server:
    """What the tests need of a running server."""

    name: str
    version: str
    port: int
    base: Path
    tls: ServerTls
    #: header fields the server puts on top of each message it keeps
    trace_fields: tuple[bytes, ...] = ()
    host: str = "127.0.0.1"
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def log(self) -> Path:
        return self.base / "server.log"

    def stored(self, final_reply: str) -> bytes:
        """The message the server kept, identified by its final reply to the
        message (which names the queue id), with CRLF line ends."""
        raise NotImplementedError


# -- Postfix -----------------------------------------------------------------------

POSTFIX_MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
proxymap  unix  - - n - - proxymap
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

POSTFIX_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
maillog_file_prefixes = {base}
maillog_file = {base}/server.log
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = postfix.test
mydestination =
mynetworks = 127.0.0.0/8
alias_maps =
alias_database =
# no Date/Message-ID/address rewriting for clients on 127.0.0.1
local_header_rewrite_clients =
message_size_limit = 10240000
smtpd_tls_chain_files = {base}/conf/tls.pem
smtpd_tls_security_level = may
smtpd_sasl_auth_enable = yes
smtpd_sasl_type = cyrus
smtpd_sasl_path = smtpd
cyrus_sasl_config_path = {base}/conf/sasl
smtpd_recipient_restrictions =
    check_recipient_access texthash:{base}/conf/recipient_access,
    permit_mynetworks, permit_sasl_authenticated, reject_unauth_destination
# every message stays on hold in the queue, where postcat reads it
smtpd_end_of_data_restrictions = check_client_access static:HOLD
# nothing is ever delivered; not 'error', which smtpd applies at RCPT time
default_transport = discard
relay_transport = discard
"""

POSTFIX_SASL_CONF = """\
pwcheck_method: auxprop
auxprop_plugin: sasldb
sasldb_path: {base}/conf/sasldb2
mech_list: PLAIN LOGIN CRAM-MD5
"""


class Postfix(Server):
    def stored(self, final_reply: str) -> bytes:
        match = re.search(r"queued as ([0-9A-Za-z]+)", final_reply)
        assert match is not None, final_reply
        done = subprocess.run(
            ["postcat", "-c", str(self.base / "conf"), "-bh", "-q", match.group(1)],
            capture_output=True,
            check=False,
            timeout=SERVER_TIMEOUT,
        )
        assert done.returncode == 0, done.stderr.decode(errors="replace") + _tail(self.log)
        # the queue file holds lines, not line ends: postcat ends each with LF
        assert b"\r" not in done.stdout
        return done.stdout.replace(b"\n", b"\r\n")


def _sasl_plugins_missing() -> list[str]:
    found = {Path(p).name.split(".so")[0] for p in glob.glob("/usr/lib/*/sasl2/lib*.so*")}
    return [lib for lib in ("libsasldb", "libcrammd5", "liblogin", "libplain") if lib not in found]


@contextlib.contextmanager
def run_postfix(ca: trustme.CA) -> Iterator[Postfix]:
    """Postfix with STARTTLS (``may``) and Cyrus SASL (sasldb: PLAIN, LOGIN,
    CRAM-MD5, offered with and without TLS), on hold for every message, and
    refusing ``REJECTED`` with 550 5.1.1."""
    require_program("postfix", "postfix")
    require_program("postcat", "postfix")
    saslpasswd2 = require_program("saslpasswd2", "sasl2-bin")
    if missing := _sasl_plugins_missing():
        missing_peer(
            f"Cyrus SASL plugins {', '.join(missing)} are not installed "
            "(apt-get install libsasl2-modules libsasl2-modules-db)"
        )
    if os.geteuid() != 0:
        missing_peer("Postfix's master runs as root; run the tests as root")
    version = subprocess.run(
        ["postconf", "-dh", "mail_version"], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()
    daemon_dir = subprocess.run(
        ["postconf", "-dh", "daemon_directory"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout.strip()

    base = _base_dir("postfix")
    try:
        conf = base / "conf"
        (conf / "sasl").mkdir(parents=True)
        (base / "queue").mkdir()
        (base / "data").mkdir()
        port = free_port()
        tls = server_tls(ca, conf)
        tls.leaf.private_key_and_cert_chain_pem.write_to_path(str(conf / "tls.pem"))
        (conf / "tls.pem").chmod(0o600)
        (conf / "main.cf").write_text(POSTFIX_MAIN_CF.format(base=base))
        (conf / "master.cf").write_text(POSTFIX_MASTER_CF.format(port=port))
        (conf / "sasl" / "smtpd.conf").write_text(POSTFIX_SASL_CONF.format(base=base))
        (conf / "recipient_access").write_text(f"{REJECTED} 550 5.1.1 no such user here\n")
        user, realm = USER.split("@")
        subprocess.run(
            [saslpasswd2, "-p", "-f", str(conf / "sasldb2"), "-c", "-u", realm, user],
            input=PASSWORD.encode(),
            check=True,
            timeout=30,
        )
        postfix_user = pwd.getpwnam("postfix")
        os.chown(conf / "sasldb2", 0, postfix_user.pw_gid)  # smtpd reads it as postfix
        (conf / "sasldb2").chmod(0o640)
        os.chown(base / "data", postfix_user.pw_uid, postfix_user.pw_gid)
        # creates the queue's subdirectories with their owners and modes
        check = subprocess.run(
            ["postfix", "-c", str(conf), "check"], capture_output=True, check=False, timeout=60
        )
        assert check.returncode == 0, (check.stdout + check.stderr).decode() + _tail(
            base / "server.log"
        )

        with open(base / "master.out", "wb") as out:
            # -d: stay in the foreground as our child; a session of its own, so
            # that its SIGTERM to its process group reaches only its children
            proc = subprocess.Popen(
                [f"{daemon_dir}/master", "-c", str(conf), "-d"],
                cwd=base,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        server = Postfix(
            "postfix", f"Postfix {version}", port, base, tls, (b"Received",), proc=proc
        )
        try:
            wait_listening(proc, port, server.log, SERVER_TIMEOUT)
            yield server
        finally:
            stop(proc, port)
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- OpenSMTPD --------------------------------------------------------------------

OPENSMTPD_CONF = """\
pki localhost cert "{base}/cert.pem"
pki localhost key "{base}/key.pem"
table creds file:{base}/creds
table virtuals file:{base}/virtuals
listen on 127.0.0.1 port {port} hostname opensmtpd.test tls pki localhost auth-optional <creds>
action "keep" mda "{base}/deliver" virtual <virtuals> user nobody
match from any for rcpt-to "{rejected}" reject
match from any for domain "example.net" action "keep"
"""

#: run as nobody by OpenSMTPD's mail.mda for each message: one file per
#: message, renamed into new/ only once complete
OPENSMTPD_DELIVER = """\
#!/bin/sh
set -e
f=$(mktemp {base}/tmp/msg.XXXXXXXX)
cat > "$f"
mv "$f" {base}/new/
"""

#: The spool (/var/spool/smtpd) and control socket (/run/smtpd.sock) paths
#: are compiled in: give this instance empty ones in a mount namespace of its
#: own. An unpacked package's helpers (mail.mda) are expected under
#: /usr/libexec/opensmtpd, compiled in too: mount them there.
OPENSMTPD_NAMESPACE = """\
mount -t tmpfs -o mode=0755 smtpproxy-test /var/spool
mount -t tmpfs -o mode=0755 smtpproxy-test /run
if [ "$3" != /usr/libexec/opensmtpd ]; then
    mount -t tmpfs -o mode=0755 smtpproxy-test /usr/libexec
    mkdir /usr/libexec/opensmtpd
    mount --bind "$3" /usr/libexec/opensmtpd
fi
exec "$1" -d -f "$2"
"""


class OpenSmtpd(Server):
    def stored(self, final_reply: str) -> bytes:
        match = re.search(r"\b([0-9a-f]{8}) Message accepted", final_reply)
        assert match is not None, final_reply
        marker = re.compile(rf"\bid {match.group(1)}\b".encode())
        # delivery runs after the 250, from the queue: wait for the file
        deadline = time.monotonic() + SERVER_TIMEOUT
        while True:
            for path in (self.base / "new").iterdir():
                content = path.read_bytes()
                if marker.search(content.split(b"\n\n", 1)[0]):
                    assert b"\r" not in content  # stored as lines, LF-terminated
                    return content.replace(b"\n", b"\r\n")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"OpenSMTPD never delivered {match.group(1)}: {_tail(self.log)}"
                )
            time.sleep(0.05)


def _opensmtpd_binary() -> tuple[Path, Path, str]:
    """The smtpd binary, its helpers' folder and its version: the unpacked
    backports package, else a system one of version 7 or later."""
    for smtpd, libexec in (
        (OPENSMTPD_PREFIX / "usr/sbin/smtpd", OPENSMTPD_PREFIX / "usr/libexec/opensmtpd"),
        (Path("/usr/sbin/smtpd"), Path("/usr/libexec/opensmtpd")),
    ):
        if not smtpd.exists():
            continue
        out = subprocess.run([smtpd, "-h"], capture_output=True, text=True, check=False, timeout=30)
        match = re.search(r"OpenSMTPD (\d+)\.\S+", out.stdout + out.stderr)
        if match and int(match.group(1)) >= 7:
            return smtpd, libexec, match.group(0)
    missing_peer(
        f"OpenSMTPD 7 or later is not installed (Debian 12's 6.8 fails every TLS handshake "
        f"under OpenSSL 3); needs {OPENSMTPD_HOW}"
    )


@contextlib.contextmanager
def run_opensmtpd(ca: trustme.CA) -> Iterator[OpenSmtpd]:
    """OpenSMTPD with STARTTLS and AUTH PLAIN/LOGIN (offered only after
    STARTTLS, as OpenSMTPD does) from a credentials table, delivering every
    message for example.net to a file, refusing ``REJECTED``."""
    smtpd, libexec, version = _opensmtpd_binary()
    for user in ("opensmtpd", "opensmtpq"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            missing_peer(f"user {user} does not exist; needs {OPENSMTPD_HOW}")
    if not Path("/var/lib/opensmtpd/empty").is_dir():
        missing_peer(f"/var/lib/opensmtpd/empty (its chroot) does not exist; needs {OPENSMTPD_HOW}")
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        missing_peer(
            "OpenSMTPD runs as root in a mount namespace: needs root and unshare (util-linux)"
        )

    base = _base_dir("opensmtpd")
    try:
        port = free_port()
        tls = server_tls(ca, base)
        (base / "cert.pem").write_bytes(b"".join(p.bytes() for p in tls.leaf.cert_chain_pems))
        tls.leaf.private_key_pem.write_to_path(str(base / "key.pem"))
        (base / "key.pem").chmod(0o600)
        hashed = subprocess.run(
            [libexec / "encrypt", PASSWORD], capture_output=True, text=True, check=True, timeout=30
        ).stdout.strip()
        (base / "creds").write_text(f"{USER} {hashed}\n")
        (base / "creds").chmod(0o640)
        (base / "virtuals").write_text("@example.net nobody\n")
        nobody = pwd.getpwnam("nobody")
        for sub in ("tmp", "new"):
            (base / sub).mkdir(mode=0o700)
            os.chown(base / sub, nobody.pw_uid, nobody.pw_gid)
        (base / "deliver").write_text(OPENSMTPD_DELIVER.format(base=base))
        (base / "deliver").chmod(0o755)
        conf = base / "smtpd.conf"
        conf.write_text(OPENSMTPD_CONF.format(base=base, port=port, rejected=REJECTED))
        check = subprocess.run(
            [smtpd, "-n", "-f", conf], capture_output=True, text=True, check=False, timeout=30
        )
        assert check.returncode == 0, check.stdout + check.stderr

        with open(base / "server.log", "wb") as out:
            # unshare without --fork execs: the pid we hold is smtpd's own
            proc = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "--",
                 "/bin/sh", "-ec", OPENSMTPD_NAMESPACE, "sh", str(smtpd), str(conf), str(libexec)],
                cwd=base,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        server = OpenSmtpd(
            "opensmtpd", version, port, base, tls,
            (b"Return-Path", b"Delivered-To", b"Received"), proc=proc,
        )  # fmt: skip
        try:
            wait_listening(proc, port, server.log, SERVER_TIMEOUT)
            yield server
        finally:
            stop(proc, port)
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- fixtures ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server_ca() -> trustme.CA:
    """The servers' CA: not the proxy's, so the two legs are verified apart."""
    return trustme.CA()


@pytest.fixture(scope="module")
def postfix_server(server_ca: trustme.CA) -> Iterator[Postfix]:
    with run_postfix(server_ca) as server:
        yield server


@pytest.fixture(scope="module")
def opensmtpd_server(server_ca: trustme.CA) -> Iterator[OpenSmtpd]:
    with run_opensmtpd(server_ca) as server:
        yield server
