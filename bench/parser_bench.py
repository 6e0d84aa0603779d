#!/usr/bin/env python3
"""Micro benchmark of the protocol module alone (no sockets, no trio).

    python bench/parser_bench.py [--transactions N] [--body-mb M]

Reports events per second over a recorded-style transcript (many small
transactions, pipelined, replies in separate reads) and MB/s for a large DATA
body fed in 64 KiB reads. Targets (issue 7): >= 200,000 events/s and
>= 200 MB/s on one core.
"""

from __future__ import annotations

import argparse
import time

from smtpproxy.events import Side
from smtpproxy.protocol import Conversation

C, S = Side.CLIENT, Side.SERVER


def transcript(transactions: int) -> list[tuple[Side, bytes]]:
    body = (
        b"Subject: bench\r\nFrom: a@example.org\r\nTo: b@example.net\r\n\r\n" + b"x" * 70 + b"\r\n"
    ) * 12
    steps: list[tuple[Side, bytes]] = [
        (S, b"220 mx.example ESMTP\r\n"),
        (C, b"EHLO client.example\r\n"),
        (S, b"250-mx.example\r\n250-PIPELINING\r\n250-SIZE 52428800\r\n250 8BITMIME\r\n"),
    ]
    for i in range(transactions):
        steps += [
            (C, b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"),
            (S, b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n354 go ahead\r\n"),
            (C, body + b".\r\n"),
            (S, b"250 2.0.0 queued as %08X\r\n" % i),
        ]
    steps += [(C, b"QUIT\r\n"), (S, b"221 bye\r\n")]
    return steps


def bench_events(transactions: int) -> tuple[int, float]:
    steps = transcript(transactions)
    conv = Conversation()
    n = 0
    t0 = time.perf_counter()
    for side, data in steps:
        n += len(conv.feed(side, data))
    n += len(conv.close())
    return n, time.perf_counter() - t0


def bench_body(megabytes: int) -> float:
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789\r\n"
    chunk = line * (65536 // len(line))
    total = megabytes * 1024 * 1024
    conv = Conversation()
    conv.feed(S, b"220 x\r\n")
    conv.feed(C, b"EHLO a\r\n")
    conv.feed(S, b"250 x\r\n")
    conv.feed(C, b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
    conv.feed(S, b"250 ok\r\n250 ok\r\n354 go\r\n")
    sent = 0
    t0 = time.perf_counter()
    while sent < total:
        conv.feed(C, chunk)
        sent += len(chunk)
    conv.feed(C, b".\r\n")
    return sent / (time.perf_counter() - t0) / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--transactions", type=int, default=20000)
    ap.add_argument("--body-mb", type=int, default=200)
    args = ap.parse_args()
    n, secs = bench_events(args.transactions)
    print(f"events: {n} in {secs:.3f}s = {n / secs:,.0f} events/s")
    print(f"DATA body: {bench_body(args.body_mb):,.0f} MB/s")


if __name__ == "__main__":
    main()
