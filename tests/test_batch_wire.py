"""BatchClient (the wire layer of provider Batch APIs) against the simulator and a hostile server."""

from __future__ import annotations

import json
from pathlib import Path

import anyio
import pytest
from raw_http import RawServer, reply

from batcher._client import BatchClient, BatchInfo, BatchLine, Timeouts
from batcher._dialect import get_dialect
from batcher._exceptions import FatalError, PermanentError, TransientError
from batcher._simulator import SimulatorConfig, start_in_thread

ENDPOINT = "/v1/images/generations"
KEY = "sk-wire"


def write_jsonl(path: Path, n: int, *, fmt: str | None = "b64_json", policy: set[int] = frozenset(),
                xai: bool = False, pad: int = 0, prefix: str = "item") -> Path:
    with open(path, "w") as fh:
        for i in range(n):
            body = {"model": "grok-imagine", "prompt": f"koi {i}" + (" forbidden" if i in policy else "")
                    + ("x" * pad)}
            if xai:
                body["aspect_ratio"] = "1:1"
            else:
                body["size"] = "64x64"
                if fmt:
                    body["response_format"] = fmt
            fh.write(json.dumps({"custom_id": f"{prefix}-{i}", "method": "POST", "url": ENDPOINT, "body": body}) + "\n")
    return path


def run(fn, config: SimulatorConfig | None = None, **client_kw):
    """Start a simulator, run `fn(client, sim)` in a fresh event loop (bounded: 60 s), stop it."""
    with start_in_thread(config or SimulatorConfig(api_key=KEY)) as sim:
        async def main():
            with anyio.fail_after(60):
                async with BatchClient(sim.base_url, client_kw.pop("api_key", KEY), **client_kw) as client:
                    return await fn(client, sim)
        return anyio.run(main)


async def until_terminal(client: BatchClient, batch_id: str, limit_s: float = 20.0) -> BatchInfo:
    with anyio.fail_after(limit_s):
        for _ in range(int(limit_s / 0.05) + 1):  # polls a server: bounded in count and time
            if (info := await client.batch(batch_id)).terminal:
                return info
            await anyio.sleep(0.05)
    raise AssertionError(f"batch {batch_id} not terminal after {limit_s}s")


async def collect(client: BatchClient, file_id: str | None) -> list[BatchLine]:
    return [line async for line in client.lines(file_id)] if file_id else []


async def submit(client: BatchClient, path: Path, key: str = "k-1") -> BatchInfo:
    uploaded = await client.upload(path, path.name)
    return await client.create_batch(uploaded.id, window="24h", metadata={"batcher_chunk": key})


# -- upload ------------------------------------------------------------------------------------

def test_upload_streams_a_file_of_many_chunks_byte_identical(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "big.jsonl", 2500, pad=1000)  # ~2.9 MB: three 1 MiB chunks and more
    original = path.read_bytes()
    assert len(original) > 2 * (1 << 20)
    reads: list[int] = []
    import aiofiles.threadpool.binary as binary

    real_read = binary.AsyncBufferedReader.read

    async def counting_read(self, *args):
        chunk = await real_read(self, *args)
        reads.append(len(chunk))
        return chunk

    monkeypatch.setattr(binary.AsyncBufferedReader, "read", counting_read)

    async def go(client, sim):
        return await client.upload(path, "big.jsonl")

    with start_in_thread(SimulatorConfig(api_key=KEY)) as sim:
        async def main():
            async with BatchClient(sim.base_url, KEY) as client:
                return await go(client, sim)
        info = anyio.run(main)
        assert sim.simulator.batches.files[info.id].data == original
    assert info.bytes == len(original) and info.filename == "big.jsonl" and info.purpose == "batch"
    assert max(reads) <= 1 << 20 and len([r for r in reads if r]) >= 3  # read in chunks, never whole


# -- batches -----------------------------------------------------------------------------------

def test_create_retrieve_list_and_lines_of_b64_and_url_answers(tmp_path):
    b64_file = write_jsonl(tmp_path / "b64.jsonl", 3)
    url_file = write_jsonl(tmp_path / "url.jsonl", 2, fmt="url", prefix="url")

    async def go(client, sim):
        first = await submit(client, b64_file, "k-b64")
        second = await submit(client, url_file, "k-url")
        assert first.status == "validating" and first.metadata == {"batcher_chunk": "k-b64"}
        listed = [b async for b in client.batches()]
        assert [b.id for b in listed] == [second.id, first.id]  # newest first
        done = await until_terminal(client, first.id)
        assert (done.status, done.total, done.completed, done.failed) == ("completed", 3, 3, 0)
        assert done.output_file_id and done.error_file_id is None and done.input_file_id
        lines = await collect(client, done.output_file_id)
        assert sorted(line.custom_id for line in lines) == ["item-0", "item-1", "item-2"]
        for line in lines:
            assert line.error is None and line.generation.images[0].data[:8] == b"\x89PNG\r\n\x1a\n"
            assert line.generation.request_id  # the line's request_id, like a synchronous answer's header
        done = await until_terminal(client, second.id)
        lines = await collect(client, done.output_file_id)
        urls = [line.generation.images[0].url for line in lines]
        assert len(urls) == 2 and all(u.startswith("http://127.0.0.1:") for u in urls)
        await client.download(urls[0], tmp_path / "a.png")
        assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        return sim.stats()["batch"]

    stats = run(go)
    assert stats["images"] == {"item-0": 1, "item-1": 1, "item-2": 1, "url-0": 1, "url-1": 1}
    assert stats["duplicates"] == 0


def test_error_lines_are_classified_like_synchronous_answers(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", 3, policy={1})

    async def go(client, sim):
        done = await until_terminal(client, (await submit(client, path)).id)
        assert (done.completed, done.failed) == (2, 1)
        [line] = await collect(client, done.error_file_id)
        assert line.custom_id == "item-1" and isinstance(line.error, PermanentError)
        assert (line.error.status, line.error.code) == (400, "content_policy_violation")

    run(go)


def test_5xx_lines_are_transient(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", 2)

    async def go(client, sim):
        done = await until_terminal(client, (await submit(client, path)).id)
        lines = await collect(client, done.error_file_id)
        assert len(lines) == 2 and all(isinstance(line.error, TransientError) for line in lines)
        assert {line.error.status for line in lines} <= {500, 502, 503}

    run(go, SimulatorConfig(api_key=KEY, fail_rate=1.0, seed=1))


def test_expiry_keeps_partial_output_and_the_rest_are_transient_batch_expired(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", 10)

    async def go(client, sim):
        done = await until_terminal(client, (await submit(client, path)).id)
        assert done.status == "expired"
        kept = await collect(client, done.output_file_id)
        rest = await collect(client, done.error_file_id)
        assert 1 <= len(kept) < 10 and len(kept) + len(rest) == 10
        assert all(line.generation for line in kept)
        assert {(type(line.error), line.error.code) for line in rest} == {(TransientError, "batch_expired")}
        return sim.stats()["batch"]["images"]

    # lines are due evenly over 90 % of 24 h after 60 s validating: half of them by 12 h
    images = run(go, SimulatorConfig(api_key=KEY, batch_expire_after=12 * 3600))
    assert all(count == 1 for count in images.values())


def test_cancel_keeps_completed_results(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", 100)

    async def go(client, sim):
        batch = await submit(client, path)
        with anyio.fail_after(20):
            for _ in range(400):
                if (await client.batch(batch.id)).completed >= 1:
                    break
                await anyio.sleep(0.05)
        assert (await client.cancel_batch(batch.id)).status in ("cancelling", "cancelled")
        done = await until_terminal(client, batch.id)
        kept, rest = await collect(client, done.output_file_id), await collect(client, done.error_file_id)
        assert done.status == "cancelled" and 1 <= len(kept) < 100 and len(kept) + len(rest) == 100
        assert {line.error.code for line in rest} == {"batch_cancelled"}

    run(go, SimulatorConfig(api_key=KEY, batch_time_scale=20.0 / 86400))


def test_validation_failure_reports_the_provider_errors(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", 2)

    async def go(client, sim):
        done = await until_terminal(client, (await submit(client, path)).id)
        assert done.status == "failed" and done.output_file_id is None
        assert done.errors and done.errors[0]["code"] == "invalid_request"

    run(go, SimulatorConfig(api_key=KEY, batch_validation_fail=True))


def test_a_line_too_long_is_a_permanent_error_for_its_custom_id(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", 2)

    async def go(client, sim):
        done = await until_terminal(client, (await submit(client, path)).id)
        lines = await collect(client, done.output_file_id)
        assert sorted(line.custom_id for line in lines) == ["item-0", "item-1"]
        assert all(isinstance(line.error, PermanentError) and line.error.code == "line_too_long" for line in lines)

    run(go, max_line_bytes=200)  # a 64x64 PNG as base64 alone is longer


def test_files_list_and_delete(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", 1)

    async def go(client, sim):
        ids = [(await client.upload(path, f"{i}.jsonl")).id for i in range(3)]
        assert [f.id async for f in client.files()] == ids[::-1]
        await client.delete_file(ids[1])
        assert [f.id async for f in client.files()] == [ids[2], ids[0]]
        with pytest.raises(PermanentError) as exc:
            await client.delete_file(ids[1])
        assert exc.value.status == 404

    run(go)


def test_result_urls_expire_after_the_ttl(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", 1, fmt="url")

    async def go(client, sim):
        done = await until_terminal(client, (await submit(client, path)).id)
        [line] = await collect(client, done.output_file_id)
        url = line.generation.images[0].url
        await anyio.sleep(0.6)
        with pytest.raises(PermanentError) as exc:
            await client.download(url, tmp_path / "late.png")
        assert exc.value.code == "download_failed"

    run(go, SimulatorConfig(api_key=KEY, batch_url_ttl=0.5))


# -- failures of the calls themselves ----------------------------------------------------------

@pytest.mark.parametrize("fault", ["5xx", "hang"])
def test_a_failed_upload_is_transient_and_the_file_may_exist(tmp_path, fault):
    path = write_jsonl(tmp_path / "in.jsonl", 1)

    async def go(client, sim):
        with pytest.raises(TransientError) as exc:
            await client.upload(path, "in.jsonl")
        assert exc.value.code == ("timeout" if fault == "hang" else "server_error")
        assert len([f async for f in client.files()]) == 1  # an orphan: the executor deletes it
        assert (await client.upload(path, "in.jsonl")).id  # only the first upload fails

    run(go, SimulatorConfig(api_key=KEY, batch_upload_fault=fault, hang_s=5.0), timeouts=Timeouts(read=0.5))


def test_create_refusals_are_permanent(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", 1)

    async def go(client, sim):
        uploaded = await client.upload(path, "in.jsonl")
        with pytest.raises(PermanentError) as exc:
            await client.create_batch(uploaded.id, window="24h", metadata={f"k{i}": "v" for i in range(17)})
        assert (exc.value.status, exc.value.code) == (400, "invalid_value")
        with pytest.raises(PermanentError):
            await client.create_batch("file-missing", window="24h", metadata={})
        assert [b async for b in client.batches()] == []

    run(go)


@pytest.mark.parametrize("fault", ["5xx", "hang"])
def test_create_that_fails_may_have_created_the_batch(tmp_path, fault):
    path = write_jsonl(tmp_path / "in.jsonl", 1)

    async def go(client, sim):
        uploaded = await client.upload(path, "in.jsonl")
        with pytest.raises(TransientError) as exc:
            await client.create_batch(uploaded.id, window="24h", metadata={"batcher_chunk": "k-7"})
        assert exc.value.code == ("timeout" if fault == "hang" else "server_error")
        found = [b async for b in client.batches() if b.metadata.get("batcher_chunk") == "k-7"]
        assert len(found) == 1  # the executor finds it by its tag instead of creating a second one
        return sim.stats()["batch"]["batches_created"]

    created = run(go, SimulatorConfig(api_key=KEY, batch_create_fault=fault, hang_s=5.0),
                  timeouts=Timeouts(read=0.5))
    assert created == 1


def test_auth_is_fatal_and_an_unknown_batch_permanent():
    async def go(client, sim):
        with pytest.raises(PermanentError) as exc:
            await client.batch("batch_nope")
        assert exc.value.status == 404

    run(go)

    async def bad(client, sim):
        with pytest.raises(FatalError):
            await client.batch("batch_nope")

    run(bad, api_key="wrong")


# -- xai ---------------------------------------------------------------------------------------

def test_xai_shape_upload_create_state_paged_results_and_cancel_path(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", 3, xai=True)

    async def go(client, sim):
        batch = await submit(client, path, "k-x")
        assert batch.metadata == {"batcher_chunk": "k-x"} and batch.status == "in_progress"
        assert isinstance(batch.created_at, int)
        done = await until_terminal(client, batch.id)
        assert (done.status, done.total, done.completed) == ("completed", 3, 3)
        assert done.output_file_id == batch.id  # results are read by batch id, paged
        lines = await collect(client, done.output_file_id)
        assert sorted(line.custom_id for line in lines) == ["item-0", "item-1", "item-2"]
        assert all(line.generation and line.generation.images[0].url for line in lines)
        assert [b.id async for b in client.batches()] == [batch.id]
        assert (await client.cancel_batch(batch.id)).id == batch.id  # POST /batches/{id}:cancel

    run(go, SimulatorConfig(api_key=KEY, dialect="xai"), dialect=get_dialect("xai"))


def test_input_lines_are_the_dialects_request(tmp_path):
    async def go(client, sim):
        line = json.loads(client.input_line("item-9", {"model": "grok-imagine", "prompt": "koi", "size": "1536x1024"}))
        assert line == {"custom_id": "item-9", "method": "POST", "url": ENDPOINT,
                        "body": {"model": "grok-imagine", "prompt": "koi", "aspect_ratio": "3:2"}}
        with pytest.raises(PermanentError):
            client.input_line("item-10", {"model": "m", "prompt": "koi", "n": 11})  # xai takes at most 10
        path = tmp_path / "in.jsonl"
        path.write_bytes(b"".join(client.input_line(f"i{k}", {"model": "m", "prompt": f"koi {k}", "size": "1024x1024"})
                                  for k in range(2)))
        done = await until_terminal(client, (await submit(client, path)).id)
        assert (done.status, done.completed) == ("completed", 2)  # the simulator's xai rules accept them

    run(go, SimulatorConfig(api_key=KEY, dialect="xai"), dialect=get_dialect("xai"))


def test_xai_moderated_image_in_a_result_is_a_policy_refusal(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", 2, xai=True, policy={0})

    async def go(client, sim):
        done = await until_terminal(client, (await submit(client, path)).id)
        lines = {line.custom_id: line for line in await collect(client, done.output_file_id)}
        assert lines["item-1"].generation is not None
        assert lines["item-0"].error.code == "content_policy_violation"  # xai's respect_moderation: false

    run(go, SimulatorConfig(api_key=KEY, dialect="xai"), dialect=get_dialect("xai"))


# -- hostile servers ---------------------------------------------------------------------------

def hostile(answers: dict[str, bytes]):
    """A server answering GET paths with fixed bodies (200), 404 otherwise."""
    async def handler(req, stream):
        body = answers.get(req.target.split("?")[0])
        await stream.send(reply(200, body) if body is not None else reply(404, b'{"error": {"code": "nf"}}'))
        return True
    return RawServer(handler)


def test_hostile_batch_objects_sparse_nested_and_unnamed():
    line_without_id = json.dumps({"custom_id": None, "response": {"status_code": 200, "body": {"data": []}}})
    answers = {
        "/v1/batches/sparse": b'{"id": "sparse", "status": "in_progress"}',
        "/v1/batches/nested": b'{"id": "nested", "metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        "/v1/batches/noid": b'{"status": "completed", "request_counts": {"total": "3"}}',
        "/v1/batches/list": b"[1, 2]",
        "/v1/files/f/content": b'{"custom_id": "a", "response": {"status_code": 200, "body": {"data": '
                               + b"[" * 3000 + b"]" * 3000 + b"}}}\n" + line_without_id.encode() + b"\nnot json\n",
    }
    with hostile(answers) as server:
        async def main():
            with anyio.fail_after(30):
                return await check()

        async def check():
            async with BatchClient(f"{server.url}/v1", KEY, timeouts=Timeouts(read=5)) as client:
                sparse = await client.batch("sparse")
                assert (sparse.status, sparse.total, sparse.metadata, sparse.errors) == ("in_progress", 0, {}, [])
                assert not sparse.terminal
                for bad in ("nested", "noid", "list"):
                    with pytest.raises(TransientError) as exc:
                        await client.batch(bad)
                    assert exc.value.code == "malformed_response"
                return await collect(client, "f")
        lines = anyio.run(main)
    assert [type(line.error) for line in lines] == [TransientError] * 3
    assert [line.custom_id for line in lines] == [None, None, None]  # a nesting bomb is not parsed at all


def test_hostile_over_long_lines_are_never_held_and_name_their_item_when_they_can():
    big = "A" * 5000
    content = (json.dumps({"custom_id": "first", "response": {"status_code": 200, "body": {"pad": big}}}) + "\n"
               + json.dumps({"response": {"status_code": 200, "body": {"pad": big}}}) + "\n"  # no custom_id at all
               + json.dumps({"response": {"body": {"pad": big}}, "custom_id": "late"}) + "\n"  # id past the head
               + json.dumps({"custom_id": "fine", "response": {"status_code": 500, "body": {}}})).encode()
    with hostile({"/v1/files/f/content": content}) as server:
        async def main():
            with anyio.fail_after(30):
                async with BatchClient(f"{server.url}/v1", KEY, max_line_bytes=1000) as client:
                    return await collect(client, "f")
        lines = anyio.run(main)
    assert [line.custom_id for line in lines] == ["first", None, None, "fine"]
    assert [line.error.code for line in lines[:3]] == ["line_too_long"] * 3
    assert isinstance(lines[3].error, TransientError) and lines[3].error.status == 500  # the last, unterminated


def test_batch_url_answers_outlive_the_synchronous_image_cache(tmp_path, monkeypatch):
    import batcher._simulator as simulator

    monkeypatch.setattr(simulator, "MAX_FILES", 2)  # as if many more images than the cache holds
    path = write_jsonl(tmp_path / "in.jsonl", 5, fmt="url")

    async def go(client, sim):
        done = await until_terminal(client, (await submit(client, path)).id)
        for k, line in enumerate(await collect(client, done.output_file_id)):
            await client.download(line.generation.images[0].url, tmp_path / f"{k}.png")
        return len(list(tmp_path.glob("*.png")))

    assert run(go) == 5
