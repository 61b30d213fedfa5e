"""Passing listening sockets from a running router to its successor.

The new router asks the old one (``POST /takeover`` on its control socket)
and gets back the current config as JSON, with the listening sockets
attached to the same message as SCM_RIGHTS file descriptors. Both processes
then hold the very same kernel sockets: connections waiting in the backlog
belong to whichever process accepts them next, so once the old router stops
calling accept, nothing queued is lost. The new router keeps that control
connection open and sends ``POST /shutdown`` on it when it is ready, which
also works when it has meanwhile taken over the control socket's path.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httptools

from kiln.errors import RouterError
from kiln.router.config import Address, InvalidConfig

MAX_FDS = 512


def send_with_fds(transport: asyncio.BaseTransport, data: bytes, fds: Sequence[int]) -> None:
    """Write ``data`` to the transport's socket with ``fds`` attached to its first byte."""
    raw = transport.get_extra_info("socket")
    # A duplicate descriptor, so the transport's own socket stays untouched.
    sock = socket.socket(fileno=os.dup(raw.fileno()))
    try:
        sent = socket.send_fds(sock, [data], list(fds))
    finally:
        sock.close()
    if sent < len(data):
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(data[sent:])


class _Response:
    def __init__(self) -> None:
        self.body: list[bytes] = []
        self.complete = False

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_message_complete(self) -> None:
        self.complete = True


class Takeover:
    """The new router's end of a handover, over the old router's control socket."""

    def __init__(self, control_path: Path, *, timeout: float = 10.0) -> None:
        self.path = control_path
        self.timeout = timeout
        self._sock: socket.socket | None = None

    def fetch(self) -> tuple[dict[str, Any], dict[Address, socket.socket]]:
        """The old router's config and its listening sockets, by address."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            raise RouterError(
                f"cannot reach the router to take over at {self.path}: {exc.strerror or exc}",
                hint="is it running?",
            ) from exc
        self._sock = sock
        try:
            sock.sendall(b"POST /takeover HTTP/1.1\r\nHost: router\r\nContent-Length: 0\r\n\r\n")
            status, body, fds = self._read_response(with_fds=True)
        except OSError as exc:
            self.abandon()
            raise RouterError(f"takeover from {self.path} failed: {exc}") from exc
        sockets = [socket.socket(fileno=fd) for fd in fds]
        try:
            if status != 200:
                raise RouterError(f"the old router refused the takeover: {_error_text(body)}")
            payload = json.loads(body)
            names = payload["listeners"]
            if len(names) != len(sockets):
                raise RouterError(
                    f"takeover: expected {len(names)} listening sockets, got {len(sockets)}"
                )
            by_addr = {
                Address.parse(name, "listeners"): s for name, s in zip(names, sockets, strict=True)
            }
            config = payload["config"]
            if not isinstance(config, dict):
                raise RouterError("takeover: the old router sent no config")
        except (ValueError, KeyError, TypeError, InvalidConfig, RouterError) as exc:
            for s in sockets:
                s.close()
            self.abandon()
            if isinstance(exc, RouterError):
                raise
            raise RouterError(f"takeover: malformed answer from the old router: {exc}") from exc
        return config, by_addr

    def finish(self, drain: float) -> None:
        """Tell the old router to stop accepting, drain and exit."""
        sock = self._sock
        if sock is None:
            return
        try:
            request = (
                f"POST /shutdown?drain={drain:g} HTTP/1.1\r\nHost: router\r\n"
                "Content-Length: 0\r\n\r\n"
            )
            sock.sendall(request.encode())
            status, body, _ = self._read_response(with_fds=False)
        except OSError as exc:
            raise RouterError(f"could not tell the old router to drain: {exc}") from exc
        finally:
            self.abandon()
        if status >= 300:
            raise RouterError(f"the old router refused to drain: {_error_text(body)}")

    def abandon(self) -> None:
        """Close the connection; an unfinished handover is then cancelled."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _read_response(self, *, with_fds: bool) -> tuple[int, bytes, list[int]]:
        sock = self._sock
        assert sock is not None
        result = _Response()
        parser = httptools.HttpResponseParser(result)
        fds: list[int] = []
        while not result.complete:
            if with_fds:
                data, got, flags, _ = socket.recv_fds(sock, 65536, MAX_FDS)
                fds.extend(got)
                if flags & socket.MSG_CTRUNC:
                    for fd in fds:
                        os.close(fd)
                    raise OSError("listening sockets were truncated in transit")
            else:
                data = sock.recv(65536)
            if not data:
                for fd in fds:
                    os.close(fd)
                raise OSError("connection closed before the answer was complete")
            try:
                parser.feed_data(data)
            except httptools.HttpParserError as exc:
                for fd in fds:
                    os.close(fd)
                raise OSError(f"malformed answer: {exc}") from exc
        return int(parser.get_status_code()), b"".join(result.body), fds


def _error_text(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace")[:200]
