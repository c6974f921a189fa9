"""A local simulator of the OpenAI Images API, for tests, benchmarks and `batcher run --simulate`.

It binds to 127.0.0.1, speaks just enough HTTP/1.1 (keep-alive, Content-Length bodies),
answers real PNGs, and can be told to misbehave the ways real endpoints and gateways do:
rate limits over a sliding one-second window, quota exhaustion, 5xx, dropped connections,
malformed bodies, hangs, content-policy rejections and proxy quirks. It counts every
generation per prompt so tests can prove that nothing was paid for twice.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
import signal
import struct
import sys
import threading
import time
import zlib
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import SocketStream

__all__ = ["SimulatorConfig", "Simulator", "RunningSimulator", "start_in_thread", "main_serve"]

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 413: "Payload Too Large",
            429: "Too Many Requests", 431: "Request Header Fields Too Large", 500: "Internal Server Error",
            502: "Bad Gateway", 503: "Service Unavailable"}
_PALETTE = [(200, 60, 60), (60, 160, 90), (50, 90, 200), (220, 180, 40), (140, 70, 170), (30, 170, 170),
            (240, 130, 40), (90, 90, 90)]


@dataclass(frozen=True)
class SimulatorConfig:
    """How the simulated endpoint behaves. Rates are fractions of generation requests."""

    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    rpm: float | None = None
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


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


class _Window:
    """The provider's side of a per-minute limit: at most C per W seconds, sliding."""

    def __init__(self, per_minute: float) -> None:
        self.capacity = max(1, round(per_minute / 60.0))
        self.period = 60.0 * self.capacity / per_minute
        self.per_minute = per_minute
        self.log: deque[tuple[float, int]] = deque()
        self.used = 0

    def expire(self, now: float) -> None:
        while self.log and self.log[0][0] <= now - self.period:
            self.used -= self.log.popleft()[1]

    def wait(self, now: float, cost: int) -> float:
        self.expire(now)
        if self.used + cost <= self.capacity or not self.log:
            return 0.0
        need, freed = self.used + cost - self.capacity, 0
        for t, c in self.log:
            freed += c
            if freed >= need:
                return t + self.period - now
        return self.log[-1][0] + self.period - now

    def reset_in(self, now: float) -> float:
        self.expire(now)
        return self.log[0][0] + self.period - now if self.log else 0.0


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{max(int(seconds * 1000), 0)}ms"
    minutes, secs = divmod(seconds, 60)
    return f"{int(minutes)}m{secs:.0f}s" if minutes else f"{secs:.3g}s"


class Simulator:
    """The simulated endpoint. `serve()` runs it; `stats()` reads its counters."""

    def __init__(self, config: SimulatorConfig = SimulatorConfig()) -> None:
        self.config = config
        self.rng = random.Random(config.seed)
        self.base_url = ""
        self._lock = threading.Lock()
        self._idat: dict[tuple[int, int, int], bytes] = {}
        self._pad = random.Random(12345).randbytes(1 << 20)
        self._files: OrderedDict[str, bytes] = OrderedDict()
        self._files_bytes = 0
        self._windows = {k: _Window(v) for k, v in (("requests", config.rpm), ("images", config.ipm)) if v}
        self._window_log: deque[float] = deque()
        self._counter = 0
        self._last_admit = 0.0
        self._reserved = 0
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._stats: dict[str, Any] = {
                "requests": 0, "accepted": 0, "images": 0, "rate_limited": 0, "quota_rejected": 0,
                "policy_rejected": 0, "faults": {"5xx": 0, "drop": 0, "malformed": 0, "hang": 0},
                "max_window_requests": 0, "downloads": 0,
            }
            self._generations: dict[str, int] = {}

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out = json.loads(json.dumps(self._stats))
            out["generations"] = dict(self._generations)
            out["duplicates"] = sum(c - 1 for c in self._generations.values() if c > 1)
            return out

    # -- images -------------------------------------------------------------------------

    def png(self, width: int, height: int, prompt: str) -> bytes:
        colour = hashlib.blake2b(prompt.encode(), digest_size=1).digest()[0] % len(_PALETTE)
        key = (width, height, colour)
        idat = self._idat.get(key)
        if idat is None:
            row = b"\x00" + bytes(_PALETTE[colour]) * width
            idat = zlib.compress(row * height, 6)
            if len(self._idat) > 64:
                self._idat.clear()
            self._idat[key] = idat
        self._counter += 1
        nonce = f"{self._counter}:{hashlib.sha1(prompt.encode()).hexdigest()[:12]}".encode()
        parts = [b"\x89PNG\r\n\x1a\n", _chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)),
                 _chunk(b"tEXt", b"batcher-sim\x00" + nonce), _chunk(b"IDAT", idat)]
        size = sum(len(p) for p in parts) + 12
        if self.config.image_bytes > size:
            pad = self.config.image_bytes - size - 12
            start = self._counter % 4096
            parts.append(_chunk(b"baTc", (self._pad * (1 + pad // len(self._pad)))[start : start + pad]))
        parts.append(_chunk(b"IEND", b""))
        return b"".join(parts)

    # -- HTTP -----------------------------------------------------------------------------

    async def serve(self, host: str = "127.0.0.1", port: int = 0, *,
                    task_status: anyio.abc.TaskStatus[str] = anyio.TASK_STATUS_IGNORED) -> None:
        listener = await anyio.create_tcp_listener(local_host=host, local_port=port, backlog=1024)
        async with listener:
            bound = listener.extra(anyio.abc.SocketAttribute.local_port)
            self.base_url = f"http://{host}:{bound}/v1"
            task_status.started(self.base_url)
            await listener.serve(self._connection)

    async def _connection(self, stream: SocketStream) -> None:
        buf = b""
        try:
            async with stream:
                while True:
                    while b"\r\n\r\n" not in buf:
                        if len(buf) > 65536:
                            await self._send(stream, 431, {}, {"error": _err("headers too large")})
                            return
                        buf += await stream.receive()
                    arrived = time.monotonic()  # providers count a request when it arrives
                    head, buf = buf.split(b"\r\n\r\n", 1)
                    lines = head.decode("latin-1").split("\r\n")
                    method, target, _ = (lines[0].split(" ") + ["", ""])[:3]
                    headers = {}
                    for line in lines[1:]:
                        k, _, v = line.partition(":")
                        headers[k.strip().lower()] = v.strip()
                    length = int(headers.get("content-length", "0") or 0)
                    if length > 1 << 20:
                        await self._send(stream, 413, {}, {"error": _err("body too large")})
                        return
                    while len(buf) < length:
                        buf += await stream.receive()
                    body, buf = buf[:length], buf[length:]
                    keep = await self._route(stream, method, target.split("?")[0], headers, body, arrived)
                    if not keep or headers.get("connection", "").lower() == "close":
                        return
        except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, ConnectionError):
            return

    async def _send(self, stream: SocketStream, status: int, headers: dict[str, str], body: Any,
                    content_type: str = "application/json") -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", f"content-type: {content_type}",
                f"content-length: {len(raw)}"] + [f"{k}: {v}" for k, v in headers.items()]
        await stream.send(("\r\n".join(head) + "\r\n\r\n").encode() + raw)

    async def _route(self, stream: SocketStream, method: str, path: str, headers: dict[str, str],
                     body: bytes, arrived: float) -> bool:
        if method == "POST" and path in ("/v1/images/generations", "/images/generations"):
            return await self._generate(stream, headers, body, arrived)
        if method == "GET" and path.startswith("/v1/files/"):
            data = self._files.get(path.rsplit("/", 1)[-1])
            if data is None:
                await self._send(stream, 404, {}, {"error": _err("file not found or expired", code="not_found")})
            else:
                with self._lock:
                    self._stats["downloads"] += 1
                await self._send(stream, 200, {}, data, "image/png")
            return True
        if method == "GET" and path == "/_sim/stats":
            await self._send(stream, 200, {}, self.stats())
            return True
        if method == "POST" and path == "/_sim/reset":
            self.reset()
            await self._send(stream, 200, {}, {"ok": True})
            return True
        await self._send(stream, 404, {}, {"error": _err(f"no route {method} {path}", code="not_found")})
        return True

    def _error(self, status: int, message: str, etype: str, code: str | None, param: str | None = None) -> dict:
        if self.config.gateway_quirks and code is not None:
            code = str(status)  # proxies put the status where the code was
        return {"error": {"message": message, "type": etype, "param": param, "code": code}}

    def _limit_headers(self, now: float) -> dict[str, str]:
        if not self.config.advertise_limits:
            return {}
        out = {}
        for kind, w in self._windows.items():
            w.expire(now)
            out[f"x-ratelimit-limit-{kind}"] = f"{w.per_minute:g}"
            out[f"x-ratelimit-remaining-{kind}"] = str(max(w.capacity - w.used, 0))
            out[f"x-ratelimit-reset-{kind}"] = _duration(w.reset_in(now))
        return out

    async def _generate(self, stream: SocketStream, headers: dict[str, str], body: bytes, arrived: float) -> bool:
        cfg = self.config
        with self._lock:
            self._stats["requests"] += 1
        if cfg.api_key is not None and headers.get("authorization") != f"Bearer {cfg.api_key}":
            await self._send(stream, 401, {}, self._error(401, "Incorrect API key provided.",
                                                          "invalid_request_error", "invalid_api_key"))
            return True
        try:
            req = json.loads(body)
            if not isinstance(req, dict):
                raise ValueError
        except ValueError:
            await self._send(stream, 400, {}, self._error(400, "We could not parse the JSON body of your request.",
                                                          "invalid_request_error", "invalid_json"))
            return True
        problem = self._validate(req)
        if problem:
            await self._send(stream, 400, {}, self._error(400, problem[1], "invalid_request_error", problem[2],
                                                          problem[0]))
            return True
        prompt, n = req["prompt"], req.get("n", 1)
        width, height = (1024, 1024) if req.get("size", "auto") == "auto" else map(int, req["size"].split("x"))
        roll = self.rng.random()
        for kind, rate in (("drop", cfg.drop_rate), ("hang", cfg.hang_rate), ("5xx", cfg.fail_rate),
                           ("malformed", cfg.malformed_rate)):
            if roll < rate:
                with self._lock:
                    self._stats["faults"][kind] += 1
                if kind == "drop":
                    return False
                if kind == "hang":
                    await anyio.sleep(cfg.hang_s)
                    return False
                if kind == "5xx":
                    status = self.rng.choice((500, 502, 503))
                    await self._send(stream, status, {}, self._error(status, "The server had an error.",
                                                                     "server_error", "server_error"))
                    return True
                await self._send(stream, 200, {}, b'{"created": 17170, "data": [{"b64_json": "iVBOR')
                return True
            roll -= rate
        if cfg.policy_word and cfg.policy_word.lower() in prompt.lower():
            with self._lock:
                self._stats["policy_rejected"] += 1
            await self._send(stream, 400, {}, self._error(
                400, "Your request was rejected as a result of our safety system.", "invalid_request_error",
                "content_policy_violation", "prompt"))
            return True
        if cfg.quota_images is not None and self._stats["images"] + self._reserved + n > cfg.quota_images:
            with self._lock:
                self._stats["quota_rejected"] += 1
            await self._send(stream, 429, {}, self._error(
                429, "You exceeded your current quota, please check your plan and billing details.",
                "insufficient_quota", "insufficient_quota"))
            return True
        now = max(arrived, self._last_admit)  # admissions in arrival order, never backwards
        self._last_admit = now
        waits = {kind: w.wait(now, 1 if kind == "requests" else n) for kind, w in self._windows.items()}
        if any(v > 0 for v in waits.values()):
            kind, wait = max(waits.items(), key=lambda kv: kv[1])
            with self._lock:
                self._stats["rate_limited"] += 1
            ms = max(1, math.ceil(wait * 1000))
            hdrs = {"retry-after-ms": str(ms), "retry-after": str(max(1, math.ceil(wait))), **self._limit_headers(now)}
            await self._send(stream, 429, hdrs, self._error(
                429, f"Rate limit reached for {kind} per min. Please try again in {ms}ms.", kind,
                "rate_limit_exceeded"))
            return True
        for kind, w in self._windows.items():
            w.log.append((now, 1 if kind == "requests" else n))
            w.used += 1 if kind == "requests" else n
        self._note_window(now)
        self._reserved += n  # admitted images count against the quota before they are made
        delay = cfg.latency_ms + (self.rng.uniform(-1, 1) * cfg.latency_jitter_ms if cfg.latency_jitter_ms else 0)
        if delay > 0:
            await anyio.sleep(delay / 1000.0)
        # generated (and billed) from here, even if the client has gone away
        images = [self.png(width, height, prompt) for _ in range(n)]
        self._reserved -= n
        with self._lock:
            self._stats["images"] += n
            self._generations[prompt] = self._generations.get(prompt, 0) + 1
        fmt = req.get("response_format", "url")
        if cfg.gateway_quirks and fmt == "b64_json" and self._counter % 2 == 0:
            fmt = "url"  # gateways answer url although b64_json was asked
        data = []
        for img in images:
            entry: dict[str, Any] = {"revised_prompt": f"A detailed rendering of: {prompt}"}
            if fmt == "b64_json":
                entry["b64_json"] = base64.b64encode(img).decode()
                if cfg.gateway_quirks:
                    entry["url"] = None
            else:
                entry["url"] = self._store(img)
                if cfg.gateway_quirks:
                    entry["b64_json"] = None
            data.append(entry)
        hdrs = {"x-request-id": f"req_{hashlib.sha1(str(self._counter).encode()).hexdigest()[:20]}",
                **self._limit_headers(time.monotonic())}
        await self._send(stream, 200, hdrs, {"created": int(time.time()), "data": data})
        return True

    def _note_window(self, now: float) -> None:
        log = self._window_log
        log.append(now)
        while log and log[0] <= now - 1.0:
            log.popleft()
        with self._lock:
            self._stats["accepted"] += 1
            self._stats["max_window_requests"] = max(self._stats["max_window_requests"], len(log))

    def _store(self, data: bytes) -> str:
        token = hashlib.sha1(data[-64:] + str(self._counter).encode()).hexdigest()
        self._files[token + ".png"] = data
        self._files_bytes += len(data)
        while len(self._files) > 2000 or self._files_bytes > 512 << 20:
            _, old = self._files.popitem(last=False)
            self._files_bytes -= len(old)
        return f"{self.base_url}/files/{token}.png"

    def _validate(self, req: dict[str, Any]) -> tuple[str, str, str] | None:
        model, prompt = req.get("model"), req.get("prompt")
        if not isinstance(model, str) or not model:
            return "model", "you must provide a model parameter", "missing_required_parameter"
        if not isinstance(prompt, str) or not prompt.strip():
            return "prompt", "you must provide a non-empty prompt", "missing_required_parameter"
        size = req.get("size", "1024x1024")
        if size != "auto":
            try:
                w, h = (int(v) for v in str(size).split("x"))
                if not (1 <= w <= 4096 and 1 <= h <= 4096):
                    raise ValueError
            except ValueError:
                return "size", f"'{size}' is not a valid size: use WIDTHxHEIGHT or auto", "invalid_value"
        n = req.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= self.config.max_n:
            return "n", f"n must be an integer between 1 and {self.config.max_n}", "invalid_value"
        if req.get("response_format", "url") not in ("url", "b64_json"):
            return "response_format", "response_format must be url or b64_json", "invalid_value"
        return None


def _err(message: str, code: str | None = None) -> dict:
    return {"message": message, "type": "invalid_request_error", "param": None, "code": code}


class RunningSimulator:
    """A simulator serving from its own thread and event loop. Use as a context manager."""

    def __init__(self, simulator: Simulator) -> None:
        self.simulator = simulator
        self.base_url = ""
        self._thread: threading.Thread | None = None
        self._scope: anyio.CancelScope | None = None
        self._token: Any = None

    def stats(self) -> dict[str, Any]:
        return self.simulator.stats()

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._scope is not None and self._token is not None:
            try:
                anyio.from_thread.run_sync(self._scope.cancel, token=self._token)
            except RuntimeError:
                pass
        self._thread.join(timeout=10)
        self._thread = None

    def __enter__(self) -> RunningSimulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_in_thread(config: SimulatorConfig = SimulatorConfig(), host: str = "127.0.0.1",
                    port: int = 0) -> RunningSimulator:
    """Start a simulator in a background thread; returns once it is listening."""
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
        except BaseException as exc:  # noqa: BLE001 — reported to the starting thread
            failure.append(exc)
            ready.set()

    running._thread = threading.Thread(target=target, name="batcher-simulator", daemon=True)
    running._thread.start()
    if not ready.wait(timeout=10) or failure:
        raise RuntimeError(f"simulator failed to start: {failure[0] if failure else 'timeout'}")
    return running


def main_serve(config: SimulatorConfig, host: str, port: int) -> None:
    """Serve until SIGINT/SIGTERM; print the base URL once listening."""
    simulator = Simulator(config)

    async def main() -> None:
        async with anyio.create_task_group() as tg:
            url = await tg.start(simulator.serve, host, port)
            print(f"batcher simulator listening on {url}", flush=True)
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    tg.cancel_scope.cancel()
                    break

    anyio.run(main)
    sys.stdout.flush()
