"""A mock Images API derived from OpenAI's published spec, through the official `openai` SDK's types.

The SDK's types are generated from OpenAI's OpenAPI spec, so this server checks batcher against
OpenAI's own description rather than against batcher's simulator (which agrees with batcher by
construction):

- every `POST /v1/images/generations` body is validated, strictly, against
  `openai.types.image_generate_params.ImageGenerateParamsNonStreaming`; fields the spec does not
  list are let through (a gateway may take them) and recorded in `SeenRequest.unknown`;
- every answer is built as the spec allows and checked before it is sent: 200s against
  `openai.types.ImagesResponse`, errors against `openai.types.shared.ErrorObject` (OpenAI's
  `{"error": {"message", "type", "param", "code"}}`).

What a request gets is scripted per prompt: `SpecServer(script={"koi": ["rate_limited", "ok"]})`
answers the first request whose prompt contains "koi" with a 429, the next with images; once a
script runs out (and for unscripted prompts) the answer is "ok". "ok" answers rotate through the
shapes the spec allows (only `b64_json`; with `revised_prompt`; the gpt-image extras `background`,
`output_format`, `quality`, `size`, `usage`), and a request asking `response_format: url` gets URLs
served by this server. ERRORS lists the error answers.
"""

from __future__ import annotations

import base64
import json
import secrets
import threading
import time
import typing
from dataclasses import dataclass, field
from typing import Any

from anyio.abc import SocketStream
from openai.types import ImagesResponse
from openai.types.image_generate_params import ImageGenerateParamsNonStreaming
from openai.types.shared import ErrorObject
from pydantic import TypeAdapter, ValidationError

from hostile_server import png
from raw_http import RawServer, Request, reply

__all__ = ["SpecServer", "SeenRequest", "ERRORS", "SPEC_FIELDS", "RETRY_AFTER_MS"]

SPEC_FIELDS = frozenset(typing.get_type_hints(ImageGenerateParamsNonStreaming))
_PARAMS = TypeAdapter(ImageGenerateParamsNonStreaming)
RETRY_AFTER_MS = 300

# name -> (status, error object, extra headers): OpenAI's shapes for each failure
ERRORS: dict[str, tuple[int, dict[str, Any], dict[str, str]]] = {
    "invalid_param": (400, {"message": "Invalid value: '7x7'. Supported values are: '1024x1024', ...",
                            "type": "invalid_request_error", "param": "size", "code": "invalid_value"}, {}),
    "content_policy": (400, {"message": "Your request was rejected as a result of our safety system.",
                             "type": "invalid_request_error", "param": None, "code": "content_policy_violation"}, {}),
    "moderation_blocked": (400, {"message": "Your request was rejected by the safety system.",
                                 "type": "image_generation_user_error", "param": None,
                                 "code": "moderation_blocked"}, {}),
    "unauthorized": (401, {"message": "Incorrect API key provided: sk-test-****.", "type": "invalid_request_error",
                           "param": None, "code": "invalid_api_key"}, {}),
    "forbidden": (403, {"message": "Country, region, or territory not supported",
                        "type": "request_forbidden", "param": None,
                        "code": "unsupported_country_region_territory"}, {}),
    "not_found": (404, {"message": "The model 'gpt-image-9' does not exist or you do not have access to it.",
                        "type": "invalid_request_error", "param": "model", "code": "model_not_found"}, {}),
    "rate_limited": (429, {"message": "Rate limit reached for gpt-image-2 on requests per min (RPM): Limit 50, "
                                      f"Used 50, Requested 1. Please try again in {RETRY_AFTER_MS}ms.",
                           "type": "requests", "param": None, "code": "rate_limit_exceeded"},
                     {"retry-after-ms": str(RETRY_AFTER_MS), "retry-after": "1",
                      "x-ratelimit-limit-requests": "50", "x-ratelimit-remaining-requests": "0",
                      "x-ratelimit-reset-requests": f"{RETRY_AFTER_MS}ms",
                      "x-ratelimit-limit-tokens": "100000", "x-ratelimit-remaining-tokens": "99000",
                      "x-ratelimit-reset-tokens": "600ms"}),
    "insufficient_quota": (429, {"message": "You exceeded your current quota, please check your plan and billing "
                                            "details.", "type": "insufficient_quota", "param": None,
                                 "code": "insufficient_quota"}, {}),
    "server_error": (500, {"message": "The server had an error while processing your request. Sorry about that!",
                           "type": "server_error", "param": None, "code": None}, {}),
    "unavailable": (503, {"message": "The engine is currently overloaded, please try again later.",
                          "type": "server_error", "param": None, "code": None}, {}),
}
# What every answer carries, as OpenAI's do (the limits are generous: they never slow a test).
_OK_HEADERS = {"x-ratelimit-limit-requests": "5000", "x-ratelimit-remaining-requests": "4999",
               "x-ratelimit-reset-requests": "12ms", "openai-processing-ms": "7", "openai-version": "2020-10-01"}


@dataclass
class SeenRequest:
    body: Any
    headers: dict[str, str]
    problems: list[str]  # where the body breaks the spec's types (empty: it conforms)
    unknown: set[str]  # fields the spec does not list (passed through)
    answer: str = ""  # what it got: "ok", "ok-url" or an ERRORS name


@dataclass
class SpecServer:
    """The spec-derived mock, serving on 127.0.0.1 until `stop()` (or the `with` block ends)."""

    script: dict[str, list[str]] = field(default_factory=dict)
    api_key: str | None = None

    def __post_init__(self) -> None:
        for answers in self.script.values():
            for name in answers:
                assert name == "ok" or name in ERRORS, name
        self.script = {k: list(v) for k, v in self.script.items()}
        self.requests: list[SeenRequest] = []
        self.self_check_failures: list[str] = []  # answers this server built that the spec does not allow
        self._files: dict[str, bytes] = {}
        self._oks = 0
        self._lock = threading.Lock()
        self._server = RawServer(self._handle)
        self.base_url = f"{self._server.url}/v1"

    @property
    def errors(self) -> list[BaseException]:
        return self._server.errors

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> SpecServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def answered(self, name: str) -> int:
        return sum(r.answer == name for r in self.requests)

    # -- HTTP ---------------------------------------------------------------------------

    async def _handle(self, req: Request, stream: SocketStream) -> bool:
        path = req.target.split("?")[0]
        if req.method == "GET" and path.startswith("/v1/files/"):
            data = self._files.get(path.rsplit("/", 1)[1])
            if data is None:
                await stream.send(reply(404, json.dumps(self._error_doc("not_found")).encode()))
            else:
                await stream.send(reply(200, data, content_type="image/png"))
            return True
        if req.method != "POST" or path != "/v1/images/generations":
            doc = {"error": {"message": f"Invalid URL ({req.method} {path})", "type": "invalid_request_error",
                             "param": None, "code": None}}
            await stream.send(reply(404, json.dumps(doc).encode()))
            return True
        seen = self._check_request(req)
        with self._lock:
            self.requests.append(seen)
        if self.api_key is not None and req.headers.get("authorization") != f"Bearer {self.api_key}":
            seen.answer = "unauthorized"
            return await self._send_error(stream, "unauthorized")
        if seen.problems:  # OpenAI answers a body its schema rejects with a 400 naming the parameter
            seen.answer = "spec_violation"
            doc = {"error": {"message": "; ".join(seen.problems), "type": "invalid_request_error",
                             "param": seen.problems[0].split(":")[0], "code": "invalid_value"}}
            await stream.send(reply(400, json.dumps(doc).encode()))
            return True
        seen.answer = name = self._next_answer(seen.body["prompt"])
        if name != "ok":
            return await self._send_error(stream, name)
        doc = self._ok_doc(seen.body)
        seen.answer = "ok-url" if "url" in doc["data"][0] else "ok"
        try:
            ImagesResponse.model_validate(doc, strict=True)
        except ValidationError as exc:
            self.self_check_failures.append(str(exc))
        headers = {**_OK_HEADERS, "x-request-id": f"req_{secrets.token_hex(8)}"}
        await stream.send(reply(200, json.dumps(doc).encode(), headers))
        return True

    def _check_request(self, req: Request) -> SeenRequest:
        problems: list[str] = []
        if req.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            problems.append(f"content-type: {req.headers.get('content-type')!r} is not application/json")
        try:
            body = json.loads(req.body)
        except ValueError:
            return SeenRequest(None, req.headers, [*problems, "body: not JSON"], set())
        if not isinstance(body, dict):
            return SeenRequest(body, req.headers, [*problems, "body: not a JSON object"], set())
        try:
            _PARAMS.validate_python(body, strict=True)
        except ValidationError as exc:
            problems += [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        return SeenRequest(body, req.headers, problems, set(body) - SPEC_FIELDS)

    def _next_answer(self, prompt: str) -> str:
        with self._lock:
            for key, answers in self.script.items():
                if key in prompt and answers:
                    return answers.pop(0)
        return "ok"

    def _ok_doc(self, body: dict[str, Any]) -> dict[str, Any]:
        with self._lock:
            self._oks += 1
            shape = self._oks % 3
        width, height = 8, 8
        size = body.get("size")
        if isinstance(size, str) and "x" in size:
            w, _, h = size.partition("x")
            if w.isdigit() and h.isdigit() and 0 < int(w) <= 64 and 0 < int(h) <= 64:
                width, height = int(w), int(h)
        data: list[dict[str, Any]] = []
        for k in range(body.get("n") or 1):
            image = png(width, height, seed=self._oks * 16 + k)
            entry: dict[str, Any]
            if body.get("response_format") == "url":
                token = secrets.token_hex(8) + ".png"
                self._files[token] = image
                entry = {"url": f"{self.base_url}/files/{token}"}
            else:
                entry = {"b64_json": base64.b64encode(image).decode("ascii")}
            if shape == 1:
                entry["revised_prompt"] = f"A detailed rendering of: {body['prompt']}"
            data.append(entry)
        doc: dict[str, Any] = {"created": int(time.time()), "data": data}
        if shape == 2:  # a gpt-image answer: the settings used and the tokens billed
            doc.update(background="opaque", output_format="png", size=f"{width}x{height}",
                       quality=body.get("quality") if body.get("quality") in ("low", "medium", "high") else "medium",
                       usage={"input_tokens": 12, "output_tokens": 272, "total_tokens": 284,
                              "input_tokens_details": {"text_tokens": 12, "image_tokens": 0},
                              "output_tokens_details": {"image_tokens": 272, "text_tokens": 0}})
        return doc

    def _error_doc(self, name: str) -> dict[str, Any]:
        _, error, _ = ERRORS[name]
        try:
            ErrorObject.model_validate(error, strict=True)
            assert set(error) == {"message", "type", "param", "code"}  # the spec requires all four
        except (ValidationError, AssertionError) as exc:
            self.self_check_failures.append(f"{name}: {exc}")
        return {"error": error}

    async def _send_error(self, stream: SocketStream, name: str) -> bool:
        status, _, headers = ERRORS[name]
        await stream.send(reply(status, json.dumps(self._error_doc(name)).encode(),
                                {**headers, "x-request-id": f"req_{secrets.token_hex(8)}"}))
        return True
