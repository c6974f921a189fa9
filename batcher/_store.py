"""Where output lives: a local folder or object storage, and a sharded journal on top of it.

Many workers (one per shard `I/N`) write one output. Object storage can't append or rename, so
each shard journals into immutable *segments* and, last, a commit marker; every reader merges
the segments of all shards back into the one journal that `manifest.json` is built from.

Layout (the same on disk and under an `s3://bucket/prefix`):
    OUT/images/<stem>.<ext>                     written once, create-only
    OUT/segments/seg-g<gen>-s<i>of<n>-<runid>-o<offset>.jsonl
                                                immutable slices of a shard's journal
    OUT/shards/shard-<i>.done                   a shard's commit marker, written last
    OUT/manifest.jsonl                          a single (unsharded) local run's journal, if any
    OUT/manifest.json                           the merged manifest (`merge`)

>>> store = open_store("s3://bucket/run1")          # or a local path
>>> writer = SegmentWriter.open(store, shard_index=3, shard_count=8)
>>> writer.append({"t": "attempt", ...}); writer.sync(); writer.close(summary=...)
>>> merge(store, job, items)                        # -> {"total", "done", "failed", "pending"}

fsspec (and s3fs/gcsfs) are imported only when an object-storage URL is opened.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import mimetypes
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from ._exceptions import ManifestError, OutputError
from ._manifest import Journal, RecordLines, record_line, utc_now, write_manifest
from ._records import finished, kind, last_run

__all__ = [
    "Store",
    "LocalStore",
    "ObjectStore",
    "ObjectExistsError",
    "SegmentKey",
    "FlushPolicy",
    "SegmentWriter",
    "buffer_dir_for",
    "recover_buffers",
    "open_store",
    "is_remote",
    "iter_merged_records",
    "merged_journal",
    "merge",
    "current_markers",
]

SEGMENTS = "segments"
SHARDS = "shards"
LOCAL_JOURNAL = "manifest.jsonl"
MANIFEST = "manifest.json"

# S3 needs parts of at least 5 MiB; s3fs switches to multipart at twice the part size.
DEFAULT_PART_SIZE = 8 * 2**20

Source = bytes | Path


class ObjectExistsError(OutputError):
    """A create-only write found a different object already under that name."""

    def __init__(self, url: str, existing_size: int | None) -> None:
        self.url = url
        self.existing_size = existing_size
        super().__init__(f"{url} already exists with different content ({existing_size} bytes); not overwritten")


# -- names ----------------------------------------------------------------------------------


_SEGMENT_RE = re.compile(r"^seg-g(\d{6})-s(\d{5})of(\d{5})-([0-9a-f]+)-o(\d{12})\.jsonl$")
_BUFFER_RE = re.compile(r"^buf-g(\d{6})-s(\d{5})of(\d{5})-([0-9a-f]+)\.jsonl$")


@dataclass(frozen=True, order=True)
class SegmentKey:
    """One segment: bytes `[offset, offset + size)` of shard `shard`'s buffer in run `runid`.

    Field order is the merge order: a later generation (a rerun) sorts after every segment
    that existed when it started, so its records win per item.
    """

    gen: int
    shard: int
    count: int
    runid: str
    offset: int

    @property
    def name(self) -> str:
        return f"seg-{self.stem}-o{self.offset:012d}.jsonl"

    @property
    def stem(self) -> str:
        return f"g{self.gen:06d}-s{self.shard:05d}of{self.count:05d}-{self.runid}"

    @classmethod
    def parse(cls, name: str) -> SegmentKey | None:
        m = _SEGMENT_RE.match(name)
        if m is None:
            return None
        return cls(int(m[1]), int(m[2]), int(m[3]), m[4], int(m[5]))


def _check_rel(rel: str) -> str:
    parts = rel.split("/")
    if not rel or rel.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"not a relative output path: {rel!r}")
    return rel


def _sha256(src: Source) -> tuple[str, int]:
    if isinstance(src, bytes):
        return hashlib.sha256(src).hexdigest(), len(src)
    with open(src, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest(), os.fstat(fh.fileno()).st_size


# -- stores ---------------------------------------------------------------------------------


class Store:
    """Where one output lives. Subclasses give `_write`, `read`, `iter_lines`, `size`, `list`."""

    url: str

    # primitives -----------------------------------------------------------------------------

    def _write(self, rel: str, src: Source, create: bool) -> None:
        """Publish whole or not at all; with `create`, raise FileExistsError if `rel` exists."""
        raise NotImplementedError

    def read(self, rel: str) -> bytes:
        raise NotImplementedError

    def iter_lines(self, rel: str) -> Iterator[bytes]:
        """The object's lines, streamed, each with its newline (the last may lack one)."""
        raise NotImplementedError

    def open(self, rel: str) -> BinaryIO:
        """The object opened for streaming reads; FileNotFoundError when it doesn't exist."""
        raise NotImplementedError

    def get(self, rel: str, dst: str | os.PathLike[str]) -> None:
        """Copy the object into the local file `dst` (streamed, not held in memory)."""
        with self.open(rel) as src, open(dst, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)

    def size(self, rel: str) -> int | None:
        """The object's size, or None when it doesn't exist."""
        raise NotImplementedError

    def list(self, folder: str) -> list[tuple[str, int]]:
        """(name, size) of the objects directly in `folder`, in no order; [] if none."""
        raise NotImplementedError

    # operations -----------------------------------------------------------------------------

    def exists(self, rel: str) -> bool:
        return self.size(rel) is not None

    def has_file(self, rel: str, size: int) -> bool:
        """What resume asks of a done item's image (as `OutputDir.has_file`)."""
        return self.size(rel) == size

    def put(self, rel: str, src: Source) -> None:
        """Write or replace `rel` atomically (the manifest, markers): readers see old or new."""
        self._write(_check_rel(rel), src, create=False)

    def put_image(self, rel: str, src: Source, *, replace: bool = False) -> bool:
        """Write an image once. True if written; False if the same bytes (sha256) were already there.

        Raises ObjectExistsError if different bytes hold the name. That happens only when a
        killed attempt uploaded an image but never journaled its item: the journal is the
        truth, so the item's rerun passes `replace=True` for it (one writer per item).
        """
        return self._put_once(_check_rel(rel), src, replace=replace)

    def put_segment(self, key: SegmentKey, data: bytes) -> bool:
        """Store one journal segment, never overwritten (same bytes again: False)."""
        return self._put_once(f"{SEGMENTS}/{key.name}", data, replace=False)

    def _put_once(self, rel: str, src: Source, *, replace: bool) -> bool:
        try:
            self._write(rel, src, create=not replace)
            return True
        except FileExistsError:
            pass
        existing = self.size(rel)
        digest, size = _sha256(src)
        if existing == size and hashlib.sha256(self.read(rel)).hexdigest() == digest:
            return False
        raise ObjectExistsError(self.url_of(rel), existing)

    def list_segments(self) -> builtins.list[SegmentKey]:
        """Every segment of every shard, in merge order."""
        keys = (SegmentKey.parse(name) for name, _ in self.list(SEGMENTS))
        return sorted(k for k in keys if k is not None)

    def segment_sizes(self) -> dict[SegmentKey, int]:
        out = {}
        for name, size in self.list(SEGMENTS):
            key = SegmentKey.parse(name)
            if key is not None:
                out[key] = size
        return out

    def put_marker(self, shard: int, doc: dict[str, Any]) -> None:
        """Write shard `shard`'s commit marker (replacing an older run's)."""
        self.put(f"{SHARDS}/shard-{shard:05d}.done", json.dumps(doc, ensure_ascii=False).encode())

    def read_marker(self, shard: int) -> dict[str, Any] | None:
        try:
            return json.loads(self.read(f"{SHARDS}/shard-{shard:05d}.done"))
        except FileNotFoundError:
            return None

    def markers(self) -> dict[int, dict[str, Any]]:
        out = {}
        for name, _ in self.list(SHARDS):
            m = re.match(r"^shard-(\d{5})\.done$", name)
            if m:
                doc = self.read_marker(int(m[1]))
                if doc is not None:
                    out[int(m[1])] = doc
        return out

    def url_of(self, rel: str) -> str:
        return f"{self.url.rstrip('/')}/{rel}"

    def default_buffer_root(self) -> Path:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        return Path(base) / "batcher" / "buffers"


class LocalStore(Store):
    """A plain folder: temp file + rename, and `link(2)` where a name must be created only once."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.url = str(self.root)

    def _write(self, rel: str, src: Source, create: bool) -> None:
        final = self.root / rel
        final.parent.mkdir(parents=True, exist_ok=True)
        if create and isinstance(src, Path):
            try:
                os.link(src, final)  # the whole file appears at once, or EEXIST
                return
            except FileExistsError:
                raise
            except OSError:
                pass  # another file system or no hard links: copy, then publish
        prefix = f".tmp-{final.name[:40]}-"
        if rel.startswith("images/"):
            # a kill -9 between writing a temporary and renaming it leaves one behind; an image name has
            # one writer (its item's run: the claim, the shard split), so it clears that name's leftovers.
            # Not other names: several shards may write `manifest.json` at once, each its own temporary.
            for old in final.parent.glob(glob.escape(prefix) + "*"):
                with contextlib.suppress(FileNotFoundError):
                    old.unlink()
        tmp = final.with_name(f"{prefix}{uuid.uuid4().hex[:8]}")
        try:
            if isinstance(src, bytes):
                with open(tmp, "wb") as fh:
                    fh.write(src)
                    fh.flush()
                    os.fsync(fh.fileno())
            else:
                shutil.copyfile(src, tmp)
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
            if not create:
                os.replace(tmp, final)
                return
            try:
                os.link(tmp, final)
            except FileExistsError:
                raise
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
                    raise
                # no hard links here: check-then-rename, correct with one writer per name
                if final.exists():
                    raise FileExistsError(str(final)) from None
                os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def read(self, rel: str) -> bytes:
        return (self.root / rel).read_bytes()

    def iter_lines(self, rel: str) -> Iterator[bytes]:
        with open(self.root / rel, "rb") as fh:
            yield from fh

    def open(self, rel: str) -> BinaryIO:
        return open(self.root / rel, "rb")

    def size(self, rel: str) -> int | None:
        try:
            st = (self.root / rel).stat()
        except OSError:
            return None
        return st.st_size

    def list(self, folder: str) -> list[tuple[str, int]]:
        try:
            entries = list(os.scandir(self.root / folder))
        except (FileNotFoundError, NotADirectoryError):
            return []
        out = []
        for e in entries:
            if not e.name.startswith(".") and e.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    out.append((e.name, e.stat(follow_symlinks=False).st_size))
        return out

    def default_buffer_root(self) -> Path:
        return self.root / ".buffers"


class ObjectStore(Store):
    """Object storage through fsspec: `s3://` (s3fs), `gs://` (gcsfs), `memory://` (tests).

    Create-only writes use fsspec's `mode="create"` (s3fs sends `If-None-Match: *` on the
    PutObject or the CompleteMultipartUpload), so the check is the server's, not a race.
    Objects of `2 * part_size` bytes or more go up as multipart uploads; an upload that
    never completes is invisible under its name. Credentials come from the provider's
    standard chain (environment, config files, instance/pod identity); pass
    `storage_options` only for things like an endpoint, never secrets from a job file.
    """

    def __init__(self, url: str, *, part_size: int = DEFAULT_PART_SIZE,
                 storage_options: dict[str, Any] | None = None) -> None:
        import fsspec  # lazily: a local run must not pay for (or need) fsspec and s3fs

        protocol = url.split("://", 1)[0]
        self.url = url.rstrip("/")
        self.protocol = protocol
        self.part_size = part_size
        self.fs = fsspec.filesystem(protocol, **(storage_options or {}))
        self.root = self.fs._strip_protocol(self.url).rstrip("/")

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def _write(self, rel: str, src: Source, create: bool) -> None:
        path = self._path(rel)
        kwargs: dict[str, Any] = {}
        if self.protocol in ("s3", "s3a"):
            kwargs["chunksize"] = self.part_size
            ctype = mimetypes.guess_type(rel)[0]
            if ctype:
                kwargs["ContentType"] = ctype
        mode = "create" if create else "overwrite"
        try:
            if isinstance(src, bytes):
                self.fs.pipe_file(path, src, mode=mode, **kwargs)
            else:
                self.fs.put_file(str(src), path, mode=mode, **kwargs)
        finally:
            self.fs.invalidate_cache(path)

    def read(self, rel: str) -> bytes:
        return self.fs.cat_file(self._path(rel))

    def iter_lines(self, rel: str) -> Iterator[bytes]:
        with self.fs.open(self._path(rel), "rb") as fh:
            yield from fh

    def open(self, rel: str) -> BinaryIO:
        return self.fs.open(self._path(rel), "rb")

    def get(self, rel: str, dst: str | os.PathLike[str]) -> None:
        self.fs.get_file(self._path(rel), os.fspath(dst))

    def size(self, rel: str) -> int | None:
        path = self._path(rel)
        self.fs.invalidate_cache(path)  # listings are cached; existence must be fresh
        try:
            info = self.fs.info(path)
        except FileNotFoundError:
            return None
        return int(info["size"]) if info.get("type") == "file" else None

    def list(self, folder: str) -> list[tuple[str, int]]:
        path = self._path(folder)
        self.fs.invalidate_cache(path)
        try:
            entries = self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []
        return [(e["name"].rstrip("/").rsplit("/", 1)[-1], int(e.get("size") or 0))
                for e in entries if e.get("type") == "file"]


def is_remote(out: str | os.PathLike[str]) -> bool:
    """An object-storage URL (`s3://`, `gs://`, `memory://`), not a local folder (`file://` is one)."""
    text = os.fspath(out)
    return "://" in text and not text.startswith("file://")


def open_store(out: str | os.PathLike[str], **options: Any) -> Store:
    """A `Store` for `OUT`: `scheme://...` is object storage, anything else a local folder."""
    text = os.fspath(out)
    if is_remote(text):
        return ObjectStore(text, **options)
    return LocalStore(text.removeprefix("file://"))


# -- shard journal segments -----------------------------------------------------------------


@dataclass(frozen=True)
class FlushPolicy:
    """When a shard's buffered journal records go up as a segment: every `records` records,
    or at the first `sync()` `seconds` after the last flush, and always at close."""

    records: int = 500
    seconds: float = 5.0


class SegmentWriter:
    """One shard's journal: records appended locally, shipped as immutable segments.

    >>> writer = SegmentWriter.open(store, shard_index=0, shard_count=4)
    >>> writer.append(record)        # one write(2) to the local buffer; may upload a segment
    >>> writer.sync()                # fsync; upload a segment if `policy.seconds` passed
    >>> writer.close(summary)        # last segment, then the commit marker

    The buffer is an append-only local file, so a kill loses nothing appended. Opening a
    writer first ships what killed writers left in the buffer folder: the segment names
    carry the buffer offset they start at, so the store's listing says exactly which bytes
    already went up: nothing is lost and nothing is sent twice. `append` and `close` may
    upload: call them from a worker thread, as the runner does with journal writes.
    """

    def __init__(self, store: Store, shard_index: int, shard_count: int, *, policy: FlushPolicy,
                 buffer_dir: Path, clock: Callable[[], float]) -> None:
        self.store = store
        self.shard_index = shard_index
        self.shard_count = shard_count
        self.policy = policy
        self.buffer_dir = buffer_dir
        self.clock = clock
        self.recovered = 0  # records shipped from killed writers' buffers when opening
        self.gen = 0
        self.runid = ""
        self.path: Path | None = None
        self.segments = 0
        self.counts = {"records": 0, "attempts": 0, "done": 0, "failed": 0}
        self._fd: int | None = None
        self._end = 0
        self._flushed = 0
        self._appended = 0
        self._flushed_records = 0
        self._dirty = False
        self._last_flush = clock()
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()

    @classmethod
    def open(cls, store: Store, shard_index: int, shard_count: int, *,
             policy: FlushPolicy = FlushPolicy(), buffer_root: str | os.PathLike[str] | None = None,
             clock: Callable[[], float] = time.monotonic) -> SegmentWriter:
        """Recover leftovers, then start a new generation for shard `shard_index` of `shard_count`."""
        if not (shard_count >= 1 and 0 <= shard_index < shard_count):
            raise ValueError(f"shard {shard_index}/{shard_count}: need 0 <= index < count")
        buffer_dir = buffer_dir_for(store, buffer_root)
        writer = cls(store, shard_index, shard_count, policy=policy, buffer_dir=buffer_dir, clock=clock)
        writer.recovered = recover_buffers(store, buffer_dir)
        writer._start()
        return writer

    def _start(self) -> None:
        # a generation above every existing segment: this run's records sort after all
        # earlier runs' (of any shard, so even a change of shard count stays ordered)
        self.gen = 1 + max((k.gen for k in self.store.list_segments()), default=0)
        self.runid = secrets.token_hex(4)
        stem = SegmentKey(self.gen, self.shard_index, self.shard_count, self.runid, 0).stem
        self.path = self.buffer_dir / f"buf-{stem}.jsonl"
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while alive: recovery skips it
        self._fd = fd

    # -- writing ------------------------------------------------------------------------

    def append(self, rec: Mapping[str, Any]) -> None:
        """Journal one record: one write(2) to the local buffer; ship a segment when due."""
        line = record_line(rec)
        with self._lock:
            if self._fd is None:
                raise ManifestError(f"{self.store.url}: shard {self.shard_index} journal is closed")
            view = memoryview(line)
            while view:
                view = view[os.write(self._fd, view):]
            self._end += len(line)
            self._appended += 1
            self._dirty = True
            self._count(rec)
            due = self._appended - self._flushed_records >= self.policy.records
        if due:
            self.flush()

    def _count(self, rec: Mapping[str, Any]) -> None:
        self.counts["records"] += 1
        outcome = finished(rec)
        if kind(rec) == "attempt":
            self.counts["attempts"] += 1
        elif outcome is not None:
            self.counts[outcome] += 1

    def sync(self) -> None:
        """fsync the buffer if written since the last one; ship a segment if one is due by time."""
        with self._lock:
            fd, dirty, self._dirty = self._fd, self._dirty, False
            pending = self._appended > self._flushed_records
        if fd is None:
            return
        if dirty:
            os.fsync(fd)
        if pending and self.clock() - self._last_flush >= self.policy.seconds:
            self.flush()

    def flush(self) -> None:
        """Ship everything appended so far as one immutable segment (nothing pending: no-op)."""
        with self._flush_lock:
            with self._lock:
                start, end, upto = self._flushed, self._end, self._appended
                fd = self._fd
            if start == end or fd is None:
                return
            data = os.pread(fd, end - start, start)
            shipped = self._ship(start, data)
            with self._lock:
                self._flushed = end
                self._flushed_records = upto
                self._last_flush = self.clock()
                self.segments += shipped

    def _ship(self, start: int, data: bytes) -> int:
        key = SegmentKey(self.gen, self.shard_index, self.shard_count, self.runid, start)
        try:
            self.store.put_segment(key, data)
            return 1
        except ObjectExistsError:
            pass
        # an earlier flush of a shorter range reported failure but was stored: keep what
        # went up and ship only the rest
        existing = self.store.read(f"{SEGMENTS}/{key.name}")
        if not data.startswith(existing) or not existing:
            raise ManifestError(f"{self.store.url_of(SEGMENTS + '/' + key.name)}: segment written by "
                                f"another writer; is shard {self.shard_index} running twice?") from None
        rest = data[len(existing):]
        if not rest:
            return 1
        self.store.put_segment(replace(key, offset=start + len(existing)), rest)
        return 2

    def close(self, summary: dict[str, Any] | None = None, *, commit: bool = True) -> dict[str, Any] | None:
        """Ship the rest; with `commit`, write the shard's marker last. Returns the marker.

        `commit=False` (an interrupted run) ships every record but claims nothing finished.
        """
        if self._fd is None:
            return None
        self.flush()
        os.fsync(self._fd)
        marker = None
        if commit:
            marker = {
                "shard": self.shard_index, "count": self.shard_count, "gen": self.gen, "runid": self.runid,
                "at": utc_now(), "segments": self.segments, "recovered": self.recovered, **self.counts,
                "summary": summary,
            }
            self.store.put_marker(self.shard_index, marker)
        with self._lock:
            fd, self._fd = self._fd, None
        # unlink while still holding the flock, so no one recovers a buffer that is shipped
        assert self.path is not None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(fd)
        return marker

    def __enter__(self) -> SegmentWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(commit=exc_type is None)


def buffer_dir_for(store: Store, buffer_root: str | os.PathLike[str] | None = None) -> Path:
    """The local folder holding `store`'s shard buffers (created if missing)."""
    root = Path(buffer_root) if buffer_root is not None else store.default_buffer_root()
    # one folder per store, so a leftover buffer is only ever shipped to its own output
    buffer_dir = root / hashlib.sha256(store.url.encode()).hexdigest()[:16]
    buffer_dir.mkdir(parents=True, exist_ok=True)
    return buffer_dir


def recover_buffers(store: Store, buffer_dir: Path) -> int:
    """Ship the unshipped tail of every buffer no live writer holds; return how many records.

    Torn last lines (a kill mid-write) are cut off, as the journal does.
    """
    recovered = 0
    sizes: dict[SegmentKey, int] | None = None
    for entry in sorted(os.scandir(buffer_dir), key=lambda e: e.name):
        m = _BUFFER_RE.match(entry.name)
        if m is None:
            continue
        try:
            fd = os.open(entry.path, os.O_RDWR)
        except FileNotFoundError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer's
            if sizes is None:
                sizes = store.segment_sizes()
            gen, shard, count, runid = int(m[1]), int(m[2]), int(m[3]), m[4]
            shipped = max((k.offset + n for k, n in sizes.items()
                           if (k.gen, k.shard, k.count, k.runid) == (gen, shard, count, runid)), default=0)
            size = os.fstat(fd).st_size
            data = os.pread(fd, size - shipped, shipped) if size > shipped else b""
            cut = data.rfind(b"\n") + 1
            data = data[:cut]
            if data:
                lines = data.count(b"\n")
                for lineno, raw in enumerate(data.splitlines(), 1):
                    try:
                        json.loads(raw)
                    except ValueError:
                        raise ManifestError(f"{entry.path}: corrupt buffer line {lineno} after offset "
                                            f"{shipped}; move the file away to go on without it") from None
                store.put_segment(SegmentKey(gen, shard, count, runid, shipped), data)
                recovered += lines
            os.unlink(entry.path)
        finally:
            os.close(fd)
    return recovered


def current_markers(store: Store) -> dict[int, dict[str, Any]]:
    """Commit markers that still hold: no segment of that shard is newer than its marker.

    A shard rerun after its marker starts a later generation, so its old marker stops
    counting as soon as the rerun ships a segment, until the rerun commits again.
    """
    latest: dict[tuple[int, int], int] = {}
    for key in store.list_segments():
        latest[(key.shard, key.count)] = max(latest.get((key.shard, key.count), 0), key.gen)
    out = {}
    for shard, doc in store.markers().items():
        if int(doc.get("gen", 0)) >= latest.get((shard, int(doc.get("count", 0))), 0):
            out[shard] = doc
    return out


# -- the merged journal ---------------------------------------------------------------------


def iter_merged_records(store: Store) -> Iterator[dict[str, Any]]:
    """Every journal record of the output, in merge order: a local `manifest.jsonl` first,
    then all shards' segments by (generation, shard, run, offset).

    An item belongs to one shard, and a rerun's generation sorts after everything that
    existed when it started, so "the latest record per id" means the same as in a single
    journal. A torn last line of `manifest.jsonl` is skipped; a bad line elsewhere is an
    error naming the object and line.
    """
    if store.exists(LOCAL_JOURNAL):
        yield from _parse_lines(store, LOCAL_JOURNAL, torn_ok=True)
    for key in store.list_segments():
        yield from _parse_lines(store, f"{SEGMENTS}/{key.name}", torn_ok=False)


def _parse_lines(store: Store, rel: str, *, torn_ok: bool) -> Iterator[dict[str, Any]]:
    # a torn last line of the local journal is cut off, as Journal does
    for _start, _end, rec in RecordLines(store.iter_lines(rel), store.url_of(rel), torn_ok=torn_ok):
        yield rec


@contextlib.contextmanager
def merged_journal(store: Store) -> Iterator[Journal]:
    """The output's merged journal as a read-only `Journal` (per-id latest status, runs).

    >>> with merged_journal(store) as journal:
    ...     journal.entries[item_id].status

    Built in a temporary local file, so `write_manifest` reads records back by offset
    exactly as it does for one run's journal.
    """
    with tempfile.TemporaryDirectory(prefix="batcher-merge-") as tmp:
        path = Path(tmp) / LOCAL_JOURNAL
        with open(path, "wb") as fh:
            for rec in iter_merged_records(store):
                fh.write(record_line(rec))
        yield Journal.read(path)


@dataclass(frozen=True)
class _JournalItem:
    id: str
    rhash: str
    body: Any


def _items_from_journal(journal: Journal) -> Iterator[_JournalItem]:
    """Items as the journal knows them, when no job file is at hand (`batcher merge OUT`)."""
    with open(journal.path, "rb") as fh:
        for item_id, entry in journal.entries.items():
            rec = journal.record(item_id, fh)  # the entry's latest item record, as `_records.replay` left it
            body = rec.get("request") if rec is not None and rec.get("rhash") == entry.rhash else None
            yield _JournalItem(item_id, entry.rhash, body)


def merge(store: Store, job: dict[str, Any] | None = None,
          items: Callable[[], Iterable[Any]] | None = None) -> dict[str, int]:
    """Write the output's `manifest.json` from all shards' segments; return its summary.

    With the job's `items` (and `job` meta), the manifest is exactly what `write_manifest`
    gives for a single journal holding the same records. Without them, items are those the
    journal knows and the job meta is the latest `run` record's.
    """
    with merged_journal(store) as journal:
        if job is None:
            run = last_run(journal.runs) or {}
            job = {"name": run.get("job"), "file": run.get("job_file")}
        if items is None:
            items = lambda: _items_from_journal(journal)  # noqa: E731
        out = journal.path.with_name(MANIFEST)
        summary = write_manifest(journal, out, job, items)
        store.put(MANIFEST, out)
    return summary
