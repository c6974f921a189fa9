"""The manifest: an append-only journal (`manifest.jsonl`) and the `manifest.json` built from it.

Journal records, one JSON object per line:
    {"t": "run", "job": NAME, "job_file": PATH, "at": ISO, "pid": N}       a run started
    {"t": "attempt", "id": ID, "rhash": H, "attempt": K, "at": ISO}         written BEFORE sending
    {"t": "item", "id": ID, "rhash": H, "status": "done"|"failed", ...}     an item finished
    {"t": "end", "at": ISO, "summary": {...}}                              a run ended

Durability: every line is written with one write(2) on an O_APPEND descriptor as soon as it
happens, so a killed process loses nothing it journaled; fsync runs at most once a second and
at the end of a run, so a power cut can lose the last second (those items simply run again).
An item's images are renamed into place before its `item` line is written.

Resuming reads the journal once, keeping per id only its latest status, request hash and
byte offset: memory and time grow linearly with the journal.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ._exceptions import ManifestError

__all__ = ["Journal", "Entry", "RecordLines", "needs_run", "write_manifest", "iter_manifest", "utc_now", "MANIFEST_VERSION"]

MANIFEST_VERSION = 1


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(slots=True)
class Entry:
    """What the journal says of one item."""

    status: str  # done | failed | pending (attempted, never finished)
    rhash: str
    attempts: int
    offset: int  # byte offset of the latest `item` line, or -1
    error_kind: str | None = None


class RecordLines:
    """The records of journal lines, with the byte span of each: `for start, end, rec in ...`.

    With `torn_ok`, an incomplete or unreadable *last* line (a kill mid-write) ends the records and
    its number is kept in `torn_line`; an unreadable line anywhere else is a ManifestError naming
    `where:LINE`.
    """

    def __init__(self, lines: Iterable[bytes], where: str, *, torn_ok: bool = True, advice: str = "") -> None:
        self.lines = lines
        self.where = where
        self.torn_ok = torn_ok
        self.advice = advice
        self.torn_line: int | None = None

    def __iter__(self) -> Iterator[tuple[int, int, dict[str, Any]]]:
        lines = iter(self.lines)
        offset = 0
        for lineno, raw in enumerate(lines, 1):
            start, offset = offset, offset + len(raw)
            complete = raw.endswith(b"\n")
            try:
                rec = json.loads(raw)
                if not isinstance(rec, dict) or "t" not in rec:
                    raise ValueError("not a journal record")
            except ValueError:
                if self.torn_ok and (not complete or next(lines, None) is None):
                    self.torn_line = lineno
                    return
                raise ManifestError(f"{self.where}:{lineno}: corrupt journal line{self.advice}") from None
            if not complete and self.torn_ok:
                self.torn_line = lineno
                return
            yield start, offset, rec


def needs_run(entry: Entry | None, rhash: str, retry_failed: bool = False) -> bool:
    """Whether an item must be sent again, given what the journal says of it."""
    if entry is None or entry.rhash != rhash:
        return True  # new, or its request changed under the same id
    if entry.status == "done":
        return False
    if entry.status == "failed" and entry.error_kind == "permanent":
        return retry_failed
    return True


class Journal:
    """The append-only journal of one output folder.

    >>> journal = Journal.open(out / "manifest.jsonl")
    >>> journal.entries.get(item_id)
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.entries: dict[str, Entry] = {}
        self.runs: list[dict[str, Any]] = []
        self.torn_line: int | None = None
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._dirty = False
        self.mirror: Callable[[dict[str, Any]], None] | None = None  # e.g. a shard's segment writer

    @classmethod
    def open(cls, path: Path) -> Journal:
        journal = cls(path)
        journal._load()
        journal._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        return journal

    @classmethod
    def read(cls, path: Path) -> Journal:
        """Load without opening for writing (status, reports)."""
        journal = cls(path)
        journal._load(repair=False)
        return journal

    def _load(self, repair: bool = True) -> None:
        try:
            fh = open(self.path, "rb")
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ManifestError(f"{self.path}: can't read the journal: {exc.strerror}") from None
        good_end = 0
        with fh:
            records = RecordLines(fh, str(self.path), advice="; the file was not written by batcher or was "
                                  "edited. Move it away to start over (images stay in place).")
            for start, end, rec in records:
                good_end = end
                self._apply(rec, start)
        self.torn_line = records.torn_line  # a kill mid-write: tolerated, reported, cut off
        if self.torn_line is not None and repair:
            with open(self.path, "r+b") as wfh:
                wfh.truncate(good_end)

    def _apply(self, rec: dict[str, Any], offset: int) -> None:
        kind = rec["t"]
        if kind == "attempt":
            item_id = rec["id"]
            prev = self.entries.get(item_id)
            if prev is not None and prev.rhash == rec.get("rhash"):
                prev.attempts = max(prev.attempts, int(rec.get("attempt", 0)))
                if prev.status != "done":
                    prev.status = "pending"
            else:
                self.entries[item_id] = Entry("pending", rec.get("rhash", ""), int(rec.get("attempt", 0)), -1)
        elif kind == "item":
            err = rec.get("error") or {}
            self.entries[rec["id"]] = Entry(
                rec["status"], rec.get("rhash", ""), int(rec.get("attempts", 0)), offset, err.get("kind")
            )
        elif kind in ("run", "end"):
            self.runs.append(rec)

    # -- writing ------------------------------------------------------------------------

    def append(self, rec: dict[str, Any]) -> None:
        """Append one record with a single write(2). Thread-safe."""
        line = (json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        assert self._fd is not None, "journal not open for writing"
        with self._lock:
            offset = os.lseek(self._fd, 0, os.SEEK_END)
            view = memoryview(line)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            self._dirty = True
            self._apply(rec, offset)
            if self.mirror is not None:
                self.mirror(rec)

    def sync(self) -> None:
        """fsync if anything was written since the last one."""
        with self._lock:
            if not self._dirty or self._fd is None:
                return
            self._dirty = False
            fd = self._fd
        os.fsync(fd)

    def close(self) -> None:
        if self._fd is not None:
            self.sync()
            os.close(self._fd)
            self._fd = None

    # -- reading records back -------------------------------------------------------------

    def record(self, item_id: str, fh: Any) -> dict[str, Any] | None:
        entry = self.entries.get(item_id)
        if entry is None or entry.offset < 0:
            return None
        fh.seek(entry.offset)
        return json.loads(fh.readline())


def write_manifest(
    journal: Journal,
    path: Path,
    job: dict[str, Any],
    items: Callable[[], Iterable[Any]],
) -> dict[str, int]:
    """Write `manifest.json` atomically from the job's items and the journal; return the summary.

    `items()` streams the job's items; it is called twice (counts first, then records) so
    that the summary can lead the file without holding the items in memory.
    """
    summary = {"total": 0, "done": 0, "failed": 0, "pending": 0}
    for item in items():
        summary["total"] += 1
        summary[_status(journal, item)] += 1
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(journal.path, "rb") if journal.path.exists() else _NullFile() as jfh, open(tmp, "w") as out:
        out.write(f'{{"version": {MANIFEST_VERSION}, "job": {json.dumps(job, ensure_ascii=False)}, '
                  f'"summary": {json.dumps(summary)}, "items": [')
        sep = "\n"
        for item in items():
            out.write(sep + json.dumps(_item_record(journal, jfh, item), ensure_ascii=False))
            sep = ",\n"
        out.write("\n]}\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    return summary


def _status(journal: Journal, item: Any) -> str:
    entry = journal.entries.get(item.id)
    if entry is None or entry.rhash != item.rhash or entry.status not in ("done", "failed"):
        return "pending"
    return entry.status


def _item_record(journal: Journal, jfh: Any, item: Any) -> dict[str, Any]:
    entry = journal.entries.get(item.id)
    if entry is not None and entry.rhash == item.rhash and entry.offset >= 0 and entry.status in ("done", "failed"):
        rec = journal.record(item.id, jfh)
        if rec is not None:
            return {k: v for k, v in rec.items() if k not in ("t", "rhash")}
    attempts = entry.attempts if entry is not None and entry.rhash == item.rhash else 0
    rec = {"id": item.id, "status": "pending", "request": item.body, "created": None, "images": [],
           "attempts": attempts, "error": None}
    if getattr(item, "vars", None):
        rec["vars"] = item.vars
    return rec


class _NullFile:
    def __enter__(self) -> _NullFile:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


def iter_records(path: Path) -> Iterator[dict[str, Any]]:
    """Every complete record of a journal, in order (for status and reports)."""
    with open(path, "rb") as fh:
        for raw in fh:
            if raw.endswith(b"\n"):
                try:
                    yield json.loads(raw)
                except ValueError:
                    continue


def iter_manifest(path: Path) -> tuple[dict[str, Any], _Items]:
    """Read `manifest.json` with constant memory: its header, and its items one at a time.

        >>> header, items = iter_manifest(out / "manifest.json")
        >>> header["summary"]["done"], sum(1 for item in items if item["status"] == "done")

    It relies on the layout `write_manifest` guarantees: a first line holding everything but the
    items and ending in `"items": [`, then one item per line (all but the last ending in `,`),
    then `]}`. Any other file is a `ManifestError` naming the file and line. The file is closed
    when the items are exhausted (or the iterator is closed).
    """
    path = Path(path)
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest here; `batcher run` writes it at the end of every run") from None
    except OSError as exc:
        raise ManifestError(f"{path}: can't read the manifest: {exc.strerror}") from None
    try:
        first = fh.readline()
        head = first.rstrip(b"\r\n")
        try:
            if not head.endswith(b"["):
                raise ValueError
            header = json.loads(head + b"]}")
            if not isinstance(header, dict) or header.pop("items", None) != []:
                raise ValueError
        except ValueError:
            raise ManifestError(f"{path}:1: not a batcher manifest (the first line must open the item list; "
                                f"was the file edited or reformatted?)") from None
        if header.get("version") != MANIFEST_VERSION:
            raise ManifestError(f"{path}:1: version: manifest version {header.get('version')!r} is not "
                                f"{MANIFEST_VERSION}; this batcher can't read it")
    except BaseException:
        fh.close()
        raise
    return header, _Items(_manifest_items(path, fh), fh)


class _Items(Iterator[dict[str, Any]]):
    """The items of a manifest; `close()` closes the file even when no item was read."""

    def __init__(self, gen: Iterator[dict[str, Any]], fh: Any) -> None:
        self._gen, self._fh = gen, fh

    def __next__(self) -> dict[str, Any]:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()  # type: ignore[attr-defined]
        self._fh.close()


def _manifest_items(path: Path, fh: Any) -> Iterator[dict[str, Any]]:
    with fh:
        lineno = 1
        expect_more = True  # the previous item line ended in `,` (or none was read yet)
        for raw in fh:
            lineno += 1
            line = raw.rstrip(b"\r\n")
            if line == b"]}":
                if fh.read().strip():
                    raise ManifestError(f"{path}:{lineno + 1}: data after the end of the manifest")
                return
            if not expect_more:
                raise ManifestError(f"{path}:{lineno - 1}: item line without a trailing comma before more items")
            expect_more = line.endswith(b",")
            try:
                item = json.loads(line[:-1] if expect_more else line)
                if not isinstance(item, dict) or not isinstance(item.get("id"), str) \
                        or item.get("status") not in ("done", "failed", "pending"):
                    raise ValueError
            except ValueError:
                raise ManifestError(f"{path}:{lineno}: corrupt item line (expected one item object with "
                                    f"an id and a status)") from None
            yield item
        raise ManifestError(f"{path}:{lineno}: the manifest ends before its closing `]}}` (truncated?)")
