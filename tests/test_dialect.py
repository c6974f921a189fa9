"""Dialects as tables: body in → request sent, answer in → images out or a classified error."""

from __future__ import annotations

import base64
import copy
import json

import pytest

from batcher._client import ImagesClient, read_answer
from batcher._dialect import (
    DEFAULT_DIALECT,
    DIALECTS,
    Dialect,
    DialectError,
    DialectSpecError,
    get_dialect,
    parse_dialects,
)
from batcher._exceptions import PermanentError, TransientError

from helpers import tiny_png

PNG = base64.b64encode(tiny_png()).decode()
AZ = {"api_version": "2025-04-01-preview"}
BASE = {"model": "grok-imagine", "prompt": "a koi", "size": "1024x1024", "n": 1, "response_format": "b64_json"}


def body(**changes):
    out = {**BASE, **changes}
    return {k: v for k, v in out.items() if v is not None}


# dialect, options, body in, (path, params, auth header, body sent)
REQUESTS = [
    ("openai-compatible", {}, body(), ("/images/generations", {}, "Authorization", body())),
    ("openai-compatible", {}, body(style="vivid", quality="hd"),
     ("/images/generations", {}, "Authorization", body(style="vivid", quality="hd"))),
    ("openai", {}, body(model="gpt-image-1"),
     ("/images/generations", {}, "Authorization", body(model="gpt-image-1", response_format=None))),
    ("openai", {}, body(model="gpt-image-1", output_format="webp", background="transparent", moderation="low",
                        response_format="url"),
     ("/images/generations", {}, "Authorization",
      body(model="gpt-image-1", output_format="webp", background="transparent", moderation="low",
           response_format=None))),
    ("azure-openai", AZ, body(model="img-prod"),
     ("/openai/deployments/img-prod/images/generations", {"api-version": "2025-04-01-preview"}, "api-key",
      body(model="img-prod"))),
    ("azure-openai", AZ, body(model="eu/img 2"),  # a deployment name can't escape its path segment
     ("/openai/deployments/eu%2Fimg%202/images/generations", {"api-version": "2025-04-01-preview"}, "api-key",
      body(model="eu/img 2"))),
    ("xai", {}, body(), ("/images/generations", {}, "Authorization", body(size=None, aspect_ratio="1:1"))),
    ("xai", {}, body(size="1536x1024", quality="hd", style="vivid", resolution="2k"),
     ("/images/generations", {}, "Authorization", body(size=None, aspect_ratio="3:2", resolution="2k"))),
    ("xai", {}, body(size="1024x1536"), ("/images/generations", {}, "Authorization",
                                         body(size=None, aspect_ratio="2:3"))),
    ("xai", {}, body(size="1792x1024"), ("/images/generations", {}, "Authorization",
                                         body(size=None, aspect_ratio="16:9"))),
    ("xai", {}, body(size="1024x1792"), ("/images/generations", {}, "Authorization",
                                         body(size=None, aspect_ratio="9:16"))),
    ("xai", {}, body(size="2048x1024"), ("/images/generations", {}, "Authorization",  # reduced, not rounded
                                         body(size=None, aspect_ratio="2:1"))),
    ("xai", {}, body(size="1000x700"), ("/images/generations", {}, "Authorization",
                                        body(size=None, aspect_ratio="10:7"))),
    ("xai", {}, body(size="auto"), ("/images/generations", {}, "Authorization",
                                    body(size=None, aspect_ratio="auto"))),
    ("xai", {}, body(size="1024x1024", aspect_ratio="20:9"),  # the item's own ratio wins
     ("/images/generations", {}, "Authorization", body(size=None, aspect_ratio="20:9"))),
    ("xai", {}, body(n=10), ("/images/generations", {}, "Authorization",
                             body(n=10, size=None, aspect_ratio="1:1"))),
]


@pytest.mark.parametrize("name,options,body_in,expected", REQUESTS)
def test_body_in_request_out(name, options, body_in, expected):
    dialect = DIALECTS[name]
    frozen = copy.deepcopy(body_in)
    req = dialect.prepare(body_in, options)
    path, params, auth, sent = expected
    assert (req.path, req.params, req.body) == (path, params, sent)
    assert list(dialect.auth_headers("sk-x")) == [auth]
    assert body_in == frozen  # never mutates its input
    assert json.dumps(req.body)  # what is sent is JSON


@pytest.mark.parametrize("name,body_in,fld", [
    ("xai", body(n=11), "n"),
    ("openai", body(n=11), "n"),
    ("xai", body(size="big"), "size"),
    ("xai", body(size=1024), "size"),
])
def test_bodies_a_dialect_cannot_send_fail_permanently_before_sending(name, body_in, fld):
    dialect = DIALECTS[name]
    assert [f for f, _ in dialect.check(body_in)] == [fld]
    with pytest.raises(PermanentError) as exc:
        dialect.prepare(body_in, {})
    assert exc.value.code == "invalid_value" and fld in exc.value.message and name in exc.value.message


def test_checks_pass_for_what_each_dialect_can_send():
    for name, options, body_in, _ in REQUESTS:
        assert DIALECTS[name].check(body_in) == []
    assert DIALECTS["xai"].check(body(size="big", aspect_ratio="1:1")) == []  # size is not needed then
    assert DIALECTS["openai-compatible"].check(body(n=500)) == []  # no limit: the server judges


def test_azure_needs_its_api_version_and_a_deployment():
    azure = DIALECTS["azure-openai"]
    assert azure.missing_options({}) == ["api_version"] and azure.missing_options(AZ) == []
    with pytest.raises(DialectError, match="api_version"):
        azure.prepare(body(), {})
    with pytest.raises(PermanentError, match="model"):
        azure.prepare(body(model=None), AZ)
    with pytest.raises(DialectError, match="api_version"):
        ImagesClient("http://127.0.0.1:9", "k", dialect=azure)


def test_max_n_is_exposed_for_the_job_validator():
    assert {name: d.max_n for name, d in DIALECTS.items()} == {
        "openai-compatible": None, "openai": 10, "azure-openai": None, "xai": 10}


def test_auth_headers():
    assert DIALECTS["openai-compatible"].auth_headers("sk-1") == {"Authorization": "Bearer sk-1"}
    assert DIALECTS["azure-openai"].auth_headers("az-1") == {"api-key": "az-1"}
    assert DIALECTS["xai"].auth_headers(None) == {}
    assert "sk-1" not in repr(DIALECTS["openai-compatible"])


# -- answers -------------------------------------------------------------------------------

def answer(*entries, **top):
    return {"created": 7, "data": list(entries), **top}


USAGE = {"input_tokens": 12, "output_tokens": 4160, "total_tokens": 4172,
         "input_tokens_details": {"text_tokens": 12, "image_tokens": 0}}

# dialect, answer, n, images out (b64?, url?) or (error type, code)
ANSWERS = [
    ("openai-compatible", answer({"b64_json": PNG}), 1, ["b64"]),
    ("openai-compatible", answer({"url": "http://127.0.0.1/x.png"}, {"b64_json": PNG}), 2, ["url", "b64"]),
    ("openai", answer({"b64_json": PNG}, usage=USAGE, background="opaque", output_format="png"), 1, ["b64"]),
    ("azure-openai", answer({"b64_json": PNG, "content_filter_results": {}}), 1, ["b64"]),
    ("xai", answer({"b64_json": PNG, "respect_moderation": True}), 1, ["b64"]),
    ("xai", answer({"url": "http://127.0.0.1/y.png"}), 1, ["url"]),
    ("xai", answer({"b64_json": PNG, "respect_moderation": False}), 1,
     (PermanentError, "content_policy_violation")),
    ("xai", answer({"b64_json": PNG, "respect_moderation": True}, {"b64_json": PNG, "respect_moderation": False}),
     2, (PermanentError, "content_policy_violation")),
    # the flag means something only to xai
    ("openai-compatible", answer({"b64_json": PNG, "respect_moderation": False}), 1, ["b64"]),
    ("xai", {"code": "Internal", "error": "oops"}, 1, (TransientError, "Internal")),  # a 200 carrying an error
    ("openai", answer(), 1, (TransientError, "malformed_response")),
]


@pytest.mark.parametrize("name,doc,n,expected", ANSWERS)
def test_answer_in_images_out(name, doc, n, expected):
    client = ImagesClient("http://127.0.0.1:9", None, dialect=DIALECTS[name], options=AZ)
    raw = json.dumps(doc).encode()
    if isinstance(expected, tuple):
        kind, code = expected
        with pytest.raises(kind) as exc:
            read_answer(raw, {}, n, client.dialect)
        assert exc.value.code == code
        return
    gen = read_answer(raw, {"x-request-id": "r"}, n, client.dialect)
    assert ["b64" if i.data else "url" for i in gen.images] == expected
    assert gen.usage == doc.get("usage")


# -- declared in a job file ----------------------------------------------------------------

def test_declared_dialect_from_a_job_file():
    spec = {
        "my-proxy": {"base": "openai", "drop": ["quality"], "rename": {"size": "dimensions"},
                     "path": "/v2/{model}/generate", "query": {"region": "{region}", "v": "2"},
                     "auth_header": "X-Api-Key", "auth_prefix": "", "max_n": 4},
        "my-xai": {"base": "xai", "drop": ["resolution"]},
        "child": {"base": "my-proxy", "max_n": None, "auth_prefix": "Token "},
    }
    declared = parse_dialects(spec)
    assert set(declared) == {"my-proxy", "my-xai", "child"}
    proxy = declared["my-proxy"]
    assert proxy.options_needed == {"region"} and proxy.max_n == 4 and proxy.base == "openai"
    req = proxy.prepare(body(quality="hd"), {"region": "eu"})
    assert req.path == "/v2/grok-imagine/generate" and req.params == {"region": "eu", "v": "2"}
    assert req.body == {"model": "grok-imagine", "prompt": "a koi", "dimensions": "1024x1024", "n": 1}
    assert proxy.auth_headers("k") == {"X-Api-Key": "k"}
    # drop adds to the base's; hooks come along
    my_xai = declared["my-xai"]
    assert my_xai.drop == DIALECTS["xai"].drop | {"resolution"}
    assert my_xai.prepare(body(size="1536x1024", resolution="2k"), {}).body["aspect_ratio"] == "3:2"
    with pytest.raises(PermanentError) as exc:
        my_xai.read(answer({"b64_json": PNG, "respect_moderation": False}), {})
    assert exc.value.code == "content_policy_violation"
    child = declared["child"]
    assert child.max_n is None and child.auth_headers("k") == {"X-Api-Key": "Token k"}
    assert get_dialect("child", declared) is child and get_dialect("xai", declared) is DIALECTS["xai"]
    with pytest.raises(ValueError, match="unknown dialect 'nope'"):
        get_dialect("nope", declared)


def test_rename_keeps_an_explicit_provider_field():
    d = parse_dialects({"p": {"rename": {"size": "dimensions"}}})["p"]
    assert d.prepare(body(dimensions="9x9"), {}).body["dimensions"] == "9x9"
    chain = parse_dialects({"c": {"rename": {"size": "quality", "quality": "tier"}}})["c"]
    assert chain.prepare(body(quality="hd"), {}).body == {
        "model": "grok-imagine", "prompt": "a koi", "quality": "1024x1024", "n": 1, "response_format": "b64_json",
        "tier": "hd"}


@pytest.mark.parametrize("spec,problems", [
    ({"p": {"drop": "quality"}}, [("dialects.p.drop", "list")]),
    ({"p": {"drop": [1]}}, [("dialects.p.drop", "list")]),
    ({"p": {"rename": ["a"]}}, [("dialects.p.rename", "map")]),
    ({"p": {"rename": {"a": "x", "b": "x"}}}, [("dialects.p.rename", "'x'")]),
    ({"p": {"path": "images"}}, [("dialects.p.path", "'/'")]),
    ({"p": {"path": "/x?y=1"}}, [("dialects.p.path", "query")]),
    ({"p": {"path": "/{0}"}}, [("dialects.p.path", "plain names")]),
    ({"p": {"path": "/{a"}}, [("dialects.p.path", "bad template")]),
    ({"p": {"query": {"v": "{x!r}"}}}, [("dialects.p.query", "plain names")]),
    ({"p": {"query": {"v": 2}}}, [("dialects.p.query", "map")]),
    ({"p": {"auth_header": "Bad Header"}}, [("dialects.p.auth_header", "header name")]),
    ({"p": {"auth_prefix": "Bearer\n"}}, [("dialects.p.auth_prefix", "short string")]),
    ({"p": {"max_n": 0}}, [("dialects.p.max_n", "integer")]),
    ({"p": {"max_n": True}}, [("dialects.p.max_n", "integer")]),
    ({"p": {"base": "nope"}}, [("dialects.p.base", "unknown dialect 'nope'")]),
    ({"p": {"base": 3}}, [("dialects.p.base", "dialect name")]),
    ({"p": {"base": "p"}}, [("dialects.p.base", "extends itself")]),
    ({"a": {"base": "b"}, "b": {"base": "a"}}, [("dialects.b.base", "extends itself")]),
    ({"p": {"dorp": ["x"]}}, [("dialects.p.dorp", "unknown key")]),
    ({"xai": {"drop": ["x"]}}, [("dialects.xai", "built-in")]),
    ({"bad name!": {}}, [("dialects.bad name!", "name")]),
    ({"p": ["drop"]}, [("dialects.p", "mapping")]),
    ({"p": {"max_n": -1, "auth_header": ""}}, [("dialects.p.auth_header", "header"), ("dialects.p.max_n", "integer")]),
    (["p"], [("dialects", "mapping")]),
])
def test_declared_dialect_problems_name_the_field(spec, problems):
    with pytest.raises(DialectSpecError) as exc:
        parse_dialects(spec)
    found = sorted(exc.value.problems)
    assert [path for path, _ in found] == [path for path, _ in problems]
    for (_, message), (_, part) in zip(found, problems):
        assert part in message
    assert isinstance(exc.value, ValueError) and problems[0][0] in str(exc.value)


def test_an_empty_declaration_is_openai_compatible_under_a_new_name():
    d = parse_dialects({"plain": {}})["plain"]
    assert d.prepare(body(), {}) == DEFAULT_DIALECT.prepare(body(), {})
    assert d.name == "plain" and d.base == "openai-compatible"


def test_builtins_are_frozen():
    with pytest.raises(AttributeError):
        DIALECTS["xai"].max_n = 100  # type: ignore[misc]
    with pytest.raises(TypeError):
        DIALECTS["azure-openai"].query["api-version"] = "x"  # type: ignore[index]
    with pytest.raises(TypeError):
        DIALECTS["openai"] = Dialect("openai")  # type: ignore[index]


# -- on the wire -----------------------------------------------------------------------------

class CaptureServer:
    """A loopback HTTP/1.1 server that records each raw request and answers one PNG. Bounded."""

    def __init__(self, max_requests: int = 8) -> None:
        import socket
        import threading

        self.requests: list[bytes] = []
        self._max = max_requests
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(10)
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        reply = json.dumps({"created": 1, "data": [{"b64_json": PNG}]}).encode()
        try:
            while len(self.requests) < self._max:
                conn, _ = self._sock.accept()
                conn.settimeout(10)
                with conn:
                    buf = b""
                    while len(self.requests) < self._max:
                        while b"\r\n\r\n" not in buf:
                            chunk = conn.recv(65536)
                            if not chunk:
                                break
                            buf += chunk
                        if b"\r\n\r\n" not in buf:
                            break
                        head, _, rest = buf.partition(b"\r\n\r\n")
                        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                                       if line.lower().startswith(b"content-length:")), 0)
                        while len(rest) < length:
                            rest += conn.recv(65536)
                        self.requests.append(head + b"\r\n\r\n" + rest[:length])
                        buf = rest[length:]
                        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                     b"content-length: %d\r\n\r\n%s" % (len(reply), reply))
        except OSError:
            pass

    def close(self) -> None:
        import socket

        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked accept()
        except OSError:
            pass
        self._sock.close()
        self._thread.join(timeout=10)


def test_default_dialect_sends_todays_request_byte_for_byte():
    import anyio

    server = CaptureServer(max_requests=2)
    base = f"http://127.0.0.1:{server.port}/v1"
    sent = body(style="vivid", extra={"nested": [1, 2]})

    async def main() -> None:
        async with ImagesClient(base, "sk-test-key") as client:
            gen = await client.generate(sent)
            assert gen.images[0].data
            # what the client sent before dialects existed, on the same connection settings
            # (plus Accept: application/json, issue 15 #18)
            async with client._http.stream("POST", f"{base}/images/generations", json=sent,
                                           headers={"Accept": "application/json",
                                                    "Authorization": "Bearer sk-test-key"}) as resp:
                await resp.aread()

    try:
        anyio.run(main)
    finally:
        server.close()
    assert len(server.requests) == 2
    assert server.requests[0] == server.requests[1]
    assert server.requests[0].startswith(b"POST /v1/images/generations HTTP/1.1\r\n")


def test_each_dialect_on_the_wire():
    import anyio

    server = CaptureServer(max_requests=3)
    base = f"http://127.0.0.1:{server.port}"

    async def main() -> None:
        for name in ("openai", "azure-openai", "xai"):
            async with ImagesClient(base, "sk-test-key", dialect=DIALECTS[name], options=AZ) as client:
                await client.generate(body(model="dep-1"))

    try:
        anyio.run(main)
    finally:
        server.close()
    heads = [r.split(b"\r\n\r\n")[0].decode().split("\r\n") for r in server.requests]
    bodies = [json.loads(r.split(b"\r\n\r\n", 1)[1]) for r in server.requests]
    assert heads[0][0] == "POST /images/generations HTTP/1.1" and "response_format" not in bodies[0]
    assert "Authorization: Bearer sk-test-key" in heads[0]
    assert heads[1][0] == "POST /openai/deployments/dep-1/images/generations?api-version=2025-04-01-preview HTTP/1.1"
    assert "api-key: sk-test-key" in heads[1] and not any(h.lower().startswith("authorization") for h in heads[1])
    assert heads[2][0] == "POST /images/generations HTTP/1.1" and bodies[2]["aspect_ratio"] == "1:1"
    assert "size" not in bodies[2]


# -- fuzz: never crash, never mutate ------------------------------------------------------------

from hypothesis import given, settings, strategies as st  # noqa: E402

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-5, 5000), st.text(max_size=12))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.text(max_size=6), inner, max_size=3), max_leaves=6)
FIELDS = st.sampled_from(["model", "prompt", "size", "n", "quality", "style", "response_format",
                          "aspect_ratio", "resolution", "background"]) | st.text(max_size=8)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(FIELDS, VALUES, max_size=8), st.sampled_from(sorted(DIALECTS)))
def test_prepare_never_crashes_or_mutates(body_in, name):
    frozen = copy.deepcopy(body_in)
    try:
        req = DIALECTS[name].prepare(body_in, AZ)
    except PermanentError as exc:
        assert exc.code == "invalid_value" and exc.message
    else:
        assert req.path.startswith("/") and all(isinstance(v, str) for v in req.params.values())
        assert set(req.body) <= set(body_in) | {"aspect_ratio"}
    assert body_in == frozen


SPEC_KEYS = st.sampled_from(["base", "drop", "rename", "path", "query", "auth_header", "auth_prefix", "max_n",
                             "other"])


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.text(max_size=8) | st.sampled_from(["a", "b", "xai"]),
                       st.dictionaries(SPEC_KEYS, VALUES | st.sampled_from(["a", "b", "xai", "/p/{model}"]),
                                       max_size=4) | VALUES, max_size=3))
def test_parse_dialects_returns_or_lists_problems(spec):
    try:
        declared = parse_dialects(spec)
    except DialectSpecError as exc:
        assert exc.problems and all(path.startswith("dialects") and msg for path, msg in exc.problems)
    else:
        assert set(declared) == set(spec)
