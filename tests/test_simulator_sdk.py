"""The simulator against the official openai SDK, and its own guarantees (real PNGs, limits)."""

from __future__ import annotations

import base64
import struct
import zlib

import httpx2 as httpx
import pytest
from openai import OpenAI

from batcher._simulator import SimulatorConfig, start_in_thread

SEED_PROMPT = "An astronaut riding a giant koi fish through a nebula, surreal art style"


def check_png(data: bytes, width: int, height: int) -> None:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) & 0xFFFFFFFF == crc, kind
        if kind == b"IHDR":
            assert struct.unpack(">II", body[:8]) == (width, height)
        if kind == b"IDAT":
            idat += body
        pos += 12 + length
    assert len(zlib.decompress(idat)) == height * (1 + 3 * width)


def test_seed_quick_start_works_unchanged_with_the_official_sdk():
    with start_in_thread() as sim:
        client = OpenAI(base_url=sim.base_url, api_key="sk-test", max_retries=0, timeout=10)
        response = client.images.generate(model="grok-imagine", prompt=SEED_PROMPT, size="1024x1024", n=1)
        url = response.data[0].url
        assert url.startswith("http://127.0.0.1:")
        assert response.data[0].revised_prompt
        check_png(httpx.get(url, timeout=10).content, 1024, 1024)
        b64 = client.images.generate(model="grok-imagine", prompt=SEED_PROMPT, size="1536x1024",
                                     response_format="b64_json")
        check_png(base64.b64decode(b64.data[0].b64_json), 1536, 1024)
        assert isinstance(b64.created, int)


def test_sdk_sees_openai_shaped_errors():
    import openai

    with start_in_thread(SimulatorConfig(api_key="right")) as sim:
        client = OpenAI(base_url=sim.base_url, api_key="wrong", max_retries=0, timeout=10)
        with pytest.raises(openai.AuthenticationError) as exc:
            client.images.generate(model="grok-imagine", prompt="x")
        assert exc.value.code == "invalid_api_key"
        ok = OpenAI(base_url=sim.base_url, api_key="right", max_retries=0, timeout=10)
        with pytest.raises(openai.BadRequestError) as exc:
            ok.images.generate(model="grok-imagine", prompt="x", size="big")
        assert exc.value.param == "size"
        with pytest.raises(openai.BadRequestError) as exc:
            ok.images.generate(model="grok-imagine", prompt="something forbidden")
        assert exc.value.code == "content_policy_violation"


def test_sliding_window_admits_exactly_a_seconds_share():
    with start_in_thread(SimulatorConfig(rpm=600)) as sim:  # 10 per second
        with httpx.Client(timeout=10) as http:
            answers = [http.post(f"{sim.base_url}/images/generations",
                                 json={"model": "m", "prompt": f"p{i}", "size": "8x8", "response_format": "b64_json"})
                       for i in range(15)]
        codes = [a.status_code for a in answers]
        assert codes.count(200) == 10 and codes.count(429) == 5
        limited = answers[-1]
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"
        assert int(limited.headers["retry-after-ms"]) >= 1
        assert limited.headers["x-ratelimit-limit-requests"] == "600"
        assert limited.headers["x-ratelimit-remaining-requests"] == "0"
        assert sim.stats()["max_window_requests"] == 10


def test_quota_and_faults_and_stats():
    with start_in_thread(SimulatorConfig(quota_images=2)) as sim, httpx.Client(timeout=10) as http:
        body = {"model": "m", "prompt": "q", "size": "8x8", "n": 2}
        assert http.post(f"{sim.base_url}/images/generations", json=body).status_code == 200
        second = http.post(f"{sim.base_url}/images/generations", json=body)
        assert second.status_code == 429 and second.json()["error"]["code"] == "insufficient_quota"
        assert sim.stats()["generations"] == {"q": 1}
    with start_in_thread(SimulatorConfig(drop_rate=1.0)) as sim, httpx.Client(timeout=10) as http:
        with pytest.raises(httpx.RemoteProtocolError):
            http.post(f"{sim.base_url}/images/generations", json={"model": "m", "prompt": "d"})
    with start_in_thread(SimulatorConfig(malformed_rate=1.0)) as sim, httpx.Client(timeout=10) as http:
        r = http.post(f"{sim.base_url}/images/generations", json={"model": "m", "prompt": "d"})
        with pytest.raises(ValueError):
            r.json()
        assert sim.stats()["generations"] == {}  # faults happen in front of the model: not billed
    with start_in_thread(SimulatorConfig(image_bytes=100_000)) as sim, httpx.Client(timeout=10) as http:
        r = http.post(f"{sim.base_url}/images/generations",
                      json={"model": "m", "prompt": "big", "size": "8x8", "response_format": "b64_json"})
        data = base64.b64decode(r.json()["data"][0]["b64_json"])
        assert len(data) >= 100_000
        check_png(data, 8, 8)
