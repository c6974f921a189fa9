"""A real `redis-server` for tests: 127.0.0.1, a free port, no persistence, stopped by its PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server")
START_TIMEOUT = 10.0


def free_port() -> int:
    # bind port 0 to let the kernel pick; `redis-server --port 0` would disable TCP instead
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ping(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """`redis-server` as a child process. `kill()` and `start()` again keep the same port."""

    def __init__(self, workdir: Path) -> None:
        assert REDIS_SERVER is not None
        self.workdir = workdir
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self) -> RedisServer:
        """Start on the last port (a restart) or a fresh free one, retrying a port collision."""
        ports = [self.port] * 3 if self.port else [free_port() for _ in range(5)]
        for port in ports:
            self._log = open(self.workdir / f"redis-{port}.log", "ab")
            proc = subprocess.Popen(
                [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(self.workdir)],
                stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline and proc.poll() is None:
                if ping(port):
                    self.proc, self.port = proc, port
                    return self
                time.sleep(0.05)
            self._reap(proc)  # exited (port taken?) or never answered: try the next port
            self._log.close()
            time.sleep(0.2)
        raise RuntimeError(f"redis-server did not start; see {self.workdir}")

    def kill(self) -> None:
        """SIGKILL this server only (by its PID), as a crash would."""
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc = None
            self._log.close()

    def stop(self) -> None:
        if self.proc is not None:
            self._reap(self.proc)
            self.proc = None
            self._log.close()

    @staticmethod
    def _reap(proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            proc.terminate()  # SIGTERM to this PID only
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server not installed "
                                 "(apt-get install -y redis-server; .ci/run does it)")


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()
