"""A large finished output: what a rerun, a `status` and a run of new items cost.

    .venv/bin/python bench/scale_out.py                          # 10,000 and 1,000,000 items
    .venv/bin/python bench/scale_out.py --sizes 10000 --new 100  # a quick check

For each size N, bench/fixture.py synthesizes a finished output of N done items (journal, images as
hard links, manifest.json), then, each in its own process:
1. `batcher run` that sends nothing (twice: the first may build the checkpoint, the second is the
   cron steady state);
2. `batcher status --json`;
3. `--new` items appended to the job, then `batcher run` against a zero-latency simulator;
4. `batcher status --json` again.
Each row: wall time, CPU, peak RSS, and bytes read / written through read(2)/write(2)
(`rchar`/`wchar` of /proc/PID/io: page-cache hits included, interpreter start-up included).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import Simulator, batcher_env, batcher_revision, command_line, markdown_table, run_client
from fixture import synthesize, write_job

# runs `python -m batcher ARGS` and prints the process's /proc/self/io on exit (stderr, last line)
# (and its VmHWM: wait4's ru_maxrss would include the benchmark's own RSS at fork, carried over exec)
IO_WRAP = ("import atexit, runpy, sys\n"
           "def _io():\n"
           "    io = dict(l.split(': ') for l in open('/proc/self/io').read().split('\\n') if l)\n"
           "    hwm = [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM:')][0]\n"
           "    sys.stderr.write('\\nIO ' + io['rchar'].strip() + ' ' + io['wchar'].strip() + ' ' + hwm + '\\n')\n"
           "atexit.register(_io)\n"
           "sys.argv = ['batcher'] + sys.argv[1:]\n"
           "runpy.run_module('batcher', run_name='__main__', alter_sys=True)\n")


def measured(args: list[str], workdir: Path, tag: str, timeout: float, env: dict[str, str]) -> dict:
    run = run_client([sys.executable, "-c", IO_WRAP, *args], timeout=timeout, workdir=workdir, env=env, tag=tag)
    read = written = hwm_kb = None
    for line in reversed(run.stderr_tail.splitlines()):
        if line.startswith("IO "):
            read, written, hwm_kb = (int(x) for x in line.split()[1:4])
            break
    return {"run": run, "read": read, "written": written, "rss_mb": None if hwm_kb is None else hwm_kb / 1024}


def manifest_mb(out: Path) -> float:
    single = out / "manifest.json"
    if single.is_file():
        return single.stat().st_size / 1e6
    return sum(p.stat().st_size for p in (out / "manifest.d").iterdir()) / 1e6


def mb(v: int | None) -> float | None:
    return None if v is None else v / 1e6


def row(what: str, n: int, m: dict) -> list:
    run = m["run"]
    return [what, f"{n:,}", "KILLED" if run.killed else run.returncode, run.wall, run.cpu, m["rss_mb"],
            mb(m["read"]), mb(m["written"])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,1000000", help="comma-separated item counts")
    ap.add_argument("--new", type=int, default=1000, help="items a run then adds (default 1000)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds before a process is killed")
    ap.add_argument("--dir", type=Path, default=None, help="work here (default: a temp folder under /work)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--layout", choices=("large", "single"), default="large",
                    help="large: the layout a new large output gets (image subfolders, segmented manifest); "
                         "single: flat images and one manifest.json, as outputs made before it")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="batcher-bench-scale-out-", dir=args.dir or "/work"))
    env = batcher_env()
    rows: list[list] = []
    notes: list[str] = []
    started = time.monotonic()
    try:
        m = measured(["--version"], tmp, "startup", args.timeout, env)  # what any command costs to start
        rows.append(row("start-up only (`--version`)", 0, m))
        for n in (int(s) for s in args.sizes.split(",")):
            parent = tmp / f"n{n}"
            times = synthesize(parent, n, large=args.layout == "large")
            out = parent / "out"
            notes.append(f"- {n:,}: fixture in {sum(times.values()):.1f}s ({json.dumps({k: round(v, 1) for k, v in times.items()})}); "
                         f"journal {out.joinpath('manifest.jsonl').stat().st_size / 1e6:.1f} MB, "
                         f"manifest {manifest_mb(out):.1f} MB ({args.layout})")
            rerun = ["run", "job.yaml", "--out", "out", "--quiet", "--json"]
            for k in (1, 2):
                m = measured(rerun, parent, f"rerun{k}", args.timeout, env)
                rows.append(row(f"rerun, sends nothing (#{k})", n, m))
            m = measured(["status", "out", "--json"], parent, "status", args.timeout, env)
            rows.append(row("status", n, m))
            if args.new:
                write_job(parent / "prompts.jsonl", args.new, start=n, mode="a")
                with Simulator(["--latency-ms", "0"], parent / "simulator.log") as sim:
                    m = measured([*rerun, "--base-url", sim.base_url, "--concurrency", "32"], parent, "new",
                                 args.timeout, env)
                report = m["run"].last_json() or {}
                rows.append(row(f"run of {args.new:,} new items", n, m))
                notes.append(f"- {n:,}: new-items run summary {json.dumps(report.get('summary'))}")
                m = measured(["status", "out", "--json"], parent, "status2", args.timeout, env)
                rows.append(row("status after it", n, m))
            shutil.rmtree(parent, ignore_errors=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"Command: `{command_line()}` (batcher {batcher_revision()})\n")
    print(f"Total wall time {time.monotonic() - started:.0f}s.\n")
    print(markdown_table(["what", "items done", "exit", "wall s", "CPU s", "peak RSS MB", "read MB", "written MB"],
                         rows))
    print()
    print("\n".join(notes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
