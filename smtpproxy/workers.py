"""Several relay processes behind one listening address.

One Python process relays on one core. On Linux, ``smtpproxy record`` starts
a worker process per core instead, each with its own listening socket bound
to the same address with ``SO_REUSEPORT``; the kernel spreads new connections
among them, and a session lives its whole life in one worker. Each worker is
the ordinary single-process proxy: its own sessions, recordings, transcript
lines and limits. Nothing is shared between workers at run time.

The parent binds the sockets (so a taken port is an error before anything
starts), forks the workers, and then only supervises: it keeps the sockets
open, so a worker that dies is restarted on the same socket without losing the
connections queued there; it passes SIGINT/SIGTERM/SIGHUP on (as SIGTERM); and it adds up the
workers' final counts. A worker dies with its parent (``PR_SET_PDEATHSIG``),
so ``kill -9`` of the proxy's PID stops every worker as it would stop one
process.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

__all__ = ["WorkerGroup", "available", "default_count", "plan", "stop_signals"]

#: the listening backlog of each worker's socket
BACKLOG = 4096
#: a worker that dies sooner than this after its start is not restarted
#: (it would only die again): the proxy stops instead
MIN_LIFETIME = 2.0
#: after asking workers to stop, how long before they are killed
STOP_GRACE = 20.0
_PR_SET_PDEATHSIG = 1


def stop_signals() -> set[signal.Signals]:
    """The signals that stop the proxy: SIGINT, SIGTERM, and SIGHUP (a
    closed terminal or SSH session) unless it was started ignoring SIGHUP
    (``nohup``): that choice is kept."""
    found = {signal.SIGINT, signal.SIGTERM}
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        found.add(signal.SIGHUP)
    return found


def available() -> bool:
    """Whether the kernel spreads connections among sockets on one port."""
    return sys.platform.startswith("linux") and hasattr(socket, "SO_REUSEPORT")


def default_count() -> int:
    """One worker per core this process may run on (at most 8), or 1 where
    the kernel cannot share a port among workers."""
    if not available():
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


def plan(requested: int | None, max_sessions: int, embedded: bool) -> tuple[int, int]:
    """(workers, sessions each): ``requested`` or one per core; never more
    workers than sessions allowed, so the split (``max_sessions // workers``
    each) never exceeds the limit; one process for the embedded upstream
    (a demo server in that process)."""
    count = 1 if embedded else min(requested or default_count(), max_sessions)
    return count, max_sessions // count


@dataclass
class _Worker:
    index: int
    pid: int
    started: float
    results: int  # read end of the pipe the worker's counts come back on


@dataclass
class WorkerGroup:
    """Listening sockets for ``count`` workers, bound and ready; ``run``
    forks the workers and supervises them until they have all ended."""

    count: int
    sockets: list[list[socket.socket]]
    address: tuple[str, int]
    totals: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @classmethod
    def bind(cls, host: str, port: int, count: int) -> WorkerGroup:
        """Bind ``count`` sockets per address of ``host``; OSError (address
        in use, cannot assign) before any worker starts."""
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        unique = list(dict.fromkeys((f, t, p, a) for f, t, p, _, a in infos))
        groups: list[list[socket.socket]] = [[] for _ in range(count)]
        try:
            for family, type_, proto, addr in unique:
                # a plain bind first: SO_REUSEPORT would quietly join another
                # proxy already listening there instead of failing
                with socket.socket(family, type_, proto) as probe:
                    _prepare(probe, family, reuseport=False)
                    probe.bind(addr)
                    bound = probe.getsockname()
                for group in groups:
                    sock = socket.socket(family, type_, proto)
                    group.append(sock)
                    _prepare(sock, family, reuseport=True)
                    sock.bind(bound)
                    sock.listen(BACKLOG)
        except BaseException:
            for group in groups:
                for sock in group:
                    sock.close()
            raise
        first = groups[0][0].getsockname()
        return cls(count, groups, (first[0], first[1]))

    def close(self) -> None:
        for group in self.sockets:
            for sock in group:
                sock.close()

    def run(
        self,
        work: Callable[[list[socket.socket]], Mapping[str, int]],
        ready: Callable[[], None] | None = None,
        reload: Callable[[], bool] | None = None,
    ) -> bool:
        """Run ``work(sockets)`` in each worker until SIGINT, SIGTERM or SIGHUP, then
        wait for them all. ``ready`` runs once those signals are held for the
        supervisor (print the banner there: a signal sent as soon as it shows
        must not kill the parent by default action). The counts the workers
        return are summed into ``totals``; what went wrong is in
        ``problems``. True when every worker ended cleanly. With ``reload``,
        SIGHUP does not stop them: ``reload()`` runs here and, when it says
        True, each worker gets the SIGHUP (``--faults FILE`` re-read)."""
        signals = stop_signals() | {signal.SIGCHLD}
        if reload is not None:
            signals.add(signal.SIGHUP)
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, signals)
        workers: dict[int, _Worker] = {}
        ok = True
        stop_at: float | None = None
        try:
            if ready is not None:
                ready()
            for i in range(self.count):
                w = self._start(i, work, old_mask)
                workers[w.pid] = w
            while workers:
                timeout = None if stop_at is None else 1.0
                info = (
                    signal.sigtimedwait(signals, timeout)
                    if timeout
                    else signal.sigwaitinfo(signals)
                )
                if info is not None and info.si_signo == signal.SIGHUP and reload is not None:
                    if stop_at is None and reload():
                        for pid in workers:
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(pid, signal.SIGHUP)
                elif info is not None and info.si_signo != signal.SIGCHLD and stop_at is None:
                    stop_at = time.monotonic()
                if stop_at is not None:
                    # again every second: a worker still starting up ignores it
                    kill = (
                        signal.SIGKILL
                        if time.monotonic() - stop_at > STOP_GRACE
                        else signal.SIGTERM
                    )
                    for pid in workers:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, kill)
                for w, code in self._reap(workers):
                    if stop_at is not None and code == 0:
                        continue
                    ok = False
                    how = (
                        f"exited with status {code}"
                        if code >= 0
                        else f"was killed by signal {-code}"
                    )
                    if stop_at is None and time.monotonic() - w.started >= MIN_LIFETIME:
                        self.problems.append(f"worker {w.index + 1} {how}; started it again")
                        again = self._start(w.index, work, old_mask)
                        workers[again.pid] = again
                    else:
                        self.problems.append(f"worker {w.index + 1} {how}; stopping")
                        if stop_at is None:
                            stop_at = time.monotonic()
                            for pid in workers:
                                with contextlib.suppress(ProcessLookupError):
                                    os.kill(pid, signal.SIGTERM)
        finally:
            for w in workers.values():  # only on a bug here: leave no orphan behind
                with contextlib.suppress(ProcessLookupError):
                    os.kill(w.pid, signal.SIGKILL)
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
            self.close()
        return ok

    def _start(
        self,
        index: int,
        work: Callable[[list[socket.socket]], Mapping[str, int]],
        mask: set[int | signal.Signals],
    ) -> _Worker:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()  # or the child would print the parent's pending output again
        parent = os.getpid()
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                os.close(read_end)
                _die_with(parent)
                # signals are handled by the serving loop (trio); until it
                # listens, and while it shuts down, a second one is ignored
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
                for i, group in enumerate(self.sockets):
                    if i != index:
                        for sock in group:
                            sock.close()
                counts = work(self.sockets[index])
                os.write(write_end, json.dumps(dict(counts)).encode())
                code = 0
            except BaseException:  # noqa: BLE001 - a worker reports anything, then exits 1
                traceback.print_exc()
            finally:
                for stream in (sys.stdout, sys.stderr):
                    with contextlib.suppress(OSError, ValueError):
                        stream.flush()
                os._exit(code)
        os.close(write_end)
        return _Worker(index, pid, time.monotonic(), read_end)

    def _reap(self, workers: dict[int, _Worker]) -> list[tuple[_Worker, int]]:
        """The workers that have ended, with their exit codes (negative: the
        signal that killed them); their counts are added to ``totals``."""
        ended = []
        while workers:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            w = workers.pop(pid, None)
            if w is None:
                continue
            try:
                data = os.read(w.results, 65536)
            except OSError:
                data = b""
            os.close(w.results)
            with contextlib.suppress(ValueError):
                for key, value in json.loads(data or b"{}").items():
                    if isinstance(value, int):
                        self.totals[key] = self.totals.get(key, 0) + value
            ended.append((w, os.waitstatus_to_exitcode(status)))
        return ended


def _prepare(sock: socket.socket, family: int, reuseport: bool) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuseport:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)


def _die_with(parent: int) -> None:
    """Have the kernel kill this process when its parent dies."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)
