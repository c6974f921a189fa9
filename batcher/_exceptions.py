"""Errors raised by batcher.

    BatcherError
    ├── JobError                 the job file is unusable (exit 2)
    │   ├── JobValidationError   one or more `FILE:LINE: field: message` problems
    │   └── ShardError           a bad shard spec, or a shard plan made for another job or N
    ├── OutputError              the output folder can't be used (exit 2, or 4 on disk trouble)
    │   ├── ManifestError        the manifest is unreadable, corrupt, or belongs to another job
    │   └── LockedError          another run holds the output folder (exit 3)
    └── RequestError             one attempt at one request failed, classified by status/code
        ├── TransientError       retry with backoff (429 rate limit, 408, 5xx, timeouts, bad bodies)
        ├── PermanentError       fail the item now (400 policy, 404, other 4xx)
        └── FatalError           stop the run, leave items pending (401, 403, insufficient_quota)
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BatcherError",
    "JobError",
    "JobValidationError",
    "ShardError",
    "Problem",
    "OutputError",
    "ManifestError",
    "LockedError",
    "RequestError",
    "TransientError",
    "PermanentError",
    "FatalError",
]


class BatcherError(Exception):
    """Base class of every error batcher raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a job file, located at `file:line`."""

    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.message}"


class JobError(BatcherError):
    """The job file can't be read at all."""


class JobValidationError(JobError):
    """The job file has problems; `problems` lists every one found."""

    def __init__(self, problems: list[Problem], total: int | None = None) -> None:
        self.problems = problems
        self.total = total if total is not None else len(problems)
        super().__init__("\n".join(str(p) for p in problems))


class ShardError(JobError):
    """A shard spec or launcher variable is unusable, or `OUT/plan.json` disagrees with this run."""


class OutputError(BatcherError):
    """The output folder can't be used."""


class ManifestError(OutputError):
    """The manifest or its journal is unreadable, corrupt, or of another job."""


class LockedError(OutputError):
    """Another batcher process holds the output folder's lock."""

    def __init__(self, path: str, pid: int | None) -> None:
        self.path = path
        self.pid = pid
        holder = f"process {pid}" if pid else "another process"
        super().__init__(f"{path} is in use by {holder}; wait for it to finish")


class RequestError(BatcherError):
    """One attempt failed. `kind` is transient, permanent or fatal."""

    kind = "transient"

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.type = type  # the error body's `type` (e.g. which limit: requests or images)
        self.message = message
        self.status = status
        self.code = code
        self.retry_after = retry_after
        self.headers = headers or {}

    def describe(self) -> str:
        """One line for logs: `HTTP 422 invalid_value: reason`, leaving out what is unknown."""
        head = " ".join(part for part in (f"HTTP {self.status}" if self.status else None, self.code) if part)
        return f"{head}: {self.message}" if head else self.message

    def as_record(self) -> dict:
        """The manifest's `error` object."""
        return {"kind": self.kind, "status": self.status, "code": self.code, "message": self.message}


class TransientError(RequestError):
    kind = "transient"


class PermanentError(RequestError):
    kind = "permanent"


class FatalError(RequestError):
    kind = "fatal"
