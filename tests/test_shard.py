from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from batcher._exceptions import JobError, ShardError
from batcher._shard import (
    LAUNCHERS,
    PLAN_FILE,
    ShardSpec,
    check_plan,
    fingerprint,
    launcher_table,
    make_plan,
    parse_shard,
    read_plan,
    shard_from_env,
    shard_of,
    write_plan,
)

ROOT = Path(__file__).resolve().parent.parent
PARTI = [json.loads(line) for line in (ROOT / "jobs" / "partiprompts.jsonl").read_text("utf-8").splitlines()]

# chi-square critical values at p = 0.001 for N - 1 degrees of freedom
CHI2_999 = {2: 10.83, 4: 16.27, 8: 24.32, 16: 37.70}


def chi_square(keys: list[str], count: int, assign=shard_of) -> float:
    counts = [0] * count
    for key in keys:
        counts[assign(key, count)] += 1
    expected = len(keys) / count
    return sum((c - expected) ** 2 / expected for c in counts)


# -- shard_of -----------------------------------------------------------------------------------

def test_partiprompts_has_the_expected_size():
    assert len(PARTI) == 1632


@pytest.mark.parametrize("count", sorted(CHI2_999))
@pytest.mark.parametrize("field", ["id", "prompt"])
def test_shard_of_spreads_partiprompts_near_uniformly(count, field):
    keys = [item[field] for item in PARTI]
    assert chi_square(keys, count) < CHI2_999[count]
    # and every shard gets within 35% of its fair share (16 shards: 102 ± 36, about 3.5 sigma)
    counts = [0] * count
    for key in keys:
        counts[shard_of(key, count)] += 1
    assert min(counts) > 0.65 * len(keys) / count and max(counts) < 1.35 * len(keys) / count


def test_the_spread_check_catches_a_poor_hash():
    # the same check rejects a hash of the last character (ids end in digits): it is able to fail
    assert chi_square([item["id"] for item in PARTI], 8, lambda k, n: ord(k[-1]) % n) > CHI2_999[8]


def test_shard_of_is_the_documented_sha256_prefix():
    for item in PARTI[:50]:
        want = int(hashlib.sha256(item["id"].encode()).hexdigest()[:16], 16) % 7
        assert shard_of(item["id"], 7) == want


def test_shard_of_is_stable_across_processes_with_different_hash_seeds():
    code = ("import json, sys; from batcher._shard import shard_of; "
            "print(json.dumps([shard_of(i, 13) for i in sys.argv[1:]]))")
    ids = [item["prompt"] for item in PARTI[:40]] + ["naïve ☃", "\udc80 lone surrogate"]
    outs = set()
    for seed in ("1", "2", "random"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        proc = subprocess.run([sys.executable, "-c", code, *ids[:-1]], env=env, capture_output=True,
                              text=True, timeout=60, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr
        outs.add(proc.stdout)
    assert len(outs) == 1
    assert json.loads(outs.pop()) == [shard_of(i, 13) for i in ids[:-1]]
    assert 0 <= shard_of(ids[-1], 13) < 13  # a lone surrogate from JSON does not crash


def test_shard_of_rejects_zero_shards():
    with pytest.raises(ShardError):
        shard_of("a", 0)


# -- specs ----------------------------------------------------------------------------------------

def test_parse_shard():
    assert parse_shard("3/8") == ShardSpec(3, 8)
    assert parse_shard(" 0/1 ") == ShardSpec(0, 1)
    assert str(ShardSpec(2, 5)) == "2/5"


@pytest.mark.parametrize("text, words", [
    ("3", "INDEX/COUNT"), ("a/8", "integers"), ("8/8", "0..7"), ("-1/8", "0..7"), ("0/0", "at least 1"),
])
def test_parse_shard_errors_are_clear(text, words):
    with pytest.raises(ShardError, match=words):
        parse_shard(text)


def test_shard_error_is_a_job_error():
    assert issubclass(ShardError, JobError)


def test_spec_contains_partitions_the_items():
    specs = [ShardSpec(i, 4) for i in range(4)]
    for item in PARTI:
        assert sum(spec.contains(item["id"]) for spec in specs) == 1


def test_spec_validates():
    with pytest.raises(ShardError):
        ShardSpec(4, 4)
    with pytest.raises(ShardError):
        ShardSpec(0, 0)


# -- launchers ------------------------------------------------------------------------------------

def test_no_launcher_variable_means_no_shard():
    assert shard_from_env({"HOME": "/root"}, None) is None
    assert shard_from_env({}, 8) is None


@pytest.mark.parametrize("env, count, want", [
    ({"JOB_COMPLETION_INDEX": "3"}, 8, ShardSpec(3, 8)),
    ({"AWS_BATCH_JOB_ARRAY_INDEX": "0"}, 2, ShardSpec(0, 2)),
    ({"CLOUD_RUN_TASK_INDEX": "4", "CLOUD_RUN_TASK_COUNT": "5"}, None, ShardSpec(4, 5)),
    ({"CLOUD_RUN_TASK_INDEX": "4", "CLOUD_RUN_TASK_COUNT": "5"}, 5, ShardSpec(4, 5)),
    ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "8"}, None, ShardSpec(0, 8)),
    ({"SLURM_ARRAY_TASK_ID": "8", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "8"}, None, ShardSpec(7, 8)),
    ({"SLURM_ARRAY_TASK_ID": "14", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "2",
      "SLURM_ARRAY_TASK_COUNT": "8"}, None, ShardSpec(7, 8)),
    ({"SLURM_ARRAY_TASK_ID": "2"}, 4, ShardSpec(2, 4)),
    # the order of precedence: Kubernetes first
    ({"JOB_COMPLETION_INDEX": "1", "CLOUD_RUN_TASK_INDEX": "2", "CLOUD_RUN_TASK_COUNT": "3"}, 3, ShardSpec(1, 3)),
])
def test_shard_from_env(env, count, want):
    assert shard_from_env(env, count) == want


@pytest.mark.parametrize("env, count, words", [
    ({"JOB_COMPLETION_INDEX": "8"}, 8, r"JOB_COMPLETION_INDEX gives shard index 8, outside 0..7"),
    ({"JOB_COMPLETION_INDEX": "x"}, 8, r"\$JOB_COMPLETION_INDEX: expected an integer"),
    ({"JOB_COMPLETION_INDEX": "0"}, None, "pass --shards N"),
    ({"CLOUD_RUN_TASK_INDEX": "0", "CLOUD_RUN_TASK_COUNT": "4"}, 5, "disagrees"),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "2"}, 4, "not on the array"),
    ({"SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "8"}, None, "outside 0..7"),
])
def test_shard_from_env_errors(env, count, words):
    with pytest.raises(ShardError, match=words):
        shard_from_env(env, count)


def test_launcher_table_names_every_variable():
    table = launcher_table()
    for launcher in LAUNCHERS:
        assert f"`{launcher.index_var}`" in table
    assert len(table.splitlines()) == len(LAUNCHERS) + 2


def test_deploy_readme_carries_the_current_launcher_table():
    assert launcher_table() in (ROOT / "deploy" / "README.md").read_text("utf-8")


# -- the plan ---------------------------------------------------------------------------------------

def pairs(n: int = 100) -> list[tuple[str, str]]:
    return [(item["id"], hashlib.sha256(item["prompt"].encode()).hexdigest()[:16]) for item in PARTI[:n]]


def test_fingerprint_changes_with_any_edit():
    base = pairs()
    fp = fingerprint(base)
    assert fp.startswith("sha256:") and fingerprint(iter(base)) == fp
    edited = list(base)
    edited[5] = (edited[5][0], "0" * 16)
    assert fingerprint(edited) != fp
    assert fingerprint(base[:-1]) != fp
    assert fingerprint([base[1], base[0], *base[2:]]) != fp
    # framing: moving characters between id and rhash is a different job
    assert fingerprint([("ab", "c")]) != fingerprint([("a", "bc")])


def test_fingerprint_reads_items_too():
    class Item:
        def __init__(self, id, rhash):
            self.id, self.rhash = id, rhash

    assert fingerprint([Item(i, r) for i, r in pairs()]) == fingerprint(pairs())


def test_fingerprint_streams_without_holding_items():
    def stream():
        for i in range(200_000):
            yield (f"id-{i}", "0123456789abcdef")

    # a generator is consumed once and never materialised (it would raise on a second pass)
    assert fingerprint(stream()).startswith("sha256:")


def test_make_write_read_plan_round_trip(tmp_path):
    plan = make_plan(pairs(), 4)
    assert plan.items == 100 and len(plan.items_per_shard) == 4
    assert list(plan.items_per_shard) == [sum(shard_of(i, 4) == s for i, _ in pairs()) for s in range(4)]
    written = write_plan(tmp_path / "out", plan.count, plan.fingerprint, plan.items_per_shard)
    doc = json.loads((tmp_path / "out" / PLAN_FILE).read_text())
    assert doc["shards"] == 4 and doc["fingerprint"] == plan.fingerprint and doc["items"] == 100
    assert doc["created"].endswith("Z")
    assert read_plan(tmp_path / "out") == written
    assert not [p for p in (tmp_path / "out").iterdir() if p.name != PLAN_FILE]  # no temp left behind


def test_read_plan_missing_is_none(tmp_path):
    assert read_plan(tmp_path) is None
    assert check_plan(tmp_path, 4, "sha256:x") is None
    with pytest.raises(ShardError, match="batcher plan"):
        check_plan(tmp_path, 4, "sha256:x", required=True)


@pytest.mark.parametrize("doc, field", [
    ("{", "not valid JSON"),
    ('{"version": 1, "shards": 0, "fingerprint": "sha256:a", "items_per_shard": []}', "shards"),
    ('{"version": 1, "shards": 2, "fingerprint": 5, "items_per_shard": [1, 2]}', "fingerprint"),
    ('{"version": 1, "shards": 2, "fingerprint": "sha256:a", "items_per_shard": [1]}', "items_per_shard"),
    ('{"version": 9, "shards": 2, "fingerprint": "sha256:a", "items_per_shard": [1, 2]}', "version"),
])
def test_read_plan_names_the_bad_field(tmp_path, doc, field):
    (tmp_path / PLAN_FILE).write_text(doc)
    with pytest.raises(ShardError, match=field) as info:
        read_plan(tmp_path)
    assert PLAN_FILE in str(info.value)


def test_check_plan_refuses_another_n_or_another_job(tmp_path):
    plan = make_plan(pairs(), 4)
    write_plan(tmp_path, 4, plan.fingerprint, plan.items_per_shard)
    assert check_plan(tmp_path, 4, fingerprint(pairs())).fingerprint == plan.fingerprint
    with pytest.raises(ShardError, match="into 4 shards, this run asks for 8"):
        check_plan(tmp_path, 8, plan.fingerprint)
    with pytest.raises(ShardError, match="the job changed"):
        check_plan(tmp_path, 4, fingerprint(pairs(99)))


def test_write_plan_checks_its_counts(tmp_path):
    with pytest.raises(ShardError):
        write_plan(tmp_path, 3, "sha256:a", [1, 2])
