"""A cron rerun over a large finished output: unchanged job, then items appended (bench/fixture.py --large).

    .venv/bin/python bench/fixture.py /tmp/fx/n100000 --items 100000 --large     # once
    .venv/bin/python bench/rerun.py /tmp/fx/n100000 [--code /path/to/other/checkout] [--new 1000]

On a fixture built once (reused: its job, journal, checkpoint and manifest are saved first and put
back after, so before/after runs start alike), each its own process: a rerun that sends nothing
(#1 may build the checkpoint and the job cache, #2 is the steady state), `status`, then `--new`
items appended and a run against a zero-latency simulator, a steady rerun after it, and `status`.
`--code DIR`: run that checkout of batcher instead (PYTHONPATH), e.g. an export of main for "before".

    .venv/bin/python bench/rerun.py /tmp/fx/n1000000 --status 5 [--against /path/to/other/checkout]

`--status K`: only `status` (read-only: the fixture is not changed), K times, after a start-up-only
row; with `--against DIR`, each time this checkout then DIR's, back to back (interleaved pairs).
The fixture needs a checkpoint first (a rerun builds it: run this without --status once, or
`batcher run job.yaml --out out` in it). The load average is printed with the table.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import Simulator, batcher_env, markdown_table
from fixture import write_job
from scale_out import measured, row

STATE = ("prompts.jsonl", "out/manifest.jsonl", "out/.checkpoint.sqlite", "out/manifest.d", "out/layout.json",
         "out/manifest.json")


def save(parent: Path, to: Path) -> None:
    for name in STATE:
        src = parent / name
        if src.is_dir():
            shutil.copytree(src, to / name)
        elif src.exists():
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, to / name)


def restore(parent: Path, saved: Path) -> None:
    for name in STATE:
        dst, src = parent / name, saved / name
        if dst.is_dir():
            shutil.rmtree(dst)
        elif dst.exists():
            dst.unlink()
        if src.is_dir():
            shutil.copytree(src, dst)
        elif src.exists():
            shutil.copy2(src, dst)


def load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def status_only(parent: Path, n: int, times: int, env: dict[str, str], against: Path | None, timeout: float) -> int:
    """`status` on the fixture `times` times (read-only), each followed by `against`'s when given."""
    codes = [("this checkout", env)]
    if against is not None:
        codes.append((str(against), {**env, "PYTHONPATH": str(against.resolve())}))
    print(load(), "(start)")
    rows = [row("start-up only (`--version`)", 0, measured(["--version"], parent, "startup", timeout, env))]
    for k in range(times):
        for name, code_env in codes:
            m = measured(["status", "out", "--json"], parent, f"status{k}", timeout, code_env)
            rows.append(row(f"`status` #{k + 1} ({name})", n, m))
    print(load(), "(end)\n")
    print(markdown_table(["what", "items done", "exit", "wall s", "CPU s", "peak RSS MB", "read MB", "written MB"],
                         rows))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("parent", type=Path, help="a fixture's folder (bench/fixture.py PARENT --large)")
    ap.add_argument("--code", type=Path, default=None, help="another batcher checkout to run")
    ap.add_argument("--new", type=int, default=1000)
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--status", type=int, default=0, metavar="K", help="only measure `status`, K times")
    ap.add_argument("--against", type=Path, default=None, help="with --status: also this checkout, interleaved")
    args = ap.parse_args()
    parent = args.parent.resolve()
    n = sum(1 for _ in open(parent / "prompts.jsonl", "rb"))
    env = batcher_env()
    if args.code:
        env["PYTHONPATH"] = str(args.code.resolve())
    if args.status:
        return status_only(parent, n, args.status, env, args.against, args.timeout)
    saved = Path(tempfile.mkdtemp(prefix="batcher-bench-rerun-"))
    rows: list[list] = []
    save(parent, saved)
    try:
        rerun = ["run", "job.yaml", "--out", "out", "--quiet", "--json"]
        for k in (1, 2):
            rows.append(row(f"rerun, sends nothing (#{k})", n, measured(rerun, parent, f"rerun{k}", args.timeout, env)))
        rows.append(row("status", n, measured(["status", "out", "--json"], parent, "status", args.timeout, env)))
        write_job(parent / "prompts.jsonl", args.new, start=n, mode="a")
        with Simulator(["--latency-ms", "0"], parent / "simulator.log") as sim:
            m = measured([*rerun, "--base-url", sim.base_url, "--concurrency", "32"], parent, "new", args.timeout, env)
        rows.append(row(f"run of {args.new:,} new items", n, m))
        print("new-items run:", (m["run"].last_json() or {}).get("summary"), file=sys.stderr)
        rows.append(row("rerun after it, sends nothing", n, measured(rerun, parent, "rerun3", args.timeout, env)))
        rows.append(row("status after it", n, measured(["status", "out", "--json"], parent, "status2",
                                                       args.timeout, env)))
    finally:
        restore(parent, saved)
        shutil.rmtree(saved, ignore_errors=True)
    print(f"code: {args.code or 'this checkout'}; {load()}\n")
    print(markdown_table(["what", "items done", "exit", "wall s", "CPU s", "peak RSS MB", "read MB", "written MB"],
                         rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
