"""The synchronous executor: endpoint workers pull items from the `Dispatcher` and send each as one
Images API request, retrying under `_policy.decide`; answers go through the `Recorder`.

>>> executor = SyncExecutor(endpoints, dispatch, recorder, claims, control, reporter=reporter, ...)
>>> await executor.open(stack, timeouts, job, todo)  # one client per endpoint, closed with the stack
>>> async with anyio.create_task_group() as work: executor.start(work)
"""

from __future__ import annotations

import functools
import random
from contextlib import AsyncExitStack

import anyio
from anyio.abc import TaskGroup

from ._claims import CLAIM_WAITS, LocalClaims
from ._client import Answer, Generation, Timeouts
from ._commit import Recorder
from ._control import RunControl
from ._endpoints import EndpointRun, make_client
from ._exceptions import FatalError, RequestError, TransientError
from ._ids import safe_stem
from ._job import Job
from ._limiter import RateLimiter
from ._plan import Budget
from ._policy import POLICY_CODES, Fail, FailureState, Hold, Retire, RetryPolicy, decide
from ._report import Reporter
from ._route import Dispatcher, Task

GATE_FALLBACK_S = 1.0  # a worker waiting to be woken for a slot wakes by itself this long after it


class _Stopped(Exception):
    """The run stopped while this item waited; it stays pending."""


class SyncExecutor:
    """One request per attempt, `concurrency` workers per endpoint."""

    def __init__(self, endpoints: list[EndpointRun], dispatch: Dispatcher, recorder: Recorder, claims: LocalClaims,
                 control: RunControl, *, reporter: Reporter, budget: Budget, policy: RetryPolicy,
                 rng: random.Random, deadline: float, max_policy_violations: int) -> None:
        self.endpoints = endpoints
        self.dispatch = dispatch
        self.recorder = recorder
        self.claims = claims
        self.control = control
        self.reporter = reporter
        self.budget = budget
        self.policy = policy
        self.rng = rng
        self.deadline = deadline  # seconds for one request, connect and answer
        self.max_policy_violations = max_policy_violations
        self.policy_violations = 0

    async def open(self, stack: AsyncExitStack, timeouts: Timeouts, job: Job, todo: int) -> None:
        """Open each endpoint's client; the stack closes them after the run's task groups end.

        An endpoint with a known limit also opens the connections its first window will send on
        (at most `todo`, the requests left): see `ImagesClient.open_connections`.
        """
        for ep in self.endpoints:
            ep.client = await stack.enter_async_context(make_client(ep, timeouts, job))
        async with anyio.create_task_group() as tg:
            for ep in self.endpoints:
                count = min(ep.limiter.first_share(), ep.concurrency, todo)
                if count > 0:
                    tg.start_soon(ep.client.open_connections, count)

    def start(self, work: TaskGroup) -> None:
        """Start every endpoint's workers in `work` (they end when the dispatcher is done or the run stops)."""
        for ep in self.endpoints:
            if isinstance(ep.limiter, RateLimiter):
                # its requests are stamped on the wire (see ImagesClient.send): a worker waiting at the
                # gate for the last grant's send (RateLimiter.BATON_S) is woken when it is out
                ep.limiter.on_wire = functools.partial(self.dispatch.nudge, ep.name)
            for _ in range(ep.concurrency):
                work.start_soon(self._endpoint_worker, ep)

    async def _endpoint_worker(self, ep: EndpointRun) -> None:
        """Take an item only when this endpoint can send it now: the pull makes the routing."""
        dispatch, control = self.dispatch, self.control
        while not control.stopping and ep.retired is None and not dispatch.done:
            wait = ep.breaker.wait_time()
            if wait > 0:
                # dispatch.wait, not sleep: the run's end wakes it; a retry falling due does not (it
                # must wait for the rest to end too: waking for it would spin)
                if not await control.wait(dispatch.wait, ep.name, wait, False):
                    return
                continue
            if not await control.wait(ep.pool.slots.acquire):
                return
            try:
                task = None
                while task is None and not control.stopping and ep.retired is None and not dispatch.done:
                    if ep.breaker.wait_time() > 0:
                        break
                    wait = ep.gate()
                    if wait > 0:
                        if not await self._wait_gate(ep, wait):
                            return
                        continue
                    task = dispatch.try_take(ep.name)
                    if task is None and not await control.wait(dispatch.wait, ep.name):
                        return
                if task is not None:
                    if task.tries:
                        self.reporter.retry(-1)
                    verdict = await self.claims.claim(task.item.id)
                    if verdict in ("held", "retry") and task.claim_waits < CLAIM_WAITS and not control.stopping:
                        # a live worker renews its claim; a dead one's lapses: ask again later
                        task.claim_waits += 1
                        delay = 0.0 if verdict == "retry" else self.claims.ttl / 2
                        dispatch.retry_later(task, delay)
                        continue
                    if verdict != "ok":
                        self.claims.skipped += 1
                        dispatch.finished(task)  # another worker did it or has it; pending here
                        continue
                    await self._attempt(ep, task)
            finally:
                ep.pool.slots.release()

    async def _wait_gate(self, ep: EndpointRun, wait: float) -> bool:
        """Wait for `ep`'s next slot (False: the run stopped). One worker sleeps until it frees; the
        others wait to be woken, one at a time: when that worker's wait ends (the woken one times
        the slot after) or a send reaches the wire. A herd of timers going off together for every
        slot cost the event loop more than the sends did, and each send left that much later."""
        if ep.gate_timed:
            return await self.control.wait(self.dispatch.wait, ep.name, wait + GATE_FALLBACK_S)
        ep.gate_timed = True
        try:
            return await self.control.wait(self.dispatch.wait, ep.name, wait)
        finally:
            ep.gate_timed = False
            self.dispatch.nudge(ep.name)

    async def _finished(self, task: Task, done: bool) -> None:
        """The item leaves this run's hands: out of the dispatcher, its claim released (kept if done)."""
        self.dispatch.finished(task)
        await self.claims.release(task.item.id, done=done)

    async def _attempt(self, ep: EndpointRun, task: Task) -> None:
        """Send one attempt of `task` on `ep` and decide what happens to the item next."""
        item, recorder = task.item, self.recorder
        try:
            answer, sent_at = await self._send(ep, task)
        except _Stopped:
            ep.breaker.on_abandoned()
            await self._finished(task, done=False)  # stays pending for the next run
            return
        except RequestError as exc:
            await self._after_failure(ep, task, exc)
            return
        # read, saved and recorded in one worker-thread call (url images: read only)
        done = await recorder.commit(ep, item, task.attempt, answer.read)
        if done.unread is not None:
            await self._after_failure(ep, task, done.unread)
            return
        ep.pool.on_answer()
        ep.pool.on_success()
        ep.breaker.on_success()
        ep.limiter.observe_headers(answer.headers, sent_at)
        if isinstance(done.refused, RequestError):
            await self._record_failure(ep, task, done.refused)
        elif done.refused is not None:
            recorder.disk_trouble(done.refused)
            self.dispatch.finished(task)
        elif done.saved is not None:
            await self._finished(task, done=done.complete)  # not recorded: pending, sent again next run
        else:
            assert done.gen is not None
            await self._save(ep, task, done.gen)

    async def _save(self, ep: EndpointRun, task: Task, gen: Generation) -> None:
        """Save and record an answer `Recorder.commit` only read (url images, a shard's output)."""
        item, recorder = task.item, self.recorder
        try:
            have = recorder.have.get(item.id)
            saved = await recorder.save(ep.client, safe_stem(item.id), gen, first=len(have[0]) if have else 0,
                                        count=item.images)
        except RequestError as exc:
            await self._record_failure(ep, task, exc)
        except OSError as exc:
            recorder.disk_trouble(exc)
            self.dispatch.finished(task)
        else:
            have_before = recorder.have.pop(item.id, ([], None))
            recorded = await recorder.answer(ep, item, task.attempt, gen, saved, have_before)
            short = len(have_before[0]) + len(saved) < item.images
            await self._finished(task, done=recorded and not short)  # not recorded: pending, sent again next run

    async def _record_failure(self, ep: EndpointRun, task: Task, exc: RequestError) -> None:
        await self.recorder.failure(ep, task.item, task.attempt, exc)
        await self._finished(task, done=False)

    async def _send(self, ep: EndpointRun, task: Task) -> tuple[Answer, float]:
        """Take rate tokens and budget, journal the attempt, send (the caller holds a slot); the
        answer (not read yet) and when the request left.

        The budget is charged just before sending (so a budget stop never strands work that
        fits) and refunded only when an error answer proves nothing was generated.
        """
        item = task.item
        wanted = self.recorder.wanted(item)  # a short answer earlier: only the missing images
        permit = await self.control.wait_for(ep.limiter.acquire, wanted)
        if permit is None:
            raise _Stopped
        cost = ep.prices.cost(item.body, wanted)
        if not self.budget.reserve(wanted, cost):
            permit.refund()
            note = (f"budget reached ({self.budget.describe()}): {wanted} more image(s) would exceed "
                    f"it; stopping, unstarted items stay pending")
            self.control.stop(FatalError(note, code="budget_exhausted"), note)
            raise _Stopped
        task.tries += 1
        task.attempt += 1
        # journal first: a request that times out after it was sent may still be billed
        try:
            self.recorder.attempt(item, task.attempt, ep.name)
        except OSError as exc:
            self.budget.refund(wanted, cost)
            self.recorder.disk_trouble(exc)
            raise _Stopped from None
        ep.stats["requests"] += 1
        ep.breaker.starting()
        permit.sent()
        body = ep.ep.body_for(item.body)
        if wanted != item.images:
            body["n"] = wanted
        try:
            with anyio.fail_after(self.deadline):
                if permit.timed:  # a limit is known: re-stamped on the wire
                    answer = await ep.client.send(body, on_sent=permit.sent, on_connecting=permit.connecting)
                else:
                    answer = await ep.client.send(body)
        except TimeoutError:
            raise TransientError(f"no answer within {self.deadline:.0f}s", code="timeout") from None
        except RequestError as exc:
            if exc.status is not None and exc.status >= 400:
                self.budget.refund(wanted, cost)  # an error answer: nothing was generated
            if exc.status == 429 and exc.kind == "transient":
                permit.refund()  # the server did not count it; its retry may use the slot
            raise
        return answer, permit.sent_at

    async def _after_failure(self, ep: EndpointRun, task: Task, exc: RequestError) -> None:
        """A failed attempt: note what it says about the endpoint, then apply `decide`'s verdict."""
        item, dispatch = task.item, self.dispatch
        exc.message = self.recorder.redact(exc.message)
        task.error = exc
        # what the answer says about the endpoint, whatever becomes of the item
        if exc.status is not None:
            ep.pool.on_answer()
            ep.limiter.observe_headers(exc.headers)
        if exc.kind == "fatal":
            ep.breaker.on_abandoned()
        elif exc.kind == "permanent":
            ep.breaker.on_success()  # the endpoint answered about the request: it works
            if exc.code in POLICY_CODES:
                self.policy_violations += 1
        elif exc.status == 429:
            ep.limiter.on_rate_limited(exc.retry_after, exc.type or "requests", item.images)
            ep.stats["rate_limited"] += 1
        elif exc.status is None or exc.status >= 500 or exc.code in ("timeout", "connection_error"):
            ep.pool.on_server_trouble()
            if ep.breaker.on_trouble():
                if ep.breaker.dead:
                    return self._give_up(ep, task, exc)
                self.reporter.log(f"endpoint {ep.name!r}: {ep.breaker.streak} failures in a row "
                                  f"(last: {exc.code or exc.status}); resting it "
                                  f"{ep.breaker.open_until - anyio.current_time():.0f}s, then one probe",
                                  level="warning")
                dispatch.unpin(ep.name)
        state = FailureState(tries=task.tries, stopping=self.control.stopping, policy_violations=self.policy_violations,
                             max_policy_violations=self.max_policy_violations,
                             endpoint_healthy=ep.breaker.state == "closed")
        decision = decide(exc, state, self.policy, self.rng)
        if isinstance(decision, Retire):
            self._retire(ep, exc)
            task.prefer = None
            task.tries -= 1  # not the item's fault: it goes to another endpoint, or stays pending
            dispatch.retry_later(task, 0.0)
            if not dispatch.live:
                self.control.stop(exc, f"fatal: no endpoint left (last: {ep.name!r}, {exc.describe()}); "
                                       f"unstarted items stay pending")
        elif isinstance(decision, Fail):
            if decision.stop is not None:
                self.control.stop(exc, decision.stop)
            await self._record_failure(ep, task, exc)
        elif isinstance(decision, Hold):
            dispatch.finished(task)  # stays pending
        else:
            task.prefer = ep.name if decision.pin else None
            self.reporter.retry(1)
            dispatch.retry_later(task, decision.delay)

    def _give_up(self, ep: EndpointRun, task: Task, exc: RequestError) -> None:
        """A dead endpoint (its probes kept failing): retire it with one line; its items go elsewhere
        or stay pending, never burning their attempts on it."""
        breaker = ep.breaker
        why = (f"{breaker.failed_probes} probes in a row failed after its circuit opened, no success for "
               f"{breaker.troubled_for():.0f}s (last: {exc.describe()})")
        ep.retired = "dead"
        self.dispatch.retire(ep.name)
        left = ", ".join(sorted(self.dispatch.live))
        task.prefer = None
        task.tries -= 1  # not the item's fault
        self.dispatch.retry_later(task, 0.0)
        if not left:
            note = f"endpoint {ep.name!r} given up: {why}; no endpoint left, unfinished items stay pending"
            self.control.stop(FatalError(note, status=exc.status, code="endpoint_dead"), note)
        else:
            self.reporter.log(f"endpoint {ep.name!r} given up for this run: {why}; its items go to the others "
                              f"(left: {left})", level="error")

    def _retire(self, ep: EndpointRun, exc: RequestError) -> None:
        if ep.retired is not None:
            return
        ep.retired = " ".join(p for p in (f"HTTP {exc.status}" if exc.status else None, exc.code) if p) or "failed"
        self.dispatch.retire(ep.name)
        left = ", ".join(sorted(self.dispatch.live)) or "none"
        self.reporter.log(f"endpoint {ep.name!r} retired for this run: {exc.describe()}; its items go to "
                          f"the others (left: {left})", level="error")
