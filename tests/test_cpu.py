"""CPU per image (issue 12): what a run no longer does per image or at start-up, and that the
behaviour around it is kept. No timings: each test counts or checks what is done."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import anyio
import pytest
from helpers import jsonl_job, tiny_png
from test_commit import endpoint, item, recorder, records

import batcher._commit as commit_module
from batcher import RunOptions, load_job, run_sync
from batcher._client import GeneratedImage, Generation
from batcher._exceptions import PermanentError
from batcher._job import JobChangedError
from batcher._manifest import Journal
from batcher._records import failed_record
from batcher._writer import OutputDir

ROOT = Path(__file__).resolve().parent.parent


def _gen() -> Generation:
    return Generation(created=1, images=[GeneratedImage(data=tiny_png())], request_id="r")


# -- commits run in a few writer threads of their own ------------------------------------------


def test_commits_run_in_the_recorders_writer_threads_and_they_stop_with_it(tmp_path):
    troubles: list[OSError] = []
    rec, ep = recorder(tmp_path, troubles), endpoint()
    seen: list[str] = []

    def read() -> Generation:
        seen.append(threading.current_thread().name)
        return _gen()

    async def main() -> list[bool]:
        done: list[bool] = []

        async def one(i: int) -> None:
            it = item()
            it = type(it)(id=f"i{i}", body=it.body, rhash="h", file="job.yaml", line=i)
            done.append((await rec.commit(ep, it, 1, read)).complete)

        with rec.writers(threads=2):
            async with anyio.create_task_group() as tg:
                for i in range(24):
                    tg.start_soon(one, i)
        return done

    assert anyio.run(main) == [True] * 24
    assert len(seen) == 24 and {name.rsplit("-", 1)[0] for name in seen} == {"batcher-writer"}
    assert len(set(seen)) <= 2  # not anyio's pool, which grows a thread per concurrent call
    assert not [t for t in threading.enumerate() if t.name.startswith("batcher-writer")]
    assert sorted(r["id"] for r in records(rec)) == sorted(f"i{i}" for i in range(24))
    assert troubles == [] and rec.images == 24


def test_a_cancelled_commit_is_finished_before_the_cancellation_is_raised(tmp_path):
    """As with anyio's to_thread: the image is renamed into place and recorded, never left half-done."""
    rec, ep = recorder(tmp_path, []), endpoint()
    release = threading.Event()
    started = threading.Event()

    def read() -> Generation:
        started.set()
        assert release.wait(10)
        return _gen()

    async def main() -> bool:
        with rec.writers():
            with anyio.CancelScope() as scope:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(rec.commit, ep, item(), 1, read)
                    assert await anyio.to_thread.run_sync(started.wait, 10)  # the writer has it
                    scope.cancel()
                    release.set()
            return scope.cancelled_caught

    assert anyio.run(main)
    [line] = records(rec)
    assert line["status"] == "done" and (rec.out.root / line["images"][0]["file"]).is_file()


def test_an_unexpected_error_in_a_writer_thread_reaches_the_caller(tmp_path):
    rec, ep = recorder(tmp_path, []), endpoint()

    def read() -> Generation:
        raise ZeroDivisionError("a bug, not a classified answer")

    async def main() -> None:
        with rec.writers():
            await rec.commit(ep, item(), 1, read)

    with pytest.raises(ZeroDivisionError):
        anyio.run(main)
    assert records(rec) == []


def test_with_writers_the_record_is_appended_on_the_loop_and_a_refusal_is_disk_trouble(tmp_path):
    """The journal's lock is never held by a writer thread (the loop appends attempts under it)."""
    troubles: list[OSError] = []
    rec, ep = recorder(tmp_path, troubles), endpoint()
    appenders: list[str] = []
    real = rec.journal.append

    def append(r):  # type: ignore[no-untyped-def]
        appenders.append(threading.current_thread().name)
        if r["id"] == "b":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(r)

    rec.journal.append = append  # type: ignore[method-assign]

    async def main() -> list[bool]:
        out = []
        with rec.writers():
            for name in ("a", "b"):
                it = type(item())(id=name, body=item().body, rhash="h", file="job.yaml", line=1)
                done = await rec.commit(ep, it, 1, _gen)
                out.append(done.complete and done.record is not None)
        return out

    assert anyio.run(main) == [True, False]
    assert appenders == [threading.main_thread().name] * 2
    assert [t.errno for t in troubles] == [errno.ENOSPC] and rec.images == 1
    assert [r["id"] for r in records(rec)] == ["a"]
    assert (rec.out.root / "images" / "b.png").is_file()  # saved (and paid): pending, sent again next run


def test_without_writers_commit_uses_anyios_threads_as_before(tmp_path):
    rec, ep = recorder(tmp_path, []), endpoint()
    seen: list[str] = []

    def read() -> Generation:
        seen.append(threading.current_thread().name)
        return _gen()

    assert anyio.run(lambda: rec.commit(ep, item(), 1, read)).complete
    assert seen and not seen[0].startswith("batcher-writer") and seen[0] != threading.main_thread().name


def test_a_run_commits_in_its_writer_threads(tmp_path, api_key, monkeypatch):
    from batcher._simulator import SimulatorConfig, start_in_thread

    names: set[str] = set()
    real = commit_module.Recorder.commit

    async def spying(self, ep, it, attempts, read):  # type: ignore[no-untyped-def]
        def wrapped() -> Generation:
            names.add(threading.current_thread().name)
            return read()
        return await real(self, ep, it, attempts, wrapped)

    monkeypatch.setattr(commit_module.Recorder, "commit", spying)
    path = tmp_path / "job.jsonl"
    path.write_text("".join(f'{{"id": "i{i}", "prompt": "p{i}", "size": "8x8"}}\n' for i in range(30)))
    with start_in_thread(SimulatorConfig()) as sim:
        result = run_sync(load_job(path), RunOptions(out=str(tmp_path / "out"), base_url=sim.base_url,
                                                     concurrency=16))
    assert result.exit_code == 0 and result.summary["done"] == 30
    assert names and all(n.startswith("batcher-writer-") for n in names)
    assert len(names) <= commit_module.WRITER_THREADS


# -- the journal: one lseek per run, offsets right through a failed append ------------------------


def test_the_journal_seeks_once_and_its_offsets_survive_a_failed_append(tmp_path, monkeypatch):
    seeks: list[int] = []
    real_seek = os.lseek

    def counting(fd: int, pos: int, how: int) -> int:
        seeks.append(fd)
        return real_seek(fd, pos, how)

    monkeypatch.setattr("batcher._manifest.os.lseek", counting)
    full = [False]

    def disk(fd: int, data: memoryview) -> int:
        if full[0]:
            if len(data) > 1:
                return os.write(fd, data[: len(data) // 2])  # half a record, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.write(fd, data)

    monkeypatch.setattr("batcher._manifest._write", disk)
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"t":"run","job":"j","file":"j.jsonl","pid":1,"at":"2026-01-01T00:00:00Z"}\n')

    def failed(i: int) -> dict:
        return failed_record(f"i{i}", "h", {"prompt": "p"}, attempts=1, endpoint="e", vars=None,
                             error=PermanentError("no", code="c").as_record())

    journal = Journal.open(path)
    for i in range(10):
        journal.append(failed(i))
    assert len(seeks) == 1  # was one per append
    full[0] = True
    with pytest.raises(OSError):
        journal.append(failed(10))
    full[0] = False
    journal.append(failed(11))
    assert len(seeks) == 2  # after a failed append the end is asked for again
    with open(path, "rb") as fh:
        for i in (*range(10), 11):
            assert journal.record(f"i{i}", fh)["id"] == f"i{i}"  # each offset points at its own line
    journal.close()
    again = Journal.open(path)
    assert again.torn_line is None and set(again.entries) == {f"i{i}" for i in (*range(10), 11)}
    again.close()


def test_temp_names_are_unique_per_output_without_a_uuid_each(tmp_path, monkeypatch):
    monkeypatch.setattr("uuid.uuid4", lambda: pytest.fail("a uuid4 (a getrandom syscall) per temp name"))
    a, b = OutputDir(tmp_path / "a"), OutputDir(tmp_path / "b")
    names = {a.temp_path("x" * 60).name for _ in range(2000)} | {b.temp_path("x" * 60).name for _ in range(2000)}
    assert len(names) == 4000 and all(n.startswith(".tmp-" + "x" * 40 + "-") for n in names)


# -- a small job is parsed once ----------------------------------------------------------------


@pytest.mark.parametrize("held, most", [(10_000, 1), (5, 4)])
def test_a_small_job_is_parsed_once_a_large_one_streamed_each_pass(tmp_path, passes, api_key, monkeypatch, held, most):
    from batcher._simulator import SimulatorConfig, start_in_thread

    monkeypatch.setattr("batcher._runner.ITEMS_HELD", held)
    path = jsonl_job(tmp_path, 12)
    with start_in_thread(SimulatorConfig()) as sim:
        result = run_sync(load_job(path), RunOptions(out=str(tmp_path / "out"), base_url=sim.base_url))
    assert result.exit_code == 0 and result.summary == {"total": 12, "done": 12, "failed": 0, "pending": 0}
    assert 1 <= passes[0] <= most
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [i["id"] for i in manifest["items"]] == [f"i{i}" for i in range(12)]


@pytest.mark.parametrize("held", [10_000, 0])
def test_a_job_file_changed_after_validation_is_noticed_held_or_streamed(tmp_path, api_key, monkeypatch, held):
    """Held items are served only while the prompts file is the one validated, as a streamed pass checks."""
    import batcher._runner as runner_module
    from batcher._simulator import SimulatorConfig, start_in_thread

    monkeypatch.setattr(runner_module, "ITEMS_HELD", held)
    path = jsonl_job(tmp_path, 6)
    real = runner_module._Runner._check_done_files

    def edit_then_check(self):  # type: ignore[no-untyped-def]
        st = path.stat()
        with open(path, "a") as fh:
            fh.write('{"id": "late", "prompt": "late", "size": "8x8"}\n')
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
        return real(self)

    monkeypatch.setattr(runner_module._Runner, "_check_done_files", edit_then_check)
    with start_in_thread(SimulatorConfig()) as sim, pytest.raises(JobChangedError):
        run_sync(load_job(path), RunOptions(out=str(tmp_path / "out"), base_url=sim.base_url))


# -- start-up: a run imports what it uses ------------------------------------------------------

RUN_AND_LIST = """
import json, sys
from batcher._cli import main
code = main(sys.argv[1:])
heavy = ("yaml", "aiofiles", "tqdm", "batcher._export", "batcher._gallery", "batcher._status", "tarfile")
print(json.dumps({"code": code, "loaded": [m for m in heavy if m in sys.modules]}))
"""


def test_a_jsonl_run_imports_no_yaml_aiofiles_tqdm_export_report_or_status(tmp_path, api_key):
    from batcher._simulator import SimulatorConfig, start_in_thread

    path = jsonl_job(tmp_path, 3)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with start_in_thread(SimulatorConfig()) as sim:
        proc = subprocess.run([sys.executable, "-c", RUN_AND_LIST, "run", str(path), "--out", str(tmp_path / "out"),
                               "--base-url", sim.base_url, "--quiet"], capture_output=True, text=True, env=env,
                              cwd=str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report == {"code": 0, "loaded": []}


def test_the_lazy_public_names_are_the_functions():
    import batcher
    from batcher._export import export
    from batcher._gallery import report
    from batcher._status import status

    assert (batcher.export, batcher.report, batcher.status) == (export, report, status)
    assert {"export", "report", "status"} <= set(dir(batcher))
    with pytest.raises(AttributeError):
        batcher.no_such_name  # noqa: B018


def test_a_cli_run_keeps_its_start_up_heap_out_of_collections(tmp_path, monkeypatch, api_key):
    # the modules and the job live for the whole run: frozen, a full collection walks only what the
    # run makes. Only the CLI does it (it owns the process; a library caller's heap is its own)
    import gc

    from helpers import run_main, write_job

    from batcher._simulator import SimulatorConfig, start_in_thread

    frozen: list[int] = []
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(1))
    job = write_job(tmp_path / "job.yaml", ["a small red square"], defaults={"size": "8x8"})
    with start_in_thread(SimulatorConfig()) as sim:
        assert run_main(job, tmp_path / "out", sim) == 0
        assert frozen == [1]
        run_sync(load_job(job), RunOptions(out=str(tmp_path / "out2"), base_url=sim.base_url, api_key="k"))
    assert frozen == [1]  # the library entry point leaves the caller's collector alone
