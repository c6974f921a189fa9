"""The pipeline: read → schedule → request → write → report, under one anyio task group.

`run()` is the one public entry point; the CLI wraps it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio

from ._batch import BatchBook, BatchExecutor
from ._claims import LocalClaims
from ._client import Timeouts
from ._commit import Recorder
from ._control import RunControl
from ._endpoints import DEFAULT_BASE_URL, EndpointRun, make_batch_client, resolve_endpoints, share_limits
from ._exceptions import (
    BatcherError,
    FatalError,
    JobError,
    JobValidationError,
    ManifestError,
    Problem,
    ShardError,
)
from ._job import MAX_CONCURRENCY, Item, Job, Selection
from ._jobcache import CurrentWriter, Found, KnownPrefix, cache_entry, lookup, tail_items
from ._layout import SEGMENTS, Layout, decide_layout
from ._manifest import Journal, count_items, needs_run, write_manifest
from ._plan import Budget, BudgetLimits, endpoint_prices, item_price
from ._policy import RetryPolicy
from ._records import end_record, run_record
from ._redact import Redactor
from ._report import Reporter
from ._route import BreakerPolicy, Dispatcher, Task
from ._shard import ShardSpec, fingerprint_line
from ._sharded import is_remote
from ._sync import SyncExecutor
from ._writer import DISK_ERRNOS, OutputDir

__all__ = [
    "RunOptions", "RunResult", "run", "run_sync", "resolve_out", "DEFAULT_BASE_URL",
    "EXIT_OK", "EXIT_FAILED", "EXIT_INVALID", "EXIT_LOCKED", "EXIT_ABORTED", "EXIT_INTERRUPTED",
    "EXIT_AT_PROVIDER",
]

EXIT_OK, EXIT_FAILED, EXIT_INVALID, EXIT_LOCKED, EXIT_ABORTED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
EXIT_AT_PROVIDER = 5  # batch mode without waiting: items are still at the provider


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
    batch: bool = False  # every endpoint through the provider's Batch API (the job's `batch:` does it per endpoint)
    wait: bool = True  # batch mode: wait for the batches and collect them (False: submit, exit 5 while at the provider)

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
    if options.batch:
        job = job.batch_mode()  # a copy: the Job is immutable
    selection = Selection.of(job, options.endpoints)  # this run's filters live in the run, not on the Job
    target = options.out or job.output or str(Path("output") / job.name)
    found = _known_job(job, selection, options, target)
    held: tuple[Item, ...] | None = None
    if found is not None and found.hit:
        warnings = found.warnings  # validated by an earlier run: nothing parsed, or only the new lines
    else:
        checked = selection.validate(job, hold=ITEMS_HELD)
        held = checked.items  # a small job's items: the later passes read them, not the file
        warnings = list(checked.warnings)
        if found is not None:
            found.count, found.warnings, found.tail = checked.count, warnings, None
    reporter = reporter or Reporter(quiet=True)
    for warning in warnings:
        reporter.log(f"{warning}", level="warning")
    sharded = None
    if options.shard is not None or is_remote(target):
        if any(e.batch is not None for e in selection.live(job)):
            raise BatcherError("batch mode writes a local output folder: --shard and s3:// outputs are not "
                               "supported with provider batches (one batch already carries up to 50,000 requests)")
        from ._sharded import ShardedOutput  # the store (and fsspec for s3://) only when asked for

        shard = options.shard or ShardSpec(0, 1)
        sharded = ShardedOutput(target, shard, options.work_dir)
        selection = replace(selection, shard=shard if shard.count > 1 else None)
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
        started = time.monotonic()
        removed = out.clean_temporaries()
        if removed:
            reporter.log(f"removed {removed} temporary file(s) left by an interrupted run")
        journal = _open_journal(job, options, out, reporter, sharded)
        try:
            return await _Runner(job, selection, options, out, reporter, journal, sharded, found,
                                 held).run(started)
        finally:
            journal.close()
    finally:
        if sharded is not None and sharded.committed:
            sharded.remove_work()  # the shard is in the store; removed while still locked
        out.unlock()


def _known_job(job: Job, selection: Selection, options: RunOptions, target: str) -> Found | None:
    """What the output's checkpoint knows of this job (see _jobcache); None for sharded and remote outputs."""
    if options.shard is not None or is_remote(target):
        return None
    return lookup(job, selection.live(job), resolve_out(job, options) / "manifest.jsonl")


def _refuse_planned(root: Path) -> None:
    if (root / "plan.json").is_file() or (root / "segments").is_dir():
        raise ShardError(f"{root} is planned for sharded runs (plan.json): run each shard with --shard I/N "
                         f"(or the launcher's index variable with --shards N)")


def _open_journal(job: Job, options: RunOptions, out: OutputDir, reporter: Reporter, sharded: Any) -> Journal:
    """The output's journal, replayed; refused when it belongs to another job (unless --force)."""
    if sharded is not None:
        sharded.rebuild_journal(out.journal)  # what every machine finished, for this shard
    # a local output resumes from its checkpoint; a shard's journal is rebuilt from segments each run
    journal = Journal.open(out.journal, checkpoint=sharded is None)
    if journal.glued_lines:
        reporter.log(f"{out.journal}:{journal.glued_lines[0]}: {len(journal.glued_lines)} line(s) hold a "
                     f"record cut short by a full disk, then a whole one; the whole ones were kept",
                     level="warning")
    if journal.torn_line is not None:
        reporter.log(f"{out.journal}:{journal.torn_line}: torn last line from an interrupted "
                     f"run ignored", level="warning")
    names = {str(r.get("job")) for r in journal.runs if r.get("t") == "run"}
    if names and job.name not in names and not options.force:
        journal.close()
        raise ManifestError(
            f"{out.root} holds the manifest of job {sorted(names)[0]!r}, not {job.name!r}; "
            f"use another --out, or --force to add this job's items to it"
        )
    if not names and out.manifest.exists() and not options.force:
        journal.close()
        raise ManifestError(f"{out.manifest} exists without its journal {out.journal.name}; "
                            f"refusing to overwrite it (use --force)")
    return journal


# A job of at most this many items is parsed once, by validation, and held (~1 KB an item): the
# count, feed and manifest passes read the held items instead of parsing the file three more times
# (~30 µs an item each). A larger job streams every pass, in bounded memory, as before.
ITEMS_HELD = 10_000

# Below this many journaled items a run checks every done item's files (a few ms per thousand);
# above it only those no earlier run has checked, so a rerun's cost does not grow with what is done.
FULL_FILE_CHECK_BELOW = 10_000


@dataclass(frozen=True)
class _Key:
    """An item as `_needs_run` sees it."""

    id: str
    rhash: str


def _unsent(dispatch: Dispatcher, limiter: Any) -> Callable[[], int]:
    """This worker's items still to send: queued here, and waiting in the limiter."""
    return lambda: dispatch.queued + limiter.waiting


class _Runner:
    """One run's wiring: setup (done-file check, counting pass, layout), then the pipeline (ticker,
    signals, feed, executor) under one task group, then `_finish` (manifest, checkpoint, result)."""

    def __init__(self, job: Job, selection: Selection, options: RunOptions, out: OutputDir, reporter: Reporter,
                 journal: Journal, sharded: Any = None, found: Found | None = None,
                 held: tuple[Item, ...] | None = None) -> None:
        self.job = job
        self._held = held  # every item of a small job, as validation parsed them (see ITEMS_HELD)
        self.found = found  # what the checkpoint knew of the job (see _jobcache)
        self._new_only = False  # every old item is finished: the run's items to send are the new lines'
        self._current: CurrentWriter | None = None  # records the manifest pass's items as the cache
        self.selection = selection  # --endpoint and --shard: which endpoints and items are this run's
        self.live = selection.live(job)
        self.sharded = sharded
        self.options = options
        self.out = out
        self.reporter = reporter
        self.journal = journal
        self.control = RunControl(reporter)
        self.claims = LocalClaims()  # RedisClaims with --limiter redis://
        self.redact = Redactor()
        self.recorder = Recorder(out, journal, reporter, sharded=sharded, redact=self.redact,
                                 on_disk_trouble=self._disk_trouble)
        self.prices = endpoint_prices(job)  # per endpoint name
        self.budget = Budget(BudgetLimits(options.max_images, options.max_cost))
        self.endpoints: list[EndpointRun] = []  # resolved once some item needs sending
        self.dispatch: Dispatcher | None = None  # made when the pipeline starts
        self.executor: SyncExecutor | None = None
        self.batch: BatchExecutor | None = None  # endpoints in batch mode (provider Batch APIs)
        # the output's provider batches: their items are at the provider, in no other executor's hands
        self.book = BatchBook(out.root, journal.runs) if sharded is None else None
        self._work_scope = anyio.CancelScope()  # the feed's and the executor's, once they run
        self._missing: set[str] = set()
        self._files_checked = False  # every done entry the checkpoint hasn't verified was checked
        self._items_digest = hashlib.sha256()  # the job's (id, rhash) list: manifest.json's input
        self.layout = Layout()

    # -- setup ------------------------------------------------------------------------------

    def _needs_run(self, item: Item | _Key) -> bool:
        entry = self.journal.entries.get(item.id)
        if entry is not None and entry.rhash == item.rhash and entry.status == "done":
            return item.id in self._missing
        return needs_run(entry, item.rhash, self.options.retry_failed)

    def _check_done_files(self) -> None:
        """Done items whose files vanished or are short (a lost disk write) run again."""
        if not self.out.journal.exists():
            return
        entries = getattr(self.journal.entries, "unverified", None)  # a checkpoint: only what it hasn't seen
        if entries is not None and self.journal.entries.fewer_than(FULL_FILE_CHECK_BELOW):  # type: ignore[attr-defined]
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

    def _items(self) -> Iterator[Item]:
        """This run's items (its shard's), streamed from the job file: a callable for the manifest writers."""
        if self._held is None:
            return self.selection.items(self.job)
        return self.selection.of_shard(self._from_held())

    def _all_items(self) -> Iterator[Item]:
        """Every item whatever the shard (a sharded output's fingerprint and merge cover them all)."""
        return self.selection.all_items(self.job) if self._held is None else self._from_held()

    def _from_held(self) -> Iterator[Item]:
        """The held items, once the prompts file is found unchanged (as a streamed pass would check)."""
        assert self._held is not None
        self.job.check_unchanged()
        yield from self._held

    def _to_run(self) -> Iterator[Item]:
        for item in self._new_items() if self._new_only else self._items():
            if self._needs_run(item):
                yield item

    def _to_send(self) -> Iterator[Item]:
        """The synchronous executor's items: those to run that no batch has or takes (an item is in one
        place at a time: one at the provider is never sent, even if its endpoint left batch mode)."""
        batch = self.batch
        at_provider = self.book.at_provider if self.book is not None else {}
        for item in self._to_run():
            if item.id not in at_provider and (batch is None or not batch.takes(item)):
                yield item

    def _to_batch(self) -> Iterator[Item]:
        assert self.batch is not None
        for item in self._to_run():
            if self.batch.takes(item):
                yield item

    # -- the counting pass ------------------------------------------------------------------

    def _count_all(self) -> tuple[int, int, set[Any], Any]:
        """Every item of the job read: (total, to run, their models, a sharded run's fingerprint digest)."""
        total = todo = 0
        models: set[Any] = set()
        digest = hashlib.sha256()
        shard = self.selection.shard
        for item in self._all_items():
            if self.sharded is not None:
                digest.update(fingerprint_line(item.id, item.rhash))
            if shard is not None and not shard.contains(item.id):
                continue
            self._items_digest.update(f"{item.id}\t{item.rhash}\n".encode())
            total += 1
            if self._needs_run(item):
                todo += 1
                models.add(item.body.get("model"))
                self._check_price(item)
        return total, todo, models, digest

    def _check_price(self, item: Item) -> None:
        if self.options.max_cost is not None and item_price(self.job, item, self.prices, self.live) is None:
            raise JobValidationError([Problem(
                item.file, item.line, "pricing",
                f"--max-cost needs a price for every item; none matches model="
                f"{item.body.get('model')!r} size={item.body.get('size')!r} "
                f"quality={item.body.get('quality')!r}")])

    def _count_known(self) -> tuple[int, int, set[Any]] | None:
        """The counting pass from the job cache: the old items from the checkpoint (one SQL query), the
        new lines parsed. None (read the whole job) unless every old item is finished."""
        found, cp = self.found, self.journal.checkpoint
        if found is None or not found.hit or cp is None or self.sharded is not None or \
                cp.meta("current") != found.old_digest:
            return None
        if self._old_to_run(cp, found.old_count):
            return None  # an old item runs again: its body is in the job file, read as ever
        total, todo = found.old_count, 0
        models: set[Any] = set()
        for item in self._new_items():
            total += 1
            if self._needs_run(item):
                todo += 1
                models.add(item.body.get("model"))
                self._check_price(item)
        self._new_only = True
        return total, todo, models

    def _new_items(self) -> Iterator[Item]:
        """The items of the prompts file's new lines (validated when the run started)."""
        found = self.found
        if found is None or found.tail is None:
            return
        for entry in tail_items(self.job, Path(found.state.path), found):  # type: ignore[union-attr]
            if isinstance(entry, Problem):
                raise JobValidationError([entry])
            yield entry

    def _old_to_run(self, cp: Any, old_count: int, limit: int = 1000) -> bool:
        """Whether any of the old items needs running: those the checkpoint doesn't hold finished, the
        journal's tail since it, and done items whose files are gone, each judged as `_needs_run` does."""
        candidates: dict[str, str] = {}
        tail: Any = ()
        if not self._all_done_when_stamped(old_count):  # else only gone files can make one run again
            retry = 1 if self.options.retry_failed else 0
            with cp.lock:
                rows = cp.db.execute(
                    "SELECT c.id, c.rhash FROM current c LEFT JOIN items s ON s.id = c.id WHERE c.pos <= ? "
                    "AND (s.id IS NULL OR s.rhash IS NOT c.rhash OR s.offset < 0 OR NOT (s.status = 'done' "
                    "OR (s.status = 'failed' AND s.error_kind = 'permanent' AND ? = 0))) LIMIT ?",
                    (old_count, retry, limit)).fetchall()
            if len(rows) >= limit:
                return True
            candidates.update(rows)
            tail = getattr(self.journal.entries, "tail", {})
        for item_id in [*tail, *self._missing]:
            if item_id not in candidates:
                with cp.lock:
                    row = cp.db.execute("SELECT rhash FROM current WHERE id = ? AND pos <= ?",
                                        (item_id, old_count)).fetchone()
                if row is not None:
                    candidates[item_id] = row[0]
        return any(self._needs_run(_Key(item_id, rhash)) for item_id, rhash in candidates.items())

    def _all_done_when_stamped(self, old_count: int) -> bool:
        """Whether the manifest on disk was written from the old items, all done, and the journal has not
        changed since (so they still are): then no query over every old item is needed."""
        from ._checkpoint import manifest_current
        from ._layout import read_layout
        from ._segments import INDEX, SEGMENT_DIR

        found = self.found
        if found is None or found.old_digest is None:
            return False
        layout = read_layout(self.out.root) or Layout()  # (the run decides it after counting)
        manifest = self.out.root / SEGMENT_DIR / INDEX if layout.manifest == SEGMENTS else self.out.manifest
        summary = manifest_current(self.out.journal, manifest, found.old_digest)
        return summary is not None and summary.get("total") == old_count and summary.get("done") == old_count

    # -- the run ----------------------------------------------------------------------------

    async def run(self, started: float) -> RunResult:
        await anyio.to_thread.run_sync(self._check_done_files)
        counted = self._count_known()
        if counted is not None:
            (total, todo, models), digest = counted, None
        else:
            total, todo, models, digest = self._count_all()
        if self.sharded is None:  # decided once per output (a shard's files follow the store's layout)
            self.layout = decide_layout(self.out.root, total, fresh=not self.journal.runs)
            self.out.layout = self.layout.images
        if self.sharded is not None and self.sharded.shard.count > 1:
            assert digest is not None  # a sharded run reads the whole job (no job cache)
            self.sharded.check_plan("sha256:" + digest.hexdigest())
        if self.sharded is not None:
            await anyio.to_thread.run_sync(self.sharded.open_writer, self.journal)
        open_chunks = self.book.open() if self.book is not None else []
        if todo == 0 and not open_chunks:
            self.reporter.start(0, total)
            return await self._finish(started)
        self.endpoints = resolve_endpoints(self.job, self.live, self.options, models, self.reporter, self.prices,
                                           also={c.endpoint for c in open_chunks})
        self._redact_secrets()
        if self.options.limiter:
            self._use_shared_limits(self.options.limiter)
        self.journal.append(run_record(self.job.name, str(self.job.path), os.getpid()))
        self.reporter.start(todo, total - todo)
        await self._pipeline(todo)
        return await self._finish(started)

    def _redact_secrets(self) -> None:
        """From here on, no key or header value of this run is written or shown, even if echoed back."""
        self.redact = Redactor.of([self.options.api_key, *(e.key for e in self.endpoints),
                                   *(v for e in self.endpoints for v in e.headers.values())])
        self.recorder.redact = self.redact
        if self.redact:
            self.journal.redact = self.redact
            self.reporter.redact = self.redact

    def _use_shared_limits(self, url: str) -> None:
        """`--limiter redis://`: every worker of every shard shares each endpoint's window and
        claims items before sending them (imports redis only here)."""
        from ._claims import RedisClaims

        share_limits(self.endpoints, url, workers=self.selection.shard.count if self.selection.shard is not None else 1)
        out = self.sharded.out if self.sharded is not None else str(self.out.root.resolve())
        self.claims = RedisClaims(url, out, self.reporter)

    async def _pipeline(self, todo: int) -> None:
        opts = self.options
        timeouts = Timeouts(connect=opts.connect_timeout, read=opts.timeout)
        policy = opts.retry or RetryPolicy(max_attempts=opts.max_attempts)
        rng = random.Random(opts.seed)
        # an endpoint with batches at the provider collects them even if it left batch mode since
        collecting = {c.endpoint for c in self.book.open()} if self.book is not None else set()
        batched = [e for e in self.endpoints if e.ep.batch is not None or e.name in collecting]
        synced = [e for e in self.endpoints if e.ep.batch is None]
        total_slots = sum(e.concurrency for e in synced)
        self.dispatch = Dispatcher([e.name for e in synced], max_queued=max(16, total_slots * 2))
        for ep in synced:
            if hasattr(ep.limiter, "backlog"):  # a Redis-shared limiter: its share follows what is left to send
                ep.limiter.backlog = _unsent(self.dispatch, ep.limiter)
        self.executor = SyncExecutor(
            synced, self.dispatch, self.recorder, self.claims, self.control, reporter=self.reporter,
            budget=self.budget, policy=policy, rng=rng, deadline=opts.timeout + opts.connect_timeout,
            max_policy_violations=opts.max_policy_violations)
        if batched:
            assert self.book is not None
            self.batch = BatchExecutor(
                batched, self.book, job=self.job, root=self.out.root, journal=self.journal, recorder=self.recorder,
                control=self.control, reporter=self.reporter, budget=self.budget, policy=policy, rng=rng,
                max_policy_violations=opts.max_policy_violations, wait=opts.wait)
        async with AsyncExitStack() as stack:
            stack.enter_context(self.recorder.writers())  # commit's own threads, stopped after the work
            await self.executor.open(stack, timeouts, self.job, todo)
            for ep in batched:
                ep.batch_client = await stack.enter_async_context(make_batch_client(ep, timeouts, self.job))
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._ticker)
                outer.start_soon(self.claims.keep_renewed)
                if opts.handle_signals:
                    outer.start_soon(self._watch_signals)
                async with anyio.create_task_group() as work:
                    self._work_scope = work.cancel_scope
                    if self.batch is not None:
                        work.start_soon(self._run_batches, self.batch)
                    if synced:
                        work.start_soon(self._feed, self.dispatch)
                        self.executor.start(work)
                outer.cancel_scope.cancel()

    async def _run_batches(self, batch: BatchExecutor) -> None:
        try:
            await batch.execute(self._to_batch())
        except JobError as exc:  # the job file changed under the run: what was submitted is journaled
            self.control.stop(FatalError(str(exc), code="job_changed"), f"stopping: {exc}")

    async def _feed(self, dispatch: Dispatcher) -> None:
        try:
            for item in self._to_send():
                if self.control.stopping:
                    break
                eligible = frozenset(e.name for e in self.endpoints if self.job.can_send(e.ep, item.body))
                entry = self.journal.entries.get(item.id)
                prior = entry.attempts if entry is not None and entry.rhash == item.rhash else 0
                if entry is not None and entry.status == "failed" and entry.error_kind == "transient":
                    await anyio.to_thread.run_sync(self.recorder.load_short, item)  # reads one journal line
                if not await self.control.wait(dispatch.put_new, Task(item, eligible, attempt=prior)):
                    break
        except JobError as exc:  # the job file changed under the run: what was sent is journaled
            self.control.stop(FatalError(str(exc), code="job_changed"), f"stopping: {exc}")
        finally:
            dispatch.close_feed()

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
        control = self.control
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if control.interrupted:
                    self.reporter.log("second signal: stopping now; in-flight requests stay pending", level="warning")
                    self._work_scope.cancel()
                    return
                control.interrupted = True
                self.reporter.log(f"{signal.Signals(signum).name}: no new requests; waiting up to "
                                  f"{self.options.grace_period:.0f}s for those in flight (signal again to "
                                  f"stop now)", level="warning")
                control.stop()
                self._work_scope.deadline = min(self._work_scope.deadline,
                                                anyio.current_time() + self.options.grace_period)

    def _disk_trouble(self, exc: OSError) -> None:
        """The disk refused a write (journal, image): the run stops with a note on what to do."""
        if exc.errno in DISK_ERRNOS:
            what = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
                    errno.EROFS: "read-only file system"}.get(exc.errno, exc.strerror)
            note = f"can't write to {self.out.root}: {what}; stopping. Free space, then rerun to finish"
        else:
            note = f"can't write to {self.out.root}: {exc}; stopping"
        self.control.stop(FatalError(note, code="disk_error"), note)

    # -- the end ----------------------------------------------------------------------------

    async def _finish(self, started: float) -> RunResult:
        with anyio.CancelScope(shield=True):
            job_meta = {"name": self.job.name, "file": str(self.job.path)}
            manifest_ok = True
            try:
                kept = await anyio.to_thread.run_sync(self._unchanged_manifest) if not self.recorder.requests else None
                if kept is not None:
                    summary = kept
                elif self.layout.manifest == SEGMENTS:
                    from ._segments import write_segments

                    items = self._manifest_items()
                    summary = await anyio.to_thread.run_sync(
                        write_segments, self.journal, self.out.root, job_meta, items, self._segments_known(items))
                else:
                    summary = await anyio.to_thread.run_sync(
                        write_manifest, self.journal, self.out.manifest, job_meta, self._manifest_items())
                if kept is None:
                    await anyio.to_thread.run_sync(self._commit_current)
            except JobError as exc:  # changed during the run: its items are unknown, the journal is not
                self.reporter.log(f"{self.out.manifest} not rewritten: {exc}", level="error")
                manifest_ok = False
                summary = self._journal_summary()
                if self.control.fatal is None:
                    self.control.fatal = FatalError(str(exc), code="job_changed")
            except OSError as exc:
                self.reporter.log(f"can't write {self.out.manifest}: {exc.strerror}; the journal is intact "
                                  f"and the next run rebuilds it", level="error")
                manifest_ok = False
                # the journal in memory still knows every result: count from it, not zeros
                try:
                    summary = await anyio.to_thread.run_sync(count_items, self.journal, self._items)
                except JobError:
                    summary = self._journal_summary()
                if self.control.fatal is None:
                    self.control.fatal = FatalError(str(exc), code="disk_error")
            if self.recorder.requests:
                try:
                    self.journal.append(end_record(summary, self._endpoint_stats()))
                except OSError:
                    pass
            if self.sharded is None:
                await anyio.to_thread.run_sync(self._save_checkpoint, summary, manifest_ok)
            merged = None
            if self.sharded is not None and self.claims.skipped and summary["pending"]:
                try:  # a twin worker on this index may have finished what we skipped
                    summary = await anyio.to_thread.run_sync(
                        self.sharded.recount, self.out.root, job_meta, self._items)
                except (OSError, BatcherError) as exc:
                    self.reporter.log(f"can't recount shard {self.sharded.shard}: {exc}", level="warning")
            if self.sharded is not None:
                try:
                    # a shard that left nothing pending commits; the last one to commit merges
                    merged = await anyio.to_thread.run_sync(lambda: self.sharded.finish(
                        summary, job_meta, self._all_items, commit=summary["pending"] == 0))
                except (OSError, BatcherError) as exc:
                    self.reporter.log(f"can't finish shard {self.sharded.shard} in {self.sharded.out}: {exc}; "
                                      f"its records stay in the local buffer and go up with the next run",
                                      level="error")
                    if self.control.fatal is None:
                        self.control.fatal = FatalError(str(exc), code="store_error")
                if merged is not None:
                    self.reporter.log(f"all {self.sharded.shard.count} shards committed: wrote "
                                      f"{self.sharded.out}/manifest.json ({merged['done']} done, {merged['failed']} "
                                      f"failed, {merged['pending']} pending of {merged['total']})")
        stranded = self.dispatch.stranded if self.dispatch is not None else None
        if stranded and self.control.fatal is None:
            retired = ", ".join(f"{e.name} ({e.retired})" for e in self.endpoints if e.retired)
            self.control.fatal = FatalError(f"{len(stranded)} item(s) need an endpoint that was retired: {retired}",
                                    code="no_endpoint")
        at_provider = len(self.batch.book.at_provider) if self.batch is not None else 0
        if self.control.interrupted:
            outcome, code = "interrupted", EXIT_INTERRUPTED
        elif self.control.fatal is not None and self.control.fatal.code == "budget_exhausted":
            outcome, code = "budget reached", EXIT_ABORTED
        elif self.control.fatal is not None:
            outcome, code = "aborted", EXIT_ABORTED
        elif at_provider:
            outcome, code = f"submitted; {at_provider} item(s) at the provider (a later run collects them)", \
                EXIT_AT_PROVIDER
        elif summary["failed"]:
            outcome, code = "finished with failures", EXIT_FAILED
        elif summary["pending"] and self.claims.skipped:
            # another worker on this index holds them: not done here, so not exit 0 (the launcher may
            # rerun the index, which then finds them done, or claims what that worker left)
            outcome, code = f"finished; {summary['pending']} item(s) held by another worker", EXIT_FAILED
        else:
            outcome, code = "completed", EXIT_OK
        result = RunResult(
            outcome=outcome, exit_code=code, out=str(self.out.root), summary=summary, images=self.recorder.images,
            requests=self.recorder.requests, rate_limited=sum(e.limiter.rejections for e in self.endpoints),
            elapsed=time.monotonic() - started,
            error={**self.control.fatal.as_record(), "message": self.redact(self.control.fatal.message)}
            if self.control.fatal is not None else None,
            cost=round(self.recorder.cost, 6) if any(self.prices.values()) else None,
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

        return manifest_current(self.out.journal, self._manifest_file(), self._digest())

    def _digest(self) -> str:
        """The job's items digest: the job cache's (a digest of what the items are made from, known
        without reading them), else the (id, rhash) list's, for a sharded run."""
        if self.found is not None and self.found.digest is not None:
            return self.found.digest
        return self._items_digest.hexdigest()

    def _manifest_items(self) -> Any:
        """The items callable for the manifest writer. When every old item is finished (see
        `_count_known`), the old ones come from the checkpoint (id, request hash: their records are in
        the journal) and only the new lines are parsed; else the job file is read as ever."""
        from ._checkpoint import open_writer

        found, cp = self.found, self.journal.checkpoint
        if not self._new_only or found is None or cp is None:
            return self._recorded(self._items)
        db = open_writer(self.out.journal)
        writer = self._current = CurrentWriter(db, start=found.old_count) if db is not None else None
        first = [True]

        def new() -> Iterator[Any]:
            items: Iterator[Any] = self._new_items()
            if first[0] and writer is not None:
                first[0] = False
                items = writer.record(items)  # the old rows stay; its transaction starts once the old are read
            return items
        return KnownPrefix(cp, found.old_count, new)

    def _segments_known(self, items: Any) -> Any:
        """`items` as write_segments' `known` when the index on disk was written from the old items (its
        stamp names their digest, and it is unchanged since): its whole old segments are kept unread."""
        found, cp = self.found, self.journal.checkpoint
        if not isinstance(items, KnownPrefix) or found is None or cp is None:
            return None
        try:
            stamp = json.loads(cp.meta("manifest") or "null")
            st = self._manifest_file().stat()
        except (OSError, ValueError):
            return None
        if not isinstance(stamp, dict) or [stamp.get("items"), stamp.get("size"), stamp.get("mtime_ns")] != \
                [found.old_digest, st.st_size, st.st_mtime_ns]:
            return None
        return items

    def _recorded(self, items: Any) -> Any:
        """`items` for the manifest writer; its pass also records them as the checkpoint's current items
        and the job cache (see _jobcache), so no pass of the job file of their own."""
        from ._checkpoint import open_writer

        if self.sharded is not None or self.found is None or self.found.digest is None:
            return items
        db = open_writer(self.out.journal)
        if db is None:
            return items
        self._current = CurrentWriter(db)
        return self._current.wrap(items)

    def _commit_current(self) -> None:
        writer, self._current = self._current, None
        if writer is None:
            return
        try:
            found = self.found
            assert found is not None and found.digest is not None
            writer.commit(found.digest, cache_entry(found, found.count, found.warnings))
        except Exception:  # best effort (sqlite, the disk): the next run validates the job in full
            writer.rollback()
        finally:
            writer.db.close()

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

        self._commit_current()  # a manifest pass that did not finish records nothing (rolled back)
        try:
            self.journal.sync()
        except OSError:
            return
        checked = (self.journal.loaded_end, self._missing) if self._files_checked else None
        if refresh(self.out.journal, checked=checked) is not None:
            if manifest_ok:
                stamp_manifest(self.out.journal, self._manifest_file(), self._digest(), summary)
                # the items manifest.json holds, for `batcher status`: recorded by the manifest pass;
                # a pass of their own only if that failed (rewritten only when they changed)
                found = self.found
                entry = cache_entry(found, found.count, found.warnings) if found is not None else None
                stamp_current(self.out.journal, self._digest(), self._items, entry)

    def _endpoint_stats(self) -> dict[str, dict[str, Any]]:
        return {e.name: {**e.stats, "cost": round(e.stats["cost"], 6), "retired": e.retired,
                         "circuit_openings": e.breaker.openings, "circuit_first_opened": e.breaker.first_opened_wall}
                for e in self.endpoints}
