from __future__ import annotations

import json
import math
import random
from datetime import datetime, timezone
from email.utils import format_datetime

import pytest

from batcher._policy import MAX_WAIT_S, RetryPolicy, classify, error_message, parse_duration, retry_after_seconds


def body(code=None, etype="invalid_request_error", message="m"):
    return json.dumps({"error": {"message": message, "type": etype, "param": None, "code": code}}).encode()


@pytest.mark.parametrize(
    "status,raw,kind,code",
    [
        (429, body("rate_limit_exceeded", "requests"), "transient", "rate_limit_exceeded"),
        (429, body("insufficient_quota", "insufficient_quota"), "fatal", "insufficient_quota"),
        (429, body("429", "insufficient_quota"), "fatal", "insufficient_quota"),  # gateway: code as status
        (429, body("429", "requests"), "transient", "429"),
        (400, body("content_policy_violation"), "permanent", "content_policy_violation"),
        (400, body("invalid_value"), "permanent", "invalid_value"),
        (404, b"<html>not found</html>", "permanent", None),
        (401, body("invalid_api_key"), "fatal", "invalid_api_key"),
        (403, b"", "fatal", None),
        (408, b"", "transient", None),
        (500, body("server_error", "server_error"), "transient", "server_error"),
        (502, b"<html>Bad gateway</html>", "transient", None),
        (503, b"upstream overloaded", "transient", None),
        (400, json.dumps({"code": "content_policy_violation", "error": "blocked"}).encode(), "permanent",
         "content_policy_violation"),
    ],
)
def test_classify_by_status_and_code(status, raw, kind, code):
    err = classify(status, {}, raw)
    assert err.kind == kind
    assert err.code == code
    assert err.status == status


def test_classify_ignores_message_text():
    # a message that *says* quota must not make a rate-limit 429 fatal
    err = classify(429, {}, body("rate_limit_exceeded", "requests", "You exceeded your current quota"))
    assert err.kind == "transient"


def test_classify_reads_non_json_message():
    err = classify(502, {}, b"<html>\n  <body>Bad   gateway</body></html>")
    assert "Bad gateway" in err.message


def test_200_carrying_an_error_is_classified_by_its_code():
    err = classify(200, {}, body("429", "requests"))
    assert err.kind == "transient" and err.status == 429


def test_retry_after_headers():
    assert retry_after_seconds({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry_after_seconds({"retry-after": "3"}) == 3.0
    when = datetime.fromtimestamp(1_000_010, tz=timezone.utc)
    assert retry_after_seconds({"retry-after": format_datetime(when, usegmt=True)}, now=1_000_000) == \
        pytest.approx(10.0)
    assert retry_after_seconds({"retry-after": "soon"}) is None
    assert retry_after_seconds({}) is None
    assert classify(429, {"retry-after-ms": "250"}, body("rate_limit_exceeded")).retry_after == 0.25


@pytest.mark.parametrize("headers,seconds", [
    ({"retry-after-ms": "nan"}, None),
    ({"retry-after-ms": "NaN", "retry-after": "2"}, 2.0),  # a bad ms header falls back to retry-after
    ({"retry-after-ms": "inf"}, None),
    ({"retry-after-ms": "-Infinity"}, None),
    ({"retry-after-ms": "-500"}, None),
    ({"retry-after-ms": "1e30"}, MAX_WAIT_S),  # huge: capped, not waited for days
    ({"retry-after-ms": "0"}, 0.0),  # "now" is a real answer
    ({"retry-after": "nan"}, None),
    ({"retry-after": "inf"}, None),
    ({"retry-after": "-3"}, None),
    ({"retry-after": "86400"}, MAX_WAIT_S),
    ({"retry-after": "Mon, 01 Jan 1990 00:00:00 GMT"}, None),  # a date in the past asks for nothing
    ({"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"}, MAX_WAIT_S),
    ({"retry-after": "Sun, 99 Foo 12345678 99:99:99 GMT"}, None),
    ({"retry-after": "\x00\xff garbage"}, None),
    ({"retry-after": ""}, None),
])
def test_hostile_retry_headers_are_finite_capped_or_absent(headers, seconds):
    got = retry_after_seconds(headers, now=1_900_000_000)  # 2030
    assert got == seconds
    err = classify(429, headers, body("rate_limit_exceeded"))
    assert err.retry_after == seconds
    # whatever the header said, the retry is scheduled at a finite time within the cap
    delay = RetryPolicy().delay(2, random.Random(0), err.retry_after)
    assert math.isfinite(delay) and 0 <= delay <= MAX_WAIT_S


def test_backoff_ignores_a_non_finite_server_figure():
    policy = RetryPolicy(base=0.5, cap=4.0)
    for bad in (math.nan, math.inf, -1.0):
        assert 0 <= policy.delay(3, random.Random(0), retry_after=bad) <= 2.0  # its own backoff instead
    assert policy.delay(3, random.Random(0), retry_after=1e9) == MAX_WAIT_S


@pytest.mark.parametrize("text,seconds", [("1s", 1.0), ("120ms", 0.12), ("6m0s", 360.0), ("1h2m3.5s", 3723.5),
                                          ("2.5", 2.5), ("bogus", None), ("5x", None),
                                          ("nan", None), ("inf", None), ("-1", None), ("-2ms", None)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == (pytest.approx(seconds) if seconds is not None else None)


def test_backoff_full_jitter_is_capped_and_honours_server():
    policy = RetryPolicy(base=0.5, cap=4.0)
    rng = random.Random(1)
    delays = [policy.delay(a, rng) for a in range(1, 12) for _ in range(50)]
    assert min(delays) >= 0.0 and max(delays) <= 4.0
    assert max(policy.delay(1, rng) for _ in range(100)) <= 0.5
    assert max(policy.delay(10, rng) for _ in range(200)) > 2.0  # grows to the cap
    assert policy.delay(3, rng, retry_after=7.0) == 7.0


NGINX_502 = (b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway</h1>"
             b"</center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n")


@pytest.mark.parametrize(
    "status,raw,kind,code,message",
    [
        # xAI's own shape: a human-readable `code` and the text under `error`
        (400, json.dumps({"code": "Client specified an invalid argument",
                          "error": "Argument not supported: size"}).encode(),
         "permanent", "Client specified an invalid argument", "Argument not supported: size"),
        (429, json.dumps({"code": "rate_limit_exceeded", "error": "Too many requests"}).encode(),
         "transient", "rate_limit_exceeded", "Too many requests"),
        (429, json.dumps({"code": "insufficient_quota", "error": "no credits"}).encode(),
         "fatal", "insufficient_quota", "no credits"),
        (500, json.dumps({"code": 500, "error": "boom"}).encode(), "transient", "500", "boom"),
        # Azure: the status repeated as a string code
        (401, json.dumps({"error": {"code": "401", "message": "Access denied due to invalid subscription key."}}
                         ).encode(), "fatal", "401", "Access denied due to invalid subscription key."),
        # proxies and frameworks
        (502, NGINX_502, "transient", None, "502 Bad Gateway"),
        (404, b"<!doctype html><html><body><p>Not <b>here</b></p></body></html>", "permanent", None, "Not here"),
        (503, b"", "transient", None, "(empty body)"),
        (400, b"upstream said no\n\x00\x1b[31m", "permanent", None, "upstream said no [31m"),
        (422, json.dumps({"detail": [{"loc": ["body", "n"], "msg": "n too large"}]}).encode(),
         "permanent", None, "n too large"),
        (400, json.dumps({"detail": "bad model"}).encode(), "permanent", None, "bad model"),
        (400, json.dumps({"errors": [{"message": "first"}, {"message": "second"}]}).encode(),
         "permanent", None, "first"),
        (400, json.dumps("just a string").encode(), "permanent", None, "just a string"),
        (400, json.dumps({"code": {"nested": 1}, "error": ["x"]}).encode(), "permanent", None, None),
        (500, b"[" * 50_000, "transient", None, None),  # deeply nested JSON must not crash
        (502, b"\xff\xfe not utf-8 \xc3", "transient", None, "not utf-8"),
    ],
)
def test_classify_any_error_body_by_status_and_code(status, raw, kind, code, message):
    err = classify(status, {}, raw)
    assert (err.kind, err.code, err.status) == (kind, code, status)
    assert err.message and "\n" not in err.message and len(err.message) <= 300
    if message is not None:
        assert message in err.message


def test_error_message_is_capped_and_one_line():
    err = classify(400, {}, json.dumps({"error": {"message": "x\n" * 5000, "code": "invalid_value"}}).encode())
    assert len(err.message) <= 300 and "\n" not in err.message and err.code == "invalid_value"
    assert len(error_message(b"y" * 100_000)) <= 300


def test_non_openai_code_that_says_policy_is_still_read_by_code_not_text():
    # the code decides; a message mentioning quota or policy decides nothing
    err = classify(400, {}, json.dumps({"code": "content_policy_violation", "error": "quota"}).encode())
    assert err.kind == "permanent" and err.code == "content_policy_violation"
    err = classify(429, {}, json.dumps({"code": "Some Code", "error": "insufficient_quota"}).encode())
    assert err.kind == "transient"
