"""Report stage: progress while running, one summary line at the end.

On a terminal: a tqdm bar (done, failed, retrying, images/s). Elsewhere (cron, CI, pipes):
timestamped log lines, one every `interval` seconds. `--quiet` keeps only warnings and errors.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from datetime import datetime
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = ["Reporter"]


class Reporter:
    def __init__(
        self,
        *,
        quiet: bool = False,
        tty: bool | None = None,
        stream: IO[str] | None = None,
        interval: float = 10.0,
        log_file: str | None = None,
    ) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = interval
        self.done = self.failed = self.retrying = self.images = 0
        self.total = 0
        self.at_provider: tuple[int, int] | None = None  # batch mode: (finished, total) at the provider
        self._bar: tqdm | None = None
        self._started = time.monotonic()
        self._last_line = self._started
        self._log = open(log_file, "a", encoding="utf-8") if log_file else None
        self.redact: Callable[[str], str] | None = None  # masks the run's keys in every line shown or logged

    def _stamp(self, message: str) -> str:
        return f"{datetime.now().astimezone().isoformat(timespec='seconds')} batcher: {message}"

    def log(self, message: str, *, level: str = "info") -> None:
        """A message for the operator; warnings, errors and the summary show even with --quiet."""
        if self.redact is not None:
            message = self.redact(message)
        if self._log:
            self._log.write(self._stamp(message) + "\n")
            self._log.flush()
        if self.quiet and level == "info":
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        elif self.tty:
            print(message, file=self.stream, flush=True)
        else:
            print(self._stamp(message), file=self.stream, flush=True)

    def start(self, total: int, skipped: int) -> None:
        self.total = total
        self._started = self._last_line = time.monotonic()
        if skipped:
            self.log(f"{skipped} item(s) already in the manifest; {total} to run")
        if self.tty and not self.quiet and total:
            from tqdm import tqdm  # only a terminal's bar needs it: not imported by quiet or piped runs

            self._bar = tqdm(total=total, unit="item", file=self.stream, dynamic_ncols=True)

    def _refresh(self) -> None:
        if self._bar is not None:
            rate = self.images / max(time.monotonic() - self._started, 1e-9)
            postfix: dict[str, object] = {"failed": self.failed, "retrying": self.retrying, "img_s": f"{rate:.1f}"}
            if self.at_provider:
                postfix["provider"] = f"{self.at_provider[0]}/{self.at_provider[1]}"
            self._bar.set_postfix(dict(sorted(postfix.items())), refresh=False)  # as tqdm orders keywords

    def item_finished(self, ok: bool, images: int = 0) -> None:
        if ok:
            self.done += 1
            self.images += images
        else:
            self.failed += 1
        if self._bar is not None:
            self._bar.update(1)
            self._refresh()

    def provider(self, done: int, total: int) -> None:
        """Batch mode: the provider's own count of finished requests in the open batches (on the bar)."""
        self.at_provider = (done, total)
        self._refresh()

    def retry(self, delta: int) -> None:
        self.retrying += delta
        self._refresh()

    def tick(self) -> None:
        """Called about once a second; prints the periodic line when not on a terminal."""
        now = time.monotonic()
        if self.tty or self.quiet or now - self._last_line < self.interval:
            return
        self._last_line = now
        self.log(self.progress_line())

    def progress_line(self) -> str:
        elapsed = max(time.monotonic() - self._started, 1e-9)
        return (
            f"{self.done + self.failed}/{self.total} items: {self.done} done, {self.failed} failed, "
            f"{self.retrying} retrying, {self.images / elapsed:.2f} images/s"
            + (f"; at the provider {self.at_provider[0]}/{self.at_provider[1]} finished" if self.at_provider else "")
        )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def summary(self, result: Any) -> None:
        self.close()
        s = result.summary
        line = (
            f"{result.outcome}: {s['done']} done, {s['failed']} failed, {s['pending']} pending "
            f"of {s['total']}; {result.images} image(s) in {result.elapsed:.1f}s -> {result.out}"
        )
        if getattr(result, "cost", None) is not None:
            line += f"; estimated cost {result.cost:.2f}"
        if getattr(result, "budget", None):
            b = result.budget
            line += f"; budget charged {b['images']} image(s)" + (
                f", {b['cost']:.2f} of {b['max_cost']:.2f}" if b.get("max_cost") is not None else "")
        self.log(line, level="summary")
        if self._log:
            self._log.close()
            self._log = None
