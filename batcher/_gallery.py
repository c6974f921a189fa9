"""`batcher report OUT`: one static HTML page to look through a job's items.

    >>> batcher.report("output/example")
    PosixPath('output/example/report.html')

The page is self-contained (inline CSS and JS, no framework, no network; a Content-Security-Policy
allows only its own script, by hash) and opens from disk. Items are embedded once as JSON and
rendered as cards a page at a time while the reader scrolls, so 10,000 items cost one JSON parse,
not 10,000 DOM subtrees up front. Every user string reaches the DOM through `textContent`, never
as markup; the embedded JSON escapes `<`, `>`, `&`, U+2028 and U+2029 so no prompt can close the
`<script>` element that holds it.

Writing streams the manifest (constant memory) into a temporary file renamed into place; for an
output in object storage (`s3://...`) that file is then put into the store as `report.html`.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ._output import FolderOutput, OutputReader, is_inside, open_output
from ._records import failure_code

__all__ = ["report"]

REPORT_NAME = "report.html"

# Inside <script> the HTML parser only looks for `</script` and `<!--`: escaping these characters
# (valid JSON escapes) keeps any prompt inert; U+2028/9 are escaped for older JS parsers.
_SCRIPT_SAFE = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026",
                              "\u2028": "\\u2028", "\u2029": "\\u2029"})


def script_json(obj: Any) -> str:
    """JSON that is safe to embed inside a `<script>` element."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).translate(_SCRIPT_SAFE)


def report(out: str | Path) -> Path | str:
    """Write `OUT/report.html` from `OUT/manifest.json`; return its path (its URL in object storage).

    In object storage the page is built in a local temporary file, then put in one request that
    replaces any earlier report (readers see the old page or the new one, never part of one).
    """
    reader = open_output(out)
    if isinstance(reader, FolderOutput):
        return _write(reader, reader.root)
    with tempfile.TemporaryDirectory(prefix="batcher-report-") as tmp:
        path = _write(reader, Path(tmp))
        return reader.put(REPORT_NAME, path)


def _write(reader: OutputReader, folder: Path) -> Path:
    """Write the report of `reader`'s manifest as `folder/report.html` (temp file, then rename)."""
    header, items = reader.manifest()
    job: dict[str, Any] = header["job"] if isinstance(header.get("job"), dict) else {}
    title = f"batcher report: {job.get('name') or reader.name}"
    summary: dict[str, Any] = {"total": 0, "done": 0, "failed": 0, "pending": 0, "images": 0, "cost": None,
                               "codes": {}}
    path = folder / REPORT_NAME
    tmp = folder / f".{REPORT_NAME}.tmp-{os.getpid()}"
    try:
        # backslashreplace: a lone surrogate (legal in JSON escapes) becomes a JSON escape again
        with open(tmp, "w", encoding="utf-8", errors="backslashreplace") as fh:
            fh.write(_HEAD.replace("{csp}", _CSP).replace("{title}", html.escape(title)))
            fh.write('<script type="application/json" id="items">[')
            sep = "\n"
            for item in items:
                fh.write(sep + script_json(_card(item, summary)))
                sep = ",\n"
            fh.write('\n]</script>\n<script type="application/json" id="summary-data">')
            fh.write(script_json(summary))
            fh.write("</script>\n<script>" + _SCRIPT + "</script>\n</body>\n</html>\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _card(item: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """What one card shows, with short keys (10,000 of them are embedded)."""
    status = item["status"]
    summary["total"] += 1
    summary[status] += 1
    request: dict[str, Any] = item["request"] if isinstance(item.get("request"), dict) else {}
    card: dict[str, Any] = {"id": item["id"], "s": status, "p": request.get("prompt"), "m": request.get("model"),
                            "z": request.get("size"), "a": item.get("attempts"), "f": item.get("finished")}
    images = []
    for image in item.get("images") or []:
        file = image.get("file") if isinstance(image, dict) else None
        if not is_inside(file):
            continue  # only paths inside OUT become links
        images.append([file, image.get("revised_prompt"), image.get("width"), image.get("height")])
    if images:
        card["i"] = images
        if status == "done":
            summary["images"] += len(images)
    if isinstance(item.get("vars"), dict) and item["vars"]:
        card["v"] = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in item["vars"].items()}
    if isinstance(item.get("cost"), (int, float)):
        card["c"] = item["cost"]
        summary["cost"] = (summary["cost"] or 0) + item["cost"]
    if item.get("endpoint"):
        card["e"] = str(item["endpoint"])
    error = item.get("error")
    if status == "failed" and isinstance(error, dict):
        card["x"] = {"code": error.get("code"), "status": error.get("status"), "kind": error.get("kind"),
                     "message": error.get("message")}
        code = str(failure_code(error))
        summary["codes"][code] = summary["codes"].get(code, 0) + 1
    return card


_CSS = """
:root{--bg:#f6f6f4;--fg:#1d1d1b;--mute:#6b6b66;--card:#fff;--line:#e2e2dc;--ok:#237a3b;--bad:#b3261e;--wait:#8a6d00}
*{box-sizing:border-box}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;background:var(--bg);color:var(--fg)}
header{position:sticky;top:0;z-index:2;background:var(--bg);border-bottom:1px solid var(--line);padding:12px 20px}
h1{font-size:18px;margin:0 0 6px}
#summary{display:flex;flex-wrap:wrap;gap:6px 18px;color:var(--mute)}
#summary b{color:var(--fg);font-variant-numeric:tabular-nums}
#codes{color:var(--bad)}
.controls{display:flex;gap:10px;align-items:center;margin-top:8px}
.controls input{flex:1;max-width:480px;padding:6px 8px;border:1px solid var(--line);border-radius:6px}
.controls select{padding:6px;border:1px solid var(--line);border-radius:6px}
#shown{color:var(--mute)}
main{display:grid;grid-template-columns:1fr;gap:12px;padding:16px 20px}
.card{display:flex;gap:14px;background:var(--card);border:1px solid var(--line);border-radius:8px;padding:12px;
 content-visibility:auto;contain-intrinsic-size:auto 190px}
.thumbs{display:flex;gap:6px;flex:0 0 auto}
.thumbs img{width:160px;height:160px;object-fit:contain;background:#eee;border-radius:4px;display:block}
.noimg{width:160px;height:160px;display:flex;align-items:center;justify-content:center;background:#f0efe9;
 color:var(--mute);border-radius:4px}
.body{flex:1;min-width:0}
.meta{display:flex;flex-wrap:wrap;gap:4px 12px;color:var(--mute);font-size:12px}
.meta code{color:var(--fg)}
.status{font-weight:600;text-transform:uppercase;font-size:11px;letter-spacing:.04em}
.st-done{color:var(--ok)}.st-failed{color:var(--bad)}.st-pending{color:var(--wait)}
.prompts{display:grid;grid-template-columns:1fr 1fr;gap:12px;margin-top:6px}
.prompts h3{margin:0;font-size:11px;color:var(--mute);font-weight:600;text-transform:uppercase}
.prompts p{margin:2px 0 0;white-space:pre-wrap;overflow-wrap:anywhere}
.vars{display:flex;flex-wrap:wrap;gap:4px;margin:6px 0 0;padding:0;list-style:none}
.vars li{background:#eef1f6;border-radius:4px;padding:1px 6px;font-size:12px}
.error{margin-top:6px;color:var(--bad);white-space:pre-wrap;overflow-wrap:anywhere}
#more{height:1px}
@media (max-width:800px){.card{flex-direction:column}.prompts{grid-template-columns:1fr}}
"""

_SCRIPT = r"""
"use strict";
(() => {
const ITEMS = JSON.parse(document.getElementById("items").textContent);
const SUM = JSON.parse(document.getElementById("summary-data").textContent);
const PAGE = 50;
const $ = (id) => document.getElementById(id);
const el = (tag, cls, text) => {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = String(text);
  return e;
};
for (const k of ["total", "done", "failed", "pending", "images"]) $("n-" + k).textContent = SUM[k].toLocaleString("en");
$("n-cost").textContent = SUM.cost === null ? "n/a" : "$" + SUM.cost.toFixed(2);
const codes = Object.entries(SUM.codes).map(([c, n]) => c + " ×" + n).join(", ");
$("codes").textContent = codes ? "failed: " + codes : "";

// a manifest path inside OUT -> a relative URL (each segment encoded, so no scheme or query sneaks in)
const href = (file) => file.split("/").map(encodeURIComponent).join("/");

function card(it) {
  const c = el("article", "card");
  c.dataset.id = it.id;
  c.dataset.status = it.s;
  const thumbs = el("div", "thumbs");
  if (it.i) {
    it.i.forEach((im, k) => {
      const a = el("a");
      a.href = href(im[0]);
      const img = el("img");
      img.loading = "lazy";
      img.decoding = "async";
      img.alt = "image " + (k + 1) + " of " + it.id;
      if (im[2] && im[3]) { img.width = im[2]; img.height = im[3]; }
      img.src = href(im[0]);
      a.append(img);
      thumbs.append(a);
    });
  } else {
    thumbs.append(el("div", "noimg", it.s === "failed" ? "failed" : "no image"));
  }
  const body = el("div", "body");
  const meta = el("div", "meta");
  meta.append(el("span", "status st-" + it.s, it.s), el("code", "id", it.id));
  if (it.m) meta.append(el("span", "", it.m));
  if (it.z) meta.append(el("span", "", it.z));
  if (it.a) meta.append(el("span", "", it.a + " attempt" + (it.a > 1 ? "s" : "")));
  if (it.c !== undefined) meta.append(el("span", "", "~$" + Number(it.c).toFixed(3)));
  if (it.e) meta.append(el("span", "", it.e));
  if (it.f) meta.append(el("span", "", it.f));
  const prompts = el("div", "prompts");
  const left = el("div"), right = el("div");
  left.append(el("h3", "", "prompt"), el("p", "prompt", it.p));
  const revised = it.i ? [...new Set(it.i.map((im) => im[1]).filter(Boolean))] : [];
  right.append(el("h3", "", "revised prompt"), el("p", "revised", revised.length ? revised.join("\n\n") : "—"));
  prompts.append(left, right);
  body.append(meta, prompts);
  if (it.v) {
    const ul = el("ul", "vars");
    for (const [k, v] of Object.entries(it.v)) ul.append(el("li", "", k + ": " + v));
    body.append(ul);
  }
  if (it.x) {
    const where = [it.x.code, it.x.status ? "HTTP " + it.x.status : null, it.x.kind].filter(Boolean).join(", ");
    body.append(el("div", "error", where + ": " + (it.x.message || "")));
  }
  c.append(thumbs, body);
  return c;
}

const hay = new Array(ITEMS.length);
function haystack(i) {
  if (hay[i] === undefined) {
    const it = ITEMS[i];
    const parts = [it.id, it.p, it.m, it.e];
    if (it.i) for (const im of it.i) parts.push(im[1]);
    if (it.v) for (const [k, v] of Object.entries(it.v)) parts.push(k + ": " + v);
    if (it.x) parts.push(it.x.code, it.x.message);
    hay[i] = parts.filter((p) => p !== null && p !== undefined).join("\n").toLowerCase();
  }
  return hay[i];
}

const cards = $("cards"), sentinel = $("more");
let view = [], rendered = 0;
function renderMore() {
  const end = Math.min(view.length, rendered + PAGE);
  const frag = document.createDocumentFragment();
  for (let k = rendered; k < end; k++) frag.append(card(ITEMS[view[k]]));
  cards.append(frag);
  rendered = end;
  $("shown").textContent = "showing " + view.length.toLocaleString("en") + " of " + ITEMS.length.toLocaleString("en");
  // observe afresh: if the sentinel is still in view, the observer fires again and renders more
  io.unobserve(sentinel);
  if (rendered < view.length) io.observe(sentinel);
}
const io = new IntersectionObserver((entries) => {
  if (entries.some((e) => e.isIntersecting) && rendered < view.length) renderMore();
}, {rootMargin: "1200px 0px"});

function apply() {
  const status = $("filter").value;
  const words = $("q").value.toLowerCase().split(/\s+/).filter(Boolean);
  view = [];
  for (let i = 0; i < ITEMS.length; i++) {
    if (status !== "all" && ITEMS[i].s !== status) continue;
    if (words.length) { const h = haystack(i); if (!words.every((w) => h.includes(w))) continue; }
    view.push(i);
  }
  cards.replaceChildren();
  rendered = 0;
  renderMore();
  document.documentElement.dataset.view = status + "|" + $("q").value;
}
let timer = 0;
$("q").addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(apply, 120); });
$("filter").addEventListener("change", apply);
apply();
window.__firstRender = performance.now();
document.documentElement.dataset.ready = "1";
})();
"""


def _sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# Only this page's own script and style run: an injected <script> or on* handler would be refused
# by the browser even if escaping ever failed. Images: relative files only.
_CSP = (f"default-src 'none'; img-src 'self' file: data:; style-src {_sha256_source(_CSS)}; "
        f"script-src {_sha256_source(_SCRIPT)}; base-uri 'none'; form-action 'none'")

_HEAD = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{csp}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{title}</title>
<style>""" + _CSS + """</style>
</head>
<body>
<header>
<h1>{title}</h1>
<div id="summary">
<span><b id="n-total">…</b> items</span><span><b id="n-done">…</b> done</span>
<span><b id="n-failed">…</b> failed</span><span><b id="n-pending">…</b> pending</span>
<span><b id="n-images">…</b> images</span><span>estimated cost <b id="n-cost">…</b></span>
<span id="codes"></span>
</div>
<div class="controls">
<label>status <select id="filter">
<option value="all">all</option><option value="done">done</option>
<option value="failed">failed</option><option value="pending">pending</option>
</select></label>
<input id="q" type="search" placeholder="search prompts, revised prompts, ids, variables, errors" autocomplete="off">
<span id="shown"></span>
</div>
</header>
<noscript><p>This report renders its items with JavaScript; the data is in the page source and in manifest.json.</p></noscript>
<main id="cards"></main>
<div id="more"></div>
"""
