"""Resume from a checkpoint: the journal's replayed state, kept in `OUT/.checkpoint.sqlite`.

A rerun of a large output used to replay the whole journal; with a checkpoint it reads only the
journal's tail since the offset the checkpoint covers, and looks items up in the checkpoint on
demand instead of holding them all in memory.

    >>> cp = Checkpoint.open(out / "manifest.jsonl")     # None: no usable checkpoint (replay it all)
    >>> cp.offset, cp.get("item-1")
    >>> refresh(out / "manifest.jsonl")                   # bring it up to the journal's end

The journal stays the source of truth. The checkpoint records the offset it covers and digests of
the covered prefix's first and last 4 KiB; a checkpoint whose journal is shorter, or whose digests
differ (the journal was replaced or rewritten), or that sqlite can't read is deleted and rebuilt
from the journal. Every refresh is one sqlite transaction (the rows and the offset together), so a
kill during it leaves the previous checkpoint whole; its cost is the tail's, not the journal's.

Why sqlite3: it is in the standard library, updates in place transactionally (a snapshot file of
our own would be rewritten whole, O(items), on every refresh, or need its own log), answers one
id in microseconds from its B-tree without loading the table (constant memory at 10^7 items), and
aggregates run in C.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any

from ._records import RUN_KINDS, Entry, details, replay

__all__ = ["Checkpoint", "SnapshotEntries", "refresh", "checkpoint_path", "SCHEMA_VERSION", "stamp_current", "open_writer",
           "open_readonly"]

SCHEMA_VERSION = "2"
PROBE = 4096  # bytes of the covered prefix digested at each end
BATCH = 5000  # rows per executemany while applying a tail
FLUSH = 50_000  # tail rows held in memory before they are written (inside the same transaction)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY, status TEXT NOT NULL, rhash TEXT NOT NULL, attempts INTEGER NOT NULL,
    offset INTEGER NOT NULL, error_kind TEXT, code TEXT, message TEXT, endpoint TEXT, cost REAL,
    images INTEGER NOT NULL DEFAULT 0, bytes INTEGER NOT NULL DEFAULT 0, verified INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
-- the few rows a run must still check on disk, found without scanning the table
CREATE INDEX IF NOT EXISTS unverified ON items (status) WHERE verified = 0;
CREATE TABLE IF NOT EXISTS runs (n INTEGER PRIMARY KEY, rec TEXT NOT NULL);
"""
_COLUMNS = ("status", "rhash", "attempts", "offset", "error_kind", "code", "message", "endpoint", "cost",
            "images", "bytes", "verified")
_SELECT_ONE = f"SELECT {', '.join(_COLUMNS)} FROM items WHERE id = ?"
_UPSERT = (f"INSERT OR REPLACE INTO items (id, {', '.join(_COLUMNS)}) "
           f"VALUES ({', '.join('?' * (len(_COLUMNS) + 1))})")


def checkpoint_path(journal: Path) -> Path:
    return journal.with_name(".checkpoint.sqlite")


def _probes(fh: Any, offset: int) -> tuple[str, str]:
    """Digests of the first and last PROBE bytes of the journal's first `offset` bytes."""
    fh.seek(0)
    head = hashlib.sha256(fh.read(min(PROBE, offset))).hexdigest()
    start = max(0, offset - PROBE)
    fh.seek(start)
    tail = hashlib.sha256(fh.read(offset - start)).hexdigest()
    return head, tail


def _covered_offset(db: sqlite3.Connection, journal: Path) -> int:
    """The journal offset a checkpoint covers, if it still matches the journal (schema version,
    size, and the digests of the covered part's head and tail); else ValueError("stale")."""
    meta = dict(db.execute("SELECT k, v FROM meta").fetchall())
    offset = int(meta["offset"])
    with open(journal, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if meta.get("version") != SCHEMA_VERSION or offset > size or \
                _probes(fh, offset) != (meta["head"], meta["tail"]):
            raise ValueError("stale")
    return offset


class Checkpoint:
    """An open, verified checkpoint of one journal."""

    def __init__(self, db: sqlite3.Connection, journal: Path, offset: int) -> None:
        self.db = db
        self.journal = journal
        self.offset = offset
        self.lock = threading.Lock()  # one connection, used from the loop and worker threads

    @classmethod
    def open(cls, journal: Path) -> Checkpoint | None:
        """The journal's checkpoint if it exists and still matches the journal; else None (deleted)."""
        path = checkpoint_path(journal)
        if not path.is_file():
            return None
        try:
            db = _connect(path)
        except sqlite3.Error:
            _discard(path)
            return None
        try:
            offset = _covered_offset(db, journal)
        except (sqlite3.Error, KeyError, ValueError, OSError):
            db.close()
            _discard(path)
            return None
        return cls(db, journal, offset)

    def close(self) -> None:
        self.db.close()

    def get(self, item_id: str) -> tuple[Any, ...] | None:
        with self.lock:
            return self.db.execute(_SELECT_ONE, (item_id,)).fetchone()

    def runs(self) -> list[dict[str, Any]]:
        with self.lock:
            return [json.loads(r) for (r,) in self.db.execute("SELECT rec FROM runs ORDER BY n")]

    def meta(self, key: str) -> str | None:
        with self.lock:
            row = self.db.execute("SELECT v FROM meta WHERE k = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: str) -> None:
        with self.lock:
            self.db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (key, value))

    def count(self, limit: int | None = None) -> int:
        """Rows in the checkpoint (at most `limit` of them counted, when given)."""
        query = "SELECT COUNT(*) FROM items" if limit is None else "SELECT COUNT(*) FROM (SELECT 1 FROM items LIMIT ?)"
        with self.lock:
            return int(self.db.execute(query, () if limit is None else (limit,)).fetchone()[0])

    def rows_ids(self) -> list[tuple[str]]:
        with self.lock:
            return self.db.execute("SELECT id FROM items").fetchall()

    def rows(self, where: str = "1", args: Iterable[Any] = ()) -> Iterator[tuple[Any, ...]]:
        """Rows (id first) matching `where`, streamed in chunks."""
        with self.lock:
            cursor = self.db.execute(f"SELECT id, {', '.join(_COLUMNS)} FROM items WHERE {where}", tuple(args))
        while True:
            with self.lock:
                chunk = cursor.fetchmany(10_000)
            if not chunk:
                return
            yield from chunk


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    # sorts (status's GROUP BY) in memory, not temp files; a page cache that holds a run's working set
    db.execute("PRAGMA temp_store = MEMORY")
    db.execute("PRAGMA cache_size = -16384")  # KiB
    return db


def _discard(path: Path) -> None:
    for p in (path, path.with_name(path.name + "-journal"), path.with_name(path.name + "-wal")):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _entry(row: Sequence[Any]) -> Entry:
    return Entry(row[0], row[1], row[2], row[3], row[4])


class SnapshotEntries(MutableMapping[str, Entry]):
    """`Journal.entries` backed by a checkpoint: the tail's entries in memory, the rest looked up.

    Reading an id the tail never touched costs one indexed sqlite lookup; nothing is cached, so
    memory stays proportional to the tail and this run's items.
    """

    def __init__(self, checkpoint: Checkpoint) -> None:
        self.checkpoint = checkpoint
        self.tail: dict[str, Entry] = {}

    def __getitem__(self, item_id: str) -> Entry:
        entry = self.tail.get(item_id)
        if entry is not None:
            return entry
        row = self.checkpoint.get(item_id)
        if row is None:
            raise KeyError(item_id)
        return _entry(row)

    def __setitem__(self, item_id: str, entry: Entry) -> None:
        self.tail[item_id] = entry

    def __delitem__(self, item_id: str) -> None:
        raise TypeError("journal entries are never deleted")

    def __iter__(self) -> Iterator[str]:
        seen = set(self.tail)
        yield from self.tail
        for (item_id,) in self.checkpoint.rows_ids():
            if item_id not in seen:
                yield item_id

    def __len__(self) -> int:
        """Counted by sqlite (listing a million ids to count them took ~130 MB and half a second)."""
        extra = sum(1 for item_id in self.tail if self.checkpoint.get(item_id) is None)
        return self.checkpoint.count() + extra

    def fewer_than(self, n: int) -> bool:
        """`len(self) < n`, reading at most n of the checkpoint's rows (not all of them)."""
        extra = sum(1 for item_id in self.tail if self.checkpoint.get(item_id) is None)
        return self.checkpoint.count(limit=n) + extra < n

    def unverified(self) -> Iterator[tuple[str, Entry]]:
        """Done entries whose image files no checkpoint refresh has seen on disk yet."""
        yield from ((k, e) for k, e in self.tail.items() if e.status == "done")
        for row in self.checkpoint.rows("verified = 0 AND status = 'done'"):
            if row[0] not in self.tail:
                yield row[0], _entry(row[1:])


_decode = json.JSONDecoder().decode
_NO_DETAILS = (None, None, None, None, 0, 0, 0)  # code .. verified of an item with no item line yet


class _Tail:
    """The rows a refresh changes, before they are flushed; `current` finds an item's entry for `replay`."""

    def __init__(self, lookup: Any) -> None:
        self.rows: dict[str, list[Any]] = {}
        self.lookup = lookup  # the checkpoint's row of an id (it sees the rows flushed in this transaction)
        self.prev: Entry | None = None  # the entry `current` last gave, and its row
        self.prev_row: list[Any] | None = None

    def current(self, item_id: str) -> Entry | None:
        row = self.rows.get(item_id)
        if row is None:
            found = self.lookup(item_id)
            row = list(found) if found is not None else None
        self.prev_row = row
        self.prev = _entry(row) if row is not None else None
        return self.prev


def _apply(tail: _Tail, rec: dict[str, Any], offset: int) -> None:
    """Apply one journal record to the tail's rows: `_records.replay`'s entry, plus the row's details.

    The details (failure code and message, endpoint, cost, images, bytes, verified) come from an item
    record; an attempt that continues an entry keeps its row's, a fresh one has none.
    """
    entry = replay(rec, offset, tail.current)  # for an attempt, tail.prev is what it continued, if anything
    if entry is None:
        return
    head = [entry.status, entry.rhash, entry.attempts, entry.offset, entry.error_kind]
    if rec["t"] == "item":
        d = details(rec)  # the failure code is the same grouping `batcher status` uses
        head += (d.code, d.message, d.endpoint, d.cost, len(d.images), d.image_bytes, 0)
    elif entry is tail.prev and tail.prev_row is not None:
        head += tail.prev_row[5:]
    else:
        head += _NO_DETAILS
    tail.rows[rec["id"]] = head


def refresh(journal: Path, *, checked: tuple[int, set[str]] | None = None) -> int | None:
    """Bring the journal's checkpoint up to the journal's last complete line; return the offset covered.

    `checked=(end, missing)`: the caller checked the files of every done entry the checkpoint had not
    verified, as the journal stood up to byte `end`, and found those of `missing` gone; the others
    are marked verified (items finished after `end` are checked next time). Returns None when the
    checkpoint can't be written (the journal is untouched either way).
    """
    path = checkpoint_path(journal)
    cp = Checkpoint.open(journal)
    if cp is None:
        try:
            db = _connect(path)
            db.executescript(_SCHEMA)
        except sqlite3.Error:
            _discard(path)
            return None
        cp = Checkpoint(db, journal, 0)
    try:
        return _refresh(cp, checked)
    except (sqlite3.Error, OSError):
        return None
    finally:
        cp.close()


def _refresh(cp: Checkpoint, checked: tuple[int, set[str]] | None) -> int | None:
    """Apply the journal past the checkpoint in one transaction, flushing rows as it goes (bounded memory)."""
    from . import _tally

    db = cp.db
    changed = _Tail(cp.get)
    rows = changed.rows
    runs: list[str] = []
    db.execute("BEGIN IMMEDIATE")
    try:
        tally = _MovingTally(db, _tally.load_matching(db))  # status's counts, moved along with the rows
        with open(cp.journal, "rb") as fh:
            fh.seek(cp.offset)
            end = cp.offset
            for raw in fh:
                if not raw.endswith(b"\n"):
                    break  # a torn last line: covered once it is whole (or cut off by the next run)
                try:
                    rec = _decode(raw.decode())  # json.loads without its per-call encoding sniffing
                except ValueError:  # UnicodeDecodeError included
                    break
                if not isinstance(rec, dict):
                    break
                if rec.get("t") in RUN_KINDS:
                    runs.append(raw.decode().strip())
                else:
                    _apply(changed, rec, end)  # sees the rows flushed earlier in this transaction
                    if len(rows) >= FLUSH:
                        _flush(db, rows, tally)
                end += len(raw)
            head, tail = _probes(fh, end)
        _flush(db, rows, tally)
        if checked is not None:
            end_checked, missing = checked
            tally.verified(end_checked)
            db.execute("UPDATE items SET verified = 1 WHERE verified = 0 AND status = 'done' AND offset < ?",
                       (end_checked,))
            tally.unverified(missing)
            db.executemany("UPDATE items SET verified = 0 WHERE id = ?", ((i,) for i in missing))
        base = db.execute("SELECT COALESCE(MAX(n), 0) FROM runs").fetchone()[0]
        db.executemany("INSERT INTO runs (n, rec) VALUES (?, ?)", ((base + 1 + i, r) for i, r in enumerate(runs)))
        db.executemany("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", [
            ("version", SCHEMA_VERSION), ("offset", str(end)), ("head", head), ("tail", tail)])
        tally.store()
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    cp.offset = end
    return end


class _MovingTally:
    """A refresh's side of `_tally`: the stored tally moved along with each flush (None once it can't be;
    `_tally.store` then counts in full, as when there was none to move)."""

    def __init__(self, db: sqlite3.Connection, tally: Any) -> None:
        self.db = db
        self.tally = tally

    def rows(self, batch: list[tuple[Any, ...]]) -> None:
        from ._tally import TallyError, apply_rows

        if self.tally is None:
            return
        try:
            apply_rows(self.db, self.tally, batch)
        except TallyError:
            self.tally = None

    def verified(self, end: int) -> None:
        """Before `verified` is set on the unverified done rows before `end` (in bulk: all of them, once)."""
        if self.tally is None:
            return
        images, nbytes = self.db.execute(
            "SELECT COALESCE(SUM(s.images), 0), COALESCE(SUM(s.bytes), 0) FROM items s JOIN current c "
            "ON c.id = s.id WHERE s.verified = 0 AND s.status = 'done' AND s.offset < ? "
            "AND (c.rhash IS NULL OR c.rhash = s.rhash)", (end,)).fetchone()
        self.tally.images += images
        self.tally.nbytes += nbytes

    def unverified(self, missing: Iterable[str]) -> None:
        """Before `verified` is cleared on the rows of `missing` (after `verified`'s update)."""
        if self.tally is None:
            return
        self.rows([(i, *row[:-1], 0) for i in sorted(missing)
                   for row in [self.db.execute(_SELECT_ONE, (i,)).fetchone()] if row is not None])

    def store(self) -> None:
        from ._tally import store

        store(self.db, self.tally)


def _flush(db: sqlite3.Connection, rows: dict[str, list[Any]], tally: _MovingTally | None = None) -> None:
    batch = [(k, *v) for k, v in rows.items()]
    if tally is not None:
        tally.rows(batch)
    for i in range(0, len(batch), BATCH):
        db.executemany(_UPSERT, batch[i : i + BATCH])
    rows.clear()


def manifest_current(journal: Path, manifest: Path, items_digest: str) -> dict[str, int] | None:
    """The summary of `manifest` if it was written from these items and this journal, unchanged since."""
    cp = Checkpoint.open(journal)
    if cp is None:
        return None
    try:
        raw = cp.meta("manifest")
        stamp = json.loads(raw) if raw else None
        if not isinstance(stamp, dict):
            return None
        st = manifest.stat()
        if [stamp.get("items"), stamp.get("journal"), stamp.get("size"), stamp.get("mtime_ns")] != \
                [items_digest, journal.stat().st_size, st.st_size, st.st_mtime_ns]:
            return None
        summary = stamp.get("summary")
        return dict(summary) if isinstance(summary, dict) else None
    except (sqlite3.Error, OSError, ValueError):
        return None
    finally:
        cp.close()


def stamp_manifest(journal: Path, manifest: Path, items_digest: str, summary: dict[str, int]) -> None:
    """Record what `manifest` was written from, so an unchanged rerun can skip rewriting it."""
    cp = Checkpoint.open(journal)
    if cp is None:
        return
    try:
        st = manifest.stat()
        if cp.offset != journal.stat().st_size:
            return  # the journal grew past the checkpoint: its manifest.json is not this one's
        cp.set_meta("manifest", json.dumps({"items": items_digest, "journal": cp.offset, "size": st.st_size,
                                            "mtime_ns": st.st_mtime_ns, "summary": summary}))
    except (sqlite3.Error, OSError):
        return
    finally:
        cp.close()



# -- the current items (what `batcher status` counts, and the job cache's: see _jobcache) -------------


def open_writer(journal: Path) -> sqlite3.Connection | None:
    """A connection to the journal's checkpoint (built first if there is none), or None if it can't be had."""
    cp = Checkpoint.open(journal)
    if cp is None and refresh(journal) is not None:
        cp = Checkpoint.open(journal)
    return cp.db if cp is not None else None


def stamp_current(journal: Path, items_digest: str, items: Callable[[], Iterable[Any]],
                  cache: dict[str, Any] | None = None) -> None:
    """Record the job's items (id, request hash, order) that manifest.json was written from, and
    `cache` as the job cache's entry, unless they are recorded already.

    `batcher status` counts these items only (a changed --size leaves old derived ids in the
    journal: history, not items). The run's manifest pass records them (see `_jobcache.CurrentWriter`);
    this reads the job again only when that did not happen (a manifest kept from an earlier run
    whose record was lost). One transaction with the digest: a kill leaves the previous ones.
    """
    from ._jobcache import CurrentWriter

    cp = Checkpoint.open(journal)
    if cp is None:
        return
    writer = CurrentWriter(cp.db)
    try:
        if cp.meta("current") == items_digest:
            return
        for _item in writer.record(items()):
            pass
        writer.commit(items_digest, cache)
    except Exception:  # best effort (sqlite, the disk, a job file changed since): status replays instead
        try:
            writer.rollback()
        except sqlite3.Error:
            pass
        return
    finally:
        cp.close()


def open_readonly(journal: Path) -> tuple[sqlite3.Connection, int] | None:
    """The journal's checkpoint opened read-only inside one read transaction, and the offset it covers.

    None when there is none, or it doesn't match the journal (nothing is deleted or written: a
    read-only caller such as `batcher status` falls back to replaying the journal).
    """
    path = checkpoint_path(journal)
    if not path.is_file():
        return None
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None,
                             check_same_thread=False)
    except sqlite3.Error:
        return None
    try:
        db.execute("PRAGMA temp_store = MEMORY")
        db.execute("PRAGMA cache_size = -16384")
        db.execute("BEGIN")  # one snapshot for every query (a run may refresh it meanwhile)
        offset = _covered_offset(db, journal)
    except (sqlite3.Error, KeyError, ValueError, OSError):
        db.close()
        return None
    return db, offset
