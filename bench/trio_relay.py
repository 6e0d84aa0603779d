#!/usr/bin/env python3
"""A minimal trio TCP byte relay: the baseline smtpproxy is measured against.

python bench/trio_relay.py LISTEN_PORT UPSTREAM_PORT
"""

import sys
from functools import partial

import trio

BUFSIZE = 256 * 1024


async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
    try:
        while data := await src.receive_some(BUFSIZE):
            await dst.send_all(data)
        await dst.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def handle(upstream_port: int, client: trio.SocketStream) -> None:
    async with client:
        try:
            upstream = await trio.open_tcp_stream("127.0.0.1", upstream_port)
        except OSError:
            return
        async with upstream:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, client, upstream)
                nursery.start_soon(pump, upstream, client)


async def main() -> None:
    listen, upstream = int(sys.argv[1]), int(sys.argv[2])
    await trio.serve_tcp(partial(handle, upstream), listen, host="127.0.0.1", backlog=4096)


if __name__ == "__main__":
    try:
        trio.run(main)
    except KeyboardInterrupt:
        pass
