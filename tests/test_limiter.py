from __future__ import annotations

import anyio
import pytest

from batcher._limiter import ConcurrencyController, RateLimiter, Window, window_shape


def max_in_window(times: list[float], period: float) -> int:
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - period:
            j += 1
        best = max(best, i - j + 1)
    return best


@pytest.mark.parametrize(
    "rpm,shape", [(3000, (50, 1.0)), (60000, (1000, 1.0)), (90, (2, 60 * 2 / 90)), (20, (1, 3.0))]
)
def test_window_shape(rpm, shape):
    capacity, period = window_shape(rpm)
    assert capacity == shape[0]
    assert period == pytest.approx(shape[1])
    assert capacity / period * 60 == pytest.approx(rpm)  # exactly the rate asked for


def test_window_wait_time_counts_costs():
    w = Window(10, 1.0)
    w.record(0.0, 6)
    w.record(0.5, 4)
    assert w.wait_time(0.6, 1) == pytest.approx(0.4)  # the first entry must leave
    assert w.wait_time(0.6, 6) == pytest.approx(0.4)  # freeing 6 makes room for 6
    assert w.wait_time(0.6, 7) == pytest.approx(0.9)  # 7 needs both to leave
    assert w.wait_time(1.01, 4) == 0.0


def test_first_second_share_at_once_then_sliding(clock):
    limiter = RateLimiter(rpm=3000, clock=clock, sleep=clock.sleep, margin=0.0)
    times: list[float] = []

    async def main():
        for _ in range(200):
            await limiter.acquire()
            times.append(clock.now)

    anyio.run(main)
    start = times[0]
    assert times[49] == start  # the first second's share goes at once
    assert times[50] == pytest.approx(start + 1.0)
    assert max_in_window(times, 1.0) == 50  # never more than a second's share in any second
    assert times[-1] - start == pytest.approx(3.0)  # 200 requests at 50/s: no time lost either


def test_images_per_minute_counts_n(clock):
    limiter = RateLimiter(ipm=600, clock=clock, sleep=clock.sleep, margin=0.0)  # 10 images/s
    times = []

    async def main():
        for n in [4, 4, 4, 1, 1]:
            await limiter.acquire(images=n)
            times.append(clock.now - 1000.0)

    anyio.run(main)
    assert times[:2] == [0.0, 0.0]
    assert times[2] == pytest.approx(1.0)  # 8 + 4 > 10: waits for the first 4 to leave
    assert times[3] == pytest.approx(1.0)


def test_pause_holds_everyone(clock):
    limiter = RateLimiter(rpm=6000, clock=clock, sleep=clock.sleep)
    limiter.pause(2.5)

    async def main():
        await limiter.acquire()

    anyio.run(main)
    assert clock.now == pytest.approx(1002.5)


def test_learns_limit_from_headers(clock):
    limiter = RateLimiter(clock=clock, sleep=clock.sleep)
    assert limiter.requests.capacity is None
    limiter.observe_headers({"x-ratelimit-limit-requests": "600", "x-ratelimit-limit-images": "1200"})
    assert (limiter.requests.capacity, limiter.images.capacity) == (10, 20)
    assert limiter.source["requests"] == "advertised"
    # a configured limit is kept unless the server announces a stricter one
    configured = RateLimiter(rpm=300, clock=clock, sleep=clock.sleep)
    configured.observe_headers({"x-ratelimit-limit-requests": "6000"})
    assert configured.requests.capacity == 5
    configured.observe_headers({"x-ratelimit-limit-requests": "60"})
    assert configured.requests.capacity == 1


def test_remaining_zero_pauses_until_reset(clock):
    limiter = RateLimiter(clock=clock, sleep=clock.sleep)
    limiter.observe_headers({"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "0",
                             "x-ratelimit-reset-requests": "250ms"})
    assert limiter.pause_until == pytest.approx(1000.25)


def test_learns_limit_from_429s_without_headers(clock):
    limiter = RateLimiter(clock=clock, sleep=clock.sleep)
    permits = []

    async def burst():
        for _ in range(64):
            permits.append(await limiter.acquire())

    anyio.run(burst)
    for permit in permits[50:]:  # the server took 50 of 64; the runner refunds each 429'd send
        permit.refund()
        limiter.on_rate_limited(retry_after=1.0)
    assert limiter.source["requests"] == "learned"
    assert limiter.requests.capacity == 50
    assert limiter.pause_until == pytest.approx(1001.0)


def test_learned_limit_probes_upward_after_clean_windows(clock):
    limiter = RateLimiter(clock=clock, sleep=clock.sleep, margin=0.0)
    limiter.requests.capacity, limiter.source["requests"] = 5, "learned"

    async def main():
        for _ in range(60):
            await limiter.acquire()

    anyio.run(main)
    assert limiter.requests.capacity > 5


def test_429_under_a_configured_limit_widens_the_margin(clock):
    limiter = RateLimiter(rpm=600, clock=clock, sleep=clock.sleep, margin=0.01)
    limiter.on_rate_limited(retry_after=0.1)
    assert limiter.requests.capacity == 10  # a configured limit is not changed...
    assert limiter.margin > 0.01  # ...but the slack for the trip to the server grows


def test_concurrency_starts_small_when_limit_unknown_and_opens_on_first_answer():
    async def main():
        pool = ConcurrencyController(64, limit_known=False)
        assert pool.size == 8
        pool.on_answer()
        assert pool.size == 64
        known = ConcurrencyController(64, limit_known=True)
        assert known.size == 64

    anyio.run(main)


def test_concurrency_halves_on_server_trouble_and_grows_back(clock):
    async def main():
        pool = ConcurrencyController(32, limit_known=True, clock=clock)
        for _ in range(12):
            pool.on_server_trouble()
        assert pool.size == 16
        clock.now += 5
        for _ in range(12):
            pool.on_server_trouble()
        assert pool.size == 8
        for _ in range(30):
            pool.on_success()
        assert pool.size == 32

    anyio.run(main)


def test_refund_gives_a_rejected_send_back(clock):
    limiter = RateLimiter(rpm=120, clock=clock, sleep=clock.sleep, margin=0.0)  # 2 per second

    async def main():
        await limiter.acquire()
        permit = await limiter.acquire()
        assert limiter.wait_time(1) > 0
        permit.refund()
        assert limiter.wait_time(1) == 0
        permit.refund()  # idempotent
        assert limiter.requests.used(clock.now) == 1

    anyio.run(main)


def test_sent_moves_the_entry_to_the_real_send(clock):
    limiter = RateLimiter(rpm=60, clock=clock, sleep=clock.sleep, margin=0.0)  # 1 per second

    async def main():
        permit = await limiter.acquire()
        clock.now += 0.3
        permit.sent()
        clock.now += 0.8
        assert limiter.wait_time(1) == pytest.approx(0.2)  # counted from the send, not the grant

    anyio.run(main)


def test_a_failed_probe_sets_a_ceiling(clock):
    limiter = RateLimiter(clock=clock, sleep=clock.sleep, margin=0.0)
    limiter.requests.capacity, limiter.source["requests"] = 5, "learned"
    limiter.on_rate_limited(retry_after=0.7)  # over the limit at 5: the real limit is 4
    assert limiter.requests.capacity == 4

    async def main():
        for _ in range(200):
            await limiter.acquire()

    anyio.run(main)
    assert limiter.requests.capacity == 4  # never probes back up to the capacity that failed
