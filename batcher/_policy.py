"""Retry policy and failure classification: what failed, and whether to try again when.

Failures are classified by HTTP status, the error `code` and headers — never by message
text, which gateways rewrite freely.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

from ._exceptions import FatalError, PermanentError, RequestError, TransientError

__all__ = ["RetryPolicy", "classify", "retry_after_seconds", "parse_duration", "error_message", "answer_refusal",
           "MAX_WAIT_S",
           "POLICY_CODES", "FATAL_CODES", "decide", "Decision", "FailureState", "Retry", "Fail", "Retire", "Hold"]

FATAL_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached", "invalid_api_key", "account_deactivated"})
# Refusals by the provider's safety system, as OpenAI, gateways and Azure name them.
POLICY_CODES = frozenset({"content_policy_violation", "moderation_blocked", "content_filter", "contentFilter",
                          "ResponsibleAIPolicyViolation"})


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry one item. Exponential backoff with full jitter.

    >>> RetryPolicy(max_attempts=5).delay(attempt=3, rng=random.Random(0))
    """

    max_attempts: int = 6
    base: float = 0.5
    cap: float = 30.0

    def delay(self, attempt: int, rng: random.Random | None = None, retry_after: float | None = None) -> float:
        """Seconds to wait before attempt `attempt + 1`; the server's own figure wins when given
        (a finite, non-negative one, at most MAX_WAIT_S)."""
        told = None if retry_after is None else _seconds(retry_after)
        if told is not None:
            return told
        ceiling = min(self.cap, self.base * (2 ** max(attempt - 1, 0)))
        return (rng or random).uniform(0.0, ceiling)


MAX_WAIT_S = 60.0  # the longest wait a server's header can ask for (the openai SDK's bound too)


def _seconds(value: float) -> float | None:
    """A wait a header may ask for: finite and not negative, at most MAX_WAIT_S; else None (absent).

    NaN, infinities and negative values say nothing usable: a retry at time NaN never comes.
    """
    if not math.isfinite(value) or value < 0:
        return None
    return min(value, MAX_WAIT_S)


def parse_duration(text: str) -> float | None:
    """OpenAI-style reset durations: `1s`, `120ms`, `6m0s`, `1h2m3.5s`, or bare seconds.

    None when the text is not a duration or not finite and non-negative (`nan`, `inf`, `-1`).
    Not capped: callers bound what they wait (`MAX_WAIT_S`).
    """
    text = text.strip()
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        return value if math.isfinite(value) and value >= 0 else None
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The wait a server asked for: `retry-after-ms`, then `retry-after` (seconds or HTTP-date).

    Only finite, non-negative values count, capped at MAX_WAIT_S (60 s); anything else (`nan`,
    `inf`, `-5`, a date in the past, garbage) is treated as absent, so the caller's own backoff
    applies. `now` (wall-clock seconds) is injectable for tests.
    """
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            seconds = _seconds(float(ms) / 1000.0)
        except ValueError:
            seconds = None
        if seconds is not None:
            return seconds
    ra = headers.get("retry-after")
    if ra is None:
        return None
    try:
        return _seconds(float(ra))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(ra).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    delta = when - (time.time() if now is None else now)
    return _seconds(delta) if delta > 0 else None  # a date in the past asks for nothing


def _text(value: Any) -> str | None:
    """A code or message as text: strings and integers only (a nested object names nothing)."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _error_fields(body: Any) -> tuple[str | None, str | None, str | None]:
    """(code, type, message) from OpenAI-shaped and other common error bodies.

    OpenAI `{"error": {"code", "type", "message"}}`; xAI `{"code": ..., "error": "text"}`;
    `{"message"}`; FastAPI `{"detail": "text" | [{"msg"}]}`; `{"errors": [{"message"}]}`;
    a bare JSON string. Anything else yields nothing and the raw text is read instead.
    """
    if isinstance(body, str):
        return None, None, body
    if not isinstance(body, dict):
        return None, None, None
    err = body.get("error")
    if isinstance(err, dict):
        code = _text(err.get("code"))
        inner = err.get("innererror")
        if isinstance(inner, dict) and _text(inner.get("code")) in POLICY_CODES:
            code = _text(inner.get("code"))  # Azure names its content filter one level down
        return code, _text(err.get("type")), _with_details(_text(err.get("message")), body)
    msg = _text(err) if isinstance(err, str) else _text(body.get("message"))
    if msg is None:
        detail = body.get("detail")
        errors = body.get("errors")
        if isinstance(detail, str):
            msg = detail
        elif isinstance(detail, list):
            msg = _details(detail, "loc", "msg")  # FastAPI / pydantic
        elif isinstance(errors, list):
            msg = _details(errors, "path", "message")
    return _text(body.get("code")), _text(body.get("type")), _with_details(msg, body)


def _with_details(msg: str | None, body: dict[str, Any]) -> str | None:
    """A message followed by the field-level reasons a validating server lists (Prism's `validation`)."""
    validation = body.get("validation")
    extra = _details(validation, "location", "message") if isinstance(validation, list) else None
    if extra is None:
        return msg
    return f"{extra} ({msg})" if msg else extra  # the field's reason first: it is what differs


def _details(entries: list[Any], where_key: str, msg_key: str, shown: int = 3) -> str | None:
    """`body.quality: Input should be 'standard' or 'hd'; ...` from a list of field errors."""
    parts = []
    for entry in entries:
        if not isinstance(entry, dict):
            continue
        msg = _text(entry.get(msg_key))
        if msg is None:
            continue
        where = entry.get(where_key)
        if isinstance(where, list):
            where = ".".join(str(p) for p in where if isinstance(p, (str, int)))
        where = _text(where)
        parts.append(f"{where}: {msg}" if where else msg)
    if not parts:
        return None
    more = f" (+{len(parts) - shown} more)" if len(parts) > shown else ""
    return "; ".join(parts[:shown]) + more


def answer_refusal(doc: Mapping[str, Any], headers: Mapping[str, str]) -> PermanentError | None:
    """A 200 whose images were withheld by the provider's safety system, read from the fields
    providers use for it (never the message): a policy refusal, permanent, not a malformed answer.

    `finish_reason: content_filter` or Azure's `content_filter_results.*.filtered: true`, on any entry
    of `data`. (xAI's `respect_moderation: false` means something only to xai: its dialect reads it.)
    """
    data = doc.get("data")
    for i, entry in enumerate(data if isinstance(data, list) else ()):
        if not isinstance(entry, dict):
            continue
        filters = entry.get("content_filter_results")
        filtered = isinstance(filters, dict) and any(
            isinstance(v, dict) and v.get("filtered") is True for v in filters.values())
        if filtered or entry.get("finish_reason") == "content_filter":
            return PermanentError(f"image {i} was withheld by the provider's safety system", status=200,
                                  code="content_policy_violation", headers=dict(headers))
    return None


_TITLE = re.compile(rb"<title[^>]*>(.*?)</title", re.IGNORECASE | re.DOTALL)
_TAG = re.compile(r"<[^>]*>")


def error_message(raw: bytes, limit: int = 300) -> str:
    """A short, printable excerpt of an error body: an HTML page's title or text, plain text as is."""
    head = raw[: limit * 20]
    title = _TITLE.search(head)
    if title and title.group(1).strip():
        text = title.group(1).decode("utf-8", "replace")
    else:
        text = head.decode("utf-8", "replace")
        if text.lstrip()[:1] == "<":
            text = _TAG.sub(" ", text)
    return _short(text, limit) or "(empty body)"


def _short(text: str, limit: int = 300) -> str:
    """One line, control characters gone, at most `limit` characters."""
    text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def classify(status: int, headers: Mapping[str, str], raw: bytes) -> RequestError:
    """Turn a non-success answer into a transient, permanent or fatal error.

    Any body is accepted (OpenAI's shape, other providers', HTML, plain text, empty): the
    kind comes from the status and the symbolic code, the message is only read.
    """
    try:
        body = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError, RecursionError):
        body = None  # not JSON (HTML from a proxy, plain text, a cut body): read it as text
    code, etype, msg = _error_fields(body)
    message = (_short(msg) if msg else None) or error_message(raw)
    # Gateways sometimes put the status in `code` as a string ("429"); it names no condition.
    symbolic = code if code and not code.isdigit() else None
    if symbolic is None and etype in FATAL_CODES:
        symbolic = etype
    if status == 200 and code and code.isdigit():
        status = int(code)  # a 200 carrying an error object: believe the error
    kw: dict[str, Any] = dict(status=status, code=symbolic or code, headers=dict(headers), type=etype)
    if symbolic in FATAL_CODES or status in (401, 402, 403):
        return FatalError(message, **kw)
    if symbolic in POLICY_CODES or etype in POLICY_CODES:
        # a refusal is about the prompt, whatever status carries it (a gateway's 200 included)
        return PermanentError(message, **{**kw, "code": symbolic if symbolic in POLICY_CODES else etype})
    if status == 429 or status == 408 or status == 425 or status >= 500 or status == 200:
        return TransientError(message, retry_after=retry_after_seconds(headers), **kw)
    return PermanentError(message, **kw)


# -- what to do after a failed attempt ----------------------------------------------------------

@dataclass(frozen=True)
class Retry:
    """Send the item again after `delay` seconds; `pin` keeps it on the same endpoint."""

    delay: float
    pin: bool = False


@dataclass(frozen=True)
class Fail:
    """The item fails now; `stop` (a note) when this failure also ends the run."""

    stop: str | None = None


@dataclass(frozen=True)
class Retire:
    """The endpoint can't serve this run (fatal): it retires, the item goes elsewhere, not counted."""


@dataclass(frozen=True)
class Hold:
    """The run is stopping: the item stays pending for the next run."""


Decision = Retry | Fail | Retire | Hold


@dataclass(frozen=True)
class FailureState:
    """What the decision depends on besides the error itself."""

    tries: int                      # attempts of this item in this run, this one included
    stopping: bool = False          # the run is stopping (signal, budget, fatal elsewhere)
    policy_violations: int = 0      # content-policy rejections so far, this one included
    max_policy_violations: int = 0  # 0: no limit
    endpoint_healthy: bool = True   # the endpoint's circuit is closed


def decide(exc: RequestError, state: FailureState, policy: RetryPolicy,
           rng: random.Random | None = None) -> Decision:
    """The failure policy as a pure function: an error and the run's state in, a decision out.

    >>> decide(TransientError("busy", status=503), FailureState(tries=1), RetryPolicy())
    Retry(delay=..., pin=False)
    """
    if exc.kind == "fatal":
        return Retire()
    if exc.kind == "permanent":
        limit = state.max_policy_violations
        if exc.code in POLICY_CODES and limit and state.policy_violations >= limit:
            return Fail(stop=(f"stopping: {state.policy_violations} content-policy rejections "
                              f"(--max-policy-violations {limit}); providers suspend accounts for this. "
                              f"Review the prompts, then rerun"))
        return Fail()
    if state.stopping:
        return Hold()
    if state.tries >= policy.max_attempts:
        return Fail()
    # no clear answer (timeout, drop, malformed 200): it may have been generated, and billed,
    # there — retry on the same endpoint while that endpoint is healthy
    ambiguous = exc.status is None or exc.status == 200
    return Retry(policy.delay(state.tries, rng, exc.retry_after), pin=ambiguous and state.endpoint_healthy)
