"""CPU per image and in-flight capacity: batcher vs the hand-written openai-SDK baseline.

    .venv/bin/python bench/throughput.py                  # all rows
    .venv/bin/python bench/throughput.py --rows 256k,2m   # a subset: 256k, 2m, inflight
    .venv/bin/python bench/throughput.py --quick          # item counts / 4
    .venv/bin/python bench/throughput.py --repeat 3       # each pair 3 times, interleaved; verdicts on medians
    .venv/bin/python bench/throughput.py --rows 256k --repeat 5 --code /tmp/before   # + another checkout, interleaved

Rows (each client its own process against its own simulator process, 127.0.0.1 only):
- 256k: 1,500 images of 256 KiB, 20 ms latency, concurrency 64, side by side with the baseline.
  Targets: batcher ≥ 2× the baseline's images/s and ≤ 0.5× its CPU per image.
- 2m: 300 images of 2 MiB (real PNGs are 1-3 MB), the same otherwise; CPU per MB.
- inflight: 3,000 rpm at 20 s per image needs ~1,000 requests in flight: batcher alone,
  --concurrency 1000 --rpm 3000; peak sockets, file descriptors and RSS. Target: efficiency ≥ 0.95.
CPU is the client process's user + system time (os.wait4), threads included, interpreter start-up
too. `--code CHECKOUT` also runs the batcher of another checkout (a folder holding `batcher/`, e.g.
`git archive main batcher | tar -x -C /tmp/before`) as the client "before" in the 256k and 2m rows,
interleaved with the others: a before/after comparison on a shared machine in one command. On a shared machine both clients' numbers move with the load: the pairs run interleaved and
the verdicts use the median of the per-pair ratios.
Both batchers run byte-compiled, as a pip install leaves a package (the openai SDK's modules are):
their `batcher/__pycache__` is written first (`--no-compile`: not), since with PYTHONDONTWRITEBYTECODE
set an editable checkout would compile its ~40 modules at every start (~110 ms of CPU each run).
"""

from __future__ import annotations

import argparse
import compileall
import math
import os
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _harness import (
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
MODEL = "grok-imagine"


@dataclass
class Row:
    key: str
    name: str
    items: int
    image_bytes: int
    latency_ms: float
    concurrency: int
    clients: tuple[str, ...] = ("baseline", "batcher")
    rpm: float | None = None
    size: str = "256x256"
    batcher_args: list[str] = field(default_factory=list)

    def ideal(self) -> float:
        """The best makespan: concurrency-bound, or the rpm window's (as bench/rate.py defines it)."""
        lat = self.latency_ms / 1000.0
        bounds = [lat * math.ceil(self.items / self.concurrency)]
        if self.rpm:
            c = max(1, round(self.rpm / 60.0))
            bounds.append((math.ceil(self.items / c) - 1) * 60.0 * c / self.rpm + lat)
        return max(bounds)


def rows(scale: float) -> dict[str, Row]:
    def k(n: int) -> int:
        return max(16, round(n * scale))

    return {r.key: r for r in [
        Row("256k", "256 KiB images", k(1500), 262144, 20, 64),
        Row("2m", "2 MiB images", k(300), 2 * 1024 * 1024, 20, 64, size="1024x1024"),
        Row("inflight", "3,000 rpm at 20 s (1,000 in flight)", k(2000), 0, 20000, 1000, ("batcher",),
            rpm=3000, size="64x64", batcher_args=["--rpm", "3000"]),
    ]}


def run_row(row: Row, client: str, work: Path, timeout: float, code: Path | None = None) -> dict[str, Any]:
    cdir = work / f"{row.key}-{client}"
    cdir.mkdir(parents=True)
    job, out = cdir / "job.jsonl", cdir / "out"
    prompts = base_prompts()
    write_jsonl_job(job, ({"id": f"item-{i:06d}", "prompt": unique_prompt(prompts, i), "model": MODEL,
                          "size": row.size, "n": 1} for i in range(row.items)))
    sim_args = ["--latency-ms", str(row.latency_ms), "--image-bytes", str(row.image_bytes)]
    if row.rpm:
        sim_args += ["--rpm", str(row.rpm)]
    with Simulator(sim_args, cdir / "simulator.log") as sim:
        env = batcher_env()
        if client == "before":
            assert code is not None
            env["PYTHONPATH"] = str(code)  # ahead of the installed batcher (the job's folder is the cwd)
        if client in ("batcher", "before"):
            cmd = [sys.executable, "-m", "batcher", "run", str(job), "--out", str(out), "--base-url", sim.base_url,
                   "--concurrency", str(row.concurrency), "--quiet", "--json", *row.batcher_args]
        else:
            cmd = [sys.executable, str(BENCH / "baseline_openai.py"), "--job", str(job), "--out", str(out),
                   "--base-url", sim.base_url, "--concurrency", str(row.concurrency)]
        run = run_client(cmd, timeout=timeout, workdir=cdir, env=env, tag=client, sample_fds=True)
        time.sleep(0.2)
        stats = sim.stats()
    report = run.last_json() or {}
    if client in ("batcher", "before"):
        done = (report.get("summary") or {}).get("done")
        images, makespan = report.get("images"), report.get("elapsed")
    else:
        done, images, makespan = report.get("done"), report.get("images"), report.get("elapsed")
    makespan = makespan or run.wall
    images = images or 0
    image_mb = images * (row.image_bytes or 1) / 1e6
    return {
        "client": client, "done": done, "images": images, "makespan": makespan, "cpu": run.cpu,
        "rss": run.maxrss_mb, "fds": run.extra.get("peak_fds"), "sockets": run.extra.get("peak_sockets"),
        "img_s": images / makespan if images and makespan else None,
        "cpu_ms_img": run.cpu / images * 1000 if images else None,
        "cpu_s_gb": run.cpu / image_mb * 1000 if images and row.image_bytes else None,
        "efficiency": row.ideal() / makespan if makespan else None,
        "requests": stats.get("requests"), "r429": stats.get("rate_limited", 0),
        "exit": "KILLED" if run.killed else run.returncode,
        "stderr": "" if report else run.stderr_tail[-400:],
    }


HEADERS = ["row", "client", "done", "makespan s", "ideal s", "efficiency", "img/s", "CPU s", "CPU ms/img",
           "CPU s/GB", "peak RSS MB", "peak sockets", "peak fds", "requests", "429s", "exit"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="256k,2m,inflight")
    ap.add_argument("--quick", action="store_true", help="item counts / 4")
    ap.add_argument("--client-timeout", type=float, default=300.0)
    ap.add_argument("--repeat", type=int, default=1, help="run each row's clients this many times, interleaved")
    ap.add_argument("--keep", action="store_true", help="keep the temp folder")
    ap.add_argument("--code", type=Path, help="a checkout (folder holding batcher/) to run as the client 'before'")
    ap.add_argument("--no-compile", action="store_true",
                    help="don't byte-compile the batchers first (they compile at every start under PYTHONDONTWRITEBYTECODE)")
    args = ap.parse_args()
    table = rows(0.25 if args.quick else 1.0)
    wanted = [table[key] for key in args.rows.split(",")]
    if args.code is not None:
        if not (args.code / "batcher" / "__init__.py").is_file():
            raise SystemExit(f"--code {args.code}: no batcher/ package there")
        for row in wanted:
            if len(row.clients) > 1:
                row.clients = (*row.clients, "before")
    if not args.no_compile:  # __pycache__ is git-ignored; a stale .pyc is never used (its source's mtime is checked)
        for pkg in [BENCH.parent / "batcher", *([args.code / "batcher"] if args.code is not None else [])]:
            compileall.compile_dir(str(pkg), quiet=1)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    started = time.monotonic()
    results: list[tuple[Row, dict[str, Any]]] = []
    work = Path(tempfile.mkdtemp(prefix="batcher-throughput-"))
    for row in wanted:
        for rep in range(args.repeat if len(row.clients) > 1 else 1):
            for client in row.clients:
                print(f"row {row.key}: {client} #{rep + 1} ...", file=sys.stderr, flush=True)
                r = run_row(row, client, work / f"rep{rep}", args.client_timeout, args.code)
                r["rep"] = rep
                results.append((row, r))
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    print(f"Command: `{command_line()}` (batcher {batcher_revision()}); "
          f"{'not byte-compiled' if args.no_compile else 'batchers byte-compiled first'}; ulimit -n {soft} (hard {hard}); "
          f"total wall time {time.monotonic() - started:.0f}s; load average at the end "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}\n")
    print(markdown_table(HEADERS, [
        [f"{row.key}: {row.name}, {row.items} items, c={row.concurrency}", r["client"], r["done"], r["makespan"],
         row.ideal(), r["efficiency"], r["img_s"], r["cpu"], r["cpu_ms_img"], r["cpu_s_gb"], r["rss"],
         r["sockets"], r["fds"], r["requests"], r["r429"], r["exit"]] for row, r in results]))
    print()
    by = {(row.key, r["client"], r["rep"]): (row, r) for row, r in results}
    for key in ("256k", "2m"):
        speed, cpu = [], []
        for rep in range(args.repeat):
            b, base = by.get((key, "batcher", rep)), by.get((key, "baseline", rep))
            if b and base and b[1]["img_s"] and base[1]["img_s"]:
                speed.append(b[1]["img_s"] / base[1]["img_s"])
                cpu.append(b[1]["cpu_ms_img"] / base[1]["cpu_ms_img"])
        if speed:
            tag = (lambda ok: "PASS" if ok else "FAIL") if key == "256k" else (lambda ok: "info")
            each = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
            print(f"- [{tag(statistics.median(speed) >= 2.0)}] {key}: batcher images/s ×"
                  f"{statistics.median(speed):.2f} the baseline's, median of {len(speed)} ({each(speed)}); target ≥ 2")
            print(f"- [{tag(statistics.median(cpu) <= 0.5)}] {key}: batcher CPU per image ×"
                  f"{statistics.median(cpu):.2f} the baseline's, median of {len(cpu)} ({each(cpu)}); target ≤ 0.5")
        after = []
        for rep in range(args.repeat):
            b, old = by.get((key, "batcher", rep)), by.get((key, "before", rep))
            if b and old and b[1]["img_s"] and old[1]["img_s"]:
                after.append((b[1]["img_s"] / old[1]["img_s"], b[1]["cpu_ms_img"] / old[1]["cpu_ms_img"]))
        if after:
            print(f"- [info] {key}: batcher vs before ({args.code}), medians of {len(after)} pairs: images/s "
                  f"×{statistics.median(a for a, _ in after):.3f}, CPU per image ×{statistics.median(c for _, c in after):.3f} "
                  f"(CPU each: {', '.join(f'{c:.3f}' for _, c in after)})")
    if ("inflight", "batcher", 0) in by:
        row, b = by[("inflight", "batcher", 0)]
        ok = (b["efficiency"] or 0) >= 0.95 and b["done"] == row.items
        print(f"- [{'PASS' if ok else 'FAIL'}] inflight: efficiency {b['efficiency']:.3f} (target ≥ 0.95), "
              f"done {b['done']}/{row.items}, peak sockets {b['sockets']}, peak RSS {b['rss']:.0f} MB, "
              f"429s {b['r429']}")
    for row, r in results:
        if r["stderr"]:
            print(f"- {row.key} {r['client']}: no report; stderr: {r['stderr']!r}")


if __name__ == "__main__":
    main()
