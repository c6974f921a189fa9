"""One output interface: `plan --out`, `export`, `report` and `status` give the same on object storage
(fsspec `memory://`, and S3 on a moto server after a sharded run) as on the same output in a folder."""

from __future__ import annotations

import io
import json
import os
import tarfile
import uuid
from pathlib import Path
from typing import Any

import pytest

import batcher
from batcher import ManifestError
from batcher._export import FORMATS, MARKER
from batcher._output import FolderOutput, OutsideError, StoreOutput, open_output
from batcher._plan import plan
from batcher._store import ObjectStore

from helpers import finished_job, tiny_png, write_manifest_file
from test_sharded import Shards, make_job, ok, run_args
from test_store import s3_endpoint  # noqa: F401 — the moto S3 server fixture

# -- copying an output between a folder and a store ------------------------------------------


def upload(folder: Path, store: ObjectStore) -> None:
    """Every file batcher wrote into `folder` (not its lock, checkpoint or temporaries), into `store`."""
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and not any(part.startswith(".") for part in rel.split("/")):
            store.put(rel, path)


def download(store: ObjectStore, folder: Path) -> None:
    """Every object under the store's prefix, into `folder`: the same output, on a folder."""
    for path in store.fs.find(store.root):
        rel = path[len(store.root) + 1:]
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        store.fs.get_file(path, str(folder / rel))


def tree(folder: Path) -> dict[str, Any]:
    """An export's files: bytes, or a tar's members (name, bytes); its marker's source path left out."""
    out: dict[str, Any] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if not path.is_file():
            continue
        if rel == MARKER:
            doc = json.loads(path.read_text())
            out[rel] = {k: v for k, v in doc.items() if k != "source"}
        elif rel.endswith(".tar"):  # members' mtimes are the image files' (a download's is now)
            with tarfile.open(path) as tar:
                out[rel] = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]
        else:
            out[rel] = path.read_bytes()
    return out


def same_status(a: dict[str, Any], b: dict[str, Any]) -> None:
    drop = ("out", "batches", "shards")
    assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}


def compare(store_url: str, folder: Path, job: Path, tmp: Path) -> None:
    """plan --out, export (every format, with and without failed items), report and status: the
    same from the store as from the folder."""
    loaded = batcher.load_job(job)
    for retry_failed in (False, True):
        want = plan(loaded, folder, retry_failed=retry_failed)
        got = plan(loaded, store_url, retry_failed=retry_failed)
        assert got == {**want, "out": store_url}
    for fmt in FORMATS:
        for include_failed in (False, True):
            name = f"{fmt}-{include_failed}"
            a = batcher.export(folder, fmt, tmp / "from-folder" / name, include_failed=include_failed)
            b = batcher.export(store_url, fmt, tmp / "from-store" / name, include_failed=include_failed)
            assert a == b and a["images"] > 0
            assert tree(tmp / "from-store" / name) == tree(tmp / "from-folder" / name)
            assert json.loads((tmp / "from-store" / name / MARKER).read_text())["source"] == store_url
    local_page = batcher.report(folder)
    assert batcher.report(store_url) == f"{store_url}/report.html"
    assert open_output(store_url).store.read("report.html") == Path(local_page).read_bytes()
    data = next(Path(local_page).parent.joinpath("report-data").iterdir())  # the page's chunks, facets, index
    names = sorted(p.name for p in data.iterdir())
    assert "c-000000.js" in names and "facets.js" in names and "w-000.js" in names
    for name in names:
        assert open_output(store_url).store.read(f"report-data/{data.name}/{name}") == (data / name).read_bytes()
    same_status(batcher.status(store_url), batcher.status(folder))


# -- fsspec memory://: a single run's output, uploaded -----------------------------------------


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> tuple[Path, str]:
    """A finished single run (done, failed and pending items) in a folder, and the same in memory://."""
    folder = finished_job(tmp_path_factory.mktemp("single"))
    url = f"memory://batcher-{uuid.uuid4().hex[:12]}/out"
    upload(folder, ObjectStore(url))
    return folder, url


def test_a_single_runs_output_reads_the_same_from_a_store(single, tmp_path):
    folder, url = single
    compare(url, folder, folder.parent / "job.yaml", tmp_path)
    info = batcher.status(url)
    assert (info["total"], info["done"], info["failed"], info["pending"]) == (7, 4, 2, 1)
    assert info["images_on_disk"] == 5 and info["bytes_on_disk"] > 0  # counted in the store, as on disk


def test_plan_out_on_a_store_subtracts_what_it_holds(single):
    folder, url = single
    info = plan(batcher.load_job(folder.parent / "job.yaml"), url)
    assert (info["items"], info["already"], info["send"]["requests"]) == (7, 6, 1)  # only "later" is left


def test_plan_out_on_an_empty_store_sends_everything(single):
    folder, _ = single
    info = plan(batcher.load_job(folder.parent / "job.yaml"), f"memory://batcher-{uuid.uuid4().hex[:12]}/none")
    assert (info["already"], info["send"]["requests"]) == (0, 7)


def test_a_store_without_a_manifest_is_a_clear_error_naming_its_url(tmp_path):
    url = f"memory://batcher-{uuid.uuid4().hex[:12]}/empty"
    with pytest.raises(ManifestError, match=r"/empty/manifest\.json: no manifest here"):
        batcher.export(url, "imagefolder", tmp_path / "x")
    with pytest.raises(ManifestError, match=r"/empty/manifest\.json: no manifest here"):
        batcher.report(url)
    assert not (tmp_path / "x").exists()


def test_a_corrupt_manifest_in_a_store_is_named_by_url_and_line(tmp_path):
    url = f"memory://batcher-{uuid.uuid4().hex[:12]}/bad"
    store = ObjectStore(url)
    store.put("manifest.json", b'{"version": 1, "job": {}, "summary": {}, "items": [\n{"id": "a"}\n]}\n')
    with pytest.raises(ManifestError, match=r"/bad/manifest\.json:2: corrupt item line"):
        batcher.export(url, "imagefolder", tmp_path / "x")


def test_an_image_name_leading_out_of_a_store_is_refused(tmp_path):
    url = f"memory://batcher-{uuid.uuid4().hex[:12]}/evil"
    store = ObjectStore(url)
    item = {"id": "a", "status": "done", "request": {"prompt": "p"}, "images": [{"file": "../secret.png"}]}
    store.put("manifest.json", ('{"version": 1, "job": {"name": "h"}, "summary": {}, "items": [\n'
                                + json.dumps(item) + "\n]}\n").encode())
    store.put("secret.png", b"\x89PNG")  # what the name would reach if it were followed
    with pytest.raises(ManifestError, match=r"manifest\.json:2: images\.file: '\.\./secret\.png' is not a path inside"):
        batcher.export(url, "imagefolder", tmp_path / "x")
    page = open_output(url).store.read(batcher.report(url).rsplit("/", 1)[-1]).decode()  # type: ignore[union-attr]
    assert "secret.png" not in page  # the report links only names inside the output


def test_a_missing_image_in_a_store_is_skipped_and_counted(single, tmp_path):
    folder, _ = single
    url = f"memory://batcher-{uuid.uuid4().hex[:12]}/holes"
    store = ObjectStore(url)
    upload(folder, store)
    gone = next(name for name, _ in store.list("images"))
    store.fs.rm_file(f"{store.root}/images/{gone}")
    counts = batcher.export(url, "openai-batch", tmp_path / "x")
    assert counts["missing"] == 1 and counts["images"] == 4
    assert batcher.status(url)["images_on_disk"] == 4


@pytest.mark.parametrize("fmt", FORMATS)
def test_images_fetched_ahead_reach_the_export_in_manifest_order(single, tmp_path, monkeypatch, fmt):
    """A window smaller than the output: downloads run ahead, are consumed in order, none is left over."""
    from batcher import _export

    folder, url = single
    monkeypatch.setattr(_export, "PREFETCH", 2)
    a = batcher.export(folder, fmt, tmp_path / "a", include_failed=True)
    b = batcher.export(url, fmt, tmp_path / "b", include_failed=True)
    assert a == b
    assert tree(tmp_path / "b") == tree(tmp_path / "a")
    assert not (tmp_path / "b" / ".fetch").exists()


def test_a_download_that_fails_midway_leaves_nothing_and_stops_fetching(tmp_path, monkeypatch):
    from batcher import _export
    from batcher._output import StoreOutput

    folder = tmp_path / "out"
    (folder / "images").mkdir(parents=True)
    items = []
    for i in range(40):
        (folder / "images" / f"i{i:02d}.png").write_bytes(tiny_png())
        items.append({"id": f"i{i:02d}", "status": "done", "request": {"prompt": f"p {i}"},
                      "images": [{"file": f"images/i{i:02d}.png"}]})
    write_manifest_file(folder, items)
    url = f"memory://batcher-{uuid.uuid4().hex[:12]}/forty"
    upload(folder, ObjectStore(url))
    real = StoreOutput.copy
    calls: list[str] = []

    def failing(self, handle, dst):
        calls.append(handle)
        if handle == "images/i02.png":
            raise OSError(5, "connection reset while downloading")
        real(self, handle, dst)

    monkeypatch.setattr(_export, "PREFETCH", 4)
    monkeypatch.setattr(StoreOutput, "copy", failing)
    with pytest.raises(OSError, match="connection reset"):
        batcher.export(url, "imagefolder", tmp_path / "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # neither DIR nor its temporary folder
    assert len(calls) <= 3 + 4  # the window ahead of the failure at most, not the other 33 images


def test_the_reader_is_picked_by_scheme(tmp_path):
    assert isinstance(open_output(tmp_path), FolderOutput)
    assert isinstance(open_output(f"file://{tmp_path}"), FolderOutput)
    assert isinstance(open_output("memory://b/out"), StoreOutput)
    with pytest.raises(OutsideError):
        open_output("memory://b/out").find("images/../../x.png")
    with pytest.raises(OutsideError):
        open_output(tmp_path).find("/etc/passwd")


def test_a_folder_link_leading_out_is_refused(tmp_path):
    (tmp_path / "out" / "images").mkdir(parents=True)
    (tmp_path / "secret.png").write_bytes(b"x")
    os.symlink(tmp_path / "secret.png", tmp_path / "out" / "images" / "a.png")
    with pytest.raises(OutsideError):
        open_output(tmp_path / "out").find("images/a.png")


def test_a_report_into_a_store_replaces_the_earlier_one(single):
    _, url = single
    store = open_output(url).store
    store.put("report.html", b"an older page")
    batcher.report(url)
    page = store.read("report.html")
    assert page.startswith(b"<!doctype html>") and b"an older page" not in page
    assert not [name for name, _ in store.list("") if name.startswith(".")]  # no temporary left in the store


# -- S3 (moto): a sharded run, then every reader on s3:// and on the same output downloaded ----


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch):  # noqa: F811
    """This process finds the moto server the standard way (the environment), as a user's would."""
    from s3fs import S3FileSystem

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    S3FileSystem.clear_instance_cache()  # an instance cached before the variable was set knows another endpoint
    yield s3_endpoint
    S3FileSystem.clear_instance_cache()


def test_a_sharded_run_on_s3_reads_the_same_as_its_folder_copy(tmp_path, s3_env):
    from batcher._simulator import SimulatorConfig, start_in_thread

    bucket = f"batcher-outputs-{uuid.uuid4().hex[:12]}"
    url = f"s3://{bucket}/run"
    store = ObjectStore(url)
    store.fs.mkdir(bucket)
    job, prompts = make_job(tmp_path, 10)
    from helpers import write_job

    write_job(job, [*prompts, "a forbidden prompt"], name="sharded", defaults={"size": "32x32"})
    procs = Shards(tmp_path, env={"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                                  "AWS_SESSION_TOKEN": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                                  "AWS_ENDPOINT_URL_S3": s3_env, "AWS_EC2_METADATA_DISABLED": "true",
                                  "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull})
    try:
        with start_in_thread(SimulatorConfig(policy_word="forbidden")) as sim:
            ok(procs.run("plan", str(job), "--out", url, "--shards", "2"))
            codes = [procs.run(*run_args(job, url, sim, "--shard", f"{index}/2")).returncode for index in range(2)]
        assert sorted(codes) == [0, 1]  # the shard holding the refused prompt finished with a failure
        assert store.exists("manifest.json")
        # the job grows by one item after the run: plan --out must count it as the only one to send
        write_job(job, [*prompts, "a forbidden prompt", "one more"], name="sharded", defaults={"size": "32x32"})

        folder = tmp_path / "copy"
        download(store, folder)
        compare(url, folder, job, tmp_path / "exports")
        info = batcher.status(url)
        assert (info["total"], info["done"], info["failed"], info["pending"]) == (11, 10, 1, 0)
        assert info["images_on_disk"] == 10 and info["shards"] == {"planned": 2, "committed": [0, 1]}
        planned = plan(batcher.load_job(job), url)
        assert (planned["items"], planned["already"], planned["send"]["requests"]) == (12, 11, 1)

        # the commands, as a user types them
        text = ok(procs.run("plan", str(job), "--out", url, "--json")).stdout
        assert json.loads(text)["already"] == 11
        ok(procs.run("export", url, "--format", "webdataset", "--to", str(tmp_path / "cli-wds")))
        names = [m.name for m in tarfile.open(tmp_path / "cli-wds" / "shard-000000.tar").getmembers()]
        assert sum(n.endswith(".png") for n in names) == 10
        assert ok(procs.run("report", url)).stdout.strip() == f"{url}/report.html"
        assert io.BytesIO(store.read("report.html")).read(15) == b"<!doctype html>"
        status = json.loads(ok(procs.run("status", url, "--json")).stdout)
        assert (status["done"], status["images_on_disk"]) == (10, 10)
    finally:
        procs.close()


def test_a_linked_image_folder_leading_out_is_refused_and_links_inside_are_followed(tmp_path):
    (tmp_path / "out" / "images").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "b.png").write_bytes(b"x")
    os.symlink(tmp_path / "elsewhere", tmp_path / "out" / "images" / "ab")  # a subfolder that leads out
    reader = open_output(tmp_path / "out")
    with pytest.raises(OutsideError):
        reader.find("images/ab/b.png")
    with pytest.raises(OutsideError):  # a folder leading out is never cached as good
        reader.find("images/ab/b.png")
    (tmp_path / "out" / "images" / "c.png").write_bytes(b"y")
    os.symlink(tmp_path / "out" / "images" / "c.png", tmp_path / "out" / "images" / "d.png")  # inside: fine
    assert reader.find("images/d.png") == os.path.join(str(tmp_path / "out"), "images/d.png")
    assert reader.find("images/missing.png") is None
