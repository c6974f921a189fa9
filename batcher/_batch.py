"""Provider Batch APIs: a second executor of the same item lifecycle.

A *chunk* is the items of one provider batch. Its life, each step journaled before it is taken
(records in `_records`), so a kill anywhere leaves a state the next run completes:

    1. write   OUT/batches/KEY.jsonl (the input file sent) and KEY.items.jsonl (what each line is),
               fsync both, journal each item's attempt (with "batch": KEY), then the `chunk` record
    2. upload  unless the journal has its file id: first look for a file named batcher-KEY.jsonl at
               the provider (a kill after an upload that was never journaled), else upload; `upload`
    3. create  unless the journal has its batch id: first look for a batch tagged with KEY in its
               metadata (a kill, or a timeout, after a create), else create; `batch`
    4. poll    state changes are journaled (`batch_state`) for `batcher status`
    5. collect an ended batch's output and error files are read line by line; each line's answer
               is saved and recorded exactly like a synchronous one (`_commit.Recorder`), its error
               classified by `_policy.decide`; then `closed`: the items without a line are pending again

An item is in one place at a time: items of an open chunk are never sent synchronously nor put in
another chunk (`BatchBook.at_provider`). Re-collecting after a kill skips lines already recorded.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Mapping
from contextlib import aclosing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from ._exceptions import BatcherError, FatalError, PermanentError, RequestError, TransientError
from ._ids import safe_stem
from ._job import BatchSettings, Item, Job
from ._policy import POLICY_CODES, Fail, FailureState, Retry, RetryPolicy, decide
from ._records import (
    Chunk,
    attempt_record,
    batch_record,
    batch_state_record,
    chunk_record,
    chunks_of,
    closed_record,
    upload_record,
)

if TYPE_CHECKING:
    from ._client import BatchInfo, BatchLine
    from ._commit import Answer, Recorder
    from ._control import RunControl
    from ._endpoints import EndpointRun
    from ._manifest import Journal
    from ._plan import Budget
    from ._report import Reporter

__all__ = ["Chunk", "BatchBook", "BatchExecutor", "chunks_of", "BATCH_DIR", "POLL_FIRST", "POLL_MAX"]

BATCH_DIR = "batches"
METADATA_KEY = "batcher_chunk"
POLL_FIRST = 1.0  # seconds before the first poll; then ×1.5 per poll up to POLL_MAX (`poll:` fixes it)
POLL_MAX = 60.0
LOOKUP_SLACK = 600  # seconds: a batch or file made this long before its chunk record is not ours
_LOOKUP = object()  # "look the journal entry up" (None is an answer: not in the journal)
GROUP = 64  # result lines saved and recorded per worker-thread call
STEP_RETRY = RetryPolicy(max_attempts=5, base=1.0, cap=30.0)  # upload / create / retrieve, within one run


@dataclass(frozen=True)
class ChunkItem:
    """One line of a chunk's `KEY.items.jsonl`: the item as it was sent."""

    id: str
    rhash: str
    request: dict[str, Any]  # the item's canonical body (what records name)
    wanted: int  # images asked for in this batch (a short answer earlier: only the rest)
    attempt: int
    vars: dict[str, Any] | None
    file: str
    line: int

    def item(self) -> Item:
        return Item(self.id, self.request, self.rhash, self.file, self.line, vars=self.vars)


class ChunkItems:
    """A chunk's items file by item id, each line kept as its raw bytes and parsed when asked for:
    a 50,000-line chunk costs ~20 MB, not the ~45 MB of parsed requests.

    >>> items = read_chunk_items(root, chunk)
    >>> ci = items.get(line.custom_id)  # None: not one of the chunk's items
    """

    def __init__(self, lines: dict[str, bytes]) -> None:
        self._lines = lines

    def __len__(self) -> int:
        return len(self._lines)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._lines

    def ids(self) -> Iterator[str]:
        return iter(self._lines)

    def get(self, item_id: str) -> ChunkItem | None:
        raw = self._lines.get(item_id)
        return None if raw is None else parse_chunk_item(raw)

    def raw(self, item_id: str) -> bytes:
        return self._lines[item_id]

    def __iter__(self) -> Iterator[ChunkItem]:
        return (parse_chunk_item(raw) for raw in self._lines.values())


def chunk_item_line(ci: ChunkItem) -> bytes:
    """`ci` as a line of `KEY.items.jsonl` (without the newline)."""
    return json.dumps({"id": ci.id, "rhash": ci.rhash, "wanted": ci.wanted, "attempt": ci.attempt, "vars": ci.vars,
                       "file": ci.file, "line": ci.line, "request": ci.request},
                      ensure_ascii=False, separators=(",", ":")).encode()


def parse_chunk_item(raw: bytes) -> ChunkItem:
    """One line of a `KEY.items.jsonl` (checked whole when the file was indexed)."""
    d = json.loads(raw)
    return ChunkItem(d["id"], d["rhash"], d["request"], int(d["wanted"]), int(d["attempt"]),
                     d.get("vars"), d.get("file", ""), int(d.get("line", 0)))


def read_chunk_items(root: Path, chunk: Chunk) -> ChunkItems:
    """Index a chunk's items file (every line is checked here, so `get` can't fail later). Blocking: a thread."""
    path = root / _items_path(chunk.input)
    lines: dict[str, bytes] = {}
    try:
        with open(path, "rb") as fh:
            for raw in fh:
                lines[parse_chunk_item(raw).id] = raw.rstrip(b"\n")
    except FileNotFoundError:
        raise BatcherError(f"{path}: missing; the chunk {chunk.key} (batch {chunk.batch_id or 'not created'}) "
                           f"can't be matched to its items. Restore the file, or cancel the batch and move "
                           f"the output's journal away to start over") from None
    except (ValueError, KeyError, TypeError):
        raise BatcherError(f"{path}: not a chunk file batcher wrote (edited?)") from None
    return ChunkItems(lines)


def _items_path(input_rel: str) -> str:
    return input_rel[: -len(".jsonl")] + ".items.jsonl" if input_rel.endswith(".jsonl") else input_rel + ".items"


class BatchBook:
    """The output's chunks and which items are at the provider (those of chunks not yet collected)."""

    def __init__(self, root: Path, records: Iterable[Mapping[str, Any]]) -> None:
        self.root = root
        self.chunks = chunks_of(records)
        self.at_provider: dict[str, str] = {}  # item id -> chunk key
        for chunk in self.open():
            for item_id in read_chunk_items(root, chunk).ids():
                self.at_provider[item_id] = chunk.key

    def open(self) -> list[Chunk]:
        return [c for c in self.chunks.values() if c.closed is None]


class _ChunkWriter:
    """Streams one chunk's input and items files (never the whole chunk in memory)."""

    def __init__(self, root: Path, key: str, limit_requests: int, limit_bytes: int) -> None:
        self.key = key
        self.rel = f"{BATCH_DIR}/{key}.jsonl"
        self.path = root / self.rel
        self.items_path = root / _items_path(self.rel)
        self.path.parent.mkdir(exist_ok=True)
        self._input = open(self.path.with_name(f".tmp-{key}.jsonl"), "wb")
        self._items = open(self.items_path.with_name(f".tmp-{key}.items.jsonl"), "wb")
        self.limit_requests, self.limit_bytes = limit_requests, limit_bytes
        self.requests = self.images = self.bytes = 0
        self.attempts: list[tuple[str, str, int]] = []  # (id, rhash, attempt): journaled once the files are whole

    def fits(self, line: bytes) -> bool:
        return self.requests < self.limit_requests and self.bytes + len(line) <= self.limit_bytes

    def add(self, line: bytes, ci: ChunkItem) -> None:
        self._input.write(line)
        self._items.write(chunk_item_line(ci) + b"\n")
        self.requests += 1
        self.images += ci.wanted
        self.bytes += len(line)
        self.attempts.append((ci.id, ci.rhash, ci.attempt))

    def seal(self) -> None:
        """Both files whole and durable under their final names (before the chunk record names them)."""
        for fh, final in ((self._input, self.path), (self._items, self.items_path)):
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            os.replace(fh.name, final)
        dfd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def discard(self) -> None:
        for fh in (self._input, self._items):
            fh.close()
            Path(fh.name).unlink(missing_ok=True)


class BatchExecutor:
    """Submit items as provider batches, poll them, and collect their answers into the output.

    >>> batch = BatchExecutor(endpoints, book, job=job, root=out.root, journal=journal, recorder=recorder,
    ...                       control=control, reporter=reporter, budget=budget, policy=policy, rng=rng,
    ...                       max_policy_violations=50)
    >>> await batch.execute(items)      # returns when every batch is collected (or, wait=False, submitted)

    The run gives it its parts: the endpoints that run in batch mode (each an `EndpointRun` whose
    `batch_client` is open), the output's `BatchBook`, the journal, the `Recorder` (write → record),
    the run's `RunControl` (stop, waits), the reporter, the budget and the retry policy.
    """

    def __init__(self, endpoints: list[EndpointRun], book: BatchBook, *, job: Job, root: Path, journal: Journal,
                 recorder: Recorder, control: RunControl, reporter: Reporter, budget: Budget, policy: RetryPolicy,
                 rng: random.Random, max_policy_violations: int, wait: bool = True) -> None:
        self.endpoints = {e.name: e for e in endpoints}
        self.job, self.root, self.journal, self.recorder = job, root, journal, recorder
        self.control, self.reporter, self.budget = control, reporter, budget
        self.policy, self.rng, self.max_policy_violations = policy, rng, max_policy_violations
        self.policy_violations = 0
        self.wait = wait
        self.book = book
        # items whose batch line failed transiently (or never came), as their items-file lines: an expired
        # 50,000-line batch is ~15 MB of these, not ~45 MB of parsed items
        self.resubmit: list[bytes] = []
        self.cancelled = 0  # items of batches cancelled at the provider: pending, not resubmitted by this run
        self._cancelled_lines = 0
        self._fresh: set[str] = set()  # chunks this run made and has not begun to collect: none of their lines
        # can have been recorded, so collecting them looks nothing up in the journal
        self.budget_note: str | None = None  # set when the budget refused an item: nothing more is submitted

    # -- which items are ours ------------------------------------------------------------------

    def takes(self, item: Item) -> bool:
        """Whether this executor handles `item` (a batch endpoint can send it) — or it is at the provider."""
        return item.id in self.book.at_provider or self._endpoint_for(item) is not None

    def _endpoint_for(self, item: Item) -> Any:
        for ep in self.endpoints.values():
            if ep.ep.batch is not None and ep.retired is None and self.job.can_send(ep.ep, item.body):
                return ep
        return None  # (an endpoint that only collects what it left at the provider takes nothing new)

    def _have(self, item: Item, entry: Any = _LOOKUP) -> tuple[list[dict[str, Any]], float | None]:
        """A short answer's images so far (they were paid): only the missing ones are asked for.
        `entry`: the item's journal entry when the caller has it (a lookup may be a sqlite query)."""
        if item.id not in self.recorder.have:
            if entry is _LOOKUP:
                entry = self.journal.entries.get(item.id)
            if entry is not None and entry.status == "failed" and entry.error_kind == "transient":
                self.recorder.load_short(item)  # reads one journal line
        return self.recorder.have.get(item.id, ([], None))

    # -- the executor's life -------------------------------------------------------------------

    async def execute(self, items: Iterator[Item]) -> None:
        """Resume open chunks, submit `items` (not at the provider), then wait for and collect every batch
        (with `wait=False`: one look, collecting what ended, then return)."""
        try:
            await self._execute(items)
        finally:
            if self.budget_note is not None:
                self.control.stop(FatalError(self.budget_note, code="budget_exhausted"), self.budget_note)
            elif self.cancelled:
                note = (f"{self.cancelled} item(s) of batches cancelled at the provider stay pending "
                        f"(the next run submits them again)")
                self.control.stop(FatalError(note, code="batch_cancelled"), note)

    async def _execute(self, items: Iterator[Item]) -> None:
        for chunk in self.book.open():
            if self.control.stopping:
                return
            await self._advance(chunk)
        await self._submit(items)
        delay = None
        while not self.control.stopping:
            await self._poll_all()
            if self.resubmit and not self.control.stopping:
                again, self.resubmit = self.resubmit, []
                await self._submit(parse_chunk_item(raw).item() for raw in again)
            live = [c for c in self.book.open() if c.batch_id is not None]
            if not self.book.open() or not self.wait:
                return
            if not live:  # open chunks not created (a step failed): the next run takes them on
                return
            delay = self._next_delay(delay)
            if not await self.control.wait(anyio.sleep, delay):
                return

    def _next_delay(self, previous: float | None) -> float:
        polls = [ep.ep.batch.poll for ep in self.endpoints.values() if ep.ep.batch is not None and ep.ep.batch.poll]
        if polls:
            return float(min(polls))
        return POLL_FIRST if previous is None else min(previous * 1.5, POLL_MAX)

    # -- 1. write ----------------------------------------------------------------------------

    async def _submit(self, items: Iterator[Item]) -> None:
        """Group items into chunks per (endpoint, model) and send each chunk as it fills."""
        writers: dict[tuple[str, Any], _ChunkWriter] = {}
        try:
            for item in items:
                if self.control.stopping or self.budget_note is not None:
                    break
                if item.id in self.book.at_provider:
                    continue
                ep = self._endpoint_for(item)
                if ep is None:
                    continue  # no batch endpoint can send it (the synchronous path takes it)
                try:
                    ci, line = self._line(ep, item)
                except PermanentError as exc:  # as synchronously: the item fails, nothing is sent
                    if not await self.recorder.failure(ep, item, 0, exc):
                        break
                    continue
                cost = ep.prices.cost(item.body, ci.wanted)
                if not self.budget.reserve(ci.wanted, cost):
                    # what fits is still submitted and collected; the run ends "budget reached" after that
                    self.budget_note = (f"budget reached ({self.budget.describe()}): {ci.wanted} more image(s) "
                                        f"would exceed it; unsubmitted items stay pending")
                    self.reporter.log(self.budget_note, level="warning")
                    break
                group = (ep.name, item.body.get("model"))
                writer = writers.get(group)
                if writer is not None and not writer.fits(line):
                    del writers[group]
                    await self._send_chunk(ep, writer)
                    writer = None
                if writer is None:
                    limits = _limits(ep)
                    writer = writers[group] = await anyio.to_thread.run_sync(
                        _ChunkWriter, self.root, _new_key(), *limits)
                writer.add(line, ci)
            for (name, _model), writer in list(writers.items()):
                del writers[(name, _model)]
                await self._send_chunk(self.endpoints[name], writer)
        finally:
            for writer in writers.values():
                writer.discard()  # not journaled: its items stay pending

    def _line(self, ep: EndpointRun, item: Item) -> tuple[ChunkItem, bytes]:
        entry = self.journal.entries.get(item.id)
        prior = entry.attempts if entry is not None and entry.rhash == item.rhash else 0
        have = self._have(item, entry)  # a short answer earlier: only the missing images
        wanted = item.images - len(have[0])
        body = ep.ep.body_for(item.body)
        if wanted != item.images:
            body["n"] = wanted
        line = ep.batch_client.input_line(item.id, body)  # PermanentError: the dialect can't send it
        ci = ChunkItem(item.id, item.rhash, item.body, wanted, prior + 1, item.vars, item.file, item.line)
        return ci, line

    async def _send_chunk(self, ep: EndpointRun, writer: _ChunkWriter) -> None:
        if writer.requests == 0:
            writer.discard()
            return
        await anyio.to_thread.run_sync(writer.seal)
        key = writer.key

        rec = chunk_record(key, ep.name, ep.base_url, ep.key_env, ep.ep.dialect, writer.rel, writer.requests,
                           writer.images, writer.bytes)

        def journal_chunk() -> None:
            journal = self.journal
            for item_id, rhash, attempt in writer.attempts:
                journal.append(attempt_record(item_id, rhash, attempt, ep.name, batch=key))
            journal.sync()  # every attempt is durable before the chunk that sends them is
            journal.append(rec)
            journal.sync()
            self.recorder.requests += writer.requests

        try:
            await anyio.to_thread.run_sync(journal_chunk)
        except OSError as exc:
            self.recorder.disk_trouble(exc)
            return
        chunk = chunks_of([rec])[key]
        self.book.chunks[key] = chunk
        for item_id, _rhash, _attempt in writer.attempts:
            self.book.at_provider[item_id] = key
        self._fresh.add(key)
        ep.stats["requests"] += writer.requests
        self.reporter.log(f"batch chunk {key}: {writer.requests} request(s), {writer.images} image(s), "
                     f"{writer.bytes / 1e6:.1f} MB for endpoint {ep.name!r}")
        await self._advance(chunk)

    # -- 2. upload, 3. create ------------------------------------------------------------------

    async def _advance(self, chunk: Chunk) -> None:
        """Take the chunk through upload and create, finding a step the journal missed before redoing it."""
        ep = self.endpoints.get(chunk.endpoint)
        if ep is None:
            if chunk.batch_id is None:
                self.reporter.log(f"batch chunk {chunk.key}: endpoint {chunk.endpoint!r} is not in this run; "
                             f"left for a run that has it", level="warning")
            return
        try:
            if chunk.file_id is None:
                info = await self._step(ep, "upload", lambda: self._find_or_upload(ep, chunk))
                if info is None:
                    return
                if not await self._journal(upload_record(chunk.key, info.id)):
                    return
                chunk.file_id = info.id
            if chunk.batch_id is None:
                batch = await self._step(ep, "create", lambda: self._find_or_create(ep, chunk))
                if batch is None:
                    return
                if not await self._journal(batch_record(chunk.key, batch.id, batch.created_at, batch.expires_at)):
                    return
                chunk.batch_id, chunk.created_at, chunk.expires_at = batch.id, batch.created_at, batch.expires_at
                self.reporter.log(f"batch chunk {chunk.key}: batch {batch.id} created ({chunk.requests} request(s))")
                await self._note_state(chunk, batch)
                await self._cancel_twins(ep, chunk, batch.id)
        except PermanentError as exc:
            await self._reject(ep, chunk, exc)

    async def _find_or_upload(self, ep: EndpointRun, chunk: Chunk) -> Any:
        client = ep.batch_client
        found = []
        async for f in client.files():
            if f.created_at is not None and f.created_at < chunk.started - LOOKUP_SLACK:
                break  # newest first: older files are not this chunk's
            if f.filename == chunk.filename:
                found.append(f)
        whole = [f for f in found if f.bytes in (None, chunk.bytes)]
        keep = whole[0] if whole else None
        for orphan in found:
            if orphan is not keep:  # a second upload of the same chunk (or a torn one): never used
                try:
                    await client.delete_file(orphan.id)
                except RequestError:
                    pass
        if keep is not None:
            return keep
        return await client.upload(self.root / chunk.input, chunk.filename)

    async def _find_or_create(self, ep: EndpointRun, chunk: Chunk) -> Any:
        client = ep.batch_client
        found = await self._find_batch(ep, chunk)
        if found is not None:
            return found
        settings: BatchSettings = ep.ep.batch or BatchSettings()
        assert chunk.file_id is not None  # uploaded first
        try:
            return await client.create_batch(chunk.file_id, window=settings.window,
                                             metadata={METADATA_KEY: chunk.key,
                                                       "batcher_job": self.job.name[:512]})
        except TransientError:
            # the create may have happened (a timeout, a 5xx after the batch was made): look before retrying
            found = await self._find_batch(ep, chunk)
            if found is not None:
                return found
            raise

    async def _cancel_twins(self, ep: EndpointRun, chunk: Chunk, keep: str) -> None:
        """Cancel any other batch tagged with this chunk: a gateway that retries a create itself (LiteLLM
        does, through the openai SDK's own retries, when the provider answered 5xx after making it) makes
        the batch twice and tells batcher of one; the other would run and be billed. One list per chunk
        (newest first, back to the chunk's start); best effort."""
        try:
            twins = [b async for b in self._tagged(ep, chunk)
                     if b.id != keep and not b.terminal and b.status != "cancelling"]
            for b in twins:
                self.reporter.log(f"batch chunk {chunk.key}: a second batch {b.id} was made for it (a gateway "
                                  f"retried the create); cancelling it, {keep} is kept", level="warning")
                await ep.batch_client.cancel_batch(b.id)
        except RequestError as exc:
            self.reporter.log(f"batch chunk {chunk.key}: can't look for a second batch made for it "
                              f"({exc.describe()}): if a gateway made it twice, the other runs too", level="warning")

    async def _find_batch(self, ep: EndpointRun, chunk: Chunk) -> Any:
        async with aclosing(self._tagged(ep, chunk)) as tagged:
            async for b in tagged:
                return b
        return None

    async def _tagged(self, ep: EndpointRun, chunk: Chunk) -> AsyncGenerator[Any, None]:
        """The provider's batches tagged with this chunk, newest first, back to the chunk's start."""
        async for b in ep.batch_client.batches():
            if b.created_at is not None and b.created_at < chunk.started - LOOKUP_SLACK:
                return
            if b.metadata.get(METADATA_KEY) == chunk.key:
                yield b

    async def _step(self, ep: EndpointRun, what: str, call: Callable[[], Any]) -> Any:
        """A control-plane call retried on transient failures (STEP_RETRY); fatal ones stop the run.
        None: given up for this run (the chunk stays open; the next run goes on from the journal)."""
        for attempt in range(1, STEP_RETRY.max_attempts + 1):
            if self.control.stopping:
                return None
            try:
                return await call()
            except FatalError as exc:
                self.control.stop(exc, f"fatal: {what} on endpoint {ep.name!r}: {exc.describe()}; "
                                   f"submitted batches stay at the provider, the rest pending")
                return None
            except TransientError as exc:
                if attempt == STEP_RETRY.max_attempts:
                    self.reporter.log(f"endpoint {ep.name!r}: batch {what} failed {attempt} times "
                                 f"(last: {exc.describe()}); the next run tries again", level="warning")
                    return None
                if not await self.control.wait(anyio.sleep, STEP_RETRY.delay(attempt, self.rng, exc.retry_after)):
                    return None
        return None

    async def _reject(self, ep: EndpointRun, chunk: Chunk, exc: PermanentError) -> None:
        """The provider refused the chunk itself (a 400 on upload or create): every item fails with it."""
        self.reporter.log(f"batch chunk {chunk.key}: refused by endpoint {ep.name!r}: {exc.describe()}; its "
                     f"{chunk.requests} item(s) fail", level="error")
        items = await anyio.to_thread.run_sync(read_chunk_items, self.root, chunk)
        for ci in items:
            if not await self.recorder.failure(ep, ci.item(), ci.attempt, exc, extra={"batch": chunk.key}):
                return
        await self._close(chunk, "rejected", items)

    # -- 4. poll -------------------------------------------------------------------------------

    async def _poll_all(self) -> None:
        for chunk in list(self.book.open()):
            if self.control.stopping:
                return
            ep = self.endpoints.get(chunk.endpoint)
            if ep is None or chunk.batch_id is None:
                continue
            info = await self._step(ep, "retrieve", _retrieve(ep.batch_client, chunk.batch_id))
            if info is None:
                continue
            await self._note_state(chunk, info)
            if info.terminal:
                await self._collect(ep, chunk, info)

    async def _note_state(self, chunk: Chunk, info: BatchInfo) -> None:
        if chunk.expires_at is None and info.expires_at is not None and chunk.batch_id == info.id:
            # OpenAI's create answer may have `expires_at: null` (validating): keep the first one seen, for status
            if await self._journal(batch_record(chunk.key, info.id, chunk.created_at, info.expires_at)):
                chunk.expires_at = info.expires_at
        counts = {"total": info.total, "completed": info.completed, "failed": info.failed}
        if info.status == chunk.status and counts == chunk.counts:
            return
        chunk.status, chunk.counts = info.status, counts
        await self._journal(batch_state_record(chunk.key, info.status, info.total, info.completed, info.failed))
        done = sum(c.counts["completed"] + c.counts["failed"] for c in self.book.open())
        total = sum(c.requests for c in self.book.open())
        self.reporter.log(f"batch {chunk.batch_id} ({chunk.endpoint}): {info.status}, {info.completed} completed, "
                     f"{info.failed} failed of {info.total or chunk.requests}; all open batches: {done}/{total}")
        self.reporter.provider(done, total)

    # -- 5. collect ----------------------------------------------------------------------------

    async def _collect(self, ep: EndpointRun, chunk: Chunk, info: BatchInfo) -> None:
        """Record every line of an ended batch; items without one are pending again."""
        items = await anyio.to_thread.run_sync(read_chunk_items, self.root, chunk)
        if chunk.key in self._fresh:
            self._fresh.discard(chunk.key)  # a collection cut short records some lines: look them up next time
            recorded: set[str] = set()
        else:
            recorded = await anyio.to_thread.run_sync(self._recorded, items)
        answered: set[str] = set()
        results_paged = ep.batch_client.shape.results is not None  # xAI: a paged list, by batch id
        for file_id in ((info.id,) if results_paged else (info.output_file_id, info.error_file_id)):
            if file_id is not None and not await self._record_lines(ep, chunk, file_id, items, answered, recorded):
                return  # the chunk stays open and is collected again
        if self.control.stopping and self.control.interrupted:
            return
        unanswered = (item_id for item_id in items.ids() if item_id not in answered)
        if info.status == "cancelled":
            self.cancelled += sum(1 for _ in unanswered) + self._cancelled_lines
        else:
            named = _line_errors(info) if info.status == "failed" else {}
            position = {item_id: n for n, item_id in enumerate(items.ids(), 1)} if named else {}
            for ci in map(items.get, unanswered):
                assert ci is not None
                # the provider refused these very lines (validation): they fail; the others were not run and
                # go into a later batch (each such round is an attempt: a batch that never answers ends)
                line_no = position.get(ci.id, 0)
                error: RequestError = PermanentError(f"the batch failed validation: {named[line_no]}",
                                                     code="batch_validation") if line_no in named else \
                    TransientError(f"batch {chunk.batch_id} ended {info.status} without an answer for it",
                                   code="no_answer")
                if not await self._line_failed(ep, ci, error, {"batch": chunk.key}):
                    return
        self._cancelled_lines = 0
        if await self._close(chunk, info.status, items):
            await self._clean_up(ep, info, results_paged)

    def _recorded(self, items: ChunkItems) -> set[str]:
        """The chunk's items an earlier collection, cut short, recorded (journal lookups: a thread)."""
        entries = self.journal.entries
        recorded: set[str] = set()
        for ci in items:
            entry = entries.get(ci.id)
            if entry is not None and entry.offset >= 0 and entry.status != "pending" \
                    and entry.attempts == ci.attempt and entry.rhash == ci.rhash:
                recorded.add(ci.id)
        return recorded

    async def _record_lines(self, ep: EndpointRun, chunk: Chunk, file_id: str, items: ChunkItems,
                            answered: set[str], recorded: set[str]) -> bool:
        """Save and record one result file's lines. Answers whose images are inline are saved and recorded
        GROUP lines per worker-thread call (`Recorder.answer_many`): collection is CPU-bound, and two
        thread hand-offs per line were a quarter of it (bench/batch.py). False: stop collecting (results
        unreadable, or the run stops on disk trouble); the chunk stays open."""
        group: list[Answer] = []
        try:
            async for line in ep.batch_client.lines(file_id):
                ci = items.get(line.custom_id) if line.custom_id is not None else None
                if ci is None or ci.id in answered:
                    continue  # not one of ours, or said twice: the first line counts
                answered.add(ci.id)
                if ci.id in recorded:
                    continue  # recorded by an earlier collection that was cut short
                gen = line.generation
                if gen is not None and all(image.data is not None for image in gen.images):
                    item = ci.item()
                    # the chunk asked for fewer than n only after a short answer: else there is nothing to look up
                    have = self._have(item) if ci.wanted < item.images else ([], None)
                    self.recorder.have.pop(item.id, None)
                    group.append((item, ci.attempt, gen, have, {"batch": chunk.key}))
                    if len(group) >= GROUP:
                        if not await self.recorder.answer_many(ep, group):
                            return False  # the run stops (disk)
                        group = []
                elif not await self._record_line(ep, chunk, ci, line):
                    return False  # the run stops (disk)
        except RequestError as exc:
            self.reporter.log(f"batch {chunk.batch_id}: can't read its results ({exc.describe()}); the next "
                              f"run tries again", level="warning")
            if exc.kind == "fatal":
                self.control.stop(exc, f"fatal: reading batch results: {exc.describe()}")
            return await self._flush(ep, group) and False
        return await self._flush(ep, group)

    async def _flush(self, ep: EndpointRun, group: list[Answer]) -> bool:
        return not group or await self.recorder.answer_many(ep, group)

    async def _clean_up(self, ep: EndpointRun, info: BatchInfo, results_paged: bool) -> None:
        """Once every line is recorded, the batch's files at the provider are of no more use (they count
        against the account's storage): deleted, best effort. The local input file stays (what was sent)."""
        ids = (info.input_file_id,) if results_paged else (info.input_file_id, info.output_file_id, info.error_file_id)
        for file_id in ids:
            if file_id is None:
                continue
            try:
                await ep.batch_client.delete_file(file_id)
            except RequestError as exc:
                if exc.kind == "fatal":
                    return

    async def _record_line(self, ep: EndpointRun, chunk: Chunk, ci: ChunkItem, line: BatchLine) -> bool:
        item = ci.item()
        extra = {"batch": chunk.key}
        if line.generation is not None:
            # the chunk asked for fewer than n only after a short answer: else there is nothing to look up
            have = self._have(item) if ci.wanted < item.images else ([], None)
            try:
                saved = await self.recorder.save(ep.batch_client, safe_stem(item.id), line.generation,
                                                     first=len(have[0]), count=item.images)
            except RequestError as exc:  # a result URL that expired or a truncated image: transient
                return await self._line_failed(ep, ci, exc, extra)
            except OSError as exc:
                self.recorder.disk_trouble(exc)
                return False
            self.recorder.have.pop(item.id, None)
            return bool(await self.recorder.answer(ep, item, ci.attempt, line.generation, saved, have,
                                                   extra=extra))
        error = line.error if line.error is not None else TransientError("no answer in the batch", code="no_answer")
        return await self._line_failed(ep, ci, error, extra)

    async def _line_failed(self, ep: EndpointRun, ci: ChunkItem, exc: RequestError, extra: dict[str, Any]) -> bool:
        if exc.code == "batch_cancelled":  # the user cancelled: pending, not sent again by this run
            self._cancelled_lines += 1
            return True
        state = FailureState(tries=ci.attempt, stopping=False, policy_violations=self.policy_violations,
                             max_policy_violations=self.max_policy_violations, endpoint_healthy=True)
        if exc.kind == "permanent" and exc.code in POLICY_CODES:
            self.policy_violations += 1
            state = replace(state, policy_violations=self.policy_violations)
        decision = decide(exc, state, self.policy, self.rng)
        if isinstance(decision, Retry):
            self.resubmit_item(ci)
            return True
        if isinstance(decision, Fail) and decision.stop is not None:
            self.control.stop(exc, decision.stop)
        return bool(await self.recorder.failure(ep, ci.item(), ci.attempt, exc, extra=extra))  # it redacts

    def resubmit_item(self, ci: ChunkItem) -> None:
        """Back to pending; sent again in a later chunk of this run (attempts permitting)."""
        self.resubmit.append(chunk_item_line(ci))

    async def _close(self, chunk: Chunk, status: str, items: ChunkItems) -> bool:
        if not await self._journal(closed_record(chunk.key, status)):
            return False
        chunk.closed = status
        for item_id in items.ids():  # the chunk's own ids, not a scan of every item at the provider
            if self.book.at_provider.get(item_id) == chunk.key:
                del self.book.at_provider[item_id]
        return True

    async def _journal(self, rec: Any) -> bool:
        ok = await self.recorder.append(rec)
        if ok:
            try:
                await anyio.to_thread.run_sync(self.journal.sync)
            except OSError as exc:
                self.recorder.disk_trouble(exc)
                return False
        return bool(ok)


def _line_errors(info: BatchInfo) -> dict[int, str]:
    """A failed batch's validation errors by input line (1-based): `code: message`."""
    out: dict[int, str] = {}
    for err in info.errors or []:
        if isinstance(err, dict) and isinstance(err.get("line"), int) and not isinstance(err.get("line"), bool):
            out.setdefault(err["line"], f"{err.get('code') or 'invalid'}: {err.get('message') or ''}"[:500])
    return out


def _retrieve(client: Any, batch_id: str) -> Callable[[], Any]:
    return lambda: client.batch(batch_id)


def _limits(ep: EndpointRun) -> tuple[int, int]:
    """Requests and bytes per chunk: the job's `batch:` settings, else the dialect's provider limits."""
    settings = ep.ep.batch or BatchSettings()
    shape = ep.batch_client.shape
    return settings.max_requests or shape.max_requests, settings.max_bytes or shape.max_bytes


def _new_key() -> str:
    """A chunk's key: unique across outputs that share an account (it tags the batch and names the file)."""
    return f"{time.strftime('%Y%m%d')}-{secrets.token_hex(6)}"



def run_records(journal: Path) -> list[dict[str, Any]]:
    """The journal's records about the run (run, end, batch steps), read-only: from the checkpoint's copy
    plus the journal's tail when a checkpoint matches, else from the whole journal."""
    from ._checkpoint import open_readonly
    from ._manifest import RecordLines
    from ._records import RUN_KINDS

    records: list[dict[str, Any]] = []
    start = 0
    opened = open_readonly(journal)
    if opened is not None:
        db, start = opened
        try:
            records = [json.loads(r) for (r,) in db.execute("SELECT rec FROM runs ORDER BY n")]
        finally:
            db.close()
    with open(journal, "rb") as fh:
        fh.seek(start)
        for _begin, _end, rec in RecordLines(fh, str(journal)):
            if rec.get("t") in RUN_KINDS:
                records.append(rec)
    return records


async def cancel(out: Path) -> list[dict[str, Any]]:
    """Cancel every batch of `out` still at the provider; what a batch finished is kept there and collected by
    the next run. The key comes from the environment variable the run used (recorded by name), never from disk."""
    from ._client import BatchClient
    from ._dialect import get_dialect

    journal = out / "manifest.jsonl"
    if not journal.is_file():
        raise BatcherError(f"{out}: no batcher manifest here (missing {journal.name})")
    rows: list[dict[str, Any]] = []
    for chunk in chunks_of(run_records(journal)).values():
        if chunk.closed is not None or chunk.batch_id is None or chunk.status in ("cancelling", "cancelled"):
            continue
        env = chunk.key_env or "BATCHER_API_KEY"
        key = os.environ.get(env)
        if not key:
            rows.append({"batch_id": chunk.batch_id, "state": chunk.status or "unknown",
                         "error": f"no key: set {env}"})
            continue
        try:
            dialect = get_dialect(chunk.dialect)
        except ValueError:
            dialect = get_dialect("openai-compatible")  # a dialect declared in the job: its batch API is OpenAI's
        async with BatchClient(chunk.base_url, key, dialect=dialect) as client:
            try:
                info = await client.cancel_batch(chunk.batch_id)
                rows.append({"batch_id": chunk.batch_id, "state": info.status})
            except RequestError as exc:
                rows.append({"batch_id": chunk.batch_id, "state": chunk.status or "unknown", "error": exc.describe()})
    return rows
