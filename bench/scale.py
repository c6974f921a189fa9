"""Memory and scale: validating a 1,000,000-line job, and a 100,000-item run.

    .venv/bin/python bench/scale.py                        # full size
    .venv/bin/python bench/scale.py --items 10000 --validate-lines 100000   # a quick check

1. `python -m batcher validate JOB` on a JSONL job of --validate-lines unique prompts:
   wall time and peak RSS of that process (target < 200 MB).
2. `python -m batcher run` of --items items against a zero-latency simulator (its own process),
   size 8x8, concurrency 64, no rate limit: wall time, items/s, peak RSS of the batcher process,
   and the summary that manifest.json itself states.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (  # noqa: E402
    Simulator,
    batcher_env,
    batcher_revision,
    command_line,
    markdown_table,
    run_client,
    write_unique_job,
)

RSS_TARGET_MB = 200.0


def manifest_summary(path: Path) -> dict | None:
    """The summary manifest.json states; it leads the file, so only its head is read."""
    try:
        with open(path, encoding="utf-8") as fh:
            head = fh.read(64 * 1024)
    except FileNotFoundError:
        return None
    m = re.search(r'"summary":\s*(\{[^{}]*\})', head)
    return json.loads(m.group(1)) if m else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=100_000, help="items in the run (default 100000)")
    ap.add_argument("--validate-lines", type=int, default=1_000_000, help="lines in the validated job (1000000)")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--client-timeout", type=float, default=1800.0,
                    help="seconds each batcher process may take before it is killed (default 1800)")
    ap.add_argument("--skip-validate", action="store_true")
    ap.add_argument("--skip-run", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="batcher-bench-scale-"))
    started = time.monotonic()
    rows: list[list] = []
    notes: list[str] = []
    env = batcher_env()
    try:
        if not args.skip_validate:
            job = tmp / "validate.jsonl"
            t0 = time.monotonic()
            write_unique_job(job, args.validate_lines, "1024x1024", "s")
            notes.append(f"- validate job: {args.validate_lines:,} lines, {job.stat().st_size / 1e6:.1f} MB, "
                         f"written in {time.monotonic() - t0:.1f}s")
            vdir = tmp / "validate"
            vdir.mkdir()
            run = run_client([sys.executable, "-m", "batcher", "validate", str(job)], timeout=args.client_timeout,
                             workdir=vdir, env=env, tag="validate")
            ok = run.returncode == 0 and f"ok, {args.validate_lines} item(s)" in run.stdout
            rows.append([f"validate {args.validate_lines:,}-line JSONL", "KILLED" if run.killed else run.returncode,
                         run.wall, args.validate_lines / run.wall, run.cpu, run.maxrss_mb,
                         "PASS" if run.maxrss_mb < RSS_TARGET_MB else "FAIL",
                         run.stdout.strip().rsplit(": ", 1)[-1] or "—"])
            if not ok:
                notes.append(f"- validate did not report ok: stdout {run.stdout[-300:]!r} "
                             f"stderr {run.stderr_tail[-300:]!r}")
            job.unlink()

        if not args.skip_run:
            job = tmp / "run.jsonl"
            write_unique_job(job, args.items, "8x8", "s")
            rdir = tmp / "run"
            rdir.mkdir()
            out = rdir / "out"
            with Simulator(["--latency-ms", "0"], rdir / "simulator.log") as sim:
                run = run_client([sys.executable, "-m", "batcher", "run", str(job), "--out", str(out),
                                  "--base-url", sim.base_url, "--concurrency", str(args.concurrency),
                                  "--quiet", "--json"], timeout=args.client_timeout, workdir=rdir, env=env,
                                 tag="batcher")
                stats = sim.stats()
            report = run.last_json() or {}
            summary = manifest_summary(out / "manifest.json")
            done = (summary or {}).get("done")
            elapsed = report.get("elapsed")
            rows.append([f"run {args.items:,} items (8x8, c={args.concurrency}, 0 ms)",
                         "KILLED" if run.killed else run.returncode, run.wall,
                         (done or 0) / run.wall, run.cpu, run.maxrss_mb,
                         "PASS" if run.maxrss_mb < RSS_TARGET_MB else "FAIL",
                         f"manifest.json summary {json.dumps(summary)}"])
            notes.append(f"- run: manifest.json summary says {done} done of {args.items} "
                         f"({'PASS' if done == args.items else 'FAIL'}); batcher's own elapsed "
                         f"{elapsed if elapsed is None else round(elapsed, 1)}s, CPU per item "
                         f"{run.cpu / max(done or 1, 1) * 1000:.2f} ms")
            notes.append(f"- run: simulator saw requests={stats.get('requests')} images={stats.get('images')} "
                         f"duplicates={stats.get('duplicates')} max_window_requests={stats.get('max_window_requests')}")
            journal = out / "manifest.jsonl"
            if journal.exists():
                notes.append(f"- run: journal {journal.stat().st_size / 1e6:.1f} MB, manifest.json "
                             f"{(out / 'manifest.json').stat().st_size / 1e6:.1f} MB")
            if not report:
                notes.append(f"- run: no JSON report; stderr tail {run.stderr_tail[-400:]!r}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"Command: `{command_line()}` (batcher {batcher_revision()})\n")
    print(f"Total wall time {time.monotonic() - started:.0f}s. Peak RSS target < {RSS_TARGET_MB:.0f} MB.\n")
    print(markdown_table(["what", "exit", "wall s", "items/s", "CPU s", "peak RSS MB", "RSS < 200 MB", "output"],
                         rows))
    print()
    print("\n".join(notes))
    if args.keep:
        print(f"\nkept: {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
