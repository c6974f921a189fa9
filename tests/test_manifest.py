from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest

from batcher import ManifestError
from batcher._manifest import Journal, write_manifest


def item(i, rhash="h"):
    return SimpleNamespace(id=f"i{i}", rhash=rhash, body={"prompt": f"p{i}"})


def done(i, rhash="h"):
    return {"t": "item", "id": f"i{i}", "rhash": rhash, "status": "done", "request": {"prompt": f"p{i}"},
            "created": 1, "images": [{"file": f"images/i{i}.png"}], "attempts": 1, "error": None}


def test_rebuild_keeps_latest_record_per_item(tmp_path):
    j = Journal.open(tmp_path / "manifest.jsonl")
    j.append({"t": "run", "job": "x"})
    j.append({"t": "attempt", "id": "i1", "rhash": "h", "attempt": 1})
    j.append({"t": "item", "id": "i1", "rhash": "h", "status": "failed", "attempts": 1,
              "error": {"kind": "transient", "status": 500, "code": None, "message": "m"}})
    j.append({"t": "attempt", "id": "i1", "rhash": "h", "attempt": 2})
    j.append(done(1) | {"attempts": 2})
    j.append({"t": "attempt", "id": "i2", "rhash": "h", "attempt": 1})  # in flight at a crash
    j.close()
    again = Journal.open(tmp_path / "manifest.jsonl")
    assert again.entries["i1"].status == "done" and again.entries["i1"].attempts == 2
    assert again.entries["i2"].status == "pending" and again.entries["i2"].attempts == 1
    assert len(again.runs) == 1
    again.close()


def test_journal_lines_keep_what_a_fast_encoder_refuses_or_would_round(tmp_path):
    """A request field may hold an integer past 64 bits (a seed): written and read back exact."""
    from batcher._manifest import record_line

    seed = 2**70 + 1
    rec = done(1) | {"request": {"prompt": "p1", "seed": seed, "note": "café"}}
    assert record_line(rec).startswith(b'{"t":"item",') and record_line(rec).endswith(b"\n")
    j = Journal.open(tmp_path / "manifest.jsonl")
    j.append(rec)
    j.append(done(2))
    j.close()
    lines = (tmp_path / "manifest.jsonl").read_bytes().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["i1", "i2"]
    assert json.loads(lines[0])["request"] == {"prompt": "p1", "seed": seed, "note": "café"}
    assert "café".encode() in lines[0]  # UTF-8 as is, not \u-escaped
    again = Journal.open(tmp_path / "manifest.jsonl")
    with open(again.path, "rb") as fh:
        assert again.record("i1", fh)["request"]["seed"] == seed
    again.close()


def test_torn_last_line_is_tolerated_reported_and_cut(tmp_path):
    path = tmp_path / "manifest.jsonl"
    j = Journal.open(path)
    j.append(done(1))
    j.close()
    with open(path, "ab") as fh:
        fh.write(b'{"t": "item", "id": "i2", "sta')
    again = Journal.open(path)
    assert again.torn_line == 2
    assert set(again.entries) == {"i1"}
    again.append(done(3))
    again.close()
    lines = path.read_bytes().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["i1", "i3"]


def test_corrupt_middle_line_is_a_clear_error_and_file_untouched(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(json.dumps(done(1)).encode() + b"\nGARBAGE\n" + json.dumps(done(2)).encode() + b"\n")
    before = path.read_bytes()
    with pytest.raises(ManifestError, match=r"manifest.jsonl:2: corrupt"):
        Journal.open(path)
    assert path.read_bytes() == before


def test_write_manifest_streams_items_and_marks_pending(tmp_path):
    j = Journal.open(tmp_path / "manifest.jsonl")
    j.append(done(1))
    j.append(done(2, rhash="old"))  # the job changed under this id: not current
    j.append({"t": "item", "id": "i3", "rhash": "h", "status": "failed", "attempts": 6, "request": {},
              "images": [], "error": {"kind": "permanent", "status": 400, "code": "content_policy_violation",
                                      "message": "no"}})
    items = [item(1), item(2), item(3), item(4)]
    summary = write_manifest(j, tmp_path / "manifest.json", {"name": "t"}, lambda: iter(items))
    j.close()
    assert summary == {"total": 4, "done": 1, "failed": 1, "pending": 2}
    doc = json.loads((tmp_path / "manifest.json").read_text())
    assert list(doc) == ["version", "job", "summary", "items"]
    assert doc["summary"] == summary
    statuses = {r["id"]: r["status"] for r in doc["items"]}
    assert statuses == {"i1": "done", "i2": "pending", "i3": "failed", "i4": "pending"}
    assert doc["items"][2]["error"]["code"] == "content_policy_violation"
    assert "t" not in doc["items"][0] and "rhash" not in doc["items"][0]
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_journal_is_synced_only_when_dirty(tmp_path, monkeypatch):
    calls = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    j = Journal.open(tmp_path / "manifest.jsonl")
    j.sync()
    assert calls == []
    j.append(done(1))
    j.sync()
    j.sync()
    assert len(calls) == 1
    j.close()


# -- iter_manifest: streaming the rebuilt manifest back ---------------------------------------

from batcher._manifest import iter_manifest  # noqa: E402

TRICKY = ["line one\nline two", "ends with ]}", "]}", "</script><script>alert(1)</script>",
          "sep\u2028par\u2029", 'quote " and \\ backslash', "\r\n]}\r\n"]


def _written(tmp_path, prompts):
    j = Journal.open(tmp_path / "manifest.jsonl")
    items = [SimpleNamespace(id=f"i{k}", rhash="h", body={"prompt": p}) for k, p in enumerate(prompts)]
    for it in items[::2]:  # every other item done, the rest pending
        j.append({"t": "item", "id": it.id, "rhash": "h", "status": "done", "request": it.body,
                  "created": 1, "images": [], "attempts": 1, "error": None})
    write_manifest(j, tmp_path / "manifest.json", {"name": "x]}\n"}, lambda: items)
    j.close()
    return tmp_path / "manifest.json"


@pytest.mark.parametrize("count", [0, 1, 2, len(TRICKY)])
def test_iter_manifest_reads_what_write_manifest_wrote(tmp_path, count):
    path = _written(tmp_path, TRICKY[:count])
    header, items = iter_manifest(path)
    whole = json.loads(path.read_text())
    assert header == {k: v for k, v in whole.items() if k != "items"}
    assert header["job"] == {"name": "x]}\n"}
    assert list(items) == whole["items"]
    assert [i["request"]["prompt"] for i in whole["items"]] == TRICKY[:count]


def test_iter_manifest_hand_written_zero_and_one_item(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_text('{"version": 1, "job": {}, "summary": {"total": 0}, "items": [\n]}\n')
    header, items = iter_manifest(path)
    assert header["summary"] == {"total": 0} and list(items) == []
    path.write_text('{"version": 1, "job": {}, "summary": {"total": 1}, "items": [\n'
                    '{"id": "a", "status": "failed", "vars": {"subject": "cat"}, "cost": 0.04}\n]}\n')
    header, items = iter_manifest(path)
    assert list(items) == [{"id": "a", "status": "failed", "vars": {"subject": "cat"}, "cost": 0.04}]


@pytest.mark.parametrize("text, where, what", [
    ("", ":1:", "not a batcher manifest"),
    ('{"version": 1, "items": []}\n', ":1:", "not a batcher manifest"),
    ('{"version": 9, "job": {}, "items": [\n]}\n', ":1:", "version"),
    ('{"version": 1, "job": {}, "items": [\n{"id": "a", "status": "done"},\n', ":2:", "truncated"),
    ('{"version": 1, "job": {}, "items": [\n{"id": "a", "status": "done"},\n{"id": "b", "stat\n]}\n', ":3:",
     "corrupt item line"),
    ('{"version": 1, "job": {}, "items": [\n{"id": "a", "status": "odd"}\n]}\n', ":2:", "corrupt item line"),
    ('{"version": 1, "job": {}, "items": [\n{"id": "a", "status": "done"}\n{"id": "b", "status": "done"}\n]}\n',
     ":2:", "without a trailing comma"),
    ('{"version": 1, "job": {}, "items": [\n]}\n{"more": 1}\n', ":3:", "after the end"),
])
def test_iter_manifest_names_file_and_line_of_a_corrupt_manifest(tmp_path, text, where, what):
    path = tmp_path / "manifest.json"
    path.write_text(text)
    with pytest.raises(ManifestError) as info:
        header, items = iter_manifest(path)
        list(items)
    assert f"{path}{where}" in str(info.value) and what in str(info.value)


def test_iter_manifest_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ManifestError, match="no manifest here"):
        iter_manifest(tmp_path / "manifest.json")


def test_iter_manifest_close_releases_the_file_unread(tmp_path):
    path = _written(tmp_path, ["a", "b"])
    _, items = iter_manifest(path)
    fh = items._fh
    items.close()
    assert fh.closed
    _, items = iter_manifest(path)
    assert [i["id"] for i in items] == ["i0", "i1"] and items._fh.closed  # exhausted: closed too


def test_write_manifest_streams_the_items_once_and_a_failed_write_keeps_the_old_manifest(tmp_path, monkeypatch):
    import errno

    import batcher._manifest as manifest_module

    j = Journal.open(tmp_path / "manifest.jsonl")
    j.append(done(1))
    calls = []

    def items():
        calls.append(1)
        return iter([item(1), item(2)])

    path = tmp_path / "manifest.json"
    assert write_manifest(j, path, {"name": "t"}, items) == {"total": 2, "done": 1, "failed": 0, "pending": 1}
    assert len(calls) == 1  # the summary leads the file, yet the job's items are streamed once
    lines = path.read_text().splitlines()
    assert lines[0].endswith('"items": [') and lines[1].endswith(",") and lines[-1] == "]}" and len(lines) == 4
    before = path.read_bytes()

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(manifest_module, "_copy_all", full)
    with pytest.raises(OSError):
        write_manifest(j, path, {"name": "t"}, items)
    j.close()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["manifest.json", "manifest.jsonl"]  # no temporaries left
