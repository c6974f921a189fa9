"""Shared plumbing for the benchmarks: simulator processes, measured client subprocesses, job files.

Everything here talks to 127.0.0.1 only, every wait is bounded, and only processes started
here are ever signalled (by their own PID).
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parent.parent
PARTI_TSV = Path("/work/shared/data/partiprompts/PartiPrompts.tsv")
PARTI_JSONL = ROOT / "jobs" / "partiprompts.jsonl"
SIM_START_TIMEOUT = 20.0


# -- prompts and job files ------------------------------------------------------------------

def base_prompts() -> list[str]:
    """PartiPrompts' first column (the TSV when present, else the bundled JSONL)."""
    prompts: list[str] = []
    if PARTI_TSV.exists():
        with open(PARTI_TSV, encoding="utf-8") as fh:
            next(fh, None)  # header
            for line in fh:
                text = line.rstrip("\n").split("\t", 1)[0].strip()
                if text:
                    prompts.append(text)
    if not prompts:
        with open(PARTI_JSONL, encoding="utf-8") as fh:
            for line in fh:
                prompts.append(json.loads(line)["prompt"])
    if not prompts:
        raise SystemExit("no prompts found")
    return prompts


def unique_prompt(prompts: list[str], i: int) -> str:
    """Prompt i, made unique with " #i" so the simulator's per-prompt duplicate counter means something."""
    return f"{prompts[i % len(prompts)]} #{i}"


def write_jsonl_job(path: Path, items: Iterable[dict[str, Any]]) -> int:
    count = 0
    with open(path, "w", encoding="utf-8") as fh:
        for item in items:
            fh.write(json.dumps(item, ensure_ascii=False, separators=(",", ":")) + "\n")
            count += 1
    return count


# -- the simulator, one OS process per scenario per client ------------------------------------

class Simulator:
    """`python -m batcher simulate --port 0 ...` as a child process; stop() stops only it."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.args = args
        self.log_path = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.base_url = ""

    def __enter__(self) -> Simulator:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "batcher", "simulate", "--host", "127.0.0.1", "--port", "0", *self.args],
            stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL, cwd=str(ROOT),
        )
        line = self._first_line(SIM_START_TIMEOUT)
        prefix = "batcher simulator listening on "
        if not line.startswith(prefix):
            self.stop()
            raise RuntimeError(f"simulator did not start: {line!r} (see {self.log_path})")
        self.base_url = line[len(prefix):].strip()
        if not self.base_url.startswith("http://127.0.0.1:"):
            self.stop()
            raise RuntimeError(f"simulator is not on 127.0.0.1: {self.base_url}")
        return self

    def _first_line(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        while b"\n" not in buf and time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            buf += chunk
        return buf.split(b"\n", 1)[0].decode("utf-8", "replace")

    @property
    def root(self) -> str:
        return self.base_url.rsplit("/v1", 1)[0]

    def stats(self, timeout: float = 30.0) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.root}/_sim/stats", timeout=timeout) as resp:  # 127.0.0.1 only
            stats = json.loads(resp.read())
        stats.pop("generations", None)  # per-prompt counts: large, and summarised by "duplicates"
        return stats

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()  # SIGTERM to this PID only
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
        self._log.close()
        self.proc = None

    def __exit__(self, *exc: object) -> None:
        self.stop()


# -- one measured client process ------------------------------------------------------------

@dataclass
class ClientRun:
    returncode: int | None
    killed: bool
    wall: float  # seconds from spawn to exit, interpreter start-up included
    cpu: float  # ru_utime + ru_stime of that process (threads included)
    maxrss_mb: float  # ru_maxrss, KB on Linux
    stdout: str
    stderr_tail: str
    extra: dict[str, Any] = field(default_factory=dict)

    def last_json(self) -> dict[str, Any] | None:
        for line in reversed(self.stdout.strip().splitlines()):
            line = line.strip()
            if line.startswith("{"):
                try:
                    return json.loads(line)
                except ValueError:
                    continue
        return None


def write_unique_job(path: Path, count: int, size: str, prefix: str) -> None:
    """A JSONL job of `count` items with unique PartiPrompts-based prompts, ids `PREFIX-0000001`..."""
    prompts = base_prompts()
    write_jsonl_job(path, ({"id": f"{prefix}-{i:07d}", "prompt": unique_prompt(prompts, i), "size": size, "n": 1}
                           for i in range(count)))


def open_fds(pid: int) -> tuple[int, int]:
    """(open file descriptors, of which sockets) of a process, from /proc; (0, 0) when gone."""
    fds = sockets = 0
    try:
        for entry in os.scandir(f"/proc/{pid}/fd"):
            fds += 1
            try:
                sockets += os.readlink(entry.path).startswith("socket:")
            except OSError:
                pass
    except OSError:
        pass
    return fds, sockets


def run_client(cmd: list[str], *, timeout: float, workdir: Path, env: dict[str, str] | None = None,
               tag: str = "client", sample_fds: bool = False) -> ClientRun:
    """Run cmd as its own process; measure its CPU and peak RSS with wait4; kill it after `timeout` s.

    `sample_fds`: also record its peak open file descriptors and sockets (every 0.25 s, /proc).
    """
    out_path, err_path = workdir / f"{tag}.stdout", workdir / f"{tag}.stderr"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=str(workdir),
                                env=env)
        killed = False
        deadline = started + timeout
        status = rusage = None
        peak_fds = peak_sockets = 0
        next_sample = started
        while True:  # bounded by the deadline, plus at most one kill-and-reap
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            if sample_fds and time.monotonic() >= next_sample:
                fds, socks = open_fds(proc.pid)
                peak_fds, peak_sockets = max(peak_fds, fds), max(peak_sockets, socks)
                next_sample = time.monotonic() + 0.25
            if time.monotonic() >= deadline:
                killed = True
                os.kill(proc.pid, signal.SIGKILL)
                _, status, rusage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        wall = time.monotonic() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4: tell Popen
    stdout = out_path.read_text("utf-8", "replace")
    stderr = err_path.read_text("utf-8", "replace")
    return ClientRun(
        returncode=None if killed else proc.returncode, killed=killed, wall=wall,
        cpu=rusage.ru_utime + rusage.ru_stime, maxrss_mb=rusage.ru_maxrss / 1024.0,
        stdout=stdout, stderr_tail=stderr[-2000:],
        extra={"peak_fds": peak_fds, "peak_sockets": peak_sockets} if sample_fds else {},
    )


def batcher_env() -> dict[str, str]:
    env = dict(os.environ)
    env["BATCHER_API_KEY"] = "sk-bench-not-a-real-key"
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        env.pop(name, None)  # everything stays on 127.0.0.1
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    return env


# -- output -------------------------------------------------------------------------------

def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for row in cells[1:]:
        lines.append("| " + " | ".join(c.rjust(w) if _numeric(c) else c.ljust(w) for c, w in zip(row, widths))
                     + " |")
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def _numeric(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def batcher_revision() -> str:
    """The batcher source the clients ran: git commit, "+dirty" if batcher/ has uncommitted edits."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "batcher"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def command_line() -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in [os.path.relpath(sys.executable, os.getcwd())
                                              if sys.executable.startswith(os.getcwd()) else sys.executable,
                                              *sys.argv])
