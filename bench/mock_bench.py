#!/usr/bin/env python3
"""The mock's player against the embedded sink, without I/O.

    python bench/mock_bench.py RECORDING [--rounds 5]

Feeds the client's reads of RECORDING (one session, e.g. smtp-source
through ``smtpproxy record``), read by read, to ``mockplay.Player`` playing that
same recording and to the embedded sink's ``server._Sink``, in alternating
rounds, and prints the least CPU time of each per message. This is the part
of serving that the two do differently; the proxy in front and the socket
I/O are the same code (``bench/run.py --workloads mock`` times it all).
"""

from __future__ import annotations

import argparse
import time

from smtpproxy.events import MessageEnd, Side
from smtpproxy.mockplay import MockOptions, Player, Script
from smtpproxy.recording import read_recording
from smtpproxy.server import SinkConfig, SinkStats, _Sink


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recording")
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rec = read_recording(args.recording)
    reads = [e.event.raw for e in rec.entries if e.event.side is Side.CLIENT and e.event.raw]
    messages = sum(1 for e in rec.events() if isinstance(e, MessageEnd))
    script = Script(rec)

    def mock() -> None:
        player = Player(script, MockOptions())
        player.greeting()
        for data in reads:
            player.receive(data)
        if player.finish():
            raise SystemExit(f"the player departed: {player.departures[0].describe()}")

    def sink() -> None:
        server = _Sink(SinkConfig(), SinkStats())
        server.greeting()
        for data in reads:
            server.receive(data)

    best: dict[str, float] = {}
    for _ in range(args.rounds):
        for name, run in (("mock", mock), ("sink", sink)):
            start = time.process_time()
            run()
            took = time.process_time() - start
            best[name] = min(best.get(name, took), took)
    print(f"{len(reads)} client reads, {messages} messages, least of {args.rounds} rounds:")
    for name, seconds in best.items():
        print(f"  {name}: {seconds:.2f} s CPU, {seconds / max(1, messages) * 1e6:.0f} us/message")
    print(f"  mock / sink: {best['mock'] / best['sink']:.2f}")


if __name__ == "__main__":
    main()
