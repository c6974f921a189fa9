"""Shared helpers for end-to-end tests: a simulator per test, the CLI in-process or as a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-DO-NOT-LEAK-7f3a9c"


def write_job(path: Path, prompts: list, **top) -> Path:
    import yaml

    doc = {"name": top.pop("name", "t"), **top, "prompts": prompts}
    path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
    return path


def run_cli(args: list[str], env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python -m batcher ARGS` in a subprocess with a bounded time."""
    full_env = {k: v for k, v in os.environ.items() if k not in ("BATCHER_API_KEY", "OPENAI_API_KEY")}
    full_env.update({"BATCHER_API_KEY": KEY, "PYTHONPATH": str(ROOT)})
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "batcher", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def by_id(out: Path) -> dict:
    return {r["id"]: r for r in manifest(out)["items"]}
