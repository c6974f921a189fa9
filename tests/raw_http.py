"""A tiny HTTP/1.1 server for tests, written apart from batcher's simulator: it shares no code with
batcher, so a test against it checks batcher against a server batcher did not write.

The handler gets each parsed request and the raw socket stream, and writes whatever bytes it
likes (hostile servers lie about lengths, never finish, send junk). It serves on 127.0.0.1, on an
ephemeral port, from its own thread and event loop; `stop()` cancels every connection.

    >>> async def handler(req, stream): await stream.send(reply(200, b"{}")); return True
    >>> with RawServer(handler) as server:
    ...     server.url  # http://127.0.0.1:PORT
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import anyio
import anyio.from_thread
import anyio.lowlevel
from anyio.abc import SocketAttribute, SocketStream

MAX_HEAD = 64 * 1024
MAX_BODY = 4 * 1024 * 1024
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
           429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}


@dataclass
class Request:
    method: str
    target: str  # path and query, as sent
    headers: dict[str, str]  # lower-cased names; the last of repeated headers wins
    body: bytes
    header_names: list[str] = field(default_factory=list)  # as sent, in order


Handler = Callable[[Request, SocketStream], Awaitable[bool]]
"""Answers one request; returns True to keep the connection open for the next one."""


def reply(status: int, body: bytes, headers: dict[str, str] | None = None,
          content_type: str = "application/json") -> bytes:
    """One whole HTTP/1.1 answer with an honest Content-Length."""
    head = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}", f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


async def _read_request(stream: SocketStream, buf: bytearray) -> Request | None:
    while (end := buf.find(b"\r\n\r\n")) < 0:
        if len(buf) > MAX_HEAD:
            return None
        try:
            chunk = await stream.receive(65536)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return None
        buf += chunk
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    del buf[: end + 4]
    method, target, _ = ([*lines[0].split(" ", 2), "", ""])[:3]
    headers: dict[str, str] = {}
    names: list[str] = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        names.append(name.strip())
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or 0)
    if length > MAX_BODY:
        return None
    while len(buf) < length:
        try:
            buf += await stream.receive(65536)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
            return None
    body = bytes(buf[:length])
    del buf[:length]
    return Request(method, target, headers, body, names)


class RawServer:
    """Serve `handler` on 127.0.0.1:<ephemeral> from a daemon thread until `stop()`."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.url = ""
        self.errors: list[BaseException] = []  # handler crashes: a test asserts there are none
        self._thread: threading.Thread | None = None
        self._scope: anyio.CancelScope | None = None
        self._token: anyio.lowlevel.EventLoopToken | None = None
        ready = threading.Event()

        async def main() -> None:
            self._token = anyio.lowlevel.current_token()
            listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
            with anyio.CancelScope() as scope:
                self._scope = scope
                async with listener:
                    self.url = f"http://127.0.0.1:{listener.extra(SocketAttribute.local_port)}"
                    ready.set()
                    await listener.serve(self._connection)

        def target() -> None:
            try:
                anyio.run(main)
            except BaseException as exc:
                self.errors.append(exc)
            finally:
                ready.set()

        self._thread = threading.Thread(target=target, name="raw-http-test-server", daemon=True)
        self._thread.start()
        if not ready.wait(timeout=10) or not self.url:
            self.stop()
            raise RuntimeError(f"test server failed to start: {self.errors}")

    async def _connection(self, stream: SocketStream) -> None:
        buf = bytearray()
        try:
            async with stream:
                for _ in range(10_000):  # bounded: a keep-alive connection serves at most this many
                    request = await _read_request(stream, buf)
                    if request is None or not await self.handler(request, stream):
                        return
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass  # the client went away
        except Exception as exc:
            self.errors.append(exc)

    def stop(self) -> None:
        """Cancel the server and every connection, join its thread (at most 10 s)."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        if self._scope is not None and self._token is not None and thread.is_alive():
            try:
                anyio.from_thread.run_sync(self._scope.cancel, token=self._token)
            except RuntimeError:
                pass  # the loop already ended
        thread.join(timeout=10)

    def __enter__(self) -> RawServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
