"""Real MTAs as *clients*: Postfix and Exim relaying every message to one
smarthost (the proxy), with retry times of seconds, so that a test can see an
MTA defer a message on a 4xx and deliver it on its own next try.

Each MTA runs as root in a throwaway directory of its own, with its own
configuration, queue (spool) and log, and never reads or changes the system's
mail configuration. A message is injected with the MTA's sendmail interface.
Both are stopped by their process id.

* Postfix: a second instance (``master -c DIR -d``) with ``relayhost =
  [127.0.0.1]:PORT`` and no listener; ``sendmail -C DIR`` puts a message in
  its maildrop, pickup hands it to the queue manager.
* Exim: Debian's exim4-daemon-light binary, unpacked by .ci/run into
  ``/opt/smtpproxy-peers/exim`` (it conflicts with Postfix as the system's
  mail transport), run with ``-C FILE`` (root keeps its privileges with an
  alternate configuration; the processes it re-executes drop to Debian-exim,
  which owns the spool and log folders) as a foreground daemon
  (``-bdf -q1s``: a queue run every second). The daemon must listen to stay
  in the foreground: a free loopback port nothing connects to.
  ``exim -odi`` injects a message and makes the first delivery attempt
  before it returns.

How they are set up, and why, is in docs/interop.md.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from conftest import free_port, require_program
from servers import SERVER_TIMEOUT, _base_dir, _tail, missing_peer, stop, wait_listening

#: how long a test waits for an MTA to deliver (first try, backoff, retry)
DELIVERY_TIMEOUT = 60.0
#: the retry interval both MTAs are given: longer than a ``greylist=2s``
#: window, so that the second attempt is the one that passes
RETRY_SECONDS = 4

#: where .ci/run unpacks exim4-daemon-light (see docs/interop.md)
EXIM_PREFIX = Path(os.environ.get("SMTPPROXY_EXIM_PREFIX", "/opt/smtpproxy-peers/exim"))
EXIM_HOW = (
    f"Debian's exim4-daemon-light unpacked into {EXIM_PREFIX} "
    "with its user Debian-exim (see .ci/run)"
)


@dataclass
class MtaClient:
    """What the tests need of a running MTA client."""

    name: str
    version: str
    base: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def log(self) -> Path:
        return self.base / "mta.log"

    def send(self, sender: str, recipients: list[str], message: bytes) -> None:
        """Hand ``message`` (CRLF or LF line ends) to the MTA for ``recipients``."""
        raise NotImplementedError

    def queued(self) -> int:
        """How many messages the MTA still holds."""
        raise NotImplementedError

    def wait_queue_empty(self, timeout: float = DELIVERY_TIMEOUT) -> None:
        """Wait (bounded) until the MTA holds no message: delivered, or
        bounced; the caller checks which at the server."""
        deadline = time.monotonic() + timeout
        while self.queued():
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.proc.returncode}: {_tail(self.log)}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name} still holds {self.queued()} message(s) after {timeout}s: "
                    f"{_tail(self.log)}"
                )
            time.sleep(0.1)  # between looks at the queue, bounded by the deadline


def _run(argv: list[str], what: str, log: Path, stdin: bytes = b"") -> str:
    done = subprocess.run(argv, input=stdin, capture_output=True, check=False, timeout=60)
    out = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0, f"{what} exited with {done.returncode}: {out}\n{_tail(log)}"
    return out


# -- Postfix -----------------------------------------------------------------------

POSTFIX_CLIENT_MASTER_CF = """\
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""

#: No inet listener at all; every message goes to the relayhost. The
#: backoff times are the point: a deferred message is tried again
#: RETRY_SECONDS later (not 300s), found by a queue scan every second.
POSTFIX_CLIENT_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
maillog_file_prefixes = {base}
maillog_file = {base}/mta.log
inet_interfaces = loopback-only
inet_protocols = ipv4
myhostname = postfix-client.test
myorigin = postfix-client.test
mydestination =
alias_maps =
alias_database =
relayhost = [{host}]:{port}
smtp_tls_security_level = none
minimal_backoff_time = {retry}s
maximal_backoff_time = {retry}s
queue_run_delay = 1s
"""


class PostfixClient(MtaClient):
    def send(self, sender: str, recipients: list[str], message: bytes) -> None:
        # -i: a line with a lone dot is text; -f: the envelope sender
        _run(
            ["sendmail", "-C", str(self.base / "conf"), "-i", "-f", sender, "--", *recipients],
            "Postfix's sendmail",
            self.log,
            message.replace(b"\r\n", b"\n"),
        )

    def queued(self) -> int:
        queue = self.base / "queue"
        return sum(
            len(files)
            for sub in ("maildrop", "incoming", "active", "deferred", "hold")
            for _, _, files in os.walk(queue / sub)
        )


@contextlib.contextmanager
def run_postfix_client(relay: tuple[str, int]) -> Iterator[PostfixClient]:
    """A Postfix instance that sends every message to ``relay`` (no TLS),
    retrying a deferred one every RETRY_SECONDS."""
    require_program("postfix", "postfix")
    require_program("sendmail", "postfix")
    if os.geteuid() != 0:
        missing_peer("Postfix's master runs as root; run the tests as root")
    daemon_dir = _run(["postconf", "-dh", "daemon_directory"], "postconf", Path("/dev/null"))
    version = _run(["postconf", "-dh", "mail_version"], "postconf", Path("/dev/null"))

    base = _base_dir("postfix-client")
    try:
        conf = base / "conf"
        conf.mkdir()
        (base / "queue").mkdir()
        (base / "data").mkdir()
        postfix_user = pwd.getpwnam("postfix")
        os.chown(base / "data", postfix_user.pw_uid, postfix_user.pw_gid)
        (conf / "main.cf").write_text(
            POSTFIX_CLIENT_MAIN_CF.format(
                base=base, host=relay[0], port=relay[1], retry=RETRY_SECONDS
            )
        )
        (conf / "master.cf").write_text(POSTFIX_CLIENT_MASTER_CF)
        # creates the queue's subdirectories (maildrop: group postdrop)
        _run(["postfix", "-c", str(conf), "check"], "postfix check", base / "mta.log")
        with open(base / "master.out", "wb") as out:
            proc = subprocess.Popen(
                [f"{daemon_dir.strip()}/master", "-c", str(conf), "-d"],
                cwd=base,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        client = PostfixClient("postfix", f"Postfix {version.strip()}", base, proc=proc)
        try:
            yield client
        finally:
            stop(proc, None)
    finally:
        shutil.rmtree(base, ignore_errors=True)


# -- Exim --------------------------------------------------------------------------

#: Every address goes to the proxy (manualroute, ``127.0.0.1::PORT``), in
#: clear (``hosts_avoid_tls``), retried every RETRY_SECONDS (the retry rule's
#: F,1m,Ns) by a queue runner started every second. CHUNKING is used when the
#: server offers it (``hosts_try_chunking``, default ``*``, named here).
EXIM_CONF = """\
primary_hostname = exim-client.test
spool_directory = {base}/spool
log_file_path = {base}/log/%slog
exim_user = Debian-exim
exim_group = Debian-exim
exim_path = {exim}
# the daemon must listen somewhere to run in the foreground (-bdf): a free
# loopback port that nothing uses
local_interfaces = <; 127.0.0.1
daemon_smtp_ports = {listen}
tls_advertise_hosts =
never_users = root
keep_environment =
# no DNS anywhere: the only route is an IP literal
host_lookup =
rfc1413_hosts =
# no freeze-and-wait on the first deferral
delay_warning =
queue_run_max = 1

begin routers

proxy:
  driver = manualroute
  transport = remote_smtp
  route_list = * {host}::{port} byname
  self = send

begin transports

remote_smtp:
  driver = smtp
  hosts_avoid_tls = *
  hosts_try_chunking = *
  allow_localhost

begin retry

*  *  F,1m,{retry}s

begin rewrite
"""


class EximClient(MtaClient):
    exim: Path = Path()

    @property
    def log(self) -> Path:
        return self.base / "log" / "mainlog"

    @property
    def conf(self) -> Path:
        return self.base / "exim.conf"

    def send(self, sender: str, recipients: list[str], message: bytes) -> None:
        # -odi: the first delivery attempt happens before this returns;
        # -i: a line with a lone dot is text
        _run(
            [str(self.exim), "-C", str(self.conf), "-odi", "-i", "-f", sender, "--", *recipients],
            "exim",
            self.log,
            message.replace(b"\r\n", b"\n"),
        )

    def queued(self) -> int:
        return len(list((self.base / "spool" / "input").rglob("*-H")))


def _exim_binary() -> tuple[Path, str]:
    for exim in (EXIM_PREFIX / "usr/sbin/exim4", Path("/usr/sbin/exim4")):
        if not exim.exists():
            continue
        out = subprocess.run(
            [exim, "-C", "/dev/null", "-bV"],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        match = re.search(r"Exim version (\S+)", out.stdout + out.stderr)
        if match:
            return exim, f"Exim {match.group(1)}"
        missing_peer(f"{exim} does not run: {out.stdout}{out.stderr}; needs {EXIM_HOW}")
    missing_peer(f"Exim is not installed; needs {EXIM_HOW}")


@contextlib.contextmanager
def run_exim_client(relay: tuple[str, int]) -> Iterator[EximClient]:
    """An Exim instance that sends every message to ``relay`` (no TLS, BDAT
    when offered), retrying a deferred one every RETRY_SECONDS."""
    if os.geteuid() != 0:
        missing_peer("Exim keeps its root privileges with -C only when run by root")
    try:
        exim_user = pwd.getpwnam("Debian-exim")
    except KeyError:
        missing_peer(f"user Debian-exim does not exist; needs {EXIM_HOW}")
    exim, version = _exim_binary()

    base = _base_dir("exim-client")
    try:
        for sub in ("spool", "log"):  # written as Debian-exim
            (base / sub).mkdir()
            os.chown(base / sub, exim_user.pw_uid, exim_user.pw_gid)
        conf = base / "exim.conf"
        listen = free_port()
        conf.write_text(
            EXIM_CONF.format(
                base=base,
                exim=exim,
                listen=listen,
                host=relay[0],
                port=relay[1],
                retry=RETRY_SECONDS,
            )
        )
        _run([str(exim), "-C", str(conf), "-bV"], "exim -bV", base / "log" / "mainlog")
        with open(base / "daemon.out", "wb") as out:
            # -bdf: a daemon in the foreground (our child); -q1s: a queue run
            # every second
            proc = subprocess.Popen(
                [str(exim), "-C", str(conf), "-bdf", "-q1s"],
                cwd=base,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        client = EximClient("exim", version, base, proc=proc)
        client.exim = exim
        try:
            wait_listening(proc, listen, client.log, SERVER_TIMEOUT)
            yield client
        finally:
            stop(proc, listen)
    finally:
        shutil.rmtree(base, ignore_errors=True)
