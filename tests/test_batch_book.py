"""Batch mode's bookkeeping without a server: the chunk records and their replay (journal and checkpoint),
the job file's `batch:` settings, batch prices, and `status`'s list of batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batcher import _checkpoint
from batcher._batch import BatchBook, chunks_of, run_records
from batcher._exceptions import JobValidationError
from batcher._job import BatchSettings, load_job
from batcher._manifest import Journal
from batcher._plan import endpoint_prices, plan
from batcher._records import (
    attempt_record,
    batch_record,
    batch_state_record,
    chunk_record,
    closed_record,
    run_record,
)
from batcher._status import status


def _chunk_files(root: Path, key: str, ids: list[str]) -> str:
    rel = f"batches/{key}.jsonl"
    (root / "batches").mkdir(exist_ok=True)
    (root / rel).write_text("".join(json.dumps({"custom_id": i}) + "\n" for i in ids))
    (root / f"batches/{key}.items.jsonl").write_text("".join(
        json.dumps({"id": i, "rhash": "h", "wanted": 1, "attempt": 1, "request": {"prompt": i}}) + "\n"
        for i in ids))
    return rel


def test_chunk_steps_replay_in_order() -> None:
    recs = [
        chunk_record("k1", "e", "http://x/v1", "KEY", "openai-compatible", "batches/k1.jsonl", 2, 3, 100),
        upload_rec := {"t": "upload", "key": "k1", "file_id": "file-1", "at": "T"},
        batch_record("k1", "batch-1", 10, 20),
        batch_state_record("k1", "in_progress", 2, 1, 0),
        chunk_record("k2", "e", "http://x/v1", None, "xai", "batches/k2.jsonl", 1, 1, 50),
        {"t": "upload", "key": "lost", "file_id": "file-9", "at": "T"},  # its chunk record was lost: ignored
    ]
    chunks = chunks_of(recs)
    assert upload_rec["file_id"] == chunks["k1"].file_id
    one, two = chunks["k1"], chunks["k2"]
    assert (one.batch_id, one.created_at, one.expires_at, one.status) == ("batch-1", 10, 20, "in_progress")
    assert one.counts == {"total": 2, "completed": 1, "failed": 0}
    assert (two.file_id, two.batch_id, two.dialect, two.key_env) == (None, None, "xai", None)
    assert "lost" not in chunks
    chunks = chunks_of([*recs, closed_record("k1", "completed")])
    assert chunks["k1"].closed == "completed" and chunks["k2"].closed is None
    assert chunks["k1"].as_row()["state"] == "completed (collected)"
    assert chunks["k2"].as_row()["state"] == "prepared"


def test_items_of_open_chunks_are_at_the_provider_until_closed(tmp_path: Path) -> None:
    rel1 = _chunk_files(tmp_path, "k1", ["a", "b"])
    rel2 = _chunk_files(tmp_path, "k2", ["c"])
    recs = [chunk_record("k1", "e", "u", None, "d", rel1, 2, 2, 1), chunk_record("k2", "e", "u", None, "d", rel2, 1, 1, 1)]
    assert BatchBook(tmp_path, recs).at_provider == {"a": "k1", "b": "k1", "c": "k2"}
    assert BatchBook(tmp_path, [*recs, closed_record("k1", "expired")]).at_provider == {"c": "k2"}


def test_batch_records_survive_the_checkpoint(tmp_path: Path) -> None:
    """Chunk records live in the journal; a rerun that resumes from the checkpoint still sees them."""
    path = tmp_path / "manifest.jsonl"
    journal = Journal.open(path, checkpoint=True)
    journal.append(run_record("job", "j.yaml", 1))
    journal.append(attempt_record("a", "h", 1, "e", batch="k1"))
    journal.append(chunk_record("k1", "e", "u", None, "d", "batches/k1.jsonl", 1, 1, 10))
    journal.append(batch_record("k1", "b-1", None, None))
    journal.close()
    assert _checkpoint.refresh(path) is not None
    journal = Journal.open(path, checkpoint=True)
    journal.append(batch_state_record("k1", "completed", 1, 1, 0))
    assert journal.entries["a"].status == "pending" and journal.entries["a"].attempts == 1
    assert chunks_of(journal.runs)["k1"].status == "completed"
    journal.close()
    assert chunks_of(run_records(path))["k1"].batch_id == "b-1"
    assert chunks_of(run_records(path))["k1"].status == "completed"  # the tail past the checkpoint read too


def _job(tmp_path: Path, endpoint: str) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(f"name: j\ndefaults: {{model: grok-imagine}}\npricing: [{{per_image: 0.08}}]\nendpoints:\n{endpoint}\n"
                 "prompts:\n  - a red fox\n  - a blue owl\n")
    return p


def test_batch_settings_parse(tmp_path: Path) -> None:
    job = load_job(_job(tmp_path, "  - {name: e, base_url: 'http://127.0.0.1:9/v1', batch: true}"))
    job.validate()
    assert job.endpoints[0].batch == BatchSettings()
    job = load_job(_job(tmp_path, "  - {name: e, base_url: 'http://127.0.0.1:9/v1', "
                                  "batch: {max_requests: 10, window: 48h, poll: 5, discount: 0.25}}"))
    job.validate()
    assert job.endpoints[0].batch == BatchSettings(max_requests=10, window="48h", poll=5.0, discount=0.25)


@pytest.mark.parametrize("value, field", [
    ("yes please", "batch"), ("{max_requests: 0}", "batch"), ("{window: soon}", "batch"), ("{poll: -1}", "batch"),
    ("{discount: 1.5}", "batch"), ("{turbo: true}", "batch"),
])
def test_bad_batch_settings_name_file_line_and_field(tmp_path: Path, value: str, field: str) -> None:
    path = _job(tmp_path, f"  - name: e\n    base_url: 'http://127.0.0.1:9/v1'\n    batch: {value}")
    with pytest.raises(JobValidationError) as info:
        load_job(path).validate()
    problem = info.value.problems[0]
    assert (Path(problem.file).name, problem.line, problem.field) == ("job.yaml", 7, f"endpoints.{field}")


def test_batch_prices_discount_or_batch_price(tmp_path: Path) -> None:
    job = load_job(_job(tmp_path, "  - {name: e, base_url: 'http://127.0.0.1:9/v1', batch: true}\n"
                                  "  - {name: f, base_url: 'http://127.0.0.1:9/v1', batch: true, batch_price: 0.03}\n"
                                  "  - {name: g, base_url: 'http://127.0.0.1:9/v1'}"))
    job.validate()
    tables = endpoint_prices(job)
    assert tables["e"].per_image({}) == pytest.approx(0.04)
    assert tables["f"].per_image({}) == pytest.approx(0.03)
    assert tables["g"].per_image({}) == pytest.approx(0.08)


def test_plan_batch_prices_every_endpoint_as_batch(tmp_path: Path) -> None:
    job = load_job(_job(tmp_path, "  - {name: e, base_url: 'http://127.0.0.1:9/v1'}"))
    assert plan(job)["send"]["cost"] == pytest.approx(0.16)
    assert plan(job.batch_mode())["send"]["cost"] == pytest.approx(0.08)
    assert job.endpoints[0].batch is None  # batch_mode is a copy


def test_status_lists_batches(tmp_path: Path) -> None:
    path = tmp_path / "manifest.jsonl"
    journal = Journal.open(path)
    journal.append(run_record("job", "j.yaml", 1))
    journal.append(chunk_record("k1", "e", "u", None, "d", "batches/k1.jsonl", 3, 3, 10))
    journal.append(batch_record("k1", "batch-7", 1_700_000_000, 1_700_086_400))
    journal.append(batch_state_record("k1", "in_progress", 3, 2, 0))
    journal.close()
    rows = status(tmp_path)["batches"]
    assert [(r["batch_id"], r["endpoint"], r["state"], r["completed"], r["total"], r["created"], r["expires"])
            for r in rows] == [("batch-7", "e", "in_progress", 2, 3, 1_700_000_000, 1_700_086_400)]
