"""Sharded runs end to end: shards as separate `python -m batcher run` processes against a
simulator on 127.0.0.1, outputs on disk and on S3 (a moto server), limits and claims shared
through a real redis-server. Every process is bounded by a timeout and killed by its PID."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from batcher import load_job
from batcher._shard import ShardSpec
from batcher._simulator import SimulatorConfig, start_in_thread

from helpers import KEY, ROOT, write_job
from redis_helpers import REDIS_SERVER, RedisServer, needs_redis, redis_server
from test_store import s3_endpoint  # noqa: F401 — the moto S3 server fixture

PROC_TIMEOUT = 60.0
# launcher and cloud variables of the machine running the tests must not steer the shards
_INHERITED = ("BATCHER_API_KEY", "OPENAI_API_KEY", "BATCHER_BASE_URL", "JOB_COMPLETION_INDEX",
              "AWS_BATCH_JOB_ARRAY_INDEX", "CLOUD_RUN_TASK_INDEX", "CLOUD_RUN_TASK_COUNT", "SLURM_ARRAY_TASK_ID",
              "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP", "XDG_CACHE_HOME")



# -- processes ------------------------------------------------------------------------------


class Shards:
    """`python -m batcher ...` subprocesses of one test; any still running at the end is killed by PID."""

    def __init__(self, tmp: Path, env: dict[str, str] | None = None) -> None:
        self.env = {k: v for k, v in os.environ.items() if k not in _INHERITED and not k.startswith("AWS_")}
        # buffers and s3:// work folders live under the cache folder: keep them in the test's tmp
        self.env.update({"BATCHER_API_KEY": KEY, "PYTHONPATH": str(ROOT), "XDG_CACHE_HOME": str(tmp / "cache")})
        self.env.update(env or {})
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """`python -m batcher ARGS`, running."""
        return self._popen([sys.executable, "-m", "batcher", *args], env)

    def run(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """`python -m batcher ARGS` to its end."""
        return self.wait(self.start(*args, env=env))

    def run_python(self, code: str, *args: str) -> subprocess.CompletedProcess[str]:
        return self.wait(self._popen([sys.executable, "-c", code, *args], None))

    def _popen(self, argv: list[str], env: dict[str, str] | None) -> subprocess.Popen[str]:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**self.env, **(env or {})}, cwd=ROOT)
        self.procs.append(proc)
        return proc

    @staticmethod
    def wait(proc: subprocess.Popen[str], timeout: float = PROC_TIMEOUT) -> subprocess.CompletedProcess[str]:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.communicate(timeout=10)
            raise AssertionError(f"{proc.args[3:]} still running after {timeout:.0f}s") from None
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    @staticmethod
    def kill9(proc: subprocess.Popen[str]) -> None:
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=10)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                proc.communicate(timeout=10)


@pytest.fixture
def shards(tmp_path) -> Iterator[Shards]:
    procs = Shards(tmp_path)
    try:
        yield procs
    finally:
        procs.close()


def ok(result: subprocess.CompletedProcess[str], code: int = 0) -> subprocess.CompletedProcess[str]:
    assert result.returncode == code, f"exit {result.returncode} (want {code}) for {result.args[3:]}:\n{result.stderr}"
    return result


def run_args(job: Path, out: str, sim: Any, *extra: str) -> list[str]:
    return ["run", str(job), "--out", out, "--base-url", sim.base_url, "--timeout", "10", "--quiet", *extra]


# -- jobs and outputs -----------------------------------------------------------------------


def make_job(tmp: Path, count: int, name: str = "sharded", stem: str = "a sharded prompt") -> tuple[Path, list[str]]:
    prompts = [f"{stem} {i}" for i in range(count)]
    return write_job(tmp / f"{name}.yaml", prompts, name=name, defaults={"size": "32x32"}), prompts


def job_ids(job: Path) -> set[str]:
    loaded = load_job(job)
    loaded.validate()
    return {item.id for item in loaded.all_items()}


def work_journal(work: Path) -> list[dict]:
    """The complete records of a shard's local work journal (a torn last line is left out)."""
    path = work / "manifest.jsonl"
    if not path.exists():
        return []
    recs = []
    for raw in path.read_bytes().splitlines(keepends=True):
        if raw.endswith(b"\n"):
            with contextlib.suppress(ValueError):
                recs.append(json.loads(raw))
    return recs


def in_flight(recs: list[dict]) -> set[str]:
    """Items whose latest attempt has no item record after it: sent, answer not journaled."""
    open_ids: set[str] = set()
    for rec in recs:
        if rec.get("t") == "attempt":
            open_ids.add(rec["id"])
        elif rec.get("t") == "item":
            open_ids.discard(rec["id"])
    return open_ids


def done_count(recs: list[dict]) -> int:
    return sum(1 for r in recs if r.get("t") == "item" and r.get("status") == "done")


def wait_until(predicate, timeout: float, proc: subprocess.Popen[str] | None = None) -> bool:
    """Poll `predicate` every 20 ms for at most `timeout` s (False if `proc` exits first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def kill_in_flight(shards: Shards, proc: subprocess.Popen[str], work: Path, min_done: int) -> set[str]:
    """SIGKILL `proc` once it has finished `min_done` items and has requests in flight; return
    the ids that were in flight at the kill (from its work journal, read after the kill)."""
    ready = wait_until(lambda: (recs := work_journal(work)) and done_count(recs) >= min_done
                       and in_flight(recs), 30, proc)
    if not ready:
        result = shards.wait(proc)
        raise AssertionError(f"the shard never had requests in flight (exit {result.returncode}): {result.stderr}")
    shards.kill9(proc)
    flying = in_flight(work_journal(work))
    assert flying, "the kill hit no request in flight"
    return flying


def check_manifest(doc: dict, ids: set[str]) -> dict[str, dict]:
    """Every item of the job exactly once, and done."""
    items = doc["items"]
    assert doc["summary"] == {"total": len(ids), "done": len(ids), "failed": 0, "pending": 0}
    assert len(items) == len({i["id"] for i in items})  # no item twice
    assert {i["id"] for i in items} == ids  # the union of the shards is the job
    assert all(i["status"] == "done" and len(i["images"]) == 1 for i in items)
    return {i["id"]: i for i in items}


def check_duplicates(stats: dict, prompts: list[str], by_id: dict[str, dict], allowed: set[str]) -> None:
    """Each prompt generated once, except those whose request was in flight at a kill (twice at most)."""
    assert set(stats["generations"]) == set(prompts)  # every item was generated
    prompt_of = {item_id: rec["request"]["prompt"] for item_id, rec in by_id.items()}
    may_repeat = {prompt_of[i] for i in allowed}
    twice = {p: c for p, c in stats["generations"].items() if c > 1}
    assert set(twice) <= may_repeat, (twice, may_repeat)
    assert all(c == 2 for c in twice.values()), twice
    assert stats["duplicates"] <= len(allowed)


def status_json(shards: Shards, out: str) -> dict:
    return json.loads(ok(shards.run("status", out, "--json")).stdout)


# -- 1. plan + three shards, three ways of naming the index ---------------------------------


def test_three_shards_as_processes_do_every_item_exactly_once(tmp_path, shards):
    job, prompts = make_job(tmp_path, 36)
    out = str(tmp_path / "out")
    ids = job_ids(job)
    with start_in_thread(SimulatorConfig(latency_ms=20)) as sim:
        ok(shards.run("plan", str(job), "--out", out, "--shards", "3"))
        procs = [
            shards.start(*run_args(job, out, sim, "--shard", "0/3", "--json")),
            shards.start(*run_args(job, out, sim, "--shards", "3", "--json"), env={"JOB_COMPLETION_INDEX": "1"}),
            shards.start(*run_args(job, out, sim, "--json"), env={"JOB_COMPLETION_INDEX": "2"}),  # N from plan.json
        ]
        results = [json.loads(ok(shards.wait(p)).stdout) for p in procs]
        first = sim.stats()

        # each process ran its own shard's items, and the shards split the job
        # (from each shard's segments: a committed shard's work folder is removed)
        per_shard = [{json.loads(line)["id"] for seg in (Path(out) / "segments").glob(f"seg-*-s{i:05d}of00003-*")
                      for line in seg.read_text().splitlines() if json.loads(line).get("t") == "item"}
                     for i in range(3)]
        assert [r["summary"]["total"] for r in results] == [len(s) for s in per_shard]
        assert all(s and s == {i for i in ids if ShardSpec(k, 3).contains(i)} for k, s in enumerate(per_shard))
        assert set().union(*per_shard) == ids and sum(map(len, per_shard)) == len(ids)
        assert sum(r["requests"] for r in results) == len(ids)
        assert any(r["merged"] == {"total": 36, "done": 36, "failed": 0, "pending": 0} for r in results)

        # a rerun of any shard, from its work folder or from a fresh machine's, sends nothing
        ok(shards.run(*run_args(job, out, sim, "--shard", "1/3")))
        ok(shards.run(*run_args(job, out, sim, "--shard", "2/3", "--work-dir", str(tmp_path / "elsewhere"))))
        ok(shards.run(*run_args(job, out, sim), env={"JOB_COMPLETION_INDEX": "0"}))
        again = sim.stats()

    by_id = check_manifest(json.loads((Path(out) / "manifest.json").read_text()), ids)
    assert first["duplicates"] == 0 and first["requests"] == len(ids)
    check_duplicates(first, prompts, by_id, allowed=set())
    assert again["requests"] == first["requests"]  # the reruns sent nothing
    for rec in by_id.values():
        assert (Path(out) / rec["images"][0]["file"]).stat().st_size == rec["images"][0]["bytes"]
    info = status_json(shards, out)
    assert info["shards"] == {"planned": 3, "committed": [0, 1, 2]}
    assert (info["total"], info["done"], info["pending"]) == (36, 36, 0)
    text = ok(shards.run("status", out)).stdout
    assert "shards: 3 of 3 committed" in text


# -- 2. refusals: another job, another N, an unsharded run -----------------------------------


REFUSALS = {
    "edited job, --shard": (["--shard", "0/3"], {}, "edited", ["fingerprint", "job changed"]),
    "added item, index var + plan": ([], {"JOB_COMPLETION_INDEX": "1"}, "added", ["fingerprint", "job changed"]),
    "another N, --shard": (["--shard", "0/4"], {}, "same", ["splits the job into 3 shards", "asks for 4"]),
    "another N, index var + --shards": (["--shards", "2"], {"JOB_COMPLETION_INDEX": "0"}, "same",
                                        ["splits the job into 3 shards", "asks for 2"]),
    "unsharded run": ([], {}, "same", ["planned for sharded runs", "--shard I/N"]),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_a_run_that_disagrees_with_the_plan_exits_2_and_sends_nothing(case, tmp_path, shards):
    extra, env, variant, words = REFUSALS[case]
    job, prompts = make_job(tmp_path, 12)
    out = tmp_path / "out"
    ok(shards.run("plan", str(job), "--out", str(out), "--shards", "3"))
    if variant == "edited":
        write_job(job, [*prompts[:5], prompts[5] + " (edited)", *prompts[6:]], name="sharded",
                  defaults={"size": "32x32"})
    elif variant == "added":
        write_job(job, [*prompts, "one more prompt"], name="sharded", defaults={"size": "32x32"})
    before = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    with start_in_thread(SimulatorConfig()) as sim:
        result = shards.run(*run_args(job, str(out), sim, *extra), env=env)
        stats = sim.stats()
    ok(result, 2)
    assert all(w in result.stderr for w in words), result.stderr
    assert "plan.json" in result.stderr or "planned" in result.stderr
    assert stats["requests"] == 0
    after = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file() and ".work" not in p.parts
                   and ".buffers" not in p.parts)
    assert after == before == [Path("plan.json")]  # nothing published, no segment, no marker


# -- 3. kill -9 one shard mid-run, rerun its index ------------------------------------------


def test_kill_9_of_one_shard_then_rerun_pays_only_for_what_was_in_flight(tmp_path, shards):
    job, prompts = make_job(tmp_path, 48)
    out = tmp_path / "out"
    ids = job_ids(job)
    victim_work = out / ".work" / "shard-00001-of-00003"
    with start_in_thread(SimulatorConfig(latency_ms=200, latency_jitter_ms=50, seed=3)) as sim:
        ok(shards.run("plan", str(job), "--out", str(out), "--shards", "3"))
        others = [shards.start(*run_args(job, str(out), sim, "--shard", f"{i}/3", "--concurrency", "4"))
                  for i in (0, 2)]
        victim = shards.start(*run_args(job, str(out), sim, "--shard", "1/3", "--concurrency", "4"))
        flying = kill_in_flight(shards, victim, victim_work, min_done=4)
        assert len(flying) <= 4  # never more in flight than the concurrency
        for proc in others:
            ok(shards.wait(proc))
        assert not (out / "manifest.json").exists()  # shard 1 has not committed: no merged manifest yet
        # the rerun of the killed index, this time named by the launcher's variable
        rerun = ok(shards.run(*run_args(job, str(out), sim, "--shards", "3", "--json"),
                              env={"JOB_COMPLETION_INDEX": "1"}))
        stats = sim.stats()

    result = json.loads(rerun.stdout)
    assert result["merged"] == {"total": 48, "done": 48, "failed": 0, "pending": 0}
    by_id = check_manifest(json.loads((out / "manifest.json").read_text()), ids)
    check_duplicates(stats, prompts, by_id, allowed=flying)
    check_images_folder(out / "images", by_id)
    info = status_json(shards, str(out))
    assert info["shards"] == {"planned": 3, "committed": [0, 1, 2]}


def check_images_folder(images: Path, by_id: dict[str, dict]) -> None:
    """Every file of the manifest is there with its recorded size, and nothing else: no temporaries."""
    names = sorted(p.name for p in images.iterdir())
    assert not [n for n in names if n.startswith(".") or ".tmp" in n], names
    want = {Path(rec["images"][0]["file"]).name: rec["images"][0]["bytes"] for rec in by_id.values()}
    assert sorted(want) == names
    for name, size in want.items():
        assert (images / name).stat().st_size == size


def test_a_shards_rerun_resumes_from_what_a_killed_run_left_only_in_its_buffer(tmp_path):
    """The killed run's last records never went up as a segment (they go every few seconds);
    rebuilding the work journal from the store must ship them first, or resume forgets them."""
    from batcher._sharded import ShardedOutput
    from batcher._store import SegmentWriter

    out = tmp_path / "out"
    item_id = next(f"x{n}" for n in range(100) if ShardSpec(1, 3).contains(f"x{n}"))
    killed = ShardedOutput(out, ShardSpec(1, 3))
    writer = SegmentWriter.open(killed.store, 1, 3)
    done = {"t": "item", "id": item_id, "rhash": "h", "status": "done", "request": {"prompt": "p"}, "images": [],
            "attempts": 1, "error": None, "finished": "2026-11-25T10:00:00.000Z"}
    writer.append({"t": "attempt", "id": item_id, "rhash": "h", "attempt": 1, "at": "2026-11-25T10:00:00.000Z"})
    writer.append(done)
    os.close(writer._fd)  # as kill -9 does: the buffer stays, unshipped and unlocked
    assert killed.store.list_segments() == []

    rerun = ShardedOutput(out, ShardSpec(1, 3), work_dir=tmp_path / "another-machine")
    journal = tmp_path / "journal.jsonl"
    assert rerun.rebuild_journal(journal) == 2
    assert [json.loads(line)["t"] for line in journal.read_text().splitlines()] == ["attempt", "item"]
    assert len(rerun.store.list_segments()) == 1  # shipped once, for every later reader too


# -- 4. the same on S3 ----------------------------------------------------------------------


def test_two_shards_on_s3_with_a_kill_9_and_rerun(tmp_path, shards, s3_endpoint):  # noqa: F811
    from batcher._store import ObjectStore

    bucket = f"batcher-sharded-{uuid.uuid4().hex[:12]}"
    out = f"s3://{bucket}/run"
    store = ObjectStore(out, storage_options={"client_kwargs": {"endpoint_url": s3_endpoint},
                                              "skip_instance_cache": True})
    store.fs.mkdir(bucket)
    # the subprocesses find the server and dummy credentials the standard way: the environment
    shards.env.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL_S3": s3_endpoint, "AWS_EC2_METADATA_DISABLED": "true",
                       "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull})
    job, prompts = make_job(tmp_path, 24)
    ids = job_ids(job)
    work_root = tmp_path / "cache" / "batcher" / "work" / hashlib.sha256(out.encode()).hexdigest()[:16]
    with start_in_thread(SimulatorConfig(latency_ms=200, latency_jitter_ms=50, seed=4)) as sim:
        ok(shards.run("plan", str(job), "--out", out, "--shards", "2"))
        assert store.exists("plan.json")
        first = shards.start(*run_args(job, out, sim, "--shard", "0/2", "--concurrency", "3"))
        victim = shards.start(*run_args(job, out, sim, "--concurrency", "3"), env={"JOB_COMPLETION_INDEX": "1"})
        flying = kill_in_flight(shards, victim, work_root / "shard-00001-of-00002", min_done=2)
        assert len(flying) <= 3
        ok(shards.wait(first))
        assert not store.exists("manifest.json")
        ok(shards.run(*run_args(job, out, sim, "--shard", "1/2", "--concurrency", "3")))
        stats = sim.stats()

    doc = json.loads(store.read("manifest.json"))
    by_id = check_manifest(doc, ids)
    check_duplicates(stats, prompts, by_id, allowed=flying)
    listed = dict(store.list("images"))
    want = {Path(rec["images"][0]["file"]).name: rec["images"][0]["bytes"] for rec in by_id.values()}
    assert listed == want  # every image in the bucket with its size, nothing else
    assert store.read(by_id[next(iter(ids))]["images"][0]["file"])[:8] == b"\x89PNG\r\n\x1a\n"
    info = status_json(shards, out)
    assert info["out"] == out and info["shards"] == {"planned": 2, "committed": [0, 1]}
    assert (info["total"], info["done"], info["pending"]) == (24, 24, 0)


# -- 5. a real redis-server: claims and the shared limit ------------------------------------



@needs_redis
def test_two_processes_on_the_same_index_split_its_items_by_claims(tmp_path, shards, redis_server):
    job, prompts = make_job(tmp_path, 40)
    out = tmp_path / "out"
    ids = job_ids(job)
    limiter = ["--limiter", redis_server.url, "--concurrency", "4", "--json"]
    with start_in_thread(SimulatorConfig(latency_ms=150)) as sim:
        ok(shards.run("plan", str(job), "--out", str(out), "--shards", "2"))
        # two pods given the same index (a replaced pod whose predecessor still runs): each its own machine
        twins = [shards.start(*run_args(job, str(out), sim, "--shard", "0/2", "--work-dir", str(tmp_path / w),
                                        *limiter)) for w in ("pod-a", "pod-b")]
        other = shards.start(*run_args(job, str(out), sim, "--shard", "1/2", *limiter))
        twin_results = [json.loads(shards.wait(p).stdout) for p in twins]
        ok(shards.wait(other))
        during = sim.stats()
        # a later run of index 0 sees everything in the store, sends nothing, commits and merges
        rerun = json.loads(ok(shards.run(*run_args(job, str(out), sim, "--shard", "0/2", "--json"))).stdout)
        after = sim.stats()

    shard0 = {i for i in ids if ShardSpec(0, 2).contains(i)}
    assert during["duplicates"] == 0 and during["requests"] == len(ids)
    assert [r["requests"] > 0 for r in twin_results] == [True, True]  # they really competed
    assert sum(r["requests"] for r in twin_results) == len(shard0)  # and split shard 0
    # the twin that finished last recounted from the store: it saw the other's items done, committed
    assert min(r["summary"]["pending"] for r in twin_results) == 0
    assert {r["exit_code"] for r in twin_results} <= {0, 1}
    assert after["requests"] == during["requests"] and rerun["requests"] == 0
    assert rerun["merged"] == {"total": 40, "done": 40, "failed": 0, "pending": 0}
    by_id = check_manifest(json.loads((out / "manifest.json").read_text()), ids)
    check_duplicates(after, prompts, by_id, allowed=set())


@needs_redis
@pytest.mark.parametrize("enforced", [True, False], ids=["simulator-enforces-rpm", "simulator-only-counts"])
def test_three_shards_share_one_rate_limit_through_redis(enforced, tmp_path, shards, redis_server):
    rpm, per_second = 600, 10
    job, prompts = make_job(tmp_path, 45)
    out = tmp_path / "out"
    # enforcing, the simulator answers 429 past the limit; only counting, its window shows what was sent
    config = SimulatorConfig(latency_ms=20, rpm=rpm if enforced else None)
    with start_in_thread(config) as sim:
        ok(shards.run("plan", str(job), "--out", str(out), "--shards", "3"))
        procs = [shards.start(*run_args(job, str(out), sim, "--shard", f"{i}/3", "--rpm", str(rpm),
                                        "--concurrency", "4", "--limiter", redis_server.url)) for i in range(3)]
        for proc in procs:
            ok(shards.wait(proc))
        stats = sim.stats()
    assert stats["accepted"] == 45 and stats["duplicates"] == 0
    assert stats["max_window_requests"] <= 1.1 * per_second
    assert stats["rate_limited"] <= 0.02 * stats["requests"]
    check_manifest(json.loads((out / "manifest.json").read_text()), job_ids(job))


# -- 6. a plain local run loads no Redis and no object-storage library ----------------------

LOCAL_RUN = """
import json, sys
import batcher
from batcher._simulator import SimulatorConfig, start_in_thread
heavy = ("redis", "s3fs", "fsspec", "botocore", "aiobotocore", "gcsfs")
loaded = lambda: sorted({m.split(".")[0] for m in sys.modules} & set(heavy))
job = batcher.load_job(sys.argv[1])
with start_in_thread(SimulatorConfig()) as sim:
    result = batcher.run_sync(job, batcher.RunOptions(out=sys.argv[2], base_url=sim.base_url,
                                                      api_key="simulated-key", timeout=10))
after_run = loaded()
# the check sees a lazy import when one does happen
from batcher._redis import connect
from batcher._store import open_store
connect("redis://127.0.0.1:9/0")
open_store("memory://probe/out")
print(json.dumps({"summary": result.summary, "after_run": after_run, "after_probe": loaded()}))
"""


def test_a_local_run_imports_neither_redis_nor_object_storage(tmp_path, shards):
    job, _ = make_job(tmp_path, 3)
    result = ok(shards.run_python(LOCAL_RUN, str(job), str(tmp_path / "out")))
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["summary"] == {"total": 3, "done": 3, "failed": 0, "pending": 0}
    assert seen["after_run"] == []
    assert {"redis", "fsspec"} <= set(seen["after_probe"])
