"""The job cache (see _jobcache): an unchanged job is not parsed, a grown one only in its new lines, and
any doubt (an edit in place, an override, the header, a clash with an old item) reads it all as ever."""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path

import pytest
from helpers import run_main as run

from batcher import _job
from batcher._checkpoint import checkpoint_path
from batcher._job import load_job
from batcher._simulator import SimulatorConfig, start_in_thread
from batcher._status import _status, status

pytestmark = pytest.mark.usefixtures("api_key")


@pytest.fixture
def sim():
    with start_in_thread(SimulatorConfig()) as running:
        yield running


@pytest.fixture
def passes(monkeypatch):
    """How often the job was validated in full, and how many item passes read the whole job file."""
    seen = {"validate": 0, "full": 0}
    validate, raw = _job.Job.validate, _job.Job._raw_entries

    def counted_validate(self, *args, **kwargs):
        seen["validate"] += 1
        return validate(self, *args, **kwargs)

    def counted_raw(self, *args, **kwargs):
        seen["full"] += 1
        return raw(self, *args, **kwargs)

    monkeypatch.setattr(_job.Job, "validate", counted_validate)
    monkeypatch.setattr(_job.Job, "_raw_entries", counted_raw)

    def reset() -> dict:
        now = dict(seen)
        seen.update(validate=0, full=0)
        return now
    return reset


def lines(*items: dict) -> str:
    return "".join(json.dumps(i) + "\n" for i in items)


OLD = [{"id": "a", "prompt": "a calm lake"}, {"id": "b", "prompt": "two foxes", "n": 2},
       {"prompt": "no id, derived"}]


def job_files(tmp_path: Path, text: str | None = None, header: str = "") -> Path:
    (tmp_path / "prompts.jsonl").write_text(text if text is not None else lines(*OLD), encoding="utf-8")
    job = tmp_path / "job.yaml"
    job.write_text(f"name: t\ndefaults: {{size: 16x16}}\n{header}prompts_file: prompts.jsonl\n", encoding="utf-8")
    return job


def append(tmp_path: Path, text: str) -> None:
    with open(tmp_path / "prompts.jsonl", "a", encoding="utf-8") as fh:
        fh.write(text)


def ids(out: Path) -> list[str]:
    return [i["id"] for i in json.loads((out / "manifest.json").read_text())["items"]]


def fresh_ids(job: Path) -> list[str]:
    loaded = load_job(job)
    loaded.validate()
    return [i.id for i in loaded.items()]


def test_an_unchanged_job_is_not_parsed(tmp_path, sim, passes):
    job, out = job_files(tmp_path), tmp_path / "out"
    assert run(job, out, sim) == 0
    assert passes()["validate"] == 1
    before = (out / "manifest.json").read_bytes()
    assert run(job, out, sim) == 0
    assert passes() == {"validate": 0, "full": 0}  # nothing read: not validated, not counted, manifest kept
    assert (out / "manifest.json").read_bytes() == before
    assert status(out) == {**_status(out / "manifest.jsonl", out), "batches": []}


def test_appended_lines_are_the_only_ones_validated_and_sent(tmp_path, sim, passes):
    job, out = job_files(tmp_path), tmp_path / "out"
    assert run(job, out, sim) == 0
    passes()
    # a derived id repeated from an old line continues its numbering, as a full read numbers it
    append(tmp_path, lines({"id": "c", "prompt": "a red door"}, {"prompt": "no id, derived"}))
    assert run(job, out, sim) == 0
    seen = passes()
    # the old lines are never read: counted from the checkpoint, their manifest records from the journal
    assert seen == {"validate": 0, "full": 0}
    assert ids(out) == fresh_ids(job)
    assert ids(out)[-1].endswith("-2")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["summary"] == {"total": 5, "done": 5, "failed": 0, "pending": 0}
    passes()  # fresh_ids read it
    assert run(job, out, sim) == 0 and passes() == {"validate": 0, "full": 0}  # and it is cached again
    assert status(out) == {**_status(out / "manifest.jsonl", out), "batches": []}


def test_a_file_rewritten_in_place_with_the_same_size_and_time_is_read_again(tmp_path, sim, passes):
    job, out = job_files(tmp_path), tmp_path / "out"
    assert run(job, out, sim) == 0
    prompts = tmp_path / "prompts.jsonl"
    st = prompts.stat()
    prompts.write_text(prompts.read_text().replace("calm lake", "calm pond"), encoding="utf-8")
    os.utime(prompts, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert prompts.stat().st_size == st.st_size
    passes()
    assert run(job, out, sim) == 0
    assert passes()["validate"] == 1
    item = next(i for i in json.loads((out / "manifest.json").read_text())["items"] if i["id"] == "a")
    assert item["request"]["prompt"] == "a calm pond"  # the changed request was sent


@pytest.mark.parametrize("change", ["override", "header", "shorter", "no newline at the end"])
def test_any_other_change_validates_the_whole_job(tmp_path, sim, passes, change):
    text = lines(*OLD)
    job, out = job_files(tmp_path, text[:-1] if change == "no newline at the end" else text), tmp_path / "out"
    assert run(job, out, sim) == 0
    passes()
    extra: list[str] = []
    if change == "override":
        extra = ["--quality", "low"]
    elif change == "header":
        job_files(tmp_path, text, header="endpoint: {base_url: 'http://127.0.0.1:9'}\n")  # (--base-url wins)
    elif change == "shorter":
        (tmp_path / "prompts.jsonl").write_text(lines(*OLD[:2]), encoding="utf-8")
    else:
        append(tmp_path, " \n")  # bytes appended to the last line: not a new line
    assert run(job, out, sim, *extra) == 0
    assert passes()["validate"] == 1
    assert run(job, out, sim, *extra) == 0 and passes()["validate"] == 0  # cached again after it


@pytest.mark.parametrize("new, message", [
    ({"id": "a", "prompt": "again"}, "duplicate id 'a'"),
    ({"id": "b_1", "prompt": "a stem b's second image has"}, "images/b_1"),
])
def test_a_new_item_clashing_with_an_old_one_is_reported_as_a_full_read_does(tmp_path, sim, passes, capsys,
                                                                               new, message):
    job, out = job_files(tmp_path), tmp_path / "out"
    assert run(job, out, sim) == 0
    append(tmp_path, lines(new))
    passes()
    assert run(job, out, sim) == 2
    assert passes()["validate"] == 1
    assert message in capsys.readouterr().err


def advice(capsys) -> list[str]:
    """The warning lines printed since last asked, without their time stamps."""
    return [ln.split("batcher: ", 1)[1] for ln in capsys.readouterr().err.splitlines()
            if "rejects response_format" in ln]


def test_validation_warnings_are_shown_from_the_cache(tmp_path, sim, capsys):
    model = "gpt-image-1"
    job, out = job_files(tmp_path, header=f"endpoint: {{base_url: '{sim.base_url}'}}\n"), tmp_path / "out"
    job.write_text(job.read_text().replace("size: 16x16", f"size: 16x16, model: {model}"), encoding="utf-8")
    assert run(job, out, sim) == 0
    first = advice(capsys)
    assert len(first) == 1
    assert run(job, out, sim) == 0
    assert advice(capsys) == first
    append(tmp_path, lines({"id": "z", "prompt": "one more"}))
    assert run(job, out, sim) == 0
    assert advice(capsys) == first


def test_an_old_item_to_run_again_is_found_without_reading_the_job(tmp_path, sim, passes):
    job, out = job_files(tmp_path), tmp_path / "out"
    assert run(job, out, sim) == 0
    gone = next(i for i in json.loads((out / "manifest.json").read_text())["items"] if i["id"] == "a")
    (out / gone["images"][0]["file"]).unlink()  # a small output checks every file: "a" runs again
    passes()
    assert run(job, out, sim) == 0
    assert passes()["validate"] == 0
    assert (out / gone["images"][0]["file"]).is_file()


def test_a_cache_entry_for_other_items_is_not_trusted(tmp_path, sim, passes):
    job, out = job_files(tmp_path), tmp_path / "out"
    assert run(job, out, sim) == 0
    with sqlite3.connect(checkpoint_path(out / "manifest.jsonl")) as db:
        db.execute("UPDATE meta SET v = 'other' WHERE k = 'current'")  # `current` holds other items now
    passes()
    assert run(job, out, sim) == 0
    assert passes()["validate"] == 1


def test_a_permanent_failure_stays_finished_and_retry_failed_reads_the_job(tmp_path, passes):
    with start_in_thread(SimulatorConfig(policy_word="forbidden")) as sim:
        job = job_files(tmp_path, lines(*OLD, {"id": "bad", "prompt": "something forbidden"}))
        out = tmp_path / "out"
        assert run(job, out, sim) == 1
        passes()
        assert run(job, out, sim) == 1
        assert passes() == {"validate": 0, "full": 0}  # a permanent failure is finished: nothing to send
        assert run(job, out, sim, "--retry-failed") == 1
        assert passes()["full"] >= 1  # an old item to send: its request is read from the job file
        bad = next(i for i in json.loads((out / "manifest.json").read_text())["items"] if i["id"] == "bad")
        assert bad["attempts"] == 2


def test_a_segmented_manifest_rewrites_only_the_segments_with_new_items(tmp_path, sim, passes, monkeypatch):
    from batcher import _segments
    from batcher._manifest import iter_manifest

    monkeypatch.setattr(_segments, "SEGMENT_ITEMS", 2)
    job, out = job_files(tmp_path, lines(*OLD, {"id": "d", "prompt": "a fourth"})), tmp_path / "out"
    from batcher import _layout

    monkeypatch.setattr(_layout, "FANOUT_FROM", 1)  # a "large" output: image subfolders, segments
    assert run(job, out, sim) == 0
    index = json.loads((out / "manifest.d" / "index.json").read_text())
    append(tmp_path, lines({"id": "e", "prompt": "a fifth"}))
    kept = []
    real = _segments._kept_prefix
    monkeypatch.setattr(_segments, "_kept_prefix", lambda *a: kept.append(real(*a)) or kept[-1])
    passes()
    assert run(job, out, sim) == 0
    assert passes() == {"validate": 0, "full": 0}
    assert kept == [2]  # both old segments kept without reading their items
    after = json.loads((out / "manifest.d" / "index.json").read_text())
    assert [s["file"] for s in after["segments"][:2]] == [s["file"] for s in index["segments"]]  # kept
    header, items = iter_manifest(out / "manifest.json")
    assert [i["id"] for i in items] == fresh_ids(job)
    assert header["summary"] == {"total": 5, "done": 5, "failed": 0, "pending": 0}


def test_an_invalid_appended_line_is_reported_as_a_full_read_words_it(tmp_path, sim, passes, capsys):
    job, out = job_files(tmp_path), tmp_path / "out"
    assert run(job, out, sim) == 0
    append(tmp_path, '{"id": "x", "prompt": \n')
    passes()
    assert run(job, out, sim) == 2
    assert passes()["validate"] == 1
    assert "prompts.jsonl:4: line: invalid JSON" in capsys.readouterr().err


def test_a_yaml_job_with_inline_prompts_is_cached_until_it_changes(tmp_path, sim, passes):
    from helpers import write_job

    job, out = write_job(tmp_path / "job.yaml", OLD, defaults={"size": "16x16"}), tmp_path / "out"
    assert run(job, out, sim) == 0
    passes()
    assert run(job, out, sim) == 0 and passes() == {"validate": 0, "full": 0}
    write_job(tmp_path / "job.yaml", [*OLD, "one more"], defaults={"size": "16x16"})
    assert run(job, out, sim) == 0 and passes()["validate"] == 1
    assert ids(out) == fresh_ids(job)


def test_an_old_item_is_never_written_without_its_request():
    from batcher._exceptions import JobError
    from batcher._jobcache import OldItem

    with pytest.raises(JobError):
        OldItem("a", "h").body  # noqa: B018


def test_only_whole_untouched_old_segments_are_kept_unread(tmp_path, monkeypatch):
    from types import SimpleNamespace

    from batcher import _segments

    monkeypatch.setattr(_segments, "SEGMENT_ITEMS", 2)
    old = []
    for k in range(3):
        (tmp_path / f"s{k}").write_text("")
        old.append({"file": f"s{k}", "counts": {"total": 2}})
    pos = {"a": 1, "d": 4}
    known = SimpleNamespace(count=6, positions=lambda ids: [pos[i] for i in ids if i in pos])
    assert _segments._kept_prefix(tmp_path, old, known, set()) == 3
    assert _segments._kept_prefix(tmp_path, old, known, {"d", "new"}) == 1  # item 4 is in segment 1
    assert _segments._kept_prefix(tmp_path, old, known, {"a"}) == 0
    assert _segments._kept_prefix(tmp_path, old, SimpleNamespace(count=5, positions=known.positions), set()) == 2
    (tmp_path / "s1").unlink()
    assert _segments._kept_prefix(tmp_path, old, known, set()) == 1


def test_a_journal_changed_since_the_manifest_is_asked_item_by_item(tmp_path, sim, passes):
    """The shortcut "all done when the manifest was stamped" holds only while the journal is unchanged."""
    job, out = job_files(tmp_path), tmp_path / "out"
    assert run(job, out, sim) == 0
    journal = out / "manifest.jsonl"
    rec = next(json.loads(ln) for ln in journal.read_text().splitlines()
               if json.loads(ln).get("t") == "item" and json.loads(ln)["id"] == "a")
    rec.update(status="failed", images=[], error={"kind": "transient", "code": "timeout", "message": "x"})
    with open(journal, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(rec) + "\n")  # as a crashed run would leave it
    requests = sim.stats()["requests"]
    passes()
    assert run(job, out, sim) == 0
    assert passes()["validate"] == 0
    assert sim.stats()["requests"] == requests + 1  # "a" sent again


def test_an_edit_that_cannot_change_the_items_keeps_the_cache(tmp_path, sim, passes):
    job, out = job_files(tmp_path), tmp_path / "out"
    assert run(job, out, sim) == 0
    job_files(tmp_path, header="concurrency: 3\nrate_limit: {rpm: 6000}\n")
    passes()
    assert run(job, out, sim) == 0
    assert passes() == {"validate": 0, "full": 0}


def test_the_key_covers_every_job_field_but_those_listed():
    import dataclasses

    from batcher._jobcache import _NOT_ITEMS, job_key

    job = load_job(Path(__file__).resolve().parent.parent / "jobs" / "example.yaml")
    base = job_key(job, ["default"])
    for f in dataclasses.fields(job):
        changed = dataclasses.replace(job, **{f.name: Path("x") if f.name == "path" else "x"})
        assert (job_key(changed, ["default"]) == base) == (f.name in _NOT_ITEMS), f.name
