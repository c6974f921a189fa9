"""Hostile 200s (issue 15 #1, #11, #13, #16): each is that item's malformed answer or a bounded
failure, never an exception out of the run, a cut image saved as done, or unbounded text kept."""

from __future__ import annotations

import base64
import hashlib
import io
import json

import pytest
from helpers import KEY, manifest, tiny_png, write_job

from batcher import TransientError
from batcher._cli import main
from batcher._client import REVISED_PROMPT_MAX, ImagesClient, Timeouts, _check_whole_file, read_answer
from batcher._simulator import SimulatorConfig, start_in_thread
from batcher._writer import sniff, truncation


@pytest.fixture(autouse=True)
def key(monkeypatch):
    monkeypatch.setenv("BATCHER_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


def answer(*entries: dict, **top) -> bytes:
    return json.dumps({"created": 1, "data": list(entries), **top}).encode()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def run(job, out, sim, *extra: str) -> int:
    return main([str(a) for a in ("run", job, "--out", out, "--base-url", sim.base_url, "--quiet",
                                  "--timeout", "10", *extra)])


# -- #1: nesting a parser cannot take ---------------------------------------------------------

@pytest.mark.parametrize("raw", [
    b"[" * 5000 + b"]" * 5000,
    b'{"data": ' + b"[" * 2000 + b"]" * 2000 + b"}",
    b'{"data": [{"b64_json": "x", "revised_prompt": ' + b'{"a":' * 3000 + b"1" + b"}" * 3000 + b"}]}",
])
def test_deep_json_is_a_malformed_answer(raw):
    with pytest.raises(TransientError) as err:
        read_answer(bytearray(raw), {}, 1)
    assert err.value.code == "malformed_response"


def test_a_deep_usage_is_dropped_and_the_paid_images_kept():
    usage: object = 1
    for _ in range(200):
        usage = {"u": usage}
    gen = read_answer(answer({"b64_json": b64(tiny_png())}, usage=usage), {}, 1)
    assert gen.usage is None and gen.images[0].data == tiny_png()
    assert read_answer(answer({"b64_json": b64(tiny_png())}, usage={"total_tokens": 3}), {}, 1).usage


def test_deep_json_answers_are_retried_and_the_run_finishes(tmp_path):
    job = write_job(tmp_path / "job.yaml", [f"p{i}" for i in range(12)], defaults={"size": "16x16"})
    out = tmp_path / "out"
    with start_in_thread(SimulatorConfig(deep_json_rate=0.4, seed=7)) as sim:
        assert run(job, out, sim, "--max-attempts", "15") == 0
        assert sim.stats()["faults"]["deep_json"] > 0
    assert manifest(out)["summary"]["done"] == 12


def test_only_deep_json_answers_fail_their_items_and_write_the_manifest(tmp_path):
    job = write_job(tmp_path / "job.yaml", ["a", "b"], defaults={"size": "16x16"})
    out = tmp_path / "out"
    with start_in_thread(SimulatorConfig(deep_json_rate=1.0)) as sim:
        assert run(job, out, sim, "--max-attempts", "2") == 1
    doc = manifest(out)
    assert doc["summary"]["failed"] == 2
    assert {i["error"]["code"] for i in doc["items"]} == {"malformed_response"}


# -- #11: an image must be whole ---------------------------------------------------------------

def pillow_image(fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 60, 60)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_whole_images_pass_and_cut_ones_are_malformed(fmt):
    whole = pillow_image(fmt)
    kind = sniff(whole)
    assert kind is not None and truncation(whole, kind) is None
    assert read_answer(answer({"b64_json": b64(whole)}), {}, 1).images[0].data == whole
    for cut in (whole[: len(whole) // 2], whole[:-1]):
        assert truncation(cut, kind) is not None
        with pytest.raises(TransientError) as err:
            read_answer(answer({"b64_json": b64(cut)}), {}, 1)
        assert err.value.code == "malformed_response" and "not a whole image" in err.value.message


def test_png_magic_then_html_and_a_flipped_bit_are_not_whole():
    for data in (b"\x89PNG\r\n\x1a\n<html><body>502 Bad Gateway</body></html>",
                 tiny_png()[:20] + bytes([tiny_png()[20] ^ 1]) + tiny_png()[21:]):
        with pytest.raises(TransientError, match="not a whole image"):
            read_answer(answer({"b64_json": b64(data)}), {}, 1)


def test_cut_images_are_asked_again_and_every_saved_file_is_whole(tmp_path):
    job = write_job(tmp_path / "job.yaml", [f"p{i}" for i in range(10)], defaults={"size": "16x16"})
    out = tmp_path / "out"
    with start_in_thread(SimulatorConfig(truncated_rate=0.4, image_bytes=4000, seed=5)) as sim:
        assert run(job, out, sim, "--max-attempts", "15") == 0
        assert sim.stats()["faults"]["truncated"] > 0
    for item in manifest(out)["items"]:
        image = item["images"][0]
        data = (out / image["file"]).read_bytes()
        assert truncation(data, "png") is None and hashlib.sha256(data).hexdigest() == image["sha256"]


def test_a_cut_download_is_a_failed_download(tmp_path):
    path = tmp_path / "x.png"
    path.write_bytes(tiny_png()[:-6])
    with pytest.raises(TransientError) as err:
        _check_whole_file(path)
    assert err.value.code == "download_failed"
    path.write_bytes(tiny_png())
    _check_whole_file(path)


# -- #13: bounded text and bounded copies --------------------------------------------------------

def test_a_huge_revised_prompt_is_cut_and_marked():
    long = "x" * (10 * 1024 * 1024)
    gen = read_answer(answer({"b64_json": b64(tiny_png()), "revised_prompt": long}), {}, 1)
    kept = gen.images[0].revised_prompt
    assert kept.startswith("x" * REVISED_PROMPT_MAX) and len(kept) < REVISED_PROMPT_MAX + 80
    assert f"{len(long)} characters" in kept
    short = read_answer(answer({"b64_json": b64(tiny_png()), "revised_prompt": "a koi"}), {}, 1)
    assert short.images[0].revised_prompt == "a koi"


def test_the_body_buffer_is_released_once_parsed():
    raw = bytearray(answer({"b64_json": b64(tiny_png())}))
    read_answer(raw, {}, 1)
    assert len(raw) == 0  # the answer's bytes are not held while the images are saved


def test_a_run_keeps_revised_prompts_small_on_disk(tmp_path):
    job = write_job(tmp_path / "job.yaml", ["a", "b", "c"], defaults={"size": "16x16"})
    out = tmp_path / "out"
    with start_in_thread(SimulatorConfig(revised_prompt_chars=2_000_000)) as sim:
        assert run(job, out, sim) == 0
    assert (out / "manifest.jsonl").stat().st_size < 3 * (REVISED_PROMPT_MAX + 4000)
    for item in manifest(out)["items"]:
        assert "truncated by batcher: 2000000 characters" in item["images"][0]["revised_prompt"]


# -- #16: a dripping download is bounded by --timeout, all attempts together ----------------------

def test_a_dripping_download_fails_within_the_run_timeout(tmp_path):
    job = write_job(tmp_path / "job.yaml", ["a"], defaults={"size": "16x16", "response_format": "url"})
    out = tmp_path / "out"
    with start_in_thread(SimulatorConfig(image_bytes=50_000, drip_bytes_per_s=200)) as sim:
        assert main([str(a) for a in ("run", job, "--out", out, "--base-url", sim.base_url, "--quiet",
                                      "--timeout", "1.5", "--max-attempts", "1")]) == 1
        downloads = sim.stats()["downloads"]
    error = manifest(out)["items"][0]["error"]
    assert error["code"] == "download_timeout" and "1.5s" in error["message"]
    assert downloads == 1  # the first attempt used the whole deadline: no second 1.5 s, no third


def test_the_download_deadline_defaults_to_the_read_timeout():
    assert Timeouts(read=7).download_deadline == 7 and Timeouts(read=7, download=3).download_deadline == 3


# -- the transport: failures are httpx's, classified as before ------------------------------------

@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_connection_refused_and_hangs_are_transient(anyio_backend):
    async with ImagesClient("http://127.0.0.1:9/v1", None) as refused:
        with pytest.raises(TransientError) as err:
            await refused.generate({"model": "m", "prompt": "p"})
        assert err.value.code == "connection_error"
    with start_in_thread(SimulatorConfig(hang_rate=1.0, hang_s=30)) as sim:
        async with ImagesClient(sim.base_url, None, timeouts=Timeouts(read=0.3)) as hung:
            with pytest.raises(TransientError) as err:
                await hung.generate({"model": "m", "prompt": "p", "size": "8x8"})
            assert err.value.code == "timeout"
