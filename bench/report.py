"""The report page at scale: `batcher.report()` time and memory, and page load in headless Chromium.

    .venv/bin/python bench/report.py                    # 1,000 and 10,000 items
    .venv/bin/python bench/report.py --items 10000,100000,1000000 --repeat 3

For each size: a synthetic output folder (85% done, 10% failed, 5% pending; every 10th item n=2;
~200-character prompts, matrix vars, cost; one tiny PNG per image), then
1. `batcher.report(OUT)` (its own process: wall time and peak RSS) and (up to `--export-max` items) `batcher.export(OUT, fmt, DIR)` for each
   format: wall time, and peak Python allocation under tracemalloc (a second run; constant memory
   means it does not grow with N); bench/export_rate.py measures exports at 100k and 1M,
2. Debian chromium via Playwright (`--repeat` loads, median): time from navigation start to the
   first cards on screen (the page's own `performance.now()` when its first cards are in the DOM),
   first contentful paint, DOMContentLoaded, the wall time Python waited for it, elements in the DOM,
   JS heap used; then, each from the event to the first matching cards in the DOM and to the full
   page of 50: a status filter (failed, 10%), a rare-word search (one item: its number) and a
   common two-word search (`lighthouse dawn`, ~30% of items), and the data files the page loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _harness import batcher_revision, command_line, markdown_table  # noqa: E402

import batcher  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run", "--disable-sync"]


def tiny_png(width: int = 8, height: int = 8) -> bytes:
    """A valid grey PNG, written once and hard-linked for every image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\x80\x80\x80" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


PNG = tiny_png()
WORDS = ("astronaut koi nebula lighthouse storm fox snow ukiyo-e watercolor portrait city night neon forest "
         "river dawn cathedral robot garden desert").split()


def synthetic_out(root: Path, n: int) -> Path:
    images = root / "images"
    images.mkdir(parents=True)
    seed = images / ".seed.png"
    with open(root / "manifest.json", "w", encoding="utf-8") as fh:
        counts = {"done": 0, "failed": 0, "pending": 0}
        statuses = ["done" if k % 20 < 17 else "failed" if k % 20 < 19 else "pending" for k in range(n)]
        for s in statuses:
            counts[s] += 1
        fh.write('{"version": 1, "job": {"name": "bench"}, "summary": %s, "items": [' % json.dumps(
            {"total": n, **counts}))
        for k, status in enumerate(statuses):
            if k % 60_000 == 0:  # ext4 allows ~65,000 hard links per inode: a fresh source now and then
                seed = images / f".seed-{k}.png"
                seed.write_bytes(PNG)
            words = " ".join(WORDS[(k * 7 + j) % len(WORDS)] for j in range(30))
            prompt = f"Item {k}: {words}, <detailed> & \"quoted\""
            item = {"id": f"item-{k:06d}", "status": status, "request": {"prompt": prompt, "model": "grok-imagine",
                                                                        "size": "1024x1024"},
                    "created": 1_790_000_000 + k, "images": [], "attempts": 1, "error": None,
                    "vars": {"subject": WORDS[k % len(WORDS)], "style": WORDS[(k // 3) % len(WORDS)]},
                    "cost": 0.07, "finished": "2026-11-25T09:00:00.000Z"}
            if status == "done":
                for j in range(2 if k % 10 == 0 else 1):
                    name = f"item-{k:06d}_{j + 1}.png" if k % 10 == 0 else f"item-{k:06d}.png"
                    os.link(seed, images / name)
                    item["images"].append({"file": f"images/{name}", "revised_prompt": "Revised: " + prompt,
                                           "width": 8, "height": 8, "bytes": len(PNG)})
            elif status == "failed":
                item["error"] = {"kind": "permanent", "status": 400, "code": "content_policy_violation",
                                 "message": "Your request was rejected as a result of our safety system."}
            fh.write(("\n" if k == 0 else ",\n") + json.dumps(item, ensure_ascii=False))
        fh.write("\n]}\n")
    return root


def time_export(out: Path, fmt: str, to: Path) -> tuple[float, float]:
    started = time.perf_counter()
    batcher.export(out, fmt, to)
    seconds = time.perf_counter() - started
    tracemalloc.start()
    batcher.export(out, fmt, to)  # replaces the first export
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return seconds, peak / 2**20


def time_report(out: Path) -> tuple[float, float]:
    """`batcher.report(out)` in its own process: wall seconds and peak RSS in MB (os.wait4)."""
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", "import sys, batcher; batcher.report(sys.argv[1])", str(out)],
                            cwd=Path(__file__).resolve().parent.parent)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"report() failed on {out}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024


PROBE = """async (rare) => {
  const nav = performance.getEntriesByType("navigation")[0];
  const fcp = performance.getEntriesByName("first-contentful-paint")[0];
  const loaded = {first: window.__firstCards, dcl: nav.domContentLoadedEventEnd, fcp: fcp ? fcp.startTime : -1,
                  elements: document.getElementsByTagName("*").length};
  const sel = document.getElementById("filter"), q = document.getElementById("q");
  const html = document.documentElement;
  // one view change: ms to its first cards in the DOM and to its full page (data-view set)
  async function change(filter, query) {
    const want = filter + "|" + query;
    window.__firstCards = undefined;
    const done = new Promise((resolve) => {
      const mo = new MutationObserver(() => { if (html.dataset.view === want) { mo.disconnect(); resolve(); } });
      mo.observe(html, {attributes: true});
    });
    const t = performance.now();
    sel.value = filter; q.value = query; sel.dispatchEvent(new Event("change"));
    await done;
    const all = performance.now() - t;
    const first = window.__firstCards === undefined ? all : window.__firstCards - t;
    return [first, all, document.querySelectorAll("article.card").length];
  }
  const filter = await change("failed", "");
  const rareSearch = await change("all", rare);
  const search = await change("all", "lighthouse dawn");
  return {...loaded, filter, rareSearch, search,
          heap: performance.memory ? performance.memory.usedJSHeapSize : null};
}"""


def browse(browser, page_path: Path, repeat: int, rare: str) -> dict:
    runs = []
    for _ in range(repeat):
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        scripts: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda r: r.url.endswith(".js") and scripts.append(r.url))
        started = time.perf_counter()
        page.goto(page_path.as_uri(), wait_until="commit", timeout=120_000)
        page.wait_for_selector("html[data-ready]", timeout=120_000)
        waited = (time.perf_counter() - started) * 1000
        cards = page.eval_on_selector_all("article.card", "els => els.length")
        probe = page.evaluate(PROBE, rare)
        page.close()
        if errors:
            raise SystemExit(f"page errors: {errors}")
        runs.append({**probe, "waited": waited, "cards": cards, "files": len(scripts)})
    def median(key: str, pos: int | None = None) -> float:
        return statistics.median(r[key] if pos is None else r[key][pos] for r in runs)

    out = {k: median(k) for k in runs[0] if isinstance(runs[0][k], (int, float))}
    for k in ("filter", "rareSearch", "search"):
        out[k] = [median(k, 0), median(k, 1), runs[0][k][2]]
    out["heap"] = median("heap") if runs[0]["heap"] is not None else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", default="1000,10000", help="comma-separated sizes (default 1000,10000)")
    parser.add_argument("--repeat", type=int, default=3, help="page loads per size (median)")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--keep", action="store_true", help="keep the generated folders")
    parser.add_argument("--export-max", type=int, default=10_000, help="time exports only up to this many items")
    args = parser.parse_args()
    sizes = [int(s) for s in args.items.split(",")]
    from playwright.sync_api import sync_playwright

    rows: list[list] = []
    exports: list[list] = []
    tmp = Path(tempfile.mkdtemp(prefix="batcher-bench-report-"))
    try:
        outs = {}
        for n in sizes:
            print(f"generating {n} items ...", file=sys.stderr)
            outs[n] = synthetic_out(tmp / f"out-{n}", n)
        measured = {}
        for n in sizes:
            print(f"report() and exports on {n} items ...", file=sys.stderr)
            measured[n] = time_report(outs[n])
            for fmt in batcher._export.FORMATS if n <= args.export_max else ():
                seconds, peak_mb = time_export(outs[n], fmt, tmp / f"{fmt}-{n}")
                exports.append([n, fmt, round(seconds, 3), round(peak_mb, 2)])
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            for n in sizes:
                print(f"chromium on {n} items ...", file=sys.stderr)
                page = outs[n] / "report.html"
                b = browse(browser, page, args.repeat, str(n // 2 + 1))  # "Item {k}:" — one item's number
                seconds, peak_mb = measured[n]
                data = sum(f.stat().st_size for f in (outs[n] / "report-data").rglob("*") if f.is_file())
                ms = lambda v: f"{round(v[0])} / {round(v[1])} ({v[2]})"  # noqa: E731
                rows.append([n, round(page.stat().st_size / 2**10, 1), round(data / 2**20, 1), round(seconds, 1),
                             round(peak_mb, 1), round(b["first"]), round(b["fcp"]), round(b["waited"]),
                             b["elements"], round(b["heap"] / 2**20, 1) if b["heap"] else "n/a",
                             ms(b["filter"]), ms(b["rareSearch"]), ms(b["search"]), round(b["files"])])
            browser.close()
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}", file=sys.stderr)
    print(markdown_table(
        ["items", "page KB", "report-data MB", "report() s", "report() peak RSS MB", "first cards ms", "first paint ms",
         "load waited ms", "DOM elements", "JS heap MB", "filter failed: first / page ms (cards)",
         "rare word: first / page ms (cards)", "`lighthouse dawn`: first / page ms (cards)", "data files loaded"],
        rows))
    print()
    print(markdown_table(["items", "export format", "export s", "export peak MB"], exports))
    print()
    print(f"`{command_line()}` — batcher {batcher_revision()}; chromium {args.chromium}; median of {args.repeat} "
          f"loads; 'first cards ms' is the page's performance.now() when its first cards are in the DOM; "
          f"filter/search: from the change event to the first matching cards / to the full page of 50.")


if __name__ == "__main__":
    main()
