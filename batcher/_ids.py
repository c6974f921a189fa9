"""Item identity: stable ids from explicit ids or request bodies, and safe file names."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

__all__ = ["canonical_json", "request_hash", "IdAssigner", "FileNames", "image_stems", "safe_stem"]

# Fields that change how an image is delivered, not which image is asked for.
_TRANSPORT_FIELDS = frozenset({"response_format"})
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
_RESERVED = frozenset(
    {"con", "prn", "aux", "nul"} | {f"com{i}" for i in range(10)} | {f"lpt{i}" for i in range(10)}
)
MAX_STEM = 96


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def request_hash(body: dict[str, Any]) -> str:
    """Short hex digest of what the request asks for (transport fields excluded)."""
    core = {k: v for k, v in body.items() if k not in _TRANSPORT_FIELDS}
    return hashlib.sha256(canonical_json(core).encode()).hexdigest()[:16]


class IdAssigner:
    """Hands out item ids while a job streams past, using memory of 64-bit digests only.

    Derived ids are the request hash; the k-th identical request gets `-k` (k ≥ 2), so
    inserting a line elsewhere never renames another item. `assign` returns None for an
    explicit id seen before (a validation error for the caller to report).
    """

    def __init__(self) -> None:
        self._explicit: set[int] = set()
        self._derived: set[int] = set()
        self._repeats: dict[int, int] = {}  # only requests seen more than once

    @staticmethod
    def _key(text: str) -> int:
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")

    def seed(self, rhash: str, count: int) -> None:
        """As if `count` items with ids derived from `rhash` were assigned already (a job's old part)."""
        key = int(rhash, 16)
        self._derived.add(key)
        if count > 1:
            self._repeats[key] = count

    def assign(self, explicit: str | None, rhash: str) -> str | None:
        if explicit is not None:
            key = self._key(explicit)
            if key in self._explicit:
                return None
            self._explicit.add(key)
            return explicit
        key = int(rhash, 16)
        if key not in self._derived:
            self._derived.add(key)
            return rhash
        count = self._repeats.get(key, 1) + 1
        self._repeats[key] = count
        return f"{rhash}-{count}"


def safe_stem(item_id: str) -> str:
    """A file-name stem for an id: no separators, no `..`, no leading dot, bounded length.

    Ids that had to change get a short digest of the original so two ids never share a stem.
    """
    stem = _UNSAFE.sub("_", item_id).lstrip(".")
    stem = stem.replace("..", "_")
    changed = stem != item_id
    if not stem or stem.split(".")[0].lower() in _RESERVED:
        stem = "_" + stem
        changed = True
    if len(stem) > MAX_STEM:
        stem = stem[:MAX_STEM]
        changed = True
    if changed:
        digest = hashlib.sha256(item_id.encode("utf-8", "surrogatepass")).hexdigest()[:10]
        stem = f"{stem}~{digest}"
    return stem


def image_stems(item_id: str, images: int) -> list[str]:
    """The file-name stems (no extension) an item's images get: `<stem>`, or `<stem>_<k>` for n > 1."""
    stem = safe_stem(item_id)
    return [stem] if images <= 1 else [f"{stem}_{k}" for k in range(1, images + 1)]


class FileNames:
    """The image file names handed out so far in one pass over a job, to refuse two items writing
    one file: `{"id": "x", "n": 2}` writes x_1.png and x_2.png, so `{"id": "x_1"}` would overwrite
    one. Memory: one 64-bit hash per name (the pass's own: never stored or compared across runs).
    """

    def __init__(self) -> None:
        self._taken: set[int] = set()

    def claim(self, stems: list[str]) -> str | None:
        """Take these stems, or return the first one already taken (and take none)."""
        if len(stems) == 1:  # the common case, kept cheap: validation runs this once per item
            key = hash(stems[0])
            if key in self._taken:
                return stems[0]
            self._taken.add(key)
            return None
        keys = [hash(stem) for stem in stems]
        for stem, key in zip(stems, keys, strict=True):
            if key in self._taken:
                return stem
        self._taken.update(keys)
        return None
