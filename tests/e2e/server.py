"""Run the real ``bandit-service serve`` in a subprocess on a free port, for lifecycle tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float = 60.0) -> int:
        return self.process.wait(timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def running_server(
    tmp_path: Path, env: dict[str, str], workers: int = 1, ready_timeout: float = 90.0
) -> Iterator[Server]:
    """Start ``serve --migrate``, wait until ``/readyz`` says ready, kill it on the way out."""
    port = free_port()
    log_path = tmp_path / "server.log"
    full_env = {**os.environ, **env}
    if "PROMETHEUS_MULTIPROC_DIR" not in env:  # serve makes its own when it needs one
        full_env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bandit_service.cli",
                "serve",
                "--migrate",
                "--port",
                str(port),
                "--workers",
                str(workers),
            ],
            env=full_env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    server = Server(process, f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            if process.poll() is not None:
                raise AssertionError(f"server exited early:\n{server.log_text()}")
            try:
                if httpx.get(f"{server.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server not ready in time:\n{server.log_text()}")
            time.sleep(0.1)
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
