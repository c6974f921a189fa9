"""`batcher export OUT --format F --to DIR`: an output (a folder or `s3://...`) as a dataset other tools load.

    >>> batcher.export("output/example", "imagefolder", "datasets/example")
    {'format': 'imagefolder', 'items': 5, 'images': 6, 'failed': 0, 'missing': 0, 'shards': 0}

Formats:
    imagefolder    DIR/train/metadata.jsonl + images: Hugging Face `load_dataset("imagefolder", data_dir=DIR)`
    webdataset     DIR/shard-000000.tar ...: `<key>.<ext>` + `<key>.json` per image, `shard_size` per shard
    parquet        DIR/train/metadata.parquet + images: imagefolder's columns as one parquet table (`[parquet]` extra)
    openai-batch   DIR/results.jsonl in the Batch API's output format, images in DIR/images/

Read-only on OUT: items stream from `OUT/manifest.json` (constant memory) and images are
hard-linked (copied across file systems; downloaded one at a time from object storage). The export is built in a temporary sibling of DIR and
renamed into place, so a killed export never leaves a DIR that looks finished. DIR must be
absent, empty, or an earlier export of the same format (which is replaced).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import tarfile
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ._exceptions import ManifestError, OutputError
from ._ids import safe_stem
from ._output import FolderOutput, OutputReader, OutsideError, is_inside, open_output

__all__ = ["export", "FORMATS"]

FORMATS = ("imagefolder", "webdataset", "parquet", "openai-batch")
MARKER = ".batcher-export.json"  # hidden: dataset loaders skip dot files


def export(
    out: str | Path,
    fmt: str,
    to: str | Path,
    *,
    include_failed: bool = False,
    shard_size: int = 1000,
) -> dict[str, Any]:
    """Export the done items of `out` (and failed ones with `include_failed`) to `to` as `fmt`.

    Returns counts: items and images written, failed items written, images missing on disk
    (skipped), and webdataset shards.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r} (one of {', '.join(FORMATS)})")
    if shard_size < 1:
        raise ValueError("shard_size must be ≥ 1")
    if fmt == "parquet":
        _import_pyarrow()  # a missing extra fails before OUT is read or DIR touched
    reader, dest = open_output(out), Path(to)
    reader.manifest()[1].close()  # a missing or foreign manifest fails before DIR is touched
    _check_destination(dest, fmt)
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(dest)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        counts = {"format": fmt, "items": 0, "images": 0, "failed": 0, "missing": 0, "shards": 0}
        scratch = tmp / ".fetch"  # a store's downloads, moved into the export or removed
        src = _Source(reader, include_failed, scratch)
        try:
            _WRITERS[fmt](src, tmp, counts, shard_size)
        finally:
            src.close()  # no download still writes once the export is done or has failed
        shutil.rmtree(scratch, ignore_errors=True)
        source = str(reader.root.resolve()) if isinstance(reader, FolderOutput) else reader.where
        (tmp / MARKER).write_text(json.dumps({"format": fmt, "source": source, "counts": counts}) + "\n")
        _swap_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return counts


# -- reading OUT ----------------------------------------------------------------------------


PREFETCH = 16  # images downloaded ahead, in parallel, from object storage (a folder's are hard-linked)
_Fetches = dict[str, deque[Future[str | None]]]  # one item's downloads, by file name
_Row = tuple[int, dict[str, Any], _Fetches, int]  # line number, item, downloads, images in the window


class _Source:
    """The items an export takes from OUT, with their image files checked to stay inside OUT.

    From a folder an image's handle is its path (hard-linked into DIR). From object storage each
    done item's images are downloaded `PREFETCH` at a time ahead of the writer into `scratch`
    (inside DIR's temporary folder), so the writer finds them on disk, in manifest order; the
    handle is the downloaded file, moved into place.
    """

    def __init__(self, reader: OutputReader, include_failed: bool, scratch: Path) -> None:
        self.reader = reader
        self.manifest = reader.url_of("manifest.json")
        self.statuses = ("done", "failed") if include_failed else ("done",)
        self.local = isinstance(reader, FolderOutput)
        self.scratch = scratch
        self._fetched: _Fetches = {}  # the current item's downloads
        self._seq = itertools.count()
        self._pool: ThreadPoolExecutor | None = None

    def items(self, images: bool = True) -> Iterator[tuple[int, dict[str, Any]]]:
        """(line number, item) for every exported item; pending items never. With `images`, a
        store's images are fetched ahead (a pass that reads only metadata passes False)."""
        _, items = self.reader.manifest()
        rows = ((lineno, item) for lineno, item in enumerate(items, start=2) if item["status"] in self.statuses)
        if self.local or not images:
            yield from rows
            return
        yield from self._fetching(rows)

    def _fetching(self, rows: Iterator[tuple[int, dict[str, Any]]]) -> Iterator[tuple[int, dict[str, Any]]]:
        window: deque[_Row] = deque()
        queued = 0
        self._pool = pool = ThreadPoolExecutor(PREFETCH, thread_name_prefix="batcher-export")
        try:
            for lineno, item in rows:
                fetches: _Fetches = {}
                images = item.get("images") if item["status"] == "done" else None
                for image in images if isinstance(images, list) else ():
                    file = image.get("file") if isinstance(image, dict) else None
                    if is_inside(file):  # others raise, in order, when the writer asks for them
                        fetches.setdefault(file, deque()).append(pool.submit(self._download, file))
                weight = max(1, sum(map(len, fetches.values())))
                window.append((lineno, item, fetches, weight))
                queued += weight
                while queued >= PREFETCH:
                    queued -= window[0][3]
                    yield self._current(window.popleft())
            while window:
                yield self._current(window.popleft())
        finally:
            self.close()  # an export that stops early downloads no more

    def close(self) -> None:
        """Stop fetching: queued downloads are dropped, running ones finish before this returns."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _current(self, entry: _Row) -> tuple[int, dict[str, Any]]:
        lineno, item, self._fetched, _ = entry
        return lineno, item

    def _download(self, file: str) -> str | None:
        """Download one image into its own scratch folder (its file name is kept); None if it is gone."""
        folder = self.scratch / str(next(self._seq))
        folder.mkdir(parents=True)
        path = str(folder / os.path.basename(file))
        try:
            self.reader.copy(file, path)
        except FileNotFoundError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return None
        return path

    def image(self, file: Any, lineno: int) -> str | None:
        """The image's handle (a path on this machine), or None when it is gone from OUT."""
        if not is_inside(file):
            raise ManifestError(f"{self.manifest}:{lineno}: images.file: {file!r} is not a path inside "
                                f"{self.reader.where}")
        if not self.local:
            queue = self._fetched.get(file)
            return queue.popleft().result() if queue else self._download(file)
        try:
            return self.reader.find(file)
        except OutsideError:
            raise ManifestError(f"{self.manifest}:{lineno}: images.file: {file!r} leads outside "
                                f"{self.reader.where}") from None

    def place(self, handle: str, dst: str) -> None:
        """Put the image at `dst`: hard-linked from a folder (copied across file systems); a download is moved."""
        if self.local:
            _link(handle, dst)
        else:
            os.replace(handle, dst)

    @contextlib.contextmanager
    def opened(self, handle: str) -> Iterator[str]:
        """The image as a path to read once (a download is removed after)."""
        try:
            yield handle
        finally:
            if not self.local:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(handle)


def _common(item: dict[str, Any]) -> dict[str, Any]:
    request = item.get("request") or {}
    return {"id": item["id"], "prompt": request.get("prompt"), "model": request.get("model"),
            "size": request.get("size"), "quality": request.get("quality"), "created": item.get("created")}


def _optional(item: dict[str, Any]) -> dict[str, Any]:
    """The optional fields (matrix `vars`, estimated `cost`, `endpoint`) the item carries."""
    return {k: item[k] for k in ("vars", "cost", "endpoint") if item.get(k) is not None}


def _link(src: str, dst: str) -> None:
    """Hard-link when OUT and DIR share a file system (no bytes copied), else copy."""
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise
        shutil.copyfile(src, dst)


_LINE_SAFE = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def _jsonl(obj: Any) -> str:
    """One JSONL line. U+2028/U+2029/U+0085 are escaped: `str.splitlines()` and some JSONL readers
    treat them as line breaks, which would split a line inside a prompt."""
    return json.dumps(obj, ensure_ascii=False).translate(_LINE_SAFE) + "\n"


# -- imagefolder ----------------------------------------------------------------------------

FIXED_COLUMNS = ("file_name", "id", "image_index", "prompt", "revised_prompt", "model", "size", "quality",
                 "created")


def _var_column(name: str) -> str:
    # prefixed so a matrix variable called `id` or `file_name` can't clash with a fixed column
    return f"var_{name}"


def _var_value(value: Any) -> str | None:
    # one type per column for Arrow: matrix values become strings (JSON for non-strings)
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _imagefolder_rows(src: _Source, tmp: Path, counts: dict[str, Any]) -> tuple[list[str], Iterator[dict[str, Any]]]:
    """The metadata columns and rows (one per image, images placed in `tmp/train/`) of an imagefolder
    export; failed items go to `tmp/failed.jsonl` as the rows are consumed.

    Pass 1 learns the column set (matrix variables, cost, endpoint) so every row has the same
    columns, as the loader requires; memory holds the variable names only.
    """
    var_names: set[str] = set()
    has = {"cost": False, "endpoint": False}
    for _, item in src.items(images=False):
        if isinstance(item.get("vars"), dict):
            var_names.update(str(k) for k in item["vars"])
        for k in has:
            has[k] = has[k] or item.get(k) is not None
    columns = [*FIXED_COLUMNS, *(k for k in ("endpoint", "cost") if has[k]),
               *(_var_column(n) for n in sorted(var_names))]
    train = tmp / "train"
    train.mkdir()
    return columns, _image_rows(src, tmp, str(train), columns, counts)


def _image_rows(src: _Source, tmp: Path, train_dir: str, columns: list[str],
                counts: dict[str, Any]) -> Iterator[dict[str, Any]]:
    with open(tmp / "failed.jsonl", "w", encoding="utf-8") as failed:
        for lineno, item in src.items():
            base = _common(item)
            variables: dict[str, Any] = item["vars"] if isinstance(item.get("vars"), dict) else {}
            extra = {_var_column(str(k)): _var_value(v) for k, v in variables.items()}
            if item["status"] == "failed":
                error = item.get("error") or {}
                failed.write(_jsonl({**base, "status": "failed", "error_code": error.get("code"),
                                     "error_status": error.get("status"), "error_message": error.get("message"),
                                     **_optional(item)}))
                counts["failed"] += 1
                continue
            images = item.get("images") or []
            counts["items"] += 1
            for index, image in enumerate(images):
                path = src.image(image.get("file"), lineno)
                if path is None:
                    counts["missing"] += 1
                    continue
                name = os.path.basename(path)
                src.place(path, os.path.join(train_dir, name))
                row = {**base, "file_name": name, "image_index": index,
                       "revised_prompt": image.get("revised_prompt"), "endpoint": item.get("endpoint"),
                       "cost": item["cost"] / len(images) if item.get("cost") is not None else None, **extra}
                counts["images"] += 1
                yield {c: row.get(c) for c in columns}
    if counts["failed"] == 0:
        (tmp / "failed.jsonl").unlink()


def _imagefolder(src: _Source, tmp: Path, counts: dict[str, Any], shard_size: int) -> None:
    _, rows = _imagefolder_rows(src, tmp, counts)
    with open(tmp / "train" / "metadata.jsonl", "w", encoding="utf-8") as meta:
        for row in rows:
            meta.write(_jsonl(row))


# -- parquet ---------------------------------------------------------------------------------

ROW_GROUP = 10_000  # rows buffered per parquet row group: bounds memory (~40 MB of Python objects), not the file size


def _import_pyarrow() -> Any:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise OutputError("`--format parquet` needs pyarrow: pip install 'batcher[parquet]'") from None
    return pa, pq


def _parquet_type(pa: Any, column: str) -> Any:
    # one fixed type per column (Arrow wants it before the first row): numbers as numbers, the rest text
    return {"image_index": pa.int64(), "created": pa.int64(), "cost": pa.float64()}.get(column, pa.string())


def _parquet_value(column: str, value: Any) -> Any:
    """A value that fits its column's type; a hand-edited manifest's odd value becomes null or text."""
    if value is None:
        return None
    if column in ("image_index", "created"):
        return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    if column == "cost":
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)


def _parquet(src: _Source, tmp: Path, counts: dict[str, Any], shard_size: int) -> None:
    """The imagefolder layout with `train/metadata.parquet` (same columns) instead of metadata.jsonl:
    `datasets` loads it as an imagefolder, pyarrow/pandas/duckdb read the table directly. Rows are
    written ROW_GROUP at a time, so memory stays flat however many items there are."""
    pa, pq = _import_pyarrow()
    columns, rows = _imagefolder_rows(src, tmp, counts)
    schema = pa.schema([(c, _parquet_type(pa, c)) for c in columns])
    with pq.ParquetWriter(tmp / "train" / "metadata.parquet", schema, compression="zstd") as writer:
        while batch := list(itertools.islice(rows, ROW_GROUP)):
            data = {c: [_parquet_value(c, row[c]) for row in batch] for c in columns}
            writer.write_table(pa.Table.from_pydict(data, schema=schema))


# -- webdataset ------------------------------------------------------------------------------


def _sample_key(seq: int, stem: str) -> str:
    # webdataset splits a member name at its first dot: keys carry none. The sequence number keeps
    # keys unique and in manifest order without remembering the ones already used.
    return f"{seq:08d}-" + re.sub(r"[^A-Za-z0-9_-]", "_", stem)


def _webdataset(src: _Source, tmp: Path, counts: dict[str, Any], shard_size: int) -> None:
    shard: tarfile.TarFile | None = None
    in_shard = seq = 0

    def add_bytes(name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        assert shard is not None
        shard.addfile(info, io.BytesIO(data))

    def add_file(name: str, local: str) -> None:
        # the member built here, not by TarFile.add: no user/group name lookups, no TarInfo copy per
        # image (a fifth of a webdataset export's time); the same header TarFile.add + a filter made
        with open(local, "rb") as fh:
            st = os.fstat(fh.fileno())
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = st.st_size, 0o644, int(st.st_mtime)
            assert shard is not None
            shard.addfile(info, fh)

    try:
        for lineno, item in src.items():
            samples: list[tuple[str, str | None, dict[str, Any]]] = []
            meta = {**_common(item), "status": item["status"], **_optional(item), "request": item.get("request")}
            if item["status"] == "failed":
                samples.append((safe_stem(item["id"]), None, {**meta, "error": item.get("error")}))
                counts["failed"] += 1
            else:
                counts["items"] += 1
                for index, image in enumerate(item.get("images") or []):
                    path = src.image(image.get("file"), lineno)
                    if path is None:
                        counts["missing"] += 1
                        continue
                    samples.append((os.path.splitext(os.path.basename(path))[0], path, {**meta, "image_index": index, "file": image.get("file"),
                                                      "revised_prompt": image.get("revised_prompt"),
                                                      "width": image.get("width"), "height": image.get("height")}))
            for stem, path, record in samples:
                if shard is None or in_shard >= shard_size:
                    if shard is not None:
                        shard.close()
                    shard = tarfile.open(tmp / f"shard-{counts['shards']:06d}.tar", "w", format=tarfile.PAX_FORMAT)
                    counts["shards"] += 1
                    in_shard = 0
                key = _sample_key(seq, stem)
                if path is not None:
                    ext = os.path.splitext(path)[1].lstrip(".").lower() or "bin"
                    with src.opened(path) as local:
                        add_file(f"{key}.{ext}", local)
                    counts["images"] += 1
                add_bytes(f"{key}.json", json.dumps(record, ensure_ascii=False).encode())
                shard.members.clear()  # type: ignore[attr-defined]  # TarFile keeps every TarInfo it wrote; a writer never reads them back
                seq += 1
                in_shard += 1
    finally:
        if shard is not None:
            shard.close()


# -- openai-batch ----------------------------------------------------------------------------


def _batch_line(item: dict[str, Any], data: list[dict[str, Any]]) -> dict[str, Any]:
    """One line of a Batch API output file for one item.

    An item that got an HTTP error answer carries it as the Batch API does: `response` with the
    status code and an OpenAI error body, `error` null. A failure with no HTTP answer (timeout,
    dropped connection) has `response` null and `error` {code, message}, the Batch API's shape
    for requests that failed without one.
    """
    line_id = "batch_req_" + hashlib.sha256(item["id"].encode()).hexdigest()[:24]
    line: dict[str, Any] = {"id": line_id, "custom_id": item["id"], "response": None, "error": None}
    if item["status"] == "done":
        body: dict[str, Any] = {"created": item.get("created"), "data": data}
        if item.get("usage") is not None:
            body["usage"] = item["usage"]
        line["response"] = {"status_code": 200, "request_id": item.get("request_id"), "body": body}
        return line
    error = item.get("error") or {}
    status = error.get("status")
    if isinstance(status, int):
        kind = "invalid_request_error" if 400 <= status < 500 else "server_error"
        line["response"] = {"status_code": status, "request_id": item.get("request_id"),
                            "body": {"error": {"message": error.get("message"), "type": kind, "param": None,
                                               "code": error.get("code")}}}
    else:
        line["error"] = {"code": error.get("code") or error.get("kind") or "request_failed",
                         "message": error.get("message") or "the request failed without an HTTP answer"}
    return line


def _openai_batch(src: _Source, tmp: Path, counts: dict[str, Any], shard_size: int) -> None:
    images = str(tmp / "images")
    os.mkdir(images)
    with open(tmp / "results.jsonl", "w", encoding="utf-8") as results:
        for lineno, item in src.items():
            data: list[dict[str, Any]] = []
            if item["status"] == "done":
                for image in item.get("images") or []:
                    path = src.image(image.get("file"), lineno)
                    if path is None:
                        counts["missing"] += 1
                        continue
                    name = os.path.basename(path)
                    src.place(path, os.path.join(images, name))
                    data.append({"file": f"images/{name}", "revised_prompt": image.get("revised_prompt")})
                    counts["images"] += 1
                counts["items"] += 1
            else:
                counts["failed"] += 1
            results.write(_jsonl(_batch_line(item, data)))


_WRITERS: dict[str, Callable[[_Source, Path, dict[str, Any], int], None]] = {
    "imagefolder": _imagefolder, "webdataset": _webdataset, "parquet": _parquet, "openai-batch": _openai_batch}


# -- putting DIR in place ----------------------------------------------------------------------


def _check_destination(dest: Path, fmt: str) -> None:
    if not dest.exists():
        return
    if not dest.is_dir():
        raise OutputError(f"{dest}: exists and is not a folder; choose another --to")
    if not any(dest.iterdir()):
        return
    try:
        previous = json.loads((dest / MARKER).read_text()).get("format")
    except (OSError, ValueError, AttributeError):
        previous = None
    if previous != fmt:
        what = f"a previous {previous} export" if previous else "not a batcher export"
        raise OutputError(f"{dest}: not empty and {what}; an export only replaces an earlier {fmt} "
                          f"export. Choose another --to or empty it.")


def _swap_into_place(tmp: Path, dest: Path) -> None:
    if not dest.exists():
        os.rename(tmp, dest)
        return
    old = dest.parent / f".{dest.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.rename(dest, old)
    os.rename(tmp, dest)
    _remove_tree(old)


def _remove_tree(path: Path) -> None:
    """Remove a folder, streaming its entries (shutil.rmtree lists a whole folder in memory first)."""
    for _ in range(3):  # entries unlinked mid-listing may hide others; a second pass catches them
        try:
            with os.scandir(path) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        _remove_tree(Path(entry.path))
                    else:
                        os.unlink(entry.path)
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            continue
    shutil.rmtree(path, ignore_errors=True)


def _remove_stale_temporaries(dest: Path) -> None:
    """Remove what a killed export left next to DIR (its process is gone)."""
    pattern = re.compile(rf"^\.{re.escape(dest.name)}\.(?:tmp|old)-(\d+)-[0-9a-f]{{8}}$")
    for sibling in dest.parent.iterdir():
        match = pattern.match(sibling.name)
        if match and sibling.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(sibling, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
