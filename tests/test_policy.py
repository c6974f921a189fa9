from __future__ import annotations

import json
import random
from email.utils import format_datetime
from datetime import datetime, timezone

import pytest

from batcher._policy import RetryPolicy, classify, parse_duration, retry_after_seconds


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


@pytest.mark.parametrize("text,seconds", [("1s", 1.0), ("120ms", 0.12), ("6m0s", 360.0), ("1h2m3.5s", 3723.5),
                                          ("2.5", 2.5), ("bogus", None), ("5x", None)])
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
