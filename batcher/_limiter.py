"""Schedule stage: pace requests to the endpoint's limit, known, advertised or learned.

Providers enforce per-minute limits over short windows, so the limiter is a sliding window:
at most a window's share (rpm/60 per second) in any one-second span. The first second's share
goes out at once; after that, each send waits for an earlier one to leave the window.

When the server says none remain (`x-ratelimit-remaining-* 0`), the limiter does not stop for
the whole `reset`: a token bucket refills one permit every 60/limit seconds, so it paces that kind
at the limit's rate (`Drained`) until the reset, whatever the window the server counts over.

Time is injectable (`clock`, `sleep`) so tests run on a fake clock.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Generic, NamedTuple, TypeVar

import anyio

from ._policy import MAX_WAIT_S, parse_duration

__all__ = ["Window", "RateLimiter", "Permit", "ConcurrencyController", "Drained", "Advertised", "window_shape",
           "advertised"]

Clock = Callable[[], float]
P = TypeVar("P")  # the permit type a queued acquirer is granted
Sleep = Callable[[float], Awaitable[None]]


def window_shape(per_minute: float) -> tuple[int, float]:
    """(capacity, period): an integer share per window of about one second.

    3000 rpm -> 50 per 1.0 s; 90 rpm -> 2 per 1.33 s; 20 rpm -> 1 per 3 s.
    """
    capacity = max(1, round(per_minute / 60.0))
    return capacity, 60.0 * capacity / per_minute


class Advertised(NamedTuple):
    """What a server's `x-ratelimit-*` headers say of one kind (requests or images)."""

    limit: float | None  # per minute; None when absent or not a positive finite number
    remaining: float | None  # whatever window the server counts over (a second's bucket, a minute)
    reset: float | None  # seconds until its count is whole again, at most MAX_WAIT_S

    @property
    def exhausted(self) -> bool:
        """None remain: the next send must wait for the server to refill."""
        return self.remaining is not None and self.remaining < 1


def _positive(raw: str | None) -> float | None:
    try:
        value = float(raw) if raw is not None else math.nan
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def advertised(headers: Mapping[str, str], kind: str) -> Advertised:
    """Read `x-ratelimit-{limit,remaining,reset}-{kind}`; anything unreadable is absent.

    >>> advertised({"x-ratelimit-limit-requests": "3000", "x-ratelimit-remaining-requests": "0",
    ...             "x-ratelimit-reset-requests": "980ms"}, "requests")
    Advertised(limit=3000.0, remaining=0.0, reset=0.98)
    """
    limit = _positive(headers.get(f"x-ratelimit-limit-{kind}"))
    reset_raw = headers.get(f"x-ratelimit-reset-{kind}")
    reset = parse_duration(reset_raw) if reset_raw is not None else None
    return Advertised(limit or None, _positive(headers.get(f"x-ratelimit-remaining-{kind}")),
                      min(reset, MAX_WAIT_S) if reset is not None else None)


class Drained:
    """A server bucket that said none remain: permits come back one per `interval` until `until`.

    A generic cell rate: the next unit is earned at `next_free`, `cost` units at
    `next_free + (cost - 1) * interval`; a grant moves `next_free` on by its cost (credit earned
    while idle is kept; the server refills while we wait). `interval=None` (no rate known) waits
    for `until`. Whatever it says, nobody waits past `until`: the server is whole again then.

    >>> d = Drained(); d.observe(now=10.0, sent_at=9.7, interval=0.02, reset=1.0)
    >>> d.wait(10.0, cost=1)   # the permit was earned 0.28 s ago (counted from the send)
    0.0
    """

    __slots__ = ("interval", "next_free", "until")

    def __init__(self) -> None:
        self.next_free = 0.0
        self.interval: float | None = None
        self.until = -math.inf

    def active(self, now: float) -> bool:
        return now < self.until

    def observe(self, now: float, sent_at: float, interval: float | None, reset: float | None) -> None:
        """The answer to a request sent at `sent_at` said none remain, whole again in `reset` s.

        No reset and no rate says nothing usable: ignored. No reset but a rate: paced up to the cap."""
        if reset is None and interval is None:
            return
        reset = MAX_WAIT_S if reset is None else reset
        if not self.active(now):
            # the server counted that request at about its send: the refill started there
            self.next_free = min(sent_at, now) + (interval or 0.0)
        self.interval = interval
        self.until = max(self.until, now + reset)

    def wait(self, now: float, cost: int) -> float:
        if not self.active(now):
            return 0.0
        if self.interval is None:
            return self.until - now
        ready = self.next_free + (max(cost, 1) - 1) * self.interval
        return max(0.0, min(ready, self.until) - now)

    def grant(self, now: float, cost: int) -> None:
        if self.active(now) and self.interval is not None:
            self.next_free += max(cost, 1) * self.interval


class Window:
    """A sliding window log: at most `capacity` units in any `period` seconds.

    `capacity=None` means unlimited; the window still records sends so that a limit learned
    later starts from what was really sent (stamped as the request leaves the executor: the wire's
    own stamp and the new-connection flag come only with a known limit, see `Permit.timed`).
    """

    def __init__(self, capacity: float | None = None, period: float = 1.0) -> None:
        self.capacity = capacity
        self.period = period
        # [time, cost, cold]: time moved to the real send; cold = how much later the server may count
        # it because it opened a connection (matters only when a kept-alive send replaces it)
        self._log: deque[list] = deque()
        self._used = 0
        self._left = (-math.inf, 0)  # the last entry out of the window: (when it left, its cost)

    def _expire(self, now: float, horizon: float) -> None:
        log = self._log
        while log and log[0][0] + log[0][2] <= now - horizon:
            t, cost, cold = log.popleft()
            self._used -= cost
            self._left = (t + cold + horizon, cost)

    def used(self, now: float, margin: float = 0.0) -> int:
        self._expire(now, self.period + margin)
        return self._used

    def wait_time(self, now: float, cost: int, margin: float = 0.0, warm: bool = True) -> float:
        """Seconds until `cost` more units fit (0 if they fit now).

        `warm`: the next send will go on a kept-alive connection, so an entry that opened one leaves
        the server's window `cold` later; a send that opens one too is read as late as it was."""
        return max(self.free_at(now, cost, margin, warm) - now, 0.0)

    def free_at(self, now: float, cost: int, margin: float = 0.0, warm: bool = True) -> float:
        """When `cost` more units fit, as a time (-inf: there is room without anything leaving)."""
        horizon = self.period + margin
        self._expire(now, horizon)
        if self.capacity is None:
            return -math.inf
        if self._used + cost <= self.capacity:
            left, freed = self._left
            # there is room since the last entry left (if not for it there would be none), or all along
            return left if self._used + cost + freed > self.capacity else -math.inf
        need = self._used + cost - self.capacity
        freed = 0
        leaves = -math.inf  # the latest departure among the entries freed (>= the need-th earliest)
        for t, c, cold in self._log:
            freed += c
            leaves = max(leaves, t + cold if warm else t)
            if freed >= need:
                break
        return leaves + horizon

    def refund(self, entry: list) -> None:
        if any(e is entry for e in self._log):  # still inside the window
            self._used -= entry[1]
        entry[1] = 0

    def record(self, now: float, cost: int) -> list:
        entry = [now, cost, 0.0]
        self._log.append(entry)
        self._used += cost
        return entry


class _Waiter(Generic[P]):
    """An acquirer queued for `images` (the local and the Redis-shared limiter's queues): woken by
    `event`, holding its permit once granted."""

    __slots__ = ("event", "images", "permit")

    def __init__(self, images: int) -> None:
        self.images = images
        self.event = anyio.Event()
        self.permit: P | None = None


class Permit:
    """A granted send. `sent()` moves its window entries to the moment it really leaves;
    `refund()` gives them back when the server rejected it (a 429 is not counted there)."""

    __slots__ = ("_clock", "_cold_s", "_entries", "_late", "_on_wire", "granted", "scheduled", "sent_at", "timed")

    def __init__(self, clock: Clock, *entries: tuple[Window, list], late: float = 0.0, cold_s: float = 0.0,
                 on_wire: Callable[[Permit, float | None, bool | None], None] | None = None,
                 scheduled: float | None = None, timed: bool = True) -> None:
        self._clock = clock
        # whether the transport should say when it is on the wire (`sent`, `connecting`): only when a
        # limit is known is there a window for that moment to matter to (the stamp costs aiohttp's tracing)
        self.timed = timed
        self._entries = entries
        self._late = late  # how much later than `sent()` the server may count it (the run's first window)
        self._cold_s = cold_s  # ...or any later send that opened a new connection, if a warm one replaces it
        # told when it is on the wire, with its delay since scheduled (None: not timed by the window), and
        # whether it opened a connection (None: it is only starting to)
        self._on_wire = on_wire
        self.granted = self.sent_at = clock()  # the grant, until `sent()` says when it really left
        # when the window meant it to go (its slot free, less the lead; None: it had room): the grant
        # comes later by the waiter's timer and wake-up, which the lead learns too
        self.scheduled = None if scheduled is None or scheduled == -math.inf else min(scheduled, self.granted)

    def sent(self, new_connection: bool | None = None) -> None:
        """The request leaves now. The transport says, once its bytes are on the wire, whether it
        opened a `new_connection` (the server accepts and reads those later); None: not known."""
        now = self.sent_at = self._clock()
        if new_connection is False:
            self._late = 0.0  # a first-window send on a connection opened before the run (open_connections)
        for _, entry in self._entries:
            entry[0] = max(self.granted, now + self._late)  # the wire's stamp overrides the one before it
            if new_connection and not self._late:
                entry[2] = self._cold_s
        if self._on_wire is not None and new_connection is not None:
            delay = None if self._late or self.scheduled is None else now - self.scheduled
            self._on_wire(self, delay, new_connection)

    def connecting(self) -> None:
        """The request starts opening a connection: not on the wire yet, but the event loop is free
        for the next one meanwhile (a TLS handshake takes round trips, not this process's time)."""
        if self._on_wire is not None:
            self._on_wire(self, None, None)

    def refund(self) -> None:
        for window, entry in self._entries:
            window.refund(entry)


class RateLimiter:
    """One limiter shared by all workers of an endpoint.

    >>> limiter = RateLimiter(rpm=3000, ipm=None)
    >>> await limiter.acquire(images=2)   # waits until a request and 2 images fit

    Limits come from the job (`rpm`, `ipm`), from `x-ratelimit-limit-*` headers, or — when the
    server says nothing — from 429s. One 429 is not a measurement (a gateway's hiccup looks the
    same): it pauses the pool for its retry-after and nothing more. Only `LEARN_AFTER` 429s within
    `LEARN_SPAN_S` make the sends the server accepted in the last second the learned capacity,
    which is then probed upward after clean, saturated windows in growing steps (+25%, doubling
    after each success; bisecting below a capacity that failed).
    """

    LEARN_AFTER = 2  # 429s within LEARN_SPAN_S before a limit is learned or tightened
    LEARN_SPAN_S = 2.0
    PROBE_AFTER_WINDOWS = 2  # clean windows, the last one full, before a learned limit is raised
    PROBE_STEP = 0.25  # the first raise, as a fraction of the capacity (at least 1)
    # A send that opens a new connection is counted by the server after its accept and first read:
    # 20-200 ms after `sent()` on a loaded 2-core box, against ~0 for a kept-alive one, so the
    # warm send that replaces it in the next window would land early and draw a 429. Such sends
    # (the transport says which; the run's first window in any case) count COLD_S late: a slot
    # held that much longer, only while connections are being opened.
    COLD_S = 0.05
    # A grant becomes a send a little later (the waiter wakes, journals its attempt, maybe opens a
    # connection, writes its headers): granting that much early keeps each window's sends on time
    # instead of drifting by it every window. The lead is the least delay seen in the last
    # LEAD_SAMPLES sends of the same kind (see wait_time for its caps).
    LEAD_SAMPLES = 64
    # One grant at a time goes to the wire: the next waits until the last one's bytes are out. A
    # grant makes its worker journal the attempt and build the request (~0.3 ms of the event loop);
    # granted together, a window's 50 all do that before any of them is written (the write is a
    # task queued behind them), so all leave 15-40 ms late and the next window inherits the delay.
    # A grant that never reaches the wire (the worker stopped) holds the next back this long at most.
    BATON_S = 0.010
    CALM_WINDOWS = 5  # clean windows before a widened margin starts to shrink back
    NARROW_STEP_S = 0.005  # ...by this much per window

    def __init__(
        self,
        rpm: float | None = None,
        ipm: float | None = None,
        *,
        clock: Clock = anyio.current_time,
        sleep: Sleep = anyio.sleep,
        margin: float = 0.005,
        max_margin: float = 0.200,
        cold_s: float | None = None,
    ) -> None:
        self._clock = clock
        self.cold_s = self.COLD_S if cold_s is None else cold_s
        self._sleep = sleep
        self.margin = margin  # slack for the trip to the server; grows if a 429 proves it short
        self.base_margin = margin  # ...and shrinks back toward this after clean windows
        self.max_margin = max_margin
        self._last_narrow = -1e9
        self.requests = Window(*window_shape(rpm)) if rpm else Window()
        self.images = Window(*window_shape(ipm)) if ipm else Window()
        # where each limit came from: "configured", "advertised", "learned" or None (unknown)
        self.source: dict[str, str | None] = {
            "requests": "configured" if rpm else None,
            "images": "configured" if ipm else None,
        }
        self.drained = {"requests": Drained(), "images": Drained()}
        self.pause_until = 0.0
        self.rejections = 0
        self._last_429 = -1e9
        self._last_probe = -1e9
        self._last_widen = -1e9
        self._widened_from = margin  # the margin before this window's 429s widened it
        self._learning_until = -1e9
        self._429s: dict[str, deque[float]] = {"requests": deque(), "images": deque()}
        self._ceiling: dict[str, float] = {"requests": math.inf, "images": math.inf}
        self._probe: dict[str, tuple[int, int] | None] = {"requests": None, "images": None}  # (from, step)
        self._queue: deque[_Waiter[Permit]] = deque()
        self._first_grant: float | None = None
        # grant -> wire delays of sends that opened a connection (True) or reused one (False)
        self._delays: dict[bool, deque[float]] = {True: deque(maxlen=self.LEAD_SAMPLES),
                                                  False: deque(maxlen=self.LEAD_SAMPLES)}
        self.leads = {True: 0.0, False: 0.0}  # how early a grant may be made for its send to land on time
        # Kept-alive connections exist once an answer came back: from then on a send may reuse one and be
        # read at once, so an entry that opened a connection leaves the window late. Before, every send
        # opens one (all are read as late as each other), and none needs to wait for that.
        self.warm = False
        # the last grant while its request is not on the wire yet (see BATON_S): only once a sender
        # says it stamps sends on the wire (`on_wire`, called when one is: its waiters may go)
        self._unsent: Permit | None = None
        self.on_wire: Callable[[], None] | None = None

    def first_share(self) -> int:
        """How many requests the first window may send at once (0: no limit known yet)."""
        shares = [w.capacity for w in (self.requests, self.images) if w.capacity]
        return int(min(shares)) if shares else 0

    def _windows(self) -> dict[str, Window]:
        return {"requests": self.requests, "images": self.images}

    @property
    def waiting(self) -> int:
        """Acquirers queued for tokens."""
        return len(self._queue)

    def _lead(self) -> float:
        # while no answer came back every send opens a connection (a lag of its own, often 10-100 ms:
        # without the lead each window would start that much late); after, a send may reuse one
        if self.warm:
            return min(self.leads[False], self.margin)
        return min(self.leads[True], 0.5 * self.requests.period)

    def wait_time(self, images: int, now: float | None = None) -> float:
        now = self._clock() if now is None else now
        warm = self.warm
        lead = self._lead()
        return max(
            self._baton(now),
            self.pause_until - now,
            self.requests.wait_time(now, 1, self.margin, warm) - lead,
            self.images.wait_time(now, images, self.margin, warm) - lead,
            self.drained["requests"].wait(now, 1),
            self.drained["images"].wait(now, images),
        )

    def _baton(self, now: float) -> float:
        """Seconds the last grant may still hold the next one back (0: on the wire, or given up on)."""
        unsent = self._unsent
        if unsent is None:
            return 0.0
        left = unsent.granted + self.BATON_S - now
        if left <= 0:
            self._unsent = None
            return 0.0
        return left

    async def acquire(self, images: int = 1) -> Permit:
        """Wait until one request for `images` images may be sent, and count it as sent.

        Waiters are served first come, first served. The head of the queue sleeps until the
        window has room, then grants itself and every waiter behind it that fits, in one step:
        a window's share leaves together instead of one wake-up at a time.
        Call `permit.sent()` right before the request goes out: the server counts arrivals.
        """
        if not self._queue and self.wait_time(images) <= 0:
            return self._grant(self._clock(), images)
        waiter: _Waiter[Permit] = _Waiter(images)
        self._queue.append(waiter)
        try:
            while waiter.permit is None:
                if self._queue[0] is waiter:
                    now = self._clock()
                    wait = self.wait_time(images, now)
                    if 0 < wait <= self._baton(now):
                        with anyio.move_on_after(wait):  # until the last grant is on the wire (it wakes us)
                            await waiter.event.wait()
                        waiter.event = anyio.Event()
                    elif wait > 0:
                        await self._sleep(wait)
                    else:
                        self._dispatch()
                else:
                    await waiter.event.wait()
                    waiter.event = anyio.Event()
        finally:
            if waiter.permit is None:  # cancelled while waiting: hand the head on
                was_head = self._queue and self._queue[0] is waiter
                self._queue.remove(waiter)
                if was_head and self._queue:
                    self._queue[0].event.set()
        return waiter.permit

    def _grant(self, now: float, images: int) -> Permit:
        if self._first_grant is None:
            self._first_grant = now
        cold = now - self._first_grant < max(self.requests.period, self.images.period)
        due = max(self.requests.free_at(now, 1, self.margin, self.warm),
                  self.images.free_at(now, images, self.margin, self.warm))
        permit = Permit(self._clock, (self.requests, self.requests.record(now, 1)),
                        (self.images, self.images.record(now, images)), late=self.cold_s if cold else 0.0,
                        cold_s=self.cold_s, on_wire=self._wired, scheduled=due - self._lead(),
                        timed=bool(self.requests.capacity or self.images.capacity))
        if self.on_wire is not None and permit.timed:
            self._unsent = permit  # (with no limit known there is no window for the order to matter to)
        self.drained["requests"].grant(now, 1)
        self.drained["images"].grant(now, images)
        self._maybe_probe(now)
        self._maybe_narrow(now)
        return permit

    def _wired(self, permit: Permit, delay: float | None, new_connection: bool | None) -> None:
        """`permit`'s request is on the wire, `delay` s after it was scheduled (None: in the first window,
        or the window had room: not timed by it); `new_connection` None: it only started opening one."""
        if delay is not None and new_connection is not None:
            delays = self._delays[new_connection]
            delays.append(max(0.0, delay))
            if len(delays) >= 8:
                self.leads[new_connection] = min(delays)
        if self._unsent is permit:
            self._unsent = None
            if self._queue:
                self._queue[0].event.set()
            if self.on_wire is not None:
                self.on_wire()

    def _dispatch(self) -> None:
        now = self._clock()
        queue = self._queue
        while queue and self.wait_time(queue[0].images, now) <= 0:
            waiter = queue.popleft()
            waiter.permit = self._grant(now, waiter.images)
            waiter.event.set()
        if queue:
            queue[0].event.set()  # the new head takes over the sleeping

    def pause(self, seconds: float) -> None:
        """Hold every worker for `seconds` (a 429's retry-after applies to the whole pool)."""
        if math.isfinite(seconds) and seconds > 0:
            self.pause_until = max(self.pause_until, self._clock() + min(seconds, MAX_WAIT_S))

    def set_limit(self, kind: str, per_minute: float) -> None:
        window = self._windows()[kind]
        window.capacity, window.period = window_shape(per_minute)

    def interval(self, kind: str, said: Advertised) -> float | None:
        """Seconds per unit at the limit in force for `kind` (the window's, else the header's)."""
        window = self._windows()[kind]
        if window.capacity:
            return window.period / window.capacity
        return 60.0 / said.limit if said.limit else None

    def observe_headers(self, headers: Mapping[str, str], sent_at: float | None = None) -> None:
        """An answer came back (its connection is kept alive for the next send). Adopt limits the
        server advertises (`x-ratelimit-limit-requests`, `-images`), and pace a kind the server says
        is used up at the limit's rate until its reset (`Drained`).

        `sent_at`: when the request this answer belongs to left (`Permit.sent_at`); the server
        counted it then, and its bucket has been refilling since.
        """
        now = self._clock()
        self.warm = True
        for kind, window in self._windows().items():
            said = advertised(headers, kind)
            if said.limit is not None:
                capacity, period = window_shape(said.limit)
                if self.source[kind] in (None, "learned", "advertised") or (
                    window.capacity is None or capacity / period < window.capacity / window.period  # stricter wins
                ):
                    if self.source[kind] != "advertised" or (capacity, period) != (window.capacity, window.period):
                        window.capacity, window.period = capacity, period
                        self.source[kind] = "advertised"
            if said.exhausted:
                self.drained[kind].observe(now, now if sent_at is None else sent_at, self.interval(kind, said),
                                           said.reset)

    def on_rate_limited(self, retry_after: float | None, kind: str = "requests", images: int = 1) -> None:
        """A 429 `rate_limit_exceeded`: pause everyone; with evidence, learn or tighten the limit.

        `kind` is the limit the server named (the error `type`: requests or images).
        """
        kind = kind if kind in ("requests", "images") else "requests"
        now = self._clock()
        self.rejections += 1
        self._last_429 = now
        self.pause(retry_after if retry_after is not None else 1.0)
        window = self._windows()[kind]
        seen = self._429s[kind]
        seen.append(now)
        while seen and seen[0] < now - self.LEARN_SPAN_S:
            seen.popleft()
        evidence = len(seen) >= self.LEARN_AFTER
        # rejected sends were refunded (Permit.refund), so what is left is what the server took
        accepted = window.used(now, self.margin)
        source = self.source[kind]
        if source is None:
            if evidence:  # what the server accepted in the last second is its limit
                window.capacity, window.period = max(1, accepted), 1.0
                self.source[kind] = "learned"
                self._learning_until = now + window.period
        elif source == "learned" and now < self._learning_until:
            # the rest of the first burst's answers refine the estimate
            window.capacity = max(1, min(int(window.capacity or 1), accepted))
        elif source == "learned":
            self._probe_failed(kind, window, evidence)
        else:
            # One step per window, sized by the earliest of its 429s: one late burst answers with
            # many 429s at once (a step each would overshoot), and they are not equally early.
            if now - self._last_widen >= window.period:
                self._last_widen = now
                self._widened_from = self.margin
            early = retry_after if retry_after is not None and retry_after < 0.1 * window.period else 0.0
            # a few ms early: the trip to the server needs that much more slack, the limit is right
            self.margin = min(self.max_margin, max(self.margin, self._widened_from + max(0.005, early)))

    def _probe_failed(self, kind: str, window: Window, evidence: bool) -> None:
        """A learned limit drew a 429: back to the capacity before the last raise, and never probe
        up to the one that failed again. Without a raise to undo, only evidence tightens it."""
        probe = self._probe[kind]
        capacity = int(window.capacity or 1)
        if probe is not None:
            self._ceiling[kind] = min(self._ceiling[kind], capacity)
            window.capacity = max(1, probe[0])
            self._probe[kind] = None
        elif evidence and self._429s[kind][0] >= self._learning_until:  # not the first burst's tail
            self._ceiling[kind] = min(self._ceiling[kind], capacity)
            window.capacity = max(1, capacity - 1)
            self._429s[kind].clear()  # this evidence is spent

    def _maybe_narrow(self, now: float) -> None:
        """A margin widened by 429s shrinks back by one step per clean window after CALM_WINDOWS:
        a load spike's slack should not cost every window of the rest of the run."""
        if self.margin <= self.base_margin:
            return
        period = self.requests.period if self.requests.capacity else self.images.period
        if now - self._last_429 >= self.CALM_WINDOWS * period and now - self._last_narrow >= period:
            self._last_narrow = now
            self.margin = max(self.base_margin, self.margin - self.NARROW_STEP_S)

    def _maybe_probe(self, now: float) -> None:
        """Raise a learned limit that held clean for a few windows while it was the bottleneck."""
        for kind, window in self._windows().items():
            if self.source[kind] != "learned" or window.capacity is None:
                continue
            calm = self.PROBE_AFTER_WINDOWS * window.period
            if now - self._last_429 < calm or now - self._last_probe < calm:
                continue
            capacity = int(window.capacity)
            if window.used(now, self.margin) < capacity:
                continue  # not the bottleneck: a raise would be untested
            ceiling = self._ceiling[kind]
            last = self._probe[kind]
            step = max(1, round(capacity * self.PROBE_STEP)) if last is None else last[1] * 2
            target = capacity + step
            if target >= ceiling:
                target = (capacity + int(ceiling)) // 2  # bisect below what failed
                step = 1
            if target <= capacity:
                continue
            self._last_probe = now
            self._probe[kind] = (capacity, step)
            window.capacity = target


class ConcurrencyController:
    """The pool's concurrency: a CapacityLimiter whose size adapts (AIMD).

    While no limit is known, start with a few requests so the first answers can tell us the
    limit before a burst; then open up. When most recent requests fail with 5xx or time out,
    halve the pool rather than retry into a struggling server; grow back by one per success.
    """

    START_UNKNOWN = 8
    HISTORY = 20

    def __init__(self, maximum: int, *, limit_known: bool, clock: Clock = anyio.current_time) -> None:
        self.maximum = maximum
        start = maximum if limit_known else min(maximum, self.START_UNKNOWN)
        self.slots = anyio.CapacityLimiter(start)
        self._clock = clock
        self._opened = limit_known
        self._history: deque[bool] = deque(maxlen=self.HISTORY)
        self._last_cut = -1e9

    @property
    def size(self) -> int:
        return int(self.slots.total_tokens)

    def on_answer(self) -> None:
        """Any HTTP answer arrived: the server's headers (if any) have been seen."""
        if not self._opened:
            self._opened = True
            self.slots.total_tokens = self.maximum

    def on_success(self) -> None:
        self._history.append(True)
        if self._opened and self.size < self.maximum:
            self.slots.total_tokens = self.size + 1

    def on_server_trouble(self) -> None:
        self._history.append(False)
        failures = self._history.count(False)
        now = self._clock()
        if len(self._history) >= 10 and failures * 2 > len(self._history) and now - self._last_cut >= 2.0:
            self._last_cut = now
            self.slots.total_tokens = max(1, self.size // 2)
