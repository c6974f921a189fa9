"""Request stage: the only module that speaks HTTP (and the only one importing httpx).

`ImagesClient.generate` sends one generation request — `POST {base_url}/images/generations`
in the default dialect, or wherever the endpoint's `Dialect` says — and returns the
images it got back, decoded; every failure is raised as a classified `RequestError`.
`ImagesClient.download` fetches a `url` answer, streaming to disk, retried as a download.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import os
import re
import secrets
import ssl
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NamedTuple, Self
from urllib.parse import urlsplit

import aiohttp
import anyio
import httpx2 as httpx
import orjson
import pybase64
import yarl

from . import __version__
from ._dialect import DEFAULT_DIALECT, BatchShape, Dialect, DialectError, dig
from ._exceptions import PermanentError, RequestError, TransientError
from ._policy import RetryPolicy, answer_refusal, classify
from ._writer import sniff, truncation

__all__ = ["ImagesClient", "Answer", "BatchClient", "BatchInfo", "BatchLine", "FileInfo", "Generation", "GeneratedImage",
           "Timeouts", "REVISED_PROMPT_MAX", "read_answer", "read_document"]

# What is kept of a `revised_prompt`: it is stored twice (journal and manifest) for every image,
# so a server's 10 MB of text must not become 20 MB on disk per image. Longer ones are cut and marked.
REVISED_PROMPT_MAX = 4000
TRUNCATED_MARK = "…[truncated by batcher: {} characters]"
# Answers below this are parsed on the event loop: a hop to a worker thread costs more than they do.
INLINE_PARSE_BYTES = 64 * 1024
# At most this much of a declared Content-Length is allocated before the bytes arrive.
PREALLOCATE_MAX = 16 * 1024 * 1024
# `usage` is copied into the journal verbatim; a deeper one is a hostile answer, dropped (images kept).
USAGE_MAX_DEPTH = 8


@dataclass(frozen=True)
class Timeouts:
    """Image generation is slow: connect fails fast, reading may take minutes."""

    connect: float = 10.0
    read: float = 300.0
    write: float = 30.0
    download: float | None = None  # every attempt of one url download together; None: the same as `read`

    @property
    def download_deadline(self) -> float:
        return self.read if self.download is None else self.download


@dataclass
class GeneratedImage:
    data: bytes | None = None
    url: str | None = None
    revised_prompt: str | None = None


@dataclass
class Generation:
    created: int | None
    images: list[GeneratedImage]
    request_id: str | None = None
    usage: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


class _AiohttpTransport(httpx.AsyncBaseTransport):
    """httpx's API over aiohttp's connection pool and C HTTP parser: the hot path of every request.

    httpcore's pool scans every pooled connection (a getpeername each) to place and to release
    each request, and parses with pure-Python h11; aiohttp does neither. Measured in
    docs (bench/throughput.py). Bodies are passed through undecoded: httpx decodes them as usual.
    """

    def __init__(self, max_connections: int) -> None:
        self._max_connections = max_connections
        # two sessions over one connection pool: a request whose send is timed (ON_SENT, ON_CONNECTING)
        # goes through the traced one; the rest skip aiohttp's tracing (~6 signals, 3% of a run's CPU)
        self._session: aiohttp.ClientSession | None = None  # traced; owns the pool
        self._plain: aiohttp.ClientSession | None = None
        self._ssl: ssl.SSLContext | None = None

    def _tls(self) -> ssl.SSLContext:
        # httpx's own verified context (the system's trust store), built on the first https
        # request only: it costs a fifth of a plain-http run's start-up
        if self._ssl is None:
            self._ssl = httpx.create_ssl_context(trust_env=False)
        return self._ssl

    def _ssl_for(self, scheme: str) -> ssl.SSLContext | bool:
        # part of the key a pooled connection is found by: requests and open_connections must agree
        return self._tls() if scheme == "https" else True

    def _open(self) -> aiohttp.ClientSession:
        # made on first use: an aiohttp session belongs to the running event loop
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=max(1, self._max_connections), limit_per_host=0,
                                             keepalive_timeout=60)
            trace = aiohttp.TraceConfig()
            trace.on_connection_create_start.append(_connection_creating)
            trace.on_connection_create_end.append(_connection_created)
            trace.on_request_chunk_sent.append(_body_sent)
            options: dict[str, Any] = dict(auto_decompress=False, trust_env=False, cookie_jar=aiohttp.DummyCookieJar(),
                                           skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
                                           timeout=aiohttp.ClientTimeout(total=None))
            self._session = aiohttp.ClientSession(connector=connector, trace_configs=[trace], **options)
            self._plain = aiohttp.ClientSession(connector=connector, connector_owner=False, **options)
        return self._session

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        hooks = _SendHooks(request.extensions.get(ON_SENT), request.extensions.get(ON_CONNECTING))
        session = self._open()
        if hooks == (None, None):
            assert self._plain is not None
            session = self._plain  # nothing to tell: no tracing
        limits = request.extensions.get("timeout", {})
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=limits.get("connect"), sock_read=limits.get("read"))
        try:
            data: Any = request.content or None
        except httpx.RequestNotRead:  # a streamed body (a batch upload): passed through chunk by chunk
            data = _chunks(request.stream)
        with _transport_errors():
            resp = await session.request(
                request.method, str(request.url), data=data, allow_redirects=False,
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw],
                timeout=timeout, ssl=self._ssl_for(request.url.scheme), trace_request_ctx=hooks)
        return httpx.Response(resp.status, headers=resp.raw_headers, stream=_AiohttpStream(resp),
                              extensions={"http_version": b"HTTP/1.1"})

    async def aclose(self) -> None:
        if self._plain is not None:
            await self._plain.close()  # not the pool's owner: leaves it open
            self._plain = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def open_connections(self, url: httpx.URL, count: int, connect_timeout: float | None) -> int:
        """Open up to `count` connections to `url`'s origin in parallel and pool them; return how many.

        Best effort: a failure here shows again, classified, on the request that meets it.
        """
        session = self._open()
        # the key a request to this origin looks its pooled connections up by (host, port, TLS context)
        probe = aiohttp.ClientRequest("POST", yarl.URL(str(url)), loop=asyncio.get_running_loop(), session=session,
                                      ssl=self._ssl_for(url.scheme))
        timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout)
        opened = 0

        async def one() -> None:
            nonlocal opened
            with contextlib.suppress(aiohttp.ClientError, OSError, asyncio.TimeoutError):
                conn = await session.connector.connect(probe, [], timeout)  # type: ignore[union-attr]
                conn.release()  # into the pool, as a kept-alive connection
                opened += 1

        count = min(count, self._max_connections)
        async with anyio.create_task_group() as tg:
            for _ in range(max(0, count)):
                tg.start_soon(one)
        return opened


async def _chunks(stream: Any) -> AsyncIterator[bytes]:
    # aiohttp sends an async iterable as is: with the Content-Length the caller set, not chunked
    async for chunk in stream:
        yield chunk


ON_SENT = "batcher.on_sent"  # a request extension: called when the request is on the wire (its body written)
ON_CONNECTING = "batcher.on_connecting"  # ...called when the request starts opening a connection


class _SendHooks(NamedTuple):
    on_sent: Callable[[bool], None] | None
    on_connecting: Callable[[], None] | None


# a failed image download is fetched again (never generated again): the one backoff formula,
# with a short ceiling since the image is already paid for and its URL may expire
DOWNLOAD_RETRY = RetryPolicy(max_attempts=3, base=0.5, cap=5.0)


async def _connection_creating(session: Any, ctx: Any, params: Any) -> None:
    # the request waits for a connection (the network's round trips, a TLS handshake): the event loop
    # is free for the next request meanwhile (see RateLimiter.BATON_S)
    hooks = ctx.trace_request_ctx
    if isinstance(hooks, _SendHooks) and hooks.on_connecting is not None:
        hooks.on_connecting()


async def _connection_created(session: Any, ctx: Any, params: Any) -> None:
    ctx.new_connection = True  # this request opened its connection (the ctx is the request's own)


async def _body_sent(session: Any, ctx: Any, params: Any) -> None:
    # the rate limiter stamps a send when it really leaves: a request that waited for a connection
    # is counted by the server later than it was granted, and the next window must start from then;
    # one that opened a new connection is read later still (the server's accept), which it is told.
    # The first body chunk, not the headers: aiohttp holds the headers back to write them with it,
    # from a task of its own (before Python 3.12), so a window's burst leaves only after all of its
    # requests were prepared: 40 ms after the first one's headers "were sent", for 50 of them.
    if getattr(ctx, "sent", False):
        return
    ctx.sent = True
    hooks = ctx.trace_request_ctx
    if isinstance(hooks, _SendHooks) and hooks.on_sent is not None:
        hooks.on_sent(getattr(ctx, "new_connection", False))


class _AiohttpStream(httpx.AsyncByteStream):
    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self._resp = resp

    async def __aiter__(self) -> AsyncIterator[bytes]:
        with _transport_errors():
            async for chunk in self._resp.content.iter_any():
                yield chunk

    async def aclose(self) -> None:
        self._resp.release()  # back to the pool when read to the end, else the connection is closed


@contextmanager
def _transport_errors() -> Iterator[None]:
    """aiohttp's exceptions as httpx's, so callers classify one family (timeouts before the rest)."""
    try:
        yield
    except aiohttp.ConnectionTimeoutError as exc:
        raise httpx.ConnectTimeout(str(exc)) from exc
    except (aiohttp.ServerTimeoutError, TimeoutError) as exc:
        raise httpx.ReadTimeout(str(exc)) from exc
    except aiohttp.ClientConnectorError as exc:
        raise httpx.ConnectError(str(exc)) from exc
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError, aiohttp.ClientResponseError) as exc:
        raise httpx.RemoteProtocolError(str(exc)) from exc
    except aiohttp.InvalidURL as exc:
        raise httpx.UnsupportedProtocol(str(exc)) from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise httpx.ReadError(str(exc)) from exc


def _malformed(message: str, headers: Mapping[str, str] | None = None) -> TransientError:
    return TransientError(f"malformed response: {message}", status=200, code="malformed_response",
                          headers=dict(headers or {}))


class _Endpoint:
    """What every client of one endpoint shares: the HTTP pool, the key (in memory only, in the
    auth header), timeouts, and the image download (a `url` answer, synchronous or batched)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        dialect: Dialect = DEFAULT_DIALECT,
        options: Mapping[str, Any] | None = None,
        timeouts: Timeouts = Timeouts(),
        max_connections: int = 64,
        max_download_bytes: int = 64 * 1024 * 1024,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.dialect = dialect
        self.options = dict(options or {})
        missing = dialect.missing_options(self.options)
        if missing:  # the same for every request: say so now, not once per item
            raise DialectError(f"dialect {dialect.name!r} needs the endpoint option(s) {', '.join(missing)}")
        # the endpoint's own headers (values read from the environment) ride with the key, in memory only
        # (Accept only here, not on image downloads: an image host may negotiate on it)
        self._auth = {"Accept": "application/json", **(headers or {}), **dialect.auth_headers(api_key)}
        self.timeouts = timeouts
        self.max_download_bytes = max_download_bytes
        timeout = httpx.Timeout(timeouts.read, connect=timeouts.connect, write=timeouts.write, pool=None)
        # the pool is at least as large as the concurrency: no worker waits for a socket
        self._transport = _AiohttpTransport(max_connections)
        self._http = httpx.AsyncClient(
            timeout=timeout,
            headers={"User-Agent": f"batcher/{__version__}"},
            follow_redirects=False,
            trust_env=False,
            transport=self._transport,
        )
        # what the client would add to every request, merged once (see ImagesClient.send)
        self._timeout_ext = timeout.as_dict()
        self._request_headers = httpx.Headers(self._http.headers)
        self._request_headers.update(self._auth)
        self._urls: dict[str, httpx.URL] = {}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def download(self, url: str, dest: Path, *, attempts: int = DOWNLOAD_RETRY.max_attempts) -> None:
        """Stream an image URL to `dest`, checking scheme, size, type and that the image is whole.

        Retried as a download (never by generating again), every attempt within one deadline
        (`Timeouts.download_deadline`, the run's --timeout): a server that drips bytes costs
        that long at most. Raises RequestError at the end.
        """
        last: RequestError | None = None
        deadline = self.timeouts.download_deadline
        with anyio.move_on_after(deadline) as scope:
            for attempt in range(1, attempts + 1):
                try:
                    await self._download_once(url, dest)
                    await anyio.to_thread.run_sync(_check_whole_file, dest)
                    return
                except TransientError as exc:
                    last = exc
                except PermanentError:
                    _unlink(dest)
                    raise
                _unlink(dest)
                if attempt < attempts:
                    await anyio.sleep(DOWNLOAD_RETRY.delay(attempt, retry_after=last.retry_after))
        _unlink(dest)
        if scope.cancelled_caught:
            raise TransientError(f"image download from {urlsplit(url).hostname or '?'} not finished within "
                                 f"{deadline:g}s"
                                 + (f" (before: {last.message})" if last else ""), code="download_timeout")
        assert last is not None
        raise TransientError(f"download failed after {attempts} attempts: {last.message}",
                             status=last.status, code=last.code or "download_failed")

    async def _download_once(self, url: str, dest: Path) -> None:
        for _ in range(6):  # follow at most 5 redirects, each checked
            host = urlsplit(url).hostname or "?"  # named in every failure: which host failed matters
            if urlsplit(url).scheme not in ("http", "https"):
                raise PermanentError(f"refusing to fetch a non-http(s) image URL ({urlsplit(url).scheme}:)",
                                     code="bad_image_url")
            try:
                # no Authorization header: image URLs often point at another host
                async with self._http.stream("GET", url) as resp:
                    if resp.is_redirect and "location" in resp.headers:
                        url = str(resp.url.join(resp.headers["location"]))
                        continue
                    if resp.status_code != 200:
                        err = classify(resp.status_code, dict(resp.headers), b"")
                        kind = TransientError if err.kind == "transient" else PermanentError
                        raise kind(f"image download from {host} answered HTTP {resp.status_code}",
                                   status=resp.status_code, code="download_failed")
                    ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
                    if ctype and not (ctype.startswith("image/") or ctype == "application/octet-stream"):
                        raise PermanentError(f"image URL returned content-type {ctype!r}", code="not_an_image")
                    await self._stream_to(resp, dest)
                    return
            except httpx.TimeoutException:
                raise TransientError(f"image download from {host} timed out", code="download_timeout") from None
            except httpx.TransportError as exc:
                raise TransientError(f"image download from {host} failed ({type(exc).__name__})",
                                     code="download_failed") from None
        raise PermanentError("too many redirects fetching the image", code="download_failed")

    async def _stream_to(self, resp: httpx.Response, dest: Path) -> None:
        total = 0
        head = b""
        import aiofiles  # url answers only: most runs never import it (~25 ms of start-up)

        async with aiofiles.open(dest, "wb") as fh:
            async for chunk in resp.aiter_bytes(1 << 16):
                total += len(chunk)
                if total > self.max_download_bytes:
                    raise PermanentError(f"image exceeds the {self.max_download_bytes}-byte cap",
                                         code="image_too_large")
                if len(head) < 16:
                    head += chunk[:16]
                await fh.write(chunk)
        if sniff(head) is None:
            raise PermanentError("downloaded bytes are not a PNG, JPEG, WebP or GIF image", code="not_an_image")



class ImagesClient(_Endpoint):
    """One endpoint's HTTP client; the key lives only in memory, in the auth header.

    >>> async with ImagesClient("http://127.0.0.1:8000/v1", api_key="sk-...") as client:
    ...     gen = await client.generate({"model": "grok-imagine", "prompt": "a koi"})

    `dialect` says how the endpoint wants the request (path, query, auth header, fields) and
    `options` fill its templates, e.g. `{"api_version": "2025-04-01-preview"}` for azure-openai.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        dialect: Dialect = DEFAULT_DIALECT,
        options: Mapping[str, str] | None = None,
        timeouts: Timeouts = Timeouts(),
        max_connections: int = 64,
        max_response_bytes: int = 256 * 1024 * 1024,
        max_download_bytes: int = 64 * 1024 * 1024,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(base_url, api_key, dialect=dialect, options=options, timeouts=timeouts,
                         max_connections=max_connections, max_download_bytes=max_download_bytes, headers=headers)
        self.max_response_bytes = max_response_bytes
        self._parse_slots: anyio.CapacityLimiter | None = None  # made in the event loop, on first use

    async def open_connections(self, count: int) -> int:
        """Open `count` connections to the endpoint before the first request (at most the pool's size).

        >>> await client.open_connections(50)   # the first second's share of a 3,000-rpm limit

        A request that opens its own connection is read by the server 10-200 ms after it was sent
        (the TCP and TLS handshakes, the server's accept); a run's first window would leave that
        spread out and late, and every later window keeps its shape. Returns how many opened.
        """
        return await self._transport.open_connections(httpx.URL(self.base_url), count, self.timeouts.connect)

    async def generate(self, body: dict[str, Any], on_sent: Callable[[bool], None] | None = None) -> Generation:
        """Send one generation request; raise a classified RequestError on any failure.

        `body` holds batcher's canonical fields; the dialect turns it into what is sent.
        `on_sent` is called when the request is on the wire (the rate limiter's stamp),
        with True when the request opened a new connection (the server reads those later);
        `send` also takes `on_connecting`, called when it starts opening one.
        """
        answer = await self.send(body, on_sent)
        if len(answer.raw) < INLINE_PARSE_BYTES:
            return answer.read()
        # JSON, base64 and the image check of a large answer run in a worker thread, so the
        # event loop keeps serving sockets and both cores work (orjson, pybase64 and crc32 are C);
        # one parse per core at a time: more would only hold more parsed copies (2 × body each) at once
        if self._parse_slots is None:
            self._parse_slots = anyio.CapacityLimiter(os.cpu_count() or 2)
        return await anyio.to_thread.run_sync(answer.read, limiter=self._parse_slots)

    async def send(self, body: dict[str, Any], on_sent: Callable[[bool], None] | None = None,
                   on_connecting: Callable[[], None] | None = None) -> Answer:
        """`generate` without reading the answer: a 200's body, for the caller to `read()` where it
        likes (the executor reads, saves and records it in one worker-thread call). Raises a
        classified RequestError for every other answer or failure.

        The request goes straight to the transport: what `AsyncClient.send` adds per request (auth
        and redirect loops, cookies, event hooks, header and URL merging) is done once, here, for
        the same bytes on the wire.
        """
        try:
            prepared = self.dialect.prepare(body, self.options)
        except DialectError as exc:
            raise PermanentError(str(exc), code="dialect_error") from None
        extensions: dict[str, Any] = {"timeout": self._timeout_ext}
        if on_sent is not None:
            extensions[ON_SENT] = on_sent
        if on_connecting is not None:
            extensions[ON_CONNECTING] = on_connecting
        if prepared.headers:
            headers = httpx.Headers(self._request_headers)
            headers.update(prepared.headers)
            headers.update(self._auth)
        else:
            headers = self._request_headers
        request = httpx.Request("POST", self._url(f"{self.base_url}{prepared.path}"), params=prepared.params or None,
                                json=prepared.body, headers=headers, extensions=extensions)
        try:
            resp = await self._transport.handle_async_request(request)
            try:
                headers_in = {k.lower(): v for k, v in resp.headers.items()}
                _refuse_stream(resp.status_code, headers_in)
                raw = await self._read_capped(resp, headers_in)
            finally:
                await resp.aclose()
        except httpx.TimeoutException as exc:
            raise TransientError(f"timed out ({type(exc).__name__})", code="timeout") from None
        except httpx.TransportError as exc:
            raise TransientError(f"connection failed ({type(exc).__name__})", code="connection_error") from None
        if resp.status_code != 200:
            raise classify(resp.status_code, headers_in, bytes(raw))
        return Answer(raw, headers_in, int(body.get("n", 1)), self.dialect)

    def _url(self, url: str) -> httpx.URL:
        """`url` parsed once: every request of an endpoint goes to one or a few paths."""
        parsed = self._urls.get(url)
        if parsed is None:
            if len(self._urls) >= 64:  # a dialect with a path per item: bounded, not a leak
                self._urls.clear()
            parsed = self._urls[url] = httpx.URL(url)
        return parsed

    async def _read_capped(self, resp: httpx.Response, headers: Mapping[str, str]) -> bytearray:
        """The body in one buffer, sized from Content-Length when given: no chunk list joined into a copy."""
        declared = headers.get("content-length")
        size = int(declared) if declared and declared.isascii() and declared.isdigit() else None
        if size is not None and size > self.max_response_bytes:
            raise PermanentError(f"response of {declared} bytes exceeds the {self.max_response_bytes}-byte cap",
                                 status=resp.status_code, code="response_too_large")
        # trust a declared length only so far: a lying header must not reserve memory it never sends
        buf = bytearray(min(size or 0, PREALLOCATE_MAX))
        filled = 0
        # an encoded body goes through httpx's decoders; a plain one is read from the transport as is
        chunks = resp.aiter_bytes() if headers.get("content-encoding", "identity") != "identity" else resp.stream
        async for chunk in chunks:  # type: ignore[union-attr]  # an AsyncByteStream on the async path
            end = filled + len(chunk)
            if end > self.max_response_bytes:
                raise PermanentError(f"response exceeds the {self.max_response_bytes}-byte cap",
                                     status=resp.status_code, code="response_too_large")
            buf[filled:end] = chunk  # in place while it fits; grows past a wrong or absent length
            filled = end
        del buf[filled:]  # a body shorter than declared (a compressed one: httpx decoded it)
        return buf


@dataclass
class Answer:
    """A 200 answer's body, not read yet: `read()` is the CPU part (JSON, base64, the image check),
    safe in a worker thread. It raises a classified RequestError (a malformed answer, a refusal)."""

    raw: bytearray
    headers: dict[str, str]
    n: int
    dialect: Dialect = DEFAULT_DIALECT

    def read(self) -> Generation:
        return read_answer(self.raw, self.headers, self.n, self.dialect)


def read_answer(raw: bytes | bytearray, headers: dict[str, str], n: int,
                dialect: Dialect = DEFAULT_DIALECT) -> Generation:
    """A 200's body → decoded, whole images. Any answer that can't be read is malformed (transient).

    The one reading of an answer: a synchronous one, and each line of a batch's results.
    Memory: the body (B), then its parsed document (≈ B) while `raw` is released, then each
    image's base64 text is dropped as it is decoded (0.75 B): at most about 2 B per answer.
    """
    try:
        doc = orjson.loads(raw)  # nesting deeper than 1024 is a JSONDecodeError, never a RecursionError
    except (ValueError, RecursionError, MemoryError):
        raise _malformed("body is not JSON", headers) from None
    if not isinstance(doc, dict):
        raise _malformed("body is not a JSON object", headers)
    if doc.get("error") and not doc.get("data"):
        raise classify(200, headers, bytes(raw))  # a 200 carrying an error object
    if isinstance(raw, bytearray):
        raw.clear()  # the caller's buffer: freed now, not when the answer is saved
    return read_document(doc, headers, n, dialect)


def read_document(doc: dict[str, Any], headers: dict[str, str], n: int,
                  dialect: Dialect = DEFAULT_DIALECT) -> Generation:
    """`read_answer` for an answer already decoded from JSON (a batch result line's body)."""
    if doc.get("error") and not doc.get("data"):
        raise classify(200, headers, orjson.dumps(doc))
    dialect.read(doc, headers)  # e.g. xai's moderated images: a 200 that is a refusal
    refusal = answer_refusal(doc, headers)  # the same, as other providers mark it
    if refusal is not None:
        raise refusal
    data = doc.get("data")
    if not isinstance(data, list) or not data:
        raise _malformed("no 'data' list of images", headers)
    if len(data) > n:
        # never silently keep or drop paid images we did not ask for
        raise PermanentError(f"server returned {len(data)} images for n={n}", status=200,
                             code="unexpected_image_count", headers=headers)
    images = []
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise _malformed(f"data[{i}] is not an object", headers)
        revised = _revised_prompt(entry.get("revised_prompt"))
        b64, url = entry.pop("b64_json", None), entry.get("url")
        # read what came back, not what was asked for: gateways swap formats, null a key
        if isinstance(b64, str) and b64:
            images.append(GeneratedImage(data=_decode_image(b64, i, headers), revised_prompt=revised))
            del b64  # the text goes as soon as its bytes exist
        elif isinstance(url, str) and url:
            images.append(GeneratedImage(url=url, revised_prompt=revised))
        else:
            raise _malformed(f"data[{i}] has neither b64_json nor url", headers)
    created = doc.get("created")
    usage = doc.get("usage")
    return Generation(
        created=created if isinstance(created, int) and not isinstance(created, bool) else None,
        images=images,
        request_id=headers.get("x-request-id"),
        usage=usage if isinstance(usage, dict) and _depth(usage) <= USAGE_MAX_DEPTH else None,
        headers=headers,
    )


def _refuse_stream(status: int, headers: Mapping[str, str]) -> None:
    """A streamed answer was generated (and billed): fail the item for good, never send it again."""
    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
    if status == 200 and ctype == "text/event-stream":
        raise PermanentError("the server streamed its answer (text/event-stream), which batcher can't save; "
                             "remove stream from the request", status=200, code="streamed_answer",
                             headers=dict(headers))


def _check_whole_file(path: Path) -> None:
    """A downloaded image must be whole: a cut one is a failed download (tried again), not an image."""
    data = path.read_bytes()
    kind = sniff(data)
    problem = truncation(data, kind) if kind is not None else None
    if problem is not None:
        raise TransientError(f"downloaded image is not whole: {problem}", code="download_failed")


def _decode_image(b64: str, i: int, headers: Mapping[str, str]) -> bytes:
    """data[i].b64_json → image bytes that are a whole PNG, JPEG, WebP or GIF, else a malformed answer."""
    try:
        data = pybase64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise _malformed(f"data[{i}].b64_json is not valid base64", headers) from None
    kind = sniff(data)
    if kind is None:
        # not an image at all: sending it again would get the same; the writer says so (not_an_image)
        return data
    problem = truncation(data, kind)
    if problem is not None:
        raise _malformed(f"data[{i}] is not a whole image: {problem}", headers)
    return data


def _revised_prompt(value: Any) -> str | None:
    """The revised prompt to keep: at most REVISED_PROMPT_MAX characters, a longer one cut and marked."""
    if not isinstance(value, str):
        return None
    if len(value) <= REVISED_PROMPT_MAX:
        return value
    return value[:REVISED_PROMPT_MAX] + TRUNCATED_MARK.format(len(value))


def _depth(value: Any, limit: int = USAGE_MAX_DEPTH + 1) -> int:
    """How deep containers nest in `value`, counted up to `limit` (so a hostile one costs little)."""
    if limit <= 0 or not isinstance(value, (dict, list)):
        return 0
    items = value.values() if isinstance(value, dict) else value
    return 1 + max((_depth(v, limit - 1) for v in items), default=0)


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# -- provider Batch APIs ------------------------------------------------------------------------

TERMINAL_STATES = frozenset({"completed", "failed", "expired", "cancelled"})
# A control answer (a file or batch object, a page of a list) larger than this is hostile.
MAX_CONTROL_BYTES = 16 * 1024 * 1024
UPLOAD_CHUNK = 1 << 20
MAX_LINE_BYTES = 256 * 1024 * 1024  # one result line: n images as base64 (the synchronous answer's cap)
MAX_PAGES = 100_000  # a list that never ends (a cursor that cycles) stops here
_ID_HEAD = 4096  # how much of an over-long line is searched for its id


@dataclass(frozen=True)
class FileInfo:
    """An uploaded file as the provider describes it."""

    id: str
    filename: str | None = None
    bytes: int | None = None
    created_at: int | None = None
    purpose: str | None = None


@dataclass(frozen=True)
class BatchInfo:
    """A provider batch, in OpenAI's terms whatever the provider (`status` in OpenAI's state names).

    With a provider whose results are a paged list (xai), `output_file_id` is the batch's id:
    `BatchClient.lines` reads either.
    """

    id: str
    status: str
    input_file_id: str | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: int | None = None
    expires_at: int | None = None
    completed_at: int | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    metadata: dict[str, str] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        """The batch will not change any more: completed, failed, expired or cancelled."""
        return self.status in TERMINAL_STATES


@dataclass(frozen=True)
class BatchLine:
    """One result of a batch: a generation read like a synchronous answer, or a classified error."""

    custom_id: str | None
    generation: Generation | None = None
    error: RequestError | None = None


class BatchClient(_Endpoint):
    """One endpoint's Files + Batches APIs, in the shapes its dialect's `BatchShape` says.

    >>> async with BatchClient(base_url, api_key) as client:
    ...     f = await client.upload(Path("chunk-0001.jsonl"), "chunk-0001.jsonl")
    ...     b = await client.create_batch(f.id, window="24h", metadata={"batcher_chunk": "k1"})
    ...     async for line in client.lines((await client.batch(b.id)).output_file_id): ...

    Every failure raises a classified RequestError (401/403 fatal, 429 and 5xx and timeouts
    transient, 404 and other 4xx permanent); nothing is retried here: the executor decides.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        *,
        dialect: Dialect = DEFAULT_DIALECT,
        options: Mapping[str, Any] | None = None,
        timeouts: Timeouts = Timeouts(),
        headers: Mapping[str, str] | None = None,
        max_line_bytes: int = MAX_LINE_BYTES,
        max_download_bytes: int = 64 * 1024 * 1024,
    ) -> None:
        super().__init__(base_url, api_key, dialect=dialect, options=options, timeouts=timeouts,
                         max_connections=8, max_download_bytes=max_download_bytes, headers=headers)
        self.shape: BatchShape = dialect.batch
        self.max_line_bytes = max_line_bytes
        key = re.escape(self.shape.result_id_key.rsplit(".", 1)[-1].encode())
        self._id_in_head = re.compile(rb'"' + key + rb'"\s*:\s*("(?:[^"\\]|\\.){1,1024}")')

    def input_line(self, custom_id: str, body: Mapping[str, Any]) -> bytes:
        """One line of a batch input file for an item: its request exactly as `ImagesClient` would send it
        (the dialect's renames and drops applied), newline-terminated.

        Raises PermanentError for a body the dialect can't send (the item fails, as synchronously).
        """
        try:
            prepared = self.dialect.prepare(body, self.options)
        except DialectError as exc:
            raise PermanentError(str(exc), code="dialect_error") from None
        return orjson.dumps({"custom_id": custom_id, "method": "POST", "url": self.shape.endpoint,
                             "body": prepared.body}) + b"\n"

    # -- files ------------------------------------------------------------------------------

    async def upload(self, path: Path, filename: str) -> FileInfo:
        """Upload a JSONL file (multipart, `purpose=batch`), streamed from disk in 1 MiB chunks."""
        boundary = f"batcher-{secrets.token_hex(16)}"
        safe_name = "".join(c if c.isprintable() and c not in '"\\' else "_" for c in filename) or "batch.jsonl"
        head = b""
        if self.shape.send_purpose:
            head += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n"
                     f"batch\r\n").encode()
        head += (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{safe_name}\"\r\n"
                 f"Content-Type: application/jsonl\r\n\r\n").encode()
        tail = f"\r\n--{boundary}--\r\n".encode()
        size = (await anyio.Path(path).stat()).st_size

        async def body() -> AsyncIterator[bytes]:
            import aiofiles

            yield head
            sent = 0
            async with aiofiles.open(path, "rb") as fh:  # read in aiofiles' worker thread, not on the loop
                while chunk := await fh.read(UPLOAD_CHUNK):
                    sent += len(chunk)
                    if sent > size:
                        break
                    yield chunk
            if sent != size:  # the declared length would be a lie: the server would misread the body
                raise _FileChanged(f"{path} changed size while uploading ({size} → {sent} bytes)")
            yield tail

        headers = {"Content-Type": f"multipart/form-data; boundary={boundary}",
                   "Content-Length": str(len(head) + size + len(tail))}
        try:
            doc = await self._call("POST", self.shape.files, content=body(), headers=headers)
        except _FileChanged as exc:
            raise TransientError(str(exc), code="file_changed") from None
        return _file_info(doc)

    async def files(self, purpose: str = "batch") -> AsyncIterator[FileInfo]:
        """Every uploaded file of `purpose`, newest first, page by page (OpenAI's `after` cursor)."""
        params = {"purpose": purpose, "order": "desc", "limit": str(self.shape.page_limit)}
        async for entry in self._pages(self.shape.files, params, "data", "after", None, "has_more", "id"):
            if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                yield _file_info(entry)

    async def delete_file(self, file_id: str) -> None:
        """Delete an uploaded file (an orphaned chunk, or one whose batch has ended)."""
        await self._call("DELETE", self.shape.path(self.shape.file, file_id))

    # -- batches ----------------------------------------------------------------------------

    async def create_batch(self, input_file_id: str, *, window: str, metadata: Mapping[str, str]) -> BatchInfo:
        """Create a batch of the uploaded file's requests, tagged with `metadata` (the chunk key)."""
        tags = orjson.dumps(dict(metadata)).decode() if self.shape.metadata_as_json else dict(metadata)
        body: dict[str, Any] = {"input_file_id": input_file_id, "endpoint": self.shape.endpoint,
                                self.shape.metadata_key: tags}
        if self.shape.send_window:
            body["completion_window"] = window
        return self._batch_info(await self._call("POST", self.shape.batches, json=body))

    async def batch(self, batch_id: str) -> BatchInfo:
        return self._batch_info(await self._call("GET", self.shape.path(self.shape.batch, batch_id)))

    async def batches(self) -> AsyncIterator[BatchInfo]:
        """Every batch of the account, newest first, page by page."""
        shape = self.shape
        async for entry in self._pages(shape.batches, {"limit": str(shape.page_limit)}, shape.batches_list_key,
                                       shape.cursor_param, shape.next_key, shape.more_key, shape.id_key):
            yield self._batch_info(entry)

    async def cancel_batch(self, batch_id: str) -> BatchInfo:
        return self._batch_info(await self._call("POST", self.shape.path(self.shape.cancel, batch_id)))

    # -- results ----------------------------------------------------------------------------

    async def lines(self, file_id: str) -> AsyncIterator[BatchLine]:
        """Each result of an output or error file (or of a paged results list), read as it streams in.

        A line longer than `max_line_bytes` is not held: it becomes a permanent `line_too_long`
        error for its custom_id (found in its first bytes), or for None when it can't be found.
        """
        if self.shape.results is not None:
            path = self.shape.path(self.shape.results, file_id)
            async for entry in self._pages(path, {"limit": str(self.shape.page_limit)}, "results",
                                           self.shape.cursor_param, self.shape.next_key, self.shape.more_key,
                                           self.shape.result_id_key):
                yield _result(entry, self.shape, self.dialect)
            return
        url = f"{self.base_url}{self.shape.path(self.shape.content, file_id)}"
        try:
            async with self._http.stream("GET", url, headers=self._auth) as resp:
                if resp.status_code != 200:
                    raise classify(resp.status_code, {k.lower(): v for k, v in resp.headers.items()},
                                   bytes(await self._read_capped(resp, MAX_CONTROL_BYTES)))
                buf, head, too_long = bytearray(), b"", False
                async for chunk in resp.aiter_bytes():
                    start = 0
                    while True:
                        nl = chunk.find(b"\n", start)
                        stop = len(chunk) if nl < 0 else nl
                        if not too_long:
                            buf += chunk[start:stop]
                            if len(buf) > self.max_line_bytes:  # stop holding it; keep only where its id is
                                head, too_long = bytes(buf[:_ID_HEAD]), True
                                buf = bytearray()
                        if nl < 0:
                            break
                        if too_long:
                            yield self._too_long(head)
                        elif buf.strip():
                            yield await self._line(buf)
                        buf, too_long, start = bytearray(), False, nl + 1
                if too_long:
                    yield self._too_long(head)
                elif buf.strip():
                    yield await self._line(buf)
        except httpx.TimeoutException as exc:
            raise TransientError(f"reading file {file_id} timed out ({type(exc).__name__})", code="timeout") from None
        except httpx.TransportError as exc:
            raise TransientError(f"reading file {file_id} failed ({type(exc).__name__})",
                                 code="connection_error") from None

    async def _line(self, raw: bytearray) -> BatchLine:
        # `raw` is handed over (the caller starts a new buffer): parsed in place, never copied
        if len(raw) < INLINE_PARSE_BYTES:
            return _result_line(raw, self.shape, self.dialect)
        # base64 decoding and the image check of a large line run in a worker thread (C code: both cores work)
        return await anyio.to_thread.run_sync(_result_line, raw, self.shape, self.dialect)

    def _too_long(self, head: bytes) -> BatchLine:
        match = self._id_in_head.search(head)
        custom_id = None
        if match is not None:
            try:
                found = orjson.loads(match[1])
                custom_id = found if isinstance(found, str) else None
            except ValueError:
                pass
        return BatchLine(custom_id, error=PermanentError(
            f"result line longer than {self.max_line_bytes} bytes", code="line_too_long"))

    # -- the wire ---------------------------------------------------------------------------

    async def _call(self, method: str, path: str, *, json: Any = None, params: Mapping[str, str] | None = None,
                    content: Any = None, headers: Mapping[str, str] | None = None) -> dict[str, Any]:
        """One control request → its JSON object; every failure a classified RequestError."""
        url = f"{self.base_url}{path}"
        try:
            async with self._http.stream(method, url, json=json, params=params, content=content,
                                         headers={**(headers or {}), **self._auth}) as resp:
                raw = await self._read_capped(resp, MAX_CONTROL_BYTES)
        except httpx.TimeoutException as exc:
            raise TransientError(f"{method} {path} timed out ({type(exc).__name__})", code="timeout") from None
        except httpx.TransportError as exc:
            raise TransientError(f"{method} {path} failed ({type(exc).__name__})", code="connection_error") from None
        headers_in = {k.lower(): v for k, v in resp.headers.items()}
        if resp.status_code != 200:
            raise classify(resp.status_code, headers_in, bytes(raw))
        try:
            doc = orjson.loads(raw)
        except ValueError:
            raise _malformed(f"{method} {path}: body is not JSON", headers_in) from None
        if not isinstance(doc, dict):
            raise _malformed(f"{method} {path}: body is not a JSON object", headers_in)
        return doc

    async def _read_capped(self, resp: httpx.Response, cap: int) -> bytearray:
        buf = bytearray()
        async for chunk in resp.aiter_bytes():
            if len(buf) + len(chunk) > cap:
                raise PermanentError(f"answer exceeds the {cap}-byte cap", status=resp.status_code,
                                     code="response_too_large")
            buf += chunk
        return buf

    async def _pages(self, path: str, params: dict[str, str], list_key: str, cursor_param: str,
                     next_key: str | None, more_key: str | None, id_key: str) -> AsyncIterator[Any]:
        """Every entry of a paged list. The cursor is the answer's `next_key`, or (None) the last
        entry's id while `more_key` is true; a list that repeats a cursor ends there."""
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            doc = await self._call("GET", path, params=params)
            entries = doc.get(list_key)
            if not isinstance(entries, list):
                raise _malformed(f"GET {path}: no '{list_key}' list")
            for entry in entries:
                yield entry
            if next_key is not None:
                cursor = dig(doc, next_key)
            elif doc.get(more_key or "") is True and entries:
                cursor = dig(entries[-1], id_key)
            else:
                cursor = None
            if not isinstance(cursor, str) or not cursor or cursor in seen or not entries:
                return
            seen.add(cursor)
            params = {**params, cursor_param: cursor}

    def _batch_info(self, doc: Any) -> BatchInfo:
        shape = self.shape
        ident = dig(doc, shape.id_key)
        if not isinstance(ident, str) or not ident:
            raise _malformed(f"batch object without a string '{shape.id_key}'")
        metadata = dig(doc, shape.metadata_key)
        if shape.metadata_as_json and isinstance(metadata, str):
            try:
                metadata = orjson.loads(metadata)
            except ValueError:
                metadata = None  # a batch named by someone else: no tags
        errors = dig(doc, shape.errors_key)
        return BatchInfo(
            id=ident,
            status=shape.state(doc),
            input_file_id=_text(dig(doc, shape.input_file_key)),
            # paged results are read by batch id: lines() takes it where others take a file id
            output_file_id=ident if shape.results is not None else _text(dig(doc, shape.output_file_key)),
            error_file_id=_text(dig(doc, shape.error_file_key)),
            created_at=_when(dig(doc, shape.created_key)),
            expires_at=_when(dig(doc, shape.expires_key)),
            completed_at=_when(dig(doc, shape.completed_at_key)),
            total=_count(dig(doc, shape.total_key)),
            completed=_count(dig(doc, shape.completed_key)),
            failed=_count(dig(doc, shape.failed_key)),
            metadata={k: v for k, v in metadata.items() if isinstance(k, str) and isinstance(v, str)}
            if isinstance(metadata, dict) else {},
            errors=[e for e in errors if isinstance(e, dict)][:100] if isinstance(errors, list) else [],
        )


class _FileChanged(Exception):
    pass


def _file_info(doc: Mapping[str, Any]) -> FileInfo:
    ident = doc.get("id")
    if not isinstance(ident, str) or not ident:
        raise _malformed("file object without a string 'id'")
    size = doc.get("bytes")
    return FileInfo(id=ident, filename=_text(doc.get("filename")),
                    bytes=size if isinstance(size, int) and not isinstance(size, bool) else None,
                    created_at=_when(doc.get("created_at")), purpose=_text(doc.get("purpose")))


def _result_line(raw: bytes | bytearray, shape: BatchShape, dialect: Dialect) -> BatchLine:
    try:
        doc = orjson.loads(raw)
    except ValueError:
        return BatchLine(None, error=_malformed("result line is not JSON"))
    return _result(doc, shape, dialect)


def _result(doc: Any, shape: BatchShape, dialect: Dialect) -> BatchLine:
    """One result line → a generation read exactly like a synchronous answer, or its classified error."""
    if not isinstance(doc, dict):
        return BatchLine(None, error=_malformed("result line is not a JSON object"))
    custom_id = _text(dig(doc, shape.result_id_key))
    error = dig(doc, shape.result_error_key)
    if error:
        # the provider never ran it (batch_expired, batch_cancelled, …): it goes into a later batch
        code = _text(error.get("code")) if isinstance(error, dict) else None
        message = _text(error.get("message")) if isinstance(error, dict) else _text(error)
        return BatchLine(custom_id, error=TransientError(message or "the batch did not run this request",
                                                         code=code or "batch_error"))
    request_id = _text(dig(doc, shape.result_request_id_key))
    headers = {"x-request-id": request_id} if request_id else {}
    status = dig(doc, shape.result_status_key) if shape.result_status_key else 200
    body = dig(doc, shape.result_body_key)
    if not isinstance(status, int) or isinstance(status, bool):
        return BatchLine(custom_id, error=_malformed("result line without an HTTP status", headers))
    if status != 200:
        return BatchLine(custom_id, error=classify(status, headers, orjson.dumps(body) if body is not None else b""))
    if not isinstance(body, dict):
        return BatchLine(custom_id, error=_malformed("result line without a response body", headers))
    data = body.get("data")
    # n comes from the answer itself: the executor compares it with the item's n (a short answer is its call)
    n = max(1, len(data)) if isinstance(data, list) else 1
    try:
        return BatchLine(custom_id, generation=read_document(body, headers, n, dialect))
    except RequestError as exc:
        return BatchLine(custom_id, error=exc)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _when(value: Any) -> int | None:
    """A Unix time in seconds, from an integer or an RFC 3339 string (xAI's times)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value == value and abs(value) < 1e12:
        return int(value)
    if isinstance(value, str) and value:
        try:
            return int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())
        except ValueError:
            return None
    return None
