"""`batcher status OUT`: what an output folder holds, read from its journal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ._exceptions import ManifestError
from ._manifest import Journal, iter_records

__all__ = ["status"]


def status(out: str | Path) -> dict[str, Any]:
    """Totals by status, failures grouped by error code, files on disk, first and last runs."""
    root = Path(out)
    journal_path = root / "manifest.jsonl"
    if not journal_path.is_file():
        raise ManifestError(f"{root}: no batcher manifest here (missing {journal_path.name})")
    Journal.read(journal_path)  # raises a clear ManifestError on a corrupt journal
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
            }
        elif kind == "attempt":
            prev = latest.get(rec["id"])
            if prev is None or prev["status"] != "done":
                latest[rec["id"]] = {"status": "pending", "code": None, "message": None, "images": [], "cost": None}
        elif kind == "run":
            runs.append(rec.get("at", ""))
    totals = {"done": 0, "failed": 0, "pending": 0}
    failures: dict[str, dict[str, Any]] = {}
    images = nbytes = made = 0
    cost: float | None = None
    for info in latest.values():
        if info["status"] == "done":
            made += len(info["images"])
            if info["cost"] is not None:
                cost = (cost or 0.0) + info["cost"]
        totals[info["status"]] = totals.get(info["status"], 0) + 1
        if info["status"] == "failed":
            group = failures.setdefault(str(info["code"]), {"count": 0, "example": info["message"]})
            group["count"] += 1
        for image in info["images"]:
            path = root / image["file"]
            if path.is_file():
                images += 1
                nbytes += path.stat().st_size
    total = None
    manifest = root / "manifest.json"
    if manifest.is_file():
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
        "out": str(root),
        "total": total if total is not None else sum(totals.values()),
        **totals,
        "failures": dict(sorted(failures.items(), key=lambda kv: -kv[1]["count"])),
        "images": made,
        "cost": round(cost, 6) if cost is not None else None,
        "images_on_disk": images,
        "bytes_on_disk": nbytes,
        "first_run": runs[0] if runs else None,
        "last_run": runs[-1] if runs else None,
        "runs": len(runs),
    }
