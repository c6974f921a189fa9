"""A mock of OpenAI's Files + Batches APIs derived from OpenAI's published spec, not from batcher.

Like `spec_server.SpecServer` (Images), it checks batcher against OpenAI's own description rather
than against batcher's simulator (which agrees with batcher by construction):

- every request is validated: `POST /v1/files` (multipart/form-data, `purpose` a
  `openai.types.FilePurpose`, a `file` part whose JSONL lines are `BatchRequestInput`s: unique
  `custom_id`, `method: POST`, a `url`, a `body` strictly an `ImageGenerateParamsNonStreaming`;
  at most 50,000 lines and 200 MB), `POST /v1/batches` (strictly a
  `openai.types.batch_create_params.BatchCreateParams`, plus the spec's `Metadata` limits: 16 pairs,
  keys ≤ 64, values ≤ 512 characters; the input file uploaded with purpose batch), the list calls'
  query parameters (`batch_list_params` / `file_list_params`, the spec's limit ranges), and the
  retrieve, content, delete and cancel paths. Where one breaks the spec it is recorded in `problems`
  and answered as OpenAI would (a 400 `invalid_request_error`);
- every answer is built as the spec allows and checked before it is sent: batches against
  `openai.types.Batch`, files against `FileObject`, deletes against `FileDeleted`, lists against the
  spec's `ListBatchesResponse` / `ListFilesResponse` (required keys), output and error file lines
  against the spec's `BatchRequestOutput` (`OUTPUT_LINE` below: the SDK has no type for it), with a
  200 line's body an `ImagesResponse` and an error line's body `{"error": ErrorObject}`. A failed
  self-check is recorded in `self_check_failures`.

Sources: the OpenAPI spec of github.com/openai/openai-openapi (`Batch`, `BatchError`,
`BatchRequestCounts`, `CreateBatchRequest`, `OpenAIFile`, `ListFilesResponse`,
`ListBatchesResponse`, `DeleteFileResponse`, `Metadata`; `BatchRequestInput` and
`BatchRequestOutput` from its 2025-06 revision, the last with the per-line schemas) and the SDK's
types generated from it.

How each batch goes is scripted: batches take `plans` in the order they are created ("completed"
once the list runs out); each retrieve moves a batch one state on (no clock: a test is exact).
What each line gets is scripted per prompt word, as in `SpecServer`: `lines={"forbidden":
["content_policy"]}` answers the first line whose prompt contains "forbidden" with that ERRORS
entry (an error-file line with its status code), then "ok".

    with SpecBatchServer(plans=["expired", "completed"], lines={"koi": ["server_error", "ok"]}) as server:
        ...  # batcher run JOB --batch --base-url server.base_url
        assert not server.problems and not server.self_check_failures
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
import typing
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

from anyio.abc import SocketStream
from openai.types import Batch, FileDeleted, FileObject, ImagesResponse
from openai.types.batch_create_params import BatchCreateParams
from openai.types.batch_list_params import BatchListParams
from openai.types.file_list_params import FileListParams
from openai.types.file_purpose import FilePurpose
from openai.types.image_generate_params import ImageGenerateParamsNonStreaming
from openai.types.shared import ErrorObject
from pydantic import ConfigDict, TypeAdapter, ValidationError
from typing_extensions import TypedDict

from hostile_server import png
from raw_http import RawServer, Request, reply
from spec_server import ERRORS

__all__ = ["SpecBatchServer", "PLANS", "OUTPUT_LINE"]

# how a batch goes: the states it shows, one per retrieve, after `validating` (the create's answer)
PLANS: dict[str, tuple[str, ...]] = {
    "completed": ("in_progress", "finalizing", "completed"),
    "expired": ("in_progress", "expired"),  # the window passed: the first half ran, the rest batch_expired lines
    "failed": ("failed",),  # validation failed as a whole: one error without a line, no files
    "failed_lines": ("failed",),  # validation failed on the input's line 2 (errors.data[].line)
    "cancelled": ("in_progress", "cancelling", "cancelled"),  # someone cancelled: the first half ran, no lines
    "cancelled_lines": ("in_progress", "cancelling", "cancelled"),  # … the rest as batch_cancelled lines
}
MAX_LINES = 50_000
MAX_INPUT_BYTES = 200 * 1024 * 1024


class _LineResponse(TypedDict, total=False):
    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    status_code: int
    request_id: str
    body: dict[str, Any]


class _LineError(TypedDict, total=False):
    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    code: str
    message: str


class _BatchRequestOutput(TypedDict, total=False):
    """The spec's per-line object of the batch output and error files: every property optional,
    `response` and `error` nullable."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    id: str
    custom_id: str
    response: _LineResponse | None
    error: _LineError | None


OUTPUT_LINE = TypeAdapter(_BatchRequestOutput)
_IMAGE_PARAMS = TypeAdapter(ImageGenerateParamsNonStreaming)
_CREATE = TypeAdapter(BatchCreateParams)
_BATCH_LIST = TypeAdapter(BatchListParams)
_FILE_LIST = TypeAdapter(FileListParams)
_PURPOSE = TypeAdapter(FilePurpose)
_INPUT_KEYS = {"custom_id", "method", "url", "body"}
_CREATE_KEYS = frozenset(typing.get_type_hints(BatchCreateParams))


def _problems(exc: ValidationError, where: str) -> list[str]:
    return [f"{where}{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]


@dataclass
class _File:
    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int


@dataclass
class _Batch:
    doc: dict[str, Any]  # the Batch object as last shown
    plan: str
    lines: list[dict[str, Any]]  # the input file's lines
    step: int = 0


@dataclass
class SpecBatchServer:
    """The spec-derived mock, serving on 127.0.0.1 until `stop()` (or the `with` block ends)."""

    plans: list[str] = field(default_factory=list)
    lines: dict[str, list[str]] = field(default_factory=dict)
    api_key: str | None = None
    page_size: int = 10_000  # at most this many entries a list page (a server may send fewer than `limit`)
    foreign: bool = False  # the account also holds others' files and batches (other purposes, no metadata)
    # "upload" / "create": the first one answers 500 after the file / the batch was made (a lost answer)
    faults: frozenset[str] = frozenset()
    max_calls: int = 2_000  # past this many requests every answer is a 401 (fatal: the run stops): a bound

    def __post_init__(self) -> None:
        assert all(p in PLANS for p in self.plans), self.plans
        assert all(n == "ok" or n in ERRORS for answers in self.lines.values() for n in answers)
        self.plans = list(self.plans)
        self.lines = {k: list(v) for k, v in self.lines.items()}
        self.problems: list[str] = []  # where a request broke the spec (empty: batcher conforms)
        self.self_check_failures: list[str] = []  # answers this server built that the spec does not allow
        self.calls: list[str] = []  # "METHOD /path" of every request, in order
        self.generated: dict[str, int] = {}  # custom_id -> times a 200 line was made for it (paid)
        self.files: dict[str, _File] = {}
        self.batches: dict[str, _Batch] = {}
        # every object a second newer than the last (lists are ordered), from a little before now
        self._clock = int(time.time()) - 300
        self._faults = set(self.faults)
        self._n = 0
        self._lock = threading.Lock()
        self._server = RawServer(self._handle)
        self.base_url = f"{self._server.url}/v1"
        if self.foreign:
            self._add_foreign()

    def _add_foreign(self) -> None:
        """Someone else's objects on the same account: a fine-tune file, a batch input, and a chat batch
        without metadata (newer than nothing of batcher's: lists must be read past them)."""
        for name, purpose in (("train.jsonl", "fine-tune"), ("batcher-not-a-chunk.jsonl", "batch")):
            f = _File(self._id("file-"), name, purpose, b'{"custom_id": "x"}\n', self._tick())
            self.files[f.id] = f
        doc: dict[str, Any] = {
            "id": self._id("batch_"), "object": "batch", "endpoint": "/v1/chat/completions", "errors": None,
            "input_file_id": f.id, "completion_window": "24h", "status": "completed", "output_file_id": None,
            "error_file_id": None, "created_at": self._tick(), "expires_at": None, "completed_at": self._tick(),
            "request_counts": {"total": 1, "completed": 1, "failed": 0}, "metadata": None}
        self.batches[doc["id"]] = _Batch(self._checked(Batch, doc), "completed", [], step=99)

    @property
    def errors(self) -> list[BaseException]:
        return self._server.errors

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> SpecBatchServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def called(self, method: str, prefix: str) -> int:
        return sum(c.startswith(f"{method} {prefix}") for c in self.calls)

    # -- HTTP ---------------------------------------------------------------------------

    async def _handle(self, req: Request, stream: SocketStream) -> bool:
        path, _, query = req.target.partition("?")
        parts = [unquote(p) for p in path.split("/")]  # "", "v1", "files", id, "content"
        with self._lock:
            self.calls.append(f"{req.method} {path}")
            runaway = len(self.calls) > self.max_calls
        if runaway:
            self.problems.append(f"more than {self.max_calls} requests: a loop that does not end")
        if runaway or self.api_key is not None and req.headers.get("authorization") != f"Bearer {self.api_key}":
            await self._send_error(stream, 401, "invalid_request_error", "Incorrect API key provided.",
                                   "invalid_api_key")
            return True
        with self._lock:
            status, doc = self._route(req.method, parts, query, req)
        if isinstance(doc, bytes):
            await stream.send(reply(status, doc, {"x-request-id": f"req_{secrets.token_hex(8)}"},
                                    content_type="application/octet-stream"))
        else:
            await stream.send(reply(status, json.dumps(doc).encode(),
                                    {"x-request-id": f"req_{secrets.token_hex(8)}"}))
        return True

    def _route(self, method: str, parts: list[str], query: str, req: Request) -> tuple[int, Any]:
        if parts[:2] != ["", "v1"] or len(parts) < 3:
            return self._not_found(f"Invalid URL ({method} {'/'.join(parts)})")
        rest = parts[2:]
        params = dict(parse_qsl(query, keep_blank_values=True))
        if rest == ["files"] and method == "POST":
            return self._upload(req)
        if rest == ["files"] and method == "GET":
            return self._list_files(params)
        if len(rest) == 2 and rest[0] == "files" and method in ("GET", "DELETE"):
            f = self.files.get(rest[1])
            if f is None:
                return self._not_found(f"No such File object: {rest[1]}")
            if method == "GET":
                return 200, self._file_doc(f)
            del self.files[f.id]
            return 200, self._checked(FileDeleted, {"id": f.id, "object": "file", "deleted": True})
        if len(rest) == 3 and rest[0] == "files" and rest[2] == "content" and method == "GET":
            f = self.files.get(rest[1])
            return (200, f.data) if f is not None else self._not_found(f"No such File object: {rest[1]}")
        if rest == ["batches"] and method == "POST":
            return self._create(req)
        if rest == ["batches"] and method == "GET":
            return self._list_batches(params)
        if len(rest) == 2 and rest[0] == "batches" and method == "GET":
            b = self.batches.get(rest[1])
            return (200, self._advance(b)) if b is not None else self._not_found(f"No batch found: {rest[1]}")
        if len(rest) == 3 and rest[0] == "batches" and rest[2] == "cancel" and method == "POST":
            b = self.batches.get(rest[1])
            return (200, self._cancel(b)) if b is not None else self._not_found(f"No batch found: {rest[1]}")
        return self._not_found(f"Invalid URL ({method} {'/'.join(parts)})")

    # -- files ----------------------------------------------------------------------------

    def _upload(self, req: Request) -> tuple[int, Any]:
        ctype = req.headers.get("content-type", "")
        kind, _, rest = ctype.partition(";")
        boundary = dict(p.strip().split("=", 1) for p in rest.split(";") if "=" in p).get("boundary", "").strip('"')
        if kind.strip() != "multipart/form-data" or not boundary:
            return self._invalid(f"upload: content-type {ctype!r} is not multipart/form-data with a boundary")
        fields: dict[str, tuple[str | None, bytes]] = {}
        chunks = req.body.split(b"--" + boundary.encode())
        if len(chunks) < 3 or not chunks[-1].startswith(b"--"):
            return self._invalid("upload: the multipart body does not end with its closing boundary")
        for chunk in chunks[1:-1]:
            head, sep, body = chunk.partition(b"\r\n\r\n")
            if not sep or not head.startswith(b"\r\n") or not body.endswith(b"\r\n"):
                return self._invalid("upload: a multipart part is not framed by CRLFs")
            disposition = next((h for h in head.decode("latin-1").split("\r\n")
                                if h.lower().startswith("content-disposition:")), "")
            attrs = dict(a.strip().split("=", 1) for a in disposition.split(";")[1:] if "=" in a)
            name = attrs.get("name", "").strip('"')
            filename = attrs["filename"].strip('"') if "filename" in attrs else None
            if name in fields:
                return self._invalid(f"upload: the field {name!r} is sent twice")
            fields[name] = (filename, body[:-2])
        if set(fields) - {"file", "purpose", "expires_after[anchor]", "expires_after[seconds]"}:
            return self._invalid(f"upload: fields the spec does not list: {sorted(set(fields))}")
        if "file" not in fields or "purpose" not in fields:
            return self._invalid(f"upload: 'file' and 'purpose' are required, got {sorted(fields)}")
        purpose = fields["purpose"][1].decode("utf-8", "replace")
        try:
            _PURPOSE.validate_python(purpose, strict=True)
        except ValidationError as exc:
            return self._invalid(*_problems(exc, "upload.purpose "))
        filename, data = fields["file"]
        if not filename:
            return self._invalid("upload: the 'file' part has no filename")
        if len(data) > MAX_INPUT_BYTES:
            return self._invalid(f"upload: {len(data)} bytes; a batch input file is at most 200 MB")
        if purpose == "batch":
            _, problems = self._input_lines(data)
            if problems:  # OpenAI checks the format at upload for purpose=batch
                return self._invalid(*problems)
        f = _File(self._id("file-"), filename, purpose, data, self._tick())
        self.files[f.id] = f
        return self._maybe_lost("upload", self._file_doc(f))

    def _input_lines(self, data: bytes) -> tuple[list[dict[str, Any]], list[str]]:
        """The input file's `BatchRequestInput` lines, and where they break the spec."""
        lines: list[dict[str, Any]] = []
        problems: list[str] = []
        seen: set[str] = set()
        if not data.endswith(b"\n"):
            problems.append("input: the last line is not newline-terminated")
        for n, raw in enumerate(data.splitlines(), 1):
            try:
                line = json.loads(raw)
            except ValueError:
                problems.append(f"input line {n}: not JSON")
                continue
            if not isinstance(line, dict) or set(line) != _INPUT_KEYS:
                problems.append(f"input line {n}: keys {sorted(line) if isinstance(line, dict) else line!r}")
                continue
            if not isinstance(line["custom_id"], str) or not line["custom_id"] or line["custom_id"] in seen:
                problems.append(f"input line {n}: custom_id {line['custom_id']!r} missing or not unique")
            seen.add(str(line["custom_id"]))
            if line["method"] != "POST":
                problems.append(f"input line {n}: method {line['method']!r} is not POST")
            try:
                _IMAGE_PARAMS.validate_python(line["body"], strict=True)
            except ValidationError as exc:
                problems += _problems(exc, f"input line {n} body.")
            lines.append(line)
        if len(lines) > MAX_LINES:
            problems.append(f"input: {len(lines)} requests; a batch takes at most {MAX_LINES}")
        return lines, problems

    def _list_files(self, params: dict[str, str]) -> tuple[int, Any]:
        typed: dict[str, Any] = dict(params)
        if "limit" in typed:
            typed["limit"] = int(typed["limit"]) if typed["limit"].isdigit() else typed["limit"]
        try:
            _FILE_LIST.validate_python(typed, strict=True)
        except ValidationError as exc:
            return self._invalid(*_problems(exc, "GET /files ?"))
        if set(params) - set(typing.get_type_hints(FileListParams)):
            return self._invalid(f"GET /files: query parameters the spec does not list: {sorted(params)}")
        limit = typed.get("limit", 10_000)
        if not 1 <= limit <= 10_000:
            return self._invalid(f"GET /files: limit {limit} is outside 1..10000")
        files = sorted((f for f in self.files.values() if params.get("purpose") in (None, f.purpose)),
                       key=lambda f: f.created_at, reverse=params.get("order", "desc") == "desc")
        page, more = self._page(files, params.get("after"), min(limit, self.page_size))
        docs = [self._file_doc(f) for f in page]
        # ListFilesResponse: object, data, first_id, last_id, has_more all required
        return 200, {"object": "list", "data": docs, "first_id": docs[0]["id"] if docs else "",
                     "last_id": docs[-1]["id"] if docs else "", "has_more": more}

    def _file_doc(self, f: _File) -> dict[str, Any]:
        doc = {"id": f.id, "object": "file", "bytes": len(f.data), "created_at": f.created_at,
               "filename": f.filename, "purpose": f.purpose, "status": "processed"}
        if f.purpose == "batch_output":
            doc["expires_at"] = f.created_at + 30 * 86400  # optional: output files expire
        return self._checked(FileObject, doc)

    # -- batches --------------------------------------------------------------------------

    def _create(self, req: Request) -> tuple[int, Any]:
        if req.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return self._invalid(f"create: content-type {req.headers.get('content-type')!r}")
        try:
            body = json.loads(req.body)
        except ValueError:
            return self._invalid("create: body is not JSON")
        if not isinstance(body, dict):
            return self._invalid("create: body is not a JSON object")
        try:
            _CREATE.validate_python(body, strict=True)
        except ValidationError as exc:
            return self._invalid(*_problems(exc, "create."))
        if set(body) - _CREATE_KEYS:
            return self._invalid(f"create: fields the spec does not list: {sorted(set(body) - _CREATE_KEYS)}")
        metadata = body.get("metadata") or {}
        if len(metadata) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in metadata.items()):
            return self._invalid(f"create.metadata: more than 16 pairs, a key over 64 or a value over 512 "
                                 f"characters: {metadata!r}")
        f = self.files.get(body["input_file_id"])
        if f is None:
            return self._not_found(f"No such File object: {body['input_file_id']}")
        if f.purpose != "batch":
            return self._invalid(f"create: the input file's purpose is {f.purpose!r}, not 'batch'")
        lines, _ = self._input_lines(f.data)
        plan = self.plans.pop(0) if self.plans else "completed"
        created = self._tick()
        doc: dict[str, Any] = {
            "id": self._id("batch_"), "object": "batch", "endpoint": body["endpoint"], "errors": None,
            "input_file_id": f.id, "completion_window": body["completion_window"], "status": "validating",
            "output_file_id": None, "error_file_id": None, "created_at": created,
            "in_progress_at": None, "expires_at": created + 86400, "finalizing_at": None, "completed_at": None,
            "failed_at": None, "expired_at": None, "cancelling_at": None, "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0}, "metadata": metadata or None,
        }
        if not self.batches:  # the spec's own example: no expiry until the batch is in progress
            doc["expires_at"] = None
        if len(self.batches) % 2:  # optional fields absent, as the spec allows (an older batch object)
            for key in ("errors", "in_progress_at", "finalizing_at", "failed_at", "expired_at", "cancelling_at",
                        "cancelled_at", "request_counts"):
                del doc[key]
        bad = [n for n, line in enumerate(lines, 1) if line["url"] != body["endpoint"]]
        if bad:  # the spec: every line's url is the batch's endpoint; OpenAI fails such a batch in validation
            self.problems.append(f"create: input lines {bad} have a url other than {body['endpoint']}")
        self.batches[doc["id"]] = _Batch(doc, plan, lines)
        return self._maybe_lost("create", self._checked(Batch, dict(doc)))

    def _maybe_lost(self, step: str, doc: dict[str, Any]) -> tuple[int, Any]:
        """The answer, or (a fault for `step`, once) a 500 although the object was made."""
        if step not in self._faults:
            return 200, doc
        self._faults.discard(step)
        error = {"message": "The server had an error while processing your request. Sorry about that!",
                 "type": "server_error", "param": None, "code": None}
        return 500, {"error": self._checked(ErrorObject, error)}

    def _advance(self, b: _Batch) -> dict[str, Any]:
        """The batch one state further along its plan (until it has ended)."""
        states = PLANS[b.plan]
        if b.doc["status"] in ("completed", "failed", "expired", "cancelled") or b.step >= len(states):
            return self._checked(Batch, dict(b.doc))
        if b.doc["status"] == "cancelling" and b.plan not in ("cancelled", "cancelled_lines"):
            state = "cancelled"  # cancelled by a client: it ends at once
        else:
            state = states[b.step]
            b.step += 1
        now = self._tick()
        total = len(b.lines)
        doc = b.doc
        doc["status"] = state
        if state == "in_progress":
            doc.update(in_progress_at=now, request_counts={"total": total, "completed": 0, "failed": 0},
                       expires_at=doc["created_at"] + 86400)
        elif state == "finalizing":
            doc["finalizing_at"] = now
        elif state == "cancelling":
            doc["cancelling_at"] = now
        elif state == "failed":
            if b.plan == "failed_lines":
                data = [{"code": "invalid_request", "message": "The request body is not valid for the endpoint.",
                         "param": "body", "line": 2}]
            else:
                data = [{"code": "token_limit_exceeded", "message": "Enqueued token limit reached.",
                         "param": None, "line": None}]
            doc.update(failed_at=now, errors={"object": "list", "data": data},
                       request_counts={"total": 0, "completed": 0, "failed": 0})
        if state in ("completed", "expired", "cancelled"):
            self._finish(b, state, now)
        return self._checked(Batch, dict(doc))

    def _finish(self, b: _Batch, state: str, now: int) -> None:
        """Run the lines the batch got to; write its output and error files as the spec shapes them."""
        ran = b.lines if state == "completed" else b.lines[: len(b.lines) // 2]
        ok: list[bytes] = []
        errors: list[bytes] = []
        for k, line in enumerate(ran):
            out = self._result(line, k)
            (ok if out["response"]["status_code"] == 200 else errors).append(self._line(out, k))
        if state == "expired" or b.plan == "cancelled_lines":
            code = "batch_expired" if state == "expired" else "batch_cancelled"
            for k, line in enumerate(b.lines[len(ran):]):
                errors.append(self._line({"id": self._id("batch_req_"), "custom_id": line["custom_id"],
                                          "response": None, "error": {"code": code, "message": (
                                              "This request could not be executed before the completion window "
                                              "expired." if code == "batch_expired" else
                                              "This request was cancelled before it was executed.")}}, k))
        ok.reverse()  # line order is not the input order: a client matches by custom_id
        b.doc.update(
            output_file_id=self._result_file(b, ok), error_file_id=self._result_file(b, errors),
            request_counts={"total": len(b.lines), "completed": len(ok),
                            "failed": len(ran) - len(ok)},
            **{f"{state}_at": now})
        if state == "completed" and len(self.batches) % 3 == 0:  # batches made after 2025-09 carry usage
            b.doc["usage"] = {"input_tokens": 12 * len(ran), "input_tokens_details": {"cached_tokens": 0},
                              "output_tokens": 272 * len(ok), "output_tokens_details": {"reasoning_tokens": 0},
                              "total_tokens": 12 * len(ran) + 272 * len(ok)}

    def _result_file(self, b: _Batch, lines: list[bytes]) -> str | None:
        if not lines:
            return None  # the spec: no output file when nothing succeeded (no error file when nothing failed)
        f = _File(self._id("file-"), f"batch_{b.doc['id']}_output.jsonl", "batch_output", b"".join(lines),
                  self._tick())
        self.files[f.id] = f
        return f.id

    def _result(self, line: dict[str, Any], k: int) -> dict[str, Any]:
        """One request run: a 200 with images, or the scripted ERRORS answer (an error-file line)."""
        body = line["body"]
        name = self._next_answer(str(body.get("prompt", "")))
        request_id = f"req_{secrets.token_hex(8)}"
        if name != "ok":
            status, error, _ = ERRORS[name]
            self._check(ErrorObject, error)
            return {"id": self._id("batch_req_"), "custom_id": line["custom_id"],
                    "response": {"status_code": status, "request_id": request_id, "body": {"error": error}},
                    "error": None}
        self.generated[line["custom_id"]] = self.generated.get(line["custom_id"], 0) + 1
        data = [{"b64_json": base64.b64encode(png(8, 8, seed=self._n * 8 + j)).decode("ascii")}
                for j in range(body.get("n") or 1)]
        if k % 2:
            data[0]["revised_prompt"] = f"A detailed rendering of: {body.get('prompt')}"
        answer: dict[str, Any] = {"created": self._clock, "data": data}
        if k % 3 == 2:  # a gpt-image answer: the settings used and the tokens billed
            answer.update(background="opaque", output_format="png", size="1024x1024", quality="medium",
                          usage={"input_tokens": 12, "output_tokens": 272, "total_tokens": 284,
                                 "input_tokens_details": {"text_tokens": 12, "image_tokens": 0}})
        self._check(ImagesResponse, answer)
        return {"id": self._id("batch_req_"), "custom_id": line["custom_id"],
                "response": {"status_code": 200, "request_id": request_id, "body": answer}, "error": None}

    def _line(self, out: dict[str, Any], k: int) -> bytes:
        """One output/error file line; the spec's optional parts left out on some (all are optional)."""
        out = dict(out)
        if k % 4 == 1 and out.get("error") is None:
            del out["error"]
        if k % 4 == 3:
            del out["id"]
            if out.get("response"):
                out["response"] = {k2: v for k2, v in out["response"].items() if k2 != "request_id"}
        try:
            OUTPUT_LINE.validate_python(out, strict=True)
        except ValidationError as exc:
            self.self_check_failures.append(f"output line: {exc}")
        return json.dumps(out).encode() + b"\n"

    def _cancel(self, b: _Batch) -> dict[str, Any]:
        if b.doc["status"] not in ("completed", "failed", "expired", "cancelled", "cancelling"):
            b.doc.update(status="cancelling", cancelling_at=self._tick())
        return self._checked(Batch, dict(b.doc))

    def _list_batches(self, params: dict[str, str]) -> tuple[int, Any]:
        typed: dict[str, Any] = dict(params)
        if "limit" in typed:
            typed["limit"] = int(typed["limit"]) if typed["limit"].isdigit() else typed["limit"]
        try:
            _BATCH_LIST.validate_python(typed, strict=True)
        except ValidationError as exc:
            return self._invalid(*_problems(exc, "GET /batches ?"))
        if set(params) - set(typing.get_type_hints(BatchListParams)):
            return self._invalid(f"GET /batches: query parameters the spec does not list: {sorted(params)}")
        limit = typed.get("limit", 20)
        if not 1 <= limit <= 100:
            return self._invalid(f"GET /batches: limit {limit} is outside 1..100")
        batches = sorted(self.batches.values(), key=lambda b: b.doc["created_at"], reverse=True)
        page, more = self._page(batches, params.get("after"), min(limit, self.page_size), key=lambda b: b.doc["id"])
        docs = [self._checked(Batch, dict(b.doc)) for b in page]
        doc: dict[str, Any] = {"object": "list", "data": docs, "has_more": more}
        if docs:  # first_id and last_id are optional in ListBatchesResponse
            doc.update(first_id=docs[0]["id"], last_id=docs[-1]["id"])
        return 200, doc

    # -- helpers --------------------------------------------------------------------------

    @staticmethod
    def _page(rows: list[Any], after: str | None, limit: int,
              key: typing.Callable[[Any], str] = lambda f: f.id) -> tuple[list[Any], bool]:
        start = 0
        if after is not None:
            start = next((n + 1 for n, row in enumerate(rows) if key(row) == after), len(rows))
        page = rows[start: start + limit]
        return page, start + limit < len(rows)

    def _next_answer(self, prompt: str) -> str:
        for word, answers in self.lines.items():
            if word in prompt and answers:
                return answers.pop(0)
        return "ok"

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _id(self, prefix: str) -> str:
        self._n += 1
        return f"{prefix}{self._n:04d}{secrets.token_hex(4)}"

    def _check(self, model: Any, doc: dict[str, Any]) -> None:
        try:
            model.model_validate(doc, strict=True)
            extra = set(doc) - set(model.model_fields)
            assert not extra, f"keys the spec does not list: {extra}"
        except (ValidationError, AssertionError) as exc:
            self.self_check_failures.append(f"{model.__name__}: {exc}")

    def _checked(self, model: Any, doc: dict[str, Any]) -> dict[str, Any]:
        self._check(model, doc)
        return doc

    def _invalid(self, *problems: str) -> tuple[int, Any]:
        self.problems.extend(problems)
        error = {"message": "; ".join(problems), "type": "invalid_request_error", "param": None,
                 "code": "invalid_request"}
        return 400, {"error": self._checked(ErrorObject, error)}

    def _not_found(self, message: str) -> tuple[int, Any]:
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
        return 404, {"error": self._checked(ErrorObject, error)}

    async def _send_error(self, stream: SocketStream, status: int, kind: str, message: str, code: str) -> None:
        error = self._checked(ErrorObject, {"message": message, "type": kind, "param": None, "code": code})
        await stream.send(reply(status, json.dumps({"error": error}).encode()))
