"""Issue 15 (answers read wrong, requests): streamed answers, short answers, refusals in a 200,
keys echoed back, lost error reasons, a dead endpoint, the OPENAI_API_KEY fallback, extra headers,
gpt-image on the default dialect. Every server is the simulator on 127.0.0.1 with a fault mode."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest

from batcher._cli import main
from batcher._client import ImagesClient
from batcher._exceptions import PermanentError
from batcher._simulator import SimulatorConfig, start_in_thread

from helpers import KEY, by_id, write_job


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
    assert f"j.yaml:" in err and f"prompts[1].{field}" in err


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
    from batcher._job import Endpoint
    from batcher._runner import RunOptions, _key_names

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
