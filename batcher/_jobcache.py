"""The job-file prefix cache: a rerun of an unchanged job parses none of it; a grown one parses what is new.

The checkpoint (see _checkpoint) keeps, beside the journal's state, what the last run that wrote
the manifest knew of its job:

    meta "jobcache"   {"key": KEY, "file": {path, dev, ino, size, mtime_ns, sha256, lines, nl},
                       "count": N, "digest": D, "warnings": [[file, line, field, message], ...]}
    table current     (pos, id, rhash, derived): the job's items in order (also `batcher status`'s)
    table stems       (h): a 64-bit hash of every image file-name stem those items write

KEY digests everything the items depend on besides the prompts file's bytes: the loaded job (its
header, inline prompts, endpoints, dialects, defaults), the command line's field overrides, the
endpoints the run may use, and batcher's version. D, the items digest, digests KEY and the prompts
file's sha256: the items are a function of those, so an equal digest means equal items.

    >>> found = lookup(job, live, out / "manifest.jsonl")
    >>> found.hit, found.count, found.warnings          # hit: nothing (or only the new bytes) parsed

A run then:
- finds KEY equal and the prompts file's bytes equal (its sha256: a file rewritten in place with
  the same size and time is noticed): the job is valid, with N items and these warnings;
- finds KEY equal and the file grown, its first `size` bytes those hashed, ending at a line break:
  only the new bytes are parsed and validated. A new item's explicit id or file-name stem that an
  old item has (looked up in `current` / `stems`) is a doubt: the whole job is validated as ever,
  which reports the exact problem. A derived id continues the old items' numbering (`-2`, ...);
- anything else (the job edited, an override changed, the file shorter or rewritten, no
  checkpoint): validates the whole job as before; the run's manifest pass rewrites the cache.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._exceptions import Problem
from ._ids import FileNames, IdAssigner, image_stems

__all__ = ["FileState", "Found", "lookup", "job_key", "stem_key", "CurrentWriter", "CACHE_META", "OldItem",
           "old_items", "tail_items", "cache_entry", "KnownPrefix"]

FORMAT = 1  # of the cache entry; a change makes every cache a miss (rebuilt by the next run)
CACHE_META = "jobcache"
CHUNK = 1 << 20


@dataclass(frozen=True)
class FileState:
    """A prompts file as hashed: where it is, its stat signature, its bytes' sha256, its lines."""

    path: str
    dev: int
    ino: int
    size: int
    mtime_ns: int
    sha256: str
    lines: int  # line breaks in it
    nl: bool  # it ends with a line break (so appended bytes start a new line)

    @property
    def signature(self) -> tuple[int, int, int, int]:
        return self.dev, self.ino, self.size, self.mtime_ns


def hash_file(path: Path, at: int = 0) -> tuple[FileState, tuple[str, bool, int] | None] | None:
    """The file's state, and (sha256, ends with a break, line breaks) of its first `at` bytes when
    0 < at ≤ its size. None when it can't be read or changed while read."""
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            h = hashlib.sha256()
            pos = lines = 0
            last = b""
            prefix = None
            while True:
                want = CHUNK if not 0 < at or pos >= at else min(CHUNK, at - pos)
                chunk = fh.read(want)
                if not chunk:
                    break
                h.update(chunk)
                lines += chunk.count(b"\n")
                pos += len(chunk)
                last = chunk[-1:]
                if pos == at:
                    prefix = (h.hexdigest(), last == b"\n", lines)  # hashlib keeps going after a digest
            end = os.fstat(fh.fileno())
    except OSError:
        return None
    sig = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if sig != (end.st_dev, end.st_ino, end.st_size, end.st_mtime_ns) or pos != st.st_size:
        return None  # written to while hashed: a full validation decides (and notices the change)
    state = FileState(str(path.resolve()), *sig, h.hexdigest(), lines, last == b"\n")
    return state, prefix


def _plain(obj: Any) -> Any:
    """json.dumps's fallback for the job's fields: stable across processes (no set order, no ids)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {"__": type(obj).__name__, **{f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}}
    if isinstance(obj, (set, frozenset)):
        return sorted(repr(x) for x in obj)
    if isinstance(obj, Path):
        return str(obj)
    return repr(obj)


# the Job's fields that cannot change its items or their validation; every other field is in the key
# (so a field added later is covered unless listed here: the safe side is a cache miss)
_NOT_ITEMS = frozenset({"concurrency", "rate_limit", "output", "pricing", "_signature", "warnings", "shard",
                        "active"})


def job_key(job: Any, live: Iterable[str]) -> str | None:
    """A digest of everything a job's items and their validation depend on but the prompts file's bytes."""
    import batcher

    doc = {"format": FORMAT, "batcher": batcher.__version__, "live": sorted(live),
           "job": {f.name: getattr(job, f.name) for f in dataclasses.fields(job) if f.name not in _NOT_ITEMS}}
    try:
        text = json.dumps(doc, sort_keys=True, default=_plain, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):
        return None
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def items_digest(key: str, state: FileState | None) -> str:
    return hashlib.sha256(f"{key}\n{state.sha256 if state is not None else '-'}".encode()).hexdigest()


def stem_key(stem: str) -> int:
    """The 64-bit (signed, for sqlite) hash of a file-name stem kept in `stems`."""
    return int.from_bytes(hashlib.blake2b(stem.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                          "big", signed=True)


def is_derived(item: Any) -> bool:
    """Whether the item's id was derived from its request (`rhash`, `rhash-2`, ...), not given or a `-rK` copy."""
    if item.explicit_id:
        return False
    rest = item.id[len(item.rhash):]
    return item.id.startswith(item.rhash) and (rest == "" or (rest[:1] == "-" and rest[1:].isdigit()))


@dataclass
class Found:
    """What the cache knows of a job: `hit` (no full validation needed), the counts, warnings, and
    what the next cache entry is (`key`, `state`, `digest`) whether or not it hit."""

    key: str | None
    state: FileState | None
    digest: str | None
    hit: bool = False
    count: int = 0  # items in the whole job (on a hit)
    old_count: int = 0  # of them, those the cache already held (in `current`)
    old_digest: str | None = None  # the cached items' digest (what `current` holds)
    warnings: list[Problem] = field(default_factory=list)
    tail: tuple[int, int] | None = None  # the new bytes: (offset, line number of their first line)
    seeds: dict[str, int] = field(default_factory=dict)  # derived request hash -> old items with it


def _meta(db: sqlite3.Connection, key: str) -> str | None:
    row = db.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
    return row[0] if row else None


def lookup(job: Any, live: list[Any], journal: Path, *, allow: bool = True) -> Found:
    """What the output's checkpoint knows of this job (read-only; see the module's docstring).

    `live`: the endpoints the run may use. A miss still carries the key, file state and digest the
    run's manifest pass stores, so the next run can hit.
    """
    from ._checkpoint import open_readonly

    key = job_key(job, [e.name for e in live])
    prompts = getattr(job, "_prompts_file", None)
    if key is None:
        return Found(None, None, None)
    opened = open_readonly(journal) if allow and journal.is_file() else None
    entry: dict[str, Any] | None = None
    if opened is not None:
        db = opened[0]
        try:
            raw = _meta(db, CACHE_META)
            entry = json.loads(raw) if raw else None
            if not isinstance(entry, dict) or entry.get("key") != key or \
                    _meta(db, "current") != entry.get("digest"):
                entry = None
        except (sqlite3.Error, ValueError):
            entry = None
    try:
        cached_file = entry.get("file") if entry is not None else None
        at = int(cached_file["size"]) if isinstance(cached_file, dict) else 0
        hashed = hash_file(prompts, at) if prompts is not None else None
        if prompts is not None and hashed is None:
            return Found(None, None, None)  # unreadable or changing: the full validation says what
        state, prefix = hashed if hashed is not None else (None, None)
        if state is not None and getattr(job, "_signature", None) not in (None, state.signature):
            return Found(None, None, None)  # changed since the job was loaded: its own checks report it
        found = Found(key, state, items_digest(key, state))
        if entry is None or opened is None:
            return found
        found.old_count = int(entry["count"])
        found.old_digest = str(entry["digest"])
        found.warnings = [Problem(str(f), int(ln), str(fl), str(m)) for f, ln, fl, m in entry.get("warnings", [])]
        if state is None or prompts is None:
            found.hit, found.count = True, found.old_count  # no prompts file: the key says it all
            return found
        if not isinstance(cached_file, dict) or prefix is None or prefix[0] != cached_file["sha256"]:
            return found  # rewritten or shorter: validate it all
        if state.size == at:
            found.hit, found.count = True, found.old_count  # unchanged
            return found
        if not prefix[1]:
            return found  # the appended bytes continue the old last line: validate it all
        found.tail = (at, prefix[2] + 1)
        checked = _check_tail(job, live, prompts, found, opened[0])
        if checked is None:
            found.tail = None
            found.warnings = []
            return found
        found.count = found.old_count + checked
        found.hit = True
        return found
    except (sqlite3.Error, KeyError, TypeError, ValueError):
        return Found(None, None, None)  # an entry not as written: validate it all, store nothing
    finally:
        if opened is not None:
            opened[0].close()


class _PrefixIds(IdAssigner):
    """Ids for the new items, continuing the old ones': an explicit id an old item has is refused (a
    doubt: the full validation then says which), a derived one is numbered after the old copies."""

    def __init__(self, db: sqlite3.Connection | None, seeds: dict[str, int]) -> None:
        super().__init__()
        self.db = db
        self.seeds = seeds  # filled from db when given; used as is when not (a later pass)
        self._seen: set[str] = set()
        for rhash, count in seeds.items():
            self.seed(rhash, count)

    def assign(self, explicit: str | None, rhash: str) -> str | None:
        if explicit is not None:
            if self.db is not None and self.db.execute("SELECT 1 FROM current WHERE id = ?", (explicit,)).fetchone():
                return None
            return super().assign(explicit, rhash)
        if self.db is not None and rhash not in self._seen:
            self._seen.add(rhash)
            count = self._old_copies(rhash)
            if count:
                self.seeds[rhash] = count
                self.seed(rhash, count)
        return super().assign(None, rhash)

    def _old_copies(self, rhash: str) -> int:
        """How many old items have a derived id of this request (`rhash`, `rhash-2`, ..., contiguous)."""
        assert self.db is not None
        count = 0
        while True:
            item_id = rhash if count == 0 else f"{rhash}-{count + 1}"
            row = self.db.execute("SELECT derived FROM current WHERE id = ?", (item_id,)).fetchone()
            if row is None or not row[0]:
                return count
            count += 1


def tail_items(job: Any, prompts: Path, found: Found, db: sqlite3.Connection | None = None
               ) -> Iterator[Any]:
    """The items (and problems) of the prompts file's new bytes, numbered after the old items.

    With `db`, ids and stems are checked against the old items (a clash is a Problem); without,
    the ids use `found.seeds` (taken by the checking pass). JobChangedError if the file is no longer
    the one hashed.
    """
    from ._job import BUILTIN_DEFAULTS, JobChangedError, _make_item

    assert found.tail is not None and found.state is not None
    offset, lineno = found.tail
    base = {**BUILTIN_DEFAULTS, **job.defaults}
    ids = _PrefixIds(db, found.seeds if db is None else {})
    if db is not None:
        found.seeds = ids.seeds
    fname = str(prompts)
    signature = found.state.signature
    with open(prompts, "rb") as fh:
        def check() -> None:
            st = os.fstat(fh.fileno())
            if (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != signature:
                raise JobChangedError(prompts)

        check()
        fh.seek(offset)
        for n, raw in enumerate(fh, lineno):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (ValueError, RecursionError):
                yield Problem(fname, n, "line", "unreadable")  # the full validation words it
                continue
            yield from _make_item(obj, fname, n, "", {}, base, job.overrides, ids)
        check()


def _check_tail(job: Any, live: list[Any], prompts: Path, found: Found, db: sqlite3.Connection) -> int | None:
    """Validate the new items as the full validation would, given the old ones; their count, or None
    at the first problem or doubt (the caller then validates the whole job)."""
    from ._job import is_openai_host

    names = FileNames()
    warned: dict[tuple[str, str], Problem] = {}
    count = 0
    for entry in tail_items(job, prompts, found, db):
        if isinstance(entry, Problem):
            return None
        if not any(job.can_send(e, entry.body) for e in live):
            return None
        stems = image_stems(entry.id, entry.images)
        if names.claim(stems) is not None:
            return None
        for stem in stems:
            if db.execute("SELECT 1 FROM stems WHERE h = ?", (stem_key(stem),)).fetchone():
                return None
        for _problem in job._dialect_advice(entry, live, warned):
            return None  # an error (OpenAI's own host)
        count += 1
    if count == 0:
        return 0
    by_name = {e.name: e for e in live}
    known = {(p.field, p.message) for p in found.warnings}
    found.warnings += [p for (name, _), p in warned.items()
                       if not is_openai_host(by_name[name].base_url) and (p.field, p.message) not in known]
    return count


class OldItem:
    """An old item as the manifest writers see it when every old item is finished: its record is in the
    journal, so only its id and request hash are needed (`body` is never read; if it were, a JobError
    says so rather than write a wrong record)."""

    __slots__ = ("id", "rhash")
    vars = None

    def __init__(self, item_id: str, rhash: str) -> None:
        self.id, self.rhash = item_id, rhash

    @property
    def body(self) -> dict[str, Any]:
        from ._exceptions import JobError

        raise JobError(f"item {self.id!r}: its request is not in the checkpoint; rerun to rebuild the manifest")


def old_items(cp: Any, count: int, after: int = 0) -> Iterator[OldItem]:
    """Items `after`+1 .. `count` of `current`, in job order, read in chunks (bounded memory)."""
    with cp.lock:
        cursor = cp.db.execute("SELECT id, rhash FROM current WHERE pos > ? AND pos <= ? ORDER BY pos",
                               (after, count))
    while True:
        with cp.lock:
            chunk = cursor.fetchmany(10_000)
        if not chunk:
            return
        for item_id, rhash in chunk:
            yield OldItem(item_id, rhash)


class KnownPrefix:
    """A job's items as the manifest writer reads them when its first `count` (the old ones, finished)
    are in the checkpoint: called, every item; `items_from(k)`, those after the k-th; `positions(ids)`,
    where those of `ids` that are old items stand (1-based)."""

    def __init__(self, cp: Any, count: int, new: Callable[[], Iterator[Any]]) -> None:
        self.cp, self.count, self.new = cp, count, new

    def __call__(self) -> Iterator[Any]:
        return self.items_from(0)

    def items_from(self, start: int) -> Iterator[Any]:
        return itertools.chain(old_items(self.cp, self.count, start), self.new())

    def positions(self, ids: Iterable[str]) -> Iterator[int]:
        wanted = list(ids)
        for i in range(0, len(wanted), 500):
            chunk = wanted[i : i + 500]
            with self.cp.lock:
                rows = self.cp.db.execute(f"SELECT pos FROM current WHERE pos <= ? AND id IN "
                                          f"({', '.join('?' * len(chunk))})", (self.count, *chunk)).fetchall()
            yield from (pos for (pos,) in rows)


# -- writing the cache: `current`, `stems` and the entry, in one transaction ---------------------

_TABLES = """
DROP TABLE IF EXISTS current;
DROP TABLE IF EXISTS stems;
CREATE TABLE current (pos INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE, rhash TEXT,
                      derived INTEGER NOT NULL DEFAULT 0);
CREATE TABLE stems (h INTEGER PRIMARY KEY);
"""
BATCH = 5000


class CurrentWriter:
    """Writes the job's items into `current` and `stems` as a pass over them streams past.

    `wrap(items)` gives the manifest writer an items callable whose first complete pass is recorded
    (so `stamp_current` needs no pass of its own); `commit(...)` then makes it the cache, with
    `meta current` = the digest, in the same transaction. `start` > 0: the table keeps its first
    `start` rows (the old items) and the pass yields only the new ones.
    """

    def __init__(self, db: sqlite3.Connection, start: int = 0) -> None:
        self.db = db
        self.start = start
        self.pos = start
        self.done = False
        self._began = False
        self._batch: list[tuple[int, str, str | None, int]] = []
        self._stems: list[tuple[int]] = []
        self._tally: Any = None  # status's counts (see _tally), moved along when only new items are added

    def begin(self) -> None:
        from ._tally import TallyError, current_rows, load_matching, move_current

        self.db.execute("BEGIN IMMEDIATE")
        self._began = True
        if self.start == 0:
            for statement in _TABLES.split(";"):  # not executescript: it would commit first
                if statement.strip():
                    self.db.execute(statement)
        else:
            self._tally = load_matching(self.db)
            if self._tally is not None:
                try:
                    move_current(self._tally, current_rows(self.db, self.start), -1)
                except TallyError:
                    self._tally = None
            self.db.execute("DELETE FROM current WHERE pos > ?", (self.start,))

    def add(self, item: Any) -> None:
        self.pos += 1
        self._batch.append((self.pos, item.id, item.rhash, 1 if is_derived(item) else 0))
        self._stems.extend((stem_key(s),) for s in image_stems(item.id, item.images))
        if len(self._batch) >= BATCH:
            self._flush()

    def _flush(self) -> None:
        self.db.executemany("INSERT INTO current (pos, id, rhash, derived) VALUES (?, ?, ?, ?)", self._batch)
        self.db.executemany("INSERT OR IGNORE INTO stems (h) VALUES (?)", self._stems)
        self._batch.clear()
        self._stems.clear()

    def record(self, items: Iterable[Any]) -> Iterator[Any]:
        """Yield `items`, recording each; `done` once they are exhausted (a pass cut short records nothing)."""
        if not self._began:
            self.begin()
        for item in items:
            self.add(item)
            yield item
        self._flush()
        self.done = True

    def wrap(self, items: Callable[[], Iterable[Any]]) -> Callable[[], Iterator[Any]]:
        first = [True]

        def once() -> Iterator[Any]:
            if first[0]:
                first[0] = False
                return self.record(items())
            return iter(items())
        return once

    def commit(self, digest: str, entry: dict[str, Any] | None) -> bool:
        """Make the recorded pass the current items (and `entry` the cache); False if it wasn't complete."""
        if not self._began:
            return False
        if not self.done:
            self.rollback()
            return False
        meta = [("current", digest), ("current_total", str(self.pos))]
        if entry is not None:
            meta.append((CACHE_META, json.dumps(entry, ensure_ascii=False)))
        else:
            self.db.execute("DELETE FROM meta WHERE k = ?", (CACHE_META,))
        self.db.executemany("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", meta)
        self._store_tally()
        self.db.execute("COMMIT")
        self._began = False
        return True

    def _store_tally(self) -> None:
        """The new items' rows counted in (a rewrite, or a tally that did not match: counted in full)."""
        from ._tally import TallyError, count, current_rows, move_current, store

        tally, self._tally = self._tally, None
        if self.start == 0:
            store(self.db, count(self.db), counted=True)
            return
        if tally is not None:
            try:
                move_current(tally, current_rows(self.db, self.start), +1)
            except TallyError:
                tally = None
        store(self.db, tally)

    def rollback(self) -> None:
        if self._began:
            self.db.execute("ROLLBACK")
            self._began = False


def cache_entry(found: Found, count: int, warnings: list[Problem]) -> dict[str, Any] | None:
    """The cache entry for a job validated with `count` items and these warnings (None: not cacheable)."""
    if found.key is None or found.digest is None:
        return None
    file = dataclasses.asdict(found.state) if found.state is not None else None
    return {"key": found.key, "file": file, "count": count, "digest": found.digest,
            "warnings": [[p.file, p.line, p.field, p.message] for p in warnings]}
