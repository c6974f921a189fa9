"""Run-time filters live in the run: `Selection(endpoints, shard)`, `Job.validate(endpoints=...)`, a frozen Job."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from batcher import JobError, JobValidationError, load_job
from batcher._job import JobChangedError, Selection, Validated
from batcher._shard import ShardSpec

from helpers import jsonl_job, write_job


def _two_endpoints(tmp_path: Path) -> Path:
    # "a" serves gpt-image-1 through the default dialect (sends response_format: a warning off OpenAI's
    # host); "b" serves only grok-imagine
    return write_job(tmp_path / "job.yaml", [{"prompt": "fox", "model": "gpt-image-1"},
                                             {"prompt": "owl", "model": "grok-imagine"}],
                     endpoints=[{"name": "a", "base_url": "http://127.0.0.1:9/v1", "models": ["gpt-image-1"]},
                                {"name": "b", "base_url": "http://127.0.0.1:9/v1", "models": ["grok-imagine"]}])


def test_validate_returns_the_count_with_its_warnings_and_sets_nothing(tmp_path):
    job = load_job(_two_endpoints(tmp_path))
    checked = job.validate()
    assert isinstance(checked, Validated) and checked == 2 and checked.count == 2
    assert [(w.field, "response_format" in w.message) for w in checked.warnings] == [("model", True)]
    assert not hasattr(job, "warnings")
    with pytest.raises(AttributeError):
        checked.warnings = ()  # type: ignore[misc]


def test_validate_against_some_endpoints_only(tmp_path):
    job = load_job(_two_endpoints(tmp_path))
    with pytest.raises(JobValidationError) as info:
        job.validate(endpoints=["b"])  # the gpt-image-1 item has no endpoint left
    assert [p.field for p in info.value.problems] == ["model"]
    assert "no endpoint serves model 'gpt-image-1'" in info.value.problems[0].message
    assert job.validate(endpoints=["a", "b"]).warnings  # the same job, whole again: nothing was kept
    with pytest.raises(JobError, match="no endpoint named 'c'"):
        job.validate(endpoints=["c"])


def test_selection_live_items_and_unknown_names(tmp_path):
    job = load_job(_two_endpoints(tmp_path))
    assert [e.name for e in Selection().live(job)] == ["a", "b"]
    assert [e.name for e in Selection.of(job, ["b", "a"]).live(job)] == ["a", "b"]  # the job's order
    assert Selection.of(job, []).endpoints is None
    with pytest.raises(JobError, match="no endpoint named 'zz'"):
        Selection.of(job, ["zz"])
    with pytest.raises(JobValidationError):
        Selection.of(job, ["a"]).validate(job)  # the grok-imagine item: no live endpoint serves it


def test_selection_items_are_the_shards_and_all_items_every_one(tmp_path):
    job = load_job(write_job(tmp_path / "job.yaml", [f"prompt {i}" for i in range(40)]))
    every = [i.id for i in job.items()]
    shards = [Selection(shard=ShardSpec(k, 3)) for k in range(3)]
    parts = [[i.id for i in s.items(job)] for s in shards]
    assert sorted(sum(parts, [])) == sorted(every) and all(parts)
    assert all(set(p).isdisjoint(q) for p in parts for q in parts if p is not q)
    assert [i.id for i in shards[1].all_items(job)] == every
    assert [i.id for i in job.items()] == every  # the Job has no filter of its own


def test_job_is_frozen_and_batch_mode_is_a_copy(tmp_path):
    job = load_job(_two_endpoints(tmp_path))
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.endpoints = []  # type: ignore[misc]
    batched = job.batch_mode()
    assert all(e.batch is not None for e in batched.endpoints) and all(e.batch is None for e in job.endpoints)
    assert [i.id for i in batched.items()] == [i.id for i in job.items()]


def test_the_prompts_file_is_signed_when_the_job_is_loaded(tmp_path):
    """The file a run works on is the one `load_job` read: an edit after loading is a change, even
    before the first pass (the signature was taken lazily, by the first pass, before)."""
    path = tmp_path / "job.jsonl"
    path.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "prompt": "y"}\n')
    job = load_job(path)
    st = path.stat()
    path.write_text('{"id": "a", "prompt": "x"}\n{"id": "c", "prompt": "z"}\n')
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a coarse clock still sees a new mtime
    with pytest.raises(JobChangedError):
        job.validate()
    fresh = load_job(path)
    assert fresh.validate() == 2 and [i.id for i in fresh.items()] == ["a", "c"]


# -- how many times a run streams the job file (issue 13: as few as the design allows) ------------


def test_a_local_run_streams_the_job_four_times_an_unchanged_rerun_never_an_appended_one_only_its_new_lines(tmp_path, passes, api_key):
    from batcher import RunOptions, run_sync, status
    from batcher._simulator import SimulatorConfig, start_in_thread

    path = jsonl_job(tmp_path, 12)
    out = tmp_path / "out"
    with start_in_thread(SimulatorConfig()) as sim:
        options = RunOptions(out=str(out), base_url=sim.base_url)
        assert run_sync(load_job(path), options).exit_code == 0
        # validate, count, feed, manifest (summary and items in one pass), the checkpoint's current items
        # (that last one goes with the job cache, branch `rerun`: hence at most)
        assert passes[0] <= 5
        first = passes[0]
        passes[0] = 0
        assert run_sync(load_job(path), options).exit_code == 0
        assert passes[0] == 0  # the job cache: an unchanged job is not read at all (was 2: validate, count)
        with open(path, "a") as fh:
            fh.write('{"id": "late", "prompt": "late", "size": "8x8"}\n')
        passes[0] = 0
        assert run_sync(load_job(path), options).exit_code == 0
        assert passes[0] <= 1  # only the appended line is read (a partial pass from the cached offset)
    assert first <= 4  # validate, count, feed, manifest (the checkpoint's current items ride on the manifest pass)
    info = status(out)
    assert (info["total"], info["done"], info["pending"]) == (13, 13, 0)


def test_a_sharded_run_streams_the_job_at_most_five_times(tmp_path, passes, api_key, monkeypatch):
    """validate, count (with the plan's fingerprint), feed, the shard's manifest, the merged manifest."""
    import uuid

    from batcher import RunOptions, run_sync
    from batcher._simulator import SimulatorConfig, start_in_thread

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = jsonl_job(tmp_path, 12)
    out = f"memory://selection-{uuid.uuid4().hex[:12]}/out"
    with start_in_thread(SimulatorConfig()) as sim:
        result = run_sync(load_job(path), RunOptions(out=out, base_url=sim.base_url))
    assert result.exit_code == 0 and result.merged is not None and result.merged["done"] == 12
    assert passes[0] <= 5  # 7 before: each manifest counted its summary in a pass of its own
