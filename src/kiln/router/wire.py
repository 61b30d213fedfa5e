"""HTTP/1.1 as the proxy writes it: header tables, status lines, canned answers.

Also the small vocabulary both sides of the proxy share to steer each other
(why a client's reads are paused, how a response body travels).
"""

from __future__ import annotations

from collections.abc import Iterable
from http import HTTPStatus

# Methods that may be sent to another instance after one closed the
# connection without answering.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

# Reasons a client connection's reads are paused (a bit mask).
PAUSE_UPSTREAM = 1  # the upstream connection's write buffer is full
PAUSE_WAIT = 2  # body bytes are piling up while no upstream is connected yet
PAUSE_QUEUE = 4  # pipelined requests are waiting for the current one

# Output is held until the end of the event loop iteration and written in
# one go (see Proxy.flush) unless this much is waiting: bulk transfers go out
# read by read, as flow control expects.
SEND_NOW = 64 * 1024
# Buffered pieces up to this size in all are joined into one write.
JOIN_LIMIT = 16 * 1024

# How the response body travels to the client.
BODY_NONE = 0
BODY_RAW = 1  # as received (Content-Length, or close-delimited to the client)
BODY_CHUNK = 2  # re-encoded as chunks

# Request header handling, by lower-cased name.
RQ_DROP = 1
RQ_HOST = 2
RQ_TE = 3
RQ_XFF = 4
RQ_PIN = 5
RQ_COOKIE = 6
RQ_EXPECT = 7
RQ_CONNECTION = 8
REQUEST_HEADERS = {
    b"connection": RQ_CONNECTION,
    b"keep-alive": RQ_DROP,
    b"proxy-connection": RQ_DROP,
    b"proxy-authorization": RQ_DROP,
    b"proxy-authenticate": RQ_DROP,
    b"te": RQ_DROP,
    b"trailer": RQ_DROP,
    b"upgrade": RQ_DROP,
    b"x-forwarded-proto": RQ_DROP,
    b"x-forwarded-host": RQ_DROP,
    b"transfer-encoding": RQ_TE,
    b"host": RQ_HOST,
    b"x-forwarded-for": RQ_XFF,
    b"x-kiln-release": RQ_PIN,
    b"cookie": RQ_COOKIE,
    b"expect": RQ_EXPECT,
}
RS_DROP = 1
RS_TE = 2
RS_LENGTH = 3
RS_CONNECTION = 4
RESPONSE_HEADERS = {
    b"connection": RS_CONNECTION,
    b"keep-alive": RS_DROP,
    b"proxy-connection": RS_DROP,
    b"proxy-authenticate": RS_DROP,
    b"te": RS_DROP,
    b"trailer": RS_DROP,
    b"upgrade": RS_DROP,
    b"transfer-encoding": RS_TE,
    b"content-length": RS_LENGTH,
    # The router sets these itself; an instance must not spoof them.
    b"x-kiln-release": RS_DROP,
    b"x-kiln-instance": RS_DROP,
}
_CONNECTION_TOKENS_KNOWN = frozenset({b"close", b"keep-alive", b"upgrade", b""})

STATUS_LINES = {
    int(s): b"HTTP/1.1 %d %s\r\n" % (int(s), s.phrase.encode()) for s in HTTPStatus if int(s) >= 200
}
FORWARDED_PROTO = b"X-Forwarded-Proto: http\r\n"
CHUNKED = b"Transfer-Encoding: chunked\r\n"
CONN_CLOSE = b"Connection: close\r\n"
CONN_KEEP = b"Connection: keep-alive\r\n"
LAST_CHUNK = b"0\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
COOKIE_NAME = b"kiln_release="

_ERROR_TEXT = {
    400: b"bad request\n",
    405: b"method not supported by the router\n",
    431: b"request head too large\n",
    502: b"the instance failed to answer\n",
    503: b"no instance available\n",
    504: b"the instance did not answer in time\n",
}


def status_line(status: int, reason: bytes) -> bytes:
    line = STATUS_LINES.get(status)
    if line is None:
        line = b"HTTP/1.1 %d %s\r\n" % (status, reason)
    return line


def error_response(status: int, close: bool, http10_keep_alive: bool = False) -> bytes:
    body = _ERROR_TEXT.get(status, b"error\n")
    conn = CONN_CLOSE if close else (CONN_KEEP if http10_keep_alive else b"")
    return b"%sContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s" % (
        status_line(status, b"Error"),
        len(body),
        conn,
        body,
    )


def connection_tokens(value: bytes) -> set[bytes]:
    """Header names a Connection header lists beyond the ones the proxy handles itself."""
    if value.lower() in _CONNECTION_TOKENS_KNOWN:  # the usual case, one plain token
        return set()
    return {t.strip().lower() for t in value.split(b",")} - _CONNECTION_TOKENS_KNOWN


def drop_request_headers(out: list[bytes], names: set[bytes]) -> Iterable[bytes]:
    # ``out`` is [request line x4, then name, ": ", value, "\r\n" per header].
    yield from out[:4]
    for i in range(4, len(out) - 3, 4):
        if out[i].lower() not in names:
            yield from out[i : i + 4]


def drop_response_headers(lines: list[bytes], names: set[bytes]) -> Iterable[bytes]:
    for i in range(0, len(lines) - 3, 4):
        if lines[i].lower() not in names:
            yield from lines[i : i + 4]
