"""Who holds an item: nobody else (`LocalClaims`, one worker per output) or a Redis claim shared by
every worker of an output (`RedisClaims`, with `--limiter redis://`).

>>> verdict = await claims.claim(item.id)   # "ok", "done" (another worker finished it), "held", "retry"
>>> ...; await claims.release(item.id, done=True)

A claim lasts across an item's retries: it is taken once, renewed every third of its ttl by
`keep_renewed` (one task for the run) and released when the item is finished or left pending.
"""

from __future__ import annotations

from typing import Any

import anyio

from ._report import Reporter

CLAIM_TTL = 30.0  # seconds; renewed every 10 s while a worker holds the item
CLAIM_WAITS = 6  # times an item held by another worker is asked for again (every TTL/2) before giving up
DONE_KEPT = 24 * 3600.0  # a finished item's claim says "done" this long: others' views may predate our segment


class LocalClaims:
    """One worker per output (the folder's lock): every item is ours."""

    ttl = CLAIM_TTL

    def __init__(self) -> None:
        self.skipped = 0  # items another worker held when we came to them

    async def claim(self, item_id: str) -> str:
        return "ok"

    async def release(self, item_id: str, done: bool) -> None:
        return None

    async def keep_renewed(self) -> None:
        return None


class RedisClaims(LocalClaims):
    """Items claimed in Redis before they are sent (imports redis; `store` for tests)."""

    def __init__(self, url: str, output: str, reporter: Reporter, *, ttl: float = CLAIM_TTL,
                 store: Any = None) -> None:
        from ._redis import ClaimStore, _down_errors

        super().__init__()
        # short, renewed every third of it while held: a dead worker's claims free up within it
        self.ttl = ttl
        self.store = store if store is not None else ClaimStore(url, output)
        self.reporter = reporter
        self._down = _down_errors()  # redis' ConnectionError / TimeoutError, OSError: Redis is away
        self._claimed: set[str] = set()

    async def claim(self, item_id: str) -> str:
        """Take the item for this worker: "ok", "done" (finished by another worker), "held", or
        "retry" (free again by the time we asked who held it)."""
        if item_id in self._claimed:
            return "ok"
        try:
            if await self.store.claim(item_id, self.ttl):
                self._claimed.add(item_id)
                return "ok"
            holder = await self.store.holder(item_id)
        except self._down as exc:  # Redis away: the shard split still keeps workers apart
            self.reporter.log(f"claims unavailable ({type(exc).__name__}); going on without", level="warning")
            return "ok"
        return "done" if holder == "done" else "held" if holder is not None else "retry"

    async def release(self, item_id: str, done: bool) -> None:
        """Done: the claim says so for a day; else it is given up for any worker to take."""
        if item_id not in self._claimed:
            return
        self._claimed.discard(item_id)
        with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
            try:
                if done:
                    await self.store.keep(item_id, DONE_KEPT)
                else:
                    await self.store.release(item_id)
            except self._down:
                pass  # the claim expires on its own

    async def keep_renewed(self) -> None:
        """Renew every held claim each third of the ttl, for the life of the run."""
        while True:
            await anyio.sleep(self.ttl / 3)
            for item_id in list(self._claimed):
                try:
                    await self.store.renew(item_id)
                except self._down:
                    break  # Redis away: try again next period
