"""Batch mode end to end on the simulator (127.0.0.1): submit, wait, collect; --no-wait and the rerun
that collects; error lines; expiry; faults on upload and create; kill -9 at each step of a batch's life.

"Generated once" is read from the simulator's own counters (images per custom_id), not from batcher.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from batcher import RunOptions, load_job, run_sync
from batcher._batch import chunks_of, run_records
from batcher._simulator import SimulatorConfig, start_in_thread

from helpers import KEY, ROOT, by_id, write_job

PROMPTS = [f"a small watercolour of object number {i}" for i in range(10)]


def _job(tmp: Path, prompts: list[Any] = PROMPTS, **batch: Any) -> Path:
    settings: Any = {"max_requests": 4, "poll": 0.2, **batch}
    return write_job(tmp / "job.yaml", prompts, defaults={"size": "32x24", "model": "grok-imagine"},
                     endpoints=[{"name": "main", "base_url": "http://127.0.0.1:9/v1", "batch": settings}])


def _run(job: Path, out: Path, sim: Any, **opts: Any) -> Any:
    return run_sync(load_job(job), RunOptions(out=str(out), base_url=sim.base_url, api_key=KEY, seed=1, **opts))


def _journal(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def _batch_stats(sim: Any) -> dict[str, Any]:
    return sim.stats()["batch"]


def test_batch_run_submits_waits_and_collects(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with start_in_thread(SimulatorConfig()) as sim:
        result = _run(_job(tmp_path), out, sim)
        stats = _batch_stats(sim)
        left_at_provider = list(sim.simulator.batches.files)
    assert result.exit_code == 0, result
    assert left_at_provider == []  # input and output files deleted once every line was recorded
    assert result.summary == {"total": 10, "done": 10, "failed": 0, "pending": 0}
    items = by_id(out)
    assert all(r["status"] == "done" and len(r["images"]) == 1 for r in items.values())
    assert all((out / r["images"][0]["file"]).is_file() for r in items.values())
    chunks = chunks_of(run_records(out / "manifest.jsonl"))
    assert [c.requests for c in chunks.values()] == [4, 4, 2]  # max_requests: 4
    assert all(c.closed == "completed" and c.batch_id for c in chunks.values())
    # each record names its chunk; the simulator generated each item once, in 3 batches from 3 files
    records = [r for r in _journal(out) if r["t"] == "item"]
    assert {r["batch"] for r in records} == set(chunks)
    assert (stats["batches_created"], stats["files_uploaded"], stats["duplicates"]) == (3, 3, 0)
    assert sorted(stats["images"].values()) == [1] * 10
    # the chunk's attempt records were journaled, with the chunk key, before the chunk record
    journal = _journal(out)
    first_chunk = next(i for i, r in enumerate(journal) if r["t"] == "chunk")
    key = journal[first_chunk]["key"]
    assert [r["id"] for r in journal[:first_chunk] if r["t"] == "attempt" and r.get("batch") == key]


def test_batch_prices_and_budget_charge_at_submission(tmp_path: Path) -> None:
    job = _job(tmp_path)
    doc = job.read_text() + "pricing: [{per_image: 0.08}]\n"
    job.write_text(doc)
    out = tmp_path / "out"
    with start_in_thread(SimulatorConfig()) as sim:
        result = _run(job, out, sim, max_cost=0.2)  # 0.04 per image in batch mode: 5 fit
        stats = _batch_stats(sim)
    assert result.exit_code == 4 and result.summary["done"] == 5 and result.summary["pending"] == 5
    assert sum(stats["images"].values()) == 5
    assert result.cost == pytest.approx(0.2)


def test_no_wait_exits_5_and_a_rerun_collects_without_submitting_again(tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = _job(tmp_path)
    with start_in_thread(SimulatorConfig(batch_time_scale=6.0 / 86400)) as sim:
        first = _run(job, out, sim, wait=False)
        assert first.exit_code == 5, first
        assert first.summary["pending"] == 10
        rows = [c for c in chunks_of(run_records(out / "manifest.jsonl")).values()]
        assert len(rows) == 3 and all(c.batch_id and c.closed is None for c in rows)
        second = _run(job, out, sim)
        stats = _batch_stats(sim)
    assert second.exit_code == 0, second
    assert second.summary["done"] == 10
    assert (stats["batches_created"], stats["duplicates"]) == (3, 0)


def test_error_lines_policy_fails_transient_goes_into_a_later_batch(tmp_path: Path) -> None:
    prompts = [*PROMPTS[:6], "something forbidden here", {"id": "bad2", "prompt": "another forbidden prompt"}]
    out = tmp_path / "out"
    with start_in_thread(SimulatorConfig(policy_word="forbidden", fail_rate=0.3, seed=3)) as sim:
        result = _run(_job(tmp_path, prompts, max_requests=50), out, sim)
        stats = _batch_stats(sim)
    items = by_id(out)
    assert {i: r["error"]["code"] for i, r in items.items() if r["status"] == "failed"} == {
        next(i for i, r in items.items() if r["request"]["prompt"] == "something forbidden here"):
            "content_policy_violation", "bad2": "content_policy_violation"}
    assert result.summary["done"] == 6 and result.exit_code == 1
    assert stats["batches_created"] >= 2  # the 5xx lines went into a later batch
    chunks = chunks_of(run_records(out / "manifest.jsonl"))
    assert all(c.closed for c in chunks.values())


def test_expired_batch_keeps_what_it_finished_and_resubmits_the_rest(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # a 24 h window that expires after 12 simulated hours: about half the lines come back
    with start_in_thread(SimulatorConfig(batch_expire_after=12 * 3600.0)) as sim:
        result = _run(_job(tmp_path, max_requests=50), out, sim, max_attempts=3)
        stats = _batch_stats(sim)
    chunks = list(chunks_of(run_records(out / "manifest.jsonl")).values())
    assert chunks[0].closed == "expired"
    assert stats["duplicates"] == 0  # nothing generated twice
    first = sum(1 for r in _journal(out) if r["t"] == "item" and r.get("batch") == chunks[0].key)
    assert first == 5  # lines are due evenly over 90% of the window: 5 of 10 before 12 h
    # the rest went into later batches, which expired too (5 → 2 more, 3 → 1 more); after 3 attempts the
    # last 2 fail with the provider's reason, and nothing was generated twice
    assert [c.closed for c in chunks] == ["expired"] * 3
    assert result.summary == {"total": 10, "done": 8, "failed": 2, "pending": 0}
    assert {r["error"]["code"] for r in by_id(out).values() if r["status"] == "failed"} == {"batch_expired"}


def test_a_create_that_failed_after_the_batch_was_made_is_found_not_made_again(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with start_in_thread(SimulatorConfig(batch_create_fault="5xx", batch_upload_fault="5xx")) as sim:
        result = _run(_job(tmp_path, max_requests=50), out, sim)
        stats = _batch_stats(sim)
    assert result.exit_code == 0, result
    # the 5xx came after the file and the batch existed: each found by its name / metadata, not made twice
    assert (stats["files_uploaded"], stats["batches_created"], stats["duplicates"]) == (1, 1, 0)


def test_status_and_cancel(tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = _job(tmp_path, max_requests=50)
    env = {**os.environ, "BATCHER_API_KEY": KEY, "PYTHONPATH": str(ROOT)}
    with start_in_thread(SimulatorConfig(batch_time_scale=600.0 / 86400)) as sim:
        first = _run(job, out, sim, wait=False)
        assert first.exit_code == 5
        st = subprocess.run([sys.executable, "-m", "batcher", "status", str(out), "--json"], capture_output=True,
                            text=True, env=env, timeout=60)
        rows = json.loads(st.stdout)["batches"]
        assert len(rows) == 1 and rows[0]["state"] in ("validating", "in_progress") and rows[0]["expires"]
        c = subprocess.run([sys.executable, "-m", "batcher", "cancel", str(out), "--json"], capture_output=True,
                           text=True, env=env, timeout=60)
        assert c.returncode == 0, c.stderr
        assert json.loads(c.stdout)[0]["state"] in ("cancelling", "cancelled")
        second = _run(job, out, sim, max_attempts=1)
        stats = _batch_stats(sim)
    chunks = list(chunks_of(run_records(out / "manifest.jsonl")).values())
    assert chunks[0].closed == "cancelled"
    assert KEY not in (out / "manifest.jsonl").read_text()
    assert second.exit_code == 4 and second.error["code"] == "batch_cancelled"
    assert second.summary["failed"] == 0 and second.summary["pending"] > 0  # cancelled: pending, not resent
    assert second.summary["done"] + second.summary["pending"] == 10
    assert stats["duplicates"] == 0 and stats["batches_created"] == 1


# -- kill -9 at each step of a batch's life, then a rerun: no batch made twice, every item once -------


def _spawn(job: Path, out: Path, base_url: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("BATCHER_API_KEY", "OPENAI_API_KEY")}
    env.update({"BATCHER_API_KEY": KEY, "PYTHONPATH": str(ROOT)})
    return subprocess.Popen([sys.executable, "-m", "batcher", "run", str(job), "--out", str(out), "--base-url",
                             base_url, "--quiet", "--timeout", "3"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _kinds(out: Path) -> list[str]:
    path = out / "manifest.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line).get("t") for line in path.read_text().splitlines() if line.endswith("}")]


def _kill_when(proc: subprocess.Popen, ready: Any, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while not ready():
        assert proc.poll() is None, "the run ended before the step to kill it at"
        assert time.monotonic() < deadline, "the step never came"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


@pytest.mark.parametrize("step", ["chunk", "upload", "create", "collect"])
def test_kill_9_at_each_step_then_rerun(tmp_path: Path, step: str) -> None:
    out = tmp_path / "out"
    # mid-collection: URL answers downloaded at a drip, so the collection lasts seconds, one line at a time
    # (inline answers are recorded 64 lines per thread call: 40 of them would be in and closed at once)
    prompts = [f"kill test prompt {i}" if step != "collect" else {"prompt": f"kill test prompt {i}",
                                                                    "response_format": "url"} for i in range(40)]
    job = _job(tmp_path, prompts, max_requests=50)
    config = {
        "chunk": SimulatorConfig(batch_upload_fault="hang", hang_s=60.0),  # killed after the chunk record
        "upload": SimulatorConfig(batch_upload_fault="hang", hang_s=60.0),  # killed mid-upload (file stored)
        "create": SimulatorConfig(batch_create_fault="hang", hang_s=60.0),  # made, its id never journaled
        "collect": SimulatorConfig(batch_time_scale=3.0 / 86400, drip_bytes_per_s=4000.0),
    }[step]
    with start_in_thread(config) as sim:
        proc = _spawn(job, out, sim.base_url)
        if step == "chunk":
            _kill_when(proc, lambda: "chunk" in _kinds(out))
        elif step == "upload":
            _kill_when(proc, lambda: _batch_stats(sim)["files_uploaded"] == 1)
        elif step == "create":
            _kill_when(proc, lambda: _batch_stats(sim)["batches_created"] == 1)
        else:
            _kill_when(proc, lambda: "item" in _kinds(out))
        assert "closed" not in _kinds(out)
        # the rerun, with the faults gone
        sim.simulator.config = SimulatorConfig(batch_time_scale=config.batch_time_scale)
        rerun = _spawn(job, out, sim.base_url)
        assert rerun.wait(timeout=120) == 0
        stats = _batch_stats(sim)
    assert stats["batches_created"] == 1 and stats["duplicates"] == 0
    assert sorted(stats["images"].values()) == [1] * 40
    assert all(r["status"] == "done" for r in by_id(out).values())
    assert not [p for p in (out / "batches").iterdir() if p.name.startswith(".tmp-")]


def test_items_at_the_provider_are_never_sent_synchronously_even_when_batch_mode_is_dropped(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with start_in_thread(SimulatorConfig(batch_time_scale=4.0 / 86400)) as sim:
        first = _run(_job(tmp_path, max_requests=50), out, sim, wait=False)
        assert first.exit_code == 5
        plain = write_job(tmp_path / "plain.yaml", PROMPTS, defaults={"size": "32x24", "model": "grok-imagine"},
                          endpoints=[{"name": "main", "base_url": "http://127.0.0.1:9/v1"}])
        second = _run(plain, out, sim)
        stats = sim.stats()
    assert second.exit_code == 0 and second.summary["done"] == 10
    # every prompt generated once (batch and synchronous counted together): the batch was collected, not re-sent
    assert stats["duplicates"] == 0 and sum(stats["generations"].values()) == 10
    assert all(r.get("batch") for r in _journal(out) if r["t"] == "item")


def test_a_short_batch_answer_leaves_the_item_short_and_the_next_batch_asks_for_the_rest(tmp_path: Path) -> None:
    out = tmp_path / "out"
    prompts = [{"id": "pair", "prompt": "two foxes in the snow", "n": 2}]
    with start_in_thread(SimulatorConfig(answer_fault="short")) as sim:
        first = _run(_job(tmp_path, prompts), out, sim, max_attempts=1)
        rec = by_id(out)["pair"]
        assert first.exit_code == 1 and rec["status"] == "failed" and rec["short"] == {"wanted": 2, "got": 1}
        sim.simulator.config = SimulatorConfig()
        second = _run(_job(tmp_path, prompts), out, sim)
    rec = by_id(out)["pair"]
    assert second.exit_code == 0 and rec["status"] == "done" and len(rec["images"]) == 2
    assert len({i["file"] for i in rec["images"]}) == 2  # the second image numbered on, not over the first
    lines = [json.loads(text) for path in (out / "batches").glob("*.jsonl") if ".items." not in path.name
             for text in path.read_text().splitlines()]
    assert sorted(line["body"].get("n", 1) for line in lines) == [1, 2]  # the rerun asked only for the missing one


def test_url_answers_are_fetched_at_once_before_they_expire(tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", PROMPTS[:4],
                    defaults={"size": "32x24", "model": "grok-imagine", "response_format": "url"},
                    endpoints=[{"name": "main", "base_url": "http://127.0.0.1:9/v1", "batch": {"poll": 0.2}}])
    with start_in_thread(SimulatorConfig(batch_url_ttl=20.0)) as sim:
        result = _run(job, out, sim)
        stats = sim.stats()
    assert result.exit_code == 0 and result.summary["done"] == 4
    assert stats["downloads"] == 4
    assert all((out / r["images"][0]["file"]).stat().st_size > 0 for r in by_id(out).values())


def test_a_batch_that_fails_validation_fails_the_lines_it_names_and_resubmits_the_others(tmp_path: Path) -> None:
    out = tmp_path / "out"
    # the simulator fails every batch's validation, naming its first line
    with start_in_thread(SimulatorConfig(batch_validation_fail=True)) as sim:
        result = _run(_job(tmp_path, PROMPTS[:3], max_requests=50), out, sim, max_attempts=5)
        stats = _batch_stats(sim)
    items = by_id(out)
    # round k fails the item on line 1 and resubmits the rest: 3 batches, each item failed once, nothing generated
    assert stats["batches_created"] == 3 and sum(stats["images"].values()) == 0
    assert all(r["status"] == "failed" and r["error"]["code"] == "batch_validation" for r in items.values())
    assert result.exit_code == 1


def test_ctrl_c_only_stops_waiting_the_batch_goes_on_and_the_next_run_collects_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = _job(tmp_path, max_requests=50)
    with start_in_thread(SimulatorConfig(batch_time_scale=8.0 / 86400)) as sim:
        proc = _spawn(job, out, sim.base_url)
        deadline = time.monotonic() + 30
        while "batch" not in _kinds(out):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 130
        assert "closed" not in _kinds(out)
        rerun = _spawn(job, out, sim.base_url)
        assert rerun.wait(timeout=120) == 0
        stats = _batch_stats(sim)
    assert stats["batches_created"] == 1 and stats["duplicates"] == 0
    assert all(r["status"] == "done" for r in by_id(out).values())


def test_plan_counts_items_at_the_provider_apart(tmp_path: Path) -> None:
    from batcher._plan import plan

    out = tmp_path / "out"
    job = _job(tmp_path, max_requests=50)
    with start_in_thread(SimulatorConfig(batch_time_scale=30.0 / 86400)) as sim:
        assert _run(job, out, sim, wait=False).exit_code == 5
        info = plan(load_job(job).batch_mode(), out)
        cancel_env = {**os.environ, "BATCHER_API_KEY": KEY, "PYTHONPATH": str(ROOT)}
        subprocess.run([sys.executable, "-m", "batcher", "cancel", str(out)], env=cancel_env, timeout=60,
                       capture_output=True)
    assert (info["at_provider"], info["send"]["requests"], info["already"]) == (10, 0, 0)
