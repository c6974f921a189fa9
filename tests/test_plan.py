"""Job expansion (template × matrix, repeat), the price table, `batcher plan`, and run budgets."""

from __future__ import annotations

import itertools
import json
import tracemalloc
from pathlib import Path

import pytest

from batcher import JobValidationError, load_job
from batcher._cli import main
from batcher._plan import Budget, BudgetLimits, PriceTable, plan
from batcher._simulator import SimulatorConfig, start_in_thread

from helpers import run_main as run, by_id, manifest, write_job

PRICING = [
    {"model": "grok-imagine", "per_image": 0.07},
    {"model": "grok-imagine", "size": "32x32", "per_image": 0.02},
]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "job.yaml"
    p.write_text(text, encoding="utf-8")
    return p


@pytest.fixture
def sim():
    with start_in_thread(SimulatorConfig()) as running:
        yield running


pytestmark = pytest.mark.usefixtures("api_key")


# -- expansion -------------------------------------------------------------------------------


def test_matrix_expands_to_the_cartesian_product_with_vars(tmp_path):
    job = load_job(write(tmp_path, """
name: m
defaults: {size: 64x64}
template: "{subject} in the style of {style}"
matrix:
  subject: [a cat, a lighthouse]
  style: [ukiyo-e, art deco, 3]
"""))
    assert job.validate() == 6
    items = list(job.items())
    got = [(i.body["prompt"], i.vars) for i in items]
    want = [(f"{s} in the style of {st}", {"subject": s, "style": st})
            for s, st in itertools.product(["a cat", "a lighthouse"], ["ukiyo-e", "art deco", 3])]
    assert got == want
    assert all(i.body["size"] == "64x64" for i in items)
    assert len({i.id for i in items}) == 6


def test_repeat_gives_distinct_stable_ids_and_keeps_the_first(tmp_path):
    one = load_job(write(tmp_path, "prompts: [{prompt: a fox}]\n"))
    (plain,) = list(one.items())
    three = load_job(write(tmp_path, "prompts: [{prompt: a fox, repeat: 3}, {id: koi, prompt: a koi, repeat: 2}]\n"))
    items = list(three.items())
    assert [i.id for i in items] == [plain.id, f"{plain.id}-r2", f"{plain.id}-r3", "koi", "koi-r2"]
    assert {i.rhash for i in items[:3]} == {plain.rhash}  # the same request, asked three times


def test_matrix_ids_may_use_the_variables(tmp_path):
    job = load_job(write(tmp_path, """
prompts:
  - {id: "koi-{n}", template: "koi number {n}", matrix: {n: [1, 2]}, repeat: 2}
"""))
    assert [i.id for i in job.items()] == ["koi-1", "koi-1-r2", "koi-2", "koi-2-r2"]


@pytest.mark.parametrize("text, expected", [
    ('template: "{a} {b}"\nmatrix: {a: [x]}\n', "1: template: uses {b}, which the matrix does not define"),
    ('template: "{a}"\nmatrix:\n  a: [x]\n  b: [y]\n', "4: matrix.b: is not used in the template"),
    ('template: "{a}"\nmatrix:\n  a: []\n', "3: matrix.a: must be a non-empty list"),
    ('template: "{a!r}"\nmatrix: {a: [x]}\n', "must be a plain {variable}"),
    ('template: "{a"\nmatrix: {a: [x]}\n', "write {{ and }} for literal braces"),
    ('matrix: {a: [x]}\nprompts: [p]\n', "matrix: needs a 'template'"),
    ('prompts:\n  - {prompt: p, repeat: 0}\n', "2: prompts[0].repeat: must be an integer from 1"),
    ('prompts:\n  - {prompt: p, template: "{a}", matrix: {a: [x]}}\n', "give either 'prompt' or 'template'"),
    ('prompts:\n  - {id: same, template: "{a}", matrix: {a: [x, y]}}\n', "the id must use its variables"),
    ('pricing: [{model: m}]\nprompts: [p]\n', "pricing[0].per_image: missing"),
    ('pricing:\n  - {model: m, per_image: -1}\nprompts: [p]\n', "2: pricing[0].per_image: must be a number"),
])
def test_bad_expansions_name_file_line_and_field(tmp_path, text, expected):
    p = write(tmp_path, text)
    with pytest.raises(JobValidationError) as exc:
        load_job(p).validate()
    assert any(expected in str(problem) and str(p) in str(problem) for problem in exc.value.problems), \
        [str(x) for x in exc.value.problems]


def test_a_million_combinations_stream(tmp_path):
    values = ", ".join(f"v{i}" for i in range(1000))
    job = load_job(write(tmp_path, f'template: "{{a}} and {{b}}"\nmatrix: {{a: [{values}], b: [{values}]}}\n'))
    tracemalloc.start()
    try:
        first = list(itertools.islice(job.items(), 2000))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert first[-1].vars == {"a": "v1", "b": "v999"}
    assert peak < 8 * 1024 * 1024  # 10^6 items would need hundreds of MB if materialised


# -- prices and budgets -----------------------------------------------------------------------


def test_price_table_most_specific_row_wins():
    table = PriceTable([*PRICING, {"per_image": 0.5}, {"model": "grok-imagine", "size": "32x32", "quality": "hd",
                                                       "per_image": 0.04}])
    assert table.per_image({"model": "grok-imagine", "size": "1024x1024"}) == 0.07
    assert table.per_image({"model": "grok-imagine", "size": "32x32"}) == 0.02
    assert table.per_image({"model": "grok-imagine", "size": "32x32", "quality": "hd"}) == 0.04
    assert table.per_image({"model": "other"}) == 0.5
    assert PriceTable(PRICING).cost({"model": "other"}, 2) is None
    assert PriceTable(PRICING).cost({"model": "grok-imagine", "size": "32x32"}, 3) == pytest.approx(0.06)


def test_budget_never_admits_more_than_its_limits():
    budget = Budget(BudgetLimits(max_images=5, max_cost=0.3))
    assert budget.reserve(2, 0.14) and budget.reserve(2, 0.14)
    assert not budget.reserve(1, 0.07)  # cost would pass 0.30
    assert not budget.reserve(2, 0.0)   # images would pass 5
    budget.refund(2, 0.14)
    assert budget.reserve(1, 0.07)
    assert not Budget(BudgetLimits(max_cost=1.0)).reserve(1, None)  # an unpriced request never fits a cost cap


def test_plan_counts_by_model_size_quality_and_subtracts_done(tmp_path, sim):
    job_path = write_job(tmp_path / "job.yaml", ["a", "b", {"prompt": "c", "size": "32x32", "n": 2},
                                                 {"prompt": "d", "model": "unpriced-model"}],
                         defaults={"size": "16x16"}, pricing=PRICING)
    info = plan(load_job(job_path))
    assert info["send"] == {"requests": 4, "images": 5, "cost": pytest.approx(0.18), "unpriced_requests": 1}
    rows = {(r["model"], r["size"]): (r["requests"], r["images"], r["cost"]) for r in info["by"]}
    assert rows == {("grok-imagine", "16x16"): (2, 2, pytest.approx(0.14)),
                    ("grok-imagine", "32x32"): (1, 2, pytest.approx(0.04)),
                    ("unpriced-model", "16x16"): (1, 1, None)}
    unpriced = [i for i in load_job(job_path).items() if i.body["model"] == "unpriced-model"][0]
    assert info["first_unpriced"] == f"{job_path}:{unpriced.line}"
    out = tmp_path / "out"
    assert run(job_path, out, sim) == 0
    after = plan(load_job(job_path), out)
    assert after["already"] == 4 and after["send"]["requests"] == 0
    requests = sim.stats()["requests"]
    assert main(["plan", str(job_path), "--out", str(out), "--json"]) == 0
    assert sim.stats()["requests"] == requests  # plan sends nothing


def test_max_images_stops_with_exit_4_and_rest_pending_then_resumes(tmp_path, sim):
    job = write_job(tmp_path / "job.yaml", [f"p{i}" for i in range(10)], defaults={"size": "16x16"})
    out = tmp_path / "out"
    assert run(job, out, sim, "--max-images", "4", "--concurrency", "3") == 4
    summary = manifest(out)["summary"]
    assert summary["done"] == 4 and summary["pending"] == 6
    assert sim.stats()["images"] == 4
    assert run(job, out, sim) == 0
    assert sim.stats()["images"] == 10  # the rest, and nothing twice


def test_max_cost_charges_until_the_cap_and_records_cost_and_vars(tmp_path, sim, capsys):
    job = write(tmp_path, """
name: priced
defaults: {size: 16x16}
pricing: [{model: grok-imagine, per_image: 0.07}]
template: "{animal} reading {thing}"
matrix: {animal: [a cat, a dog, a fox], thing: [a map, a book]}
""")
    out = tmp_path / "out"
    assert run(job, out, sim, "--max-cost", "0.30", "--concurrency", "1") == 4
    records = by_id(out)
    done = [r for r in records.values() if r["status"] == "done"]
    assert len(done) == 4  # 4 × 0.07 = 0.28 ≤ 0.30 < 5 × 0.07
    assert all(r["cost"] == pytest.approx(0.07) for r in done)
    assert all(set(r["vars"]) == {"animal", "thing"} for r in records.values())
    assert main(["status", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert info["cost"] == pytest.approx(0.28) and info["images"] == 4


def test_max_cost_needs_a_price_for_every_item(tmp_path, sim, capsys):
    job = write_job(tmp_path / "job.yaml", ["a", {"prompt": "b", "model": "other"}], pricing=PRICING)
    assert run(job, tmp_path / "out", sim, "--max-cost", "1") == 2
    assert "pricing" in capsys.readouterr().err
    assert sim.stats()["requests"] == 0


def test_policy_rejections_are_refunded_to_the_budget(tmp_path, sim):
    # three rejected requests cost nothing, so a 2-image budget still makes both good images
    job = write_job(tmp_path / "job.yaml", ["forbidden 1", "forbidden 2", "forbidden 3", "ok 1", "ok 2"],
                    defaults={"size": "16x16"})
    out = tmp_path / "out"
    assert run(job, out, sim, "--max-images", "2", "--concurrency", "1") == 1
    summary = manifest(out)["summary"]
    assert summary == {"total": 5, "done": 2, "failed": 3, "pending": 0}
