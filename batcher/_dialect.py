"""Request dialects: how batcher's request fields map onto what one provider accepts, and back.

Every provider speaks its own variant of the Images API. A `Dialect` is a small declarative
table (fields to drop or rename, a path and query template, the auth header, the largest `n`)
plus two optional hooks for what a table can't say (xAI's size → aspect_ratio, its moderation
flag). The core builds one canonical body per item; the client sends `dialect.prepare(body)`.

    >>> xai = get_dialect("xai")
    >>> xai.prepare({"model": "grok-imagine", "prompt": "a koi", "size": "1536x1024"}, {}).body
    {'model': 'grok-imagine', 'prompt': 'a koi', 'aspect_ratio': '3:2'}
    >>> azure = get_dialect("azure-openai")
    >>> req = azure.prepare({"model": "img-prod", "prompt": "a koi"}, {"api_version": "2025-04-01-preview"})
    >>> req.path, req.params
    ('/openai/deployments/img-prod/images/generations', {'api-version': '2025-04-01-preview'})

A job file declares more under `dialects:` (see `parse_dialects` and the README, "Dialects").
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any
from urllib.parse import quote

from ._exceptions import PermanentError

__all__ = [
    "Dialect",
    "BatchShape",
    "OPENAI_BATCH",
    "XAI_BATCH",
    "PreparedRequest",
    "DialectError",
    "DialectSpecError",
    "DIALECTS",
    "DEFAULT_DIALECT",
    "get_dialect",
    "parse_dialects",
]

ShapeHook = Callable[[dict[str, Any]], dict[str, Any]]
"""Gets a private copy of the body before the table applies; returns the body to go on with."""
CheckHook = Callable[[Mapping[str, Any]], list[tuple[str, str]]]
"""`(field, message)` for a body the provider can't take, beyond what the table says."""
ReadHook = Callable[[Mapping[str, Any], Mapping[str, str]], None]
"""Sees a decoded 200 answer before images are read; raises a RequestError when it is a failure."""

_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 token
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class DialectError(ValueError):
    """A dialect can't build a request: a template placeholder has no value."""


class DialectSpecError(ValueError):
    """A job file's `dialects:` section is invalid; `problems` lists `(field_path, message)`.

    Field paths are dotted from the job's root (`dialects.my-proxy.drop[1]`), ready to be
    located and printed as `FILE:LINE: field: message`.
    """

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("\n".join(f"{path}: {message}" for path, message in problems))


@dataclass(frozen=True)
class PreparedRequest:
    """What goes on the wire: `POST {base_url}{path}?{params}` with `headers` and JSON `body`.

    `headers` holds only non-secret headers; the client adds the auth header itself.
    """

    path: str
    params: dict[str, str]
    headers: dict[str, str]
    body: dict[str, Any]


def _placeholders(template: str) -> list[str]:
    """The `{name}`s of a template; raises DialectError on bad syntax (`{`, `{0}`, `{a!r}`, `{a:>3}`)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise DialectError(f"bad template {template!r}: {exc}") from None
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise DialectError(f"bad template {template!r}: placeholders are plain names like {{api_version}}")
        names.append(name)
    return names


# Placeholders taken from the body rather than the endpoint's options. For Azure the deployment
# is the model name after the endpoint's model map renamed it.
_BODY_PLACEHOLDERS = {"model": "model", "deployment": "model"}


@dataclass(frozen=True)
class BatchShape:
    """How one provider's Files + Batches APIs look on the wire: paths, field names, states, limits.

    The client reads every provider through this table (no per-provider code path); the values
    come from each provider's documentation (docs/_incoming/wire.md). Dotted keys (`a.b`) reach
    into nested objects. Paths are relative to the endpoint's base URL; `{id}` is filled in.
    """

    files: str = "/files"
    file: str = "/files/{id}"
    content: str = "/files/{id}/content"
    batches: str = "/batches"
    batch: str = "/batches/{id}"
    cancel: str = "/batches/{id}/cancel"
    results: str | None = None  # a paged results list (xAI) instead of output/error files
    endpoint: str = "/v1/images/generations"  # the `url` of every input line and the batch's endpoint
    send_purpose: bool = True  # the upload's `purpose=batch` form field
    send_window: bool = True  # `completion_window` on create
    # the batch object
    id_key: str = "id"
    status_key: str | None = "status"  # None: derived from the counts (pending_key)
    states: Mapping[str, str] = field(default_factory=dict, hash=False)  # provider's name → OpenAI's
    total_key: str = "request_counts.total"
    completed_key: str = "request_counts.completed"
    failed_key: str = "request_counts.failed"
    pending_key: str | None = None
    cancelled_key: str | None = None
    created_key: str = "created_at"
    expires_key: str = "expires_at"
    completed_at_key: str = "completed_at"
    input_file_key: str = "input_file_id"
    output_file_key: str = "output_file_id"
    error_file_key: str = "error_file_id"
    errors_key: str = "errors.data"
    metadata_key: str = "metadata"  # the batch's tags (batcher's chunk key)
    metadata_as_json: bool = False  # carried as one JSON string (xAI has only a batch `name`)
    # lists: `{list_key: [...]}`; the next page is asked with `cursor_param=<cursor>`, where the
    # cursor is `next_key` of the answer, or (next_key None) the last item's id while `more_key` is true
    batches_list_key: str = "data"
    cursor_param: str = "after"
    next_key: str | None = None
    more_key: str | None = "has_more"
    page_limit: int = 100
    # one result: in an output/error file line, or an entry of the paged results list
    result_id_key: str = "custom_id"
    result_status_key: str | None = "response.status_code"
    result_body_key: str = "response.body"
    result_request_id_key: str | None = "response.request_id"
    result_error_key: str = "error"  # an object {code, message}, or a string (the message)
    # limits of one batch, and how long result image URLs live (None: not documented)
    max_requests: int = 50_000
    max_bytes: int = 200 * 1024 * 1024
    url_ttl: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "states", MappingProxyType(dict(self.states)))

    def path(self, template: str, ident: str = "") -> str:
        """`template` with `{id}` filled in, quoted: an id can never add a path segment."""
        return template.replace("{id}", quote(ident, safe=""))

    def state(self, doc: Mapping[str, Any]) -> str:
        """The batch's state in OpenAI's names (validating … cancelled), from its status or its counts."""
        if self.status_key is not None:
            raw = dig(doc, self.status_key)
            raw = raw if isinstance(raw, str) else "unknown"
            return self.states.get(raw, raw)
        pending, total = count(doc, self.pending_key), count(doc, self.total_key)
        if pending > 0 or total == 0:
            return "in_progress"
        return "cancelled" if count(doc, self.cancelled_key) > 0 else "completed"


def dig(doc: Any, key: str | None) -> Any:
    """`doc["a"]["b"]` for key `a.b`; None when any step is missing or not an object."""
    if key is None:
        return None
    for part in key.split("."):
        if not isinstance(doc, Mapping):
            return None
        doc = doc.get(part)
    return doc


def count(doc: Any, key: str | None) -> int:
    """A non-negative integer count at `key`, 0 when absent or not an integer."""
    value = dig(doc, key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


# OpenAI's Files + Batches APIs (https://platform.openai.com/docs/api-reference/batch).
OPENAI_BATCH = BatchShape()
# xAI: the OpenAI-compatible Files API carries the JSONL; the batch object, its cancel, list and
# results are xAI's own (https://docs.x.ai/developers/advanced-api-usage/batch-api): counts in
# `state`, no status string, results paged at /batches/{id}/results, image URLs live 1 hour.
XAI_BATCH = BatchShape(
    cancel="/batches/{id}:cancel", results="/batches/{id}/results", send_purpose=False, send_window=False,
    id_key="batch_id", status_key=None, total_key="state.num_requests", completed_key="state.num_success",
    failed_key="state.num_error", pending_key="state.num_pending", cancelled_key="state.num_cancelled",
    created_key="create_time", expires_key="expire_time", completed_at_key="complete_time",
    input_file_key="input_file_id", output_file_key="", error_file_key="", errors_key="errors",
    metadata_key="name", metadata_as_json=True,
    batches_list_key="batches", cursor_param="pagination_token", next_key="pagination_token", more_key=None,
    result_id_key="batch_request_id", result_status_key=None, result_body_key="batch_result.response.image",
    result_request_id_key=None, result_error_key="error_message", url_ttl=3600.0,
)


@dataclass(frozen=True)
class Dialect:
    """One provider's variant of the Images API. Never mutates what it is given.

    `drop`: body fields removed. `rename`: `{batcher_field: provider_field}`; a provider field the
    item already sets explicitly wins. `path` / `query`: templates whose `{name}`s come from the
    endpoint's options (`{api_version}`), or `{model}` / `{deployment}` from the body.
    `auth_header` + `auth_prefix` + key is the auth header. `max_n`: the largest `n` accepted.
    """

    name: str
    drop: frozenset[str] = frozenset()
    rename: Mapping[str, str] = field(default_factory=dict, hash=False)
    path: str = "/images/generations"
    query: Mapping[str, str] = field(default_factory=dict, hash=False)
    auth_header: str = "Authorization"
    auth_prefix: str = "Bearer "
    max_n: int | None = None
    shape: ShapeHook | None = field(default=None, compare=False, repr=False)
    check_body: CheckHook | None = field(default=None, compare=False, repr=False)
    check_answer: ReadHook | None = field(default=None, compare=False, repr=False)
    base: str | None = None  # the dialect this one extends, for reports only
    batch: BatchShape = OPENAI_BATCH  # its Files + Batches APIs

    def __post_init__(self) -> None:
        # frozen all the way down: a shared built-in can't be edited through one of its users
        object.__setattr__(self, "drop", frozenset(self.drop))
        object.__setattr__(self, "rename", MappingProxyType(dict(self.rename)))
        object.__setattr__(self, "query", MappingProxyType(dict(self.query)))
        for template in (self.path, *self.query.values()):
            _placeholders(template)

    @property
    def options_needed(self) -> frozenset[str]:
        """Endpoint options the templates need (e.g. `api_version` for azure-openai)."""
        names = {n for t in (self.path, *self.query.values()) for n in _placeholders(t)}
        return frozenset(names - set(_BODY_PLACEHOLDERS))

    def missing_options(self, options: Mapping[str, Any]) -> list[str]:
        """Options the templates need that `options` lacks; check once per endpoint, not per item."""
        return sorted(self.options_needed - set(options))

    def check(self, body: Mapping[str, Any]) -> list[tuple[str, str]]:
        """`(field, message)` for what this dialect can't send; empty when the body is fine.

        The job validator calls it early; `prepare` refuses the same bodies.
        """
        problems = []
        n = body.get("n", 1)
        if self.max_n is not None and isinstance(n, int) and not isinstance(n, bool) and n > self.max_n:
            problems.append(("n", f"{n} is more than the {self.max_n} images per request {self.name} accepts"))
        if self.check_body is not None:
            problems.extend(self.check_body(body))
        return problems

    def auth_headers(self, api_key: str | None) -> dict[str, str]:
        """The header carrying the key; nothing without a key. Built once per client, kept in memory."""
        return {self.auth_header: f"{self.auth_prefix}{api_key}"} if api_key else {}

    def prepare(self, body: Mapping[str, Any], options: Mapping[str, Any] | None = None) -> PreparedRequest:
        """The request to send for `body` (batcher's canonical fields) on an endpoint with `options`.

        Raises PermanentError (code `invalid_value`) for a body this dialect can't send, and
        DialectError when a template placeholder has no value.
        """
        problems = self.check(body)
        if problems:
            fld, message = problems[0]
            raise PermanentError(f"{self.name}: {fld}: {message}", code="invalid_value")
        options = options or {}
        values = self._template_values(body, options)
        path = "".join(
            literal + (quote(values[name], safe="") if name is not None else "")
            for literal, name, _, _ in string.Formatter().parse(self.path)
        )
        params = {key: value.format_map(values) for key, value in self.query.items()}
        sent = dict(body)
        if self.shape is not None:
            sent = self.shape(sent)
        for name in self.drop:
            sent.pop(name, None)
        if self.rename:
            renamed: dict[str, Any] = {}
            for key, value in sent.items():
                target = self.rename.get(key, key)
                if target != key and target in sent and target not in self.rename:
                    continue  # the item set the provider's own field: it wins
                renamed[target] = value
            sent = renamed
        return PreparedRequest(path=path, params=params, headers={}, body=sent)

    def _template_values(self, body: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, str]:
        values: dict[str, str] = {}
        for name in {n for t in (self.path, *self.query.values()) for n in _placeholders(t)}:
            if name in options:
                values[name] = str(options[name])
            elif name in _BODY_PLACEHOLDERS:
                value = body.get(_BODY_PLACEHOLDERS[name])
                if not isinstance(value, str) or not value:
                    raise PermanentError(f"{self.name}: the request needs a '{_BODY_PLACEHOLDERS[name]}' "
                                         f"to fill {{{name}}} in {self.path!r}", code="invalid_value")
                values[name] = value
            else:
                raise DialectError(f"dialect {self.name!r} needs the endpoint option {name!r} "
                                   f"(set options: {{{name}: ...}} on the endpoint)")
        return values

    def read(self, doc: Mapping[str, Any], headers: Mapping[str, str]) -> None:
        """Check a decoded 200 answer; raises a classified RequestError (PermanentError, ...) when it
        is a failure in disguise, such as xai's `respect_moderation: false`."""
        if self.check_answer is not None:
            self.check_answer(doc, headers)


# -- xAI -------------------------------------------------------------------------------------

# DALL-E's sizes by name; anything else is reduced to lowest terms (see _aspect_ratio).
XAI_ASPECT_RATIOS = MappingProxyType({
    "1024x1024": "1:1", "1536x1024": "3:2", "1024x1536": "2:3", "1792x1024": "16:9", "1024x1792": "9:16",
})
_SIZE = re.compile(r"([1-9][0-9]{0,4})x([1-9][0-9]{0,4})")


def _aspect_ratio(size: Any) -> str | None:
    """xAI's aspect_ratio for a batcher size, or None when `size` is not WIDTHxHEIGHT / auto.

    Sizes not in the table are reduced to lowest terms (2048x1024 → 2:1, 768x1024 → 3:4) and
    never rounded to a nearby ratio: a shape xAI does not offer (1000x700 → 10:7) is answered
    400 by the server, rather than silently generating a different shape.
    """
    if size == "auto":
        return "auto"
    if not isinstance(size, str):
        return None
    if size in XAI_ASPECT_RATIOS:
        return XAI_ASPECT_RATIOS[size]
    match = _SIZE.fullmatch(size)
    if match is None:
        return None
    width, height = int(match[1]), int(match[2])
    g = math.gcd(width, height)
    return f"{width // g}:{height // g}"


def _xai_problems(body: Mapping[str, Any]) -> list[tuple[str, str]]:
    if "aspect_ratio" in body or "size" not in body or _aspect_ratio(body["size"]) is not None:
        return []
    return [("size", f"{body['size']!r} can't become an xai aspect_ratio: use WIDTHxHEIGHT, auto, "
                     "or give aspect_ratio yourself")]


def _xai_shape(body: dict[str, Any]) -> dict[str, Any]:
    # xAI answers 400 "Argument not supported: size"; the table then drops size itself
    if "size" in body and "aspect_ratio" not in body:
        ratio = _aspect_ratio(body["size"])
        if ratio is not None:
            body["aspect_ratio"] = ratio
    return body


def _xai_answer(doc: Mapping[str, Any], headers: Mapping[str, str]) -> None:
    # xAI moderates after generating: a 200 whose image is flagged is a policy refusal, not an image.
    data = doc.get("data")
    for i, entry in enumerate(data if isinstance(data, list) else ()):
        if isinstance(entry, dict) and entry.get("respect_moderation") is False:
            raise PermanentError(f"image {i} was withheld by xai's moderation (respect_moderation: false)",
                                 status=200, code="content_policy_violation", headers=dict(headers))


DEFAULT_DIALECT = Dialect("openai-compatible")

DIALECTS: Mapping[str, Dialect] = MappingProxyType({d.name: d for d in (
    DEFAULT_DIALECT,
    # gpt-image models answer b64_json only and reject the field; output_format, background,
    # moderation pass through untouched, and the `usage` they answer is recorded.
    Dialect("openai", drop=frozenset({"response_format"}), max_n=10, base="openai-compatible"),
    Dialect("azure-openai", path="/openai/deployments/{deployment}/images/generations",
            query={"api-version": "{api_version}"}, auth_header="api-key", auth_prefix="",
            base="openai-compatible"),
    Dialect("xai", drop=frozenset({"size", "quality", "style"}), max_n=10, shape=_xai_shape,
            check_body=_xai_problems, check_answer=_xai_answer, base="openai-compatible", batch=XAI_BATCH),
)})


def get_dialect(name: str, declared: Mapping[str, Dialect] | None = None) -> Dialect:
    """A built-in dialect, or one `declared` by the job (see `parse_dialects`), by name."""
    found = (declared or {}).get(name) or DIALECTS.get(name)
    if found is None:
        known = ", ".join(sorted({*DIALECTS, *(declared or {})}))
        raise ValueError(f"unknown dialect {name!r} (known: {known})")
    return found


# -- declared in a job file ----------------------------------------------------------------

_SPEC_KEYS = ("base", "drop", "rename", "path", "query", "auth_header", "auth_prefix", "max_n")


def parse_dialects(spec: Mapping[str, Any]) -> dict[str, Dialect]:
    """Validate a job file's `dialects:` mapping; return the declared dialects by name.

    Each entry may set `base` (a built-in or another declared dialect; default
    openai-compatible), `drop` (list, added to the base's), `rename` and `query` (mappings,
    merged over the base's), `path`, `auth_header`, `auth_prefix` and `max_n` (replacing the
    base's). The base's hooks are kept. Raises DialectSpecError listing every problem.
    """
    problems: list[tuple[str, str]] = []
    if not isinstance(spec, Mapping):
        raise DialectSpecError([("dialects", "must be a mapping of dialect names to their settings")])
    entries: dict[str, Mapping[str, Any]] = {}
    for name, entry in spec.items():
        where = f"dialects.{name}"
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            problems.append((where, "a dialect name is letters, digits, '.', '_' or '-' (at most 64)"))
        elif name in DIALECTS:
            problems.append((where, f"{name!r} is a built-in dialect; pick another name and set base: {name}"))
        elif not isinstance(entry, Mapping):
            problems.append((where, "must be a mapping (base, drop, rename, path, query, auth_header, "
                                    "auth_prefix, max_n)"))
        else:
            entries[name] = entry
            for key in entry:
                if key not in _SPEC_KEYS:
                    problems.append((f"{where}.{key}", f"unknown key (known: {', '.join(_SPEC_KEYS)})"))

    built: dict[str, Dialect | None] = {}  # None: failed, its problem already reported

    def build(name: str, chain: tuple[str, ...]) -> Dialect | None:
        if name not in built:
            built[name] = _build(name, chain)
        return built[name]

    def _build(name: str, chain: tuple[str, ...]) -> Dialect | None:
        entry, where = entries[name], f"dialects.{name}"
        base_name = entry.get("base", "openai-compatible")
        if not isinstance(base_name, str):
            problems.append((f"{where}.base", "must be a dialect name"))
            return None
        if base_name in chain or base_name == name:
            problems.append((f"{where}.base", f"extends itself ({' → '.join((*chain, name, base_name))})"))
            return None
        if base_name in DIALECTS:
            base = DIALECTS[base_name]
        elif base_name in entries:
            parent = build(base_name, (*chain, name))
            if parent is None:
                return None  # its own problem is reported where it is
            base = parent
        else:
            known = ", ".join(sorted({*DIALECTS, *entries}))
            problems.append((f"{where}.base", f"unknown dialect {base_name!r} (known: {known})"))
            return None
        changes = _entry_changes(entry, base, where, problems)
        if changes is None:
            return None
        try:
            dialect = replace(base, name=name, base=base_name, **changes)
        except DialectError as exc:
            problems.append((f"{where}.{_template_field(changes)}", str(exc)))
            return None
        return dialect

    for name in entries:
        build(name, ())
    if problems:
        raise DialectSpecError(problems)
    return {name: dialect for name, dialect in built.items() if dialect is not None}


def _template_field(changes: Mapping[str, Any]) -> str:
    return "path" if "path" in changes else "query"


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) and v for v in value)


def _string_map(value: Any) -> bool:
    return isinstance(value, Mapping) and all(isinstance(k, str) and k and isinstance(v, str) and v
                                              for k, v in value.items())


def _entry_changes(entry: Mapping[str, Any], base: Dialect, where: str,
                   problems: list[tuple[str, str]]) -> dict[str, Any] | None:
    """The fields `entry` changes on `base`; None (problems noted) when any is invalid."""
    before = len(problems)
    changes: dict[str, Any] = {}
    if "drop" in entry:
        if _strings(entry["drop"]):
            changes["drop"] = base.drop | frozenset(entry["drop"])
        else:
            problems.append((f"{where}.drop", "must be a list of field names"))
    if "rename" in entry:
        rename = entry["rename"]
        if not _string_map(rename):
            problems.append((f"{where}.rename", "must map batcher field names to the provider's"))
        else:
            merged = {**base.rename, **rename}
            targets = [t for t in merged.values()]
            clash = sorted({t for t in targets if targets.count(t) > 1})
            if clash:
                problems.append((f"{where}.rename", f"two fields renamed to {clash[0]!r}"))
            else:
                changes["rename"] = merged
    if "path" in entry:
        path = entry["path"]
        if not isinstance(path, str) or not path.startswith("/") or any(c in path for c in "?# \t\r\n"):
            problems.append((f"{where}.path", "must be a path template starting with '/', without '?' or '#' "
                                              "(put query parameters under query)"))
        else:
            changes["path"] = path
    if "query" in entry:
        if _string_map(entry["query"]):
            changes["query"] = {**base.query, **entry["query"]}
        else:
            problems.append((f"{where}.query", "must map query parameter names to value templates"))
    if "auth_header" in entry:
        header = entry["auth_header"]
        if isinstance(header, str) and _HEADER_NAME.fullmatch(header):
            changes["auth_header"] = header
        else:
            problems.append((f"{where}.auth_header", "must be an HTTP header name, e.g. api-key"))
    if "auth_prefix" in entry:
        prefix = entry["auth_prefix"]
        if isinstance(prefix, str) and prefix.isprintable() and len(prefix) <= 64:
            changes["auth_prefix"] = prefix
        else:
            problems.append((f"{where}.auth_prefix", "must be a short string, e.g. 'Bearer ' or ''"))
    if "max_n" in entry:
        max_n = entry["max_n"]
        if max_n is None or (isinstance(max_n, int) and not isinstance(max_n, bool) and max_n >= 1):
            changes["max_n"] = max_n
        else:
            problems.append((f"{where}.max_n", "must be an integer ≥ 1 (or null: no limit)"))
    if len(problems) > before:
        return None
    for key in ("path", "query"):
        if key in changes:
            for template in ([changes[key]] if key == "path" else changes[key].values()):
                try:
                    _placeholders(template)
                except DialectError as exc:
                    problems.append((f"{where}.{key}", str(exc)))
                    return None
    return changes

