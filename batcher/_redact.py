"""Keys never reach disk or logs: a server may echo them back, in an error message or anywhere else.

    >>> redact = Redactor.of(["sk-live-123456789"])
    >>> redact("Model not available for key sk-live-123456789")
    'Model not available for key [redacted]'
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["Redactor", "MIN_SECRET", "MASK"]

MIN_SECRET = 8  # shorter values would mask ordinary words; real keys are far longer
MASK = "[redacted]"


@dataclass(frozen=True)
class Redactor:
    """Replaces each secret (and its JSON-escaped form) with `[redacted]` in text."""

    secrets: tuple[str, ...] = ()

    @classmethod
    def of(cls, values: Iterable[str | None]) -> Redactor:
        found: set[str] = set()
        for value in values:
            if value and len(value) >= MIN_SECRET:
                found.add(value)
                found.add(json.dumps(value, ensure_ascii=False)[1:-1])  # as it appears inside a JSON line
        # longest first: a key that contains another is masked whole
        return cls(tuple(sorted(found, key=len, reverse=True)))

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def __bool__(self) -> bool:
        return bool(self.secrets)
