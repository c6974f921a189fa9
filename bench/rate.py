"""batcher vs a hand-written openai-SDK baseline, scenario by scenario, one Markdown table.

    .venv/bin/python bench/rate.py                       # scenarios 1-7, full size
    .venv/bin/python bench/rate.py --scenarios 1,8,9,10,11,12,13,14 --clients batcher   # the rate engine's rows
    .venv/bin/python bench/rate.py --quick               # item counts / 4
    .venv/bin/python bench/rate.py --scenarios 1,5,7     # a subset

Each client runs as its own process against its own simulator process (127.0.0.1 only);
CPU seconds and peak RSS are that client process's own (os.wait4). See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (  # noqa: E402
    ClientRun,
    Simulator,
    base_prompts,
    batcher_env,
    batcher_revision,
    command_line,
    markdown_table,
    run_client,
    unique_prompt,
    write_jsonl_job,
)

BENCH = Path(__file__).resolve().parent
CONCURRENCY = 64
MODEL = "grok-imagine"


def ideal_makespan(requests: int, images: int, latency: float, concurrency: int, *,
                   rpm: float | None = None, ipm: float | None = None) -> float:
    """The best makespan any client could reach, in seconds.

    A per-minute limit L is enforced (as the simulator and real providers do) as a sliding
    window of C = max(1, round(L/60)) units per W = 60*C/L seconds: C units may go at once,
    each further C units wait W more, and the last answer arrives one mean latency after the
    last send:  (ceil(units / C) - 1) * W + latency,  where units = requests for an rpm limit
    and images for an ipm limit. Concurrency alone bounds it by latency * ceil(requests /
    concurrency) (that is also the bound with no limit); the larger bound wins.
    """
    bounds = [latency * math.ceil(requests / concurrency)]
    for limit, units in ((rpm, requests), (ipm, images)):
        if limit:
            c = max(1, round(limit / 60.0))
            w = 60.0 * c / limit
            bounds.append((math.ceil(units / c) - 1) * w + latency)
    return max(bounds)


@dataclass
class Scenario:
    num: int
    name: str
    items: int
    sim_args: list[str]
    latency: float  # mean latency in seconds (jitter is symmetric)
    batcher_args: list[str] = field(default_factory=list)
    baseline_args: list[str] = field(default_factory=list)
    size: str = "64x64"
    n_cycle: tuple[int, ...] = (1,)
    policy_every: int | None = None  # every k-th item's prompt contains the policy word
    rpm: float | None = None  # the limit the simulator enforces (for the ideal makespan)
    ipm: float | None = None
    quota_images: int | None = None
    concurrency: int = CONCURRENCY
    lost_s_allowed: float | None = None  # a target on makespan - ideal instead of efficiency

    def ns(self) -> list[int]:
        return [self.n_cycle[i % len(self.n_cycle)] for i in range(self.items)]


def scenarios(scale: float) -> dict[int, Scenario]:
    def k(n: int) -> int:
        return max(8, int(round(n * scale)))

    lat = ["--latency-ms", "300", "--jitter-ms", "100"]
    return {s.num: s for s in [
        Scenario(1, "limit given (rpm 3000)", k(600), ["--rpm", "3000", *lat], 0.3,
                 batcher_args=["--rpm", "3000"], rpm=3000),
        Scenario(2, "limit advertised (x-ratelimit-*)", k(600), ["--rpm", "3000", *lat], 0.3, rpm=3000),
        Scenario(3, "limit hidden (learn from 429s)", k(600), ["--rpm", "3000", *lat, "--hide-limits"], 0.3,
                 rpm=3000),
        Scenario(4, "images/min (ipm 3000, n=1..4)", k(400), ["--ipm", "3000", *lat], 0.3,
                 batcher_args=["--ipm", "3000"], n_cycle=(1, 2, 3, 4), ipm=3000),
        Scenario(5, "faults (5xx, drops, malformed, hangs, policy)", k(600),
                 [*lat, "--fail-rate", "0.05", "--drop-rate", "0.02", "--malformed-rate", "0.02",
                  "--hang-rate", "0.01", "--seed", "1"], 0.3,
                 batcher_args=["--timeout", "3", "--max-attempts", "8"], baseline_args=["--timeout", "3"],
                 policy_every=100),
        Scenario(6, "quota (100 images)", k(600), ["--quota-images", "100", *lat], 0.3, quota_images=100),
        Scenario(7, "throughput (256 KiB images)", k(1500), ["--latency-ms", "20", "--image-bytes", "262144"],
                 0.02, size="256x256"),
        # the rate engine against servers that tell their limit in other ways (issue 12)
        Scenario(8, "limit given, token-bucket headers (1 s)", k(600),
                 ["--rpm", "3000", "--limit-style", "bucket", *lat], 0.3, batcher_args=["--rpm", "3000"], rpm=3000),
        Scenario(9, "limit given, minute headers (OpenAI)", k(600),
                 ["--rpm", "3000", "--limit-style", "minute", *lat], 0.3, batcher_args=["--rpm", "3000"], rpm=3000),
        Scenario(10, "limit given, no headers", k(600), ["--rpm", "3000", "--hide-limits", *lat], 0.3,
                 batcher_args=["--rpm", "3000"], rpm=3000),
        Scenario(11, "limit advertised, token bucket", k(600), ["--rpm", "3000", "--limit-style", "bucket", *lat],
                 0.3, rpm=3000),
        Scenario(12, "ipm given, token-bucket headers, n=1..4", k(400),
                 ["--ipm", "3000", "--limit-style", "bucket", *lat], 0.3, batcher_args=["--ipm", "3000"],
                 n_cycle=(1, 2, 3, 4), ipm=3000),
        Scenario(13, "a lone bare 429 (Retry-After: 1)", 300, ["--latency-ms", "50", "--lone-429-at", "40"], 0.05,
                 concurrency=16, lost_s_allowed=1.0 + 1.0),
        Scenario(14, "13 without the 429 (its control)", 300, ["--latency-ms", "50"], 0.05, concurrency=16),
    ]}


def make_job(sc: Scenario, path: Path) -> None:
    prompts = base_prompts()

    def items():
        for i, n in enumerate(sc.ns()):
            prompt = unique_prompt(prompts, i)
            if sc.policy_every and i % sc.policy_every == sc.policy_every // 2:
                prompt = f"{prompts[i % len(prompts)]}, forbidden #{i}"  # the simulator's policy word
            yield {"id": f"item-{i:06d}", "prompt": prompt, "model": MODEL, "size": sc.size, "n": n}

    write_jsonl_job(path, items())


def run_one(sc: Scenario, client: str, job: Path, work: Path, timeout: float) -> dict[str, Any]:
    cdir = work / client
    cdir.mkdir()
    out = cdir / "out"
    with Simulator(sc.sim_args, cdir / "simulator.log") as sim:
        if client == "batcher":
            cmd = [sys.executable, "-m", "batcher", "run", str(job), "--out", str(out), "--base-url", sim.base_url,
                   "--concurrency", str(sc.concurrency), "--quiet", "--json", *sc.batcher_args]
        else:
            cmd = [sys.executable, str(BENCH / "baseline_openai.py"), "--job", str(job), "--out", str(out),
                   "--base-url", sim.base_url, "--concurrency", str(sc.concurrency), *sc.baseline_args]
        run = run_client(cmd, timeout=timeout, workdir=cdir, env=batcher_env(), tag=client)
        time.sleep(0.2)  # let answers already on the wire be counted
        stats = sim.stats()
    return summarise(sc, client, run, stats, out)


def summarise(sc: Scenario, client: str, run: ClientRun, stats: dict[str, Any], out: Path) -> dict[str, Any]:
    report = run.last_json() or {}
    row: dict[str, Any] = {"scenario": sc.num, "client": client, "killed": run.killed, "exit": run.returncode,
                           "cpu": run.cpu, "rss": run.maxrss_mb, "wall": run.wall, "stats": stats}
    if client == "batcher":
        summary = report.get("summary") or {}
        row.update(done=summary.get("done"), failed=summary.get("failed"), pending=summary.get("pending"),
                   images=report.get("images"), makespan=report.get("elapsed"))
        reasons: Counter[str] = Counter()
        manifest = out / "manifest.json"
        if manifest.exists():
            for item in json.loads(manifest.read_text("utf-8")).get("items", []):
                if item.get("status") == "failed":
                    err = item.get("error") or {}
                    reasons[str(err.get("code") or err.get("kind") or "?")] += 1
        row["reasons"] = dict(reasons)
        if report.get("error"):
            row["fatal"] = report["error"].get("code")
    else:
        row.update(done=report.get("done"), failed=report.get("failed"), pending=None,
                   images=report.get("images"), makespan=report.get("elapsed"), reasons=report.get("errors") or {})
    if run.killed or row["makespan"] is None:
        row["makespan"] = run.wall  # killed or no report: the process's wall time is all we know
    if not report:
        row["stderr"] = run.stderr_tail[-400:]
    ns = sc.ns()
    reachable = sc.items
    if sc.quota_images is not None:  # only the items the quota pays for can ever be done
        reachable, paid = 0, 0
        for n in ns:
            if paid + n > sc.quota_images:
                break
            paid += n
            reachable += 1
    row["reachable"] = reachable
    row["ideal"] = ideal_makespan(reachable, sum(ns[:reachable]), sc.latency, sc.concurrency, rpm=sc.rpm, ipm=sc.ipm)
    row["efficiency"] = row["ideal"] / row["makespan"] if row["makespan"] else None
    row["r429"] = stats.get("rate_limited", 0) + stats.get("quota_rejected", 0)
    imgs = row.get("images") or 0
    row["img_s"] = imgs / row["makespan"] if row["makespan"] and imgs else None
    row["cpu_per_1k"] = run.cpu / imgs * 1000 if imgs else None
    return row


HEADERS = ["#", "scenario", "client", "done", "failed", "makespan s", "ideal s", "efficiency", "429s",
           "requests", "dup gens", "max req/1s", "client CPU s", "peak RSS MB", "img/s", "CPU s/1k img", "exit"]


def table_row(sc: Scenario, r: dict[str, Any]) -> list[Any]:
    s = r["stats"]
    exit_text = "KILLED" if r["killed"] else r["exit"]
    eff = r["efficiency"]
    if eff is not None and (r["done"] or 0) < r["reachable"]:
        eff = f"{eff:.3f}*"  # a partial job measured against the whole job's ideal
    return [sc.num, sc.name, r["client"], r["done"], r["failed"], r["makespan"], r["ideal"], eff,
            r["r429"], s.get("requests"), s.get("duplicates"), s.get("max_window_requests"), r["cpu"], r["rss"],
            r["img_s"], r["cpu_per_1k"], exit_text]


def checks(sc: Scenario, rows: dict[str, dict[str, Any]]) -> list[str]:
    """The brief's targets and invariants, as PASS/FAIL lines."""
    out: list[str] = []
    b, base = rows.get("batcher"), rows.get("baseline")

    def mark(ok: bool, text: str) -> None:
        out.append(f"- [{'PASS' if ok else 'FAIL'}] scenario {sc.num}: {text}")

    if b is None:
        return out
    s = b["stats"]
    if sc.num in (1, 8, 9, 10, 12):
        mark((b["efficiency"] or 0) >= 0.97, f"batcher efficiency {b['efficiency']:.3f} ≥ 0.97")
        req = max(s.get("requests", 0), 1)
        mark(b["r429"] <= 0.01 * req, f"batcher 429s {b['r429']} ≤ 1% of {req} requests")
    if sc.lost_s_allowed is not None:
        lost = b["makespan"] - b["ideal"]
        mark(lost <= sc.lost_s_allowed, f"batcher lost {lost:.2f} s to the 429 ≤ Retry-After + 1 s "
                                        f"= {sc.lost_s_allowed:g} s (makespan {b['makespan']:.2f} s, "
                                        f"ideal {b['ideal']:.2f} s, 429s {b['r429']})")
    if sc.num == 3:
        mark((b["efficiency"] or 0) >= 0.85, f"batcher efficiency {b['efficiency']:.3f} ≥ 0.85")
    if sc.num in (1, 2, 3, 4, 7, 8, 9, 10, 11, 12, 13, 14):
        mark(b["done"] == sc.items, f"batcher done {b['done']} == {sc.items} items")
    if sc.num == 5:
        for name, r in rows.items():
            total = (r["done"] or 0) + (r["failed"] or 0)
            mark(total == sc.items, f"{name}: none lost, done+failed = {r['done']}+{r['failed']} = {total} "
                                    f"== {sc.items}; failure reasons {r['reasons']}")
        mark(s.get("duplicates", 0) == 0, f"batcher duplicate generations {s.get('duplicates')} == 0")
    if sc.num == 6:
        mark(s.get("quota_rejected", 0) <= CONCURRENCY,
             f"batcher requests after the first quota answer {s.get('quota_rejected')} ≤ {CONCURRENCY}")
        mark(b["exit"] == 4, f"batcher exit code {b['exit']} == 4")
        if base is not None:
            out.append(f"- [info] scenario 6: baseline requests after the first quota answer "
                       f"{base['stats'].get('quota_rejected')}")
    if sc.num == 7 and base is not None and b["img_s"] and base["img_s"]:
        ratio = b["img_s"] / base["img_s"]
        mark(ratio >= 2.0, f"batcher images/s {b['img_s']:.1f} ≥ 2× baseline {base['img_s']:.1f} (×{ratio:.2f})")
        cpu_ratio = b["cpu_per_1k"] / base["cpu_per_1k"]
        mark(cpu_ratio <= 0.5, f"batcher CPU/1k images {b['cpu_per_1k']:.2f} s ≤ half of baseline "
                               f"{base['cpu_per_1k']:.2f} s (×{cpu_ratio:.2f})")
    for name, r in rows.items():
        if r["killed"]:
            mark(False, f"{name} was killed at the client timeout")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default="1,2,3,4,5,6,7", help="comma-separated scenario numbers (1-14)")
    ap.add_argument("--quick", action="store_true", help="item counts scaled down ~4x")
    ap.add_argument("--clients", default="batcher,baseline", help="batcher, baseline or both")
    ap.add_argument("--client-timeout", type=float, default=300.0,
                    help="seconds one client run may take before it is killed (default 300)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder (job files, outputs, logs)")
    ap.add_argument("--save", metavar="FILE", help="also write every row's raw numbers to FILE as JSON")
    args = ap.parse_args()

    wanted = [int(x) for x in args.scenarios.split(",") if x.strip()]
    clients = [c.strip() for c in args.clients.split(",") if c.strip()]
    all_sc = scenarios(0.25 if args.quick else 1.0)
    unknown = [n for n in wanted if n not in all_sc]
    if unknown or not set(clients) <= {"batcher", "baseline"}:
        ap.error(f"unknown scenario(s) {unknown} or client(s) {clients}")

    tmp = Path(tempfile.mkdtemp(prefix="batcher-bench-rate-"))
    started = time.monotonic()
    table: list[list[Any]] = []
    notes: list[str] = []
    results: list[dict[str, Any]] = []
    by_num: dict[int, dict[str, dict[str, Any]]] = {}
    try:
        for num in wanted:
            sc = all_sc[num]
            work = tmp / f"s{num}"
            work.mkdir()
            job = work / "job.jsonl"
            make_job(sc, job)
            rows: dict[str, dict[str, Any]] = {}
            for client in clients:
                t0 = time.monotonic()
                r = run_one(sc, client, job, work, args.client_timeout)
                rows[client] = r
                results.append(r)
                table.append(table_row(sc, r))
                print(f"[{time.monotonic() - started:6.1f}s] scenario {num} {client}: done {r['done']} "
                      f"failed {r['failed']} in {r['makespan']:.2f}s (run {time.monotonic() - t0:.1f}s)"
                      + (" KILLED" if r["killed"] else ""), file=sys.stderr, flush=True)
                if r.get("stderr"):
                    notes.append(f"- scenario {num} {client}: no JSON report; stderr tail: {r['stderr']!r}")
                if r.get("reasons"):
                    notes.append(f"- scenario {num} {client}: failures by reason {r['reasons']}")
                if r.get("fatal"):
                    notes.append(f"- scenario {num} {client}: stopped on fatal error `{r['fatal']}`, exit {r['exit']}")
                s = r["stats"]
                notes.append(f"- scenario {num} {client}: simulator saw requests={s.get('requests')} "
                             f"accepted={s.get('accepted')} images={s.get('images')} "
                             f"rate_limited={s.get('rate_limited')} quota_rejected={s.get('quota_rejected')} "
                             f"policy_rejected={s.get('policy_rejected')} faults={s.get('faults')}; "
                             f"process wall {r['wall']:.2f}s")
            notes.extend(checks(sc, rows))
            by_num[num] = rows
        lone, control = by_num.get(13, {}).get("batcher"), by_num.get(14, {}).get("batcher")
        if lone and control:  # the 429's own cost, without this machine's per-run overheads
            lost = lone["makespan"] - control["makespan"]
            notes.append(f"- [{'PASS' if lost <= 2.0 else 'FAIL'}] scenario 13 vs 14: the lone 429 cost "
                         f"{lost:.2f} s ≤ Retry-After + 1 s = 2 s ({lone['makespan']:.2f} s vs "
                         f"{control['makespan']:.2f} s without it)")
    finally:
        if not args.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)

    total = time.monotonic() - started
    print(f"Command: `{command_line()}` (batcher {batcher_revision()})\n")
    print(f"Concurrency {CONCURRENCY} for both clients; image size 64x64 except scenario 7 (256x256); "
          f"{'quick (items / 4)' if args.quick else 'full size'}; total wall time {total:.0f}s.\n")
    print(markdown_table(HEADERS, table))
    print("\n\\* fewer items done than the ideal assumes (items, or for scenario 6 the items the quota pays "
          "for): efficiency is not comparable.\n")
    print("\n".join(notes))
    if args.keep:
        print(f"\nkept: {tmp}")
    if args.save:
        Path(args.save).write_text(json.dumps(results, default=str, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
