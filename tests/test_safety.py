"""Data-safety cases of issue 15: a disk that fills up, clashing file names, the lock, foreign
folders, alias bombs, a job edited during a run, CLI input checks, a sharded work folder."""

from __future__ import annotations

import errno
import json
import os

import pytest
from helpers import run_main as run, write_job

from batcher import RunOptions, load_job, run_sync
from batcher._cli import main
from batcher._manifest import Journal
from batcher._simulator import SimulatorConfig, start_in_thread


@pytest.fixture
def sim():
    with start_in_thread(SimulatorConfig()) as running:
        yield running


pytestmark = pytest.mark.usefixtures("api_key")


def cli(*args) -> int:
    return main([str(a) for a in args])


def rec(i: int, status: str = "done") -> dict:
    return {"t": "item", "id": f"i{i}", "rhash": "h", "status": status, "request": {"prompt": f"p{i}"},
            "created": 1, "images": [], "attempts": 1, "error": None}


class FillingDisk:
    """os.write for the journal: `full` makes the next write store half its bytes, then ENOSPC."""

    def __init__(self) -> None:
        self.full = False
        self.failures = 0

    def __call__(self, fd: int, data: memoryview) -> int:
        if self.full:
            self.failures += 1
            if len(data) > 1:
                return os.write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)


def journal_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_bytes().splitlines()]


# -- #2: a failed append is cut off before anything else is written ---------------------------


def test_failed_append_is_cut_off_and_the_next_record_starts_a_clean_line(tmp_path, monkeypatch):
    disk = FillingDisk()
    monkeypatch.setattr("batcher._manifest._write", disk)
    path = tmp_path / "manifest.jsonl"
    journal = Journal.open(path)
    journal.append(rec(1))
    disk.full = True
    with pytest.raises(OSError):
        journal.append(rec(2))
    disk.full = False  # space comes back while requests finish
    journal.append(rec(3))
    journal.close()
    assert [r["id"] for r in journal_lines(path)] == ["i1", "i3"]
    again = Journal.open(path)
    assert again.torn_line is None and set(again.entries) == {"i1", "i3"}
    again.close()


def test_a_failed_cut_is_retried_before_the_next_write(tmp_path, monkeypatch):
    disk = FillingDisk()
    monkeypatch.setattr("batcher._manifest._write", disk)
    real_truncate = os.ftruncate
    calls = []

    def truncate_once_failing(fd: int, size: int) -> None:
        calls.append(size)
        if len(calls) == 1:
            raise OSError(errno.EIO, "I/O error")
        real_truncate(fd, size)

    monkeypatch.setattr("batcher._manifest.os.ftruncate", truncate_once_failing)
    path = tmp_path / "manifest.jsonl"
    journal = Journal.open(path)
    journal.append(rec(1))
    disk.full = True
    with pytest.raises(OSError):
        journal.append(rec(2))
    disk.full = False
    journal.append(rec(3))
    journal.close()
    assert len(calls) == 2
    assert [r["id"] for r in journal_lines(path)] == ["i1", "i3"]


def test_disk_full_mid_run_stops_with_a_true_summary_and_a_clean_folder(tmp_path, monkeypatch):
    """The journal fills up after some items; the manifest can't be written either. The stop's
    summary counts what the journal holds, no temp manifest is left, the rerun pays only the rest."""
    disk = FillingDisk()
    monkeypatch.setattr("batcher._manifest._write", disk)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if disk.full:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr("batcher._manifest.os.fsync", fsync)
    job = load_job(write_job(tmp_path / "job.yaml", [f"prompt {i}" for i in range(12)], defaults={"size": "8x8"}))
    out = tmp_path / "out"
    done_records = []

    import batcher._manifest as manifest_module

    real_apply = manifest_module.Journal._apply

    def apply(self, r, offset):  # the disk fills up once 5 items are done
        real_apply(self, r, offset)
        if r.get("t") == "item" and r["status"] == "done":
            done_records.append(r["id"])
            if len(done_records) == 5:
                disk.full = True

    monkeypatch.setattr(manifest_module.Journal, "_apply", apply)
    with start_in_thread(SimulatorConfig(latency_ms=20)) as sim:
        opts = RunOptions(out=str(out), base_url=sim.base_url, api_key="k", concurrency=2, timeout=10)
        result = run_sync(job, opts)
        assert result.exit_code == 4 and result.error["code"] == "disk_error"
        assert result.summary["total"] == 12 and result.summary["done"] == 5, result.summary
        assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]
        lines = journal_lines(out / "manifest.jsonl")  # every line whole: nothing glued to a torn one
        assert sum(r["t"] == "item" for r in lines) == 5
        disk.full = False
        monkeypatch.setattr(manifest_module.Journal, "_apply", real_apply)
        again = run_sync(load_job(job.path), opts)
    assert again.exit_code == 0 and again.summary["done"] == 12
    assert again.requests == 7


# -- #3: two items never write one file -----------------------------------------------------


def _problems(path) -> list[str]:
    return [str(p) for p in load_job(path).problems()]


def test_an_id_equal_to_another_items_numbered_file_is_refused_naming_both_lines(tmp_path):
    path = tmp_path / "job.jsonl"
    path.write_text('{"id": "x", "prompt": "a", "n": 2}\n{"id": "y", "prompt": "b"}\n{"id": "x_1", "prompt": "c"}\n')
    problems = _problems(path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{path}:3: id:") and f"{path}:1" in problems[0] and "x_1" in problems[0]


def test_the_numbered_item_after_the_plain_id_is_refused_too(tmp_path):
    path = tmp_path / "job.jsonl"
    path.write_text('{"id": "x_2", "prompt": "c"}\n{"id": "x", "prompt": "a", "n": 3}\n')
    problems = _problems(path)
    assert len(problems) == 1 and problems[0].startswith(f"{path}:2: id:") and f"{path}:1" in problems[0]


def test_an_explicit_id_equal_to_a_derived_id_is_refused(tmp_path):
    path = tmp_path / "job.jsonl"
    path.write_text('{"prompt": "a cat"}\n')
    derived = next(load_job(path).items()).id
    path.write_text(f'{{"prompt": "a cat"}}\n{{"id": "{derived}", "prompt": "a dog"}}\n')
    problems = _problems(path)
    assert len(problems) == 1 and problems[0].startswith(f"{path}:2: id:") and f"{path}:1" in problems[0]


def test_distinct_ids_pass_and_n_is_bounded(tmp_path):
    path = tmp_path / "job.jsonl"
    path.write_text('{"id": "x", "prompt": "a", "n": 2}\n{"id": "x_3", "prompt": "b"}\n{"id": "x_1_1", "prompt": "c"}\n')
    assert load_job(path).validate() == 3
    path.write_text('{"id": "x", "prompt": "a", "n": 1000000000}\n')
    assert any("n:" in p for p in _problems(path))


# -- #4: the lock survives `rm OUT/.lock` ----------------------------------------------------


def test_the_lock_holds_after_its_file_is_removed(tmp_path):
    from batcher._exceptions import LockedError
    from batcher._writer import OutputDir

    holder = OutputDir(tmp_path / "out")
    holder.prepare()
    holder.lock()
    try:
        (tmp_path / "out" / ".lock").unlink()  # a user tidying up during the run
        second = OutputDir(tmp_path / "out")
        with pytest.raises(LockedError):
            second.lock()
    finally:
        holder.unlock()
    second.lock()  # free once the holder is done
    second.unlock()


def test_a_lock_file_linked_out_of_the_folder_is_never_followed(tmp_path):
    from batcher._exceptions import OutputError
    from batcher._writer import OutputDir

    target = tmp_path / "precious.txt"
    target.write_text("keep me\n")
    out = OutputDir(tmp_path / "out")
    out.prepare()
    (tmp_path / "out" / ".lock").symlink_to(target)
    with pytest.raises(OutputError, match="lock"):
        out.lock()
    assert target.read_text() == "keep me\n"


# -- #5: never into a foreign folder, never through a link out of OUT ----------------------------


def _tree(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() and not p.is_symlink() else None
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("plant", ["file", "image", "foreign_journal", "foreign_journal_no_newline", "foreign_manifest"])
def test_a_folder_batcher_did_not_create_is_refused_untouched(tmp_path, sim, plant, capsys):
    out = tmp_path / "theirs"
    if plant == "file":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif plant == "image":
        (out / "images").mkdir(parents=True)
        (out / "images" / "a.png").write_bytes(b"\x89PNG\r\n\x1a\nmine")
    elif plant == "foreign_manifest":
        out.mkdir()
        (out / "manifest.json").write_text('{"mine": true}')
    else:
        out.mkdir()
        (out / "manifest.jsonl").write_bytes(b'{"foo": 1}\n' if plant == "foreign_journal" else b'{"foo": 1}')
    before = _tree(out)
    job = write_job(tmp_path / "job.yaml", ["x"], defaults={"size": "8x8"})
    assert run(job, out, sim) == 2
    assert run(job, out, sim, "--force") == 2  # --force is about other jobs' manifests, not this
    assert _tree(out) == before
    assert sim.stats()["requests"] == 0
    assert str(out) in capsys.readouterr().err


@pytest.mark.parametrize("name", ["manifest.jsonl", "images"])
def test_a_journal_or_images_folder_linked_out_of_out_is_never_followed(tmp_path, sim, name):
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", ["x"], defaults={"size": "8x8"})
    assert run(job, out, sim) == 0
    outside = tmp_path / "outside"
    if name == "images":
        outside.mkdir()
        (out / "images" / next(os.scandir(out / "images")).name).unlink()
        (out / "images").rmdir()
    else:
        outside.write_bytes((out / name).read_bytes())
        (out / name).unlink()
    (out / name).symlink_to(outside)
    before = _tree(outside) if outside.is_dir() else outside.read_bytes()
    assert run(job, out, sim) == 2
    assert (_tree(outside) if outside.is_dir() else outside.read_bytes()) == before


def test_an_empty_folder_and_a_first_runs_skeleton_are_accepted(tmp_path, sim):
    job = write_job(tmp_path / "job.yaml", ["x"], defaults={"size": "8x8"})
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(job, empty, sim) == 0
    skeleton = tmp_path / "skeleton"
    (skeleton / "images").mkdir(parents=True)
    (skeleton / "images" / ".tmp-x-1234").write_bytes(b"half")
    (skeleton / ".lock").write_text("1\n")
    assert run(job, skeleton, sim) == 0


# -- #6: a YAML alias bomb is a FILE:LINE problem, never built --------------------------------

BOMB = """name: bomb
prompts:
  - prompt: a cat
    extra: &a9 [&a8 [&a7 [&a6 [&a5 [&a4 [&a3 [&a2 [&a1 [&a0 [x, x, x, x, x, x, x, x, x, x]]]]]]]]]]
  - prompt: a dog
    style: &b0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]
    s1: &b1 [*b0, *b0, *b0, *b0, *b0, *b0, *b0, *b0, *b0, *b0]
    s2: &b2 [*b1, *b1, *b1, *b1, *b1, *b1, *b1, *b1, *b1, *b1]
    s3: &b3 [*b2, *b2, *b2, *b2, *b2, *b2, *b2, *b2, *b2, *b2]
    s4: &b4 [*b3, *b3, *b3, *b3, *b3, *b3, *b3, *b3, *b3, *b3]
    s5: &b5 [*b4, *b4, *b4, *b4, *b4, *b4, *b4, *b4, *b4, *b4]
    s6: &b6 [*b5, *b5, *b5, *b5, *b5, *b5, *b5, *b5, *b5, *b5]
    s7: &b7 [*b6, *b6, *b6, *b6, *b6, *b6, *b6, *b6, *b6, *b6]
    s8: &b8 [*b7, *b7, *b7, *b7, *b7, *b7, *b7, *b7, *b7, *b7]
defaults: {size: 8x8, extra: *b8}
"""


def test_a_yaml_alias_bomb_is_reported_at_its_line_and_exits_2(tmp_path, capsys):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    assert cli("validate", path) == 2
    err = capsys.readouterr().err
    assert f"{path}:5: prompts[1]:" in err and f"{path}:15: defaults:" in err
    assert f"{path}:3" not in err  # an ordinary nested value (no aliases) passes


def test_expanded_size_counts_aliases_without_building_them():
    import yaml

    from batcher._job import _expanded_size

    node = yaml.compose("a: &x [1, 2, 3]\nb: [*x, *x]\n")
    # root, keys a and b, the list b, and three copies of x (itself and 3 values)
    assert _expanded_size(node, {}) == (1 + 2 + 1 + 3 * 4, 2 + 3 * 3)


# -- #20: hostile lines are FILE:LINE and exit 2, never a traceback ---------------------------


def test_a_jsonl_job_line_nested_100k_deep_is_a_problem_at_its_line(tmp_path, capsys):
    path = tmp_path / "job.jsonl"
    path.write_text('{"prompt": "ok"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    assert cli("validate", path) == 2
    assert f"{path}:2: line:" in capsys.readouterr().err


@pytest.mark.parametrize("line", [
    '{"t":"item","id":5,"rhash":"h","status":"done","attempts":1}',
    '{"t":"item","id":"a","rhash":"h","status":"done","attempts":"one"}',
    '{"t":"item","id":"a","rhash":"h","status":"great","attempts":1}',
    '{"t":"item","rhash":"h","status":"done"}',
    '{"t":"attempt","id":"a","rhash":"h","attempt":null}',
    '{"t":"item","id":"a","rhash":"h","status":"failed","attempts":1,"error":"boom"}',
    "[" * 100_000 + "]" * 100_000,
])
def test_a_hand_edited_journal_record_is_named_by_file_and_line(tmp_path, sim, line, capsys):
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", ["x"], defaults={"size": "8x8"})
    assert run(job, out, sim) == 0
    with open(out / "manifest.jsonl", "a") as fh:
        fh.write(line + "\n")
    lines = len((out / "manifest.jsonl").read_bytes().splitlines())
    capsys.readouterr()
    assert run(job, out, sim) == 2
    assert cli("status", out) == 2
    err = capsys.readouterr().err
    assert f"manifest.jsonl:{lines}:" in err and "Traceback" not in err


@pytest.mark.parametrize("args", [
    ["--set", "=x"], ["--set", " =x"], ["--grace", "nan"], ["--grace", "-1"], ["--grace", "inf"],
    ["--concurrency", "100000"], ["--concurrency", "0"], ["--timeout", "inf"], ["--rpm", "nan"],
    ["--max-policy-violations", "-1"],
])
def test_bad_run_options_exit_2_before_anything_is_sent(tmp_path, sim, args, capsys):
    job = write_job(tmp_path / "job.yaml", ["x"], defaults={"size": "8x8"})
    with pytest.raises(SystemExit) as exc:
        run(job, tmp_path / "out", sim, *args)
    assert exc.value.code == 2 and sim.stats()["requests"] == 0
    assert args[0] in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_largest_concurrency_is_accepted_and_a_larger_one_in_the_job_is_a_problem(tmp_path, sim):
    from batcher._job import MAX_CONCURRENCY

    job = write_job(tmp_path / "job.yaml", ["x"], defaults={"size": "8x8"})
    assert run(job, tmp_path / "out", sim, "--concurrency", MAX_CONCURRENCY) == 0
    big = write_job(tmp_path / "big.yaml", ["x"], concurrency=MAX_CONCURRENCY + 1)
    assert [p.field for p in load_job(big).problems()] == ["concurrency"]
    with pytest.raises(ValueError):
        RunOptions(concurrency=MAX_CONCURRENCY + 1)


def test_log_file_in_a_missing_folder_or_on_the_job_or_journal_exits_2(tmp_path, sim, capsys):
    job = write_job(tmp_path / "job.yaml", ["x"], defaults={"size": "8x8"})
    before = job.read_bytes()
    out = tmp_path / "out"
    assert run(job, out, sim, "--log-file", tmp_path / "nowhere" / "log.txt") == 2
    assert run(job, out, sim, "--log-file", job) == 2
    assert run(job, out, sim, "--log-file", tmp_path / "." / "job.yaml") == 2
    assert job.read_bytes() == before and sim.stats()["requests"] == 0
    assert run(job, out, sim) == 0
    journal = (out / "manifest.jsonl").read_bytes()
    assert run(job, out, sim, "--log-file", out / "manifest.jsonl") == 2
    assert (out / "manifest.jsonl").read_bytes() == journal
    assert "--log-file" in capsys.readouterr().err
    assert run(job, out, sim, "--log-file", tmp_path / "log.txt") == 0 and (tmp_path / "log.txt").exists()


def test_status_after_a_size_change_counts_the_jobs_items_not_the_journals_history(tmp_path, sim, capsys):
    import json as _json

    job = write_job(tmp_path / "job.yaml", [f"p{i}" for i in range(7)], defaults={"size": "8x8"})
    out = tmp_path / "out"
    assert run(job, out, sim) == 0
    assert run(job, out, sim, "--size", "16x16", "--max-images", "4", "--concurrency", "1") == 4
    capsys.readouterr()
    assert cli("status", out, "--json") == 0
    info = _json.loads(capsys.readouterr().out)
    assert (info["total"], info["done"], info["failed"], info["pending"]) == (7, 4, 0, 3)


# -- #7: a job edited during a run -------------------------------------------------------------


@pytest.mark.parametrize("edit", ["append", "rewrite_in_place", "replace_by_rename"])
def test_a_job_edited_during_the_run_stops_it_without_claiming_nothing_was_sent(tmp_path, sim, monkeypatch,
                                                                                  capsys, edit):
    import batcher._manifest as manifest_module

    job = tmp_path / "job.jsonl"
    job.write_text("".join(f'{{"id": "i{i}", "prompt": "p{i}", "size": "8x8"}}\n' for i in range(40)))
    real_apply = manifest_module.Journal._apply
    edited = []

    def apply(self, r, offset):  # the user saves the job once the first item is done
        real_apply(self, r, offset)
        if r.get("t") == "item" and not edited:
            edited.append(r["id"])
            if edit == "append":
                with open(job, "a") as fh:
                    fh.write('{"id": "late", "prompt": "late", "size": "8x8"}\n')
            elif edit == "rewrite_in_place":
                with open(job, "r+b") as fh:
                    fh.write(b'{"id": "i0", "prompt": "P0", "size": "8x8"}\n')
            else:
                new = tmp_path / "job.new"
                new.write_text('{"id": "only", "prompt": "x", "size": "8x8"}\n')
                os.replace(new, job)

    monkeypatch.setattr(manifest_module.Journal, "_apply", apply)
    out = tmp_path / "out"
    code = run(job, out, sim, "--concurrency", "1")
    err = capsys.readouterr().err
    assert code == 4 and "nothing was sent" not in err and "changed" in err
    done = [json.loads(line)["id"] for line in (out / "manifest.jsonl").read_text().splitlines()
            if json.loads(line)["t"] == "item"]
    assert edited[0] in done and sim.stats()["requests"] >= 1
    monkeypatch.setattr(manifest_module.Journal, "_apply", real_apply)
    requests = sim.stats()["requests"]
    assert run(job, out, sim) == 0  # the rerun reads the file as it is now
    assert sim.stats()["requests"] - requests <= 40 + 1 - len(done)


# -- #21: a sharded run's work folder is a cache of the store -----------------------------------


def test_a_store_that_started_over_is_the_truth_and_the_work_folder_goes_once_committed(tmp_path, sim,
                                                                                       monkeypatch):
    import hashlib
    import uuid

    import fsspec

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bucket = f"safety-{uuid.uuid4().hex[:12]}"
    out = f"memory://{bucket}/out"
    work = tmp_path / "cache" / "batcher" / "work" / hashlib.sha256(out.encode()).hexdigest()[:16]
    job = write_job(tmp_path / "job.yaml", ["a", "b", "c"], defaults={"size": "8x8"})
    assert run(job, out, sim) == 0
    assert not work.exists()  # committed: nothing left on this machine
    first = sim.stats()["requests"]

    # an older batcher left its work folder behind; then the store starts over (prefix emptied)
    shard = work / "shard-00000-of-00001"
    (shard / "images").mkdir(parents=True)
    (shard / "manifest.json").write_text('{"version": 1, "job": {}, "summary": {}, "items": [\n]}\n')
    (shard / "images" / "stale.png").write_bytes(b"old")
    fsspec.filesystem("memory").rm(f"/{bucket}", recursive=True)

    assert run(job, out, sim) == 0
    assert sim.stats()["requests"] - first == 3  # the store had nothing: everything again
    assert not work.exists()
    merged = json.loads(fsspec.filesystem("memory").cat(f"/{bucket}/out/manifest.json"))
    assert merged["summary"] == {"total": 3, "done": 3, "failed": 0, "pending": 0}


def test_an_unfinished_shard_keeps_its_work_folder_for_the_next_run(tmp_path, sim, monkeypatch):
    import hashlib
    import uuid

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = f"memory://safety-{uuid.uuid4().hex[:12]}/out"
    work = tmp_path / "cache" / "batcher" / "work" / hashlib.sha256(out.encode()).hexdigest()[:16]
    job = write_job(tmp_path / "job.yaml", ["a", "b", "c"], defaults={"size": "8x8"})
    assert run(job, out, sim, "--max-images", "1", "--concurrency", "1") == 4
    assert (work / "shard-00000-of-00001" / "manifest.jsonl").is_file()
    assert run(job, out, sim) == 0 and not work.exists()


def test_a_journal_glued_by_an_older_version_is_read_without_paying_again(tmp_path, sim, capsys):
    """Older versions appended after a cut-short write: `torn{"t":...}` on one line. The whole
    records are kept (status and rerun read them), so the rerun sends nothing."""
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", ["a", "b", "c"], defaults={"size": "8x8"})
    assert run(job, out, sim) == 0
    path = out / "manifest.jsonl"
    lines = path.read_bytes().splitlines(keepends=True)
    item = next(i for i, line in enumerate(lines) if b'"t":"item"' in line)
    lines[item] = b'{"t":"attempt","id":"zz","rhash":"h","att' + lines[item]
    path.write_bytes(b"".join(lines))
    (out / "manifest.json").unlink()
    requests = sim.stats()["requests"]
    capsys.readouterr()
    assert cli("status", out, "--json") == 0
    assert json.loads(capsys.readouterr().out)["done"] == 3
    assert run(job, out, sim) == 0
    assert "cut short" in capsys.readouterr().err
    assert sim.stats()["requests"] == requests
    assert json.loads((out / "manifest.json").read_text().splitlines()[0] + "]}")["summary"]["done"] == 3
