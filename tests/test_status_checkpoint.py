"""`batcher status` answered from the checkpoint: SQL aggregates over the current items, the same answer as a replay."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from helpers import run_main as run, write_job

from batcher import _status
from batcher._checkpoint import checkpoint_path
from batcher._cli import main
from batcher._simulator import SimulatorConfig, start_in_thread
from batcher._status import status

PROMPTS = [
    {"id": "a", "prompt": "A calm lake at dawn"},
    {"id": "b", "prompt": "Two foxes", "n": 2},
    {"id": "bad", "prompt": "something forbidden here"},
    {"id": "bad2", "prompt": "another forbidden thing"},
]


@pytest.fixture
def sim():
    with start_in_thread(SimulatorConfig(policy_word="forbidden")) as running:
        yield running


pytestmark = pytest.mark.usefixtures("api_key")


def replayed(out: Path) -> dict:
    return {**_status._status(out / "manifest.jsonl", out), "batches": []}  # status() adds the output's batches


def from_checkpoint(out: Path) -> dict | None:
    info = _status._from_checkpoint(out, out / "manifest.jsonl")
    return None if info is None else {**info, "batches": []}


def no_replay(monkeypatch) -> None:
    def refuse(*_args):
        raise AssertionError("status replayed the journal")

    monkeypatch.setattr(_status, "_status", refuse)


def journal_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def append(out: Path, *records: dict) -> None:
    with open(out / "manifest.jsonl", "a", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, separators=(",", ":")) + "\n" for r in records)


def failed_record(item_id: str, rhash: str, code: str, message: str, images: list | None = None) -> dict:
    return {"t": "item", "id": item_id, "rhash": rhash, "status": "failed", "request": {}, "created": None,
            "images": images or [], "attempts": 1, "error": {"kind": "permanent", "code": code, "message": message},
            "request_id": None, "endpoint": "default", "finished": "2026-01-01T00:00:00.000Z"}


def test_status_comes_from_the_checkpoint_and_equals_a_replay(tmp_path, sim, monkeypatch, capsys):
    job = write_job(tmp_path / "job.yaml", PROMPTS, defaults={"size": "16x16"})
    out = tmp_path / "out"
    assert run(job, out, sim) == 1
    job = write_job(tmp_path / "job.yaml", [*PROMPTS, {"id": "c", "prompt": "A new one"}], defaults={"size": "16x16"})
    assert run(job, out, sim) == 1
    expected = replayed(out)
    assert (expected["total"], expected["done"], expected["failed"], expected["images_on_disk"]) == (5, 3, 2, 4)
    assert from_checkpoint(out) == expected
    no_replay(monkeypatch)
    assert status(out) == expected
    capsys.readouterr()
    assert main(["status", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(expected))
    assert main(["status", str(out)]) == 0
    assert "content_policy_violation" in capsys.readouterr().out


def test_a_size_change_counts_the_jobs_items_from_the_checkpoint_too(tmp_path, sim, monkeypatch):
    job = write_job(tmp_path / "job.yaml", [f"p{i}" for i in range(7)], defaults={"size": "8x8"})
    out = tmp_path / "out"
    assert run(job, out, sim) == 0
    assert run(job, out, sim, "--size", "16x16", "--max-images", "4", "--concurrency", "1") == 4
    expected = replayed(out)
    assert (expected["total"], expected["done"], expected["failed"], expected["pending"]) == (7, 4, 0, 3)
    no_replay(monkeypatch)
    assert status(out) == expected


def test_the_journals_tail_is_applied_in_memory_and_the_checkpoint_is_not_written(tmp_path, sim, monkeypatch):
    job = write_job(tmp_path / "job.yaml", PROMPTS, defaults={"size": "16x16"})
    out = tmp_path / "out"
    assert run(job, out, sim) == 1
    rhash = {r["id"]: r["rhash"] for r in journal_records(out) if r["t"] == "item"}
    # a run in progress (or killed): a new run, a retried request of "a", failures with new codes and reasons
    append(out, {"t": "run", "job": "t", "at": "2026-02-02T00:00:00.000Z", "pid": 1},
           {"t": "attempt", "id": "a", "rhash": "0" * 16, "attempt": 1},
           failed_record("b", rhash["b"], "http_500", "the server said no", [{"file": "images/nothere.png"}]),
           failed_record("bad", rhash["bad"], "http_500", "the server   said\nno"),
           failed_record("bad2", rhash["bad2"], "moderation", "x" * 200))
    with open(out / "manifest.jsonl", "ab") as fh:
        fh.write(b'{"t":"item","id":"torn')  # a kill mid-write
    cp = checkpoint_path(out / "manifest.jsonl")
    before = (cp.read_bytes(), cp.stat().st_mtime_ns)
    expected = replayed(out)
    assert expected["failed"] == 3 and expected["pending"] == 1 and expected["runs"] == 2
    assert expected["failures"]["http_500"]["reasons"] == {"the server said no": 2}
    no_replay(monkeypatch)
    assert status(out) == expected
    assert (cp.read_bytes(), cp.stat().st_mtime_ns) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions")
def test_a_read_only_folder_is_answered_from_its_checkpoint(tmp_path, sim, monkeypatch):
    job = write_job(tmp_path / "job.yaml", PROMPTS, defaults={"size": "16x16"})
    out = tmp_path / "out"
    assert run(job, out, sim) == 1
    expected = replayed(out)
    cp = checkpoint_path(out / "manifest.jsonl")
    cp.chmod(0o444)
    out.chmod(0o555)
    try:
        no_replay(monkeypatch)
        assert status(out) == expected
    finally:
        out.chmod(0o755)
        cp.chmod(0o644)


def test_images_the_run_has_not_verified_are_checked_on_disk(tmp_path, sim, monkeypatch):
    job = write_job(tmp_path / "job.yaml", PROMPTS, defaults={"size": "16x16"})
    out = tmp_path / "out"
    assert run(job, out, sim) == 1
    with sqlite3.connect(checkpoint_path(out / "manifest.jsonl")) as db:
        db.execute("UPDATE items SET verified = 0 WHERE id = 'b'")
    gone = next(r for r in journal_records(out) if r.get("id") == "b" and r["t"] == "item")["images"][0]["file"]
    (out / gone).unlink()
    expected = replayed(out)
    assert expected["images_on_disk"] == 2
    no_replay(monkeypatch)
    assert status(out) == expected


def test_no_usable_checkpoint_falls_back_to_a_replay(tmp_path, sim):
    job = write_job(tmp_path / "job.yaml", PROMPTS, defaults={"size": "16x16"})
    out = tmp_path / "out"
    assert run(job, out, sim) == 1
    expected = replayed(out)
    manifest = out / "manifest.json"
    manifest.write_bytes(manifest.read_bytes())  # rewritten since the run: its items may not be the stamped ones
    assert from_checkpoint(out) is None and status(out) == expected
    assert run(job, out, sim) == 1 and from_checkpoint(out) == expected  # the next run stamps it again
    with sqlite3.connect(checkpoint_path(out / "manifest.jsonl")) as db:
        db.execute("DROP TABLE current")  # a checkpoint written before status used it
    assert from_checkpoint(out) is None and status(out) == expected
    checkpoint_path(out / "manifest.jsonl").unlink()
    assert from_checkpoint(out) is None and status(out) == expected
    append(out, {"t": "item", "id": 3})  # a corrupt tail: the replay says what is wrong
    assert from_checkpoint(out) is None


def test_the_current_items_are_rewritten_only_when_the_job_changes(tmp_path, sim):
    job = write_job(tmp_path / "job.yaml", PROMPTS, defaults={"size": "16x16"})
    out = tmp_path / "out"
    assert run(job, out, sim) == 1
    path = checkpoint_path(out / "manifest.jsonl")

    def current() -> list:
        with sqlite3.connect(path) as db:
            return db.execute("SELECT id, rhash, pos FROM current ORDER BY pos").fetchall()

    first = current()
    assert [row[0] for row in first] == ["a", "b", "bad", "bad2"]
    with sqlite3.connect(path) as db:
        db.execute("UPDATE current SET pos = pos + 100")  # marks the rows: an unchanged rerun keeps them
    assert run(job, out, sim) == 1
    assert [row[2] for row in current()] == [101, 102, 103, 104]
    job = write_job(tmp_path / "job.yaml", PROMPTS[1:], defaults={"size": "16x16"})
    assert run(job, out, sim) == 1
    assert [(row[0], row[2]) for row in current()] == [("b", 1), ("bad", 2), ("bad2", 3)]
    assert from_checkpoint(out) == replayed(out)


def test_a_small_output_checks_every_file_as_a_replay_does(tmp_path, sim, monkeypatch):
    from batcher._runner import FULL_FILE_CHECK_BELOW

    assert _status.FULL_FILE_CHECK_BELOW == FULL_FILE_CHECK_BELOW
    job = write_job(tmp_path / "job.yaml", PROMPTS, defaults={"size": "16x16"})
    out = tmp_path / "out"
    assert run(job, out, sim) == 1
    gone = next(r for r in journal_records(out) if r.get("id") == "a" and r["t"] == "item")["images"][0]["file"]
    (out / gone).unlink()  # after the run verified it
    expected = replayed(out)
    assert expected["images_on_disk"] == 2
    no_replay(monkeypatch)
    assert status(out) == expected


def test_a_large_output_counts_the_files_its_last_run_verified(tmp_path, sim, monkeypatch):
    job = write_job(tmp_path / "job.yaml", PROMPTS, defaults={"size": "16x16"})
    out = tmp_path / "out"
    assert run(job, out, sim) == 1
    assert run(job, out, sim) == 1  # checks the files the first one made
    monkeypatch.setattr(_status, "FULL_FILE_CHECK_BELOW", 2)  # as if it held 10,000 items
    expected = replayed(out)
    assert from_checkpoint(out) == expected
    gone = next(r for r in journal_records(out) if r.get("id") == "a" and r["t"] == "item")["images"][0]["file"]
    (out / gone).unlink()  # by hand, after the run verified it: like a rerun, status trusts that check
    assert from_checkpoint(out)["images_on_disk"] == expected["images_on_disk"] == 3
