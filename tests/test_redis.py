"""The Redis-shared limiter and claims: unit tests on fakeredis (its Lua runs the real scripts),
integration tests on a real redis-server started here (skipped when it is not installed)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

fakeredis = pytest.importorskip("fakeredis", reason="fakeredis[lua] is in the test extra")
pytest.importorskip("lupa", reason="fakeredis needs lupa (fakeredis[lua]) to run Lua scripts")

from batcher._limiter import Permit, RateLimiter, window_shape  # noqa: E402
from batcher._redis import (  # noqa: E402
    ClaimStore,
    SharedPermit,
    SharedRateLimiter,
    connect,
    endpoint_key,
    output_key,
)
from redis_helpers import REDIS_SERVER, RedisServer, needs_redis, redis_server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-never-stored-0123456789"


def fake() -> object:
    return fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())


def limiter(redis, rpm=None, ipm=None, ep="ep", **kw) -> SharedRateLimiter:
    return SharedRateLimiter(redis, ep, rpm=rpm, ipm=ipm, **kw)


# -- keys ---------------------------------------------------------------------------------------------

def test_endpoint_key_separates_endpoints_keys_and_models_and_hides_the_key():
    base = endpoint_key("http://a/v1", KEY, "m")
    assert len(base) == 16 and int(base, 16) >= 0
    assert endpoint_key("http://a/v1/", KEY, "m") == base  # a trailing slash is the same endpoint
    assert len({base, endpoint_key("http://b/v1", KEY, "m"), endpoint_key("http://a/v1", KEY + "x", "m"),
                endpoint_key("http://a/v1", KEY, "m2"), endpoint_key("http://a/v1", None, "m")}) == 5
    assert KEY not in base and output_key("s3://b/p") == output_key("s3://b/p/") != output_key("s3://b/q")


def test_nothing_stored_in_redis_mentions_the_key():
    async def main():
        r = fake()
        lim = limiter(r, rpm=600, ep=endpoint_key("http://a/v1", KEY, "m"))
        permit = await lim.acquire(2)
        lim.on_rate_limited(1.0)
        permit.refund()
        lim.set_limit("images", 60)
        await lim.flush()
        await ClaimStore(r, "out").claim("item", 5)
        dump = []
        for key in await r.keys("*"):
            dump.append(key)
            kind = (await r.type(key)).decode()
            if kind == "string":
                dump.append(await r.get(key))
            elif kind == "zset":
                dump += [m for m, _ in await r.zrange(key, 0, -1, withscores=True)]
            elif kind == "hash":
                dump += [v for kv in (await r.hgetall(key)).items() for v in kv]
        assert len(dump) > 4
        text = b" ".join(dump).decode()
        import hashlib
        assert KEY not in text and hashlib.sha256(KEY.encode()).hexdigest()[:16] not in text
        assert all(k.startswith(b"batcher:{") for k in await r.keys("*"))

    anyio.run(main)


# -- the window ----------------------------------------------------------------------------------------

def test_a_windows_share_is_granted_then_the_next_send_waits():
    async def main():
        r = fake()
        lim = limiter(r, rpm=600)  # 10 per 1 s
        capacity, period = window_shape(600)
        for _ in range(capacity):
            assert isinstance(await lim.acquire(), SharedPermit)
        assert lim.used["requests"] == capacity
        status, wait_us = (await lim._trip("probe", 1))[:2]
        assert status == 0 and 0 < wait_us <= (period + lim.margin) * 1e6  # grants are not stamped late
        assert await r.zcard("batcher:{ep}:requests") == capacity

    anyio.run(main)


def test_images_cost_n_and_a_refund_removes_the_members():
    async def main():
        r = fake()
        lim = limiter(r, ipm=240)  # 4 images per 1 s
        first = await lim.acquire(3)
        assert await r.zcard("batcher:{ep}:images") == 3
        assert (await lim._trip("probe", 2))[0] == 0  # 3 + 2 > 4
        first.refund()
        await lim.flush()
        assert await r.zcard("batcher:{ep}:images") == 0 and await r.zcard("batcher:{ep}:requests") == 0
        assert isinstance(await lim.acquire(4), SharedPermit)

    anyio.run(main)


def test_workers_of_another_endpoint_do_not_share_the_window():
    async def main():
        r = fake()
        a, b = limiter(r, rpm=60, ep="a"), limiter(r, rpm=60, ep="b")  # 1 per 1 s each
        await a.acquire()
        assert (await a._trip("x", 1))[0] == 0
        assert (await b._trip("y", 1))[0] == 1

    anyio.run(main)


def test_a_429_seen_by_one_worker_pauses_all_of_them():
    async def main():
        r = fake()
        a, b = limiter(r, rpm=6000), limiter(r, rpm=6000)
        await a.acquire()
        await b.acquire()
        a.on_rate_limited(5.0)
        await a.flush()
        assert a.rejections == 1
        status, wait_us = (await b._trip("b-probe", 1))[:2]
        assert status == 0 and 4.0e6 < wait_us <= 5.0e6
        # a shorter pause never shortens a longer one (SET with the max)
        b.on_rate_limited(0.5)
        await b.flush()
        assert (await a._trip("a-probe", 1))[1] > 4.0e6

    anyio.run(main)


def test_set_limit_publishes_to_every_worker():
    async def main():
        r = fake()
        a, b = limiter(r, rpm=6000), limiter(r, rpm=6000)
        a.set_limit("requests", 120)
        await a.flush()
        await b.acquire()
        assert b.shapes["requests"] == (2, 1_000_000) and b._per_minute("requests") == pytest.approx(120)
        await b.acquire()
        assert (await b._trip("probe", 1))[0] == 0  # 2 per second, for b too

    anyio.run(main)


def test_a_limit_is_learned_from_all_workers_sends_and_shared():
    async def main():
        r = fake()
        a, b = limiter(r), limiter(r)  # no limit known
        for _ in range(6):
            await a.acquire()
        for _ in range(5):
            await b.acquire()
        assert b.used["requests"] == 11
        b.on_rate_limited(None)  # the 11th send was refused...
        assert b.source["requests"] is None  # ...one 429 is not a measurement
        b.on_rate_limited(None)  # a second within the span: evidence; 10 per second is the limit
        assert b.source["requests"] == "learned"
        await b.flush()
        await a.flush()
        assert a.shapes["requests"] == (10, 1_000_000)

    anyio.run(main)


def test_advertised_limits_are_adopted_and_published():
    async def main():
        r = fake()
        a, b = limiter(r), limiter(r, rpm=6000)
        a.observe_headers({"x-ratelimit-limit-requests": "300", "x-ratelimit-limit-images": "bogus"})
        assert a.source == {"requests": "advertised", "images": None}
        await a.flush()
        await b.flush()
        assert b.shapes["requests"] == (5, 1_000_000)

    anyio.run(main)


async def redis_now_us(r) -> float:
    sec, usec = await r.time()
    return sec * 1e6 + usec


def test_first_window_sends_that_open_a_connection_are_counted_cold_and_no_others():
    async def main():
        r = fake()
        lim = limiter(r, rpm=6000, ipm=6000)  # 100 per 1 s
        opened, reused = await lim.acquire(2), await lim.acquire()
        stamped = dict(await r.zrange("batcher:{ep}:images", 0, -1, withscores=True))
        assert max(stamped.values()) <= await redis_now_us(r)  # the grants themselves are not stamped late
        opened.sent(new_connection=True)  # the first window's fresh connections: read late by the server
        reused.sent(new_connection=False)
        await lim.flush()
        after = dict(await r.zrange("batcher:{ep}:images", 0, -1, withscores=True))
        for member, score in after.items():
            moved = score - stamped[member]
            if member.decode().startswith(opened.member + ":"):
                assert SharedRateLimiter.COLD_S * 1e6 <= moved < (SharedRateLimiter.COLD_S + 0.03) * 1e6
            else:
                assert moved < 30_000  # only its own lateness (the way back of the trip)
        (_, req), = [(m, s) for m, s in await r.zrange("batcher:{ep}:requests", 0, -1, withscores=True)
                     if m.decode() == opened.member]
        assert req == after[(opened.member + ":0").encode()]  # the request moved with its images
        opened.sent(new_connection=True)  # told twice: counted cold once
        await lim.flush()
        again = dict(await r.zrange("batcher:{ep}:images", 0, -1, withscores=True))
        assert again[(opened.member + ":0").encode()] - after[(opened.member + ":0").encode()] < 30_000

    anyio.run(main)


def test_a_process_that_first_waits_for_a_full_window_is_not_counted_cold():
    async def main():
        r = fake()
        first = limiter(r, rpm=120)  # 2 per 1 s
        await first.acquire()
        await first.acquire()  # the run's first window, full
        late = limiter(r, rpm=120)  # a worker starting after it: granted a slot as it frees, ~1 s on
        with anyio.fail_after(5):
            permit = await late.acquire()
        (stamped,) = [s for m, s in await r.zrange("batcher:{ep}:requests", 0, -1, withscores=True)
                      if m.decode() == permit.member]
        permit.sent(new_connection=True)
        await late.flush()
        (moved,) = [s for m, s in await r.zrange("batcher:{ep}:requests", 0, -1, withscores=True)
                    if m.decode() == permit.member]
        assert moved - stamped < 30_000  # its connections open a slot at a time: read at once

    anyio.run(main)


def test_a_connection_opened_after_the_first_window_is_not_counted_cold():
    async def main():
        r = fake()
        lim = limiter(r, rpm=6000)
        await lim.acquire()
        lim._first_ask = anyio.current_time() - 2.0  # this process's first window is over
        permit = await lim.acquire()
        (_, stamped), = [(m, s) for m, s in await r.zrange("batcher:{ep}:requests", 0, -1, withscores=True)
                         if m.decode() == permit.member]
        permit.sent(new_connection=True)  # one fresh connection among kept-alive ones: read as fast
        await lim.flush()
        (_, moved), = [(m, s) for m, s in await r.zrange("batcher:{ep}:requests", 0, -1, withscores=True)
                       if m.decode() == permit.member]
        assert moved - stamped < 30_000

    anyio.run(main)


def test_a_send_that_leaves_late_moves_its_members_as_late():
    async def main():
        r = fake()
        lim = limiter(r, rpm=6000, ipm=6000)
        lim._first_ask = anyio.current_time() - 2.0  # warm: no cold stamp
        permit = await lim.acquire(2)
        before = dict(await r.zrange("batcher:{ep}:images", 0, -1, withscores=True))
        await anyio.sleep(0.05)  # a busy worker: the send leaves 50 ms after the grant
        permit.sent()
        await lim.flush()
        (_, req), = await r.zrange("batcher:{ep}:requests", 0, -1, withscores=True)
        after = dict(await r.zrange("batcher:{ep}:images", 0, -1, withscores=True))
        assert all(after[m] - before[m] >= 50_000 for m in before) and req == max(after.values())
        permit.refund()  # refunded after a restamp: gone for good
        await lim.flush()
        assert await r.zcard("batcher:{ep}:requests") == 0 and await r.zcard("batcher:{ep}:images") == 0

    anyio.run(main)


def test_a_widened_margin_shrinks_back_once_the_429s_stop():
    async def main():
        r = fake()
        lim = limiter(r, rpm=60000)
        base = lim.margin
        lim.on_rate_limited(0.02)  # 20 ms early, under a configured limit
        assert lim.margin == pytest.approx(base + 0.02)
        lim._last_429 -= 10.0  # ten clean seconds ago
        await lim.acquire()
        assert lim.margin == pytest.approx(base + 0.015)  # one step per clean second
        lim._last_narrow -= 10.0
        lim.margin = base + 0.001
        await lim.acquire()
        assert lim.margin == base  # never below where it started

    anyio.run(main)


def test_a_lone_429_pauses_every_worker_and_teaches_nothing():
    async def main():
        r = fake()
        a, b = limiter(r), limiter(r)
        for _ in range(5):
            await a.acquire()
        a.on_rate_limited(1.0)
        await a.flush()
        assert a.source["requests"] is None and a.shapes["requests"][0] == 0
        status, wait_us = (await b._trip("b-probe", 1))[:2]
        assert status == 0 and 0.9e6 < wait_us <= 1.0e6  # its retry-after, for everyone
        a.on_rate_limited(float("nan"))  # a hostile figure is no pause at all (and no evidence yet)
        assert a.pause_until < anyio.current_time() + 1.0

    anyio.run(main)


def drained(limit="3000", reset="1s", kind="requests"):
    return {f"x-ratelimit-limit-{kind}": limit, f"x-ratelimit-remaining-{kind}": "0",
            f"x-ratelimit-reset-{kind}": reset}


def test_remaining_zero_paces_every_worker_at_the_limits_rate_not_the_whole_reset():
    async def main():
        r = fake()
        a, b = limiter(r, rpm=600), limiter(r, rpm=600)  # 10 per second: one per 100 ms
        permit = await a.acquire()
        a.observe_headers(drained(limit="600", reset="1s"), sent_at=permit.sent_at)
        await a.flush()
        raw = (await r.hget("batcher:{ep}:limits", "drained:requests")).decode()
        nxt, until, interval = map(int, raw.split())
        assert interval == 100_000 and until - nxt > 800_000  # paced until the reset, ~1 s away
        status, wait_us = (await b._trip("b1", 1))[:2]
        assert status == 0 and 0 < wait_us <= 100_000  # the next permit at 10/s, not the reset
        await anyio.sleep(wait_us / 1e6 + 0.01)
        assert (await b._trip("b2", 1))[0] == 1  # earned: granted...
        status, wait_us = (await a._trip("a2", 1))[:2]
        assert status == 0 and 50_000 < wait_us <= 100_000  # ...and the one after is 100 ms later, for a too

    anyio.run(main)


def test_remaining_zero_waits_at_most_the_reset_and_counts_images():
    async def main():
        r = fake()
        a = limiter(r, ipm=600)  # 10 images per second
        a.observe_headers(drained(limit="600", reset="150ms", kind="images"))
        await a.flush()
        status, wait_us = (await a._trip("x", 4))[:2]
        assert status == 0 and 100_000 < wait_us <= 150_000  # 4 images at 10/s is 0.4 s, capped by the reset
        status, wait_us = (await a._trip("y", 1))[:2]
        assert status == 0 and 0 < wait_us <= 100_000  # one image: 0.1 s

    anyio.run(main)


def test_queued_pause_wakes_a_sleeping_acquirer():
    async def main():
        r = fake()
        a = limiter(r, rpm=60)  # 1 per second
        await a.acquire()
        done = []

        async def second():
            done.append(await a.acquire())

        async with anyio.create_task_group() as tg:
            tg.start_soon(second)
            await anyio.sleep(0.05)  # second is now waiting for the window
            trips = a.round_trips
            a.pause(0.3)
            await anyio.sleep(0.05)
            # the pause went out at once, on the waiter's wake-up trip, not after its wait
            assert a.round_trips > trips and await r.exists("batcher:{ep}:pause")
        assert len(done) == 1

    anyio.run(main)


# -- a process's queue, one round trip -------------------------------------------------------------------

def queued(tg, lim: SharedRateLimiter, count: int) -> list:
    """Start `count` acquirers together in `tg`; their permits land in the list returned."""
    got: list = []

    async def one() -> None:
        got.append(await lim.acquire())

    for _ in range(count):
        tg.start_soon(one)
    return got


def test_a_processs_queued_acquirers_are_granted_in_one_round_trip():
    async def main():
        r = fake()
        lim = limiter(r, rpm=3000)  # 50 per 1 s, one worker: its share is the whole window
        async with anyio.create_task_group() as tg:
            got = queued(tg, lim, 30)
        assert len(got) == 30 and len({p.member for p in got}) == 30
        # the first acquirer asked alone (the others were not queued yet), the head then for all the rest
        assert lim.round_trips <= 3
        assert await r.zcard("batcher:{ep}:requests") == 30

    anyio.run(main)


def test_a_round_trip_grants_only_what_fits_and_the_rest_wait_their_turn():
    async def main():
        r = fake()
        lim = limiter(r, rpm=600)  # 10 per 1 s
        lim._first_ask = anyio.current_time() - 2.0  # warm: no cold stamp
        async with anyio.create_task_group() as tg:
            got = queued(tg, lim, 14)
            await anyio.sleep(0.3)
            assert len(got) == 10 and await r.zcard("batcher:{ep}:requests") == 10
            assert lim.round_trips <= 3  # the rest asked once, and sleep until the window frees
            tg.cancel_scope.cancel()
        assert lim.waiting == 0 and await r.zcard("batcher:{ep}:requests") == 10  # none granted to the cancelled

    anyio.run(main)


def test_one_trip_takes_at_most_one_workers_share_of_the_window():
    async def main():
        r = fake()
        lim = limiter(r, rpm=1200, workers=4)  # 20 per 1 s over 4 workers: 5 per trip
        lim._first_ask = anyio.current_time() - 2.0
        await lim.flush()  # the limit is known before the queue forms
        async with anyio.create_task_group() as tg:
            got = queued(tg, lim, 20)
        assert len(got) == 20 and lim.round_trips >= 1 + 20 // 5  # the flush, then 5 per trip at most
        assert lim.round_trips <= 1 + 1 + 20 // 5  # plus the first acquirer's own trip

    anyio.run(main)


def test_the_script_grants_in_order_while_each_fits_counting_images_and_pacing():
    async def main():
        r = fake()
        lim = limiter(r, ipm=300)  # 5 images per 1 s
        reply = await lim._trip(["a", "b", "c"], [2, 2, 2])
        assert (reply[0], reply[8]) == (1, 2) and reply[1] > 0  # 2 + 2 fit, the third waits
        assert await r.zcard("batcher:{ep}:images") == 4 and await r.zcard("batcher:{ep}:requests") == 2
        assert (await lim._trip(["d"], [2]))[0] == 0
        paced = limiter(r, rpm=6000, ep="paced")  # remaining 0 at 10/s: one per 100 ms, not a batch
        paced.observe_headers(drained(limit="600", reset="1s"), sent_at=anyio.current_time() - 0.15)
        reply = await paced._trip(["x", "y", "z"], [1, 1, 1])
        assert reply[8] == 1  # 150 ms since the answered send earned one permit, not three...
        reply = await paced._trip(["x2", "y2"], [1, 1])
        assert reply[0] == 0 and 0 < reply[1] <= 100_000  # ...and the next one 100 ms later

    anyio.run(main)


async def slow_trips(lim: SharedRateLimiter, seconds: float) -> None:
    """Every round trip takes `seconds` longer (a loaded Redis or worker): delay before the script."""
    trip = lim._trip

    async def slow(*args, **kw):
        await anyio.sleep(seconds)
        return await trip(*args, **kw)

    lim._trip = slow


def test_a_grants_lateness_counts_from_the_middle_of_its_round_trip():
    async def main():
        r = fake()
        lim = limiter(r, rpm=6000)
        lim._first_ask = anyio.current_time() - 2.0
        await slow_trips(lim, 0.08)  # Redis stamps the grant ~80 ms into the trip
        permit = await lim.acquire()
        (_, stamped), = await r.zrange("batcher:{ep}:requests", 0, -1, withscores=True)
        permit.sent()  # right after the reply: still later than Redis's stamp by the way back
        await lim.flush()
        (_, moved), = await r.zrange("batcher:{ep}:requests", 0, -1, withscores=True)
        assert moved - stamped >= 30_000  # about half the trip (the delay is all before the script here)

    anyio.run(main)


def test_a_late_send_is_restamped_at_once_not_when_the_head_next_asks():
    async def main():
        r = fake()
        lim = limiter(r, rpm=60)  # 1 per 1 s: the second acquirer waits about a second
        lim._first_ask = anyio.current_time() - 2.0
        first = await lim.acquire()
        async with anyio.create_task_group() as tg:
            queued(tg, lim, 1)
            await anyio.sleep(0.1)  # the head is asleep until the window frees
            trips = lim.round_trips
            first.sent()  # left 100 ms after its grant
            await anyio.sleep(0.05)
            assert lim.round_trips == trips + 1 and not lim._restamps  # out on a wake-up trip
            (_, score), = await r.zrange("batcher:{ep}:requests", 0, -1, withscores=True)
            sec, usec = await r.time()
            assert sec * 1e6 + usec - score < 70_000  # moved to the real send, ~50 ms ago
            tg.cancel_scope.cancel()

    anyio.run(main)


def test_a_waiter_cancelled_during_the_round_trip_gives_its_grant_back():
    async def main():
        r = fake()
        lim = limiter(r, rpm=3000)
        lim._first_ask = anyio.current_time() - 2.0
        await lim.acquire()  # the window's state is known
        await slow_trips(lim, 0.1)
        got: list = []

        async def one(scope_out: list | None = None) -> None:
            with anyio.CancelScope() as scope:
                if scope_out is not None:
                    scope_out.append(scope)
                got.append(await lim.acquire())

        scopes: list = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(one)
            await anyio.sleep(0.01)  # the head's trip is under way...
            tg.start_soon(one, scopes)  # ...too late for this one: it waits for the next trip
            tg.start_soon(one)
            await anyio.sleep(0)
        # all three were granted (two trips), nothing leaked
        assert len(got) == 3
        victims: list = []
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(one)
            await anyio.sleep(0.01)
            tg.start_soon(one, victims)
            tg.start_soon(one)
            await anyio.sleep(0.12)  # the head's first trip is back; the second (both queued) under way
            victims[0].cancel()
        await lim.flush()
        assert len(got) == 3 + 4
        assert await r.zcard("batcher:{ep}:requests") == 1 + 3 + 4  # the cancelled waiter's grant refunded

    anyio.run(main)


def test_each_workers_share_of_the_window_follows_its_backlog():
    async def main():
        r = fake()
        a, b = limiter(r, rpm=2400, workers=2), limiter(r, rpm=2400, workers=2)  # 40 per 1 s
        for lim in (a, b):
            lim._first_ask = anyio.current_time() - 2.0
        a.backlog, b.backlog = (lambda: 30), (lambda: 10)  # items each still has to send
        assert a._room() is None  # nothing published yet: no share
        await a.acquire()
        assert a._room() is None  # alone so far
        await b.acquire()
        await a.acquire()
        assert a._backlog_total == b._backlog_total == 40
        assert a._room() == 30 - 2 and b._room() == 10 - 1  # 3/4 and 1/4 of the window
        for _ in range(9):
            await b.acquire()
        assert b._room() == 0
        b.YIELD_S = 0.5  # over its share: b lets the others take freed slots first...
        trips = b.round_trips
        got: list = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(_append, got, b)
            await anyio.sleep(0.1)
            assert b.round_trips == trips and not got  # still yielding, no trip asked
        assert len(got) == 1 and b.round_trips == trips + 1  # ...then takes what is still free
        b.backlog = lambda: 0
        assert b._room() is None  # nothing left here: no share to keep

    anyio.run(main)


async def _append(got: list, lim: SharedRateLimiter) -> None:
    got.append(await lim.acquire())


# -- Redis down ------------------------------------------------------------------------------------------

def test_redis_down_falls_back_to_a_local_share_then_rejoins(caplog):
    async def main():
        server = fakeredis.FakeServer()
        r = fakeredis.FakeAsyncRedis(server=server)
        lim = limiter(r, rpm=3000, workers=5)
        lim.RETRY_REDIS_S = 0.0  # ask Redis again at every acquire
        assert isinstance(await lim.acquire(), SharedPermit)
        queued = await lim.acquire()
        server.connected = False
        queued.refund()  # queued while Redis is away: sent when it is back
        lim.RETRY_REDIS_S = 60.0
        permits = [await lim.acquire() for _ in range(5)]
        assert all(isinstance(p, Permit) for p in permits)
        assert lim.fallback is not None and lim.outages == 1
        assert lim.fallback.requests.capacity == window_shape(3000 / 5)[0]  # 600 rpm: 10 per second
        # the fallback's window starts from this worker's own recent grants (2 shared + 5 local)
        assert lim.fallback.requests.used(anyio.current_time(), lim.margin) == 7
        lim._retry_at = 0.0
        await lim.acquire()  # still down: fallback again, no second warning
        server.connected = True
        lim._retry_at = 0.0
        back = await lim.acquire()
        assert isinstance(back, SharedPermit) and lim.fallback is None
        assert await r.zcard("batcher:{ep}:requests") == 2  # the first grant and this one; refund applied

    with caplog.at_level(logging.INFO, logger="batcher.redis"):
        anyio.run(main)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "at most 10 per 1s on its own (600 rpm of 5 workers)" in warnings[0].getMessage()
    assert any("reachable again" in r.getMessage() for r in caplog.records)


def test_the_local_share_never_exceeds_the_shared_window():
    async def main():
        server = fakeredis.FakeServer()
        lim = limiter(fakeredis.FakeAsyncRedis(server=server), rpm=120, ipm=3000, workers=4)  # 2 req, 50 img per s
        server.connected = False
        await lim.acquire()
        fb = lim.fallback
        # 2 per second over 4 workers: each one request every 2 s; images 50 // 4 = 12 per 1 s
        assert (fb.requests.capacity, fb.requests.period) == (1, 2.0)
        assert (fb.images.capacity, fb.images.period) == (12, 1.0)
        lim.set_limit("requests", 6000)  # learned while down: applied locally, shared later
        assert (fb.requests.capacity, fb.requests.period) == (25, 1.0)

    anyio.run(main)


# -- claims ----------------------------------------------------------------------------------------------

def test_claim_renew_release_are_per_token():
    async def main():
        r = fake()
        a, b = ClaimStore(r, "out"), ClaimStore(r, "out")
        assert await a.claim("x", 10) and not await b.claim("x", 10)
        assert await a.renew("x") and not await b.renew("x")
        assert not await b.release("x") and await r.get(a.key("x")) == a.token.encode()
        assert await a.release("x") and not await r.exists(a.key("x"))
        assert await b.claim("x", 10)
        assert not await a.renew("x")  # released: nothing of ours to renew
        # another output is another key space
        assert await ClaimStore(r, "other-out").claim("x", 10)

    anyio.run(main)


def test_a_finished_items_claim_says_done_and_stays_taken():
    async def main():
        r = fake()
        a, b = ClaimStore(r, "out"), ClaimStore(r, "out")
        assert await a.claim("x", 10)
        assert await b.holder("x") == a.token
        assert not await b.keep("x", 3600)  # only the holder marks it done
        assert await a.keep("x", 3600)
        assert await b.holder("x") == "done" and not await b.claim("x", 10)
        assert await r.pttl(a.key("x")) > 10_000  # kept far longer than a claim
        assert await b.holder("never-claimed") is None

    anyio.run(main)


def test_one_of_many_concurrent_claimers_wins():
    async def main():
        r = fake()
        stores = [ClaimStore(r, "out") for _ in range(20)]
        wins = []

        async def go(store):
            if await store.claim("item", 10):
                wins.append(store.token)

        async with anyio.create_task_group() as tg:
            for store in stores:
                tg.start_soon(go, store)
        assert len(wins) == 1

    anyio.run(main)


def test_held_renews_while_the_body_runs_and_releases_after():
    async def main():
        r = fake()
        a, b = ClaimStore(r, "out"), ClaimStore(r, "out")
        async with a.held("x", ttl_s=0.3) as claim:
            assert claim
            await anyio.sleep(1.0)  # > 3 ttls: only renewals keep it
            assert await r.get(a.key("x")) == a.token.encode()
            async with b.held("x", ttl_s=0.3) as other:
                assert not other
        assert claim and not await r.exists(a.key("x"))

    anyio.run(main)


def test_held_notices_a_lost_claim():
    async def main():
        r = fake()
        a = ClaimStore(r, "out")
        async with a.held("x", ttl_s=0.3) as claim:
            await r.set(a.key("x"), b"someone-else")  # as if it expired and another worker took it
            await anyio.sleep(0.5)
            assert claim.lost and not claim
        assert await r.get(a.key("x")) == b"someone-else"  # release left theirs alone

    anyio.run(main)


def test_held_releases_when_the_body_fails():
    async def main():
        r = fake()
        a = ClaimStore(r, "out")
        with pytest.raises(KeyError):
            async with a.held("x", ttl_s=5):
                raise KeyError("boom")
        assert not await r.exists(a.key("x"))

    anyio.run(main)


# -- no redis, no s3fs, unless asked -----------------------------------------------------------------------

def test_a_plain_local_run_imports_neither_redis_nor_s3fs(tmp_path):
    code = (
        "import sys, json\n"
        "import batcher, batcher._cli, batcher._shard\n"
        "from batcher._cli import main\n"
        f"rc = main(['run', {str(ROOT / 'jobs' / 'example.yaml')!r}, '--simulate', '--out', "
        f"{str(tmp_path / 'out')!r}, '--quiet'])\n"
        "print(json.dumps({'rc': rc, 'loaded': sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('redis', 's3fs', 'fakeredis', 'fsspec'))}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"rc": 0, "loaded": []}
    assert (tmp_path / "out" / "manifest.json").exists()


def test_importing_the_redis_module_does_not_import_redis(tmp_path):
    code = "import sys, batcher._redis; print('redis' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.stdout.strip() == "False", proc.stderr


# -- a real redis-server ---------------------------------------------------------------------------------------




WORKER = r"""
import json, sys, anyio
from batcher._redis import SharedRateLimiter, connect

async def main(url, count, tasks):
    redis = connect(url)
    limiter = SharedRateLimiter(redis, "shared", rpm=1200)   # 20 per 1 s
    key = "batcher:{shared}:requests"
    grants = []

    async def worker(n):
        for _ in range(n):
            permit = await limiter.acquire()
            grants.append(int(await redis.zscore(key, permit.member)))  # the server's time of the grant

    async with anyio.create_task_group() as tg:
        for _ in range(tasks):
            tg.start_soon(worker, count // tasks)
    print(json.dumps(grants))
    await redis.aclose()

anyio.run(main, sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
"""


@needs_redis
def test_concurrent_processes_never_exceed_the_window_on_the_servers_clock(redis_server, tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, redis_server.url, "20", "4"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT) for _ in range(4)]
    grants: list[int] = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        grants += json.loads(out)
    assert len(grants) == 80
    capacity, period = window_shape(1200)
    grants.sort()
    # in every span of `period` seconds at most `capacity` grants: the (i+C)-th is a period after the i-th
    gaps = [grants[i + capacity] - grants[i] for i in range(len(grants) - capacity)]
    assert min(gaps) >= period * 1e6
    # and the window was used, not serialised: a whole share went within one window
    assert grants[capacity - 1] - grants[0] < period * 1e6


CLAIMER = r"""
import json, random, sys, time, anyio
from batcher._redis import ClaimStore, connect

async def main(url, seed):
    ids = [f"item-{i}" for i in range(1000)]
    random.Random(seed).shuffle(ids)
    redis = connect(url)
    store = ClaimStore(redis, "s3://bucket/out")
    won = []
    await store.claim("warm-up-" + str(seed), 60)  # connected and scripts loaded before the start line
    await anyio.sleep(max(0.0, min(float(sys.argv[3]) - time.time(), 20.0)))  # a common start: they compete

    async def go(chunk):
        for item_id in chunk:
            if await store.claim(item_id, 60):
                won.append(item_id)

    async with anyio.create_task_group() as tg:
        for k in range(8):
            tg.start_soon(go, ids[k::8])
    print(json.dumps(won))

anyio.run(main, sys.argv[1], int(sys.argv[2]))
"""


@needs_redis
def test_concurrent_processes_claim_each_item_exactly_once(redis_server):
    start = f"{time.time() + 3.0:.3f}"  # all four processes are up and connected by then
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, redis_server.url, str(seed), start], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd=ROOT) for seed in range(4)]
    won: list[str] = []
    per_process = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        per_process.append([i for i in json.loads(out) if i.startswith("item-")])
        won += per_process[-1]
    assert sorted(won) == sorted(f"item-{i}" for i in range(1000))  # each once: none twice, none missed
    assert sum(1 for p in per_process if p) >= 2  # the processes really competed


@needs_redis
def test_killing_redis_mid_run_falls_back_and_restarting_it_rejoins(redis_server, caplog):
    async def main():
        redis = connect(redis_server.url, timeout=0.5)
        lim = SharedRateLimiter(redis, "ep", rpm=6000, workers=4)
        lim.RETRY_REDIS_S = 0.2
        for _ in range(5):
            assert isinstance(await lim.acquire(), SharedPermit)
        redis_server.kill()
        local = [await lim.acquire() for _ in range(5)]
        assert all(isinstance(p, Permit) for p in local) and lim.fallback is not None
        assert (lim.fallback.requests.capacity, lim.fallback.requests.period) == (25, 1.0)  # 100 per s / 4
        await anyio.to_thread.run_sync(redis_server.start)  # same port
        rejoined = None
        for _ in range(100):  # bounded: 100 acquires, at least 0.2 s apart when still down
            permit = await lim.acquire()
            if isinstance(permit, SharedPermit):
                rejoined = permit
                break
            await anyio.sleep(0.05)
        assert rejoined is not None and lim.fallback is None and lim.outages == 1
        assert await redis.zscore("batcher:{ep}:requests", rejoined.member) is not None
        await redis.aclose()

    with caplog.at_level(logging.INFO, logger="batcher.redis"):
        anyio.run(main)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


@needs_redis
def test_a_workers_concurrent_claims_share_a_few_connections(redis_server):
    async def main():
        from batcher._redis import POOL_CONNECTIONS

        store = ClaimStore(connect(redis_server.url), "out")
        watcher = connect(redis_server.url, connections=1)

        async def claim(i: int) -> None:
            assert await store.claim(f"item-{i}", 30)

        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                for i in range(32):  # a worker's tasks all claim their first item at once
                    tg.start_soon(claim, i)
            clients = (await watcher.info("clients"))["connected_clients"]
        # opening a connection (and its handshake) per task made each worker's first claim take
        # 0.1-0.5 s when 4 workers started together: a few connections serve them all
        assert POOL_CONNECTIONS <= 8 and clients <= 8 + 1  # (+ the watcher's own), not one per task
        assert await store.holder("item-31") == store.token
        await watcher.aclose()
        await store._redis.aclose()

    anyio.run(main)


def test_the_first_share_is_the_windows_capacity_for_connections_opened_before_the_run():
    r = fake()
    assert limiter(r, rpm=3000, workers=4).first_share() == 50  # capped by each worker's concurrency later
    assert limiter(r, rpm=3000, ipm=600).first_share() == 10
    assert limiter(r).first_share() == 0  # no limit known: nothing to open ahead


@needs_redis
def test_a_shared_limit_opens_the_first_windows_connections_before_it(redis_server, tmp_path, connections_opened):
    # its first window then leaves on connections the server accepted already: read at once, not cold
    from helpers import write_job

    from batcher import RunOptions, load_job, run_sync
    from batcher._simulator import SimulatorConfig, start_in_thread

    job = load_job(write_job(tmp_path / "job.yaml", [f"a small red square #{i}" for i in range(30)],
                             defaults={"size": "8x8"}))
    with start_in_thread(SimulatorConfig()) as sim:
        result = run_sync(job, RunOptions(out=str(tmp_path / "out"), base_url=sim.base_url, api_key="k", timeout=10,
                                          rpm=1200, concurrency=16, limiter=redis_server.url))
    asked = [count for count, _ in connections_opened]
    assert result.summary["done"] == 30 and asked == [16]  # min(the window's 20, the concurrency, 30 left)
