"""Each dialect end to end: ImagesClient against the simulator speaking that dialect (loopback only)."""

from __future__ import annotations

import struct

import anyio
import httpx2 as httpx
import pytest

from batcher._cli import _simulator_config, build_parser
from batcher._client import ImagesClient
from batcher._dialect import DIALECTS
from batcher._exceptions import FatalError, PermanentError, TransientError
from batcher._simulator import DIALECT_NAMES, SimulatorConfig, start_in_thread

KEY = "sk-test-dialect-3b1f"
AZ = {"api_version": "2025-04-01-preview"}


def generate(sim, dialect: str, body: dict, key: str | None = KEY, options=AZ):
    """One `ImagesClient.generate` in its own event loop; returns the Generation or the raised error."""

    async def main():
        async with ImagesClient(sim.base_url, key, dialect=DIALECTS[dialect], options=options) as client:
            try:
                return await client.generate(body)
            except (PermanentError, TransientError, FatalError) as exc:
                return exc

    return anyio.run(main)


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def item(prompt="a koi", **fields):
    # the body batcher's core builds for every item, whatever the endpoint
    return {"model": "grok-imagine", "prompt": prompt, "size": "1024x1024", "n": 1, "response_format": "b64_json",
            **fields}


def test_simulator_knows_exactly_the_built_in_dialects():
    assert DIALECT_NAMES == tuple(DIALECTS)
    with pytest.raises(ValueError, match="unknown simulator dialect"):
        SimulatorConfig(dialect="klingon")


def test_openai_dialect_drops_response_format_and_records_usage():
    with start_in_thread(SimulatorConfig(dialect="openai")) as sim:
        gen = generate(sim, "openai", item(model="gpt-image-1", size="1536x1024", output_format="png",
                                           background="opaque"))
        assert png_size(gen.images[0].data) == (1536, 1024)
        assert gen.usage["total_tokens"] == gen.usage["input_tokens"] + gen.usage["output_tokens"] > 0
        # the same item in the default dialect sends response_format: gpt-image rejects it
        err = generate(sim, "openai-compatible", item(model="gpt-image-1"))
        assert isinstance(err, PermanentError) and err.status == 400 and err.code == "unknown_parameter"
        assert sim.stats()["generations"] == {"a koi": 1}


def test_openai_simulator_checks_gpt_image_fields_and_n():
    with start_in_thread(SimulatorConfig(dialect="openai")) as sim:
        err = generate(sim, "openai-compatible", {"model": "gpt-image-1", "prompt": "p", "output_format": "tiff"})
        assert err.code == "invalid_value"
        assert "tiff" in err.message
        err = generate(sim, "openai-compatible", {"model": "gpt-image-1", "prompt": "p", "n": 11})
        assert err.code == "invalid_value" and err.status == 400
        # the dialect refuses n > 10 itself, before anything is sent
        before = sim.stats()["requests"]
        err = generate(sim, "openai", item(n=11))
        assert isinstance(err, PermanentError) and err.status is None and sim.stats()["requests"] == before


def test_azure_dialect_deployment_path_api_version_and_api_key():
    with start_in_thread(SimulatorConfig(dialect="azure-openai", api_key=KEY)) as sim:
        gen = generate(sim, "azure-openai", item(model="img-prod", size="64x64"))
        assert png_size(gen.images[0].data) == (64, 64)
        # wrong key in the right header: fatal, as for any provider
        err = generate(sim, "azure-openai", item(), key="sk-wrong")
        assert isinstance(err, FatalError) and err.status == 401
        # the generic path does not exist on Azure
        err = generate(sim, "openai-compatible", item())
        assert isinstance(err, PermanentError) and err.status == 404
        with httpx.Client(timeout=10) as http:
            url = f"{sim.base_url}/openai/deployments/img-prod/images/generations"
            # a Bearer key is not Azure's api-key header
            r = http.post(url, params={"api-version": "2025-04-01-preview"}, json=item(),
                          headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 401 and r.json()["error"]["code"] == "401"
            r = http.post(url, json=item(), headers={"api-key": KEY})
            assert r.status_code == 404
            # the deployment names the model: the body needs none
            r = http.post(url, params={"api-version": "v"}, json={"prompt": "no model", "size": "8x8"},
                          headers={"api-key": KEY})
            assert r.status_code == 200
        assert sim.stats()["generations"] == {"a koi": 1, "no model": 1}


def test_azure_simulator_requires_an_api_key_header_even_without_a_configured_key():
    with start_in_thread(SimulatorConfig(dialect="azure-openai")) as sim:
        err = generate(sim, "azure-openai", item(), key=None)
        assert isinstance(err, FatalError) and err.status == 401
        assert generate(sim, "azure-openai", item(size="8x8"), key="anything").images


def test_xai_dialect_maps_size_to_aspect_ratio():
    with start_in_thread(SimulatorConfig(dialect="xai", api_key=KEY)) as sim:
        gen = generate(sim, "xai", item(size="1536x1024", quality="hd", style="vivid"))
        assert png_size(gen.images[0].data) == (1024, 683)
        gen = generate(sim, "xai", item(aspect_ratio="9:16", resolution="2k", n=2))
        assert [png_size(i.data) for i in gen.images] == [(1152, 2048)] * 2
        # the default dialect sends size: xAI says so in its own error shape, read by status
        err = generate(sim, "openai-compatible", item())
        assert isinstance(err, PermanentError) and err.status == 400
        assert err.code == "Client specified an invalid argument" and err.message == "Argument not supported: size"
        err = generate(sim, "openai-compatible", {"model": "grok-imagine", "prompt": "p", "quality": "hd"})
        assert err.message == "Argument not supported: quality"
        # a ratio xAI does not offer is the server's to refuse
        err = generate(sim, "xai", item(size="1000x700"))
        assert err.status == 400 and "10:7" in err.message
        err = generate(sim, "xai", item(), key="sk-wrong")
        assert isinstance(err, FatalError) and err.status == 401


def test_xai_moderation_on_a_200_is_a_permanent_policy_failure():
    with start_in_thread(SimulatorConfig(dialect="xai")) as sim:
        err = generate(sim, "xai", item(prompt="something forbidden"))
        assert isinstance(err, PermanentError) and err.code == "content_policy_violation" and err.status == 200
        stats = sim.stats()
        assert stats["policy_rejected"] == 1 and stats["generations"] == {"something forbidden": 1}
        # the default dialect does not know the flag: it would keep a moderated image as done
        with httpx.Client(timeout=10) as http:
            r = http.post(f"{sim.base_url}/images/generations",
                          json={"model": "m", "prompt": "also forbidden", "aspect_ratio": "1:1"})
            assert r.status_code == 200 and r.json()["data"][0]["respect_moderation"] is False


def test_xai_n_above_ten_fails_before_sending():
    with start_in_thread(SimulatorConfig(dialect="xai")) as sim:
        err = generate(sim, "xai", item(n=11))
        assert isinstance(err, PermanentError) and err.code == "invalid_value" and "10" in err.message
        assert sim.stats()["requests"] == 0
        err = generate(sim, "openai-compatible", {"model": "m", "prompt": "p", "n": 11})
        assert err.status == 400  # and the simulator enforces it for clients that don't know


@pytest.mark.parametrize("after,outage", [(0.0, True), (3600.0, False)])
def test_fail_all_after_is_an_outage_not_a_generation(after, outage):
    with start_in_thread(SimulatorConfig(fail_all_after_s=after)) as sim:
        result = generate(sim, "openai-compatible", item(size="8x8"))
        stats = sim.stats()
        if outage:
            assert isinstance(result, TransientError) and result.status == 500
            assert stats["faults"]["outage"] == 1 and stats["generations"] == {}
        else:
            assert result.images and stats["faults"]["outage"] == 0


def test_cli_maps_dialect_and_outage_options():
    parser = build_parser()
    args = parser.parse_args(["simulate", "--dialect", "xai", "--fail-all-after", "2.5"])
    cfg = _simulator_config(args)
    assert (cfg.dialect, cfg.fail_all_after_s) == ("xai", 2.5)
    args = parser.parse_args(["run", "job.yaml", "--simulate", "--sim-dialect", "azure-openai",
                              "--sim-fail-all-after", "1"])
    cfg = _simulator_config(args, prefix="sim-")
    assert (cfg.dialect, cfg.fail_all_after_s) == ("azure-openai", 1.0)
    assert _simulator_config(parser.parse_args(["simulate"])).dialect == "openai-compatible"
    with pytest.raises(SystemExit):
        parser.parse_args(["simulate", "--dialect", "klingon"])


def test_official_sdks_against_their_dialects():
    import openai
    from openai import AzureOpenAI, OpenAI

    with start_in_thread(SimulatorConfig(dialect="openai", api_key=KEY)) as sim:
        client = OpenAI(base_url=sim.base_url, api_key=KEY, max_retries=0, timeout=10)
        response = client.images.generate(model="gpt-image-1", prompt="a koi", size="1024x1024")
        assert response.data[0].b64_json and response.usage.total_tokens > 0
        with pytest.raises(openai.BadRequestError) as exc:
            client.images.generate(model="gpt-image-1", prompt="a koi", response_format="url")
        assert exc.value.code == "unknown_parameter"
    with start_in_thread(SimulatorConfig(dialect="azure-openai", api_key=KEY)) as sim:
        azure = AzureOpenAI(azure_endpoint=sim.base_url, api_key=KEY, api_version=AZ["api_version"],
                            max_retries=0, timeout=10)
        response = azure.images.generate(model="img-prod", prompt="a koi", size="256x256",
                                         response_format="b64_json")
        assert response.data[0].b64_json
