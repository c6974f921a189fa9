from __future__ import annotations

import ast
from pathlib import Path

import batcher

PKG = Path(batcher.__file__).parent


def test_public_api_is_exactly_all():
    public = {n for n in dir(batcher) if not n.startswith("_")} - {"annotations"}
    assert set(batcher.__all__) - {"__version__"} == public
    for name in batcher.__all__:
        assert hasattr(batcher, name)


def test_the_http_library_is_imported_in_one_module_only():
    importers = []
    for path in PKG.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, (ast.Import,)) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n.split(".")[0] in ("httpx", "httpx2", "httpcore", "httpcore2") for n in names):
                importers.append(path.name)
    assert importers == ["_client.py"]


def test_exceptions_module_opens_with_its_tree():
    doc = batcher._exceptions.__doc__
    for name in ("BatcherError", "JobValidationError", "TransientError", "PermanentError", "FatalError"):
        assert name in doc


def test_export_and_report_are_public():
    import inspect

    assert {"export", "report"} <= set(batcher.__all__)
    params = inspect.signature(batcher.export).parameters
    assert list(params) == ["out", "fmt", "to", "include_failed", "shard_size"]
    assert params["include_failed"].kind is inspect.Parameter.KEYWORD_ONLY
    assert list(inspect.signature(batcher.report).parameters) == ["out"]
