"""Synthesize a finished output of N items fast: a JSONL job, a valid journal, image files, manifest.json.

    .venv/bin/python bench/fixture.py OUT_PARENT --items 1000000     # OUT_PARENT/job.jsonl + OUT_PARENT/out/

The journal is what `batcher run` would have written for N done items (one `run` record, N `item`
records with real request hashes, one `end` record); images are hard links to a few tiny PNGs
(ext4 allows ~65,000 links per inode, so one source per LINKS_PER_SOURCE), so 1,000,000 items cost
no image bytes and no inodes. `--new K` appends K items to the job that the journal does not hold
(a cron run's new work). Items go through batcher's own job parser, so ids and hashes are exact.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import struct
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from batcher._job import load_job  # noqa: E402
from batcher._layout import FANOUT, LAYOUT_FILE, SEGMENTS, image_subdir  # noqa: E402
from batcher._manifest import Journal, write_manifest  # noqa: E402
from batcher._segments import write_segments  # noqa: E402
from batcher._writer import OutputDir  # noqa: E402

LINKS_PER_SOURCE = 60_000
JOB_NAME = "scale-fixture"


def tiny_png(seed: int) -> bytes:
    """A valid 1x1 PNG whose pixel depends on seed (so sources differ)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixel = zlib.compress(b"\x00" + bytes([seed % 256, (seed >> 8) % 256, 7]))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", pixel) + chunk(b"IEND", b"")


def write_job(path: Path, count: int, start: int = 0, mode: str = "w") -> None:
    with open(path, mode, encoding="utf-8") as fh:
        fh.writelines(f'{{"id":"s-{i:07d}","prompt":"a synthetic prompt number {i}","size":"64x64"}}\n'
                      for i in range(start, start + count))


def job_header(path: Path, prompts: Path) -> None:
    path.write_text(f"name: {JOB_NAME}\nprompts_file: {prompts.name}\n", encoding="utf-8")


def synthesize(parent: Path, items: int, new: int = 0, manifest: bool = True, large: bool = False) -> dict[str, float]:
    """Write parent/job.yaml, parent/prompts.jsonl and parent/out/; return timings in seconds.

    `large`: the layout a new large output gets (images in subfolders, a segmented manifest);
    else the flat, single-file layout of outputs made before it.
    """
    t0 = time.monotonic()
    parent.mkdir(parents=True, exist_ok=True)
    prompts = parent / "prompts.jsonl"
    write_job(prompts, items)
    job_header(parent / "job.yaml", prompts)
    out = OutputDir(parent / "out")
    out.prepare()
    if large:
        (out.root / LAYOUT_FILE).write_text(json.dumps({"images": FANOUT, "manifest": SEGMENTS}) + "\n")
        for k in range(256):
            (out.images / f"{k:02x}").mkdir(exist_ok=True)
    times = {"job": time.monotonic() - t0}

    t0 = time.monotonic()
    sources: list[tuple[Path, bytes]] = []
    job = load_job(parent / "job.yaml")
    at = "2026-01-01T00:00:00.000Z"
    lines = [json.dumps({"t": "run", "job": JOB_NAME, "job_file": str(parent / "job.yaml"), "at": at,
                         "pid": 1}, separators=(",", ":"))]
    with open(out.journal, "w", encoding="utf-8") as jfh:
        for k, item in enumerate(job.all_items()):
            if k % LINKS_PER_SOURCE == 0:
                data = tiny_png(k // LINKS_PER_SOURCE)
                src = out.images / f".src-{k // LINKS_PER_SOURCE}.png"
                src.write_bytes(data)
                sources.append((src, data))
            src, data = sources[-1]
            name = (image_subdir(item.id, FANOUT) if large else "") + f"{item.id}.png"
            os.link(src, out.images / name)
            rec = {"t": "item", "id": item.id, "rhash": item.rhash, "status": "done", "request": item.body,
                   "created": 1767225600, "images": [{"file": f"images/{name}", "revised_prompt": None,
                   "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "width": 1, "height": 1,
                   "endpoint": "default", "model": item.body.get("model")}], "attempts": 1, "error": None,
                   "request_id": None, "endpoint": "default", "finished": at}
            lines.append(json.dumps(rec, ensure_ascii=False, separators=(",", ":")))
            if len(lines) >= 10_000:
                jfh.write("\n".join(lines) + "\n")
                lines.clear()
        lines.append(json.dumps({"t": "end", "at": at, "summary": {"total": items, "done": items, "failed": 0,
                                                                     "pending": 0}}, separators=(",", ":")))
        jfh.write("\n".join(lines) + "\n")
    for src, _ in sources:
        src.unlink()  # the links keep the bytes
    times["journal+images"] = time.monotonic() - t0

    if manifest:
        t0 = time.monotonic()
        journal = Journal.read(out.journal)
        meta = {"name": JOB_NAME, "file": str(parent / "job.yaml")}
        if large:
            write_segments(journal, out.root, meta, job.items)
        else:
            write_manifest(journal, out.manifest, meta, job.items)
        times["manifest.json"] = time.monotonic() - t0
    if new:
        write_job(prompts, new, start=items, mode="a")
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parent", type=Path)
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--new", type=int, default=0, help="items appended to the job that are not done")
    ap.add_argument("--no-manifest", action="store_true", help="skip writing manifest.json")
    ap.add_argument("--large", action="store_true", help="a new large output's layout: subfolders, segments")
    args = ap.parse_args()
    times = synthesize(args.parent, args.items, args.new, manifest=not args.no_manifest, large=args.large)
    print(json.dumps({k: round(v, 2) for k, v in times.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
