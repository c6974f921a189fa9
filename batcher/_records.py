"""Journal records: their kinds, how they are built, and how a journal is replayed — in one place.

Every line of `manifest.jsonl` is one record, a JSON object whose first key is `t`:

    RunRecord      {"t": "run", ...}       a run started
    AttemptRecord  {"t": "attempt", ...}   a request is about to be sent (written BEFORE sending)
    ItemRecord     {"t": "item", ...}      an item finished: status "done", or "failed" with its error
    EndRecord      {"t": "end", ...}       a run ended, with its summary

A provider batch (see `_batch`) adds records about a *chunk* (the items of one batch), each written
BEFORE the step it names is taken, so a kill at any point leaves a state the next run completes:

    ChunkRecord    {"t": "chunk", ...}     the chunk's input file is on disk and its items' attempts are
                                           journaled (attempt records carrying "batch": key); next: upload
    UploadRecord   {"t": "upload", ...}    the provider holds the input file (its id); next: create
    BatchRecord    {"t": "batch", ...}     the provider created the batch (its id); next: poll
    BatchState     {"t": "batch_state"}    the batch's state and counts changed (what `status` shows)
    ClosedRecord   {"t": "closed", ...}    every line of the ended batch was recorded; its unanswered
                                           items are pending again

The runner builds them only with the constructors below (`run_record`, `attempt_record`,
`done_record`, `short_record`, `failed_record`, `end_record`), so the field names live here. They
are plain dicts (TypedDicts), written as they are: the JSON on disk is what batcher always wrote.

`replay` is the one rule for what a record does to its item's `Entry`; the in-memory replay
(`_manifest.Journal`) and the checkpoint (`_checkpoint`) both apply records through it, and every
reader (`status`, `merge`, the shard's segment counts) reads records through the accessors below
(`kind`, `item_id`, `finished`, `details`, `failure_code`, `last_run`). `manifest.json`'s items
(`ManifestItem`: an item record without `t` and `rhash`, or a pending stub) are built here too, and
read by `export` and `report`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, NotRequired, TypedDict

__all__ = [
    "Entry", "RunRecord", "AttemptRecord", "ItemRecord", "EndRecord", "Record",
    "run_record", "attempt_record", "done_record", "short_record", "failed_record", "end_record",
    "short_error", "replay", "check_fields", "utc_now",
    "ChunkRecord", "UploadRecord", "BatchRecord", "BatchStateRecord", "ClosedRecord", "RUN_KINDS", "BATCH_KINDS",
    "chunk_record", "upload_record", "batch_record", "batch_state_record", "closed_record",
    "kind", "item_id", "finished", "failure_code", "last_run", "Details", "details",
    "ManifestItem", "manifest_item", "pending_item",
]


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- the record kinds (the key order is the order written: "t" must stay first, see _manifest) ----


class RunRecord(TypedDict):
    t: Literal["run"]
    job: str
    job_file: str
    at: str
    pid: int


class AttemptRecord(TypedDict):
    t: Literal["attempt"]
    id: str
    rhash: str
    attempt: int
    endpoint: str
    at: str
    batch: NotRequired[str]  # sent in this chunk of a provider batch


class ItemRecord(TypedDict):
    t: Literal["item"]
    id: str
    rhash: str
    status: Literal["done", "failed"]
    request: dict[str, Any]
    created: int | None
    images: list[dict[str, Any]]
    attempts: int
    error: dict[str, Any] | None
    request_id: NotRequired[str | None]  # answered items only
    endpoint: str
    finished: str
    short: NotRequired[dict[str, int]]  # a short answer: {"wanted": N, "got": K}
    vars: NotRequired[dict[str, Any]]  # the item's template variables, when it has any
    cost: NotRequired[float]  # estimated, when the endpoint has prices
    usage: NotRequired[dict[str, Any]]  # the answer's token usage, when it gave one
    batch: NotRequired[str]  # answered in this chunk of a provider batch


class EndRecord(TypedDict):
    t: Literal["end"]
    at: str
    summary: dict[str, int]
    endpoints: dict[str, dict[str, Any]]


class ChunkRecord(TypedDict):
    t: Literal["chunk"]
    key: str  # unique per chunk; also the batch's metadata tag and the uploaded file's name
    endpoint: str
    base_url: str  # where the batch lives (no key: `batcher cancel` reads it from key_env again)
    key_env: str | None
    dialect: str
    input: str  # the input file, relative to the output folder
    requests: int
    images: int
    bytes: int
    at: str


class UploadRecord(TypedDict):
    t: Literal["upload"]
    key: str
    file_id: str
    at: str


class BatchRecord(TypedDict):
    t: Literal["batch"]
    key: str
    batch_id: str
    created_at: int | None
    expires_at: int | None
    at: str


class BatchStateRecord(TypedDict):
    t: Literal["batch_state"]
    key: str
    status: str
    total: int
    completed: int
    failed: int
    at: str


class ClosedRecord(TypedDict):
    t: Literal["closed"]
    key: str
    status: str  # the batch's last state (completed, expired, cancelled, failed) or "abandoned"
    at: str


BATCH_KINDS = ("chunk", "upload", "batch", "batch_state", "closed")
RUN_KINDS = ("run", "end", *BATCH_KINDS)  # records about the run, not about one item: kept in order as they are

Record = (RunRecord | AttemptRecord | ItemRecord | EndRecord | ChunkRecord | UploadRecord | BatchRecord
          | BatchStateRecord | ClosedRecord)


# -- building them -------------------------------------------------------------------------------


def run_record(job: str, job_file: str, pid: int, at: str | None = None) -> RunRecord:
    return {"t": "run", "job": job, "job_file": job_file, "at": at or utc_now(), "pid": pid}


def attempt_record(item_id: str, rhash: str, attempt: int, endpoint: str, at: str | None = None,
                   batch: str | None = None) -> AttemptRecord:
    """`batch`: the chunk key when the attempt goes out in a provider batch."""
    rec: AttemptRecord = {"t": "attempt", "id": item_id, "rhash": rhash, "attempt": attempt, "endpoint": endpoint,
                          "at": at or utc_now()}
    if batch is not None:
        rec["batch"] = batch
    return rec


def chunk_record(key: str, endpoint: str, base_url: str, key_env: str | None, dialect: str, input: str,
                 requests: int, images: int, size: int) -> ChunkRecord:
    return {"t": "chunk", "key": key, "endpoint": endpoint, "base_url": base_url, "key_env": key_env,
            "dialect": dialect, "input": input, "requests": requests, "images": images, "bytes": size, "at": utc_now()}


def upload_record(key: str, file_id: str) -> UploadRecord:
    return {"t": "upload", "key": key, "file_id": file_id, "at": utc_now()}


def batch_record(key: str, batch_id: str, created_at: int | None, expires_at: int | None) -> BatchRecord:
    return {"t": "batch", "key": key, "batch_id": batch_id, "created_at": created_at, "expires_at": expires_at,
            "at": utc_now()}


def batch_state_record(key: str, status: str, total: int, completed: int, failed: int) -> BatchStateRecord:
    return {"t": "batch_state", "key": key, "status": status, "total": total, "completed": completed,
            "failed": failed, "at": utc_now()}


def closed_record(key: str, status: str) -> ClosedRecord:
    return {"t": "closed", "key": key, "status": status, "at": utc_now()}


def end_record(summary: dict[str, int], endpoints: dict[str, dict[str, Any]], at: str | None = None) -> EndRecord:
    return {"t": "end", "at": at or utc_now(), "summary": summary, "endpoints": endpoints}


def short_error(got: int, wanted: int) -> dict[str, Any]:
    """The error of a short answer (fewer images than asked): transient, so a rerun asks for the rest."""
    return {"kind": "transient", "status": 200, "code": "short_answer",
            "message": f"got {got} of {wanted} image(s); a rerun asks for the {wanted - got} missing"}


def done_record(item_id: str, rhash: str, request: dict[str, Any], *, created: int | None,
                images: list[dict[str, Any]], attempts: int, request_id: str | None, endpoint: str,
                vars: dict[str, Any] | None = None, cost: float | None = None,
                usage: dict[str, Any] | None = None, finished: str | None = None) -> ItemRecord:
    """An answered item with all its images."""
    return _answered(item_id, rhash, request, None, created=created, images=images, attempts=attempts,
                     request_id=request_id, endpoint=endpoint, vars=vars, cost=cost, usage=usage,
                     finished=finished)


def short_record(item_id: str, rhash: str, request: dict[str, Any], *, wanted: int, created: int | None,
                 images: list[dict[str, Any]], attempts: int, request_id: str | None, endpoint: str,
                 vars: dict[str, Any] | None = None, cost: float | None = None,
                 usage: dict[str, Any] | None = None, finished: str | None = None) -> ItemRecord:
    """An answer with fewer images than `wanted`: failed (transient), its images kept (they were paid)."""
    return _answered(item_id, rhash, request, {"wanted": wanted, "got": len(images)}, created=created,
                     images=images, attempts=attempts, request_id=request_id, endpoint=endpoint, vars=vars,
                     cost=cost, usage=usage, finished=finished)


def _answered(item_id: str, rhash: str, request: dict[str, Any], short: dict[str, int] | None, *,
              created: int | None, images: list[dict[str, Any]], attempts: int, request_id: str | None,
              endpoint: str, vars: dict[str, Any] | None, cost: float | None, usage: dict[str, Any] | None,
              finished: str | None) -> ItemRecord:
    rec: ItemRecord = {
        "t": "item", "id": item_id, "rhash": rhash, "status": "failed" if short else "done", "request": request,
        "created": created, "images": images, "attempts": attempts,
        "error": short_error(short["got"], short["wanted"]) if short else None,
        "request_id": request_id, "endpoint": endpoint, "finished": finished or utc_now(),
    }
    if short:
        rec["short"] = short
    if vars:
        rec["vars"] = vars
    if cost is not None:
        rec["cost"] = cost
    if usage is not None:
        rec["usage"] = usage
    return rec


def failed_record(item_id: str, rhash: str, request: dict[str, Any], *, attempts: int, error: dict[str, Any],
                  endpoint: str, vars: dict[str, Any] | None = None, finished: str | None = None) -> ItemRecord:
    """An item that failed without an answer (`error` is `RequestError.as_record()`)."""
    rec: ItemRecord = {"t": "item", "id": item_id, "rhash": rhash, "status": "failed", "request": request,
                       "created": None, "images": [], "attempts": attempts, "error": error, "endpoint": endpoint,
                       "finished": finished or utc_now()}
    if vars:
        rec["vars"] = vars
    return rec


# -- replaying them ------------------------------------------------------------------------------


@dataclass(slots=True)
class Entry:
    """What the journal says of one item."""

    status: str  # done | failed | pending (attempted, never finished)
    rhash: str
    attempts: int
    offset: int  # byte offset of the latest `item` line, or -1
    error_kind: str | None = None


def replay(rec: Mapping[str, Any], offset: int, current: Callable[[str], Entry | None]) -> Entry | None:
    """The entry of `rec`'s item (`rec["id"]`) once the record, read at byte `offset`, is applied; None
    for a record about no item (run, end, or a kind this version does not know).

    `current(id)` gives the item's entry before the record (None: none yet); it is called only for
    an attempt. The rules:
      - attempt, same request hash as the entry: the entry goes on — `attempts` is the larger of the
        two, and it is `pending` again unless it is `done` (a done item re-sent keeps its result);
        the entry returned is the one `current` gave, updated in place;
      - attempt, new item or changed request: a fresh `pending` entry (no item line: offset -1);
      - item: its status, hash, attempts, this offset and its error's kind, whatever came before.
    Field types are not checked here (see `check_fields`); a missing `id` or `status` raises KeyError,
    a non-integer count ValueError or TypeError.
    """
    kind = rec.get("t")
    if kind == "item":
        err = rec.get("error") or {}
        return Entry(rec["status"], rec.get("rhash", ""), int(rec.get("attempts", 0)), offset, err.get("kind"))
    if kind == "attempt":
        prev = current(rec["id"])
        if prev is not None and prev.rhash == rec.get("rhash"):
            prev.attempts = max(prev.attempts, int(rec.get("attempt", 0)))
            if prev.status != "done":
                prev.status = "pending"
            return prev
        return Entry("pending", rec.get("rhash", ""), int(rec.get("attempt", 0)), -1)
    return None


# -- a provider batch's chunks: the replay of the batch records (see `_batch`) ----------------------


@dataclass
class Chunk:
    """What the journal says of one chunk (see the module's docstring for its steps)."""

    key: str
    endpoint: str
    base_url: str
    key_env: str | None
    dialect: str
    input: str
    requests: int
    images: int
    bytes: int
    at: str
    file_id: str | None = None
    batch_id: str | None = None
    created_at: int | None = None
    expires_at: int | None = None
    status: str | None = None  # the provider's state, as last seen
    counts: dict[str, int] = field(default_factory=lambda: {"total": 0, "completed": 0, "failed": 0})
    closed: str | None = None  # the state it ended in, once collected

    @property
    def filename(self) -> str:
        return f"batcher-{self.key}.jsonl"

    @property
    def started(self) -> float:
        """The chunk record's time (seconds since the epoch)."""
        try:
            return datetime.fromisoformat(self.at.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return 0.0

    def as_row(self) -> dict[str, Any]:
        """One line of `batcher status`."""
        return {"key": self.key, "batch_id": self.batch_id, "endpoint": self.endpoint,
                "state": (self.closed and f"{self.closed} (collected)") or self.status or
                ("created" if self.batch_id else "uploaded" if self.file_id else "prepared"),
                "requests": self.requests, "images": self.images, **self.counts,
                "created": self.created_at, "expires": self.expires_at}


def chunks_of(records: Iterable[Mapping[str, Any]]) -> dict[str, Chunk]:
    """Replay the journal's batch records (in order) into chunks, by key."""
    chunks: dict[str, Chunk] = {}
    for rec in records:
        kind = rec.get("t")
        if kind not in BATCH_KINDS:
            continue
        if kind == "chunk":
            chunks[rec["key"]] = Chunk(rec["key"], rec["endpoint"], rec["base_url"], rec.get("key_env"),
                                       rec.get("dialect", "openai-compatible"), rec["input"],
                                       int(rec["requests"]), int(rec["images"]), int(rec["bytes"]), rec["at"])
            continue
        chunk = chunks.get(rec.get("key", ""))
        if chunk is None:
            continue  # a step of a chunk whose record was lost: nothing to resume from
        if kind == "upload":
            chunk.file_id = rec["file_id"]
        elif kind == "batch":
            chunk.batch_id = rec["batch_id"]
            chunk.created_at, chunk.expires_at = rec.get("created_at"), rec.get("expires_at")
        elif kind == "batch_state":
            chunk.status = rec["status"]
            chunk.counts = {k: int(rec.get(k, 0)) for k in ("total", "completed", "failed")}
        elif kind == "closed":
            chunk.closed = rec["status"]
    return chunks



def check_fields(rec: Mapping[str, Any]) -> None:
    """Raise ValueError when an item or attempt record does not have the types batcher writes."""
    if not isinstance(rec.get("id"), str) or not isinstance(rec.get("rhash", ""), str):
        raise ValueError("id and rhash must be strings")
    count = rec.get("attempt" if rec["t"] == "attempt" else "attempts", 0)
    if not isinstance(count, int) or isinstance(count, bool):
        raise ValueError("attempts must be an integer")
    if rec["t"] == "item":
        if rec.get("status") not in ("done", "failed"):
            raise ValueError("status must be done or failed")
        if not isinstance(rec.get("error") or {}, dict) or not isinstance(rec.get("images") or [], list):
            raise ValueError("error must be an object, images a list")


# -- reading them: what a record says, for every reader ------------------------------------------


def kind(rec: Mapping[str, Any]) -> str | None:
    """The record's kind (`run`, `attempt`, `item`, `end`, a batch kind), or None when it has none."""
    t = rec.get("t")
    return t if isinstance(t, str) else None


def item_id(rec: Mapping[str, Any]) -> str | None:
    """The item a record is about (an attempt or item record's `id`), else None."""
    value = rec.get("id") if rec.get("t") in ("attempt", "item") else None
    return value if isinstance(value, str) else None


def finished(rec: Mapping[str, Any]) -> Literal["done", "failed"] | None:
    """How an `item` record ended its item: done or failed; None for any other record."""
    status = rec.get("status") if rec.get("t") == "item" else None
    if status == "done" or status == "failed":
        return status
    return None


def failure_code(error: Mapping[str, Any] | None) -> Any:
    """What failures are grouped by (`status`, `report`, the checkpoint): the error's code, else
    `http_STATUS`, else its kind (None for no error)."""
    err = error or {}
    return err.get("code") or (f"http_{err['status']}" if err.get("status") else err.get("kind"))


def last_run(runs: Iterable[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The latest `run` record of a journal's run records (`Journal.runs`), or None."""
    found = None
    for rec in runs:
        if rec.get("t") == "run":
            found = rec
    return found


@dataclass(frozen=True, slots=True)
class Details:
    """What an `item` record says beyond its `Entry`: what `status` shows and the checkpoint keeps."""

    code: Any  # failure_code(error): None when done
    message: str | None
    endpoint: str | None
    cost: float | None
    images: list[dict[str, Any]]

    @property
    def image_bytes(self) -> int:
        return sum(int(i.get("bytes") or 0) for i in self.images)


def details(rec: Mapping[str, Any]) -> Details:
    """The details of an `item` record (replay gives its status, hash, attempts and error kind)."""
    err = rec.get("error") or {}
    return Details(failure_code(err), err.get("message"), rec.get("endpoint"), rec.get("cost"),
                   rec.get("images") or [])


# -- manifest.json's items -------------------------------------------------------------------------


class ManifestItem(TypedDict):
    """One item of `manifest.json` (and of its segments): the item's latest `item` record without
    `t` and `rhash` (so every optional field of `ItemRecord` may be there), or, for an item with no
    result for its current request, a `pending` stub."""

    id: str
    status: Literal["done", "failed", "pending"]
    request: dict[str, Any]
    created: int | None
    images: list[dict[str, Any]]
    attempts: int
    error: dict[str, Any] | None
    vars: NotRequired[dict[str, Any]]
    request_id: NotRequired[str | None]
    endpoint: NotRequired[str]
    finished: NotRequired[str]
    short: NotRequired[dict[str, int]]
    cost: NotRequired[float]
    usage: NotRequired[dict[str, Any]]
    batch: NotRequired[str]


def manifest_item(rec: Mapping[str, Any]) -> ManifestItem:
    """The manifest's item for an item's latest `item` record."""
    return {k: v for k, v in rec.items() if k not in ("t", "rhash")}  # type: ignore[return-value]


def pending_item(item_id: str, request: dict[str, Any], attempts: int,
                 vars: dict[str, Any] | None = None) -> ManifestItem:
    """The manifest's item for an item with no result for its current request."""
    rec: ManifestItem = {"id": item_id, "status": "pending", "request": request, "created": None, "images": [],
                         "attempts": attempts, "error": None}
    if vars:
        rec["vars"] = vars
    return rec
