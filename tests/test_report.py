"""`batcher report OUT`: the static gallery page, checked as text and in a real headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

import batcher
from batcher import ManifestError
from batcher._cli import main
from batcher._gallery import script_json

from helpers import ROOT, finished_job, write_manifest_file

XSS_PROMPT = "<script>alert(1)</script><img src=x onerror=alert(2)> \"q\" & 'q'"


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    out = finished_job(tmp_path_factory.mktemp("job"))
    batcher.report(out)
    return out


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def embedded(page: str, element_id: str):
    match = re.search(rf'<script type="application/json" id="{element_id}">(.*?)</script>', page, re.S)
    assert match, element_id
    return json.loads(match.group(1))


def data_file(out: Path, name: str):
    """What one of the report's data files hands the page (the JSON between its first and last line)."""
    meta = embedded((out / "report.html").read_text(), "report-meta")
    text = (out / meta["dir"] / name).read_text()
    head = f"__batcherReport.data({json.dumps(name)},\n"
    assert text.startswith(head) and text.endswith("\n);\n")
    return json.loads(text[len(head):-4])


def all_cards(out: Path) -> list[dict]:
    meta = embedded((out / "report.html").read_text(), "report-meta")
    return [c for n in range(-(-meta["n"] // meta["chunk"])) for c in data_file(out, f"c-{n:06d}.js")]


# -- the page as text -------------------------------------------------------------------------------


@given(st.text())
def test_script_json_is_inert_inside_a_script_element_and_round_trips(text):
    encoded = script_json({"p": text})
    assert not set(encoded) & {"<", ">", "&", "\u2028", "\u2029"}
    assert json.loads(encoded) == {"p": text}


def test_report_embeds_every_item_escaped(out):
    page = (out / "report.html").read_text()
    doc = manifest(out)
    cards = all_cards(out)
    assert [c["id"] for c in cards] == [i["id"] for i in doc["items"]]
    assert [c["p"] for c in cards] == [i["request"]["prompt"] for i in doc["items"]]
    assert "<script>alert(1)" not in page and "<img src=x" not in page and "</script> \u2028" not in page
    assert page.count("</script>") == page.count("<script") == 3  # no prompt closes or opens a script
    summary = embedded(page, "summary-data")
    assert {k: summary[k] for k in doc["summary"]} == doc["summary"]
    assert summary["images"] == 5 and summary["cost"] is None
    assert summary["codes"] == {"content_policy_violation": 2}
    assert not [p for p in out.iterdir() if p.name.startswith(".report")]  # temporary renamed into place


def test_report_sums_optional_cost_and_carries_vars(tmp_path):
    items = [
        {"id": "a", "status": "done", "request": {"prompt": "a cat"}, "images": [{"file": "images/a.png"}],
         "vars": {"subject": "cat", "steps": 30}, "cost": 0.04, "endpoint": "https://one.example/v1"},
        {"id": "b", "status": "failed", "request": {"prompt": "b"}, "images": [], "cost": 0.01,
         "error": {"kind": "transient", "status": None, "code": None, "message": "timed out"}},
        {"id": "c", "status": "done", "request": {"prompt": "c"},
         "images": [{"file": "images/c.png"}, {"file": "../../etc/passwd"}, {"file": "/etc/passwd"}]},
    ]
    write_manifest_file(tmp_path, items, job={"name": "</title><script>alert(3)</script>"})
    page = batcher.report(tmp_path).read_text()
    summary = embedded(page, "summary-data")
    assert summary["cost"] == pytest.approx(0.05) and summary["images"] == 2  # paths leaving OUT are dropped
    assert summary["codes"] == {"transient": 1}
    cards = {c["id"]: c for c in all_cards(tmp_path)}
    assert cards["a"]["v"] == {"subject": "cat", "steps": "30"} and cards["a"]["c"] == 0.04
    assert cards["a"]["e"] == "https://one.example/v1" and "v" not in cards["c"] and "c" not in cards["c"]
    assert [i[0] for i in cards["c"]["i"]] == ["images/c.png"]
    assert "<title>batcher report: &lt;/title&gt;&lt;script&gt;alert(3)&lt;/script&gt;</title>" in page


def test_missing_manifest_is_a_clear_error(tmp_path):
    with pytest.raises(ManifestError, match="no manifest here"):
        batcher.report(tmp_path)
    assert not (tmp_path / "report.html").exists()


def test_cli_report(tmp_path, capsys):
    write_manifest_file(tmp_path, [{"id": "a", "status": "pending", "request": {"prompt": "p"}, "images": []}])
    assert main(["report", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "report.html")
    assert main(["report", str(tmp_path / "nowhere")]) == 2


# -- in a real headless Chromium -----------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium is not installed (apt-get install -y chromium; .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[test]')")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, timeout=30_000)
        yield browser
        browser.close()


class Page:
    """A page of the report with every console error, page error and dialog recorded."""

    def __init__(self, browser, path: Path) -> None:
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.page.set_default_timeout(15_000)
        self.problems: list[str] = []
        self.dialogs: list[str] = []
        self.page.on("console", lambda m: m.type in ("error", "warning") and self.problems.append(m.text))
        self.page.on("pageerror", lambda e: self.problems.append(str(e)))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.goto(path.as_uri())
        self.page.wait_for_selector("html[data-ready]")

    def ids(self) -> list[str]:
        return self.page.eval_on_selector_all("article.card", "els => els.map(e => e.dataset.id)")

    def show(self, status: str = "all", query: str = "") -> list[str]:
        self.page.select_option("#filter", status)
        self.page.fill("#q", query)
        self.page.wait_for_selector(f'html[data-view="{status}|{query}"]', state="attached")
        return self.ids()


@pytest.fixture
def page(out, browser):
    # `out` before `browser`: its job runs an event loop, which Playwright's sync API forbids once started
    p = Page(browser, out / "report.html")
    yield p
    p.page.close()


def test_page_shows_the_manifest_counts_and_every_thumbnail(page, out):
    doc = manifest(out)
    shown = {k: page.page.inner_text(f"#n-{k}") for k in ("total", "done", "failed", "pending", "images")}
    assert shown == {**{k: str(v) for k, v in doc["summary"].items()}, "images": "5"}
    assert page.ids() == [i["id"] for i in doc["items"]]
    loaded = page.page.eval_on_selector_all(
        "img", "els => Promise.all(els.map(e => e.decode().then(() => e.naturalWidth, () => 0)))")
    assert loaded == [32] * 5
    hrefs = page.page.eval_on_selector_all(".thumbs a", "els => els.map(e => e.getAttribute('href'))")
    assert hrefs[1:3] == ["images/pair_1.png", "images/pair_2.png"]
    assert "content_policy_violation" in page.page.inner_text(f'article[data-id="bad2"] .error')
    (ROOT / "output").mkdir(exist_ok=True)
    page.page.screenshot(path=str(ROOT / "output" / "report-screenshot.png"), full_page=True)
    assert page.problems == [] and page.dialogs == []


def test_status_filter_shows_exactly_the_items_of_that_status(page, out):
    items = manifest(out)["items"]
    for status in ("failed", "done", "pending"):
        assert page.show(status) == [i["id"] for i in items if i["status"] == status], status
    assert page.page.inner_text("#shown") == "showing 1 of 7"
    assert page.show("all") == [i["id"] for i in items]
    assert page.problems == []


def test_search_narrows(page, out):
    failed = [i["id"] for i in manifest(out)["items"] if i["status"] == "failed"]
    assert page.show("all", "foxes") == ["pair"]
    assert page.show("all", "safety system") == failed  # error messages are searched
    assert page.show("all", "rendering line two") == ["multi.line"]  # every word, in prompt or revised prompt
    assert page.show("done", "forbidden") == []
    assert page.page.inner_text("#shown") == "showing 0 of 7"
    assert page.problems == []


def test_hostile_prompt_renders_as_text_and_runs_nothing(page):
    card = 'article[data-id="xss"]'
    assert page.page.inner_text(f"{card} .prompt") == XSS_PROMPT
    assert page.page.query_selector_all('img[src="x"]') == [] and page.page.query_selector_all("main script") == []
    assert page.page.inner_text('article[data-id="multi.line"] .prompt').startswith("line one\nline two ]} </script>")
    page.page.wait_for_timeout(200)  # give a stray onerror handler its chance to fire
    assert page.dialogs == [] and page.problems == []


def test_many_items_render_a_page_at_a_time_as_the_reader_scrolls(browser, tmp_path):
    items = [{"id": f"item-{k:04d}", "status": "failed" if k % 7 == 0 else "done",
              "request": {"prompt": f"prompt number {k}"}, "images": [], "vars": {"k": str(k)},
              "error": {"kind": "permanent", "status": 400, "code": "x", "message": "m"} if k % 7 == 0 else None}
             for k in range(400)]
    write_manifest_file(tmp_path, items)
    p = Page(browser, batcher.report(tmp_path))
    first = len(p.ids())
    assert 0 < first < 400  # not everything up front
    for _ in range(40):  # bounded: scroll until everything is rendered
        if len(p.ids()) == 400:
            break
        p.page.mouse.wheel(0, 20_000)
        p.page.wait_for_timeout(50)
    assert p.ids() == [i["id"] for i in items]
    assert p.show("failed") == [i["id"] for i in items if i["status"] == "failed"][:len(p.ids())]
    assert p.page.inner_text("#shown") == f"showing {sum(i['status'] == 'failed' for i in items)} of 400"
    assert p.show("all", "k: 123") == ["item-0123"]  # matrix variables are searchable
    assert p.problems == []
    p.page.close()


# -- paged data: chunks, facets and the word index, loaded on demand ---------------------------------


def big_out(root: Path, n: int) -> Path:
    items = [{"id": f"item-{k:04d}", "status": "failed" if k % 7 == 0 else "pending" if k % 11 == 0 else "done",
              "request": {"prompt": f"prompt number {k} {'lighthouse' if k % 5 == 0 else 'fox'}"}, "images": [],
              "error": {"kind": "permanent", "status": 400, "code": "content_policy_violation" if k % 2 else
                        "rate_limit_exceeded", "message": "m"} if k % 7 == 0 else None}
             for k in range(n)]
    write_manifest_file(root, items)
    return root


def test_data_is_chunked_and_the_word_index_finds_every_word(tmp_path, monkeypatch):
    from batcher import _gallery

    monkeypatch.setattr(_gallery, "CHUNK", 16)
    monkeypatch.setattr(_gallery._WordIndex, "BUFFERED", 7)  # spilled to the bucket files many times
    out = big_out(tmp_path, 100)
    batcher.report(out)
    meta = embedded((out / "report.html").read_text(), "report-meta")
    assert meta["n"] == 100 and meta["chunk"] == 16
    cards = all_cards(out)
    assert [c["id"] for c in cards] == [f"item-{k:04d}" for k in range(100)]
    facets = data_file(out, "facets.js")
    assert facets["s"] == "".join({"done": "d", "failed": "f", "pending": "p"}[c["s"]] for c in cards)
    failed = {i: facets["codes"][ord(ch) - _gallery.CODE_BASE] for i, ch in enumerate(facets["c"]) if ch != " "}
    assert failed == {k: "content_policy_violation" if k % 2 else "rate_limit_exceeded" for k in range(0, 100, 7)}
    index: dict[str, list[int]] = {}
    for b in range(meta["buckets"]):
        for word, posting in data_file(out, f"w-{b:03d}.js"):
            index[word] = decode_posting(posting, 100)
    assert index["lighthouse"] == list(range(0, 100, 5))  # a bitmap: a common word
    assert index["42"] == [42] and index["0042"] == [42]  # a delta list: the prompt's number and the id's
    assert index["violation"] == [k for k in range(0, 100, 7) if k % 2]


def decode_posting(posting: list[str], n: int) -> list[int]:
    import base64

    kind, data = posting
    if kind == "b":
        bits = base64.b64decode(data)
        return [i for i in range(n) if bits[i >> 3] >> (i & 7) & 1]
    out, at = [], 0
    for d in data.split(","):
        at += int(d, 36)
        out.append(at)
    return out


def test_a_new_report_replaces_the_data_of_the_old_one(tmp_path):
    out = big_out(tmp_path, 30)
    batcher.report(out)
    first = embedded((out / "report.html").read_text(), "report-meta")["dir"]
    batcher.report(out)  # the same manifest: the same data, by name
    assert embedded((out / "report.html").read_text(), "report-meta")["dir"] == first
    big_out(tmp_path, 31)
    batcher.report(out)
    second = embedded((out / "report.html").read_text(), "report-meta")["dir"]
    assert second != first and [p.name for p in (out / "report-data").iterdir()] == [second.split("/")[1]]


def test_the_page_loads_data_on_demand_and_filters_by_code(browser, tmp_path):
    out = big_out(tmp_path, 600)  # 3 chunks of 256
    items = manifest(out)["items"]
    batcher.report(out)
    requested: list[str] = []
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("request", lambda r: requested.append(r.url.rsplit("/", 1)[-1]))
    problems: list[str] = []
    page.on("console", lambda m: m.type in ("error", "warning") and problems.append(m.text))
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto((out / "report.html").as_uri())
    page.wait_for_selector("html[data-ready]")
    assert [r for r in requested if r.endswith(".js")] == ["c-000000.js"]  # the first cards need one chunk
    p = Page.__new__(Page)
    p.page, p.problems, p.dialogs = page, problems, []
    assert p.show("failed") == [i["id"] for i in items if i["status"] == "failed"][:50]
    assert "facets.js" in requested and not [r for r in requested if r.startswith("w-")]
    assert p.show("code:rate_limit_exceeded") == [f"item-{k:04d}" for k in range(0, 600, 14)][:50]
    assert page.inner_text("#shown") == f"showing {len(range(0, 600, 14))} of 600"
    options = page.eval_on_selector_all("#filter option", "os => os.map(o => o.value)")
    assert options[4:] == ["code:rate_limit_exceeded", "code:content_policy_violation"]  # as first met
    assert p.show("all", "Lighthouse 595") == ["item-0595"]  # case-folded; every word; the last chunk
    assert p.show("pending", "lighthouse") == [f"item-{k:04d}" for k in range(0, 600, 55) if k % 7][:50]
    assert p.show("all", "__proto__ constructor") == [] and p.show("all", "nowhere") == []
    assert page.inner_text("#shown") == "showing 0 of 600"
    assert problems == []
    page.close()
