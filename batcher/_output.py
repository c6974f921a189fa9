"""One output, read the same way wherever it lives: a local folder or an object store (`s3://`, `gs://`).

    >>> out = open_output("s3://bucket/run1")        # or "output/example"
    >>> header, items = out.manifest()                # manifest.json, streamed
    >>> with out.journal() as journal:                # the replayed journal (all shards merged), or None
    ...     journal.entries.get(item_id)

Every reader of an output (`plan --out`, `export`, `report`, `status`) goes through this, so each
works on `s3://` as on a folder. A run writes elsewhere: `_writer.OutputDir` locally,
`_sharded.ShardedOutput` into a store. `FolderOutput` keeps what only a folder has (a single run's
`manifest.jsonl` read in place, a segmented `manifest.d/`, hard links, symbolic links that must not
lead out); `StoreOutput` reads through `_store.Store`, so any fsspec backend works.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeGuard

from ._exceptions import ManifestError
from ._manifest import Journal, iter_manifest, read_manifest
from ._manifest import _Items as ManifestItems
from ._store import LOCAL_JOURNAL, MANIFEST, SEGMENTS, LocalStore, Store, is_remote, merged_journal, open_store

__all__ = ["OutputReader", "FolderOutput", "StoreOutput", "OutsideError", "open_output"]


class OutsideError(ValueError):
    """A file name that leads outside the output (a `..` part, or a symbolic link out of a folder)."""


class OutputReader:
    """What a reader may ask of an output. `rel` is always a relative name inside it (`images/a.png`).

    A file's *handle* (from `find`) is what `copy` takes: a local path for a folder, the relative
    name for a store (which `copy` also takes as it is).
    """

    store: Store
    where: str  # the path or URL, as messages show it

    @property
    def name(self) -> str:
        """The output's last path part (a report's fallback title)."""
        return self.where.rstrip("/").rsplit("/", 1)[-1]

    def url_of(self, rel: str) -> str:
        return self.store.url_of(rel)

    def manifest(self) -> tuple[dict[str, Any], ManifestItems]:
        """`manifest.json`'s header and its items, streamed (see `_manifest.iter_manifest`)."""
        try:
            fh = self.store.open(MANIFEST)
        except FileNotFoundError:
            raise ManifestError(f"{self.url_of(MANIFEST)}: no manifest here; `batcher run` writes it at the "
                                f"end of every run") from None
        return read_manifest(fh, self.url_of(MANIFEST))

    def has_manifest(self) -> bool:
        return self.store.exists(MANIFEST)

    @contextlib.contextmanager
    def journal(self) -> Iterator[Journal | None]:
        """The output's journal, read-only: a local `manifest.jsonl` and every shard's segments, merged
        into a temporary local file (gone when the block ends). A folder without any journal: None."""
        with merged_journal(self.store) as journal:
            yield journal

    def find(self, rel: str) -> str | None:
        """The handle of file `rel`, or None when it is not there. OutsideError if it leads out."""
        _check_inside(rel)
        return rel if self.store.size(rel) is not None else None

    def copy(self, handle: str, dst: str) -> None:
        """Copy the file's bytes to the local path `dst` (a store's are downloaded, streamed);
        FileNotFoundError when it is gone. Safe to call from several threads at once."""
        self.store.get(handle, dst)

    def sizes(self, rels: Iterable[str]) -> dict[str, int]:
        """Size of each of `rels` that exists. A store lists each folder once instead of asking per file."""
        listed: dict[str, dict[str, int]] = {}
        out: dict[str, int] = {}
        for rel in rels:
            if not is_inside(rel):
                continue  # a hand-edited journal's name never makes a store list outside the output
            folder, _, base = rel.rpartition("/")
            if folder not in listed:
                listed[folder] = dict(self.store.list(folder))
            if base in listed[folder]:
                out[rel] = listed[folder][base]
        return out

    def put(self, rel: str, src: Path) -> str:
        """Write (or replace) `rel` from the local file `src`, atomically: readers see old or new. Its URL."""
        self.store.put(rel, src)
        return self.url_of(rel)


class StoreOutput(OutputReader):
    """An output in object storage (`s3://bucket/prefix`), read through an fsspec `Store`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.where = store.url


class FolderOutput(OutputReader):
    """An output folder on this machine: what a store reader does, plus what only a folder has."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.store = LocalStore(self.root)
        self.where = str(self.root)
        self._root = str(self.root)
        self._real_root = os.path.realpath(self.root)
        self._folders: dict[str, str] = {}  # image folder -> its real path, checked to be inside

    @property
    def name(self) -> str:
        return self.root.name

    def url_of(self, rel: str) -> str:
        return str(self.root / rel)

    @property
    def sharded(self) -> bool:
        """Whether shards' journal segments are here (then the journal is their merge)."""
        return (self.root / SEGMENTS).is_dir()

    @property
    def journal_path(self) -> Path | None:
        """A single run's `manifest.jsonl`, read in place (status answers from its checkpoint)."""
        path = self.root / LOCAL_JOURNAL
        return path if not self.sharded and path.is_file() else None

    def manifest(self) -> tuple[dict[str, Any], ManifestItems]:
        return iter_manifest(self.root / MANIFEST)  # also a large output's segmented manifest.d/

    def has_manifest(self) -> bool:
        from ._segments import INDEX, SEGMENT_DIR  # see _segments

        return (self.root / MANIFEST).is_file() or (self.root / SEGMENT_DIR / INDEX).is_file()

    @contextlib.contextmanager
    def journal(self) -> Iterator[Journal | None]:
        path = self.journal_path
        if path is not None:
            yield Journal.read(path)
        elif self.sharded:
            with super().journal() as journal:
                yield journal
        else:
            yield None

    def find(self, rel: str) -> str | None:
        # Plain strings, not pathlib: pathlib interns every path part, and an interpreter-wide table
        # growing by one entry per image would break export's constant-memory promise.
        _check_inside(rel)
        folder = rel.rpartition("/")[0]
        if folder not in self._folders:  # a folder's real place is resolved once (export: ~10 s per 100k)
            real = os.path.realpath(os.path.join(self._root, folder))
            if real != self._real_root and not real.startswith(self._real_root + os.sep):
                raise OutsideError(f"{rel!r} leads outside {self.root}")
            if len(self._folders) < 4096:
                self._folders[folder] = real
        path = os.path.join(self._root, rel)
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if stat.S_ISLNK(st.st_mode):  # the file itself a link: where it leads, resolved every time
            if not os.path.realpath(path).startswith(self._real_root + os.sep):
                raise OutsideError(f"{rel!r} leads outside {self.root}")
            return path if os.path.isfile(path) else None
        return path if stat.S_ISREG(st.st_mode) else None

    def copy(self, handle: str, dst: str) -> None:
        shutil.copyfile(handle, dst)

    def sizes(self, rels: Iterable[str]) -> dict[str, int]:
        out: dict[str, int] = {}
        for rel in rels:
            path = self.root / rel
            if path.is_file():
                out[rel] = path.stat().st_size
        return out


def _check_inside(rel: Any) -> None:
    if not is_inside(rel):
        raise OutsideError(f"{rel!r} is not a path inside the output")


def is_inside(file: Any) -> TypeGuard[str]:
    """Whether a manifest's image `file` is a relative path that stays inside OUT."""
    return (isinstance(file, str) and file != "" and not file.startswith("/") and "\\" not in file
            and ".." not in file.split("/") and "\x00" not in file)


def open_output(out: str | os.PathLike[str], **storage_options: Any) -> OutputReader:
    """The reader for `OUT`: `scheme://...` is object storage (fsspec), anything else a local folder.

    `storage_options` (an endpoint, say; never secrets) reach fsspec; credentials come from the
    provider's standard chain.
    """
    if is_remote(out):
        return StoreOutput(open_store(out, storage_options=storage_options or None))
    return FolderOutput(os.fspath(out).removeprefix("file://"))
