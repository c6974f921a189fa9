"""Images spread over subfolders once an output starts large; the choice is recorded and never changes."""

from __future__ import annotations

from pathlib import Path

import pytest

from batcher import _layout
from batcher._cli import main
from batcher._manifest import iter_manifest
from batcher._layout import Layout, decide_layout, image_subdir, read_layout
from batcher._simulator import SimulatorConfig, start_in_thread

from helpers import run_main as run, write_job


@pytest.fixture
def sim():
    with start_in_thread(SimulatorConfig()) as running:
        yield running


pytestmark = pytest.mark.usefixtures("api_key")


def files(out: Path) -> dict[str, str]:
    _, items = iter_manifest(out / "manifest.json")  # the single file, or a large output's segments
    return {i["id"]: i["images"][0]["file"] for i in items if i["images"]}


def test_subdir_is_a_stable_prefix_of_the_stem_digest():
    assert image_subdir("a", "flat") == ""
    assert image_subdir("a", "fanout") == "ca/"  # sha256("a") = ca978112...
    assert len({image_subdir(f"s-{i}", "fanout") for i in range(5000)}) == 256


def test_decided_once_and_recorded(tmp_path):
    assert read_layout(tmp_path) is None
    assert decide_layout(tmp_path, 5, fresh=True) == Layout("flat", "single")
    assert decide_layout(tmp_path, 10**7, fresh=True) == Layout("flat", "single")  # recorded: never changes
    other = tmp_path / "big"
    other.mkdir()
    assert decide_layout(other, _layout.FANOUT_FROM, fresh=True) == Layout("fanout", "segments")
    assert decide_layout(other, 1, fresh=False) == Layout("fanout", "segments")
    old = tmp_path / "old"
    old.mkdir()
    assert decide_layout(old, 10**7, fresh=False) == Layout()  # an existing output without a record stays as it was


def test_a_large_new_output_fans_out_and_reruns_keep_it(tmp_path, sim, monkeypatch):
    monkeypatch.setattr(_layout, "FANOUT_FROM", 3)
    prompts = [{"id": f"p{i}", "prompt": f"prompt {i}"} for i in range(3)]
    job = write_job(tmp_path / "job.yaml", prompts, defaults={"size": "16x16"})
    out = tmp_path / "out"
    assert run(job, out, sim) == 0
    assert read_layout(out) == Layout("fanout", "segments")
    got = files(out)
    for item_id, file in got.items():
        assert file == f"images/{image_subdir(item_id, 'fanout')}{item_id}.png"
        assert (out / file).is_file()
    assert not [p for p in (out / "images").iterdir() if p.is_file()]  # nothing flat
    (out / got["p1"]).unlink()  # a lost file is found and written again where the layout says
    requests = sim.stats()["requests"]
    assert run(job, out, sim) == 0 and sim.stats()["requests"] == requests + 1
    assert (out / got["p1"]).is_file()
    assert main(["export", str(out), "--format", "imagefolder", "--to", str(tmp_path / "ds")]) == 0
    assert sorted(p.name for p in (tmp_path / "ds").rglob("*.png")) == ["p0.png", "p1.png", "p2.png"]


def test_an_existing_flat_output_stays_flat_when_it_grows(tmp_path, sim, monkeypatch):
    job = write_job(tmp_path / "job.yaml", [{"id": "a", "prompt": "one"}], defaults={"size": "16x16"})
    out = tmp_path / "out"
    assert run(job, out, sim) == 0
    (out / "layout.json").unlink()  # as an output made before layouts existed
    monkeypatch.setattr(_layout, "FANOUT_FROM", 2)
    job = write_job(tmp_path / "job.yaml", [{"id": "a", "prompt": "one"}, {"id": "b", "prompt": "two"},
                                            {"id": "c", "prompt": "three"}], defaults={"size": "16x16"})
    assert run(job, out, sim) == 0
    assert read_layout(out) == Layout("flat", "single")
    assert files(out) == {k: f"images/{k}.png" for k in "abc"}
