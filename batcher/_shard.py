"""Shards: split one job over N independent workers, each running the items of one shard.

    >>> spec = shard_from_env(os.environ, count=8) or parse_shard("3/8")
    >>> mine = (item for item in job.items() if spec.contains(item.id))

An item's shard is a hash of its id bytes, so every worker, on any machine and any Python,
agrees on it without talking to the others. `OUT/plan.json` pins the job (a fingerprint of
every `(id, rhash)`) and N, so a worker started against an edited job or another N is refused
instead of silently skipping or doubling items.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ._exceptions import ShardError

__all__ = [
    "shard_of",
    "ShardSpec",
    "parse_shard",
    "shard_from_env",
    "Launcher",
    "LAUNCHERS",
    "launcher_table",
    "Plan",
    "PLAN_FILE",
    "fingerprint",
    "make_plan",
    "write_plan",
    "read_plan",
    "check_plan",
]

PLAN_FILE = "plan.json"
PLAN_VERSION = 1


def shard_of(item_id: str, count: int) -> int:
    """The shard (0 ≤ s < count) that owns `item_id`: sha256 of its UTF-8 bytes, first 64 bits, mod count.

    Not Python's `hash()`, which is salted per process. 64 bits make the modulo bias negligible.
    """
    if count < 1:
        raise ShardError(f"shard count must be at least 1, got {count}")
    digest = hashlib.sha256(item_id.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % count


@dataclass(frozen=True)
class ShardSpec:
    """Shard `index` of `count`, 0-based like Kubernetes' JOB_COMPLETION_INDEX. Written "I/N"."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ShardError(f"shard count must be an integer ≥ 1, got {self.count!r}")
        if isinstance(self.index, bool) or not isinstance(self.index, int) or not 0 <= self.index < self.count:
            raise ShardError(f"shard index must be in 0..{self.count - 1} for {self.count} shards, got {self.index!r}")

    def contains(self, item_id: str) -> bool:
        return shard_of(item_id, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> ShardSpec:
    """'3/8' -> ShardSpec(3, 8). The index is 0-based: '0/8' .. '7/8'."""
    index, sep, count = text.strip().partition("/")
    if not sep:
        raise ShardError(f"--shard: expected INDEX/COUNT such as 0/8, got {text!r}")
    try:
        i, n = int(index), int(count)
    except ValueError:
        raise ShardError(f"--shard: INDEX and COUNT must be integers, got {text!r}") from None
    if n < 1:
        raise ShardError(f"--shard: COUNT must be at least 1, got {text!r}")
    if not 0 <= i < n:
        raise ShardError(f"--shard: INDEX is 0-based and must be in 0..{n - 1}, got {text!r}")
    return ShardSpec(i, n)


# -- launchers --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Launcher:
    """Where a batch system puts the task's index (and sometimes the task count)."""

    name: str
    index_var: str
    count_var: str | None
    note: str


LAUNCHERS: tuple[Launcher, ...] = (
    Launcher("Kubernetes Indexed Job", "JOB_COMPLETION_INDEX", None,
             "0-based; N is `completions`, pass it as `--shards N`"),
    Launcher("AWS Batch array job", "AWS_BATCH_JOB_ARRAY_INDEX", None,
             "0-based; N is the array `size`, pass it as `--shards N`"),
    Launcher("Cloud Run job", "CLOUD_RUN_TASK_INDEX", "CLOUD_RUN_TASK_COUNT",
             "0-based; N read from `CLOUD_RUN_TASK_COUNT` when `--shards` is not given"),
    Launcher("Slurm job array", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT",
             "index = (ID − `SLURM_ARRAY_TASK_MIN`) ÷ `SLURM_ARRAY_TASK_STEP`, so `--array=1-8` and "
             "`--array=0-14:2` both work; lists with gaps (`--array=1,5,9`) are not supported"),
)


def launcher_table() -> str:
    """The launcher variables as a Markdown table (the README's copy is checked against it)."""
    rows = ["| launcher | index variable | count variable | notes |", "|---|---|---|---|"]
    for launcher in LAUNCHERS:
        count = f"`{launcher.count_var}`" if launcher.count_var else "—"
        rows.append(f"| {launcher.name} | `{launcher.index_var}` | {count} | {launcher.note} |")
    return "\n".join(rows)


def _int_var(env: Mapping[str, str], name: str) -> int:
    raw = env[name]
    try:
        return int(raw.strip())
    except ValueError:
        raise ShardError(f"${name}: expected an integer, got {raw!r}") from None


def shard_from_env(env: Mapping[str, str], count: int | None) -> ShardSpec | None:
    """This task's shard from the launcher's variables (see LAUNCHERS), or None if none is set.

    `count` is `--shards N`; it is required unless the launcher tells it (Cloud Run, Slurm), and
    must agree with the launcher when both do. The first launcher variable found wins, in the
    order of LAUNCHERS.
    """
    for launcher in LAUNCHERS:
        if launcher.index_var not in env:
            continue
        var = launcher.index_var
        index = _int_var(env, var)
        told: int | None = None
        if launcher.count_var and launcher.count_var in env:
            told = _int_var(env, launcher.count_var)
        if launcher.index_var == "SLURM_ARRAY_TASK_ID":
            lowest = _int_var(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
            step = _int_var(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
            if step < 1 or (index - lowest) % step:
                raise ShardError(f"${var}={index} is not on the array's range (min {lowest}, step {step}); "
                                 f"use a plain range such as --array=0-{(told or 1) - 1}")
            index = (index - lowest) // step
            var = f"{var} (minus $SLURM_ARRAY_TASK_MIN)"
        if count is not None and told is not None and told != count:
            raise ShardError(f"--shards {count} disagrees with ${launcher.count_var}={told}")
        n = count if count is not None else told
        if n is None:
            raise ShardError(f"${launcher.index_var} is set ({launcher.name}) but the shard count is not: "
                             f"pass --shards N")
        if n < 1:
            raise ShardError(f"the shard count must be at least 1, got {n}")
        if not 0 <= index < n:
            raise ShardError(f"${var} gives shard index {index}, outside 0..{n - 1} for {n} shards "
                             f"({launcher.name}: does its task count match --shards?)")
        return ShardSpec(index, n)
    return None


# -- the plan ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """`OUT/plan.json`: the job fingerprint, N, and how many items each shard holds."""

    count: int
    fingerprint: str
    items_per_shard: tuple[int, ...]
    created: str

    @property
    def items(self) -> int:
        return sum(self.items_per_shard)

    def as_record(self) -> dict[str, Any]:
        return {"version": PLAN_VERSION, "shards": self.count, "fingerprint": self.fingerprint,
                "items": self.items, "items_per_shard": list(self.items_per_shard), "created": self.created}


def _pairs(items: Iterable[Any]) -> Iterable[tuple[str, str]]:
    for item in items:
        yield (item.id, item.rhash) if hasattr(item, "rhash") else (item[0], item[1])


def fingerprint(items: Iterable[Any]) -> str:
    """sha256 over every item's `(id, rhash)` in job order, streamed: constant memory.

    `items` yields `Item`s or `(id, rhash)` pairs. Any added, removed, reordered or edited
    item changes it.
    """
    return _fold(items, None)[0]


def make_plan(items: Iterable[Any], count: int) -> Plan:
    """One pass over the job: its fingerprint and each shard's item count."""
    digest, per_shard = _fold(items, count)
    return Plan(count, digest, tuple(per_shard), _utc_now())


def fingerprint_line(item_id: str, rhash: str) -> bytes:
    """What one item adds to the fingerprint (for callers that stream the job themselves)."""
    # JSON framing: ids may hold any character, so no separator could be ambiguous
    return json.dumps([item_id, rhash], ensure_ascii=False).encode("utf-8", "surrogatepass") + b"\n"


def _fold(items: Iterable[Any], count: int | None) -> tuple[str, list[int]]:
    h = hashlib.sha256()
    per_shard = [0] * (count or 0)
    for item_id, rhash in _pairs(items):
        h.update(fingerprint_line(item_id, rhash))
        if count:
            per_shard[shard_of(item_id, count)] += 1
    return "sha256:" + h.hexdigest(), per_shard


def write_plan(out_dir: str | os.PathLike[str], count: int, fingerprint: str,
               counts_per_shard: Iterable[int]) -> Plan:
    """Write `OUT/plan.json` atomically (temp file, fsync, rename); return what was written."""
    counts = tuple(int(c) for c in counts_per_shard)
    if len(counts) != count:
        raise ShardError(f"plan: {len(counts)} shard counts given for {count} shards")
    plan = Plan(count, fingerprint, counts, _utc_now())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-plan-", dir=out)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(plan.as_record(), fh, indent=1)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out / PLAN_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return plan


def read_plan(out_dir: str | os.PathLike[str]) -> Plan | None:
    """`OUT/plan.json`, or None when there is none; a corrupt plan is a ShardError naming the field."""
    path = Path(out_dir) / PLAN_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    return parse_plan(text, str(path))


def parse_plan(text: str, path: str) -> Plan:
    """A plan from the text of a `plan.json` (`path` names it in errors)."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise ShardError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None  # type: ignore[attr-defined]
    if not isinstance(doc, dict):
        raise ShardError(f"{path}: expected a JSON object")
    if doc.get("version") != PLAN_VERSION:
        raise ShardError(f"{path}: version: expected {PLAN_VERSION}, got {doc.get('version')!r}")
    count, digest, per_shard = doc.get("shards"), doc.get("fingerprint"), doc.get("items_per_shard")
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ShardError(f"{path}: shards: expected an integer ≥ 1, got {count!r}")
    if not isinstance(digest, str) or not digest.startswith("sha256:"):
        raise ShardError(f"{path}: fingerprint: expected 'sha256:<hex>', got {digest!r}")
    if (not isinstance(per_shard, list) or len(per_shard) != count
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in per_shard)):
        raise ShardError(f"{path}: items_per_shard: expected {count} counts ≥ 0")
    return Plan(count, digest, tuple(per_shard), str(doc.get("created", "")))


def check_plan(out_dir: str | os.PathLike[str], count: int, fingerprint: str, *,
               required: bool = False, plan: Plan | None = None, path: str | None = None) -> Plan | None:
    """Refuse a run whose N or job differs from `OUT/plan.json` (ShardError); return the plan.

    Without a plan: None, or a ShardError when `required` (a sharded run should not guess).
    Pass `plan` (and `path`) when the plan was read from object storage.
    """
    path = path or str(Path(out_dir) / PLAN_FILE)
    plan = plan if plan is not None else read_plan(out_dir)
    if plan is None:
        if required:
            raise ShardError(f"{path} not found: run `batcher plan JOB --out {out_dir} --shards {count}` first")
        return None
    if plan.count != count:
        raise ShardError(f"{path}: shards: the plan splits the job into {plan.count} shards, this run asks "
                         f"for {count}; use --shards {plan.count}, or write a new plan into a new output")
    if plan.fingerprint != fingerprint:
        raise ShardError(f"{path}: fingerprint: the job changed since the plan was made ({plan.created}): "
                         f"items were added, removed, reordered or edited; run the planned job, or plan "
                         f"again into a new output")
    return plan


def _utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
