"""Read stage: job files (YAML or JSONL) in, a validated stream of items out.

A job is read twice at most: once to validate (every problem reported as
`FILE:LINE: field: message`), once to run. JSONL items are streamed, never held at once.
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import os
import re
import string
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ._dialect import DIALECTS, Dialect, DialectSpecError, get_dialect, parse_dialects
from ._exceptions import JobError, JobValidationError, Problem
from ._ids import FileNames, IdAssigner, image_stems, request_hash
from ._shard import ShardSpec

if TYPE_CHECKING:
    import yaml

__all__ = ["Job", "Item", "Endpoint", "RateLimit", "load_job", "BUILTIN_DEFAULTS", "MAX_PROBLEMS", "MAX_CONCURRENCY",
           "JobChangedError", "is_openai_host", "Selection", "Validated"]

BUILTIN_DEFAULTS: dict[str, Any] = {
    "model": "grok-imagine",
    "size": "1024x1024",
    "n": 1,
    "response_format": "b64_json",
}
TOP_LEVEL_KEYS = (
    "name", "endpoint", "defaults", "concurrency", "rate_limit", "output", "prompts", "prompts_file",
    "template", "matrix", "repeat", "pricing", "endpoints", "dialects",
)
# Keys of an item (or of the job's top level) that make several items out of one entry.
EXPANSION_KEYS = ("template", "matrix", "repeat")
MAX_REPEAT = 1_000_000
MAX_VALUE_NODES = 1_000_000  # values in one job value once YAML aliases are expanded
MAX_VALUE_CHARS = 64 * 2**20  # characters of text in one job value once expanded
# requests in flight per endpoint: each holds a connection (a file descriptor), a worker and up to
# one answer in memory. Latency-bound loads need many: 3,000 rpm at 20 s an image is ~1,000 in flight
MAX_CONCURRENCY = 4096
MAX_N = 10_000  # images per request: bounds the file names reserved per item (no API allows more)
MAX_PROBLEMS = 100
_SIZE = re.compile(r"^[1-9][0-9]{0,5}x[1-9][0-9]{0,5}$")
_BATCH_KEYS = frozenset({"custom_id", "method", "url", "body"})


@dataclass(frozen=True)
class RateLimit:
    rpm: float | None = None
    ipm: float | None = None


@dataclass(frozen=True)
class BatchSettings:
    """An endpoint's provider Batch API use (`batch: true` or a mapping of these); see `_batch`."""

    max_requests: int | None = None  # per batch; None: the provider's limit (OpenAI: 50,000)
    max_bytes: int | None = None  # per input file; None: the provider's limit (OpenAI: 200 MB)
    window: str = "24h"  # the completion window asked for
    poll: float | None = None  # seconds between polls; None: 1 s, then ×1.5 up to 60 s
    discount: float = 0.5  # batch price = price × (1 − discount), unless the endpoint has `batch_price`


BATCH_KEYS = ("max_requests", "max_bytes", "window", "poll", "discount")
BUILTIN_DIALECTS = tuple(DIALECTS)
ENDPOINT_KEYS = ("name", "base_url", "api_key_env", "dialect", "models", "concurrency", "rate_limit", "price",
                 "options", "headers", "batch", "batch_price")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 token
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Headers batcher sets itself: the auth header (per dialect), the body's framing, what it accepts.
RESERVED_HEADERS = frozenset({"authorization", "api-key", "content-type", "content-length", "host",
                              "transfer-encoding", "connection", "accept", "accept-encoding", "user-agent"})
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True, eq=False)
class Endpoint:
    """One place to send requests: URL, key variable, dialect, models served, limits, price."""

    base_url: str | None = None
    api_key_env: str | None = None
    name: str = "default"
    dialect: str = "openai-compatible"
    models: dict[str, str] | None = None  # model asked -> model sent; None serves every model
    concurrency: int | None = None
    rate_limit: RateLimit = field(default_factory=RateLimit)
    price: list[dict[str, Any]] | None = None  # pricing rows; None: the job's `pricing`
    options: dict[str, str] = field(default_factory=dict)  # dialect placeholders, e.g. api_version
    headers: dict[str, str] = field(default_factory=dict)  # header name -> environment variable with its value
    batch: BatchSettings | None = None  # send through the provider's Batch API (None: synchronous requests)
    batch_price: list[dict[str, Any]] | None = None  # pricing rows in batch mode; None: price × (1 − discount)
    line: int = 0

    def serves(self, model: Any) -> bool:
        return self.models is None or model in self.models

    def model_sent(self, model: str) -> str:
        return self.models.get(model, model) if self.models is not None else model

    def body_for(self, body: Mapping[str, Any]) -> dict[str, Any]:
        """The body this endpoint is sent: the model renamed to what it calls it."""
        model = body.get("model")
        if self.models is not None and isinstance(model, str) and self.models.get(model, model) != model:
            return {**body, "model": self.models[model]}
        return dict(body)


@dataclass(frozen=True)
class Item:
    """One request to make: its stable id, the body to send, and where it came from."""

    id: str
    body: dict[str, Any]
    rhash: str
    file: str
    line: int
    explicit_id: bool = False
    vars: dict[str, Any] | None = None  # the matrix variables that made this item's prompt

    @property
    def images(self) -> int:
        return int(self.body.get("n", 1))


class Validated(int):
    """`Job.validate()`'s answer: the item count (an int, as it always was) and the warnings.

    >>> checked = job.validate()
    >>> checked.count, [str(w) for w in checked.warnings]
    """

    warnings: tuple[Problem, ...]
    items: tuple[Item, ...] | None  # every item, when asked to hold them (`validate(hold=N)`) and ≤ N

    def __new__(cls, count: int, warnings: Iterable[Problem] = (), items: Iterable[Item] | None = None) -> Validated:
        value = super().__new__(cls, count)
        object.__setattr__(value, "warnings", tuple(warnings))
        object.__setattr__(value, "items", tuple(items) if items is not None else None)
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a Validated value is frozen")

    @property
    def count(self) -> int:
        return int(self)


@dataclass(frozen=True)
class Job:
    """A parsed job file, immutable. `items()` streams its items; `problems()` streams what's wrong.

    What one run takes of it (`--endpoint`, `--shard`) is a `Selection`, held by the run.
    """

    path: Path
    name: str
    endpoints: list[Endpoint] = field(default_factory=lambda: [Endpoint()])
    defaults: dict[str, Any] = field(default_factory=dict)
    concurrency: int | None = None
    rate_limit: RateLimit = field(default_factory=RateLimit)
    output: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    pricing: list[dict[str, Any]] = field(default_factory=list)
    dialects: dict[str, Dialect] = field(default_factory=dict)  # dialects declared in the job file
    _inline: list[tuple[int, Any, dict[str, int], str]] = field(default_factory=list, repr=False)
    _prompts_file: Path | None = field(default=None, repr=False)
    # the prompts file as loaded (device, inode, size, mtime): every pass must find it so
    _signature: tuple[int, int, int, int] | None = field(default=None, repr=False)
    _header_problems: list[Problem] = field(default_factory=list, repr=False)

    @property
    def endpoint(self) -> Endpoint:
        """The first endpoint (the only one, for a job with a single `endpoint:`)."""
        return self.endpoints[0]

    def endpoints_named(self, names: Iterable[str] | None) -> list[Endpoint]:
        """The endpoints called `names` (`--endpoint NAME`), in the job's order; every one when None
        or empty. An unknown name is a JobError."""
        wanted = list(names or ())
        if not wanted:
            return list(self.endpoints)
        known = [e.name for e in self.endpoints]
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise JobError(f"{self.path}: no endpoint named {', '.join(map(repr, unknown))} "
                           f"(the job has {', '.join(known)})")
        return [e for e in self.endpoints if e.name in wanted]

    def batch_mode(self) -> Job:
        """A copy with every endpoint in batch mode (`--batch`): its own `batch:` settings, else the defaults."""
        return replace(self, endpoints=[e if e.batch is not None else replace(e, batch=BatchSettings())
                                        for e in self.endpoints])

    def dialect_of(self, ep: Endpoint) -> Dialect:
        return get_dialect(ep.dialect, self.dialects)

    def can_send(self, ep: Endpoint, body: Mapping[str, Any]) -> bool:
        """Whether `ep` serves the body's model and its dialect can express the request."""
        if not ep.serves(body.get("model")):
            return False
        return not self.dialect_of(ep).check(ep.body_for(body))

    def _entries(self, live: list[Endpoint]) -> Iterator[Item | Problem]:
        """Items and problems in file order; an item none of the `live` endpoints can send is a problem."""
        yield from self._header_problems
        ids = IdAssigner()
        base = {**BUILTIN_DEFAULTS, **self.defaults}
        fname = str(self.path)
        names = FileNames()
        for entry in self._raw_entries(fname, base, ids):
            if isinstance(entry, Item) and not any(self.can_send(e, entry.body) for e in live):
                yield self._unsendable(entry, live)
                continue
            if isinstance(entry, Item):
                stem = names.claim(image_stems(entry.id, entry.images))
                if stem is not None:
                    yield self._clash(entry, stem, base)
                    continue
            yield entry

    def _clash(self, item: Item, stem: str, base: dict[str, Any]) -> Problem:
        """The problem of an item whose file name `stem` an earlier item takes, naming that item's
        line (found by reading the job again: clashes are rare, a location per name is not free)."""
        where = "an earlier item"
        for other in self._raw_entries(str(self.path), base, IdAssigner()):
            if isinstance(other, Item) and stem in image_stems(other.id, other.images):
                where = f"the item at {other.file}:{other.line}"
                break
        return Problem(item.file, item.line, "id",
                       f"item {item.id!r} would write images/{stem}.*, which {where} writes too (the same "
                       f"id, or an id plus the _K suffix of an item with n > 1); give one of them another id")

    def _unsendable(self, item: Item, live: list[Endpoint]) -> Problem:
        model = item.body.get("model")
        serving = [e for e in live if e.serves(model)]
        if not serving:
            return Problem(item.file, item.line, "model", f"no endpoint serves model {model!r} "
                                                          f"(endpoints: {', '.join(e.name for e in live)})")
        ep = serving[0]
        fld, msg = self.dialect_of(ep).check(ep.body_for(item.body))[0]
        return Problem(item.file, item.line, fld, f"{msg} (endpoint {ep.name!r}, dialect {ep.dialect})")

    def _raw_entries(self, fname: str, base: dict[str, Any], ids: IdAssigner) -> Iterator[Item | Problem]:
        for line, raw, lines, prefix in self._inline:
            yield from _make_item(raw, fname, line, prefix, lines, base, self.overrides, ids)
        if self._prompts_file is not None:
            yield from _stream_jsonl(self._prompts_file, base, self.overrides, ids, self._signature)

    def problems(self, endpoints: Iterable[str] | None = None) -> Iterator[Problem]:
        """Every problem in the job, in file order (`endpoints`: as in `validate`)."""
        for entry in self._entries(self.endpoints_named(endpoints)):
            if isinstance(entry, Problem):
                yield entry

    def validate(self, endpoints: Iterable[str] | None = None, *, hold: int = 0) -> Validated:
        """Check the whole job; return the item count (with its warnings) or raise JobValidationError.

        `endpoints`: the names a run may use (`--endpoint`; None: all): an item none of them can send
        is a problem. What is allowed but likely to fail is a warning (one per endpoint and model).
        `hold`: keep the items (`Validated.items`) when there are at most this many, so a run that
        validates a small job does not parse it again for each later pass.
        """
        found: list[Problem] = []
        total = count = 0
        warned: dict[tuple[str, str], Problem] = {}
        live = self.endpoints_named(endpoints)
        held: list[Item] | None = [] if hold > 0 else None
        for entry in self._entries(live):
            if isinstance(entry, Problem):
                total += 1
                if len(found) < MAX_PROBLEMS:
                    found.append(entry)
            else:
                count += 1
                if held is not None:
                    held = held if count <= hold else None  # a large job streams every pass, as before
                    if held is not None:
                        held.append(entry)
                for problem in self._dialect_advice(entry, live, warned):
                    total += 1
                    if len(found) < MAX_PROBLEMS:
                        found.append(problem)
        by_name = {e.name: e for e in live}
        warnings = [p for (name, _), p in warned.items() if not is_openai_host(by_name[name].base_url)]
        if total:
            raise JobValidationError(found, total)
        if count == 0:
            raise JobValidationError([Problem(str(self.path), 1, "prompts", "the job has no items")])
        return Validated(count, warnings, held)

    def _dialect_advice(self, item: Item, live: list[Endpoint],
                        warned: dict[tuple[str, str], Problem]) -> Iterator[Problem]:
        """gpt-image models reject `response_format`: an error on OpenAI's own host, else a warning.

        The model prefix is OpenAI's documented family, not an allow-list: any other model passes.
        """
        for ep in live:
            model = item.body.get("model")
            if not ep.serves(model) or "response_format" not in item.body:
                continue
            sent = ep.model_sent(model) if isinstance(model, str) else ""
            dialect = self.dialect_of(ep)
            if not sent.startswith("gpt-image") or "response_format" in dialect.drop | set(dialect.rename):
                continue
            key = (ep.name, sent)
            if key in warned:
                continue
            advice = (f"OpenAI's {sent} rejects response_format, which dialect {ep.dialect} sends "
                      f"(endpoint {ep.name!r}); set `dialect: openai` on the endpoint")
            problem = Problem(item.file, item.line, "model", advice)
            warned[key] = problem
            if is_openai_host(ep.base_url):
                yield problem  # certain to fail there: an error, once per endpoint and model

    def items(self, endpoints: Iterable[str] | None = None) -> Iterator[Item]:
        """Stream every item; call `validate()` first (a problem raises). `endpoints`: as in `validate`.

        One run's items (one shard of them) are `Selection.items(job)`.
        """
        for entry in self._entries(self.endpoints_named(endpoints)):
            if isinstance(entry, Problem):
                self._check_unchanged()  # a line edited during this pass is a change, not a problem
                raise JobValidationError([entry])
            yield entry

    def all_items(self, endpoints: Iterable[str] | None = None) -> Iterator[Item]:
        """Every item of the job (the same as `items`; kept for callers that predate `Selection`)."""
        return self.items(endpoints)

    def check_unchanged(self) -> None:
        """Raise JobChangedError if the prompts file is no longer the one loaded (a pass over items
        held in memory checks this where a streamed pass would notice the change)."""
        self._check_unchanged()

    def _check_unchanged(self) -> None:
        if self._prompts_file is not None and self._signature is not None \
                and _signature(self._prompts_file) != self._signature:
            raise JobChangedError(self._prompts_file)


@dataclass(frozen=True)
class Selection:
    """What one run takes of a job: some of its endpoints (`--endpoint`) and one shard (`--shard I/N`).

    >>> selection = Selection.of(job, ["a"], shard=ShardSpec(0, 4))
    >>> checked = selection.validate(job)          # an item endpoint "a" can't send is a problem
    >>> for item in selection.items(job): ...      # shard 0's items only

    Held by the run, never set on the Job: a library user who reuses a Job gets all of it.
    """

    endpoints: frozenset[str] | None = None  # None: every endpoint
    shard: ShardSpec | None = None  # None: every item

    @classmethod
    def of(cls, job: Job, endpoints: Iterable[str] | None = None, shard: ShardSpec | None = None) -> Selection:
        """A selection of `job`; an endpoint name it does not have is a JobError."""
        names = list(endpoints or ())
        job.endpoints_named(names)
        return cls(frozenset(names) if names else None, shard)

    def live(self, job: Job) -> list[Endpoint]:
        """The endpoints this run may use, in the job's order."""
        return job.endpoints_named(self.endpoints)

    def validate(self, job: Job, *, hold: int = 0) -> Validated:
        """The whole job checked against these endpoints (every shard's items: a plan covers them all)."""
        return job.validate(self._names(), hold=hold)

    def all_items(self, job: Job) -> Iterator[Item]:
        """Every item, whatever the shard (a sharded run's fingerprint and merge need them all)."""
        return job.items(self._names())

    def items(self, job: Job) -> Iterator[Item]:
        """This run's items: the shard's, when there is one."""
        yield from self.of_shard(job.items(self._names()))

    def of_shard(self, items: Iterable[Item]) -> Iterator[Item]:
        """Those of `items` in this run's shard (all of them without one)."""
        shard = self.shard
        for item in items:
            if shard is None or shard.contains(item.id):
                yield item

    def _names(self) -> list[str] | None:
        return sorted(self.endpoints) if self.endpoints is not None else None


def is_openai_host(base_url: str | None) -> bool:
    """Whether `base_url` is OpenAI's own API (api.openai.com), not a gateway speaking its protocol."""
    if not base_url:
        return False
    return (urlsplit(base_url).hostname or "").lower() == "api.openai.com"


def load_job(path: str | os.PathLike[str], overrides: Mapping[str, Any] | None = None) -> Job:
    """Read a job file's header. Items are read lazily by `Job.items()`.

    >>> job = load_job("jobs/example.yaml", {"size": "512x512"})
    >>> job.validate()
    """
    p = Path(path)
    try:
        if p.is_dir():
            raise JobError(f"{p}: is a directory, not a job file")
        size = p.stat().st_size
    except FileNotFoundError:
        raise JobError(f"{p}: job file not found") from None
    except OSError as exc:
        raise JobError(f"{p}: can't read job file: {exc.strerror}") from None
    overrides = dict(overrides or {})
    problems = [Problem("command line", 0, k, m) for k, m in _field_problems(overrides)]
    if size == 0:
        raise JobValidationError([Problem(str(p), 1, "job", "the file is empty"), *problems])
    if p.suffix.lower() in (".jsonl", ".ndjson"):
        return Job(path=p, name=p.stem, overrides=overrides, _prompts_file=p, _signature=_signature(p),
                   _header_problems=problems)
    job = _load_yaml(p)
    return replace(job, overrides=overrides, _header_problems=problems + job._header_problems)


# -- YAML ---------------------------------------------------------------------------------


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


def _load_yaml(p: Path) -> Job:
    import yaml  # here, not at the top: a JSONL job's run never needs it (~15 ms of start-up)

    fname = str(p)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise JobValidationError([Problem(fname, 1, "job", f"not UTF-8 text ({exc.reason})")]) from None
    except OSError as exc:
        raise JobError(f"{p}: can't read job file: {exc.strerror}") from None
    try:
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        raise JobValidationError([Problem(fname, line, "yaml", f"character {exc.character!r} is not allowed")]) from None
    try:
        root = loader.get_single_node()
        if root is None:
            raise JobValidationError([Problem(fname, 1, "job", "the file is empty")])
        if not isinstance(root, yaml.MappingNode):
            raise JobValidationError(
                [Problem(fname, _line(root), "job", "a YAML job must be a mapping of keys (name, prompts, ...)")]
            )
        return _job_from_mapping(p, loader, root)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        what = exc.problem or exc.context or "invalid YAML"
        raise JobValidationError([Problem(fname, line, "yaml", what)]) from None
    except yaml.reader.ReaderError as exc:
        line = text[: exc.position].count("\n") + 1
        raise JobValidationError([Problem(fname, line, "yaml", f"character {exc.character!r} is not allowed")]) from None
    except yaml.YAMLError as exc:
        raise JobValidationError([Problem(fname, 1, "yaml", str(exc).splitlines()[0])]) from None
    except RecursionError:
        raise JobValidationError([Problem(fname, 1, "yaml", "nesting too deep")]) from None
    finally:
        loader.dispose()


def _job_from_mapping(p: Path, loader: yaml.SafeLoader, root: yaml.MappingNode) -> Job:
    import yaml

    fname = str(p)
    # the Job is frozen: its fields are gathered here, then it is made once
    attrs: dict[str, Any] = {"name": p.stem}
    endpoints = [Endpoint()]
    dialects: dict[str, Dialect] = {}
    inline: list[tuple[int, Any, dict[str, int], str]] = []
    problems: list[Problem] = []
    seen: set[str] = set()
    expansion: dict[str, Any] = {}
    expansion_lines: dict[str, int] = {}

    def value(node: yaml.Node) -> Any:
        return loader.construct_object(node, deep=True)

    def too_big(node: yaml.Node, where: str) -> bool:
        """Report a value whose aliases expand past the bounds (a YAML alias bomb), unbuilt."""
        nodes, chars = _expanded_size(node, {})
        if nodes <= MAX_VALUE_NODES and chars <= MAX_VALUE_CHARS:
            return False
        problems.append(Problem(fname, _line(node), where,
                                f"expands to {nodes:,} values / {chars:,} characters through YAML aliases "
                                f"(at most {MAX_VALUE_NODES:,} / {MAX_VALUE_CHARS:,} per value)"))
        return True

    for key_node, node in root.value:
        key = value(key_node)
        line = _line(key_node)
        if not isinstance(key, str):
            problems.append(Problem(fname, line, str(key), "keys must be strings"))
            continue
        if key in seen:
            problems.append(Problem(fname, line, key, "given twice"))
            continue
        seen.add(key)
        if key not in TOP_LEVEL_KEYS:
            near = difflib.get_close_matches(key, TOP_LEVEL_KEYS, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else f" (known keys: {', '.join(TOP_LEVEL_KEYS)})"
            problems.append(Problem(fname, line, key, f"unknown key{hint}"))
            continue
        vline = _line(node)
        if key == "prompts":
            if not isinstance(node, yaml.SequenceNode):
                problems.append(Problem(fname, vline, key, "must be a list of prompts or items"))
                continue
            for index, el in enumerate(node.value):
                if too_big(el, f"prompts[{index}]"):
                    continue
                lines = _field_lines(el) if isinstance(el, yaml.MappingNode) else {}
                inline.append((_line(el), value(el), lines, f"prompts[{index}]."))
            continue
        if too_big(node, key):
            continue
        val = value(node)
        if key in EXPANSION_KEYS:
            expansion[key] = val
            expansion_lines.update(_field_lines(root, only=key))
            continue
        if key == "pricing":
            attrs["pricing"] = _pricing(val, fname, node, problems)
            continue
        if key == "name":
            if not isinstance(val, str) or not val.strip() or "/" in val or val.strip() in (".", ".."):
                problems.append(Problem(fname, vline, key, "must be a non-empty string without '/'"))
            else:
                attrs["name"] = val.strip()
        elif key == "defaults":
            if not isinstance(val, dict):
                problems.append(Problem(fname, vline, key, "must be a mapping of request fields"))
                continue
            field_lines = {str(k.value): _line(v) for k, v in node.value}
            for fld, msg in _field_problems(val):
                problems.append(Problem(fname, field_lines.get(fld, vline), f"defaults.{fld}", msg))
            attrs["defaults"] = val
        elif key == "concurrency":
            if not _is_int(val) or not 1 <= val <= MAX_CONCURRENCY:
                problems.append(Problem(fname, vline, key, f"must be an integer from 1 to {MAX_CONCURRENCY}"))
            else:
                attrs["concurrency"] = val
        elif key == "rate_limit":
            attrs["rate_limit"] = _rate_limit(val, fname, vline, problems)
        elif key == "endpoint":
            endpoints = [_endpoint(val, fname, node, problems, single=True)]
        elif key == "endpoints":
            if "endpoint" in seen:
                problems.append(Problem(fname, vline, key, "give 'endpoint' or 'endpoints', not both"))
            elif not isinstance(node, yaml.SequenceNode) or not node.value:
                problems.append(Problem(fname, vline, key, "must be a non-empty list of endpoints"))
            else:
                endpoints = [_endpoint(value(el), fname, el, problems) for el in node.value]
                names: set[str] = set()
                for ep in endpoints:
                    if ep.name in names:
                        problems.append(Problem(fname, ep.line, "endpoints.name", f"{ep.name!r} is used twice"))
                    names.add(ep.name)
        elif key == "dialects":
            if not isinstance(val, dict):
                problems.append(Problem(fname, vline, key, "must be a mapping of dialect name to its rules"))
                continue
            try:
                dialects = parse_dialects(val)
            except DialectSpecError as exc:
                key_lines = {str(k.value): _line(k) for k, _ in node.value} if isinstance(node, yaml.MappingNode) else {}
                for path, msg in exc.problems:
                    parts = path.split(".")
                    at = key_lines.get(parts[1], vline) if len(parts) > 1 else vline
                    problems.append(Problem(fname, at, path, msg))
                dialects = {name: get_dialect("openai-compatible") for name in val if isinstance(name, str)}
        elif key == "output":
            if not isinstance(val, str) or not val:
                problems.append(Problem(fname, vline, key, "must be a folder path"))
            else:
                out = (p.parent / val) if not os.path.isabs(val) else Path(val)
                if out.exists() and not out.is_dir():
                    problems.append(Problem(fname, vline, key, f"{out} exists and is not a folder"))
                attrs["output"] = str(out)
        elif key == "prompts_file":
            if not isinstance(val, str) or not val:
                problems.append(Problem(fname, vline, key, "must be a path to a JSONL file"))
                continue
            pf = p.parent / val
            if not pf.is_file():
                problems.append(Problem(fname, vline, key, f"{pf} does not exist or is not a file"))
            else:
                attrs["_prompts_file"] = pf
                attrs["_signature"] = _signature(pf)  # every later pass must find the file so
    for ep in list(endpoints):
        if ep.dialect not in BUILTIN_DIALECTS and ep.dialect not in dialects:
            near = difflib.get_close_matches(ep.dialect, [*BUILTIN_DIALECTS, *dialects], n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            problems.append(Problem(fname, ep.line, "endpoints.dialect", f"unknown dialect {ep.dialect!r}{hint} "
                                    f"(built in: {', '.join(BUILTIN_DIALECTS)}; or declare it under `dialects:`)"))
            endpoints = [e if e is not ep else replace(e, dialect="openai-compatible") for e in endpoints]
            continue
        missing = get_dialect(ep.dialect, dialects).missing_options(ep.options)
        if missing:
            problems.append(Problem(fname, ep.line, "endpoints.options",
                                    f"endpoint {ep.name!r} (dialect {ep.dialect}) needs options: {', '.join(missing)}"))
    if expansion:
        # a top-level template/matrix is one more entry, after the listed prompts
        first = min(expansion_lines.values())
        inline.append((first, expansion, expansion_lines, ""))
    if "prompts" not in seen and "prompts_file" not in seen and "template" not in seen:
        problems.append(Problem(fname, _line(root), "prompts",
                                "the job needs 'prompts', 'prompts_file' or 'template' with 'matrix'"))
    return Job(path=p, endpoints=endpoints, dialects=dialects, _inline=inline, _header_problems=problems, **attrs)


def _expanded_size(node: yaml.Node, memo: dict[int, tuple[int, int]]) -> tuple[int, int]:
    """(values, scalar characters) of a node once its aliases are expanded, in time linear in the
    file: an alias is the same node object, counted once and multiplied, never built."""
    import yaml

    known = memo.get(id(node))
    if known is not None:
        return known
    if isinstance(node, yaml.ScalarNode):
        size = (1, len(node.value))
    else:
        nodes = chars = 0
        children = node.value if isinstance(node, yaml.SequenceNode) else [n for kv in node.value for n in kv]
        memo[id(node)] = (0, 0)  # a recursive alias counts as empty here (the constructor refuses it)
        for child in children:
            n, c = _expanded_size(child, memo)
            nodes, chars = nodes + n, chars + c
        size = (nodes + 1, chars)
    memo[id(node)] = size
    return size


def _field_lines(node: yaml.MappingNode, only: str | None = None) -> dict[str, int]:
    """Line of each field's value, and of each `matrix` variable, for problem reports."""
    import yaml

    lines: dict[str, int] = {}
    for k, v in node.value:
        if not isinstance(k, yaml.ScalarNode) or (only is not None and k.value != only):
            continue
        lines[str(k.value)] = _line(v)
        if k.value == "matrix" and isinstance(v, yaml.MappingNode):
            for mk, _ in v.value:
                if isinstance(mk, yaml.ScalarNode):
                    lines[f"matrix.{mk.value}"] = _line(mk)
    return lines


def _rate_limit(val: Any, fname: str, line: int, problems: list[Problem], where: str = "rate_limit") -> RateLimit:
    if not isinstance(val, dict):
        problems.append(Problem(fname, line, where, "must be a mapping with rpm and/or ipm"))
        return RateLimit()
    out: dict[str, float] = {}
    for k, v in val.items():
        if k not in ("rpm", "ipm"):
            problems.append(Problem(fname, line, f"{where}.{k}", "unknown key (rpm, ipm)"))
        elif not _is_number(v) or v <= 0:
            problems.append(Problem(fname, line, f"{where}.{k}", "must be a positive number per minute"))
        else:
            out[k] = float(v)
    return RateLimit(**out)


def _endpoint(val: Any, fname: str, node: yaml.Node, problems: list[Problem], single: bool = False) -> Endpoint:
    import yaml

    line = _line(node)
    where = "endpoint" if single else "endpoints"
    if not isinstance(val, dict):
        problems.append(Problem(fname, line, where, "must be a mapping with base_url and api_key_env"))
        return Endpoint(line=line)
    lines = _field_lines(node) if isinstance(node, yaml.MappingNode) else {}
    out: dict[str, Any] = {"line": line}

    def problem(k: str, msg: str) -> None:
        problems.append(Problem(fname, lines.get(k, line), f"{where}.{k}", msg))

    for k, v in val.items():
        if k == "base_url":
            if not isinstance(v, str) or not re.match(r"^https?://[^\s/]+", v):
                problem(k, "must be an http(s) URL")
                continue
        elif k == "api_key_env":
            if not isinstance(v, str) or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", v):
                problem(k, "must name an environment variable")
                continue
        elif k in ("api_key", "key"):
            problem(k, "keys don't belong in job files; use api_key_env")
            continue
        elif k == "name":
            if not isinstance(v, str) or not _NAME.match(v):
                problem(k, "must be 1-64 letters, digits, '_', '.', '-'")
                continue
        elif k == "dialect":
            if not isinstance(v, str) or not v:
                problem(k, f"must name a dialect ({', '.join(BUILTIN_DIALECTS)}, or one under `dialects:`)")
                continue
        elif k == "models":
            if isinstance(v, list) and v and all(isinstance(m, str) and m for m in v):
                v = {m: m for m in v}
            elif isinstance(v, dict) and v and all(isinstance(a, str) and a and isinstance(b, str) and b
                                                   for a, b in v.items()):
                v = dict(v)
            else:
                problem(k, "must be a list of model names, or a mapping of model to the name this endpoint "
                           "is sent (e.g. {grok-imagine: grok-imagine-image})")
                continue
        elif k == "concurrency":
            if not _is_int(v) or not 1 <= v <= MAX_CONCURRENCY:
                problem(k, f"must be an integer from 1 to {MAX_CONCURRENCY}")
                continue
        elif k == "rate_limit":
            v = _rate_limit(v, fname, lines.get(k, line), problems, f"{where}.rate_limit")
        elif k in ("price", "batch_price"):
            if _is_number(v) and v >= 0:
                v = [{"per_image": v}]
            else:
                v = _price_rows(v, fname, lines.get(k, line), f"{where}.{k}", problems, None)
        elif k == "batch":
            v = _batch_settings(v, problem)
            if v is False:
                continue
        elif k == "options":
            if not isinstance(v, dict) or not all(isinstance(a, str) and isinstance(b, (str, int, float))
                                                  and not isinstance(b, bool) for a, b in v.items()):
                problem(k, "must be a mapping of option name to a string (e.g. api_version: 2025-04-01-preview)")
                continue
            v = {a: str(b) for a, b in v.items()}
        elif k == "headers":
            v = _endpoint_headers(v, problem)
            if v is None:
                continue
        else:
            known = ("base_url", "api_key_env") if single else ENDPOINT_KEYS
            problem(k, f"unknown key ({', '.join(known)})")
            continue
        out[k] = v
    if not single:
        if "name" not in val:
            problems.append(Problem(fname, line, f"{where}.name", "every endpoint needs a name"))
        if "base_url" not in val:
            problems.append(Problem(fname, line, f"{where}.base_url", "missing"))
    return Endpoint(**out)


def _batch_settings(val: Any, problem: Callable[[str, str], None]) -> BatchSettings | bool | None:
    """`batch: true|false` or a mapping of BATCH_KEYS; False when it is wrong (the problem is noted)."""
    if val is True:
        return BatchSettings()
    if val is False or val is None:
        return None
    if not isinstance(val, dict):
        problem("batch", f"must be true, false, or a mapping ({', '.join(BATCH_KEYS)})")
        return False
    out: dict[str, Any] = {}
    ok = True
    for k, v in val.items():
        if k in ("max_requests", "max_bytes"):
            if not _is_int(v) or v < 1:
                problem("batch", f"{k} must be a positive integer")
                ok = False
                continue
        elif k == "window":
            if not isinstance(v, str) or not re.match(r"^[1-9][0-9]*[hd]$", v):
                problem("batch", "window must be a duration such as 24h")
                ok = False
                continue
        elif k == "poll":
            if not _is_number(v) or not 0 < v <= 86400:
                problem("batch", "poll must be a number of seconds (0 < poll ≤ 86400)")
                ok = False
                continue
            v = float(v)
        elif k == "discount":
            if not _is_number(v) or not 0 <= v < 1:
                problem("batch", "discount must be a fraction from 0 to below 1 (0.5: half the price)")
                ok = False
                continue
            v = float(v)
        else:
            problem("batch", f"unknown key {k!r} ({', '.join(BATCH_KEYS)})")
            ok = False
            continue
        out[k] = v
    return BatchSettings(**out) if ok else False


def _endpoint_headers(val: Any, problem: Callable[[str, str], None]) -> dict[str, str] | None:
    """`headers: {OpenAI-Organization: {env: OPENAI_ORG_ID}}`: each value is read from the environment
    at run time, so nothing secret is ever written in a job file."""
    if not isinstance(val, dict):
        problem("headers", "must map header names to {env: VARIABLE}, e.g. OpenAI-Organization: {env: OPENAI_ORG_ID}")
        return None
    out: dict[str, str] = {}
    for name, spec in val.items():
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            problem("headers", f"{name!r} is not an HTTP header name")
        elif name.lower() in RESERVED_HEADERS:
            problem("headers", f"{name} is set by batcher itself (the key comes from api_key_env)")
        elif not (isinstance(spec, dict) and set(spec) == {"env"} and isinstance(spec["env"], str)
                  and _ENV_NAME.match(spec["env"])):
            problem("headers", f"{name}: the value must be {{env: VARIABLE}}, the environment variable holding "
                               f"it; values are never written in the job file")
        else:
            out[name] = spec["env"]
    return out if len(out) == len(val) else None


# -- JSONL --------------------------------------------------------------------------------


class JobChangedError(JobError):
    """The prompts file changed since this run first read it (its items may no longer be the same)."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path}: the job file changed while batcher was using it; results so far are "
                         f"in the journal. Rerun once the file is final")


def _signature(path: Path) -> tuple[int, int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _stream_jsonl(
    path: Path, base: dict[str, Any], overrides: dict[str, Any], ids: IdAssigner,
    signature: tuple[int, int, int, int] | None = None,
) -> Iterator[Item | Problem]:
    """The items of a JSONL file; JobChangedError if it is not the file `signature` describes
    (checked when opened and at the end; `Job.all_items` checks again before raising a problem)."""
    fname = str(path)
    any_line = False
    try:
        fh = path.open("rb")
    except OSError as exc:
        yield Problem(fname, 1, "prompts_file", f"can't read: {exc.strerror}")
        return

    def check() -> None:
        st = os.fstat(fh.fileno())
        if signature is not None and (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) != signature:
            raise JobChangedError(path)

    with fh:
        check()
        for lineno, raw in enumerate(fh, 1):
            if not raw.strip():
                continue
            any_line = True
            try:
                obj = json.loads(raw)
            except UnicodeDecodeError:
                yield Problem(fname, lineno, "line", "not UTF-8 text")
                continue
            except json.JSONDecodeError as exc:
                yield Problem(fname, lineno, "line", f"invalid JSON: {exc.msg} (column {exc.colno})")
                continue
            except RecursionError:
                yield Problem(fname, lineno, "line", "nested too deep")
                continue
            yield from _make_item(obj, fname, lineno, "", {}, base, overrides, ids)
        check()
    if not any_line:
        yield Problem(fname, 1, "prompts_file", "the file has no items")


# -- items --------------------------------------------------------------------------------


def _make_item(
    raw: Any,
    fname: str,
    line: int,
    prefix: str,
    lines: dict[str, int],
    base: dict[str, Any],
    overrides: dict[str, Any],
    ids: IdAssigner,
) -> Iterator[Item | Problem]:
    explicit: Any = None
    if isinstance(raw, str):
        fields: dict[str, Any] = {"prompt": raw}
    elif isinstance(raw, dict) and "body" in raw and set(raw) <= _BATCH_KEYS:
        # An OpenAI Batch API request line: custom_id becomes the id.
        explicit = raw.get("custom_id")
        if raw.get("method", "POST") != "POST":
            yield Problem(fname, line, f"{prefix}method", "Batch API lines must use POST")
        url = raw.get("url", "/v1/images/generations")
        if not isinstance(url, str) or not url.rstrip("/").endswith("/images/generations"):
            yield Problem(fname, line, f"{prefix}url", f"only /v1/images/generations is supported, got {url!r}")
        if not isinstance(raw["body"], dict):
            yield Problem(fname, line, f"{prefix}body", "must be an object of request fields")
            return
        fields = dict(raw["body"])
        if explicit is None:
            yield Problem(fname, line, f"{prefix}custom_id", "Batch API lines need a custom_id")
            return
    elif isinstance(raw, dict):
        fields = dict(raw)
        explicit = fields.pop("id", None)
    else:
        yield Problem(fname, line, prefix.rstrip(".") or "item", "must be a prompt string or an object with 'prompt'")
        return
    bad = False
    if explicit is not None and (not isinstance(explicit, str) or not explicit.strip() or len(explicit) > 512):
        yield Problem(fname, lines.get("id", line), f"{prefix}id", "must be a non-empty string (≤ 512 chars)")
        bad = True
    expansion = {k: fields.pop(k) for k in EXPANSION_KEYS if k in fields}
    for fld, msg in _field_problems(fields):
        yield Problem(fname, lines.get(fld, line), f"{prefix}{fld}", msg)
        bad = True
    combos: Any = [None]
    repeat = 1
    template: Any = None
    if expansion:
        spec = _expansion(expansion, fields, explicit, fname, line, prefix, lines)
        problems = [x for x in spec if isinstance(x, Problem)]
        if problems:
            yield from problems
            return
        (template, matrix, repeat), = spec
        if template is not None:
            names = list(matrix)
            combos = (dict(zip(names, values, strict=True)) for values in itertools.product(*matrix.values()))
    if (not expansion or template is None) and "prompt" not in {**base, **fields, **overrides}:
        yield Problem(fname, line, f"{prefix}prompt", "missing; every item needs a prompt")
        bad = True
    if bad:
        return
    for variables in combos:  # a generator: a matrix of 10^6 combinations is never held at once
        if variables is None:
            body, item_id = {**base, **fields, **overrides}, explicit
        else:
            prompt = template.format_map(variables)
            if not prompt.strip():
                yield Problem(fname, lines.get("template", line), f"{prefix}template",
                              f"gives an empty prompt for {variables}")
                continue
            body = {**base, **fields, "prompt": prompt, **overrides}
            item_id = explicit.format_map(variables) if explicit is not None else None
        try:
            rhash = request_hash(body)
        except (TypeError, ValueError):
            yield Problem(fname, line, f"{prefix}fields", "values must be JSON: strings, numbers, lists, mappings")
            return
        for copy in range(1, repeat + 1):
            # the first copy keeps the plain id, so adding `repeat` later never pays again for it
            if item_id is not None:
                assigned = ids.assign(item_id if copy == 1 else f"{item_id}-r{copy}", rhash)
            elif copy == 1:
                assigned = first = ids.assign(None, rhash)
            else:
                assigned = ids.assign(f"{first}-r{copy}", rhash)
            if assigned is None:
                dup = item_id if copy == 1 else f"{item_id or first}-r{copy}"
                yield Problem(fname, lines.get("id", line), f"{prefix}id", f"duplicate id {dup!r}")
                continue
            yield Item(assigned, body, rhash, fname, line, item_id is not None, variables)


def _expansion(
    spec: dict[str, Any], fields: dict[str, Any], explicit: Any, fname: str, line: int, prefix: str,
    lines: dict[str, int],
) -> list[Any]:
    """Check template/matrix/repeat; return problems, or one (template, matrix, repeat) tuple."""
    problems: list[Problem] = []

    def problem(key: str, msg: str) -> None:
        at = lines.get(key) or lines.get(key.split(".")[0], line)
        problems.append(Problem(fname, at, f"{prefix}{key}", msg))

    repeat = spec.get("repeat", 1)
    if not _is_int(repeat) or not 1 <= repeat <= MAX_REPEAT:
        problem("repeat", f"must be an integer from 1 to {MAX_REPEAT:,}, got {repeat!r}")
    template, matrix = spec.get("template"), spec.get("matrix")
    if template is None and matrix is not None:
        problem("matrix", "needs a 'template' that uses its variables, e.g. '{subject} in the style of {style}'")
    if template is not None:
        if "prompt" in fields:
            problem("template", "give either 'prompt' or 'template', not both")
        if not isinstance(template, str) or not template.strip():
            problem("template", "must be a non-empty string with {variable} placeholders")
            return problems
        if not isinstance(matrix, dict) or not matrix:
            problem("matrix", "must be a mapping of variable name to a list of values")
            return problems
        for name, values in matrix.items():
            if not isinstance(name, str) or not name.isidentifier():
                problem(f"matrix.{name}", f"variable name {name!r} must be an identifier (letters, digits, _)")
            elif not isinstance(values, list) or not values:
                problem(f"matrix.{name}", "must be a non-empty list of values")
            elif not all(isinstance(v, (str, int, float)) and not isinstance(v, bool) for v in values):
                problem(f"matrix.{name}", "values must be strings or numbers")
        used = _placeholders(template, "template", problem)
        for name in sorted(used - set(matrix)):
            problem("template", f"uses {{{name}}}, which the matrix does not define")
        for name in sorted(n for n in set(matrix) - used if isinstance(n, str) and n.isidentifier()):
            problem(f"matrix.{name}", "is not used in the template")
        if isinstance(explicit, str):
            id_vars = _placeholders(explicit, "id", problem)
            for name in sorted(id_vars - set(matrix)):
                problem("id", f"uses {{{name}}}, which the matrix does not define")
            if not id_vars and math.prod(len(v) for v in matrix.values() if isinstance(v, list)) > 1:
                problem("id", "with a matrix, the id must use its variables (e.g. '{subject}-{style}'), "
                              "or leave it out for ids derived from each request")
    if problems:
        return problems
    return [(template, matrix, repeat)]


def _placeholders(text: str, key: str, problem: Callable[[str, str], None]) -> set[str]:
    names: set[str] = set()
    try:
        for _literal, name, spec, conversion in string.Formatter().parse(text):
            if name is None:
                continue
            if not name.isidentifier() or spec or conversion:
                problem(key, f"placeholder {{{name}{'!' + conversion if conversion else ''}"
                             f"{':' + spec if spec else ''}}} must be a plain {{variable}}; "
                             f"write {{{{ and }}}} for literal braces")
            else:
                names.add(name)
    except ValueError as exc:
        problem(key, f"{exc}; write {{{{ and }}}} for literal braces")
    return names


def _pricing(val: Any, fname: str, node: yaml.Node, problems: list[Problem]) -> list[dict[str, Any]]:
    """`pricing: [{model, size, quality, per_image}]`: the most specific matching row prices an image."""
    return _price_rows(val, fname, _line(node), "pricing", problems, node)


def _price_rows(val: Any, fname: str, line: int, where: str, problems: list[Problem],
                node: yaml.Node | None) -> list[dict[str, Any]]:
    import yaml

    if not isinstance(val, list):
        problems.append(Problem(fname, line, where, "must be a list of {model, size, quality, per_image}"))
        return []
    rows: list[dict[str, Any]] = []
    for index, row in enumerate(val):
        rline = _line(node.value[index]) if isinstance(node, yaml.SequenceNode) else line
        at = f"{where}[{index}]"
        if not isinstance(row, dict):
            problems.append(Problem(fname, rline, at, "must be a mapping with per_image"))
            continue
        bad = False
        for k, v in row.items():
            if k in ("model", "size", "quality"):
                if not isinstance(v, str) or not v:
                    problems.append(Problem(fname, rline, f"{at}.{k}", "must be a non-empty string"))
                    bad = True
            elif k == "per_image":
                if not _is_number(v) or v < 0:
                    problems.append(Problem(fname, rline, f"{at}.per_image", "must be a number ≥ 0"))
                    bad = True
            else:
                problems.append(Problem(fname, rline, f"{at}.{k}", "unknown key (model, size, quality, per_image)"))
                bad = True
        if "per_image" not in row:
            problems.append(Problem(fname, rline, f"{at}.per_image", "missing"))
            bad = True
        if not bad:
            rows.append(row)
    return rows


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _field_problems(fields: Mapping[str, Any]) -> Iterator[tuple[str, str]]:
    """Check the fields batcher itself relies on; everything else passes through untouched."""
    for k in fields:
        if not isinstance(k, str):
            yield str(k), "field names must be strings"
    if "prompt" in fields:
        v = fields["prompt"]
        if not isinstance(v, str):
            yield "prompt", f"must be a string, got {type(v).__name__}"
        elif not v.strip():
            yield "prompt", "must not be empty"
    if "model" in fields and (not isinstance(fields["model"], str) or not fields["model"].strip()):
        yield "model", "must be a non-empty string"
    if "size" in fields:
        v = fields["size"]
        if not isinstance(v, str) or not (v == "auto" or _SIZE.match(v)):
            yield "size", f"must be WIDTHxHEIGHT (e.g. 1024x1024) or 'auto', got {v!r}"
    if "n" in fields and (not _is_int(fields["n"]) or not 1 <= fields["n"] <= MAX_N):
        yield "n", f"must be an integer from 1 to {MAX_N:,}, got {fields['n']!r}"
    if "quality" in fields and not isinstance(fields["quality"], str):
        yield "quality", "must be a string"
    if "response_format" in fields and fields["response_format"] not in ("url", "b64_json"):
        yield "response_format", f"must be 'url' or 'b64_json', got {fields['response_format']!r}"
    # A streamed answer (text/event-stream) is neither saved nor safely retried: each try is paid.
    if fields.get("stream") not in (None, False):
        yield "stream", ("batcher reads whole JSON answers; streaming is not supported (a streamed answer "
                         "would be paid and not saved): remove stream")
    if fields.get("partial_images") not in (None, 0):
        yield "partial_images", "needs streaming, which batcher does not support: remove partial_images"
    for k, v in fields.items():
        if isinstance(v, float) and not math.isfinite(v):
            yield str(k), "must be a finite number"
        elif isinstance(v, (dict, list)) and (where := _non_finite(v)) is not None:
            # JSON has no NaN or Infinity: the request could not be sent (nor its record kept as JSON)
            yield str(k), f"holds a number that is not finite at {k}{where}: JSON has no NaN or Infinity"


def _non_finite(value: Any, depth: int = 0) -> str | None:
    """Where in a nested field a float is NaN or infinite (`[2].seed`), or None."""
    if depth > 64:  # deeper than any request field; the server judges the rest
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value)
    for key, v in items:
        at = f".{key}" if isinstance(value, dict) else f"[{key}]"
        if isinstance(v, float) and not math.isfinite(v):
            return at
        if isinstance(v, (dict, list)) and (inner := _non_finite(v, depth + 1)) is not None:
            return at + inner
    return None
