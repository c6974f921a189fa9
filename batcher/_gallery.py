"""`batcher report OUT`: a static HTML page to look through a job's items, however many there are.

    >>> batcher.report("output/example")
    PosixPath('output/example/report.html')

`report.html` is small (CSS, one script, the summary); the items live beside it in
`report-data/<version>/` as JavaScript files the page loads on demand with `<script>` elements
(a file:// page can't `fetch()`):

    c-000000.js ...   the cards, CHUNK items each: the first cards need report.html + one chunk
    facets.js         one character per item for its status and one for its failure code, so a
                      status/code filter is one scan of two strings (2 MB at 1,000,000 items)
    w-000.js ...      the search index: every word (case-folded runs of letters and digits) of an item's id,
                      prompts, model, endpoint, vars and error, with the items that hold it (a
                      delta list, or a bitmap for common words), split into buckets by CRC-32 of
                      the word; a search loads one bucket per query word

So a 1,000,000-item report opens as fast as a 100-item one, and a filter or search touches a few
files, not the data. A search matches items holding every query word (whole words, not substrings).

The page runs no inline script but its own, by hash; `'strict-dynamic'` lets that script (and
only it) add the data scripts. Every user string reaches the DOM through `textContent`, never as
markup. The data directory's name is a digest of its contents, so a page never mixes two
reports' files; the page is replaced last (readers see the old report or the new one).

Writing streams the manifest: memory holds the words of one item and a cache of word hashes,
not the items. For an output in object storage (`s3://...`) the files are built locally, then
put through the output's reader, `report.html` last.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import re
import shutil
import tempfile
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ._output import FolderOutput, OutputReader, is_inside, open_output
from ._records import failure_code

__all__ = ["report"]

REPORT_NAME = "report.html"
DATA_DIR = "report-data"
CHUNK = 256  # cards per data file: ~80 KB, so 50 results scattered over 50 chunks still load quickly
STATUS_CHAR = {"done": "d", "failed": "f", "pending": "p"}
CODE_BASE = 0x100  # failure code k is chr(CODE_BASE + k) in facets.js: never a JSON escape or a quote
MAX_CODES = 4000  # distinct failure codes kept apart; the rest share the last one ("other")
# the page's /[\p{L}\p{N}]+/gu: runs of str.isalnum() characters (`content_policy_violation` is 3 words)
_WORD = re.compile(r"[^\W_]+")

# Inside <script> the HTML parser only looks for `</script` and `<!--`: escaping these characters
# (valid JSON escapes) keeps any prompt inert; U+2028/9 are escaped for older JS parsers.
# str.replace, not str.translate: ~10x faster on the long lines a million cards make.
_SCRIPT_SAFE = (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029"))


def script_json(obj: Any) -> str:
    """JSON that is safe to embed inside a `<script>` element (and as a JS expression)."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    for char, escape in _SCRIPT_SAFE:
        if char in text:
            text = text.replace(char, escape)
    return text


def report(out: str | Path) -> Path | str:
    """Write `OUT/report.html` and `OUT/report-data/` from OUT's manifest; return the page's path
    (its URL in object storage).

    In object storage the files are built in a local temporary folder, then put one by one, the
    page last, in one request that replaces any earlier page.
    """
    reader = open_output(out)
    reader.manifest()[1].close()  # a missing or foreign manifest fails before anything is written
    if isinstance(reader, FolderOutput):
        return _write_folder(reader)
    with tempfile.TemporaryDirectory(prefix="batcher-report-") as tmp:
        page, version, data = _build(reader, Path(tmp))
        for name in sorted(os.listdir(data)):
            reader.put(f"{DATA_DIR}/{version}/{name}", data / name)
        return reader.put(REPORT_NAME, page)


def _write_folder(reader: FolderOutput) -> Path:
    """Build in `OUT/report-data/.tmp-*`, move the data into place, then the page; drop older data."""
    root = reader.root / DATA_DIR
    root.mkdir(exist_ok=True)
    tmp = root / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        page, version, data = _build(reader, tmp)
        final = root / version
        if final.is_dir():
            shutil.rmtree(data)  # the same contents are already there (the name is their digest)
        else:
            os.rename(data, final)
        os.replace(page, reader.root / REPORT_NAME)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for entry in root.iterdir():  # older reports' data, and what killed reports left
        if entry.name != version and entry.is_dir() and _stale(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
    return reader.root / REPORT_NAME


def _stale(name: str) -> bool:
    from ._export import _alive

    match = re.fullmatch(r"\.tmp-(\d+)-[0-9a-f]{8}", name)
    return not _alive(int(match.group(1))) if match else re.fullmatch(r"[0-9a-f]{16}", name) is not None


class _Data:
    """The data files of one report, written into `folder` while their digest (the version) grows."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.digest = hashlib.sha256()

    def write(self, name: str, text: str) -> None:
        data = text.encode("utf-8", "backslashreplace")  # a lone surrogate becomes a JS escape again
        self.digest.update(name.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
        with open(self.folder / name, "wb") as fh:
            fh.write(data)

    def script(self, name: str, payload: str) -> None:
        """A data file: it hands `payload` (a JS literal) to the page under its own name."""
        self.write(name, f"__batcherReport.data({json.dumps(name)},\n{payload}\n);\n")


def _build(reader: OutputReader, folder: Path) -> tuple[Path, str, Path]:
    """Write the page as `folder/report.html` and its data in `folder/data/`; (page, version, data)."""
    header, items = reader.manifest()
    job: dict[str, Any] = header["job"] if isinstance(header.get("job"), dict) else {}
    title = f"batcher report: {job.get('name') or reader.name}"
    summary: dict[str, Any] = {"total": 0, "done": 0, "failed": 0, "pending": 0, "images": 0, "cost": None,
                               "codes": {}}
    data_dir = folder / "data"
    data_dir.mkdir()
    data = _Data(data_dir)
    expected = (header.get("summary") or {}).get("total") if isinstance(header.get("summary"), dict) else None
    index = _WordIndex(folder / "words", _bucket_count(expected))
    codes: dict[str, int] = {}
    from ._segments import batched  # a manifest module: not loaded for a run
    with open(folder / "status", "w", encoding="utf-8") as st, open(folder / "code", "w", encoding="utf-8") as cf:
        for n, chunk in enumerate(batched(items, CHUNK)):
            cards = []
            for k, item in enumerate(chunk):
                card = _card(item, summary)
                cards.append(script_json(card))
                index.add(n * CHUNK + k, _words(card))
                st.write(STATUS_CHAR[card["s"]])
                if "x" in card:  # a failure with an error: counted in the summary's codes too
                    code = str(failure_code(item["error"]))
                    slot = codes.setdefault(code, min(len(codes), MAX_CODES - 1))
                    cf.write(chr(CODE_BASE + slot))
                else:
                    cf.write(" ")
            data.script(_chunk_name(n), "[" + ",\n".join(cards) + "]")
    total = summary["total"]
    data.script("facets.js", '{"s":' + script_json(Path(folder / "status").read_text(encoding="utf-8"))
                + ',"c":' + script_json(Path(folder / "code").read_text(encoding="utf-8"))
                + ',"codes":' + script_json(_code_names(codes)) + "}")
    for bucket, words in index.buckets(total):
        data.script(_bucket_name(bucket), words)
    version = data.digest.hexdigest()[:16]
    meta = {"dir": f"{DATA_DIR}/{version}/", "n": total, "chunk": CHUNK, "buckets": index.count}
    page = folder / REPORT_NAME
    with open(page, "w", encoding="utf-8", errors="backslashreplace") as fh:
        fh.write(_HEAD.replace("{csp}", _CSP).replace("{title}", html.escape(title)))
        fh.write('<script type="application/json" id="summary-data">' + script_json(summary) + "</script>\n")
        fh.write('<script type="application/json" id="report-meta">' + script_json(meta) + "</script>\n")
        fh.write("<script>" + _SCRIPT + "</script>\n</body>\n</html>\n")
    return page, version, data_dir


def _chunk_name(n: int) -> str:
    return f"c-{n:06d}.js"


def _bucket_name(n: int) -> str:
    return f"w-{n:03d}.js"


def _code_names(codes: dict[str, int]) -> list[str]:
    names = [""] * len(set(codes.values()))
    for code, slot in codes.items():
        names[slot] = code if len(codes) <= MAX_CODES or slot < MAX_CODES - 1 else "other"
    return names


def _bucket_count(expected: Any) -> int:
    """Word buckets: about 4,000 items' words per bucket, a power of two from 1 to 512."""
    if not isinstance(expected, int) or expected < 0:
        return 256
    count = 1
    while count < 512 and count * 4000 < expected:
        count *= 2
    return count


def _words(card: dict[str, Any]) -> set[str]:
    """The searchable words of a card: what the page shows of it, case-folded."""
    parts = [card["id"], card.get("p"), card.get("m"), card.get("e")]
    for image in card.get("i") or ():
        parts.append(image[1])
    for k, v in (card.get("v") or {}).items():
        parts.append(f"{k} {v}")
    if card.get("x"):
        parts += [card["x"].get("code"), card["x"].get("kind"), card["x"].get("message")]
    return set(_WORD.findall(" ".join(p for p in parts if isinstance(p, str)).lower()))


class _WordIndex:
    """Word -> items, spilled to one temporary file per bucket so memory does not grow with items."""

    BUFFERED = 1 << 17  # (word, item) lines held across all buckets before they all go to their files

    def __init__(self, folder: Path, count: int) -> None:
        self.folder = folder
        self.count = count
        folder.mkdir()
        self._buffers: list[list[str]] = [[] for _ in range(count)]
        self._held = 0
        self._bucket_of: dict[str, int] = {}  # a cache: CRC-32 per word, not per occurrence

    def bucket(self, word: str) -> int:
        b = self._bucket_of.get(word)
        if b is None:
            if len(self._bucket_of) > 200_000:
                self._bucket_of.clear()  # bounded: a huge vocabulary costs CRCs, not memory
            b = self._bucket_of[word] = zlib.crc32(word.encode("utf-8", "surrogatepass")) % self.count
        return b

    def add(self, item: int, words: set[str]) -> None:
        tail = f"\t{item}\n"
        for word in words:
            b = self._bucket_of.get(word)
            if b is None:
                b = self.bucket(word)
            self._buffers[b].append(word + tail)
        self._held += len(words)
        if self._held >= self.BUFFERED:  # one budget for all buckets: memory doesn't grow with their count
            for b in range(self.count):
                self._flush(b)
            self._held = 0

    def _flush(self, b: int) -> None:
        with open(self.folder / str(b), "a", encoding="utf-8", errors="surrogatepass") as fh:
            fh.writelines(self._buffers[b])
        self._buffers[b].clear()

    def buckets(self, total: int) -> Iterator[tuple[int, str]]:
        """(bucket, JS literal [[word, posting], ...]) for every bucket, one in memory at a time."""
        for b in range(self.count):
            self._flush(b)
            postings: dict[str, list[int]] = {}
            with open(self.folder / str(b), encoding="utf-8", errors="surrogatepass") as fh:
                for line in fh:
                    word, _, item = line.rstrip("\n").rpartition("\t")
                    postings.setdefault(word, []).append(int(item))
            os.unlink(self.folder / str(b))
            # pairs, not an object literal: a word like `__proto__` stays a word
            yield b, "[" + ",\n".join(f"[{script_json(w)},{_posting(p, total)}]" for w, p in postings.items()) + "]"


def _posting(items: list[int], total: int) -> str:
    """Items (ascending) as the smaller of a base-36 delta list ("d") and a base64 bitmap ("b", bit i of byte i>>3)."""
    if len(items) * 12 > total:  # a delta list costs >= 2 characters an item, a bitmap 1/6
        bits = bytearray((total + 7) // 8)
        for i in items:
            bits[i >> 3] |= 1 << (i & 7)
        return '["b","' + base64.b64encode(bits).decode() + '"]'
    out, last = [], 0
    for i in items:
        out.append(_base36(i - last))
        last = i
    return '["d","' + ",".join(out) + '"]'


def _base36(n: int) -> str:
    if n < 36:
        return "0123456789abcdefghijklmnopqrstuvwxyz"[n]
    digits = []
    while n:
        n, r = divmod(n, 36)
        digits.append("0123456789abcdefghijklmnopqrstuvwxyz"[r])
    return "".join(reversed(digits))


def _card(item: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """What one card shows, with short keys (a chunk holds CHUNK of them)."""
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
const $ = (id) => document.getElementById(id);
const SUM = JSON.parse($("summary-data").textContent);
const META = JSON.parse($("report-meta").textContent);
const N = META.n, CHUNK = META.chunk, PAGE = 50;
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
for (const c of Object.keys(SUM.codes)) {
  const o = el("option", "", "failed: " + c);
  o.value = "code:" + c;
  $("filter").append(o);
}

// -- data files: script elements added by this script (file:// pages can't fetch) --------------
const files = new Map(), waiting = new Map();
window.__batcherReport = Object.freeze({data(name, value) {
  const w = waiting.get(name);
  if (w) { waiting.delete(name); w(value); }
}});
function load(name) {
  let p = files.get(name);
  if (!p) {
    p = new Promise((resolve, reject) => {
      waiting.set(name, resolve);
      const s = document.createElement("script");
      s.src = META.dir + name;
      s.async = true;
      s.onload = () => { s.remove(); if (waiting.has(name)) { waiting.delete(name); reject(new Error(name + ": no data")); } };
      s.onerror = () => { s.remove(); waiting.delete(name); files.delete(name); reject(new Error("could not load " + META.dir + name)); };
      document.head.append(s);
    });
    files.set(name, p);
  }
  return p;
}
const pad = (n, w) => String(n).padStart(w, "0");
const chunkOf = (i) => load("c-" + pad(Math.floor(i / CHUNK), 6) + ".js");

// -- cards ---------------------------------------------------------------------------------------
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

// -- search: words -> bitmaps of items (the index is split in buckets by CRC-32 of the word) ------
const CRC = new Int32Array(256).map((_, n) => {
  let c = n;
  for (let k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320 ^ (c >>> 1) : c >>> 1;
  return c;
});
function crc32(text) {
  let c = -1;
  for (const b of new TextEncoder().encode(text)) c = CRC[(c ^ b) & 255] ^ (c >>> 8);
  return (c ^ -1) >>> 0;
}
const BYTES = (N + 7) >> 3;
const decoded = new Map(), buckets = new Map();
function bitmap(posting) {
  const bits = new Uint8Array(BYTES);
  if (!posting) return bits;
  if (posting[0] === "b") {
    const raw = atob(posting[1]);
    for (let k = 0; k < raw.length; k++) bits[k] = raw.charCodeAt(k);
  } else {
    let i = 0;
    for (const d of posting[1].split(",")) { i += parseInt(d, 36); bits[i >> 3] |= 1 << (i & 7); }
  }
  return bits;
}
async function wordBits(word) {
  if (!decoded.has(word)) {
    const name = "w-" + pad(crc32(word) % META.buckets, 3) + ".js";
    if (!buckets.has(name)) buckets.set(name, new Map(await load(name)));
    decoded.set(word, bitmap(buckets.get(name).get(word)));
  }
  return decoded.get(word);
}
const words = (q) => [...new Set(q.toLowerCase().match(/[\p{L}\p{N}]+/gu) || [])];

// -- the view: which items, in order (null: all of them) -----------------------------------------
async function select(filter, q) {
  const ws = words(q);
  if (filter === "all" && !ws.length) return null;
  const [facets, ...maps] = await Promise.all([filter === "all" ? null : load("facets.js"), ...ws.map(wordBits)]);
  let bits = null;
  if (maps.length) {
    bits = maps[0].slice();
    for (const m of maps.slice(1)) for (let k = 0; k < BYTES; k++) bits[k] &= m[k];
  }
  let str = null, want = 0;
  if (facets) {
    if (filter.startsWith("code:")) {
      const slot = facets.codes.indexOf(filter.slice(5));
      if (slot < 0) return new Int32Array(0);
      [str, want] = [facets.c, 0x100 + slot];
    } else {
      const ch = {done: "d", failed: "f", pending: "p"}[filter];  // as facets.js writes them
      if (!ch) return new Int32Array(0);
      [str, want] = [facets.s, ch.charCodeAt(0)];
    }
  }
  const out = new Int32Array(N);
  let n = 0;
  if (bits) {
    for (let k = 0; k < BYTES; k++) {
      const b = bits[k];
      if (!b) continue;
      for (let j = 0; j < 8; j++) {
        const i = (k << 3) + j;
        if (b & (1 << j) && i < N && (!str || str.charCodeAt(i) === want)) out[n++] = i;
      }
    }
  } else {
    for (let i = 0; i < N; i++) if (str.charCodeAt(i) === want) out[n++] = i;
  }
  return out.subarray(0, n);
}

const cards = $("cards"), sentinel = $("more");
let view = null, rendered = 0, gen = 0, busy = false;
const size = () => (view ? view.length : N);
const at = (k) => (view ? view[k] : k);

// Render the next PAGE cards of the view in order, each chunk's as soon as it has loaded.
async function renderMore() {
  if (busy || rendered >= size()) return;
  busy = true;
  const g = gen, start = rendered, end = Math.min(size(), start + PAGE);
  try {
    const wanted = [];
    for (let k = start; k < end; k++) wanted.push(at(k));
    const loads = new Map();
    for (const i of wanted) { const c = Math.floor(i / CHUNK); if (!loads.has(c)) loads.set(c, chunkOf(i)); }
    let k = 0;
    while (k < wanted.length) {
      const c = Math.floor(wanted[k] / CHUNK), data = await loads.get(c);
      if (g !== gen) return;
      const frag = document.createDocumentFragment();
      for (; k < wanted.length && Math.floor(wanted[k] / CHUNK) === c; k++) frag.append(card(data[wanted[k] % CHUNK]));
      cards.append(frag);
      rendered = start + k;
      if (window.__firstCards === undefined) window.__firstCards = performance.now();
    }
  } catch (err) {
    if (g === gen) $("shown").textContent = String(err.message || err);
    return;
  } finally {
    if (g === gen) busy = false;
  }
  // observe afresh: if the sentinel is still in view, the observer fires again and renders more
  io.unobserve(sentinel);
  if (rendered < size()) io.observe(sentinel);
}
const io = new IntersectionObserver((entries) => {
  if (entries.some((e) => e.isIntersecting)) renderMore();
}, {rootMargin: "1200px 0px"});

async function apply() {
  const g = ++gen, filter = $("filter").value, q = $("q").value;
  busy = false;
  let v;
  try {
    v = await select(filter, q);
  } catch (err) {
    if (g === gen) $("shown").textContent = String(err.message || err);
    return;
  }
  if (g !== gen) return;
  view = v;
  rendered = 0;
  cards.replaceChildren();
  $("shown").textContent = "showing " + size().toLocaleString("en") + " of " + N.toLocaleString("en");
  await renderMore();
  if (g !== gen) return;
  window.__viewReady = performance.now();
  document.documentElement.dataset.view = filter + "|" + q;
  document.documentElement.dataset.ready = "1";
}
let timer = 0;
$("q").addEventListener("input", () => { clearTimeout(timer); timer = setTimeout(apply, 120); });
$("filter").addEventListener("change", apply);
apply();
})();
"""


def _sha256_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# Only this page's own script and style run: an injected <script> or on* handler would be refused
# by the browser even if escaping ever failed. 'strict-dynamic': the scripts that script adds (the
# data files) run, parser-inserted ones never. Images: relative files only.
_CSP = (f"default-src 'none'; img-src 'self' file: data:; style-src {_sha256_source(_CSS)}; "
        f"script-src {_sha256_source(_SCRIPT)} 'strict-dynamic'; base-uri 'none'; form-action 'none'")

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
<input id="q" type="search" placeholder="search words in prompts, revised prompts, ids, variables, errors" autocomplete="off">
<span id="shown"></span>
</div>
</header>
<noscript><p>This report renders its items with JavaScript; the data is in report-data/ and in manifest.json.</p></noscript>
<main id="cards"></main>
<div id="more"></div>
"""
