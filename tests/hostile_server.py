"""A hostile Images API on 127.0.0.1 whose failure mode is chosen by the URL path.

Point batcher at `{server.url}/mode/<name>/v1`: `POST .../images/generations` then misbehaves as
`<name>` says (see MODES), and `GET /mode/<name>/files/<file>` serves (or drips) an image for the
modes that answer with a URL. Modes marked "once" misbehave on their first request only and
answer a whole PNG after that, so a test can see that batcher recovers; the others misbehave on
every request. `hits[name]` counts generation requests per mode.

    >>> with HostileServer() as server:
    ...     base_url = server.base_url("nested-json")
"""

from __future__ import annotations

import base64
import json
import struct
import threading
import time
import zlib
from email.utils import formatdate

import anyio
from anyio.abc import SocketStream

from raw_http import RawServer, Request, reply

__all__ = ["HostileServer", "MODES", "png", "whole_png", "DEPTH"]

DEPTH = 5_000  # JSON nesting of the nested-* modes: far past Python's recursion limit
DRIP_INTERVAL = 0.05  # seconds between the bytes of a body that never ends
DRIP_MAX_S = 120.0  # ... which still stops after this long, so no test can hang on it forever


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def png(width: int = 8, height: int = 8, seed: int = 0) -> bytes:
    """A whole, valid RGB PNG: IHDR, IDAT, IEND, each with its CRC (no code shared with batcher)."""
    row = b"\x00" + bytes(((seed * 37) % 256, (seed * 91) % 256, 128)) * width
    return b"".join((b"\x89PNG\r\n\x1a\n",
                     _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)),
                     _chunk(b"tEXt", b"seed\x00%d" % seed),
                     _chunk(b"IDAT", zlib.compress(row * height)),
                     _chunk(b"IEND", b"")))


def whole_png(data: bytes) -> bool:
    """True when `data` is a PNG whose chunks all check out (CRCs) up to IEND and nothing after."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    pos = 8
    for _ in range(100_000):  # bounded: one step per chunk
        if pos + 12 > len(data):
            return False
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        end = pos + 12 + length
        if end > len(data):
            return False
        if struct.unpack(">I", data[end - 4:end])[0] != zlib.crc32(data[pos + 8:end - 4], zlib.crc32(kind)):
            return False
        if kind == b"IEND":
            return end == len(data)
        pos = end
    return False


def _images_body(images: list[bytes]) -> bytes:
    data = [{"b64_json": base64.b64encode(img).decode("ascii")} for img in images]
    return json.dumps({"created": int(time.time()), "data": data}).encode()


def _error(status: int, etype: str, code: str | None, message: str = "hostile") -> dict:
    return {"error": {"message": message, "type": etype, "param": None, "code": code}}


# name -> what the generation endpoint answers (documentation for the tests' parametrization)
MODES = {
    "ok": "a whole PNG as b64_json",
    "nested-json": f"200 whose body is a JSON array nested {DEPTH} deep",
    "nested-data": f"200 whose `data` is a JSON array nested {DEPTH} deep",
    "truncated-png": "200 with the first half of a PNG as b64_json",
    "png-html": "200 with PNG magic bytes followed by an HTML page as b64_json",
    "ra-nan": "once: 429 with retry-after-ms: nan",
    "ra-inf": "once: 429 with retry-after-ms: inf",
    "ra-negative": "once: 429 with retry-after-ms: -5",
    "ra-huge": "once: 429 with retry-after-ms: 1e12",
    "ra-past": "once: 429 with Retry-After an HTTP date in the past",
    "huge-header": "once: 429 carrying a 64 KB header",
    "bare-429": "once: a bare 429, only Retry-After: 1, then never limits again",
    "event-stream": "200 text/event-stream, as a streaming answer would come",
    "length-short": "200 whose Content-Length is shorter than the JSON body",
    "length-long": "200 whose Content-Length is longer than the body, then the connection closes",
    "error-200": "200 carrying an OpenAI error object (server_error)",
    "policy-200": "200 carrying an OpenAI error object (content_policy_violation)",
    "endless-body": "200, chunked, one byte every 50 ms, never ending",
    "drip-url": "200 with a URL whose download drips one byte every 50 ms",
    "short-n": "200 with one image whatever `n` asked for",
    "echo-key": "200 whose revised_prompt echoes the Authorization header back",
    "echo-key-error": "400 whose error message echoes the Authorization header back",
    "fastapi-422": "422 in FastAPI's shape: detail[].loc / msg",
}
_ONCE = {"ra-nan": {"retry-after-ms": "nan"}, "ra-inf": {"retry-after-ms": "inf"},
         "ra-negative": {"retry-after-ms": "-5"}, "ra-huge": {"retry-after-ms": "1e12"},
         "ra-past": {"retry-after": formatdate(946684800, usegmt=True)},  # 2000-01-01
         "huge-header": {"retry-after": "0", "x-padding": "p" * 65536},
         "bare-429": {"retry-after": "1"}}


class HostileServer:
    """The hostile server, running until `stop()` (or the `with` block ends)."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.bodies: dict[str, list[dict]] = {}  # mode -> the JSON bodies of its generation requests
        self.downloads: dict[str, int] = {}
        self._lock = threading.Lock()
        self._server = RawServer(self._handle)
        self.url = self._server.url

    def base_url(self, mode: str) -> str:
        assert mode in MODES, mode
        return f"{self.url}/mode/{mode}/v1"

    @property
    def errors(self) -> list[BaseException]:
        return self._server.errors

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> HostileServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _handle(self, req: Request, stream: SocketStream) -> bool:
        parts = req.target.split("?")[0].split("/")  # "", "mode", NAME, ...
        mode = parts[2] if len(parts) > 3 and parts[1] == "mode" else ""
        if mode not in MODES:
            await stream.send(reply(404, json.dumps(_error(404, "invalid_request_error", "unknown_url")).encode()))
            return True
        if req.method == "GET" and "files" in parts:
            with self._lock:
                self.downloads[mode] = self.downloads.get(mode, 0) + 1
            return await self._download(mode, stream)
        if req.method != "POST" or not req.target.split("?")[0].endswith("/images/generations"):
            await stream.send(reply(404, json.dumps(_error(404, "invalid_request_error", "unknown_url")).encode()))
            return True
        with self._lock:
            self.hits[mode] = hits = self.hits.get(mode, 0) + 1
            try:
                self.bodies.setdefault(mode, []).append(json.loads(req.body))
            except ValueError:
                self.bodies.setdefault(mode, []).append({})
        return await self._generate(mode, hits, req, stream)

    async def _generate(self, mode: str, hits: int, req: Request, stream: SocketStream) -> bool:
        whole = png(8, 8, hits)
        if mode in _ONCE and hits == 1:
            body = json.dumps(_error(429, "requests", "rate_limit_exceeded", "Rate limit reached")).encode()
            if mode == "bare-429":
                head = b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 0\r\n\r\n"
                await stream.send(head)
                return True
            await stream.send(reply(429, body, _ONCE[mode]))
            return True
        if mode == "nested-json":
            await stream.send(reply(200, b"[" * DEPTH + b"]" * DEPTH))
        elif mode == "nested-data":
            await stream.send(reply(200, b'{"created": 1, "data": ' + b"[" * DEPTH + b"]" * DEPTH + b"}"))
        elif mode == "truncated-png":
            await stream.send(reply(200, _images_body([whole[: len(whole) // 2]])))
        elif mode == "png-html":
            page = b"<html><head><title>502 Bad Gateway</title></head><body>nginx</body></html>" * 4
            await stream.send(reply(200, _images_body([b"\x89PNG\r\n\x1a\n" + page])))
        elif mode == "event-stream":
            event = {"type": "image_generation.completed", "b64_json": base64.b64encode(whole).decode(),
                     "created_at": int(time.time()), "size": "8x8", "quality": "low", "background": "opaque",
                     "output_format": "png", "usage": {"input_tokens": 1, "output_tokens": 1, "total_tokens": 2,
                                                       "input_tokens_details": {"text_tokens": 1, "image_tokens": 0}}}
            body = f"event: image_generation.completed\ndata: {json.dumps(event)}\n\n".encode()
            await stream.send(reply(200, body, content_type="text/event-stream"))
        elif mode == "length-short":
            body = _images_body([whole])
            await stream.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 20\r\n"
                              b"Connection: close\r\n\r\n" + body)
            return False
        elif mode == "length-long":
            body = _images_body([whole])
            await stream.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                              % (len(body) + 10_000) + body)
            return False  # and close: the promised rest never comes
        elif mode == "error-200":
            await stream.send(reply(200, json.dumps(_error(200, "server_error", "server_error")).encode()))
        elif mode == "policy-200":
            err = _error(200, "invalid_request_error", "content_policy_violation",
                         "Your request was rejected as a result of our safety system.")
            await stream.send(reply(200, json.dumps(err).encode()))
        elif mode == "endless-body":
            await stream.send(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n")
            await self._drip(stream, chunked=True)
            return False
        elif mode == "drip-url":
            port = self.url.rsplit(":", 1)[1]
            body = {"created": int(time.time()),
                    "data": [{"url": f"http://127.0.0.1:{port}/mode/drip-url/files/{hits}.png"}]}
            await stream.send(reply(200, json.dumps(body).encode()))
        elif mode == "echo-key":
            body = json.loads(_images_body([whole]))
            body["data"][0]["revised_prompt"] = f"debug: you sent {req.headers.get('authorization', '')}"
            await stream.send(reply(200, json.dumps(body).encode()))
        elif mode == "echo-key-error":
            err = _error(400, "invalid_request_error", "invalid_value",
                         f"Bad request with header Authorization: {req.headers.get('authorization', '')}")
            await stream.send(reply(400, json.dumps(err).encode()))
        elif mode == "fastapi-422":
            detail = {"detail": [{"loc": ["body", "size"], "msg": "size must be one of 256x256, 512x512",
                                  "type": "value_error"}]}
            await stream.send(reply(422, json.dumps(detail).encode()))
        else:  # "ok", "short-n", and the once-modes after their first request
            await stream.send(reply(200, _images_body([whole])))
        return True

    async def _download(self, mode: str, stream: SocketStream) -> bool:
        image = png(8, 8, 99)
        if mode != "drip-url":
            await stream.send(reply(200, image, content_type="image/png"))
            return True
        await stream.send(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n"
                          % (len(image) + 1_000_000) + image[:8])
        await self._drip(stream, chunked=False)
        return False

    @staticmethod
    async def _drip(stream: SocketStream, *, chunked: bool) -> None:
        """One byte every DRIP_INTERVAL until the client leaves (or DRIP_MAX_S passes)."""
        for _ in range(int(DRIP_MAX_S / DRIP_INTERVAL)):
            await anyio.sleep(DRIP_INTERVAL)
            await stream.send(b"1\r\n \r\n" if chunked else b" ")
