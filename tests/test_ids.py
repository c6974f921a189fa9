from __future__ import annotations

import os

import pytest

from batcher._ids import IdAssigner, request_hash, safe_stem


def test_request_hash_is_canonical_and_ignores_transport():
    a = request_hash({"prompt": "x", "model": "m", "response_format": "url"})
    b = request_hash({"model": "m", "prompt": "x", "response_format": "b64_json"})
    assert a == b and len(a) == 16
    assert request_hash({"prompt": "x", "model": "m", "size": "1x1"}) != a


def test_identical_requests_are_told_apart_by_occurrence():
    ids = IdAssigner()
    h = request_hash({"prompt": "same"})
    other = request_hash({"prompt": "other"})
    assert [ids.assign(None, h), ids.assign(None, other), ids.assign(None, h), ids.assign(None, h)] == [
        h, other, f"{h}-2", f"{h}-3"]


def test_inserting_a_line_elsewhere_keeps_other_ids():
    prompts = ["a", "b", "c", "b"]
    def assign(ps):
        ids = IdAssigner()
        return {(p, k): ids.assign(None, request_hash({"prompt": p})) for k, p in enumerate(ps)}
    before = list(assign(prompts).values())
    after = list(assign(["new"] + prompts).values())
    assert set(before) <= set(after)


def test_duplicate_explicit_id_is_refused():
    ids = IdAssigner()
    assert ids.assign("x", "0" * 16) == "x"
    assert ids.assign("x", "1" * 16) is None


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a/b", "..", ".", ".hidden", "a\x00b", "x" * 500,
                                 "CON", "nul.txt", "a\\b", "", "~x", "é/../"])
def test_safe_stem_never_escapes(bad, tmp_path):
    stem = safe_stem(bad)
    assert stem and "/" not in stem and "\\" not in stem and "\x00" not in stem
    assert not stem.startswith(".") and ".." not in stem and len(stem) <= 120
    target = (tmp_path / "images" / f"{stem}.png").resolve()
    assert target.parent == (tmp_path / "images").resolve()
    assert os.path.basename(stem) == stem


def test_safe_stem_keeps_clean_ids_and_separates_collisions():
    assert safe_stem("parti-0001") == "parti-0001"
    assert safe_stem("a/b") != safe_stem("a_b")
    assert safe_stem("a/b") != safe_stem("a:b")
