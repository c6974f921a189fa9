"""Unattended runs: kill -9 at random moments, SIGTERM/SIGINT, and the key never written anywhere."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from batcher._simulator import SimulatorConfig, start_in_thread

from helpers import KEY, ROOT, manifest, write_job


def start_cli(job: Path, out: Path, base_url: str, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("BATCHER_API_KEY", "OPENAI_API_KEY")}
    env.update({"BATCHER_API_KEY": KEY, "PYTHONPATH": str(ROOT)})
    return subprocess.Popen([sys.executable, "-m", "batcher", "run", str(job), "--out", str(out), "--base-url",
                             base_url, "--timeout", "10", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@contextlib.contextmanager
def cli_process(job: Path, out: Path, base_url: str, *extra: str) -> Iterator[subprocess.Popen]:
    """A `batcher run` subprocess that is killed (by its PID) if the test leaves it running."""
    proc = start_cli(job, out, base_url, *extra)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)


def journal_records(out: Path) -> list[dict]:
    path = out / "manifest.jsonl"
    if not path.exists():
        return []
    recs = []
    for raw in path.read_bytes().splitlines(keepends=True):
        if raw.endswith(b"\n"):
            try:
                recs.append(json.loads(raw))
            except ValueError:
                pass
    return recs


def in_flight(out: Path) -> dict[str, int]:
    """Items whose latest attempt has no finishing record: (id -> count)."""
    open_ids: dict[str, int] = {}
    for rec in journal_records(out):
        if rec["t"] == "attempt":
            open_ids[rec["id"]] = 1
        elif rec["t"] == "item":
            open_ids.pop(rec["id"], None)
    return open_ids


def wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_kill_9_at_random_moments_then_rerun_completes_exactly_once(tmp_path):
    rng = random.Random(20261125)
    prompts = [f"crash test prompt {i}" for i in range(120)]
    job = write_job(tmp_path / "job.yaml", prompts, defaults={"size": "32x32"})
    out = tmp_path / "out"
    inflight_at_kills: dict[str, int] = {}
    id_to_prompt: dict[str, str] = {}
    config = SimulatorConfig(latency_ms=200, latency_jitter_ms=100, seed=5)
    with start_in_thread(config) as sim:
        for _ in range(5):
            proc = start_cli(job, out, sim.base_url, "--concurrency", "8", "--quiet")
            try:
                # kill at a random moment after the run has started sending
                wait_for(lambda: (out / "manifest.jsonl").exists(), 10)
                time.sleep(rng.uniform(0.05, 0.6))
            finally:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
                proc.stdout.close()
                proc.stderr.close()
            for item_id in in_flight(out):
                inflight_at_kills[item_id] = inflight_at_kills.get(item_id, 0) + 1
        assert sum(inflight_at_kills.values()) > 0  # the kills really hit requests in flight
        proc = start_cli(job, out, sim.base_url, "--concurrency", "8", "--quiet")
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        stats = sim.stats()

    doc = manifest(out)
    assert doc["summary"] == {"total": 120, "done": 120, "failed": 0, "pending": 0}
    ids = [r["id"] for r in doc["items"]]
    assert len(ids) == len(set(ids)) == 120
    files = set()
    for rec in doc["items"]:
        id_to_prompt[rec["id"]] = rec["request"]["prompt"]
        for img in rec["images"]:
            data = (out / img["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == img["sha256"]  # no partial file under a final name
            files.add(img["file"])
    on_disk = {f"images/{p.name}" for p in (out / "images").iterdir()}
    assert on_disk == files  # no temporaries left, nothing unaccounted for
    # the only images generated twice are those whose request was in flight at a kill
    for prompt, count in stats["generations"].items():
        extra = count - 1
        allowed = sum(n for i, n in inflight_at_kills.items() if id_to_prompt.get(i) == prompt)
        assert extra <= allowed, (prompt, count, allowed)
    assert set(stats["generations"]) == set(prompts)


def test_sigterm_finishes_in_flight_requests_and_exits_130(tmp_path):
    job = write_job(tmp_path / "job.yaml", [f"slow {i}" for i in range(20)], defaults={"size": "16x16"})
    out = tmp_path / "out"
    with start_in_thread(SimulatorConfig(latency_ms=1500)) as sim:
        with cli_process(job, out, sim.base_url, "--concurrency", "4") as proc:
            assert wait_for(lambda: len(in_flight(out)) >= 4, 15)
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=20)
        assert proc.returncode == 130, err
        assert "SIGTERM" in err
        doc = manifest(out)
        assert doc["summary"]["done"] == 4  # the paid-for in-flight requests were saved
        assert doc["summary"]["pending"] == 16
        assert sim.stats()["requests"] == 4
        # resumable: the next run finishes the rest without asking again for the first four
        with start_in_thread(SimulatorConfig()) as fresh:
            proc = start_cli(job, out, fresh.base_url, "--quiet")
            proc.communicate(timeout=30)
            assert proc.returncode == 0
            assert fresh.stats()["requests"] == 16


def test_second_signal_exits_at_once_and_leaves_a_resumable_state(tmp_path):
    job = write_job(tmp_path / "job.yaml", [f"slow {i}" for i in range(10)], defaults={"size": "16x16"})
    out = tmp_path / "out"
    with start_in_thread(SimulatorConfig(latency_ms=20000)) as sim:
        with cli_process(job, out, sim.base_url, "--concurrency", "3") as proc:
            assert wait_for(lambda: len(in_flight(out)) >= 3, 15)
            proc.send_signal(signal.SIGINT)
            time.sleep(0.3)
            started = time.monotonic()
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=10)
        assert proc.returncode == 130
        assert time.monotonic() - started < 5
        assert manifest(out)["summary"] == {"total": 10, "done": 0, "failed": 0, "pending": 10}
    with start_in_thread(SimulatorConfig()) as fresh:
        proc = start_cli(job, out, fresh.base_url, "--quiet")
        proc.communicate(timeout=30)
        assert proc.returncode == 0


def test_api_key_never_reaches_disk_or_output(tmp_path):
    job = write_job(tmp_path / "job.yaml", ["fine", "a forbidden one", "ok"], defaults={"size": "16x16"})
    out = tmp_path / "out"
    log = tmp_path / "run.log"
    with start_in_thread(SimulatorConfig(fail_rate=0.3, seed=2)) as sim:
        proc = start_cli(job, out, sim.base_url, "--json", "--log-file", str(log), "--max-attempts", "10")
        stdout, stderr = proc.communicate(timeout=60)
    with start_in_thread(SimulatorConfig(api_key="another-key")) as sim:
        proc = start_cli(job, out, sim.base_url, "--retry-failed")
        stdout2, stderr2 = proc.communicate(timeout=60)
        assert proc.returncode == 4
    assert KEY not in stdout + stderr + stdout2 + stderr2
    for path in [*out.rglob("*"), log]:
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
