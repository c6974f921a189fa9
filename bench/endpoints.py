"""Several endpoints in one run (issue 7): combined efficiency, a dry endpoint, a broken one.

    .venv/bin/python bench/endpoints.py            # 3 scenarios, ~1 minute
    .venv/bin/python bench/endpoints.py --keep     # keep the work folder

Two simulator processes on 127.0.0.1 (1,500 and 3,000 rpm, 300 ± 100 ms latency), one batcher
process with a job naming both as endpoints. Prints a Markdown table and PASS/FAIL lines.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import (  # noqa: E402
    Simulator, base_prompts, batcher_env, batcher_revision, command_line, markdown_table, run_client, unique_prompt,
)
from rate import ideal_makespan  # noqa: E402

LAT = ["--latency-ms", "300", "--jitter-ms", "100"]
SLOW, FAST = 1500, 3000


def write_job(path: Path, n: int, endpoints: list[dict[str, Any]]) -> None:
    import yaml

    prompts = base_prompts()
    items = [{"prompt": unique_prompt(prompts, i), "size": "64x64"} for i in range(n)]
    path.write_text(yaml.safe_dump({"name": path.stem, "endpoints": endpoints, "prompts": items}, sort_keys=False))


def parse_at(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def scenario(num: int, work: Path, n: int, slow_args: list[str], fast_args: list[str]) -> dict[str, Any]:
    sdir = work / f"s{num}"
    sdir.mkdir()
    with Simulator(["--rpm", str(SLOW), *LAT, *slow_args], sdir / "slow.log") as slow, \
            Simulator(["--rpm", str(FAST), *LAT, *fast_args], sdir / "fast.log") as fast:
        sim_started = time.time()
        job = sdir / "job.yaml"
        write_job(job, n, [
            {"name": "slow", "base_url": slow.base_url, "rate_limit": {"rpm": SLOW}, "concurrency": 64},
            {"name": "fast", "base_url": fast.base_url, "rate_limit": {"rpm": FAST}, "concurrency": 64},
        ])
        out = sdir / "out"
        cmd = [sys.executable, "-m", "batcher", "run", str(job), "--out", str(out), "--json", "--quiet",
               "--timeout", "10"]
        run = run_client(cmd, timeout=300, workdir=sdir, env=batcher_env(), tag="batcher")
        time.sleep(0.2)
        stats = {"slow": slow.stats(), "fast": fast.stats()}
        gens: dict[str, int] = {}
        for sim in (slow, fast):
            import urllib.request
            with urllib.request.urlopen(f"{sim.root}/_sim/stats", timeout=30) as resp:  # 127.0.0.1 only
                for prompt, count in json.loads(resp.read()).get("generations", {}).items():
                    gens[prompt] = gens.get(prompt, 0) + count
    report = run.last_json() or {}
    items = json.loads((out / "manifest.json").read_text())["items"] if (out / "manifest.json").exists() else []
    return {"num": num, "n": n, "run": run, "report": report, "stats": stats, "items": items,
            "dups": sum(c - 1 for c in gens.values() if c > 1), "sim_started": sim_started}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--items", type=int, default=900)
    ap.add_argument("--fail-after", type=float, default=10.0)
    ap.add_argument("--scenarios", default="1,2,3", help="comma-separated subset")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="batcher-bench-endpoints-"))
    rows, notes = [], []
    verdicts: list[tuple[bool, str]] = []
    t0 = time.monotonic()
    try:
        wanted = {int(x) for x in args.scenarios.split(",")}
        plans = [
            (1, "two endpoints (1,500 + 3,000 rpm)", args.items, [], []),
            (2, "3,000-rpm one: insufficient_quota after 200", args.items, [], ["--quota-images", "200"]),
            (3, f"1,500-rpm one: 500 for all from {args.fail_after:.0f} s", 1500,
             ["--fail-all-after", str(args.fail_after)], []),
        ]
        runs = [(name, scenario(num, work, n, slow, fast)) for num, name, n, slow, fast in plans if num in wanted]
        for name, r in runs:
            rep, summary = r["report"], (r["report"].get("summary") or {})
            eps = rep.get("endpoints") or {}
            st = r["stats"]
            requests = st["slow"]["requests"] + st["fast"]["requests"]
            r429 = st["slow"]["rate_limited"] + st["fast"]["rate_limited"]
            makespan = rep.get("elapsed") or r["run"].wall
            ideal = ideal_makespan(r["n"], r["n"], 0.3, 128, rpm=SLOW + FAST)
            eff = ideal / makespan if makespan else None
            rows.append([r["num"], name, summary.get("done"), summary.get("failed"), summary.get("pending"),
                         makespan, ideal, eff, r429, requests, r["dups"],
                         (eps.get("slow") or {}).get("done"), (eps.get("fast") or {}).get("done"),
                         st["slow"]["max_window_requests"], st["fast"]["max_window_requests"],
                         r["run"].returncode])
            notes.append(f"- scenario {r['num']}: endpoints {json.dumps(eps)}")
            if r["num"] == 1:
                verdicts.append((eff is not None and eff >= 0.95, f"scenario 1: combined efficiency {eff:.3f} ≥ 0.95"))
                verdicts.append((r429 <= 0.01 * requests, f"scenario 1: 429s {r429} ≤ 1% of {requests}"))
            if r["num"] == 2:
                verdicts.append((summary.get("done") == r["n"] and r["run"].returncode == 0 and r["dups"] == 0,
                                 f"scenario 2: all {r['n']} done ({summary.get('done')}), exit "
                                 f"{r['run'].returncode}, duplicate generations {r['dups']}"))
            if r["num"] == 3:
                opened = (eps.get("slow") or {}).get("circuit_first_opened")
                fail_at = r["sim_started"] + args.fail_after
                cut = opened - fail_at if opened else None
                verdicts.append((cut is not None and cut <= 5.0,
                                 f"scenario 3: broken endpoint cut off {cut if cut is None else round(cut, 2)} s "
                                 f"after its failures began (≤ 5)"))
                after = sorted(parse_at(i["finished"]) for i in r["items"]
                               if i.get("status") == "done" and i.get("finished") and parse_at(i["finished"]) > (opened or 0))
                if opened and len(after) > 50:
                    rate = (len(after) - 1) / (after[-1] - after[0])
                    share = rate / (FAST / 60)
                    verdicts.append((share >= 0.9, f"scenario 3: after the cut-off {rate:.1f} items/s = {share:.3f} "
                                                   f"of the healthy endpoint's limit (≥ 0.9)"))
                verdicts.append((summary.get("done") == r["n"], f"scenario 3: all {r['n']} done ({summary.get('done')})"))
    finally:
        if args.keep:
            print(f"work folder kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"Command: `{command_line()}` (batcher {batcher_revision()}); total wall time {time.monotonic() - t0:.0f}s\n")
    print(markdown_table(["#", "scenario", "done", "failed", "pending", "makespan s", "ideal s", "efficiency",
                          "429s", "requests", "dup gens", "done slow", "done fast", "max req/1s slow",
                          "max req/1s fast", "exit"], rows))
    print()
    print("\n".join(notes))
    for ok, text in verdicts:
        print(f"- [{'PASS' if ok else 'FAIL'}] {text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
