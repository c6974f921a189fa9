"""batcher: a file of prompts in, a folder of generated images and a resumable manifest out.

    >>> import batcher
    >>> job = batcher.load_job("jobs/example.yaml")
    >>> result = batcher.run_sync(job, batcher.RunOptions(out="output/example"))
    >>> result.summary
    {'total': 5, 'done': 5, 'failed': 0, 'pending': 0}
"""

__version__ = "0.1.0"

import typing as _typing

from ._client import Timeouts
from ._exceptions import (
    BatcherError,
    FatalError,
    JobError,
    JobValidationError,
    LockedError,
    ManifestError,
    OutputError,
    PermanentError,
    Problem,
    RequestError,
    TransientError,
)
from ._job import Item, Job, load_job
from ._limiter import RateLimiter
from ._policy import RetryPolicy
from ._runner import RunOptions, RunResult, run, run_sync

if _typing.TYPE_CHECKING:
    from ._export import export
    from ._gallery import report
    from ._status import status

# imported on first use: `batcher run` needs none of them (their imports are ~15 ms of every start)
_LAZY = {"export": "._export", "report": "._gallery", "status": "._status"}


def __getattr__(name: str) -> _typing.Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # once: later lookups are plain module attributes
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})

__all__ = [
    "__version__",
    "load_job",
    "Job",
    "Item",
    "run",
    "run_sync",
    "RunOptions",
    "RunResult",
    "RetryPolicy",
    "RateLimiter",
    "Timeouts",
    "status",
    "export",
    "report",
    "BatcherError",
    "JobError",
    "JobValidationError",
    "Problem",
    "OutputError",
    "ManifestError",
    "LockedError",
    "RequestError",
    "TransientError",
    "PermanentError",
    "FatalError",
]
