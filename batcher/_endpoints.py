"""The endpoints a run sends to: each one's key, headers, limits, client, breaker and counters.

>>> endpoints = resolve_endpoints(job, selection.live(job), options, models={"gpt-image-1"}, reporter=reporter, prices=prices)
>>> async with make_client(endpoints[0], Timeouts(), job) as client: ...

Keys come from the environment only (never the job file) and live in memory only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ._client import BatchClient, ImagesClient, Timeouts
from ._exceptions import BatcherError
from ._job import Endpoint, Job, is_openai_host
from ._limiter import ConcurrencyController, RateLimiter
from ._plan import PriceTable
from ._report import Reporter
from ._route import BreakerPolicy, CircuitBreaker

if TYPE_CHECKING:
    from ._runner import RunOptions

DEFAULT_BASE_URL = "https://open.dieyuyun.com/v1"
DEFAULT_CONCURRENCY = 16
KEY_ENVS = ("BATCHER_API_KEY", "OPENAI_API_KEY")


class EndpointRun:
    """One endpoint during a run: its client, limiter, pool, circuit breaker and counters."""

    client: ImagesClient  # set by the executor once the client is open
    batch_client: BatchClient  # an endpoint in batch mode: set by the batch executor

    def __init__(self, ep: Endpoint, key: str, base_url: str, concurrency: int, rpm: float | None,
                 ipm: float | None, prices: PriceTable, headers: dict[str, str] | None = None,
                 breaker: BreakerPolicy | None = None) -> None:
        self.ep = ep
        self.headers = headers or {}  # values from the environment: kept in memory only
        self.name = ep.name
        self.key = key
        self.key_env: str | None = None  # the environment variable the key came from (batch records name it)
        self.base_url = base_url
        self.concurrency = concurrency
        self.rpm, self.ipm = rpm, ipm
        self.limiter: Any = RateLimiter(rpm, ipm)
        self.pool = ConcurrencyController(concurrency, limit_known=bool(rpm or ipm))
        self.breaker = CircuitBreaker(breaker or BreakerPolicy())
        self.prices = prices
        self.retired: str | None = None
        self.gate_timed = False  # a worker sleeps until the next slot frees (see SyncExecutor._wait_gate)
        self.stats: dict[str, Any] = {"requests": 0, "done": 0, "failed": 0, "images": 0, "cost": 0.0,
                                      "rate_limited": 0}

    def gate(self) -> float:
        """Seconds until this endpoint could send a request (0: take an item now)."""
        limiter = self.limiter
        if not isinstance(limiter, RateLimiter):
            return 0.0  # a shared limiter answers only by acquiring: take the item, wait there
        return limiter.wait_time(1) if not limiter.waiting else 0.005


def make_client(ep: EndpointRun, timeouts: Timeouts, job: Job) -> ImagesClient:
    """The endpoint's client (an async context manager), speaking its dialect with its key and headers."""
    return ImagesClient(ep.base_url, ep.key, dialect=job.dialect_of(ep.ep), options=ep.ep.options,
                        timeouts=timeouts, max_connections=ep.concurrency, headers=ep.headers)


def make_batch_client(ep: EndpointRun, timeouts: Timeouts, job: Job) -> BatchClient:
    """The endpoint's Files + Batches client (batch mode), in its dialect's batch shapes."""
    return BatchClient(ep.base_url, ep.key, dialect=job.dialect_of(ep.ep), options=ep.ep.options,
                       timeouts=timeouts, headers=ep.headers)


def _key_names(ep: Endpoint, options: RunOptions, base_url: str | None = None) -> list[str]:
    """Where the key comes from: --api-key-env, the endpoint's api_key_env, else BATCHER_API_KEY, and
    OPENAI_API_KEY only when the endpoint is OpenAI's own host (never sent to a gateway by accident)."""
    named = [n for n in (options.api_key_env, ep.api_key_env) if n]
    if named:
        return named
    return [n for n in KEY_ENVS if n != "OPENAI_API_KEY" or is_openai_host(base_url)]


def _resolve_key(ep: Endpoint, options: RunOptions, base_url: str | None = None) -> str | None:
    """The endpoint's key, from the environment (never from the job file); None if unset."""
    if options.api_key:
        return options.api_key
    for name in _key_names(ep, options, base_url):
        value = os.environ.get(name)
        if value:
            return value
    return None


def _endpoint_headers(ep: Endpoint) -> dict[str, str]:
    """The endpoint's extra headers, each value read from the environment variable the job names."""
    out: dict[str, str] = {}
    for name, env in ep.headers.items():
        value = os.environ.get(env)
        if not value:
            raise BatcherError(f"endpoint {ep.name!r}: header {name} needs the environment variable {env}, "
                               f"which is not set")
        if any(c in value for c in "\r\n\0"):
            raise BatcherError(f"endpoint {ep.name!r}: the value of {env} (header {name}) holds a line break")
        out[name] = value
    return out


def resolve_endpoints(job: Job, live: Iterable[Endpoint], options: RunOptions, models: Iterable[Any],
                      reporter: Reporter, prices: Mapping[str, PriceTable], also: Iterable[str] = ()) -> list[EndpointRun]:
    """The endpoints this run uses, of those it may use (`live`: `Selection.live`): those serving one
    of `models`, and those named in `also` (batches of theirs are at the provider), each with its key,
    headers and limits; a missing key is an error only where an item needs the endpoint."""
    opts = options
    models = set(models)
    also = set(also)
    runs: list[EndpointRun] = []
    for ep in live:
        needed = ep.name in also or any(ep.serves(m) for m in models)  # dialect limits (n): checked per item
        base_url = (opts.base_url or ep.base_url or os.environ.get("BATCHER_BASE_URL") or DEFAULT_BASE_URL)
        key = _resolve_key(ep, opts, base_url)
        if key is None:
            names = " or ".join(_key_names(ep, opts, base_url))
            if needed:
                hint = ("" if is_openai_host(base_url) or not os.environ.get("OPENAI_API_KEY") else
                        f"; OPENAI_API_KEY is used only for api.openai.com, not {base_url}")
                raise BatcherError(
                    f"no API key for endpoint {ep.name!r}: set the environment variable {names}{hint} (or use "
                    f"--simulate to try batcher on the built-in simulator)")
            reporter.log(f"endpoint {ep.name!r}: no key in {names}; not used (no item needs it)", level="warning")
            continue
        if not needed:
            continue
        headers = _endpoint_headers(ep)
        rpm = opts.rpm or ep.rate_limit.rpm or (job.rate_limit.rpm if len(job.endpoints) == 1 else None)
        ipm = opts.ipm or ep.rate_limit.ipm or (job.rate_limit.ipm if len(job.endpoints) == 1 else None)
        concurrency = opts.concurrency or ep.concurrency or job.concurrency or DEFAULT_CONCURRENCY
        run = EndpointRun(ep, key, base_url, concurrency, rpm, ipm, prices[ep.name], headers, opts.breaker)
        if not opts.api_key:
            run.key_env = next((n for n in _key_names(ep, opts, base_url) if os.environ.get(n)), None)
        runs.append(run)
    return runs


def share_limits(endpoints: Iterable[EndpointRun], url: str, workers: int) -> None:
    """`--limiter redis://`: every worker of every shard shares each endpoint's window (imports redis)."""
    from ._redis import SharedRateLimiter, endpoint_key

    for ep in endpoints:
        ep.limiter = SharedRateLimiter(url, endpoint_key(ep.base_url, ep.key, None), ep.rpm, ep.ipm, workers=workers)
