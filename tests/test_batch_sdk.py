"""The simulator's Files and Batches APIs driven by the official openai SDK: it proves the wire shapes."""

from __future__ import annotations

import base64
import io
import json
import time

import pytest
from openai import OpenAI

from batcher._simulator import SimulatorConfig, start_in_thread

ENDPOINT = "/v1/images/generations"


def jsonl(n: int, *, fmt: str = "b64_json", word: str = "") -> bytes:
    return b"".join(json.dumps({"custom_id": f"item-{i}", "method": "POST", "url": ENDPOINT, "body": {
        "model": "grok-imagine", "prompt": f"koi {i}{word if i == 1 else ''}", "size": "64x64",
        "response_format": fmt}}).encode() + b"\n" for i in range(n))


def wait_terminal(client: OpenAI, batch_id: str, limit_s: float = 20.0):
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
        time.sleep(0.05)
    raise AssertionError(f"batch {batch_id} still {batch.status} after {limit_s}s")


@pytest.fixture
def sdk():
    with start_in_thread(SimulatorConfig(api_key="sk-test")) as sim:
        yield OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0, timeout=10), sim


def test_files_and_batches_round_trip_through_the_sdk(sdk):
    client, sim = sdk
    uploaded = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(4, word=" forbidden"))), purpose="batch")
    assert uploaded.purpose == "batch" and uploaded.bytes == len(jsonl(4, word=" forbidden"))
    assert client.files.retrieve(uploaded.id).filename == "in.jsonl"

    batch = client.batches.create(input_file_id=uploaded.id, endpoint=ENDPOINT, completion_window="24h",
                                  metadata={"batcher_chunk": "k-1"})
    assert batch.status == "validating" and batch.metadata == {"batcher_chunk": "k-1"}
    done = wait_terminal(client, batch.id)
    assert done.status == "completed"
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (4, 3, 1)

    out = [json.loads(line) for line in client.files.content(done.output_file_id).content.splitlines()]
    assert sorted(line["custom_id"] for line in out) == ["item-0", "item-2", "item-3"]
    for line in out:
        assert line["response"]["status_code"] == 200 and line["error"] is None
        assert base64.b64decode(line["response"]["body"]["data"][0]["b64_json"])[:8] == b"\x89PNG\r\n\x1a\n"
    errors = [json.loads(line) for line in client.files.content(done.error_file_id).content.splitlines()]
    assert [(e["custom_id"], e["response"]["status_code"]) for e in errors] == [("item-1", 400)]
    assert errors[0]["response"]["body"]["error"]["code"] == "content_policy_violation"
    assert sim.stats()["batch"]["images"] == {"item-0": 1, "item-2": 1, "item-3": 1}

    assert client.files.delete(uploaded.id).deleted is True
    assert uploaded.id not in [f.id for f in client.files.list(purpose="batch")]


def test_lists_page_newest_first(sdk):
    client, _ = sdk
    ids = []
    for _ in range(5):
        f = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(1))), purpose="batch")
        ids.append(client.batches.create(input_file_id=f.id, endpoint=ENDPOINT, completion_window="24h").id)
    listed = [b.id for b in client.batches.list(limit=2)]  # auto-pagination over three pages
    assert listed == ids[::-1]
    files = [f.id for f in client.files.list(purpose="batch", limit=2)]
    assert len(files) == 5 and len(set(files)) == 5


def test_cancel_through_the_sdk():
    # a slow clock: the batch is still running when it is cancelled
    with start_in_thread(SimulatorConfig(batch_time_scale=20.0 / 86400)) as sim:
        client = OpenAI(base_url=sim.base_url, api_key="k", max_retries=0, timeout=10)
        f = client.files.create(file=("in.jsonl", io.BytesIO(jsonl(200))), purpose="batch")
        batch = client.batches.create(input_file_id=f.id, endpoint=ENDPOINT, completion_window="24h")
        deadline = time.monotonic() + 20
        while client.batches.retrieve(batch.id).request_counts.completed < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
        done = wait_terminal(client, batch.id)
        assert done.status == "cancelled"
        kept = client.files.content(done.output_file_id).content.splitlines()
        rest = [json.loads(line) for line in client.files.content(done.error_file_id).content.splitlines()]
        assert 1 <= len(kept) < 200 and len(kept) + len(rest) == 200
        assert {line["error"]["code"] for line in rest} == {"batch_cancelled"}


def test_invalid_input_fails_validation_with_line_errors(sdk):
    client, _ = sdk
    bad = jsonl(2) + b"not json\n" + jsonl(1)  # item-0 twice, a broken line
    f = client.files.create(file=("in.jsonl", io.BytesIO(bad)), purpose="batch")
    batch = wait_terminal(client, client.batches.create(input_file_id=f.id, endpoint=ENDPOINT,
                                                        completion_window="24h").id)
    assert batch.status == "failed"
    assert {(e.code, e.line) for e in batch.errors.data} == {("invalid_json_line", 3), ("duplicate_custom_id", 4)}
