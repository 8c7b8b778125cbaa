"""A real redis-server for the shared-budget tests, on a free loopback port.

Debian's ``redis-server`` binary is needed; ``make test`` installs it. The
server keeps nothing on disk and is stopped when the tests end.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

START_SECONDS = 5.0


class RedisServer:
    """A redis-server subprocess that can be stopped and started again on the same port."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin")
        if binary is None:
            pytest.fail(
                "redis-server is not installed; `make test` installs it "
                "(or: apt-get install redis-server)",
                pytrace=False,
            )
        self.binary = binary
        self.workdir = workdir
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the server and wait until it answers PING."""
        assert self.process is None, "already running"
        log = self.workdir / f"redis-{self.port}.log"
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    "--port", str(self.port),
                    "--bind", "127.0.0.1",
                    "--save", "",
                    "--appendonly", "no",
                    "--daemonize", "no",
                    "--dir", str(self.workdir),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip
        deadline = time.monotonic() + START_SECONDS
        while not _pings(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"redis-server did not start; its log:\n{log.read_text()}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Stop the server (it keeps no data: a restarted one is empty)."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _pings(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A redis-server shared by the session's tests (give each test its own prefix)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private, running redis-server that the test may ``stop()`` and ``start()``."""
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
