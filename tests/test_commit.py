"""The write → record stage every executor shares (`_commit.Recorder`), the stop state
(`_control.RunControl`) and "who holds this item" (`_claims`), tested without a run."""

from __future__ import annotations

import errno
import json

import anyio
import pytest

from batcher._claims import LocalClaims
from batcher._client import GeneratedImage, Generation
from batcher._commit import Recorder
from batcher._control import RunControl
from batcher._endpoints import EndpointRun
from batcher._exceptions import FatalError, PermanentError
from batcher._job import Endpoint, Item
from batcher._manifest import Journal
from batcher._plan import PriceTable
from batcher._redact import Redactor
from batcher._report import Reporter
from batcher._writer import OutputDir
from helpers import tiny_png


def item(n: int = 1) -> Item:
    return Item(id="a", body={"model": "m", "prompt": "p", "n": n}, rhash="h", file="job.yaml", line=1)


def endpoint() -> EndpointRun:
    return EndpointRun(Endpoint(name="e"), "sk-x", "http://127.0.0.1:1/v1", 1, None, None,
                       PriceTable([{"per_image": 0.5}]))


def recorder(tmp_path, troubles: list[OSError]) -> Recorder:
    out = OutputDir(tmp_path / "out")
    out.prepare()
    journal = Journal.open(out.journal)
    return Recorder(out, journal, Reporter(quiet=True), redact=Redactor.of(["sk-secret-1234567890"]),
                    on_disk_trouble=troubles.append)


def records(rec: Recorder) -> list[dict]:
    rec.journal.sync()
    return [json.loads(line) for line in rec.out.journal.read_text().splitlines()]


def test_answer_saves_then_records_with_extra_fields_and_counts(tmp_path):
    troubles: list[OSError] = []
    rec, ep = recorder(tmp_path, troubles), endpoint()

    async def main():
        gen = Generation(created=1, images=[GeneratedImage(data=tiny_png())], request_id="r1")
        saved = await rec.save(None, "a", gen, count=1)  # type: ignore[arg-type]  # no URL: no client
        assert (rec.out.root / saved[0].file).is_file()  # renamed into place before the record
        assert await rec.answer(ep, item(), 1, gen, saved, extra={"batch": "chunk-7"})

    anyio.run(main)
    [line] = records(rec)
    assert line["status"] == "done" and line["batch"] == "chunk-7" and line["images"][0]["endpoint"] == "e"
    assert (rec.images, rec.cost, ep.stats["done"], ep.stats["images"]) == (1, 0.5, 1, 1)
    assert not troubles


def test_a_short_answer_is_recorded_failed_and_keeps_what_came_before(tmp_path):
    rec, ep = recorder(tmp_path, []), endpoint()
    before = [{"file": "images/a-1.png", "bytes": 1}]

    async def main():
        gen = Generation(created=1, images=[GeneratedImage(data=tiny_png())])
        saved = await rec.save(None, "a", gen, first=1, count=3)  # type: ignore[arg-type]
        assert await rec.answer(ep, item(n=3), 2, gen, saved, (before, 0.5))

    anyio.run(main)
    [line] = records(rec)
    assert line["status"] == "failed" and line["short"] == {"wanted": 3, "got": 2}
    assert line["images"][0] == before[0] and line["cost"] == 1.0 and ep.stats["failed"] == 1


def test_a_refused_append_is_reported_and_not_counted(tmp_path, monkeypatch):
    troubles: list[OSError] = []
    rec, ep = recorder(tmp_path, troubles), endpoint()

    def full(_rec):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rec.journal, "append", full)

    async def main():
        gen = Generation(created=1, images=[GeneratedImage(data=tiny_png())])
        saved = await rec.save(None, "a", gen)  # type: ignore[arg-type]
        assert not await rec.answer(ep, item(), 1, gen, saved)
        assert not await rec.failure(ep, item(), 1, PermanentError("no", status=400))

    anyio.run(main)
    assert [t.errno for t in troubles] == [errno.ENOSPC, errno.ENOSPC]
    assert rec.images == 0 and ep.stats["done"] == ep.stats["failed"] == 0
    assert rec.cost == 0.5  # the answer was paid for even though its record was lost


def test_failure_is_redacted_and_carries_extra_fields(tmp_path):
    rec, ep = recorder(tmp_path, []), endpoint()
    exc = PermanentError("bad key sk-secret-1234567890", status=400, code="invalid_request")
    assert anyio.run(lambda: rec.failure(ep, item(), 3, exc, extra={"batch": "c1"}))
    [line] = records(rec)
    assert line["status"] == "failed" and line["attempts"] == 3 and line["batch"] == "c1"
    assert "sk-secret" not in json.dumps(line) and ep.stats["failed"] == 1


def test_attempt_is_journaled_and_counted_before_a_send(tmp_path):
    rec = recorder(tmp_path, [])
    rec.attempt(item(), 1, "e")
    assert [r["t"] for r in records(rec)] == ["attempt"] and rec.requests == 1


def test_stop_wakes_every_waiter_and_keeps_the_first_fatal_error():
    control = RunControl(Reporter(quiet=True))
    woke: list[bool] = []

    async def main():
        async with anyio.create_task_group() as tg:
            for _ in range(3):
                tg.start_soon(lambda: _waiter(control, woke))
            await anyio.sleep(0)
            with anyio.fail_after(5):
                control.stop(FatalError("first", code="a"))
                control.stop(FatalError("second", code="b"))

    anyio.run(main)
    assert woke == [False, False, False] and control.fatal is not None and control.fatal.code == "a"
    assert control.stopping and anyio.run(control.wait, anyio.sleep, 0) is False  # no waits after a stop


async def _waiter(control: RunControl, woke: list[bool]) -> None:
    woke.append(await control.wait(anyio.sleep, 60))


def test_local_claims_hold_every_item():
    claims = LocalClaims()

    async def main():
        assert await claims.claim("a") == "ok"
        await claims.release("a", done=True)
        await claims.keep_renewed()  # nothing to renew: returns at once

    anyio.run(main)
    assert claims.skipped == 0


# -- Redis claims, on fakeredis ------------------------------------------------------------------------

def redis_claims(store=None):
    fakeredis = pytest.importorskip("fakeredis")
    pytest.importorskip("lupa")
    from batcher._claims import RedisClaims
    from batcher._redis import ClaimStore

    r = fakeredis.FakeAsyncRedis(server=fakeredis.FakeServer())
    return r, RedisClaims("redis://unused", "out", Reporter(quiet=True), ttl=0.3,
                          store=store or ClaimStore(r, "out"))


def test_redis_claims_claim_renew_and_keep_done():
    from batcher._redis import ClaimStore

    r, a = redis_claims()
    other = ClaimStore(r, "out")

    async def main():
        assert await a.claim("x") == "ok" and await a.claim("x") == "ok"  # ours stays ours across retries
        assert await other.holder("x") == a.store.token
        with anyio.move_on_after(1.0):  # > 3 ttls: only the renewals keep it
            await a.keep_renewed()
        assert await other.holder("x") == a.store.token
        await a.release("x", done=True)
        assert await other.holder("x") == "done"
        _, b = redis_claims(ClaimStore(r, "out"))
        assert await b.claim("x") == "done"
        assert await b.claim("y") == "ok"
        _, c = redis_claims(ClaimStore(r, "out"))
        assert await c.claim("y") == "held"
        await b.release("y", done=False)
        assert await c.claim("y") == "ok"

    anyio.run(main)


class _DownStore:
    """A ClaimStore whose Redis is away (redis' ConnectionError), or broken in another way."""

    def __init__(self, error: Exception) -> None:
        self.error = error

    async def claim(self, item_id: str, ttl_s: float) -> bool:
        raise self.error

    async def release(self, item_id: str) -> bool:
        raise self.error


def test_redis_away_means_going_on_without_claims_other_errors_are_not_swallowed():
    import redis.exceptions

    _, away = redis_claims(_DownStore(redis.exceptions.ConnectionError("refused")))
    assert anyio.run(away.claim, "x") == "ok"
    _, broken = redis_claims(_DownStore(redis.exceptions.ResponseError("WRONGTYPE")))
    with pytest.raises(redis.exceptions.ResponseError):
        anyio.run(broken.claim, "x")


def _item(i: int) -> Item:
    return Item(id=f"i{i}", body={"model": "m", "prompt": f"p{i}", "n": 1}, rhash="h", file="job.yaml", line=i)


def test_answer_many_records_what_answer_would_in_one_thread_call(tmp_path):
    one, many, ep1, ep2 = recorder(tmp_path / "a", []), recorder(tmp_path / "b", []), endpoint(), endpoint()

    async def main():
        for i in range(3):
            gen = Generation(created=1, images=[GeneratedImage(data=tiny_png())], request_id=f"r{i}")
            saved = await one.save(None, f"i{i}", gen, count=1)  # type: ignore[arg-type]
            assert await one.answer(ep1, _item(i), 1, gen, saved, extra={"batch": "k"})
        rows = [(_item(i), 1, Generation(created=1, images=[GeneratedImage(data=tiny_png())], request_id=f"r{i}"),
                 ([], None), {"batch": "k"}) for i in range(3)]
        assert await many.answer_many(ep2, rows)

    anyio.run(main)
    strip = lambda recs: [{k: v for k, v in r.items() if k != "finished"} for r in recs]  # noqa: E731
    assert strip(records(one)) == strip(records(many))
    assert (many.images, many.cost, ep2.stats["done"]) == (one.images, one.cost, ep1.stats["done"]) == (3, 1.5, 3)
    assert all((many.out.root / r["images"][0]["file"]).is_file() for r in records(many))


def test_answer_many_stops_at_a_refused_append_keeping_the_rows_before(tmp_path, monkeypatch):
    troubles: list[OSError] = []
    rec, ep = recorder(tmp_path, troubles), endpoint()
    real = rec.journal.append

    def append(r):
        if r["id"] == "i1":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(r)

    monkeypatch.setattr(rec.journal, "append", append)
    rows = [(_item(i), 1, Generation(created=1, images=[GeneratedImage(data=tiny_png())]), ([], None), None)
            for i in range(3)]
    assert anyio.run(rec.answer_many, ep, rows) is False
    assert [r["id"] for r in records(rec)] == ["i0"]  # i1 refused, i2 never tried
    assert troubles and troubles[0].errno == errno.ENOSPC
    assert (rec.images, ep.stats["done"], rec.cost) == (1, 1, 1.0)  # i1's images were paid: its cost counts
