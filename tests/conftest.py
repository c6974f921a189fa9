from __future__ import annotations

import anyio
import anyio.lowlevel
import pytest


class FakeClock:
    """A clock that only moves when someone sleeps on it: limiter tests run instantly."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.0)
        await anyio.lowlevel.checkpoint()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def api_key(monkeypatch):
    """The test key in BATCHER_API_KEY, and no OPENAI_API_KEY from the machine's environment."""
    from helpers import KEY

    monkeypatch.setenv("BATCHER_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)


@pytest.fixture
def passes(monkeypatch):
    """Counts the passes over a JSONL job file (each opens the file once)."""
    import batcher._job as job_module

    count = [0]
    real = job_module._stream_jsonl

    def counting(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(job_module, "_stream_jsonl", counting)
    return count


@pytest.fixture
def connections_opened(monkeypatch):
    """Each `ImagesClient.open_connections` call of the test: (count asked, count opened)."""
    from batcher._client import ImagesClient

    calls: list[tuple[int, int]] = []
    real = ImagesClient.open_connections

    async def counted(self, count: int) -> int:
        opened = await real(self, count)
        calls.append((count, opened))
        return opened

    monkeypatch.setattr(ImagesClient, "open_connections", counted)
    return calls
