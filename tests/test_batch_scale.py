"""Batch mode at scale (bench/batch.py's fixes): chunk items kept as raw lines, no journal lookups for
chunks this run made, short answers still completed; the simulator's `last_ended` stat; the example
job jobs/batch.yaml end to end.

Everything runs on the simulator on 127.0.0.1; every wait is bounded.
"""

from __future__ import annotations

import json
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import yaml

from batcher import RunOptions, load_job, run_sync
from batcher._batch import BatchExecutor, Chunk, ChunkItem, chunk_item_line, read_chunk_items
from batcher._exceptions import BatcherError
from batcher._simulator import SimulatorConfig, start_in_thread

from helpers import KEY, ROOT, by_id, run_cli, write_job


def _job(tmp: Path, count: int, **batch: Any) -> Path:
    prompts = [f"a small watercolour of object number {i}" for i in range(count)]
    return write_job(tmp / "job.yaml", prompts, defaults={"size": "32x24", "model": "grok-imagine"},
                     endpoints=[{"name": "main", "base_url": "http://127.0.0.1:9/v1",
                                 "batch": {"poll": 0.2, **batch}}])


def _run(job: Path, out: Path, sim: Any, **opts: Any) -> Any:
    return run_sync(load_job(job), RunOptions(out=str(out), base_url=sim.base_url, api_key=KEY, seed=1, **opts))


def _chunk_item(i: int, prompt: str) -> ChunkItem:
    return ChunkItem(f"item-{i}", f"{i:016x}", {"prompt": prompt, "size": "32x24", "n": 1}, 1, 1,
                     {"k": i}, "job.yaml", i + 1)


def _write_items(root: Path, items: list[ChunkItem]) -> Chunk:
    (root / "batches").mkdir()
    with open(root / "batches" / "k.items.jsonl", "wb") as fh:
        for ci in items:
            fh.write(chunk_item_line(ci) + b"\n")
    return Chunk("k", "main", "http://127.0.0.1:9/v1", None, "openai-compatible", "batches/k.jsonl",
                 len(items), len(items), 0, "2026-01-01T00:00:00Z")


def test_chunk_items_round_trip_and_hold_raw_lines_not_parsed_requests(tmp_path: Path) -> None:
    items = [_chunk_item(i, f"prompt {i} " + "word " * 60) for i in range(3000)]
    chunk = _write_items(tmp_path, items)
    size = (tmp_path / "batches" / "k.items.jsonl").stat().st_size
    tracemalloc.start()
    try:
        index = read_chunk_items(tmp_path, chunk)
        held, _peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # parsed (a dict per request, a ChunkItem each) this was ~3x the file; raw lines are about its size
    assert held < 1.6 * size, (held, size)
    assert len(index) == 3000 and "item-7" in index and "item-x" not in index
    assert index.get("item-7") == items[7] and index.get("item-x") is None
    assert list(index) == items and list(index.ids()) == [ci.id for ci in items]


def test_an_edited_items_file_is_refused_when_indexed(tmp_path: Path) -> None:
    chunk = _write_items(tmp_path, [_chunk_item(0, "a"), _chunk_item(1, "b")])
    path = tmp_path / "batches" / "k.items.jsonl"
    path.write_bytes(path.read_bytes() + b'{"id": "x"}\n')
    with pytest.raises(BatcherError, match="edited"):
        read_chunk_items(tmp_path, chunk)


def test_only_chunks_of_an_earlier_run_are_looked_up_in_the_journal(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = BatchExecutor._recorded

    def counting(self: BatchExecutor, items: Any) -> set[str]:
        calls.append(len(items))
        return real(self, items)

    monkeypatch.setattr(BatchExecutor, "_recorded", counting)
    out = tmp_path / "out"
    job = _job(tmp_path, 6, max_requests=3)
    with start_in_thread(SimulatorConfig()) as sim:
        assert _run(job, out, sim).exit_code == 0
        assert calls == []  # this run made both chunks: none of their lines can be recorded yet
    out2 = tmp_path / "out2"
    with start_in_thread(SimulatorConfig(batch_time_scale=6.0 / 86400)) as sim:
        assert _run(job, out2, sim, wait=False).exit_code == 5
        second = _run(job, out2, sim)
        stats = sim.stats()["batch"]
    assert second.exit_code == 0 and second.summary["done"] == 6
    assert calls == [3, 3]  # the second run collects chunks the first made: it looks them up
    assert (stats["batches_created"], stats["duplicates"]) == (2, 0)


def test_short_answers_are_completed_by_reruns(tmp_path: Path) -> None:
    # "short": half the images asked for; n=4 → 2, a rerun asks for the 2 missing → 1, the next for 1 → 1
    job = write_job(tmp_path / "job.yaml", [{"id": "four", "prompt": "four foxes", "n": 4}],
                    defaults={"size": "32x24", "model": "grok-imagine"},
                    endpoints=[{"name": "main", "base_url": "http://127.0.0.1:9/v1", "batch": {"poll": 0.2}}])
    out = tmp_path / "out"
    with start_in_thread(SimulatorConfig(answer_fault="short")) as sim:
        exits = [_run(job, out, sim).exit_code for _ in range(3)]
        stats = sim.stats()["batch"]
    assert exits == [1, 1, 0]
    item = by_id(out)["four"]
    assert item["status"] == "done"
    files = [img["file"] for img in item["images"]]
    assert len(files) == 4 and len(set(files)) == 4 and all((out / f).is_file() for f in files)
    assert stats["batches_created"] == 3


def test_the_simulator_states_when_its_last_batch_ended(tmp_path: Path) -> None:
    before = time.time()
    with start_in_thread(SimulatorConfig()) as sim:
        assert sim.stats()["batch"]["last_ended"] is None
        assert _run(_job(tmp_path, 3), tmp_path / "out", sim).exit_code == 0
        ended = sim.stats()["batch"]["last_ended"]
    assert isinstance(ended, float) and before <= ended <= time.time()


def test_example_batch_job_runs_end_to_end_on_the_simulator(tmp_path: Path) -> None:
    job = ROOT / "jobs" / "batch.yaml"
    doc = yaml.safe_load(job.read_text(encoding="utf-8"))
    assert doc["endpoint"]["batch"]  # batch mode comes from the job itself, not from --batch
    out = tmp_path / "out"
    proc = run_cli(["run", str(job), "--out", str(out), "--simulate", "--quiet", "--json"], timeout=120,
                   env={"BATCHER_API_KEY": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["summary"]["done"] == report["summary"]["total"] == len(doc["prompts"])
    items = by_id(out)
    assert all(r["status"] == "done" and r.get("batch") for r in items.values())
    assert all((out / img["file"]).is_file() for r in items.values() for img in r["images"])
