"""`batcher run --batch` end to end against a mock of OpenAI's Files + Batches APIs built from OpenAI's
published spec (tests/spec_batch_server.py), not from batcher's simulator.

Every request batcher sends is validated against the spec's types, every answer is one the spec
allows (checked before it is sent), and the outcomes are the ones docs/batch.md documents: a
policy 400 line fails its item, a 5xx line or a line that never ran goes into a later batch, a
failed batch's named lines fail and its others are sent again, a batch cancelled at the provider
leaves what it did not run pending (exit 4, `batch_cancelled`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from batcher._batch import chunks_of, run_records
from batcher._cli import main

from helpers import KEY, by_id, write_job
from hostile_server import whole_png
from spec_batch_server import SpecBatchServer

PROMPTS = [f"a small watercolour of a koi, number {i}" for i in range(6)]


@pytest.fixture(autouse=True)
def key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHER_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("BATCHER_BASE_URL", raising=False)


def _run(tmp: Path, server: SpecBatchServer, prompts: list[Any], *extra: object, max_requests: int = 50) -> int:
    job = write_job(tmp / "job.yaml", prompts, defaults={"model": "gpt-image-1", "size": "1024x1024",
                                                         "quality": "low"},
                    endpoints=[{"name": "openai", "base_url": server.base_url, "dialect": "openai",
                                "api_key_env": "BATCHER_API_KEY",
                                "batch": {"poll": 0.02, "max_requests": max_requests}}])
    return main(["run", str(job), "--out", str(tmp / "out"), "--batch", "--quiet", "--timeout", "10",
                 *map(str, extra)])


def _conforms(server: SpecBatchServer) -> None:
    assert server.problems == [], server.problems  # batcher sent nothing the spec rejects
    assert server.self_check_failures == []  # and the mock answered only as the spec allows
    assert server.errors == []


def _chunks(out: Path) -> list[Any]:
    return list(chunks_of(run_records(out / "manifest.jsonl")).values())


def _done_with_images(out: Path, items: dict[str, Any]) -> None:
    for record in items.values():
        if record["status"] == "done":
            assert record["images"] and all(whole_png((out / i["file"]).read_bytes()) for i in record["images"])


def test_a_completed_batch_with_error_lines(tmp_path: Path) -> None:
    """validating → in_progress → finalizing → completed; an output file and an error file with a policy 400
    (fails) and a 500 (sent again in a second batch, which completes); optional line fields absent on some."""
    prompts = [*PROMPTS, {"id": "bad", "prompt": "something forbidden"}, {"id": "flaky", "prompt": "flaky koi"}]
    with SpecBatchServer(lines={"forbidden": ["content_policy"], "flaky": ["server_error"]},
                         api_key=KEY) as server:
        code = _run(tmp_path, server, prompts)
    _conforms(server)
    out = tmp_path / "out"
    items = by_id(out)
    assert code == 1  # one item failed
    assert {i: r["status"] for i, r in items.items() if r["status"] != "done"} == {"bad": "failed"}
    assert items["bad"]["error"]["code"] == "content_policy_violation"
    assert items["bad"]["error"]["kind"] == "permanent" and items["bad"]["attempts"] == 1
    assert items["flaky"]["attempts"] == 2  # the 5xx line: into a later batch
    _done_with_images(out, items)
    chunks = _chunks(out)
    assert [c.closed for c in chunks] == ["completed", "completed"] and [c.requests for c in chunks] == [8, 1]
    assert sorted(server.generated.values()) == [1] * 7  # every done item generated once
    # the batch's input, output and error files were deleted once every line was recorded
    assert server.files == {}
    assert server.called("GET", "/v1/files") >= 2 and server.called("GET", "/v1/batches") >= 2
    assert KEY not in (out / "manifest.jsonl").read_text()


def test_an_expired_batch_keeps_what_ran_and_sends_the_rest_again(tmp_path: Path) -> None:
    with SpecBatchServer(plans=["expired", "completed"]) as server:
        code = _run(tmp_path, server, PROMPTS)
    _conforms(server)
    out = tmp_path / "out"
    assert code == 0
    items = by_id(out)
    assert all(r["status"] == "done" for r in items.values())
    _done_with_images(out, items)
    chunks = _chunks(out)
    assert [(c.closed, c.requests) for c in chunks] == [("expired", 6), ("completed", 3)]
    assert sorted(r["attempts"] for r in items.values()) == [1, 1, 1, 2, 2, 2]
    assert sorted(server.generated.values()) == [1] * 6


def test_an_expired_batch_at_the_last_attempt_fails_its_rest_with_batch_expired(tmp_path: Path) -> None:
    with SpecBatchServer(plans=["expired"]) as server:
        code = _run(tmp_path, server, PROMPTS, "--max-attempts", 1)
    _conforms(server)
    items = by_id(tmp_path / "out")
    assert code == 1
    failed = {i: r["error"] for i, r in items.items() if r["status"] == "failed"}
    assert len(failed) == 3 and {e["code"] for e in failed.values()} == {"batch_expired"}
    assert {e["kind"] for e in failed.values()} == {"transient"}


def test_a_batch_that_failed_validation_as_a_whole_is_sent_again(tmp_path: Path) -> None:
    """failed, `errors.data` with no line (a limit of the account), no output or error file: nothing ran."""
    with SpecBatchServer(plans=["failed", "completed"]) as server:
        code = _run(tmp_path, server, PROMPTS)
    _conforms(server)
    assert code == 0
    assert [(c.closed, c.requests) for c in _chunks(tmp_path / "out")] == [("failed", 6), ("completed", 6)]
    assert sorted(server.generated.values()) == [1] * 6


def test_a_batch_that_failed_on_a_line_fails_that_item_and_sends_the_others_again(tmp_path: Path) -> None:
    with SpecBatchServer(plans=["failed_lines", "completed"]) as server:
        code = _run(tmp_path, server, PROMPTS)
    _conforms(server)
    items = by_id(tmp_path / "out")
    assert code == 1
    second = list(items)[1]  # the input's line 2 is the job's second item
    assert {i for i, r in items.items() if r["status"] == "failed"} == {second}
    assert items[second]["error"]["code"] == "batch_validation"
    assert items[second]["error"]["kind"] == "permanent"
    assert [(c.closed, c.requests) for c in _chunks(tmp_path / "out")] == [("failed", 6), ("completed", 5)]


def test_every_line_failed_no_output_file(tmp_path: Path) -> None:
    """completed with `output_file_id: null`: every line is in the error file."""
    prompts = [{"id": f"bad{i}", "prompt": f"forbidden {i}"} for i in range(3)]
    with SpecBatchServer(lines={"forbidden": ["content_policy"] * 3}) as server:
        code = _run(tmp_path, server, prompts)
    _conforms(server)
    items = by_id(tmp_path / "out")
    assert code == 1
    assert {r["error"]["code"] for r in items.values()} == {"content_policy_violation"}
    assert all(r["status"] == "failed" and r["attempts"] == 1 for r in items.values())
    assert server.generated == {} and server.files == {}


@pytest.mark.parametrize("plan", ["cancelled", "cancelled_lines"])
def test_a_batch_cancelled_at_the_provider_leaves_the_rest_pending(tmp_path: Path, plan: str) -> None:
    """Cancelled elsewhere (the dashboard): what ran is kept; the rest, with `batch_cancelled` error lines or
    with no line at all, stays pending: exit 4, and the next run submits it."""
    with SpecBatchServer(plans=[plan]) as server:
        code = _run(tmp_path, server, PROMPTS)
        out = tmp_path / "out"
        manifest = json.loads((out / "manifest.json").read_text())
        assert code == 4 and manifest["summary"] == {"total": 6, "done": 3, "failed": 0, "pending": 3}
        again = _run(tmp_path, server, PROMPTS)
    _conforms(server)
    assert again == 0
    assert [(c.closed, c.requests) for c in _chunks(out)] == [("cancelled", 6), ("completed", 3)]
    assert sorted(server.generated.values()) == [1] * 6


def test_no_wait_then_cancel_then_collect(tmp_path: Path) -> None:
    """`--no-wait` (exit 5), `batcher cancel` (POST /batches/{id}/cancel, as the spec has it), then a run that
    collects the cancelled batch."""
    out = tmp_path / "out"
    with SpecBatchServer() as server:
        assert _run(tmp_path, server, PROMPTS, "--no-wait") == 5
        assert main(["cancel", str(out), "--json"]) == 0
        assert server.called("POST", "/v1/batches/") == 1
        code = _run(tmp_path, server, PROMPTS)
    _conforms(server)
    assert [c.closed for c in _chunks(out)] == ["cancelled"]
    # the lines it ran before the cancel are kept; the rest stay pending (exit 4), not sent again by this run
    assert code == 4
    assert json.loads((out / "manifest.json").read_text())["summary"] == {"total": 6, "done": 3, "failed": 0,
                                                                           "pending": 3}
    assert sorted(server.generated.values()) == [1] * 3


def test_the_mock_refuses_what_the_spec_refuses() -> None:
    """The mock is only worth its checks if they bite: requests outside the spec get a 400 and a problem."""
    import httpx2 as httpx

    with SpecBatchServer() as server, httpx.Client(base_url=server.base_url, timeout=10) as http:
        good = b'{"custom_id": "a", "method": "POST", "url": "/v1/images/generations", "body": {"prompt": "koi"}}\n'
        assert http.post("/files", files={"file": ("in.jsonl", good)}, data={"purpose": "batch"}).status_code == 200
        assert server.problems == []
        file_id = next(iter(server.files))
        refused = [
            http.post("/files", files={"file": ("in.jsonl", good)}, data={"purpose": "batches"}),
            http.post("/files", files={"file": ("in.jsonl", good.replace(b'"POST"', b'"GET"'))},
                      data={"purpose": "batch"}),
            http.post("/files", files={"file": ("in.jsonl", good.replace(b'"koi"', b'7'))}, data={"purpose": "batch"}),
            http.post("/batches", json={"input_file_id": file_id, "endpoint": "/v1/images/generations",
                                        "completion_window": "48h"}),
            http.post("/batches", json={"input_file_id": file_id, "endpoint": "/v1/images/generations",
                                        "completion_window": "24h", "metadata": {"k": "v" * 513}}),
            http.post("/batches", json={"input_file_id": file_id, "endpoint": "/v1/images/generations",
                                        "completion_window": "24h", "model": "gpt-image-1"}),
            http.get("/batches", params={"limit": 101}),
            http.get("/files", params={"order": "newest"}),
        ]
        assert [r.status_code for r in refused] == [400] * len(refused)
        assert len(server.problems) >= len(refused), server.problems
        assert all(r.json()["error"]["type"] == "invalid_request_error" for r in refused)
    assert server.self_check_failures == []


def test_an_expiry_first_known_after_the_create_is_recorded(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The spec's create answer has `expires_at: null` (validating); a later retrieve has it. `batcher status`
    shows it (it used to keep the create's null for the batch's whole life)."""
    out = tmp_path / "out"
    with SpecBatchServer() as server:
        assert _run(tmp_path, server, PROMPTS, "--no-wait") == 5
        expires = next(iter(server.batches.values())).doc["expires_at"]
    _conforms(server)
    capsys.readouterr()
    assert main(["status", str(out), "--json"]) in (0, 5)
    rows = json.loads(capsys.readouterr().out)["batches"]
    assert len(rows) == 1 and rows[0]["state"] == "in_progress"
    assert expires is not None and rows[0]["expires"] == expires


def test_lost_answers_are_found_in_paged_lists_among_others_objects(tmp_path: Path) -> None:
    """The upload and the create each answer 500 after the file / the batch was made; the lists come one entry a
    page (`has_more`, `after`), among a fine-tune file, another batch input and a chat batch without metadata.
    batcher pages through them, finds its file by name and its batch by metadata: nothing is made twice."""
    with SpecBatchServer(page_size=1, foreign=True, faults=frozenset({"upload", "create"})) as server:
        code = _run(tmp_path, server, PROMPTS, max_requests=3)
    _conforms(server)
    assert code == 0
    # two chunks of 3: two uploads and two creates, the lost ones found, not sent again
    assert server.called("POST", "/v1/files") == 2 and server.called("POST", "/v1/batches") == 2
    ours = [b for b in server.batches.values() if b.doc["endpoint"] == "/v1/images/generations"]
    assert len(ours) == 2
    assert sorted(server.generated.values()) == [1] * 6
    assert server.called("GET", "/v1/files") > 4 and server.called("GET", "/v1/batches") > 4  # paged
    # what is left at the provider is the others' (batcher deleted its own files, and nothing else)
    assert sorted(f.filename for f in server.files.values()) == ["batcher-not-a-chunk.jsonl", "train.jsonl"]
