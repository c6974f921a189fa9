from __future__ import annotations

import math

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
    limiter = RateLimiter(rpm=3000, clock=clock, sleep=clock.sleep, margin=0.0, cold_s=0.0)
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
    limiter = RateLimiter(ipm=600, clock=clock, sleep=clock.sleep, margin=0.0, cold_s=0.0)  # 10 images/s
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


def drained_headers(kind="requests", limit="3000", remaining="0", reset="1s"):
    return {f"x-ratelimit-limit-{kind}": limit, f"x-ratelimit-remaining-{kind}": remaining,
            f"x-ratelimit-reset-{kind}": reset}


def grant_times(limiter, clock, count, images=1):
    times: list[float] = []

    async def main():
        for _ in range(count):
            permit = await limiter.acquire(images)
            permit.sent()
            times.append(clock.now)

    anyio.run(main)
    return times


def test_remaining_zero_waits_for_the_permit_needed_not_the_whole_reset(clock):
    # a token bucket of one second's share: 3000 rpm advertises remaining 0..50 and reset <= 1 s
    limiter = RateLimiter(clock=clock, sleep=clock.sleep, margin=0.0, cold_s=0.0)
    limiter.observe_headers(drained_headers(reset="1s"))
    assert limiter.pause_until == 0.0  # no pool-wide stop for the reset
    assert limiter.wait_time(1) == pytest.approx(0.02)  # one permit at 50/s: 1 / 50 s
    times = grant_times(limiter, clock, 5)
    assert [t - 1000.0 for t in times] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.10])


def test_remaining_zero_counts_the_refill_from_the_send_of_that_request(clock):
    limiter = RateLimiter(clock=clock, sleep=clock.sleep, margin=0.0, cold_s=0.0)
    # the answer took 0.3 s: the server counted the request (and began refilling) when it was sent
    limiter.observe_headers(drained_headers(reset="1s"), sent_at=clock.now - 0.31)
    assert limiter.wait_time(1) == 0.0
    times = grant_times(limiter, clock, 20)
    # the 15 permits earned since the send (0.31 s at 50/s, the first at 20 ms) go now, then one per 20 ms
    assert times[14] == 1000.0 and times[15] == pytest.approx(1000.01) and times[16] == pytest.approx(1000.03)


def test_remaining_zero_waits_at_most_the_reset(clock):
    limiter = RateLimiter(clock=clock, sleep=clock.sleep, margin=0.0, cold_s=0.0)
    limiter.observe_headers(drained_headers(limit="600", reset="250ms"))  # 10/s: 0.1 s per permit
    times = grant_times(limiter, clock, 4)
    # 0.1, 0.2, then the reset (0.25 s): the bucket is whole again and the window takes over
    assert [t - 1000.0 for t in times] == pytest.approx([0.1, 0.2, 0.25, 0.25])


def test_a_full_minute_count_at_zero_paces_at_the_rate_instead_of_stopping_a_minute(clock):
    # OpenAI style: remaining counts the minute, reset up to 60 s
    limiter = RateLimiter(rpm=3000, clock=clock, sleep=clock.sleep, margin=0.0, cold_s=0.0)
    limiter.observe_headers(drained_headers(reset="59.5s"))
    times = grant_times(limiter, clock, 100)
    assert times[-1] - 1000.0 == pytest.approx(2.0)  # 100 at 50/s, not a 59.5 s stop
    assert max_in_window(times, 1.0) <= 50


def test_images_remaining_zero_waits_for_the_images_needed(clock):
    limiter = RateLimiter(ipm=600, clock=clock, sleep=clock.sleep, margin=0.0, cold_s=0.0)  # 10 images/s
    limiter.observe_headers(drained_headers("images", limit="600", reset="1s"))
    assert limiter.wait_time(4) == pytest.approx(0.4)  # 4 images at 10/s
    assert limiter.wait_time(1) == pytest.approx(0.1)


def test_remaining_zero_without_a_known_rate_waits_for_the_reset(clock):
    limiter = RateLimiter(clock=clock, sleep=clock.sleep)
    limiter.observe_headers({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "0.5"})
    assert limiter.wait_time(1) == pytest.approx(0.5)
    limiter.observe_headers({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "nan"})
    assert limiter.wait_time(1) == pytest.approx(0.5)  # an unreadable reset, no rate: nothing learned


@pytest.mark.parametrize("value", ["nan", "inf", "-5", "1e400", "soon"])
def test_hostile_reset_and_retry_after_never_schedule_a_wait_beyond_the_cap(clock, value):
    limiter = RateLimiter(clock=clock, sleep=clock.sleep)
    limiter.observe_headers(drained_headers(limit=value, remaining="0", reset=value))
    limiter.pause(float("nan"))
    limiter.pause(float("inf"))
    wait = limiter.wait_time(1)
    assert math.isfinite(wait) and 0.0 <= wait <= 60.0


def test_one_bare_429_costs_its_retry_after_and_teaches_nothing(clock):
    limiter = RateLimiter(clock=clock, sleep=clock.sleep)
    grant_times(limiter, clock, 100)  # unlimited: all at once
    limiter.on_rate_limited(retry_after=1.0)
    assert limiter.source["requests"] is None and limiter.requests.capacity is None
    times = grant_times(limiter, clock, 300)
    assert times[0] == pytest.approx(1001.0) and times[-1] == times[0]  # then the full rate at once


def test_several_429s_in_a_window_are_evidence(clock):
    limiter = RateLimiter(clock=clock, sleep=clock.sleep)
    grant_times(limiter, clock, 30)
    limiter.on_rate_limited(retry_after=0.5)
    clock.now += 0.5
    limiter.on_rate_limited(retry_after=0.5)
    assert limiter.source["requests"] == "learned" and limiter.requests.capacity == 30
    # far apart, two 429s are two hiccups
    other = RateLimiter(clock=clock, sleep=clock.sleep)
    other.on_rate_limited(retry_after=0.5)
    clock.now += 10
    other.on_rate_limited(retry_after=0.5)
    assert other.source["requests"] is None


def test_a_limit_learned_too_low_recovers_multiplicatively(clock):
    limiter = RateLimiter(clock=clock, sleep=clock.sleep, margin=0.0, cold_s=0.0)
    limiter.requests.capacity, limiter.requests.period, limiter.source["requests"] = 8, 1.0, "learned"
    limiter._last_429 = clock.now  # learned from 429s just now
    times = grant_times(limiter, clock, 2000)
    rates = [len([t for t in times if s <= t - times[0] < s + 1]) for s in range(int(times[-1] - times[0]))]
    assert rates[:4] == [8, 8, 10, 10]  # +25% after two clean, full windows...
    assert max(rates[:16]) >= 256  # ...in doubling steps: 8 -> 256 per second in 16 s, not +1 per 30 s


def test_a_failed_probe_goes_back_and_sets_a_ceiling(clock):
    limiter = RateLimiter(clock=clock, sleep=clock.sleep, margin=0.0, cold_s=0.0)
    limiter.requests.capacity, limiter.requests.period, limiter.source["requests"] = 40, 1.0, "learned"
    limiter._last_429 = clock.now  # learned from 429s just now
    grant_times(limiter, clock, 125)
    assert limiter.requests.capacity == 50  # two clean, full windows: +25%
    limiter.on_rate_limited(retry_after=0.1)  # the raise drew a 429
    assert limiter.requests.capacity == 40 and limiter._ceiling["requests"] == 50
    grant_times(limiter, clock, 2000)
    assert 40 < limiter.requests.capacity < 50  # bisects below the capacity that failed, never reaches it


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
    limiter = RateLimiter(clock=clock, sleep=clock.sleep, margin=0.0, cold_s=0.0)
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


def test_a_widened_margin_shrinks_back_after_clean_windows(clock):
    limiter = RateLimiter(rpm=600, clock=clock, sleep=clock.sleep, margin=0.01, cold_s=0.0)
    limiter.on_rate_limited(retry_after=0.05)  # 50 ms early: a load spike
    assert limiter.margin == pytest.approx(0.06)
    times = grant_times(limiter, clock, 10 * 15)  # 15 windows of 10
    assert limiter.margin < 0.06  # CALM_WINDOWS clean windows later, one step per window
    assert limiter.margin >= 0.01
    grant_times(limiter, clock, 10 * 30)
    assert limiter.margin == pytest.approx(0.01)  # back to where it started
    assert max_in_window(times, 1.0) <= 10


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
    limiter = RateLimiter(rpm=120, clock=clock, sleep=clock.sleep, margin=0.0, cold_s=0.0)  # 2 per second

    async def main():
        await limiter.acquire()
        permit = await limiter.acquire()
        assert limiter.wait_time(1) > 0
        permit.refund()
        assert limiter.wait_time(1) == 0
        permit.refund()  # idempotent
        assert limiter.requests.used(clock.now) == 1

    anyio.run(main)


def test_the_first_windows_sends_count_a_cold_start_late(clock):
    limiter = RateLimiter(rpm=60, clock=clock, sleep=clock.sleep, margin=0.0)  # 1 per second, COLD_S 0.1
    times = grant_times(limiter, clock, 3)
    # new connections and cold code: the server counts the first send up to COLD_S after sent()
    assert [t - 1000.0 for t in times] == pytest.approx([0.0, 1.0 + RateLimiter.COLD_S, 2.0 + RateLimiter.COLD_S])


def test_sent_moves_the_entry_to_the_real_send(clock):
    limiter = RateLimiter(rpm=60, clock=clock, sleep=clock.sleep, margin=0.0, cold_s=0.0)  # 1 per second

    async def main():
        permit = await limiter.acquire()
        clock.now += 0.3
        permit.sent()
        clock.now += 0.8
        assert limiter.wait_time(1) == pytest.approx(0.2)  # counted from the send, not the grant

    anyio.run(main)


def _sends(limiter, clock, count, lag, new_connection):
    sends: list[float] = []

    async def main():
        for _ in range(count):
            permit = await limiter.acquire()
            clock.now += lag  # from grant to wire: the waiter wakes, journals, (opens a connection,) writes
            permit.sent(new_connection=new_connection)
            sends.append(clock.now)

    anyio.run(main)
    return sends, [b - a for a, b in zip(sends, sends[1:])]


def test_grants_lead_their_sends_by_the_least_delay_seen_never_more_than_the_margin(clock):
    # 1 per second, 20 ms margin, answers have come back (kept-alive connections); each send is on
    # the wire 3 ms after its grant
    limiter = RateLimiter(rpm=60, clock=clock, sleep=clock.sleep, margin=0.020, cold_s=0.0)
    limiter.observe_headers({})
    sends, gaps = _sends(limiter, clock, 14, 0.003, new_connection=False)
    # until 8 delays are seen, sends drift by the delay every window; after, the grant comes 3 ms
    # early and each send lands exactly period + margin after the one before it: never sooner
    assert gaps[1] == pytest.approx(1.023)
    assert gaps[-1] == pytest.approx(1.020)
    assert limiter.leads[False] == pytest.approx(0.003)
    assert min(gaps) >= 1.020 - 1e-9


def test_a_warm_lead_never_exceeds_the_margin(clock):
    limiter = RateLimiter(rpm=60, clock=clock, sleep=clock.sleep, margin=0.002, cold_s=0.0)
    limiter.observe_headers({})
    sends, gaps = _sends(limiter, clock, 14, 0.050, new_connection=False)  # a slow machine: 50 ms
    assert limiter.leads[False] == pytest.approx(0.050)
    # capped by the margin: the next send may find its connection at once and must not land early
    assert min(gaps) >= 1.0 - 1e-9
    assert gaps[-1] == pytest.approx(1.0 + 0.050)


def test_while_every_send_opens_a_connection_grants_lead_by_the_connect_lag(clock):
    # no answer yet (20 s per image): every send opens a connection, 80 ms from grant to wire; without
    # a lead each window would start 80 ms late (a second lost every ~12 windows)
    limiter = RateLimiter(rpm=60, clock=clock, sleep=clock.sleep, margin=0.005, cold_s=0.05)
    sends, gaps = _sends(limiter, clock, 14, 0.080, new_connection=True)
    assert limiter.warm is False and limiter.leads[True] == pytest.approx(0.080)
    assert gaps[-1] == pytest.approx(1.005)  # on the wire exactly period + margin apart
    assert min(gaps) >= 1.005 - 1e-9


def test_a_windows_429s_widen_the_margin_once_by_the_earliest_of_them(clock):
    limiter = RateLimiter(rpm=3000, clock=clock, sleep=clock.sleep, margin=0.005, cold_s=0.0)
    for early in (0.002, 0.011, 0.004, 0.001):  # one burst of 429s within a window, unequally early
        limiter.on_rate_limited(retry_after=early)
        clock.now += 0.001
    assert limiter.margin == pytest.approx(0.005 + 0.011)  # not 4 steps, not the first one's 5 ms
    clock.now += 1.0  # the next window: a new step on top of the widened margin
    limiter.on_rate_limited(retry_after=0.003)
    assert limiter.margin == pytest.approx(0.016 + 0.005)


def test_a_send_on_a_new_connection_leaves_the_window_cold_s_late_once_connections_are_kept_alive(clock):
    # the server reads a send that opened a connection later (its accept): once answers have come back
    # (kept-alive connections exist), the send replacing it may reuse one and be read at once, so it
    # waits that much more; before any answer every send opens one, read as late as the one it replaces
    limiter = RateLimiter(rpm=60, clock=clock, sleep=clock.sleep, margin=0.0, cold_s=0.05)  # 1 per second

    async def main():
        limiter._first_grant = clock.now - 10  # past the run's first window
        cold = await limiter.acquire()
        cold.sent(new_connection=True)
        assert limiter.warm is False and limiter.wait_time(1) == pytest.approx(1.0)
        clock.now += 0.5
        limiter.observe_headers({})  # an answer: its connection is free for the next send
        assert limiter.warm is True and limiter.wait_time(1) == pytest.approx(0.55)
        clock.now += 0.55
        reused = await limiter.acquire()
        reused.sent(new_connection=False)
        clock.now += 0.5
        assert limiter.wait_time(1) == pytest.approx(0.5)  # a kept-alive send: no extra

    anyio.run(main)


def test_a_first_window_send_on_a_connection_opened_before_the_run_is_not_counted_late(clock):
    # the run opened the first window's connections (ImagesClient.open_connections): a send that
    # reuses one is read at once, so only one that still opened its own is counted COLD_S late
    limiter = RateLimiter(rpm=120, clock=clock, sleep=clock.sleep, margin=0.0, cold_s=0.05)  # 2 per second

    async def main():
        pooled, opened = await limiter.acquire(), await limiter.acquire()
        pooled.sent()  # the executor's stamp before sending: not known yet how it goes out
        opened.sent()
        clock.now += 0.002
        pooled.sent(new_connection=False)  # ...then the wire's, which overrides it
        opened.sent(new_connection=True)
        assert limiter.wait_time(1) == pytest.approx(1.0)  # the pooled one leaves 1 s after its wire, not 1.05
        clock.now += 1.0
        await limiter.acquire()
        assert limiter.wait_time(1) == pytest.approx(0.05)  # the other one: 1 s + COLD_S after its wire

    anyio.run(main)


def test_one_grant_at_a_time_goes_to_the_wire_when_the_sender_says_when(clock):
    # a window's grants made together all build their requests before any of them is written: the
    # next grant waits for the last one's bytes (or BATON_S at most, if they never go)
    limiter = RateLimiter(rpm=3000, clock=clock, sleep=clock.sleep, margin=0.0, cold_s=0.0)
    free = RateLimiter(rpm=3000, clock=clock, sleep=clock.sleep, margin=0.0, cold_s=0.0)
    woken: list[float] = []
    limiter.on_wire = lambda: woken.append(clock.now)

    async def main():
        first = await limiter.acquire()
        assert limiter.wait_time(1) == pytest.approx(RateLimiter.BATON_S)
        clock.now += 0.0003
        first.sent()  # the executor's stamp before sending does not pass it on
        assert limiter.wait_time(1) == pytest.approx(RateLimiter.BATON_S - 0.0003) and woken == []
        first.sent(new_connection=False)  # on the wire
        assert woken == [clock.now] and limiter.wait_time(1) == 0.0
        await limiter.acquire()  # never sent (its worker stopped): holds the next back BATON_S at most
        clock.now += RateLimiter.BATON_S
        assert limiter.wait_time(1) == 0.0 and woken == [woken[0]]
        # without a sender that stamps the wire, grants go together as before
        await free.acquire()
        assert free.wait_time(1) == 0.0

    anyio.run(main)


def test_a_queued_acquire_goes_as_soon_as_the_last_grant_is_on_the_wire():
    limiter = RateLimiter(rpm=3000)  # the real clock
    limiter.BATON_S = 30.0  # were the wire not to wake it, the acquire would wait this long
    limiter.on_wire = lambda: None
    order: list[str] = []

    async def main():
        first = await limiter.acquire()

        async def second() -> None:
            await limiter.acquire()
            order.append("granted")

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tg:
                tg.start_soon(second)
                await anyio.wait_all_tasks_blocked()
                assert limiter.waiting == 1
                order.append("wire")
                first.sent(new_connection=False)

    anyio.run(main)
    assert order == ["wire", "granted"]


def test_the_lead_also_learns_how_late_the_timer_wakes_the_waiter(clock):
    # an event loop's timers fire late (epoll counts whole milliseconds), and the waiter then builds its
    # request: 2 ms + 1 ms after the slot freed. Learned from when the window meant the grant to go
    # (not from the grant itself), the lead takes both, and the sends settle exactly period + margin apart
    async def late_sleep(seconds: float) -> None:
        await clock.sleep(seconds + 0.002)

    limiter = RateLimiter(rpm=60, clock=clock, sleep=late_sleep, margin=0.010, cold_s=0.0)  # 1 per second
    limiter.observe_headers({})
    sends, gaps = _sends(limiter, clock, 14, 0.001, new_connection=False)
    assert limiter.leads[False] == pytest.approx(0.003)
    assert gaps[1] == pytest.approx(1.013) and gaps[-1] == pytest.approx(1.010)
    assert min(gaps) >= 1.010 - 1e-9  # never sooner than period + margin


def test_a_grant_whose_request_opens_a_connection_lets_the_next_one_go_meanwhile(clock):
    # a TLS handshake is round trips, not this process's time: holding the next grant back for it
    # would cap a remote endpoint at one new connection per BATON_S (100 sends a second)
    limiter = RateLimiter(rpm=60000, clock=clock, sleep=clock.sleep, margin=0.0, cold_s=0.0)
    woken: list[float] = []
    limiter.on_wire = lambda: woken.append(clock.now)

    async def main():
        first = await limiter.acquire()
        assert limiter.wait_time(1) > 0
        first.connecting()
        assert limiter.wait_time(1) == 0.0 and woken == [clock.now]
        clock.now += 0.150  # the handshake
        first.sent(new_connection=True)  # on the wire: counted from here, nothing more to pass on
        assert woken == [woken[0]] and limiter.leads[True] == 0.0  # not timed by the window: no sample

    anyio.run(main)


def test_with_no_limit_known_grants_do_not_wait_for_the_wire(clock):
    # the order of sends matters only to a window; unlimited, the baton would only serialize them
    limiter = RateLimiter(clock=clock, sleep=clock.sleep)
    limiter.on_wire = lambda: None

    async def main():
        untimed = await limiter.acquire()
        assert limiter.wait_time(1) == 0.0
        limiter.set_limit("requests", 3000)  # learned or advertised later: from then on it does
        timed = await limiter.acquire()
        assert limiter.wait_time(1) > 0
        # ...and only then does the transport trace the send to say when it is on the wire
        assert (untimed.timed, timed.timed) == (False, True)

    anyio.run(main)
