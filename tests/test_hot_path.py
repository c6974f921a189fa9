"""The per-image hot path (issue 12, CPU per image): `ImagesClient.send` goes straight to the
transport and must put the same request on the wire as httpx's client would; `Recorder.commit`
reads, saves and records an answer in one worker-thread call. Against `raw_http` (a server
batcher did not write) on 127.0.0.1."""

from __future__ import annotations

import base64
import errno
import gzip
import json

import anyio
import anyio.to_thread
import pytest
from helpers import tiny_png
from raw_http import RawServer, Request, reply
from test_commit import endpoint, item, recorder, records

from batcher._client import Answer, GeneratedImage, Generation, ImagesClient
from batcher._exceptions import PermanentError, TransientError

KEY = "sk-hot-path-1234567890"
PNG = base64.b64encode(tiny_png()).decode()
ANSWER = json.dumps({"created": 7, "data": [{"b64_json": PNG, "revised_prompt": "r"}]}).encode()


def serve(answer: bytes = ANSWER, headers: dict[str, str] | None = None, seen: list[Request] | None = None,
          content_type: str = "application/json"):
    async def handler(req: Request, stream) -> bool:
        if seen is not None:
            seen.append(req)
        await stream.send(reply(200, answer, {"x-request-id": "req-9", **(headers or {})}, content_type))
        return True

    return RawServer(handler)


def test_send_puts_the_same_request_on_the_wire_as_the_httpx_client():
    seen: list[Request] = []
    body = {"model": "m", "prompt": "a koi ☃", "n": 1, "size": "256x256"}

    async def main(url: str) -> None:
        async with ImagesClient(f"{url}/v1", KEY, headers={"X-Team": "t1"}) as client:
            answer = await client.send(dict(body))
            async with client._http.stream("POST", f"{url}/v1/images/generations", json=client.dialect.prepare(
                    dict(body), client.options).body, headers=client._auth) as resp:
                await resp.aread()
        assert isinstance(answer, Answer) and answer.headers["x-request-id"] == "req-9"

    with serve(seen=seen) as server:
        anyio.run(main, server.url)
    thin, full = seen
    assert thin.method == full.method == "POST" and thin.target == full.target == "/v1/images/generations"
    assert thin.header_names == full.header_names
    assert thin.headers == full.headers
    assert thin.headers["authorization"] == f"Bearer {KEY}" and thin.headers["x-team"] == "t1"
    assert thin.body == full.body and json.loads(thin.body) == body


def test_a_compressed_answer_is_decoded_and_a_plain_one_read_as_is():
    async def main(url: str) -> list[Generation]:
        async with ImagesClient(f"{url}/v1", KEY) as client:
            return [await client.generate({"model": "m", "prompt": "p"}) for _ in range(2)]

    with serve(gzip.compress(ANSWER), {"Content-Encoding": "gzip"}) as server:
        gens = anyio.run(main, server.url)
    with serve() as server:
        gens += anyio.run(main, server.url)
    for gen in gens:
        assert gen.images[0].data == tiny_png() and gen.request_id == "req-9" and gen.created == 7


def test_send_caps_the_body_and_classifies_errors_as_generate_did():
    async def main(url: str, **kw) -> Answer:
        async with ImagesClient(f"{url}/v1", KEY, **kw) as client:
            return await client.send({"model": "m", "prompt": "p"})

    with serve() as server:
        with pytest.raises(PermanentError) as err:
            anyio.run(lambda: main(server.url, max_response_bytes=100))
        assert err.value.code == "response_too_large"
    with serve(b"data: {}\n\n", content_type="text/event-stream") as server:
        with pytest.raises(PermanentError) as err:
            anyio.run(main, server.url)
        assert err.value.code == "streamed_answer"


def count_hand_offs(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = anyio.to_thread.run_sync

    async def counted(func, *args, **kwargs):
        calls.append(getattr(func, "__name__", "?"))
        return await real(func, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counted)
    return calls


def answer(doc: dict) -> Answer:
    return Answer(bytearray(json.dumps(doc).encode()), {"x-request-id": "r1"}, 1)


def test_commit_reads_saves_and_records_in_one_thread_hand_off(tmp_path, monkeypatch):
    troubles: list[OSError] = []
    rec, ep = recorder(tmp_path, troubles), endpoint()
    calls = count_hand_offs(monkeypatch)

    async def main():
        return await rec.commit(ep, item(), 1, answer({"created": 3, "data": [{"b64_json": PNG}]}).read)

    done = anyio.run(main)
    assert len(calls) == 1  # read + save + record: one hand-off (was three)
    assert done.complete and done.unread is None and done.refused is None and not troubles
    assert (rec.out.root / done.saved[0].file).read_bytes() == tiny_png()  # renamed into place
    [line] = records(rec)
    assert line["status"] == "done" and line["images"][0]["file"] == done.saved[0].file
    assert line["request_id"] == "r1" and line["cost"] == 0.5
    assert rec.images == 1 and ep.stats["done"] == 1 and ep.stats["cost"] == 0.5


def test_commit_returns_an_unreadable_answer_without_saving(tmp_path):
    rec, ep = recorder(tmp_path, []), endpoint()
    done = anyio.run(lambda: rec.commit(ep, item(), 1, answer({"data": [{"b64_json": "@@@"}]}).read))
    assert isinstance(done.unread, TransientError) and done.unread.code == "malformed_response"
    assert done.gen is None and done.saved is None and records(rec) == []
    assert not list(rec.out.images.iterdir())


def test_commit_refuses_a_non_image_and_leaves_url_answers_to_save(tmp_path):
    rec, ep = recorder(tmp_path, []), endpoint()
    not_image = base64.b64encode(b"plain text, not an image").decode()
    done = anyio.run(lambda: rec.commit(ep, item(), 1, answer({"data": [{"b64_json": not_image}]}).read))
    assert isinstance(done.refused, PermanentError) and done.refused.code == "not_an_image"
    assert done.gen is not None and done.saved is None and records(rec) == []
    url = Generation(created=1, images=[GeneratedImage(url="http://127.0.0.1:9/x.png")])
    done = anyio.run(lambda: rec.commit(ep, item(), 1, lambda: url))
    assert done.gen is url and done.saved is None and done.refused is None and records(rec) == []


def test_commit_counts_a_short_answer_as_incomplete(tmp_path):
    rec, ep = recorder(tmp_path, []), endpoint()
    two = Answer(bytearray(json.dumps({"data": [{"b64_json": PNG}]}).encode()), {}, 2)
    done = anyio.run(lambda: rec.commit(ep, item(2), 1, two.read))
    assert done.record is not None and not done.complete
    [line] = records(rec)
    assert line["status"] == "failed" and len(line["images"]) == 1  # kept (paid), asked again for the rest


def test_commit_a_disk_that_refuses_the_record_stops_the_run(tmp_path, monkeypatch):
    troubles: list[OSError] = []
    rec, ep = recorder(tmp_path, troubles), endpoint()

    def full(_rec):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rec.journal, "append", full)
    done = anyio.run(lambda: rec.commit(ep, item(), 1, answer({"data": [{"b64_json": PNG}]}).read))
    assert done.saved and done.record is None and not done.complete
    assert [t.errno for t in troubles] == [errno.ENOSPC]
    assert ep.stats["cost"] == 0.5 and ep.stats["done"] == 0  # paid, not recorded: pending
