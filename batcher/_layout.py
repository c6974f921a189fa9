"""An output folder's layout: where images go, and whether the manifest is one file or segments.

Images: flat (`images/<stem>.png`) or fanned out over 256 subfolders.

A single directory of millions of files is slow on most filesystems (and tools: ls, rsync,
backups), so an output that starts with a large job spreads its images over
`images/<2 hex>/<stem>.<ext>`, the subfolder being the first byte of sha256(stem): even spread,
stable, computable from the id alone. The choice is made once, by the output's first run, and
recorded in `OUT/layout.json`; every later run reads it, so the layout never changes mid-output.
Outputs made before this (a journal but no layout.json) stay flat. Readers need not care: the
manifest's `file` paths say where each image is.

Manifest: the same rule makes a large output keep its manifest as segments (see _segments), so a
run rewrites what changed, not every item; a small one keeps the single `manifest.json`.

    >>> layout = decide_layout(out, total_items=250_000, fresh=True)   # Layout("fanout", "segments")
    >>> image_subdir("item-1", layout.images)                            # "3f/"
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Layout", "FLAT", "FANOUT", "SINGLE", "SEGMENTS", "FANOUT_FROM", "LAYOUT_FILE", "decide_layout",
           "read_layout", "image_subdir"]

FLAT, FANOUT = "flat", "fanout"
SINGLE, SEGMENTS = "single", "segments"
FANOUT_FROM = 10_000  # items in the first run's job from which a new output fans out
LAYOUT_FILE = "layout.json"


@dataclass(frozen=True)
class Layout:
    images: str = FLAT  # flat | fanout
    manifest: str = SINGLE  # single | segments


def read_layout(root: Path) -> Layout | None:
    """The recorded layout, or None when the output has none (unknown values read as the old ones)."""
    try:
        doc = json.loads((root / LAYOUT_FILE).read_text(encoding="utf-8"))
        images, manifest = doc.get("images"), doc.get("manifest")
    except (OSError, ValueError, AttributeError):
        return None
    return Layout(FANOUT if images == FANOUT else FLAT, SEGMENTS if manifest == SEGMENTS else SINGLE)


def decide_layout(root: Path, total_items: int, fresh: bool) -> Layout:
    """The output's layout: the recorded one, else decided now (a fresh, large output: fanout + segments)."""
    found = read_layout(root)
    if found is not None:
        return found
    large = fresh and total_items >= FANOUT_FROM
    layout = Layout(FANOUT, SEGMENTS) if large else Layout()
    tmp = root / f".{LAYOUT_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps({"images": layout.images, "manifest": layout.manifest}) + "\n", encoding="utf-8")
    os.replace(tmp, root / LAYOUT_FILE)  # whole or absent: never a half-written choice
    return layout


def image_subdir(stem: str, layout: str) -> str:
    """The folder under images/ for a stem ("" or "ab/")."""
    if layout != FANOUT:
        return ""
    return hashlib.sha256(stem.encode("utf-8", "surrogatepass")).hexdigest()[:2] + "/"
