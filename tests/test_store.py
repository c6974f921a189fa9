"""Output stores (local folder, fsspec memory, S3 on a moto server) and the sharded journal."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from batcher._exceptions import ManifestError
from batcher._manifest import Journal, write_manifest
from batcher._store import (
    FlushPolicy,
    LocalStore,
    ObjectExistsError,
    ObjectStore,
    SegmentKey,
    SegmentWriter,
    current_markers,
    iter_merged_records,
    merge,
    merged_journal,
    open_store,
)

ROOT = Path(__file__).resolve().parent.parent
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
JOB = {"name": "sharded", "file": "jobs/sharded.yaml"}


# -- stores under test ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 (ephemeral port) with dummy credentials in the environment."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] not installed: pip install -e '.[test]'")
    pytest.importorskip("s3fs", reason="s3fs not installed: pip install -e '.[test]'")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN",
                     "AWS_WEB_IDENTITY_TOKEN_FILE"):
            mp.delenv(name, raising=False)
        # the standard chain reads these first: nothing real is ever looked up
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_SESSION_TOKEN", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_EC2_METADATA_DISABLED", "true")
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        try:
            host, port = server.get_host_and_port()
            yield f"http://{host}:{port}"
        finally:
            server.stop()


def s3_store(endpoint: str, **kw: Any) -> ObjectStore:
    bucket = f"batcher-{uuid.uuid4().hex[:12]}"
    options = {"client_kwargs": {"endpoint_url": endpoint}, "skip_instance_cache": True}
    store = ObjectStore(f"s3://{bucket}/out", storage_options=options, **kw)
    store.fs.mkdir(bucket)
    return store


@pytest.fixture(params=["local", "memory", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "out")
    if request.param == "memory":
        return ObjectStore(f"memory://batcher-{uuid.uuid4().hex[:12]}/out")
    return s3_store(request.getfixturevalue("s3_endpoint"))


@pytest.fixture
def buffers(tmp_path) -> Path:
    return tmp_path / "buffers"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- job records ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Item:
    id: str
    rhash: str
    body: dict


def make_items(n: int) -> list[Item]:
    return [Item(f"item{i:03d}", f"h{i}", {"prompt": f"prompt {i}", "size": "256x256"}) for i in range(n)]


def records_of(item: Item, i: int) -> list[dict]:
    """A history per item: pending, failed, retried then done, done, or done under an old request."""
    attempt = lambda k, rhash=item.rhash: {"t": "attempt", "id": item.id, "rhash": rhash, "attempt": k,  # noqa: E731
                                           "at": f"2026-11-25T10:00:{i % 60:02d}.000Z"}
    failed = {"t": "item", "id": item.id, "rhash": item.rhash, "status": "failed", "request": item.body,
              "created": None, "images": [], "attempts": 1,
              "error": {"kind": "permanent", "status": 400, "code": "content_policy_violation", "message": "no"},
              "finished": "2026-11-25T10:01:00.000Z"}
    done = {"t": "item", "id": item.id, "rhash": item.rhash, "status": "done", "request": item.body,
            "created": 1764064800 + i,
            "images": [{"file": f"images/{item.id}.png", "revised_prompt": None, "sha256": "ab" * 32,
                        "bytes": len(PNG), "width": 1, "height": 1}],
            "attempts": 2, "error": None, "request_id": f"req_{i}", "finished": "2026-11-25T10:02:00.000Z"}
    kind = i % 6
    if kind == 0:
        return [attempt(1)]
    if kind == 1:
        return [attempt(1), failed]
    if kind == 2:
        return [attempt(1), failed, attempt(2), done]
    if kind == 3:
        return [attempt(1), attempt(2), done]
    if kind == 4:
        return [attempt(1, "old"), {**done, "rhash": "old"}]  # the job's request changed since
    return []  # never attempted


def run_record(shard: int) -> dict:
    return {"t": "run", "job": JOB["name"], "job_file": JOB["file"], "at": "2026-11-25T10:00:00.000Z",
            "pid": 1000 + shard}


def single_run_manifest(tmp_path: Path, items: list[Item]) -> tuple[dict, dict]:
    """What one unsharded run's journal and write_manifest give for the same records."""
    folder = tmp_path / "single"
    folder.mkdir()
    journal = Journal.open(folder / "manifest.jsonl")
    journal.append(run_record(0))
    for i, item in enumerate(items):
        for rec in records_of(item, i):
            journal.append(rec)
    journal.close()
    summary = write_manifest(Journal.read(folder / "manifest.jsonl"), folder / "manifest.json", JOB, lambda: items)
    return summary, json.loads((folder / "manifest.json").read_text())


def rec(n: int) -> dict:
    return {"t": "attempt", "id": f"r{n:04d}", "rhash": "h", "attempt": 1, "at": "2026-11-25T10:00:00.000Z"}


# -- create-only puts -----------------------------------------------------------------------


def test_put_image_is_create_only(store):
    assert store.put_image("images/a.png", PNG) is True
    assert store.size("images/a.png") == len(PNG) and store.has_file("images/a.png", len(PNG))
    assert store.put_image("images/a.png", PNG) is False  # the same bytes: already done
    with pytest.raises(ObjectExistsError) as info:
        store.put_image("images/a.png", PNG + b"other")
    assert info.value.existing_size == len(PNG) and "images/a.png" in str(info.value)
    assert store.read("images/a.png") == PNG  # refused, not overwritten
    assert store.put_image("images/a.png", PNG + b"other", replace=True) is True
    assert store.read("images/a.png") == PNG + b"other"
    assert not store.exists("images/missing.png") and store.size("images/missing.png") is None


def test_put_image_from_a_local_file(store, tmp_path):
    src = tmp_path / "download.tmp"
    src.write_bytes(PNG * 3)
    assert store.put_image("images/b.png", src) is True
    assert store.read("images/b.png") == PNG * 3
    other = tmp_path / "other.tmp"
    other.write_bytes(PNG * 2)
    with pytest.raises(ObjectExistsError):
        store.put_image("images/b.png", other)
    assert store.put_image("images/b.png", src) is False


def test_segments_are_immutable_and_listed_in_merge_order(store):
    later = SegmentKey(2, 0, 2, "aaaa", 0)
    earlier = SegmentKey(1, 1, 2, "ffff", 120)
    first = SegmentKey(1, 1, 2, "ffff", 0)
    for key in (later, earlier, first):
        assert store.put_segment(key, json.dumps(rec(key.offset)).encode() + b"\n")
    with pytest.raises(ObjectExistsError):
        store.put_segment(later, b'{"t":"run"}\n')
    assert store.list_segments() == [first, earlier, later]


def test_bad_relative_paths_are_refused(store):
    for rel in ("/etc/passwd", "../x.png", "images/../../x.png", ""):
        with pytest.raises(ValueError):
            store.put_image(rel, PNG)


def test_open_store_picks_by_scheme(tmp_path):
    assert isinstance(open_store(tmp_path / "out"), LocalStore)
    assert isinstance(open_store(f"file://{tmp_path}/out"), LocalStore)
    assert isinstance(open_store("memory://b/out"), ObjectStore)


# -- the shard writer ----------------------------------------------------------------------


def test_flush_cadence_by_records_time_and_close(store, buffers):
    clock = Clock()
    writer = SegmentWriter.open(store, 1, 3, policy=FlushPolicy(records=3, seconds=10), buffer_root=buffers,
                                clock=clock)
    for n in range(7):
        writer.append(rec(n))
    assert len(store.list_segments()) == 2  # after records 3 and 6
    writer.sync()
    assert len(store.list_segments()) == 2  # the 7th waits for its time
    clock.now += 10
    writer.sync()
    segments = store.list_segments()
    assert len(segments) == 3 and {(k.gen, k.shard, k.count) for k in segments} == {(1, 1, 3)}
    writer.append(rec(7))
    marker = writer.close(summary={"total": 8})
    assert len(store.list_segments()) == 4
    assert [r["id"] for r in iter_merged_records(store)] == [f"r{n:04d}" for n in range(8)]
    assert store.read_marker(1) == marker
    assert marker["records"] == 8 and marker["attempts"] == 8 and marker["segments"] == 4
    assert marker["summary"] == {"total": 8}
    assert not list(writer.buffer_dir.iterdir())  # everything shipped: no local buffer left


def test_a_killed_writer_is_recovered_by_the_next_one(store, buffers):
    writer = SegmentWriter.open(store, 0, 2, policy=FlushPolicy(records=4), buffer_root=buffers)
    for n in range(6):
        writer.append(rec(n))
    assert len(store.list_segments()) == 1  # records 0-3 shipped, 4-5 only in the local buffer
    with open(writer.path, "ab") as fh:
        fh.write(b'{"t":"attempt","id":"torn')  # the kill hit mid-write
    os.close(writer._fd)  # dies: no flush, no marker; the kernel drops its flock
    assert store.read_marker(0) is None

    again = SegmentWriter.open(store, 0, 2, policy=FlushPolicy(records=4), buffer_root=buffers)
    assert again.recovered == 2 and again.gen == 2
    assert [r["id"] for r in iter_merged_records(store)] == [f"r{n:04d}" for n in range(6)]
    again.append(rec(6))
    again.close()
    ids = [r["id"] for r in iter_merged_records(store)]
    assert ids == [f"r{n:04d}" for n in range(7)]  # nothing lost, nothing twice
    assert [k.gen for k in store.list_segments()] == [1, 1, 2]


def test_a_writer_killed_after_shipping_everything_sends_nothing_twice(store, buffers):
    writer = SegmentWriter.open(store, 0, 1, policy=FlushPolicy(records=2), buffer_root=buffers)
    for n in range(4):
        writer.append(rec(n))
    os.close(writer._fd)  # killed between the upload and removing its buffer
    again = SegmentWriter.open(store, 0, 1, buffer_root=buffers)
    assert again.recovered == 0 and len(store.list_segments()) == 2
    again.close()
    assert [r["id"] for r in iter_merged_records(store)] == [f"r{n:04d}" for n in range(4)]


def test_a_live_writers_buffer_is_left_alone(store, buffers):
    live = SegmentWriter.open(store, 0, 2, buffer_root=buffers)
    live.append(rec(0))
    other = SegmentWriter.open(store, 1, 2, buffer_root=buffers)
    assert other.recovered == 0 and store.list_segments() == []
    other.close()
    live.close()
    assert [r["id"] for r in iter_merged_records(store)] == ["r0000"]


def test_a_segment_stored_despite_an_error_is_not_sent_again(store, buffers):
    class Flaky:
        """Stores the first segment, then reports a failure, as a timed-out upload might."""

        def __init__(self, inner):
            self.inner, self.failed = inner, False

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def put_segment(self, key, data):
            stored = self.inner.put_segment(key, data)
            if not self.failed:
                self.failed = True
                raise OSError("connection reset")
            return stored

    writer = SegmentWriter.open(Flaky(store), 0, 1, buffer_root=buffers)
    writer.append(rec(0))
    with pytest.raises(OSError):
        writer.flush()
    writer.append(rec(1))
    writer.close()
    assert [r["id"] for r in iter_merged_records(store)] == ["r0000", "r0001"]
    assert [k.offset for k in store.list_segments()] == [0, len(json.dumps(rec(0), separators=(",", ":"))) + 1]


def test_a_rerun_shard_wins_and_its_old_marker_stops_counting(store, buffers):
    item = make_items(3)[2]
    first = SegmentWriter.open(store, 0, 2, buffer_root=buffers)
    first.append(records_of(item, 1)[1])  # failed
    first.close()
    SegmentWriter.open(store, 1, 2, buffer_root=buffers).close()
    assert set(current_markers(store)) == {0, 1}

    rerun = SegmentWriter.open(store, 0, 2, buffer_root=buffers)
    assert rerun.gen == 2
    rerun.append(records_of(item, 2)[-1])  # done
    rerun.flush()
    assert set(current_markers(store)) == {1}  # shard 0 is running again: not finished
    with merged_journal(store) as journal:
        assert journal.entries[item.id].status == "done"
    rerun.close()
    assert set(current_markers(store)) == {0, 1} and store.read_marker(0)["gen"] == 2


def test_a_later_run_wins_even_with_another_shard_count(store, buffers):
    item = make_items(3)[2]
    with SegmentWriter.open(store, 1, 2, buffer_root=buffers) as old:
        old.append(records_of(item, 1)[1])  # failed, as shard 1 of 2
    with SegmentWriter.open(store, 0, 1, buffer_root=buffers) as new:
        assert new.gen == 2
        new.append(records_of(item, 2)[-1])  # done, as the only shard of a rerun
    with merged_journal(store) as journal:
        assert journal.entries[item.id].status == "done"


def test_shard_arguments_are_checked(store, buffers):
    for index, count in ((2, 2), (-1, 2), (0, 0)):
        with pytest.raises(ValueError):
            SegmentWriter.open(store, index, count, buffer_root=buffers)


# -- merging --------------------------------------------------------------------------------


def test_two_shards_merge_into_the_single_run_manifest(store, buffers, tmp_path):
    items = make_items(24)
    expected_summary, expected = single_run_manifest(tmp_path, items)
    writers = [SegmentWriter.open(store, s, 2, policy=FlushPolicy(records=3), buffer_root=buffers) for s in (0, 1)]
    for w in writers:
        w.append(run_record(w.shard_index))
    for i, item in enumerate(items):  # interleaved, as two pods would write
        for r in records_of(item, i):
            writers[i % 2].append(r)
    for w in writers:
        w.close()
    assert len(store.list_segments()) > 2
    summary = merge(store, JOB, lambda: items)
    assert summary == expected_summary
    assert summary["done"] > 0 and summary["failed"] > 0 and summary["pending"] > 0
    assert json.loads(store.read("manifest.json")) == expected


def test_merge_without_the_job_uses_what_the_journal_knows(store, buffers):
    items = make_items(6)
    with SegmentWriter.open(store, 0, 1, buffer_root=buffers) as writer:
        writer.append(run_record(0))
        for i, item in enumerate(items):
            for r in records_of(item, i):
                writer.append(r)
    summary = merge(store)
    manifest = json.loads(store.read("manifest.json"))
    assert manifest["job"] == JOB
    assert summary == {"total": 5, "done": 3, "failed": 1, "pending": 1}  # item005 was never journaled
    by_id = {r["id"]: r for r in manifest["items"]}
    assert by_id["item000"]["status"] == "pending" and by_id["item000"]["request"] is None
    assert by_id["item001"]["error"]["code"] == "content_policy_violation"


def test_a_local_journal_comes_before_the_segments(tmp_path, buffers):
    store = LocalStore(tmp_path / "out")
    item = make_items(3)[2]
    history = records_of(item, 2)
    (tmp_path / "out").mkdir()
    with open(tmp_path / "out" / "manifest.jsonl", "wb") as fh:
        for r in history[:2]:  # attempt, failed
            fh.write(json.dumps(r).encode() + b"\n")
        fh.write(b'{"t":"attempt","id":"to')  # torn by a kill
    with SegmentWriter.open(store, 0, 1, buffer_root=buffers) as writer:
        writer.append(history[-1])  # done
    assert [r["t"] for r in iter_merged_records(store)] == ["attempt", "item", "item"]
    with merged_journal(store) as journal:
        assert journal.entries[item.id].status == "done"


def test_a_corrupt_segment_is_named(store):
    key = SegmentKey(1, 0, 1, "abcd", 0)
    store.put_segment(key, b'{"t":"run"}\nnot json\n{"t":"end"}\n')
    with pytest.raises(ManifestError, match=rf"{key.name}:2: corrupt"):
        list(iter_merged_records(store))


# -- S3 specifics ---------------------------------------------------------------------------

PART = 5 * 2**20  # the smallest part S3 accepts


def test_large_images_go_up_in_parts_and_stay_create_only(s3_endpoint):
    store = s3_store(s3_endpoint, part_size=PART)
    small, large = PNG * 100, PNG + os.urandom(2 * PART + 1000)
    assert store.put_image("images/small.png", small) and store.put_image("images/large.png", large)
    etag = lambda rel: store.fs.info(store._path(rel))["ETag"]  # noqa: E731
    assert "-" not in etag("images/small.png")  # one PUT
    assert etag("images/large.png").strip('"').endswith("-3")  # a multipart upload of three parts
    assert store.read("images/large.png") == large
    with pytest.raises(ObjectExistsError):  # If-None-Match on CompleteMultipartUpload
        store.put_image("images/large.png", PNG + os.urandom(2 * PART + 1000))
    assert store.read("images/large.png") == large
    assert store.fs.info(store._path("images/small.png"))["ContentType"] == "image/png"


class Killed(Exception):
    pass


def test_an_interrupted_multipart_upload_leaves_no_object(s3_endpoint, tmp_path, monkeypatch):
    store = s3_store(s3_endpoint, part_size=PART)
    src = tmp_path / "large.tmp"
    src.write_bytes(PNG + os.urandom(2 * PART + 1000))
    real = store.fs._call_s3
    parts = []

    async def dying(method, *args, **kwargs):
        if method == "upload_part":
            parts.append(kwargs["PartNumber"])
            if len(parts) == 2:
                raise Killed
        return await real(method, *args, **kwargs)

    async def no_cleanup(*args, **kwargs):  # a killed process never aborts its upload
        return None

    monkeypatch.setattr(store.fs, "_call_s3", dying)
    monkeypatch.setattr(store.fs, "_abort_mpu", no_cleanup)
    with pytest.raises(Killed):
        store.put_image("images/large.png", src)
    monkeypatch.setattr(store.fs, "_call_s3", real)
    bucket = store.root.split("/")[0]
    uploads = store.fs.call_s3("list_multipart_uploads", Bucket=bucket).get("Uploads", [])
    assert [u["Key"] for u in uploads] == ["out/images/large.png"]  # begun, never completed
    assert not store.exists("images/large.png") and store.list("images") == []
    assert store.put_image("images/large.png", src) is True  # the rerun isn't refused
    assert store.read("images/large.png") == src.read_bytes()


KILL_SCRIPT = """
import json, sys, time
from batcher._store import FlushPolicy, SegmentWriter, open_store
url, options, buffers, ready = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
writer = SegmentWriter.open(open_store(url, **options), 0, 1, policy=FlushPolicy(records=2), buffer_root=buffers)
for n in range(5):
    writer.append({"t": "attempt", "id": f"r{n:04d}", "rhash": "h", "attempt": 1, "at": "x"})
open(ready, "w").close()
time.sleep(60)
"""


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_kill_9_loses_no_journaled_record(kind, tmp_path, request):
    if kind == "local":
        url, options = str(tmp_path / "out"), {}
    else:
        store = s3_store(request.getfixturevalue("s3_endpoint"))
        url, options = store.url, {"storage_options": {"client_kwargs": {"endpoint_url": store.fs.client_kwargs[
            "endpoint_url"]}}}
    buffers, ready = tmp_path / "buffers", tmp_path / "ready"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, url, json.dumps(options), str(buffers), str(ready)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for _ in range(600):  # up to 30 s
            if ready.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert ready.exists(), proc.stderr.read().decode() if proc.poll() is not None else "writer not ready"
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stderr.close()
    store = open_store(url, **options)
    assert len(store.list_segments()) == 2  # records 0-3; record 4 only in the local buffer
    writer = SegmentWriter.open(store, 0, 1, buffer_root=buffers)
    assert writer.recovered == 1
    writer.close()
    assert [r["id"] for r in iter_merged_records(store)] == [f"r{n:04d}" for n in range(5)]


# -- imports --------------------------------------------------------------------------------

LOCAL_RUN = """
import json, sys
from pathlib import Path
from batcher._store import SegmentWriter, merge, open_store
out = Path(sys.argv[1])
store = open_store(out)
store.put_image("images/a.png", b"\\x89PNG\\r\\n\\x1a\\n")
with SegmentWriter.open(store, 0, 1) as writer:
    writer.append({"t": "run", "job": "j", "job_file": "j.yaml", "at": "x", "pid": 1})
merge(store)
heavy = ("fsspec", "s3fs", "gcsfs", "botocore", "aiobotocore")
before = [m for m in heavy if m in sys.modules]
open_store("memory://b/out")
print(json.dumps({"local": before, "object": [m for m in heavy if m in sys.modules]}))
"""


def test_a_local_run_imports_no_object_storage_library(tmp_path):
    proc = subprocess.run([sys.executable, "-c", LOCAL_RUN, str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout)
    assert seen["local"] == []
    assert "fsspec" in seen["object"]  # the check does see a lazy import when one happens
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_a_temporary_left_by_a_killed_write_is_cleared_by_the_next_write_of_that_name(tmp_path):
    from batcher._store import LocalStore

    store = LocalStore(tmp_path)
    (tmp_path / "images").mkdir()
    leftover = tmp_path / "images" / ".tmp-a.png-deadbeef"  # a kill -9 between write and rename
    leftover.write_bytes(b"half")
    other = tmp_path / "images" / ".tmp-b.png-cafef00d"  # another name's writer: not ours to touch
    other.write_bytes(b"half")
    store.put_image("images/a.png", b"\x89PNG whole", replace=True)
    assert not leftover.exists() and other.exists()
    assert (tmp_path / "images" / "a.png").read_bytes() == b"\x89PNG whole"


def test_a_write_of_another_name_leaves_a_concurrent_writers_temporary_alone(tmp_path):
    from batcher._store import LocalStore

    store = LocalStore(tmp_path)
    live = tmp_path / ".tmp-manifest.json-0123abcd"  # another shard writing manifest.json right now
    live.write_bytes(b"{}")
    store.put("manifest.json", b'{"summary": {}}')
    assert live.exists()
