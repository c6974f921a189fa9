"""batcher against a mock derived from OpenAI's published spec (tests/spec_server.py, the SDK's types).

Each request batcher sends is validated against the spec's request type; each answer is one the
spec allows. The assertions are the outcomes the README promises: done / failed / pending, exit
codes, retries, and what the manifest records.

Fields batcher sends that the spec does not list: none of its own. With the default dialect
(`openai-compatible`) it sends `response_format: b64_json` by default, a field the spec lists but
calls legacy (rejected by the gpt-image models: issue 15 #19); anything else outside the spec is a
job's own pass-through field (here `seed`), sent as the job says.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path

import pytest

from batcher import RetryPolicy, RunOptions, load_job, run_sync

from helpers import KEY, run_cli, write_job
from hostile_server import whole_png
from spec_server import ERRORS, RETRY_AFTER_MS, SPEC_FIELDS, SpecServer

FAST_RETRY = RetryPolicy(max_attempts=3, base=0.01, cap=0.05)


def run(tmp_path: Path, server: SpecServer, prompts: list, *, defaults: dict | None = None,
        name: str = "out", **options):
    job = write_job(tmp_path / f"{name}.yaml", prompts, defaults=defaults or {"size": "16x16"}, **options.pop("top", {}))
    out = tmp_path / name
    opts = dict(out=str(out), base_url=server.base_url, api_key=KEY, timeout=10, retry=FAST_RETRY,
                max_attempts=FAST_RETRY.max_attempts)
    opts.update(options)
    result = run_sync(load_job(job), RunOptions(**opts))
    doc = json.loads((out / "manifest.json").read_text())
    return result, out, {r["id"]: r for r in doc["items"]}


def assert_conforming(server: SpecServer, allowed_unknown: set[str] = frozenset()) -> None:
    assert server.requests, "no request reached the server"
    for seen in server.requests:
        assert seen.problems == [], (seen.body, seen.problems)
        assert seen.unknown <= allowed_unknown, f"batcher sent fields the spec does not list: {seen.unknown}"
        assert seen.headers.get("authorization") == f"Bearer {KEY}"
    assert server.self_check_failures == [] and server.errors == []


@pytest.mark.parametrize("dialect", ["openai-compatible", "openai"])
def test_every_request_conforms_to_the_spec(tmp_path, dialect):
    prompts = [
        "A calm lake at dawn",
        {"id": "full", "prompt": "Two foxes in the snow", "n": 2, "quality": "low", "background": "opaque",
         "output_format": "png", "moderation": "low", "output_compression": 100, "user": "user-1234"},
        {"id": "auto", "prompt": "A lighthouse", "size": "auto", "quality": "auto"},
        {"id": "passthrough", "prompt": "A koi", "seed": 7},  # a gateway's own field, not the spec's
    ]
    with SpecServer() as server:
        result, _out, _items = run(tmp_path, server, prompts, top={"endpoint": {"dialect": dialect}},
                                 defaults={"model": "gpt-image-2", "size": "16x16"})
    assert result.exit_code == 0 and result.summary["done"] == 4
    assert_conforming(server, allowed_unknown={"seed"})
    assert {f for seen in server.requests for f in seen.unknown} == {"seed"}  # passed through as the job says
    sent = {seen.body["prompt"]: seen.body for seen in server.requests}
    assert sent["Two foxes in the snow"]["n"] == 2 and sent["A koi"]["seed"] == 7
    if dialect == "openai":  # gpt-image models reject the legacy field: the openai dialect never sends it
        assert all("response_format" not in seen.body for seen in server.requests)
    else:
        assert all(seen.body["response_format"] == "b64_json" for seen in server.requests)
    assert SPEC_FIELDS >= {"prompt", "model", "n", "size", "quality", "response_format", "background"}


def test_requests_say_they_accept_json(tmp_path):
    with SpecServer() as server:
        run(tmp_path, server, ["A koi"])
    assert all(s.headers.get("accept", "").startswith("application/json") for s in server.requests)


def test_every_answer_shape_the_spec_allows_is_saved_and_recorded(tmp_path):
    prompts = [{"id": f"b{k}", "prompt": f"Image number {k}"} for k in range(6)]
    prompts += [{"id": f"u{k}", "prompt": f"URL image {k}", "response_format": "url"} for k in range(3)]
    prompts += [{"id": "pair", "prompt": "A pair of images", "n": 2}]
    with SpecServer() as server:
        result, out, items = run(tmp_path, server, prompts, concurrency=1)
    assert_conforming(server)
    assert result.exit_code == 0 and result.summary == {"total": 10, "done": 10, "failed": 0, "pending": 0}
    assert server.answered("ok-url") == 3 and server.answered("ok") == 7
    revised = usage = 0
    for record in items.values():
        assert record["status"] == "done" and record["attempts"] == 1 and record["error"] is None
        assert record["request_id"].startswith("req_")
        for image in record["images"]:
            data = (out / image["file"]).read_bytes()
            assert whole_png(data) and image["sha256"] == hashlib.sha256(data).hexdigest()
            assert (image["width"], image["height"]) == (16, 16) and image["bytes"] == len(data)
            # recorded when the answer has it, null when it has not: never invented
            assert image["revised_prompt"] in (None, f"A detailed rendering of: {record['request']['prompt']}")
            revised += image["revised_prompt"] is not None
        if record.get("usage") is not None:
            assert record["usage"]["total_tokens"] == 284
            assert record["usage"]["output_tokens_details"] == {"image_tokens": 272, "text_tokens": 0}
            usage += 1
    assert revised >= 3 and usage >= 3  # the rotation gave each shape several times
    assert len(items["pair"]["images"]) == 2


# (script for the item, expected status, attempts, error kind, status, code)
PERMANENT = {
    "invalid_param": (400, "invalid_value"),
    "content_policy": (400, "content_policy_violation"),
    "moderation_blocked": (400, "moderation_blocked"),
    "not_found": (404, "model_not_found"),
}


@pytest.mark.parametrize("answer", sorted(PERMANENT))
def test_a_permanent_error_fails_the_item_once(tmp_path, answer):
    status, code = PERMANENT[answer]
    with SpecServer(script={"doomed": [answer]}) as server:
        result, out, items = run(tmp_path, server, ["A calm lake", {"id": "doomed", "prompt": "A doomed item"}])
        assert result.exit_code == 1 and result.summary == {"total": 2, "done": 1, "failed": 1, "pending": 0}
        record = items["doomed"]
        assert record["status"] == "failed" and record["attempts"] == 1 and record["images"] in ([], None)
        assert {k: record["error"][k] for k in ("kind", "status", "code")} == \
            {"kind": "permanent", "status": status, "code": code}
        assert server.answered(answer) == 1
        # a rerun does not pay again; --retry-failed does, once
        before = len(server.requests)
        again = run_sync(load_job(tmp_path / "out.yaml"), RunOptions(out=str(out), base_url=server.base_url,
                                                                      api_key=KEY, timeout=10, retry=FAST_RETRY))
        assert again.exit_code == 1 and len(server.requests) == before
    assert_conforming(server)


@pytest.mark.parametrize("answer", ["unauthorized", "forbidden", "insufficient_quota"])
def test_a_fatal_error_stops_the_run_and_leaves_items_pending(tmp_path, answer):
    status, error, _ = ERRORS[answer]
    prompts = [{"id": f"i{k}", "prompt": f"fatal {k}"} for k in range(5)]
    with SpecServer(script={"fatal": [answer] * 5}) as server:
        result, _out, _items = run(tmp_path, server, prompts, concurrency=1)
    assert_conforming(server)
    assert result.exit_code == 4
    assert result.summary["done"] == 0 and result.summary["pending"] == 5, result.summary
    assert len(server.requests) == 1  # no new request after a fatal answer
    assert result.error is not None and result.error.get("status") == status
    assert result.error.get("code") == error["code"]


@pytest.mark.parametrize("answer", ["rate_limited", "server_error", "unavailable"])
def test_a_transient_error_is_retried_and_the_item_done(tmp_path, answer):
    with SpecServer(script={"flaky": [answer]}) as server:
        started = time.monotonic()
        result, _out, items = run(tmp_path, server, [{"id": "flaky", "prompt": "A flaky item"}])
    assert_conforming(server)
    assert result.exit_code == 0 and items["flaky"]["status"] == "done" and items["flaky"]["attempts"] == 2
    assert [s.answer for s in server.requests] == [answer, "ok"]
    if answer == "rate_limited":
        assert result.rate_limited == 1
        # the retry waited at least what retry-after-ms asked (a lower bound: no load makes it flaky)
        assert time.monotonic() - started >= RETRY_AFTER_MS / 1000


def test_a_transient_error_that_persists_fails_the_item_after_max_attempts(tmp_path):
    with SpecServer(script={"broken": ["server_error"] * 10}) as server:
        result, _out, items = run(tmp_path, server, ["A calm lake", {"id": "broken", "prompt": "A broken item"}])
    assert_conforming(server)
    record = items["broken"]
    assert result.exit_code == 1 and record["status"] == "failed" and record["attempts"] == FAST_RETRY.max_attempts
    assert {k: record["error"][k] for k in ("kind", "status")} == {"kind": "transient", "status": 500}
    assert server.answered("server_error") == FAST_RETRY.max_attempts


def test_too_many_policy_rejections_stop_the_run(tmp_path):
    prompts = [{"id": f"p{k}", "prompt": f"refused {k}"} for k in range(6)]
    with SpecServer(script={"refused": ["moderation_blocked"] * 6}) as server:
        result, _out, _items = run(tmp_path, server, prompts, concurrency=1, max_policy_violations=2)
    assert_conforming(server)
    assert result.exit_code == 4
    assert server.answered("moderation_blocked") <= 3  # stopped once past the limit, not after all six
    assert result.summary["pending"] >= 3


def test_the_cli_exit_code_and_manifest_against_the_spec_server(tmp_path):
    """The CLI in a subprocess: a done item and a permanent failure give exit 1 and a complete manifest."""
    job = write_job(tmp_path / "job.yaml", ["A calm lake", {"id": "bad", "prompt": "bad size"}],
                    defaults={"size": "16x16"})
    out = tmp_path / "out"
    with SpecServer(script={"bad size": ["invalid_param"]}) as server:
        proc = run_cli(["run", str(job), "--out", str(out), "--base-url", server.base_url, "--quiet",
                        "--timeout", "10"], timeout=60)
        status = run_cli(["status", str(out), "--json"], timeout=60)
    assert_conforming(server)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    doc = json.loads((out / "manifest.json").read_text())
    assert doc["summary"] == {"total": 2, "done": 1, "failed": 1, "pending": 0}
    assert status.returncode == 0 and "invalid_value" in status.stdout
    assert KEY not in proc.stderr + proc.stdout + (out / "manifest.jsonl").read_text()


def test_the_spec_server_answers_what_the_sdk_itself_accepts():
    """The mock is honest: the official SDK, pointed at it, reads its answers and raises its errors."""
    import openai

    with SpecServer(script={"limited": ["rate_limited"], "quota": ["insufficient_quota"]}) as server:
        client = openai.OpenAI(api_key=KEY, base_url=server.base_url, max_retries=0, timeout=10)
        answer = client.images.generate(model="gpt-image-2", prompt="A koi", size="16x16")
        assert whole_png(base64.b64decode(answer.data[0].b64_json))
        with pytest.raises(openai.RateLimitError) as caught:
            client.images.generate(model="gpt-image-2", prompt="limited", size="16x16")
        assert caught.value.code == "rate_limit_exceeded"
        with pytest.raises(openai.RateLimitError) as caught:
            client.images.generate(model="gpt-image-2", prompt="quota", size="16x16")
        assert caught.value.code == "insufficient_quota"
    assert_conforming(server)
