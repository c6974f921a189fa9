"""A local simulator of the OpenAI Images API, for tests, benchmarks and `batcher run --simulate`.

It binds to 127.0.0.1, speaks just enough HTTP/1.1 (keep-alive, Content-Length bodies),
answers real PNGs, and can be told to misbehave the ways real endpoints and gateways do:
rate limits over a sliding one-second window, quota exhaustion, 5xx, dropped connections,
malformed bodies, hangs, content-policy rejections, proxy quirks and a total outage after
a while. It counts every generation per prompt so tests can prove that nothing was paid for twice.

`SimulatorConfig.dialect` makes it speak one provider's variant and enforce its rules:
`openai` (gpt-image: no response_format, b64_json + usage), `azure-openai` (deployment paths,
api-version, api-key header), `xai` (aspect_ratio not size, moderation flag on a 200).

Only anyio and the standard library: httpx stays confined to the client module.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import random
import re
import secrets
import signal
import struct
import sys
import threading
import time
import traceback
import zlib
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote

import anyio
import anyio.from_thread
import anyio.lowlevel
from anyio.abc import SocketAttribute, SocketStream, TaskStatus

from ._simbatch import MAX_UPLOAD, UPLOAD_PATHS, BatchAPI

__all__ = ["SimulatorConfig", "Simulator", "ANSWER_FAULTS", "RunningSimulator", "start_in_thread", "main_serve"]

MAX_HEAD = 64 * 1024
MAX_BODY = 1024 * 1024
MAX_FILES = 2000
MAX_FILE_BYTES = 512 * 1024 * 1024
GENERATION_PATHS = ("/v1/images/generations", "/images/generations")
DIALECT_NAMES = ("openai-compatible", "openai", "azure-openai", "xai")
ANSWER_FAULTS = ("short", "policy-200", "echo-key", "prism-422", "fastapi-422")
LIMIT_STYLES = ("window", "bucket", "minute")
_AZURE_PATH = re.compile(r"(?:/v1)?/openai/deployments/([^/]+)/images/generations")
XAI_ASPECT_RATIOS = ("1:1", "3:4", "4:3", "9:16", "16:9", "2:3", "3:2", "9:19.5", "19.5:9", "9:20", "20:9",
                     "1:2", "2:1", "auto")

_REASONS = {
    100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 422: "Unprocessable Entity",
    411: "Length Required", 413: "Payload Too Large", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error", 502: "Bad Gateway",
    503: "Service Unavailable",
}
# Few colours, so the compressed pixels of each size are computed once and reused.
_PALETTE = [
    (200, 60, 60), (60, 160, 90), (50, 90, 200), (220, 180, 40), (140, 70, 170), (30, 170, 170),
    (240, 130, 40), (90, 90, 90), (250, 240, 230), (20, 30, 60), (120, 200, 80), (230, 100, 160),
    (100, 60, 30), (170, 210, 240), (60, 60, 150), (210, 210, 90),
]
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SIZE_RE = re.compile(r"([0-9]{1,5})x([0-9]{1,5})")
_MALFORMED = b'{"created": 1717000000, "data": [{"b64_json": "iVBORw0KGgoAAAANSUhEUgAA'


@dataclass(frozen=True)
class SimulatorConfig:
    """How the simulated endpoint behaves. Rates are fractions of generation requests."""

    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    rpm: float | None = None  # the CLI passes floats; ints work the same
    ipm: float | None = None
    advertise_limits: bool = True
    api_key: str | None = None
    fail_rate: float = 0.0
    drop_rate: float = 0.0
    malformed_rate: float = 0.0
    hang_rate: float = 0.0
    hang_s: float = 600.0
    policy_word: str = "forbidden"
    quota_images: int | None = None
    image_bytes: int = 0
    max_n: int = 10
    seed: int | None = None
    gateway_quirks: bool = False
    dialect: str = "openai-compatible"  # one of DIALECT_NAMES
    fail_all_after_s: float | None = None  # an outage: every generation request after this answers 500
    # How answers go wrong, as servers batcher did not write were seen to (one of ANSWER_FAULTS):
    # "short": half the images asked for (at least one); "policy-200": the policy word is refused inside a 200
    # body; "echo-key": every generation is refused 400 quoting the key presented; "prism-422" / "fastapi-422": every
    # generation is refused 422 with the validation details of a Prism mock / a FastAPI server.
    answer_fault: str | None = None
    # how rpm/ipm are enforced and advertised: "window" (a sliding window of one second's share,
    # headers count it), "bucket" (a token bucket of one second's share refilled at the limit's
    # rate; remaining 0..rpm/60, reset = until full, <= 1 s), "minute" (enforced as "window",
    # headers count the minute as OpenAI's do: remaining 0..rpm, reset up to 60 s)
    limit_style: str = "window"
    lone_429_at: int | None = None  # the k-th generation request gets a bare 429 (Retry-After: 1), once
    # hostile answers (issue 15): a 200 whose JSON nests 2,000 deep, an image cut short (valid base64,
    # honest Content-Length), a revised_prompt of this many characters, URL downloads that drip
    deep_json_rate: float = 0.0
    truncated_rate: float = 0.0
    revised_prompt_chars: int | None = None
    drip_bytes_per_s: float | None = None
    # provider Batch APIs (issue 16, batcher/_simbatch.py): real seconds per simulated second (the
    # default runs a "24h" batch's requests within ~2 s), and faults: a batch that fails validation,
    # expiry this many simulated seconds after creation (partial output + batch_expired error lines),
    # "5xx" or "hang" answers to the first `batch_fault_count` uploads / creates (the file or batch
    # is stored before the failure answer), result image URLs that stop working after N real seconds
    batch_time_scale: float = 2.0 / 86400.0
    batch_validation_fail: bool = False
    batch_expire_after: float | None = None
    batch_upload_fault: str | None = None
    batch_create_fault: str | None = None
    batch_fault_count: int = 1
    batch_url_ttl: float | None = None

    def __post_init__(self) -> None:
        if self.answer_fault is not None and self.answer_fault not in ANSWER_FAULTS:
            raise ValueError(f"unknown answer fault {self.answer_fault!r} (known: {', '.join(ANSWER_FAULTS)})")
        if self.dialect not in DIALECT_NAMES:
            raise ValueError(f"unknown simulator dialect {self.dialect!r} (known: {', '.join(DIALECT_NAMES)})")
        for name in ("batch_upload_fault", "batch_create_fault"):
            if getattr(self, name) not in (None, "5xx", "hang"):
                raise ValueError(f"unknown {name} {getattr(self, name)!r} (known: 5xx, hang)")
        if not self.batch_time_scale > 0:
            raise ValueError("batch_time_scale must be positive")
        if self.limit_style not in LIMIT_STYLES:
            raise ValueError(f"unknown limit style {self.limit_style!r} (known: {', '.join(LIMIT_STYLES)})")


def _window_shape(per_minute: float) -> tuple[int, float]:
    """(capacity C, window W seconds) for a per-minute limit; the client limiter uses the same rule."""
    capacity = max(1, round(per_minute / 60.0))
    return capacity, 60.0 * capacity / per_minute


class _Window:
    """One per-minute limit as the provider enforces it: at most C units in any W seconds, sliding."""

    def __init__(self, per_minute: float) -> None:
        self.per_minute = per_minute
        self.capacity, self.period = _window_shape(per_minute)
        self.log: deque[tuple[float, int]] = deque()  # (admit time, cost), oldest first
        self.used = 0

    def expire(self, now: float) -> None:
        while self.log and self.log[0][0] <= now - self.period:
            self.used -= self.log.popleft()[1]

    def wait(self, now: float, cost: int) -> float:
        """Seconds until `cost` more units fit (0 = now)."""
        self.expire(now)
        if self.used + cost <= self.capacity or not self.log:
            return 0.0  # a cost above capacity is admitted alone, or it could never be
        need, freed = self.used + cost - self.capacity, 0
        for t, c in self.log:
            freed += c
            if freed >= need:
                return t + self.period - now
        return self.log[-1][0] + self.period - now

    def admit(self, now: float, cost: int) -> None:
        self.log.append((now, cost))
        self.used += cost

    def reset_in(self, now: float) -> float:
        """Seconds until the oldest entry leaves the window."""
        self.expire(now)
        return self.log[0][0] + self.period - now if self.log else 0.0

    def advertise(self, now: float) -> tuple[float, float]:
        """(remaining, reset seconds) as the x-ratelimit-* headers say them."""
        self.expire(now)
        return max(self.capacity - self.used, 0), self.reset_in(now)


class _Bucket:
    """A token bucket of one second's share: C tokens, refilled at the limit's rate (C per W s).

    Advertises what such servers do: remaining = whole tokens (0..C), reset = until full (<= W).
    """

    def __init__(self, per_minute: float) -> None:
        self.per_minute = per_minute
        self.capacity, self.period = _window_shape(per_minute)
        self.rate = per_minute / 60.0
        self.tokens = float(self.capacity)
        self.at: float | None = None

    def _refill(self, now: float) -> None:
        if self.at is not None:
            self.tokens = min(float(self.capacity), self.tokens + (now - self.at) * self.rate)
        self.at = now

    def wait(self, now: float, cost: int) -> float:
        self._refill(now)
        need = min(cost, self.capacity)  # a cost above capacity goes when the bucket is full
        return 0.0 if self.tokens >= need - 1e-9 else (need - self.tokens) / self.rate

    def admit(self, now: float, cost: int) -> None:
        self._refill(now)
        self.tokens -= min(cost, self.tokens)

    def advertise(self, now: float) -> tuple[float, float]:
        self._refill(now)
        return math.floor(self.tokens + 1e-9), (self.capacity - self.tokens) / self.rate


class _MinuteCount(_Window):
    """Enforced as a window of one second's share; advertised, as OpenAI does, over the minute:
    remaining = limit - units admitted in the last 60 s, reset = until all of them have left."""

    def __init__(self, per_minute: float) -> None:
        super().__init__(per_minute)
        self.minute: deque[tuple[float, int]] = deque()
        self.minute_used = 0

    def admit(self, now: float, cost: int) -> None:
        super().admit(now, cost)
        self.minute.append((now, cost))
        self.minute_used += cost

    def advertise(self, now: float) -> tuple[float, float]:
        while self.minute and self.minute[0][0] <= now - 60.0:
            self.minute_used -= self.minute.popleft()[1]
        remaining = max(math.floor(self.per_minute) - self.minute_used, 0)
        return remaining, (self.minute[-1][0] + 60.0 - now if self.minute else 0.0)


_Limit = _Window | _Bucket
_LIMITS: dict[str, type[_Window] | type[_Bucket]] = {"window": _Window, "bucket": _Bucket, "minute": _MinuteCount}


def _duration(seconds: float) -> str:
    """OpenAI's reset format: `0s`, `120ms`, `1.5s`, `6m0s` (rounded up to the millisecond)."""
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(kind)))


def _utf8(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")  # JSON allows lone surrogates; never crash on them


def _validation_body(fault: str) -> dict[str, Any]:
    """A 422 as a Prism mock (RFC 7807 + `validation`) or FastAPI (`detail` list) answers it."""
    if fault == "prism-422":
        return {"type": "https://stoplight.io/prism/errors#UNPROCESSABLE_ENTITY", "title": "Invalid request",
                "status": 422, "detail": "Your request is not valid and no HTTP validation response was found "
                                         "in the spec, so Prism is generating this error for you.",
                "validation": [{"location": ["body", "quality"], "severity": "Error", "code": "enum",
                                "message": "Request body property quality must be equal to one of the allowed "
                                           "values: standard, hd"}]}
    return {"detail": [{"type": "literal_error", "loc": ["body", "quality"],
                        "msg": "Input should be 'standard' or 'hd'", "input": "ultra"}]}


def _plain_error(message: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}


class _Request:
    __slots__ = ("body", "close", "headers", "method", "path", "query")

    def __init__(self, method: str, path: str, query: dict[str, list[str]], headers: dict[str, str], body: bytes,
                 close: bool) -> None:
        self.method, self.path, self.query, self.headers, self.body = method, path, query, headers, body
        self.close = close


class _Reply(Exception):
    """Answer this and close the connection (protocol errors: the stream can't be trusted)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Simulator:
    """The simulated endpoint. `serve()` runs it; `stats()` reads its counters from any thread."""

    def __init__(self, config: SimulatorConfig = SimulatorConfig()) -> None:
        self.config = config
        self.base_url = ""
        self._rng = random.Random(config.seed)
        self._lock = threading.Lock()  # stats() is read from other threads
        style = _LIMITS[config.limit_style]
        self._windows: dict[str, _Limit] = {kind: style(limit) for kind, limit in (("requests", config.rpm),
                                                                ("images", config.ipm)) if limit}
        self._in_flight_images = 0  # admitted, not yet generated: reserved against the quota
        self._image_counter = 0
        self._b64_requests = 0
        self._idat: OrderedDict[tuple[int, int, int], bytes] = OrderedDict()
        self._pad_block = random.Random(0x62615463).randbytes(1 << 20)  # once: no urandom per image
        self._pad_chunks: OrderedDict[int, bytes] = OrderedDict()
        self._files: OrderedDict[str, bytes] = OrderedDict()
        # b64_json values are spliced into the dumped JSON at these markers (random: no prompt can forge one)
        self._blob_token = f"batcher-sim-blob-{secrets.token_hex(16)}-"
        self._blob_marks = re.compile(b'"' + self._blob_token.encode() + rb'(\d+)"')
        self._files_bytes = 0
        self._expiry: dict[str, float] = {}  # image token → when its URL stops working (batch_url_ttl)
        self.batches = BatchAPI(self)
        self._counts: dict[str, int] = {}
        self._faults: dict[str, int] = {}
        self._generations: dict[str, int] = {}
        self._accepted_log: deque[float] = deque()
        self._lone_429_sent = False
        self._started = time.monotonic()  # reset when serving starts: fail_all_after_s counts from there
        self._last_headers: dict[str, str] = {}  # of the last generation request, auth headers left out
        self.reset()

    # -- counters -------------------------------------------------------------------------

    def reset(self) -> None:
        """Zero every counter (quota usage included). Rate-limit windows and stored files stay."""
        with self._lock:
            self._counts = dict.fromkeys(("requests", "accepted", "images", "rate_limited", "quota_rejected",
                                          "policy_rejected", "max_window_requests", "downloads"), 0)
            self._faults = dict.fromkeys(("5xx", "drop", "malformed", "hang", "outage", "deep_json", "truncated"),
                                         0)
            self._generations = {}
            self._accepted_log.clear()
            if hasattr(self, "batches"):
                self.batches.reset()

    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters (copies: safe to keep and to read from another thread)."""
        with self._lock:
            generations = dict(self._generations)
            out: dict[str, Any] = {key: self._counts[key] for key in (
                "requests", "accepted", "images", "rate_limited", "quota_rejected", "policy_rejected")}
            out["faults"] = dict(self._faults)
            out["generations"] = generations
            out["duplicates"] = sum(c - 1 for c in generations.values() if c > 1)
            out["max_window_requests"] = self._counts["max_window_requests"]
            out["downloads"] = self._counts["downloads"]
            out["last_headers"] = dict(self._last_headers)
            out["batch"] = self.batches.counters()
            return out

    def _bump(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    # -- images -------------------------------------------------------------------------

    def png(self, width: int, height: int, prompt: str) -> bytes:
        """A valid, unique PNG of width x height: a solid colour from the prompt, nonce in tEXt."""
        digest = hashlib.blake2b(_utf8(prompt), digest_size=8).digest()
        colour = digest[0] % len(_PALETTE)
        idat = self._idat_chunk(width, height, colour)
        self._image_counter += 1
        nonce = b"batcher-sim\x00%d:%s" % (self._image_counter, digest.hex().encode())
        parts = [_PNG_SIGNATURE, _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)),
                 _chunk(b"tEXt", nonce), idat]
        size = sum(map(len, parts)) + 12  # + IEND
        if self.config.image_bytes > size:
            parts.append(self._pad_chunk(max(0, self.config.image_bytes - size - 12)))
        parts.append(_chunk(b"IEND", b""))
        return b"".join(parts)

    def _idat_chunk(self, width: int, height: int, colour: int) -> bytes:
        key = (width, height, colour)
        cached = self._idat.get(key)
        if cached is not None:
            self._idat.move_to_end(key)
            return cached
        row = b"\x00" + bytes(_PALETTE[colour]) * width  # filter byte 0, then RGB pixels
        rows_per_block = max(1, (1 << 20) // len(row))  # compress ~1 MB at a time: 4096² stays small
        block, comp, parts, left = row * rows_per_block, zlib.compressobj(6), [], height
        while left > 0:
            k = min(left, rows_per_block)
            parts.append(comp.compress(block if k == rows_per_block else row * k))
            left -= k
        parts.append(comp.flush())
        chunk = _chunk(b"IDAT", b"".join(parts))
        self._idat[key] = chunk
        if len(self._idat) > 256:
            self._idat.popitem(last=False)
        return chunk

    def _pad_chunk(self, length: int) -> bytes:
        # Identical padding is fine (the tEXt nonce makes each file unique) and saves a CRC per image.
        cached = self._pad_chunks.get(length)
        if cached is None:
            block = self._pad_block
            data = block[:length] if length <= len(block) else (block * (length // len(block) + 1))[:length]
            cached = self._pad_chunks[length] = _chunk(b"baTc", data)
            if len(self._pad_chunks) > 16:
                self._pad_chunks.popitem(last=False)
        return cached

    def _store(self, data: bytes, ttl: float | None = None) -> str:
        token = secrets.token_hex(16) + ".png"
        self._files[token] = data
        if ttl is not None:
            self._expiry[token] = time.monotonic() + ttl
        self._files_bytes += len(data)
        while len(self._files) > MAX_FILES or self._files_bytes > MAX_FILE_BYTES:
            token, old = self._files.popitem(last=False)
            self._expiry.pop(token, None)
            self._files_bytes -= len(old)
        return f"{self.base_url}/files/{token}"

    # -- HTTP -----------------------------------------------------------------------------

    async def serve(self, host: str = "127.0.0.1", port: int = 0, *,
                    task_status: TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
        """Bind, report the base URL through `task_status`, then serve until cancelled."""
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port, backlog=1024)
        async with listener:
            bound = listener.extra(SocketAttribute.local_port)
            shown = f"[{host}]" if ":" in host else host
            # Azure's base URL is the resource itself; the others put the API under /v1
            root = "" if self.config.dialect == "azure-openai" else "/v1"
            self.base_url = f"http://{shown}:{bound}{root}"
            self._started = time.monotonic()
            task_status.started(self.base_url)
            async with anyio.create_task_group() as tg:
                self.batches.tasks = tg  # batches run here, beside the connections
                await listener.serve(self._handle)

    async def _handle(self, stream: SocketStream) -> None:
        try:
            async with stream:
                await self._connection(stream)
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass  # the client went away
        except Exception:
            traceback.print_exc(file=sys.stderr)

    async def _connection(self, stream: SocketStream) -> None:
        buf = bytearray()
        while True:
            try:
                request = await self._read_request(stream, buf)
            except _Reply as reply:
                await self._send(stream, reply.status, {"connection": "close"}, _plain_error(str(reply)))
                return
            if request is None:
                return
            keep = await self._route(stream, request)
            if not keep or request.close:
                return

    async def _read_request(self, stream: SocketStream, buf: bytearray) -> _Request | None:
        """The next request on the connection; None when the client closed it between requests."""
        scanned = 0
        while (end := buf.find(b"\r\n\r\n", max(0, scanned - 3))) < 0:
            if len(buf) > MAX_HEAD:
                raise _Reply(431, "request headers too large")
            scanned = len(buf)
            try:
                buf += await stream.receive()
            except anyio.EndOfStream:
                if buf:
                    raise
                return None
        if end > MAX_HEAD:
            raise _Reply(431, "request headers too large")
        lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
        del buf[: end + 4]
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            raise _Reply(400, "malformed request line")
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip():
                raise _Reply(400, "malformed header line")
            headers[name.lower()] = value.strip()
        if "transfer-encoding" in headers:
            raise _Reply(411, "send a Content-Length body (chunked bodies are not supported)")
        raw_length = headers.get("content-length", "0")
        if not raw_length.isascii() or not raw_length.isdigit():
            raise _Reply(400, "invalid Content-Length")
        length = int(raw_length)
        if length > (MAX_UPLOAD if method == "POST" and target.split("?")[0] in UPLOAD_PATHS else MAX_BODY):
            raise _Reply(413, "request body too large")
        if len(buf) < length and headers.get("expect", "").lower() == "100-continue":
            await stream.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        while len(buf) < length:
            buf += await stream.receive()
        body = bytes(buf[:length])
        del buf[:length]
        connection = headers.get("connection", "").lower()
        close = connection == "close" or (version == "HTTP/1.0" and connection != "keep-alive")
        path, _, query = target.partition("?")
        return _Request(method, path, parse_qs(query, keep_blank_values=True), headers, body, close)

    async def _send(self, stream: SocketStream, status: int, headers: dict[str, str], body: Any,
                    content_type: str = "application/json") -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        await stream.send(b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n%s\r\n%s" % (
            status, _REASONS.get(status, "Status").encode(), content_type.encode(), len(raw), head.encode(), raw))

    async def _route(self, stream: SocketStream, req: _Request) -> bool:
        """Answer one request; False means close the connection without reading more."""
        closing = {"connection": "close"} if req.close else {}
        azure = _AZURE_PATH.fullmatch(req.path) if self.config.dialect == "azure-openai" else None
        if req.method == "POST" and azure is not None:
            return await self._generate(stream, req, closing, deployment=unquote(azure[1]))
        if req.method == "POST" and req.path in GENERATION_PATHS and self.config.dialect != "azure-openai":
            return await self._generate(stream, req, closing)
        if self.batches.handles(req):
            return await self.batches.route(stream, req, closing)
        if req.method == "GET" and req.path.startswith(("/v1/files/", "/files/")):
            token = req.path.rsplit("/", 1)[-1]
            data = self._files.get(token)
            if data is not None and self._expiry.get(token, math.inf) <= time.monotonic():
                data = None  # a batch result URL past its lifetime
            if data is None:
                await self._send(stream, 404, closing, self._error(404, "file not found or expired",
                                                                   "invalid_request_error", "not_found"))
            else:
                self._bump("downloads")
                if self.config.drip_bytes_per_s:
                    await self._drip(stream, data, self.config.drip_bytes_per_s)
                    return False
                await self._send(stream, 200, closing, data, "image/png")
        elif req.method == "GET" and req.path == "/_sim/stats":
            await self._send(stream, 200, closing, self.stats())
        elif req.method == "POST" and req.path == "/_sim/reset":
            self.reset()
            await self._send(stream, 200, closing, {"ok": True})
        else:
            await self._send(stream, 404, closing, self._error(404, f"Invalid URL ({req.method} {req.path})",
                                                               "invalid_request_error", "not_found"))
        return True

    async def _drip(self, stream: SocketStream, data: bytes, per_s: float) -> None:
        """Send an image's head, then its bytes a few at a time: no read ever waits long, the whole does."""
        await stream.send(b"HTTP/1.1 200 OK\r\ncontent-type: image/png\r\ncontent-length: %d\r\n\r\n" % len(data))
        step = max(1, int(per_s / 10))
        for at in range(0, len(data), step):
            await stream.send(data[at : at + step])
            await anyio.sleep(0.1)

    def _error(self, status: int, message: str, etype: str, code: str | None,
               param: str | None = None) -> dict[str, Any]:
        if self.config.gateway_quirks and code is not None:
            code = str(status)  # proxies put the HTTP status where the symbolic code was
        if self.config.dialect == "xai":
            return {"code": code or etype, "error": message}  # xAI's own shape, not OpenAI's
        return {"error": {"message": message, "type": etype, "param": param, "code": code}}

    def _limit_headers(self, now: float) -> dict[str, str]:
        if not self.config.advertise_limits:
            return {}
        out: dict[str, str] = {}
        for kind, window in self._windows.items():
            remaining, reset = window.advertise(now)
            out[f"x-ratelimit-limit-{kind}"] = f"{window.per_minute:g}"
            out[f"x-ratelimit-remaining-{kind}"] = str(remaining)
            out[f"x-ratelimit-reset-{kind}"] = _duration(reset)
        return out

    async def _generate(self, stream: SocketStream, req: _Request, extra: dict[str, str],
                        deployment: str | None = None, in_batch: bool = False) -> bool:
        """Answer one generation request. `in_batch`: a line of a batch (no rate limit, no latency;
        faults that need a connection become 5xx answers; result URLs live `batch_url_ttl`)."""
        cfg = self.config
        self._bump("requests")
        with self._lock:
            self._last_headers = {k: v for k, v in req.headers.items() if k not in ("authorization", "api-key")}
        hdrs = {"x-request-id": f"req_{secrets.token_hex(16)}", **extra}

        async def fail(status: int, message: str, etype: str, code: str | None, param: str | None = None,
                       more: dict[str, str] | None = None) -> bool:
            await self._send(stream, status, {**hdrs, **(more or {})},
                             self._error(status, message, etype, code, param))
            return True

        if cfg.fail_all_after_s is not None and time.monotonic() - self._started >= cfg.fail_all_after_s:
            with self._lock:
                self._faults["outage"] += 1
            return await fail(500, "The server had an error while processing your request.", "server_error",
                              "server_error")
        if cfg.lone_429_at is not None and not self._lone_429_sent and self._counts["requests"] >= cfg.lone_429_at:
            # a gateway's one-off: a bare 429 with only Retry-After, no limit headers, never again
            self._lone_429_sent = True
            self._bump("rate_limited")
            await self._send(stream, 429, {**extra, "retry-after": "1"}, b"Too Many Requests", "text/plain")
            return True
        if cfg.dialect == "azure-openai":
            # Azure's own answers: the status as the code, the key in `api-key`, a version on every call
            presented = req.headers.get("api-key")
            if presented is None or (cfg.api_key is not None
                                     and not hmac.compare_digest(_utf8(presented), _utf8(cfg.api_key))):
                await self._send(stream, 401, hdrs, {"error": {"code": "401", "message": (
                    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide "
                    "a valid key for an active subscription (header api-key) and use a correct regional API "
                    "endpoint for your resource.")}})
                return True
            if not req.query.get("api-version", [""])[0]:
                await self._send(stream, 404, hdrs, {"error": {"code": "404", "message": (
                    "Resource not found (the api-version query parameter is missing)")}})
                return True
        elif cfg.api_key is not None:
            presented = req.headers.get("authorization", "")
            if not hmac.compare_digest(_utf8(presented), _utf8(f"Bearer {cfg.api_key}")):
                message = ("Incorrect API key provided." if presented
                           else "You didn't provide an API key. Send it as 'Authorization: Bearer KEY'.")
                return await fail(401, message, "invalid_request_error", "invalid_api_key")
        try:
            body = json.loads(req.body)
        except (ValueError, RecursionError):
            return await fail(400, "We could not parse the JSON body of your request.", "invalid_request_error",
                              "invalid_json")
        if not isinstance(body, dict):
            return await fail(400, "The request body must be a JSON object.", "invalid_request_error",
                              "invalid_json")
        if cfg.answer_fault == "echo-key":  # a gateway quoting the credentials it was sent
            presented = req.headers.get("authorization") or req.headers.get("api-key") or ""
            return await fail(400, f"Model not available for key {presented.removeprefix('Bearer ')}",
                              "invalid_request_error", "model_not_found")
        if cfg.answer_fault in ("prism-422", "fastapi-422"):
            await self._send(stream, 422, hdrs, _validation_body(cfg.answer_fault))
            return True
        if body.get("stream") is True:
            # as OpenAI does: the answer comes as server-sent events, generated (and billed) all the same
            self._bump("images", int(body.get("n") or 1))
            event = {"type": "image_generation.completed", "b64_json": base64.b64encode(
                self.png(8, 8, str(body.get("prompt")))).decode("ascii")}
            await self._send(stream, 200, hdrs, f"event: image_generation.completed\ndata: {json.dumps(event)}\n\n"
                             .encode(), "text/event-stream")
            return True
        problem = self._validate(body, model_required=deployment is None)
        if problem is not None:
            param, message, code = problem
            return await fail(400, message, "invalid_request_error", code, param)
        prompt: str = body["prompt"]
        n: int = body.get("n") or 1
        width, height = self._xai_size(body) if cfg.dialect == "xai" else self._size(body.get("size"))
        # gpt-image models answer b64_json only (they reject the field, see _validate)
        fmt = "b64_json" if cfg.dialect == "openai" else body.get("response_format") or "url"

        # Faults in front of the model: one roll, so the rates partition [0, 1).
        roll = self._rng.random()
        for kind, rate in (("drop", cfg.drop_rate), ("hang", cfg.hang_rate), ("5xx", cfg.fail_rate),
                           ("malformed", cfg.malformed_rate), ("deep_json", cfg.deep_json_rate)):
            if roll >= rate:
                roll -= rate
                continue
            if in_batch and kind != "5xx":
                kind = "5xx"  # a batch line has no connection to drop, hang or cut: it fails
            with self._lock:
                self._faults[kind] += 1
            if kind == "drop":
                return False
            if kind == "hang":
                await anyio.sleep(cfg.hang_s)
                return False
            if kind == "5xx":
                status = self._rng.choice((500, 502, 503))
                return await fail(status, "The server had an error while processing your request.",
                                  "server_error", "server_error")
            if kind == "deep_json":  # 2 KB that nests 2,000 deep inside `data`: a parser's recursion limit
                await self._send(stream, 200, hdrs, b'{"data": ' + b"[" * 2000 + b"]" * 2000 + b"}")
                return True
            await self._send(stream, 200, hdrs, _MALFORMED)  # a truncated body, honest Content-Length
            return True

        moderated = bool(cfg.policy_word) and cfg.policy_word.lower() in prompt.lower()
        if moderated and cfg.answer_fault == "policy-200":  # a gateway wrapping the refusal in a 200
            self._bump("policy_rejected")
            await self._send(stream, 200, hdrs, {"created": int(time.time()), "data": [], "error": {
                "message": "Your request was rejected as a result of our safety system.",
                "type": "invalid_request_error", "code": "content_policy_violation"}})
            return True
        if moderated and cfg.dialect != "xai":  # xAI generates, then flags the image on a 200
            self._bump("policy_rejected")
            return await fail(400, "Your request was rejected as a result of our safety system.",
                              "invalid_request_error", "content_policy_violation", "prompt")
        # In-flight images are reserved, so concurrent requests can never overshoot the quota.
        if cfg.quota_images is not None and (
                self._counts["images"] + self._in_flight_images + n > cfg.quota_images):
            self._bump("quota_rejected")
            return await fail(429, "You exceeded your current quota, please check your plan and billing details.",
                              "insufficient_quota", "insufficient_quota", more=self._limit_headers(time.monotonic()))

        # Rate limits: admission time is now (body read, no await since), before the latency sleep.
        now = time.monotonic()
        windows = {} if in_batch else self._windows  # batch requests don't count against the limits
        waits = {kind: w.wait(now, 1 if kind == "requests" else n) for kind, w in windows.items()}
        if any(wait > 0 for wait in waits.values()):
            kind, wait = max(waits.items(), key=lambda kv: kv[1])
            self._bump("rate_limited")
            ms = max(1, math.ceil(wait * 1000))
            limit = self._windows[kind].per_minute
            return await fail(429, f"Rate limit reached for {kind} per min (limit {limit:g}). "
                                   f"Please try again in {ms}ms.", kind, "rate_limit_exceeded",
                              more={"retry-after-ms": str(ms), "retry-after": str(max(1, math.ceil(wait))),
                                    **self._limit_headers(now)})
        for kind, window in windows.items():
            window.admit(now, 1 if kind == "requests" else n)
        counted = self._limit_headers(now)  # the count as of this admission, as servers report it
        self._note_accepted(now)
        self._in_flight_images += n

        try:
            delay = 0.0 if in_batch else cfg.latency_ms + (self._rng.uniform(-1.0, 1.0) * cfg.latency_jitter_ms
                                      if cfg.latency_jitter_ms else 0.0)
            if delay > 0:
                await anyio.sleep(delay / 1000.0)
        finally:
            self._in_flight_images -= n
        # Generated, and billed, from here on, even if the client has gone away meanwhile.
        if cfg.answer_fault == "short":
            n = max(1, n // 2)  # asked for n, got half of it: billed for what came
        images = [self.png(width, height, prompt) for _ in range(n)]
        if cfg.truncated_rate and self._rng.random() < cfg.truncated_rate:
            with self._lock:
                self._faults["truncated"] += 1  # generated and billed, but cut short on the way
            images[0] = images[0][: max(16, len(images[0]) // 2)]
        with self._lock:
            self._counts["images"] += n
            self._generations[prompt] = self._generations.get(prompt, 0) + 1
            if moderated:
                self._counts["policy_rejected"] += 1

        if fmt == "b64_json" and cfg.gateway_quirks:
            self._b64_requests += 1
            if self._b64_requests % 2 == 0:
                fmt = "url"  # gateways answer url although b64_json was asked
        data = []
        blobs: list[bytes] = []  # base64 never needs JSON escaping: spliced in, not scanned by json.dumps
        for image in images:
            entry: dict[str, Any] = {}
            if fmt == "b64_json":
                entry["b64_json"] = f"{self._blob_token}{len(blobs)}"
                blobs.append(base64.b64encode(image))
                if cfg.gateway_quirks:
                    entry["url"] = None
            else:
                entry["url"] = self._store(image, cfg.batch_url_ttl if in_batch else None)
                if cfg.gateway_quirks:
                    entry["b64_json"] = None
            entry["revised_prompt"] = (f"A detailed rendering of: {prompt}" if cfg.revised_prompt_chars is None
                                       else ("revised " * (cfg.revised_prompt_chars // 8 + 1))[
                                           : cfg.revised_prompt_chars])
            if cfg.dialect == "xai":
                entry["respect_moderation"] = not moderated
            data.append(entry)
        answer: dict[str, Any] = {"created": int(time.time()), "data": data}
        if cfg.dialect == "openai":
            answer.update(self._gpt_image_extras(body, prompt, width, height, n))
        raw = json.dumps(answer).encode()
        if blobs:
            parts = self._blob_marks.split(raw)  # [json, index, json, index, ..., json]
            raw = b"".join(b'"' + blobs[int(p)] + b'"' if i % 2 else p for i, p in enumerate(parts))
        await self._send(stream, 200, {**hdrs, **counted}, raw)
        return True

    @staticmethod
    def _gpt_image_extras(body: dict[str, Any], prompt: str, width: int, height: int, n: int) -> dict[str, Any]:
        """What gpt-image models add to an answer: the settings used and the tokens billed."""
        text_tokens = max(1, len(prompt.split()))
        output_tokens = n * math.ceil(width * height / (1024 * 1024) * 1056)
        return {
            "background": body.get("background") or "opaque",
            "output_format": body.get("output_format") or "png",
            "quality": body.get("quality") or "medium",
            "size": f"{width}x{height}",
            "usage": {"input_tokens": text_tokens, "output_tokens": output_tokens,
                      "total_tokens": text_tokens + output_tokens,
                      "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": 0}},
        }

    @staticmethod
    def _xai_size(body: dict[str, Any]) -> tuple[int, int]:
        """Pixels for xAI's aspect_ratio (validated) at its resolution: the long side 1024 (1k) or 2048 (2k)."""
        ratio = body.get("aspect_ratio") or "1:1"
        long_side = 2048 if body.get("resolution") == "2k" else 1024
        if ratio == "auto":
            return long_side, long_side
        w, h = (float(x) for x in ratio.split(":"))
        if w >= h:
            return long_side, max(1, round(long_side * h / w))
        return max(1, round(long_side * w / h)), long_side

    def _note_accepted(self, now: float) -> None:
        with self._lock:
            log = self._accepted_log
            log.append(now)
            while log[0] <= now - 1.0:
                log.popleft()
            self._counts["accepted"] += 1
            self._counts["max_window_requests"] = max(self._counts["max_window_requests"], len(log))

    @staticmethod
    def _size(size: Any) -> tuple[int, int]:
        if size is None or size == "auto":
            return 1024, 1024
        match = _SIZE_RE.fullmatch(size)
        assert match is not None  # validated
        return int(match[1]), int(match[2])

    def _validate(self, body: dict[str, Any], model_required: bool = True) -> tuple[str, str, str] | None:
        """(param, message, code) of the first invalid field, or None."""
        dialect = self.config.dialect
        if dialect == "openai" and "response_format" in body:
            return "response_format", "Unknown parameter: 'response_format'.", "unknown_parameter"
        if dialect == "xai":
            for name in ("size", "quality", "style"):
                if name in body:
                    return name, f"Argument not supported: {name}", "Client specified an invalid argument"
            ratio, resolution = body.get("aspect_ratio"), body.get("resolution")
            if ratio is not None and ratio not in XAI_ASPECT_RATIOS:
                return "aspect_ratio", f"Invalid aspect_ratio {ratio!r}: use one of {', '.join(XAI_ASPECT_RATIOS)}", \
                    "Client specified an invalid argument"
            if resolution is not None and resolution not in ("1k", "2k"):
                return "resolution", f"Invalid resolution {resolution!r}: use '1k' or '2k'", \
                    "Client specified an invalid argument"
        if dialect == "openai":
            for name, allowed in (("output_format", ("png", "jpeg", "webp")),
                                  ("background", ("transparent", "opaque", "auto")),
                                  ("moderation", ("low", "auto"))):
                if name in body and body[name] not in allowed:
                    return name, f"Invalid value: {body[name]!r}. Supported values are: " \
                                 f"{', '.join(repr(a) for a in allowed)}.", "invalid_value"
        for name in ("model", "prompt"):
            value = body.get(name)
            if value is None and name == "model" and not model_required:
                continue  # Azure: the deployment in the path names the model
            if value is None:
                return name, f"Missing required parameter: '{name}'.", "missing_required_parameter"
            if not isinstance(value, str) or not value.strip():
                return name, f"'{name}' must be a non-empty string.", "invalid_value"
        size = body.get("size")
        if size is not None and size != "auto":
            match = _SIZE_RE.fullmatch(size) if isinstance(size, str) else None
            if match is None or not (1 <= int(match[1]) <= 4096 and 1 <= int(match[2]) <= 4096):
                return "size", f"Invalid size {size!r}: use WIDTHxHEIGHT (1 to 4096 each) or 'auto'.", \
                    "invalid_value"
        n = body.get("n")
        max_n = min(self.config.max_n, 10) if dialect in ("openai", "xai") else self.config.max_n
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= max_n):
            return "n", f"Invalid n {n!r}: must be an integer from 1 to {max_n}.", "invalid_value"
        fmt = body.get("response_format")
        if fmt is not None and fmt not in ("url", "b64_json"):
            return "response_format", f"Invalid response_format {fmt!r}: use 'url' or 'b64_json'.", \
                "invalid_value"
        return None


class RunningSimulator:
    """A simulator serving from its own thread and event loop. Use as a context manager."""

    def __init__(self, simulator: Simulator) -> None:
        self.simulator = simulator
        self.base_url = ""
        self._thread: threading.Thread | None = None
        self._scope: anyio.CancelScope | None = None
        self._token: anyio.lowlevel.EventLoopToken | None = None

    def stats(self) -> dict[str, Any]:
        return self.simulator.stats()

    def stop(self) -> None:
        """Cancel the server and join its thread (at most 10 s). Safe to call twice."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        scope, token = self._scope, self._token
        if scope is not None and token is not None and thread.is_alive():
            try:
                anyio.from_thread.run_sync(scope.cancel, token=token)
            except RuntimeError:
                pass  # the loop has already finished
        thread.join(timeout=10)

    def __enter__(self) -> RunningSimulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_in_thread(config: SimulatorConfig = SimulatorConfig(), host: str = "127.0.0.1",
                    port: int = 0) -> RunningSimulator:
    """Start a simulator on its own event loop in a daemon thread; returns once it is listening."""
    running = RunningSimulator(Simulator(config))
    ready = threading.Event()
    failure: list[BaseException] = []

    async def main() -> None:
        running._token = anyio.lowlevel.current_token()
        with anyio.CancelScope() as scope:
            running._scope = scope
            async with anyio.create_task_group() as tg:
                running.base_url = await tg.start(running.simulator.serve, host, port)
                ready.set()

    def target() -> None:
        try:
            anyio.run(main)
        except BaseException as exc:
            failure.append(exc)
        finally:
            ready.set()

    running._thread = threading.Thread(target=target, name="batcher-simulator", daemon=True)
    running._thread.start()
    if not ready.wait(timeout=10) or failure or not running.base_url:
        running.stop()
        cause = failure[0] if failure else None
        raise RuntimeError(f"simulator failed to start on {host}:{port}: {cause or 'timeout'}") from cause
    return running


def main_serve(config: SimulatorConfig, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM, printing one line with the base URL once listening."""
    simulator = Simulator(config)

    async def main() -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with anyio.create_task_group() as tg:
                url = await tg.start(simulator.serve, host, port)
                print(f"batcher simulator listening on {url}", flush=True)
                async for _ in signals:
                    break
                tg.cancel_scope.cancel()

    try:
        anyio.run(main)
    except KeyboardInterrupt:  # a signal before the receiver was installed: still a clean exit
        pass
