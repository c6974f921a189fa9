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


# A small finished job for export and report tests: done items (one with n=2, one with a hostile
# prompt), two content-policy failures from the simulator's policy word, and one pending item
# (added to the job after the run; its manifest is rebuilt as a run that stopped early writes it).
FIXTURE_PROMPTS = [
    "A calm lake at dawn",
    {"id": "pair", "prompt": "Two foxes in the snow", "n": 2, "quality": "high"},
    {"id": "xss", "prompt": "<script>alert(1)</script><img src=x onerror=alert(2)> \"q\" & 'q'"},
    {"id": "multi.line", "prompt": "line one\nline two ]} </script> \u2028 end"},
    "something forbidden here",
    {"id": "bad2", "prompt": "another forbidden prompt"},
]


def finished_job(tmp: Path) -> Path:
    """Run FIXTURE_PROMPTS against the simulator on 127.0.0.1; return the output folder."""
    from batcher import RunOptions, load_job, run_sync
    from batcher._simulator import SimulatorConfig, start_in_thread

    job_file = write_job(tmp / "job.yaml", FIXTURE_PROMPTS, defaults={"size": "32x24"})
    out = tmp / "out"
    with start_in_thread(SimulatorConfig(policy_word="forbidden")) as sim:
        result = run_sync(load_job(job_file), RunOptions(out=str(out), base_url=sim.base_url,
                                                         api_key="simulated-key", timeout=10))
    assert result.summary == {"total": 6, "done": 4, "failed": 2, "pending": 0}, result.summary
    from batcher._manifest import Journal, write_manifest

    job = load_job(write_job(job_file, [*FIXTURE_PROMPTS, {"id": "later", "prompt": "not run yet"}],
                             defaults={"size": "32x24"}))
    summary = write_manifest(Journal.read(out / "manifest.jsonl"), out / "manifest.json",
                             {"name": job.name, "file": str(job.path)}, job.items)
    assert summary == {"total": 7, "done": 4, "failed": 2, "pending": 1}
    return out


def write_manifest_file(out: Path, items: list[dict], job: dict | None = None) -> Path:
    """A hand-written manifest.json in the exact line layout `write_manifest` produces."""
    out.mkdir(parents=True, exist_ok=True)
    summary = {"total": len(items), **{s: sum(i["status"] == s for i in items) for s in ("done", "failed", "pending")}}
    lines = [json.dumps(i, ensure_ascii=False) for i in items]
    with open(out / "manifest.json", "w", encoding="utf-8") as fh:
        fh.write('{"version": 1, "job": %s, "summary": %s, "items": [' % (json.dumps(job or {"name": "h"}),
                                                                          json.dumps(summary)))
        fh.write("".join("\n" + line + ("," if k < len(lines) - 1 else "") for k, line in enumerate(lines)))
        fh.write("\n]}\n")
    return out / "manifest.json"


def tiny_png() -> bytes:
    """A whole 1x1 PNG (chunks and CRCs right): what a client that checks images accepts."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00\xff\x00\x00")) + chunk(b"IEND", b""))


def run_main(job: Path, out: Path, sim, *extra) -> int:
    """`batcher run JOB --out OUT` in this process against a running simulator; the exit code."""
    from batcher._cli import main

    return main(["run", str(job), "--out", str(out), "--base-url", sim.base_url, "--quiet", "--timeout", "10",
                 *map(str, extra)])


def jsonl_job(tmp_path: Path, n: int) -> Path:
    """A JSONL job of `n` small items, ids i0..i{n-1}."""
    path = tmp_path / "job.jsonl"
    path.write_text("".join(f'{{"id": "i{i}", "prompt": "p{i}", "size": "8x8"}}\n' for i in range(n)))
    return path
