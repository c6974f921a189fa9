"""One limit shared by several worker processes through Redis (batcher._redis.SharedRateLimiter).

    .venv/bin/python bench/shared_limit.py            # (a) latency, (b) 4 workers, (c) Redis killed mid-run
    .venv/bin/python bench/shared_limit.py --acquires 20000 --requests 1200

(a) acquire latency p50/p99 over --acquires sequential acquires against a local redis-server
    (no limit in force, so every acquire is exactly one round trip).
(b) 4 worker OS processes share one `--rpm 3000` simulator endpoint (50 per 1 s window), 600
    requests in all, each worker a SharedRateLimiter + batcher._client.ImagesClient, 32 in flight.
(c) (b) again, with redis-server SIGKILLed (by its PID) --kill-after seconds into the run.
(d) one worker alone on the 3000-rpm limit (the last shard still running), 32 acquirers each
    holding its slot 300 ms, every round trip --lone-rtt-ms longer (a loaded machine): its
    steady grants per second (a process's queue is granted in one trip, so ~50, not 1/RTT).
    `--only-lone` runs (d) alone (a few seconds).

Everything is on 127.0.0.1; the simulator and redis-server are started here and stopped by PID.
Needs `redis-server` on PATH and the `redis` extra.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _harness import ROOT, Simulator, batcher_env, batcher_revision, command_line, markdown_table  # noqa: E402
from rate import ideal_makespan  # noqa: E402
from redis_helpers import REDIS_SERVER, RedisServer  # noqa: E402

RPM = 3000
LATENCY_MS, JITTER_MS = 300, 100
WORKERS = 4
IN_FLIGHT = 32
MODEL = "grok-imagine"

# One worker process: its share of the requests, a shared limiter, the real HTTP client.
WORKER = r"""
import json, sys, time, anyio
from batcher._client import ImagesClient
from batcher._exceptions import RequestError
from batcher._redis import SharedRateLimiter, connect, endpoint_key

base_url, redis_url, index, count, in_flight, start_at = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6]), float(sys.argv[6])
KEY = "sk-bench-not-a-real-key"

async def main():
    limiter = SharedRateLimiter(connect(redis_url, timeout=0.5), endpoint_key(base_url, KEY, "grok-imagine"),
                                rpm=3000, workers=4)
    stats = {"done": 0, "failed": 0, "attempts": 0, "429": 0, "first_send": None, "last_answer": None}
    queue = list(range(index, index + count))
    async with ImagesClient(base_url, KEY, max_connections=in_flight) as client:
        await anyio.sleep(max(0.0, start_at - time.time()))  # a common start line for all workers

        async def worker():
            while queue:
                i = queue.pop()
                body = {"model": "grok-imagine", "prompt": f"shared limit bench #{i}", "size": "64x64",
                        "response_format": "b64_json"}
                for attempt in range(8):
                    permit = await limiter.acquire(1)
                    permit.sent()
                    stats["attempts"] += 1
                    stats["first_send"] = stats["first_send"] or time.time()
                    try:
                        await client.generate(body)
                    except RequestError as exc:
                        if exc.status == 429:
                            stats["429"] += 1
                            permit.refund()
                            limiter.on_rate_limited(exc.retry_after, exc.type or "requests")
                            continue
                        if exc.kind == "transient":
                            continue
                        stats["failed"] += 1
                        break
                    else:
                        stats["done"] += 1
                        limiter.observe_headers({})
                        break
                else:
                    stats["failed"] += 1
                stats["last_answer"] = time.time()

        async with anyio.create_task_group() as tg:
            for _ in range(in_flight):
                tg.start_soon(worker)
    stats["outages"] = limiter.outages
    stats["round_trips"] = limiter.round_trips
    print(json.dumps(stats))

anyio.run(main)
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def bench_latency(redis: RedisServer, acquires: int) -> dict:
    import anyio

    from batcher._redis import SharedRateLimiter, connect

    async def main() -> list[float]:
        client = connect(redis.url)
        limiter = SharedRateLimiter(client, "latency-bench")  # no limit: every acquire is one trip
        for _ in range(200):  # warm-up: connection made, script loaded
            await limiter.acquire()
        samples = []
        for _ in range(acquires):
            t0 = time.perf_counter()
            await limiter.acquire()
            samples.append(time.perf_counter() - t0)
        await client.aclose()
        return samples

    samples = sorted(anyio.run(main))
    pick = lambda q: samples[min(len(samples) - 1, int(q * len(samples)))] * 1000.0  # noqa: E731
    return {"acquires": len(samples), "p50_ms": pick(0.50), "p99_ms": pick(0.99), "max_ms": samples[-1] * 1000.0,
            "mean_ms": statistics.fmean(samples) * 1000.0}


def bench_lone(redis: RedisServer, rtt_s: float, grants: int = 320, in_flight: int = 32) -> dict:
    """(d) One worker alone on a 3000-rpm limit (the last shard still running) whose every round
    trip to Redis takes `rtt_s` longer (a loaded machine): its steady grants per second."""
    import anyio

    from batcher._redis import SharedRateLimiter, connect

    async def main() -> dict:
        client = connect(redis.url)
        limiter = SharedRateLimiter(client, f"lone-{rtt_s}", rpm=RPM, workers=WORKERS)
        trip = limiter._trip

        async def slow_trip(*args: Any, **kw: Any) -> Any:
            await anyio.sleep(rtt_s)
            return await trip(*args, **kw)

        limiter._trip = slow_trip  # type: ignore[method-assign]
        times: list[float] = []

        async def worker(n: int) -> None:
            for _ in range(n):
                (await limiter.acquire()).sent()
                times.append(time.perf_counter())
                await anyio.sleep(LATENCY_MS / 1000.0)  # the request in flight holds this slot

        async with anyio.create_task_group() as tg:
            for _ in range(in_flight):
                tg.start_soon(worker, grants // in_flight)
        await client.aclose()
        times.sort()
        window = RPM // 60  # after the first window's burst, the steady rate
        return {"rtt_ms": rtt_s * 1000.0, "grants": len(times),
                "steady_per_s": (len(times) - window - 1) / (times[-1] - times[window]),
                "round_trips": limiter.round_trips}

    return anyio.run(main)


def bench_workers(redis: RedisServer, workdir: Path, requests: int, kill_after: float | None) -> dict:
    tag = "killed" if kill_after is not None else "shared"
    with Simulator(["--rpm", str(RPM), "--latency-ms", str(LATENCY_MS), "--jitter-ms", str(JITTER_MS)],
                   workdir / f"sim-{tag}.log") as sim:
        per_worker = requests // WORKERS
        start_at = time.time() + 3.0  # every worker imported, connected and waiting by then
        procs = [subprocess.Popen([sys.executable, "-c", WORKER, sim.base_url, redis.url, str(i * per_worker),
                                   str(per_worker), str(IN_FLIGHT), f"{start_at:.3f}"],
                                  stdout=subprocess.PIPE, stderr=open(workdir / f"{tag}-{i}.stderr", "wb"),
                                  text=True, cwd=ROOT, env=batcher_env())
                 for i in range(WORKERS)]
        killer = None
        if kill_after is not None:
            killer = threading.Timer(max(0.0, start_at + kill_after - time.time()), redis.kill)
            killer.start()
        results = []
        for proc in procs:
            try:
                out, _ = proc.communicate(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()  # this worker's PID only
                out, _ = proc.communicate(timeout=10)
            results.append(json.loads(out.strip().splitlines()[-1]) if proc.returncode == 0 and out.strip() else None)
        if killer is not None:
            killer.join()
        stats = sim.stats()
    if any(r is None for r in results):
        return {"scenario": tag, "error": f"worker failed; see {workdir}/{tag}-*.stderr"}
    first = min(r["first_send"] for r in results)
    last = max(r["last_answer"] for r in results)
    makespan = last - first
    ideal = ideal_makespan(requests, requests, LATENCY_MS / 1000.0, WORKERS * IN_FLIGHT, rpm=RPM)
    sim_requests = stats.get("requests", 0)
    return {
        "scenario": tag,
        "done": sum(r["done"] for r in results), "failed": sum(r["failed"] for r in results),
        "makespan_s": makespan, "ideal_s": ideal, "efficiency": ideal / makespan,
        "requests": sim_requests, "rate_limited": stats.get("rate_limited", 0),
        "rate_limited_pct": 100.0 * stats.get("rate_limited", 0) / max(1, sim_requests),
        "max_window_requests": stats.get("max_window_requests"),
        "outages": sum(r["outages"] for r in results), "round_trips": sum(r["round_trips"] for r in results),
        "sim": stats,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--acquires", type=int, default=5000)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--kill-after", type=float, default=5.0, help="seconds into run (c) to kill redis-server")
    parser.add_argument("--keep", action="store_true", help="keep logs in the temp folder")
    parser.add_argument("--lone-rtt-ms", default="0,25,40",
                        help="(d) a lone worker's grants per second with each added round-trip time")
    parser.add_argument("--only-lone", action="store_true", help="run (d) only")
    args = parser.parse_args()
    if REDIS_SERVER is None:
        raise SystemExit("redis-server not found: apt-get install -y redis-server")
    workdir = Path(tempfile.mkdtemp(prefix="bench-shared-"))
    redis = RedisServer(workdir).start()
    try:
        lone = []
        for rtt in (float(x) / 1000.0 for x in args.lone_rtt_ms.split(",") if x.strip()):
            log(f"(d) a lone worker, round trips {rtt * 1000:.0f} ms longer")
            lone.append(bench_lone(redis, rtt))
        if args.only_lone:
            print(markdown_table(["(d) added RTT ms", "grants", "steady grants/s", "round trips"],
                                 [[d["rtt_ms"], d["grants"], d["steady_per_s"], d["round_trips"]] for d in lone]))
            return 0
        log(f"(a) {args.acquires} acquires against redis-server pid {redis.pid} on {redis.url}")
        latency = bench_latency(redis, args.acquires)
        log("(b) 4 workers sharing one 3000-rpm endpoint")
        shared = bench_workers(redis, workdir, args.requests, None)
        log(f"(c) the same, redis-server killed {args.kill_after:.0f} s in")
        killed = bench_workers(redis, workdir, args.requests, args.kill_after)
    finally:
        redis.stop()
    if args.keep:
        log(f"logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)

    print("## Shared limit through Redis\n")
    print(f"`{command_line()}` — batcher {batcher_revision()}\n")
    print(markdown_table(["acquires", "p50 ms", "p99 ms", "max ms", "mean ms"],
                         [[latency["acquires"], latency["p50_ms"], latency["p99_ms"], latency["max_ms"],
                           latency["mean_ms"]]]))
    print()
    rows = []
    for run, name in ((shared, "(b) 4 workers, shared limit"), (killed, "(c) redis-server killed mid-run")):
        if "error" in run:
            rows.append([name, run["error"]] + [None] * 9)
            continue
        rows.append([name, run["done"], run["failed"], run["makespan_s"], run["ideal_s"], run["efficiency"],
                     run["requests"], run["rate_limited"], f"{run['rate_limited_pct']:.2f}%",
                     run["max_window_requests"], run["outages"]])
    print(markdown_table(["run", "done", "failed", "makespan s", "ideal s", "efficiency", "requests", "429s",
                          "429 %", "max req/1s", "outages"], rows))
    print()
    print(markdown_table(["(d) added RTT ms", "grants", "steady grants/s", "round trips"],
                         [[d["rtt_ms"], d["grants"], d["steady_per_s"], d["round_trips"]] for d in lone]))
    print()
    print(f"Simulator: --rpm {RPM} (50 per 1 s), latency {LATENCY_MS}±{JITTER_MS} ms; {WORKERS} worker processes, "
          f"{IN_FLIGHT} in flight each, {args.requests} requests in all. Ideal = (ceil(600/50) − 1)·1 s + 0.3 s.")
    checks = [("(a) p99 ≤ 5 ms", latency["p99_ms"] <= 5.0)]
    checks += [(f"(d) a lone worker with {d['rtt_ms']:.0f} ms round trips holds ≥ 47 grants/s of 50",
                d["steady_per_s"] >= 47.0) for d in lone]
    if "error" not in shared:
        checks += [("(b) efficiency ≥ 0.95", shared["efficiency"] >= 0.95),
                   ("(b) 429s ≤ 1%", shared["rate_limited_pct"] <= 1.0),
                   ("(b) max req/1s ≤ 55", (shared["max_window_requests"] or 0) <= 1.1 * RPM / 60),
                   ("(b) all done", shared["done"] == args.requests)]
    if "error" not in killed:
        checks += [("(c) finishes, all done", killed["done"] == args.requests),
                   ("(c) 429s ≤ 2%", killed["rate_limited_pct"] <= 2.0),
                   ("(c) fallback engaged", killed["outages"] >= 1)]
    print()
    for name, ok in checks:
        print(f"- {'PASS' if ok else 'FAIL'} {name}")
    return 0 if all(ok for _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
