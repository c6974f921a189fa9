"""Write → record: an answer's images onto disk (and the store), then its `item` record into the
journal. Shared by every executor (the synchronous one in `_sync.py`, a provider batch's), so
both keep the same invariants:

- journal before send: `attempt` appends the attempt record (and raises) before a request leaves;
- rename before record: `save` returns only images whose final names exist, whole (and, on a shard,
  are published create-only); `answer` records them after that.

>>> recorder = Recorder(out, journal, reporter, redact=redact, on_disk_trouble=control_disk_trouble)
>>> saved = await recorder.save(client, safe_stem(item.id), gen, count=item.images)
>>> await recorder.answer(ep, item, attempts, gen, saved, recorder.have.pop(item.id, ([], None)))
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, cast

import anyio

from ._client import Generation, _Endpoint
from ._exceptions import RequestError
from ._ids import safe_stem
from ._job import Item
from ._manifest import Journal
from ._records import ItemRecord, attempt_record, done_record, failed_record, short_record
from ._redact import Redactor
from ._report import Reporter
from ._writer import OutputDir, SavedImage

if TYPE_CHECKING:
    from ._endpoints import EndpointRun

Have = tuple[list[dict[str, Any]], float | None]  # a short item's images so far, and their cost
Answer = tuple[Item, int, Generation, Have, "Mapping[str, Any] | None"]  # item, attempts, answer, have, extra


T = TypeVar("T")

# Threads that run `Recorder.commit`'s work during a run. anyio's shared pool grows to
# ~40 threads at concurrency 64, and every hand-off to a new or idle one is a futex wake, a context
# switch and a GIL hand-over; a few long-lived threads draining one queue keep busy instead
# (measured: see docs, CPU per image). Two, not one: a writer also waits on the disk.
WRITER_THREADS = 2


def _stem(item: Item) -> str:
    return safe_stem(item.id)


def _on_asyncio() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # another anyio backend (trio)
        return False
    return True


class _Writers:
    """A few long-lived worker threads fed by one queue, their results handed back to the event loop
    in batches (one loop wake-up for all the results that are ready, not one each).

    >>> with _Writers(2) as writers:
    ...     result = await writers.run(work)   # work() runs in one of the threads
    """

    def __init__(self, threads: int) -> None:
        self._count = threads
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._ready: list[tuple[asyncio.Future[Any], bool, Any]] = []
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> _Writers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the threads once the work queued before is done (every `run` has been awaited by then)."""
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join(timeout=30)
        self._threads.clear()

    async def run(self, work: Callable[[], T]) -> T:
        """`work()` in a writer thread. Like anyio's `to_thread.run_sync`, a cancelled caller still
        waits for it to finish: a commit is never abandoned half-way."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        if not self._threads:
            self._threads = [threading.Thread(target=self._serve, name=f"batcher-writer-{i}", daemon=True)
                             for i in range(self._count)]
            for thread in self._threads:
                thread.start()
        self._jobs.put((work, loop, future))
        with anyio.CancelScope(shield=True):
            result = await future
        return result

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            work, loop, future = job
            try:
                outcome: tuple[bool, Any] = (True, work())
            except BaseException as exc:  # handed to the awaiting task, raised there
                outcome = (False, exc)
            with self._lock:
                first = not self._ready
                self._ready.append((future, *outcome))
            if first:  # the loop is woken once for every result ready by the time it looks
                loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
        for future, ok, value in ready:
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)


@dataclass
class Committed:
    """What `Recorder.commit` did with an answer."""

    gen: Generation | None = None  # None: the answer could not be read (`unread` says why)
    saved: list[SavedImage] | None = None  # None: not saved here (see `refused`, or `save` them)
    unread: RequestError | None = None  # a malformed answer, a refusal in a 200: nothing saved
    refused: RequestError | OSError | None = None  # an image refused (not an image) or the disk refused it
    cost: float | None = None
    record: ItemRecord | None = None  # the record appended (None: the disk refused it, see `trouble`)
    trouble: OSError | None = None
    complete: bool = False  # recorded, and with it the item has every image it asked for


class Recorder:
    """The run's write → record stage, and the counters the summary reads (requests, images, cost)."""

    def __init__(self, out: OutputDir, journal: Journal, reporter: Reporter, *, sharded: Any = None,
                 redact: Redactor, on_disk_trouble: Callable[[OSError], None]) -> None:
        self.out = out
        self.journal = journal
        self.reporter = reporter
        self.sharded = sharded
        self.redact = redact  # replaced once the run's keys are known
        self.disk_trouble = on_disk_trouble  # called (and the run stops) when the disk refuses a write
        self.requests = 0  # attempts journaled (each then sent)
        self.images = 0  # images recorded by this run
        self.cost = 0.0  # estimated cost of the images answered
        self.have: dict[str, Have] = {}  # short items: images and cost so far (see load_short)
        self._writers: _Writers | None = None  # while `writers()` is open: commit's threads

    @contextmanager
    def writers(self, threads: int = WRITER_THREADS) -> Iterator[None]:
        """While open (a run's pipeline), `commit` runs in a few long-lived threads of its own rather
        than in anyio's shared pool; outside it (and off asyncio) it uses the pool, as before."""
        self._writers = _Writers(threads)
        try:
            yield
        finally:
            writers, self._writers = self._writers, None
            writers.close()

    async def _in_thread(self, work: Callable[[], T]) -> T:
        if self._writers is not None and _on_asyncio():
            return await self._writers.run(work)
        return await anyio.to_thread.run_sync(work)

    def load_short(self, item: Item) -> None:
        """A short answer earlier (fewer images than n, recorded and paid): keep its images, so the
        next request asks only for the missing ones and their numbering continues. Reads one line."""
        short = self.journal.short_record(item.id, item.rhash, item.images)
        if short is not None:
            self.have[item.id] = (short["images"], short.get("cost"))

    def wanted(self, item: Item) -> int:
        """Images to ask for: the item's n, less those a short answer already brought."""
        have = self.have.get(item.id)
        return item.images - len(have[0]) if have else item.images

    def attempt(self, item: Item, attempt: int, endpoint: str) -> None:
        """Journal an attempt before its request leaves (a request that times out after it was sent
        may still be billed). Raises OSError when the disk refused it: then send nothing."""
        self.journal.append(attempt_record(item.id, item.rhash, attempt, endpoint))
        self.requests += 1

    async def append(self, rec: Mapping[str, Any]) -> bool:
        """Append a record; False (and the run stops) when the disk refused it."""
        try:
            await anyio.to_thread.run_sync(self.journal.append, rec)
        except OSError as exc:
            self.disk_trouble(exc)
            return False
        return True

    async def save(self, client: _Endpoint, stem: str, gen: Generation, first: int = 0,
                   count: int | None = None) -> list[SavedImage]:
        """Save the answer's images as numbers first+1, first+2, ... of `count` (the item's n: named by
        the n asked for, which validation keeps unique, whatever number came; a short answer's images
        keep the names the whole set would have). Raises RequestError (a bad image) or OSError."""
        count = max(len(gen.images), count or 1)
        saved: list[SavedImage] = []
        for index, image in enumerate(gen.images, first):
            if image.data is not None:
                saved.append(await anyio.to_thread.run_sync(self.out.save_bytes, stem, index, count, image.data))
                image.data = None  # on disk now: not held while the journal record is written
            else:
                assert image.url is not None
                tmp = self.out.temp_path(stem)
                await client.download(image.url, tmp)  # at once: URLs expire
                saved.append(await anyio.to_thread.run_sync(self.out.adopt_file, tmp, stem, index, count))
            if self.sharded is not None:
                await anyio.to_thread.run_sync(self.sharded.publish, self.out.root, saved[-1].file)
        return saved

    async def answer(self, ep: EndpointRun, item: Item, attempts: int, gen: Generation, saved: list[SavedImage],
                     have: Have = ([], None), *, extra: Mapping[str, Any] | None = None) -> bool:
        """Record an answer whose images are saved; with fewer images than asked it is short: what
        came is kept (it was paid) and the item stays failed (transient), so a rerun asks only for
        the missing images. `have`: a short answer's images before this one. False: not recorded
        (the disk refused; the run stops, the item stays pending)."""
        rec, cost = self._answer_record(ep, item, attempts, gen, saved, have, extra)
        self._charge(ep, cost)
        if not await self.append(rec):
            return False
        self._answered(ep, item, rec, len(saved))
        return True

    async def commit(self, ep: EndpointRun, item: Item, attempts: int, read: Callable[[], Generation]) -> Committed:
        """Read an answer, save its images and record it in ONE worker-thread call: what `read`,
        `save` then `answer` do, without a thread hand-off each (they cost the event loop more than
        the work). The invariants hold: images renamed into place before their record is appended.

        `read` (e.g. `Answer.read`) may raise a RequestError: returned as `unread`, nothing saved.
        Answers with `url` images, and a shard's output (its images are published to the store),
        are only read here: `saved` is None and the caller goes on with `save` and `answer`.
        """
        have = self.have.get(item.id, ([], None))
        # with the run's writer threads the record is appended here, on the event loop, once the thread
        # is done (images renamed into place): the journal's lock is then never held by a thread that
        # waits for the GIL while the loop waits for the lock (its attempt records)
        on_loop = self._writers is not None and _on_asyncio()

        def work() -> Committed:  # a worker thread
            try:
                gen = read()
            except RequestError as exc:
                return Committed(unread=exc)
            if self.sharded is not None or any(image.data is None for image in gen.images):
                return Committed(gen)
            try:
                saved = self._save_inline(item, gen, len(have[0]))
            except (RequestError, OSError) as exc:
                return Committed(gen, refused=exc)
            rec, cost = self._answer_record(ep, item, attempts, gen, saved, have, None)
            if on_loop:
                return Committed(gen, saved, cost=cost, record=rec)
            try:
                self.journal.append(rec)
            except OSError as exc:
                return Committed(gen, saved, cost=cost, trouble=exc)
            return Committed(gen, saved, cost=cost, record=rec)

        done = await self._in_thread(work)
        if on_loop and done.record is not None:
            try:
                self.journal.append(done.record)  # no await between the thread's end and this: always done
            except OSError as exc:
                done.record, done.trouble = None, exc
        if done.saved is not None:
            self.have.pop(item.id, None)
            self._charge(ep, done.cost)  # paid whether or not the record made it to disk
            if done.record is not None:
                self._answered(ep, item, done.record, len(done.saved))
                done.complete = len(have[0]) + len(done.saved) >= item.images
            else:
                assert done.trouble is not None
                self.disk_trouble(done.trouble)
        return done

    async def answer_many(self, ep: EndpointRun, rows: list[Answer]) -> bool:
        """Save and record many answers whose images are all inline (b64) in ONE worker-thread call:
        what `save` then `answer` do for each, without two thread hand-offs per answer (a provider
        batch's collection is CPU-bound on them). Each row's images are renamed into place before
        its record is appended, as always. False: the disk refused one (the rows before it are
        recorded; the run stops). A local output only (batch mode refuses sharded ones): nothing is
        published to a store here."""
        assert self.sharded is None, "answer_many writes a local output only"
        done: list[tuple[Item, Any, int, float | None]] = []

        def commit() -> OSError | None:
            for item, attempts, gen, have, extra in rows:
                saved = self._save_inline(item, gen, len(have[0]))
                rec, cost = self._answer_record(ep, item, attempts, gen, saved, have, extra)
                try:
                    self.journal.append(rec)
                except OSError as exc:
                    done.append((item, None, len(saved), cost))
                    return exc
                done.append((item, rec, len(saved), cost))
            return None

        try:
            trouble = await anyio.to_thread.run_sync(commit)
        except OSError as exc:  # an image the disk refused: its row is not recorded
            trouble = exc
        for item, rec, images, cost in done:
            self._charge(ep, cost)
            if rec is not None:
                self._answered(ep, item, rec, images)
        if trouble is not None:
            self.disk_trouble(trouble)
            return False
        return True

    def _save_inline(self, item: Item, gen: Generation, first: int) -> list[SavedImage]:
        """Write an answer's inline (b64) images as numbers first+1, ... of the item's n, in the
        calling (worker) thread. Raises RequestError (a bad image) or OSError."""
        count = max(len(gen.images), item.images)
        saved = []
        for index, image in enumerate(gen.images, first):
            assert image.data is not None
            saved.append(self.out.save_bytes(_stem(item), index, count, image.data))
            image.data = None  # on disk now: not held while the journal record is written
        return saved

    def _answer_record(self, ep: EndpointRun, item: Item, attempts: int, gen: Generation, saved: list[SavedImage],
                       have: Have, extra: Mapping[str, Any] | None) -> tuple[ItemRecord, float | None]:
        """The done (or short) record of an answer whose images are saved, and what they cost."""
        model = ep.ep.model_sent(item.body.get("model", ""))
        images = have[0] + [
            {"file": s.file, "revised_prompt": g.revised_prompt, "sha256": s.sha256, "bytes": s.bytes,
             "width": s.width, "height": s.height, "endpoint": ep.name, "model": model}
            for s, g in zip(saved, gen.images, strict=True)
        ]
        short = len(images) < item.images
        cost = ep.prices.cost(item.body, len(saved))
        rec_cost = round(cost + (have[1] or 0.0), 6) if cost is not None else None
        if short:
            rec = short_record(item.id, item.rhash, item.body, wanted=item.images, created=gen.created, images=images,
                               attempts=attempts, request_id=gen.request_id, endpoint=ep.name, vars=item.vars,
                               cost=rec_cost, usage=gen.usage)
        else:
            rec = done_record(item.id, item.rhash, item.body, created=gen.created, images=images,
                              attempts=attempts, request_id=gen.request_id, endpoint=ep.name, vars=item.vars,
                              cost=rec_cost, usage=gen.usage)
        return (cast(ItemRecord, {**rec, **extra}) if extra else rec), cost

    def _charge(self, ep: EndpointRun, cost: float | None) -> None:
        if cost is not None:  # paid whether or not the record makes it to disk
            self.cost += cost
            ep.stats["cost"] += cost

    def _answered(self, ep: EndpointRun, item: Item, rec: ItemRecord, images: int) -> None:
        """The counters and the reporter, once an answer's record is in the journal."""
        error = rec["error"]
        self.images += images
        ep.stats["failed" if error is not None else "done"] += 1
        ep.stats["images"] += images
        if error is not None:
            self.reporter.images += images
            self.reporter.item_finished(False)
            self.reporter.log(f"{item.id}: short answer: {error['message']}", level="warning")
        else:
            self.reporter.item_finished(True, images)

    async def failure(self, ep: EndpointRun, item: Item, attempts: int, exc: RequestError, *,
                      extra: Mapping[str, Any] | None = None) -> bool:
        """Record the item as failed with `exc` (its message redacted); False: not recorded."""
        exc.message = self.redact(exc.message)
        rec = failed_record(item.id, item.rhash, item.body, attempts=attempts, error=exc.as_record(),
                            endpoint=ep.name, vars=item.vars)
        if not await self.append({**rec, **extra} if extra else rec):
            return False  # pending: the next run decides again
        ep.stats["failed"] += 1
        self.reporter.item_finished(False)
        if exc.kind == "permanent":
            self.reporter.log(f"{item.id}: failed: {exc.describe()}", level="warning")
        return True
