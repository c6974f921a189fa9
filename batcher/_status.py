"""`batcher status OUT`: what an output folder holds, read from its journal."""

from __future__ import annotations

import json
from contextlib import closing
from pathlib import Path
from typing import Any

from ._exceptions import ManifestError
from ._ids import request_hash
from ._manifest import Journal, iter_manifest, iter_records

__all__ = ["status", "short_reason"]


def status(out: str | Path) -> dict[str, Any]:
    """Totals by status and by endpoint, failures grouped by error code, files on disk, runs.

    A sharded output (or one on object storage) is read through all shards' merged segments.
    """
    text = str(out)
    root = Path(out)
    if "://" in text or (not (root / "manifest.jsonl").is_file() and (root / "segments").is_dir()):
        from ._store import merged_journal, open_store

        store = open_store(out)
        with merged_journal(store) as journal:
            info = _status(journal.path, None if "://" in text else root)
        info["out"] = text
        info["shards"] = _shard_markers(store)
        return info
    journal_path = root / "manifest.jsonl"
    if not journal_path.is_file():
        raise ManifestError(f"{root}: no batcher manifest here (missing {journal_path.name})")
    Journal.read(journal_path)  # raises a clear ManifestError on a corrupt journal
    return _status(journal_path, root)


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


def _current_items(manifest: Path) -> dict[str, str | None] | None:
    """Each item id of `manifest.json` with its request hash; None when it can't be read."""
    try:
        _header, items = iter_manifest(manifest)
        with closing(items):
            return {item["id"]: request_hash(item["request"]) if isinstance(item.get("request"), dict) else None
                    for item in items}
    except (ManifestError, OSError, TypeError, ValueError):
        return None


def _status(journal_path: Path, root: Path | None) -> dict[str, Any]:
    latest: dict[str, dict[str, Any]] = {}
    runs: list[str] = []
    for rec in iter_records(journal_path):
        kind = rec.get("t")
        if kind == "item":
            err = rec.get("error") or {}
            latest[rec["id"]] = {
                "status": rec.get("status"),
                "code": err.get("code") or (f"http_{err['status']}" if err.get("status") else err.get("kind")),
                "message": err.get("message"),
                "images": rec.get("images") or [],
                "cost": rec.get("cost"),
                "endpoint": rec.get("endpoint"),
                "rhash": rec.get("rhash"),
            }
        elif kind == "attempt":
            prev = latest.get(rec["id"])
            if prev is None or prev["status"] != "done" or prev["rhash"] != rec.get("rhash"):
                latest[rec["id"]] = {**_PENDING, "rhash": rec.get("rhash")}
        elif kind == "run":
            runs.append(rec.get("at", ""))
    manifest = root / "manifest.json" if root is not None else None
    segmented = root is not None and (root / "manifest.d" / "index.json").is_file()  # see _segments
    current = _current_items(manifest) if manifest is not None and (manifest.is_file() or segmented) else None
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
        for image in info["images"] if root is not None else ():
            path = root / image["file"]
            if path.is_file():
                images += 1
                nbytes += path.stat().st_size
    total = len(current) if current is not None else None
    if current is None and manifest is not None and manifest.is_file():
        try:
            with open(manifest, "rb") as fh:
                head = fh.read(65536).decode("utf-8", "replace")
            start = head.index('"summary": ') + len('"summary": ')
            total = json.loads(head[start : head.index("}", start) + 1]).get("total")
        except (ValueError, OSError):
            total = None
    if total is not None:
        totals["pending"] = max(total - totals["done"] - totals["failed"], totals["pending"])
    return {
        "out": str(root) if root is not None else "",
        "total": total if total is not None else sum(totals.values()),
        **totals,
        "failures": {code: {**g, "reasons": dict(sorted(g["reasons"].items(), key=lambda kv: -kv[1]))}
                     for code, g in sorted(failures.items(), key=lambda kv: -kv[1]["count"])},
        "images": made,
        "cost": round(cost, 6) if cost is not None else None,
        "endpoints": by_endpoint,
        "images_on_disk": images if root is not None else None,
        "bytes_on_disk": nbytes,
        "first_run": runs[0] if runs else None,
        "last_run": runs[-1] if runs else None,
        "runs": len(runs),
    }
