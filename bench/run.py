#!/usr/bin/env python3
"""End-to-end benchmark: Postfix's smtp-source -> (hop) -> smtp-sink.

    python bench/run.py [--workloads small,large,conn,lat] [--rounds 3] [--scale 1.0]

Hops compared side by side in one run, interleaved (A B C D, B C D A, ...):
  direct    smtp-source talks to smtp-sink
  socat     socat TCP-LISTEN ... TCP:sink
  trio      bench/trio_relay.py, a minimal trio byte relay
  smtpproxy smtpproxy record --quiet, recording to a scratch folder (its
            default: one worker process per core)
  1worker   the same with --workers 1: one process, as the trio relay is
  faults    smtpproxy with ten --fault rules that never fire, with as many
            workers as 'smtpproxy' (record with rules runs one unless told)

The ``mock`` and ``mock1`` workloads (not run by default: --workloads mock)
compare two servers that are smtpproxy itself, with no smtp-sink:
  sink      smtpproxy record with no --upstream: its embedded sink
  mock      smtpproxy mock REC, REC a recording of one smtp-source session
            with as many messages (made through ``record`` before the rounds)
smtp-source sends one fixed message there (-F, no Date or Message-Id of its
own), so every session sends what the recorded one did; ``mock`` is 20
sessions like ``small``, ``mock1`` one like ``lat``. Messages are counted
from the recordings (each one the proxy saw answered 250).

Only the two Postfix test binaries are used (Debian package postfix); the
Postfix daemon is not started. Every message must reach the sink (its counter
is checked) or the run counts as failed. Output: the median wall time of each
hop, its ratio to direct and to the trio relay, smtpproxy's peak RSS (VmHWM of
its largest process), the PSS of all its processes at the end (with workers:
shared pages counted once), and its recording size per message and relative
to the bytes on the wire.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent

WORKLOADS = {
    # sessions (concurrent), messages (total), size (octets), reuse (several messages per connection)
    "small": dict(sessions=20, messages=60000, size=1024, reuse=True),
    "large": dict(sessions=2, messages=40, size=20 * 1024 * 1024, reuse=True),
    "conn": dict(sessions=500, messages=20000, size=1024, reuse=False),
    "lat": dict(sessions=1, messages=20000, size=1024, reuse=True),
    "mock": dict(sessions=20, messages=60000, size=1024, reuse=True, fixed=True),
    "mock1": dict(sessions=1, messages=20000, size=1024, reuse=True, fixed=True),
}
#: the hops of the ``fixed`` workloads (``mock``, ``mock1``): see the top
MOCK_HOPS = ["sink", "mock"]
HOPS = ["direct", "socat", "trio", "smtpproxy", "1worker", "faults"]
PROXIES = ("smtpproxy", "1worker", "faults")
#: ``faults``: smtpproxy with ten --fault rules that name steps every session
#: has but never fire (docs/faults.md: a rule that never fires costs nothing
#: measurable); compare it with ``smtpproxy`` in the same run
IDLE_RULES = [
    "client=203.0.113.1 rcpt: 452 4.5.3 never",
    "from=nobody@invalid.example mail: 550 5.7.1 never",
    "helo=nohost.invalid ehlo: 421 4.3.2 never",
    "session#100000000 data: 451 4.3.0 never",
    "rcpt#100000: 452 4.5.3 never",
    "message#100000 dot: 451 4.3.0 never",
    "to=*@invalid.example rcpt: 550 5.1.1 never",
    "user=nobody auth: 535 5.7.8 never",
    "client=203.0.113.2 quit: close",
    "session#100000000 connect: 421 4.3.2 never",
]


def default_workers() -> int:
    """The number of workers ``record`` runs by default without rules."""
    from smtpproxy.workers import default_count

    return default_count()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def vm_hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def pss_kb(pid: int) -> int:
    """Proportional set size: shared pages (those a forked worker shares
    with its parent) split among the processes that map them."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@dataclass
class Run:
    hop: str
    seconds: float
    delivered: int
    rss_kb: int = 0  # the largest process
    pss_sum_kb: int = 0  # all of them (parent and workers), at the end, shared pages counted once
    rec_bytes: int = 0
    wire_bytes: int = 0
    departures: int = 0  # the mock's, listed when it stops
    cpu_s: float = 0.0  # user+sys of the server process while smtp-source ran (MOCK_HOPS)


def fixed_message(size: int, scratch: Path) -> Path:
    """A complete message with a body of ``size`` octets, for smtp-source -F."""
    path = scratch / f"message-{size}.txt"
    if not path.exists():
        head = b"From: <foo@bench.example>\nTo: <foo@bench.example>\nSubject: bench\n\n"
        line = b"X" * 78 + b"\n"
        path.write_bytes(head + line * (size // len(line)) + b"X" * (size % len(line)) + b"\n")
    return path


def fixed_source(wl: dict, sessions: int, messages: int, port: int, scratch: Path) -> list[str]:
    src = ["smtp-source", "-s", str(sessions), "-m", str(messages), "-M", "bench.example"]
    src += ["-F", str(fixed_message(wl["size"], scratch)), "-d", f"127.0.0.1:{port}"]
    return src


def smtpproxy_cmd(command: str, port: int, rec_dir: Path, *args: str) -> list[str]:
    return [
        sys.executable, "-m", "smtpproxy", command, *args, "--listen", f"127.0.0.1:{port}",
        "--recordings", str(rec_dir), "--quiet", "--no-color",
    ]  # fmt: skip


def wait_banner(err: Path, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Until smtpproxy says it listens (no probe connection: to the mock
    that would be a session, and a departure)."""
    deadline = time.monotonic() + timeout
    while b"listening on " not in err.read_bytes():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{proc.args!r} did not start: {err.read_bytes()[-2000:]!r}")
        time.sleep(0.05)


def mock_recording(wl: dict, scratch: Path) -> Path:
    """One smtp-source session of ``wl``'s message count through ``record``
    (its embedded sink): what ``mock`` serves. Made once per count."""
    folder = scratch / f"mocked-{wl['messages']}"
    if not folder.exists():
        port = free_port()
        err = scratch / f"record-{port}.err"
        with open(err, "wb") as out:
            proc = subprocess.Popen(
                smtpproxy_cmd("record", port, folder), stdout=subprocess.DEVNULL, stderr=out
            )
        try:
            wait_banner(err, proc)
            src = fixed_source(wl, 1, wl["messages"], port, scratch)
            subprocess.run(src, check=True, stdout=subprocess.DEVNULL, timeout=1800)
        finally:
            stop(proc)
    (found,) = folder.glob("*.jsonl")
    return found


def cpu_seconds(pid: int) -> float:
    """user+sys time of ``pid`` so far (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mock_run(hop: str, wl: dict, scratch: Path) -> Run:
    """smtp-source against ``record``'s embedded sink or ``mock`` (MOCK_HOPS)."""
    port = free_port()
    rec_dir = scratch / f"rec-{time.monotonic_ns()}"
    if hop == "sink":
        cmd = smtpproxy_cmd("record", port, rec_dir, "--max-sessions", "100000")
    else:
        cmd = smtpproxy_cmd("mock", port, rec_dir, str(mock_recording(wl, scratch)))
    err_path = scratch / f"{hop}-{port}.err"  # the mock lists departures there
    err = open(err_path, "w+b")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_banner(err_path, proc)
        src = fixed_source(wl, wl["sessions"], wl["messages"], port, scratch)
        cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
        subprocess.run(
            src, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800
        )
        run = Run(hop, time.perf_counter() - t0, 0, cpu_s=cpu_seconds(proc.pid) - cpu0)
        pids = [proc.pid, *children(proc.pid)]
        run.rss_kb = max(vm_hwm_kb(pid) for pid in pids)
        run.pss_sum_kb = sum(pss_kb(pid) for pid in pids)
    finally:
        stop(proc)
    err.seek(0)
    run.departures = len(re.findall(rb"\): departure at ", err.read()))
    err.close()
    from smtpproxy.recording import read_recording  # the one reader: the totals are derived

    for f in rec_dir.glob("*.jsonl"):
        run.rec_bytes += f.stat().st_size
        close = read_recording(f).close
        totals = close.totals if close is not None else {}
        run.delivered += totals.get("messages_accepted", 0)
        run.wire_bytes += totals.get("bytes_from_client", 0) + totals.get("bytes_from_server", 0)
    shutil.rmtree(rec_dir, ignore_errors=True)
    return run


def one_run(hop: str, wl: dict, scratch: Path) -> Run:
    if hop in MOCK_HOPS:
        return mock_run(hop, wl, scratch)
    sink_port = free_port()
    sink_user = ["-u", "nobody"] if os.geteuid() == 0 else []
    counter = open(scratch / f"sink-{sink_port}.out", "w+b")  # a pipe would fill and stall the sink
    sink = subprocess.Popen(
        ["smtp-sink", "-c", *sink_user, f"127.0.0.1:{sink_port}", "4096"],
        stdout=counter,
        stderr=subprocess.DEVNULL,
    )
    hop_proc: subprocess.Popen[bytes] | None = None
    rec_dir = scratch / f"rec-{time.monotonic_ns()}"
    try:
        wait_listening(sink_port, sink)
        target = sink_port
        if hop != "direct":
            target = free_port()
            if hop == "socat":
                cmd = [
                    "socat",
                    f"TCP-LISTEN:{target},bind=127.0.0.1,fork,reuseaddr,backlog=4096",
                    f"TCP:127.0.0.1:{sink_port}",
                ]
            elif hop == "trio":
                cmd = [sys.executable, str(HERE / "trio_relay.py"), str(target), str(sink_port)]
            else:
                cmd = [
                    sys.executable,
                    "-m",
                    "smtpproxy",
                    "record",
                    "--listen",
                    f"127.0.0.1:{target}",
                    "--upstream",
                    f"127.0.0.1:{sink_port}",
                    "--recordings",
                    str(rec_dir),
                    "--quiet",
                    "--no-color",
                    "--max-sessions",
                    "100000",
                ]
                if hop == "1worker":
                    cmd += ["--workers", "1"]
                if hop == "faults":
                    cmd += [arg for rule in IDLE_RULES for arg in ("--fault", rule)]
                    # the layout of 'smtpproxy', so that only the rules differ
                    cmd += ["--workers", str(default_workers())]
            hop_proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_listening(target, hop_proc)
        src = [
            "smtp-source",
            "-s",
            str(wl["sessions"]),
            "-m",
            str(wl["messages"]),
            "-l",
            str(wl["size"]),
        ]
        if wl["reuse"]:
            src.append("-d")
        src.append(f"127.0.0.1:{target}")
        t0 = time.perf_counter()
        subprocess.run(
            src, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=1800
        )
        seconds = time.perf_counter() - t0
        run = Run(hop, seconds, 0)
        if hop in PROXIES and hop_proc is not None:
            pids = [hop_proc.pid, *children(hop_proc.pid)]
            run.rss_kb = max(vm_hwm_kb(pid) for pid in pids)
            run.pss_sum_kb = sum(pss_kb(pid) for pid in pids)
    finally:
        if hop_proc is not None:
            stop(hop_proc)
        stop(sink)
    counter.seek(0)
    out = counter.read().decode(errors="replace")
    counter.close()
    counts = re.findall(r"mesg=(\d+)", out)
    run.delivered = int(counts[-1]) if counts else 0
    if hop in PROXIES and rec_dir.exists():
        from smtpproxy.recording import read_recording  # the one reader: the totals are derived

        for f in rec_dir.glob("*.jsonl"):
            run.rec_bytes += f.stat().st_size
            close = read_recording(f).close
            totals = close.totals if close is not None else {}
            run.wire_bytes += totals.get("bytes_from_client", 0) + totals.get(
                "bytes_from_server", 0
            )
        shutil.rmtree(rec_dir, ignore_errors=True)
    return run


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workloads", default="small,large,conn,lat")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--scale", type=float, default=1.0, help="multiply message counts (0.1 for a quick run)"
    )
    ap.add_argument(
        "--hops", default=None, help=f"default: {','.join(HOPS)}; {','.join(MOCK_HOPS)} for mock"
    )
    args = ap.parse_args()
    for tool in ("smtp-source", "smtp-sink", "socat"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install postfix socat (the daemon need not run)")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, {platform.platform()}"
    )
    print(f"command: {' '.join(sys.argv)}\n")
    failed = False
    with tempfile.TemporaryDirectory(prefix="smtpproxy-bench-") as tmp:
        scratch = Path(tmp)
        for name in args.workloads.split(","):
            wl = dict(WORKLOADS[name])
            wl["messages"] = max(wl["sessions"], int(wl["messages"] * args.scale))
            default_hops = MOCK_HOPS if wl.get("fixed") else HOPS
            hops = args.hops.split(",") if args.hops else default_hops
            runs: dict[str, list[Run]] = {h: [] for h in hops}
            for r in range(args.rounds):
                order = hops[r % len(hops) :] + hops[: r % len(hops)]
                for hop in order:
                    run = one_run(hop, wl, scratch)
                    if run.delivered != wl["messages"]:
                        failed = True
                        print(
                            f"!! {name}/{hop}: {run.delivered} of {wl['messages']} messages arrived"
                        )
                    runs[hop].append(run)
            med = {h: statistics.median(x.seconds for x in runs[h]) for h in hops}
            print(
                f"## {name}: {wl['sessions']} sessions, {wl['messages']} messages of {wl['size']} octets"
                f"{', several per connection' if wl['reuse'] else ', one per connection'}; {args.rounds} rounds"
            )
            print(
                "| hop | median s | x direct | x trio relay | peak RSS (largest process) | PSS of all processes at the end | recording/msg | recording/wire |"
            )
            print("|---|---|---|---|---|---|---|---|")
            for h in hops:
                rss = pss = rec = ratio = ""
                if h in (*PROXIES, *MOCK_HOPS):
                    last = runs[h][-1]
                    rss = f"{max(x.rss_kb for x in runs[h]) / 1024:.1f} MB"
                    pss = f"{max(x.pss_sum_kb for x in runs[h]) / 1024:.1f} MB"
                    rec = f"{last.rec_bytes / max(1, wl['messages']):,.0f} B"
                    ratio = f"{last.rec_bytes / max(1, last.wire_bytes):.2f}"
                xd = f"{med[h] / med['direct']:.2f}" if "direct" in med else ""
                xt = f"{med[h] / med['trio']:.2f}" if "trio" in med else ""
                print(f"| {h} | {med[h]:.2f} | {xd} | {xt} | {rss} | {pss} | {rec} | {ratio} |")
            if "sink" in med and "mock" in med:
                gone = max(x.departures for x in runs["mock"])
                cpu = {h: statistics.median(x.cpu_s for x in runs[h]) for h in MOCK_HOPS}
                per = {h: cpu[h] / max(1, wl["messages"]) * 1e6 for h in MOCK_HOPS}
                print(
                    f"\nmock / sink: {med['mock'] / med['sink']:.2f} in wall time, "
                    f"{cpu['mock'] / cpu['sink']:.2f} in CPU (the server process while "
                    f"smtp-source ran, median: sink {per['sink']:.0f} us/msg, mock "
                    f"{per['mock']:.0f} us/msg); the mock listed {gone} departure(s) in a "
                    f"round ({wl['sessions']} session(s))"
                )
            print()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
