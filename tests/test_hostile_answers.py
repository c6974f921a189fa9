"""Issue 15 (answers read wrong, requests): streamed answers, short answers, refusals in a 200,
keys echoed back, lost error reasons, a dead endpoint, the OPENAI_API_KEY fallback, extra headers,
gpt-image on the default dialect. Every server is the simulator on 127.0.0.1 with a fault mode."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest
from helpers import KEY, by_id, write_job

from batcher._cli import main
from batcher._client import ImagesClient
from batcher._exceptions import PermanentError
from batcher._simulator import SimulatorConfig, start_in_thread


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv("BATCHER_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("BATCHER_BASE_URL", raising=False)


def cli(*args: object) -> int:
    return main([str(a) for a in args])


def run(job: Path, out: Path, base_url: str, *extra: object) -> int:
    return cli("run", job, "--out", out, "--base-url", base_url, "--quiet", "--timeout", "10", *extra)


def journal(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


# -- #8 stream ------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [("stream", True), ("partial_images", 2)])
def test_streaming_is_refused_at_validation_naming_file_and_line(tmp_path, capsys, field, value):
    job = write_job(tmp_path / "j.yaml", ["fine", {"prompt": "p", field: value}])
    assert cli("validate", job) == 2
    err = capsys.readouterr().err
    assert "j.yaml:" in err and f"prompts[1].{field}" in err


def test_stream_set_on_the_command_line_is_refused_and_nothing_is_sent(tmp_path, capsys):
    job = write_job(tmp_path / "j.yaml", ["fine"])
    with start_in_thread(SimulatorConfig()) as sim:
        assert run(job, tmp_path / "out", sim.base_url, "--set", "stream=true") == 2
        assert sim.stats()["requests"] == 0
    assert "stream" in capsys.readouterr().err


def test_a_streamed_answer_is_permanent_and_never_sent_again():
    async def go(base_url: str) -> PermanentError:
        async with ImagesClient(base_url, KEY) as client:
            with pytest.raises(PermanentError) as info:
                await client.generate({"model": "m", "prompt": "p", "stream": True})
        return info.value

    with start_in_thread(SimulatorConfig()) as sim:
        err = anyio.run(go, sim.base_url)
        assert sim.stats()["requests"] == 1
    assert err.code == "streamed_answer" and err.status == 200


# -- #17 OPENAI_API_KEY only for api.openai.com ------------------------------------------------


def test_openai_key_is_not_sent_to_another_host(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("BATCHER_API_KEY")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai-only")
    job = write_job(tmp_path / "j.yaml", ["x"])
    with start_in_thread(SimulatorConfig()) as sim:
        assert run(job, tmp_path / "out", sim.base_url) == 2
        assert sim.stats()["requests"] == 0
    err = capsys.readouterr().err
    assert "BATCHER_API_KEY" in err and "only for api.openai.com" in err


def test_openai_key_is_the_fallback_for_openai_itself():
    from batcher._endpoints import _key_names
    from batcher._job import Endpoint
    from batcher._runner import RunOptions

    assert _key_names(Endpoint(), RunOptions(), "https://api.openai.com/v1") == ["BATCHER_API_KEY", "OPENAI_API_KEY"]
    assert _key_names(Endpoint(), RunOptions(), "https://api.openai.com.evil.example/v1") == ["BATCHER_API_KEY"]
    assert _key_names(Endpoint(api_key_env="MY_KEY"), RunOptions(), "https://api.openai.com/v1") == ["MY_KEY"]


# -- #18 Accept and the endpoint's own headers ----------------------------------------------------


def test_accept_json_and_endpoint_headers_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_ORG_ID", "org-123")
    with start_in_thread(SimulatorConfig()) as sim:
        job = write_job(tmp_path / "j.yaml", ["x"], defaults={"size": "16x16"},
                        endpoint={"base_url": sim.base_url,
                                  "headers": {"OpenAI-Organization": {"env": "TEST_ORG_ID"}}})
        assert cli("run", job, "--out", tmp_path / "out", "--quiet") == 0
        seen = sim.stats()["last_headers"]
    assert seen["accept"] == "application/json"
    assert seen["openai-organization"] == "org-123"
    assert "org-123" not in (tmp_path / "out" / "manifest.jsonl").read_text()


def test_endpoint_header_with_an_unset_variable_sends_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TEST_ORG_ID", raising=False)
    with start_in_thread(SimulatorConfig()) as sim:
        job = write_job(tmp_path / "j.yaml", ["x"], endpoint={
            "base_url": sim.base_url, "headers": {"OpenAI-Project": {"env": "TEST_ORG_ID"}}})
        assert cli("run", job, "--out", tmp_path / "out", "--quiet") == 2
        assert sim.stats()["requests"] == 0
    assert "TEST_ORG_ID" in capsys.readouterr().err


@pytest.mark.parametrize("headers, words", [
    ({"OpenAI-Organization": "org-literal"}, "{env: VARIABLE}"),
    ({"Authorization": {"env": "X"}}, "set by batcher"),
    ({"bad header": {"env": "X"}}, "not an HTTP header name"),
    ({"X-Gw": {"env": "1BAD"}}, "{env: VARIABLE}"),
])
def test_endpoint_headers_never_hold_literal_values(tmp_path, capsys, headers, words):
    job = write_job(tmp_path / "j.yaml", ["x"], endpoint={"base_url": "http://127.0.0.1:9", "headers": headers})
    assert cli("validate", job) == 2
    err = capsys.readouterr().err
    assert "endpoint.headers" in err and words in err
    assert "org-literal" not in err


# -- #19 gpt-image on the default dialect ---------------------------------------------------------


def test_gpt_image_on_the_default_dialect_warns_and_suggests_dialect_openai(tmp_path, capsys):
    job = write_job(tmp_path / "j.yaml", ["a", "b"], defaults={"model": "gpt-image-1"},
                    endpoint={"base_url": "https://gateway.example/v1"})
    assert cli("validate", job) == 0
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and "dialect: openai" in err and "response_format" in err


def test_gpt_image_on_openai_itself_with_the_default_dialect_is_an_error(tmp_path, capsys):
    job = write_job(tmp_path / "j.yaml", ["a", "b"], defaults={"model": "gpt-image-1"},
                    endpoint={"base_url": "https://api.openai.com/v1"})
    assert cli("validate", job) == 2
    assert "dialect: openai" in capsys.readouterr().err


def test_gpt_image_on_the_openai_dialect_is_fine(tmp_path, capsys):
    job = write_job(tmp_path / "j.yaml", ["a"], defaults={"model": "gpt-image-1"},
                    endpoint={"base_url": "https://api.openai.com/v1", "dialect": "openai"})
    assert cli("validate", job) == 0
    assert "warning" not in capsys.readouterr().err


# -- #10 a refusal inside a 200 ---------------------------------------------------------------


def test_policy_refusal_in_a_200_is_permanent_and_counts_toward_the_limit(tmp_path):
    prompts = [f"forbidden {i}" for i in range(4)] + ["fine"]
    job = write_job(tmp_path / "j.yaml", prompts, defaults={"size": "16x16"}, concurrency=1)
    out = tmp_path / "out"
    with start_in_thread(SimulatorConfig(answer_fault="policy-200")) as sim:
        assert run(job, out, sim.base_url, "--max-policy-violations", "2") == 4
        requests = sim.stats()["requests"]
    assert requests == 2  # one request per refused item, the run stops at the limit
    failed = [r for r in by_id(out).values() if r["status"] == "failed"]
    assert len(failed) == 2
    assert all(r["error"]["code"] == "content_policy_violation" and r["attempts"] == 1 for r in failed)


@pytest.mark.parametrize("entry", [
    {"b64_json": None, "finish_reason": "content_filter"},
    {"url": None, "content_filter_results": {"sexual": {"filtered": True, "severity": "high"}}},
])
def test_refusal_fields_of_a_200_are_read_as_a_policy_refusal(entry):
    from batcher._policy import answer_refusal

    err = answer_refusal({"data": [entry]}, {})
    assert err is not None and err.kind == "permanent" and err.code == "content_policy_violation"
    assert answer_refusal({"data": [{"b64_json": "aGk=", "content_filter_results": {
        "violence": {"filtered": False}}}]}, {}) is None


def test_azure_content_filter_is_a_policy_refusal():
    from batcher._policy import POLICY_CODES, classify

    body = {"error": {"code": "content_policy_violation", "message": "blocked",
                      "innererror": {"code": "ResponsibleAIPolicyViolation"}}}
    assert classify(400, {}, json.dumps(body).encode()).code in POLICY_CODES
    err = classify(200, {}, json.dumps({"error": {"code": "contentFilter", "message": "x"}}).encode())
    assert err.kind == "permanent" and err.code in POLICY_CODES


# -- #14 error reasons --------------------------------------------------------------------------


@pytest.mark.parametrize("fault, reason", [
    ("prism-422", "body.quality: Request body property quality must be equal to one of the allowed values"),
    ("fastapi-422", "body.quality: Input should be 'standard' or 'hd'"),
])
def test_validation_details_are_kept_and_logged_without_none(tmp_path, capsys, fault, reason):
    job = write_job(tmp_path / "j.yaml", ["a", "b"], defaults={"size": "16x16"})
    out = tmp_path / "out"
    with start_in_thread(SimulatorConfig(answer_fault=fault)) as sim:
        assert run(job, out, sim.base_url, "--log-file", tmp_path / "log") == 1
    for record in by_id(out).values():
        assert record["status"] == "failed" and reason in record["error"]["message"]
    log = (tmp_path / "log").read_text() + capsys.readouterr().err
    assert "HTTP 422: " in log and "None" not in log and reason in log
    capsys.readouterr()
    assert cli("status", out, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    group = info["failures"]["http_422"]
    assert group["count"] == 2 and len(group["reasons"]) == 1
    assert next(iter(group["reasons"])).startswith(reason[:70])


def test_status_groups_one_code_by_its_reasons(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    recs = [{"t": "item", "id": f"i{k}", "rhash": "h", "status": "failed", "images": [],
             "error": {"kind": "permanent", "status": 422, "code": None, "message": msg}}
            for k, msg in enumerate(["body.n: too big", "body.n: too big", "body.quality: bad"])]
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert cli("status", out) == 0
    text = capsys.readouterr().out
    assert "failed http_422: 3" in text and "2 × body.n: too big" in text and "1 × body.quality: bad" in text


def test_describe_leaves_out_what_is_unknown():
    from batcher._exceptions import PermanentError, TransientError

    assert PermanentError("bad", status=422).describe() == "HTTP 422: bad"
    assert PermanentError("bad", status=400, code="invalid_value").describe() == "HTTP 400 invalid_value: bad"
    assert TransientError("slow", code="timeout").describe() == "timeout: slow"


def test_a_failed_download_names_the_host(tmp_path):
    from batcher._exceptions import TransientError

    async def go() -> TransientError:
        async with ImagesClient("http://127.0.0.1:9/v1", KEY) as client:
            with pytest.raises(TransientError) as info:
                await client.download("http://127.0.0.1:9/img.png", tmp_path / "x", attempts=1)
        return info.value

    assert "from 127.0.0.1 failed" in anyio.run(go).message


# -- #12 keys echoed back ------------------------------------------------------------------------


def test_a_key_echoed_by_the_server_is_written_nowhere(tmp_path, capsys):
    job = write_job(tmp_path / "j.yaml", ["a", "b"], defaults={"size": "16x16"})
    out = tmp_path / "out"
    with start_in_thread(SimulatorConfig(answer_fault="echo-key")) as sim:
        assert cli("run", job, "--out", out, "--base-url", sim.base_url, "--timeout", "10", "--json",
                   "--log-file", tmp_path / "log") == 1
    shown = capsys.readouterr()
    written = [(out / "manifest.jsonl").read_text(), (out / "manifest.json").read_text(),
               (tmp_path / "log").read_text(), shown.out, shown.err]
    assert not any(KEY in text for text in written)
    assert all(r["error"]["message"].endswith("for key [redacted]") for r in by_id(out).values())
    assert "[redacted]" in (tmp_path / "log").read_text()


def test_redactor_masks_json_escaped_and_longest_first():
    from batcher._redact import Redactor

    redact = Redactor.of(["abc/def\"ghi", "sk-123456789", "sk-123456789-long", "short", None])
    assert redact('{"m":"abc/def\\"ghi"}') == '{"m":"[redacted]"}'
    assert redact("k=sk-123456789-long and sk-123456789") == "k=[redacted] and [redacted]"
    assert redact("short stays") == "short stays"


# -- #15 a server answering 500 forever -----------------------------------------------------------


def test_a_dead_endpoint_is_given_up_after_its_probes_fail(tmp_path):
    import io

    from batcher import RunOptions, load_job, run_sync
    from batcher._policy import RetryPolicy
    from batcher._report import Reporter
    from batcher._route import BreakerPolicy

    job = write_job(tmp_path / "j.yaml", [f"p{i}" for i in range(10)], defaults={"size": "16x16"}, concurrency=2)
    log = io.StringIO()
    breaker = BreakerPolicy(failures=2, cooldown=0.01, max_cooldown=0.02, max_failed_probes=3)
    with start_in_thread(SimulatorConfig(fail_rate=1.0)) as sim:
        result = run_sync(load_job(job), RunOptions(
            out=str(tmp_path / "out"), base_url=sim.base_url, api_key=KEY, timeout=10, breaker=breaker,
            retry=RetryPolicy(max_attempts=50, base=0.001, cap=0.005)), Reporter(stream=log, tty=False))
        requests = sim.stats()["requests"]
    assert result.exit_code == 4 and result.error["code"] == "endpoint_dead"
    assert requests <= 2 + 2 + 3  # the failures that open it, those in flight, then 3 probes
    assert result.summary["pending"] == 10  # not the items' fault: none burned its attempts
    lines = [line for line in log.getvalue().splitlines() if "given up" in line]
    assert len(lines) == 1 and "3 probes in a row failed" in lines[0] and "HTTP 5" in lines[0]


def test_breaker_counts_failed_probes_and_a_success_forgives(clock):
    from batcher._route import BreakerPolicy, CircuitBreaker

    b = CircuitBreaker(BreakerPolicy(failures=1, cooldown=1.0, max_cooldown=1.0, max_failed_probes=2), clock=clock)
    assert b.on_trouble() and not b.dead
    clock.now += 1.0
    assert b.wait_time() == 0.0 and b.on_trouble() and not b.dead  # probe 1 failed
    clock.now += 1.0
    b.wait_time()
    b.on_success()
    assert b.failed_probes == 0 and b.troubled_for() == 0.0
    assert b.on_trouble()
    for _ in range(2):
        clock.now += 1.0
        b.wait_time()
        b.on_trouble()
    assert b.dead and b.troubled_for() == 2.0


# -- #9 fewer images than n -------------------------------------------------------------------------


def test_a_short_answer_is_kept_and_a_rerun_asks_only_for_the_missing_images(tmp_path, capsys):
    import hashlib

    job = write_job(tmp_path / "j.yaml", [{"id": "x", "prompt": "four foxes", "n": 4}, "one"],
                    defaults={"size": "16x16"})
    out = tmp_path / "out"
    with start_in_thread(SimulatorConfig(answer_fault="short")) as sim:
        assert run(job, out, sim.base_url) == 1  # asked 4, got 2
        x = by_id(out)["x"]
        assert x["status"] == "failed" and x["error"]["code"] == "short_answer" and x["short"] == {"wanted": 4, "got": 2}
        assert [i["file"] for i in x["images"]] == ["images/x_1.png", "images/x_2.png"]
        capsys.readouterr()
        assert cli("status", out, "--json") == 0
        assert json.loads(capsys.readouterr().out)["failures"]["short_answer"]["count"] == 1
        # export: a short item is a failed row (with --include-failed) until a rerun completes it
        assert cli("export", out, "--format", "imagefolder", "--to", tmp_path / "ds", "--include-failed") == 0
        rows = [json.loads(line) for line in (tmp_path / "ds" / "failed.jsonl").read_text().splitlines()]
        assert [(r["id"], r["error_code"]) for r in rows] == [("x", "short_answer")]

        assert run(job, out, sim.base_url) == 1  # asked 2 (not 4), got 1: 3 of 4
        x = by_id(out)["x"]
        assert x["short"] == {"wanted": 4, "got": 3}
        assert run(job, out, sim.base_url) == 0  # asked 1, got 1
        assert sim.stats()["images"] == 2 + 1 + 1 + 1  # "one" once; nothing paid twice
    x = by_id(out)["x"]
    assert x["status"] == "done" and x["error"] is None and "short" not in x
    assert [i["file"] for i in x["images"]] == [f"images/x_{k}.png" for k in range(1, 5)]
    for image in x["images"]:
        assert hashlib.sha256((out / image["file"]).read_bytes()).hexdigest() == image["sha256"]
    assert len(list((out / "images").iterdir())) == 5


def test_every_answer_fault_can_be_played_from_the_command_line(tmp_path):
    from batcher._cli import _ANSWER_FAULTS
    from batcher._simulator import ANSWER_FAULTS

    assert _ANSWER_FAULTS == ANSWER_FAULTS
    job = write_job(tmp_path / "j.yaml", [{"prompt": "p", "n": 2}], defaults={"size": "16x16"})
    assert cli("run", job, "--out", tmp_path / "out", "--simulate", "--sim-answer-fault", "short",
               "--sim-latency-ms", "0", "--quiet") == 1
    assert next(iter(by_id(tmp_path / "out").values()))["short"] == {"wanted": 2, "got": 1}


def test_the_journal_masks_a_key_anywhere_in_a_record_and_in_its_mirror(tmp_path):
    from batcher._manifest import Journal
    from batcher._redact import Redactor

    journal = Journal.open(tmp_path / "manifest.jsonl")
    mirrored: list[dict] = []
    journal.mirror = mirrored.append
    journal.redact = Redactor.of([KEY])
    journal.append({"t": "item", "id": "a", "rhash": "h", "status": "done",
                    "images": [{"revised_prompt": f"as asked by {KEY}"}], "usage": {"note": KEY}})
    journal.close()
    text = (tmp_path / "manifest.jsonl").read_text()
    assert KEY not in text and text.count("[redacted]") == 2
    assert KEY not in json.dumps(mirrored) and mirrored[0]["usage"] == {"note": "[redacted]"}


def test_a_resting_endpoint_waits_through_due_retries_without_spinning():
    import anyio.lowlevel

    from batcher._job import Item
    from batcher._route import Dispatcher, Task

    async def go() -> None:
        dispatch = Dispatcher(["a"])
        dispatch.outstanding = 1
        dispatch.retry_later(Task(Item("i", {}, "h", "f", 1), frozenset({"a"})), 0.0)  # due at once
        returned: list[bool] = []

        async def waiter() -> None:
            await dispatch.wait("a", 600.0, False)
            returned.append(True)

        async with anyio.create_task_group() as tg:
            tg.start_soon(waiter)
            for _ in range(50):
                await anyio.lowlevel.checkpoint()
            assert not returned  # the due retry did not end the wait (it used to: a busy loop)
            dispatch._waiters["a"].wake_all()  # the run's end, or new work
        assert returned

    anyio.run(go)


def test_plan_counts_only_the_missing_images_of_a_short_item(tmp_path, capsys):
    job = write_job(tmp_path / "j.yaml", [{"id": "x", "prompt": "four foxes", "n": 4}], defaults={"size": "16x16"})
    out = tmp_path / "out"
    with start_in_thread(SimulatorConfig(answer_fault="short")) as sim:
        assert run(job, out, sim.base_url) == 1  # 2 of 4
    capsys.readouterr()
    assert cli("plan", job, "--out", out, "--json") == 0
    send = json.loads(capsys.readouterr().out)["send"]
    assert (send["requests"], send["images"]) == (1, 2)
