"""Many workers, one limit: a rate limiter and item claims shared through Redis (extra `redis`).

    >>> redis = connect("redis://redis:6379/0")
    >>> limiter = SharedRateLimiter(redis, endpoint_key(base_url, api_key, model), rpm=3000, workers=8)
    >>> permit = await limiter.acquire(images=1)       # same interface as RateLimiter
    >>> claims = ClaimStore(redis, output="s3://bucket/run")
    >>> async with claims.held(item.id, ttl_s=120) as claim:
    ...     if claim: ...                              # exactly one worker gets here per item

`redis` is imported only by `connect()`, i.e. only when a `redis://` limiter is asked for.

A process's acquirers queue first come, first served, and the head of the queue asks for the
whole queue (at most one worker's share of a window, capacity ÷ workers) in ONE round trip: a Lua
script (EVALSHA) that reads the server's clock (`TIME`), so worker clocks never matter, applies
this worker's pending refunds, restamps, pause and published limits, then records every waiter
that fits now in the sliding windows (sorted sets of send times, one member per request and one
per image), in order, and answers how long the first one that does not fit must wait. So a
worker's rate does not depend on its round-trip time (one trip per request capped a lone worker
at 1/RTT: 25 to 40 per second with 25-40 ms trips on a loaded machine).
A grant is stamped with Redis's time; its send leaves later (the reply's way back, the waiter's
wake-up, its journal line), and `SharedPermit.sent()` moves its members that much later. Those
restamps wake the head, so they reach Redis at once rather than on the next grant: until then,
other workers would plan the next window from too early a stamp (a batch granted at once and
restamped late drew 14-40 429s a run).
`Permit.refund()`, `pause()` and `set_limit()` are synchronous, as in `RateLimiter`: they are
queued and ride on the next round trip, which they also wake, so there is no background task
(with nobody queued, they wait for this process's next acquire or `flush()`).

Keys, per endpoint (`{...}` is a Redis Cluster hash tag: one endpoint's keys share a slot):

    batcher:{EP}:requests    sorted set, a member per granted request, scored by server time (µs)
    batcher:{EP}:images      sorted set, a member per granted image
    batcher:{EP}:pause       server time (µs) until which nobody sends (a 429 seen by anyone)
    batcher:{EP}:limits      hash kind -> "capacity period_us": a limit advertised or learned;
                             drained:kind -> "next_us until_us interval_us": the server said none
                             remain, so that kind is paced one unit per interval until `until`
    batcher:{EP}:backlog     hash worker token -> "items still to send, server time (µs)": each
                             worker's share of the request window follows its part of the total
    batcher:{OUT}:claim:ID   the worker token holding item ID of output OUT

EP = sha256(base_url, sha256(api key)[:16], model)[:16]: the key itself never leaves the process.

When Redis stops answering (refused, reset, timeout), the limiter falls back to a local
`RateLimiter` at limit ÷ `workers`, logs one warning, asks Redis again every few seconds and
rejoins when it answers. Nothing is lost: a grant is either in Redis or in the local window.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import secrets
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio

from ._exceptions import BatcherError
from ._limiter import Permit, RateLimiter, _Waiter, advertised, window_shape
from ._policy import MAX_WAIT_S

__all__ = [
    "connect",
    "endpoint_key",
    "output_key",
    "SharedRateLimiter",
    "SharedPermit",
    "ClaimStore",
    "Claim",
]

log = logging.getLogger("batcher.redis")

KINDS = ("requests", "images")

# KEYS: 1 requests zset, 2 images zset, 3 pause-until, 4 limits hash
# ARGV: 1 members, one per waiter, space-separated, 2 their images, space-separated ("" or "0": only apply what is
#       queued), 3 requests capacity (0: no limit),
#       4 requests period µs, 5 images capacity, 6 images period µs, 7 margin µs, 8 pause µs from now
#       (0: none), 9 requests limit to publish ("" none), 10 images limit to publish, 11 requests drained
#       ("interval_us reset_us age_us": the server said none remain; "" none), 12 images drained,
#       13 µs to stamp this grant late (batcher sends 0 since a first-window send that opened a connection
#       is restamped COLD_S late instead, SharedPermit.sent; older workers' 100 ms read the same), 14 restamps "member images µs ..."
#       (granted sends that left late: their members move that much later), 15 "token backlog": this worker's
#       items still to send ("" none), 16.. refunds as member, images pairs
# Waiters are granted in order while each fits now (a process's queue in one trip); the first that
# does not fit ends the grant, and the wait returned is its wait.
# KEYS: 5 backlog hash: token -> "items-still-to-send server-µs", per worker
# Returns {status, wait µs, requests used, images used, req cap, req period µs, img cap, img period µs, granted,
#          all live workers' backlog (0: none published)}
# status: 1 granted (at least the first), 0 wait, 2 nothing asked.
ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
-- whole numbers as strings: Lua's default number format keeps only 14 digits
local function int(x) return string.format('%d', math.floor(x)) end
local margin = tonumber(ARGV[7])
for i = 16, #ARGV, 2 do
  redis.call('ZREM', KEYS[1], ARGV[i])
  for j = 0, tonumber(ARGV[i + 1]) - 1 do redis.call('ZREM', KEYS[2], ARGV[i] .. ':' .. j) end
end
for m, k, d in string.gmatch(ARGV[14], '(%S+) (%d+) (%d+)') do
  redis.call('ZADD', KEYS[1], 'XX', 'INCR', d, m)  -- XX: a refunded or expired member stays gone
  for j = 0, tonumber(k) - 1 do redis.call('ZADD', KEYS[2], 'XX', 'INCR', d, m .. ':' .. j) end
end
local pause = tonumber(redis.call('GET', KEYS[3]) or '0')
local p = tonumber(ARGV[8])
if p > 0 and now + p > pause then
  pause = now + p
  redis.call('SET', KEYS[3], int(pause), 'PX', int(p / 1000 + 1000))
end
if ARGV[9] ~= '' then redis.call('HSET', KEYS[4], 'requests', ARGV[9]) end
if ARGV[10] ~= '' then redis.call('HSET', KEYS[4], 'images', ARGV[10]) end
local function shape(field, cap, period)
  local v = redis.call('HGET', KEYS[4], field)
  if v then
    local c, pp = string.match(v, '^(%d+) (%d+)$')
    if c then return tonumber(c), tonumber(pp) end
  end
  return tonumber(cap), tonumber(period)
end
local rc, rp = shape('requests', ARGV[3], ARGV[4])
local ic, ip = shape('images', ARGV[5], ARGV[6])
-- a drained kind (RateLimiter's Drained): the next unit is earned at `next`, one per `interval`
-- (0: no rate known, wait for `until`); the refill counts from the send the server answered
local function drained(kind)
  local v = redis.call('HGET', KEYS[4], 'drained:' .. kind)
  if not v then return nil end
  local nx, un, iv = string.match(v, '^(%d+) (%d+) (%d+)$')
  if not nx or tonumber(un) <= now then return nil end
  return {tonumber(nx), tonumber(un), tonumber(iv)}
end
local function observe(kind, arg)
  if arg == '' then return end
  local iv, reset, age = string.match(arg, '^(%d+) (%d+) (%d+)$')
  if not iv then return end
  iv, reset, age = tonumber(iv), tonumber(reset), tonumber(age)
  local d = drained(kind)
  if d == nil then d = {now - math.min(age, now) + iv, 0, iv} end
  d[2], d[3] = math.max(d[2], now + reset), iv
  redis.call('HSET', KEYS[4], 'drained:' .. kind, int(d[1]) .. ' ' .. int(d[2]) .. ' ' .. int(d[3]))
end
observe('requests', ARGV[11])
observe('images', ARGV[12])
local function drained_wait(d, cost)
  if d == nil then return 0 end
  local ready = d[2]
  if d[3] > 0 then ready = math.min(d[1] + (math.max(cost, 1) - 1) * d[3], d[2]) end
  return math.max(ready - now, 0)
end
local function window(key, cap, period, cost)
  local horizon = period + margin
  redis.call('ZREMRANGEBYSCORE', key, '-inf', int(now - horizon))
  local used = redis.call('ZCARD', key)
  if cap == 0 or used == 0 or used + cost <= cap then return used, 0 end
  local idx = math.min(used + cost - cap, used) - 1
  local entry = redis.call('ZRANGE', key, idx, idx, 'WITHSCORES')
  return used, math.max(tonumber(entry[2]) + horizon - now, 1)
end
-- each worker's items still to send, seen within 2 s: shares of the window follow them
local backlog = 0
if ARGV[15] ~= '' then
  local tok, b = string.match(ARGV[15], '^(%S+) (%d+)$')
  if tok then redis.call('HSET', KEYS[5], tok, b .. ' ' .. int(now)) end
  local all = redis.call('HGETALL', KEYS[5])
  for i = 1, #all, 2 do
    local b2, seen = string.match(all[i + 1], '^(%d+) (%d+)$')
    if b2 and tonumber(seen) > now - 2000000 then backlog = backlog + tonumber(b2)
    else redis.call('HDEL', KEYS[5], all[i]) end
  end
  redis.call('PEXPIRE', KEYS[5], 10000)
end
local members, costs = {}, {}
for m in string.gmatch(ARGV[1], '%S+') do members[#members + 1] = m end
for c in string.gmatch(ARGV[2], '%d+') do costs[#costs + 1] = tonumber(c) end
local n = #members
if costs[1] == nil or costs[1] == 0 then n = 0 end
local ru, rw = window(KEYS[1], rc, rp, 1)
local iu, iw = window(KEYS[2], ic, ip, math.max(costs[1] or 1, 1))
if n == 0 then return {2, 0, ru, iu, rc, rp, ic, ip, 0, backlog} end
local rd, id = drained('requests'), drained('images')
local at = now + tonumber(ARGV[13])
local granted, wait = 0, 0
for i = 1, n do
  local cost = costs[i] or 1
  if i > 1 then
    ru, rw = window(KEYS[1], rc, rp, 1)
    iu, iw = window(KEYS[2], ic, ip, math.max(cost, 1))
  end
  wait = math.max(pause - now, rw, iw, drained_wait(rd, 1), drained_wait(id, cost))
  if wait > 0 then break end
  if rd ~= nil and rd[3] > 0 then rd[1] = rd[1] + rd[3] end
  if id ~= nil and id[3] > 0 then id[1] = id[1] + cost * id[3] end
  redis.call('ZADD', KEYS[1], int(at), members[i])
  for j = 0, cost - 1 do redis.call('ZADD', KEYS[2], int(at), members[i] .. ':' .. j) end
  ru, iu, granted = ru + 1, iu + cost, granted + 1
end
if granted == 0 then return {0, math.max(wait, 1), ru, iu, rc, rp, ic, ip, 0, backlog} end
for _, e in ipairs({{'requests', rd}, {'images', id}}) do
  local d = e[2]
  if d ~= nil and d[3] > 0 then
    redis.call('HSET', KEYS[4], 'drained:' .. e[1], int(d[1]) .. ' ' .. int(d[2]) .. ' ' .. int(d[3]))
  end
end
local ttl = int((math.max(rp, ip) + margin + tonumber(ARGV[13])) / 1000 + 1000)
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
redis.call('PEXPIRE', KEYS[4], 600000)
return {1, wait, ru, iu, rc, rp, ic, ip, granted, backlog}
"""

# KEYS: 1 claim key; ARGV: 1 token, 2 ttl ms. Renew only a claim that is still ours.
RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
# KEYS: 1 claim key; ARGV: 1 token, 2 ttl ms. Mark our claim as a finished item's.
DONE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('SET', KEYS[1], 'done', 'PX', ARGV[2]) and 1 end
return 0
"""
DONE = "done"
# KEYS: 1 claim key; ARGV: 1 token. Release only a claim that is still ours.
RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


# Connections one client opens to Redis, at most. A worker's tasks all claim their first item at
# once: with a connection each (redis-py's default pool), 4 workers starting together opened ~130
# connections with their handshakes, and each worker's first claim took 0.1-0.5 s (bench/shards.py,
# load 3): the first window's 50 sends then waited for the second worker up. Commands take well
# under a millisecond on a few shared connections; a caller waits at most `timeout` for a free one.
POOL_CONNECTIONS = 4


def connect(url: str, *, timeout: float = 1.0, connections: int = POOL_CONNECTIONS) -> Any:
    """A `redis.asyncio.Redis` for `url` (redis:// or rediss://) that fails fast instead of retrying:
    the limiter has its own fallback, and a stalled call would stall every worker behind it. At most
    `connections` connections; a command waits up to `timeout` for one (then: Redis is away)."""
    try:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
    except ImportError:
        raise BatcherError(f"a Redis limiter ({url.split('@')[-1]}) needs the redis extra: "
                           f"pip install 'batcher[redis]'") from None
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=max(1, connections), timeout=timeout, socket_timeout=timeout,
        socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0))
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: closing it closes the connections


def _down_errors() -> tuple[type[BaseException], ...]:
    """The errors that mean "Redis is not answering" (imported lazily, like redis itself)."""
    import redis.exceptions

    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError, TimeoutError)


def _digest(*parts: str | None) -> str:
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def endpoint_key(base_url: str, api_key: str | None, model: str | None) -> str:
    """16 hex digits naming one endpoint + key + model: workers with the same three share a limit.

    The key enters only as sha256(key)[:16]; neither it nor that digest alone is stored.
    """
    key_fp = hashlib.sha256(api_key.encode()).hexdigest()[:16] if api_key else None
    return _digest(base_url.rstrip("/"), key_fp, model)


def output_key(output: str) -> str:
    """16 hex digits naming one output (local path or s3:// URL): claims are per output."""
    return _digest(str(output).rstrip("/"))


def _shape(per_minute: float | None) -> tuple[int, int]:
    """(capacity, period µs) for the script; (0, 1 s) means no limit (sends are still counted)."""
    if not per_minute:
        return 0, 1_000_000
    capacity, period = window_shape(per_minute)
    return capacity, round(period * 1e6)


class SharedPermit:
    """A send granted by Redis, stamped with Redis's clock. `sent()` moves its members later by
    however long the worker took to send it (with the next round trip); `refund()` removes them
    on the next round trip."""

    __slots__ = ("_cold", "_limiter", "images", "member", "sent_at")
    # always: a shared window's grants are restamped when their sends reach the wire (`sent`), the
    # first window's cold ones too, whether or not this process knows the limit yet
    timed = True

    def __init__(self, limiter: SharedRateLimiter, member: str, images: int, granted_at: float | None = None,
                 cold: float = 0.0) -> None:
        self._limiter = limiter
        self.member = member
        self.images = images
        self._cold = cold  # how much later the server may count it if it opens a connection
        # when Redis stamped it, on the local clock: the middle of the round trip that granted it
        # (the reply's way back is as late as the send, and is counted so)
        self.sent_at = anyio.current_time() if granted_at is None else granted_at

    def sent(self, new_connection: bool | None = None) -> None:
        """The request leaves now: if that is later than the grant (a busy worker), its members
        move as late, with the next round trip, so no worker's next window lands early.

        `new_connection` (the transport says it once the request is on the wire): a send granted in
        this process's first window that opened its connection moves `SharedRateLimiter.cold_s`
        later still: the server reads such a burst of fresh connections late, and the kept-alive
        send that replaces it in the next window must not land inside the server's count of it."""
        now = anyio.current_time()
        late = now - self.sent_at
        if new_connection:
            late += self._cold
            self._cold = 0.0  # once
        self.sent_at = now
        if late >= 0.001:
            self._limiter._queue_restamp(self.member, self.images, late)

    def connecting(self) -> None:
        """The request starts opening a connection: nothing to pass on (grants come per Redis trip,
        not one at a time to the wire as `Permit.connecting` lets the next one go)."""

    def refund(self) -> None:
        self._limiter._queue_refund(self.member, self.images)


class SharedRateLimiter:
    """`RateLimiter`'s interface over Redis: every worker of every process shares one window.

    `workers` is how many processes are expected to share the limit; with Redis gone each takes
    limit ÷ workers locally until it is back.
    """

    RETRY_REDIS_S = 3.0  # while Redis is down, ask again this often
    MAX_WAIT_S = 1.0  # re-ask at least this often: another worker may publish a pause or a limit
    MAX_MARGIN_S = 0.200
    MAX_BATCH = 64  # waiters asked for in one round trip (its arguments stay small)
    YIELD_S = 0.02  # a worker over its share waits this long for the others before taking a freed slot
    # A send that opened its connection, granted within a window of this process's first ask, is
    # counted this late (SharedPermit.sent, _cold): a first window sent on fresh connections is a
    # burst the server reads late (most now go on connections opened before it: first_share).
    # bench/shards.py, the simulator's own admission times (load 2-5): such requests admitted 1-76 ms
    # (median), up to 127 ms, after their accept (one run at load 6: 263 ms, 19 429s); connections
    # opened later 1-6 ms, like kept-alive sends, and a cold stamp on them (tried) cost ~50 ms to
    # every window that opened one. Was 100 ms on every grant of a process's first second.
    COLD_S = RateLimiter.COLD_S

    def __init__(
        self,
        redis: Any,
        endpoint: str,
        rpm: float | None = None,
        ipm: float | None = None,
        *,
        workers: int = 1,
        margin: float = 0.020,
        timeout: float = 1.0,
        cold_s: float | None = None,
    ) -> None:
        self._redis = connect(redis, timeout=timeout) if isinstance(redis, str) else redis
        self.endpoint = endpoint
        self.workers = max(1, workers)
        self.cold_s = self.COLD_S if cold_s is None else cold_s
        # above RateLimiter's: the gap from a send to the server's count varies more across
        # processes than within one. 20 ms (was 30, before sends were restamped from the middle
        # of the granting trip): bench/shards.py rows 1, 7, 8 at load 1-2 gave 0.946-0.957 and no
        # 429 (30 ms: 0.927-0.947); 15 ms at load 4-6 drew up to 10 429s a row, and 10 or 15 ms again
        # at load 2-5 with first-window cold stamps (3-16 429s a row). 429s widen it.
        self.margin = margin
        self.base_margin = margin  # a margin widened by 429s shrinks back to this (RateLimiter's rule)
        self._last_429 = -1e9
        self._last_narrow = -1e9
        self.timeout = timeout
        self._prefix = f"batcher:{{{endpoint}}}:"
        self._keys = [self._prefix + "requests", self._prefix + "images", self._prefix + "pause",
                      self._prefix + "limits", self._prefix + "backlog"]
        # this process's items still to send (the runner sets it): each worker's share of a window
        # follows its backlog, so shards of unequal size or start finish together
        self.backlog: Callable[[], int] | None = None
        self._backlog_total = 0  # every live worker's, at the last trip
        self._yielded = False
        self._script = self._redis.register_script(ACQUIRE_LUA)
        self._down = _down_errors()
        self._token = secrets.token_hex(6)
        self._seq = 0
        # the limit the caller was given, and the one in force (read back from Redis on every trip)
        self._configured = {"requests": _shape(rpm), "images": _shape(ipm)}
        self.shapes: dict[str, tuple[int, int]] = dict(self._configured)
        self.used = {"requests": 0, "images": 0}  # all workers' sends in the window, at the last trip
        self.source: dict[str, str | None] = {"requests": "configured" if rpm else None,
                                              "images": "configured" if ipm else None}
        self.rejections = 0
        self.pause_until = 0.0  # local clock; also queued for Redis
        self._last_widen = -1e9
        self._refunds: list[tuple[str, int]] = []
        self._publish: dict[str, str] = {}
        self._drained: dict[str, str] = {}  # kind -> "interval_us reset_us age_us", rides the next trip
        self._429s: dict[str, deque[float]] = {kind: deque() for kind in KINDS}
        self._first_ask: float | None = None  # local clock: this process's first trip for a grant
        self._restamps: list[str] = []
        self._pause_queued = False
        self._wake = anyio.Event()
        self._lock = anyio.Lock()  # one round trip at a time (the queue's head, or a flush)
        self._queue: deque[_Waiter[SharedPermit | Permit]] = deque()  # this process's acquirers, first come first served
        self._next_try_at = 0.0  # local clock: the head's next trip (Redis said the first waiter waits)
        self.fallback: RateLimiter | None = None
        self._retry_at = 0.0
        self.outages = 0
        self.round_trips = 0
        # this process's own recent grants (local clock): they seed the fallback's windows, so
        # that losing Redis does not also forget what this worker sent a moment ago
        self._recent: deque[tuple[float, int]] = deque()

    # -- the RateLimiter interface -------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Acquirers queued in this process (as `RateLimiter.waiting`)."""
        return len(self._queue)

    async def acquire(self, images: int = 1) -> SharedPermit | Permit:
        """Wait until one request for `images` images may be sent by any worker; count it.

        This process's acquirers queue first come, first served; the head asks Redis for the whole
        queue in one round trip and every waiter that fits the shared window now is granted at
        once, so one process can send a window's share without a round trip per request.
        """
        if not self._queue and self.fallback is not None and anyio.current_time() < self._retry_at:
            return await self.fallback.acquire(images)
        waiter: _Waiter[SharedPermit | Permit] = _Waiter(images)
        self._queue.append(waiter)
        try:
            while waiter.permit is None:
                if self._queue[0] is not waiter:
                    await waiter.event.wait()
                    waiter.event = anyio.Event()
                elif self.fallback is not None and anyio.current_time() < self._retry_at:
                    self._queue.popleft()
                    self._hand_on()
                    return await self.fallback.acquire(images)
                else:
                    await self._serve_queue()
        finally:
            if waiter.permit is None and any(w is waiter for w in self._queue):  # cancelled while queued
                was_head = self._queue[0] is waiter
                self._queue.remove(waiter)
                if was_head:
                    self._hand_on()
        return waiter.permit

    def first_share(self) -> int:
        """Connections to open before the first send (`SyncExecutor.open`, as `RateLimiter.first_share`):
        the window's capacity (0: no limit known yet). The first window then leaves on kept-alive
        connections, read at once and not counted cold (see SharedPermit.sent); the executor caps it
        at this worker's concurrency and its requests left."""
        shares = [capacity for capacity, _ in self.shapes.values() if capacity]
        return min(shares) if shares else 0

    def _fair_batch(self) -> int:
        """At most one worker's share of a window per trip (capacity ÷ workers, rounded up): the
        process that wins the race for freed slots does not take them all, and one left alone
        still takes a whole window in a few trips."""
        shares = [math.ceil(capacity / self.workers) for capacity, _ in self.shapes.values() if capacity]
        return max(1, min([self.MAX_BATCH, *shares]))

    def _room(self) -> int | None:
        """Grants left in this worker's share of the request window (its backlog's part of every
        live worker's backlog), or None when no share applies (no backlog known, or alone)."""
        capacity, period_us = self.shapes["requests"]
        if self.backlog is None or not capacity or self._backlog_total <= 0:
            return None
        mine = max(0, int(self.backlog()))
        if mine == 0 or mine >= self._backlog_total:
            return None  # nothing queued here, or alone (the others have nothing left to send)
        share = math.ceil(capacity * mine / self._backlog_total)
        since = anyio.current_time() - period_us / 1e6
        return share - sum(1 for at, _ in self._recent if at > since)

    def _cold(self, now: float) -> float:
        """`cold_s` for a grant within a window's length of this process's first ask. A process
        that starts with the run sends its share at once, on fresh connections, to a server that
        is starting too; one that first asks when the window is full is granted slot by slot as
        they free (bench/shards.py: such connections were read 1-5 ms after their accept)."""
        period = max(period_us for _, period_us in self.shapes.values()) / 1e6
        return self.cold_s if self._first_ask is not None and now - self._first_ask < period else 0.0

    def _hand_on(self) -> None:
        if self._queue:
            self._queue[0].event.set()  # the new head takes over the round trips

    async def _serve_queue(self) -> None:
        """One round trip for the head of the queue and the waiters behind it; grants what fits,
        else sleeps until the first waiter could fit (or something queued here wakes it)."""
        wait = self._next_try_at - anyio.current_time()
        if wait > 0:
            with anyio.move_on_after(min(wait, self.MAX_WAIT_S)):
                await self._wake.wait()  # a pause, refund, limit or late send queued here goes out at once
            self._next_try_at = 0.0
            return
        size = min(len(self._queue), self._fair_batch())
        room = self._room()
        if room is not None and room <= 0 and not self._yielded:
            # over this worker's share: the others, woken for the same freed slots, go first;
            # what they leave is taken after YIELD_S (no slot stays idle for a share)
            self._yielded = True
            await anyio.sleep(self.YIELD_S)  # not cut short by a wake: restamps come every few ms
            return
        if room is not None and room > 0:
            size = min(size, room)
        batch = [self._queue[i] for i in range(size)]
        members = []
        for _ in batch:
            self._seq += 1
            members.append(f"{self._token}:{self._seq}")
        self._wake = anyio.Event()  # before the trip: nothing queued meanwhile is missed
        try:
            async with self._lock:
                asked_at = anyio.current_time()
                if self._first_ask is None:
                    self._first_ask = asked_at
                reply = await self._trip(members, [w.images for w in batch])
        except self._down as exc:
            self._lose_redis(exc)
            return
        self._rejoin()
        granted, wait_us = int(reply[8]), int(reply[1])
        now = anyio.current_time()
        stamped_at = (asked_at + now) / 2  # Redis's TIME, about half way
        self._next_try_at = now + min(wait_us / 1e6, self.MAX_WAIT_S) if wait_us else 0.0
        for w, member in zip(batch[:granted], members[:granted], strict=True):
            if not any(q is w for q in self._queue):  # cancelled during the trip: give its grant back
                self._queue_refund(member, w.images)
                continue
            self._queue.remove(w)
            self._remember(w.images)
            w.permit = SharedPermit(self, member, w.images, stamped_at, self._cold(now))
            w.event.set()
        if granted:
            self._yielded = False
            self._maybe_narrow()
            self._hand_on()

    async def flush(self) -> None:
        """Send what is queued (refunds, pause, limits) now instead of with the next acquire."""
        async with self._lock:
            if self.fallback is None or anyio.current_time() >= self._retry_at:
                try:
                    await self._trip([], [])
                except self._down as exc:
                    self._lose_redis(exc)
                else:
                    self._rejoin()

    def pause(self, seconds: float) -> None:
        """Hold every worker, in every process, for `seconds` (finite, at most MAX_WAIT_S)."""
        if not (math.isfinite(seconds) and seconds > 0):
            return
        seconds = min(seconds, MAX_WAIT_S)
        self.pause_until = max(self.pause_until, anyio.current_time() + seconds)
        self._pause_queued = True
        if self.fallback is not None:
            self.fallback.pause(seconds)
        self._wake.set()

    def set_limit(self, kind: str, per_minute: float) -> None:
        """Adopt a limit and publish it: every worker uses it from its next acquire."""
        capacity, period_us = _shape(per_minute)
        self.shapes[kind] = (capacity, period_us)
        self._publish[kind] = f"{capacity} {period_us}"
        if self.fallback is not None:
            self._share_locally(kind)
        self._wake.set()

    def observe_headers(self, headers: Mapping[str, str], sent_at: float | None = None) -> None:
        """Adopt and publish limits the server advertises (`x-ratelimit-limit-requests`, `-images`);
        when it says none remain, every worker paces that kind at the limit's rate until its reset
        (as `RateLimiter.observe_headers`, the state shared in Redis)."""
        now = anyio.current_time()
        for kind in KINDS:
            said = advertised(headers, kind)
            if said.limit is not None:
                shape = _shape(said.limit)
                current = self.shapes[kind]
                stricter = current[0] == 0 or shape[0] / shape[1] < current[0] / current[1]
                if shape != current and (self.source[kind] != "configured" or stricter):
                    self.set_limit(kind, said.limit)
                    self.source[kind] = "advertised"
            if said.exhausted:
                capacity, period_us = self.shapes[kind]
                interval = period_us / 1e6 / capacity if capacity else (60.0 / said.limit if said.limit else None)
                if said.reset is None and interval is None:
                    continue  # nothing usable: no rate to pace at, no time to wait for
                reset = said.reset if said.reset is not None else MAX_WAIT_S
                age = max(0.0, now - sent_at) if sent_at is not None else 0.0
                self._drained[kind] = f"{round((interval or 0.0) * 1e6)} {round(reset * 1e6)} {round(age * 1e6)}"
                if self.fallback is not None:
                    self.fallback.observe_headers(headers, sent_at)
                self._wake.set()

    def on_rate_limited(self, retry_after: float | None, kind: str = "requests", images: int = 1) -> None:
        """A 429: pause every worker; with no known limit and evidence (RateLimiter.LEARN_AFTER 429s
        in this process within LEARN_SPAN_S: one 429 is not a measurement), what all workers sent
        in the last window (as of the last round trip) becomes the shared learned limit."""
        kind = kind if kind in KINDS else "requests"
        now = anyio.current_time()
        self._last_429 = now
        self.rejections += 1
        self.pause(retry_after if retry_after is not None else 1.0)
        seen = self._429s[kind]
        seen.append(now)
        while seen and seen[0] < now - RateLimiter.LEARN_SPAN_S:
            seen.popleft()
        if self.source[kind] is None and len(seen) < RateLimiter.LEARN_AFTER:
            return
        if self.source[kind] is None:
            self.set_limit(kind, 60.0 * max(1, self.used[kind] - 1))  # minus the send just refused
            self.source[kind] = "learned"
        elif now - self._last_widen >= 1.0:
            # once per second: the trip needs more slack; a server that says how early it was
            # (retry-after of a few ms) says by how much
            self._last_widen = now
            early = retry_after if retry_after is not None and retry_after < 0.1 else 0.0
            self.margin = min(self.MAX_MARGIN_S, self.margin + max(0.005, early))

    def _maybe_narrow(self) -> None:
        """One step back toward the base margin per clean second, after RateLimiter.CALM_WINDOWS."""
        now = anyio.current_time()
        if self.margin > self.base_margin and now - self._last_429 >= RateLimiter.CALM_WINDOWS \
                and now - self._last_narrow >= 1.0:
            self._last_narrow = now
            self.margin = max(self.base_margin, self.margin - RateLimiter.NARROW_STEP_S)

    # -- Redis ---------------------------------------------------------------------------------

    def _queue_restamp(self, member: str, images: int, late: float) -> None:
        # out with the head's next trip, woken now: a batch of grants is stamped when Redis granted
        # it, and until its late sends are restamped other workers plan from too early a stamp
        self._restamps.append(f"{member} {images} {round(late * 1e6)}")
        self._wake.set()

    def _queue_refund(self, member: str, images: int) -> None:
        self._refunds.append((member, images))  # kept through an outage: sent when Redis is back
        self._wake.set()

    async def _trip(self, members: str | list[str], images: int | list[int]) -> list[int]:
        """One EVALSHA: apply what is queued, then grant `members` (one per waiter, costing `images`
        each) in order while they fit. A single member and count are a queue of one."""
        members = [members] if isinstance(members, str) else members
        costs = [images] if isinstance(images, int) else images
        asked = bool(members) and bool(costs) and costs[0] > 0
        refunds, publish, drained = list(self._refunds), dict(self._publish), dict(self._drained)
        restamps = self._restamps[:200]  # bounded: a trip's arguments stay small
        pause_s = max(0.0, self.pause_until - anyio.current_time()) if self._pause_queued else 0.0
        args: list[Any] = [" ".join(members), " ".join(map(str, costs))]
        for kind in KINDS:
            args += list(self._configured[kind])
        args += [round(self.margin * 1e6), round(pause_s * 1e6), publish.get("requests", ""),
                 publish.get("images", ""), drained.get("requests", ""), drained.get("images", ""),
                 0, " ".join(restamps),  # 0: no grant is stamped late; cold sends are restamped
                 f"{self._token} {max(0, int(self.backlog()))}" if self.backlog is not None and asked else ""]
        for refund in refunds:
            args += list(refund)
        with anyio.fail_after(self.timeout * 2):  # socket timeouts bound it already; this is a backstop
            reply = await self._script(keys=self._keys, args=args)
        self.round_trips += 1
        # what went out is applied: forget exactly that (more may have been queued meanwhile)
        del self._refunds[:len(refunds)]
        del self._restamps[:len(restamps)]
        for kind, value in publish.items():
            if self._publish.get(kind) == value:
                del self._publish[kind]
        for kind, value in drained.items():
            if self._drained.get(kind) == value:
                del self._drained[kind]
        if pause_s or self.pause_until <= anyio.current_time():
            self._pause_queued = False
        self.used = {"requests": int(reply[2]), "images": int(reply[3])}
        if asked:
            self._backlog_total = int(reply[9])
        self.shapes = {"requests": (int(reply[4]), int(reply[5])), "images": (int(reply[6]), int(reply[7]))}
        return reply

    def _remember(self, images: int) -> None:
        now = anyio.current_time()
        horizon = max(self.shapes["requests"][1], self.shapes["images"][1]) / 1e6 + self.margin
        recent = self._recent
        recent.append((now, images))
        while recent and recent[0][0] <= now - horizon:
            recent.popleft()

    def _per_minute(self, kind: str) -> float | None:
        capacity, period_us = self.shapes[kind]
        return 60.0 * capacity / (period_us / 1e6) if capacity else None

    def _lose_redis(self, exc: BaseException) -> None:
        self._retry_at = anyio.current_time() + self.RETRY_REDIS_S
        if self.fallback is not None:
            return  # still down: the warning was logged when it went
        self.outages += 1
        self.fallback = RateLimiter(margin=self.margin)
        for kind in KINDS:
            self._share_locally(kind)
        for at, images in self._recent:
            self.fallback.requests.record(at, 1)
            self.fallback.images.record(at, images)
        remaining = self.pause_until - anyio.current_time()
        if remaining > 0:
            self.fallback.pause(remaining)
        window = self.fallback.requests
        share = f"{window.capacity} per {window.period:g}s" if window.capacity else "no request limit"
        log.warning("redis limiter unreachable (%s); this worker now sends at most %s on its own "
                    "(%s of %d workers), retrying Redis every %.0fs", type(exc).__name__, share,
                    f"{60 * window.capacity / window.period:g} rpm" if window.capacity else "no limit",
                    self.workers, self.RETRY_REDIS_S)

    def _share_locally(self, kind: str) -> None:
        """This worker's 1/workers of a limit, never more: the share keeps the server's window
        length (a shorter one would let two local bursts land in one server window), and rounds
        the capacity down (50 per 1 s over 4 workers: 12 per 1 s each)."""
        assert self.fallback is not None
        window = self.fallback.requests if kind == "requests" else self.fallback.images
        capacity, period_us = self.shapes[kind]
        if not capacity:
            window.capacity, window.period = None, 1.0
            return
        share = capacity // self.workers
        if share >= 1:
            window.capacity, window.period = share, period_us / 1e6
        else:  # fewer sends per window than workers: each takes one every few windows
            window.capacity, window.period = 1, period_us / 1e6 * math.ceil(self.workers / capacity)
        self.fallback.source[kind] = "configured"

    def _rejoin(self) -> None:
        if self.fallback is not None:
            self.fallback = None
            log.info("redis limiter reachable again; sharing the limit")


# -- claims -----------------------------------------------------------------------------------

@dataclass
class Claim:
    """What `ClaimStore.held` yields: true while this worker holds the item."""

    item_id: str
    won: bool
    lost: bool = False  # a renewal found the claim gone or taken (it expired while Redis was away)

    def __bool__(self) -> bool:
        return self.won and not self.lost


class ClaimStore:
    """At most one worker works on an item of an output at a time.

    >>> if await claims.claim(item.id, ttl_s=120): ...; await claims.release(item.id)

    A claim is `SET NX PX` of this worker's random token; renew and release are compare-and-set
    Lua scripts, so a worker never extends or deletes a claim another worker took after its own
    expired.
    """

    def __init__(self, redis: Any, output: str, *, token: str | None = None, timeout: float = 1.0) -> None:
        self._redis = connect(redis, timeout=timeout) if isinstance(redis, str) else redis
        self.token = token or secrets.token_hex(8)
        self._prefix = f"batcher:{{{output_key(output)}}}:claim:"
        self._renew = self._redis.register_script(RENEW_LUA)
        self._release = self._redis.register_script(RELEASE_LUA)
        self._done = self._redis.register_script(DONE_LUA)
        self._ttl_ms: dict[str, int] = {}
        self._down = _down_errors()

    def key(self, item_id: str) -> str:
        return self._prefix + item_id

    async def claim(self, item_id: str, ttl_s: float) -> bool:
        """Take the item for `ttl_s` seconds unless another worker holds it."""
        ttl_ms = max(1, round(ttl_s * 1000))
        won = bool(await self._redis.set(self.key(item_id), self.token, nx=True, px=ttl_ms))
        if won:
            self._ttl_ms[item_id] = ttl_ms
        return won

    async def renew(self, item_id: str) -> bool:
        """Extend our claim by its ttl again; False if it is no longer ours."""
        ttl_ms = self._ttl_ms.get(item_id)
        if ttl_ms is None:
            return False
        return bool(await self._renew(keys=[self.key(item_id)], args=[self.token, ttl_ms]))

    async def keep(self, item_id: str, seconds: float) -> bool:
        """Mark a finished item's claim `done` for `seconds`, so no worker whose view of the output
        is older than its journal segment sends it again; False if it was no longer ours."""
        if item_id not in self._ttl_ms:
            return False
        self._ttl_ms.pop(item_id)
        return bool(await self._done(keys=[self.key(item_id)], args=[self.token, max(1, round(seconds * 1000))]))

    async def holder(self, item_id: str) -> str | None:
        """Who holds the item: `DONE` (finished elsewhere), another worker's token, or None."""
        value = await self._redis.get(self.key(item_id))
        return value.decode() if isinstance(value, bytes) else value

    async def release(self, item_id: str) -> bool:
        """Give the item up; False if it was no longer ours (expired, or taken since)."""
        self._ttl_ms.pop(item_id, None)
        return bool(await self._release(keys=[self.key(item_id)], args=[self.token]))

    @asynccontextmanager
    async def held(self, item_id: str, ttl_s: float) -> AsyncIterator[Claim]:
        """Claim the item, renew it every ttl/3 while the body runs, release it after.

        Yields a Claim: false when another worker holds the item (skip it), or when a renewal
        found it lost (another worker may be on it now: do not record the result as ours).
        """
        claim = Claim(item_id, await self.claim(item_id, ttl_s))
        if not claim.won:
            yield claim
            return
        body_error: Exception | None = None
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._keep, claim, ttl_s)
                try:
                    yield claim
                except Exception as exc:  # the body's own error, re-raised as is, not as a group
                    body_error = exc
                finally:
                    tg.cancel_scope.cancel()
            if body_error is not None:
                raise body_error
        finally:
            with anyio.CancelScope(shield=True), anyio.move_on_after(2.0):
                try:
                    await self.release(item_id)
                except self._down:
                    pass  # the claim expires on its own after ttl

    async def _keep(self, claim: Claim, ttl_s: float) -> None:
        while True:
            await anyio.sleep(ttl_s / 3)
            try:
                ours = await self.renew(claim.item_id)
            except self._down:
                continue  # Redis away: the claim may survive; try again next period
            except Exception as exc:  # never let the renewer break the body it guards
                log.warning("renewing the claim on item %s failed: %s", claim.item_id, exc)
                ours = False
            if not ours:
                claim.lost = True
                log.warning("claim on item %s was lost (expired while unrenewed); another worker may "
                            "have it", claim.item_id)
                return
