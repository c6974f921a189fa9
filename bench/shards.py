"""Sharded runs: real `batcher run --shard I/N --limiter redis://` worker processes, one table.

    .venv/bin/python bench/shards.py                 # rows 1-5 (about 2 minutes)
    .venv/bin/python bench/shards.py --rows 1,2      # a subset
    .venv/bin/python bench/shards.py --s3            # also 4 workers writing to a moto S3 server
    .venv/bin/python bench/shards.py --rows 1,7,8    # one limit, the simulator advertising it 3 ways

Rows (600 PartiPrompts items, each made unique with " #i", 64x64, `plan --shards 4` first):

1. 4 workers (`--shard 0/4` … `3/4`), one `--rpm 3000` simulator endpoint shared through
   `--limiter redis://` (a redis-server started here on a free 127.0.0.1 port, stopped by PID).
2. the same (`--timeout 20`, so item claims live 60 s), with worker 1 SIGKILLed (by its PID)
   once it recorded 75 items; `--shard 1/4` is run again right after the others ended, and once
   more after the killed worker's claims expired if the first rerun left items pending. The
   merged manifest must hold every item done exactly once, the simulator must have generated no
   more duplicates than worker 1 had in flight (attempts journaled without an item record), and
   OUT/images must hold exactly the manifest's files (no stray, no partial, no `.tmp-*`).
3. two workers on `--shard 0/4` at once, each with its own `--work-dir` (two pods on two
   nodes: one shared local folder would let the lock, not the claims, keep them apart).
4. row 1 with redis-server SIGKILLed (by its PID) mid-run.
5. limiter acquire latency (bench/shared_limit.py's measurement), and the modules a local
   (unsharded, no limiter) run imports (`python -X importtime`): neither redis nor s3fs.
7, 8. row 1 with the simulator's `--limit-style bucket` (a token bucket of one second's share:
   remaining 0..50, reset ≤ 1 s) and `--limit-style minute` (OpenAI's minute counts); not by default.

Makespan is from the first attempt any worker journaled (just before its send) to the last
item record (after its image was published), read from the output's merged journal segments;
"wall" is first worker spawn → last worker exit (interpreter start-up, job read, plan check and
the final merge included). Ideal is rate.py's `ideal_makespan` for the single 3,000-rpm limit.
Everything is on 127.0.0.1; every process is started here and stopped by its PID.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _harness import (  # noqa: E402
    ROOT,
    Simulator,
    base_prompts,
    batcher_env,
    batcher_revision,
    command_line,
    markdown_table,
    unique_prompt,
    write_jsonl_job,
)
from rate import ideal_makespan  # noqa: E402
from redis_helpers import REDIS_SERVER, RedisServer  # noqa: E402

ITEMS = 600
SHARDS = 4
RPM = 3000
LATENCY_MS, JITTER_MS = 300, 100
# per worker: the limit's one-second share (50). Fewer would be plenty once all 4 run (50/s x 0.3 s
# is 15 in flight), but worker processes start up to ~1 s apart on 2 cores, and the first one up can
# then send only its concurrency of the first window: the rest goes ~0.3 s later (its first answers),
# a shape the sliding window keeps to the end. Measured (rows 1/7/8, load ~1): 32 -> 0.942-0.962,
# 50 -> 0.957-0.965 (docs/benchmarks.md). `--concurrency N` runs another value.
CONCURRENCY = 50
MODEL = "grok-imagine"
WORKER_TIMEOUT = 120.0  # a worker still running after this is SIGKILLed and its row fails
WINDOW_CAP = 1.1 * RPM / 60.0


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- worker processes -------------------------------------------------------------------------

@dataclass
class Worker:
    name: str
    cmd: list[str]
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0  # time.time()
    ended: float | None = None
    killed: bool = False  # SIGKILLed by the bench (a scenario's kill, or the timeout)
    env_extra: dict[str, str] | None = None  # added to batcher_env() (the S3 row's endpoint and dummy keys)

    def start(self) -> None:
        self._out = open(self.workdir / f"{self.name}.stdout", "wb")
        self._err = open(self.workdir / f"{self.name}.stderr", "wb")
        self.started = time.time()
        self.proc = subprocess.Popen(self.cmd, stdout=self._out, stderr=self._err, stdin=subprocess.DEVNULL,
                                     cwd=str(self.workdir), env=_env(self.env_extra))

    def poll(self) -> bool:
        """True once the process has exited (and its end time is recorded)."""
        assert self.proc is not None
        if self.ended is None and self.proc.poll() is not None:
            self.ended = time.time()
            self._out.close()
            self._err.close()
        return self.ended is not None

    def kill(self) -> None:
        """SIGKILL this worker's PID only, as a node loss would."""
        assert self.proc is not None
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.killed = True
            self.proc.wait(timeout=10)
        self.poll()

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.returncode

    def result(self) -> dict[str, Any] | None:
        text = (self.workdir / f"{self.name}.stdout").read_text("utf-8", "replace")
        for line in reversed(text.strip().splitlines()):
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except ValueError:
                    pass
        return None

    def stderr_tail(self, n: int = 600) -> str:
        return (self.workdir / f"{self.name}.stderr").read_text("utf-8", "replace")[-n:]


def run_workers(workers: list[Worker], *, timeout: float = WORKER_TIMEOUT,
                events: list[tuple[Callable[[], bool], Callable[[], None]]] = ()) -> None:
    """Start every worker, fire each event's action once its condition holds, wait for all to exit.

    Bounded: a worker still running `timeout` s after the start is SIGKILLed (by its PID).
    """
    for w in workers:
        w.start()
    pending = list(events)
    deadline = time.monotonic() + timeout
    while not all(w.poll() for w in workers):
        for ev in list(pending):
            if ev[0]():
                ev[1]()
                pending.remove(ev)
        if time.monotonic() >= deadline:
            for w in workers:
                if not w.poll():
                    log(f"  {w.name}: still running after {timeout:.0f}s; SIGKILL")
                    w.kill()
            break
        time.sleep(0.02)


def batcher_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "batcher", *args]


def worker_cmd(job: Path, out: str, shard: str, sim: Simulator, limiter: str | None,
               *extra: str) -> list[str]:
    cmd = batcher_cmd("run", str(job), "--out", out, "--shard", shard, "--base-url", sim.base_url,
                      "--rpm", str(RPM), "--concurrency", str(CONCURRENCY), "--quiet", "--json", *extra)
    if limiter:
        cmd += ["--limiter", limiter]
    return cmd


def plan(job: Path, out: str, workdir: Path, env: dict[str, str] | None = None) -> None:
    done = subprocess.run(batcher_cmd("plan", str(job), "--out", out, "--shards", str(SHARDS)),
                          capture_output=True, text=True, cwd=str(workdir), env=env or batcher_env(), timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"batcher plan failed: {done.stderr[-800:]}")


# -- what the output and the simulator say ------------------------------------------------------

def sim_stats(sim: Simulator) -> dict[str, Any]:
    """The simulator's counters, per-prompt generation counts included."""
    with urllib.request.urlopen(f"{sim.root}/_sim/stats", timeout=30) as resp:  # 127.0.0.1 only
        return json.loads(resp.read())


def _ts(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def journal_span(out: str) -> tuple[float, float] | None:
    """(first attempt sent, last item finished) over every shard's journal segments, epoch seconds."""
    from batcher._store import iter_merged_records, open_store

    first = last = None
    for rec in iter_merged_records(open_store(out)):
        if rec.get("t") == "attempt" and rec.get("at"):
            at = _ts(rec["at"])
            first = at if first is None else min(first, at)
        elif rec.get("t") == "item" and rec.get("finished"):
            at = _ts(rec["finished"])
            last = at if last is None else max(last, at)
    return (first, last) if first is not None and last is not None else None


def send_profile(out: str, capacity: int = RPM // 60) -> dict[str, float] | None:
    """Where the makespan goes, from every shard's journaled attempts (`at`, just before each send):
    `first_window` — when the capacity-th send left (the first window's share; late worker starts
    show here), `step` — the median time from a send to the one `capacity` sends later (1 s plus the
    limiter's margin and its reaction time), `last_send`, and `tail` — last send → last item record.
    Seconds from the first attempt."""
    from batcher._store import iter_merged_records, open_store

    sends: list[float] = []
    last = None
    for rec in iter_merged_records(open_store(out)):
        if rec.get("t") == "attempt" and rec.get("at"):
            sends.append(_ts(rec["at"]))
        elif rec.get("t") == "item" and rec.get("finished"):
            last = max(last or 0.0, _ts(rec["finished"]))
    if len(sends) <= capacity or last is None:
        return None
    sends.sort()
    t0 = sends[0]
    steps = sorted(sends[i + capacity] - sends[i] for i in range(len(sends) - capacity))
    return {"first_window": round(sends[capacity - 1] - t0, 3), "step": round(steps[len(steps) // 2], 3),
            "last_send": round(sends[-1] - t0, 3), "tail": round(last - sends[-1], 3)}


def limiter_trips(redis: RedisServer) -> int | None:
    """EVALSHA calls redis-server has served so far: the shared limiter's round trips, and the
    claims' scripts (one per item marks its claim done; renewals every 10 s are rare here)."""
    try:
        import redis as redis_py
    except ImportError:
        return None
    client = redis_py.Redis.from_url(redis.url, socket_timeout=5)
    try:
        stats = client.info("commandstats")
    except OSError:
        return None  # redis-server killed (row 4)
    finally:
        client.close()
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def read_manifest(out: str) -> dict[str, Any] | None:
    from batcher._store import open_store

    store = open_store(out)
    if not store.exists("manifest.json"):
        return None
    return json.loads(store.read("manifest.json"))


def check_output(out: str, expected_ids: set[str]) -> dict[str, Any]:
    """Every expected item done exactly once in manifest.json, and OUT/images == its files."""
    man = read_manifest(out)
    if man is None:
        return {"manifest": False, "exactly_once": False, "stray": None, "missing_files": None, "tmp": None}
    ids = Counter(it["id"] for it in man["items"])
    done = {it["id"] for it in man["items"] if it["status"] == "done"}
    files = {img["file"] for it in man["items"] if it["status"] == "done" for img in it["images"]}
    exactly_once = set(ids) == expected_ids and all(c == 1 for c in ids.values()) and done == expected_ids
    from batcher._store import open_store

    store = open_store(out)
    on_store = {f"images/{name}" for name, _ in store.list("images")}
    tmp = 0
    if not out.startswith("s3://"):
        tmp = sum(1 for p in Path(out, "images").iterdir() if p.name.startswith("."))
    short = sum(1 for it in man["items"] if it["status"] == "done" for img in it["images"]
                if store.size(img["file"]) != img["bytes"])
    return {"manifest": True, "summary": man["summary"], "exactly_once": exactly_once,
            "stray": len(on_store - files), "missing_files": len(files - on_store) + short, "tmp": tmp}


def work_journal(out: str, shard: int) -> Path:
    return Path(out) / ".work" / f"shard-{shard:05d}-of-{SHARDS:05d}" / "manifest.jsonl"


def in_flight(journal: Path) -> tuple[int, int]:
    """(items with an attempt journaled but no item record after it, items recorded done)."""
    open_attempts: set[str] = set()
    done: set[str] = set()
    with open(journal, "rb") as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn last line
            if rec.get("t") == "attempt":
                open_attempts.add(rec["id"])
            elif rec.get("t") == "item":
                open_attempts.discard(rec["id"])
                if rec.get("status") == "done":
                    done.add(rec["id"])
    return len(open_attempts), len(done)


def count_items(journal: Path) -> int:
    try:
        with open(journal, "rb") as fh:
            return sum(1 for line in fh if b'"t":"item"' in line)
    except FileNotFoundError:
        return 0


# -- the scenarios --------------------------------------------------------------------------

@dataclass
class Row:
    name: str
    done: int | None = None
    makespan: float | None = None
    wall: float | None = None
    ideal: float | None = None
    requests: int | None = None
    rate_limited: int | None = None
    max_window: int | None = None
    duplicates: int | None = None
    exits: str = ""
    notes: list[str] = field(default_factory=list)
    checks: list[tuple[str, bool]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # a row outside the main table (row 5)

    @property
    def efficiency(self) -> float | None:
        return self.ideal / self.makespan if self.ideal and self.makespan else None

    @property
    def pct_429(self) -> float | None:
        return 100.0 * self.rate_limited / max(1, self.requests) if self.requests is not None else None

    def table_row(self) -> list[Any]:
        pct = None if self.pct_429 is None else f"{self.pct_429:.2f}%"
        return [self.name, self.done, self.makespan, self.wall, self.ideal, self.efficiency, self.requests,
                self.rate_limited, pct, self.max_window, self.duplicates, self.exits]


HEADERS = ["row", "done", "makespan s", "wall s", "ideal s", "efficiency", "requests", "429s", "429 %",
           "max req/1s", "dup gens", "exit codes"]


def sim_args() -> list[str]:
    return ["--rpm", str(RPM), "--latency-ms", str(LATENCY_MS), "--jitter-ms", str(JITTER_MS)]


def fill_common(row: Row, sim: Simulator, out: str, workers: list[Worker]) -> dict[str, Any]:
    stats = sim_stats(sim)
    row.requests, row.rate_limited = stats["requests"], stats["rate_limited"]
    row.max_window, row.duplicates = stats["max_window_requests"], stats["duplicates"]
    span = journal_span(out)
    if span is not None:
        row.makespan = span[1] - span[0]
    row.wall = max(w.ended or time.time() for w in workers) - min(w.started for w in workers)
    row.exits = ",".join("K" if w.killed else str(w.returncode) for w in workers)
    for w in workers:
        if not w.killed and w.returncode not in (0,):
            row.notes.append(f"{w.name} exit {w.returncode}: {w.stderr_tail()!r}")
    return stats


def scenario_shared(name: str, work: Path, job: Path, ids: set[str], redis: RedisServer,
                    out: str | None = None, env_extra: dict[str, str] | None = None,
                    kill_redis_after: float | None = None, sim_extra: list[str] | None = None) -> Row:
    """Rows 1, 4, 7, 8 (and the S3 row): 4 workers, one limit; optionally redis-server killed, or
    the simulator advertising its limit another way (`sim_extra`: --limit-style bucket|minute)."""
    row = Row(name)
    out = out or str(work / "out")
    with Simulator(sim_args() + (sim_extra or []), work / "simulator.log") as sim:
        plan(job, out, work, env=_env(env_extra))
        workers = [Worker(f"w{i}", worker_cmd(job, out, f"{i}/{SHARDS}", sim, redis.url), work, env_extra=env_extra)
                   for i in range(SHARDS)]
        events = []
        if kill_redis_after is not None:
            t0 = time.monotonic()
            events.append((lambda: time.monotonic() - t0 >= kill_redis_after, redis.kill))
        trips = limiter_trips(redis)
        run_workers(workers, events=events)
        fill_common(row, sim, out, workers)
        after = limiter_trips(redis) if kill_redis_after is None else None
        if trips is not None and after is not None:
            row.notes.append(f"limiter round trips ≈ {after - trips - ITEMS} for {row.requests} requests "
                             f"(redis EVALSHA calls {after - trips}, less one per item: its claim marked done)")
        profile = send_profile(out)
        if profile is not None:
            row.notes.append(f"sends (s from the first): first window's {RPM // 60} out by {profile['first_window']}, "
                             f"median step to the send {RPM // 60} later {profile['step']}, last send "
                             f"{profile['last_send']}, last send → last item {profile['tail']}")
    row.ideal = ideal_makespan(ITEMS, ITEMS, LATENCY_MS / 1000.0, SHARDS * CONCURRENCY, rpm=RPM)
    check = check_output(out, ids)
    row.done = check.get("summary", {}).get("done")
    row.checks += [
        (f"{name}: all {ITEMS} done exactly once in manifest.json", check["exactly_once"]),
        (f"{name}: no stray, missing or temp file in OUT/images",
         check["stray"] == 0 and check["missing_files"] == 0 and check["tmp"] == 0),
    ]
    if kill_redis_after is None and out.startswith("s3://"):
        row.checks += [(f"{name}: zero duplicate generations", row.duplicates == 0)]
        row.notes.append("efficiency is informational here: moto's server shares the 2 cores with the workers")
    elif kill_redis_after is None:
        row.checks += [(f"{name}: efficiency ≥ 0.95", (row.efficiency or 0) >= 0.95),
                       (f"{name}: 429s ≤ 1%", (row.pct_429 or 0) <= 1.0),
                       (f"{name}: max req/1s ≤ {WINDOW_CAP:g}", (row.max_window or 0) <= WINDOW_CAP),
                       (f"{name}: zero duplicate generations", row.duplicates == 0)]
    else:
        row.notes.append(f"redis-server SIGKILLed {kill_redis_after:.0f}s after the workers were spawned")
        row.checks += [(f"{name}: the run finishes (every worker exit 0)", row.exits == "0,0,0,0"),
                       (f"{name}: 429s ≤ 2%", (row.pct_429 or 0) <= 2.0)]
    row.notes.append(f"check {check}")
    return row


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    env = batcher_env()
    env.update(extra or {})
    return env


CLAIM_TTL = 60.0  # what _Runner gives a claim with --timeout 20: max(60, 2 x (20 + 10 connect))


def scenario_kill(work: Path, job: Path, ids: set[str], redis: RedisServer, victim: int = 1,
                  after_items: int = 75) -> Row:
    """Row 2: kill -9 worker `victim` once it has recorded `after_items` items; rerun its index at
    once, and again once the killed worker's item claims have expired."""
    name = f"2. kill -9 worker {victim}, rerun {victim}/{SHARDS}"
    row = Row(name)
    out = str(work / "out")
    killed_at: dict[str, Any] = {}
    timeout = ("--timeout", "20")  # claims then live CLAIM_TTL s, not 620 s: the second rerun can come sooner
    with Simulator(sim_args(), work / "simulator.log") as sim:
        plan(job, out, work)
        workers = [Worker(f"w{i}", worker_cmd(job, out, f"{i}/{SHARDS}", sim, redis.url, *timeout), work)
                   for i in range(SHARDS)]
        journal = work_journal(out, victim)

        def kill() -> None:
            workers[victim].kill()
            killed_at["in_flight"], killed_at["done"] = in_flight(journal)
            killed_at["t"] = time.monotonic()
            killed_at["after_spawn_s"] = round(time.time() - workers[victim].started, 1)
            log(f"  SIGKILLed w{victim} (pid {workers[victim].proc.pid}) {killed_at['after_spawn_s']}s after spawn: "
                f"{killed_at['done']} done, {killed_at['in_flight']} in flight per its journal")

        run_workers(workers, events=[(lambda: count_items(journal) >= after_items, kill)])
        if not killed_at:
            row.notes.append(f"w{victim} ended before it had {after_items} items: nothing was killed")
        reruns = []
        for k, wait_for_ttl in enumerate((False, True)):
            if wait_for_ttl:
                if read_manifest(out) is not None:
                    break  # the first rerun finished the shard
                wait = killed_at.get("t", 0.0) + CLAIM_TTL + 1.0 - time.monotonic()
                log(f"  waiting {max(0.0, wait):.0f}s for w{victim}'s item claims to expire")
                time.sleep(max(0.0, wait))
            rerun = Worker(f"w{victim}-rerun{k + 1}",
                           worker_cmd(job, out, f"{victim}/{SHARDS}", sim, redis.url, *timeout), work)
            t_rerun = time.monotonic()
            run_workers([rerun])
            reruns.append(rerun)
            res = rerun.result() or {}
            row.notes.append(f"rerun {k + 1} of {victim}/{SHARDS} ({'after' if wait_for_ttl else 'before'} the "
                             f"killed worker's claims expired): {time.monotonic() - t_rerun:.1f}s, exit "
                             f"{rerun.returncode}, requests {res.get('requests')}, summary {res.get('summary')}, "
                             f"merged {res.get('merged')}")
        fill_common(row, sim, out, workers + reruns)
        row.makespan = row.wall = None  # they would time the wait for the claims, not the workers
    if read_manifest(out) is None:
        row.notes.append("no shard wrote manifest.json (no rerun committed)")
    check = check_output(out, ids)
    row.done = check.get("summary", {}).get("done")
    limit = killed_at.get("in_flight", 0)
    row.checks += [
        (f"{name}: all {ITEMS} done exactly once in manifest.json (written by the last shard to commit)",
         check["exactly_once"]),
        (f"{name}: the first rerun, right after the others ended, finishes the shard",
         bool(reruns) and (reruns[0].result() or {}).get("summary", {}).get("pending") == 0),
        (f"{name}: duplicate generations ≤ in flight at the kill ({limit})", (row.duplicates or 0) <= limit),
        (f"{name}: no stray, missing or temp file in OUT/images",
         check["stray"] == 0 and check["missing_files"] == 0 and check["tmp"] == 0),
    ]
    row.notes.append(f"at the kill {({k: v for k, v in killed_at.items() if k != 't'})}; check {check}")
    return row


def scenario_twins(work: Path, job: Path, ids: set[str], redis: RedisServer) -> Row:
    """Row 3: two workers on shard 0 at once, each with its own work folder (two nodes)."""
    from batcher._shard import ShardSpec

    name = "3. two workers on 0/4 at once"
    row = Row(name)
    out = str(work / "out")
    shard = ShardSpec(0, SHARDS)
    mine = {i for i in ids if shard.contains(i)}
    with Simulator(sim_args(), work / "simulator.log") as sim:
        plan(job, out, work)
        workers = [Worker(f"twin{k}", worker_cmd(job, out, f"0/{SHARDS}", sim, redis.url,
                                                 "--work-dir", str(work / f"node{k}")), work) for k in range(2)]
        run_workers(workers)
        stats = fill_common(row, sim, out, workers)
    results = [w.result() or {} for w in workers]
    row.notes.append("twins' summaries: " + "; ".join(f"{w.name} {r.get('summary')} requests {r.get('requests')}"
                                                    for w, r in zip(workers, results)))
    # what both recorded, merged: every item of shard 0 done once, by one of them
    from batcher._store import merged_journal, open_store

    with merged_journal(open_store(out)) as journal:
        done = {i for i, e in journal.entries.items() if e.status == "done"}
    row.done = len(done)
    gens = stats.get("generations", {})
    row.checks += [(f"{name}: zero duplicate generations", stats["duplicates"] == 0),
                   (f"{name}: every item of shard 0 ({len(mine)}) generated and recorded done",
                    done == mine and len(gens) == len(mine))]
    return row


def scenario_latency_imports(work: Path, job: Path, redis: RedisServer) -> Row:
    """Row 5: p99 of one limiter acquire; a local run imports neither redis nor s3fs."""
    from shared_limit import bench_latency

    row = Row("5. acquire latency, local imports")
    lat = bench_latency(redis, 5000)
    row.extra = {"acquires": lat["acquires"], "p50 ms": lat["p50_ms"], "p99 ms": lat["p99_ms"],
                 "max ms": lat["max_ms"]}
    small = work / "small.jsonl"
    prompts = base_prompts()
    write_jsonl_job(small, ({"id": f"item-{i:06d}", "prompt": unique_prompt(prompts, i), "model": MODEL,
                             "size": "64x64"} for i in range(20)))
    with Simulator(sim_args(), work / "simulator.log") as sim:
        cmd = [sys.executable, "-X", "importtime", "-m", "batcher", "run", str(small), "--out", str(work / "local"),
               "--base-url", sim.base_url, "--rpm", str(RPM), "--quiet", "--json"]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=str(work), env=batcher_env(), timeout=120)
    modules = [m.group(1).strip() for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$",
                                                        done.stderr, re.M)]
    tops = {m.split(".")[0] for m in modules}
    heavy = sorted(tops & {"redis", "s3fs", "fsspec", "aiobotocore", "botocore", "boto3", "gcsfs"})
    row.extra.update({"local run exit": done.returncode, "modules imported": len(modules),
                      "redis/s3fs/fsspec/botocore among them": ", ".join(heavy) or "none"})
    row.exits = str(done.returncode)
    row.checks += [("5. limiter acquire p99 ≤ 5 ms", lat["p99_ms"] <= 5.0),
                   ("5. a local run imports neither redis nor s3fs",
                    done.returncode == 0 and len(modules) > 50 and not ({"redis", "s3fs"} & tops))]
    return row


class MotoS3:
    """A moto S3 server in its own process (127.0.0.1, free port), stopped by its PID."""

    def __init__(self, workdir: Path) -> None:
        from redis_helpers import free_port

        self.port = free_port()
        self._log = open(workdir / "moto.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url + "/moto-api/", timeout=1).close()
                return
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError("moto server did not start")

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
                "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_ENDPOINT_URL": self.url,
                "AWS_ENDPOINT_URL_S3": self.url}

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # this PID only
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()


def scenario_s3(work: Path, job: Path, ids: set[str], redis: RedisServer) -> Row:
    moto = MotoS3(work)
    try:
        env = moto.env()
        saved = dict(os.environ)
        os.environ.update(env)  # this process reads the store too (journal span, manifest, listing)
        try:
            import s3fs

            s3fs.S3FileSystem(client_kwargs={"endpoint_url": moto.url}, skip_instance_cache=True).mkdir("bench")
            env["XDG_CACHE_HOME"] = str(work / "cache")  # the workers' local work folders
            return scenario_shared("6. 4 workers, OUT on moto S3", work, job, ids, redis, out="s3://bench/run",
                                   env_extra=env)
        finally:
            os.environ.clear()
            os.environ.update(saved)
    finally:
        moto.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,3,4,5", help="comma-separated rows (1-5, 7, 8)")
    ap.add_argument("--s3", action="store_true", help="also row 6: row 1 with OUT on a moto S3 server")
    ap.add_argument("--kill-redis-after", type=float, default=6.0,
                    help="row 4: seconds after spawning the workers to SIGKILL redis-server")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (outputs, logs)")
    ap.add_argument("--concurrency", type=int, default=CONCURRENCY, help="per worker (default 50)")
    args = ap.parse_args()
    if REDIS_SERVER is None:
        raise SystemExit("redis-server not found: apt-get install -y redis-server")
    rows_wanted = {int(x) for x in args.rows.split(",") if x.strip()}
    globals()["CONCURRENCY"] = args.concurrency

    tmp = Path(tempfile.mkdtemp(prefix="batcher-bench-shards-"))
    started = time.monotonic()
    prompts = base_prompts()
    job = tmp / "job.jsonl"
    write_jsonl_job(job, ({"id": f"item-{i:06d}", "prompt": unique_prompt(prompts, i), "model": MODEL,
                           "size": "64x64"} for i in range(ITEMS)))
    ids = {f"item-{i:06d}" for i in range(ITEMS)}
    rows: list[Row] = []
    redis = RedisServer(tmp).start()
    try:
        def work(tag: str) -> Path:
            path = tmp / tag
            path.mkdir()
            return path

        def step(num: int, fn: Callable[[], Row]) -> None:
            if num not in rows_wanted:
                return
            t0 = time.monotonic()
            log(f"[{time.monotonic() - started:6.1f}s] row {num} …")
            rows.append(fn())
            log(f"[{time.monotonic() - started:6.1f}s] row {num} done in {time.monotonic() - t0:.1f}s")

        step(5, lambda: scenario_latency_imports(work("r5"), job, redis))
        step(1, lambda: scenario_shared("1. 4 workers, shared limit", work("r1"), job, ids, redis))
        step(2, lambda: scenario_kill(work("r2"), job, ids, redis))
        step(3, lambda: scenario_twins(work("r3"), job, ids, redis))
        if args.s3:
            rows_wanted.add(6)
            step(6, lambda: scenario_s3(work("r6"), job, ids, redis))
        step(4, lambda: scenario_shared("4. redis-server killed mid-run", work("r4"), job, ids, redis,
                                        kill_redis_after=args.kill_redis_after))
        step(7, lambda: scenario_shared("7. row 1, token-bucket headers", work("r7"), job, ids, redis,
                                        sim_extra=["--limit-style", "bucket"]))
        step(8, lambda: scenario_shared("8. row 1, minute headers", work("r8"), job, ids, redis,
                                        sim_extra=["--limit-style", "minute"]))
    finally:
        redis.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    order = {r.name.split(".")[0]: r for r in rows}
    rows = [order[k] for k in sorted(order, key=int)]
    print("## Sharded workers\n")
    print(f"Command: `{command_line()}` (batcher {batcher_revision()}); total wall time "
          f"{time.monotonic() - started:.0f}s.\n")
    print(f"{ITEMS} items, `plan --shards {SHARDS}`; each worker `batcher run JOB --out OUT --shard I/{SHARDS} "
          f"--limiter redis://… --rpm {RPM} --concurrency {CONCURRENCY}`; simulator `--rpm {RPM}` (50 per 1 s "
          f"window), latency {LATENCY_MS}±{JITTER_MS} ms; OUT a local temp folder unless noted.\n")
    print(markdown_table(HEADERS, [r.table_row() for r in rows if not r.extra]))
    for r in rows:
        if r.extra:
            print(f"\n{r.name}\n")
            print(markdown_table(list(r.extra), [list(r.extra.values())]))
    print("\nmakespan: first journaled attempt → last item record (merged segments); wall: first worker spawn → "
          "last worker exit; exit codes per worker in start order (K: SIGKILLed by the bench).\n")
    for r in rows:
        for note in r.notes:
            print(f"- {r.name}: {note}")
    print()
    checks = [c for r in rows for c in r.checks]
    for name, ok in checks:
        print(f"- {'PASS' if ok else 'FAIL'} {name}")
    if args.keep:
        print(f"\nkept: {tmp}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
