"""A segmented manifest: `OUT/manifest.d/`, rewritten only where items changed.

A large output (see _layout) keeps its manifest as segments of SEGMENT_ITEMS items each, in job
order, plus a small index:

    OUT/manifest.d/index.json          {"version", "job", "summary", "segments": [...], "journal": {...}}
    OUT/manifest.d/<k>-<tag>.jsonl     one item per line, exactly the item lines of manifest.json

A run rewrites a segment only when its items (ids and request hashes) changed or the journal
recorded something for one of them since the index was written (read from the journal's tail
past the offset the index records); the others are kept as they are. So an hourly run that
appends 1,000 items to a 10,000,000-item output writes one or two segments and the index, not
gigabytes. Readers don't change: `iter_manifest(OUT/manifest.json)` reads the segments when the
single file is absent, and `batcher merge OUT` writes the single file on request (the next run
removes it again, as it would be stale).

Each new segment gets a new name, the index is replaced atomically (temp + rename), and only then
are the segments it no longer names deleted: a kill at any point leaves an index whose segments
all exist.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ._exceptions import ManifestError
from ._manifest import MANIFEST_VERSION, Journal, _item_record, _status
from ._records import item_id

__all__ = ["SEGMENT_DIR", "SEGMENT_ITEMS", "write_segments", "read_index", "iter_segments", "write_single"]

SEGMENT_DIR = "manifest.d"
INDEX = "index.json"
SEGMENT_ITEMS = 10_000


def read_index(root: Path) -> dict[str, Any] | None:
    """The segmented manifest's index, or None when the output has none."""
    try:
        index = json.loads((root / SEGMENT_DIR / INDEX).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{root / SEGMENT_DIR / INDEX}: unreadable manifest index ({exc})") from None
    if not isinstance(index, dict) or index.get("version") != MANIFEST_VERSION:
        raise ManifestError(f"{root / SEGMENT_DIR / INDEX}: not a batcher manifest index of version "
                            f"{MANIFEST_VERSION}")
    return index


def _changed_since(journal_path: Path, mark: Any) -> set[str] | None:
    """Ids the journal recorded anything for past `mark` (the index's offset), or None: unknown."""
    from ._checkpoint import _probes

    if not isinstance(mark, dict) or not isinstance(mark.get("offset"), int):
        return None
    offset = mark["offset"]
    changed: set[str] = set()
    try:
        with open(journal_path, "rb") as fh:
            if os.fstat(fh.fileno()).st_size < offset or list(_probes(fh, offset)) != mark.get("probes"):
                return None  # the journal was replaced or cut: trust nothing
            fh.seek(offset)
            for raw in fh:
                try:
                    rec = json.loads(raw)
                except ValueError:
                    continue
                about = item_id(rec) if isinstance(rec, dict) else None
                if about is not None:
                    changed.add(about)
    except OSError:
        return None
    return changed


def _mark(journal_path: Path) -> dict[str, Any] | None:
    from ._checkpoint import _probes

    try:
        with open(journal_path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            return {"offset": size, "probes": list(_probes(fh, size))}
    except OSError:
        return None


def batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """`items` in lists of `size` (the last may be shorter): itertools.batched, Python 3.12's."""
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def write_segments(journal: Journal, root: Path, job: dict[str, Any],
                   items: Callable[[], Iterable[Any]], known: Any = None) -> dict[str, int]:
    """Bring `OUT/manifest.d` up to date with the job's items and the journal; return the summary.

    `known` (see `_jobcache.KnownPrefix`): the index on disk was written from the job's first
    `known.count` items, which are unchanged; its whole segments that no item journaled since
    touches are kept without reading their items (`known.items_from` gives the rest).
    """
    folder = root / SEGMENT_DIR
    folder.mkdir(exist_ok=True)
    try:
        old = read_index(root)
    except ManifestError:
        old = None  # rebuilt whole below
    old_segments = old.get("segments", []) if old else []
    changed = _changed_since(journal.path, old.get("journal")) if old else None
    start = _kept_prefix(folder, old_segments, known, changed) if known is not None and changed is not None else 0
    segments: list[dict[str, Any]] = list(old_segments[:start])
    summary = {name: sum(seg["counts"][name] for seg in segments) for name in ("total", "done", "failed", "pending")}
    source = known.items_from(start * SEGMENT_ITEMS) if start else items()
    with open(journal.path, "rb") if journal.path.exists() else open(os.devnull, "rb") as jfh:
        for k, batch in enumerate(batched(source, SEGMENT_ITEMS), start):
            keys = hashlib.sha256("".join(f"{i.id}\t{i.rhash}\n" for i in batch).encode()).hexdigest()
            prev = old_segments[k] if k < len(old_segments) else None
            if prev is not None and changed is not None and prev.get("keys") == keys and \
                    not any(i.id in changed for i in batch) and (folder / prev["file"]).is_file():
                seg = prev
            else:
                seg = _write_segment(folder, k, batch, journal, jfh, keys)
            segments.append(seg)
            for name in summary:
                summary[name] += seg["counts"][name]
    index = {"version": MANIFEST_VERSION, "job": job, "summary": summary, "segments": segments,
             "journal": _mark(journal.path)}
    tmp = folder / f".{INDEX}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(index, fh, ensure_ascii=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / INDEX)
    keep = {s["file"] for s in segments} | {INDEX}
    for entry in os.scandir(folder):
        if entry.name not in keep:  # replaced segments, and temporaries of a killed run
            os.unlink(entry.path)
    try:
        os.unlink(root / "manifest.json")  # a single file `batcher merge` wrote earlier is stale now
    except FileNotFoundError:
        pass
    return summary


def _kept_prefix(folder: Path, old: list[dict[str, Any]], known: Any, changed: set[str]) -> int:
    """How many leading segments of the index hold only known, unchanged items (kept as they are)."""
    full = min(known.count // SEGMENT_ITEMS, len(old))
    touched = {(pos - 1) // SEGMENT_ITEMS for pos in known.positions(changed)}
    for k in range(full):
        seg = old[k]
        if k in touched or not isinstance(seg.get("counts"), dict) or seg["counts"].get("total") != SEGMENT_ITEMS \
                or not (folder / str(seg.get("file"))).is_file():
            return k
    return full


def _write_segment(folder: Path, k: int, batch: list[Any], journal: Journal, jfh: Any, keys: str) -> dict[str, Any]:
    counts = {"total": len(batch), "done": 0, "failed": 0, "pending": 0}
    name = f"{k:06d}-{uuid.uuid4().hex[:8]}.jsonl"
    tmp = folder / f".tmp-{name}"
    with open(tmp, "w", encoding="utf-8") as out:
        for item in batch:
            counts[_status(journal, item)] += 1
            out.write(json.dumps(_item_record(journal, jfh, item), ensure_ascii=False) + "\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, folder / name)
    return {"file": name, "keys": keys, "counts": counts}


def iter_segments(root: Path, index: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The items of a segmented manifest, in job order, one at a time."""
    for seg in index.get("segments", []):
        path = root / SEGMENT_DIR / str(seg.get("file"))
        try:
            fh = open(path, "rb")
        except OSError as exc:
            raise ManifestError(f"{path}: manifest segment missing or unreadable ({exc.strerror}); "
                                f"a run rebuilds it") from None
        with fh:
            for lineno, raw in enumerate(fh, 1):
                try:
                    item = json.loads(raw)
                    if not isinstance(item, dict) or not isinstance(item.get("id"), str):
                        raise ValueError
                except ValueError:
                    raise ManifestError(f"{path}:{lineno}: corrupt item line") from None
                yield item


def write_single(root: Path) -> dict[str, int]:
    """Write `OUT/manifest.json` (the single file, same layout as ever) from the segments; return the summary."""
    index = read_index(root)
    if index is None:
        raise ManifestError(f"{root}: no segmented manifest here ({SEGMENT_DIR}/{INDEX})")
    path = root / "manifest.json"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as out:
        out.write(f'{{"version": {MANIFEST_VERSION}, "job": {json.dumps(index.get("job"), ensure_ascii=False)}, '
                  f'"summary": {json.dumps(index.get("summary"))}, "items": [')
        sep = "\n"
        for item in iter_segments(root, index):
            out.write(sep + json.dumps(item, ensure_ascii=False))
            sep = ",\n"
        out.write("\n]}\n")
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    return dict(index.get("summary") or {})
