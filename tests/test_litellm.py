"""batcher through a real LiteLLM proxy in front of the built-in simulator (skipped without litellm).

LiteLLM is what many users put between batcher and a provider. It rewrites error shapes (the
provider's symbolic `code` becomes the status as a string, `"400"`), retries some failures itself,
and re-serialises answers. These tests start `litellm --config <tmp config>` on 127.0.0.1 with
`openai/...` models whose `api_base` is a simulator, run small jobs through it, and check images,
manifest, and that failures come through classified right.

The proxy runs offline: telemetry off, the bundled cost map and header configs (no fetch), and
every outbound proxy variable pointed at a closed loopback port so any other call fails at once.
Install: `pip install 'litellm[proxy]'` into the test venv, or set BATCHER_LITELLM to a `litellm`
executable of another venv.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from batcher import RetryPolicy, RunOptions, load_job, run_sync
from batcher._simulator import SimulatorConfig, start_in_thread

from helpers import KEY, write_job
from hostile_server import whole_png


def _find_litellm() -> str | None:
    explicit = os.environ.get("BATCHER_LITELLM")
    if explicit:
        return explicit if Path(explicit).is_file() else None
    return shutil.which("litellm", path=str(Path(sys.executable).parent)) or shutil.which("litellm")


LITELLM = _find_litellm()
pytestmark = pytest.mark.skipif(LITELLM is None, reason="litellm is not installed (pip install 'litellm[proxy]', "
                                                         "or set BATCHER_LITELLM to its executable)")
UPSTREAM_KEY = "sk-fake-upstream-key"
START_TIMEOUT = 120.0  # the proxy imports a lot: ~20-35 s on a loaded 2-core machine
FAST_RETRY = RetryPolicy(max_attempts=2, base=0.01, cap=0.05)
# model group -> the simulator behind it
SIMULATORS = {
    "img": SimulatorConfig(policy_word="forbidden"),
    "img-limited": SimulatorConfig(rpm=60, policy_word=""),  # one request a second: the rest get 429
    "img-broken": SimulatorConfig(fail_rate=1.0, policy_word=""),  # every generation answers 5xx
    "img-badkey": SimulatorConfig(api_key="sk-the-right-upstream-key", policy_word=""),
    # the proxy's Files + Batches APIs (`files_settings` below) go to this one's batch endpoints
    "img-batch": SimulatorConfig(api_key=UPSTREAM_KEY, policy_word="forbidden"),
    # its first upload and first create answer 500 after the file / the batch was made
    "img-batch-faults": SimulatorConfig(api_key=UPSTREAM_KEY, batch_upload_fault="5xx", batch_create_fault="5xx"),
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _offline_env() -> dict[str, str]:
    dead = "http://127.0.0.1:9"  # the discard port, closed: any outbound call fails at once
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")
           and k not in ("OPENAI_API_KEY", "BATCHER_API_KEY", "DATABASE_URL")}
    env.update({
        "LITELLM_TELEMETRY": "False", "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
        "LITELLM_MODEL_COST_MAP_URL": f"{dead}/cost.json", "LITELLM_BLOG_POSTS_URL": f"{dead}/rss.xml",
        "LITELLM_ANTHROPIC_BETA_HEADERS_URL": f"{dead}/beta.json",
        "LITELLM_AUTOROUTER_PRESETS_URL": f"{dead}/presets.json",
        "HTTP_PROXY": dead, "HTTPS_PROXY": dead, "ALL_PROXY": dead,
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    })
    return env


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    """Four simulators and one LiteLLM proxy routing a model group to each; yields (url, sims)."""
    folder = tmp_path_factory.mktemp("litellm")
    sims = {name: start_in_thread(config) for name, config in SIMULATORS.items()}
    proc = None
    log = open(folder / "litellm.log", "wb")  # closed at teardown, after the proxy has stopped
    try:
        config = {
            "model_list": [{"model_name": name, "litellm_params": {
                # dall-e-3 is a model LiteLLM lets `response_format` through for; the simulator takes any name
                "model": "openai/dall-e-3", "api_base": sim.base_url, "api_key": UPSTREAM_KEY}}
                for name, sim in sims.items()],
            "litellm_settings": {"telemetry": False, "num_retries": 0, "request_timeout": 30},
            "general_settings": {"master_key": KEY},
        }
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        port = _free_port()
        proc = subprocess.Popen([LITELLM, "--config", str(folder / "config.yaml"), "--host", "127.0.0.1",
                                 "--port", str(port), "--num_workers", "1"],
                                stdout=log, stderr=subprocess.STDOUT, env=_offline_env(), cwd=folder)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + START_TIMEOUT
        while True:  # bounded by START_TIMEOUT
            if proc.poll() is not None:
                pytest.fail(f"litellm exited ({proc.returncode}):\n{(folder / 'litellm.log').read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"litellm did not listen within {START_TIMEOUT}s")
                time.sleep(0.5)
        yield url, sims
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=15)
        for sim in sims.values():
            sim.stop()
        log.close()


def run(tmp_path: Path, url: str, model: str, prompts: list, **options):
    job = write_job(tmp_path / "job.yaml", prompts, defaults={"model": model, "size": "16x16"})
    out = tmp_path / "out"
    opts = dict(out=str(out), base_url=f"{url}/v1", api_key=KEY, timeout=30, retry=FAST_RETRY,
                max_attempts=FAST_RETRY.max_attempts)
    opts.update(options)
    result = run_sync(load_job(job), RunOptions(**opts))
    doc = json.loads((out / "manifest.json").read_text())
    return result, out, {r["id"]: r for r in doc["items"]}


@pytest.mark.parametrize("fmt", ["b64_json", "url"])
def test_a_job_through_litellm_saves_every_image(tmp_path, proxy, fmt):
    url, sims = proxy
    prompts = [{"id": f"i{k}", "prompt": f"{fmt} through the proxy {k}"} for k in range(5)]
    prompts.append({"id": "pair", "prompt": f"{fmt} two through the proxy", "n": 2})
    before = sims["img"].stats()["requests"]
    result, out, items = run(tmp_path, url, "img", [dict(p, response_format=fmt) for p in prompts], concurrency=4)
    assert result.exit_code == 0 and result.summary == {"total": 6, "done": 6, "failed": 0, "pending": 0}
    for record in items.values():
        assert record["attempts"] == 1
        for image in record["images"]:
            assert whole_png((out / image["file"]).read_bytes())
    assert len(items["pair"]["images"]) == 2
    stats = sims["img"].stats()
    assert stats["requests"] - before == 6 and stats["duplicates"] == 0
    assert KEY not in (out / "manifest.jsonl").read_text() + (out / "manifest.json").read_text()


def test_a_policy_rejection_through_litellm_fails_the_item_once(tmp_path, proxy):
    """LiteLLM turns `code: content_policy_violation` into `code: "400"`: the item still fails
    permanently after one request, but batcher can no longer tell it was a policy rejection (so
    `--max-policy-violations` does not count it behind LiteLLM; only the message says so)."""
    url, _ = proxy
    result, _out, items = run(tmp_path, url, "img", ["a calm lake", {"id": "bad", "prompt": "something forbidden"}])
    assert result.exit_code == 1
    record = items["bad"]
    assert record["status"] == "failed" and record["attempts"] == 1
    assert record["error"]["kind"] == "permanent" and record["error"]["status"] == 400
    assert record["error"]["code"] in ("content_policy_violation", "400")  # "400": LiteLLM dropped the code


def test_429s_through_litellm_are_retried_and_nothing_is_paid_twice(tmp_path, proxy):
    url, sims = proxy
    prompts = [{"id": f"r{k}", "prompt": f"rate limited {k}"} for k in range(4)]
    result, _out, _items = run(tmp_path, url, "img-limited", prompts, concurrency=4,
                             retry=RetryPolicy(max_attempts=8, base=0.2, cap=2.0), max_attempts=8)
    assert result.exit_code == 0 and result.summary["done"] == 4
    stats = sims["img-limited"].stats()
    assert stats["duplicates"] == 0 and stats["images"] == 4
    assert stats["rate_limited"] >= 1  # the limit was hit, and the 429s came through as transient


def test_5xx_through_litellm_is_transient_and_fails_after_max_attempts(tmp_path, proxy):
    url, sims = proxy
    before = sims["img-broken"].stats()["requests"]
    result, _out, items = run(tmp_path, url, "img-broken", [{"id": "x", "prompt": "always broken"}])
    record = items["x"]
    assert result.exit_code == 1 and record["status"] == "failed"
    assert record["error"]["kind"] == "transient" and record["error"]["status"] >= 500
    assert record["attempts"] == FAST_RETRY.max_attempts
    assert sims["img-broken"].stats()["requests"] - before >= FAST_RETRY.max_attempts


def test_an_upstream_401_through_litellm_stops_the_run(tmp_path, proxy):
    url, _ = proxy
    prompts = [{"id": f"k{k}", "prompt": f"bad upstream key {k}"} for k in range(3)]
    result, _out, _items = run(tmp_path, url, "img-badkey", prompts, concurrency=1)
    assert result.exit_code == 4 and result.summary["done"] == 0 and result.summary["pending"] == 3
    assert result.error is not None and result.error.get("status") == 401


def test_a_wrong_proxy_key_fails_without_reaching_the_provider(tmp_path, proxy):
    """A key the proxy does not know. LiteLLM without a database (as here) answers it with a 400
    `code: "400"` ("No connected db."), not a 401, so batcher can only fail each item
    permanently; with a database it answers 401 and the run stops (exit 4). Either way nothing
    reaches the provider, and nothing is saved."""
    url, sims = proxy
    before = sims["img"].stats()["requests"]
    result, _out, items = run(tmp_path, url, "img", ["a calm lake", "a koi"], api_key="sk-wrong-proxy-key",
                             concurrency=1)
    assert sims["img"].stats()["requests"] == before
    assert result.summary["done"] == 0
    if result.exit_code == 4:
        assert result.error is not None and result.error.get("status") == 401
    else:
        assert result.exit_code == 1 and result.summary["failed"] == 2
        assert all(r["error"]["kind"] == "permanent" and r["error"]["status"] == 400 for r in items.values())


def _batch_run(tmp_path: Path, url: str, model: str, prompts: list) -> tuple:
    """`run --batch` through the proxy, its Files + Batches calls routed to `model`'s deployment by LiteLLM's
    `x-litellm-model` header (model-based routing: LiteLLM encodes the model into the ids it hands out)."""
    job = write_job(tmp_path / "job.yaml", prompts, defaults={"model": model, "size": "16x16"},
                    endpoints=[{"name": "proxy", "base_url": f"{url}/v1", "api_key_env": "LITELLM_TEST_KEY",
                                "headers": {"x-litellm-model": {"env": "LITELLM_TEST_MODEL"}},
                                "batch": {"poll": 0.2}}])
    out = tmp_path / "out"
    os.environ.update(LITELLM_TEST_KEY=KEY, LITELLM_TEST_MODEL=model)
    try:
        result = run_sync(load_job(job), RunOptions(out=str(out), timeout=30, batch=True, max_attempts=1))
    finally:
        del os.environ["LITELLM_TEST_KEY"], os.environ["LITELLM_TEST_MODEL"]
    return result, out, {r["id"]: r for r in json.loads((out / "manifest.json").read_text())["items"]}


def test_batch_mode_through_litellm_files_and_batches(tmp_path, proxy):
    """`batcher run --batch` through LiteLLM's /v1/files and /v1/batches (routed by `files_settings` to a
    simulator's batch endpoints): upload, create, poll, results, deletes all pass through; a policy error line
    fails its item with the provider's code (the error file is passed through as it is, unlike a sync 400)."""
    url, sims = proxy
    sim = sims["img-batch"]
    before = sim.stats()["batch"]
    prompts = [{"id": f"b{k}", "prompt": f"batched through the proxy {k}"} for k in range(4)]
    prompts.append({"id": "bad", "prompt": "something forbidden, batched"})
    result, out, items = _batch_run(tmp_path, url, "img-batch", prompts)
    assert result.exit_code == 1 and result.summary == {"total": 5, "done": 4, "failed": 1, "pending": 0}
    for k in range(4):
        record = items[f"b{k}"]
        assert record["batch"] and all(whole_png((out / i["file"]).read_bytes()) for i in record["images"])
    assert items["bad"]["error"]["kind"] == "permanent" and items["bad"]["error"]["code"] == "content_policy_violation"
    stats = sim.stats()["batch"]
    assert stats["batches_created"] - before["batches_created"] == 1 and stats["duplicates"] == 0
    assert sorted(stats["images"][k] for k in stats["images"] if k not in before["images"]) == [1] * 4
    assert list(sim.simulator.batches.files) == []  # input, output and error files deleted through the proxy
    assert KEY not in (out / "manifest.jsonl").read_text()


def test_a_batch_litellm_makes_again_when_the_create_answers_500_is_cancelled(tmp_path, proxy):
    """A hazard of LiteLLM (1.108), pinned here: its Files + Batches pass-through calls the provider with the
    openai SDK's own retries (2), which neither `num_retries` nor a deployment's `max_retries` reaches. An upload
    or a create that answers 500 after the provider made it is made again by LiteLLM; batcher sees one 200 and
    journals one batch. The other would run (and be paid) too: batcher lists the batches tagged with the chunk
    after its create and cancels any it did not journal."""
    url, sims = proxy
    sim = sims["img-batch-faults"]
    result, out, items = _batch_run(tmp_path, url, "img-batch-faults", [f"made again {k}" for k in range(3)])
    assert result.exit_code == 0 and result.summary["done"] == 3, result
    assert all(r["attempts"] == 1 for r in items.values())
    journal = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    kept = {r["batch_id"] for r in journal if r["t"] == "batch"}
    assert len(kept) == 1  # batcher made (and knows of) one
    stats = sim.stats()["batch"]
    # the provider got the upload and the create twice each (LiteLLM's retries)
    assert (stats["uploads"], stats["creates"]) == (2, 2) and stats["batches_created"] == 2
    statuses = sorted(b.status for b in sim.simulator.batches.batches.values())
    # the twin was cancelled (what it ran before the cancel landed is all it cost), the kept one completed
    assert statuses[0] in ("cancelled", "cancelling") and statuses[1] == "completed", statuses
    assert stats["duplicates"] < 3


def test_a_given_limit_through_litellm_sends_its_first_window_on_connections_opened_before_it(
        tmp_path, proxy, connections_opened):
    # uvicorn (the proxy's server) takes the idle connections the run opens before its first window
    # and serves the requests that come on them; every request is stamped on the wire and done once
    url, sims = proxy
    before = sims["img"].stats()["requests"]
    prompts = [{"id": f"w{k}", "prompt": f"a first window through the proxy {k}"} for k in range(12)]
    result, out, items = run(tmp_path, url, "img", prompts, concurrency=8, rpm=600)
    assert result.summary == {"total": 12, "done": 12, "failed": 0, "pending": 0}
    assert connections_opened == [(8, 8)]  # the first window's 10, as many as the concurrency: all opened
    assert sims["img"].stats()["requests"] - before == 12 and all(r["attempts"] == 1 for r in items.values())
