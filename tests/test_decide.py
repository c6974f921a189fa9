"""The failure decision as a table: an error and the run's state in, Retry | Fail | Retire | Hold out."""

from __future__ import annotations

import random

import pytest

from batcher._exceptions import FatalError, PermanentError, TransientError
from batcher._policy import Fail, FailureState, Hold, Retire, Retry, RetryPolicy, classify, decide

POLICY = RetryPolicy(max_attempts=3, base=1.0, cap=8.0)


def answer(status: int, code: str | None = None, etype: str = "invalid_request_error", **headers: str):
    import json
    raw = json.dumps({"error": {"message": "m", "type": etype, "code": code}}).encode()
    return classify(status, headers, raw)


S = FailureState  # short


@pytest.mark.parametrize(
    "exc,state,expected",
    [
        # fatal: the endpoint retires, whatever the item's history or the run's state
        (answer(401, "invalid_api_key"), S(tries=1), Retire),
        (answer(403), S(tries=3, stopping=True), Retire),
        (answer(429, "insufficient_quota", "insufficient_quota"), S(tries=1), Retire),
        # permanent: the item fails at once, even on its first try and while stopping
        (answer(400, "content_policy_violation"), S(tries=1, policy_violations=1), Fail),
        (answer(404), S(tries=1, stopping=True), Fail),
        (answer(422), S(tries=1), Fail),
        # transient: retried while attempts remain ...
        (answer(429, "rate_limit_exceeded", "requests"), S(tries=1), Retry),
        (answer(503, "server_error", "server_error"), S(tries=2), Retry),
        (TransientError("no answer", code="timeout"), S(tries=1), Retry),
        # ... failed when they are used up ...
        (answer(500), S(tries=3), Fail),
        (TransientError("dropped", code="connection_error"), S(tries=3), Fail),
        # ... and held pending when the run is stopping
        (answer(429, "rate_limit_exceeded", "requests"), S(tries=1, stopping=True), Hold),
        (answer(500), S(tries=3, stopping=True), Hold),
    ],
)
def test_decision_table(exc, state, expected):
    assert isinstance(decide(exc, state, POLICY, random.Random(1)), expected)


def test_policy_rejections_stop_the_run_at_the_limit_and_not_before():
    exc = answer(400, "content_policy_violation")
    below = decide(exc, S(tries=1, policy_violations=4, max_policy_violations=5), POLICY)
    at = decide(exc, S(tries=1, policy_violations=5, max_policy_violations=5), POLICY)
    unlimited = decide(exc, S(tries=1, policy_violations=10_000, max_policy_violations=0), POLICY)
    assert below == Fail() and unlimited == Fail()
    assert isinstance(at, Fail) and at.stop is not None and "--max-policy-violations 5" in at.stop
    # another permanent error never counts toward the policy stop
    assert decide(answer(400, "invalid_value"), S(tries=1, policy_violations=5, max_policy_violations=5),
                  POLICY) == Fail()


@pytest.mark.parametrize(
    "exc,healthy,pin",
    [
        (TransientError("no answer", code="timeout"), True, True),          # may have been generated there
        (TransientError("bad body", status=200, code="malformed_response"), True, True),
        (TransientError("no answer", code="timeout"), False, False),        # circuit open: go elsewhere
        (answer(503), True, False),                                          # a clear error: nothing generated
        (answer(429, "rate_limit_exceeded", "requests"), True, False),
    ],
)
def test_retry_is_pinned_only_when_the_attempt_may_have_been_generated(exc, healthy, pin):
    decision = decide(exc, S(tries=1, endpoint_healthy=healthy), POLICY)
    assert isinstance(decision, Retry) and decision.pin is pin


def test_retry_delay_honours_the_servers_wait_else_backs_off_within_the_policy():
    told = answer(429, "rate_limit_exceeded", "requests", **{"retry-after-ms": "2500"})
    assert decide(told, S(tries=1), POLICY) == Retry(2.5)
    delays = [decide(answer(500), S(tries=2), POLICY, random.Random(seed)) for seed in range(50)]
    assert all(isinstance(d, Retry) and 0.0 <= d.delay <= 2.0 for d in delays)  # full jitter up to base·2
    assert len({d.delay for d in delays if isinstance(d, Retry)}) > 1


def test_error_kinds_are_the_three_request_errors():
    # the table above covers each class the client raises
    assert {type(answer(401)), type(answer(400)), type(answer(500))} == {FatalError, PermanentError, TransientError}
