"""Export rates at scale: every format on a finished 100,000- and 1,000,000-item output (bench/fixture.py).

    .venv/bin/python bench/export_rate.py --fixtures /tmp/f100k/out,/tmp/f1m/out
    .venv/bin/python bench/export_rate.py --items 100000                # builds the fixture in a temp folder

Each export runs as its own process (`python -c 'batcher.export(...)'`), so its wall time, CPU
time and peak RSS (`os.wait4`'s `ru_maxrss`) are its own; the export folder is removed after.
Target (issue 14): every format ≥ 5,000 items/s, in constant memory (peak RSS flat from 100k to 1M).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _harness import batcher_revision, command_line, markdown_table  # noqa: E402

import batcher  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CHILD = "import json, sys, batcher; print(json.dumps(batcher.export(sys.argv[1], sys.argv[2], sys.argv[3])))"


def measure(out: Path, fmt: str, to: Path, timeout: float) -> dict:
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(out), fmt, str(to)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    deadline = started + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()  # our own child, by its PID
            os.wait4(proc.pid, 0)
            return {"error": "KILLED (timeout)"}
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    stdout, stderr = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    if status != 0:
        return {"error": stderr.decode()[-300:]}
    counts = json.loads(stdout.decode().splitlines()[-1])
    return {"seconds": seconds, "cpu": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024,
            "counts": counts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fixtures", default="", help="comma-separated finished outputs (bench/fixture.py OUT/out)")
    parser.add_argument("--items", default="", help="or: comma-separated sizes to build with bench/fixture.py --large")
    parser.add_argument("--formats", default=",".join(batcher._export.FORMATS))
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per export before it is killed")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="batcher-bench-export-"))
    outs = [Path(p) for p in args.fixtures.split(",") if p]
    try:
        for n in [int(s) for s in args.items.split(",") if s]:
            print(f"building a {n}-item fixture ...", file=sys.stderr)
            subprocess.run([sys.executable, str(ROOT / "bench" / "fixture.py"), str(tmp / f"f{n}"), "--items", str(n),
                            "--large"], check=True, timeout=args.timeout)
            outs.append(tmp / f"f{n}" / "out")
        rows = []
        for k, out in enumerate(outs):
            for fmt in args.formats.split(","):
                print(f"export {fmt} of {out} ...", file=sys.stderr)
                # each export stays until the end: removing a million links between rows would
                # cost more than the export (and is no part of it)
                r = measure(out, fmt, tmp / f"export-{k}-{fmt}", args.timeout)
                if "error" in r:
                    rows.append([str(out), fmt, r["error"], "", "", "", ""])
                    continue
                items = r["counts"]["items"] + r["counts"]["failed"]
                rows.append([str(out), fmt, items, round(r["seconds"], 1), round(items / r["seconds"]),
                             round(r["cpu"], 1), round(r["rss_mb"])])
                print("  " + " | ".join(map(str, rows[-1])), file=sys.stderr)
        print(markdown_table(["output", "format", "items", "wall s", "items/s", "CPU s", "peak RSS MB"], rows))
        print()
        print(f"`{command_line()}` — batcher {batcher_revision()}; one process per export (os.wait4).")
        for row in rows:
            if isinstance(row[4], (int, float)) and row[4] != "":
                print(f"{'PASS' if row[4] >= 5000 else 'FAIL'}: {row[1]} at {row[2]} items: {row[4]} items/s ≥ 5,000")
    finally:
        print(f"removing {tmp} ...", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
