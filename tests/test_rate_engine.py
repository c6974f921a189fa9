"""The rate engine end to end, against simulator modes that tell the limit the ways real servers do.

Counts only (no timed assertions): speed is measured in bench/rate.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import write_job

from batcher import RunOptions, load_job, run_sync
from batcher._simulator import SimulatorConfig, start_in_thread


def run_against(tmp: Path, config: SimulatorConfig, items: int, **options) -> tuple[dict, object]:
    job = load_job(write_job(tmp / "job.yaml", [f"a small red square #{i}" for i in range(items)],
                             defaults={"size": "8x8"}))
    with start_in_thread(config) as sim:
        result = run_sync(job, RunOptions(out=str(tmp / "out"), base_url=sim.base_url, api_key="k",
                                          timeout=10, **options))
        stats = sim.stats()
    return stats, result


@pytest.mark.parametrize("style", ["bucket", "minute", "window"])
def test_a_given_limit_with_advertised_headers_of_any_kind_finishes_without_stalling(tmp_path, style):
    # remaining 0 paces at the rate instead of stopping for the reset (up to 60 s for "minute");
    # the few 429s a loaded machine's timing can cause are retried (bench/rate.py measures them)
    stats, result = run_against(tmp_path, SimulatorConfig(rpm=1200, limit_style=style), 60,
                                rpm=1200, concurrency=16)
    assert result.summary == {"total": 60, "done": 60, "failed": 0, "pending": 0}
    assert stats["accepted"] == 60 and stats["duplicates"] == 0
    assert stats["rate_limited"] <= 0.25 * stats["requests"], stats


def test_a_lone_bare_429_leaves_the_rate_unlimited(tmp_path):
    # before the fix, the 20th request's 429 made the sends of the last second (~19) the limit
    stats, result = run_against(tmp_path, SimulatorConfig(latency_ms=20, lone_429_at=20), 400, concurrency=16)
    assert result.summary["done"] == 400 and stats["rate_limited"] == 1 and result.rate_limited == 1
    assert stats["max_window_requests"] >= 60, stats["max_window_requests"]


@pytest.mark.parametrize("limit,items,opened", [({"rpm": 1200}, 60, [16]), ({"rpm": 1200}, 5, [5]),
                                                ({"ipm": 600}, 60, [10]), ({}, 60, [])])
def test_a_known_limit_opens_the_first_windows_connections_before_it(tmp_path, connections_opened, limit, items,
                                                                     opened):
    # its sends then all go out on connections the server has accepted (none read late): as many as
    # the first window sends at once, the concurrency and the items left allow; no limit known: none
    _, result = run_against(tmp_path, SimulatorConfig(), items, concurrency=16, **limit)
    assert result.summary["done"] == items and [asked for asked, _ in connections_opened] == opened


def test_workers_waiting_for_a_slot_do_not_all_wake_for_each_one(tmp_path, monkeypatch):
    # one worker sleeps until the next slot frees; the others wait to be woken one at a time. A herd of
    # timers going off for every slot held each send back by the event loop time they took (~4 ms a
    # window at 50 per second) and cost CPU
    from batcher._route import Dispatcher

    waits: list[float] = []
    real = Dispatcher.wait

    async def counted(self, name: str, timeout: float = 1.0, until_due: bool = True) -> None:
        waits.append(timeout)
        await real(self, name, timeout, until_due)

    monkeypatch.setattr(Dispatcher, "wait", counted)
    stats, result = run_against(tmp_path, SimulatorConfig(rpm=1200), 60, rpm=1200, concurrency=32)
    assert result.summary["done"] == 60
    # ~2 wake-ups a send (the worker timing the slot, the one woken after it); a herd: ~8 (477 measured)
    assert len(waits) <= 3 * 60, len(waits)
