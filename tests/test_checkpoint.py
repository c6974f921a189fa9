"""Resume from a checkpoint: the journal's tail only; a stale, lost or corrupt checkpoint is rebuilt."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from batcher import _checkpoint
from batcher._checkpoint import Checkpoint, checkpoint_path, refresh
from batcher._manifest import Journal
from batcher._simulator import SimulatorConfig, start_in_thread
from batcher._status import status

from helpers import run_main as run, write_job

PROMPTS = [
    {"id": "a", "prompt": "A calm lake at dawn"},
    {"id": "b", "prompt": "Two foxes", "n": 2},
    {"id": "bad", "prompt": "something forbidden here"},
]


@pytest.fixture
def sim():
    with start_in_thread(SimulatorConfig(policy_word="forbidden")) as running:
        yield running


pytestmark = pytest.mark.usefixtures("api_key")


def line(rec: dict) -> bytes:
    return (json.dumps(rec, separators=(",", ":")) + "\n").encode()


def item(item_id: str, status: str = "done", rhash: str = "h1", **extra) -> dict:
    return {"t": "item", "id": item_id, "rhash": rhash, "status": status, "images": [], "attempts": 1,
            "error": None, **extra}


def journal_of(tmp_path: Path, *recs: dict) -> Path:
    path = tmp_path / "manifest.jsonl"
    path.write_bytes(b"".join(line(r) for r in recs))
    return path


def test_open_reads_the_tail_only_and_applies_it(tmp_path):
    path = journal_of(tmp_path, {"t": "run", "job": "t", "at": "x"}, item("a"), item("b", "failed",
                      error={"kind": "transient"}))
    assert refresh(path) == path.stat().st_size
    # proof that the covered prefix is not replayed: a row changed behind the journal's back shows
    with sqlite3.connect(checkpoint_path(path)) as db:
        db.execute("UPDATE items SET attempts = 7 WHERE id = 'a'")
    with open(path, "ab") as fh:
        fh.write(line({"t": "attempt", "id": "b", "rhash": "h1", "attempt": 2}))
        fh.write(line({"t": "attempt", "id": "a", "rhash": "h1", "attempt": 9}))
        fh.write(line(item("c")))
    journal = Journal.read(path, checkpoint=True)
    assert journal.checkpoint is not None
    assert journal.entries["a"].status == "done" and journal.entries["a"].attempts == 9
    assert journal.entries["b"].status == "pending" and journal.entries["b"].attempts == 2
    assert journal.entries["c"].status == "done" and journal.entries["c"].offset > 0
    assert journal.entries.get("nope") is None
    assert [r["t"] for r in journal.runs] == ["run"]
    journal.checkpoint.close()


def test_refresh_covers_the_tail_and_keeps_the_latest_state(tmp_path):
    path = journal_of(tmp_path, item("a", "failed", error={"kind": "transient", "code": "timeout"}))
    refresh(path)
    with open(path, "ab") as fh:
        fh.write(line(item("a", cost=0.5, endpoint="e")))
        fh.write(b'{"t":"item","id":"torn"')  # a kill mid-write: not covered yet
    end = refresh(path)
    assert end == path.stat().st_size - len(b'{"t":"item","id":"torn"')
    cp = Checkpoint.open(path)
    assert cp is not None and cp.offset == end
    assert cp.get("a")[0] == "done" and cp.get("torn") is None
    cp.close()


@pytest.mark.parametrize("damage", ["replaced", "shorter", "garbage", "lost"])
def test_a_stale_or_corrupt_checkpoint_is_rebuilt_from_the_journal(tmp_path, damage):
    path = journal_of(tmp_path, item("a"), item("b"))
    refresh(path)
    if damage == "replaced":  # same length, other bytes: the digests tell
        path.write_bytes(path.read_bytes().replace(b'"id":"b"', b'"id":"c"'))
    elif damage == "shorter":
        path.write_bytes(line(item("a")))
    elif damage == "garbage":
        checkpoint_path(path).write_bytes(b"not a database" * 100)
    else:
        checkpoint_path(path).unlink()
    expected = {"replaced": {"a", "c"}, "shorter": {"a"}}.get(damage, {"a", "b"})
    journal = Journal.read(path, checkpoint=True)  # rebuilt from the journal, then used
    assert journal.checkpoint is not None and journal.checkpoint.offset == path.stat().st_size
    assert set(journal.entries) == expected and not journal.entries.tail
    journal.checkpoint.close()
    cp = Checkpoint.open(path)
    assert {r[0] for r in cp.rows()} == expected
    cp.close()


def test_a_folder_where_no_checkpoint_can_be_written_replays_the_journal(tmp_path, monkeypatch):
    path = journal_of(tmp_path, item("a"), item("b", "failed", error={"kind": "permanent"}))
    monkeypatch.setattr(_checkpoint, "_SCHEMA", "CREATE TABLE broken (")  # as sqlite failing to create it
    journal = Journal.read(path, checkpoint=True)
    assert journal.checkpoint is None and not checkpoint_path(path).exists()
    assert journal.entries["b"].status == "failed" and journal.entries["a"].status == "done"


def test_a_long_tail_is_flushed_in_chunks_with_the_same_result(tmp_path, monkeypatch):
    monkeypatch.setattr(_checkpoint, "FLUSH", 1)  # every row written at once; later records look it up
    path = journal_of(tmp_path, item("a", "failed", error={"kind": "transient"}),
                      {"t": "attempt", "id": "a", "rhash": "h1", "attempt": 3}, item("b"),
                      {"t": "attempt", "id": "b", "rhash": "h1", "attempt": 2})
    refresh(path)
    cp = Checkpoint.open(path)
    assert cp.get("a")[:3] == ("pending", "h1", 3) and cp.get("b")[:3] == ("done", "h1", 2)
    cp.close()


def test_a_kill_during_refresh_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    path = journal_of(tmp_path, item("a"))
    first = refresh(path)
    with open(path, "ab") as fh:
        fh.write(line(item("b")))
    monkeypatch.setattr(_checkpoint, "_UPSERT", "INSERT INTO no_such_table VALUES (?)")  # fails mid-transaction
    assert refresh(path) is None
    cp = Checkpoint.open(path)
    assert cp is not None and cp.offset == first and cp.get("b") is None and cp.get("a")[0] == "done"
    cp.close()


def test_a_torn_tail_is_cut_back_to_the_last_whole_line_not_to_the_checkpoint_start(tmp_path):
    path = journal_of(tmp_path, item("a"))
    refresh(path)
    whole = path.stat().st_size
    with open(path, "ab") as fh:
        fh.write(b'{"t":"item","id":"b"')
    journal = Journal.open(path, checkpoint=True)
    journal.close()
    assert path.stat().st_size == whole and journal.torn_line is not None


def test_runs_build_and_use_it_and_status_agrees_with_a_full_replay(tmp_path, sim):
    job = write_job(tmp_path / "job.yaml", PROMPTS, defaults={"size": "16x16"})
    out = tmp_path / "out"
    assert run(job, out, sim) == 1  # one policy failure
    assert checkpoint_path(out / "manifest.jsonl").is_file()
    job = write_job(tmp_path / "job.yaml", [*PROMPTS, {"id": "c", "prompt": "A new one"}],
                    defaults={"size": "16x16"})
    assert run(job, out, sim) == 1
    requests = sim.stats()["requests"]
    assert run(job, out, sim) == 1 and sim.stats()["requests"] == requests  # nothing new to send
    with_checkpoint = status(out)
    cp = Checkpoint.open(out / "manifest.jsonl")
    assert cp is not None and cp.offset == (out / "manifest.jsonl").stat().st_size
    cp.close()
    checkpoint_path(out / "manifest.jsonl").unlink()
    replayed = status(out)
    assert with_checkpoint == replayed
    assert replayed["done"] == 3 and replayed["failed"] == 1 and replayed["images_on_disk"] == 4


def test_unchanged_rerun_keeps_manifest_json_and_a_changed_job_rewrites_it(tmp_path, sim):
    job = write_job(tmp_path / "job.yaml", PROMPTS[:2], defaults={"size": "16x16"})
    out = tmp_path / "out"
    assert run(job, out, sim) == 0
    assert run(job, out, sim) == 0  # verifies the first run's files
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert run(job, out, sim) == 0
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    write_job(tmp_path / "job.yaml", [PROMPTS[0]], defaults={"size": "16x16"})  # an item left the job
    assert run(job, out, sim) == 0
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["summary"]["total"] == 1 and [i["id"] for i in doc["items"]] == ["a"]


def test_files_lost_after_a_run_are_found_by_the_next_one(tmp_path, sim):
    job = write_job(tmp_path / "job.yaml", PROMPTS[:2], defaults={"size": "16x16"})
    out = tmp_path / "out"
    assert run(job, out, sim) == 0
    cp = Checkpoint.open(out / "manifest.jsonl")
    assert {r[0]: r[12] for r in cp.rows()} == {"a": 0, "b": 0}  # written, not yet seen by a later run
    cp.close()
    (out / "images" / "a.png").unlink()  # e.g. a power cut before the data reached the disk
    requests = sim.stats()["requests"]
    assert run(job, out, sim) == 0
    assert sim.stats()["requests"] == requests + 1 and (out / "images" / "a.png").is_file()
    cp = Checkpoint.open(out / "manifest.jsonl")
    assert {r[0]: r[12] for r in cp.rows()} == {"a": 0, "b": 1}  # b checked; a is new again
    cp.close()


def test_a_manifest_that_could_not_be_written_is_not_stamped_current(tmp_path, sim, monkeypatch):
    import errno

    from batcher import _runner

    job = write_job(tmp_path / "job.yaml", PROMPTS[:1], defaults={"size": "16x16"})
    out = tmp_path / "out"
    assert run(job, out, sim) == 0
    write_job(job, PROMPTS[:2], defaults={"size": "16x16"})
    real = _runner.write_manifest

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(_runner, "write_manifest", disk_full)
    assert run(job, out, sim) == 4
    monkeypatch.setattr(_runner, "write_manifest", real)
    assert run(job, out, sim) == 0  # sends nothing, but must write the manifest the last run couldn't
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["summary"] == {"total": 2, "done": 2, "failed": 0, "pending": 0}


def test_a_small_output_checks_every_file_every_run_large_ones_only_unchecked(tmp_path, sim, monkeypatch):
    """A file deleted by hand after several reruns is still found below FULL_FILE_CHECK_BELOW items;
    above it, items a run already checked are not stat'ed again (a rerun's cost must not grow with N)."""
    import batcher._runner as runner

    job = write_job(tmp_path / "job.yaml", PROMPTS[:2], defaults={"size": "16x16"})
    out = tmp_path / "out"
    for _ in range(3):  # the second run checks the first's files; the third trusts the checkpoint
        assert run(job, out, sim) == 0
    (out / "images" / "a.png").unlink()
    requests = sim.stats()["requests"]
    assert run(job, out, sim) == 0
    assert sim.stats()["requests"] == requests + 1 and (out / "images" / "a.png").is_file()
    assert run(job, out, sim) == 0  # now a is checked again too
    monkeypatch.setattr(runner, "FULL_FILE_CHECK_BELOW", 1)  # as if the output were large
    (out / "images" / "a.png").unlink()
    requests = sim.stats()["requests"]
    assert run(job, out, sim) == 0
    assert sim.stats()["requests"] == requests and not (out / "images" / "a.png").exists()


def test_snapshot_entries_are_counted_by_sqlite_with_the_tail(tmp_path):
    from batcher._checkpoint import SnapshotEntries

    path = journal_of(tmp_path, item("a"), item("b"))
    assert refresh(path) is not None
    with open(path, "ab") as fh:
        fh.write(line(item("b", "failed", error={"kind": "transient"})))  # in the checkpoint already
        fh.write(line(item("c")))  # new
    journal = Journal.open(path, checkpoint=True)
    try:
        assert isinstance(journal.entries, SnapshotEntries)
        assert len(journal.entries) == 3 == len(list(journal.entries))
        assert journal.entries.fewer_than(4) and not journal.entries.fewer_than(3)
        assert not journal.entries.fewer_than(2)  # a bounded count: 2 rows read, then the tail's new id
    finally:
        journal.close()


# -- the tally (status's counts) moved along by every writer equals a full count ---------------------


class _Item:
    def __init__(self, item_id: str, rhash: str) -> None:
        self.id, self.rhash, self.images, self.explicit_id = item_id, rhash, 1, True


def _current(path: Path, items: list[_Item], start: int = 0, digest: str = "d") -> None:
    from batcher._jobcache import CurrentWriter

    db = _checkpoint.open_writer(path)
    assert db is not None
    writer = CurrentWriter(db, start=start)
    for _ in writer.record(items[start:]):
        pass
    assert writer.commit(digest, None)
    db.close()


def _stored_and_counted(path: Path) -> tuple[object, object]:
    """The stored tally and a full count, with their cost sums (exact, and from SQL's float sum) rounded."""
    from batcher import _tally

    with sqlite3.connect(checkpoint_path(path)) as db:
        stored, counted = _tally.load_matching(db), _tally.count(db)
    assert stored is not None and counted is not None
    stored.stamp = None
    for tally in (stored, counted):
        tally.cost = round(tally.cost, 9)
        for counts in tally.endpoints.values():
            counts[3] = round(counts[3], 9)
    return stored, counted


def _random_record(rng, ids: list[str], offsets: int) -> dict:
    item_id = rng.choice(ids)
    rhash = rng.choice(["h1", "h1", "h1", "h2"])  # now and then a request the current item does not have
    if rng.random() < 0.3:
        return {"t": "attempt", "id": item_id, "rhash": rhash, "attempt": rng.randint(1, 3)}
    status = rng.choice(["done", "done", "failed"])
    n = rng.randint(0, 2) if status == "done" else rng.choice([0, 0, 1])
    return item(item_id, status, rhash, endpoint=rng.choice(["x", "y", "z", None]),
                cost=rng.choice([None, 0.04, 0.1, 1 / 3]) if status == "done" else None,
                images=[{"file": f"images/{item_id}-{offsets}-{k}.png", "bytes": rng.randint(1, 99)} for k in range(n)],
                error={"kind": "permanent", "code": rng.choice(["policy", "http_500"]), "message": "no"}
                if status == "failed" else None)


@pytest.mark.parametrize("seed", range(6))
def test_the_tally_moved_by_each_refresh_and_each_new_current_equals_a_full_count(tmp_path, seed):
    import random

    rng = random.Random(seed)
    ids = [f"i{k}" for k in range(30)]
    path = journal_of(tmp_path, {"t": "run", "job": "t", "at": "x"},
                      *(_random_record(rng, ids[:20], k) for k in range(40)))
    assert refresh(path) is not None
    _current(path, [_Item(i, "h1") for i in ids[:20]])  # a rewrite: counted in full
    for step in range(12):
        with open(path, "ab") as fh:
            fh.writelines(line(_random_record(rng, ids, 100 * step + k)) for k in range(rng.randint(1, 15)))
        missing: set[str] = set(rng.sample(ids, 3)) if step % 3 == 2 else set()
        assert refresh(path, checked=(path.stat().st_size, missing) if step % 3 else None) is not None
        stored, counted = _stored_and_counted(path)
        assert stored == counted
        if step == 5:  # new items appended to the job: only they are counted in
            _current(path, [_Item(i, "h1") for i in ids], start=20, digest="d2")
            stored, counted = _stored_and_counted(path)
            assert stored == counted and stored.done + stored.failed + stored.pending > 0


def test_a_checkpoint_without_a_tally_is_counted_in_full_by_the_next_refresh(tmp_path):
    from batcher import _tally

    path = journal_of(tmp_path, {"t": "run", "job": "t", "at": "x"}, item("a", endpoint="x", cost=0.5),
                      item("b", "failed", error={"kind": "permanent", "code": "c"}, endpoint="y"))
    refresh(path)
    _current(path, [_Item("a", "h1"), _Item("b", "h1")])
    with sqlite3.connect(checkpoint_path(path)) as db:
        db.execute("DELETE FROM meta WHERE k = 'tally'")  # written by a batcher before the tally
    with open(path, "ab") as fh:
        fh.write(line(item("b", endpoint="y", cost=0.25)))
    refresh(path)
    stored, counted = _stored_and_counted(path)
    assert stored == counted and (stored.done, stored.failed) == (2, 0)
    with sqlite3.connect(checkpoint_path(path)) as db:  # a writer that did not move it: its stamp says so
        db.execute("UPDATE meta SET v = 'other' WHERE k = 'current'")
        assert _tally.load(db) is not None and _tally.load_matching(db) is None


def test_rows_that_cant_be_tallied_are_counted_once_not_by_every_run(tmp_path, monkeypatch):
    from batcher import _tally

    path = journal_of(tmp_path, {"t": "run", "job": "t", "at": "x"}, item("a", cost="lots"))  # not a number
    refresh(path)
    _current(path, [_Item("a", "h1")])
    with sqlite3.connect(checkpoint_path(path)) as db:
        assert _tally.load(db) is None and _tally._uncountable(db)
    counts: list[int] = []
    real = _tally.count
    monkeypatch.setattr(_tally, "count", lambda db: counts.append(1) or real(db))
    with open(path, "ab") as fh:
        fh.write(line(item("b")))
    refresh(path)
    assert counts == []  # a full count failed before: not tried again by each run
    with open(path, "ab") as fh:
        fh.write(line(item("a", cost=0.04)))
    refresh(path)
    assert counts == []
    _current(path, [_Item("a", "h1"), _Item("b", "h1")], digest="d2")  # a rewrite of `current` counts again
    assert counts == [1]
    stored, counted = _stored_and_counted(path)
    assert stored == counted
