"""The manifest: an append-only journal (`manifest.jsonl`) and the `manifest.json` built from it.

Journal records, one JSON object per line, are defined, built and replayed in `_records`:
    {"t": "run", "job": NAME, "job_file": PATH, "at": ISO, "pid": N}       a run started
    {"t": "attempt", "id": ID, "rhash": H, "attempt": K, "endpoint": E, "at": ISO}   written BEFORE sending
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

import errno
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import orjson

from ._exceptions import ManifestError
from ._records import RUN_KINDS, Entry, ManifestItem, check_fields, manifest_item, pending_item, replay, utc_now

__all__ = ["Journal", "Entry", "RecordLines", "needs_run", "write_manifest", "count_items", "iter_manifest", "read_manifest", "utc_now", "MANIFEST_VERSION"]

MANIFEST_VERSION = 1
# how every record line starts (json.dumps of a dict whose first key is "t"), cut anywhere
_TORN_START = re.compile(rb'\{\s*(?:"(?:t(?:"\s*(?::|$))?)?)?$|\{\s*"t"\s*:')


_write = os.write  # tests swap it to play a disk that fills up


def record_line(rec: Mapping[str, Any]) -> bytes:
    """One journal line: compact JSON, UTF-8, key order kept (so it starts `{"t":`), and a newline.

    orjson writes it in C (two records per image, ~10 µs each with json); what orjson refuses (an
    integer past 64 bits, a non-string key) is written by json as before.
    """
    try:
        return orjson.dumps(rec, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:  # orjson.JSONEncodeError is a TypeError
        return (json.dumps(rec, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


class RecordLines:
    """The records of journal lines, with the byte span of each: `for start, end, rec in ...`.

    With `torn_ok`, an incomplete *last* line that starts like a record (a kill mid-write) ends the
    records and its number is kept in `torn_line`. A line holding a torn record and then a whole
    one (left by older versions after a full disk) yields the whole one and is listed in
    `glued_lines`. Any other unreadable line is a ManifestError naming `where:LINE`.
    """

    def __init__(self, lines: Iterable[bytes], where: str, *, torn_ok: bool = True, advice: str = "") -> None:
        self.lines = lines
        self.where = where
        self.torn_ok = torn_ok
        self.advice = advice
        self.torn_line: int | None = None
        self.glued_lines: list[int] = []  # lines holding a torn record and then a whole one

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
            except (ValueError, RecursionError):  # RecursionError: a line nested thousands deep
                # only an unfinished line that starts like a record is a kill mid-write; a whole
                # line that is not a record (a foreign file) is never cut off
                if self.torn_ok and not complete and _TORN_START.match(raw):
                    self.torn_line = lineno
                    return
                glued = _glued_record(raw) if complete else None
                if glued is None:
                    raise ManifestError(f"{self.where}:{lineno}: corrupt journal line{self.advice}") from None
                # an older batcher appended after a write the disk cut short: a torn record, then a
                # whole one on the same line; the whole one counts (and is read back from `cut`)
                cut, rec = glued
                self.glued_lines.append(lineno)
                start += cut
            if not complete and self.torn_ok:
                self.torn_line = lineno
                return
            yield start, offset, rec


def _glued_record(raw: bytes) -> tuple[int, dict[str, Any]] | None:
    """(offset, record) of a whole record glued after a torn one on one line, else None."""
    if not _TORN_START.match(raw):
        return None
    cut = raw.find(b'{"t":"', 1)
    while cut > 0:  # the first place where the rest of the line is one whole record
        try:
            rec = json.loads(raw[cut:])
            if isinstance(rec, dict) and "t" in rec:
                return cut, rec
        except (ValueError, RecursionError):
            pass
        cut = raw.find(b'{"t":"', cut + 1)
    return None


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

    def __init__(self, path: Path, checkpoint: bool = False) -> None:
        self.path = path
        self.use_checkpoint = checkpoint  # resume from OUT/.checkpoint.sqlite (see _checkpoint)
        self.checkpoint: Any = None
        self.entries: dict[str, Entry] = {}
        self.runs: list[dict[str, Any]] = []
        self.torn_line: int | None = None
        self.glued_lines: list[int] = []
        self.loaded_end = 0
        self._fd: int | None = None
        self._lock = threading.Lock()
        self._dirty = False
        self._torn_at: int | None = None  # a failed append left bytes past this offset
        # where the next record goes: the run is the file's only writer (it holds the output's lock),
        # so one lseek at the first append, not one per record (each a GIL release on the event loop)
        self._end: int | None = None
        self.mirror: Callable[[Mapping[str, Any]], None] | None = None  # e.g. a shard's segment writer
        self.redact: Callable[[str], str] | None = None  # masks the run's keys in every line written

    @classmethod
    def open(cls, path: Path, checkpoint: bool = False) -> Journal:
        journal = cls(path, checkpoint)
        journal._load()
        journal._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        return journal

    @classmethod
    def read(cls, path: Path, checkpoint: bool = False) -> Journal:
        """Load without opening for writing (status, reports)."""
        journal = cls(path, checkpoint)
        journal._load(repair=False)
        return journal

    def _load(self, repair: bool = True) -> None:
        try:
            # a run never follows a link planted as its journal out of OUT
            fh = open(os.open(self.path, os.O_RDONLY | (os.O_NOFOLLOW if repair else 0)), "rb")
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ManifestError(f"{self.path}: is a symbolic link; batcher only writes its own journal "
                                    f"file (remove the link)") from None
            raise ManifestError(f"{self.path}: can't read the journal: {exc.strerror}") from None
        good_end = start = self._resume() if self.use_checkpoint else 0
        with fh:
            fh.seek(start)
            records = RecordLines(fh, str(self.path), advice="; the file was not written by batcher or was "
                                  "edited. Move it away to start over (images stay in place).")
            for lineno, (begin, end, rec) in enumerate(records, 1):
                good_end = start + end
                try:
                    self._apply(rec, start + begin)
                except (KeyError, TypeError, ValueError):
                    raise ManifestError(f"{self.path}:{lineno}: a {rec.get('t')!r} record with missing or "
                                        f"wrongly typed fields (edited by hand?); fix or remove that line") from None
        self.loaded_end = good_end  # what was read at open (a checkpoint's files were checked up to here)
        self.torn_line = records.torn_line  # a kill mid-write: tolerated, reported, cut off
        self.glued_lines = records.glued_lines
        if self.torn_line is not None and repair:
            with open(self.path, "r+b") as wfh:
                wfh.truncate(good_end)

    def _resume(self) -> int:
        """Load the checkpoint's state if it still matches the journal; return the offset to read on from.

        A missing or stale checkpoint is built first (streaming, in bounded memory); if it can't be
        written (a read-only folder), the whole journal is replayed as before.
        """
        from ._checkpoint import Checkpoint, SnapshotEntries, refresh

        cp = Checkpoint.open(self.path)
        if cp is None and refresh(self.path) is not None:
            cp = Checkpoint.open(self.path)
        if cp is None:
            return 0
        self.checkpoint = cp
        self.entries = SnapshotEntries(cp)  # type: ignore[assignment]
        self.runs = cp.runs()
        return cp.offset

    def _apply(self, rec: Mapping[str, Any], offset: int) -> None:
        kind = rec["t"]
        if kind in ("attempt", "item"):
            check_fields(rec)
        entry = replay(rec, offset, self.entries.get)
        if entry is not None:
            self.entries[rec["id"]] = entry  # a checkpoint-backed mapping keeps only what is set
        elif kind in RUN_KINDS:
            self.runs.append(dict(rec))

    # -- writing ------------------------------------------------------------------------

    def append(self, rec: Mapping[str, Any]) -> None:
        """Append one record with a single write(2). Thread-safe.

        A failed write (disk full) may leave part of the line behind: it is cut off before this
        returns, or, if even that fails, before the next append writes anything (which raises
        until the cut succeeds). So a record is never glued to a torn one.
        """
        line = record_line(rec)
        if self.redact:
            text = line.decode()
            masked = self.redact(text)
            if masked != text:  # a key echoed back by a server: what is written (and mirrored) is masked
                line, rec = masked.encode(), json.loads(masked)
        assert self._fd is not None, "journal not open for writing"
        with self._lock:
            self._repair()
            offset = self._end if self._end is not None else os.lseek(self._fd, 0, os.SEEK_END)
            self._end = None  # known again once this record is whole
            view = memoryview(line)
            try:
                while view:
                    written = _write(self._fd, view)
                    view = view[written:]
            except OSError:
                self._torn_at = offset
                try:
                    self._repair()
                except OSError:
                    pass  # the next append (or close) tries again
                raise
            self._end = offset + len(line)
            self._dirty = True
            self._apply(rec, offset)
            if self.mirror is not None:
                self.mirror(rec)

    def _repair(self) -> None:
        """Cut a torn tail left by a failed append (the caller holds the lock)."""
        if self._torn_at is None or self._fd is None:
            return
        os.ftruncate(self._fd, self._torn_at)
        self._torn_at = None

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
            with self._lock:
                try:
                    self._repair()
                except OSError:
                    pass  # the torn last line is cut by the next run that opens the journal
            try:
                self.sync()
            except OSError:
                pass  # every record was written; only their durability across a power cut is lost
            os.close(self._fd)
            self._fd = None
        if self.checkpoint is not None:
            self.checkpoint.close()
            self.checkpoint = None

    # -- reading records back -------------------------------------------------------------

    def short_record(self, item_id: str, rhash: str, wanted: int) -> dict[str, Any] | None:
        """The latest record of an item whose answer was short (fewer images than `wanted`), or None.

        Its `images` were paid for and saved; a rerun asks only for the rest. Reads one line.
        """
        entry = self.entries.get(item_id)
        if entry is None or entry.rhash != rhash or entry.status != "failed" or entry.error_kind != "transient" \
                or entry.offset < 0:
            return None
        with open(self.path, "rb") as fh:
            rec = self.record(item_id, fh)
        if not isinstance(rec, dict) or not isinstance(rec.get("short"), dict):
            return None
        images = rec.get("images")
        return rec if isinstance(images, list) and 0 < len(images) < wanted else None

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

    `items()` is streamed once: the item lines go to an anonymous temporary file while the summary is
    counted, then the summary line and those lines are written into place (the summary leads the
    file; holding the items in memory, or streaming the job file twice, is what this avoids).
    """
    summary = {"total": 0, "done": 0, "failed": 0, "pending": 0}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tempfile.TemporaryFile(dir=path.parent, prefix=f".{path.name}.items-") as body:
            with open(journal.path, "rb") if journal.path.exists() else _NullFile() as jfh:
                sep = b"\n"
                for item in items():
                    summary["total"] += 1
                    summary[_status(journal, item)] += 1
                    body.write(sep + json.dumps(_item_record(journal, jfh, item), ensure_ascii=False).encode())
                    sep = b",\n"
            body.flush()
            # O_NOFOLLOW: a link planted under the temp name is never written through
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
            with open(fd, "wb") as out:
                out.write(f'{{"version": {MANIFEST_VERSION}, "job": {json.dumps(job, ensure_ascii=False)}, '
                          f'"summary": {json.dumps(summary)}, "items": ['.encode())
                out.flush()
                _copy_all(body, out)
                out.write(b"\n]}\n")
                out.flush()
                os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)  # a half-written temp file (disk full) is never left behind
        except OSError:
            pass
        raise
    return summary


def _copy_all(src: Any, dst: Any) -> None:
    """Append all of file `src` to `dst` (both binary, `dst` flushed): in the kernel when it can."""
    size = os.fstat(src.fileno()).st_size
    offset = 0
    try:
        while offset < size:
            sent = os.sendfile(dst.fileno(), src.fileno(), offset, size - offset)
            if sent == 0:
                break
            offset += sent
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP) or offset:
            raise
    if offset < size:  # no sendfile between these files here: through user space
        src.seek(offset)
        shutil.copyfileobj(src, dst, 1 << 20)


def count_items(journal: Journal, items: Callable[[], Iterable[Any]]) -> dict[str, int]:
    """The summary `write_manifest` puts in the manifest, without writing anything (it needs no disk)."""
    summary = {"total": 0, "done": 0, "failed": 0, "pending": 0}
    for item in items():
        summary["total"] += 1
        summary[_status(journal, item)] += 1
    return summary


def _status(journal: Journal, item: Any) -> str:
    entry = journal.entries.get(item.id)
    if entry is None or entry.rhash != item.rhash or entry.status not in ("done", "failed"):
        return "pending"
    return entry.status


def _item_record(journal: Journal, jfh: Any, item: Any) -> ManifestItem:
    entry = journal.entries.get(item.id)
    if entry is not None and entry.rhash == item.rhash and entry.offset >= 0 and entry.status in ("done", "failed"):
        rec = journal.record(item.id, jfh)
        if rec is not None:
            return manifest_item(rec)
    attempts = entry.attempts if entry is not None and entry.rhash == item.rhash else 0
    return pending_item(item.id, item.body, attempts, getattr(item, "vars", None))


class _NullFile:
    def __enter__(self) -> _NullFile:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


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
    if path.name == "manifest.json" and not path.exists():
        segmented = _iter_segmented(path.parent)
        if segmented is not None:
            return segmented
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise ManifestError(f"{path}: no manifest here; `batcher run` writes it at the end of every run") from None
    except OSError as exc:
        raise ManifestError(f"{path}: can't read the manifest: {exc.strerror}") from None
    return read_manifest(fh, str(path))


def read_manifest(fh: Any, where: str) -> tuple[dict[str, Any], _Items]:
    """`iter_manifest` on an open binary file (a local file or an object store's), named `where` in errors.

    Takes ownership of `fh`: it is closed when the items are exhausted or closed, or on an error.
    """
    path = where
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


def _iter_segmented(root: Path) -> tuple[dict[str, Any], _Items] | None:
    """A large output's manifest kept as segments (see _segments), read as if it were manifest.json."""
    from ._segments import iter_segments, read_index

    index = read_index(root)
    if index is None:
        return None
    header: dict[str, Any] = {k: index[k] for k in ("version", "job", "summary") if k in index}
    return header, _Items(iter_segments(root, index), open(os.devnull, "rb"))


class _Items(Iterator[dict[str, Any]]):
    """The items of a manifest; `close()` closes the file even when no item was read."""

    def __init__(self, gen: Iterator[dict[str, Any]], fh: Any) -> None:
        self._gen, self._fh = gen, fh

    def __next__(self) -> dict[str, Any]:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()  # type: ignore[attr-defined]
        self._fh.close()


def _manifest_items(path: Path | str, fh: Any) -> Iterator[dict[str, Any]]:
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
