"""`batcher export`: imagefolder (loaded by `datasets`), webdataset (read by `webdataset`), openai-batch."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import batcher
from batcher import ManifestError, OutputError
from batcher import _export
from batcher._cli import main

from helpers import finished_job, write_manifest_file


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    return finished_job(tmp_path_factory.mktemp("job"))


def manifest_items(out: Path) -> list[dict]:
    return json.loads((out / "manifest.json").read_text())["items"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def done_images(out: Path) -> list[tuple[dict, int, dict]]:
    return [(item, k, img) for item in manifest_items(out) if item["status"] == "done"
            for k, img in enumerate(item["images"])]


# -- imagefolder, loaded by the real `datasets` library -----------------------------------------

LOAD = r"""
import json, sys
from datasets import load_dataset
ds = load_dataset("imagefolder", data_dir=sys.argv[1], split="train")
rows = []
for row in ds:
    image = row.pop("image")
    image.load()  # decodes the pixels, not just the header
    rows.append({**row, "_size": list(image.size), "_mode": image.mode})
print(json.dumps({"columns": ds.column_names, "rows": rows}))
"""


def load_imagefolder(data_dir: Path, tmp_path: Path) -> dict:
    pytest.importorskip("datasets", reason="the `datasets` library is not installed (pip install -e '.[test]')")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    done = subprocess.run([sys.executable, "-c", LOAD, str(data_dir)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_imagefolder_loads_in_datasets_one_row_per_image(out, tmp_path):
    to = tmp_path / "hf"
    counts = batcher.export(out, "imagefolder", to, include_failed=True)
    expected = done_images(out)
    assert len(expected) == 5
    assert counts == {"format": "imagefolder", "items": 4, "images": 5, "failed": 2, "missing": 0, "shards": 0}
    loaded = load_imagefolder(to, tmp_path)
    # file_name becomes `image`; runs record the endpoint that made each item
    assert loaded["columns"] == ["image", *_export.FIXED_COLUMNS[1:], "endpoint"]
    rows = loaded["rows"]
    assert {row["endpoint"] for row in rows} == {"default"}
    assert len(rows) == len(expected)
    for row, (item, k, img) in zip(rows, expected):
        assert (row["id"], row["image_index"]) == (item["id"], k)
        assert row["prompt"] == item["request"]["prompt"] and row["revised_prompt"] == img["revised_prompt"]
        assert row["model"] == item["request"]["model"] and row["size"] == "32x24"
        assert row["quality"] == item["request"].get("quality") and row["created"] == item["created"]
        assert row["_size"] == [img["width"], img["height"]] == [32, 24]
    assert [r["image_index"] for r in rows if r["id"] == "pair"] == [0, 1]
    failed = [json.loads(line) for line in (to / "failed.jsonl").read_text().splitlines()]
    assert {f["id"] for f in failed} == {i["id"] for i in manifest_items(out) if i["status"] == "failed"}
    assert {f["error_code"] for f in failed} == {"content_policy_violation"}
    # images are linked, not rewritten: same bytes, and on one file system the same inode
    for (item, k, img) in expected:
        copy = to / "train" / Path(img["file"]).name
        assert sha(copy) == img["sha256"]
        assert copy.stat().st_ino == (out / img["file"]).stat().st_ino


def tiny_png(path: Path, size=(8, 6), color=(200, 30, 30)) -> dict:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return {"file": f"images/{path.name}", "revised_prompt": f"revised {path.stem}", "width": size[0],
            "height": size[1], "sha256": sha(path), "bytes": path.stat().st_size}


def optional_fields_out(root: Path) -> Path:
    """A hand-written manifest with the optional `vars`, `cost` and `endpoint` fields on some items."""
    images = root / "images"
    items = [
        {"id": "a", "status": "done", "request": {"prompt": "a cat", "model": "m"}, "created": 1,
         "images": [tiny_png(images / "a.png")], "vars": {"subject": "cat", "style": "ukiyo-e"}, "cost": 0.04,
         "endpoint": "https://one.example/v1"},
        {"id": "b", "status": "done", "request": {"prompt": "a dog", "model": "m", "n": 2}, "created": 2,
         "images": [tiny_png(images / "b_1.png"), tiny_png(images / "b_2.png")],
         "vars": {"subject": "dog", "id": "clash", "steps": 30}, "cost": 0.08},
        {"id": "c", "status": "done", "request": {"prompt": "no extras"}, "created": 3,
         "images": [tiny_png(images / "c.png")]},
        {"id": "d", "status": "failed", "request": {"prompt": "x"}, "images": [], "vars": {"subject": "eel"},
         "error": {"kind": "transient", "status": None, "code": None, "message": "timed out"}},
        {"id": "e", "status": "pending", "request": {"prompt": "later"}, "images": [], "vars": {"subject": "fox"}},
    ]
    write_manifest_file(root, items)
    return root


def test_imagefolder_optional_fields_become_consistent_columns(tmp_path):
    src = optional_fields_out(tmp_path / "out")
    to = tmp_path / "hf"
    counts = batcher.export(src, "imagefolder", to)
    assert counts["images"] == 4 and counts["failed"] == 0 and not (to / "failed.jsonl").exists()
    meta = [json.loads(line) for line in (to / "train" / "metadata.jsonl").read_text().splitlines()]
    columns = [*_export.FIXED_COLUMNS, "endpoint", "cost", "var_id", "var_steps", "var_style", "var_subject"]
    assert all(list(row) == columns for row in meta)  # same columns, same order, every row
    by_file = {row["file_name"]: row for row in meta}
    assert by_file["a.png"]["var_style"] == "ukiyo-e" and by_file["a.png"]["var_id"] is None
    assert by_file["b_1.png"]["id"] == "b" and by_file["b_1.png"]["var_id"] == "clash"  # no clash with `id`
    assert by_file["b_2.png"]["var_steps"] == "30"  # one type per column: matrix values as strings
    assert by_file["c.png"]["cost"] is None and by_file["c.png"]["var_subject"] is None
    assert sum(row["cost"] or 0 for row in meta) == pytest.approx(0.12)  # n=2 cost split over its rows
    assert by_file["a.png"]["endpoint"] == "https://one.example/v1"
    loaded = load_imagefolder(to, tmp_path)
    assert loaded["columns"] == ["image", *columns[1:]]
    assert [r["var_subject"] for r in loaded["rows"]] == ["cat", "dog", "dog", None]
    assert [r["_size"] for r in loaded["rows"]] == [[8, 6]] * 4


def test_without_optional_fields_there_are_no_optional_columns(out, tmp_path):
    # an unpriced run without a matrix: no cost or var_ columns (every run records its endpoint)
    batcher.export(out, "imagefolder", tmp_path / "hf")
    row = json.loads((tmp_path / "hf" / "train" / "metadata.jsonl").read_text().splitlines()[0])
    assert list(row) == [*_export.FIXED_COLUMNS, "endpoint"]


# -- webdataset, read by the real `webdataset` package ------------------------------------------


def read_webdataset(to: Path) -> list[dict]:
    wds = pytest.importorskip("webdataset", reason="the `webdataset` package is not installed")
    urls = [str(p) for p in sorted(to.glob("shard-*.tar"))]
    return list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))


def test_webdataset_shards_read_back_with_keys_without_dots(out, tmp_path):
    to = tmp_path / "wds"
    counts = batcher.export(out, "webdataset", to, shard_size=2)
    expected = done_images(out)
    assert counts["images"] == len(expected) == 5 and counts["shards"] == 3
    assert sorted(p.name for p in to.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    samples = read_webdataset(to)
    assert len(samples) == len(expected)
    for sample, (item, k, img) in zip(samples, expected):
        assert "." not in sample["__key__"]
        assert hashlib.sha256(sample["png"]).hexdigest() == img["sha256"]
        meta = json.loads(sample["json"])
        assert (meta["id"], meta["image_index"], meta["prompt"]) == (item["id"], k, item["request"]["prompt"])
        assert meta["revised_prompt"] == img["revised_prompt"] and meta["request"] == item["request"]
    assert any(json.loads(s["json"])["id"] == "multi.line" for s in samples)  # an id with a dot survives


def test_webdataset_failed_items_are_json_only_samples(out, tmp_path):
    to = tmp_path / "wds"
    counts = batcher.export(out, "webdataset", to, include_failed=True)
    samples = read_webdataset(to)
    assert counts["shards"] == 1 and len(samples) == 5 + 2
    failed = [s for s in samples if "png" not in s]
    metas = [json.loads(s["json"]) for s in failed]
    assert {m["status"] for m in metas} == {"failed"} and len(metas) == 2
    assert all(m["error"]["code"] == "content_policy_violation" for m in metas)


def test_webdataset_carries_optional_fields_when_present(tmp_path):
    src = optional_fields_out(tmp_path / "out")
    samples = read_webdataset(tmp_path / "wds") if batcher.export(src, "webdataset", tmp_path / "wds") else []
    metas = {json.loads(s["json"])["id"]: json.loads(s["json"]) for s in samples}
    assert metas["a"]["vars"] == {"subject": "cat", "style": "ukiyo-e"} and metas["a"]["cost"] == 0.04
    assert "vars" not in metas["c"] and "cost" not in metas["c"]


# -- openai-batch --------------------------------------------------------------------------------


def check_batch_line(line: dict) -> None:
    """The Batch API output line schema (the openai SDK has no model for it)."""
    assert set(line) == {"id", "custom_id", "response", "error"}
    assert line["id"].startswith("batch_req_") and isinstance(line["custom_id"], str)
    if line["response"] is not None:
        response = line["response"]
        assert set(response) == {"status_code", "request_id", "body"} and isinstance(response["status_code"], int)
        assert line["error"] is None
    else:
        assert set(line["error"]) == {"code", "message"}


def test_openai_batch_lines_carry_relative_image_paths(out, tmp_path):
    to = tmp_path / "batch"
    counts = batcher.export(out, "openai-batch", to, include_failed=True)
    lines = [json.loads(line) for line in (to / "results.jsonl").read_text().splitlines()]
    items = [i for i in manifest_items(out) if i["status"] != "pending"]
    assert counts["items"] == 4 and counts["failed"] == 2 and len(lines) == len(items)
    for line, item in zip(lines, items):
        check_batch_line(line)
        assert line["custom_id"] == item["id"]
        if item["status"] == "done":
            body = line["response"]["body"]
            assert line["response"]["status_code"] == 200 and line["response"]["request_id"] == item["request_id"]
            assert body["created"] == item["created"]
            assert [sha(to / d["file"]) for d in body["data"]] == [i["sha256"] for i in item["images"]]
            assert [d["revised_prompt"] for d in body["data"]] == [i["revised_prompt"] for i in item["images"]]
            assert not any(Path(d["file"]).is_absolute() for d in body["data"])
        else:  # an HTTP error answer: the Batch API puts it in `response`, not `error`
            assert line["response"]["status_code"] == 400
            assert line["response"]["body"]["error"]["code"] == "content_policy_violation"
            assert line["response"]["body"]["error"]["type"] == "invalid_request_error"
    assert len({line["id"] for line in lines}) == len(lines)


def test_openai_batch_failure_without_http_answer_uses_the_error_field(tmp_path):
    src = optional_fields_out(tmp_path / "out")
    batcher.export(src, "openai-batch", tmp_path / "batch", include_failed=True)
    lines = {json.loads(x)["custom_id"]: json.loads(x) for x in (tmp_path / "batch" / "results.jsonl").read_text().splitlines()}
    assert set(lines) == {"a", "b", "c", "d"}  # pending `e` never
    check_batch_line(lines["d"])
    assert lines["d"]["response"] is None and lines["d"]["error"] == {"code": "transient", "message": "timed out"}


def test_only_done_items_without_include_failed(out, tmp_path):
    batcher.export(out, "openai-batch", tmp_path / "batch")
    ids = [json.loads(x)["custom_id"] for x in (tmp_path / "batch" / "results.jsonl").read_text().splitlines()]
    assert ids == [i["id"] for i in manifest_items(out) if i["status"] == "done"]


# -- safety ----------------------------------------------------------------------------------------


def test_refuses_a_folder_that_is_not_an_export_of_the_same_format(out, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep me")
    with pytest.raises(OutputError, match="not a batcher export"):
        batcher.export(out, "imagefolder", mine)
    assert (mine / "thesis.tex").read_text() == "keep me" and sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    batcher.export(out, "webdataset", tmp_path / "wds")
    with pytest.raises(OutputError, match="previous webdataset export"):
        batcher.export(out, "imagefolder", tmp_path / "wds")
    (tmp_path / "empty").mkdir()
    assert batcher.export(out, "imagefolder", tmp_path / "empty")["images"] == 5


def test_a_second_export_replaces_the_first(out, tmp_path):
    to = tmp_path / "wds"
    batcher.export(out, "webdataset", to, shard_size=1)
    assert len(list(to.glob("*.tar"))) == 5
    batcher.export(out, "webdataset", to, shard_size=100)
    assert [p.name for p in to.glob("*.tar")] == ["shard-000000.tar"]
    assert [p.name for p in tmp_path.iterdir()] == ["wds"]  # no temporaries left


def test_a_failed_export_leaves_nothing_that_looks_finished(out, tmp_path, monkeypatch):
    calls = []

    def dying_link(src, dst):
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        calls.append(dst)
        os.link(src, dst)

    monkeypatch.setattr(_export, "_link", dying_link)
    with pytest.raises(OSError):
        batcher.export(out, "openai-batch", tmp_path / "batch")
    assert list(tmp_path.iterdir()) == []


def test_temporaries_of_a_killed_export_are_removed(out, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    stale = tmp_path / f".hf.tmp-{dead}-0123abcd"
    (stale / "train").mkdir(parents=True)
    (stale / "train" / "metadata.jsonl").write_text("{}\n")
    batcher.export(out, "imagefolder", tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_missing_manifest_and_escaping_image_paths_are_clear_errors(tmp_path):
    with pytest.raises(ManifestError, match="manifest.json: no manifest here"):
        batcher.export(tmp_path, "imagefolder", tmp_path / "x")
    assert not (tmp_path / "x").exists()
    src = tmp_path / "out"
    (tmp_path / "secret.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    write_manifest_file(src, [{"id": "a", "status": "done", "request": {"prompt": "p"},
                               "images": [{"file": "../secret.png"}]}])
    with pytest.raises(ManifestError, match=r"manifest.json:2: images.file: '../secret.png'"):
        batcher.export(src, "webdataset", tmp_path / "wds")
    assert not (tmp_path / "wds").exists()


def test_missing_image_files_are_skipped_and_counted(tmp_path):
    src = optional_fields_out(tmp_path / "out")
    (src / "images" / "b_2.png").unlink()
    counts = batcher.export(src, "imagefolder", tmp_path / "hf")
    assert counts["missing"] == 1 and counts["images"] == 3
    assert not (tmp_path / "hf" / "train" / "b_2.png").exists()


def test_unknown_format_and_bad_shard_size(out, tmp_path):
    with pytest.raises(ValueError, match="unknown export format"):
        batcher.export(out, "zip", tmp_path / "x")
    with pytest.raises(ValueError, match="shard_size"):
        batcher.export(out, "webdataset", tmp_path / "x", shard_size=0)


# -- parquet -------------------------------------------------------------------------------------


def test_parquet_reads_back_with_pyarrow_with_imagefolders_columns_in_row_groups(tmp_path, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed (pip install -e '.[test]')")
    src = optional_fields_out(tmp_path / "out")
    monkeypatch.setattr(_export, "ROW_GROUP", 2)  # several row groups from a few rows
    counts = batcher.export(src, "parquet", tmp_path / "pq", include_failed=True)
    assert counts == {"format": "parquet", "items": 3, "images": 4, "failed": 1, "missing": 0, "shards": 0}
    batcher.export(src, "imagefolder", tmp_path / "hf")
    jsonl = [json.loads(line) for line in (tmp_path / "hf" / "train" / "metadata.jsonl").read_text().splitlines()]
    parquet = pq.ParquetFile(tmp_path / "pq" / "train" / "metadata.parquet")
    assert parquet.metadata.num_row_groups == 2
    table = parquet.read()
    assert table.column_names == list(jsonl[0])  # the same columns, in the same order
    assert table.to_pylist() == jsonl  # and the same values (steps=30 is text in both)
    assert str(table.schema.field("created").type) == "int64" and str(table.schema.field("cost").type) == "double"
    assert sorted(p.name for p in (tmp_path / "pq" / "train").iterdir()) == [
        "a.png", "b_1.png", "b_2.png", "c.png", "metadata.parquet"]
    assert [json.loads(x)["id"] for x in (tmp_path / "pq" / "failed.jsonl").read_text().splitlines()] == ["d"]


def test_parquet_odd_values_become_null_not_a_crash(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed (pip install -e '.[test]')")
    images = tmp_path / "out" / "images"
    items = [{"id": "a", "status": "done", "request": {"prompt": ["not", "text"], "model": 7},
              "created": "yesterday", "cost": True, "images": [tiny_png(images / "a.png")]},
             {"id": "b", "status": "done", "request": {"prompt": "p"}, "created": 2.0, "cost": 0.5,
              "images": [tiny_png(images / "b.png")]}]
    write_manifest_file(tmp_path / "out", items)
    batcher.export(tmp_path / "out", "parquet", tmp_path / "pq")
    rows = pq.read_table(tmp_path / "pq" / "train" / "metadata.parquet").to_pylist()
    # cost True / 1 image = 1.0, as metadata.jsonl has it
    assert [(r["prompt"], r["model"], r["created"], r["cost"]) for r in rows] == [
        ('["not", "text"]', "7", None, 1.0), ("p", None, 2, 0.5)]  # cost: as imagefolder's


def test_parquet_loads_in_datasets_as_an_imagefolder(out, tmp_path):
    to = tmp_path / "pq"
    batcher.export(out, "parquet", to)
    loaded = load_imagefolder(to, tmp_path)
    assert loaded["columns"] == ["image", *_export.FIXED_COLUMNS[1:], "endpoint"]
    expected = done_images(out)
    assert [(r["id"], r["image_index"], r["_size"]) for r in loaded["rows"]] == [
        (item["id"], k, [img["width"], img["height"]]) for item, k, img in expected]


def test_parquet_without_pyarrow_names_the_extra_and_touches_nothing(out, tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_pyarrow(name, *args, **kwargs):
        if name.split(".")[0] == "pyarrow":
            raise ImportError("no pyarrow here")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(OutputError, match=r"batcher\[parquet\]"):
        batcher.export(out, "parquet", tmp_path / "pq")
    assert list(tmp_path.iterdir()) == []


# -- CLI -----------------------------------------------------------------------------------------


def test_cli_export(out, tmp_path, capsys):
    to = tmp_path / "wds"
    assert main(["export", str(out), "--format", "webdataset", "--to", str(to), "--shard-size", "3",
                 "--include-failed"]) == 0
    said = capsys.readouterr().out
    assert "4 item(s), 5 image(s), 2 failed" in said and "3 shard(s)" in said and str(to) in said
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("x")
    assert main(["export", str(out), "--format", "imagefolder", "--to", str(tmp_path / "busy")]) == 2
    assert "not a batcher export" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["export", str(out), "--format", "zip", "--to", str(tmp_path / "z")])
    assert info.value.code == 2
