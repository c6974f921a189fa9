"""The pipeline: read → schedule → request → write → report, under one anyio task group.

`run()` is the one public entry point; the CLI wraps it.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream

from ._client import Generation, ImagesClient, Timeouts
from ._exceptions import (
    BatcherError,
    FatalError,
    JobValidationError,
    Problem,
    ManifestError,
    RequestError,
    TransientError,
)
from ._ids import safe_stem
from ._job import Item, Job
from ._limiter import ConcurrencyController, RateLimiter
from ._manifest import Journal, needs_run, utc_now, write_manifest
from ._plan import Budget, BudgetLimits, PriceTable
from ._policy import POLICY_CODES, RetryPolicy
from ._report import Reporter
from ._writer import DISK_ERRNOS, OutputDir, SavedImage

__all__ = [
    "RunOptions", "RunResult", "run", "run_sync", "resolve_out", "DEFAULT_BASE_URL",
    "EXIT_OK", "EXIT_FAILED", "EXIT_INVALID", "EXIT_LOCKED", "EXIT_ABORTED", "EXIT_INTERRUPTED",
]

DEFAULT_BASE_URL = "https://open.dieyuyun.com/v1"
DEFAULT_CONCURRENCY = 16
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
    timeout: float = 300.0
    connect_timeout: float = 10.0
    max_attempts: int = 6
    retry_failed: bool = False
    force: bool = False
    max_policy_violations: int = 50
    grace_period: float = 30.0
    handle_signals: bool = False
    retry: RetryPolicy | None = None
    seed: int | None = None
    max_images: int | None = None  # this run starts no work beyond these (exit 4, rest pending)
    max_cost: float | None = None


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
    budget: dict[str, Any] | None = None  # what the budget charged, when one was set

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_out(job: Job, options: RunOptions) -> Path:
    if options.out:
        return Path(options.out)
    if job.output:
        return Path(job.output)
    return Path("output") / job.name


def _resolve_key(job: Job, options: RunOptions) -> str:
    if options.api_key:
        return options.api_key
    names = [n for n in (options.api_key_env, job.endpoint.api_key_env) if n] or list(KEY_ENVS)
    for name in names:
        value = os.environ.get(name)
        if value:
            return value
    raise BatcherError(
        f"no API key: set the environment variable {' or '.join(names)} (or use --simulate to try batcher "
        f"on the built-in simulator)"
    )


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
    job.validate()
    reporter = reporter or Reporter(quiet=True)
    out = OutputDir(resolve_out(job, options))
    out.prepare()
    out.lock()
    try:
        runner = _Runner(job, options, out, reporter)
        return await runner.run()
    finally:
        out.unlock()


class _Runner:
    def __init__(self, job: Job, options: RunOptions, out: OutputDir, reporter: Reporter) -> None:
        self.job = job
        self.options = options
        self.out = out
        self.reporter = reporter
        self.policy = options.retry or RetryPolicy(max_attempts=options.max_attempts)
        self.rng = random.Random(options.seed)
        self.concurrency = options.concurrency or job.concurrency or DEFAULT_CONCURRENCY
        self.stopping = False
        self.interrupted = False
        self.fatal: RequestError | None = None
        self.fatal_note: str | None = None
        self.policy_violations = 0
        self.requests = 0
        self.images = 0
        self.cost = 0.0
        self.prices = PriceTable(job.pricing)
        self.budget = Budget(BudgetLimits(options.max_images, options.max_cost))
        self._wait_scopes: set[anyio.CancelScope] = set()
        self._missing: set[str] = set()

    # -- setup ------------------------------------------------------------------------------

    def _open_journal(self) -> Journal:
        journal = Journal.open(self.out.journal)
        if journal.torn_line is not None:
            self.reporter.log(f"{self.out.journal}:{journal.torn_line}: torn last line from an interrupted "
                              f"run ignored", level="warning")
        names = {r.get("job") for r in journal.runs if r.get("t") == "run"}
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
        with open(self.out.journal, "rb") as fh:
            for item_id, entry in self.journal.entries.items():
                if entry.status != "done":
                    continue
                rec = self.journal.record(item_id, fh)
                if rec and not all(self.out.has_file(i["file"], i["bytes"]) for i in rec.get("images", [])):
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
            for item in self.job.items():
                total += 1
                if self._needs_run(item):
                    todo += 1
                    if self.options.max_cost is not None and self.prices.per_image(item.body) is None:
                        raise JobValidationError([Problem(
                            item.file, item.line, "pricing",
                            f"--max-cost needs a price for every item; none matches model="
                            f"{item.body.get('model')!r} size={item.body.get('size')!r} "
                            f"quality={item.body.get('quality')!r}")])
            if todo == 0:
                self.reporter.start(0, total)
                return await self._finish(started)
            self.api_key = _resolve_key(self.job, self.options)
            self.journal.append({"t": "run", "job": self.job.name, "job_file": str(self.job.path),
                                 "at": utc_now(), "pid": os.getpid()})
            self.reporter.start(todo, total - todo)
            await self._pipeline()
            return await self._finish(started)
        finally:
            self.journal.close()

    async def _pipeline(self) -> None:
        job, opts = self.job, self.options
        rpm = opts.rpm or job.rate_limit.rpm
        ipm = opts.ipm or job.rate_limit.ipm
        self.limiter = RateLimiter(rpm, ipm)
        self.pool = ConcurrencyController(self.concurrency, limit_known=bool(rpm or ipm))
        base_url = opts.base_url or job.endpoint.base_url or os.environ.get("BATCHER_BASE_URL") or DEFAULT_BASE_URL
        timeouts = Timeouts(connect=opts.connect_timeout, read=opts.timeout)
        self.deadline = opts.timeout + opts.connect_timeout
        async with ImagesClient(base_url, self.api_key, timeouts=timeouts,
                                max_connections=self.concurrency) as self.client:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._ticker)
                if opts.handle_signals:
                    outer.start_soon(self._watch_signals)
                async with anyio.create_task_group() as work:
                    self._work_scope = work.cancel_scope
                    send, receive = anyio.create_memory_object_stream[Item](self.concurrency * 2)
                    work.start_soon(self._feed, send)
                    # more workers than slots: items in backoff don't hold a request slot
                    for _ in range(self.concurrency * 2):
                        work.start_soon(self._worker, receive.clone())
                    receive.close()
                outer.cancel_scope.cancel()

    async def _feed(self, send: Any) -> None:
        async with send:
            for item in self._to_run():
                if self.stopping:
                    break
                await send.send(item)

    async def _worker(self, receive: ObjectReceiveStream[Item]) -> None:
        async with receive:
            async for item in receive:
                if not self.stopping:
                    await self._process(item)

    async def _ticker(self) -> None:
        while True:
            await anyio.sleep(1.0)
            self.reporter.tick()
            await anyio.to_thread.run_sync(self.journal.sync)

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

    # -- one item ---------------------------------------------------------------------------

    async def _process(self, item: Item) -> None:
        entry = self.journal.entries.get(item.id)
        prior = entry.attempts if entry is not None and entry.rhash == item.rhash else 0
        stem = safe_stem(item.id)
        error: RequestError | None = None
        attempt = prior
        for tries in range(1, self.policy.max_attempts + 1):
            if tries > 1:
                delay = self.policy.delay(tries - 1, self.rng, error.retry_after if error else None)
                self.reporter.retry(1)
                try:
                    if not await self._wait(anyio.sleep, delay):
                        return
                finally:
                    self.reporter.retry(-1)
            attempt += 1
            try:
                gen = await self._attempt(item, attempt)
            except _Stopped:
                return
            except RequestError as exc:
                error = exc
                if await self._after_failure(item, exc):
                    continue
                if exc.kind == "fatal":
                    return  # the item stays pending for the next run
                return await self._record_failure(item, attempt, exc)
            try:
                saved = await self._save(item, stem, gen)
            except RequestError as exc:
                return await self._record_failure(item, attempt, exc)
            except OSError as exc:
                self._disk_trouble(exc)
                return
            await self._record_done(item, attempt, gen, saved)
            return
        assert error is not None
        await self._record_failure(item, attempt, error)

    async def _attempt(self, item: Item, attempt: int) -> Generation:
        """One request: take a slot, rate tokens and budget, journal the attempt, send.

        The budget is charged last, just before sending (so a budget stop never strands work
        that fits), and refunded only when an error answer proves nothing was generated.
        """
        slots = self.pool.slots
        if not await self._wait(slots.acquire):
            raise _Stopped
        try:
            permit = await self._wait_for(self.limiter.acquire, item.images)
            if permit is None:
                raise _Stopped
            cost = self.prices.cost(item.body, item.images)
            if not self.budget.reserve(item.images, cost):
                permit.refund()
                note = (f"budget reached ({self.budget.describe()}): {item.images} more image(s) would exceed "
                        f"it; stopping, unstarted items stay pending")
                self._stop(FatalError(note, code="budget_exhausted"), note)
                raise _Stopped
            # journal first: a request that times out after it was sent may still be billed
            try:
                self.journal.append({"t": "attempt", "id": item.id, "rhash": item.rhash, "attempt": attempt,
                                     "at": utc_now()})
            except OSError as exc:
                self.budget.refund(item.images, cost)
                self._disk_trouble(exc)
                raise _Stopped from None
            self.requests += 1
            permit.sent()
            try:
                with anyio.fail_after(self.deadline):
                    gen = await self.client.generate(item.body)
            except TimeoutError:
                raise TransientError(f"no answer within {self.deadline:.0f}s", code="timeout") from None
            except RequestError as exc:
                if exc.status is not None and exc.status >= 400:
                    self.budget.refund(item.images, cost)  # an error answer: nothing was generated
                if exc.status == 429 and exc.kind == "transient":
                    permit.refund()  # the server did not count it; its retry may use the slot
                raise
        finally:
            slots.release()
        self.pool.on_answer()
        self.pool.on_success()
        self.limiter.observe_headers(gen.headers)
        return gen

    async def _after_failure(self, item: Item, exc: RequestError) -> bool:
        """React to a failed attempt; return True to retry the item."""
        if exc.status is not None:
            self.pool.on_answer()
            self.limiter.observe_headers(exc.headers)
        if exc.kind == "fatal":
            self._stop(exc, f"fatal: HTTP {exc.status} {exc.code or ''}: {exc.message} — stopping; "
                            f"unstarted items stay pending")
            return False
        if exc.kind == "permanent":
            if exc.code in POLICY_CODES:
                self.policy_violations += 1
                limit = self.options.max_policy_violations
                if limit and self.policy_violations >= limit:
                    self._stop(exc, f"stopping: {self.policy_violations} content-policy rejections "
                                    f"(--max-policy-violations {limit}); providers suspend accounts for this. "
                                    f"Review the prompts, then rerun")
            return False
        if exc.status == 429:
            self.limiter.on_rate_limited(exc.retry_after, exc.type or "requests", item.images)
        elif exc.status is None or exc.status >= 500 or exc.code in ("timeout", "connection_error"):
            self.pool.on_server_trouble()
        return True

    async def _save(self, item: Item, stem: str, gen: Generation) -> list[SavedImage]:
        count = len(gen.images)
        saved: list[SavedImage] = []
        for index, image in enumerate(gen.images):
            if image.data is not None:
                saved.append(await anyio.to_thread.run_sync(self.out.save_bytes, stem, index, count, image.data))
            else:
                assert image.url is not None
                tmp = self.out.temp_path(stem)
                await self.client.download(image.url, tmp)  # at once: URLs expire
                saved.append(await anyio.to_thread.run_sync(self.out.adopt_file, tmp, stem, index, count))
        return saved

    def _disk_trouble(self, exc: OSError) -> None:
        if exc.errno in DISK_ERRNOS:
            what = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
                    errno.EROFS: "read-only file system"}.get(exc.errno, exc.strerror)
            note = f"can't write to {self.out.root}: {what}; stopping. Free space, then rerun to finish"
        else:
            note = f"can't write to {self.out.root}: {exc}; stopping"
        self._stop(FatalError(note, code="disk_error"), note)

    async def _journal(self, rec: dict[str, Any]) -> None:
        try:
            await anyio.to_thread.run_sync(self.journal.append, rec)
        except OSError as exc:
            self._disk_trouble(exc)

    async def _record_done(self, item: Item, attempts: int, gen: Generation, saved: list[SavedImage]) -> None:
        images = [
            {"file": s.file, "revised_prompt": g.revised_prompt, "sha256": s.sha256, "bytes": s.bytes,
             "width": s.width, "height": s.height}
            for s, g in zip(saved, gen.images)
        ]
        rec = {"t": "item", "id": item.id, "rhash": item.rhash, "status": "done", "request": item.body,
               "created": gen.created, "images": images, "attempts": attempts, "error": None,
               "request_id": gen.request_id, "finished": utc_now()}
        if item.vars:
            rec["vars"] = item.vars
        cost = self.prices.cost(item.body, len(saved))
        if cost is not None:
            rec["cost"] = round(cost, 6)
            self.cost += cost
        if gen.usage is not None:
            rec["usage"] = gen.usage
        await self._journal(rec)
        self.images += len(saved)
        self.reporter.item_finished(True, len(saved))

    async def _record_failure(self, item: Item, attempts: int, exc: RequestError) -> None:
        rec = {"t": "item", "id": item.id, "rhash": item.rhash, "status": "failed", "request": item.body,
               "created": None, "images": [], "attempts": attempts, "error": exc.as_record(),
               "finished": utc_now()}
        if item.vars:
            rec["vars"] = item.vars
        await self._journal(rec)
        self.reporter.item_finished(False)
        if exc.kind == "permanent":
            self.reporter.log(f"{item.id}: failed: HTTP {exc.status} {exc.code}: {exc.message}", level="warning")

    # -- the end ----------------------------------------------------------------------------

    async def _finish(self, started: float) -> RunResult:
        with anyio.CancelScope(shield=True):
            job_meta = {"name": self.job.name, "file": str(self.job.path)}
            try:
                summary = await anyio.to_thread.run_sync(
                    write_manifest, self.journal, self.out.manifest, job_meta, self.job.items)
            except OSError as exc:
                self.reporter.log(f"can't write {self.out.manifest}: {exc.strerror}; the journal is intact "
                                  f"and the next run rebuilds it", level="error")
                summary = {"total": 0, "done": 0, "failed": 0, "pending": 0}
                if self.fatal is None:
                    self.fatal = FatalError(str(exc), code="disk_error")
            if self.requests:
                try:
                    self.journal.append({"t": "end", "at": utc_now(), "summary": summary})
                except OSError:
                    pass
        if self.interrupted:
            outcome, code = "interrupted", EXIT_INTERRUPTED
        elif self.fatal is not None and self.fatal.code == "budget_exhausted":
            outcome, code = "budget reached", EXIT_ABORTED
        elif self.fatal is not None:
            outcome, code = "aborted", EXIT_ABORTED
        elif summary["failed"]:
            outcome, code = "finished with failures", EXIT_FAILED
        else:
            outcome, code = "completed", EXIT_OK
        result = RunResult(
            outcome=outcome, exit_code=code, out=str(self.out.root), summary=summary, images=self.images,
            requests=self.requests, rate_limited=getattr(self, "limiter", None) and self.limiter.rejections or 0,
            elapsed=time.monotonic() - started,
            error=self.fatal.as_record() if self.fatal is not None else None,
            cost=round(self.cost, 6) if self.prices else None,
            budget={"images": self.budget.images, "cost": round(self.budget.cost, 6), **asdict(self.budget.limits)}
            if self.budget.limits else None,
        )
        self.reporter.summary(result)
        return result


class _Stopped(Exception):
    """The run stopped while this item waited; it stays pending."""

