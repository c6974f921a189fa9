"""Retry policy and failure classification: what failed, and whether to try again when.

Failures are classified by HTTP status, the error `code` and headers — never by message
text, which gateways rewrite freely.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Mapping

from ._exceptions import FatalError, PermanentError, RequestError, TransientError

__all__ = ["RetryPolicy", "classify", "retry_after_seconds", "parse_duration", "error_message"]

FATAL_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached", "invalid_api_key", "account_deactivated"})
POLICY_CODES = frozenset({"content_policy_violation", "moderation_blocked"})


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry one item. Exponential backoff with full jitter.

    >>> RetryPolicy(max_attempts=5).delay(attempt=3, rng=random.Random(0))
    """

    max_attempts: int = 6
    base: float = 0.5
    cap: float = 30.0

    def delay(self, attempt: int, rng: random.Random | None = None, retry_after: float | None = None) -> float:
        """Seconds to wait before attempt `attempt + 1`; the server's own figure wins when given."""
        if retry_after is not None:
            return min(max(retry_after, 0.0), 10 * self.cap)
        ceiling = min(self.cap, self.base * (2 ** max(attempt - 1, 0)))
        return (rng or random).uniform(0.0, ceiling)


def parse_duration(text: str) -> float | None:
    """OpenAI-style reset durations: `1s`, `120ms`, `6m0s`, `1h2m3.5s`, or bare seconds."""
    text = text.strip()
    try:
        return max(float(text), 0.0)
    except ValueError:
        pass
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * scale[u] for n, u in parts)


def retry_after_seconds(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """The wait a server asked for: `retry-after-ms`, then `retry-after` (seconds or HTTP-date)."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(float(ms) / 1000.0, 0.0)
        except ValueError:
            pass
    ra = headers.get("retry-after")
    if ra is not None:
        try:
            return max(float(ra), 0.0)
        except ValueError:
            try:
                when = parsedate_to_datetime(ra).timestamp()
            except (TypeError, ValueError, IndexError):
                return None
            return max(when - (time.time() if now is None else now), 0.0)
    return None


def _error_fields(body: Any) -> tuple[str | None, str | None, str | None]:
    """(code, type, message) from OpenAI-shaped and other common error bodies."""
    if not isinstance(body, dict):
        return None, None, None
    err = body.get("error")
    if isinstance(err, dict):
        code, etype, msg = err.get("code"), err.get("type"), err.get("message")
    else:
        code, etype, msg = body.get("code"), body.get("type"), err if isinstance(err, str) else body.get("message")
    as_str = lambda v: None if v is None else str(v)  # noqa: E731
    return as_str(code), as_str(etype), as_str(msg)


def error_message(raw: bytes, limit: int = 300) -> str:
    """A short, printable excerpt of a non-JSON error body."""
    text = raw[:limit].decode("utf-8", "replace")
    return " ".join(text.split()) or "(empty body)"


def classify(status: int, headers: Mapping[str, str], raw: bytes) -> RequestError:
    """Turn a non-success answer into a transient, permanent or fatal error."""
    try:
        body = json.loads(raw) if raw else None
    except (ValueError, UnicodeDecodeError):
        body = None
    code, etype, msg = _error_fields(body)
    message = msg or error_message(raw)
    # Gateways sometimes put the status in `code` as a string ("429"); it names no condition.
    symbolic = code if code and not code.isdigit() else None
    if symbolic is None and etype in FATAL_CODES:
        symbolic = etype
    if status == 200 and code and code.isdigit():
        status = int(code)  # a 200 carrying an error object: believe the error
    kw = dict(status=status, code=symbolic or code, headers=dict(headers), type=etype)
    if symbolic in FATAL_CODES or status in (401, 402, 403):
        return FatalError(message, **kw)
    if status == 429 or status == 408 or status == 425 or status >= 500 or status == 200:
        return TransientError(message, retry_after=retry_after_seconds(headers), **kw)
    return PermanentError(message, **kw)
