"""A large output's manifest as segments: a run rewrites the segments whose items changed, nothing else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batcher import _layout, _segments
from batcher._cli import main
from batcher._job import load_job
from batcher._manifest import Journal, iter_manifest, write_manifest
from batcher._simulator import SimulatorConfig, start_in_thread
from batcher._status import status

from helpers import run_main as run, KEY, write_job


@pytest.fixture
def sim():
    with start_in_thread(SimulatorConfig(policy_word="forbidden")) as running:
        yield running


@pytest.fixture(autouse=True)
def small(monkeypatch):
    monkeypatch.setenv("BATCHER_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setattr(_layout, "FANOUT_FROM", 3)  # "large" from 3 items, segments of 2
    monkeypatch.setattr(_segments, "SEGMENT_ITEMS", 2)


def prompts(count: int, **edits) -> list:
    return [{"id": f"p{i}", "prompt": edits.get(f"p{i}", f"prompt {i}")} for i in range(count)]


def segment_files(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / "manifest.d").iterdir()}


def single_file_items(out: Path, job: Path) -> tuple[dict, list]:
    """What the single manifest.json would hold for the same journal and job."""
    loaded = load_job(job)
    write_manifest(Journal.read(out / "manifest.jsonl"), out / "expected.json",
                   {"name": loaded.name, "file": str(loaded.path)}, loaded.items)
    doc = json.loads((out / "expected.json").read_text())
    (out / "expected.json").unlink()
    return doc["summary"], doc["items"]


def test_readers_see_the_same_manifest_and_merge_writes_the_single_file(tmp_path, sim):
    job = write_job(tmp_path / "job.yaml", [*prompts(4), {"id": "bad", "prompt": "forbidden"}],
                    defaults={"size": "16x16"})
    out = tmp_path / "out"
    assert run(job, out, sim) == 1
    assert not (out / "manifest.json").exists()
    assert sorted(p.name.split("-")[0] for p in (out / "manifest.d").glob("*.jsonl")) == ["000000", "000001",
                                                                                          "000002"]
    summary, expected = single_file_items(out, job)
    header, items = iter_manifest(out / "manifest.json")
    assert header["summary"] == summary == {"total": 5, "done": 4, "failed": 1, "pending": 0}
    assert list(items) == expected
    assert status(out)["total"] == 5
    assert main(["report", str(out)]) == 0  # the gallery reads the segments too
    cards = next((out / "report-data").glob("*/c-000000.js")).read_text()  # the page's data, beside it
    assert all(f'"p{i}"' in cards for i in range(4))
    assert main(["merge", str(out)]) == 0
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["summary"] == summary and doc["items"] == expected
    assert run(job, out, sim) == 1
    assert (out / "manifest.json").is_file()  # nothing changed: still current
    write_job(job, [*prompts(5), {"id": "bad", "prompt": "forbidden"}], defaults={"size": "16x16"})
    assert run(job, out, sim) == 1
    assert not (out / "manifest.json").exists()  # stale once a run changed anything: removed
    assert iter_manifest(out / "manifest.json")[0]["summary"]["total"] == 6


def test_a_run_rewrites_only_the_segments_whose_items_changed(tmp_path, sim):
    job = write_job(tmp_path / "job.yaml", prompts(5), defaults={"size": "16x16"})
    out = tmp_path / "out"
    assert run(job, out, sim) == 0
    before = segment_files(out)
    write_job(job, prompts(6), defaults={"size": "16x16"})  # one new item: joins the last segment
    assert run(job, out, sim) == 0
    after = segment_files(out)
    kept = {n for n in before if n in after and after[n] == before[n] and n != "index.json"}
    assert sorted(n.split("-")[0] for n in kept) == ["000000", "000001"]
    write_job(job, prompts(6, p2="an edited prompt"), defaults={"size": "16x16"})  # the middle segment
    assert run(job, out, sim) == 0
    again = segment_files(out)
    kept = {n.split("-")[0] for n in after if n in again and again[n] == after[n] and n != "index.json"}
    assert kept == {"000000", "000002"}
    summary, expected = single_file_items(out, job)
    assert list(iter_manifest(out / "manifest.json")[1]) == expected and summary["done"] == 6


def test_leftovers_of_a_killed_write_go_and_a_replaced_journal_rewrites_all(tmp_path, sim):
    job = write_job(tmp_path / "job.yaml", prompts(4), defaults={"size": "16x16"})
    out = tmp_path / "out"
    assert run(job, out, sim) == 0
    (out / "manifest.d" / ".tmp-000009-deadbeef.jsonl").write_text("half")  # a kill mid-segment
    (out / "manifest.d" / "000009-orphan.jsonl").write_text("{}\n")  # a kill before the old ones went
    journal = out / "manifest.jsonl"
    journal.write_bytes(journal.read_bytes().replace(b'"attempts":1', b'"attempts":2', 1))  # same size
    before = segment_files(out)
    write_job(job, prompts(5), defaults={"size": "16x16"})
    assert run(job, out, sim) == 0
    after = segment_files(out)
    assert not {n for n in before if n in after and n != "index.json"}  # every segment rewritten
    assert sorted(n.split("-")[0] for n in after if n != "index.json") == ["000000", "000001", "000002"]
    assert [i["id"] for i in iter_manifest(out / "manifest.json")[1]] == [f"p{i}" for i in range(5)]
