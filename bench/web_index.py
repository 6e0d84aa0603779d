"""The web view's index (docs/performance.md, "Web view").

    python bench/web_index.py [--recordings 10000] [--rows 100000] [--runs 20]

1. Building the index for N ``conn`` recordings: one real session (EHLO,
   AUTH, one 1 KiB message, QUIT, as bench/run.py's ``conn`` workload sends
   one message per connection) recorded through the Python API's sink with
   smtplib, copied N times with new session ids and start times (the header
   line rewritten, the rest byte for byte). Timed: ``smtpproxy index DIR``
   as a process, from no index (every file read) and again (none changed).
2. A filtered page over R rows: R rows made from that recording's row with
   varied values (clients, users, EHLO names, counts, faults, durations),
   stored with ``Index.put_all``; then ``Index.page(...)`` timed ``--runs``
   times for each query below (p50 and p95), and the page rendered through
   the ASGI app (the list as a browser gets it) for the first query.

Everything happens in a scratch folder that is removed afterwards.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import smtplib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import smtpproxy
from smtpproxy.web.index import INDEX_NAME, Index, Stored, read_row, search_text

BODY = "Subject: bench\r\n\r\n" + ("x" * 78 + "\r\n") * 12  # about 1 KiB


def one_recording(folder: Path) -> Path:
    with smtpproxy.sink(recordings=folder) as server:
        with smtplib.SMTP(*server.address, timeout=10) as client:
            client.login("bench", "s3cret")
            client.sendmail("bench@example.org", ["sink@example.net"], BODY)
        (session,) = server.wait_for_sessions(1, timeout=10)
    return session.path


def copies(source: Path, folder: Path, count: int) -> None:
    head, rest = source.read_bytes().split(b"\n", 1)
    header = json.loads(head)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    folder.mkdir(mode=0o700)
    for n in range(count):
        when = start + dt.timedelta(seconds=n * 7.3)
        session = f"{n:08x}"
        header.update(session=session, start=when.isoformat(timespec="milliseconds")[:-6] + "Z")
        stamp = when.strftime("%Y%m%dT%H%M%S") + f"{when.microsecond // 1000:03d}Z"
        path = folder / f"{stamp}-{session}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(json.dumps(header).encode() + b"\n" + rest)


def timed_index(folder: Path) -> tuple[float, str]:
    began = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "smtpproxy", "index", str(folder)],
        capture_output=True,
        text=True,
        check=True,
    )
    return time.perf_counter() - began, done.stdout.strip()


def many_rows(base: dict[str, Any], count: int) -> list[Stored]:
    rng = random.Random(17)
    start = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    out = []
    for n in range(count):
        row = dict(base)
        ended = rng.random()
        faults = 1 if rng.random() < 0.05 else 0
        row.update(
            id=f"{n:08x}",
            start=(start + dt.timedelta(seconds=n * 3.1)).isoformat(timespec="milliseconds")[:-6]
            + "Z",
            client=f"10.{n % 7}.{n % 251}.{n % 13}:{40000 + n % 20000}",
            helo=f"mx{n % 997}.example.org",
            auth_user=f"user-{n % 500}@example.org" if n % 4 else "",
            auth_mechanism=("PLAIN", "LOGIN", "CRAM-MD5")[n % 3] if n % 4 else "",
            auth_ok=(None if n % 4 == 0 else int(rng.random() > 0.1)),
            tls_client="TLSv1.3" if n % 2 else "",
            accepted=rng.randint(0, 5),
            rejected=int(rng.random() < 0.08),
            faults=faults,
            fault_text="fault smtp: DATA 451 4.3.0 p=0.05: answered 451" if faults else "",
            duration=round(rng.expovariate(2.0), 3),
            closed_by="client" if ended > 0.02 else "proxy",
            reason="client closed the connection" if ended > 0.02 else "idle timeout",
        )
        row["search"] = search_text(row)
        out.append(Stored(f"x-{n:08x}.jsonl", 0.0, 0, row))
    return out


def percentiles(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"p50 {statistics.median(ordered) * 1000:.1f} ms, p95 {p95 * 1000:.1f} ms"


def time_runs(runs: int, call: Callable[[], object]) -> list[float]:
    samples = []
    for _ in range(runs):
        began = time.perf_counter()
        call()
        samples.append(time.perf_counter() - began)
    return samples


QUERIES: list[tuple[str, dict[str, Any]]] = [
    ("user filter, sorted by duration", dict(filters={"auth_user": "user-42@"}, sort="duration")),
    ("free text, sorted by start", dict(text="mx99.example", sort="start")),
    ("failed AUTH, sorted by client", dict(filters={"auth_ok": "failed"}, sort="client")),
    ("faults >0 and accepted >=3", dict(filters={"faults": ">0", "accepted": ">=3"})),
    ("no filter, sorted by accepted", dict(sort="accepted")),
    ("no filter, page 1000 (offset 49,950)", dict(sort="start", offset=49_950)),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recordings", type=int, default=10_000)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="smtpproxy-web-bench-"))
    os.environ.setdefault("SMTPPROXY_HOME", str(scratch / "home"))
    try:
        source = one_recording(scratch / "one")
        folder = scratch / "conn"
        copies(source, folder, args.recordings)
        size = source.stat().st_size
        print(f"## Building the index: {args.recordings:,} conn recordings of {size:,} B")
        cold, said = timed_index(folder)
        print(
            f"smtpproxy index (no index yet): {cold:.2f} s, {args.recordings / cold:,.0f} recordings/s ({said})"
        )
        warm, said = timed_index(folder)
        print(f"smtpproxy index (nothing changed): {warm:.2f} s ({said})")
        print(f"index size: {(folder / INDEX_NAME).stat().st_size / 1e6:.1f} MB")

        base = read_row(source).row
        assert base is not None
        big = scratch / "big"
        big.mkdir(mode=0o700)
        index = Index(big)
        began = time.perf_counter()
        index.put_all(many_rows(base, args.rows))
        print(f"\n## A page over {args.rows:,} rows ({args.runs} runs each, 50 rows a page)")
        print(
            f"stored {args.rows:,} rows in {time.perf_counter() - began:.1f} s; "
            f"index {(big / INDEX_NAME).stat().st_size / 1e6:.1f} MB"
        )
        for label, query in QUERIES:
            page = index.page(**query)
            samples = time_runs(args.runs, lambda q=query: index.page(**q))
            print(f"{label}: {page.total:,} match; {percentiles(samples)}")
        render(big, index, args.runs)
        index.close()
    finally:
        shutil.rmtree(scratch)


def render(folder: Path, index: Index, runs: int) -> None:
    """The first query's page as a browser gets it: ASGI app, template, escaping."""
    from starlette.testclient import TestClient

    from smtpproxy.web.app import WebConfig, create_app

    config = WebConfig(folder, hosts=frozenset({"127.0.0.1:8025"}))
    app = create_app(config, index)
    with TestClient(app, base_url="http://127.0.0.1:8025", backend="trio") as client:
        client.get(f"/?token={config.token}")
        url = "/?auth_user=user-42@&sort=duration"
        assert client.get(url).status_code == 200
        samples = time_runs(runs, lambda: client.get(url))
    print(f"the same page through the web app (GET {url}): {percentiles(samples)}")


if __name__ == "__main__":
    main()
