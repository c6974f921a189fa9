"""The pipeline: read → schedule → request → write → report, under one anyio task group.

`run()` is the one public entry point; the CLI wraps it.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import math
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio

from ._client import Generation, ImagesClient, Timeouts
from ._exceptions import (
    BatcherError,
    FatalError,
    JobError,
    JobValidationError,
    ManifestError,
    Problem,
    RequestError,
    ShardError,
    TransientError,
)
from ._ids import safe_stem
from ._job import MAX_CONCURRENCY, Endpoint, Item, Job, is_openai_host
from ._layout import SEGMENTS, Layout, decide_layout
from ._limiter import ConcurrencyController, RateLimiter
from ._manifest import Journal, count_items, needs_run, write_manifest
from ._plan import Budget, BudgetLimits, PriceTable, endpoint_prices, item_price
from ._policy import POLICY_CODES, Fail, FailureState, Hold, Retire, RetryPolicy, decide
from ._records import (
    Record,
    attempt_record,
    done_record,
    end_record,
    failed_record,
    run_record,
    short_record,
)
from ._redact import Redactor
from ._report import Reporter
from ._route import BreakerPolicy, CircuitBreaker, Dispatcher, Task
from ._shard import ShardSpec, fingerprint_line
from ._sharded import is_remote
from ._writer import DISK_ERRNOS, OutputDir, SavedImage

__all__ = [
    "RunOptions", "RunResult", "run", "run_sync", "resolve_out", "DEFAULT_BASE_URL",
    "EXIT_OK", "EXIT_FAILED", "EXIT_INVALID", "EXIT_LOCKED", "EXIT_ABORTED", "EXIT_INTERRUPTED",
]

DEFAULT_BASE_URL = "https://open.dieyuyun.com/v1"
DEFAULT_CONCURRENCY = 16
CLAIM_TTL = 30.0  # seconds; renewed every 10 s while a worker holds the item
CLAIM_WAITS = 6  # times an item held by another worker is asked for again (every TTL/2) before giving up
KEY_ENVS = ("BATCHER_API_KEY", "OPENAI_API_KEY")

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_LOCKED, EXIT_ABORTED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130


@dataclass(frozen=True)
class RunOptions:
    """How to run a job. Unset fields fall back to the job file, then to built-in defaults."""

    out: str | None = None
    base_url: str | None = None
    api_key_env: str | None = None
    api_key: str | None = field(default=None, repr=False)  # programmatic use only; never stored
    concurrency: int | None = None
    rpm: float | None = None
    ipm: float | None = None
    timeout: float = Timeouts.read  # defaults live with what they configure
    connect_timeout: float = Timeouts.connect
    max_attempts: int = RetryPolicy.max_attempts
    retry_failed: bool = False
    force: bool = False
    max_policy_violations: int = 50
    grace_period: float = 30.0
    handle_signals: bool = False
    retry: RetryPolicy | None = None
    breaker: BreakerPolicy | None = None  # when an endpoint rests, and when it is given up for dead
    seed: int | None = None
    endpoints: tuple[str, ...] = ()  # use only these of the job's endpoints (default: all)
    shard: ShardSpec | None = None  # run one shard of a planned output (see `batcher plan --shards`)
    limiter: str | None = None  # redis://HOST:PORT/DB: one rate limit and item claims for all workers
    work_dir: str | None = None  # a sharded or object-storage run's local work folder
    max_images: int | None = None  # this run starts no work beyond these (exit 4, rest pending)
    max_cost: float | None = None

    def __post_init__(self) -> None:
        if self.concurrency is not None and not 1 <= self.concurrency <= MAX_CONCURRENCY:
            raise ValueError(f"concurrency must be from 1 to {MAX_CONCURRENCY}, got {self.concurrency}")
        if not (math.isfinite(self.grace_period) and self.grace_period >= 0):
            raise ValueError(f"grace_period must be a finite number ≥ 0, got {self.grace_period}")


@dataclass
class RunResult:
    outcome: str
    exit_code: int
    out: str
    summary: dict[str, int]
    images: int = 0
    requests: int = 0
    rate_limited: int = 0
    elapsed: float = 0.0
    error: dict[str, Any] | None = None
    cost: float | None = None  # estimated cost of the images this run saved (None: no pricing)
    endpoints: dict[str, dict[str, Any]] = field(default_factory=dict)  # per endpoint: requests, done, ...
    merged: dict[str, int] | None = None  # a sharded run's whole-output summary, once every shard committed
    budget: dict[str, Any] | None = None  # what the budget charged, when one was set

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_out(job: Job, options: RunOptions) -> Path:
    if options.out:
        return Path(options.out)
    if job.output:
        return Path(job.output)
    return Path("output") / job.name


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


def run_sync(job: Job, options: RunOptions = RunOptions(), reporter: Reporter | None = None) -> RunResult:
    """Run a job to completion in a fresh event loop."""
    return anyio.run(run, job, options, reporter)


async def run(job: Job, options: RunOptions = RunOptions(), reporter: Reporter | None = None) -> RunResult:
    """Run a job: every item ends done, failed (with its reason), or pending for the next run.

    >>> job = load_job("jobs/example.yaml")
    >>> result = await run(job, RunOptions(out="output/example"))
    >>> result.exit_code
    0
    Raises JobValidationError (nothing sent), OutputError / ManifestError / LockedError.
    """
    job = copy.copy(job)  # this run's filters (endpoints, shard) never reach the caller's Job
    if options.endpoints:
        job.use_endpoints(options.endpoints)
    job.validate()
    reporter = reporter or Reporter(quiet=True)
    for warning in job.warnings:
        reporter.log(f"{warning}", level="warning")
    target = options.out or job.output or str(Path("output") / job.name)
    sharded = None
    if options.shard is not None or is_remote(target):
        from ._sharded import ShardedOutput  # the store (and fsspec for s3://) only when asked for

        shard = options.shard or ShardSpec(0, 1)
        sharded = ShardedOutput(target, shard, options.work_dir)
        job.shard = shard if shard.count > 1 else None
        out = OutputDir(sharded.work)
    else:
        out = OutputDir(resolve_out(job, options))
        _refuse_planned(out.root)
        out.refuse_foreign()
    out.prepare()
    out.lock()
    try:
        if sharded is not None:
            sharded.reset_work()  # a cache of the store, which may have started over since
            out.prepare()
        runner = _Runner(job, options, out, reporter, sharded)
        return await runner.run()
    finally:
        if sharded is not None and sharded.committed:
            sharded.remove_work()  # the shard is in the store; removed while still locked
        out.unlock()


def _refuse_planned(root: Path) -> None:
    if (root / "plan.json").is_file() or (root / "segments").is_dir():
        raise ShardError(f"{root} is planned for sharded runs (plan.json): run each shard with --shard I/N "
                         f"(or the launcher's index variable with --shards N)")


# Below this many journaled items a run checks every done item's files (a few ms per thousand);
# above it only those no earlier run has checked, so a rerun's cost does not grow with what is done.
FULL_FILE_CHECK_BELOW = 10_000


class _Runner:
    def __init__(self, job: Job, options: RunOptions, out: OutputDir, reporter: Reporter,
                 sharded: Any = None) -> None:
        self.job = job
        self.sharded = sharded
        self.claims: Any = None
        self._claimed: set[str] = set()
        self.claim_skipped = 0  # items another worker held when we came to them
        self.options = options
        self.out = out
        self.reporter = reporter
        self.policy = options.retry or RetryPolicy(max_attempts=options.max_attempts)
        self.rng = random.Random(options.seed)
        self.stopping = False
        self.interrupted = False
        self.fatal: RequestError | None = None
        self.fatal_note: str | None = None
        self.policy_violations = 0
        self.requests = 0
        self.images = 0
        self.cost = 0.0
        self.prices = endpoint_prices(job)  # per endpoint name
        self.budget = Budget(BudgetLimits(options.max_images, options.max_cost))
        self._wait_scopes: set[anyio.CancelScope] = set()
        self._missing: set[str] = set()
        self.redact = Redactor()
        self._have: dict[str, tuple[list[dict[str, Any]], float | None]] = {}  # short items: images, cost so far
        self._files_checked = False  # every done entry the checkpoint hasn't verified was checked
        self._items_digest = hashlib.sha256()  # the job's (id, rhash) list: manifest.json's input
        self.layout = Layout()

    # -- setup ------------------------------------------------------------------------------

    def _open_journal(self) -> Journal:
        if self.sharded is not None:
            self.sharded.rebuild_journal(self.out.journal)  # what every machine finished, for this shard
        # a local output resumes from its checkpoint; a shard's journal is rebuilt from segments each run
        journal = Journal.open(self.out.journal, checkpoint=self.sharded is None)
        if journal.glued_lines:
            self.reporter.log(f"{self.out.journal}:{journal.glued_lines[0]}: {len(journal.glued_lines)} line(s) hold a "
                              f"record cut short by a full disk, then a whole one; the whole ones were kept",
                              level="warning")
        if journal.torn_line is not None:
            self.reporter.log(f"{self.out.journal}:{journal.torn_line}: torn last line from an interrupted "
                              f"run ignored", level="warning")
        names = {str(r.get("job")) for r in journal.runs if r.get("t") == "run"}
        if names and self.job.name not in names and not self.options.force:
            journal.close()
            raise ManifestError(
                f"{self.out.root} holds the manifest of job {sorted(names)[0]!r}, not {self.job.name!r}; "
                f"use another --out, or --force to add this job's items to it"
            )
        if not names and self.out.manifest.exists() and not self.options.force:
            journal.close()
            raise ManifestError(f"{self.out.manifest} exists without its journal {self.out.journal.name}; "
                                f"refusing to overwrite it (use --force)")
        return journal

    def _needs_run(self, item: Item) -> bool:
        entry = self.journal.entries.get(item.id)
        if entry is not None and entry.rhash == item.rhash and entry.status == "done":
            return item.id in self._missing
        return needs_run(entry, item.rhash, self.options.retry_failed)

    def _check_done_files(self) -> None:
        """Done items whose files vanished or are short (a lost disk write) run again."""
        if not self.out.journal.exists():
            return
        entries = getattr(self.journal.entries, "unverified", None)  # a checkpoint: only what it hasn't seen
        if entries is not None and len(self.journal.entries) < FULL_FILE_CHECK_BELOW:
            entries = None  # a small output checks every file every run: a file deleted by hand still runs again
        self._files_checked = True
        with open(self.out.journal, "rb") as fh:
            for item_id, entry in (entries() if entries is not None else self.journal.entries.items()):
                if entry.status != "done":
                    continue
                rec = self.journal.record(item_id, fh)
                has_file = self.sharded.has_file if self.sharded is not None else self.out.has_file
                if rec and not all(has_file(i["file"], i["bytes"]) for i in rec.get("images", [])):
                    self._missing.add(item_id)
        if self._missing:
            self.reporter.log(f"{len(self._missing)} done item(s) have missing or short image files; "
                              f"they will be generated again", level="warning")

    def _to_run(self) -> Iterator[Item]:
        for item in self.job.items():
            if self._needs_run(item):
                yield item

    # -- the run ----------------------------------------------------------------------------

    async def run(self) -> RunResult:
        started = time.monotonic()
        removed = self.out.clean_temporaries()
        if removed:
            self.reporter.log(f"removed {removed} temporary file(s) left by an interrupted run")
        self.journal = self._open_journal()
        try:
            await anyio.to_thread.run_sync(self._check_done_files)
            total = todo = 0
            models: set[Any] = set()
            digest = hashlib.sha256()
            shard = self.job.shard
            for item in self.job.all_items():
                if self.sharded is not None:
                    digest.update(fingerprint_line(item.id, item.rhash))
                if shard is not None and not shard.contains(item.id):
                    continue
                self._items_digest.update(f"{item.id}\t{item.rhash}\n".encode())
                total += 1
                if self._needs_run(item):
                    todo += 1
                    models.add(item.body.get("model"))
                    if self.options.max_cost is not None and item_price(self.job, item, self.prices) is None:
                        raise JobValidationError([Problem(
                            item.file, item.line, "pricing",
                            f"--max-cost needs a price for every item; none matches model="
                            f"{item.body.get('model')!r} size={item.body.get('size')!r} "
                            f"quality={item.body.get('quality')!r}")])
            if self.sharded is None:  # decided once per output (a shard's files follow the store's layout)
                self.layout = decide_layout(self.out.root, total, fresh=not self.journal.runs)
                self.out.layout = self.layout.images
            if self.sharded is not None and self.sharded.shard.count > 1:
                self.sharded.check_plan("sha256:" + digest.hexdigest())
            if self.sharded is not None:
                await anyio.to_thread.run_sync(self.sharded.open_writer, self.journal)
            if todo == 0:
                self.reporter.start(0, total)
                return await self._finish(started)
            self.endpoints = self._endpoints_for(models)
            self._redact_secrets()
            if self.options.limiter:
                self._use_shared_limits()
            self.journal.append(run_record(self.job.name, str(self.job.path), os.getpid()))
            self.reporter.start(todo, total - todo)
            await self._pipeline()
            return await self._finish(started)
        finally:
            self.journal.close()

    def _endpoints_for(self, models: set[Any]) -> list[_EndpointRun]:
        """The endpoints this run uses, each with its key; a missing key is an error only where needed."""
        opts = self.options
        runs: list[_EndpointRun] = []
        for ep in self.job.live_endpoints():
            needed = any(ep.serves(m) for m in models)  # dialect limits (n) are rare: checked per item
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
                self.reporter.log(f"endpoint {ep.name!r}: no key in {names}; not used (no item needs it)",
                                  level="warning")
                continue
            if not needed:
                continue
            headers = _endpoint_headers(ep)
            rpm = opts.rpm or ep.rate_limit.rpm or (self.job.rate_limit.rpm if len(self.job.endpoints) == 1 else None)
            ipm = opts.ipm or ep.rate_limit.ipm or (self.job.rate_limit.ipm if len(self.job.endpoints) == 1 else None)
            concurrency = opts.concurrency or ep.concurrency or self.job.concurrency or DEFAULT_CONCURRENCY
            runs.append(_EndpointRun(ep, key, base_url, concurrency, rpm, ipm, self.prices[ep.name], headers,
                                     opts.breaker))
        return runs

    def _redact_secrets(self) -> None:
        """From here on, no key or header value of this run is written or shown, even if echoed back."""
        self.redact = Redactor.of([self.options.api_key, *(e.key for e in self.endpoints),
                                   *(v for e in self.endpoints for v in e.headers.values())])
        if self.redact:
            self.journal.redact = self.redact
            self.reporter.redact = self.redact

    def _use_shared_limits(self) -> None:
        """`--limiter redis://`: every worker of every shard shares each endpoint's window and
        claims items before sending them (imports redis only here)."""
        from ._redis import ClaimStore, SharedRateLimiter, endpoint_key

        url = self.options.limiter
        workers = self.job.shard.count if self.job.shard is not None else 1
        for ep in self.endpoints:
            ep.limiter = SharedRateLimiter(url, endpoint_key(ep.base_url, ep.key, None), ep.rpm, ep.ipm,
                                           workers=workers)
        out = self.sharded.out if self.sharded is not None else str(self.out.root.resolve())
        self.claims = ClaimStore(url, out)
        # short, renewed every third of it while held: a dead worker's claims free up within it
        self.claim_ttl = CLAIM_TTL

    async def _claim(self, task: Task) -> str:
        """Take the item for this worker: "ok", "done" (finished by another worker), or "held"."""
        if self.claims is None or task.item.id in self._claimed:
            return "ok"
        try:
            if await self.claims.claim(task.item.id, self.claim_ttl):
                self._claimed.add(task.item.id)
                return "ok"
            holder = await self.claims.holder(task.item.id)
        except Exception as exc:  # Redis away: the shard split still keeps workers apart
            self.reporter.log(f"claims unavailable ({type(exc).__name__}); going on without", level="warning")
            return "ok"
        return "done" if holder == "done" else "held" if holder is not None else "retry"

    async def _unclaim(self, item_id: str, done: bool) -> None:
        if self.claims is None or item_id not in self._claimed:
            return
        self._claimed.discard(item_id)
        with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
            try:
                if done:
                    await self.claims.keep(item_id, 24 * 3600.0)  # others' views may predate our segment
                else:
                    await self.claims.release(item_id)
            except Exception:
                pass  # the claim expires on its own

    async def _renew_claims(self) -> None:
        while True:
            await anyio.sleep(self.claim_ttl / 3)
            for item_id in list(self._claimed):
                try:
                    await self.claims.renew(item_id)
                except Exception:
                    break  # Redis away: try again next period

    async def _pipeline(self) -> None:
        opts = self.options
        timeouts = Timeouts(connect=opts.connect_timeout, read=opts.timeout)
        self.deadline = opts.timeout + opts.connect_timeout
        total_slots = sum(e.concurrency for e in self.endpoints)
        self.dispatch = Dispatcher([e.name for e in self.endpoints], max_queued=max(16, total_slots * 2))
        async with AsyncExitStack() as stack:
            for ep in self.endpoints:
                ep.client = await stack.enter_async_context(_make_client(ep, timeouts, self.job))
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._ticker)
                if self.claims is not None:
                    outer.start_soon(self._renew_claims)
                if opts.handle_signals:
                    outer.start_soon(self._watch_signals)
                async with anyio.create_task_group() as work:
                    self._work_scope = work.cancel_scope
                    work.start_soon(self._feed)
                    for ep in self.endpoints:
                        for _ in range(ep.concurrency):
                            work.start_soon(self._endpoint_worker, ep)
                outer.cancel_scope.cancel()

    async def _feed(self) -> None:
        try:
            for item in self._to_run():
                if self.stopping:
                    break
                eligible = frozenset(e.name for e in self.endpoints if self.job.can_send(e.ep, item.body))
                entry = self.journal.entries.get(item.id)
                prior = entry.attempts if entry is not None and entry.rhash == item.rhash else 0
                if entry is not None and entry.status == "failed" and entry.error_kind == "transient":
                    await anyio.to_thread.run_sync(self._load_short, item)  # reads one journal line
                if not await self._wait(self.dispatch.put_new, Task(item, eligible, attempt=prior)):
                    break
        except JobError as exc:  # the job file changed under the run: what was sent is journaled
            self._stop(FatalError(str(exc), code="job_changed"), f"stopping: {exc}")
        finally:
            self.dispatch.close_feed()

    def _load_short(self, item: Item) -> None:
        """A short answer earlier (fewer images than n, recorded and paid): keep its images, so the
        next request asks only for the missing ones and their numbering continues."""
        short = self.journal.short_record(item.id, item.rhash, item.images)
        if short is not None:
            self._have[item.id] = (short["images"], short.get("cost"))

    def _wanted(self, item: Item) -> int:
        """Images to ask for: the item's n, less those a short answer already brought."""
        have = self._have.get(item.id)
        return item.images - len(have[0]) if have else item.images

    async def _endpoint_worker(self, ep: _EndpointRun) -> None:
        """Take an item only when this endpoint can send it now: the pull makes the routing."""
        dispatch = self.dispatch
        while not self.stopping and ep.retired is None and not dispatch.done:
            wait = ep.breaker.wait_time()
            if wait > 0:
                # dispatch.wait, not sleep: the run's end wakes it; a retry falling due does not (it
                # must wait for the rest to end too: waking for it would spin)
                if not await self._wait(dispatch.wait, ep.name, wait, False):
                    return
                continue
            if not await self._wait(ep.pool.slots.acquire):
                return
            try:
                task = None
                while task is None and not self.stopping and ep.retired is None and not dispatch.done:
                    if ep.breaker.wait_time() > 0:
                        break
                    wait = ep.gate()
                    if wait > 0:
                        if not await self._wait(dispatch.wait, ep.name, wait):
                            return
                        continue
                    task = dispatch.try_take(ep.name)
                    if task is None and not await self._wait(dispatch.wait, ep.name):
                        return
                if task is not None:
                    if task.tries:
                        self.reporter.retry(-1)
                    verdict = await self._claim(task)
                    if verdict in ("held", "retry") and task.claim_waits < CLAIM_WAITS and not self.stopping:
                        # a live worker renews its claim; a dead one's lapses: ask again later
                        task.claim_waits += 1
                        delay = 0.0 if verdict == "retry" else self.claim_ttl / 2
                        self.dispatch.retry_later(task, delay)
                        continue
                    if verdict != "ok":
                        self.claim_skipped += 1
                        self.dispatch.finished(task)  # another worker did it or has it; pending here
                        continue
                    await self._attempt(ep, task)
            finally:
                ep.pool.slots.release()

    async def _ticker(self) -> None:
        while True:
            await anyio.sleep(1.0)
            self.reporter.tick()
            try:
                await anyio.to_thread.run_sync(self.journal.sync)
            except OSError as exc:
                self._disk_trouble(exc)
            if self.sharded is not None:
                await anyio.to_thread.run_sync(self.sharded.sync)

    async def _watch_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if self.interrupted:
                    self.reporter.log("second signal: stopping now; in-flight requests stay pending", level="warning")
                    self._work_scope.cancel()
                    return
                self.interrupted = True
                self.reporter.log(f"{signal.Signals(signum).name}: no new requests; waiting up to "
                                  f"{self.options.grace_period:.0f}s for those in flight (signal again to "
                                  f"stop now)", level="warning")
                self._stop()
                self._work_scope.deadline = min(self._work_scope.deadline,
                                                anyio.current_time() + self.options.grace_period)

    def _stop(self, fatal: RequestError | None = None, note: str | None = None) -> None:
        """Stop submitting: wake every waiting worker; in-flight requests finish."""
        if fatal is not None and self.fatal is None:
            self.fatal, self.fatal_note = fatal, note
            self.reporter.log(note or f"fatal: {fatal.message}", level="error")
        self.stopping = True
        for scope in list(self._wait_scopes):
            scope.cancel()

    async def _wait(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> bool:
        """Await fn(*args) unless the run stops meanwhile; return False if it stopped."""
        return await self._wait_for(fn, *args) is not None

    async def _wait_for(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """fn(*args)'s result (True for None), or None if the run stopped meanwhile."""
        if self.stopping:
            return None
        result: Any = None
        with anyio.CancelScope() as scope:
            self._wait_scopes.add(scope)
            try:
                result = await fn(*args)
            finally:
                self._wait_scopes.discard(scope)
        if scope.cancelled_caught or self.stopping:
            return None
        return True if result is None else result

    # -- one attempt ------------------------------------------------------------------------

    async def _attempt(self, ep: _EndpointRun, task: Task) -> None:
        """Send one attempt of `task` on `ep` and decide what happens to the item next."""
        item = task.item
        try:
            gen = await self._send(ep, task)
        except _Stopped:
            ep.breaker.on_abandoned()
            self.dispatch.finished(task)  # stays pending for the next run
            await self._unclaim(item.id, done=False)
            return
        except RequestError as exc:
            await self._after_failure(ep, task, exc)
            return
        try:
            have = self._have.get(item.id)
            saved = await self._save(ep, safe_stem(item.id), gen, first=len(have[0]) if have else 0,
                                     count=item.images)
        except RequestError as exc:
            await self._record_failure(ep, task, exc)
        except OSError as exc:
            self._disk_trouble(exc)
            self.dispatch.finished(task)
        else:
            await self._record_done(ep, task, gen, saved)

    async def _send(self, ep: _EndpointRun, task: Task) -> Generation:
        """Take rate tokens and budget, journal the attempt, send (the caller holds a slot).

        The budget is charged just before sending (so a budget stop never strands work that
        fits) and refunded only when an error answer proves nothing was generated.
        """
        item = task.item
        wanted = self._wanted(item)  # a short answer earlier: only the missing images
        permit = await self._wait_for(ep.limiter.acquire, wanted)
        if permit is None:
            raise _Stopped
        cost = ep.prices.cost(item.body, wanted)
        if not self.budget.reserve(wanted, cost):
            permit.refund()
            note = (f"budget reached ({self.budget.describe()}): {wanted} more image(s) would exceed "
                    f"it; stopping, unstarted items stay pending")
            self._stop(FatalError(note, code="budget_exhausted"), note)
            raise _Stopped
        task.tries += 1
        task.attempt += 1
        # journal first: a request that times out after it was sent may still be billed
        try:
            self.journal.append(attempt_record(item.id, item.rhash, task.attempt, ep.name))
        except OSError as exc:
            self.budget.refund(wanted, cost)
            self._disk_trouble(exc)
            raise _Stopped from None
        self.requests += 1
        ep.stats["requests"] += 1
        ep.breaker.starting()
        permit.sent()
        body = ep.ep.body_for(item.body)
        if wanted != item.images:
            body["n"] = wanted
        try:
            with anyio.fail_after(self.deadline):
                gen = await ep.client.generate(body, on_sent=permit.sent)  # re-stamped on the wire
        except TimeoutError:
            raise TransientError(f"no answer within {self.deadline:.0f}s", code="timeout") from None
        except RequestError as exc:
            if exc.status is not None and exc.status >= 400:
                self.budget.refund(wanted, cost)  # an error answer: nothing was generated
            if exc.status == 429 and exc.kind == "transient":
                permit.refund()  # the server did not count it; its retry may use the slot
            raise
        ep.pool.on_answer()
        ep.pool.on_success()
        ep.breaker.on_success()
        ep.limiter.observe_headers(gen.headers, permit.sent_at)
        return gen

    async def _after_failure(self, ep: _EndpointRun, task: Task, exc: RequestError) -> None:
        """A failed attempt: note what it says about the endpoint, then apply `decide`'s verdict."""
        item, dispatch = task.item, self.dispatch
        exc.message = self.redact(exc.message)
        task.error = exc
        # what the answer says about the endpoint, whatever becomes of the item
        if exc.status is not None:
            ep.pool.on_answer()
            ep.limiter.observe_headers(exc.headers)
        if exc.kind == "fatal":
            ep.breaker.on_abandoned()
        elif exc.kind == "permanent":
            ep.breaker.on_success()  # the endpoint answered about the request: it works
            if exc.code in POLICY_CODES:
                self.policy_violations += 1
        elif exc.status == 429:
            ep.limiter.on_rate_limited(exc.retry_after, exc.type or "requests", item.images)
            ep.stats["rate_limited"] += 1
        elif exc.status is None or exc.status >= 500 or exc.code in ("timeout", "connection_error"):
            ep.pool.on_server_trouble()
            if ep.breaker.on_trouble():
                if ep.breaker.dead:
                    return self._give_up(ep, task, exc)
                self.reporter.log(f"endpoint {ep.name!r}: {ep.breaker.streak} failures in a row "
                                  f"(last: {exc.code or exc.status}); resting it "
                                  f"{ep.breaker.open_until - anyio.current_time():.0f}s, then one probe",
                                  level="warning")
                dispatch.unpin(ep.name)
        state = FailureState(tries=task.tries, stopping=self.stopping, policy_violations=self.policy_violations,
                             max_policy_violations=self.options.max_policy_violations,
                             endpoint_healthy=ep.breaker.state == "closed")
        decision = decide(exc, state, self.policy, self.rng)
        if isinstance(decision, Retire):
            self._retire(ep, exc)
            task.prefer = None
            task.tries -= 1  # not the item's fault: it goes to another endpoint, or stays pending
            dispatch.retry_later(task, 0.0)
            if not dispatch.live:
                self._stop(exc, f"fatal: no endpoint left (last: {ep.name!r}, {exc.describe()}); "
                                f"unstarted items stay pending")
        elif isinstance(decision, Fail):
            if decision.stop is not None:
                self._stop(exc, decision.stop)
            await self._record_failure(ep, task, exc)
        elif isinstance(decision, Hold):
            dispatch.finished(task)  # stays pending
        else:
            task.prefer = ep.name if decision.pin else None
            self.reporter.retry(1)
            dispatch.retry_later(task, decision.delay)

    def _give_up(self, ep: _EndpointRun, task: Task, exc: RequestError) -> None:
        """A dead endpoint (its probes kept failing): retire it with one line; its items go elsewhere
        or stay pending, never burning their attempts on it."""
        breaker = ep.breaker
        why = (f"{breaker.failed_probes} probes in a row failed after its circuit opened, no success for "
               f"{breaker.troubled_for():.0f}s (last: {exc.describe()})")
        ep.retired = "dead"
        self.dispatch.retire(ep.name)
        left = ", ".join(sorted(self.dispatch.live))
        task.prefer = None
        task.tries -= 1  # not the item's fault
        self.dispatch.retry_later(task, 0.0)
        if not left:
            note = f"endpoint {ep.name!r} given up: {why}; no endpoint left, unfinished items stay pending"
            self._stop(FatalError(note, status=exc.status, code="endpoint_dead"), note)
        else:
            self.reporter.log(f"endpoint {ep.name!r} given up for this run: {why}; its items go to the others "
                              f"(left: {left})", level="error")

    def _retire(self, ep: _EndpointRun, exc: RequestError) -> None:
        if ep.retired is not None:
            return
        ep.retired = " ".join(p for p in (f"HTTP {exc.status}" if exc.status else None, exc.code) if p) or "failed"
        self.dispatch.retire(ep.name)
        left = ", ".join(sorted(self.dispatch.live)) or "none"
        self.reporter.log(f"endpoint {ep.name!r} retired for this run: {exc.describe()}; its items go to "
                          f"the others (left: {left})", level="error")

    async def _save(self, ep: _EndpointRun, stem: str, gen: Generation, first: int = 0,
                    count: int | None = None) -> list[SavedImage]:
        """Save the answer's images as numbers first+1, first+2, ... of `count` (the item's n: named by
        the n asked for, which validation keeps unique, whatever number came; a short answer's images
        keep the names the whole set would have)."""
        count = max(len(gen.images), count or 1)
        saved: list[SavedImage] = []
        for index, image in enumerate(gen.images, first):
            if image.data is not None:
                saved.append(await anyio.to_thread.run_sync(self.out.save_bytes, stem, index, count, image.data))
                image.data = None  # on disk now: not held while the journal record is written
            else:
                assert image.url is not None
                tmp = self.out.temp_path(stem)
                await ep.client.download(image.url, tmp)  # at once: URLs expire
                saved.append(await anyio.to_thread.run_sync(self.out.adopt_file, tmp, stem, index, count))
            if self.sharded is not None:
                await anyio.to_thread.run_sync(self.sharded.publish, self.out.root, saved[-1].file)
        return saved

    def _disk_trouble(self, exc: OSError) -> None:
        if exc.errno in DISK_ERRNOS:
            what = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
                    errno.EROFS: "read-only file system"}.get(exc.errno, exc.strerror)
            note = f"can't write to {self.out.root}: {what}; stopping. Free space, then rerun to finish"
        else:
            note = f"can't write to {self.out.root}: {exc}; stopping"
        self._stop(FatalError(note, code="disk_error"), note)

    async def _journal(self, rec: Record) -> bool:
        """Append a record; False (and the run stops) when the disk refused it."""
        try:
            await anyio.to_thread.run_sync(self.journal.append, rec)
        except OSError as exc:
            self._disk_trouble(exc)
            return False
        return True

    async def _record_done(self, ep: _EndpointRun, task: Task, gen: Generation, saved: list[SavedImage]) -> None:
        """Record the answer; with fewer images than asked it is short: what came is kept (it was paid)
        and the item stays failed (transient), so a rerun asks only for the missing images."""
        item = task.item
        model = ep.ep.model_sent(item.body.get("model", ""))
        have, cost_before = self._have.pop(item.id, ([], None))
        images = have + [
            {"file": s.file, "revised_prompt": g.revised_prompt, "sha256": s.sha256, "bytes": s.bytes,
             "width": s.width, "height": s.height, "endpoint": ep.name, "model": model}
            for s, g in zip(saved, gen.images, strict=True)
        ]
        short = len(images) < item.images
        cost = ep.prices.cost(item.body, len(saved))
        rec_cost = round(cost + (cost_before or 0.0), 6) if cost is not None else None
        if short:
            rec = short_record(item.id, item.rhash, item.body, wanted=item.images, created=gen.created, images=images,
                               attempts=task.attempt, request_id=gen.request_id, endpoint=ep.name, vars=item.vars,
                               cost=rec_cost, usage=gen.usage)
        else:
            rec = done_record(item.id, item.rhash, item.body, created=gen.created, images=images,
                              attempts=task.attempt, request_id=gen.request_id, endpoint=ep.name, vars=item.vars,
                              cost=rec_cost, usage=gen.usage)
        error = rec["error"]
        if cost is not None:
            self.cost += cost
            ep.stats["cost"] += cost
        if not await self._journal(rec):
            self.dispatch.finished(task)  # not recorded: pending, sent again by the next run
            await self._unclaim(item.id, done=False)
            return
        self.dispatch.finished(task)
        await self._unclaim(item.id, done=not short)
        self.images += len(saved)
        ep.stats["failed" if short else "done"] += 1
        ep.stats["images"] += len(saved)
        if error is not None:
            self.reporter.images += len(saved)
            self.reporter.item_finished(False)
            self.reporter.log(f"{item.id}: short answer: {error['message']}", level="warning")
        else:
            self.reporter.item_finished(True, len(saved))

    async def _record_failure(self, ep: _EndpointRun, task: Task, exc: RequestError) -> None:
        item = task.item
        exc.message = self.redact(exc.message)
        rec = failed_record(item.id, item.rhash, item.body, attempts=task.attempt, error=exc.as_record(),
                            endpoint=ep.name, vars=item.vars)
        recorded = await self._journal(rec)
        self.dispatch.finished(task)
        await self._unclaim(item.id, done=False)
        if not recorded:
            return  # pending: the next run decides again
        ep.stats["failed"] += 1
        self.reporter.item_finished(False)
        if exc.kind == "permanent":
            self.reporter.log(f"{item.id}: failed: {exc.describe()}", level="warning")

    # -- the end ----------------------------------------------------------------------------

    async def _finish(self, started: float) -> RunResult:
        with anyio.CancelScope(shield=True):
            job_meta = {"name": self.job.name, "file": str(self.job.path)}
            manifest_ok = True
            try:
                kept = await anyio.to_thread.run_sync(self._unchanged_manifest) if not self.requests else None
                if kept is not None:
                    summary = kept
                elif self.layout.manifest == SEGMENTS:
                    from ._segments import write_segments

                    summary = await anyio.to_thread.run_sync(
                        write_segments, self.journal, self.out.root, job_meta, self.job.items)
                else:
                    summary = await anyio.to_thread.run_sync(
                        write_manifest, self.journal, self.out.manifest, job_meta, self.job.items)
            except JobError as exc:  # changed during the run: its items are unknown, the journal is not
                self.reporter.log(f"{self.out.manifest} not rewritten: {exc}", level="error")
                manifest_ok = False
                summary = self._journal_summary()
                if self.fatal is None:
                    self.fatal = FatalError(str(exc), code="job_changed")
            except OSError as exc:
                self.reporter.log(f"can't write {self.out.manifest}: {exc.strerror}; the journal is intact "
                                  f"and the next run rebuilds it", level="error")
                manifest_ok = False
                # the journal in memory still knows every result: count from it, not zeros
                try:
                    summary = await anyio.to_thread.run_sync(count_items, self.journal, self.job.items)
                except JobError:
                    summary = self._journal_summary()
                if self.fatal is None:
                    self.fatal = FatalError(str(exc), code="disk_error")
            if self.requests:
                try:
                    self.journal.append(end_record(summary, self._endpoint_stats()))
                except OSError:
                    pass
            if self.sharded is None:
                await anyio.to_thread.run_sync(self._save_checkpoint, summary, manifest_ok)
            merged = None
            if self.sharded is not None and self.claim_skipped and summary["pending"]:
                try:  # a twin worker on this index may have finished what we skipped
                    summary = await anyio.to_thread.run_sync(
                        self.sharded.recount, self.out.root, job_meta, self.job.items)
                except (OSError, BatcherError) as exc:
                    self.reporter.log(f"can't recount shard {self.sharded.shard}: {exc}", level="warning")
            if self.sharded is not None:
                try:
                    # a shard that left nothing pending commits; the last one to commit merges
                    merged = await anyio.to_thread.run_sync(lambda: self.sharded.finish(
                        summary, job_meta, self.job.all_items, commit=summary["pending"] == 0))
                except (OSError, BatcherError) as exc:
                    self.reporter.log(f"can't finish shard {self.sharded.shard} in {self.sharded.out}: {exc}; "
                                      f"its records stay in the local buffer and go up with the next run",
                                      level="error")
                    if self.fatal is None:
                        self.fatal = FatalError(str(exc), code="store_error")
                if merged is not None:
                    self.reporter.log(f"all {self.sharded.shard.count} shards committed: wrote "
                                      f"{self.sharded.out}/manifest.json ({merged['done']} done, {merged['failed']} "
                                      f"failed, {merged['pending']} pending of {merged['total']})")
        stranded = getattr(self, "dispatch", None) and self.dispatch.stranded
        if stranded and self.fatal is None:
            retired = ", ".join(f"{e.name} ({e.retired})" for e in self.endpoints if e.retired)
            self.fatal = FatalError(f"{len(stranded)} item(s) need an endpoint that was retired: {retired}",
                                    code="no_endpoint")
        if self.interrupted:
            outcome, code = "interrupted", EXIT_INTERRUPTED
        elif self.fatal is not None and self.fatal.code == "budget_exhausted":
            outcome, code = "budget reached", EXIT_ABORTED
        elif self.fatal is not None:
            outcome, code = "aborted", EXIT_ABORTED
        elif summary["failed"]:
            outcome, code = "finished with failures", EXIT_FAILED
        elif summary["pending"] and self.claim_skipped:
            # another worker on this index holds them: not done here, so not exit 0 (the launcher may
            # rerun the index, which then finds them done, or claims what that worker left)
            outcome, code = f"finished; {summary['pending']} item(s) held by another worker", EXIT_FAILED
        else:
            outcome, code = "completed", EXIT_OK
        result = RunResult(
            outcome=outcome, exit_code=code, out=str(self.out.root), summary=summary, images=self.images,
            requests=self.requests, rate_limited=sum(e.limiter.rejections for e in getattr(self, "endpoints", [])),
            elapsed=time.monotonic() - started,
            error={**self.fatal.as_record(), "message": self.redact(self.fatal.message)}
            if self.fatal is not None else None,
            cost=round(self.cost, 6) if any(self.prices.values()) else None,
            endpoints=self._endpoint_stats(),
            merged=merged,
            budget={"images": self.budget.images, "cost": round(self.budget.cost, 6), **asdict(self.budget.limits)}
            if self.budget.limits else None,
        )
        self.reporter.summary(result)
        return result


    def _journal_summary(self) -> dict[str, int]:
        """What the journal knows of every item it names (when the job's items can't be read)."""
        summary = {"total": 0, "done": 0, "failed": 0, "pending": 0}
        for entry in self.journal.entries.values():
            summary["total"] += 1
            summary[entry.status if entry.status in ("done", "failed") else "pending"] += 1
        return summary

    def _unchanged_manifest(self) -> dict[str, int] | None:
        """manifest.json's summary if neither the job's items nor the journal changed since it was written."""
        from ._checkpoint import manifest_current

        return manifest_current(self.out.journal, self._manifest_file(), self._items_digest.hexdigest())

    def _manifest_file(self) -> Path:
        if self.layout.manifest == SEGMENTS:
            from ._segments import INDEX, SEGMENT_DIR

            return self.out.root / SEGMENT_DIR / INDEX
        return self.out.manifest

    def _save_checkpoint(self, summary: dict[str, int], manifest_ok: bool) -> None:
        """Bring the checkpoint up to the journal's end (best effort: the journal stays the truth).

        The manifest is stamped as current only when this run wrote (or kept) it.
        """
        from ._checkpoint import refresh, stamp_current, stamp_manifest

        try:
            self.journal.sync()
        except OSError:
            return
        checked = (self.journal.loaded_end, self._missing) if self._files_checked else None
        if refresh(self.out.journal, checked=checked) is not None:
            if manifest_ok:
                stamp_manifest(self.out.journal, self._manifest_file(), self._items_digest.hexdigest(), summary)
                # the items manifest.json holds, for `batcher status` (rewritten only when they changed)
                stamp_current(self.out.journal, self._items_digest.hexdigest(), self.job.items)

    def _endpoint_stats(self) -> dict[str, dict[str, Any]]:
        return {e.name: {**e.stats, "cost": round(e.stats["cost"], 6), "retired": e.retired,
                         "circuit_openings": e.breaker.openings, "circuit_first_opened": e.breaker.first_opened_wall}
                for e in getattr(self, "endpoints", [])}


class _EndpointRun:
    """One endpoint during a run: its client, limiter, pool, circuit breaker and counters."""

    client: ImagesClient

    def __init__(self, ep: Endpoint, key: str, base_url: str, concurrency: int, rpm: float | None,
                 ipm: float | None, prices: PriceTable, headers: dict[str, str] | None = None,
                 breaker: BreakerPolicy | None = None) -> None:
        self.ep = ep
        self.headers = headers or {}  # values from the environment: kept in memory only
        self.name = ep.name
        self.key = key
        self.base_url = base_url
        self.concurrency = concurrency
        self.rpm, self.ipm = rpm, ipm
        self.limiter: Any = RateLimiter(rpm, ipm)
        self.pool = ConcurrencyController(concurrency, limit_known=bool(rpm or ipm))
        self.breaker = CircuitBreaker(breaker or BreakerPolicy())
        self.prices = prices
        self.retired: str | None = None
        self.stats: dict[str, Any] = {"requests": 0, "done": 0, "failed": 0, "images": 0, "cost": 0.0,
                                      "rate_limited": 0}

    def gate(self) -> float:
        """Seconds until this endpoint could send a request (0: take an item now)."""
        limiter = self.limiter
        if not isinstance(limiter, RateLimiter):
            return 0.0  # a shared limiter answers only by acquiring: take the item, wait there
        return limiter.wait_time(1) if not limiter.waiting else 0.005


def _make_client(ep: _EndpointRun, timeouts: Timeouts, job: Job) -> ImagesClient:
    return ImagesClient(ep.base_url, ep.key, dialect=job.dialect_of(ep.ep), options=ep.ep.options,
                        timeouts=timeouts, max_connections=ep.concurrency, headers=ep.headers)


class _Stopped(Exception):
    """The run stopped while this item waited; it stays pending."""

