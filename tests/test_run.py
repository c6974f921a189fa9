"""End to end: the CLI against the simulator on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest

from batcher._cli import main
from batcher._simulator import SimulatorConfig, start_in_thread
from batcher._writer import OutputDir

from helpers import KEY, by_id, manifest, write_job

PROMPTS = [
    "An astronaut riding a giant koi fish through a nebula, surreal art style",
    {"id": "lighthouse", "prompt": "A lighthouse in a storm", "size": "96x64"},
    {"id": "pair", "prompt": "Two foxes", "n": 2},
]


@pytest.fixture
def sim(request):
    config = getattr(request, "param", SimulatorConfig())
    with start_in_thread(config) as running:
        yield running


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv("BATCHER_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def cli(*args: str) -> int:
    return main([str(a) for a in args])


def run(job: Path, out: Path, sim, *extra: str) -> int:
    return cli("run", job, "--out", out, "--base-url", sim.base_url, "--quiet", "--timeout", "10", *extra)


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.mark.parametrize("fmt", ["b64_json", "url"])
def test_run_saves_every_image_and_records_it(tmp_path, sim, fmt):
    job = write_job(tmp_path / "job.yaml", PROMPTS, defaults={"size": "64x64", "response_format": fmt})
    out = tmp_path / "out"
    assert run(job, out, sim) == 0
    doc = manifest(out)
    assert doc["version"] == 1 and doc["job"]["name"] == "t"
    assert doc["summary"] == {"total": 3, "done": 3, "failed": 0, "pending": 0}
    items = by_id(out)
    light = items["lighthouse"]
    assert light["status"] == "done" and light["error"] is None and light["attempts"] == 1
    assert isinstance(light["created"], int)
    assert light["request"]["size"] == "96x64" and light["request"]["response_format"] == fmt
    img = light["images"][0]
    assert img["file"] == "images/lighthouse.png"
    assert (img["width"], img["height"]) == (96, 64) == png_size(out / img["file"])
    assert img["sha256"] == hashlib.sha256((out / img["file"]).read_bytes()).hexdigest()
    assert img["bytes"] == (out / img["file"]).stat().st_size
    assert img["revised_prompt"]  # the simulator revises prompts
    assert [i["file"] for i in items["pair"]["images"]] == ["images/pair_1.png", "images/pair_2.png"]
    derived = [i for i in items if i not in ("lighthouse", "pair")][0]
    assert len(derived) == 16
    stats = sim.stats()
    assert stats["requests"] == 3 and stats["images"] == 4
    assert "Authorization" not in json.dumps(doc) and KEY not in (out / "manifest.jsonl").read_text()


def test_rerun_sends_nothing_for_done_items(tmp_path, sim):
    job = write_job(tmp_path / "job.yaml", PROMPTS, defaults={"size": "32x32"})
    out = tmp_path / "out"
    assert run(job, out, sim) == 0
    sent = sim.stats()["requests"]
    assert run(job, out, sim) == 0
    assert sim.stats()["requests"] == sent
    assert manifest(out)["summary"]["done"] == 3


def test_edited_job_runs_new_and_changed_items_only(tmp_path, sim):
    out = tmp_path / "out"
    job = write_job(tmp_path / "job.yaml", PROMPTS, defaults={"size": "32x32"})
    assert run(job, out, sim) == 0
    old_sha = by_id(out)["lighthouse"]["images"][0]["sha256"]
    before = sim.stats()["requests"]
    edited = [PROMPTS[0], {"id": "lighthouse", "prompt": "A lighthouse at dawn", "size": "96x64"},
              PROMPTS[2], "A brand new prompt"]
    write_job(tmp_path / "job.yaml", edited, defaults={"size": "32x32"})
    assert run(job, out, sim) == 0
    assert sim.stats()["requests"] - before == 2
    items = by_id(out)
    assert items["lighthouse"]["request"]["prompt"] == "A lighthouse at dawn"
    assert items["lighthouse"]["images"][0]["sha256"] != old_sha  # never a stale image kept as current
    assert manifest(out)["summary"] == {"total": 4, "done": 4, "failed": 0, "pending": 0}


@pytest.mark.parametrize("sim", [SimulatorConfig(policy_word="forbidden")], indirect=True)
def test_policy_rejection_fails_item_once_and_is_kept_unless_retry_failed(tmp_path, sim):
    job = write_job(tmp_path / "job.yaml", ["a calm lake", "something forbidden"], defaults={"size": "32x32"})
    out = tmp_path / "out"
    assert run(job, out, sim) == 1
    failed = [r for r in manifest(out)["items"] if r["status"] == "failed"]
    assert len(failed) == 1
    assert failed[0]["error"] == {"kind": "permanent", "status": 400, "code": "content_policy_violation",
                                  "message": failed[0]["error"]["message"]}
    assert failed[0]["attempts"] == 1
    sent = sim.stats()["requests"]
    assert run(job, out, sim) == 1 and sim.stats()["requests"] == sent
    assert run(job, out, sim, "--retry-failed") == 1 and sim.stats()["requests"] == sent + 1


@pytest.mark.parametrize(
    "sim", [SimulatorConfig(fail_rate=0.25, drop_rate=0.1, malformed_rate=0.1, seed=7)], indirect=True)
def test_transient_faults_are_retried_to_success(tmp_path, sim):
    job = write_job(tmp_path / "job.yaml", [f"prompt {i}" for i in range(30)], defaults={"size": "16x16"})
    out = tmp_path / "out"
    assert run(job, out, sim, "--max-attempts", "12") == 0
    assert manifest(out)["summary"]["done"] == 30
    stats = sim.stats()
    assert sum(stats["faults"].values()) > 0
    assert stats["duplicates"] == 0
    assert max(r["attempts"] for r in manifest(out)["items"]) > 1


@pytest.mark.parametrize("sim", [SimulatorConfig(hang_rate=0.3, hang_s=30, seed=3)], indirect=True)
def test_hanging_requests_hit_the_deadline_and_are_retried(tmp_path, sim):
    job = write_job(tmp_path / "job.yaml", [f"p{i}" for i in range(8)], defaults={"size": "16x16"})
    out = tmp_path / "out"
    assert cli("run", job, "--out", out, "--base-url", sim.base_url, "--quiet", "--timeout", "0.5",
               "--connect-timeout", "0.5", "--max-attempts", "15") == 0
    assert manifest(out)["summary"]["done"] == 8


@pytest.mark.parametrize("sim", [SimulatorConfig(api_key="the-right-key")], indirect=True)
def test_auth_failure_stops_with_exit_4_and_leaves_items_pending(tmp_path, sim, capsys):
    job = write_job(tmp_path / "job.yaml", [f"p{i}" for i in range(20)], defaults={"size": "16x16"})
    out = tmp_path / "out"
    assert run(job, out, sim, "--concurrency", "2") == 4
    summary = manifest(out)["summary"]
    assert summary["pending"] == 20 and summary["failed"] == 0
    assert sim.stats()["requests"] <= 2 + 1
    assert KEY not in capsys.readouterr().err


@pytest.mark.parametrize("sim", [SimulatorConfig(quota_images=5)], indirect=True)
def test_quota_exhausted_stops_at_once(tmp_path, sim):
    job = write_job(tmp_path / "job.yaml", [f"p{i}" for i in range(60)], defaults={"size": "16x16"})
    out = tmp_path / "out"
    assert run(job, out, sim, "--concurrency", "4") == 4
    s = manifest(out)["summary"]
    assert s["done"] == 5 and s["pending"] == 55 and s["failed"] == 0
    stats = sim.stats()
    assert stats["quota_rejected"] <= 4  # only what was already in flight
    # the rerun with quota restored (a fresh simulator) completes the job
    with start_in_thread(SimulatorConfig()) as fresh:
        assert run(job, out, fresh) == 0
        assert fresh.stats()["requests"] == 55
    assert manifest(out)["summary"]["done"] == 60


@pytest.mark.parametrize("sim", [SimulatorConfig(gateway_quirks=True)], indirect=True)
def test_gateway_quirks_read_what_came_back(tmp_path, sim):
    job = write_job(tmp_path / "job.yaml", [f"p{i}" for i in range(6)], defaults={"size": "16x16"})
    out = tmp_path / "out"
    assert run(job, out, sim) == 0
    assert manifest(out)["summary"]["done"] == 6
    assert sim.stats()["downloads"] >= 1  # some answers came as url although b64_json was asked


@pytest.mark.parametrize("sim", [SimulatorConfig(rpm=600)], indirect=True)
def test_rate_limit_respected_with_rpm_given(tmp_path, sim):
    job = write_job(tmp_path / "job.yaml", [f"p{i}" for i in range(25)], defaults={"size": "16x16"})
    out = tmp_path / "out"
    assert run(job, out, sim, "--rpm", "600", "--concurrency", "32") == 0
    stats = sim.stats()
    assert stats["rate_limited"] <= 1
    assert stats["max_window_requests"] <= 10


def test_invalid_job_sends_nothing(tmp_path, sim, capsys):
    job = write_job(tmp_path / "job.yaml", ["ok", {"prompt": ""}])
    assert run(job, tmp_path / "out", sim) == 2
    assert sim.stats()["requests"] == 0
    assert f"{job}:" in capsys.readouterr().err


def test_locked_output_exits_3_naming_the_pid(tmp_path, sim, capsys):
    import os

    job = write_job(tmp_path / "job.yaml", ["x"])
    out = tmp_path / "out"
    holder = OutputDir(out)
    holder.prepare()
    holder.lock()
    try:
        assert run(job, out, sim) == 3
        assert str(os.getpid()) in capsys.readouterr().err
    finally:
        holder.unlock()
    assert run(job, out, sim) == 0


def test_output_of_another_job_is_refused_unless_forced(tmp_path, sim):
    out = tmp_path / "out"
    assert run(write_job(tmp_path / "a.yaml", ["x"], name="a", defaults={"size": "16x16"}), out, sim) == 0
    other = write_job(tmp_path / "b.yaml", ["y"], name="b", defaults={"size": "16x16"})
    assert run(other, out, sim) == 2
    assert run(other, out, sim, "--force") == 0


def test_corrupt_journal_is_never_overwritten(tmp_path, sim):
    out = tmp_path / "out"
    job = write_job(tmp_path / "a.yaml", ["x", "y"], defaults={"size": "16x16"})
    assert run(job, out, sim) == 0
    journal = out / "manifest.jsonl"
    data = journal.read_bytes()
    journal.write_bytes(b"not json at all\n" + data)
    assert run(job, out, sim) == 2
    assert journal.read_bytes() == b"not json at all\n" + data


def test_simulate_flag_runs_the_example_end_to_end(tmp_path, monkeypatch):
    monkeypatch.delenv("BATCHER_API_KEY")
    out = tmp_path / "out"
    root = Path(__file__).resolve().parent.parent
    assert cli("run", root / "jobs" / "example.yaml", "--simulate", "--sim-latency-ms", "0", "--out", out,
               "--quiet", "--size", "64x64") == 0
    s = manifest(out)["summary"]
    assert s == {"total": 5, "done": 5, "failed": 0, "pending": 0}


def test_missing_key_is_a_clear_error(tmp_path, sim, monkeypatch, capsys):
    monkeypatch.delenv("BATCHER_API_KEY")
    job = write_job(tmp_path / "a.yaml", ["x"])
    assert run(job, tmp_path / "out", sim) == 2
    assert "BATCHER_API_KEY" in capsys.readouterr().err
    assert sim.stats()["requests"] == 0


def test_status_reports_totals_and_failures(tmp_path, sim, capsys):
    out = tmp_path / "out"
    job = write_job(tmp_path / "a.yaml", ["fine", "a forbidden thing"], defaults={"size": "16x16"})
    assert run(job, out, sim) == 1
    capsys.readouterr()
    assert cli("status", out, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["total"], info["done"], info["failed"], info["pending"]) == (2, 1, 1, 0)
    assert info["failures"]["content_policy_violation"]["count"] == 1
    assert info["images_on_disk"] == 1 and info["bytes_on_disk"] > 0
    assert info["first_run"] and info["runs"] == 1


def test_json_summary_on_stdout(tmp_path, sim, capsys):
    out = tmp_path / "out"
    job = write_job(tmp_path / "a.yaml", ["one", "two"], defaults={"size": "16x16"})
    assert run(job, out, sim, "--json") == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["exit_code"] == 0 and result["summary"]["done"] == 2 and result["images"] == 2
