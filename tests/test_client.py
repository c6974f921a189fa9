"""What the client makes of absurd, hostile or gateway-shaped answers (no network needed)."""

from __future__ import annotations

import base64
import errno
import json

import pytest

from batcher import PermanentError, TransientError
from batcher._cli import main
from batcher._client import ImagesClient, read_answer
from batcher._simulator import SimulatorConfig, start_in_thread
from batcher._writer import OutputDir

from helpers import KEY, manifest, tiny_png, write_job

PNG = base64.b64encode(tiny_png()).decode()


@pytest.fixture
def client():
    return ImagesClient("http://127.0.0.1:9/v1", None)


def parse(client, doc, n=1):
    raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    return read_answer(raw, {"x-request-id": "req_1"}, n, client.dialect)


def test_both_keys_with_one_null_and_url_instead_of_b64(client):
    gen = parse(client, {"created": 5, "data": [{"b64_json": None, "url": "http://127.0.0.1/x.png"},
                                                {"b64_json": PNG, "url": None, "revised_prompt": "r"}]}, n=2)
    assert gen.images[0].url and gen.images[0].data is None
    assert gen.images[1].data.startswith(b"\x89PNG") and gen.images[1].revised_prompt == "r"
    assert gen.created == 5 and gen.request_id == "req_1"


@pytest.mark.parametrize("doc,kind,code", [
    (b"<html>502</html>", TransientError, "malformed_response"),
    ({"data": "nope"}, TransientError, "malformed_response"),
    ({"data": []}, TransientError, "malformed_response"),
    ({"data": [{"b64_json": "!!!not base64!!!"}]}, TransientError, "malformed_response"),
    ({"data": [{"b64_json": 42}]}, TransientError, "malformed_response"),
    ({"data": [7]}, TransientError, "malformed_response"),
    ({"data": [{"b64_json": PNG}] * 10000}, PermanentError, "unexpected_image_count"),
    ({"error": {"code": "429", "type": "requests", "message": "slow down"}}, TransientError, "429"),
])
def test_absurd_bodies_fail_with_a_clear_reason(client, doc, kind, code):
    with pytest.raises(kind) as exc:
        parse(client, doc)
    assert exc.value.code == code


def test_wrong_types_are_ignored_not_fatal(client):
    gen = parse(client, {"created": "yesterday", "usage": [1], "data": [{"b64_json": PNG, "revised_prompt": 3}]})
    assert gen.created is None and gen.usage is None and gen.images[0].revised_prompt is None


def test_non_image_bytes_are_refused(tmp_path):
    out = OutputDir(tmp_path)
    out.prepare()
    with pytest.raises(PermanentError, match="not a PNG"):
        out.save_bytes("x", 0, 1, b"<html>hello</html>")
    assert list(out.images.iterdir()) == []


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_download_refuses_non_http_and_caps_size(tmp_path, anyio_backend):
    client = ImagesClient("http://127.0.0.1:9/v1", None, max_download_bytes=1000)
    try:
        with pytest.raises(PermanentError, match="non-http"):
            await client.download("file:///etc/passwd", tmp_path / "x")
        with start_in_thread(SimulatorConfig(image_bytes=5000)) as sim:
            import httpx2 as httpx

            async with httpx.AsyncClient() as http:
                r = await http.post(f"{sim.base_url}/images/generations",
                                    json={"model": "m", "prompt": "p", "size": "8x8", "response_format": "url"})
            url = r.json()["data"][0]["url"]
            with pytest.raises(PermanentError, match="cap"):
                await client.download(url, tmp_path / "y")
            assert not (tmp_path / "y").exists()
    finally:
        await client.aclose()


def test_disk_full_stops_cleanly_with_exit_4_and_rerun_completes(tmp_path, monkeypatch):
    monkeypatch.setenv("BATCHER_API_KEY", KEY)
    job = write_job(tmp_path / "job.yaml", [f"p{i}" for i in range(12)], defaults={"size": "16x16"})
    out = tmp_path / "out"
    real = OutputDir.save_bytes
    calls = {"n": 0}

    def flaky(self, *args):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args)

    with start_in_thread(SimulatorConfig()) as sim:
        monkeypatch.setattr(OutputDir, "save_bytes", flaky)
        code = main(["run", str(job), "--out", str(out), "--base-url", sim.base_url, "--quiet",
                     "--concurrency", "2"])
        assert code == 4
        s = manifest(out)["summary"]
        assert s["done"] == 3 and s["failed"] == 0 and s["pending"] == 9
        monkeypatch.setattr(OutputDir, "save_bytes", real)
        assert main(["run", str(job), "--out", str(out), "--base-url", sim.base_url, "--quiet"]) == 0
    assert manifest(out)["summary"]["done"] == 12
    assert not [p for p in (out / "images").iterdir() if p.name.startswith(".tmp-")]


def test_on_sent_fires_once_when_the_request_is_on_the_wire_and_never_for_a_refused_connection():
    """The limiter's send stamp comes from the wire: after a connection wait, not at the grant."""
    import anyio

    with start_in_thread(SimulatorConfig(latency_ms=50)) as sim:
        async def main_() -> tuple[list[float], float, list[float]]:
            stamps: list[float] = []
            fresh: list[bool] = []

            def stamp(new_connection: bool) -> None:
                stamps.append(anyio.current_time())
                fresh.append(new_connection)

            connecting: list[int] = []
            async with ImagesClient(sim.base_url, KEY) as good:
                began = anyio.current_time()
                gen = await good.generate({"model": "m", "prompt": "p", "size": "8x8"}, on_sent=stamp)
                answered = anyio.current_time()
                assert gen.images and len(stamps) == 1 and began <= stamps[0] <= answered - 0.04
                answer = await good.send({"model": "m", "prompt": "q", "size": "8x8"}, on_sent=stamp,
                                         on_connecting=lambda: connecting.append(len(stamps)))
                assert answer.read().images
                # the first opened a connection (the server reads it later), the second kept it alive
                assert fresh == [True, False] and connecting == []
                await good.aclose()  # the pool is gone: the next request opens one, and says so first
                await good.send({"model": "m", "prompt": "r", "size": "8x8"}, on_sent=stamp,
                                on_connecting=lambda: connecting.append(len(stamps)))
                assert fresh == [True, False, True] and connecting == [2]
                del stamps[1:]
            refused_stamps: list[float] = []
            async with ImagesClient("http://127.0.0.1:9/v1", KEY) as refused:
                with pytest.raises(TransientError):
                    await refused.generate({"model": "m", "prompt": "p"},
                                           on_sent=lambda new_connection: refused_stamps.append(0.0))
            return stamps, answered, refused_stamps

        stamps, _, refused_stamps = anyio.run(main_)
    assert len(stamps) == 1 and refused_stamps == []


def test_untimed_requests_skip_tracing_and_share_the_timed_ones_pool(monkeypatch):
    """A request with no send hooks (no limit known) goes untraced; both kinds use one pool."""
    import anyio

    from batcher import _client

    traced: list[str] = []
    real = _client._body_sent

    async def spy(session, ctx, params) -> None:
        traced.append(str(params.url))
        await real(session, ctx, params)

    monkeypatch.setattr(_client, "_body_sent", spy)  # read when the client's sessions are made
    with start_in_thread(SimulatorConfig()) as sim:
        async def main_() -> list[bool]:
            fresh: list[bool] = []
            async with ImagesClient(sim.base_url, KEY, max_connections=1) as client:
                await client.generate({"model": "m", "prompt": "untimed"})
                assert traced == []  # no hooks: aiohttp's tracing was not run for it
                await client.generate({"model": "m", "prompt": "timed"}, on_sent=fresh.append)
                assert len(traced) == 1
            return fresh

        fresh = anyio.run(main_)
    assert fresh == [False]  # the connection the untimed request opened, kept alive in the one pool


def test_open_connections_pools_them_for_the_first_requests():
    """A run's first window goes out on connections opened before it (the server has accepted them)."""
    import anyio
    from anyio.abc import SocketAttribute

    from raw_http import RawServer, reply

    ports: list[int] = []
    answer = json.dumps({"created": 1, "data": [{"b64_json": base64.b64encode(tiny_png()).decode()}]}).encode()

    async def handler(req, stream) -> bool:
        ports.append(stream.extra(SocketAttribute.remote_port))
        await stream.send(reply(200, answer))
        return True

    with RawServer(handler) as server:
        async def main_() -> tuple[int, int, int, list[bool]]:
            fresh: list[bool] = []
            async with ImagesClient(f"{server.url}/v1", KEY, max_connections=4) as client:
                opened = await client.open_connections(5)  # more than the pool holds: the pool's size
                assert ports == []  # no request: only connections
                with anyio.fail_after(10):
                    async with anyio.create_task_group() as tg:
                        for i in range(4):
                            tg.start_soon(client.generate, {"model": "m", "prompt": f"p{i}"}, fresh.append)
            async with ImagesClient("http://127.0.0.1:9/v1", KEY) as refused:
                nothing = await refused.open_connections(3)  # best effort: the requests will say what is wrong
            return opened, nothing, len(set(ports)), fresh

        opened, nothing, distinct, fresh = anyio.run(main_)
    assert server.errors == []
    assert (opened, nothing) == (4, 0)
    assert fresh == [False] * 4 and distinct == 4  # every request on a connection opened before it
