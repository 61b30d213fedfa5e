"""A small, fast HTTP/1.1 server for proxy benchmarks: ``python -m benchmarks.upstream PORT``.

One process, uvloop + httptools, a fixed 13-byte answer to any request. It
keeps connections alive unless the request says ``Connection: close`` (or is
HTTP/1.0 without keep-alive), then it answers with ``Connection: close`` and
hangs up, so a client like wrk really opens a new connection per request.
Directly under wrk it answers well over twice what a proxy in front of it
manages on the same machine, so it is not what a proxy benchmark measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import cast

import httptools
import uvloop

_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n"
KEEP_ALIVE = _HEAD + b"\r\nHello, world!"
CLOSE = _HEAD + b"Connection: close\r\n\r\nHello, world!"


class Hello(asyncio.Protocol):
    """Answers every request with ``Hello, world!``."""

    __slots__ = ("closing", "parser", "transport")

    def __init__(self) -> None:
        self.transport = cast(asyncio.Transport, None)
        self.parser = httptools.HttpRequestParser(self)
        self.closing = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.closing = True
            self.transport.close()

    def on_message_complete(self) -> None:
        if self.closing:
            return  # pipelined behind a request that asked to close
        if self.parser.should_keep_alive():
            self.transport.write(KEEP_ALIVE)
        else:
            self.transport.write(CLOSE)
            self.closing = True
            self.transport.close()  # after the answer is written


async def serve(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Hello, "127.0.0.1", port, backlog=4096)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m benchmarks.upstream PORT", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(int(argv[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
