"""Routing: which endpoint sends which item, and when an endpoint should rest.

Endpoints *pull* work: each endpoint's workers take the next item only when that endpoint can
send it now (a free slot, rate tokens, a closed circuit). Items therefore go to whichever
endpoint can start them soonest, and the combined rate approaches the sum of the limits without
a central estimate of anyone's queue.

`Dispatcher` holds the items waiting to be sent: new ones from the job, retries waiting out their
backoff, and retries pinned to one endpoint (a timed-out request may still be generated and billed
there, so its retry prefers the same endpoint). `CircuitBreaker` rests an endpoint that keeps
answering 5xx or timing out, then lets one probe through.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import anyio

from ._job import Item

__all__ = ["Task", "Dispatcher", "BreakerPolicy", "CircuitBreaker"]

Clock = Callable[[], float]


@dataclass(eq=False)
class Task:
    """One item on its way through the run, across attempts and endpoints."""

    item: Item
    eligible: frozenset[str]  # endpoints that serve the item's model
    attempt: int = 0  # journal attempt number (carries over from earlier runs)
    tries: int = 0  # attempts in this run
    error: Any = None  # the last RequestError
    prefer: str | None = None  # the endpoint a retry should go back to
    seq: int = 0
    claim_waits: int = 0  # times another worker held its claim


@dataclass
class _Waiters:
    events: deque[anyio.Event] = field(default_factory=deque)

    def wake_one(self) -> None:
        while self.events:
            event = self.events.popleft()
            if not event.is_set():
                event.set()
                return

    def wake_all(self) -> None:
        while self.events:
            self.events.popleft().set()


class Dispatcher:
    """Items waiting to be sent, taken by endpoints as they can send them.

    >>> dispatch = Dispatcher(["a", "b"])
    >>> await dispatch.put_new(Task(item, frozenset({"a", "b"})))
    >>> dispatch.try_take("b")          # None when nothing is ready for "b"
    Not thread-safe: used from the event loop only.
    """

    def __init__(self, endpoints: Iterable[str], *, max_queued: int = 256, clock: Clock = anyio.current_time) -> None:
        self.live: set[str] = set(endpoints)
        self.max_queued = max_queued
        self._clock = clock
        self._seq = itertools.count()
        self._general: dict[frozenset[str], deque[Task]] = {}
        self._pinned: dict[str, deque[Task]] = {name: deque() for name in self.live}
        self._later: list[tuple[float, int, Task]] = []
        self._waiters: dict[str, _Waiters] = {name: _Waiters() for name in self.live}
        self._space = anyio.Event()
        self.queued = 0  # tasks in the general and pinned queues
        self.outstanding = 0  # tasks taken and not yet finished or requeued
        self.feeding = True
        self.stranded: list[Task] = []  # tasks no live endpoint can serve (they stay pending)

    # -- putting work in -------------------------------------------------------------------

    async def put_new(self, task: Task) -> None:
        """Queue a new item; waits while many items are already queued (backpressure)."""
        while self.queued >= self.max_queued and self.live:
            self._space = anyio.Event() if self._space.is_set() else self._space
            await self._space.wait()
        self._enqueue(task)

    def close_feed(self) -> None:
        self.feeding = False
        self._wake_if_finished()

    def retry_later(self, task: Task, delay: float) -> None:
        """Give a taken task back, to be sent again after `delay` seconds."""
        self.outstanding -= 1
        heapq.heappush(self._later, (self._clock() + delay, next(self._seq), task))
        for name in self._route(task):
            self._waiters[name].wake_one()  # someone must wake up when it is due

    def finished(self, task: Task) -> None:
        """A taken task ended (done, failed, or left pending)."""
        self.outstanding -= 1
        self._wake_if_finished()

    def _route(self, task: Task) -> set[str]:
        if task.prefer is not None and task.prefer in self.live:
            return {task.prefer}
        return set(task.eligible) & self.live

    def _enqueue(self, task: Task) -> None:
        targets = self._route(task)
        if not targets:
            self.stranded.append(task)
            return
        task.seq = next(self._seq)
        if task.prefer is not None and task.prefer in self.live:
            self._pinned[task.prefer].append(task)
        else:
            task.prefer = None
            self._general.setdefault(task.eligible, deque()).append(task)
        self.queued += 1
        for name in targets:
            self._waiters[name].wake_one()

    # -- taking work out --------------------------------------------------------------------

    def _release_due(self) -> None:
        now = self._clock()
        while self._later and self._later[0][0] <= now:
            _, _, task = heapq.heappop(self._later)
            self._enqueue(task)

    def try_take(self, name: str) -> Task | None:
        """The oldest task `name` may send, or None; never waits."""
        self._release_due()
        pinned = self._pinned.get(name)
        if pinned:
            task = pinned.popleft()
        else:
            best: deque[Task] | None = None
            for eligible, queue in self._general.items():
                if queue and name in eligible and (best is None or queue[0].seq < best[0].seq):
                    best = queue
            if best is None:
                return None
            task = best.popleft()
        self.queued -= 1
        self.outstanding += 1
        if not self._space.is_set():
            self._space.set()
        return task

    async def wait(self, name: str, timeout: float = 1.0, until_due: bool = True) -> None:
        """Sleep until work may be there for `name` (new, due, or the run's end).

        `until_due=False`: a retry falling due does not end the wait (the caller can't send it before
        `timeout` anyway, e.g. a resting endpoint; waking for it would spin).
        """
        if self._later and until_due:
            timeout = min(timeout, max(0.0, self._later[0][0] - self._clock()))
        event = anyio.Event()
        waiters = self._waiters[name].events
        waiters.append(event)
        try:
            with anyio.move_on_after(timeout):
                await event.wait()
        finally:
            if not event.is_set():
                waiters.remove(event)  # a timed-out waiter must not swallow the next wake-up

    def nudge(self, name: str) -> None:
        """Wake one worker of `name` waiting in `wait` (its endpoint may send again sooner than it thought)."""
        self._waiters[name].wake_one()

    @property
    def done(self) -> bool:
        """Nothing left: the feed is closed and no task is queued, waiting or in flight."""
        return not self.feeding and not self.queued and not self._later and not self.outstanding

    def _wake_if_finished(self) -> None:
        if self.done:
            for waiters in self._waiters.values():
                waiters.wake_all()

    # -- endpoints leaving ------------------------------------------------------------------

    def unpin(self, name: str) -> None:
        """Tasks pinned to `name` may go anywhere (its circuit opened, or it retired)."""
        pinned = self._pinned.get(name)
        while pinned:
            task = pinned.popleft()
            self.queued -= 1
            task.prefer = None
            self._enqueue(task)

    def retire(self, name: str) -> None:
        """`name` sends nothing more this run; what only it could serve is stranded."""
        if name not in self.live:
            return
        self.live.discard(name)
        self.unpin(name)
        for eligible, queue in list(self._general.items()):
            if not eligible & self.live:
                self.queued -= len(queue)
                self.stranded.extend(queue)
                queue.clear()
        for _, _, task in self._later:
            if task.prefer == name:
                task.prefer = None
        self._waiters[name].wake_all()
        self._space.set()
        self._wake_if_finished()

    def drain_later(self) -> None:
        """The run is stopping: tasks waiting out a backoff stay pending."""
        self._later.clear()
        self._wake_if_finished()


@dataclass(frozen=True)
class BreakerPolicy:
    """Open after `failures` server-trouble answers in a row; rest `cooldown` seconds (doubling on a
    failed probe, up to `max_cooldown`), then let one probe request through. After
    `max_failed_probes` probes in a row fail, the endpoint is dead for this run (by default about
    5+10+20+40+60 s of rests, plus the probes' own time, without a single success)."""

    failures: int = 5
    cooldown: float = 5.0
    max_cooldown: float = 60.0
    max_failed_probes: int = 5


class CircuitBreaker:
    """closed → (failures in a row) → open → (cooldown) → half-open: one probe → closed or open."""

    def __init__(self, policy: BreakerPolicy = BreakerPolicy(), clock: Clock = anyio.current_time) -> None:
        self.policy = policy
        self._clock = clock
        self.state = "closed"
        self.streak = 0
        self.opened_at: float | None = None
        self.open_until = 0.0
        self._cooldown = policy.cooldown
        self._probing = False
        self.openings = 0
        self.first_opened_wall: float | None = None  # time.time() of the first opening, for reports
        self.failed_probes = 0  # in a row, since the last success
        self.trouble_since: float | None = None  # clock time of the first failure since the last success

    def wait_time(self) -> float:
        """0 if a request may start now; otherwise seconds to wait before asking again."""
        if self.state == "closed":
            return 0.0
        now = self._clock()
        if self.state == "open":
            if now < self.open_until:
                return self.open_until - now
            self.state = "half-open"
        if self._probing:
            return 0.25  # one probe at a time; its answer decides
        return 0.0

    def starting(self) -> None:
        if self.state == "half-open":
            self._probing = True

    def on_success(self) -> None:
        """Any answer that shows the endpoint works (a 200, a 4xx about the request)."""
        self.streak = 0
        self.failed_probes = 0
        self.trouble_since = None
        if self.state != "closed":
            self.state, self._probing, self._cooldown = "closed", False, self.policy.cooldown

    def on_trouble(self) -> bool:
        """A 5xx, timeout or dropped connection; return True if the circuit just opened."""
        self.streak += 1
        now = self._clock()
        if self.trouble_since is None:
            self.trouble_since = now
        if self.state == "half-open":
            self.failed_probes += 1
            self._probing = False
            self._cooldown = min(self.policy.max_cooldown, self._cooldown * 2)
            self.state, self.open_until = "open", now + self._cooldown
            return True
        if self.state == "closed" and self.streak >= self.policy.failures:
            self.state, self.opened_at, self.open_until = "open", now, now + self._cooldown
            self.openings += 1
            if self.first_opened_wall is None:
                self.first_opened_wall = time.time()
            return True
        return False

    @property
    def dead(self) -> bool:
        """Probes kept failing: send nothing more there this run (see BreakerPolicy)."""
        return self.failed_probes >= self.policy.max_failed_probes

    def troubled_for(self) -> float:
        """Seconds since the first failure after the last success (0 when it works)."""
        return 0.0 if self.trouble_since is None else self._clock() - self.trouble_since

    def on_abandoned(self) -> None:
        """The probe ended without an answer about the endpoint (the run stopped)."""
        self._probing = False
