from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from batcher import JobError, JobValidationError, load_job
from batcher._job import BUILTIN_DEFAULTS


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def problems(path: Path, overrides=None) -> list[str]:
    with pytest.raises(JobValidationError) as exc:
        load_job(path, overrides).validate()
    return [str(p) for p in exc.value.problems]


def test_yaml_job_with_defaults_and_items(tmp_path):
    p = write(tmp_path, "j.yaml", """
name: demo
defaults: {size: 512x512, quality: hd, style: vivid}
concurrency: 4
rate_limit: {rpm: 120, ipm: 240}
endpoint: {base_url: "http://127.0.0.1:9/v1", api_key_env: MY_KEY}
prompts:
  - a cat
  - {id: dog, prompt: a dog, size: 256x256, n: 2, background: transparent}
""")
    job = load_job(p)
    assert job.validate() == 2
    cat, dog = list(job.items())
    assert cat.body == {**BUILTIN_DEFAULTS, "size": "512x512", "quality": "hd", "style": "vivid", "prompt": "a cat"}
    assert dog.id == "dog" and dog.explicit_id
    assert dog.body["size"] == "256x256" and dog.body["n"] == 2 and dog.body["background"] == "transparent"
    assert (job.name, job.concurrency, job.rate_limit.rpm, job.rate_limit.ipm) == ("demo", 4, 120, 240)
    assert job.endpoint.api_key_env == "MY_KEY"
    assert cat.line == 8 and dog.line == 9


def test_precedence_cli_over_item_over_defaults_over_builtin(tmp_path):
    p = write(tmp_path, "j.yaml", "defaults: {size: 512x512, model: d}\nprompts:\n  - {prompt: x, size: 256x256}\n"
                                  "  - y\n")
    a, b = list(load_job(p, {"model": "cli"}).items())
    assert a.body["size"] == "256x256" and b.body["size"] == "512x512"
    assert a.body["model"] == b.body["model"] == "cli"
    a2, = [i for i in load_job(p, {"size": "64x64"}).items()][:1]
    assert a2.body["size"] == "64x64"
    assert BUILTIN_DEFAULTS["response_format"] == "b64_json"


def test_jsonl_forms_and_batch_lines(tmp_path):
    p = write(tmp_path, "j.jsonl", "\n".join([
        json.dumps("plain prompt"),
        json.dumps({"id": "x", "prompt": "object", "quality": "hd"}),
        "",
        json.dumps({"custom_id": "b1", "method": "POST", "url": "/v1/images/generations",
                    "body": {"model": "m", "prompt": "batch", "size": "1024x1024"}}),
    ]) + "\n")
    items = list(load_job(p).items())
    assert [i.id for i in items][1:] == ["x", "b1"]
    assert items[2].body["model"] == "m" and items[2].line == 4
    assert items[0].body["prompt"] == "plain prompt"


def test_prompts_file_is_relative_to_the_job(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "p.jsonl", '"from file"\n')
    p = write(tmp_path / "sub", "j.yaml", "prompts: [inline]\nprompts_file: p.jsonl\n")
    assert [i.body["prompt"] for i in load_job(p).items()] == ["inline", "from file"]


def test_every_problem_reported_with_file_line_field(tmp_path):
    p = write(tmp_path, "bad.yaml", """name: bad
concurency: 4
defaults:
  size: huge
prompts:
  - ""
  - prompt: ok
    n: 0
  - {id: a, prompt: x}
  - {id: a, prompt: y}
  - 42
  - {prompt: x, response_format: png}
  - {size: 1024x1024}
prompts_file: nope.jsonl
""")
    found = problems(p)
    f = str(p)
    assert f"{f}:2: concurency: unknown key; did you mean 'concurrency'?" in found
    assert any(s.startswith(f"{f}:4: defaults.size:") for s in found)
    assert any(s.startswith(f"{f}:6: prompts[0].prompt: must not be empty") for s in found)
    assert any(s.startswith(f"{f}:8: prompts[1].n:") for s in found)
    assert any(s.startswith(f"{f}:10: prompts[3].id: duplicate id 'a'") for s in found)
    assert any(s.startswith(f"{f}:11: prompts[4]:") for s in found)
    assert any(s.startswith(f"{f}:12: prompts[5].response_format:") for s in found)
    assert any(s.startswith(f"{f}:13: prompts[6].prompt: missing") for s in found)
    assert any(s.startswith(f"{f}:14: prompts_file:") for s in found)


def test_jsonl_problems_carry_line_numbers(tmp_path):
    p = write(tmp_path, "bad.jsonl", '"ok"\n{broken\n\n[1, 2]\n{"prompt": 5}\n{"id": "d", "prompt": "a"}\n'
                                     '{"id": "d", "prompt": "b"}\n{"prompt": "x", "n": true}\n')
    found = problems(p)
    f = str(p)
    assert found[0].startswith(f"{f}:2: line: invalid JSON")
    assert found[1].startswith(f"{f}:4: item:")
    assert found[2].startswith(f"{f}:5: prompt: must be a string")
    assert found[3] == f"{f}:7: id: duplicate id 'd'"
    assert found[4].startswith(f"{f}:8: n:")


@pytest.mark.parametrize("text,needle", [
    ("", "the file is empty"),
    ("a: [\n", "yaml"),
    ("- just\n- a list\n", "must be a mapping"),
    ("name: x\n", "needs 'prompts', 'prompts_file' or 'template'"),
    ("prompts: nope\n", "must be a list"),
    ("prompts: [x]\nprompts: [y]\n", "given twice"),
    ("prompts: [x]\nendpoint: {api_key: sk-123}\n", "keys don't belong"),
    ("prompts: [x]\nrate_limit: {rpm: fast}\n", "positive number"),
    ("prompts: [x]\nconcurrency: 0\n", "integer"),
    ("prompts: [x]\nprompts_file: missing.jsonl\n", "does not exist"),
    ("prompts: [!!python/object:os.system x]\n", "yaml"),
    ("prompts: []\n", "no items"),
    ("prompts: [{prompt: x, when: 2024-01-01}]\n", "must be JSON"),
])
def test_bad_yaml_inputs(tmp_path, text, needle):
    p = write(tmp_path, "j.yaml", text)
    try:
        job = load_job(p)
        job.validate()
    except JobValidationError as exc:
        assert any(needle in str(pr) for pr in exc.problems), exc.problems
        assert all(str(pr).startswith(f"{p}:") for pr in exc.problems)
    else:
        pytest.fail("expected a validation error")


def test_output_pointing_at_a_file_is_an_error(tmp_path):
    write(tmp_path, "afile", "x")
    p = write(tmp_path, "j.yaml", "prompts: [x]\noutput: afile\n")
    assert any("not a folder" in s for s in problems(p))


def test_missing_job_file(tmp_path):
    with pytest.raises(JobError, match="not found"):
        load_job(tmp_path / "nope.yaml")


def test_bad_cli_override(tmp_path):
    p = write(tmp_path, "j.yaml", "prompts: [x]\n")
    assert any("command line" in s and "size" in s for s in problems(p, {"size": "big"}))


def test_streaming_does_not_hold_items(tmp_path):
    p = tmp_path / "big.jsonl"
    with p.open("w") as fh:
        for i in range(20000):
            fh.write(json.dumps({"prompt": f"p{i % 1000}"}) + "\n")
    job = load_job(p)
    assert job.validate() == 20000
    ids = [i.id for i in job.items()]
    assert len(set(ids)) == 20000  # repeats get -2, -3, ...


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=300))
def test_any_yaml_text_parses_or_fails_cleanly(tmp_path, text):
    p = tmp_path / "fuzz.yaml"
    p.write_text(text, encoding="utf-8")
    try:
        job = load_job(p)
        list(job.problems())
        job.validate()
    except (JobValidationError, JobError):
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=10,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(json_values | st.fixed_dictionaries({"prompt": json_values}, optional={"id": json_values,
                                                                                       "n": json_values}),
                max_size=5))
def test_any_jsonl_parses_or_fails_cleanly(tmp_path, rows):
    p = tmp_path / "fuzz.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    try:
        job = load_job(p)
        n = job.validate()
        assert n == len(list(job.items()))
    except (JobValidationError, JobError):
        pass


def test_a_nan_nested_in_a_field_is_a_clear_error_naming_line_field_and_place(tmp_path):
    # JSON has no NaN: the request could not be sent, and its record would not be JSON
    p = write(tmp_path, "j.yaml", """
prompts:
  - a cat
  - {prompt: a dog, extra: {weights: [1.0, .nan], seed: 3}}
  - {prompt: a fox, extra: {deep: [[{x: .inf}]]}}
""")
    found = problems(p)
    assert len(found) == 2, found
    assert "extra" in found[0] and "extra.weights[1]" in found[0] and "finite" in found[0]
    assert "extra.deep[0][0].x" in found[1]
    assert ":4" in found[0] and ":5" in found[1]  # the lines named
