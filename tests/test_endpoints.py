"""Several endpoints in one run: routing, retirement, circuit breaking, models, keys, validation."""

from __future__ import annotations

import dataclasses
import json
from contextlib import ExitStack
from pathlib import Path

import anyio
import pytest

from batcher import JobValidationError, load_job
from batcher._cli import main
from batcher._route import BreakerPolicy, CircuitBreaker, Dispatcher, Task
from batcher._simulator import SimulatorConfig, start_in_thread

from helpers import KEY, by_id, manifest, write_job


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv("BATCHER_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


@pytest.fixture
def sims():
    """start(config) → a running simulator on 127.0.0.1, stopped at the end of the test."""
    with ExitStack() as stack:
        yield lambda config=SimulatorConfig(): stack.enter_context(start_in_thread(config))


def endpoint(name: str, sim, **extra) -> dict:
    return {"name": name, "base_url": sim.base_url, **extra}


def run(job: Path, out: Path, *extra: str) -> int:
    return main(["run", str(job), "--out", str(out), "--quiet", "--timeout", "10", *map(str, extra)])


def prompts(n: int) -> list[str]:
    return [f"endpoint test prompt {i}" for i in range(n)]


def generations(*sims) -> dict[str, int]:
    total: dict[str, int] = {}
    for sim in sims:
        for prompt, count in sim.stats()["generations"].items():
            total[prompt] = total.get(prompt, 0) + count
    return total


def test_two_endpoints_share_the_work_each_under_its_own_limit(tmp_path, sims, capsys):
    slow, fast = sims(SimulatorConfig(rpm=300)), sims(SimulatorConfig(rpm=900))
    job = write_job(tmp_path / "job.yaml", prompts(40), defaults={"size": "16x16"}, endpoints=[
        endpoint("slow", slow, rate_limit={"rpm": 300}), endpoint("fast", fast, rate_limit={"rpm": 900})])
    out = tmp_path / "out"
    assert run(job, out) == 0
    records = by_id(out)
    made_by = [r["endpoint"] for r in records.values()]
    assert made_by.count("slow") + made_by.count("fast") == 40
    assert made_by.count("fast") > made_by.count("slow") > 0
    assert all(img["endpoint"] == r["endpoint"] for r in records.values() for img in r["images"])
    for sim, per_second in ((slow, 5), (fast, 15)):
        # each endpoint paced by its own limiter: at most a stray early arrival (the simulator shares
        # this process's GIL), never the other endpoint's share
        assert sim.stats()["rate_limited"] <= 4
        assert sim.stats()["max_window_requests"] <= per_second
    assert set(generations(slow, fast).values()) == {1}
    assert main(["status", str(out), "--json"]) == 0
    status = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {k: v["done"] for k, v in status["endpoints"].items()} == {"slow": made_by.count("slow"),
                                                                    "fast": made_by.count("fast")}


def test_quota_on_one_endpoint_retires_it_and_the_other_finishes(tmp_path, sims, capsys):
    dry, wet = sims(SimulatorConfig(quota_images=5)), sims(SimulatorConfig())
    job = write_job(tmp_path / "job.yaml", prompts(30), defaults={"size": "16x16"},
                    endpoints=[endpoint("dry", dry, concurrency=4), endpoint("wet", wet, concurrency=2)])
    out = tmp_path / "out"
    assert run(job, out) == 0
    assert manifest(out)["summary"] == {"total": 30, "done": 30, "failed": 0, "pending": 0}
    assert "endpoint 'dry' retired" in capsys.readouterr().err
    assert dry.stats()["images"] == 5
    assert set(generations(dry, wet).values()) == {1}  # nothing paid twice


def test_no_endpoint_left_stops_with_exit_4_and_items_pending(tmp_path, sims):
    a, b = sims(SimulatorConfig(api_key="another-key")), sims(SimulatorConfig(quota_images=2))
    job = write_job(tmp_path / "job.yaml", prompts(20), defaults={"size": "16x16"},
                    endpoints=[endpoint("a", a, concurrency=1), endpoint("b", b, concurrency=1)])
    out = tmp_path / "out"
    assert run(job, out) == 4
    summary = manifest(out)["summary"]
    assert summary["done"] == 2 and summary["failed"] == 0 and summary["pending"] == 18


def test_an_endpoint_answering_500_is_rested_and_the_other_takes_its_share(tmp_path, sims, capsys):
    broken, healthy = sims(SimulatorConfig(fail_rate=1.0)), sims(SimulatorConfig())
    job = write_job(tmp_path / "job.yaml", prompts(40), defaults={"size": "16x16"},
                    endpoints=[endpoint("broken", broken, concurrency=4), endpoint("healthy", healthy, concurrency=2)])
    out = tmp_path / "out"
    assert run(job, out, "--max-attempts", "10") == 0
    assert {r["endpoint"] for r in by_id(out).values()} == {"healthy"}
    assert "'broken': 5 failures in a row" in capsys.readouterr().err
    # the breaker opened after 5 straight failures; probes are rare after that
    assert broken.stats()["requests"] < 20


def test_models_route_items_and_renames_are_sent(tmp_path, sims):
    x, y = sims(), sims()
    job = write_job(tmp_path / "job.yaml", [
        {"id": "on-x", "prompt": "p1", "model": "model-x"},
        {"id": "on-y", "prompt": "p2", "model": "grok-imagine"},
    ], defaults={"size": "16x16"}, endpoints=[
        endpoint("x", x, models=["model-x"]),
        endpoint("y", y, models={"grok-imagine": "grok-imagine-image"}),
    ])
    out = tmp_path / "out"
    assert run(job, out) == 0
    records = by_id(out)
    assert records["on-x"]["endpoint"] == "x" and records["on-x"]["images"][0]["model"] == "model-x"
    assert records["on-y"]["endpoint"] == "y" and records["on-y"]["images"][0]["model"] == "grok-imagine-image"
    assert records["on-y"]["request"]["model"] == "grok-imagine"  # the manifest keeps what was asked
    assert x.stats()["requests"] == 1 and y.stats()["requests"] == 1


def test_endpoint_flag_restricts_the_run(tmp_path, sims):
    a, b = sims(), sims()
    job = write_job(tmp_path / "job.yaml", prompts(6), defaults={"size": "16x16"},
                    endpoints=[endpoint("a", a), endpoint("b", b)])
    assert run(job, tmp_path / "out", "--endpoint", "b") == 0
    assert a.stats()["requests"] == 0 and b.stats()["requests"] == 6
    assert run(job, tmp_path / "out2", "--endpoint", "nope") == 2


def test_missing_key_is_an_error_only_for_an_endpoint_the_run_needs(tmp_path, sims, capsys, monkeypatch):
    a, b = sims(), sims()
    monkeypatch.delenv("BATCHER_API_KEY")
    monkeypatch.setenv("KEY_A", KEY)
    eps = [endpoint("a", a, api_key_env="KEY_A", models=["m-a"]),
           endpoint("b", b, api_key_env="KEY_B_UNSET", models=["m-b"])]
    only_a = write_job(tmp_path / "a.yaml", [{"prompt": "p", "model": "m-a"}], endpoints=eps,
                       defaults={"size": "16x16"})
    assert run(only_a, tmp_path / "out-a") == 0
    assert "KEY_B_UNSET" in capsys.readouterr().err  # a warning, not an error
    both = write_job(tmp_path / "b.yaml", [{"prompt": "p", "model": "m-a"}, {"prompt": "q", "model": "m-b"}],
                     endpoints=eps, defaults={"size": "16x16"})
    assert run(both, tmp_path / "out-b") == 2
    assert "no API key for endpoint 'b'" in capsys.readouterr().err
    assert b.stats()["requests"] == 0 and a.stats()["requests"] == 1


@pytest.mark.parametrize("endpoints, expected", [
    ([{"name": "a", "base_url": "http://127.0.0.1:9/v1", "models": ["m1"]}], "model: no endpoint serves model 'grok-imagine'"),
    ([{"name": "a", "base_url": "http://127.0.0.1:9/v1"}, {"name": "a", "base_url": "http://127.0.0.1:8/v1"}],
     "endpoints.name: 'a' is used twice"),
    ([{"name": "a", "base_url": "http://127.0.0.1:9/v1", "dialect": "xia"}], "unknown dialect 'xia'; did you mean 'xai'"),
    ([{"name": "a", "base_url": "http://127.0.0.1:9/v1", "api_key": "sk-x"}], "keys don't belong in job files"),
    ([{"base_url": "http://127.0.0.1:9/v1"}], "every endpoint needs a name"),
    ([{"name": "a", "base_url": "http://127.0.0.1:9/v1", "rate_limit": {"rpm": -1}}], "endpoints.rate_limit.rpm"),
])
def test_bad_endpoints_are_reported_before_sending(tmp_path, endpoints, expected):
    job = write_job(tmp_path / "job.yaml", ["p"], endpoints=endpoints)
    with pytest.raises(JobValidationError) as exc:
        load_job(job).validate()
    assert any(expected in str(p) and str(job) in str(p) for p in exc.value.problems), \
        [str(p) for p in exc.value.problems]


def test_endpoint_price_overrides_the_job_pricing(tmp_path, sims):
    a = sims()
    job = write_job(tmp_path / "job.yaml", prompts(3), defaults={"size": "16x16"},
                    pricing=[{"per_image": 1.0}], endpoints=[endpoint("a", a, price=0.25)])
    out = tmp_path / "out"
    assert run(job, out, "--max-cost", "0.5") == 4  # two images fit at the endpoint's price
    assert sorted(r.get("cost") for r in by_id(out).values() if r["status"] == "done") == [0.25, 0.25]


# -- units: dispatcher and breaker, on a fake clock ---------------------------------------------


def make_task(i: int, eligible=("a", "b")) -> Task:
    job_item = type("I", (), {"id": f"i{i}", "images": 1})()
    return Task(job_item, frozenset(eligible))


pytestmark_async = pytest.mark.parametrize("anyio_backend", ["asyncio"])


@pytest.mark.anyio
@pytestmark_async
async def test_dispatcher_serves_oldest_first_and_pins_retries(clock, anyio_backend):
    d = Dispatcher(["a", "b"], clock=clock)
    for i in range(3):
        await d.put_new(make_task(i))
    first = d.try_take("a")
    assert first.item.id == "i0"
    first.prefer = "a"
    d.retry_later(first, 1.0)
    assert d.try_take("b").item.id == "i1"
    clock.now += 1.0
    assert d.try_take("b").item.id == "i2"  # the due retry is pinned to a
    assert d.try_take("b") is None
    assert d.try_take("a").item.id == "i0"


@pytest.mark.anyio
@pytestmark_async
async def test_dispatcher_retire_unpins_and_strands_what_only_it_serves(clock, anyio_backend):
    d = Dispatcher(["a", "b"], clock=clock)
    await d.put_new(make_task(0, ("a",)))
    await d.put_new(make_task(1))
    pinned = make_task(2)
    await d.put_new(pinned)
    d.try_take("a")  # i0
    t = d.try_take("a")  # i1
    t.prefer = "a"
    d.retry_later(t, 0.0)
    d.retire("a")
    assert [x.item.id for x in d.stranded] == []
    assert {d.try_take("b").item.id, d.try_take("b").item.id} == {"i1", "i2"}
    await d.put_new(make_task(3, ("a",)))
    assert [x.item.id for x in d.stranded] == ["i3"]


@pytest.mark.anyio
@pytestmark_async
async def test_dispatcher_is_done_only_when_fed_and_nothing_outstanding(clock, anyio_backend):
    d = Dispatcher(["a"], clock=clock)
    await d.put_new(make_task(0, ("a",)))
    d.close_feed()
    assert not d.done
    t = d.try_take("a")
    assert not d.done
    d.finished(t)
    assert d.done


def test_breaker_opens_after_a_streak_then_probes_once(clock):
    b = CircuitBreaker(BreakerPolicy(failures=3, cooldown=5.0, max_cooldown=20.0), clock=clock)
    assert not b.on_trouble() and not b.on_trouble()
    b.on_success()  # a success breaks the streak
    assert not b.on_trouble() and not b.on_trouble()
    assert b.on_trouble() and b.state == "open"
    assert b.wait_time() == pytest.approx(5.0)
    clock.now += 5.0
    assert b.wait_time() == 0.0 and b.state == "half-open"
    b.starting()
    assert b.wait_time() > 0  # one probe at a time
    assert b.on_trouble()  # a failed probe: open again, for twice as long
    assert b.wait_time() == pytest.approx(10.0)
    clock.now += 10.0
    b.wait_time()
    b.starting()
    b.on_success()
    assert b.state == "closed" and b.wait_time() == 0.0


# -- dialects through a whole run -------------------------------------------------------------


def test_one_run_speaks_three_dialects(tmp_path, sims):
    compat = sims()
    xai = sims(SimulatorConfig(dialect="xai"))
    azure = sims(SimulatorConfig(dialect="azure-openai"))
    job = write_job(tmp_path / "job.yaml", [
        {"id": "c", "prompt": "p1", "model": "m-compat"},
        {"id": "x", "prompt": "p2", "model": "grok-imagine", "size": "1536x1024"},
        {"id": "x-policy", "prompt": "forbidden p3", "model": "grok-imagine"},
        {"id": "a", "prompt": "p4", "model": "gpt-image-1", "size": "16x16"},
    ], endpoints=[
        endpoint("compat", compat, models=["m-compat"]),
        endpoint("xai", xai, dialect="xai", models={"grok-imagine": "grok-imagine-image"}),
        endpoint("azure", azure, dialect="azure-openai", models={"gpt-image-1": "my-deployment"},
                 options={"api_version": "2025-04-01-preview"}),
    ], defaults={"size": "16x16"})
    out = tmp_path / "out"
    assert run(job, out) == 1  # the moderated one fails for good
    records = by_id(out)
    assert {k: r["status"] for k, r in records.items()} == {"c": "done", "x": "done", "x-policy": "failed", "a": "done"}
    assert records["x-policy"]["error"]["code"] == "content_policy_violation"
    assert records["x"]["images"][0]["model"] == "grok-imagine-image"
    assert records["a"]["endpoint"] == "azure" and records["a"]["images"][0]["model"] == "my-deployment"
    assert azure.stats()["requests"] == 1 and xai.stats()["requests"] == 2


def test_dialect_limits_route_and_validate(tmp_path, sims):
    small, compat = sims(), sims()
    dialects = {"two-at-most": {"base": "openai-compatible", "max_n": 2}}
    eps = [endpoint("small", small, dialect="two-at-most"), endpoint("compat", compat)]
    job = write_job(tmp_path / "job.yaml", [{"id": "big", "prompt": "p", "n": 3}, {"id": "two", "prompt": "q", "n": 2}],
                    endpoints=eps, dialects=dialects, defaults={"size": "16x16"})
    out = tmp_path / "out"
    assert run(job, out, "--endpoint", "small", "--endpoint", "compat") == 0
    assert by_id(out)["big"]["endpoint"] == "compat"  # the small one takes at most 2 per request
    assert small.stats()["images"] + compat.stats()["images"] == 5
    only_small = write_job(tmp_path / "x.yaml", [{"prompt": "p", "n": 3}], endpoints=eps[:1], dialects=dialects)
    with pytest.raises(JobValidationError) as exc:
        load_job(only_small).validate()
    assert "n: 3 is more than the 2 images per request" in str(exc.value.problems[0])


def test_declared_dialect_and_missing_options_are_checked(tmp_path):
    job = write_job(tmp_path / "job.yaml", ["p"], dialects={"mine": {"base": "openai", "drop": "style"}},
                    endpoints=[{"name": "a", "base_url": "http://127.0.0.1:9/v1", "dialect": "mine"},
                               {"name": "z", "base_url": "http://127.0.0.1:9", "dialect": "azure-openai"}])
    with pytest.raises(JobValidationError) as exc:
        load_job(job).validate()
    text = "\n".join(map(str, exc.value.problems))
    assert "dialects.mine.drop" in text
    assert "endpoint 'z' (dialect azure-openai) needs options: api_version" in text


@pytest.mark.anyio
@pytestmark_async
async def test_a_timed_out_waiter_does_not_swallow_a_wake_up(anyio_backend):
    d = Dispatcher(["a"])
    await d.wait("a", timeout=0.01)  # times out: must leave no stale registration behind
    woken = []

    async def waiter():
        await d.wait("a", timeout=5.0)
        woken.append(anyio.current_time())

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.sleep(0.05)
        started = anyio.current_time()
        await d.put_new(make_task(0, ("a",)))
    assert woken and woken[0] - started < 1.0


def test_a_run_never_changes_the_callers_job(tmp_path, sims):
    """`run()` restricts endpoints on its own copy: a library user who reuses the Job gets every item."""
    import batcher

    a, b = sims(SimulatorConfig()), sims(SimulatorConfig())
    path = write_job(tmp_path / "job.yaml", prompts(3), defaults={"size": "16x16"},
                     endpoints=[endpoint("a", a), endpoint("b", b)])
    job = load_job(path)
    result = batcher.run_sync(job, batcher.RunOptions(out=str(tmp_path / "out"), endpoints=("b",)))
    assert result.exit_code == 0 and a.stats()["requests"] == 0
    assert len(list(job.items())) == 3 and [e.name for e in job.endpoints] == ["a", "b"]
    again = batcher.run_sync(job, batcher.RunOptions(out=str(tmp_path / "out2")))  # no filter: both endpoints
    assert again.exit_code == 0 and set(again.endpoints) == {"a", "b"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.name = "other"  # type: ignore[misc]
