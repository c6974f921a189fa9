"""Schedule stage: pace requests to the endpoint's limit, known, advertised or learned.

Providers enforce per-minute limits over short windows, so the limiter is a sliding window:
at most a window's share (rpm/60 per second) in any one-second span. The first second's share
goes out at once; after that, each send waits for an earlier one to leave the window.

Time is injectable (`clock`, `sleep`) so tests run on a fake clock.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Awaitable, Callable, Mapping

import anyio

from ._policy import parse_duration

__all__ = ["Window", "RateLimiter", "Permit", "ConcurrencyController", "window_shape", "advertised"]

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


def window_shape(per_minute: float) -> tuple[int, float]:
    """(capacity, period): an integer share per window of about one second.

    3000 rpm -> 50 per 1.0 s; 90 rpm -> 2 per 1.33 s; 20 rpm -> 1 per 3 s.
    """
    capacity = max(1, round(per_minute / 60.0))
    return capacity, 60.0 * capacity / per_minute


def advertised(headers: Mapping[str, str], kind: str) -> tuple[float | None, float | None]:
    """What a server's `x-ratelimit-*` headers say of `kind` (requests or images): the per-minute
    limit (None when absent or not a positive number), and, when none remain, the seconds (≤ 60)
    until its window resets (else None)."""
    limit: float | None = None
    raw = headers.get(f"x-ratelimit-limit-{kind}")
    if raw is not None:
        try:
            value = float(raw)
        except ValueError:
            value = 0.0
        limit = value if value > 0 and math.isfinite(value) else None
    remaining = headers.get(f"x-ratelimit-remaining-{kind}")
    reset = headers.get(f"x-ratelimit-reset-{kind}")
    if remaining is not None and reset is not None and remaining.strip() == "0":
        seconds = parse_duration(reset)
        if seconds is not None:
            return limit, min(seconds, 60.0)
    return limit, None


class Window:
    """A sliding window log: at most `capacity` units in any `period` seconds.

    `capacity=None` means unlimited; the window still records sends so that a limit learned
    later starts from what was really sent.
    """

    def __init__(self, capacity: float | None = None, period: float = 1.0) -> None:
        self.capacity = capacity
        self.period = period
        self._log: deque[list] = deque()  # [time, cost], time moved to the real send
        self._used = 0

    def _expire(self, now: float, horizon: float) -> None:
        log = self._log
        while log and log[0][0] <= now - horizon:
            self._used -= log.popleft()[1]

    def used(self, now: float, margin: float = 0.0) -> int:
        self._expire(now, self.period + margin)
        return self._used

    def wait_time(self, now: float, cost: int, margin: float = 0.0) -> float:
        """Seconds until `cost` more units fit (0 if they fit now)."""
        horizon = self.period + margin
        self._expire(now, horizon)
        if self.capacity is None or not self._log or self._used + cost <= self.capacity:
            return 0.0
        need = self._used + cost - self.capacity
        freed = 0
        for t, c in self._log:
            freed += c
            if freed >= need:
                return max(t + horizon - now, 0.0)
        return max(self._log[-1][0] + horizon - now, 0.0)

    def refund(self, entry: list) -> None:
        if any(e is entry for e in self._log):  # still inside the window
            self._used -= entry[1]
        entry[1] = 0

    def record(self, now: float, cost: int) -> list:
        entry = [now, cost]
        self._log.append(entry)
        self._used += cost
        return entry


class _Waiter:
    __slots__ = ("event", "images", "permit")

    def __init__(self, images: int) -> None:
        self.images = images
        self.event = anyio.Event()
        self.permit: Permit | None = None


class Permit:
    """A granted send. `sent()` moves its window entries to the moment it really leaves;
    `refund()` gives them back when the server rejected it (a 429 is not counted there)."""

    __slots__ = ("_clock", "_entries")

    def __init__(self, clock: Clock, *entries: tuple[Window, list]) -> None:
        self._clock = clock
        self._entries = entries

    def sent(self) -> None:
        now = self._clock()
        for _, entry in self._entries:
            entry[0] = max(entry[0], now)

    def refund(self) -> None:
        for window, entry in self._entries:
            window.refund(entry)


class RateLimiter:
    """One limiter shared by all workers of an endpoint.

    >>> limiter = RateLimiter(rpm=3000, ipm=None)
    >>> await limiter.acquire(images=2)   # waits until a request and 2 images fit

    Limits come from the job (`rpm`, `ipm`), from `x-ratelimit-limit-*` headers, or — when the
    server says nothing — from 429s: the sends that the server accepted in the last window
    become the learned capacity, probed upward slowly after clean windows.
    """

    PROBE_AFTER_WINDOWS = 30  # clean windows before a learned limit is raised by one (a failed
    # probe costs a pool-wide pause of up to a window, and sets a ceiling)

    def __init__(
        self,
        rpm: float | None = None,
        ipm: float | None = None,
        *,
        clock: Clock = anyio.current_time,
        sleep: Sleep = anyio.sleep,
        margin: float = 0.015,
        max_margin: float = 0.200,
    ) -> None:
        self._clock = clock
        self._sleep = sleep
        self.margin = margin  # slack for the trip to the server; grows if a 429 proves it short
        self.max_margin = max_margin
        self.requests = Window(*window_shape(rpm)) if rpm else Window()
        self.images = Window(*window_shape(ipm)) if ipm else Window()
        # where each limit came from: "configured", "advertised", "learned" or None (unknown)
        self.source: dict[str, str | None] = {
            "requests": "configured" if rpm else None,
            "images": "configured" if ipm else None,
        }
        self.pause_until = 0.0
        self.rejections = 0
        self._last_probe = 0.0
        self._last_widen = -1e9
        self._learning_until = -1e9
        self._ceiling: dict[str, float] = {"requests": math.inf, "images": math.inf}
        self._queue: deque[_Waiter] = deque()

    def _windows(self) -> dict[str, Window]:
        return {"requests": self.requests, "images": self.images}

    @property
    def waiting(self) -> int:
        """Acquirers queued for tokens."""
        return len(self._queue)

    def wait_time(self, images: int, now: float | None = None) -> float:
        now = self._clock() if now is None else now
        return max(
            self.pause_until - now,
            self.requests.wait_time(now, 1, self.margin),
            self.images.wait_time(now, images, self.margin),
        )

    async def acquire(self, images: int = 1) -> Permit:
        """Wait until one request for `images` images may be sent, and count it as sent.

        Waiters are served first come, first served. The head of the queue sleeps until the
        window has room, then grants itself and every waiter behind it that fits, in one step:
        a window's share leaves together instead of one wake-up at a time.
        Call `permit.sent()` right before the request goes out: the server counts arrivals.
        """
        if not self._queue and self.wait_time(images) <= 0:
            return self._grant(self._clock(), images)
        waiter = _Waiter(images)
        self._queue.append(waiter)
        try:
            while waiter.permit is None:
                if self._queue[0] is waiter:
                    wait = self.wait_time(images)
                    if wait > 0:
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
        permit = Permit(self._clock, (self.requests, self.requests.record(now, 1)),
                        (self.images, self.images.record(now, images)))
        self._maybe_probe(now)
        return permit

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
        self.pause_until = max(self.pause_until, self._clock() + seconds)

    def set_limit(self, kind: str, per_minute: float) -> None:
        window = self._windows()[kind]
        window.capacity, window.period = window_shape(per_minute)

    def observe_headers(self, headers: Mapping[str, str]) -> None:
        """Adopt limits the server advertises (`x-ratelimit-limit-requests`, `-images`)."""
        for kind, window in self._windows().items():
            limit, exhausted_for = advertised(headers, kind)
            if limit is None:
                continue
            capacity, period = window_shape(limit)
            if self.source[kind] in (None, "learned", "advertised") or (
                capacity / period < window.capacity / window.period  # a stricter server wins
            ):
                if self.source[kind] != "advertised" or (capacity, period) != (window.capacity, window.period):
                    window.capacity, window.period = capacity, period
                    self.source[kind] = "advertised"
            if exhausted_for is not None:
                self.pause(exhausted_for)

    def on_rate_limited(self, retry_after: float | None, kind: str = "requests", images: int = 1) -> None:
        """A 429 `rate_limit_exceeded`: pause everyone, and learn or tighten the limit.

        `kind` is the limit the server named (the error `type`: requests or images).
        """
        kind = kind if kind in ("requests", "images") else "requests"
        now = self._clock()
        self.rejections += 1
        self._last_probe = now
        self.pause(retry_after if retry_after is not None else 1.0)
        window = self._windows()[kind]
        # rejected sends were refunded (Permit.refund), so what is left is what the server took
        accepted = window.used(now, self.margin)
        source = self.source[kind]
        if source is None:
            # nothing known: what the server accepted in the last second is its limit
            window.capacity, window.period = max(1, accepted), 1.0
            self.source[kind] = "learned"
            self._learning_until = now + window.period
        elif source == "learned" and now < self._learning_until:
            # the rest of the first burst's answers refine the estimate
            window.capacity = max(1, min(int(window.capacity or 1), accepted))
        elif now - self._last_widen >= window.period:
            # once per window: one late burst answers with many 429s at once
            self._last_widen = now
            if retry_after is not None and retry_after < 0.1 * window.period:
                # a few ms early: the trip to the server needs more slack, the limit is right
                self.margin = min(self.max_margin, self.margin + max(0.005, retry_after))
            elif source == "learned":
                # a probe too far: this capacity is over the limit; never probe up to it again
                self._ceiling[kind] = int(window.capacity or 1)
                window.capacity = max(1, self._ceiling[kind] - 1)
            else:
                self.margin = min(self.max_margin, self.margin + 0.005)

    def _maybe_probe(self, now: float) -> None:
        for kind, window in self._windows().items():
            if self.source[kind] != "learned" or window.capacity is None:
                continue
            if window.capacity + 1 >= self._ceiling[kind]:
                continue
            if now - self._last_probe >= self.PROBE_AFTER_WINDOWS * window.period:
                self._last_probe = now
                window.capacity += 1


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
