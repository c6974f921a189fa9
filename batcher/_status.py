"""`batcher status OUT`: what an output folder holds, read from its journal."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

from ._exceptions import ManifestError
from ._ids import request_hash
from ._manifest import Journal
from ._output import FolderOutput, OutputReader, open_output
from ._records import RUN_KINDS, check_fields, chunks_of, details, kind

__all__ = ["status", "short_reason"]


def status(out: str | Path) -> dict[str, Any]:
    """Totals by status and by endpoint, failures grouped by error code, files on disk, runs.

    A sharded output (or one on object storage) is read through all shards' merged segments.
    """
    reader = open_output(out)
    if isinstance(reader, FolderOutput) and (journal_path := reader.journal_path) is not None:
        # a single run's journal: answered from its checkpoint when it can
        fast = _from_checkpoint(reader.root, journal_path)
        # replayed by `_records.replay` (`Journal.read`: a clear ManifestError on a corrupt journal)
        return fast if fast is not None else _status(journal_path, reader)
    with reader.journal() as journal:  # every shard's segments, merged (a folder's or a store's)
        if journal is None:
            raise ManifestError(f"{reader.where}: no batcher manifest here (missing manifest.jsonl)")
        info = _status(journal.path, reader, journal)
    info["out"] = str(out)
    info["shards"] = _shard_markers(reader.store)
    return info


def short_reason(message: Any, limit: int = 80) -> str:
    """A failure's reason, short enough to group by: one line, at most `limit` characters.

    Two 422s about different fields are two groups; the same refusal for many prompts is one.
    """
    if not isinstance(message, str) or not message.strip():
        return "(no reason given)"
    text = " ".join(message.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _shard_markers(store: Any) -> dict[str, Any]:
    from ._store import current_markers

    markers = current_markers(store)
    plan = None
    if store.exists("plan.json"):
        plan = json.loads(store.read("plan.json")).get("shards")
    return {"planned": plan, "committed": sorted(markers)}


_PENDING: dict[str, Any] = {"status": "pending", "code": None, "message": None, "images": [], "cost": None,
                            "endpoint": None, "rhash": None}


def _current_items(reader: OutputReader) -> dict[str, str | None] | None:
    """Each item id of `manifest.json` with its request hash; None when it can't be read."""
    try:
        _header, items = reader.manifest()
        with closing(items):
            return {item["id"]: request_hash(item["request"]) if isinstance(item.get("request"), dict) else None
                    for item in items}
    except (ManifestError, OSError, TypeError, ValueError):
        return None


def _manifest_total(reader: OutputReader) -> int | None:
    """The item count in the manifest's header (when its items can't be read)."""
    try:
        header, items = reader.manifest()
        items.close()
        total = header["summary"]["total"]
    except (ManifestError, OSError, KeyError, TypeError, ValueError):
        return None
    return total if isinstance(total, int) else None


def _latest(journal: Journal) -> dict[str, dict[str, Any]]:
    """Each item the journal names, as `_records.replay` left it, with its latest item record's details
    when it is done or failed (read back by offset), in the journal's order of first mention."""
    latest: dict[str, dict[str, Any]] = {}
    with open(journal.path, "rb") as fh:
        for item_id, entry in journal.entries.items():
            rec = journal.record(item_id, fh) if entry.status in ("done", "failed") else None
            if rec is None:
                latest[item_id] = {**_PENDING, "rhash": entry.rhash}
                continue
            d = details(rec)
            latest[item_id] = {"status": entry.status, "code": d.code, "message": d.message, "images": d.images,
                               "cost": d.cost, "endpoint": d.endpoint, "rhash": entry.rhash}
    return latest


def _result(out: str, total: int, totals: dict[str, int], failures: dict[str, dict[str, Any]], made: int,
            cost: float | None, by_endpoint: dict[str, dict[str, Any]], images: int, nbytes: int,
            run_level: list[dict[str, Any]]) -> dict[str, Any]:
    """`status`'s answer, whichever way it was counted (replayed, or from the checkpoint): `run_level`
    are the journal's records about the run (runs, and a provider batch's steps), in order."""
    runs = [rec.get("at", "") for rec in run_level if kind(rec) == "run"]
    return {
        "out": out,
        "total": total,
        **totals,
        "failures": {code: {**g, "reasons": dict(sorted(g["reasons"].items(), key=lambda kv: -kv[1]))}
                     for code, g in sorted(failures.items(), key=lambda kv: -kv[1]["count"])},
        "images": made,
        "cost": round(cost, 6) if cost is not None else None,
        "endpoints": by_endpoint,
        "images_on_disk": images,
        "bytes_on_disk": nbytes,
        "first_run": runs[0] if runs else None,
        "last_run": runs[-1] if runs else None,
        "runs": len(runs),
        # provider batches (`run --batch`), as the journal last saw them
        "batches": [chunk.as_row() for chunk in chunks_of(run_level).values()],
    }


def _status(journal_path: Path, out: OutputReader | Path, journal: Journal | None = None) -> dict[str, Any]:
    """The status of the output `out` (a reader, or a folder's path) from its journal, replayed."""
    reader = out if isinstance(out, OutputReader) else FolderOutput(out)
    if journal is None:
        journal = Journal.read(journal_path)
    latest = _latest(journal)
    run_level = journal.runs
    has_manifest = reader.has_manifest()
    current = _current_items(reader) if has_manifest else None
    if current is not None:
        # the items of the job as the last run saw it: records of ids or requests it no longer has
        # (a changed --size makes new derived ids) are history, not items
        latest = {item_id: info if info is not None and rhash in (None, info["rhash"]) else dict(_PENDING)
                  for item_id, rhash in current.items() for info in (latest.get(item_id),)}
    totals = {"done": 0, "failed": 0, "pending": 0}
    failures: dict[str, dict[str, Any]] = {}
    images = nbytes = made = 0
    cost: float | None = None
    by_endpoint: dict[str, dict[str, Any]] = {}
    for info in latest.values():
        if info["endpoint"] and info["status"] in ("done", "failed"):
            counts = by_endpoint.setdefault(info["endpoint"], {"done": 0, "failed": 0, "cost": None})
            counts[info["status"]] += 1
            if info["status"] == "done" and info["cost"] is not None:
                counts["cost"] = round((counts["cost"] or 0.0) + info["cost"], 6)
        if info["status"] == "done":
            made += len(info["images"])
            if info["cost"] is not None:
                cost = (cost or 0.0) + info["cost"]
        totals[info["status"]] = totals.get(info["status"], 0) + 1
        if info["status"] == "failed":
            group = failures.setdefault(str(info["code"]), {"count": 0, "example": info["message"], "reasons": {}})
            group["count"] += 1
            reason = short_reason(info["message"])
            group["reasons"][reason] = group["reasons"].get(reason, 0) + 1
    files = [image["file"] for info in latest.values() for image in info["images"]]
    sizes = reader.sizes(files)  # a folder stats each file; a store lists each folder once
    for file in files:
        if file in sizes:
            images += 1
            nbytes += sizes[file]
    total = len(current) if current is not None else None
    if current is None and has_manifest:
        total = _manifest_total(reader)
    if total is not None:
        totals["pending"] = max(total - totals["done"] - totals["failed"], totals["pending"])
    return _result(reader.where, total if total is not None else sum(totals.values()), totals, failures, made, cost, by_endpoint, images, nbytes,
                   run_level)


# -- from the checkpoint: SQL aggregates, no replay ---------------------------------------------

_DONE_OR_FAILED = "s.status IN ('done', 'failed')"
MAX_ENDPOINTS = 64  # columns per endpoint in one pass; more (never seen) replays instead
FULL_FILE_CHECK_BELOW = 10_000  # = _runner.FULL_FILE_CHECK_BELOW (not imported: status starts without the HTTP stack)


def _from_checkpoint(root: Path, journal: Path) -> dict[str, Any] | None:
    """`_status` answered from `OUT/.checkpoint.sqlite` plus the journal's tail; None to replay instead.

    Usable when the checkpoint matches the journal (see `_checkpoint`) and holds the items of the
    manifest now on disk (stamped by the run that wrote it). Read-only: the tail since the
    checkpoint is applied in memory (a temp table), never written back, so `status` works on a
    read-only folder and never races a run's own refresh. Images on disk: below 10,000 items every
    file is checked, as today; in a larger output, as in a rerun, the files a run has verified are
    counted from the checkpoint (a file deleted by hand since is not noticed) and the few it has not
    verified are checked here.
    """
    from ._checkpoint import open_readonly

    opened = open_readonly(journal)
    if opened is None:
        return None
    db, offset = opened
    try:
        return _aggregate(db, root, journal, offset)
    except (sqlite3.Error, OSError, KeyError, TypeError, ValueError, AttributeError, ManifestError):
        return None
    finally:
        db.close()


def _manifest_matches(db: sqlite3.Connection, root: Path) -> int | None:
    """The number of current items if the checkpoint's `current` table is that of the manifest on disk."""
    meta = dict(db.execute("SELECT k, v FROM meta WHERE k IN ('manifest', 'current', 'current_total')").fetchall())
    stamp = json.loads(meta["manifest"])
    index = root / "manifest.d" / "index.json"  # see _segments
    st = (index if index.is_file() else root / "manifest.json").stat()
    if not isinstance(stamp, dict) or [stamp.get("items"), stamp.get("size"), stamp.get("mtime_ns")] != \
            [meta.get("current"), st.st_size, st.st_mtime_ns]:
        return None
    return int(meta["current_total"])


def _tail(db: sqlite3.Connection, journal: Path, offset: int
          ) -> tuple[dict[str, list[Any]], list[dict[str, Any]]] | None:
    """The journal past the checkpoint, replayed by the checkpoint's rules into rows; None if unreadable."""
    from ._checkpoint import _COLUMNS, _apply, _Tail

    select = f"SELECT {', '.join(_COLUMNS)} FROM items WHERE id = ?"
    changed = _Tail(lambda item_id: db.execute(select, (item_id,)).fetchone())
    rows = changed.rows
    runs: list[dict[str, Any]] = []  # the records about the run (RUN_KINDS), as the checkpoint keeps them
    with open(journal, "rb") as fh:
        fh.seek(offset)
        at = offset
        for raw in fh:
            if not raw.endswith(b"\n"):
                break  # a torn last line, as a replay tolerates it
            try:
                rec = json.loads(raw)
            except (ValueError, RecursionError):
                return None  # a replay says what is wrong
            if not isinstance(rec, dict) or "t" not in rec:
                return None
            if rec["t"] in ("attempt", "item"):
                check_fields(rec)
                _apply(changed, rec, at)
            elif rec["t"] in RUN_KINDS:
                runs.append(rec)
            at += len(raw)
    return rows, runs


def _aggregate(db: sqlite3.Connection, root: Path, journal: Path, offset: int) -> dict[str, Any] | None:
    from ._checkpoint import _COLUMNS

    total = _manifest_matches(db, root)
    if total is None:
        return None
    tail = _tail(db, journal, offset)
    if tail is None:
        return None
    tail_rows, tail_runs = tail
    db.create_function("short_reason", 1, short_reason, deterministic=True)
    if tail_rows:
        db.execute(f"CREATE TEMP TABLE tail (id TEXT PRIMARY KEY, {', '.join(_COLUMNS)})")
        db.executemany(f"INSERT INTO temp.tail VALUES ({', '.join('?' * (len(_COLUMNS) + 1))})",
                       [(k, *v) for k, v in tail_rows.items()])
    counted = _tallied(db, tail_rows)
    if counted is not None:
        found = _counted(db, root, journal, total, tail_rows, tail_runs, counted)
        if found is not None:
            return found
    return _counted(db, root, journal, total, tail_rows, tail_runs, None)


def _tallied(db: sqlite3.Connection, tail_rows: dict[str, list[Any]]) -> Any:
    """The run-kept tally (see _tally) with the journal's tail counted in, in memory; None when there is
    none for this checkpoint as it stands, or the tail moves an endpoint's first item (counted in full)."""
    from ._checkpoint import _SELECT_ONE
    from ._tally import TallyError, load_matching, place

    tally = load_matching(db)
    if tally is None or db.execute("SELECT 1 FROM main.sqlite_master WHERE type = 'index' AND name = 'unverified'"
                                   ).fetchone() is None:  # the failures are read through it
        return None
    try:
        for item_id, row in tail_rows.items():
            where = place(db, item_id)
            if where is not None:
                tally.change(db.execute(_SELECT_ONE, (item_id,)).fetchone(), row, where)
        tally.check()
    except TallyError:
        return None
    return None if tally.lost_first else tally


# totals, images made, cost, verified images and bytes, endpoint rows, unverified rows, rows with images
_Counts = tuple[dict[str, int], int, float | None, int, int, list[tuple[Any, ...]], int, int]


def _count_all(db: sqlite3.Connection, query: Callable[..., list[tuple[Any, ...]]],
               tail_rows: dict[str, list[Any]]) -> _Counts | None:
    """Every current item counted (O(items)); None with more than MAX_ENDPOINTS endpoints (replayed instead).

    One pass over the current items with conditional aggregates: no GROUP BY sort, so constant memory.
    """
    df = _DONE_OR_FAILED
    endpoints = sorted({e for (e,) in db.execute("SELECT DISTINCT endpoint FROM main.items")} |
                       {row[7] for row in tail_rows.values()} - {None, ""}, key=str)
    if len(endpoints) > MAX_ENDPOINTS:
        return None
    columns = ["SUM(s.status = 'done')", "SUM(s.status = 'failed')", "SUM(s.status = 'pending')",
               "SUM(CASE WHEN s.status = 'done' THEN s.images END)",
               "SUM(CASE WHEN s.status = 'done' THEN s.cost END)",
               f"SUM(CASE WHEN s.verified = 1 AND {df} THEN s.images END)",
               f"SUM(CASE WHEN s.verified = 1 AND {df} THEN s.bytes END)",
               f"SUM(s.verified = 0 AND s.images > 0 AND {df})", f"SUM(s.images > 0 AND {df})"]
    for _ in endpoints:
        columns += ["SUM(s.endpoint = ? AND s.status = 'done')", "SUM(s.endpoint = ? AND s.status = 'failed')",
                    "SUM(CASE WHEN s.endpoint = ? AND s.status = 'done' THEN s.cost END)",
                    f"MIN(CASE WHEN s.endpoint = ? AND {df} THEN c.pos END)"]
    args = [e for e in endpoints for _ in range(4)]
    totals: dict[str, int] = {"done": 0, "failed": 0, "pending": 0}
    made = images = nbytes = unverified = with_images = 0
    cost: float | None = None
    endpoint_rows: list[tuple[Any, ...]] = []
    for row in query(", ".join(columns), args=args):
        for k, key in enumerate(("done", "failed", "pending")):
            totals[key] += row[k] or 0
        made += row[3] or 0
        if row[4] is not None:
            cost = (cost or 0.0) + row[4]
        images += row[5] or 0
        nbytes += row[6] or 0
        unverified += row[7] or 0
        with_images += row[8] or 0
        for i, endpoint in enumerate(endpoints):
            done, failed, ep_cost, pos = row[9 + 4 * i : 13 + 4 * i]
            if pos is not None:
                endpoint_rows.append((pos, endpoint, done or 0, failed or 0, ep_cost))
    return totals, made, cost, images, nbytes, endpoint_rows, unverified, with_images


def _counted(db: sqlite3.Connection, root: Path, journal: Path, total: int, tail_rows: dict[str, list[Any]],
             tail_runs: list[dict[str, Any]], tally: Any) -> dict[str, Any] | None:
    """`status` from the checkpoint: the counts from `tally` when given (then only failed and unverified
    rows are read, through the `unverified` index; None if they disagree with it), else counted in full."""
    sources = ["main.items s", "temp.tail s"] if tail_rows else ["main.items s"]

    def query(select: str, where: str = "1", group: str = "", args: list[Any] | None = None,
              indexed: bool = False) -> list[tuple[Any, ...]]:
        out: list[tuple[Any, ...]] = []
        for src in sources:  # the checkpoint's rows the tail did not replace, then the tail's
            main = src.startswith("main")
            skip = " AND s.id NOT IN (SELECT id FROM temp.tail)" if main and tail_rows else ""
            # indexed: `where` names unverified rows only (failed rows are never verified): O(those rows)
            if main and indexed:
                src = "main.items AS s INDEXED BY unverified"
            out += db.execute(f"SELECT {select} FROM main.current c JOIN {src} ON s.id = c.id "
                              f"WHERE (c.rhash IS NULL OR c.rhash = s.rhash) AND ({where}){skip} {group}",
                              args or []).fetchall()
        return out

    df = _DONE_OR_FAILED
    full_check = total < FULL_FILE_CHECK_BELOW  # a run checks every file of a small output: status too
    if tally is not None:
        numbers: _Counts | None = (tally.totals(), tally.made, tally.total_cost(), tally.images, tally.nbytes,
                                   tally.endpoint_rows(), 1, 1)  # unverified, with images: the queries below say
    else:
        numbers = _count_all(db, query, tail_rows)
    if numbers is None:
        return None
    totals, made, cost, images, nbytes, endpoint_rows, unverified, with_images = numbers
    totals["pending"] = max(total - totals["done"] - totals["failed"], totals["pending"])
    by_endpoint: dict[str, dict[str, Any]] = {}
    for _pos, endpoint, done, failed, ep_cost in sorted(endpoint_rows, key=lambda r: r[0]):
        counts = by_endpoint.setdefault(endpoint, {"done": 0, "failed": 0, "cost": None})
        counts["done"] += done
        counts["failed"] += failed
        if ep_cost is not None:
            counts["cost"] = round((counts["cost"] or 0.0) + ep_cost, 6)
    if full_check:
        images = nbytes = 0

    failures: dict[str, dict[str, Any]] = {}
    fast = tally is not None
    groups = query("s.code, short_reason(s.message), COUNT(*), MIN(c.pos), s.message",
                   "s.verified = 0 AND s.status = 'failed'" if fast else "s.status = 'failed'", "GROUP BY 1, 2",
                   indexed=fast)
    if fast and sum(g[2] for g in groups) != totals["failed"]:
        return None  # a failed row outside the index: not as the checkpoint writes them
    for code, reason, n, _pos, message in sorted(groups, key=lambda r: r[3]):
        group = failures.setdefault(str(code), {"count": 0, "example": message, "reasons": {}})
        group["count"] += n
        group["reasons"][reason] = group["reasons"].get(reason, 0) + n

    checked = "1" if full_check else "s.verified = 0"
    unchecked = query("s.offset", f"{checked} AND s.images > 0 AND {df}", indexed=fast and not full_check) \
        if (with_images if full_check else unverified) else []
    if unchecked:
        with open(journal, "rb") as fh:
            for (at,) in sorted(unchecked):
                fh.seek(at)
                for image in json.loads(fh.readline()).get("images") or []:
                    path = root / image["file"]
                    if path.is_file():
                        images += 1
                        nbytes += path.stat().st_size

    run_level = [json.loads(raw) for (raw,) in db.execute("SELECT rec FROM main.runs ORDER BY n")] + tail_runs
    return _result(str(root), total, totals, failures, made, cost, by_endpoint, images, nbytes,
                   run_level)
