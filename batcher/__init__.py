"""batcher: a file of prompts in, a folder of generated images and a resumable manifest out.

    >>> import batcher
    >>> job = batcher.load_job("jobs/example.yaml")
    >>> result = batcher.run_sync(job, batcher.RunOptions(out="output/example"))
    >>> result.summary
    {'total': 5, 'done': 5, 'failed': 0, 'pending': 0}
"""

__version__ = "0.1.0"

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
from ._export import export
from ._gallery import report
from ._job import Item, Job, load_job
from ._limiter import RateLimiter
from ._policy import RetryPolicy
from ._runner import RunOptions, RunResult, run, run_sync
from ._status import status

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
