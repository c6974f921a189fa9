"""Whether the run goes on: the stop flag, the fatal error that stopped it, and waits that end with it.

>>> control = RunControl(reporter)
>>> if not await control.wait(dispatch.wait, ep.name): return   # the run stopped meanwhile
>>> control.stop(FatalError("quota", code="insufficient_quota"))

Shared by the feed, every executor and the write → record stage (a refused disk write stops the run).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from ._exceptions import RequestError
from ._report import Reporter


class RunControl:
    """The run's stop state; `stop` wakes every waiter (in-flight requests finish)."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self.stopping = False
        self.interrupted = False  # a signal asked for the stop
        self.fatal: RequestError | None = None
        self.fatal_note: str | None = None
        self._wait_scopes: set[anyio.CancelScope] = set()

    def stop(self, fatal: RequestError | None = None, note: str | None = None) -> None:
        """Stop submitting: wake every waiting worker; in-flight requests finish."""
        if fatal is not None and self.fatal is None:
            self.fatal, self.fatal_note = fatal, note
            self.reporter.log(note or f"fatal: {fatal.message}", level="error")
        self.stopping = True
        for scope in list(self._wait_scopes):
            scope.cancel()

    async def wait(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> bool:
        """Await fn(*args) unless the run stops meanwhile; return False if it stopped."""
        return await self.wait_for(fn, *args) is not None

    async def wait_for(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """fn(*args)'s result (True for None), or None if the run stopped meanwhile."""
        if self.stopping:
            return None
        result: Any = None
        with anyio.CancelScope() as scope:
            self._wait_scopes.add(scope)
            try:
                result = await fn(*args)
            finally:
                self._wait_scopes.discard(scope)
        if scope.cancelled_caught or self.stopping:
            return None
        return True if result is None else result
