"""Cost: the job's price table, `batcher plan` (what a run would send and cost), and run budgets.

Prices are estimates the user writes in the job (`pricing:`); batcher never guesses a provider's
price. The budget is an upper bound on spend: an attempt is charged when it starts and refunded only
when the server's answer proves nothing was generated (an HTTP error status). A timeout, a dropped
connection or a malformed 200 may still have been generated and billed, so it stays charged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._job import Endpoint, Item, Job, Selection
from ._manifest import Journal, needs_run
from ._output import FolderOutput, OutputReader, open_output

__all__ = ["PriceTable", "BudgetLimits", "Budget", "plan", "endpoint_prices", "item_price", "PRICE_KEYS"]

PRICE_KEYS = ("model", "size", "quality")


class PriceTable:
    """Per-image prices; the most specific matching row wins (ties: the first one listed).

    >>> PriceTable([{"model": "grok-imagine", "per_image": 0.07}]).per_image({"model": "grok-imagine"})
    0.07
    """

    def __init__(self, rows: Iterable[Mapping[str, Any]] = ()) -> None:
        ranked = [(sum(k in row for k in PRICE_KEYS), -i, dict(row)) for i, row in enumerate(rows)]
        self._rows = [row for *_, row in sorted(ranked, key=lambda r: (r[0], r[1]), reverse=True)]

    def __bool__(self) -> bool:
        return bool(self._rows)

    def per_image(self, body: Mapping[str, Any]) -> float | None:
        for row in self._rows:
            if all(row[k] == body.get(k) for k in PRICE_KEYS if k in row):
                return float(row["per_image"])
        return None

    def cost(self, body: Mapping[str, Any], images: int) -> float | None:
        price = self.per_image(body)
        return None if price is None else price * images


def endpoint_prices(job: Job) -> dict[str, PriceTable]:
    """Each endpoint's price table, built once: its own `price`, else the job's `pricing`; an endpoint in
    batch mode is priced at its `batch_price`, else at that price less its batch discount (default 50%:
    what OpenAI's and xAI's Batch APIs charge)."""
    tables: dict[str, PriceTable] = {}
    for e in job.endpoints:
        rows = e.price if e.price is not None else job.pricing
        if e.batch is not None:
            rows = e.batch_price if e.batch_price is not None else [
                {**r, "per_image": float(r["per_image"]) * (1 - e.batch.discount)} for r in rows or ()]
        tables[e.name] = PriceTable(rows or ())
    return tables


def item_price(job: Job, item: Item, tables: dict[str, PriceTable],
               live: Iterable[Endpoint] | None = None) -> float | None:
    """Per-image price of an item as planned: the dearest endpoint that may send it (an upper
    bound, since routing decides at run time); `tables` from `endpoint_prices`, `live` the run's
    endpoints (`Selection.live`; None: all)."""
    prices = [tables[e.name].per_image(item.body) for e in (job.endpoints if live is None else live)
              if job.can_send(e, item.body)]
    if not prices or any(p is None for p in prices):
        return None
    return max(p for p in prices if p is not None)


@dataclass(frozen=True)
class BudgetLimits:
    """Hard limits for one run: images requested and estimated cost (None: no limit)."""

    max_images: int | None = None
    max_cost: float | None = None

    def __bool__(self) -> bool:
        return self.max_images is not None or self.max_cost is not None


class Budget:
    """What this run may still start. Not thread-safe: used from the event loop only.

    >>> budget = Budget(BudgetLimits(max_images=10))
    >>> budget.reserve(4, None), budget.reserve(8, None)
    (True, False)
    """

    def __init__(self, limits: BudgetLimits) -> None:
        self.limits = limits
        self.images = 0
        self.cost = 0.0

    def fits(self, images: int, cost: float | None) -> bool:
        lim = self.limits
        if lim.max_images is not None and self.images + images > lim.max_images:
            return False
        if lim.max_cost is not None and (cost is None or self.cost + cost > lim.max_cost + 1e-9):
            return False
        return True

    def reserve(self, images: int, cost: float | None) -> bool:
        if not self.fits(images, cost):
            return False
        self.images += images
        self.cost += cost or 0.0
        return True

    def refund(self, images: int, cost: float | None) -> None:
        self.images -= images
        self.cost -= cost or 0.0

    def describe(self) -> str:
        parts = []
        if self.limits.max_images is not None:
            parts.append(f"{self.images}/{self.limits.max_images} images")
        if self.limits.max_cost is not None:
            parts.append(f"{self.cost:.2f}/{self.limits.max_cost:.2f} cost")
        return ", ".join(parts)


def _images_to_send(journal: Journal | None, item: Item) -> int:
    """The item's n, less the images a short answer already brought (a rerun asks for the rest)."""
    short = journal.short_record(item.id, item.rhash, item.images) if journal is not None else None
    return item.images - len(short["images"]) if short is not None else item.images


def plan(job: Job, out: str | Path | None = None, *, retry_failed: bool = False,
         selection: Selection | None = None) -> dict[str, Any]:
    """What running `job` into `out` would send, by model/size/quality, and what it would cost.

    >>> plan(load_job("jobs/example.yaml"), "output/example")["send"]["images"]
    5
    Streams the job once; nothing is sent. Items `out` already has (done, or failed for good
    unless `retry_failed`) are counted apart; `out` may be a folder or `s3://...` (sharded or not).
    `selection`: the endpoints (`--endpoint`) to plan for.
    """
    selection = selection or Selection()
    selection.validate(job)
    if out is None:
        return _plan(job, selection, None, None, None, retry_failed)
    reader = open_output(out)
    with reader.journal() as journal:  # a folder's or a store's (every shard's, merged)
        return _plan(job, selection, out, reader, journal, retry_failed)


def _plan(job: Job, selection: Selection, out: str | Path | None, reader: OutputReader | None,
          journal: Journal | None, retry_failed: bool) -> dict[str, Any]:
    live = selection.live(job)
    tables = endpoint_prices(job)
    at_provider: Mapping[str, str] = {}
    if journal is not None and isinstance(reader, FolderOutput):  # `run --batch` writes to a folder only
        from ._batch import BatchBook

        at_provider = BatchBook(reader.root, journal.runs).at_provider  # submitted in batches: already charged
    groups: dict[tuple[str, ...], dict[str, Any]] = {}
    total = have = submitted = 0
    send = {"requests": 0, "images": 0, "cost": 0.0, "unpriced_requests": 0}
    first_unpriced: Item | None = None
    for item in selection.items(job):
        total += 1
        if journal is not None and not needs_run(journal.entries.get(item.id), item.rhash, retry_failed):
            have += 1
            continue
        if item.id in at_provider:
            submitted += 1
            continue
        images = _images_to_send(journal, item)
        key = tuple(str(item.body.get(k, "")) for k in PRICE_KEYS)
        price = item_price(job, item, tables, live)
        group = groups.setdefault(key, {**dict(zip(PRICE_KEYS, key, strict=True)), "requests": 0, "images": 0,
                                        "per_image": price, "cost": 0.0})
        cost = None if price is None else price * images
        group["requests"] += 1
        group["images"] += images
        send["requests"] += 1
        send["images"] += images
        if cost is None:
            send["unpriced_requests"] += 1
            first_unpriced = first_unpriced or item
        else:
            group["cost"] += cost
            send["cost"] += cost
    rows = sorted(groups.values(), key=lambda g: (-g["images"], g["model"], g["size"], g["quality"]))
    return {
        "job": job.name,
        "out": str(out) if out is not None else None,
        "items": total,
        "already": have,
        "at_provider": submitted,
        "send": {**send, "cost": round(send["cost"], 6)},
        "by": [{**g, "cost": round(g["cost"], 6) if g["per_image"] is not None else None} for g in rows],
        "first_unpriced": f"{first_unpriced.file}:{first_unpriced.line}" if first_unpriced else None,
    }
