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


# -- the tally: the counts kept by the runs, read with the journal's tail; the same bytes as a full count ----


def _json(capsys, out: Path) -> str:
    capsys.readouterr()
    assert main(["status", str(out), "--json"]) == 0
    return capsys.readouterr().out


def kept_equals_counted(out: Path, monkeypatch, capsys, *, kept: bool = True) -> dict:
    """`status --json` from the kept tally is byte for byte the full count's (and a replay's);
    `kept`: whether the tally was usable (else status counted in full, as it must)."""
    real = _status._counted
    used: list[bool] = []  # per count: from the tally, and answered by it

    def spy(*args):
        found = real(*args)
        used.append(args[-1] is not None and found is not None)
        return found

    monkeypatch.setattr(_status, "_counted", spy)
    fast = _json(capsys, out)
    with monkeypatch.context() as m:
        m.setattr(_status, "_tallied", lambda db, rows: None)
        full = _json(capsys, out)
    monkeypatch.setattr(_status, "_counted", real)
    assert used[0] == kept and not any(used[1:])
    assert fast == full
    assert json.loads(fast) == json.loads(json.dumps({**replayed(out), "out": str(out), "batches": []}))
    return json.loads(fast)


MIXED = [
    {"id": "a", "prompt": "A calm lake at dawn"},
    {"id": "b", "prompt": "Two foxes", "n": 2},
    {"id": "bad", "prompt": "something forbidden here"},
    {"id": "c", "prompt": "A lighthouse", "n": 3},
    {"id": "bad2", "prompt": "another forbidden thing"},
    {"id": "d", "prompt": "A red kite"},
]


@pytest.mark.parametrize("files_checked_below", [10_000, 2])  # a small output's full file check, a large one's
def test_status_from_the_kept_tally_is_the_full_count_as_an_output_grows(tmp_path, sim, monkeypatch, capsys,
                                                                          files_checked_below):
    monkeypatch.setattr(_status, "FULL_FILE_CHECK_BELOW", files_checked_below)
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", MIXED, defaults={"size": "16x16"}, pricing=[{"per_image": 0.04}])
    assert run(job, out, sim, "--max-images", "3", "--concurrency", "1") == 4  # done, pending
    kept_equals_counted(out, monkeypatch, capsys)
    assert run(job, out, sim) == 1  # the rest: done, multi-n, failed
    got = kept_equals_counted(out, monkeypatch, capsys)
    assert (got["done"], got["failed"], got["pending"], got["images"]) == (4, 2, 0, 7)
    with start_in_thread(SimulatorConfig(policy_word="nothing-forbidden")) as lenient:
        assert run(job, out, lenient, "--retry-failed") == 0  # the failed ones retried: now done
    got = kept_equals_counted(out, monkeypatch, capsys)
    assert (got["done"], got["failed"], got["failures"]) == (6, 0, {})
    records = {r["id"]: r for r in journal_records(out) if r["t"] == "item"}
    rhash = {k: r["rhash"] for k, r in records.items()}
    # a journal tail after the checkpoint (a run in progress): an attempt, a done item failing again
    append(out, {"t": "run", "job": "t", "at": "2026-02-02T00:00:00.000Z", "pid": 1},
           {"t": "attempt", "id": "d", "rhash": rhash["d"], "attempt": 2},
           {**failed_record("c", rhash["c"], "http_500", "the server said no"), "request": records["c"]["request"]},
           {"t": "attempt", "id": "zz", "rhash": "0" * 16, "attempt": 1})
    got = kept_equals_counted(out, monkeypatch, capsys)
    assert got["failures"]["http_500"]["count"] == 1 and got["runs"] == 4
    # the job changed: a new size for every item (their requests change): `current` rewritten, counted in full
    assert run(job, out, sim, "--size", "8x8", "--max-images", "4", "--concurrency", "1") == 4
    got = kept_equals_counted(out, monkeypatch, capsys)
    assert got["pending"] > 0
    # items appended to the job: only they are counted in
    job = write_job(tmp_path / "job.yaml", [*MIXED, "one more", {"id": "e", "prompt": "forbidden too"}],
                    defaults={"size": "16x16"}, pricing=[{"per_image": 0.04}])
    assert run(job, out, sim) == 1
    got = kept_equals_counted(out, monkeypatch, capsys)
    assert got["total"] == 8 and set(got["failures"]) == {"content_policy_violation", "http_500"}


def test_endpoints_keep_their_order_when_an_endpoints_first_item_moves(tmp_path, monkeypatch, capsys):
    from batcher._checkpoint import refresh

    with start_in_thread(SimulatorConfig(policy_word="forbidden")) as x, \
            start_in_thread(SimulatorConfig(policy_word="forbidden")) as y:
        job = write_job(tmp_path / "job.yaml", [
            {"id": "x1", "prompt": "p1", "model": "mx"}, {"id": "y1", "prompt": "p2", "model": "my"},
            {"id": "x2", "prompt": "forbidden p3", "model": "mx"}, {"id": "y2", "prompt": "p4", "model": "my", "n": 2},
            {"id": "x3", "prompt": "p5", "model": "mx"},
        ], defaults={"size": "16x16"}, endpoints=[
            {"name": "x", "base_url": x.base_url, "models": ["mx"], "price": 0.25},
            {"name": "y", "base_url": y.base_url, "models": ["my"], "price": 0.1}])
        out = tmp_path / "out"
        assert main(["run", str(job), "--out", str(out), "--quiet", "--timeout", "10"]) == 1
    got = kept_equals_counted(out, monkeypatch, capsys)
    assert list(got["endpoints"]) == ["x", "y"] and got["endpoints"]["x"]["cost"] == 0.5
    records = {r["id"]: r for r in journal_records(out) if r["t"] == "item"}
    # x's first item re-sent and not finished: x is now first at x2 (after y1): status counts in full
    append(out, {"t": "attempt", "id": "x1", "rhash": "0" * 16, "attempt": 1})
    got = kept_equals_counted(out, monkeypatch, capsys, kept=False)
    assert list(got["endpoints"]) == ["y", "x"]
    assert refresh(out / "manifest.jsonl") is not None  # a run's refresh finds x's new first item
    assert kept_equals_counted(out, monkeypatch, capsys)["endpoints"] == got["endpoints"]
    # it finishes on y, and y's first (y1) fails on x: both move again
    append(out, {**records["x1"], "rhash": "0" * 16, "endpoint": "y"},
           {**records["x2"], "id": "y1", "rhash": records["y1"]["rhash"]})
    got = kept_equals_counted(out, monkeypatch, capsys, kept=False)
    assert refresh(out / "manifest.jsonl") is not None
    assert kept_equals_counted(out, monkeypatch, capsys) == got


def test_a_tally_that_is_stale_or_disagrees_is_not_used(tmp_path, sim, monkeypatch, capsys):
    job = write_job(tmp_path / "job.yaml", PROMPTS, defaults={"size": "16x16"})
    out = tmp_path / "out"
    assert run(job, out, sim) == 1
    expected = kept_equals_counted(out, monkeypatch, capsys)
    path = checkpoint_path(out / "manifest.jsonl")
    with sqlite3.connect(path) as db:  # a failed row outside the `unverified` index (no run writes one)
        db.execute("UPDATE items SET verified = 1 WHERE id = 'bad'")
    assert kept_equals_counted(out, monkeypatch, capsys, kept=False) == expected
    with sqlite3.connect(path) as db:
        db.execute("UPDATE items SET verified = 0 WHERE id = 'bad'")
    with monkeypatch.context() as m:
        m.setattr(_status, "FULL_FILE_CHECK_BELOW", 2)  # as if large: the verified files are counted, not checked
        kept_equals_counted(out, monkeypatch, capsys)
        with sqlite3.connect(path) as db:  # a file check the tally did not see (an older batcher's)
            db.execute("UPDATE items SET verified = 1 WHERE id = 'a'")
        assert kept_equals_counted(out, monkeypatch, capsys, kept=False)["images_on_disk"] == 3
        with sqlite3.connect(path) as db:
            db.execute("UPDATE items SET verified = 0 WHERE id = 'a'")
    with sqlite3.connect(path) as db:
        # a writer that did not move the tally (an older batcher): the offset it counted is not the checkpoint's
        tally = json.loads(db.execute("SELECT v FROM meta WHERE k = 'tally'").fetchone()[0])
        db.execute("UPDATE meta SET v = ? WHERE k = 'tally'", (json.dumps({**tally, "offset": tally["offset"] - 1}),))
    assert kept_equals_counted(out, monkeypatch, capsys, kept=False) == expected
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET v = 'not json' WHERE k = 'tally'")
    assert kept_equals_counted(out, monkeypatch, capsys, kept=False) == expected
    with sqlite3.connect(path) as db:
        db.execute("DROP INDEX unverified")  # the failed rows' index (every checkpoint has it): not used without
    assert kept_equals_counted(out, monkeypatch, capsys, kept=False) == expected
    with sqlite3.connect(path) as db:
        db.execute("CREATE INDEX unverified ON items (status) WHERE verified = 0")
    assert run(job, out, sim) == 1  # the next run counts it in full again
    got = kept_equals_counted(out, monkeypatch, capsys)
    assert {k: got[k] for k in ("done", "failed", "failures", "images_on_disk")} == \
        {k: expected[k] for k in ("done", "failed", "failures", "images_on_disk")}
