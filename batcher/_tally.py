"""The counts `batcher status` prints, kept up to date in the checkpoint by the runs that write it.

Counting them by SQL over `current` joined to `items` costs O(items) (~1.5 s CPU at 10^6), on
every `status`. Instead the checkpoint keeps them (meta "tally"), stamped with what they count:

    {"v": 1, "offset": O, "current": D, "total": N,     # the checkpoint's offset, current digest and count,
     "unverified": U,                                   # its rows whose files no run has verified yet
     "counts": [done, failed, pending, made, cost_n, "cost", images, bytes],
     "endpoints": {name: [done, failed, cost_n, "cost", first_pos]}}

`made` is the done items' images, `cost` their exact cost sum (a fraction: added and subtracted
again without drift; `cost_n` the rows that have one, so None stays None), `images`/`bytes` those
of done and failed items whose files a run has verified, `first_pos` an endpoint's first finished
item in job order (the order `status` lists endpoints in). Failures are not kept: every failed row
is in the checkpoint's `unverified` index, so `status` groups them in O(failed).

Each writer of `items` (`_checkpoint._refresh`) or `current` (`_jobcache.CurrentWriter`) updates
the tally in its own transaction: for each changed row, its old contribution out and its new one
in (one indexed lookup of its place in `current`); a rewrite of `current` counts in full (that run
already paid O(items)). An endpoint whose first item left is looked up again, walking `current` from
that position (a few rows, unless the endpoint's next item is far down the job).
A tally whose stamp is not the checkpoint's (an older batcher wrote since, or none ever) is not used:
`status` counts in full, and the next writer recounts it.

    >>> t = load(db)                      # the stored tally, or None
    >>> t is not None and t.matches(db)   # it counts these items at this offset
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

__all__ = ["Tally", "TallyError", "load", "load_matching", "count", "store", "settle", "place", "apply_rows",
           "current_rows", "move_current"]

META = "tally"
VERSION = 1
MAX_ENDPOINTS = 64  # as `_status.MAX_ENDPOINTS`: more (never seen) are not tallied
FINISHED = ("done", "failed")

Stamp = tuple[int, str | None, int, int]  # offset, current digest, current total, unverified rows

# indexes into a checkpoint row (`_checkpoint._COLUMNS`)
STATUS, RHASH, ENDPOINT, COST, IMAGES, BYTES, VERIFIED = 0, 1, 7, 8, 9, 10, 11


class TallyError(ValueError):
    """The rows can't be tallied exactly (an odd value, an endpoint's first item unknown): count in full."""


def _exact(cost: Any) -> Fraction:
    if isinstance(cost, bool) or not isinstance(cost, (int, float)):
        raise TallyError("cost is not a number")
    try:
        return Fraction(cost)
    except (ValueError, OverflowError) as exc:  # nan, inf
        raise TallyError("cost is not finite") from exc


@dataclass
class Tally:
    """The counts of the current items; `add(row, pos, ±1)` moves one row in or out."""

    done: int = 0
    failed: int = 0
    pending: int = 0
    made: int = 0
    cost_n: int = 0
    cost: Fraction = Fraction(0)
    images: int = 0
    nbytes: int = 0
    endpoints: dict[str, list[Any]] = field(default_factory=dict)  # [done, failed, cost_n, cost, first_pos]
    lost_first: set[str] = field(default_factory=set)  # endpoints whose first item left (see `settle`)
    stamp: Stamp | None = None  # what it counts: see `_stamp`

    def add(self, row: Sequence[Any], pos: int, sign: int) -> None:
        status, endpoint = row[STATUS], row[ENDPOINT]
        tallied = status in FINISHED and endpoint is not None and endpoint != ""
        if sign < 0 and tallied and endpoint not in self.endpoints:
            raise TallyError(f"endpoint {endpoint!r} was not tallied")
        images, nbytes = int(row[IMAGES]), int(row[BYTES])
        # a row leaving never makes an endpoint's first position earlier: min() with itself keeps it
        first = pos if sign > 0 else self.endpoints[endpoint][4] if tallied else pos
        _bulk(self, status, endpoint, row[VERIFIED] == 1, row[COST], sign, sign * images, sign * nbytes, first)
        if sign > 0 or not tallied:
            return
        counts = self.endpoints[endpoint]
        if pos < counts[4]:
            raise TallyError(f"endpoint {endpoint!r}: an item before its first")
        if counts[0] + counts[1] == 0:
            del self.endpoints[endpoint]
            self.lost_first.discard(endpoint)
        elif min(counts[0], counts[1], counts[2]) < 0:
            raise TallyError(f"endpoint {endpoint!r}: negative counts")
        elif pos == counts[4]:
            self.lost_first.add(endpoint)

    def change(self, old: Sequence[Any] | None, new: Sequence[Any] | None, place: tuple[int, Any] | None) -> None:
        """An item's row went from `old` to `new` (None: no row); `place` is its (pos, rhash) in `current`
        (None: not a current item). A row counts when the current item's request hash is its own."""
        if place is None:
            return
        pos, rhash = place
        if old is not None and (rhash is None or rhash == old[RHASH]):
            self.add(old, pos, -1)
        if new is not None and (rhash is None or rhash == new[RHASH]):
            self.add(new, pos, +1)

    def matches(self, db: sqlite3.Connection) -> bool:
        """Whether this tally counts the checkpoint's items as they stand (its offset and current items)."""
        return self.stamp is not None and self.stamp == _stamp(db)

    def check(self) -> None:
        if min(self.done, self.failed, self.pending, self.made, self.cost_n, self.images, self.nbytes) < 0:
            raise TallyError("negative counts")

    # what `status` prints, as its full count gives it

    def totals(self) -> dict[str, int]:
        return {"done": self.done, "failed": self.failed, "pending": self.pending}

    def total_cost(self) -> float | None:
        return float(self.cost) if self.cost_n else None

    def endpoint_rows(self) -> list[tuple[int, str, int, int, float | None]]:
        """(first pos, name, done, failed, cost) per endpoint, in job order of their first finished item."""
        return sorted(((c[4], name, c[0], c[1], float(c[3]) if c[2] else None) for name, c in self.endpoints.items()),
                      key=lambda r: r[0])

    def to_json(self, stamp: Stamp) -> str:
        return json.dumps({
            "v": VERSION, "offset": stamp[0], "current": stamp[1], "total": stamp[2], "unverified": stamp[3],
            "counts": [self.done, self.failed, self.pending, self.made, self.cost_n, str(self.cost), self.images,
                       self.nbytes],
            "endpoints": {name: [c[0], c[1], c[2], str(c[3]), c[4]] for name, c in self.endpoints.items()}},
            ensure_ascii=False)

    @classmethod
    def from_json(cls, raw: str) -> Tally:
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("v") != VERSION:
            raise TallyError("not a tally of this version")
        done, failed, pending, made, cost_n, cost, images, nbytes = doc["counts"]
        tally = cls(int(done), int(failed), int(pending), int(made), int(cost_n), Fraction(cost), int(images),
                    int(nbytes), {str(name): [int(c[0]), int(c[1]), int(c[2]), Fraction(c[3]), int(c[4])]
                                  for name, c in doc["endpoints"].items()})
        tally.stamp = (int(doc["offset"]), doc["current"], int(doc["total"]), int(doc["unverified"]))
        return tally


def _stamp(db: sqlite3.Connection) -> Stamp | None:
    """The checkpoint as it stands: the journal offset it covers, its current items' digest and count, and
    its unverified rows (O(those), from their index): a writer that did not move the tally (an older
    batcher checking files, a hand edit) changes one of them."""
    meta = dict(db.execute("SELECT k, v FROM meta WHERE k IN ('offset', 'current', 'current_total')").fetchall())
    if "offset" not in meta or "current" not in meta or "current_total" not in meta:
        return None
    (unverified,) = db.execute("SELECT COUNT(*) FROM items WHERE verified = 0").fetchone()  # its partial index
    return int(meta["offset"]), meta["current"], int(meta["current_total"]), int(unverified)


def load(db: sqlite3.Connection) -> Tally | None:
    """The tally stored in the checkpoint, whatever it counts (see `Tally.matches`); None if none or unreadable."""
    try:
        row = db.execute("SELECT v FROM meta WHERE k = ?", (META,)).fetchone()
        return Tally.from_json(row[0]) if row else None
    except (sqlite3.Error, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return None


def load_matching(db: sqlite3.Connection) -> Tally | None:
    """The stored tally if it counts the checkpoint as it stands, else None."""
    tally = load(db)
    try:
        return tally if tally is not None and tally.matches(db) else None
    except (sqlite3.Error, ValueError):
        return None


def store(db: sqlite3.Connection, tally: Tally | None, *, counted: bool = False) -> None:
    """Write `tally` (moved along; its endpoints' first items settled here) stamped with the checkpoint
    as it stands, inside the caller's transaction.

    None (or a tally that can't be settled): counted in full instead, unless `counted` (a full count
    just failed) or a full count failed before: then a marker says so, so that every later run does not
    pay O(items) for nothing (a rewrite of `current` counts again); `status` counts in full meanwhile.
    """
    stamp = _stamp(db)
    if stamp is None:
        db.execute("DELETE FROM meta WHERE k = ?", (META,))
        return
    if tally is not None:
        try:
            settle(db, tally)
            tally.check()
        except TallyError:
            tally = None
    if tally is None and not counted and not _uncountable(db):
        tally = count(db)
    if tally is None:
        db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (META, json.dumps({"v": VERSION,
                                                                                        "uncountable": True})))
        return
    db.execute("INSERT OR REPLACE INTO meta (k, v) VALUES (?, ?)", (META, tally.to_json(stamp)))
    tally.stamp = stamp


def _uncountable(db: sqlite3.Connection) -> bool:
    row = db.execute("SELECT v FROM meta WHERE k = ?", (META,)).fetchone()
    try:
        return row is not None and json.loads(row[0]).get("uncountable") is True
    except (ValueError, AttributeError):
        return False


def _cols(prefix: str) -> str:
    from ._checkpoint import _COLUMNS

    return ", ".join(f"{prefix}.{c}" for c in _COLUMNS)


def count(db: sqlite3.Connection) -> Tally | None:
    """The tally of the checkpoint's current items, counted in full: None without current items, with
    more than MAX_ENDPOINTS endpoints, or odd values (a cost that is not a number).

    One pass with conditional aggregates, as `status` counts in full: C speed (~1 s at 10^6 items) and
    constant memory (no GROUP BY sort); a cost sum starts from that pass's float sum, exact from there.
    """
    if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'current'").fetchone() is None:
        return None
    endpoints = [e for (e,) in db.execute("SELECT DISTINCT endpoint FROM items") if e is not None and e != ""]
    if len(endpoints) > MAX_ENDPOINTS or not all(isinstance(e, str) for e in endpoints):
        return None
    df, priced = "s.status IN ('done', 'failed')", "s.status = 'done' AND s.cost IS NOT NULL"
    columns = ["SUM(s.status = 'done')", "SUM(s.status = 'failed')", "SUM(s.status = 'pending')",
               "SUM(CASE WHEN s.status = 'done' THEN s.images END)", f"SUM({priced})",
               f"SUM(CASE WHEN {priced} THEN s.cost END)",
               f"SUM({priced} AND typeof(s.cost) NOT IN ('integer', 'real'))",
               f"SUM(CASE WHEN s.verified = 1 AND {df} THEN s.images END)",
               f"SUM(CASE WHEN s.verified = 1 AND {df} THEN s.bytes END)"]
    for _ in endpoints:
        columns += ["SUM(s.endpoint = ? AND s.status = 'done')", "SUM(s.endpoint = ? AND s.status = 'failed')",
                    f"SUM(s.endpoint = ? AND {priced})", f"SUM(CASE WHEN s.endpoint = ? AND {priced} THEN s.cost END)",
                    f"MIN(CASE WHEN s.endpoint = ? AND {df} THEN c.pos END)"]
    row = db.execute(f"SELECT {', '.join(columns)} FROM current c JOIN items s ON s.id = c.id "
                     f"WHERE c.rhash IS NULL OR c.rhash = s.rhash", [e for e in endpoints for _ in range(5)]).fetchone()
    done, failed, pending, made, cost_n, cost, odd, images, nbytes = (v or 0 for v in row[:9])
    if odd:
        return None
    try:
        tally = Tally(done, failed, pending, made, cost_n, _exact(cost), images, nbytes)
        for i, endpoint in enumerate(endpoints):
            e_done, e_failed, e_cost_n, e_cost, first = row[9 + 5 * i : 14 + 5 * i]
            if first is not None:
                tally.endpoints[endpoint] = [e_done or 0, e_failed or 0, e_cost_n or 0, _exact(e_cost or 0), first]
        tally.check()
    except TallyError:
        return None
    return tally


def _bulk(tally: Tally, status: Any, endpoint: Any, verified: bool, cost: Any, n: int, images: int, nbytes: int,
          first: int) -> None:
    """Add `n` rows alike but for their images and bytes (`images`, `nbytes`: their sums), the first at `first`."""
    if status == "done":
        tally.done += n
        tally.made += images
        if cost is not None:
            tally.cost_n += n
            tally.cost += n * _exact(cost)
    elif status == "failed":
        tally.failed += n
    elif status == "pending":
        tally.pending += n
    if status not in FINISHED:
        return
    if verified:
        tally.images += images
        tally.nbytes += nbytes
    if endpoint is None or endpoint == "":
        return
    if not isinstance(endpoint, str):
        raise TallyError("endpoint is not a string")
    counts = tally.endpoints.setdefault(endpoint, [0, 0, 0, Fraction(0), first])
    if len(tally.endpoints) > MAX_ENDPOINTS:
        raise TallyError("too many endpoints")
    counts[0 if status == "done" else 1] += n
    counts[4] = min(counts[4], first)
    if status == "done" and cost is not None:
        counts[2] += n
        counts[3] += n * _exact(cost)


def settle(db: sqlite3.Connection, tally: Tally) -> None:
    """Find the new first item of each endpoint whose first item left: walking `current` from the old
    one (items before it are unchanged or were added, so counted by `min`)."""
    for endpoint in sorted(tally.lost_first):
        counts = tally.endpoints[endpoint]
        found = db.execute(
            "SELECT c.pos FROM current c CROSS JOIN items s ON s.id = c.id WHERE c.pos >= ? AND s.endpoint = ? "
            "AND s.status IN ('done', 'failed') AND (c.rhash IS NULL OR c.rhash = s.rhash) ORDER BY c.pos LIMIT 1",
            (counts[4], endpoint)).fetchone()
        if found is None:
            raise TallyError(f"endpoint {endpoint!r}: no finished item, yet counted")
        counts[4] = found[0]
    tally.lost_first.clear()


def place(db: sqlite3.Connection, item_id: str) -> tuple[int, Any] | None:
    """The item's (pos, request hash) in `current`, or None when it is not a current item."""
    row = db.execute("SELECT pos, rhash FROM current WHERE id = ?", (item_id,)).fetchone()
    return (row[0], row[1]) if row is not None else None


def apply_rows(db: sqlite3.Connection, tally: Tally, rows: Iterable[tuple[Any, ...]]) -> None:
    """Tally rows (id first) about to replace the checkpoint's rows of the same ids (before they are written)."""
    from ._checkpoint import _SELECT_ONE

    for row in rows:
        where = place(db, row[0])
        if where is not None:
            tally.change(db.execute(_SELECT_ONE, (row[0],)).fetchone(), row[1:], where)


def current_rows(db: sqlite3.Connection, after: int) -> Iterator[tuple[Any, ...]]:
    """(pos, current rhash, has a row, the item's row or Nones) of the current items after position
    `after`, streamed (a job that grew by millions is not held in memory)."""
    yield from db.execute(f"SELECT c.pos, c.rhash, s.id IS NOT NULL, {_cols('s')} FROM current c "
                          f"LEFT JOIN items s ON s.id = c.id WHERE c.pos > ?", (after,))


def move_current(tally: Tally, rows: Iterable[tuple[Any, ...]], sign: int) -> None:
    """Items of `current_rows` joining (+1) or leaving (-1) the current items."""
    for pos, rhash, has_row, *row in rows:
        if has_row and (rhash is None or rhash == row[RHASH]):
            tally.add(row, pos, sign)
