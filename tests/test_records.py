"""Journal records (`batcher/_records.py`): each constructor's shape, the replay rules as a table, and
a journal written by the code before the records module replayed to the same entries and checkpoint rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batcher import _checkpoint
from batcher._manifest import Journal
from batcher._records import (
    Entry,
    attempt_record,
    done_record,
    end_record,
    failed_record,
    replay,
    run_record,
    short_record,
)

# -- constructors: the exact records (keys in the order written; "t" first) ------------------------

IMG = {"file": "images/a.png", "revised_prompt": None, "sha256": "ab", "bytes": 10, "width": 1, "height": 1,
       "endpoint": "e", "model": "m"}


def test_run_record() -> None:
    rec = run_record("job", "/j.yaml", 42, at="T")
    assert rec == {"t": "run", "job": "job", "job_file": "/j.yaml", "at": "T", "pid": 42}
    assert next(iter(rec)) == "t"
    assert run_record("job", "/j.yaml", 1)["at"].endswith("Z")


def test_attempt_record() -> None:
    rec = attempt_record("i", "h", 3, "e", at="T")
    assert list(rec.items()) == [("t", "attempt"), ("id", "i"), ("rhash", "h"), ("attempt", 3), ("endpoint", "e"),
                                 ("at", "T")]


def test_end_record() -> None:
    rec = end_record({"total": 1, "done": 1, "failed": 0, "pending": 0}, {"e": {"requests": 1}}, at="T")
    assert list(rec.items()) == [("t", "end"), ("at", "T"), ("summary", {"total": 1, "done": 1, "failed": 0,
                                                                          "pending": 0}), ("endpoints", {"e": {"requests": 1}})]


def test_done_record() -> None:
    rec = done_record("i", "h", {"prompt": "p"}, created=5, images=[IMG], attempts=2, request_id="r", endpoint="e",
                      finished="T")
    assert list(rec.items()) == [
        ("t", "item"), ("id", "i"), ("rhash", "h"), ("status", "done"), ("request", {"prompt": "p"}), ("created", 5),
        ("images", [IMG]), ("attempts", 2), ("error", None), ("request_id", "r"), ("endpoint", "e"), ("finished", "T")]
    full = done_record("i", "h", {}, created=None, images=[], attempts=1, request_id=None, endpoint="e",
                       vars={"x": 1}, cost=0.04, usage={"total_tokens": 3}, finished="T")
    assert list(full)[-3:] == ["vars", "cost", "usage"]
    assert (full["vars"], full["cost"], full["usage"]) == ({"x": 1}, 0.04, {"total_tokens": 3})
    bare = done_record("i", "h", {}, created=None, images=[], attempts=1, request_id=None, endpoint="e", vars={})
    assert not {"vars", "cost", "usage", "short"} & set(bare)


def test_short_record() -> None:
    rec = short_record("i", "h", {"n": 3}, wanted=3, created=5, images=[IMG], attempts=1, request_id="r",
                       endpoint="e", finished="T", cost=0.01)
    assert rec["status"] == "failed"
    assert rec["error"] == {"kind": "transient", "status": 200, "code": "short_answer",
                            "message": "got 1 of 3 image(s); a rerun asks for the 2 missing"}
    assert rec["short"] == {"wanted": 3, "got": 1}
    assert list(rec) == ["t", "id", "rhash", "status", "request", "created", "images", "attempts", "error",
                         "request_id", "endpoint", "finished", "short", "cost"]


def test_failed_record() -> None:
    err = {"kind": "permanent", "status": 400, "code": "content_policy_violation", "message": "no"}
    rec = failed_record("i", "h", {"prompt": "p"}, attempts=1, error=err, endpoint="e", vars={"v": 1}, finished="T")
    assert list(rec.items()) == [
        ("t", "item"), ("id", "i"), ("rhash", "h"), ("status", "failed"), ("request", {"prompt": "p"}),
        ("created", None), ("images", []), ("attempts", 1), ("error", err), ("endpoint", "e"), ("finished", "T"),
        ("vars", {"v": 1})]
    assert "vars" not in failed_record("i", "h", {}, attempts=1, error=err, endpoint="e")


# -- replay, as a table ------------------------------------------------------------------------------

TRANSIENT = {"kind": "transient", "status": 500, "code": "server_error", "message": "x"}
PERMANENT = {"kind": "permanent", "status": 400, "code": "content_policy_violation", "message": "x"}


def _att(k: int, rhash: str = "h") -> dict:
    return dict(attempt_record("i", rhash, k, "e", at="T"))


def _done(k: int, rhash: str = "h") -> dict:
    return dict(done_record("i", rhash, {}, created=1, images=[IMG], attempts=k, request_id="r", endpoint="e"))


def _short(k: int) -> dict:
    return dict(short_record("i", "h", {}, wanted=2, created=1, images=[IMG], attempts=k, request_id="r",
                             endpoint="e"))


def _failed(k: int, err: dict) -> dict:
    return dict(failed_record("i", "h", {}, attempts=k, error=err, endpoint="e"))


# (records, each read at offset 100 * its index) -> the entry after the last one
REPLAY_TABLE = [
    ("attempt", [_att(1)], Entry("pending", "h", 1, -1)),
    ("attempt then done", [_att(1), _done(1)], Entry("done", "h", 1, 100)),
    ("done without an attempt", [_done(2)], Entry("done", "h", 2, 0)),
    ("retried then done", [_att(1), _att(2), _done(2)], Entry("done", "h", 2, 200)),
    ("short answer", [_att(1), _short(1)], Entry("failed", "h", 1, 100, "transient")),
    ("short answer, asked again", [_att(1), _short(1), _att(2)], Entry("pending", "h", 2, 100, "transient")),
    ("failed transient", [_att(1), _failed(1, TRANSIENT)], Entry("failed", "h", 1, 100, "transient")),
    ("failed permanent", [_att(1), _failed(1, PERMANENT)], Entry("failed", "h", 1, 100, "permanent")),
    ("failed, retried: pending, keeps its last item line",
     [_att(1), _failed(1, TRANSIENT), _att(2)], Entry("pending", "h", 2, 100, "transient")),
    ("failed, then done", [_att(1), _failed(1, TRANSIENT), _att(2), _done(2)], Entry("done", "h", 2, 300)),
    ("done item sent again unchanged stays done", [_att(1), _done(1), _att(2)], Entry("done", "h", 2, 100)),
    ("attempts never go down", [_att(3), _att(1)], Entry("pending", "h", 3, -1)),
    ("rhash change after done: fresh", [_att(1), _done(1), _att(1, "h2")], Entry("pending", "h2", 1, -1)),
    ("rhash change after failure: fresh", [_att(1), _failed(1, PERMANENT), _att(1, "h2")],
     Entry("pending", "h2", 1, -1)),
    ("item with another rhash replaces", [_att(1), _done(1), _done(1, "h2")], Entry("done", "h2", 1, 200)),
]


@pytest.mark.parametrize(("records", "expected"), [(r, e) for _n, r, e in REPLAY_TABLE],
                         ids=[n for n, _r, _e in REPLAY_TABLE])
def test_replay_table(records: list[dict], expected: Entry) -> None:
    entries: dict[str, Entry] = {}
    for i, rec in enumerate(records):
        entry = replay(rec, 100 * i, entries.get)
        assert entry is not None
        entries["i"] = entry
    assert entries["i"] == expected


def test_replay_continues_the_entry_in_place() -> None:
    prev = Entry("failed", "h", 1, 100, "transient")
    assert replay(_att(2), 0, lambda _id: prev) is prev
    assert prev == Entry("pending", "h", 2, 100, "transient")


@pytest.mark.parametrize("rec", [run_record("j", "f", 1), end_record({}, {}), {"t": "future", "id": "i"}])
def test_replay_ignores_records_of_no_item(rec: dict) -> None:
    asked: list[str] = []
    assert replay(rec, 0, lambda i: asked.append(i)) is None  # type: ignore[func-returns-value]
    assert asked == []


def test_replay_looks_up_only_for_attempts() -> None:
    def fail(_id: str) -> Entry | None:
        raise AssertionError("an item record does not depend on what came before")

    assert replay(_done(1), 7, fail) == Entry("done", "h", 1, 7)


# -- a journal written before _records.py replays the same ------------------------------------------

JOURNAL = (
    '{"t":"run","job":"t","job_file":"/tmp/recfix/w/job.yaml","at":"2026-12-01T12:32:23.210Z","pid":26317}\n',
    '{"t":"attempt","id":"a","rhash":"af4c8e940c43acb3","attempt":1,"endpoint":"default","at":"2026-12-01T12:32:23.212Z"}\n',
    '{"t":"attempt","id":"pair","rhash":"c40bd15778de4d03","attempt":1,"endpoint":"default","at":"2026-12-01T12:32:23.213Z"}\n',
    '{"t":"attempt","id":"bad","rhash":"ab64a21fd702d140","attempt":1,"endpoint":"default","at":"2026-12-01T12:32:23.214Z"}\n',
    '{"t":"item","id":"a","rhash":"af4c8e940c43acb3","status":"done","request":{"model":"grok-imagine","size":"32x24","n":1,"response_format":"b64_json","prompt":"A calm lake"},"created":1796128343,"images":[{"file":"images/a.png","revised_prompt":"A detailed rendering of: A calm lake","sha256":"cbdaebf2212e8aa323868ac58be4bac40fb339cfd33d641ca5532116d95c42dc","bytes":135,"width":32,"height":24,"endpoint":"default","model":"grok-imagine"}],"attempts":1,"error":null,"request_id":"req_d475701f8ca507b2aab9a029f9ba3ecb","endpoint":"default","finished":"2026-12-01T12:32:23.224Z"}\n',
    '{"t":"item","id":"bad","rhash":"ab64a21fd702d140","status":"failed","request":{"model":"grok-imagine","size":"32x24","n":1,"response_format":"b64_json","prompt":"something forbidden"},"created":null,"images":[],"attempts":1,"error":{"kind":"permanent","status":400,"code":"content_policy_violation","message":"Your request was rejected as a result of our safety system."},"endpoint":"default","finished":"2026-12-01T12:32:23.223Z"}\n',
    '{"t":"item","id":"pair","rhash":"c40bd15778de4d03","status":"done","request":{"model":"grok-imagine","size":"32x24","n":2,"response_format":"b64_json","prompt":"Two foxes"},"created":1796128343,"images":[{"file":"images/pair_1.png","revised_prompt":"A detailed rendering of: Two foxes","sha256":"edd79da671ab01f0a5b5c6b0527d3c03efce51ca5e65b20bc6f3212194422a60","bytes":135,"width":32,"height":24,"endpoint":"default","model":"grok-imagine"},{"file":"images/pair_2.png","revised_prompt":"A detailed rendering of: Two foxes","sha256":"856a244df3edfaeffa93abf8e9c90db3c9b933eaac0afd5f9b366856ca3edb22","bytes":135,"width":32,"height":24,"endpoint":"default","model":"grok-imagine"}],"attempts":1,"error":null,"request_id":"req_dd606b031aa77fb75af8cde35d547ba7","endpoint":"default","finished":"2026-12-01T12:32:23.224Z"}\n',
    '{"t":"end","at":"2026-12-01T12:32:23.229Z","summary":{"total":3,"done":2,"failed":1,"pending":0},"endpoints":{"default":{"requests":3,"done":2,"failed":1,"images":3,"cost":0.0,"rate_limited":0,"retired":null,"circuit_openings":0,"circuit_first_opened":null}}}\n',
    '{"t":"run","job":"t","job_file":"/tmp/recfix/w/job.yaml","at":"2026-12-01T12:32:23.352Z","pid":26317}\n',
    '{"t":"attempt","id":"short","rhash":"c70e67c95b6827df","attempt":1,"endpoint":"default","at":"2026-12-01T12:32:23.354Z"}\n',
    '{"t":"item","id":"short","rhash":"c70e67c95b6827df","status":"failed","request":{"model":"grok-imagine","size":"32x24","n":2,"response_format":"b64_json","prompt":"short one"},"created":1796128343,"images":[{"file":"images/short_1.png","revised_prompt":"A detailed rendering of: short one","sha256":"bb16b5ee8d859b9f8eea3b5e3506bef90964bf61a9949b11054653d4d68cb56e","bytes":135,"width":32,"height":24,"endpoint":"default","model":"grok-imagine"}],"attempts":1,"error":{"kind":"transient","status":200,"code":"short_answer","message":"got 1 of 2 image(s); a rerun asks for the 1 missing"},"request_id":"req_e59afb235e72a57b1663e804d389969d","endpoint":"default","finished":"2026-12-01T12:32:23.357Z","short":{"wanted":2,"got":1}}\n',
    '{"t":"end","at":"2026-12-01T12:32:23.360Z","summary":{"total":4,"done":2,"failed":2,"pending":0},"endpoints":{"default":{"requests":1,"done":0,"failed":1,"images":1,"cost":0.0,"rate_limited":0,"retired":null,"circuit_openings":0,"circuit_first_opened":null}}}\n',
    '{"t":"run","job":"t","job_file":"/tmp/recfix/w/job.yaml","at":"2026-12-01T12:32:23.382Z","pid":26317}\n',
    '{"t":"attempt","id":"short","rhash":"c70e67c95b6827df","attempt":2,"endpoint":"default","at":"2026-12-01T12:32:23.389Z"}\n',
    '{"t":"attempt","id":"flaky","rhash":"9f531aee35e1fcd9","attempt":1,"endpoint":"default","at":"2026-12-01T12:32:23.390Z"}\n',
    '{"t":"attempt","id":"flaky","rhash":"9f531aee35e1fcd9","attempt":2,"endpoint":"default","at":"2026-12-01T12:32:23.535Z"}\n',
    '{"t":"item","id":"flaky","rhash":"9f531aee35e1fcd9","status":"failed","request":{"model":"grok-imagine","size":"32x24","n":1,"response_format":"b64_json","prompt":"flaky"},"created":null,"images":[],"attempts":2,"error":{"kind":"transient","status":500,"code":"server_error","message":"The server had an error while processing your request."},"endpoint":"default","finished":"2026-12-01T12:32:23.537Z"}\n',
    '{"t":"attempt","id":"short","rhash":"c70e67c95b6827df","attempt":3,"endpoint":"default","at":"2026-12-01T12:32:23.764Z"}\n',
    '{"t":"item","id":"short","rhash":"c70e67c95b6827df","status":"failed","request":{"model":"grok-imagine","size":"32x24","n":2,"response_format":"b64_json","prompt":"short one"},"created":null,"images":[],"attempts":3,"error":{"kind":"transient","status":500,"code":"server_error","message":"The server had an error while processing your request."},"endpoint":"default","finished":"2026-12-01T12:32:23.766Z"}\n',
    '{"t":"end","at":"2026-12-01T12:32:23.785Z","summary":{"total":5,"done":2,"failed":3,"pending":0},"endpoints":{"default":{"requests":4,"done":0,"failed":2,"images":0,"cost":0.0,"rate_limited":0,"retired":null,"circuit_openings":0,"circuit_first_opened":null}}}\n',
    '{"t":"run","job":"t","job_file":"/tmp/recfix/w/job.yaml","at":"2026-12-01T12:32:23.838Z","pid":26317}\n',
    '{"t":"attempt","id":"a","rhash":"5a5c4a5a2b38f8a3","attempt":1,"endpoint":"default","at":"2026-12-01T12:32:23.839Z"}\n',
    '{"t":"attempt","id":"short","rhash":"c70e67c95b6827df","attempt":4,"endpoint":"default","at":"2026-12-01T12:32:23.848Z"}\n',
    '{"t":"item","id":"a","rhash":"5a5c4a5a2b38f8a3","status":"done","request":{"model":"grok-imagine","size":"32x24","n":1,"response_format":"b64_json","prompt":"A calm lake, changed"},"created":1796128343,"images":[{"file":"images/a.png","revised_prompt":"A detailed rendering of: A calm lake, changed","sha256":"fec3edb5d1f9eb9bd675cb7c28dede7aa360afa621c551d151269190070008cc","bytes":133,"width":32,"height":24,"endpoint":"default","model":"grok-imagine"}],"attempts":1,"error":null,"request_id":"req_52a10e609bf6973a6851958415d125fc","endpoint":"default","finished":"2026-12-01T12:32:23.849Z"}\n',
    '{"t":"attempt","id":"flaky","rhash":"9f531aee35e1fcd9","attempt":3,"endpoint":"default","at":"2026-12-01T12:32:23.851Z"}\n',
    '{"t":"item","id":"short","rhash":"c70e67c95b6827df","status":"done","request":{"model":"grok-imagine","size":"32x24","n":2,"response_format":"b64_json","prompt":"short one"},"created":1796128343,"images":[{"file":"images/short_1.png","revised_prompt":"A detailed rendering of: short one","sha256":"4bb5726b8f46721e867e1ede7922e2276574749b84056309abfda5b814c81556","bytes":135,"width":32,"height":24,"endpoint":"default","model":"grok-imagine"},{"file":"images/short_2.png","revised_prompt":"A detailed rendering of: short one","sha256":"48626ea49b856a7594acada02ade2a8065250aebccec7d66b55f021268edb17b","bytes":135,"width":32,"height":24,"endpoint":"default","model":"grok-imagine"}],"attempts":4,"error":null,"request_id":"req_81d6bed67c1d6998b9d577405b9e633f","endpoint":"default","finished":"2026-12-01T12:32:23.852Z"}\n',
    '{"t":"item","id":"flaky","rhash":"9f531aee35e1fcd9","status":"done","request":{"model":"grok-imagine","size":"32x24","n":1,"response_format":"b64_json","prompt":"flaky"},"created":1796128343,"images":[{"file":"images/flaky.png","revised_prompt":"A detailed rendering of: flaky","sha256":"d4a913d7a04cc591a01b886e996fb7ee071a0e3ea61e09fe7a6da68f0e3321c6","bytes":135,"width":32,"height":24,"endpoint":"default","model":"grok-imagine"}],"attempts":3,"error":null,"request_id":"req_905328c5f17d912cf47e4e9cc0ed16c1","endpoint":"default","finished":"2026-12-01T12:32:23.853Z"}\n',
    '{"t":"end","at":"2026-12-01T12:32:23.856Z","summary":{"total":5,"done":4,"failed":1,"pending":0},"endpoints":{"default":{"requests":3,"done":3,"failed":0,"images":4,"cost":0.0,"rate_limited":0,"retired":null,"circuit_openings":0,"circuit_first_opened":null}}}\n',
    '{"t":"attempt","id":"pair","rhash":"c40bd15778de4d03","attempt":2,"endpoint":"default","at":"2026-12-01T12:33:00.000Z"}\n',
)
# after each line: (id, Journal entry, checkpoint row) as the code before batcher/_records.py replayed them
EXPECTED = [
    None,
    ('a', ['pending', 'af4c8e940c43acb3', 1, -1, None], ['pending', 'af4c8e940c43acb3', 1, -1, None, None, None, None, None, 0, 0, 0]),
    ('pair', ['pending', 'c40bd15778de4d03', 1, -1, None], ['pending', 'c40bd15778de4d03', 1, -1, None, None, None, None, None, 0, 0, 0]),
    ('bad', ['pending', 'ab64a21fd702d140', 1, -1, None], ['pending', 'ab64a21fd702d140', 1, -1, None, None, None, None, None, 0, 0, 0]),
    ('a', ['done', 'af4c8e940c43acb3', 1, 458, None], ['done', 'af4c8e940c43acb3', 1, 458, None, None, None, 'default', None, 1, 135, 0]),
    ('bad', ['failed', 'ab64a21fd702d140', 1, 1035, 'permanent'], ['failed', 'ab64a21fd702d140', 1, 1035, 'permanent', 'content_policy_violation', 'Your request was rejected as a result of our safety system.', 'default', None, 0, 0, 0]),
    ('pair', ['done', 'c40bd15778de4d03', 1, 1467, None], ['done', 'c40bd15778de4d03', 1, 1467, None, None, None, 'default', None, 2, 270, 0]),
    None,
    None,
    ('short', ['pending', 'c70e67c95b6827df', 1, -1, None], ['pending', 'c70e67c95b6827df', 1, -1, None, None, None, None, None, 0, 0, 0]),
    ('short', ['failed', 'c70e67c95b6827df', 1, 2769, 'transient'], ['failed', 'c70e67c95b6827df', 1, 2769, 'transient', 'short_answer', 'got 1 of 2 image(s); a rerun asks for the 1 missing', 'default', None, 1, 135, 0]),
    None,
    None,
    ('short', ['pending', 'c70e67c95b6827df', 2, 2769, 'transient'], ['pending', 'c70e67c95b6827df', 2, 2769, 'transient', 'short_answer', 'got 1 of 2 image(s); a rerun asks for the 1 missing', 'default', None, 1, 135, 0]),
    ('flaky', ['pending', '9f531aee35e1fcd9', 1, -1, None], ['pending', '9f531aee35e1fcd9', 1, -1, None, None, None, None, None, 0, 0, 0]),
    ('flaky', ['pending', '9f531aee35e1fcd9', 2, -1, None], ['pending', '9f531aee35e1fcd9', 2, -1, None, None, None, None, None, 0, 0, 0]),
    ('flaky', ['failed', '9f531aee35e1fcd9', 2, 4223, 'transient'], ['failed', '9f531aee35e1fcd9', 2, 4223, 'transient', 'server_error', 'The server had an error while processing your request.', 'default', None, 0, 0, 0]),
    ('short', ['pending', 'c70e67c95b6827df', 3, 2769, 'transient'], ['pending', 'c70e67c95b6827df', 3, 2769, 'transient', 'short_answer', 'got 1 of 2 image(s); a rerun asks for the 1 missing', 'default', None, 1, 135, 0]),
    ('short', ['failed', 'c70e67c95b6827df', 3, 4747, 'transient'], ['failed', 'c70e67c95b6827df', 3, 4747, 'transient', 'server_error', 'The server had an error while processing your request.', 'default', None, 0, 0, 0]),
    None,
    None,
    ('a', ['pending', '5a5c4a5a2b38f8a3', 1, -1, None], ['pending', '5a5c4a5a2b38f8a3', 1, -1, None, None, None, None, None, 0, 0, 0]),
    ('short', ['pending', 'c70e67c95b6827df', 4, 4747, 'transient'], ['pending', 'c70e67c95b6827df', 4, 4747, 'transient', 'server_error', 'The server had an error while processing your request.', 'default', None, 0, 0, 0]),
    ('a', ['done', '5a5c4a5a2b38f8a3', 1, 5754, None], ['done', '5a5c4a5a2b38f8a3', 1, 5754, None, None, None, 'default', None, 1, 133, 0]),
    ('flaky', ['pending', '9f531aee35e1fcd9', 3, 4223, 'transient'], ['pending', '9f531aee35e1fcd9', 3, 4223, 'transient', 'server_error', 'The server had an error while processing your request.', 'default', None, 0, 0, 0]),
    ('short', ['done', 'c70e67c95b6827df', 4, 6470, None], ['done', 'c70e67c95b6827df', 4, 6470, None, None, None, 'default', None, 2, 270, 0]),
    ('flaky', ['done', '9f531aee35e1fcd9', 3, 7292, None], ['done', '9f531aee35e1fcd9', 3, 7292, None, None, None, 'default', None, 1, 135, 0]),
    None,
    ('pair', ['done', 'c40bd15778de4d03', 2, 1467, None], ['done', 'c40bd15778de4d03', 2, 1467, None, None, None, 'default', None, 2, 270, 0]),
]


def test_old_journal_replays_identically(tmp_path: Path) -> None:
    """Each prefix of the old journal: the in-memory replay gives the entries the old code gave."""
    path = tmp_path / "manifest.jsonl"
    for i in range(len(JOURNAL)):
        path.write_text("".join(JOURNAL[: i + 1]), encoding="utf-8")
        expected = EXPECTED[i]
        journal = Journal.read(path)
        if expected is None:
            continue
        item_id, entry, _row = expected
        got = journal.entries[item_id]
        assert [got.status, got.rhash, got.attempts, got.offset, got.error_kind] == entry, (i, JOURNAL[i])
    final = {e[0]: e[1] for e in EXPECTED if e is not None}
    journal = Journal.read(path)
    assert {k: [e.status, e.rhash, e.attempts, e.offset, e.error_kind] for k, e in journal.entries.items()} == final
    assert len(journal.runs) == sum(json.loads(line)["t"] in ("run", "end") for line in JOURNAL)


def test_old_journal_checkpoints_identically(tmp_path: Path) -> None:
    """Refreshed after every line (so entries come back from sqlite), the checkpoint's rows are the old ones."""
    path = tmp_path / "manifest.jsonl"
    path.write_text("", encoding="utf-8")
    for i, line in enumerate(JOURNAL):
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line)
        assert _checkpoint.refresh(path) == path.stat().st_size
        if EXPECTED[i] is None:
            continue
        item_id, _entry, row = EXPECTED[i]
        cp = _checkpoint.Checkpoint.open(path)
        assert cp is not None
        try:
            assert list(cp.get(item_id) or ()) == row, (i, line)
        finally:
            cp.close()
    # the whole journal in one refresh, and resumed through the checkpoint: the same again
    whole = tmp_path / "whole" / "manifest.jsonl"
    whole.parent.mkdir()
    whole.write_text("".join(JOURNAL), encoding="utf-8")
    journal = Journal.read(whole, checkpoint=True)
    try:
        rows = {r[0]: list(r[1:]) for r in journal.checkpoint.rows()}
        final = {e[0]: e[2] for e in EXPECTED if e is not None}
        assert rows == final
        assert {k: [e.status, e.rhash, e.attempts, e.offset, e.error_kind] for k, e in journal.entries.items()} == \
            {e[0]: e[1] for e in EXPECTED if e is not None}
    finally:
        journal.close()


# -- the accessors every reader goes through -------------------------------------------------------


def test_accessors_read_each_kind_of_record() -> None:
    from batcher._records import details, failure_code, finished, item_id, kind, last_run

    done = done_record("i", "h", {"prompt": "p"}, created=1, images=[IMG, {**IMG, "bytes": 5}], attempts=1,
                       request_id="r", endpoint="e", cost=0.5)
    failed = failed_record("j", "h", {}, attempts=2, error={"kind": "permanent", "status": 422, "message": "m"},
                           endpoint="e")
    attempt = attempt_record("k", "h", 1, "e")
    run = run_record("job", "/j.yaml", 1)
    assert [kind(r) for r in (done, failed, attempt, run, {"x": 1})] == ["item", "item", "attempt", "run", None]
    assert [item_id(r) for r in (done, failed, attempt, run, {"t": "chunk", "id": "x"})] == ["i", "j", "k", None, None]
    assert [finished(r) for r in (done, failed, attempt, {"t": "item", "status": "odd"})] == ["done", "failed", None,
                                                                                            None]
    assert failure_code({"code": "content_policy_violation", "status": 400}) == "content_policy_violation"
    assert failure_code({"status": 422, "kind": "permanent"}) == "http_422"
    assert failure_code({"kind": "transient"}) == "transient" and failure_code(None) is None
    assert details(done) == details(done) and details(done).image_bytes == 15 and details(done).code is None
    d = details(failed)
    assert (d.code, d.message, d.endpoint, d.cost, d.images) == ("http_422", "m", "e", None, [])
    second = run_record("job2", "/k.yaml", 2)
    assert last_run([run, end_record({}, {}), second, end_record({}, {})]) is second
    assert last_run([end_record({}, {})]) is None


def test_manifest_items_are_item_records_without_t_and_rhash_or_pending_stubs() -> None:
    from batcher._records import manifest_item, pending_item

    rec = done_record("i", "h", {"prompt": "p"}, created=1, images=[IMG], attempts=1, request_id="r", endpoint="e",
                      vars={"x": 1}, finished="T")
    assert list(manifest_item(rec)) == [k for k in rec if k not in ("t", "rhash")]
    assert pending_item("i", {"prompt": "p"}, 2) == {"id": "i", "status": "pending", "request": {"prompt": "p"},
                                                     "created": None, "images": [], "attempts": 2, "error": None}
    assert pending_item("i", {}, 0, {"x": 1})["vars"] == {"x": 1}


def test_status_replays_the_journal_by_replays_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`status` without a checkpoint applies every attempt and item record through `_records.replay`:
    a done item re-sent stays done, a failed one re-sent is pending, a changed request is pending."""
    import batcher._manifest as manifest_module
    from batcher import _status

    out = tmp_path / "out"
    out.mkdir()
    err = {"kind": "permanent", "status": 400, "code": "bad", "message": "no"}
    records = [
        run_record("job", "/j.yaml", 1, at="T1"),
        attempt_record("a", "h1", 1, "e"), done_record("a", "h1", {}, created=1, images=[], attempts=1,
                                                      request_id=None, endpoint="e"),
        attempt_record("b", "h1", 1, "e"), failed_record("b", "h1", {}, attempts=1, error=err, endpoint="e"),
        attempt_record("c", "h1", 1, "e"), done_record("c", "h1", {}, created=1, images=[], attempts=1,
                                                      request_id=None, endpoint="e"),
        failed_record("d", "h1", {}, attempts=1, error=err, endpoint="e"),
        end_record({}, {}),
        run_record("job", "/j.yaml", 2, at="T2"),
        attempt_record("a", "h1", 2, "e"),  # re-sent after done: stays done
        attempt_record("b", "h1", 2, "e"),  # re-sent after failing: pending
        attempt_record("c", "h2", 1, "e"),  # its request changed: pending
    ]
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    seen: list[str] = []
    real = manifest_module.replay

    def spy(rec, offset, current):
        seen.append(rec["t"])
        return real(rec, offset, current)

    monkeypatch.setattr(manifest_module, "replay", spy)
    info = _status._status(out / "manifest.jsonl", out)
    assert seen.count("attempt") == 6 and seen.count("item") == 4
    assert (info["total"], info["done"], info["failed"], info["pending"]) == (4, 1, 1, 2)
    assert info["failures"] == {"bad": {"count": 1, "example": "no", "reasons": {"no": 1}}}
    assert (info["runs"], info["first_run"], info["last_run"]) == (2, "T1", "T2")
    assert info["endpoints"] == {"e": {"done": 1, "failed": 1, "cost": None}}
