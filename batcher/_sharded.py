"""A shard's run against a shared output: local work folder in, store (disk or S3) out.

A sharded run (`--shard I/N`, or an index from the array launcher) or a run whose output is
object storage works in a local *work folder* exactly as a single run works in `OUT`: its
journal, temp files and lock live there. Around that:

- at start, the work journal is rebuilt from the store's merged records of this shard's items,
  so resume sees what every earlier run of this shard (on any machine) finished;
- every journal record is mirrored into the shard's `SegmentWriter` (immutable segments in the
  store, then a commit marker);
- each image is published to the store create-only before its `item` record is written, and
  its staged copy removed;
- at the end, the shard commits, and the last shard to commit writes the merged `manifest.json`.

>>> sharded = ShardedOutput("s3://bucket/run1", ShardSpec(3, 8))
>>> work = sharded.work       # the OutputDir root the runner uses
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ._exceptions import ShardError
from ._manifest import Journal, record_line, write_manifest
from ._records import item_id
from ._shard import PLAN_FILE, Plan, ShardSpec, check_plan, parse_plan
from ._store import (
    FlushPolicy,
    SegmentWriter,
    Store,
    buffer_dir_for,
    current_markers,
    is_remote,
    iter_merged_records,
    merge,
    open_store,
    recover_buffers,
)

__all__ = ["ShardedOutput", "is_remote", "read_store_plan", "write_store_plan"]


def read_store_plan(store: Store) -> Plan | None:
    if not store.exists(PLAN_FILE):
        return None
    return parse_plan(store.read(PLAN_FILE).decode("utf-8"), store.url_of(PLAN_FILE))


def write_store_plan(store: Store, plan: Plan) -> None:
    store.put(PLAN_FILE, (json.dumps(plan.as_record(), indent=1) + "\n").encode())


class ShardedOutput:
    """The store, the local work folder and the segment writer of one shard's run."""

    def __init__(self, out: str | os.PathLike[str], shard: ShardSpec, work_dir: str | os.PathLike[str] | None = None,
                 *, flush_seconds: float = 5.0) -> None:
        self.out = str(out)
        self.shard = shard
        self.store = open_store(out)
        if work_dir is not None:
            root = Path(work_dir)
        elif is_remote(out):
            cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
            root = cache / "batcher" / "work" / hashlib.sha256(self.out.encode()).hexdigest()[:16]
        else:
            root = Path(out) / ".work"
        self.work = root / f"shard-{shard.index:05d}-of-{shard.count:05d}"
        self.flush_seconds = flush_seconds
        self.writer: SegmentWriter | None = None
        self.committed = False

    # -- the local work folder ----------------------------------------------------------------

    def reset_work(self) -> int:
        """Empty the work folder but its lock (held by the caller); return how many entries went.

        The store is the truth: the journal is rebuilt from it, and anything else here (a
        manifest, staged images) is a leftover of an earlier run, perhaps against a store that has
        since started over, so it is dropped rather than reconciled.
        """
        removed = 0
        for entry in os.scandir(self.work):
            if entry.name == ".lock":
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                Path(entry.path).unlink(missing_ok=True)
            removed += 1
        return removed

    def remove_work(self) -> None:
        """Remove the work folder of a committed shard (and its parent, once empty)."""
        shutil.rmtree(self.work, ignore_errors=True)
        try:
            self.work.parent.rmdir()  # only when no other shard works there
        except OSError:
            pass

    # -- before the run ---------------------------------------------------------------------

    def check_plan(self, fingerprint: str) -> Plan:
        """The run must match the plan the output was split by (ShardError, exit 2, otherwise)."""
        plan = read_store_plan(self.store)
        where = self.store.url_of(PLAN_FILE)
        if plan is None:
            raise ShardError(f"{where} not found: run `batcher plan JOB --out {self.out} --shards "
                             f"{self.shard.count}` once before starting the shards")
        return check_plan(self.out, self.shard.count, fingerprint, plan=plan, path=where)  # type: ignore[return-value]

    def rebuild_journal(self, path: Path) -> int:
        """Write this shard's merged records (every machine's) into the local work journal."""
        # a killed run's last records may sit only in its local buffer (segments go up every few
        # seconds): ship them first, or this journal would forget items that run finished, and
        # the rerun would pay for them again
        recover_buffers(self.store, buffer_dir_for(self.store))
        count = 0
        tmp = path.with_name(f".{path.name}.rebuild-{os.getpid()}")
        with open(tmp, "wb") as fh:
            for rec in iter_merged_records(self.store):
                about = item_id(rec)  # records about no item (runs, ends) belong to every shard
                if about is not None and not self.shard.contains(about):
                    continue
                fh.write(record_line(rec))
                count += 1
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        return count

    def open_writer(self, journal: Journal) -> SegmentWriter:
        """Start this shard's segment writer and mirror the journal into it."""
        # records go up every `flush_seconds` from the ticker's sync(), never from append():
        # append runs on the event loop for attempt records and must not wait for an upload
        self.writer = SegmentWriter.open(self.store, self.shard.index, self.shard.count,
                                         policy=FlushPolicy(records=10**12, seconds=self.flush_seconds))
        journal.mirror = self.writer.append
        return self.writer

    # -- during the run ---------------------------------------------------------------------

    def publish(self, work_root: Path, rel: str) -> None:
        """Put a staged image into the store, then drop the staged copy. Runs in a worker thread.

        The item is being run, so it is not done in the journal: an object already under its name
        is a leftover of a killed attempt (or, on disk, this very file) and is replaced.
        """
        local = work_root / rel
        self.store.put_image(rel, local, replace=True)
        if not self._same_file(local, rel):
            local.unlink(missing_ok=True)

    def _same_file(self, local: Path, rel: str) -> bool:
        root = getattr(self.store, "root", None)
        return root is not None and Path(root).resolve() / rel == local.resolve()

    def has_file(self, rel: str, size: int) -> bool:
        return self.store.has_file(rel, size)

    def sync(self) -> None:
        if self.writer is not None:
            self.writer.sync()

    # -- after the run ----------------------------------------------------------------------

    def recount(self, work_root: Path, job_meta: dict[str, Any], items: Callable[[], Iterable[Any]]) -> dict[str, int]:
        """This shard's summary from the store as it is now (our records shipped first): items
        another worker held may have been finished there meanwhile."""
        if self.writer is not None:
            self.writer.flush()
        path = work_root / "manifest.recount.jsonl"
        self.rebuild_journal(path)
        journal = Journal.read(path)
        try:
            return write_manifest(journal, work_root / "manifest.json", job_meta, items)
        finally:
            path.unlink(missing_ok=True)

    def finish(self, summary: dict[str, int], job_meta: dict[str, Any],
               all_items: Callable[[], Iterable[Any]], *, commit: bool) -> dict[str, int] | None:
        """Close the writer (committing the shard when it ran to its end); when every shard has
        committed, write the merged `manifest.json` and return its summary."""
        if self.writer is None:
            return None
        self.writer.close(summary, commit=commit)
        self.writer = None
        self.committed = commit
        if commit and len(current_markers(self.store)) >= self.shard.count:
            return merge(self.store, job_meta, all_items)
        return None
