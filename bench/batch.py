"""Batch mode at scale (issue 16): N items through the simulator's Files and Batches APIs.

    .venv/bin/python bench/batch.py                      # 10,000 and 100,000 items
    .venv/bin/python bench/batch.py --items 10000        # one quick row

Per row: a JSONL job of N unique PartiPrompts (size 32x24, b64), `python -m batcher run JOB --batch
--quiet --json` as its own process against a simulator in ITS OWN process (which holds every batch's
output in memory, so its RSS is not the client's). Measured: the client's CPU seconds and peak RSS
(os.wait4), wall time, the chunks (batches) it made, and the lag from the provider's last batch end
(the simulator's `batch.last_ended`) to the last image on disk (the latest `finished` of an `item`
record in the journal). Targets: every item done, none generated twice, peak RSS < 200 MB.
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


def journal_facts(path: Path) -> dict[str, float | int | None]:
    """Chunks, done items and the last item's `finished` time (epoch seconds) from the journal, streamed."""
    chunks = done = 0
    last: float | None = None
    with open(path, "rb") as fh:
        for raw in fh:
            if raw.startswith(b'{"t":"chunk"'):
                chunks += 1
            elif raw.startswith(b'{"t":"item"'):
                rec = json.loads(raw)
                if rec.get("status") == "done":
                    done += 1
                    at = datetime.fromisoformat(rec["finished"].replace("Z", "+00:00")).timestamp()
                    last = at if last is None else max(last, at)
    return {"chunks": chunks, "done": done, "last_finished": last}


def run_row(n: int, args: argparse.Namespace, tmp: Path, env: dict[str, str]) -> tuple[list, list[str]]:
    rdir = tmp / f"run-{n}"
    rdir.mkdir()
    job, out = rdir / "job.jsonl", rdir / "out"
    write_unique_job(job, n, args.size, "b")
    sim_args = ["--latency-ms", "0", "--batch-time-scale", str(args.batch_seconds / 86400.0)]
    cmd = [sys.executable, "-m", "batcher", "run", str(job), "--out", str(out), "--batch", "--quiet", "--json"]
    with Simulator(sim_args, rdir / "simulator.log") as sim:
        run = run_client([*cmd, "--base-url", sim.base_url], timeout=args.client_timeout, workdir=rdir, env=env,
                         tag="batcher")
        stats = sim.stats(timeout=120.0)
    batch = stats.get("batch", {})
    facts = journal_facts(out / "manifest.jsonl") if (out / "manifest.jsonl").exists() else {}
    ended, last = batch.get("last_ended"), facts.get("last_finished")
    lag = (last - ended) if isinstance(ended, float) and isinstance(last, float) else None
    done = facts.get("done") or 0
    ok = done == n and batch.get("duplicates") == 0 and run.returncode == 0
    row = [f"{n:,} items", "KILLED" if run.killed else run.returncode, done, facts.get("chunks"),
           batch.get("batches_created"), batch.get("duplicates"), run.wall, run.cpu, run.cpu / max(done, 1) * 1e3,
           run.maxrss_mb, lag, "PASS" if ok and run.maxrss_mb < RSS_TARGET_MB else "FAIL"]
    notes = [f"- {n:,}: simulator files_uploaded={batch.get('files_uploaded')} lines={batch.get('lines')}; "
             f"journal {(out / 'manifest.jsonl').stat().st_size / 1e6:.1f} MB" if facts else
             f"- {n:,}: no journal"]
    if not ok:
        notes.append(f"- {n:,}: stdout tail {run.stdout[-300:]!r} stderr tail {run.stderr_tail[-600:]!r}")
    return row, notes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", default="10000,100000", help="comma-separated row sizes (default 10000,100000)")
    ap.add_argument("--size", default="32x24", help="image size (default 32x24: disk is not the bottleneck)")
    ap.add_argument("--batch-seconds", type=float, default=2.0,
                    help="real seconds the simulator takes for a 24h batch (default 2)")
    ap.add_argument("--client-timeout", type=float, default=1800.0,
                    help="seconds each batcher process may take before it is killed (default 1800)")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder")
    args = ap.parse_args()
    sizes = [int(x.replace("_", "")) for x in args.items.split(",") if x.strip()]

    tmp = Path(tempfile.mkdtemp(prefix="batcher-bench-batch-"))
    started = time.monotonic()
    rows: list[list] = []
    notes: list[str] = []
    env = batcher_env()
    try:
        for n in sizes:
            print(f"batch: {n:,} items ...", file=sys.stderr, flush=True)
            row, row_notes = run_row(n, args, tmp, env)
            rows.append(row)
            notes.extend(row_notes)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    print(f"Command: `{command_line()}` (batcher {batcher_revision()})\n")
    print(f"Total wall time {time.monotonic() - started:.0f}s. Images {args.size}, b64; a 24h batch takes "
          f"{args.batch_seconds:g} s on the simulator. Peak RSS target < {RSS_TARGET_MB:.0f} MB.\n")
    print(markdown_table(["what", "exit", "done", "chunks", "batches created", "duplicates", "wall s", "CPU s",
                          "CPU ms/item", "peak RSS MB", "last end → last image s", "verdict"], rows))
    print()
    print("\n".join(notes))
    if args.keep:
        print(f"\nkept: {tmp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
