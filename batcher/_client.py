"""Request stage: the only module that speaks HTTP (and the only one importing httpx).

`ImagesClient.generate` sends one generation request — `POST {base_url}/images/generations`
in the default dialect, or wherever the endpoint's `Dialect` says — and returns the
images it got back, decoded; every failure is raised as a classified `RequestError`.
`ImagesClient.download` fetches a `url` answer, streaming to disk, retried as a download.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiofiles
import anyio
import httpx2 as httpx

from . import __version__
from ._dialect import DEFAULT_DIALECT, Dialect, DialectError
from ._exceptions import PermanentError, RequestError, TransientError
from ._policy import answer_refusal, classify
from ._writer import sniff

__all__ = ["ImagesClient", "Generation", "GeneratedImage", "Timeouts"]


@dataclass(frozen=True)
class Timeouts:
    """Image generation is slow: connect fails fast, reading may take minutes."""

    connect: float = 10.0
    read: float = 300.0
    write: float = 30.0
    download: float = 120.0  # one whole url download


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


def _malformed(message: str, headers: httpx.Headers | None = None) -> TransientError:
    return TransientError(f"malformed response: {message}", status=200, code="malformed_response",
                          headers=dict(headers or {}))


class ImagesClient:
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
        self.max_response_bytes = max_response_bytes
        self.max_download_bytes = max_download_bytes
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(timeouts.read, connect=timeouts.connect, write=timeouts.write, pool=None),
            # the pool is at least as large as the concurrency: no worker waits for a socket
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            headers={"User-Agent": f"batcher/{__version__}"},
            follow_redirects=False,
            trust_env=False,
        )

    async def __aenter__(self) -> ImagesClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def generate(self, body: dict[str, Any]) -> Generation:
        """Send one generation request; raise a classified RequestError on any failure.

        `body` holds batcher's canonical fields; the dialect turns it into what is sent.
        """
        try:
            prepared = self.dialect.prepare(body, self.options)
        except DialectError as exc:
            raise PermanentError(str(exc), code="dialect_error") from None
        url = f"{self.base_url}{prepared.path}"
        headers = {**prepared.headers, **self._auth} if prepared.headers else self._auth
        try:
            async with self._http.stream("POST", url, params=prepared.params or None, json=prepared.body,
                                         headers=headers) as resp:
                _refuse_stream(resp)
                raw = await self._read_capped(resp)
        except httpx.TimeoutException as exc:
            raise TransientError(f"timed out ({type(exc).__name__})", code="timeout") from None
        except httpx.TransportError as exc:
            raise TransientError(f"connection failed ({type(exc).__name__})", code="connection_error") from None
        headers = {k.lower(): v for k, v in resp.headers.items()}
        if resp.status_code != 200:
            raise classify(resp.status_code, headers, raw)
        return self._parse(raw, headers, int(body.get("n", 1)))

    async def _read_capped(self, resp: httpx.Response) -> bytes:
        declared = resp.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_response_bytes:
            raise PermanentError(f"response of {declared} bytes exceeds the {self.max_response_bytes}-byte cap",
                                 status=resp.status_code, code="response_too_large")
        chunks: list[bytes] = []
        total = 0
        async for chunk in resp.aiter_bytes():
            total += len(chunk)
            if total > self.max_response_bytes:
                raise PermanentError(f"response exceeds the {self.max_response_bytes}-byte cap",
                                     status=resp.status_code, code="response_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    def _parse(self, raw: bytes, headers: dict[str, str], n: int) -> Generation:
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise _malformed("body is not JSON", headers) from None
        if not isinstance(doc, dict):
            raise _malformed("body is not a JSON object", headers)
        if doc.get("error") and not doc.get("data"):
            raise classify(200, headers, raw)  # a 200 carrying an error object
        self.dialect.read(doc, headers)  # e.g. xai's moderated images: a 200 that is a refusal
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
            revised = entry.get("revised_prompt")
            revised = revised if isinstance(revised, str) else None
            b64, url = entry.get("b64_json"), entry.get("url")
            # read what came back, not what was asked for: gateways swap formats, null a key
            if isinstance(b64, str) and b64:
                try:
                    images.append(GeneratedImage(data=base64.b64decode(b64, validate=True), revised_prompt=revised))
                except (binascii.Error, ValueError):
                    raise _malformed(f"data[{i}].b64_json is not valid base64", headers) from None
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
            usage=usage if isinstance(usage, dict) else None,
            headers=headers,
        )

    async def download(self, url: str, dest: Path, *, attempts: int = 3) -> None:
        """Stream an image URL to `dest`, checking scheme, size, type and magic bytes.

        Retried as a download (never by generating again); raises RequestError at the end.
        """
        last: RequestError | None = None
        for attempt in range(1, attempts + 1):
            try:
                with anyio.fail_after(self.timeouts.download):
                    await self._download_once(url, dest)
                return
            except TimeoutError:
                last = TransientError(f"image download from {urlsplit(url).hostname or '?'} timed out",
                                      code="download_timeout")
            except TransientError as exc:
                last = exc
            except PermanentError:
                _unlink(dest)
                raise
            _unlink(dest)
            if attempt < attempts:
                await anyio.sleep(min(0.5 * 2 ** (attempt - 1), 5.0))
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


def _refuse_stream(resp: httpx.Response) -> None:
    """A streamed answer was generated (and billed): fail the item for good, never send it again."""
    ctype = resp.headers.get("content-type", "").split(";")[0].strip().lower()
    if resp.status_code == 200 and ctype == "text/event-stream":
        raise PermanentError("the server streamed its answer (text/event-stream), which batcher can't save; "
                             "remove stream from the request", status=200, code="streamed_answer",
                             headers=dict(resp.headers))


def _unlink(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
